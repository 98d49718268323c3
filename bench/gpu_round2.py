"""Issue 17, item 3 on one GPU: where an SD 1.5 U-Net call's time goes (512², batch 1 with
classifier-free guidance, so the U-Net sees a batch of 2; bfloat16), what each route buys, and
low-memory mode's cost on CUDA. Run by bench/gpu_round2.sh on the device; every part appends its
rows to --json as it goes, so a run cut short keeps what it measured.

    python bench/gpu_round2.py --json OUT.json [--profile OUT.txt] [--budget-s 480] [--parts ...] [--tuning] [--autotune]

Parts, in order:
  attention  scaled_dot_product_attention per backend (PyTorch's choice, flash, memory-efficient,
             cuDNN) at the U-Net's four attention shapes, self and cross; ms per call
  fp8        torch._scaled_mm (e4m3, per-tensor scales) against the bf16 matmul at the transformer
             blocks' linear shapes, alone and with the activation's quantization
  unet       optimize() eager and optimize(compile=True), each as one CUDA graph, ms per call and
             relative error against float32; the compiled call under each attention backend that
             beat PyTorch's choice eagerly; a profile (kernel time by kind) of the compiled call;
             with --tuning, inductor's coordinate-descent tuning (258 s of compiling on the H100);
             with --autotune, inductor's max-autotune (no cudagraphs: unfog captures its own),
             each only if the budget leaves room
  offload    a whole 50-step 512² image from a full-size random SD 1.5, plain bf16 on the GPU
             against low-memory mode (each network on the GPU only for its stage): peak GPU
             memory, seconds per image, and whether the images are identical
  image      the same image with optimize(compile=True): seconds per image
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402  (the harness's timer, U-Net pair, FLOP counter and SD 1.5 builder)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROWS: list[dict] = []
META: dict = {}
START = time.perf_counter()


def emit(path: str, row: dict) -> None:
    print(" | ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    ROWS.append(row)
    with open(path, "w") as f:
        json.dump({"meta": META, "rows": ROWS}, f, indent=1)


def elapsed() -> float:
    return time.perf_counter() - START


def cuda_ms(fn, repeats: int, warmup: int = 3) -> float:
    """Median ms of fn() by CUDA events."""
    return speed.timer(torch.device("cuda"), fn, repeats, warmup)


# ---- attention -------------------------------------------------------------------------------

# (name, query tokens, key tokens, heads, head dim, calls per U-Net call) for SD 1.5 at 512²
ATTENTION_SHAPES = [
    ("level 0 self", 4096, 4096, 8, 40, 5), ("level 0 cross", 4096, 77, 8, 40, 5),
    ("level 1 self", 1024, 1024, 8, 80, 5), ("level 1 cross", 1024, 77, 8, 80, 5),
    ("level 2 self", 256, 256, 8, 160, 5), ("level 2 cross", 256, 77, 8, 160, 5),
    ("middle self", 64, 64, 8, 160, 1), ("middle cross", 64, 77, 8, 160, 1),
]


def backends():
    from torch.nn.attention import SDPBackend

    return {"pytorch's choice": None, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION}


def attention_context(backend):
    import contextlib

    from torch.nn.attention import sdpa_kernel

    return contextlib.nullcontext() if backend is None else sdpa_kernel([backend])


def part_attention(out: str) -> dict[str, float]:
    """Per backend, ms of all the U-Net's attention calls together (one U-Net call's worth)."""
    F = torch.nn.functional
    totals: dict[str, float] = {}
    for name, backend in backends().items():
        total = 0.0
        for shape, lq, lk, heads, dim, count in ATTENTION_SHAPES:
            q = torch.randn(2, heads, lq, dim, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(2, heads, lk, dim, device="cuda", dtype=torch.bfloat16)
            v = torch.randn_like(k)
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())  # (outside the context: no forced kernel takes float32)
            try:
                with attention_context(backend):
                    ms = cuda_ms(lambda: F.scaled_dot_product_attention(q, k, v), 50)
                    err = speed.rel_err(F.scaled_dot_product_attention(q, k, v), ref)
            except Exception as e:
                emit(out, {"part": "attention", "backend": name, "shape": shape, "error": f"{type(e).__name__}: {e}"[:200]})
                total = float("inf")
                continue
            total += ms * count
            emit(out, {"part": "attention", "backend": name, "shape": shape, "ms": round(ms, 4), "rel_err": float(f"{err:.2g}"),
                       "tflops": round(4 * 2 * heads * lq * lk * dim / ms / 1e9, 1)})
        totals[name] = total
        emit(out, {"part": "attention", "backend": name, "shape": "all of one U-Net call", "ms": round(total, 3)})
    return totals


# ---- fp8 -------------------------------------------------------------------------------------

# (tokens, in, out) of the transformer blocks' linear layers at each level (batch 2)
LINEAR_SHAPES = [(8192, 320, 960), (8192, 320, 320), (8192, 320, 2560), (8192, 1280, 320),
                 (2048, 640, 1920), (2048, 640, 5120), (2048, 2560, 640), (512, 1280, 10240), (512, 5120, 1280)]


def part_fp8(out: str) -> None:
    e4m3 = torch.float8_e4m3fn
    for m, k, n in LINEAR_SHAPES:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        try:
            bf16 = cuda_ms(lambda: x @ w.t(), 50)
            w_scale = w.abs().max().float() / 448
            w8 = (w / w_scale).to(e4m3)

            def quantize():
                s = x.abs().max().float() / 448
                return (x / s).to(e4m3), s

            x8, x_scale = quantize()
            mm = cuda_ms(lambda: torch._scaled_mm(x8, w8.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=torch.bfloat16), 50)

            def both():
                a, s = quantize()
                return torch._scaled_mm(a, w8.t(), scale_a=s, scale_b=w_scale, out_dtype=torch.bfloat16)

            with_q = cuda_ms(both, 50)
            err = speed.rel_err(both(), (x.float() @ w.float().t()))
        except Exception as e:
            emit(out, {"part": "fp8", "shape": f"{m}x{k}->{n}", "error": f"{type(e).__name__}: {e}"[:200]})
            continue
        emit(out, {"part": "fp8", "shape": f"{m}x{k}->{n}", "bf16_ms": round(bf16, 4), "fp8_ms": round(mm, 4), "fp8_with_quantize_ms": round(with_q, 4),
                   "rel_err": float(f"{err:.2g}")})


# ---- the U-Net call --------------------------------------------------------------------------

def part_unet(out: str, attention_totals: dict[str, float], profile_path: str | None, budget_s: float, tuning: bool, autotune: bool) -> None:
    from unfog.graphs import capture
    from unfog.pipeline import optimize_unet

    _, ours, _ = speed.unet_pair("sd15")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 64, 64, generator=g).cuda()
    ctx = torch.randn(2, 77, 768, generator=g).cuda()
    t = torch.full((2,), 500.0).cuda()
    with torch.inference_mode():
        m = copy.deepcopy(ours).cuda()
        reference = m(x, t, ctx).float()
        del m
    fl = None

    def variant(label, compile, backend=None, mode=None, config=None):
        nonlocal fl
        torch._dynamo.reset()
        import torch._inductor.config as ic

        saved = {k: getattr(ic, k) for k in (config or {})}
        for k, v in (config or {}).items():
            setattr(ic, k, v)
        speed._reset_peak(torch.device("cuda"))
        t0 = time.perf_counter()
        try:
            with torch.inference_mode(), attention_context(backends()[backend] if backend else None):
                m = optimize_unet(copy.deepcopy(ours).cuda(), torch.bfloat16, True, compile and mode is None)
                if mode is not None:
                    m.compile(dynamic=False, mode=mode)
                xb, cb = x.to(torch.bfloat16), ctx.to(torch.bfloat16)
                held = {}
                m(xb, t, cb)
                graph = capture(lambda: held.update(out=m(xb, t, cb)))
                torch.cuda.synchronize()
                first = time.perf_counter() - t0
                ms = cuda_ms(graph.replay, 200)
                graph.replay()
                err = speed.rel_err(held["out"], reference)
                if fl is None:
                    fl = speed.flops(lambda: m(xb, t, cb))
        except Exception as e:
            emit(out, {"part": "unet", "variant": label, "error": f"{type(e).__name__}: {e}"[:300]})
            return None
        finally:
            for k, v in saved.items():
                setattr(ic, k, v)
        emit(out, {"part": "unet", "variant": label, "ms_per_call": round(ms, 3), "tflops": round(fl / ms / 1e9, 1), "rel_err_vs_fp32": float(f"{err:.2g}"),
                   "first_call_s": round(first, 1), "peak_mem_gb": speed._peak_gb(torch.device("cuda"))})
        return m, xb, cb

    variant("optimize() as one CUDA graph", False)
    for name in attention_totals:
        if name != "pytorch's choice":
            variant(f"optimize() as one CUDA graph, attention {name}", False, backend=name)
    best = variant("optimize(compile=True) as one CUDA graph", True)
    if best is not None and profile_path:
        profile(best, profile_path, out)
    base = attention_totals.get("pytorch's choice", float("inf"))
    for name, total in sorted(attention_totals.items(), key=lambda kv: kv[1]):
        if name != "pytorch's choice" and total < 0.97 * base and elapsed() < budget_s - 120:
            variant(f"optimize(compile=True) as one CUDA graph, attention {name}", True, backend=name)
    if tuning and elapsed() < budget_s - 300:  # (on the H100: 258 s of compiling, and no faster)
        variant("optimize(compile=True) as one CUDA graph, coordinate-descent tuning", True, config={"coordinate_descent_tuning": True})
    if autotune and elapsed() < budget_s - 300:
        variant("optimize(compile=True) with max-autotune-no-cudagraphs, as one CUDA graph", True, mode="max-autotune-no-cudagraphs")


def profile(made, path: str, out: str) -> None:
    """Kernel time of the compiled call (not replayed as a graph, so each kernel is seen), by kind."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    m, xb, cb = made
    t = torch.full((2,), 500.0).cuda()
    calls = 5
    with torch.inference_mode():
        for _ in range(3):
            m(xb, t, cb)
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                m(xb, t, cb)
            torch.cuda.synchronize()
    kinds: dict[str, float] = {}
    per_kernel: dict[str, list] = {}
    for e in prof.events():
        if e.device_type.name != "CUDA":
            continue
        n = e.name
        low = n.lower()
        if any(s in low for s in ("flash", "fmha", "attention", "sdpa", "mha")):
            kind = "attention"
        elif "triton" in low:
            kind = "inductor (Triton) fused"
        elif any(s in low for s in ("conv", "fprop", "dgrad", "implicit")):
            kind = "convolution"
        elif any(s in low for s in ("gemm", "nvjet", "xmma", "cutlass", "sm90", "matmul")):
            kind = "matmul"
        elif "memcpy" in low or "memset" in low:
            kind = "copies"
        else:
            kind = "other"
        us = e.time_range.elapsed_us()
        kinds[kind] = kinds.get(kind, 0.0) + us
        k = per_kernel.setdefault(n, [0.0, 0, kind])
        k[0] += us
        k[1] += 1
    total = sum(kinds.values())
    for kind, us in sorted(kinds.items(), key=lambda kv: -kv[1]):
        emit(out, {"part": "profile", "kind": kind, "ms_per_call": round(us / calls / 1000, 3), "share": round(us / total, 3)})
    lines = [f"kernel time per compiled U-Net call: {total / calls / 1000:.3f} ms ({calls} calls profiled)", ""]
    for n, (us, count, kind) in sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:40]:
        lines.append(f"{us / calls / 1000:8.3f} ms  {count // calls:4d}×  {kind:24s} {n[:150]}")
    Path(path).write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:25]), flush=True)


# ---- whole images: low-memory mode and the compiled fast path ---------------------------------

PROMPT = speed.PROMPT


def image_seconds(pipe, repeats: int, **kw):
    pipe(PROMPT, seed=0, **kw)
    times, first = [], None
    for k in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        im = pipe(PROMPT, seed=1, **kw).images[0]
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        first = first or im
    return statistics.median(times), first


def part_images(out: str, folder, budget_s: float) -> None:
    import numpy as np

    from unfog import Pipeline

    kw = dict(num_inference_steps=50, guidance_scale=7.5, height=512, width=512, sampler="dpmpp_2m")
    images = {}
    for label, low in (("plain bf16 on the GPU", False), ("low-memory mode (each network on the GPU only for its stage)", True)):
        speed._reset_peak(torch.device("cuda"))
        pipe = Pipeline.from_pretrained(folder, dtype=torch.bfloat16)
        pipe = pipe.enable_low_memory(device="cuda") if low else pipe.to("cuda")
        s, im = image_seconds(pipe, 3, **kw)
        images[low] = np.asarray(im)
        emit(out, {"part": "offload", "variant": label, "s_per_image": round(s, 3), "peak_mem_gb": speed._peak_gb(torch.device("cuda")),
                   "weights_on_gpu_between_images_gb": round(torch.cuda.memory_allocated() / 2**30, 2)})
        del pipe
    emit(out, {"part": "offload", "variant": "images identical", "value": bool(np.array_equal(images[False], images[True]))})
    if elapsed() > budget_s - 60:
        return
    torch._dynamo.reset()
    speed._reset_peak(torch.device("cuda"))
    pipe = Pipeline.from_pretrained(folder, dtype=torch.bfloat16).to("cuda").optimize(compile=True)
    t0 = time.perf_counter()
    s, _ = image_seconds(pipe, 5, **kw)
    emit(out, {"part": "image", "variant": "optimize(compile=True)", "s_per_image": round(s, 3), "first_and_timed_s": round(time.perf_counter() - t0, 1),
               "peak_mem_gb": speed._peak_gb(torch.device("cuda"))})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--profile")
    ap.add_argument("--budget-s", type=float, default=480)
    ap.add_argument("--parts", default="attention,fp8,unet,images")
    ap.add_argument("--tuning", action="store_true", help="unet: also inductor's coordinate-descent tuning")
    ap.add_argument("--autotune", action="store_true", help="unet: also inductor's max-autotune")
    args = ap.parse_args()
    parts = args.parts.split(",")
    META.update(device=torch.cuda.get_device_name(), torch=torch.__version__, date=time.strftime("%Y-%m-%d"))
    torch.backends.cudnn.benchmark = True
    totals = part_attention(args.json) if "attention" in parts else {}
    if "fp8" in parts:
        part_fp8(args.json)
    if "unet" in parts:
        part_unet(args.json, totals, args.profile, args.budget_s, args.tuning, args.autotune)
    if "images" in parts and elapsed() < args.budget_s - 90:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            ref, folder = speed.build_sd15(tmp)
            del ref
            print(f"built SD 1.5 in {time.perf_counter() - t0:.0f} s", flush=True)
            part_images(args.json, folder, args.budget_s)
    print(f"done in {elapsed():.0f} s", flush=True)


if __name__ == "__main__":
    main()
