"""The bundled model's image time alone and beside one busy process, for unfog's thread choice
(unfog.threads) and the alternatives.

    python bench/busy.py [--images 6]

Each case runs in a fresh process: load the bundled model, make one image to warm up, then
`--images` images (default settings, seed k), and reports the median seconds per image. "busy"
runs one competing process that keeps one core busy (a Python loop) for the whole case. Cases:
unfog's default (threads fitted to the cores left), UNFOG_THREADS=fixed (torch's own count: what
unfog did before), OMP_WAIT_POLICY=PASSIVE with torch's count, and OMP_NUM_THREADS=1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

CHILD = r"""
import statistics, sys, time
import torch
from unfog import Pipeline
pipe = Pipeline.from_pretrained()
pipe("a red circle", seed=0)
times = []
for k in range(int(sys.argv[1])):
    t = time.perf_counter()
    pipe("a big blue square left of a small yellow circle", seed=k)
    times.append(time.perf_counter() - t)
print(statistics.median(times), torch.get_num_threads())
"""

CASES = {
    "unfog default (fitted threads)": {},
    "fixed threads (before)": {"UNFOG_THREADS": "fixed"},
    "OMP_WAIT_POLICY=PASSIVE": {"UNFOG_THREADS": "fixed", "OMP_WAIT_POLICY": "PASSIVE"},
    "one thread": {"OMP_NUM_THREADS": "1"},
}


def run(env_extra: dict, images: int) -> tuple[float, int]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "UNFOG_THREADS")}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", CHILD, str(images)], env=env, check=True, capture_output=True, text=True).stdout.split()
    return float(out[0]), int(out[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=6)
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    for busy in (False, True):
        for name, env in CASES.items():
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
            try:
                time.sleep(0.5 if busy else 0)
                seconds, threads = run(env, args.images)
            finally:
                if hog is not None:
                    hog.kill()
                    hog.wait()
            rows.append({"case": name, "busy": busy, "seconds_per_image": round(seconds, 3), "threads_used": threads})
            print(json.dumps(rows[-1]), flush=True)
    alone = {r["case"]: r["seconds_per_image"] for r in rows if not r["busy"]}
    for r in rows:
        r["vs_default_alone"] = round(r["seconds_per_image"] / alone["unfog default (fitted threads)"], 2)
    summary = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "images": args.images, "rows": rows}
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
