"""Speed of unfog against diffusers on identical weights, in one process.

    python bench/speed.py [--quick] [--compile] [--json bench/results.json]

CPU: the Stable Diffusion 1.5 U-Net with random weights at latent 32×32 (256²) in float32 and the
bundled default model's U-Net; milliseconds per U-Net call and one whole bundled-model image.

CUDA, with --sdxl: also SDXL base's U-Net at 1024² (latent 128), batch 1 with guidance, bf16,
against diffusers eager, channels_last, as one CUDA graph and (with --compile-diffusers) compiled.

CUDA: the SD 1.5 U-Net at 512² (latent 64×64) with classifier-free guidance, so the U-Net sees
twice the batch; bfloat16 and float16, batch 1 and 8: diffusers eager / channels_last / replayed
as one CUDA graph against unfog eager / optimize() / optimize() as a CUDA graph (and, with
--compile, optimize(compile=True) as a CUDA graph and diffusers under torch.compile). Then one
whole 512² image, 50 DPM-Solver++ steps at guidance 7.5 (text encoding, steps, decode, PIL), from a
full-size random SD 1.5 pipeline that diffusers builds and saves and unfog loads, and the VAE
decode alone.

For each row: milliseconds per call (median of repeats after warm-up; CUDA events on GPU) or
seconds per image, first-call seconds (compilation and graph capture), achieved TFLOP/s (FLOPs
from torch.utils.flop_counter), CUDA peak memory, and the ratio to diffusers' plain row. The JSON
file is rewritten after every row, so a run cut short keeps what it measured. `--quick` runs the
bundled model only, for CI.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def timer(device: torch.device, fn, repeats: int, warmup: int = 2) -> float:
    """Median milliseconds of fn()."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def flops(fn) -> int:
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def unet_pair(kind: str):
    """(diffusers UNet, unfog UNet) with identical weights."""
    import diffusers

    from unfog import Pipeline
    from unfog.formats.weights import load_checked
    from unfog.formats.keymaps import map_unet_key, unet_config_from_diffusers, unet_config_to_diffusers
    from unfog.nn import UNet

    if kind == "sd15":
        torch.manual_seed(0)
        theirs = diffusers.UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=64).eval()
        with torch.device("meta"):
            ours = UNet(unet_config_from_diffusers(dict(theirs.config)))
        load_checked(ours, theirs.state_dict(), "sd15", key_map=map_unet_key)
        return theirs, ours, 768
    if kind == "sdxl":  # SDXL base's U-Net, random bfloat16 weights shared by both (5 GB, not 10 GB twice)
        from sdxl_cpu import SDXL_BASE_UNET

        with torch.device("meta"):
            theirs = diffusers.UNet2DConditionModel(**SDXL_BASE_UNET).to(torch.bfloat16)
        theirs = theirs.to_empty(device="cpu").eval()
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in theirs.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        with torch.device("meta"):
            ours = UNet(unet_config_from_diffusers(dict(theirs.config)))
        load_checked(ours, theirs.state_dict(), "sdxl", key_map=map_unet_key, dtype=torch.bfloat16)
        return theirs, ours, 2048
    ours = Pipeline.from_pretrained().unet
    theirs = diffusers.UNet2DConditionModel(**unet_config_to_diffusers(ours.config)).eval()
    state = ours.state_dict()
    theirs.load_state_dict({k: state[map_unet_key(k)] for k in theirs.state_dict()})
    return theirs, ours, ours.config.context_dim


def _name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _peak_gb(device) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None


def _reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def unet_variants(device, dtype, fast, *, graphs: bool, compile_ours: bool, compile_theirs: bool, full: bool):
    """(name, dtype, maker) for each implementation timed; maker(theirs, ours, inputs) -> fn."""
    import copy

    from unfog.pipeline import optimize_unet

    def diffusers_fn(channels_last=False, compiled=False):
        def make(theirs, ours, inp):
            m = copy.deepcopy(theirs).to(device, inp["dtype"])
            if channels_last:
                m.to(memory_format=torch.channels_last)
            if compiled:
                m.compile()
            return lambda: m(inp["x"], inp["t"], encoder_hidden_states=inp["ctx"], **inp["theirs_kw"]).sample
        return make

    def ours_fn(optimized=False, compiled=False):
        def make(theirs, ours, inp):
            m = copy.deepcopy(ours).to(device, inp["dtype"])
            if optimized:  # exactly what Pipeline.optimize() does to the U-Net
                m = optimize_unet(m, inp["dtype"], True, compiled)
            return lambda: m(inp["x"], inp["t"], inp["ctx"], **inp["ours_kw"])
        return make

    v = [("diffusers", dtype, diffusers_fn(), False)]
    if full:
        v.append(("diffusers channels_last", dtype, diffusers_fn(channels_last=True), False))
    if graphs and full:
        v.append(("diffusers as one CUDA graph", dtype, diffusers_fn(), True))
    if compile_theirs:
        v.append(("diffusers torch.compile", dtype, diffusers_fn(channels_last=True, compiled=True), False))
    if full or not graphs:
        v.append(("unfog", dtype, ours_fn(), False))
    if fast is not None:
        if full or not graphs:
            v.append((f"unfog optimize() [{_name(fast)}, channels_last]", fast, ours_fn(True), False))
        if graphs:
            v.append((f"unfog optimize() as one CUDA graph [{_name(fast)}]", fast, ours_fn(True), True))
        if compile_ours:
            label = f"unfog optimize(compile=True){' as one CUDA graph' if graphs else ''} [{_name(fast)}, channels_last]"
            v.append((label, fast, ours_fn(True, True), graphs))
        if fast != dtype:
            v.append((f"diffusers [{_name(fast)}]", fast, diffusers_fn(), False))
    return v


def psnr(image, reference) -> float:
    """Peak signal-to-noise ratio in dB of one 8-bit image against another (inf if equal)."""
    import numpy as np

    mse = np.mean((np.asarray(image, dtype=np.float64) - np.asarray(reference, dtype=np.float64)) ** 2)
    return round(10 * math.log10(255**2 / mse), 1) if mse > 0 else float("inf")


def image_stats(image) -> dict:
    """Mean and standard deviation of an 8-bit image's values and its share of black pixels: a
    low PSNR from a black or flat image (a NaN or overflow somewhere) tells apart from one of a
    different picture."""
    import numpy as np

    a = np.asarray(image, dtype=np.float64)
    return {"mean": round(float(a.mean()), 1), "std": round(float(a.std()), 1), "black": round(float((a.reshape(-1, a.shape[-1]).max(1) == 0).mean()), 3)}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def bench_unet(kind, device, dtype, batch, latent, repeats, fast, *, graphs=False, compile_ours=False, compile_theirs=False, full=True,
               select=None, emit=None) -> list[dict]:
    import copy

    from unfog.graphs import capture

    theirs, ours, ctx_dim = unet_pair(kind)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * batch, ours.config.in_channels, latent, latent, generator=g)
    ctx = torch.randn(2 * batch, 77 if kind == "sd15" else 24, ctx_dim, generator=g)
    t = torch.full((2 * batch,), 500.0)
    added = {}
    if kind == "sdxl":  # the pooled embedding and the micro-conditioning of a 1024² image
        added = {"pooled": torch.randn(2 * batch, 1280, generator=g), "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2 * batch)}
    rows, base, counted = [], None, {}
    with torch.inference_mode():  # the float32 eager output every variant is compared with
        m = copy.deepcopy(ours).to(device, torch.float32)
        reference = m(x.to(device), t.to(device), ctx.to(device), **{k: v.to(device) for k, v in added.items()}).float()
        del m
    for name, dt, make, as_graph in unet_variants(device, dtype, fast, graphs=graphs, compile_ours=compile_ours, compile_theirs=compile_theirs, full=full):
        if select is not None and not select(name):
            continue
        inp = {"dtype": dt, "x": x.to(device, dt), "ctx": ctx.to(device, dt), "t": t.to(device)}
        ours_kw = {k: v.to(device, dt) if k == "pooled" else v.to(device) for k, v in added.items()}
        inp["ours_kw"] = ours_kw
        inp["theirs_kw"] = {"added_cond_kwargs": {"text_embeds": ours_kw["pooled"], "time_ids": ours_kw["time_ids"]}} if added else {}
        _reset_peak(device)
        t0 = time.perf_counter()
        eager_fn = fn = graph = None
        try:
            with torch.inference_mode():
                fn = eager_fn = make(theirs, ours, inp)
                fn()  # first call: includes any compilation
                if as_graph:
                    held = {}  # the captured call's output, rewritten by every replay
                    graph = capture(lambda: held.update(out=eager_fn()))
                    fn = graph.replay
                if device.type == "cuda":
                    torch.cuda.synchronize()
            first_s = time.perf_counter() - t0
            ms = timer(device, fn, repeats)
            if dt not in counted:  # the same network computes the same FLOPs in every variant
                counted[dt] = flops(eager_fn)
            with torch.inference_mode():
                if as_graph:
                    graph.replay()
                err = rel_err(held["out"] if as_graph else eager_fn(), reference)
        except Exception as e:  # one failing variant (say, a compiler error) must not lose the rest
            row = {"case": f"{kind} U-Net", "impl": name, "dtype": _name(dt), "batch": batch, "error": f"{type(e).__name__}: {e}"[:400]}
            rows.append(row)
            if emit:
                emit(row)
            continue
        row = {"case": f"{kind} U-Net", "impl": name, "dtype": _name(dt), "batch": batch, "latent": latent, "ms_per_call": round(ms, 2),
               "tflops": round(counted[dt] / (ms / 1000) / 1e12, 3), "peak_mem_gb": _peak_gb(device), "first_call_s": round(first_s, 2),
               "rel_err_vs_fp32": float(f"{err:.2g}")}
        base = base or ms
        row["speedup_vs_diffusers"] = round(base / ms, 2)
        rows.append(row)
        if emit:
            emit(row)
        del fn, eager_fn, graph, inp
    return rows


def bench_image(device, repeats, emit=None) -> list[dict]:
    from unfog import Pipeline

    rows = []
    for name, optimized in (("unfog", False), ("unfog optimize()", True)):
        pipe = Pipeline.from_pretrained().to(device)
        if optimized:
            pipe.optimize()
        pipe("a red circle", seed=0)
        times = []
        for k in range(repeats):
            t = time.perf_counter()
            pipe("a big blue square left of a small yellow circle", seed=k)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        d = pipe.defaults
        rows.append({"case": f"bundled model, one 64×64 image ({d.sampler}, {d.num_inference_steps} steps, CFG)", "impl": name,
                     "s_per_image": round(statistics.median(times), 3)})
        if emit:
            emit(rows[-1])
    return rows


def build_sd15(root):
    """A full-size Stable Diffusion 1.5 pipeline with random weights (and a tiny CLIP
    vocabulary), built by diffusers and transformers and saved in diffusers' folder layout."""
    import sys
    from pathlib import Path

    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from clip_bytes import write_tiny_clip_vocab

    root = Path(root)
    n = write_tiny_clip_vocab(root / "_tok")
    torch.manual_seed(0)
    tokenizer = CLIPTokenizer(str(root / "_tok" / "vocab.json"), str(root / "_tok" / "merges.txt"), model_max_length=77)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                                max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=n - 2, eos_token_id=n - 1, pad_token_id=n - 1))
    unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=64)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        latent_channels=4, layers_per_block=2, sample_size=512)
    scheduler = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root / "sd", safe_serialization=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe, root / "sd"


PROMPT = "a photo of an astronaut riding a horse on mars"


def bench_sd15_image(device, dtype, repeats, *, compile_ours=False, steps=50, size=512, emit=None) -> list[dict]:
    """Seconds per whole image: diffusers' StableDiffusionPipeline against unfog's Pipeline
    loaded from the folder diffusers saved; also the VAE decode alone."""
    import tempfile

    from unfog import Pipeline

    kw = dict(num_inference_steps=steps, guidance_scale=7.5, height=size, width=size)
    case = f"sd15 image {size}² ({steps} steps DPM-Solver++ 2M, CFG 7.5, text+decode)"
    rows, base = [], None

    def record(impl, run, first_s, extra=None):
        nonlocal base
        times, first_image = [], None
        for k in range(repeats):
            t = time.perf_counter()
            images = run(k + 1)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
            if first_image is None:
                first_image = images[0]
        s = statistics.median(times)
        base = base or s
        row = {"case": case, "impl": impl, "dtype": _name(dtype), "batch": 1, "s_per_image": round(s, 3), "first_call_s": round(first_s, 2),
               "peak_mem_gb": _peak_gb(device), "speedup_vs_diffusers": round(base / s, 2), "psnr_vs_fp32_db": psnr(first_image, reference_image),
               "image": image_stats(first_image), "reference_image": image_stats(reference_image), **(extra or {})}
        rows.append(row)
        if emit:
            emit(row)

    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        ref, folder = build_sd15(tmp)
        # What every row's image (seed 1) is compared with: unfog in float32, eager, no TF32.
        tf32 = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        exact = Pipeline.from_pretrained(folder).to(device)
        reference_image = exact(PROMPT, seed=1, sampler="dpmpp_2m", **kw).images[0]
        torch.backends.cudnn.allow_tf32 = tf32
        del exact
        ref.to(device, dtype)
        _reset_peak(device)

        def theirs(k):
            return ref(PROMPT, generator=torch.Generator("cpu").manual_seed(k), **kw).images

        t0 = time.perf_counter()
        theirs(0)
        record("diffusers", theirs, time.perf_counter() - t0)
        z = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0)).to(device, dtype)
        decode_theirs = timer(device, lambda: ref.vae.decode(z).sample, repeats * 3)
        del ref
        variants = [("unfog", {}), ("unfog optimize()", {"compile": False})]
        if compile_ours:
            variants.append(("unfog optimize(compile=True)", {"compile": True}))
        for impl, opt in variants:
            _reset_peak(device)
            pipe = Pipeline.from_pretrained(folder).to(device, dtype)
            if opt:
                pipe.optimize(dtype, **opt)
            pipe.decode_tile = None

            def ours(k):
                return pipe(PROMPT, seed=k, sampler="dpmpp_2m", **kw).images

            t0 = time.perf_counter()
            try:
                ours(0)
            except Exception as e:
                rows.append({"case": case, "impl": impl, "dtype": _name(dtype), "error": f"{type(e).__name__}: {e}"[:400]})
                if emit:
                    emit(rows[-1])
                continue
            extra = {"graph_warmup_s": round(sum(g.warmup_s for g in pipe.denoiser_graphs.values()), 2)} if pipe.denoiser_graphs else {}
            record(impl, ours, time.perf_counter() - t0, extra)
            if impl != "unfog optimize(compile=True)":
                c = pipe.vae.config
                ms = timer(device, lambda: pipe.vae.decode(z / c.scaling_factor), repeats * 3)
                r = {"case": f"VAE decode {size}²", "impl": f"{impl}", "dtype": _name(dtype), "ms_per_call": round(ms, 2),
                     "speedup_vs_diffusers": round(decode_theirs / ms, 2)}
                if impl == "unfog":
                    rows.append({**r, "impl": "diffusers", "ms_per_call": round(decode_theirs, 2), "speedup_vs_diffusers": 1.0})
                    if emit:
                        emit(rows[-1])
                rows.append(r)
                if emit:
                    emit(r)
            del pipe
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="bundled model only, few repeats (CI)")
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--json", default="bench/results.json")
    ap.add_argument("--compile", action="store_true", help="also time optimize(compile=True) (tens of seconds of warm-up)")
    ap.add_argument("--compile-diffusers", action="store_true", help="on CUDA, also time diffusers under torch.compile (about a minute)")
    ap.add_argument("--skip-image", action="store_true", help="on CUDA, skip the whole-image SD 1.5 case")
    ap.add_argument("--sdxl", action="store_true", help="on CUDA, also SDXL base's U-Net at 1024² (latent 128) with guidance's batch of 2, bf16")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    import diffusers

    from unfog.pipeline import cpu_has_bf16

    meta = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU {platform.machine()}, {os.cpu_count()} cores",
            "torch": torch.__version__, "diffusers": diffusers.__version__, "threads": torch.get_num_threads()}
    rows: list[dict] = []

    def emit(row):
        print(" | ".join(f"{k}={v}" for k, v in row.items() if v is not None), flush=True)
        rows.append(row)
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)

    repeats = args.repeats or (3 if args.quick else 10)
    if device.type == "cuda":
        # optimize() turns on cuDNN's algorithm search; turn it on for every row, diffusers' too,
        # so the comparison is of the libraries and not of that switch.
        torch.backends.cudnn.benchmark = True
        meta["cudnn_benchmark"] = True
        # The headline case first and the slow compiled variants last, so a run cut
        # short still has the most important rows.
        bench_unet("sd15", device, torch.bfloat16, 1, 64, repeats * 2, torch.bfloat16, graphs=True, emit=emit)
        for dtype, batch in ((torch.float16, 1), (torch.bfloat16, 8), (torch.float16, 8)):
            bench_unet("sd15", device, dtype, batch, 64, repeats, dtype, graphs=True, full=False, emit=emit)
        if not args.skip_image:
            bench_sd15_image(device, torch.bfloat16, max(3, repeats // 3), compile_ours=args.compile, emit=emit)
        if args.sdxl:
            bench_unet("sdxl", device, torch.bfloat16, 1, 128, repeats, torch.bfloat16, graphs=True, compile_ours=args.compile,
                       compile_theirs=args.compile_diffusers, emit=emit)
        if args.compile or args.compile_diffusers:
            for batch in (1, 8):
                bench_unet("sd15", device, torch.bfloat16, batch, 64, repeats * 2 if batch == 1 else repeats, torch.bfloat16, graphs=True,
                           compile_ours=args.compile, compile_theirs=args.compile_diffusers and batch == 1,
                           select=lambda name: name == "diffusers" or "compile" in name, emit=emit)
    else:
        fast = torch.bfloat16 if cpu_has_bf16() else None
        if not args.quick:
            bench_unet("sd15", device, torch.float32, 1, 32, max(3, repeats // 3), fast, emit=emit)
        bench_unet("default", device, torch.float32, 1, 16, repeats * 5, fast, compile_ours=args.compile, emit=emit)
        bench_image(device, repeats, emit=emit)
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
