"""Time a bundled model on this machine: loading, and one 64×64 image at the default
settings (median of repeats after a warm-up).

    python bench/default_model.py [--model shapes|emoji] [--repeats 10] [--threads N]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import subprocess
import sys
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["shapes", "emoji"], default="shapes")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    # Load in a fresh interpreter so nothing is cached: import unfog + read the model folder.
    code = f"import time; t=time.perf_counter(); import unfog; p=unfog.Pipeline.from_pretrained({args.model!r}); print(time.perf_counter()-t)"
    cold = [float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout) for _ in range(3)]

    from unfog import Pipeline

    t = time.perf_counter()
    pipe = Pipeline.from_pretrained(args.model)
    warm_load = time.perf_counter() - t
    prompt = "a big blue square left of a small yellow circle" if args.model == "shapes" else "a fox left of a red apple on a light blue background"
    pipe(prompt, seed=0)  # warm-up
    times = []
    for k in range(args.repeats):
        t = time.perf_counter()
        pipe(prompt, seed=k)
        times.append(time.perf_counter() - t)
    d = pipe.defaults
    result = {
        "model": args.model,
        "load_s_fresh_process_median": statistics.median(cold),
        "load_s_in_process": warm_load,
        "image_s_median": statistics.median(times),
        "image_s_min": min(times),
        "settings": dataclasses.asdict(d),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": __import__("os").cpu_count(),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
