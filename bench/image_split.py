"""Where one whole SD 1.5 image's time goes with `optimize()` on a CPU, against a bare U-Net call.

    python bench/image_split.py [--rounds 3]

The same random-weight SD 1.5 and image as `bench/cpu_openvino.py`'s image rows (256², 20
DPM-Solver++(2M) steps, CFG 7.5). Per round: the request and text encoding, the denoising loop
(and the sum, first and median of its U-Net calls, timed around the U-Net's forward), the
decode. Then four bare U-Net calls on a channels_last bfloat16 batch of the same shape, in the
same process, to compare with the calls inside the loop.
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
from cpu_openvino import PROMPT, build_sd15  # noqa: E402

from unfog import Pipeline  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    kw = dict(num_inference_steps=20, guidance_scale=7.5, height=256, width=256, seed=1, sampler="dpmpp_2m")
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        _, folder = build_sd15(tmp)
        pipe = Pipeline.from_pretrained(folder).optimize()
        pipe(PROMPT, **kw)  # packs the weights
        forward = pipe.unet.forward
        calls: list[float] = []

        def timed(*a, **k):
            start = time.perf_counter()
            out = forward(*a, **k)
            calls.append(time.perf_counter() - start)
            return out

        pipe.unet.forward = timed
        for r in range(args.rounds):
            calls.clear()
            t0 = time.perf_counter()
            request = pipe.request(PROMPT, **kw)
            state = pipe.initial_state(request)
            t1 = time.perf_counter()
            for _ in pipe.denoise(request, state):
                pass
            t2 = time.perf_counter()
            pipe.decode(state.x)
            t3 = time.perf_counter()
            print(f"round {r}: request and text encoding {t1 - t0:.2f} s, denoising {t2 - t1:.2f} s ({len(calls)} U-Net calls: "
                  f"sum {sum(calls):.2f} s, first {calls[0]:.3f} s, median {statistics.median(calls):.3f} s), decode {t3 - t2:.2f} s, "
                  f"total {t3 - t0:.2f} s", flush=True)
        pipe.unet.forward = forward
        x = torch.randn(2, 4, 32, 32).bfloat16().to(memory_format=torch.channels_last)
        t, ctx = torch.tensor([500.0, 500.0]), torch.randn(2, 77, 768).bfloat16()
        bare = []
        for _ in range(4):
            start = time.perf_counter()
            pipe.unet(x, t, ctx)
            bare.append(time.perf_counter() - start)
        print(f"bare U-Net calls: {', '.join(f'{b:.3f}' for b in bare)} s", flush=True)


if __name__ == "__main__":
    main()
