"""Throughput of `unfog serve --ray` on the bundled model: images per second with 1 and with 2
CPU model replicas (each replica one torch thread), and with 2 replicas batching up to 4 jobs,
N jobs submitted at once through the HTTP API, one run each.

    python bench/ray_throughput.py [--jobs 40] [--steps 30] [--json bench/ray-throughput.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(replicas: int, jobs: int, steps: int, max_batch: int = 1) -> dict:
    import ray

    from unfog.server import ServerSettings, ray_serve

    port = free_port()
    settings = ServerSettings(port=port, max_queue=jobs + 4, preview_every=0)
    registry, _ = ray_serve.start(None, settings, replicas=replicas, num_cpus=max(2, replicas), max_batch=max_batch)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    while True:
        try:
            if client.get("/v1/health").status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    warm = client.post("/v1/jobs", json={"prompt": "a red circle", "steps": steps, "seed": 0}).json()["id"]
    while client.get(f"/v1/jobs/{warm}").json()["state"] in ("queued", "running"):
        time.sleep(0.1)
    t0 = time.perf_counter()
    ids = [client.post("/v1/jobs", json={"prompt": "a big blue square left of a small yellow circle", "steps": steps, "seed": k}).json()["id"]
           for k in range(jobs)]
    states = []
    for i in ids:
        while (s := client.get(f"/v1/jobs/{i}").json())["state"] in ("queued", "running"):
            time.sleep(0.05)
        states.append(s["state"])
    seconds = time.perf_counter() - t0
    client.close()
    ray_serve.stop(registry, timeout=60)
    assert states == ["done"] * jobs, states
    return {"replicas": replicas, "max_batch": max_batch, "jobs": jobs, "seconds": seconds, "images_per_s": jobs / seconds}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=40)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--json")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per replica: the replicas share the cores
    rows = [run(n, args.jobs, args.steps) for n in (1, 2)] + [run(2, args.jobs, args.steps, max_batch=4)]
    result = {"rows": rows, "speed_up": rows[1]["images_per_s"] / rows[0]["images_per_s"], "cores": os.cpu_count(),
              "cpu": platform.processor() or platform.machine(), "steps": args.steps}
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
