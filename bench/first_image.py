"""Time to first image: `unfog generate "…" -o out.png` with the bundled model, cold (a fresh
process each run), end to end, and where the time goes.

    python bench/first_image.py [--runs 5]

Prints the median wall time of the CLI command over --runs fresh processes, then one fresh
process's split: import torch, import unfog's CLI, load the bundled model, make the image (text
encoding, 30 steps, decode), write the PNG; and what the CLI's quick exit saves, the median over
--runs pairs of `python -c "import torch"` against the same ending in os._exit.

Bytecode: an installed package runs from compiled bytecode (pip compiles it at install; Python
writes it at the first import of an editable install), but a machine with PYTHONDONTWRITEBYTECODE=1
set (this sandbox sets it) compiles unfog's 11,000 lines again in every process. So by default
unfog's bytecode is compiled once (compileall, into the package's own __pycache__, as a first
import would) before the timed runs. `--bytecode none` removes unfog's __pycache__ folders before
each run instead; `--bytecode both` alternates the two states run by run and reports each.
"""

from __future__ import annotations

import argparse
import compileall
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPLIT = r"""
import time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import unfog.cli
t2 = time.perf_counter()
from unfog import Pipeline
from unfog.images import save
pipe = Pipeline.from_pretrained()
t3 = time.perf_counter()
out = pipe("a big blue square left of a small yellow circle", seed=0)
t4 = time.perf_counter()
save(out.images[0], OUT, {})
t5 = time.perf_counter()
print({"import_torch": t1 - t0, "import_unfog_cli": t2 - t1, "load_model": t3 - t2, "image": t4 - t3, "write_png": t5 - t4})
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--bytecode", choices=("compiled", "none", "both"), default="compiled",
                    help="unfog's bytecode before each timed run: compiled once, removed, or alternating")
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp()) / "out.png"
    import unfog

    package = Path(unfog.__file__).parent
    states = ["compiled", "none"] if args.bytecode == "both" else [args.bytecode]
    times = {state: [] for state in states}
    for _ in range(args.runs):
        for state in states:
            if state == "compiled":
                compileall.compile_dir(str(package), quiet=1)
            else:
                for cache in list(package.rglob("__pycache__")):
                    shutil.rmtree(cache)
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "unfog", "generate", "a big blue square left of a small yellow circle", "-o", str(out), "-q"],
                           check=True, capture_output=True)
            times[state].append(time.perf_counter() - t)
    if "compiled" in states:
        compileall.compile_dir(str(package), quiet=1)  # the split below runs in the normal state
    # What the CLI's quick exit (os._exit) saves: interpreter teardown after `import torch`.
    teardown = []
    for _ in range(args.runs):
        pair = []
        for code in ("import torch", "import os, torch; os._exit(0)"):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True)
            pair.append(time.perf_counter() - t)
        teardown.append(pair[0] - pair[1])
    split = subprocess.run([sys.executable, "-c", SPLIT.replace("OUT", repr(str(out)))], check=True, capture_output=True, text=True).stdout
    result = {"bytecode": args.bytecode, **{f"cli_seconds_median{'' if len(states) == 1 else '_' + state}": round(statistics.median(ts), 2)
                                            for state, ts in times.items()},
              **{f"cli_seconds{'' if len(states) == 1 else '_' + state}": [round(t, 2) for t in ts] for state, ts in times.items()},
              "split_seconds": {k: round(v, 2) for k, v in eval(split).items()},
              "torch_teardown_seconds_median": round(statistics.median(teardown), 2)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
