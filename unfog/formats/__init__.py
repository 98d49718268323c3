"""Reading and writing weights: unfog's model folder and Stable Diffusion layouts."""

from pathlib import Path

from ..errors import UnfogError
from .folder import ModelParts, is_model_folder, load_model, save_model


def load_any(path: str | Path, **kwargs) -> ModelParts:
    """An unfog model folder, a diffusers-layout Stable Diffusion folder, or a single-file
    Stable Diffusion checkpoint (`kwargs`: config, tokenizer, prediction_type, clip_skip)."""
    from .diffusers_folder import is_diffusers_folder, load_diffusers
    from .single_file import load_single_file

    p = Path(path)
    if p.is_file():
        return load_single_file(p, **kwargs)
    kwargs = {k: v for k, v in kwargs.items() if k == "clip_skip" and v}
    if is_model_folder(p) and not is_diffusers_folder(p):
        return load_model(p)
    if is_diffusers_folder(p):
        return load_diffusers(p, **kwargs)
    if not p.exists():
        raise UnfogError(f"model path {p} does not exist")
    raise UnfogError(f"{p} is neither an unfog model folder nor a diffusers Stable Diffusion folder (no model_index.json)")


__all__ = ["ModelParts", "is_model_folder", "load_model", "save_model", "load_any"]
