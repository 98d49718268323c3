"""The one way weights come in: read a safetensors file, then load its tensors into a module
through one check of every key, shape, dtype and value. Every loader (unfog folders, diffusers
folders, single files, training checkpoints, export) goes through `read_safetensors` and
`load_checked`."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from ..errors import UnfogError


DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
          "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
MAX_HEADER_BYTES = 100 << 20


class SafetensorsFile(Mapping):
    """The tensors of a safetensors file, each read from disk when it is looked up, so a loader
    that casts and stores them one at a time never holds a second copy of the whole file (peak
    memory: the loaded network plus one tensor). The header is checked when the file is opened:
    a missing, truncated or malformed file is an error naming it."""

    def __init__(self, path: str | Path, hint: str = "re-save or re-download it"):
        self.path = Path(path)
        if not self.path.is_file():
            raise UnfogError(f"weight file {self.path} is missing")
        size = self.path.stat().st_size
        try:
            with open(self.path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if size < 8 or not 2 <= n <= min(MAX_HEADER_BYTES, size - 8):
                    raise ValueError(f"header length {n} does not fit a file of {size} bytes")
                header = json.loads(f.read(n))
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise UnfogError(f"weight file {self.path} is not a readable safetensors file ({e}); {hint}") from None
        if not isinstance(header, dict):
            raise UnfogError(f"weight file {self.path} is not a readable safetensors file (its header is not a JSON object); {hint}")
        self.metadata = header.pop("__metadata__", None) or {}
        if not isinstance(self.metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in self.metadata.items()):
            raise UnfogError(f"weight file {self.path} is not a readable safetensors file (its __metadata__ is not an object of strings); {hint}")
        self.start, data_size = 8 + n, size - 8 - n
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for key, info in header.items():
            try:
                dtype, shape, (begin, end) = DTYPES[info["dtype"]], tuple(int(d) for d in info["shape"]), info["data_offsets"]
                if any(d < 0 for d in shape) or not 0 <= begin <= end <= data_size or end - begin != math.prod(shape) * dtype.itemsize:
                    raise ValueError
            except (KeyError, TypeError, ValueError):
                raise UnfogError(f"weight file {self.path} is not a readable safetensors file (tensor {key!r} has a malformed or "
                                 f"out-of-bounds entry {str(info)[:200]}); {hint}") from None
            self.entries[key] = (dtype, shape, begin, end)

    def lazy(self, key: str) -> "LazyTensor":
        return LazyTensor(self, key, self.entries[key][1])

    def __getitem__(self, key: str) -> torch.Tensor:
        dtype, shape, begin, end = self.entries[key]
        tensor = torch.empty(shape, dtype=dtype)
        if end > begin:
            with open(self.path, "rb") as f:
                f.seek(self.start + begin)
                if f.readinto(memoryview(tensor.reshape(-1).view(torch.uint8).numpy())) != end - begin:
                    raise UnfogError(f"weight file {self.path} ended inside tensor {key!r}; the file is truncated")
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)


class LazyTensor:
    """One tensor of a SafetensorsFile, read when called; its shape is known without reading.
    `then(fn)` returns a LazyTensor of fn(tensor), for key maps that also reshape or split."""

    def __init__(self, source: SafetensorsFile, key: str, shape: tuple[int, ...], transform: Callable | None = None):
        self.source, self.key, self.shape, self.transform = source, key, torch.Size(shape), transform

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def then(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "LazyTensor":
        shape = fn(torch.empty(self.shape, device="meta")).shape
        first = self.transform
        return LazyTensor(self.source, self.key, shape, fn if first is None else lambda t: fn(first(t)))

    def __call__(self) -> torch.Tensor:
        tensor = self.source[self.key]
        return tensor if self.transform is None else self.transform(tensor)


def lazy_state(path: str | Path) -> dict[str, LazyTensor]:
    """A safetensors file's tensors as LazyTensors, for key maps that rename, split or reshape
    them before `load_checked` reads each once."""
    f = SafetensorsFile(path)
    return {key: f.lazy(key) for key in f}


def then(value, fn: Callable[[torch.Tensor], torch.Tensor]):
    """fn applied to a tensor now, or to a LazyTensor when it is read."""
    return value.then(fn) if isinstance(value, LazyTensor) else fn(value)


def read_safetensors(path: str | Path, hint: str = "re-save or re-download it") -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, read now (see SafetensorsFile to read them one at a time)."""
    return dict(SafetensorsFile(path, hint))


COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)  # what networks can run in


def check_dtype(dtype: torch.dtype | None) -> torch.dtype | None:
    """dtype (or None), if it is one the networks can run in. float8 weights can be read from a
    file (and are cast as they are), but torch has no float8 convolution or addition to run them."""
    if dtype is not None and (not isinstance(dtype, torch.dtype) or dtype not in COMPUTE_DTYPES):
        raise UnfogError(f"dtype must be one of torch.float32, torch.bfloat16, torch.float16 or torch.float64, got {dtype!r}", "dtype")
    return dtype


def all_finite(t: torch.Tensor) -> bool:
    """Whether a floating tensor holds no NaN or infinity (float8 through float32: torch's
    isfinite has no float8 kernel)."""
    return bool(torch.isfinite(t.float() if t.element_size() == 1 else t).all())


def _listed(keys: list[str]) -> str:
    return f"{keys[:5]}{' …' if len(keys) > 5 else ''}"


def load_checked(module: nn.Module, state: Mapping[str, torch.Tensor | LazyTensor], source: str, *,
                 key_map: Callable[[str], str | None] | None = None, dtype: torch.dtype | None = torch.float32) -> nn.Module:
    """Load `state` into `module` after renaming each key with `key_map` (None drops a key).
    Every key must have a place in the module, with its shape and kind (floating or integer),
    hold only finite values, and every place must be filled; errors name `source` and the key.
    Floating tensors are cast to `dtype` (files may be stored in half precision; None keeps each
    tensor's own floating dtype, for a file this process wrote itself). A value may be
    a LazyTensor, and `state` a SafetensorsFile: tensors are then read, checked and cast one at a
    time, after every name has been checked. A module built on the meta device takes the tensors
    as they are; any other keeps its own storage and device."""
    expected = module.state_dict()
    names: dict[str, str] = {}  # foreign key → unfog name; names are all checked before any tensor is read
    unknown: list[str] = []
    for key in state:
        new = key if key_map is None else key_map(key)
        if new is None:
            continue
        if new not in expected:
            unknown.append(key if new == key else f"{key} (as {new})")
            continue
        names[key] = new
    missing = sorted(set(expected) - set(names.values()))
    if unknown or missing:
        raise UnfogError(
            f"{source}: the weights do not match the network its config describes (is this the right architecture or component?): "
            + "; ".join(([f"unknown keys {_listed(sorted(unknown))}"] if unknown else []) + ([f"missing keys {_listed(missing)}"] if missing else []))
        )
    mapped: dict[str, torch.Tensor] = {}
    for key, new in names.items():
        value = state[key]
        value = value() if isinstance(value, LazyTensor) else value
        want = expected[new]
        if tuple(value.shape) != tuple(want.shape):
            raise UnfogError(f"{source}: weight {key!r} has shape {tuple(value.shape)} but the config needs {tuple(want.shape)}")
        if value.is_floating_point() != want.is_floating_point():
            raise UnfogError(f"{source}: weight {key!r} is stored as {value.dtype} but the network holds {want.dtype} there; the file is not a weight file for this network")
        if value.is_floating_point() and not all_finite(value):
            raise UnfogError(f"{source}: weight {key!r} holds NaN or infinite values; the file is damaged")
        mapped[new] = (value if dtype is None else value.to(dtype)) if value.is_floating_point() else value.to(want.dtype)
    module.load_state_dict(mapped, assign=any(t.is_meta for t in expected.values()))
    return module
