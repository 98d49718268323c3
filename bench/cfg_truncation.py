"""CFG truncation on the bundled model: seconds per image, PSNR against the full computation, and
shapes-v1 prompt adherence, for a few truncation points.

    python bench/cfg_truncation.py [--prompts 500] [--settings 1.0,0.7,0.5] [--json bench/cfg-truncation.json]
    python bench/cfg_truncation.py --time-only      # interleaved timing of the settings, no evaluation

Setting f skips the unconditional half after the fraction f of the steps (1.0: the full
computation). Each setting runs the shapes-v1 evaluator on the same prompts and seeds; PSNR is
each image against the full computation's image of the same prompt and seed (median over the
prompts); time is one batch-1 image, median of 5, at the model's defaults. `--time-only` times
the settings interleaved (round k runs every setting once), the fair comparison on a shared VM.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed import psnr  # noqa: E402
from unfog import Pipeline  # noqa: E402
from unfog.eval.shapes import evaluate  # noqa: E402


def seconds_per_image(pipe, f: float, repeats: int = 5) -> float:
    pipe("warm-up", seed=0, cfg_truncation=f)
    times = []
    for k in range(repeats):
        t = time.perf_counter()
        pipe("a big blue square left of a small yellow circle", seed=k, cfg_truncation=f)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=500)
    ap.add_argument("--settings", default="1.0,0.7,0.5")
    ap.add_argument("--json", default="bench/cfg-truncation.json")
    ap.add_argument("--time-only", action="store_true")
    args = ap.parse_args()
    pipe = Pipeline.from_pretrained()
    settings = [float(v) for v in args.settings.split(",")]
    if args.time_only:
        pipe("warm-up", seed=0)
        times = {f: [] for f in settings}
        for k in range(5):
            for f in settings:
                t = time.perf_counter()
                pipe("a big blue square left of a small yellow circle", seed=k, cfg_truncation=f)
                times[f].append(time.perf_counter() - t)
        print(json.dumps({str(f): round(statistics.median(v), 3) for f, v in times.items()}))
        return
    rows, reference = [], None
    for f in (float(v) for v in args.settings.split(",")):
        result = evaluate(pipe, args.prompts, seed=0, progress=False, cfg_truncation=f)
        if reference is None:
            reference = result["images"]
        row = {"cfg_truncation": f, "seconds_per_image": round(seconds_per_image(pipe, f), 3),
               "psnr_vs_full_db": statistics.median(psnr(a, b) for a, b in zip(result["images"], reference)),
               "followed": {k: round(v["followed"], 3) for k, v in result["scores"].items()}}
        rows.append(row)
        print(json.dumps(row), flush=True)
        Path(args.json).write_text(json.dumps({"prompts": args.prompts, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
