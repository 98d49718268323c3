"""The HTTP API driven through raw ASGI, where a test client cannot reach: event streams that stay
open or whose client leaves at a chosen moment, HEAD answers' body bytes, bodies that stall or stop."""

import asyncio
import contextlib
import json
import time

import pytest

pytest.importorskip("fastapi")

from conftest import tiny_pipeline  # noqa: E402
from unfog.server import ServerSettings, create_app  # noqa: E402


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def raw_scope(path: str, method: str = "GET", headers: tuple = ()) -> dict:
    """An HTTP request's ASGI scope, addressed to the server's own name."""
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http", "path": path,
            "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": [(b"host", b"127.0.0.1:7860"), *headers],
            "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 7860)}


def request_then_leave(leave: asyncio.Event):
    """An ASGI receive: an empty request once, then a disconnect when `leave` is set."""
    requested = False

    async def receive():
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await leave.wait()
        return {"type": "http.disconnect"}

    return receive


@contextlib.contextmanager
def running_job(pipe, **settings):
    """(app, job): an app with one long job submitted, cancelled at the end."""
    app = create_app(pipe, ServerSettings(**settings), model_name="tiny")
    jobs = app.state.jobs
    job, _ = jobs.submit(pipe.request("a red circle", num_inference_steps=150, seed=0), {"steps": 150})
    try:
        yield app, job
    finally:
        jobs.cancel(job.id)
        jobs.wait(job, 30)


def test_event_streams_are_capped_per_job_and_freed_on_close(pipe):
    """A stream stays open while another is asked for."""

    async def open_stream(app, job, leave: asyncio.Event):
        sent, started = [], asyncio.Event()
        receive = request_then_leave(leave)

        async def send(message):
            sent.append(message)
            if message["type"] == "http.response.body" and message.get("body"):
                started.set()
            if message["type"] == "http.response.start" and message["status"] != 200:
                started.set()

        task = asyncio.create_task(app(raw_scope(f"/v1/jobs/{job.id}/events"), receive, send))
        await asyncio.wait_for(started.wait(), timeout=30)
        return task, sent[0]["status"]

    async def scenario(app, job):
        leave_first, leave_now = asyncio.Event(), asyncio.Event()
        leave_now.set()
        first, status = await open_stream(app, job, leave_first)
        assert status == 200  # open, and its first event pushed
        second, status = await open_stream(app, job, leave_now)
        assert status == 429
        await second
        leave_first.set()
        await asyncio.wait_for(first, timeout=30)  # the client left: its slot is given back
        third, status = await open_stream(app, job, leave_now)
        assert status == 200
        await asyncio.wait_for(third, timeout=30)

    with running_job(pipe, max_streams_per_job=1) as (app, job):
        asyncio.run(scenario(app, job))


def _raw_post(app, receive):
    """POST /v1/jobs through the app with a hand-made `receive`: (status, body)."""
    scope = raw_scope("/v1/jobs", "POST", ((b"content-type", b"application/json"), (b"content-length", b"100")))
    sent = []

    async def send(message):
        sent.append(message)

    asyncio.run(asyncio.wait_for(app(scope, receive, send), 30))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))


def test_a_body_that_stalls_is_refused_after_the_body_timeout(pipe):
    app = create_app(pipe, ServerSettings(body_timeout_s=0.5), model_name="tiny")
    parts = iter([{"type": "http.request", "body": b'{"prompt": ', "more_body": True}])

    async def receive():
        try:
            return next(parts)
        except StopIteration:
            await asyncio.sleep(3600)  # the rest never comes

    start = time.time()
    status, body = _raw_post(app, receive)
    assert status == 408 and "did not arrive within 0.5 s" in body["error"] and time.time() - start < 10


def test_a_client_that_leaves_mid_body_gets_a_quiet_400(pipe, caplog):
    app = create_app(pipe, ServerSettings(), model_name="tiny")
    parts = iter([{"type": "http.request", "body": b'{"pr', "more_body": True}, {"type": "http.disconnect"}])

    async def receive():
        return next(parts)

    status, body = _raw_post(app, receive)
    assert status == 400 and "disconnected" in body["error"]
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


def test_head_sends_no_body_bytes_and_frees_an_event_stream(pipe):
    """A test client drops a HEAD answer's body by itself: here the app must send no body bytes,
    and a HEAD on a running job's event stream ends at once and gives its stream slot back."""

    async def call(app, method, path, stay):
        """The messages the app sends. The client stays until the response is complete, as a server
        reports it (stay), or leaves once the first body message has come."""
        sent, left = [], asyncio.Event()
        receive = request_then_leave(left)

        async def send(message):
            sent.append(message)
            if message["type"] == "http.response.body" and not (stay and message.get("more_body", False)):
                left.set()

        await asyncio.wait_for(app(raw_scope(path, method), receive, send), timeout=30)
        return sent

    async def scenario(app, job):
        events = f"/v1/jobs/{job.id}/events"
        for path in ("/v1/health", events):
            sent = await call(app, "HEAD", path, stay=True)
            assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200, path
            assert all(not m.get("body") for m in sent[1:]) and not sent[-1].get("more_body", False), path
        assert job.state in ("queued", "running")  # the HEAD above ended while its job still runs
        sent = await call(app, "GET", events, stay=False)  # one stream per job: the HEAD gave its slot back
        assert sent[0]["status"] == 200 and b"data: " in sent[1]["body"]

    with running_job(pipe, max_streams_per_job=1) as (app, job):
        asyncio.run(scenario(app, job))


def test_a_client_gone_before_its_stream_starts_gives_the_slot_back(pipe):
    """The slot was given back by the event generator's `finally`, which never runs for a
    generator that never started: clients that left at once used up a job's streams for good."""

    async def gone_at_once(app, job):
        """The status the app answers, to a client whose connection fails at the first body write."""
        statuses, messages = [], iter([{"type": "http.request", "body": b"", "more_body": False}])

        async def receive():
            return next(messages, {"type": "http.disconnect"})

        async def send(message):
            if message["type"] == "http.response.body":
                raise OSError("the client is gone")  # as a server's send fails on a closed connection
            statuses.append(message["status"])

        with contextlib.suppress(OSError):
            await asyncio.wait_for(app(raw_scope(f"/v1/jobs/{job.id}/events"), receive, send), timeout=30)
        return statuses[0]

    async def scenario(app, job):
        return [await gone_at_once(app, job) for _ in range(4)]

    with running_job(pipe, max_streams_per_job=1) as (app, job):
        assert asyncio.run(scenario(app, job)) == [200] * 4  # each one's slot came back for the next
