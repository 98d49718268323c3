"""Low-memory mode: on a CPU the text encoders rest on disk between the encodings that use them;
on a CUDA GPU every network rests in CPU memory and is on the GPU only while it runs.

A CPU pipeline's memory is its networks' weights plus the activations of the stage that runs.
The text encoders are used once, at the start of a generation, yet stay resident through
denoising and the decode, where the largest activations come: SDXL's two hold 1.6 GB in
bfloat16, SD 1.5's 0.5 GB in float32. `DiskRest.release` writes a network's weights once to a
safetensors file and frees them (its parameters and persistent buffers go to the meta device);
`restore` reads them back, each tensor in the dtype it had, through the checked loader
(unfog.formats.load_checked) before the next use. The file is kept while the weights are
unchanged, so each later release costs nothing and each restore is one read (from the OS's page
cache when memory allows). A lock keeps one thread's release from freeing weights another
thread is encoding with.

On Linux the file is unlinked as soon as it is written and read through this process's open
descriptor (/proc/self/fd/N), so it disappears when the process ends, however it ends; a write
that fails or is interrupted removes it. Elsewhere it is removed when its copy is dropped.

On CUDA (`DeviceOffload`, diffusers' "model CPU offload"): the text encoders, the U-Net and the
autoencoder stay in pinned CPU memory, and each is copied to the GPU for the stage that runs it
(encoding the prompt, denoising, decoding) and dropped from the GPU after it, so the GPU holds
one network and its activations at a time. The CPU tensors are kept while a network is on the
GPU and put back afterwards (no copy back: inference does not change weights), so each stage
costs one host-to-device copy of its network. Weights change between generations only, on the
CPU (adapters, embeddings, casts), which is where they are then.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import tempfile
import threading
import weakref
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from . import errors
from .errors import UnfogError, integer
from .formats import load_checked
from .formats.weights import SafetensorsFile

_PROC_FD = sys.platform.startswith("linux") and os.path.isdir("/proc/self/fd")


class _Copy:
    """One network's weights on disk: the path to read, and what keeps the file alive."""

    def __init__(self, module: nn.Module, directory: str | None):
        self.fd: int | None = None
        self.path: str | None = None
        state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
        try:
            fd, path = tempfile.mkstemp(prefix="unfog-offload-", suffix=".safetensors", dir=directory)
        except OSError as e:
            raise UnfogError(f"low-memory mode could not create a file in {directory or tempfile.gettempdir()} ({e}); "
                             "pass a writable folder: enable_low_memory(directory=...)", "directory") from None
        os.close(fd)
        self.path = path
        try:
            save_file(state, path)  # (safetensors writes a sibling and renames it, so not through a descriptor)
        except BaseException as e:
            self.close()
            if not isinstance(e, Exception):
                raise
            raise UnfogError(f"low-memory mode could not write the text encoder's weights ({e}); "
                             "pass a folder with room for them: enable_low_memory(directory=...)", "directory") from None
        if _PROC_FD:
            self.fd = os.open(path, os.O_RDONLY)
            os.unlink(path)  # from here on the file has no name: it lives as long as the descriptor
            self.path = f"/proc/self/fd/{self.fd}"

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        elif self.path is not None and os.path.exists(self.path):
            os.unlink(self.path)
        self.path = None

    __del__ = close


def _to_meta(module: nn.Module) -> None:
    """Free the parameters and persistent buffers (what state_dict holds); the module keeps its
    structure, its non-persistent buffers and each parameter's requires_grad."""
    for name in module.state_dict():
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        if attr in owner._parameters:
            p = owner._parameters[attr]
            owner._parameters[attr] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        else:
            owner._buffers[attr] = torch.empty_like(owner._buffers[attr], device="meta")


def _give_back_freed_memory() -> None:
    """Return freed memory to the OS. glibc keeps freed blocks under its mmap threshold (which
    grows to 32 MB) in its heaps for reuse, so without `malloc_trim` a released text encoder gave
    back little more than its embedding table (`bench/low_memory.py` reports the resident memory
    just before and after the release)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc: nothing to trim this way
        pass


class DiskRest:
    """Releases networks to disk and restores them (see the module docstring)."""

    def __init__(self, directory: str | Path | None = None):
        self.lock = threading.RLock()  # held by a caller from restore through its use to release
        self.directory: str | None = None
        self.set_directory(directory)
        self.copies: weakref.WeakKeyDictionary[nn.Module, _Copy] = weakref.WeakKeyDictionary()  # each module's weights on disk, while current
        self.away: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # modules whose weights are on disk only

    def set_directory(self, directory: str | Path | None) -> None:
        """Where the next files go (None: the system's temporary folder)."""
        if directory is not None:
            if not isinstance(directory, (str, os.PathLike)):
                raise UnfogError(f"directory must be a folder path, got {type(directory).__name__}", "directory")
            if not Path(directory).is_dir():
                raise UnfogError(f"low-memory mode's folder {directory} {'is not a folder' if Path(directory).exists() else 'does not exist'}", "directory")
            directory = str(directory)
        self.directory = directory

    def __deepcopy__(self, memo):
        raise UnfogError("a pipeline in low-memory mode cannot be copied (its text encoders' weights are on disk): disable_low_memory() first")

    def is_away(self, module: nn.Module) -> bool:
        return module in self.away

    def release(self, module: nn.Module) -> None:
        """Free module's weights, writing them first unless the file already holds them. Only
        for a network whose tensors are all on the CPU (a no-op otherwise)."""
        with self.lock:
            if module in self.away or any(t.device.type != "cpu" for t in module.state_dict().values()):
                return
            if module not in self.copies:
                self.copies[module] = _Copy(module, self.directory)
            with torch.inference_mode(False):
                _to_meta(module)
            self.away.add(module)
        _give_back_freed_memory()

    def restore(self, module: nn.Module, *, changing: bool) -> None:
        """Bring module's weights back, each in its own dtype. `changing`: they are about to
        change (an adapter, an embedding, a cast), so the file is dropped and the next release
        writes a new one."""
        with self.lock:
            if module in self.away:
                with torch.inference_mode(False):  # ordinary tensors even during a generation, so they can be changed later
                    load_checked(module, SafetensorsFile(self.copies[module].path), "low-memory mode's copy of a text encoder", dtype=None)
                self.away.discard(module)
            if changing and module in self.copies:
                self.copies.pop(module).close()

    def close(self) -> None:
        with self.lock:
            for copy in list(self.copies.values()):
                copy.close()
            self.copies.clear()


def _tensors(module: nn.Module):
    """(owner, "_parameters" or "_buffers", name, tensor) for every tensor the module holds."""
    for owner in module.modules():
        for kind in ("_parameters", "_buffers"):
            for name, t in getattr(owner, kind).items():
                if t is not None:
                    yield owner, kind, name, t


def _put(owner: nn.Module, kind: str, name: str, tensor: torch.Tensor, original: nn.Parameter | None = None) -> None:
    """Put `tensor` in the slot; a parameter's slot keeps its `original` Parameter object (so
    optimisers, adapters and torch.compile's guards see the same one) where torch allows its data
    to change device, and holds a new Parameter for the block where it does not (the meta device)."""
    if kind == "_buffers":
        owner._buffers[name] = tensor
        return
    p = original if original is not None else owner._parameters[name]
    try:
        p.data = tensor
        owner._parameters[name] = p
    except RuntimeError:
        owner._parameters[name] = nn.Parameter(tensor, requires_grad=p.requires_grad)


class DeviceOffload:
    """Each network on `device` only for the stages that use it (see the module docstring);
    counted, so two threads using one network keep it there until both are done."""

    def __init__(self, device: torch.device):
        self.device = device
        self.lock = threading.RLock()
        self.users: dict[nn.Module, int] = {}
        self.saved: dict[nn.Module, dict] = {}  # module -> {(owner, kind, name): its CPU tensor}

    @contextlib.contextmanager
    def using(self, module: nn.Module):
        self._onto(module)
        try:
            yield
        finally:
            self._off(module)

    def _onto(self, module: nn.Module) -> None:
        with self.lock, torch.inference_mode(False), torch.no_grad():  # ordinary tensors, as the CPU ones are
            self.users[module] = self.users.get(module, 0) + 1
            if self.users[module] > 1:
                return
            saved = {}
            for owner, kind, name, t in list(_tensors(module)):
                if t.device.type != "cpu":
                    continue
                original = owner._parameters[name] if kind == "_parameters" else None
                t = t.detach()  # the CPU data itself: a Parameter's own .data is about to point at the copy
                if self.device.type == "cuda" and not t.is_pinned():  # once (it is what is put back): page-locked memory copies asynchronously, and faster
                    t = t.pin_memory()
                saved[(owner, kind, name)] = (t, original)
                _put(owner, kind, name, self._copy(t), original)
            self.saved[module] = saved

    def _copy(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, non_blocking=True)

    def _off(self, module: nn.Module) -> None:
        with self.lock, torch.inference_mode(False), torch.no_grad():
            self.users[module] -= 1
            if self.users[module] > 0:
                return
            del self.users[module]
            saved = self.saved.pop(module, {})
            for owner, kind, name, t in list(_tensors(module)):
                old, original = saved.get((owner, kind, name), (None, None))
                if old is not None and old.shape == t.shape and old.dtype == t.dtype:
                    _put(owner, kind, name, old, original)  # unchanged while on the GPU: no copy back
                elif t.device.type != "cpu":  # made or recast while on the GPU (a fused copy, say): brought back
                    _put(owner, kind, name, t.to("cpu"), original)


class LowMemoryMixin:
    """The low-memory methods of `Pipeline` (kept here so pipeline.py stays about generation)."""

    def enable_low_memory(self, directory: str | Path | None = None, device: str | torch.device | None = None) -> "LowMemoryMixin":
        """Low-memory mode, for machines with little memory to spare; returns self.

        On a CPU: the text encoders rest on disk except while they encode a prompt, so denoising
        and the decode, where the largest activations come, run without them resident (SDXL:
        1.6 GB less in bfloat16). Their weights are written once to a file in `directory`
        (default: the system's temporary folder; give one on a disk, not a RAM-backed /tmp) and
        read back for each encoding. Load in the dtype you run in (`from_pretrained(dtype=...)`),
        so no copy in another dtype is ever made.

        On CUDA (a pipeline moved there, or `device="cuda"` for one still on the CPU, which never
        holds the whole model on the GPU): every network rests in CPU memory and is copied to the
        GPU only for the stage that runs it, diffusers' model CPU offload (unfog.offload). CUDA
        graphs are off in this mode, since each stage's weights land at new addresses."""
        target = errors.device(device, usable=False) if device is not None else self.device  # (_enable_offload checks CUDA)
        if target.type == "cuda":
            return self._enable_offload(target)
        if device is not None and target.type != "cpu":
            raise UnfogError(f"low-memory mode runs on a CPU or a CUDA GPU, not {target}", "device")
        if self.device.type != "cpu":
            raise UnfogError(f"low-memory mode is for CPU and CUDA pipelines; this one is on {self.device}")
        if self.disk_rest is None:
            self.disk_rest = DiskRest(directory)
        elif directory is not None:
            self.disk_rest.set_directory(directory)
        try:
            self._rest()
        except BaseException:  # e.g. no room on disk: leave the pipeline as it was
            self.disable_low_memory()
            raise
        return self

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: str | torch.device = "cuda") -> "LowMemoryMixin":
        """diffusers' name for low-memory mode on CUDA: `enable_low_memory(device=...)`."""
        if gpu_id is not None:
            if integer(gpu_id) is None or gpu_id < 0:
                raise UnfogError(f"gpu_id must be a GPU's index (0, 1 …), got {gpu_id!r}", "gpu_id")
            device = f"{errors.device(device, usable=False).type}:{integer(gpu_id)}"
        return self.enable_low_memory(device=device)

    def _enable_offload(self, device: torch.device) -> "LowMemoryMixin":
        if self.offload is not None:
            if device.index is None or device == self.offload.device:
                return self  # already so
            self.disable_low_memory()  # another GPU: back on the old one, then offloaded to the new one
        if self.disk_rest is not None:
            raise UnfogError("this pipeline's text encoders rest on disk (CPU low-memory mode): disable_low_memory() first")
        if not torch.cuda.is_available():
            raise UnfogError(f"low-memory mode on {device}: this torch build sees no CUDA GPU", "device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UnfogError(f"low-memory mode on {device}: there are only {torch.cuda.device_count()} CUDA devices", "device")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.to("cpu")  # (also drops captured graphs, which point at GPU weights)
        self.offload = DeviceOffload(device)
        for name, b in self.denoiser._buffers.items():  # the schedule's few numbers (not the U-Net it wraps) where the sampling runs
            self.denoiser._buffers[name] = b.to(device)
        self.cuda_graphs = False
        return self

    def disable_low_memory(self) -> "LowMemoryMixin":
        """Out of low-memory mode; returns self. On a CPU: the text encoders resident again, and
        their files on disk removed. On CUDA: every network back on the GPU."""
        if self.offload is not None:
            device, self.offload = self.offload.device, None
            self.to(device)
        if self.disk_rest is not None:
            self._resident(changing=True)
            self.disk_rest.close()
            self.disk_rest = None
        return self

    def _check_move(self, device: str | torch.device | None) -> None:
        """Refuse a `.to(device)` that low-memory mode cannot follow."""
        if self.offload is not None and device is not None:
            raise UnfogError(f"this pipeline is in low-memory mode on {self.offload.device} (each network on the GPU only while it runs); "
                             f"call disable_low_memory() before .to({str(device)!r})")
        if self.disk_rest is not None and device is not None and errors.device(device, usable=False).type != "cpu":
            raise UnfogError(f"low-memory mode (text encoders resting on disk) is for CPU pipelines; call disable_low_memory() before .to({str(device)!r})")

    def _check_graphs(self, cuda_graphs: bool | None) -> None:
        if cuda_graphs and self.offload is not None:
            raise UnfogError("CUDA graphs need the weights to stay on the GPU; in low-memory mode they move each stage (cuda_graphs=False)", "cuda_graphs")

    def _on_device(self, module: nn.Module | None):
        """A context in which `module` is on the pipeline's device (low-memory mode on CUDA
        copies it there for the block); a no-op otherwise."""
        if self.offload is None or module is None:
            return contextlib.nullcontext()
        return self.offload.using(module)

    @contextlib.contextmanager
    def _encoding_with(self, encoder: nn.Module):
        """In low-memory mode, the encoder's weights for the length of the block (back on disk
        after it, also when it raises); one thread at a time."""
        if self.disk_rest is None:
            with self._on_device(encoder):
                yield
            return
        with self.disk_rest.lock:
            self.disk_rest.restore(encoder, changing=False)
            try:
                yield
            finally:
                self.disk_rest.release(encoder)

    def _rest(self) -> None:
        """In low-memory mode, release the text encoders to disk (writing them if changed)."""
        if self.disk_rest is not None:
            for encoder in (self.text_encoder, self.text_encoder_2):
                if encoder is not None:
                    self.disk_rest.release(encoder)

    def _resident(self, *, changing: bool) -> None:
        """In low-memory mode, bring the text encoders back from disk; `changing`: their weights
        or structure are about to change (adapters, embeddings, a cast), so their files are stale."""
        if self.disk_rest is not None:
            for encoder in (self.text_encoder, self.text_encoder_2):
                if encoder is not None:
                    self.disk_rest.restore(encoder, changing=changing)
