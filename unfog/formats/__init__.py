"""Reading and writing weights: unfog's model folder and Stable Diffusion layouts, all through
one checked loader (`weights.load_checked`)."""

from pathlib import Path

import torch

from ..diffusion import PREDICTION_TYPES
from ..errors import UnfogError, integer
from .folder import ModelParts, is_model_folder, load_model, save_model
from .weights import check_dtype, load_checked, read_safetensors


def load_any(path: str | Path, *, config: str | Path | None = None, tokenizer: str | Path | None = None,
             prediction_type: str | None = None, clip_skip: int = 0, dtype: torch.dtype | None = None) -> ModelParts:
    """An unfog model folder, a diffusers-layout Stable Diffusion folder, or a single-file
    Stable Diffusion checkpoint. `prediction_type` and `clip_skip` apply to all three; `config`
    (a diffusers-layout config folder) and `tokenizer` (a CLIP tokenizer folder) only to single
    files, which carry neither: given for a folder, they are refused rather than ignored.
    `dtype` (default float32) is the floating-point type every network is loaded in: each tensor
    is cast as it is read, so a float16 file loads as bfloat16 without a float32 copy."""
    from .diffusers_folder import is_diffusers_folder, load_diffusers
    from .single_file import load_single_file

    if integer(clip_skip) is None or clip_skip < 0:
        raise UnfogError(f"clip_skip must be a non-negative integer, got {clip_skip!r}")
    clip_skip = int(clip_skip)
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise UnfogError(f"unknown prediction type {prediction_type!r}; choose one of {', '.join(PREDICTION_TYPES)}")
    dtype = check_dtype(torch.float32 if dtype is None else dtype)
    p = Path(path)
    if p.is_file():
        return load_single_file(p, config=config, tokenizer=tokenizer, prediction_type=prediction_type, clip_skip=clip_skip, dtype=dtype)
    if not p.exists():
        raise UnfogError(f"model path {p} does not exist")
    given = [name for name, v in (("config", config), ("tokenizer", tokenizer)) if v is not None]
    if given:
        raise UnfogError(f"{' and '.join(given)} apply to single-file checkpoints; {p} is a folder, which carries its own")
    if is_model_folder(p) and not is_diffusers_folder(p):
        return load_model(p, clip_skip=clip_skip, prediction_type=prediction_type, dtype=dtype)
    if is_diffusers_folder(p):
        return load_diffusers(p, clip_skip=clip_skip, prediction_type=prediction_type, dtype=dtype)
    raise UnfogError(f"{p} is neither an unfog model folder nor a diffusers Stable Diffusion folder (no model_index.json)")


__all__ = ["ModelParts", "is_model_folder", "load_model", "save_model", "load_any", "load_checked", "check_dtype", "read_safetensors"]
