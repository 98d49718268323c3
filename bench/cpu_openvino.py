"""unfog on a CPU against OpenVINO and diffusers, each at its best, on identical weights.

    python bench/cpu_openvino.py [--latents 32,64] [--rounds 16] [--image-rounds 5] [--json bench/results-openvino.json]

Needs `pip install openvino==2026.4.0` (bench-only). The Stable Diffusion 1.5 U-Net with random
weights (built by diffusers, loaded by unfog), classifier-free guidance's batch of 2:

- diffusers float32 and bfloat16;
- OpenVINO: the diffusers module through `openvino.convert_model`, compiled for the CPU with the
  bf16 inference-precision hint;
- unfog float32 and `optimize()` (bf16, channels_last, packed weights).

This is a shared VM whose speed drifts by tens of percent within minutes, so the implementations
run interleaved, one call each per round, and the ratios are medians of the per-round ratios
(each from calls a few seconds apart), beside each one's median milliseconds.

Then whole 256² images (20 DPM-Solver++(2M) steps, CFG 7.5, text encoding and decode) from a
full-size random SD 1.5 pipeline: diffusers in bf16, diffusers with its U-Net and VAE decoder
replaced by OpenVINO ones in bf16 (text encoder float32, as unfog's optimize() keeps it), and
unfog optimize() (U-Net and autoencoder bf16), interleaved likewise, each with its PSNR against
unfog's float32 image.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import PROMPT, build_sd15, psnr, rel_err, unet_pair  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def openvino_module(module: torch.nn.Module, call, example: tuple, counters: bool = False):
    """call(module, *tensors) (returning one tensor) compiled by OpenVINO for this CPU in bf16:
    a callable taking the same tensors and returning numpy. `counters`: OpenVINO's per-layer
    timing on (PERF_COUNT), read through the callable's `request`."""
    import openvino as ov

    class Plain(torch.nn.Module):  # positional inputs and a tensor output, as convert_model wants
        def __init__(self):
            super().__init__()
            self.m = module  # a submodule, so that tracing sees its weights as parameters

        def forward(self, *args):
            return call(self.m, *args)

    with torch.no_grad():
        model = ov.convert_model(Plain().eval(), example_input=example)
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "bf16", "PERF_COUNT": counters})
    request = compiled.create_infer_request()

    def run(*args):
        return next(iter(request.infer([a.float().numpy() for a in args]).values()))

    run.request = request
    return run


def openvino_unet(module: torch.nn.Module, example: tuple, counters: bool = False):
    """The diffusers U-Net compiled by OpenVINO for this CPU in bf16: a callable (x, t, ctx) -> numpy."""
    return openvino_module(module, lambda m, x, t, ctx: m(x, t, encoder_hidden_states=ctx).sample, example, counters)


def interleave(fns: dict, rounds: int, unit: float = 1000.0) -> dict[str, list[float]]:
    """Each fn called once per round, in turn; times in ms (unit 1000) or s (unit 1)."""
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t) * unit)
    return times


def summarise(times: dict[str, list[float]], base: str) -> dict[str, dict]:
    out = {}
    for name, ts in times.items():
        out[name] = {"median": round(statistics.median(ts), 3 if max(ts) < 100 else 1), "min": round(min(ts), 3 if max(ts) < 100 else 1),
                     "speedup_vs_openvino": round(statistics.median(b / t for b, t in zip(times[base], ts)), 3)}
    return out


def bench_unets(latent: int, rounds: int, emit) -> None:
    from unfog.pipeline import optimize_unet

    theirs, ours, _ = unet_pair("sd15")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, latent, latent, generator=g)
    ctx = torch.randn(2, 77, 768, generator=g)
    t = torch.full((2,), 500.0)
    with torch.inference_mode():
        reference = ours(x, t, ctx).float()
    ov = openvino_unet(theirs, (x, t, ctx))
    theirs_bf16 = copy.deepcopy(theirs).to(torch.bfloat16)
    fast = optimize_unet(copy.deepcopy(ours), torch.bfloat16, True, False)  # what Pipeline.optimize() does on this CPU
    xb, cb = x.bfloat16(), ctx.bfloat16()
    fns = {
        "OpenVINO 2026 bf16": lambda: ov(x, t, ctx),
        "diffusers fp32": lambda: theirs(x, t, encoder_hidden_states=ctx).sample,
        "diffusers bf16": lambda: theirs_bf16(xb, t, encoder_hidden_states=cb).sample,
        "unfog fp32": lambda: ours(x, t, ctx),
        "unfog optimize() bf16": lambda: fast(xb, t, cb),
    }
    with torch.inference_mode():
        outputs = {}
        for name, fn in fns.items():  # two warm-up calls each; the second one's output is checked
            fn()
            out = fn()
            outputs[name] = torch.as_tensor(out).float()
        times = interleave(fns, rounds)
    summary = summarise(times, "OpenVINO 2026 bf16")
    for name in fns:
        emit({"case": f"sd15 U-Net latent {latent}×{latent}, batch 2 (CFG)", "impl": name, "ms_per_call": summary[name]["median"],
              "min_ms": summary[name]["min"], "speedup_vs_openvino": summary[name]["speedup_vs_openvino"],
              "rel_err_vs_unfog_fp32": float(f"{rel_err(outputs[name], reference):.2g}"), "rounds": rounds})


def bench_images(rounds: int, steps: int, size: int, emit) -> None:
    from unfog import Pipeline

    kw = dict(num_inference_steps=steps, guidance_scale=7.5, height=size, width=size)
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        ref, folder = build_sd15(tmp)
        exact = Pipeline.from_pretrained(folder)
        reference = exact(PROMPT, seed=1, sampler="dpmpp_2m", **kw).images[0]
        del exact
        bf16 = copy.deepcopy(ref).to(torch.bfloat16)
        # diffusers with OpenVINO's U-Net: the pipeline keeps its U-Net module for the config, its
        # forward replaced by the compiled model's.
        latent = size // 8
        example = (torch.randn(2, 4, latent, latent), torch.full((2,), 500.0), torch.randn(2, 77, 768))
        ov = openvino_unet(ref.unet, example)

        def ov_forward(sample, timestep, encoder_hidden_states, *args, return_dict=True, **kwargs):
            t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(sample.shape[0])
            return (torch.from_numpy(ov(sample, t, encoder_hidden_states).copy()).to(sample.dtype),)

        ref.unet.forward = ov_forward
        # …and its VAE decoder, as OpenVINO's Stable Diffusion pipelines convert it too (optimize()
        # likewise runs unfog's autoencoder in bf16); the text encoder stays float32 on both sides.
        decoder = openvino_module(ref.vae, lambda vae, z: vae.decode(z).sample, (torch.randn(1, 4, latent, latent),))

        def ov_decode(z, return_dict=True, **kwargs):
            from diffusers.models.autoencoders.vae import DecoderOutput

            pixels = torch.from_numpy(decoder(z).copy()).to(z.dtype)
            return DecoderOutput(sample=pixels) if return_dict else (pixels,)

        ref.vae.decode = ov_decode
        with_ov = ref
        fast = Pipeline.from_pretrained(folder).optimize()
        first = {}

        def theirs(pipe):
            return lambda: first.setdefault(id(pipe), pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(1), **kw).images[0])

        def ours():
            return first.setdefault("unfog", fast(PROMPT, seed=1, sampler="dpmpp_2m", **kw).images[0])

        fns = {"diffusers + OpenVINO U-Net and VAE bf16": theirs(with_ov), "diffusers bf16": theirs(bf16), "unfog optimize()": ours}
        for fn in fns.values():
            fn()
        first.clear()
        times = interleave(fns, rounds, unit=1.0)
        images = {"diffusers + OpenVINO U-Net and VAE bf16": first[id(with_ov)], "diffusers bf16": first[id(bf16)], "unfog optimize()": first["unfog"]}
    summary = summarise(times, "diffusers + OpenVINO U-Net and VAE bf16")
    for name in fns:
        emit({"case": f"sd15 image {size}² ({steps} steps DPM-Solver++ 2M, CFG 7.5, text+decode)", "impl": name,
              "s_per_image": summary[name]["median"], "min_s": summary[name]["min"], "speedup_vs_openvino": summary[name]["speedup_vs_openvino"],
              "psnr_vs_unfog_fp32_db": psnr(images[name], reference), "rounds": rounds})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latents", default="32,64", help="U-Net latent sizes (comma-separated)")
    ap.add_argument("--rounds", type=int, default=16, help="interleaved rounds per U-Net size (64×64 uses half)")
    ap.add_argument("--image-rounds", type=int, default=5, help="interleaved rounds of whole images (0: skip)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--json", default="bench/results-openvino.json")
    args = ap.parse_args()
    try:
        import openvino
    except ImportError:
        sys.exit("this benchmark needs OpenVINO: pip install openvino==2026.4.0")
    import diffusers

    meta = {"date": datetime.date.today().isoformat(), "device": f"CPU {platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__,
            "diffusers": diffusers.__version__, "openvino": openvino.__version__, "threads": torch.get_num_threads()}
    rows: list[dict] = []

    def emit(row):
        print(" | ".join(f"{k}={v}" for k, v in row.items()), flush=True)
        rows.append(row)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))

    for latent in (int(v) for v in args.latents.split(",") if v):
        bench_unets(latent, args.rounds if latent <= 32 else max(3, args.rounds // 2), emit)
    if args.image_rounds:
        bench_images(args.image_rounds, args.steps, args.size, emit)


if __name__ == "__main__":
    main()
