"""The autoencoder's share of a CPU image: SD 1.5's decode in float32 against optimize()'s.

    python bench/decode_cpu.py [--latent 32] [--rounds 5]

Builds the full-size random SD 1.5 pipeline of bench/speed.py and decodes one latent (32×32: a
256² image) with the float32 autoencoder and with `optimize()`'s (bf16, channels_last, packed
weights on a CPU with bf16 units), alternately; prints the median seconds of each, the median of
the paired ratios, and the PSNR between the two images. Random weights say nothing about fidelity
on trained ones: `python bench/fidelity.py --bundled` measures that.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import build_sd15, psnr  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latent", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    from unfog import Pipeline

    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        ref, folder = build_sd15(tmp)
        del ref
        exact, fast = Pipeline.from_pretrained(folder), Pipeline.from_pretrained(folder).optimize()
        latents = torch.randn(1, 4, args.latent, args.latent, generator=torch.Generator().manual_seed(0))
        ways = {"float32": exact, "optimize()": fast}
        images = {name: pipe.decode(latents)[0] for name, pipe in ways.items()}  # warm-up; packs the weights
        times = {name: [] for name in ways}
        for _ in range(args.rounds):
            for name, pipe in ways.items():
                start = time.perf_counter()
                pipe.decode(latents)
                times[name].append(time.perf_counter() - start)
    ratio = statistics.median(a / b for a, b in zip(times["float32"], times["optimize()"]))
    print(f"decode of a {args.latent}×{args.latent} latent ({8 * args.latent}² image), median of {args.rounds}: "
          f"float32 {statistics.median(times['float32']):.2f} s, optimize() ({fast.vae.decoder.conv_in.weight.dtype}) "
          f"{statistics.median(times['optimize()']):.2f} s, {ratio:.2f}× faster; PSNR between them {psnr(images['optimize()'], images['float32'])} dB")


if __name__ == "__main__":
    main()
