"""Seconds per whole Stable Diffusion 1.5 image for whichever `unfog` is importable, so that two
versions of unfog can be timed on the same machine against the same weights.

    python bench/image_time.py --build DIR                   # a random full-size SD 1.5, diffusers layout
    python bench/image_time.py --folder DIR/sd --json a.json # time it: eager, optimize(), optimize(compile=True)
    PYTHONPATH=OTHER_CHECKOUT python bench/image_time.py --folder DIR/sd --json b.json

Each row: one 512² image, 50 DPM-Solver++(2M) steps at guidance 7.5 (text encoding, steps,
decode, PIL), median of `--repeats` after a first call that compiles and captures; on CUDA the
optimize() rows replay CUDA graphs. `bench/speed.py` times the same image against diffusers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

PROMPT = "a photo of an astronaut riding a horse on mars"


def time_image(folder: str, variant: str, repeats: int, steps: int, size: int) -> dict:
    import unfog
    from unfog import Pipeline

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    pipe = Pipeline.from_pretrained(folder).to(device, dtype)
    if variant != "eager":
        pipe.optimize(dtype, compile=variant == "optimize(compile=True)")
    kw = dict(num_inference_steps=steps, guidance_scale=7.5, height=size, width=size, sampler="dpmpp_2m")

    def run(seed):
        pipe(PROMPT, seed=seed, **kw)
        if device.type == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    run(0)
    first = time.perf_counter() - t0
    times = []
    for k in range(repeats):
        t = time.perf_counter()
        run(k + 1)
        times.append(time.perf_counter() - t)
    return {"unfog": str(Path(unfog.__file__).parent), "variant": variant, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "dtype": str(dtype).replace("torch.", ""), "steps": steps, "size": size, "first_call_s": round(first, 2),
            "s_per_image": round(statistics.median(times), 4), "all_s": [round(t, 4) for t in times]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", help="write a random full-size SD 1.5 in diffusers' layout under this folder and exit")
    ap.add_argument("--folder", help="the diffusers-layout folder to time")
    ap.add_argument("--variants", default="eager,optimize(),optimize(compile=True)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.build:
        from speed import build_sd15

        build_sd15(args.build)
        print(f"{args.build}/sd")
        return
    rows = []
    for variant in args.variants.split(","):
        rows.append(time_image(args.folder, variant, args.repeats, args.steps, args.size))
        print(json.dumps(rows[-1]), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
