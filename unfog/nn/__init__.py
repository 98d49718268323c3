"""Architectures: U-Net, autoencoder, text encoder, tokenizer. Each has a dataclass config."""

from .autoencoder import Autoencoder, AutoencoderConfig
from .text_encoder import TextEncoder, TextEncoderConfig
from .tokenizer import Tokenizer, TokenizerConfig
from .unet import UNet, UNetConfig

__all__ = ["UNet", "UNetConfig", "Autoencoder", "AutoencoderConfig", "TextEncoder", "TextEncoderConfig", "Tokenizer", "TokenizerConfig"]
