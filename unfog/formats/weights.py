"""The one way weights come in: read a safetensors file, then load its tensors into a module
through one check of every key, shape, dtype and value. Every loader (unfog folders, diffusers
folders, single files, training checkpoints, export) goes through `read_safetensors` and
`load_checked`."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..errors import UnfogError


def read_safetensors(path: str | Path, hint: str = "re-save or re-download it") -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a missing or damaged file is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise UnfogError(f"weight file {path} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UnfogError(f"weight file {path} is not a readable safetensors file ({e}); {hint}") from None


def _listed(keys: list[str]) -> str:
    return f"{keys[:5]}{' …' if len(keys) > 5 else ''}"


def load_checked(module: nn.Module, state: dict[str, torch.Tensor], source: str, *,
                 key_map: Callable[[str], str | None] | None = None, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load `state` into `module` after renaming each key with `key_map` (None drops a key).
    Every key must have a place in the module, with its shape and kind (floating or integer),
    hold only finite values, and every place must be filled; errors name `source` and the key.
    Floating tensors are cast to `dtype` (files may be stored in half precision). A module built
    on the meta device takes the tensors as they are; any other keeps its own storage and device."""
    expected = module.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in state.items():
        new = key if key_map is None else key_map(key)
        if new is None:
            continue
        if new not in expected:
            unknown.append(key if new == key else f"{key} (as {new})")
            continue
        want = expected[new]
        if tuple(value.shape) != tuple(want.shape):
            raise UnfogError(f"{source}: weight {key!r} has shape {tuple(value.shape)} but the config needs {tuple(want.shape)}")
        if value.is_floating_point() != want.is_floating_point():
            raise UnfogError(f"{source}: weight {key!r} is stored as {value.dtype} but the network holds {want.dtype} there; the file is not a weight file for this network")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise UnfogError(f"{source}: weight {key!r} holds NaN or infinite values; the file is damaged")
        mapped[new] = value.to(dtype) if value.is_floating_point() else value.to(want.dtype)
    missing = sorted(set(expected) - set(mapped))
    if unknown or missing:
        raise UnfogError(
            f"{source}: the weights do not match the network its config describes (is this the right architecture or component?): "
            + "; ".join(([f"unknown keys {_listed(sorted(unknown))}"] if unknown else []) + ([f"missing keys {_listed(missing)}"] if missing else []))
        )
    module.load_state_dict(mapped, assign=any(t.is_meta for t in expected.values()))
    return module
