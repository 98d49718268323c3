"""Training: the loop, EMA, atomic checkpoints and resume, DDP under torchrun, export."""

from .config import PRESETS, TrainConfig, preset
from .trainer import Trainer, TrainingStopped, export, load_autoencoder

__all__ = ["PRESETS", "TrainConfig", "preset", "Trainer", "TrainingStopped", "export", "load_autoencoder"]
