"""Prompt adherence of the bundled model for sampler / step-count pairs, and seconds per image.

    python bench/sampler_eval.py --json bench/sampler-eval.json [--prompts 500] [--settings dpmpp_2m:8,euler:12] [--time-only]

Each setting runs `unfog eval shapes` (the same 500 prompts, image k seeded with k) at the
model's guidance and schedule, and times one batch-1 image at that setting. The JSON is
rewritten after every setting, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from unfog import Pipeline
from unfog.eval.shapes import evaluate

DEFAULT = ("dpmpp_2m_sde:30,dpmpp_2m:8,dpmpp_2m:12,dpmpp_2m_sde:12,dpmpp_3m_sde:12,euler_ancestral:12,lms:12,"
           "dpmpp_sde:6,dpmpp_2m:6,dpmpp_3m_sde:8,euler:12,dpm_2:6")


def seconds_per_image(pipe, sampler: str, steps: int, repeats: int = 5) -> float:
    pipe("warm-up", seed=0, sampler=sampler, num_inference_steps=steps)
    times = []
    for k in range(repeats):
        t = time.perf_counter()
        pipe("a big blue square left of a small yellow circle", seed=k, sampler=sampler, num_inference_steps=steps)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="bench/sampler-eval.json")
    ap.add_argument("--prompts", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--settings", default=DEFAULT, help="comma-separated SAMPLER:STEPS")
    ap.add_argument("--time-only", action="store_true", help="only the seconds per image (run alone: timings under load mislead)")
    args = ap.parse_args()
    pipe = Pipeline.from_pretrained()
    rows = []
    for setting in args.settings.split(","):
        sampler, steps = setting.split(":")
        row = {"sampler": sampler, "steps": int(steps)}
        if not args.time_only:
            scores = evaluate(pipe, args.prompts, args.seed, progress=False, sampler=sampler, num_inference_steps=int(steps))["scores"]
            row |= {"one_object_followed": round(scores["one-object"]["followed"], 4), "two_object_followed": round(scores["two-object"]["followed"], 4)}
        row["s_per_image"] = round(seconds_per_image(pipe, sampler, int(steps), repeats=9), 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
        Path(args.json).write_text(json.dumps({"prompts": args.prompts, "seed": args.seed, "defaults": pipe.defaults.__dict__, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
