"""Reading and writing weights: unfog's model folder (and, later, foreign layouts)."""

from .folder import ModelParts, is_model_folder, load_model, save_model

__all__ = ["ModelParts", "is_model_folder", "load_model", "save_model"]
