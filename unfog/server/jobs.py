"""The job queue: a bounded queue and one worker thread that owns the pipeline (and so the
device). Jobs report progress as events; a cancelled or timed-out job stops at its next step."""

from __future__ import annotations

import base64
import contextlib
import io
import queue
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from ..images import save
from ..pipeline import Interrupted
from ..request import png_text


class JobStopped(Exception):
    """Raised inside the pipeline's step callback to stop a job (cancelled or timed out)."""


class QueueFull(Exception):
    pass


class Unavailable(Exception):
    """No job can be taken now (draining, or no model replica left); the message says why."""


@dataclass
class Job:
    id: str
    params: dict[str, Any]  # the request as the API shows it
    request: Any = None  # the pipeline's GenerationRequest
    state: str = "queued"  # queued, running, done, failed, cancelled
    step: int = 0
    total: int = 0
    images: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    error: str | None = None
    created: float = field(default_factory=time.time)
    events: list[dict] = field(default_factory=list)
    cancel_requested: bool = False

    def public(self, position: int | None = None) -> dict:
        d = {"id": self.id, "state": self.state, "step": self.step, "total": self.total, "seeds": self.seeds,
             "images": [f"/v1/images/{n}" for n in self.images], "error": self.error, "params": self.params}
        if position is not None:
            d["queue_position"] = position
        return d


def png_bytes(image: Image.Image, text: dict[str, str] | None = None) -> bytes:
    """PNG with the generation parameters in its text chunks."""
    buf = io.BytesIO()
    save(image, buf, text, format="PNG")
    return buf.getvalue()


class JobQueue:
    def __init__(self, pipe, *, model_name: str, max_queue: int = 16, job_timeout_s: float = 600, preview_every: int = 2, keep_images: int = 256, keep_jobs: int = 512):
        self.pipe, self.model_name = pipe, model_name
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self.jobs: dict[str, Job] = {}
        self.images: OrderedDict[str, bytes] = OrderedDict()
        self.keep_images, self.keep_jobs, self.job_timeout_s, self.preview_every = keep_images, keep_jobs, job_timeout_s, preview_every
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.stopping = threading.Event()
        # Event-stream readers waiting on a job: (their event loop, their asyncio.Event), woken on each event.
        self.listeners: dict[str, set[tuple[Any, Any]]] = {}
        self.worker = threading.Thread(target=self._work, name="unfog-worker", daemon=True)
        self.worker.start()

    # ---- called from request handlers -----------------------------------------------------

    def submit(self, request, params: dict) -> tuple[Job, int]:
        job = Job(id=uuid.uuid4().hex, params=params, request=request, total=params["steps"])
        with self.lock:
            try:
                self.queue.put_nowait(job)
            except queue.Full:
                raise QueueFull() from None
            self.jobs[job.id] = job
            return job, self.queue.qsize()

    def position(self, job: Job) -> int | None:
        if job.state != "queued":
            return None
        with self.lock:
            return sum(1 for j in list(self.queue.queue) if j.created <= job.created)

    def cancel(self, job_id: str) -> Job | None:
        with self.lock:
            job = self.jobs.get(job_id)
            if job is None:
                return None
            if job.state == "queued":
                job.state = "cancelled"
                with self.queue.mutex:  # free its slot now, not when the worker reaches it
                    try:
                        self.queue.queue.remove(job)
                        self.queue.not_full.notify()
                    except ValueError:
                        pass
                self._event(job, {"type": "cancelled"})
            elif job.state == "running":
                job.cancel_requested = True
            return job

    def listen(self, job_id: str, waiter, loop) -> None:
        """Wake `waiter` (an asyncio.Event of `loop`) whenever the job records an event."""
        with self.lock:
            self.listeners.setdefault(job_id, set()).add((loop, waiter))

    def unlisten(self, job_id: str, waiter, loop) -> None:
        with self.lock:
            entries = self.listeners.get(job_id, set())
            entries.discard((loop, waiter))
            if not entries:
                self.listeners.pop(job_id, None)

    def wait(self, job: Job, timeout: float) -> bool:
        deadline = time.time() + timeout
        with self.changed:
            while job.state in ("queued", "running"):
                left = deadline - time.time()
                if left <= 0:
                    return False
                self.changed.wait(left)
        return True

    # ---- the interface the app's routes use (a Ray deployment provides the same) ------------

    def status(self, job_id: str) -> dict | None:
        job = self.jobs.get(job_id)
        return None if job is None else job.public(self.position(job))

    def cancel_job(self, job_id: str) -> dict | None:
        job = self.cancel(job_id)
        return None if job is None else job.public()

    def wait_id(self, job_id: str, timeout: float) -> bool:
        job = self.jobs.get(job_id)
        return True if job is None else self.wait(job, timeout)

    def image(self, name: str) -> bytes | None:
        return self.images.get(name)

    def queued(self) -> int:
        return self.queue.qsize()

    async def next_events(self, job_id: str, since: int, timeout: float) -> tuple[list[dict], bool]:
        """The job's events from index `since` (waiting up to `timeout` for one), and whether
        the job has finished with all its events in the list."""
        import asyncio

        job = self.jobs.get(job_id)
        if job is None:
            return [], True
        loop, waiter = asyncio.get_running_loop(), asyncio.Event()
        self.listen(job_id, waiter, loop)
        try:
            if len(job.events) <= since and job.state in ("queued", "running"):
                try:
                    await asyncio.wait_for(waiter.wait(), timeout)
                except asyncio.TimeoutError:
                    pass
            events = job.events[since:]
            return events, job.state not in ("queued", "running") and since + len(events) >= len(job.events)
        finally:
            self.unlisten(job_id, waiter, loop)

    # ---- the worker -----------------------------------------------------------------------

    def _event(self, job: Job, event: dict) -> None:
        """Record an event; callers hold self.lock. A finished job keeps only its last preview
        (the rest were for watching it run), and the oldest finished jobs are forgotten."""
        record_event(self.jobs, job, event, self.keep_jobs)
        for loop, waiter in self.listeners.get(job.id, ()):
            loop.call_soon_threadsafe(waiter.set)
        self.changed.notify_all()

    def shutdown(self, timeout: float = 60.0) -> None:
        """Stop: cancel the queued jobs, stop the running one at its next step, and wait for the
        worker, so the process never exits with the worker inside a torch call (which aborts it)."""
        self.stopping.set()
        with self.lock:
            for job in list(self.jobs.values()):
                if job.state == "running":
                    job.cancel_requested = True
                elif job.state == "queued":
                    job.state = "cancelled"
                    self._event(job, {"type": "cancelled"})
        self.worker.join(timeout)

    def _work(self) -> None:
        while not self.stopping.is_set():
            try:
                job = self.queue.get(timeout=0.2)
            except queue.Empty:
                continue
            with self.lock:
                if job.state == "cancelled":
                    continue
                job.state = "running"
                self._event(job, {"type": "started", "total": job.total})
            try:
                try:
                    self._run(job)
                except Interrupted:  # stopped inside a U-Net call: say why, as between steps
                    raise JobStopped("cancelled" if job.cancel_requested else f"timed out after {self.job_timeout_s:.0f} s") from None
            except JobStopped as e:
                with self.lock:
                    job.state, job.error = ("cancelled", None) if str(e) == "cancelled" else ("failed", str(e))
                    self._event(job, {"type": job.state, "error": job.error})
            except Exception as e:  # one job's failure (bad input, out of memory, NaN) must not stop the server
                with self.lock:
                    job.state, job.error = "failed", f"{type(e).__name__}: {e}"
                    self._event(job, {"type": "failed", "error": job.error})
            finally:
                self._free_memory()

    def _free_memory(self) -> None:
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _run(self, job: Job) -> None:
        start = time.time()

        def should_stop() -> bool:  # asked between U-Net blocks too: cancel acts within one block, not one step
            return job.cancel_requested or time.time() - start > self.job_timeout_s

        def progress(i, x0) -> None:
            if job.cancel_requested:
                raise JobStopped("cancelled")
            if time.time() - start > self.job_timeout_s:
                raise JobStopped(f"timed out after {self.job_timeout_s:.0f} s")
            self._progress(job, i, x0)

        pngs = run_job(self.pipe, job.request, self.model_name, progress, should_stop)
        names = []
        with self.lock:
            for data in pngs:
                name = f"{uuid.uuid4().hex}.png"
                self.images[name] = data
                while len(self.images) > self.keep_images:
                    self.images.popitem(last=False)
                names.append(name)
            job.images, job.seeds, job.state = names, job.request.seeds, "done"
            self._event(job, {"type": "done", "images": [f"/v1/images/{n}" for n in names], "seeds": job.seeds})

    def _progress(self, job: Job, i: int, x0) -> None:
        event = progress_event(self.pipe, i, x0, job.total, self.preview_every)
        with self.lock:
            job.step = i + 1
            self._event(job, event)


def record_event(jobs: dict[str, Job], job: Job, event: dict, keep_jobs: int) -> None:
    """Append a job's event. When it finishes, it keeps only its last preview (the rest were for
    watching it run), and the oldest finished jobs beyond `keep_jobs` are forgotten."""
    job.events.append(event)
    if event["type"] in ("done", "failed", "cancelled"):
        with_preview = [e for e in job.events if "preview" in e]
        for e in with_preview[:-1]:
            e.pop("preview")
        finished = [j for j in jobs.values() if j.state not in ("queued", "running")]
        for old in finished[: max(0, len(finished) - keep_jobs)]:
            jobs.pop(old.id, None)


def run_job(pipe, request, model_name: str, progress, should_stop) -> list[bytes]:
    """Run one generation request to PNG bytes: `progress(i, x0)` after each step (it may raise
    to stop), `should_stop()` asked inside U-Net calls. The local worker and the Ray replicas
    (unfog/server/ray_serve.py) both run jobs through this."""
    with pipe.prompt_loras(request):  # the prompt's <lora:…> tags, for this job only
        state = pipe.initial_state(request)
        with contextlib.closing(pipe.denoise(request, state, should_stop)) as steps:  # leaving early stops the sampler
            for step in steps:
                progress(step.index, step.x0)
    images = pipe.decode(state.x)
    return [png_bytes(image, png_text(request, k, model_name)) for k, image in enumerate(images)]


# A preview is a thumbnail: latents that decode to more than this many pixels per side are
# averaged down first, so that a 2048² job's preview costs a 256² decode, not a full-size one.
PREVIEW_SIDE = 256


def progress_event(pipe, i: int, x0, total: int, preview_every: int) -> dict:
    """A progress event, with a small preview of the predicted image every `preview_every` steps."""
    event = {"type": "progress", "step": i + 1, "total": total}
    if preview_every and ((i + 1) % preview_every == 0 or i + 1 == total):
        latent = x0[:1]
        h, w = latent.shape[-2:]
        side = max(1, PREVIEW_SIDE // pipe.vae_factor)  # in latent pixels
        if max(h, w) > side:
            import torch.nn.functional as F

            scale = side / max(h, w)
            latent = F.adaptive_avg_pool2d(latent, (max(1, round(h * scale)), max(1, round(w * scale))))
        preview = pipe.decode(latent)[0]
        preview.thumbnail((128, 128))
        event["preview"] = "data:image/png;base64," + base64.b64encode(png_bytes(preview)).decode()
    return event
