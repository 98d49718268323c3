"""Speed of unfog against diffusers on identical weights, in one process.

    python bench/speed.py [--quick] [--json bench/results.json]

Cases: the Stable Diffusion 1.5 U-Net with random weights (CPU: latent 32×32 in float32; CUDA:
latent 64×64, i.e. 512², in bfloat16 and float16, batch 1 and 8 with classifier-free guidance so
the U-Net sees twice the batch) and the bundled default model's U-Net. For each: milliseconds
per U-Net call (median of repeats after warm-up; CUDA events on GPU), achieved TFLOP/s (FLOPs
from torch.utils.flop_counter), peak memory on CUDA, and the ratio to diffusers. It also times
one whole image (text encoding + steps + decode) with the bundled model. `--quick` runs the
bundled model only, for CI.
"""

from __future__ import annotations

import argparse
import datetime
import json
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
    from unfog.formats.diffusers_folder import load_mapped
    from unfog.formats.keymaps import map_unet_key, unet_config_from_diffusers, unet_config_to_diffusers
    from unfog.nn import UNet

    if kind == "sd15":
        torch.manual_seed(0)
        theirs = diffusers.UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=64).eval()
        with torch.device("meta"):
            ours = UNet(unet_config_from_diffusers(dict(theirs.config)))
        load_mapped(ours, theirs.state_dict(), map_unet_key, "sd15")
        return theirs, ours, 768
    ours = Pipeline.from_pretrained().unet
    theirs = diffusers.UNet2DConditionModel(**unet_config_to_diffusers(ours.config)).eval()
    state = ours.state_dict()
    theirs.load_state_dict({k: state[map_unet_key(k)] for k in theirs.state_dict()})
    return theirs, ours, ours.config.context_dim


def bench_unet(kind, device, dtype, batch, latent, repeats, optimize, compile_too=False) -> list[dict]:
    theirs, ours, ctx_dim = unet_pair(kind)
    rows = []
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * batch, ours.config.in_channels, latent, latent, generator=g)
    ctx = torch.randn(2 * batch, 77 if kind == "sd15" else 24, ctx_dim, generator=g)
    t = torch.full((2 * batch,), 500.0)

    def run_diffusers(m, dt):
        m = m.to(device, dt)
        xs, cs, ts = x.to(device, dt), ctx.to(device, dt), t.to(device)
        return lambda: m(xs, ts, encoder_hidden_states=cs).sample

    def run_ours(m, dt, optimized=False, compiled=False):
        import copy

        from unfog.pipeline import optimize_unet

        m = m.to(device, dt)
        if optimized:  # exactly what Pipeline.optimize() does to the U-Net
            m = optimize_unet(copy.deepcopy(m), dt, True, compiled)
        xs, cs, ts = x.to(device, dt), ctx.to(device, dt), t.to(device)
        return lambda: m(xs, ts, cs)

    variants = [("diffusers", dtype, run_diffusers, theirs), ("unfog", dtype, run_ours, ours)]
    if optimize is not None:
        variants.append((f"unfog optimize() [{str(optimize).replace('torch.', '')}, channels_last]", optimize, lambda m, dt: run_ours(m, dt, True), ours))
        if compile_too:
            variants.append((f"unfog optimize(compile=True) [{str(optimize).replace('torch.', '')}, channels_last]", optimize,
                             lambda m, dt: run_ours(m, dt, True, True), ours))
        if optimize != dtype:
            variants.append((f"diffusers [{str(optimize).replace('torch.', '')}]", optimize, run_diffusers, theirs))
    base = None
    for name, dt, make, model in variants:
        fn = make(model, dt)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with torch.inference_mode():
            fn()  # first call: includes any compilation
        first_s = time.perf_counter() - t0
        ms = timer(device, fn, repeats)
        f = flops(fn)
        row = {"case": f"{kind} U-Net", "impl": name, "dtype": str(dt).replace("torch.", ""), "batch": batch, "latent": latent,
               "ms_per_call": round(ms, 2), "tflops": round(f / (ms / 1000) / 1e12, 3),
               "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
               "first_call_s": round(first_s, 2)}
        base = base or ms
        row["speedup_vs_diffusers"] = round(base / ms, 2)
        rows.append(row)
    return rows


def bench_image(device, repeats) -> list[dict]:
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
        rows.append({"case": f"bundled model, one 64×64 image ({d['sampler']}, {d['num_inference_steps']} steps, CFG)", "impl": name,
                     "s_per_image": round(statistics.median(times), 3)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="bundled model only, few repeats (CI)")
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--json", default="bench/results.json")
    ap.add_argument("--compile", action="store_true", help="also time optimize(compile=True) (tens of seconds of warm-up)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from unfog.pipeline import cpu_has_bf16

    fast = torch.bfloat16 if device.type == "cuda" or cpu_has_bf16() else None
    rows = []
    repeats = args.repeats or (3 if args.quick else 10)
    if device.type == "cuda":
        for dtype in (torch.bfloat16, torch.float16):
            for batch in (1, 8):
                rows += bench_unet("sd15", device, dtype, batch, 64, repeats, None)
    elif not args.quick:
        rows += bench_unet("sd15", device, torch.float32, 1, 32, max(3, repeats // 3), fast)
    rows += bench_unet("default", device, torch.float32, 1, 16, repeats * 5, fast, compile_too=args.compile)
    rows += bench_image(device, repeats)
    import diffusers

    meta = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU {platform.machine()}, {os.cpu_count()} cores",
            "torch": torch.__version__, "diffusers": diffusers.__version__, "threads": torch.get_num_threads()}
    for r in rows:
        print(" | ".join(f"{k}={v}" for k, v in r.items() if v is not None))
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
