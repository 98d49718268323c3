"""The HTTP API: validation of every limit, the job life cycle, concurrency, and safety."""

import io
import json
import threading
import time

import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from conftest import tiny_pipeline  # noqa: E402
from unfog.server import ServerSettings, create_app  # noqa: E402

BASE = "http://127.0.0.1:7860"


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def client(pipe, **settings):
    return TestClient(create_app(pipe, ServerSettings(**settings), model_name="tiny"), base_url=BASE)


@pytest.fixture(scope="module")
def api(pipe):
    with client(pipe) as c:
        yield c


def wait_done(api, job_id, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        j = api.get(f"/v1/jobs/{job_id}").json()
        if j["state"] not in ("queued", "running"):
            return j
        time.sleep(0.05)
    raise AssertionError("job did not finish")


def test_job_life_cycle_and_png_parameters(api):
    r = api.post("/v1/jobs", json={"prompt": "a red circle", "steps": 4, "seed": 5, "num_images": 2})
    assert r.status_code == 202 and "queue_position" in r.json()
    job = wait_done(api, r.json()["id"])
    assert job["state"] == "done" and job["seeds"] == [5, 6] and len(job["images"]) == 2
    png = api.get(job["images"][1])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    im = Image.open(io.BytesIO(png.content))
    assert im.size == (32, 32)
    assert im.text["prompt"] == "a red circle" and im.text["seed"] == "6" and im.text["steps"] == "4" and im.text["model"] == "tiny"


def test_events_stream_progress_previews_and_done(api):
    job_id = api.post("/v1/jobs", json={"prompt": "a blue square", "steps": 4, "seed": 1}).json()["id"]
    with api.stream("GET", f"/v1/jobs/{job_id}/events") as r:
        text = "".join(r.iter_text())
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
    kinds = [e["type"] for e in events]
    assert kinds[-1] == "done" and kinds.count("progress") == 4
    assert any("preview" in e and e["preview"].startswith("data:image/png;base64,") for e in events)


def test_sync_generate_returns_a_png(api):
    r = api.post("/v1/images/generate", json={"prompt": "a green triangle", "steps": 3, "seed": 2})
    assert r.status_code == 200 and r.content[:8] == b"\x89PNG\r\n\x1a\n" and r.headers["x-seeds"] == "2"


def test_info_routes(api):
    assert api.get("/v1/health").json()["status"] == "ok"
    assert "dpmpp_2m" in api.get("/v1/samplers").json()["samplers"]
    assert api.get("/v1/models").json()["models"][0]["name"] == "tiny"
    assert api.get("/openapi.json").status_code == 200
    assert "<form" in api.get("/").text


@pytest.mark.parametrize("body, field", [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "x" * 2001}, "prompt"),
    ({"prompt": "a", "negative_prompt": 3}, "negative_prompt"),
    ({"prompt": "a", "steps": 0}, "steps"),
    ({"prompt": "a", "steps": 151}, "steps"),
    ({"prompt": "a", "guidance_scale": 31}, "guidance_scale"),
    ({"prompt": "a", "guidance_scale": -1}, "guidance_scale"),
    ({"prompt": "a", "guidance_scale": "nan"}, "guidance_scale"),
    ({"prompt": "a", "sampler": "plms"}, "sampler"),
    ({"prompt": "a", "width": 31}, "width"),  # not a multiple of the factor
    ({"prompt": "a", "width": 100000, "height": 100000}, "width"),
    ({"prompt": "a", "width": 2048, "height": 2048}, "width"),
    ({"prompt": "a", "num_images": 9}, "num_images"),
    ({"prompt": "a", "seed": "x"}, "seed"),
    ({"prompt": "a", "path": "/etc/passwd"}, "path"),
])
def test_every_limit_is_refused_with_the_field_and_range(api, body, field):
    r = api.post("/v1/jobs", json=body)
    assert r.status_code == 422
    assert r.json()["field"] == field and r.json()["allowed"] is not None


def test_bad_bodies(api):
    assert api.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"}).status_code == 400
    assert api.post("/v1/jobs", json=["a"]).status_code == 422
    big = json.dumps({"prompt": "a", "negative_prompt": "x" * (1024 * 1024)})
    assert api.post("/v1/jobs", content=big, headers={"content-type": "application/json"}).status_code == 413


@pytest.mark.parametrize("path", ["/v1/images/../../etc/passwd", "/v1/images/%2e%2e%2fsecret.png", "/v1/images/%2Fetc%2Fpasswd",
                                  "/v1/images/..%5c..%5cwin.ini", "/v1/images/nothere.png", "/v1/images/%00.png"])
def test_image_route_resists_path_tricks(api, path):
    r = api.get(path)
    assert r.status_code == 404 and b"root:" not in r.content


def test_foreign_origin_and_host_are_refused(api):
    assert api.get("/v1/health", headers={"origin": "http://evil.example"}).status_code == 403
    assert api.get("/v1/health", headers={"origin": BASE}).status_code == 200
    assert api.get("/v1/health", headers={"host": "evil.example"}).status_code == 403
    r = api.get("/v1/health", headers={"origin": BASE})
    assert not any(h.lower().startswith("access-control") for h in r.headers)


def test_token_is_required_when_set(pipe):
    with client(pipe, token="s3cret") as c:
        assert c.get("/v1/health").status_code == 401
        assert c.get("/v1/health", headers={"authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/v1/health", headers={"authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/").status_code == 200  # the page itself carries no data; it asks for the token


def test_cancel_a_queued_and_a_running_job(pipe):
    with client(pipe) as c:
        slow = c.post("/v1/jobs", json={"prompt": "a", "steps": 150, "seed": 0}).json()["id"]
        queued = c.post("/v1/jobs", json={"prompt": "b", "steps": 3}).json()["id"]
        assert c.delete(f"/v1/jobs/{queued}").json()["state"] == "cancelled"
        while c.get(f"/v1/jobs/{slow}").json()["step"] < 2:
            time.sleep(0.02)
        c.delete(f"/v1/jobs/{slow}")
        job = wait_done(c, slow)
        assert job["state"] == "cancelled" and job["step"] < 150
        assert c.delete("/v1/jobs/nope").status_code == 404
        # the server keeps serving
        assert wait_done(c, c.post("/v1/jobs", json={"prompt": "c", "steps": 2}).json()["id"])["state"] == "done"


def test_twenty_concurrent_jobs_finish_or_are_refused_none_lost(pipe):
    with client(pipe, max_queue=8) as c:
        results = []

        def submit(k):
            results.append((k, c.post("/v1/jobs", json={"prompt": f"a red circle {k}", "steps": 2, "seed": k})))

        threads = [threading.Thread(target=submit, args=(k,)) for k in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        accepted = [(k, r.json()["id"]) for k, r in results if r.status_code == 202]
        refused = [r for _, r in results if r.status_code == 429]
        assert len(accepted) + len(refused) == 20 and refused and accepted
        assert all(r.headers.get("retry-after") for r in refused)
        assert len({i for _, i in accepted}) == len(accepted)
        for k, job_id in accepted:
            job = wait_done(c, job_id)
            assert job["state"] == "done" and job["seeds"] == [k] and job["params"]["prompt"] == f"a red circle {k}"


def test_a_failing_job_fails_alone(pipe, monkeypatch):
    with client(pipe) as c:
        app_jobs = c.app.state.jobs
        real = app_jobs.pipe.__class__.initial_state

        def boom(self, request):
            if request.prompts[0] == "explode":
                raise RuntimeError("CUDA out of memory (simulated)")
            return real(self, request)

        monkeypatch.setattr(app_jobs.pipe.__class__, "initial_state", boom)
        bad = wait_done(c, c.post("/v1/jobs", json={"prompt": "explode", "steps": 2}).json()["id"])
        assert bad["state"] == "failed" and "out of memory" in bad["error"]
        assert wait_done(c, c.post("/v1/jobs", json={"prompt": "fine", "steps": 2}).json()["id"])["state"] == "done"


def test_job_timeout(pipe):
    with client(pipe, job_timeout_s=1e-6) as c:
        job = wait_done(c, c.post("/v1/jobs", json={"prompt": "a", "steps": 5}).json()["id"])
        assert job["state"] == "failed" and "timed out" in job["error"]


def test_serve_refuses_a_public_address_without_a_token(capsys):
    from unfog.cli import main

    assert main(["serve", "--host", "0.0.0.0"]) == 2
    assert "--token" in capsys.readouterr().err


def test_chunked_body_over_the_limit_is_refused(api):
    def chunks():
        yield b'{"prompt": "a", "negative_prompt": "'
        for _ in range(40):
            yield b"x" * 32768
        yield b'"}'

    assert api.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"}).status_code == 413


def test_deeply_nested_json_is_a_400(api):
    assert api.post("/v1/jobs", content=b"[" * 100000, headers={"content-type": "application/json"}).status_code == 400


def test_cancelled_queued_jobs_free_their_slots(pipe):
    with client(pipe, max_queue=2) as c:
        running = c.post("/v1/jobs", json={"prompt": "a", "steps": 150}).json()["id"]
        while c.get(f"/v1/jobs/{running}").json()["state"] != "running":
            time.sleep(0.02)
        for _ in range(5):  # submit-and-cancel never fills the queue
            r = c.post("/v1/jobs", json={"prompt": "b", "steps": 2})
            assert r.status_code == 202
            c.delete(f"/v1/jobs/{r.json()['id']}")
        c.delete(f"/v1/jobs/{running}")


@pytest.mark.parametrize("body, field", [({"prompt": "a", "sampler": []}, "sampler"), ({"prompt": "a", "sampler": {}}, "sampler"),
                                         ({"prompt": "\ud800"}, "prompt"), ({"prompt": "a", "negative_prompt": "\udfff"}, "negative_prompt"),
                                         ({"prompt": ["a", "b"]}, "prompt"), ({"prompt": "a", "seed": [1]}, "seed")])
def test_odd_json_values_are_422s_naming_the_field(api, body, field):
    r = api.post("/v1/jobs", content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["field"] == field and r.json()["allowed"] is not None
    assert api.get("/v1/health").status_code == 200


@pytest.mark.parametrize("flags, message", [(["--max-queue", "0"], "max_queue"), (["--max-steps", "0"], "max_steps"), (["--max-side", "-5"], "max_side"),
                                            (["--max-images", "0"], "max_images"), (["--job-timeout", "-1"], "job_timeout_s")])
def test_serve_refuses_settings_that_would_refuse_every_request(flags, message, capsys):
    from unfog.cli import main

    assert main(["serve", *flags]) == 2
    assert message in capsys.readouterr().err


def test_a_sync_request_whose_client_leaves_cancels_its_job(pipe):
    """Driven as raw ASGI so the client can go away mid-request: the job must be cancelled,
    not left holding the only worker to the end."""
    import asyncio

    app = create_app(pipe, ServerSettings(), model_name="tiny")
    body = json.dumps({"prompt": "a red circle", "steps": 150, "seed": 0}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/images/generate", "raw_path": b"/v1/images/generate", "query_string": b"", "root_path": "",
             "headers": [(b"host", b"127.0.0.1:7860"), (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 7860)}
    jobs = app.state.jobs
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        if pending:
            return pending.pop()
        while not any(j.step >= 2 for j in jobs.jobs.values()):  # the client leaves once its job is under way
            await asyncio.sleep(0.02)
        return {"type": "http.disconnect"}

    sent = []

    async def send(message):
        sent.append(message)

    asyncio.run(asyncio.wait_for(app(scope, receive, send), timeout=60))
    job = next(iter(jobs.jobs.values()))
    assert jobs.wait(job, 30) and job.state == "cancelled" and job.step < 150


def test_ctrl_c_during_a_job_shuts_down_cleanly(tiny_model_dir):
    """SIGINT while a job runs: the job is stopped at its next step and the worker joined, so the
    process exits normally instead of aborting ("terminate called without an active exception")."""
    import signal
    import socket
    import subprocess
    import sys
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "unfog", "serve", "--model", str(tiny_model_dir), "--port", str(port), "--warmup", "48x32"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(url + "/v1/health", timeout=1)
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, "the server did not start"
                time.sleep(0.2)
        req = urllib.request.Request(url + "/v1/jobs", data=json.dumps({"prompt": "a", "steps": 150}).encode(), headers={"content-type": "application/json"})
        job = json.loads(urllib.request.urlopen(req).read())["id"]
        while json.loads(urllib.request.urlopen(f"{url}/v1/jobs/{job}").read())["step"] < 2:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "terminate called" not in out and "Traceback" not in out
    assert out.index("warmed up 48x32 in") < out.index("unfog serving on"), out  # --warmup runs before the server listens


def test_a_request_with_too_much_total_work_is_refused(api):
    r = api.post("/v1/jobs", json={"prompt": "a", "width": 2000, "height": 2000, "steps": 150, "num_images": 8})
    assert r.status_code == 422 and "megapixel-steps" in r.json()["error"] and r.json()["allowed"] == {"max_work": 200.0}
    assert api.post("/v1/jobs", json={"prompt": "a", "width": 64, "height": 64, "steps": 50}).status_code == 202


def test_unknown_paths_and_methods_answer_in_the_api_error_shape(api):
    r = api.get("/v1/nope")
    assert r.status_code == 404 and set(r.json()) == {"error", "field", "allowed"}
    r = api.put("/v1/health")
    assert r.status_code == 405 and "error" in r.json()
    r = api.get("/v1/images/generate")  # not an image named "generate"
    assert r.status_code == 405 and r.headers["allow"] == "POST" and "POST" in r.json()["error"]


def test_an_origin_must_match_scheme_and_host(api):
    assert api.get("/v1/health", headers={"origin": "evil://127.0.0.1:7860"}).status_code == 403
    assert api.get("/v1/health", headers={"origin": "https://127.0.0.1:7860"}).status_code == 200


def test_a_batch_too_many_pixels_in_all_is_refused(pipe):
    with client(pipe, max_batch_pixels=3 * 32 * 32) as c:
        r = c.post("/v1/jobs", json={"prompt": "a", "width": 32, "height": 32, "num_images": 4, "steps": 2})
        assert r.status_code == 422 and r.json()["field"] == "num_images" and r.json()["allowed"] == {"max_batch_pixels": 3072}
        assert c.post("/v1/jobs", json={"prompt": "a", "width": 32, "height": 32, "num_images": 3, "steps": 2}).status_code == 202


def test_a_preview_decodes_a_small_latent_whatever_the_image_size():
    """A 2048² job decoded its full-size x0 estimate every two steps just to show a 128-px thumbnail."""
    import torch

    from unfog.server.jobs import progress_event

    class Pipe:
        shapes = []
        vae_factor = 8

        def decode(self, x):
            self.shapes.append(tuple(x.shape))
            return [Image.new("RGB", (x.shape[-1] * 8, x.shape[-2] * 8))]

    pipe = Pipe()
    event = progress_event(pipe, 1, torch.randn(2, 4, 256, 192), total=10, preview_every=2)
    assert event["preview"].startswith("data:image/png;base64,")
    assert pipe.shapes == [(1, 4, 32, 24)]
    progress_event(pipe, 1, torch.randn(1, 4, 16, 8), total=10, preview_every=2)
    assert pipe.shapes[-1] == (1, 4, 16, 8)  # small latents are decoded as they are
    pipe.vae_factor = 1  # a pixel-space model: its 64² image is not shrunk below the thumbnail
    progress_event(pipe, 1, torch.randn(1, 3, 64, 64), total=10, preview_every=2)
    assert pipe.shapes[-1] == (1, 3, 64, 64)


def test_the_server_bounds_request_headers(pipe):
    """uvicorn's default parser (httptools) took endless headers and grew the server's memory;
    with server_options it closes such a connection, and keeps serving others."""
    import socket
    import urllib.request

    uvicorn = pytest.importorskip("uvicorn")
    from unfog.server import server_options

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = ServerSettings(port=port, head_timeout_s=1.0)
    server = uvicorn.Server(uvicorn.Config(create_app(pipe, settings, model_name="tiny"), host="127.0.0.1", port=port, log_level="warning",
                                           **server_options(settings)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 30
        while not server.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.05)
        sent = 0
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            try:
                for i in range(64):  # 64 MB if nothing stops it
                    s.sendall(b"X-%d: " % i + b"a" * 1_000_000 + b"\r\n")
                    sent += 1
                reply = s.recv(100)
            except OSError:  # closed on us mid-send
                reply = b""
        assert sent < 32 and (reply == b"" or reply.startswith(b"HTTP/1.1 4")), (sent, reply)  # stopped far short of 64 MB (kernel buffers take a few)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/health", timeout=10) as r:
            assert r.status == 200
        # Headers trickled, or nothing sent at all: closed once the head is head_timeout_s late,
        # while a request whose head came in time is served however long it takes.
        def trickle(sock, piece: bytes, times: int) -> None:  # a piece every 0.4 s, until the server hangs up
            for _ in range(times):
                time.sleep(0.4)
                try:
                    sock.sendall(piece)
                except OSError:
                    return

        with socket.create_connection(("127.0.0.1", port), timeout=10) as slow, socket.create_connection(("127.0.0.1", port), timeout=10) as mute:
            slow.sendall(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            start = time.time()
            trickle(slow, b"X-a: b\r\n", 3)

            def closed(sock) -> bool:  # the server ends the connection (after whatever it still had to send)
                try:
                    while sock.recv(4096):
                        pass
                    return True
                except ConnectionResetError:
                    return True
                except TimeoutError:
                    return False

            assert closed(slow) and closed(mute)
            assert time.time() - start < 8
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/health", timeout=10) as r:
            assert r.status == 200
        # Refused before its body was read (413 here), then kept alive a byte at a time: closed too.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 5000000\r\n\r\n")
            assert s.recv(12) == b"HTTP/1.1 413"
            start = time.time()
            trickle(s, b"{", 10)
            assert closed(s) and time.time() - start < 8
    finally:
        server.should_exit = True
        thread.join(30)


def test_head_answers_as_get_without_the_body(api):
    """HEAD on a GET route gets the GET's status and headers and no body (it had been a 405);
    on an event stream it returns at once; on a POST route it is still a 405."""
    for path in ("/", "/v1/health", "/v1/samplers"):
        got, head = api.get(path), api.head(path)
        assert head.status_code == got.status_code == 200, path
        assert head.content == b"" and head.headers["content-type"] == got.headers["content-type"], path
        assert head.headers["content-length"] == str(len(got.content)), path
    job_id = api.post("/v1/jobs", json={"prompt": "a red circle", "steps": 40, "seed": 1}).json()["id"]
    start = time.time()
    r = api.head(f"/v1/jobs/{job_id}/events")
    assert r.status_code == 200 and r.content == b"" and r.headers["content-type"].startswith("text/event-stream")
    assert time.time() - start < 10
    wait_done(api, job_id)
    r = api.head("/v1/images/generate")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert api.head("/v1/nope").status_code == 404


def test_host_names_are_case_blind_and_ipv6_hosts_are_bracketed(pipe):
    """A server bound to an IPv6 address refused every request (the Host header brackets it), and
    an upper-case Host was refused."""
    with client(pipe, host="fe80::1", token="t") as c:
        auth = {"authorization": "Bearer t"}
        assert c.get("/v1/health", headers={"host": "[fe80::1]:7860", **auth}).status_code == 200
        assert c.get("/v1/health", headers={"host": "[FE80::1]", **auth}).status_code == 200
        r = c.get("/v1/health", headers={"host": "evil.example:7860", **auth})
        assert r.status_code == 403 and "address it as [fe80::1]" in r.json()["error"]
    with client(pipe) as c:
        assert c.get("/v1/health", headers={"host": "LOCALHOST:7860"}).status_code == 200
