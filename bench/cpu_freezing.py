"""Inductor with weight freezing against unfog's eager `optimize()` on this CPU: the SD 1.5 U-Net
(random weights, CFG batch of 2, bfloat16, channels_last), per call, interleaved.

    python bench/cpu_freezing.py [--latents 32,64] [--rounds 8]

The eager side is `optimize()`'s U-Net (packed oneDNN weights, unfog.nn.packed). The compiled
side is the same U-Net through `torch.compile` with `torch._inductor.config.freezing = True`
(parameters folded in as constants, so inductor prepacks them and fuses around them). Prints,
per latent size, the compile time, the relative difference of the outputs, the median
milliseconds and the median of per-round ratios (compiled / eager; below 1 is faster).
Freezing is not what `optimize(compile=True)` does: a frozen graph would not see weights changed
in place afterwards.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import unet_pair  # noqa: E402

from unfog.pipeline import optimize_unet  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latents", default="32,64")
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args()
    import torch._inductor.config as inductor_config

    _, base, width = unet_pair("sd15")
    t = torch.tensor([500.0, 500.0])
    for size in (int(s) for s in args.latents.split(",")):
        eager = optimize_unet(copy.deepcopy(base).eval(), torch.bfloat16, True, False)
        inductor_config.freezing = True
        compiled = optimize_unet(copy.deepcopy(base).eval(), torch.bfloat16, True, True)
        x = torch.randn(2, 4, size, size, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        ctx = torch.randn(2, 77, width, dtype=torch.bfloat16)
        with torch.no_grad():
            start = time.perf_counter()
            a = compiled(x, t, ctx)
            compile_s = time.perf_counter() - start
            b = eager(x, t, ctx)
            times = {"eager": [], "compiled": []}
            for _ in range(args.rounds):
                for name, net in (("eager", eager), ("compiled", compiled)):
                    start = time.perf_counter()
                    net(x, t, ctx)
                    times[name].append(time.perf_counter() - start)
        ratio = statistics.median(c / e for c, e in zip(times["compiled"], times["eager"]))
        print(f"{size}×{size} latent: compile {compile_s:.0f} s, relative difference {((a.float() - b.float()).norm() / b.float().norm()).item():.4f}, "
              f"eager {statistics.median(times['eager']) * 1000:.0f} ms, compiled {statistics.median(times['compiled']) * 1000:.0f} ms, "
              f"ratio {ratio:.3f} (median of {args.rounds} rounds)", flush=True)
        inductor_config.freezing = False
        torch._dynamo.reset()


if __name__ == "__main__":
    main()
