"""float32 1×1 convolutions as matmuls (unfog.nn.layers.pointwise) against oneDNN's convolution,
on this CPU, interleaved.

    python bench/pointwise.py [--images 7] [--sd15-rounds 4]

The bundled model's whole image (30 steps, CFG), then the SD 1.5 U-Net (random weights, CFG
batch of 2) at 32×32 and 64×64 latents, each in float32, alternating the two ways of computing
a 1×1 convolution call by call. Prints the medians and the median of per-pair ratios
(matmul / convolution; below 1 is faster), and the largest 8-bit pixel difference of the image.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from unfog import Pipeline
from unfog.nn import layers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import unet_pair  # noqa: E402

MATMUL = layers.pointwise
WAYS = {"convolution": lambda conv, x: conv(x), "matmul": MATMUL}


def pairs(fn, rounds: int) -> dict[str, list[float]]:
    """fn() timed once per way per round, the ways alternating."""
    times = {k: [] for k in WAYS}
    for r in range(rounds + 1):
        for name, way in WAYS.items():
            layers.pointwise = way
            t = time.perf_counter()
            fn()
            if r:  # round 0 warms both up
                times[name].append(time.perf_counter() - t)
    layers.pointwise = MATMUL
    return times


def report(label: str, times: dict[str, list[float]]) -> None:
    ratio = statistics.median(m / c for m, c in zip(times["matmul"], times["convolution"]))
    print(f"{label}: convolution {statistics.median(times['convolution']):.3f} s, matmul {statistics.median(times['matmul']):.3f} s, "
          f"ratio {ratio:.2f} (median of {len(times['matmul'])} pairs)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=7)
    ap.add_argument("--sd15-rounds", type=int, default=4)
    args = ap.parse_args()
    pipe = Pipeline.from_pretrained()
    prompt = "a big blue square left of a small yellow circle"
    images = {}
    for name, way in WAYS.items():
        layers.pointwise = way
        images[name] = np.asarray(pipe(prompt, seed=0).images[0], dtype=np.int16)
    layers.pointwise = MATMUL
    report("bundled model, one image", pairs(lambda: pipe(prompt, seed=0), args.images))
    print(f"  largest pixel difference: {int(np.abs(images['matmul'] - images['convolution']).max())} of 255")
    _, unet, width = unet_pair("sd15")
    t = torch.tensor([500.0, 500.0])
    ctx = torch.randn(2, 77, width)
    with torch.inference_mode():
        for size in (32, 64):
            x = torch.randn(2, 4, size, size)
            report(f"SD 1.5 U-Net, float32, {size}×{size} latent", pairs(lambda: unet(x, t, ctx), args.sd15_rounds))


if __name__ == "__main__":
    main()
