"""Fewer network calls per image, on the bundled model: seconds per image, PSNR against the full
computation, and shapes-v1 prompt adherence, for a few settings of one option.

    python bench/fewer_calls.py --option cfg_truncation --settings 1.0,0.7,0.5 [--prompts 500]
    python bench/fewer_calls.py --option deep_cache --settings 1,2,3
    python bench/fewer_calls.py --option deep_cache --settings 1,2,3 --time-only   # interleaved timing only

cfg_truncation f skips the unconditional half after the fraction f of the steps; deep_cache k runs
the U-Net whole every k calls and only its shallowest level in between (the first setting is
the full computation: 1.0 and 1). The JSON goes to bench/OPTION.json. Each setting runs the
shapes-v1 evaluator on the same prompts and seeds; PSNR is
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


sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed import psnr  # noqa: E402
from unfog import Pipeline  # noqa: E402
from unfog.eval.shapes import evaluate  # noqa: E402


def seconds_per_image(pipe, option: dict, repeats: int = 5) -> float:
    pipe("warm-up", seed=0, **option)
    times = []
    for k in range(repeats):
        t = time.perf_counter()
        pipe("a big blue square left of a small yellow circle", seed=k, **option)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=500)
    ap.add_argument("--option", choices=["cfg_truncation", "deep_cache"], default="cfg_truncation")
    ap.add_argument("--settings", default="1.0,0.7,0.5")
    ap.add_argument("--json", help="default: bench/OPTION.json")
    ap.add_argument("--time-only", action="store_true")
    args = ap.parse_args()
    pipe = Pipeline.from_pretrained()
    kind = float if args.option == "cfg_truncation" else int
    settings = [kind(v) for v in args.settings.split(",")]
    json_path = args.json or f"bench/{args.option}.json"
    if args.time_only:
        pipe("warm-up", seed=0)
        times = {f: [] for f in settings}
        for k in range(5):
            for f in settings:
                t = time.perf_counter()
                pipe("a big blue square left of a small yellow circle", seed=k, **{args.option: f})
                times[f].append(time.perf_counter() - t)
        print(json.dumps({str(f): round(statistics.median(v), 3) for f, v in times.items()}))
        return
    rows, reference = [], None
    for f in settings:
        result = evaluate(pipe, args.prompts, seed=0, progress=False, **{args.option: f})
        if reference is None:
            reference = result["images"]
        row = {args.option: f, "seconds_per_image": round(seconds_per_image(pipe, {args.option: f}), 3),
               "psnr_vs_full_db": statistics.median(psnr(a, b) for a, b in zip(result["images"], reference)),
               "followed": {k: round(v["followed"], 3) for k, v in result["scores"].items()}}
        rows.append(row)
        print(json.dumps(row), flush=True)
        Path(json_path).write_text(json.dumps({"prompts": args.prompts, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
