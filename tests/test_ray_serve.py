"""`unfog serve --ray`: the HTTP API on Ray Serve with two CPU model replicas and two ingresses
(a local Ray instance, started and stopped here): no job lost, cancel across replicas, a replica
killed mid-job, the queue bound across ingresses."""

import json
import socket
import time

import pytest

ray = pytest.importorskip("ray")
httpx = pytest.importorskip("httpx")

from unfog.server import ServerSettings  # noqa: E402
from unfog.server import ray_serve  # noqa: E402

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = free_port()
    settings = ServerSettings(port=port, max_queue=24, preview_every=0)
    registry, replicas = ray_serve.start(None, settings, replicas=2, ingresses=2, num_cpus=4, max_batch=4)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    deadline = time.time() + 60
    while True:  # the ingress answers once Serve has routed it
        try:
            if client.get("/v1/health").status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, "the Ray ingress never answered"
        time.sleep(0.5)
    yield client, registry, replicas
    client.close()
    ray_serve.stop(registry, timeout=60)


def submit(client, **body) -> str:
    r = client.post("/v1/jobs", json={"prompt": "a red circle", "steps": 4, "seed": 0} | body)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def wait(client, job_id: str, timeout: float = 120) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = client.get(f"/v1/jobs/{job_id}").json()
        if status["state"] not in ("queued", "running"):
            return status
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {status['state']} after {timeout} s")


def test_twenty_jobs_none_lost_and_both_replicas_work(server):
    client, registry, replicas = server
    page = client.get("/")  # the web page, unchanged, from an ingress
    assert page.status_code == 200 and "<html" in page.text.lower()
    assert client.get("/v1/health").json()["status"] == "ok"
    ids = [submit(client, seed=k) for k in range(20)]
    done = [wait(client, i) for i in ids]
    assert [d["state"] for d in done] == ["done"] * 20
    assert [d["seeds"][0] for d in done] == list(range(20))
    image = client.get(done[0]["images"][0])
    assert image.status_code == 200 and image.content[:8] == b"\x89PNG\r\n\x1a\n"
    # the same seed gives the same picture whichever replica ran it
    again = wait(client, submit(client, seed=0))
    assert client.get(again["images"][0]).content == image.content
    # every event of a finished job streams through either ingress
    events = client.get(f"/v1/jobs/{ids[3]}/events").text
    assert events.count("event: progress") == 4 and "event: done" in events
    ran_on = set()
    for i in ids:
        for line in client.get(f"/v1/jobs/{i}/events").text.splitlines():
            if line.startswith("data: ") and '"started"' in line:
                ran_on.add(json.loads(line[6:])["replica"])
    assert ran_on == {"replica-0", "replica-1"}


def test_jobs_of_one_shape_share_a_batch_and_keep_their_own_pictures(server):
    import io

    import numpy as np
    from PIL import Image

    client, _, _ = server
    long = "a red circle " + "on a white background " * 8  # several text windows: never padded into a short prompt's batch
    ids = [submit(client, seed=100 + k, steps=6, **({"prompt": long} if k == 6 else {})) for k in range(8)]
    done = [wait(client, i) for i in ids]
    batches = []
    for i in ids:
        for line in client.get(f"/v1/jobs/{i}/events").text.splitlines():
            if line.startswith("data: ") and '"started"' in line:
                batches.append(json.loads(line[6:])["batch"])
    assert max(batches) > 1, batches  # 8 queued at once: some ran together
    for k in (0, 5, 6):  # each job's picture is the one its seed gives alone
        alone = wait(client, submit(client, seed=100 + k, steps=6, **({"prompt": long} if k == 6 else {})))
        a, b = (np.asarray(Image.open(io.BytesIO(client.get(d["images"][0]).content))).astype(int) for d in (done[k], alone))
        assert np.abs(a - b).max() <= 1


def test_cancel_reaches_the_replica_running_the_job(server):
    client, _, _ = server
    job = submit(client, steps=150)
    deadline = time.time() + 60
    while client.get(f"/v1/jobs/{job}").json()["step"] < 2:
        assert time.time() < deadline
        time.sleep(0.1)
    assert client.delete(f"/v1/jobs/{job}").status_code == 200
    status = wait(client, job)
    assert status["state"] == "cancelled" and status["step"] < 150


def test_queue_bound_holds_across_ingresses(server):
    client, _, _ = server
    ids, refused = [], 0
    for k in range(40):
        r = client.post("/v1/jobs", json={"prompt": "a red circle", "steps": 60, "seed": k})  # long jobs: none ends while the 40 are sent
        if r.status_code == 429:
            refused += 1
            assert r.headers.get("retry-after")
        else:
            ids.append(r.json()["id"])
    assert refused >= 40 - 24 - 2 * 4  # at most max_queue waiting (plus two running batches of up to 4)
    for i in ids:
        client.delete(f"/v1/jobs/{i}")
    for i in ids:
        assert wait(client, i)["state"] in ("cancelled", "done")


def test_a_replica_killed_mid_job_hands_the_job_on(server):
    client, registry, replicas = server
    job = submit(client, steps=60)
    deadline = time.time() + 60
    victim = None
    while victim is None:
        assert time.time() < deadline, "the job never started"
        for h in replicas:
            if job in ray.get(h.running_batch.remote()):
                victim = h
        time.sleep(0.05)
    ray.kill(victim)
    status = wait(client, job, timeout=180)
    assert status["state"] == "done", status
    events = client.get(f"/v1/jobs/{job}/events").text
    assert "event: retry" in events and "stopped" in events
    assert ray.get(registry.replica_count.remote()) == 1
    assert wait(client, submit(client))["state"] == "done"  # the survivor serves on
    survivor = next(h for h in replicas if h is not victim)
    ray.kill(survivor)
    deadline = time.time() + 30
    while ray.get(registry.replica_count.remote()):
        assert time.time() < deadline
        time.sleep(0.2)
    r = client.post("/v1/jobs", json={"prompt": "a red circle", "steps": 4})
    assert r.status_code == 503 and "no model replica" in r.json()["error"]  # refused, not queued forever


def test_an_unreachable_ray_address_fails_at_start_naming_it():
    from unfog.errors import UnfogError

    port = free_port()  # nothing listens there
    with pytest.raises(UnfogError, match=f"127.0.0.1:{port}"):
        ray_serve.start(None, ServerSettings(port=free_port()), replicas=1, address=f"127.0.0.1:{port}")


def test_ray_without_the_extra_says_how_to_install_it(monkeypatch):
    from unfog.errors import UnfogError

    monkeypatch.setitem(__import__("sys").modules, "ray", None)  # as if the wheel were absent
    with pytest.raises(UnfogError, match=r"pip install 'unfog\[ray\]'"):
        ray_serve.start(None, ServerSettings(port=free_port()), replicas=1)


def test_sigterm_drains_the_running_job_then_exits(tmp_path):
    import signal
    import subprocess
    import sys

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "unfog", "serve", "--ray", "--replicas", "1", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
        deadline = time.time() + 120
        while True:
            try:
                if client.get("/v1/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline and proc.poll() is None, "the server did not start"
            time.sleep(0.5)
        job = submit(client, steps=40)
        while client.get(f"/v1/jobs/{job}").json()["step"] < 2:
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        status = wait(client, job)  # still answered while draining
        assert status["state"] == "done"
        assert proc.wait(timeout=120) == 0
        assert "draining" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_only_requests_that_frame_alike_share_a_batch():
    """A batch pads every prompt to its longest in text windows, so a long prompt never joins
    short ones; a retried job runs alone (the registry's own rules, without Ray)."""
    from unfog import Pipeline

    pipe = Pipeline.from_pretrained()
    reg = ray_serve.Registry(max_queue=10, ping_every_s=3600)
    reg.register("r", object())
    short, long = (pipe.request(t, num_inference_steps=4, prompt_syntax="a1111", seed=0)
                   for t in ("a red circle", "a red circle " + "on a white background " * 8))
    assert ray_serve.text_windows(pipe, short) == (1, 1) and ray_serve.text_windows(pipe, long)[0] > 1
    ids = [reg.submit(r, {"steps": 4}, ray_serve.text_windows(pipe, r))[0] for r in (short, long, short, short)]
    first = [job_id for job_id, _ in reg.claim("r", 1.0, max_batch=4)]
    assert first == [ids[0], ids[2], ids[3]]  # the three short ones together
    assert [job_id for job_id, _ in reg.claim("r", 1.0, max_batch=4)] == [ids[1]]  # the long one alone
    assert reg.claim("unregistered", 0.1) is None  # a replica the registry does not know takes nothing
