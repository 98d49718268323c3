"""How close the SD 1.5 U-Net's three kinds of CPU work are to this machine's limits.

    python bench/cpu_floors.py [--json bench/cpu-floors.json]

Each line sets one kind of work in the U-Net against a limit of this machine measured in the
same run, so that "what is left to gain" is a measured figure rather than a guess:

1. Compute: a large bf16 matmul through oneDNN's packed path (2048³), the rate every
   convolution and linear layer of the U-Net runs on (`optimize()` and OpenVINO alike).
2. Memory: at a 32×32 latent the deep levels have 32–128 rows per matmul, so their time is
   reading the weights. 24 distinct weights of the 1280→1280 3×3 convolution as a matmul
   ([1280, 11520], 29.5 MB each, 700 MB in all, so none stays in cache) are run through the
   packed matmul with 16, 32 and 128 rows, against `w.sum()` reading the same bytes and the
   matmul's FLOPs at line 1's rate.
3. Attention: SD 1.5's 64×64-latent self-attention (CFG batch 2, 8 heads, 4,096 tokens, head
   dim 40) through PyTorch's CPU flash kernel, against the sum of its two matmuls' FLOPs at
   line 1's rate and its 268 M softmax exponentials at the rate `torch.exp` reaches on data that
   stays in cache (both threads).

Medians of interleaved repeats; bf16, all threads. The VM's speed moves between runs, so compare
lines within one run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import timer  # noqa: E402

CPU = torch.device("cpu")


def median_seconds(fn, repeats: int) -> float:
    return timer(CPU, fn, repeats) / 1000  # speed.py's timer: median ms after two warm-up calls


def packed(w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w, None)


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    out = {"threads": torch.get_num_threads(), "torch": torch.__version__}

    with torch.no_grad():
        # 1. compute
        n = 2048
        x, w = torch.randn(n, n, generator=g).bfloat16(), packed(torch.randn(n, n, generator=g).bfloat16())
        matmul_s = median_seconds(lambda: linear(x, w), args.repeats)
        rate = 2 * n**3 / matmul_s
        out["matmul_2048_tflops"] = round(rate / 1e12, 3)

        # 2. memory: cold weights, few rows
        k = 11520
        weights = [torch.randn(1280, k, generator=g).bfloat16() for _ in range(24)]
        packs = [packed(wt) for wt in weights]
        nbytes = 1280 * k * 2

        def each(fn, items):
            return lambda: [fn(it) for it in items]

        read_s = median_seconds(each(lambda wt: wt.sum(), weights), args.repeats) / len(weights)
        out["cold_weight_read_sum_gb_per_s"] = round(nbytes / read_s / 1e9, 1)
        out["cold_weight_read_sum_ms"] = round(read_s * 1e3, 2)
        for m in (16, 32, 128):
            x = torch.randn(m, k, generator=g).bfloat16()
            mm_s = median_seconds(each(lambda p: linear(x, p), packs), args.repeats) / len(packs)
            out[f"cold_weight_{m}_rows_ms"] = round(mm_s * 1e3, 2)
            out[f"cold_weight_{m}_rows_compute_at_line1_rate_ms"] = round(2 * m * k * 1280 / rate * 1e3, 2)
        del weights, packs

        # 3. attention at 4,096 tokens, head dim 40
        b, h, t, d = 2, 8, 4096, 40
        q, kk, v = (torch.randn(b, h, t, d, generator=g).bfloat16() for _ in range(3))
        attn_s = median_seconds(lambda: F.scaled_dot_product_attention(q, kk, v), max(3, args.repeats // 2))
        block = torch.randn(256 * 1024, generator=g)  # 1 MB: stays in the core's cache
        dst = torch.empty_like(block)
        reps = 200
        exp_s = median_seconds(lambda: [torch.exp(block, out=dst) for _ in range(reps)], 3) / (reps * block.numel())
        matmul_part = 4 * b * h * t * t * d / rate
        exp_part = b * h * t * t * exp_s
        out["attention_4096_ms"] = round(attn_s * 1e3, 1)
        out["attention_matmuls_at_line1_rate_ms"] = round(matmul_part * 1e3, 1)
        out["attention_exps_at_in_cache_rate_ms"] = round(exp_part * 1e3, 1)
        out["attention_over_their_sum"] = round(attn_s / (matmul_part + exp_part), 2)

    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
