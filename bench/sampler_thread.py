"""Why unfog runs a sampler in a greenlet on the caller's thread: the bundled model's default
image with the sampler on the caller's thread (as `Pipeline.denoise` does) against the same
sampler run on a fresh thread per image, as a thread-based step generator would.

    python bench/sampler_thread.py [--repeats 10]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch

from unfog import Pipeline


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    pipe = Pipeline.from_pretrained()

    def image(seed: int) -> None:
        with torch.inference_mode():
            pipe("a big blue square left of a small yellow circle", seed=seed)

    def on_a_thread(seed: int) -> None:
        t = threading.Thread(target=image, args=(seed,))
        t.start()
        t.join()

    image(0)
    results = {}
    for _ in range(2):  # interleaved rounds, so that drift in the machine's speed hits both
        for name, run in (("caller's thread (greenlet)", image), ("fresh thread per image", on_a_thread)):
            times = []
            for k in range(args.repeats):
                t = time.perf_counter()
                run(k)
                times.append(time.perf_counter() - t)
            results.setdefault(name, []).append(statistics.median(times))
    for name, medians in results.items():
        print(f"{name}: median s per image by round {', '.join(f'{m:.3f}' for m in medians)}")


if __name__ == "__main__":
    main()
