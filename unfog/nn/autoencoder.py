"""The KL autoencoder of latent diffusion (Rombach et al. 2022, §3 and App. G).

The encoder maps pixels in [-1, 1] to the mean and log-variance of a diagonal Gaussian over
latents; the decoder maps latents back. The pipeline multiplies latents by `scaling_factor`
so that they have roughly unit variance for the diffusion model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnfogError
from .layers import Downsample, ResBlock, Upsample


@dataclass
class AutoencoderConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_channels: list[int] = field(default_factory=lambda: [128, 256, 512, 512])
    layers_per_block: int = 2
    norm_groups: int = 32
    mid_attention: bool = True
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0

    def __post_init__(self):
        for name in ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_groups"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 4096:
                raise UnfogError(f"AutoencoderConfig.{name} must be an integer from 1 to 4096, got {v!r}")
        if not isinstance(self.block_channels, list) or not 1 <= len(self.block_channels) <= 8 or not all(
                isinstance(c, int) and not isinstance(c, bool) and 1 <= c <= 4096 for c in self.block_channels):
            raise UnfogError(f"AutoencoderConfig.block_channels must be a list of 1 to 8 integers from 1 to 4096, got {self.block_channels!r}")
        for name in ("scaling_factor", "shift_factor"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or (name == "scaling_factor" and v <= 0):
                raise UnfogError(f"AutoencoderConfig.{name} must be a finite number{' above 0' if name == 'scaling_factor' else ''}, got {v!r}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_channels) - 1)


class SelfAttention2d(nn.Module):
    """Single-head self-attention over all positions of a feature map, with a residual."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.to_q = nn.Linear(ch, ch)
        self.to_k = nn.Linear(ch, ch)
        self.to_v = nn.Linear(ch, ch)
        self.to_out = nn.Linear(ch, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.group_norm(x).flatten(2).transpose(1, 2)
        q, k, v = (p(y)[:, None] for p in (self.to_q, self.to_k, self.to_v))
        y = F.scaled_dot_product_attention(q, k, v)[:, 0]
        return x + self.to_out(y).transpose(1, 2).reshape(b, c, h, w)


class MidBlock(nn.Module):
    def __init__(self, ch: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResBlock(ch, ch, None, groups=groups, eps=1e-6), ResBlock(ch, ch, None, groups=groups, eps=1e-6)])
        self.attention = SelfAttention2d(ch, groups) if attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.attention is not None:
            x = self.attention(x)
        return self.resnets[1](x)


class CoderBlock(nn.Module):
    def __init__(self, resnets: list[nn.Module], resample: nn.Module | None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.resample = resample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for r in self.resnets:
            x = r(x)
        return x if self.resample is None else self.resample(x)


class Encoder(nn.Module):
    def __init__(self, c: AutoencoderConfig):
        super().__init__()
        g = c.norm_groups
        self.conv_in = nn.Conv2d(c.in_channels, c.block_channels[0], 3, padding=1)
        blocks, ch = [], c.block_channels[0]
        for level, out in enumerate(c.block_channels):
            resnets = []
            for _ in range(c.layers_per_block):
                resnets.append(ResBlock(ch, out, None, groups=g, eps=1e-6))
                ch = out
            last = level == len(c.block_channels) - 1
            blocks.append(CoderBlock(resnets, None if last else Downsample(ch, asymmetric_pad=True)))
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = MidBlock(ch, g, c.mid_attention)
        self.norm_out = nn.GroupNorm(g, ch, eps=1e-6)
        self.conv_out = nn.Conv2d(ch, 2 * c.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(self.mid_block(h))))


class Decoder(nn.Module):
    def __init__(self, c: AutoencoderConfig):
        super().__init__()
        g = c.norm_groups
        ch = c.block_channels[-1]
        self.conv_in = nn.Conv2d(c.latent_channels, ch, 3, padding=1)
        self.mid_block = MidBlock(ch, g, c.mid_attention)
        blocks = []
        for level in reversed(range(len(c.block_channels))):
            out = c.block_channels[level]
            resnets = []
            for _ in range(c.layers_per_block + 1):
                resnets.append(ResBlock(ch, out, None, groups=g, eps=1e-6))
                ch = out
            blocks.append(CoderBlock(resnets, Upsample(ch) if level > 0 else None))
        self.up_blocks = nn.ModuleList(blocks)
        self.norm_out = nn.GroupNorm(g, ch, eps=1e-6)
        self.conv_out = nn.Conv2d(ch, c.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Autoencoder(nn.Module):
    """`encode(x) -> (mean, logvar)`, `decode(z) -> x`; latents here are unscaled."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        for ch in config.block_channels:
            if ch % config.norm_groups:
                raise UnfogError(f"AutoencoderConfig.block_channels entry {ch} is not divisible by norm_groups={config.norm_groups}")
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruct x through a sampled latent; returns (reconstruction, mean, logvar)."""
        mean, logvar = self.encode(x)
        noise = torch.randn(mean.shape, generator=generator, device="cpu" if generator is None else generator.device).to(mean)
        return self.decode(mean + (0.5 * logvar).exp() * noise), mean, logvar
