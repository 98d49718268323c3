"""Low-memory mode on a CPU: the text encoders rest on disk between the encodings that use them.

A CPU pipeline's memory is its networks' weights plus the activations of the stage that runs.
The text encoders are used once, at the start of a generation, yet stay resident through
denoising and the decode, where the largest activations come: SDXL's two hold 1.6 GB in
bfloat16, SD 1.5's 0.5 GB in float32. `DiskRest.release` writes a network's weights once to a
safetensors file and frees them (its parameters and persistent buffers go to the meta device);
`restore` reads them back through the checked loader (unfog.formats.load_checked) before the
next use. The file is kept while the weights are unchanged, so each later release costs nothing
and each restore is one read (from the OS's page cache when memory allows).

On Linux the file is unlinked as soon as it is written and read through this process's open
descriptor (/proc/self/fd/N), so it disappears when the process ends, however it ends.
"""

from __future__ import annotations

import ctypes
import os
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .errors import UnfogError
from .formats import load_checked
from .formats.weights import SafetensorsFile


class _Copy:
    """One network's weights on disk: the path to read, and what keeps the file alive."""

    def __init__(self, module: nn.Module, directory: str | None):
        state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
        dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
        if len(dtypes) != 1:
            raise ValueError("mixed floating dtypes")
        self.dtype = dtypes.pop()
        fd, path = tempfile.mkstemp(prefix="unfog-offload-", suffix=".safetensors", dir=directory)
        os.close(fd)
        try:
            save_file(state, path)
        except Exception as e:
            os.unlink(path)
            raise UnfogError(f"low-memory mode could not write the text encoder's weights to {path} ({e}); "
                             "pass a folder with room for them: enable_low_memory(directory=...)") from None
        self.fd = None
        self.path = path
        if sys.platform.startswith("linux") and Path(f"/proc/self/fd").is_dir():
            self.fd = os.open(path, os.O_RDONLY)
            os.unlink(path)
            self.path = f"/proc/self/fd/{self.fd}"

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        elif os.path.exists(self.path):
            os.unlink(self.path)

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
    grows to 32 MB) in its heaps for reuse; a released SD 1.5 text encoder gave back only its
    embedding table (0.16 of 0.49 GB) until `malloc_trim` (measured: bench/low_memory.py)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc: nothing to trim this way
        pass


class DiskRest:
    """Releases networks to disk and restores them (see the module docstring)."""

    def __init__(self, directory: str | Path | None = None):
        if directory is not None and not Path(directory).is_dir():
            raise UnfogError(f"low-memory mode's folder {directory} does not exist", "directory")
        self.directory = None if directory is None else str(directory)
        self.copies: dict[int, _Copy] = {}  # id(module) → its weights on disk, while they are current
        self.away: set[int] = set()  # modules whose weights are on disk only

    def is_away(self, module: nn.Module) -> bool:
        return id(module) in self.away

    def release(self, module: nn.Module) -> bool:
        """Free module's weights, writing them first unless the file already holds them.
        Returns False (and keeps them) for a network on a GPU or with mixed floating dtypes."""
        key = id(module)
        if key in self.away:
            return True
        if any(t.device.type != "cpu" for t in module.state_dict().values()):
            return False
        if key not in self.copies:
            try:
                self.copies[key] = _Copy(module, self.directory)
            except ValueError:
                return False
        with torch.inference_mode(False):
            _to_meta(module)
        self.away.add(key)
        _give_back_freed_memory()
        return True

    def restore(self, module: nn.Module, *, changing: bool) -> None:
        """Bring module's weights back. `changing`: they are about to change (an adapter, an
        embedding, a cast), so the file is dropped and the next release writes a new one."""
        key = id(module)
        if key in self.away:
            copy = self.copies[key]
            with torch.inference_mode(False):  # ordinary tensors even when called during a generation, so they can be changed later
                load_checked(module, SafetensorsFile(copy.path), "low-memory mode's copy of a text encoder", dtype=copy.dtype)
            self.away.discard(key)
        if changing and key in self.copies:
            self.copies.pop(key).close()

    def close(self) -> None:
        for copy in self.copies.values():
            copy.close()
        self.copies.clear()
