"""A CLIP-style causal text transformer (Radford et al. 2021, §2.4).

Returns per-token states (the context the U-Net cross-attends to) and a pooled vector (the
last layer's state at the end-of-text token, after the final LayerNorm and, when the config has
one, the text projection, as transformers' CLIPTextModelWithProjection computes it).
`skip_last_layers` takes the states that many layers before the last: through the final
LayerNorm when `states_layer_norm` (SD 2.x's penultimate layer, or clip_skip), raw otherwise
(SDXL's encoders, whose context is a hidden layer's output as it is).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnfogError
from .checks import check_ints, check_number

ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
}


@dataclass
class TextEncoderConfig:
    vocab_size: int = 49408
    context_length: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    activation: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # None: the end-of-text token is the highest id in each row (CLIP's BPE vocab puts it last).
    eos_token_id: int | None = None
    skip_last_layers: int = 0
    states_layer_norm: bool = True
    projection_dim: int | None = None  # SDXL's OpenCLIP bigG: pooled output projected (no bias)

    def __post_init__(self):
        check_ints(self, {"vocab_size": (2, 1_000_000), "context_length": (2, 4096), "width": (1, 16384), "layers": (1, 128),
                          "heads": (1, 256), "mlp_width": (1, 65536)})
        check_ints(self, {"skip_last_layers": (0, self.layers - 1)})
        if self.eos_token_id is not None:
            check_ints(self, {"eos_token_id": (0, self.vocab_size - 1)})
        check_number(self, "layer_norm_eps", 0, 1)
        if self.projection_dim is not None:
            check_ints(self, {"projection_dim": (1, 65536)})
        if not isinstance(self.states_layer_norm, bool):
            raise UnfogError(f"TextEncoderConfig.states_layer_norm must be true or false, got {self.states_layer_norm!r}")


def _embedding(count: int, width: int) -> nn.Embedding:
    """nn.Embedding, N(0, 1)-initialised as torch does, except on the meta device (loading), where
    torch's normal_ would import torch._dynamo: 1.6 s of a CLI's start-up, for values never used."""
    weight = torch.empty(count, width)
    if not weight.is_meta:
        nn.init.normal_(weight)
    return nn.Embedding(count, width, _weight=weight)


class EncoderLayer(nn.Module):
    def __init__(self, c: TextEncoderConfig):
        super().__init__()
        self.heads = c.heads
        self.layer_norm1 = nn.LayerNorm(c.width, eps=c.layer_norm_eps)
        self.q_proj = nn.Linear(c.width, c.width)
        self.k_proj = nn.Linear(c.width, c.width)
        self.v_proj = nn.Linear(c.width, c.width)
        self.out_proj = nn.Linear(c.width, c.width)
        self.layer_norm2 = nn.LayerNorm(c.width, eps=c.layer_norm_eps)
        self.fc1 = nn.Linear(c.width, c.mlp_width)
        self.fc2 = nn.Linear(c.mlp_width, c.width)
        self.act = ACTIVATIONS[c.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        y = self.layer_norm1(x)
        q, k, v = (p(y).view(b, n, self.heads, d // self.heads).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out_proj(y.transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(self.act(self.fc1(self.layer_norm2(x))))


class TextEncoder(nn.Module):
    """`encoder(ids) -> (states (B, L, D), pooled (B, D))`."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        if config.activation not in ACTIVATIONS:
            raise UnfogError(f"unknown text encoder activation {config.activation!r}; choose one of {', '.join(ACTIVATIONS)}")
        if config.width % config.heads:
            raise UnfogError(f"text encoder width {config.width} is not divisible by heads={config.heads}")
        if not 0 <= config.skip_last_layers < config.layers:
            raise UnfogError(f"skip_last_layers must be in [0, {config.layers - 1}], got {config.skip_last_layers}")
        self.config = config
        self.token_embedding = _embedding(config.vocab_size, config.width)
        self.position_embedding = _embedding(config.context_length, config.width)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.layers))
        self.final_layer_norm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.text_projection = nn.Linear(config.width, config.projection_dim, bias=False) if config.projection_dim else None

    def forward(self, ids: torch.Tensor, *, skip_last_layers: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        if ids.shape[1] > c.context_length:
            raise UnfogError(f"token sequence of length {ids.shape[1]} exceeds the text encoder's context length {c.context_length}")
        skip = c.skip_last_layers if skip_last_layers is None else skip_last_layers
        if not 0 <= skip < c.layers:
            raise UnfogError(f"skip_last_layers must be in [0, {c.layers - 1}], got {skip}")
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.token_embedding(ids) + self.position_embedding(pos)[None]
        for i, layer in enumerate(self.layers):
            if i == c.layers - skip:
                states = x
            x = layer(x)
        last = self.final_layer_norm(x)
        if skip == 0:
            states = last
        elif c.states_layer_norm:
            states = self.final_layer_norm(states)
        eos = ids.argmax(dim=-1) if c.eos_token_id is None else (ids == c.eos_token_id).int().argmax(dim=-1)
        pooled = last[torch.arange(ids.shape[0], device=ids.device), eos]
        if self.text_projection is not None:
            pooled = self.text_projection(pooled)
        return states, pooled
