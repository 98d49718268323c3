"""The HTTP API and web page (FastAPI). One model, loaded once; one worker owns the device."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..errors import UnfogError
from ..request import GenerationRequest
from ..samplers import SAMPLERS
from .jobs import JobQueue, QueueFull, Unavailable

STATIC = Path(__file__).parent / "static"


@dataclass
class ServerSettings:
    """Every limit the server enforces, in one place (flags of `unfog serve` change them)."""

    host: str = "127.0.0.1"
    port: int = 7860
    token: str | None = None
    max_queue: int = 16
    job_timeout_s: float = 600.0
    max_side: int = 2048
    max_pixels: int = 4_000_000  # 4 megapixels
    max_steps: int = 150
    max_images: int = 8
    max_guidance: float = 30.0
    max_prompt_chars: int = 2000
    max_body_bytes: int = 1024 * 1024
    body_timeout_s: float = 30.0  # a request body not fully sent by then is refused (408)
    max_header_bytes: int = 64 * 1024  # a request's line and headers together
    head_timeout_s: float = 30.0  # a request's line and headers not all sent by then: the connection is closed
    max_connections: int = 256  # open at once; more get 503 (uvicorn's limit_concurrency)
    # The U-Net runs a request's images as one batch, and self-attention's cost grows with the
    # square of the pixels: images × width × height is bounded too (8 × 1024² by default).
    max_batch_pixels: int = 8 * 1024 * 1024
    sync_timeout_s: float = 600.0
    preview_every: int = 2
    prompt_syntax: str = "a1111"  # prompts are read in A1111's syntax unless a request says "plain"
    lora_dir: str | None = None  # where <lora:NAME:w> tags find NAME.safetensors (None: tags are refused)
    # A request's total work, megapixels × steps × images: one at the size and step limits would
    # hold the only worker for many minutes. 200 is e.g. four 1024² images at 50 steps.
    max_work: float = 200.0
    max_streams_per_job: int = 8  # open event streams per job (per job, not per address: clients behind one proxy share one)

    def __post_init__(self):
        positive = ("max_queue", "max_side", "max_pixels", "max_steps", "max_images", "max_prompt_chars", "max_body_bytes", "max_streams_per_job",
                    "max_header_bytes", "max_connections", "max_batch_pixels")
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise UnfogError(f"server setting {name} must be a positive integer, got {v!r}")
        for name in ("job_timeout_s", "sync_timeout_s", "body_timeout_s", "head_timeout_s", "max_guidance", "max_work"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v < float("inf"):
                raise UnfogError(f"server setting {name} must be a positive number, got {v!r}")
        if not isinstance(self.preview_every, int) or isinstance(self.preview_every, bool) or self.preview_every < 0:
            raise UnfogError(f"server setting preview_every must be 0 (no previews) or a positive integer, got {self.preview_every!r}")


def server_options(s: ServerSettings) -> dict[str, Any]:
    """uvicorn's settings for these limits: h11, which bounds a request's headers (httptools does
    not: a client sending endless headers grew the server's memory without end), with a deadline
    for them (uvicorn has none: connections that trickle headers, or send nothing, stayed open
    for ever and could take every slot), and a cap on open connections."""
    return {"http": _head_deadline_protocol(s.head_timeout_s), "h11_max_incomplete_event_size": s.max_header_bytes,
            "limit_concurrency": s.max_connections, "timeout_keep_alive": 5}


def _head_deadline_protocol(seconds: float):
    """uvicorn's h11 protocol, closing a connection whose request line and headers have not all
    arrived `seconds` after they became due (on connecting, or on the first byte of the next
    request). Once a request's head is in, its body (body_timeout_s) and a long answer such as an
    event stream are not limited by this."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadDeadline(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._head_due = self.loop.time()  # when the pending request's head became due (None: none pending)
            self._answered_unread = None  # when a response went out before its request's body was read
            self._head_timer = self.loop.call_later(min(seconds, 1.0), self._check_head)

        def data_received(self, data: bytes) -> None:
            if self._head_due is None and self.conn.their_state is h11.IDLE:
                self._head_due = self.loop.time()
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._head_due = None

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.conn.their_state is h11.SEND_BODY:  # refused before its body was read (413, 408, 401…): nothing more is wanted
                self._answered_unread = self.loop.time()

        def _check_head(self) -> None:
            if self.transport.is_closing():
                return
            now = self.loop.time()
            late_head = self._head_due is not None and self.conn.their_state is h11.IDLE and now - self._head_due >= seconds
            if late_head or (self._answered_unread is not None and now - self._answered_unread >= seconds):
                self.transport.close()
                return
            self._head_timer = self.loop.call_later(min(seconds, 1.0), self._check_head)

        def connection_lost(self, exc) -> None:
            self._head_timer.cancel()
            super().connection_lost(exc)

    return HeadDeadline


class Refused(Exception):
    def __init__(self, status: int, error: str, field: str | None = None, allowed: Any = None, headers: dict | None = None):
        self.status, self.body, self.headers = status, {"error": error, "field": field, "allowed": allowed}, headers or {}

    @classmethod
    def invalid(cls, e: UnfogError) -> "Refused":
        """A request the library refused: a 422 naming the field by its API name."""
        return cls(422, str(e), API_NAMES.get(e.field, e.field))


# The API's field names and the generation request's, where they differ.
FIELDS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "steps": "num_inference_steps", "guidance_scale": "guidance_scale",
          "sampler": "sampler", "seed": "seed", "width": "width", "height": "height", "num_images": "num_images_per_prompt",
          "prompt_2": "prompt_2", "negative_prompt_2": "negative_prompt_2",  # SDXL models only
          "prompt_syntax": "prompt_syntax"}
API_NAMES = {v: k for k, v in FIELDS.items()}


def _allowed(s: ServerSettings, factor: int) -> dict[str, Any]:
    """What each field accepts, reported with every refusal of it."""
    side = {"multiple_of": factor, "max": s.max_side, "max_pixels": s.max_pixels}
    return {"prompt": [1, s.max_prompt_chars], "negative_prompt": [0, s.max_prompt_chars], "prompt_2": [0, s.max_prompt_chars],
            "negative_prompt_2": [0, s.max_prompt_chars], "steps": [1, s.max_steps],
            "guidance_scale": [0, s.max_guidance], "sampler": sorted(SAMPLERS), "seed": [0, 2**63 - 1 - s.max_images],
            "width": side, "height": side, "num_images": [1, s.max_images]}


def _limits(body: dict, s: ServerSettings) -> None:
    """The server's own bounds, checked on the raw values before anything is built from them
    (a type error is left to the request, which names it)."""
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    checks = [
        ("prompt", not isinstance(body.get("prompt"), str) or not body["prompt"].strip() or len(body["prompt"]) > s.max_prompt_chars,
         f"prompt must be a non-empty string of at most {s.max_prompt_chars} characters"),
        ("negative_prompt", body.get("negative_prompt") is not None and (not isinstance(body["negative_prompt"], str) or len(body["negative_prompt"]) > s.max_prompt_chars),
         f"negative_prompt must be a string of at most {s.max_prompt_chars} characters"),
        *((name, body.get(name) is not None and (not isinstance(body[name], str) or len(body[name]) > s.max_prompt_chars),
           f"{name} must be a string of at most {s.max_prompt_chars} characters") for name in ("prompt_2", "negative_prompt_2")),
        ("steps", number(body.get("steps")) and body["steps"] > s.max_steps, f"steps must be at most {s.max_steps}"),
        ("num_images", number(body.get("num_images")) and body["num_images"] > s.max_images, f"num_images must be at most {s.max_images}"),
        ("width", number(body.get("width")) and body["width"] > s.max_side, f"width must be at most {s.max_side}"),
        ("height", number(body.get("height")) and body["height"] > s.max_side, f"height must be at most {s.max_side}"),
        ("guidance_scale", number(body.get("guidance_scale")) and not 0 <= body["guidance_scale"] <= s.max_guidance,
         f"guidance_scale must be a finite number from 0 to {s.max_guidance}"),
        ("seed", body.get("seed") is not None and not (isinstance(body["seed"], int) and not isinstance(body["seed"], bool) and -1 <= body["seed"] < 2**63 - s.max_images),
         f"seed must be an integer from 0 to 2^63 - {s.max_images + 1}, or -1/null for a random one"),
    ]
    for name, failed, message in checks:
        if failed:
            raise Refused(422, f"{message}, got {body.get(name)!r}"[:300], name)


def validate(body: Any, pipe, s: ServerSettings) -> GenerationRequest:
    """The request body as the pipeline's own GenerationRequest, or a Refused naming the field
    and what it accepts. Types and model constraints are the request's to check; this adds only
    the server's limits."""
    allowed = _allowed(s, pipe.downsample_factor)
    try:
        if not isinstance(body, dict):
            raise Refused(422, "the body must be a JSON object")
        extra = sorted(set(body) - set(FIELDS))
        if extra:
            raise Refused(422, f"unknown fields {extra}", extra[0], sorted(FIELDS))
        _limits(body, s)
        options = {"prompt_syntax": s.prompt_syntax, **{FIELDS[k]: v for k, v in body.items()}}
        if options["prompt_syntax"] == "a1111":
            options["lora_dir"] = s.lora_dir
        if options.get("seed") in (None, -1):
            options["seed"] = random.SystemRandom().randrange(2**32)
        try:
            request = pipe.request(**options)
        except UnfogError as e:
            raise Refused.invalid(e) from None
        if request.width * request.height > s.max_pixels:
            raise Refused(422, f"width × height must be at most {s.max_pixels} pixels, got {request.width * request.height}", "width")
        work = request.width * request.height / 1e6 * request.num_inference_steps * request.batch
        if work > s.max_work:
            raise Refused(422, f"this request is {work:.0f} megapixel-steps (width × height × steps × images); the server takes at most "
                               f"{s.max_work:g}: fewer steps, images or pixels", "steps", {"max_work": s.max_work})
        if request.width * request.height * request.batch > s.max_batch_pixels:
            raise Refused(422, f"num_images × width × height must be at most {s.max_batch_pixels} pixels, got "
                               f"{request.width * request.height * request.batch}: fewer images or pixels", "num_images",
                          {"max_batch_pixels": s.max_batch_pixels})
        return request
    except Refused as r:
        if r.body["field"] in allowed and r.body["allowed"] is None:
            r.body["allowed"] = allowed[r.body["field"]]
        raise


def public_params(r: GenerationRequest) -> dict:
    """A request as the API shows it back (and writes into each PNG)."""
    return {"prompt": r.prompts[0], "negative_prompt": r.negative_prompts[0], "steps": r.num_inference_steps, "guidance_scale": r.guidance_scale,
            "sampler": r.sampler, "seed": r.seeds[0], "width": r.width, "height": r.height, "num_images": r.batch}


def create_app(pipe, settings: ServerSettings | None = None, *, model_name: str = "default", jobs=None) -> FastAPI:
    """The FastAPI app serving `pipe`: the guard on every request, the job API and the page.
    `jobs` is where jobs run: by default one worker thread in this process (JobQueue); the Ray
    deployment passes a registry shared by every ingress and model replica."""
    s = settings or ServerSettings()
    if pipe.is_inpainting_model:
        raise UnfogError("unfog serve serves text-to-image models; this is an inpainting model, which needs an image and a mask for every request")
    if jobs is None:
        jobs = JobQueue(pipe, model_name=model_name, max_queue=s.max_queue, job_timeout_s=s.job_timeout_s, preview_every=s.preview_every)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(jobs.shutdown)  # Ctrl-C / SIGTERM: finish cleanly, never abort mid-step

    app = FastAPI(title="unfog", description="Text-to-image diffusion: an HTTP API with a job queue and live progress.", version="1", lifespan=lifespan)
    app.state.jobs, app.state.settings = jobs, s
    _add_guard(app, s)

    @app.exception_handler(Refused)
    async def refused(request: Request, r: Refused):
        return JSONResponse(r.body, status_code=r.status, headers=r.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):  # unknown paths, wrong methods: the API's error shape too
        return await refused(request, Refused(e.status_code, str(e.detail), headers=getattr(e, "headers", None)))

    _add_job_routes(app, jobs, pipe, s)
    _add_info_routes(app, jobs, pipe, s, model_name)
    return app


def _add_guard(app: FastAPI, s: ServerSettings) -> None:
    """Host, Origin, token and declared body size, checked before any route runs, as a plain ASGI
    middleware: it hands the request's own `receive` on, so a route still sees the client leave
    (Starlette's @app.middleware("http") wrapper hides that disconnect)."""
    loopback = {"127.0.0.1", "localhost", "[::1]"}
    name = f"[{s.host}]" if ":" in s.host else s.host  # an IPv6 address is bracketed in a Host header and a URL
    own = loopback | {name.lower()}

    def refusal(request: Request) -> Refused | None:
        # DNS rebinding: the Host must be one of this server's own names.
        host_header = request.headers.get("host", "")
        host = (host_header.rsplit(":", 1)[0] if not host_header.startswith("[") else host_header.split("]")[0] + "]").lower()  # names are case-blind
        if s.host not in ("0.0.0.0", "::") and host not in own:
            return Refused(403, f"Host {host!r} is not this server's; address it as {name}")
        # Cross-site requests: a browser's Origin must be this server itself.
        origin = request.headers.get("origin")
        if origin is not None and origin not in (f"http://{host_header}", f"https://{host_header}"):
            return Refused(403, f"cross-origin request from {origin!r} refused")
        if request.url.path.startswith("/v1/") and s.token is not None:
            sent = request.headers.get("authorization", "")
            if not secrets.compare_digest(sent.encode(), f"Bearer {s.token}".encode()):
                return Refused(401, "missing or wrong token: send Authorization: Bearer <token>", headers={"WWW-Authenticate": "Bearer"})
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > s.max_body_bytes):
            return Refused(413, f"request body larger than {s.max_body_bytes} bytes", allowed=s.max_body_bytes)
        return None

    class Guard:
        def __init__(self, inner):
            self.inner = inner

        async def __call__(self, scope, receive, send):
            if scope["type"] == "http":
                if scope["method"] == "HEAD":  # answered as GET without the body (RFC 9110 §9.3.2)
                    scope, send = dict(scope, method="GET"), _headers_only(send)
                r = refusal(Request(scope))
                if r is not None:
                    await JSONResponse(r.body, status_code=r.status, headers=r.headers)(scope, receive, send)
                    return
            await self.inner(scope, receive, send)

    app.add_middleware(Guard)


def _headers_only(send):
    """An ASGI send that passes the response's start (status and headers, Content-Length included)
    and ends the response where its body would begin; what the route sends after that (the rest
    of an event stream) is dropped, and the finished response lets the route see the client go."""
    ended = False

    async def headers_only(message):
        nonlocal ended
        if ended:
            return
        if message["type"] == "http.response.body":
            ended = True
            message = {"type": "http.response.body", "body": b"", "more_body": False}
        await send(message)

    return headers_only


async def _body_json(request: Request, s: ServerSettings) -> Any:
    """The JSON body, read in pieces that stop at the limit (a chunked body has no Content-Length)
    and within body_timeout_s (a client that stalls mid-body is not waited for forever)."""
    raw = bytearray()

    async def read():
        async for piece in request.stream():
            raw.extend(piece)
            if len(raw) > s.max_body_bytes:
                raise Refused(413, f"request body larger than {s.max_body_bytes} bytes", allowed=s.max_body_bytes)

    try:
        await asyncio.wait_for(read(), s.body_timeout_s)
    except asyncio.TimeoutError:
        raise Refused(408, f"the request body did not arrive within {s.body_timeout_s:g} s") from None
    except ClientDisconnect:  # the client left mid-body: nobody reads the answer, and it is no server error
        raise Refused(400, "the client disconnected before sending the whole body") from None
    try:
        return json.loads(bytes(raw))
    except (ValueError, RecursionError):  # bad JSON, bad UTF-8, absurd nesting or digit counts
        raise Refused(400, "the body is not valid JSON") from None


def _add_job_routes(app: FastAPI, jobs: JobQueue, pipe, s: ServerSettings) -> None:
    async def submit(request: Request):
        gen = validate(await _body_json(request, s), pipe, s)
        try:
            return await asyncio.to_thread(jobs.submit, gen, public_params(gen))  # a remote registry blocks: not on the event loop
        except QueueFull:
            raise Refused(429, f"the queue is full ({s.max_queue} jobs); retry later", headers={"Retry-After": "5"}) from None
        except Unavailable as e:
            raise Refused(503, str(e), headers={"Retry-After": "30"}) from None
        except UnfogError as e:  # found while preparing the job (the Ray ingress frames the prompt's token windows)
            raise Refused.invalid(e) from None

    @app.post("/v1/jobs", status_code=202)
    async def create_job(request: Request):
        job, position = await submit(request)
        return JSONResponse({"id": job.id, "state": job.state, "queue_position": position, "url": f"/v1/jobs/{job.id}"}, status_code=202)

    @app.get("/v1/jobs/{job_id}")
    def job_status(job_id: str):
        status = jobs.status(job_id)
        if status is None:
            raise Refused(404, f"no job {job_id!r}", "id")
        return status

    @app.delete("/v1/jobs/{job_id}")
    def cancel_job(job_id: str):
        status = jobs.cancel_job(job_id)
        if status is None:
            raise Refused(404, f"no job {job_id!r}", "id")
        return status

    streams: dict[str, int] = {}  # open event streams per job

    @app.get("/v1/jobs/{job_id}/events")
    async def job_events(job_id: str, request: Request):
        if await asyncio.to_thread(jobs.status, job_id) is None:
            raise Refused(404, f"no job {job_id!r}", "id")
        if streams.get(job_id, 0) >= s.max_streams_per_job:
            raise Refused(429, f"at most {s.max_streams_per_job} open event streams per job; close one", headers={"Retry-After": "5"})
        streams[job_id] = streams.get(job_id, 0) + 1

        def release():
            streams[job_id] -= 1
            if not streams[job_id]:
                del streams[job_id]

        return _HeldStream(release, _event_stream(jobs, job_id, request), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/v1/images/generate", include_in_schema=False)
    def generate_is_a_post():  # else /v1/images/{name} takes it and answers "no such image"
        raise Refused(405, "POST a JSON body to /v1/images/generate", headers={"Allow": "POST"})

    @app.post("/v1/images/generate", responses={200: {"content": {"image/png": {}}}})
    async def generate(request: Request):
        """Synchronous convenience call: waits for the job and returns its first PNG."""
        job, _ = await submit(request)
        deadline = asyncio.get_running_loop().time() + s.sync_timeout_s
        while not await asyncio.to_thread(jobs.wait_id, job.id, 0.5):
            if await request.is_disconnected() or asyncio.get_running_loop().time() > deadline:
                await asyncio.to_thread(jobs.cancel_job, job.id)  # nobody will read the result
                raise Refused(504, f"the job did not finish within {s.sync_timeout_s:.0f} s")
        status = await asyncio.to_thread(jobs.status, job.id)
        if status["state"] != "done":
            raise Refused(500 if status["state"] == "failed" else 409, f"job {status['state']}: {status['error']}")
        data = await asyncio.to_thread(jobs.image, status["images"][0].rsplit("/", 1)[-1])
        return Response(data, media_type="image/png", headers={"X-Seeds": ",".join(map(str, status["seeds"]))})


class _HeldStream(StreamingResponse):
    """A streaming response holding a slot (an event stream of a job) that it gives back however
    the response ends, also when the client left before the stream's first event: the
    generator's own `finally` would not run for a generator that never started."""

    def __init__(self, release, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.release = release

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()


async def _event_stream(jobs, job_id: str, request: Request):
    """A job's events as server-sent events, pushed as they are recorded (a 1 s wake-up only to
    notice a client that has gone)."""
    sent = 0
    while True:
        events, finished = await jobs.next_events(job_id, sent, 1.0)
        for e in events:
            yield f"event: {e['type']}\ndata: {json.dumps(e)}\n\n"
        sent += len(events)
        if finished or await request.is_disconnected():
            return


def _add_info_routes(app: FastAPI, jobs: JobQueue, pipe, s: ServerSettings, model_name: str) -> None:
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page():
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @app.get("/v1/images/{name}")
    def image(name: str):
        data = jobs.image(name)  # only names the server made exist here; nothing touches the filesystem
        if data is None:
            raise Refused(404, "no such image", "name")
        return Response(data, media_type="image/png")

    @app.get("/v1/health")
    def health():
        return {"status": "ok", "queued": jobs.queued(), "device": str(pipe.device)}

    @app.get("/v1/models")
    def models():
        return {"models": [{"name": model_name, "defaults": asdict(pipe.defaults), "downsample_factor": pipe.downsample_factor}]}

    @app.get("/v1/samplers")
    def samplers():
        return {"samplers": sorted(SAMPLERS), "default": pipe.defaults.sampler}

    @app.get("/v1/limits")
    def limits():
        return {k: v for k, v in asdict(s).items() if k not in ("token",)}
