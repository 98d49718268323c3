"""The compiled path's warm-up, cold and warm: does torch.compile's on-disk cache carry it across
processes?

    python bench/compile_cache.py [--model shapes] [--size 64] [--runs 2]

Runs `--runs` fresh processes one after another, all with the same new, empty
TORCHINDUCTOR_CACHE_DIR (inductor's FX-graph and AOT-autograd caches, on by default in torch 2.13,
live there). Each loads the model, calls `optimize(compile=True)` and times its first image
(compile + run) and its second (run only). The first process compiles from nothing; the later
ones find their kernels and graphs on disk. Prints JSON: per process, the first and second image
in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time
from unfog import Pipeline
pipe = Pipeline.from_pretrained(sys.argv[1]).optimize(compile=True)
size = int(sys.argv[2])
times = []
for _ in range(2):
    t = time.perf_counter()
    pipe("a big blue square left of a small yellow circle", seed=0, height=size, width=size)
    times.append(round(time.perf_counter() - t, 2))
print(json.dumps({"first_image_s": times[0], "second_image_s": times[1]}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args()
    cache = tempfile.mkdtemp(prefix="inductor-cache-")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
    rows = []
    for k in range(args.runs):
        out = subprocess.run([sys.executable, "-c", CHILD, args.model, str(args.size)], env=env, check=True, capture_output=True, text=True).stdout
        rows.append({"process": k + 1, "cache": "empty" if k == 0 else "filled by process 1", **json.loads(out.strip().splitlines()[-1])})
        print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"model": args.model, "size": args.size, "cache_dir": cache, "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
