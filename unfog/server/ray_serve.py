"""`unfog serve --ray`: the same HTTP API and web page on Ray Serve, with N model replicas.

    ingress (Ray Serve deployment, the FastAPI app of app.py; any number of them)
        │  submit / status / cancel / events / images
        ▼
    Registry (one Ray actor): every job, its events and its finished images; the bounded queue
        ▲  claim / progress (answers "stop?") / finish / fail
        │
    Replica × N (Ray actors, one per GPU or a share of the CPUs): a Pipeline each, pulling jobs
        (up to --max-batch queued jobs of the same shape and settings at once, as one batch)

Any ingress answers for any job, because none of them holds one. A cancel sets a flag that the
replica running the job reads at its next step (and inside U-Net calls). The registry pings
the replicas every second: the job of a replica that died goes back to the head of the queue
once (its events say so), and fails with the reason the second time, so no job waits forever.
On SIGTERM `unfog serve --ray` stops taking jobs, lets the running ones finish, then stops.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict, deque

from ..errors import UnfogError
from .jobs import Job, JobStopped, progress_event, record_event, run_job

REGISTRY = "unfog-registry"
NAMESPACE = "unfog"


def _ray():
    try:
        import ray
        from ray import serve  # noqa: F401  (the serve extra of ray)
    except ImportError:
        raise UnfogError("unfog serve --ray needs Ray Serve: pip install 'unfog[ray]'") from None
    return ray


class Registry:
    """Every job, held in one place (a Ray actor, many calls at once: it blocks only in waits)."""

    def __init__(self, max_queue: int, retries: int = 1, keep_images: int = 256, keep_jobs: int = 512, ping_every_s: float = 1.0):
        self.max_queue, self.retries, self.keep_images, self.keep_jobs = max_queue, retries, keep_images, keep_jobs
        self.jobs: dict[str, Job] = {}
        self.pending: deque[str] = deque()
        self.images: OrderedDict[str, bytes] = OrderedDict()
        self.running: dict[str, str] = {}  # job id → replica name
        self.attempts: dict[str, int] = {}
        self.keys: dict[str, tuple | None] = {}  # job id → batch key (None: runs alone)
        self.replicas: dict[str, object] = {}  # name → actor handle (alive ones)
        self.draining = False
        self.changed = threading.Condition()
        self.ping_every_s = ping_every_s
        threading.Thread(target=self._watch, name="unfog-registry-watch", daemon=True).start()

    # ---- the ingress side -----------------------------------------------------------------

    def submit(self, request, params: dict, windows: tuple | None = None) -> tuple[str, int] | str:
        """(job id, queue position), or why not: "full", or a sentence (draining, no replica).
        `windows` (the prompts' text-window counts, from the ingress) joins the batch key."""
        with self.changed:
            if self.draining:
                return "the server is shutting down and takes no new jobs"
            if not self.replicas:
                return "no model replica is running; the operator must restart unfog serve --ray"
            if len(self.pending) >= self.max_queue:
                return "full"
            job = Job(id=uuid.uuid4().hex, params=params, request=request, total=params["steps"])
            key = batch_key(request)
            self.keys[job.id] = None if key is None or windows is None else key + tuple(windows)
            self.jobs[job.id] = job
            self.pending.append(job.id)
            self.changed.notify_all()
            return job.id, len(self.pending)

    def status(self, job_id: str) -> dict | None:
        with self.changed:
            job = self.jobs.get(job_id)
            if job is None:
                return None
            position = self.pending.index(job_id) + 1 if job.state == "queued" and job_id in self.pending else None
            return job.public(position)

    def cancel_job(self, job_id: str) -> dict | None:
        with self.changed:
            job = self.jobs.get(job_id)
            if job is None:
                return None
            if job.state == "queued":
                if job_id in self.pending:
                    self.pending.remove(job_id)
                job.state = "cancelled"
                self._event(job, {"type": "cancelled"})
            elif job.state == "running":
                job.cancel_requested = True  # the replica running it stops at its next step
            return job.public()

    def wait_id(self, job_id: str, timeout: float) -> bool:
        deadline = time.time() + timeout
        with self.changed:
            while (job := self.jobs.get(job_id)) is not None and job.state in ("queued", "running"):
                left = deadline - time.time()
                if left <= 0:
                    return False
                self.changed.wait(left)
        return True

    def next_events(self, job_id: str, since: int, timeout: float) -> tuple[list[dict], bool]:
        deadline = time.time() + timeout
        with self.changed:
            while True:
                job = self.jobs.get(job_id)
                if job is None:
                    return [], True
                events = job.events[since:]
                finished = job.state not in ("queued", "running")
                left = deadline - time.time()
                if events or finished or left <= 0:
                    return events, finished and since + len(events) >= len(job.events)
                self.changed.wait(left)

    def image(self, name: str) -> bytes | None:
        with self.changed:
            return self.images.get(name)

    def queued(self) -> int:
        with self.changed:
            return len(self.pending)

    def replica_count(self) -> int:
        with self.changed:
            return len(self.replicas)

    def drain(self) -> int:
        """Take no more jobs; returns how many are queued or running."""
        with self.changed:
            self.draining = True
            return len(self.pending) + len(self.running)

    def busy(self) -> int:
        with self.changed:
            return len(self.pending) + len(self.running)

    # ---- the replica side -----------------------------------------------------------------

    def register(self, name: str, handle) -> None:
        with self.changed:
            self.replicas[name] = handle

    def claim(self, replica: str, timeout: float, max_batch: int = 1):
        """The next queued job for this replica and up to max_batch - 1 more queued jobs that
        can share its batch (batch_key): [(id, request)], or None after `timeout`."""
        deadline = time.time() + timeout
        with self.changed:
            while not self.pending or replica not in self.replicas:  # a replica not (or no longer) registered takes nothing
                left = deadline - time.time()
                if left <= 0:
                    return None
                self.changed.wait(left)
            first = self.pending.popleft()
            taken = [first]
            key = self.keys.get(first)
            if key is not None and not self.attempts.get(first):  # a retried job runs alone
                for job_id in list(self.pending):
                    if len(taken) >= max_batch:
                        break
                    if self.keys.get(job_id) == key and not self.attempts.get(job_id):
                        self.pending.remove(job_id)
                        taken.append(job_id)
            for job_id in taken:
                job = self.jobs[job_id]
                job.state = "running"
                self.running[job_id] = replica
                self.attempts[job_id] = self.attempts.get(job_id, 0) + 1
                self._event(job, {"type": "started", "total": job.total, "attempt": self.attempts[job_id], "replica": replica, "batch": len(taken)})
            return [(job_id, self.jobs[job_id].request) for job_id in taken]

    def progress(self, job_ids: list[str], replica: str, events: list[dict]) -> list[bool]:
        """Record a step of a batch (one event per job, each with its own preview); returns, per
        job, whether it is still wanted. A job cancelled in a shared batch ends now; the batch
        runs on for the others."""
        with self.changed:
            live = []
            for job_id, event in zip(job_ids, events):
                job = self.jobs.get(job_id)
                if job is None or self.running.get(job_id) != replica:
                    live.append(False)  # taken from this replica (it was thought dead)
                    continue
                if job.cancel_requested:
                    del self.running[job_id]
                    job.state = "cancelled"
                    self._event(job, {"type": "cancelled"})
                    live.append(False)
                    continue
                job.step = event["step"]
                self._event(job, event)
                live.append(True)
            return live

    def finish(self, job_id: str, replica: str, pngs: list[bytes], seeds: list[int]) -> None:
        with self.changed:
            job = self.jobs.get(job_id)
            if job is None or self.running.get(job_id) != replica:
                return
            del self.running[job_id]
            names = []
            for data in pngs:
                name = f"{uuid.uuid4().hex}.png"
                self.images[name] = data
                while len(self.images) > self.keep_images:
                    self.images.popitem(last=False)
                names.append(name)
            job.images, job.seeds, job.state = names, seeds, "done"
            self._event(job, {"type": "done", "images": [f"/v1/images/{n}" for n in names], "seeds": seeds})

    def fail(self, job_id: str, replica: str, error: str | None, cancelled: bool) -> None:
        with self.changed:
            job = self.jobs.get(job_id)
            if job is None or self.running.get(job_id) != replica:
                return
            del self.running[job_id]
            job.state, job.error = ("cancelled", None) if cancelled else ("failed", error)
            self._event(job, {"type": job.state, "error": job.error})

    # ---- faults ---------------------------------------------------------------------------

    def _replica_died(self, name: str) -> None:
        with self.changed:
            self.replicas.pop(name, None)
            for job_id, where in list(self.running.items()):
                if where != name:
                    continue
                del self.running[job_id]
                job = self.jobs[job_id]
                if job.cancel_requested:
                    job.state = "cancelled"
                    self._event(job, {"type": "cancelled"})
                elif self.attempts.get(job_id, 0) <= self.retries and self.replicas:
                    job.state, job.step = "queued", 0
                    self.pending.appendleft(job_id)
                    self._event(job, {"type": "retry", "reason": "the replica running it stopped"})
                else:
                    job.state = "failed"
                    job.error = "the model replica running this job stopped" + (" twice" if self.replicas else " and none is left")
                    self._event(job, {"type": "failed", "error": job.error})
            if not self.replicas:  # nothing can run the queue: fail it now rather than let it wait forever
                while self.pending:
                    job = self.jobs[self.pending.popleft()]
                    job.state, job.error = "failed", "no model replica is left to run it"
                    self._event(job, {"type": "failed", "error": job.error})
            self.changed.notify_all()

    def _watch(self) -> None:
        import ray

        while True:
            time.sleep(self.ping_every_s)
            with self.changed:
                replicas = dict(self.replicas)
            for name, handle in replicas.items():
                try:
                    ray.get(handle.ping.remote(), timeout=30)
                except Exception:  # dead, or not answering for 30 s
                    self._replica_died(name)

    def _event(self, job: Job, event: dict) -> None:
        """Record an event (callers hold the lock) and wake the waiters."""
        record_event(self.jobs, job, event, self.keep_jobs)
        if event["type"] in ("done", "failed", "cancelled"):
            self.attempts.pop(job.id, None)
            self.keys.pop(job.id, None)
        self.changed.notify_all()


class Replica:
    """One model replica (a Ray actor): loads the pipeline, then pulls and runs jobs."""

    def __init__(self, name: str, model: str | None, dtype: str, device: str | None, job_timeout_s: float, preview_every: int,
                 model_name: str, max_batch: int = 1):
        import ray
        import torch

        from ..pipeline import Pipeline

        dt = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        self.pipe = Pipeline.from_pretrained(model, dtype=dt).to(device)
        self.name, self.job_timeout_s, self.preview_every, self.model_name = name, job_timeout_s, preview_every, model_name
        self.max_batch, self.current, self.current_batch = max_batch, None, []
        self.registry = ray.get_actor(REGISTRY, namespace=NAMESPACE)
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="unfog-replica", daemon=True)
        self.thread.start()

    def ping(self) -> bool:
        if not self.thread.is_alive():
            raise RuntimeError(f"{self.name}: its job loop has stopped")
        return True

    def pid(self) -> int:
        import os

        return os.getpid()

    def running_job(self) -> str | None:
        return self.current

    def running_batch(self) -> list[str]:
        return list(self.current_batch)

    def _loop(self) -> None:
        import ray

        while not self.stopping:
            try:
                claimed = ray.get(self.registry.claim.remote(self.name, 1.0, self.max_batch))
            except Exception:  # noqa: BLE001  (the registry briefly unreachable: try again, do not end the loop)
                time.sleep(1.0)
                continue
            if claimed is None:
                continue
            try:
                self._run_batch(claimed)
            except Exception:  # noqa: BLE001  (reporting failed; the registry's watcher sees to the jobs)
                time.sleep(1.0)

    def _run_batch(self, claimed) -> None:
        import dataclasses

        import ray

        from ..pipeline import Interrupted

        ids = [job_id for job_id, _ in claimed]
        requests = [r for _, r in claimed]
        request = requests[0] if len(requests) == 1 else dataclasses.replace(
            requests[0], prompts=[p for r in requests for p in r.prompts], negative_prompts=[p for r in requests for p in r.negative_prompts],
            seeds=[x for r in requests for x in r.seeds],
            prompts_2=None if requests[0].prompts_2 is None else [p for r in requests for p in r.prompts_2],
            negative_prompts_2=None if requests[0].negative_prompts_2 is None else [p for r in requests for p in r.negative_prompts_2])
        self.current = ids[0]
        self.current_batch = ids
        start, live = time.time(), [True] * len(ids)
        limit = self.job_timeout_s * len(ids)  # a batch of n has n jobs' time
        offsets = [sum(r.batch for r in requests[:k]) for k in range(len(requests))]

        def should_stop() -> bool:  # cancels are seen at step boundaries (the registry's answer to progress)
            return not any(live) or time.time() - start > limit

        def progress(i, x0) -> None:
            total = requests[0].num_inference_steps
            events = [progress_event(self.pipe, i, x0[o : o + 1], total, self.preview_every) for o in offsets]  # each job its own preview
            live[:] = ray.get(self.registry.progress.remote(ids, self.name, events))
            if not any(live):
                raise JobStopped("cancelled")
            if time.time() - start > limit:
                raise JobStopped(f"timed out after {limit:.0f} s")

        try:
            pngs = run_job(self.pipe, request, self.model_name, progress, should_stop)
            k = 0
            for job_id, r in zip(ids, requests):  # each job its own images, in order
                ray.get(self.registry.finish.remote(job_id, self.name, pngs[k : k + r.batch], r.seeds))
                k += r.batch
        except Exception as e:  # noqa: BLE001  (one job's failure must not stop the replica)
            cancelled = not any(live) or (isinstance(e, JobStopped) and str(e) == "cancelled")
            error = str(e) if isinstance(e, JobStopped) else ("timed out" if isinstance(e, Interrupted) else f"{type(e).__name__}: {e}")
            for job_id in ids:
                ray.get(self.registry.fail.remote(job_id, self.name, error, cancelled))
        finally:
            self.current, self.current_batch = None, []


def text_windows(pipe, request) -> tuple[int, int]:
    """How many text windows the prompts and the negative prompts take: a batch pads every
    prompt to its longest, so only requests with equal counts share one."""
    from ..text import frame

    def count(texts, texts_2):
        encoders = [(pipe.tokenizer, list(texts))]
        if pipe.tokenizer_2 is not None:
            encoders.append((pipe.tokenizer_2, list(texts_2 or texts)))
        return frame(encoders, request.long_prompts, request.prompt_syntax)[0][0].shape[1]

    return count(request.prompts, request.prompts_2), count(request.negative_prompts, request.negative_prompts_2)


def batch_key(request) -> tuple | None:
    """Requests with equal keys can run as one batch (their prompts, negative prompts and seeds
    concatenated: each image keeps its own generator, so its picture is the one it gets alone).
    None for what is never batched: LoRA tags, images, caller-given latents or generators."""
    r = request
    if r.loras or r.image is not None or r.mask_image is not None or r.latents is not None or r.generators is not None:
        return None
    return (r.height, r.width, r.num_inference_steps, r.guidance_scale, r.sampler, r.sigma_schedule, repr(sorted(r.sampler_options.items())),
            r.long_prompts, r.prompt_syntax, r.zero_negative, r.prompts_2 is None, r.negative_prompts_2 is None, repr(r.time_ids),
            repr(r.negative_time_ids), r.cfg_truncation, r.deep_cache, r.denoising_start, r.denoising_end, r.output_type, r.round_timesteps,
            r.match_diffusers, r.strength)


class RemoteJobs:
    """The jobs interface of app.py (what JobQueue offers), answered by the registry actor."""

    class _Submitted:
        def __init__(self, job_id: str):
            self.id, self.state = job_id, "queued"

    def __init__(self, registry, pipe=None):
        self.registry, self.pipe = registry, pipe

    def _get(self, ref):
        import ray

        return ray.get(ref)

    def submit(self, request, params: dict):
        from .jobs import QueueFull

        from .jobs import Unavailable

        got = self._get(self.registry.submit.remote(request, params, text_windows(self.pipe, request) if self.pipe is not None else None))
        if got == "full":
            raise QueueFull()
        if isinstance(got, str):
            raise Unavailable(got)
        return self._Submitted(got[0]), got[1]

    def status(self, job_id: str):
        return self._get(self.registry.status.remote(job_id))

    def cancel_job(self, job_id: str):
        return self._get(self.registry.cancel_job.remote(job_id))

    def wait_id(self, job_id: str, timeout: float) -> bool:
        return self._get(self.registry.wait_id.remote(job_id, timeout))

    def image(self, name: str):
        return self._get(self.registry.image.remote(name))

    def queued(self) -> int:
        return self._get(self.registry.queued.remote())

    async def next_events(self, job_id: str, since: int, timeout: float):
        return await self.registry.next_events.remote(job_id, since, timeout)

    def shutdown(self, timeout: float = 60.0) -> None:
        pass  # the replicas and the registry outlive an ingress; `unfog serve --ray` stops them


def build_ingress_app(model: str | None, settings, model_name: str):
    """The FastAPI app for an ingress replica (called inside it by Ray Serve): the pipeline is
    loaded only to validate requests (sizes, samplers, the model's limits) exactly as the
    single-process server does; generation happens in the model replicas."""
    import ray

    from ..pipeline import Pipeline
    from .app import create_app

    pipe = Pipeline.from_pretrained(model)
    registry = ray.get_actor(REGISTRY, namespace=NAMESPACE)
    return create_app(pipe, settings, model_name=model_name, jobs=RemoteJobs(registry, pipe))


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail at once, naming the address, when nothing listens there (ray.init would retry for
    minutes)."""
    import socket

    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise UnfogError(f"--ray-address {address!r} is not HOST:PORT, ray://HOST:PORT or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise UnfogError(f"cannot reach the Ray cluster at {address}: {e}") from None


def start(model: str | None, settings, *, replicas: int, ingresses: int = 1, address: str | None = None, dtype: str = "float32",
          device: str | None = None, replica_cpus: float = 1.0, replica_gpus: float = 0.0, model_name: str = "unfog-default",
          num_cpus: int | None = None, max_batch: int = 1, stop_event: threading.Event | None = None):
    """Start (or join) Ray, the registry, `replicas` model replicas and the Serve ingress.
    Returns the registry handle and the replica handles. With `stop_event`, SIGINT and SIGTERM
    set it from the moment Ray is up (ray.init installs its own handlers, which would end the
    process mid-start)."""
    ray = _ray()
    from ray import serve

    if replicas < 1 or ingresses < 1 or max_batch < 1:
        raise UnfogError("--replicas, --ingresses and --max-batch must be at least 1")
    if address and address != "auto":
        _check_reachable(address)
    try:
        if address:
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
        else:
            # A local Ray listens on loopback only: its ports take no token.
            ray.init(namespace=NAMESPACE, include_dashboard=False, log_to_driver=False, num_cpus=num_cpus, _node_ip_address="127.0.0.1")
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UnfogError(f"could not connect to the Ray cluster at {address!r}: {e}") from None
    if stop_event is not None:
        import signal

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop_event.set())
    registry = ray.remote(Registry).options(name=REGISTRY, namespace=NAMESPACE, max_concurrency=1000, num_cpus=0).remote(settings.max_queue)
    handles = []
    for k in range(replicas):
        name = f"replica-{k}"
        h = ray.remote(Replica).options(name=f"unfog-{name}", namespace=NAMESPACE, num_cpus=replica_cpus, num_gpus=replica_gpus,
                                        max_concurrency=4).remote(name, model, dtype, device, settings.job_timeout_s,
                                                                  settings.preview_every, model_name, max_batch)
        handles.append(h)
    for k, h in enumerate(handles):
        ray.get(h.ping.remote())  # loaded: a model that cannot load fails here, at start
        ray.get(registry.register.remote(f"replica-{k}", h))
    serve.start(http_options={"host": settings.host, "port": settings.port})
    builder = lambda: build_ingress_app(model, settings, model_name)  # noqa: E731  (evaluated in each ingress replica)
    deployment = serve.deployment(serve.ingress(builder)(), name="unfog-ingress", num_replicas=ingresses,
                                  ray_actor_options={"num_cpus": 0})
    serve.run(deployment.bind(), name="unfog", route_prefix="/")
    return registry, handles


def stop(registry, timeout: float = 600.0, grace_s: float = 3.0, shared: bool = False) -> None:
    """Drain (no new jobs, the running and queued ones finish), give clients `grace_s` to read
    the last results, then stop Serve and Ray."""
    import ray
    from ray import serve

    ray.get(registry.drain.remote())
    deadline = time.time() + timeout
    while time.time() < deadline and ray.get(registry.busy.remote()):
        time.sleep(0.5)
    time.sleep(grace_s)
    if shared:  # a cluster we joined: remove only our application
        serve.delete("unfog")
    else:
        serve.shutdown()
    ray.shutdown()
