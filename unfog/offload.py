"""Low-memory mode on a CPU: the text encoders rest on disk between the encodings that use them.

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

from .errors import UnfogError
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
                raise UnfogError(f"low-memory mode's folder {directory} does not exist", "directory")
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


class LowMemoryMixin:
    """The low-memory methods of `Pipeline` (kept here so pipeline.py stays about generation)."""

    def enable_low_memory(self, directory: str | Path | None = None) -> "LowMemoryMixin":
        """Low-memory mode, for machines with little memory to spare (CPU pipelines): the text
        encoders rest on disk except while they encode a prompt (unfog.offload), so denoising and
        the decode, where the largest activations come, run without them resident (SDXL: 1.6 GB
        less in bfloat16). Their weights are written once to a file in `directory` (default: the
        system's temporary folder; give one on a disk, not a RAM-backed /tmp) and read back for
        each encoding. Load in the dtype you run in (`from_pretrained(dtype=...)`), so no copy
        in another dtype is ever made. Returns self."""
        if self.device.type != "cpu":
            raise UnfogError(f"low-memory mode is for CPU pipelines; this one is on {self.device}")
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

    def disable_low_memory(self) -> "LowMemoryMixin":
        """The text encoders resident again, and their files on disk removed; returns self."""
        if self.disk_rest is not None:
            self._resident(changing=True)
            self.disk_rest.close()
            self.disk_rest = None
        return self

    @contextlib.contextmanager
    def _encoding_with(self, encoder: nn.Module):
        """In low-memory mode, the encoder's weights for the length of the block (back on disk
        after it, also when it raises); one thread at a time."""
        if self.disk_rest is None:
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
