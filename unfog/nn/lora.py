"""Low-rank adapters beside a Linear or Conv2d: LoRA (Hu et al. 2021), LyCORIS's LoCon (the same
for convolutions), LoHa (Hyeon-Woo et al. 2022, a Hadamard product of two low-rank products) and
LoKr (a Kronecker product).

`Adapted(layer)` takes the layer's place in its parent and computes

    layer(x) + Σ_k  w_k · Δ_k(x)

where Δ_k is adapter k's update and w_k its weight (`set_adapters`). The layer itself, its
Parameters included, is kept untouched inside, so taking the adapters away gives back exactly the
network that was there; `fuse` adds w·ΔW into the layer's weight and `unfuse` subtracts it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Adapter(nn.Module):
    """One adapter on one layer: its full weight update ΔW (shaped like the layer's weight), and
    how it acts on an input. Subclasses hold the factors."""

    def delta(self) -> torch.Tensor:
        raise NotImplementedError

    def delta_shape(self) -> tuple[int, ...]:
        """The shape of the factors' product before delta() lays it out as the layer's weight,
        from the factors' shapes alone (so that factors that would multiply out to a huge or
        misshapen matrix are refused before it is built); ValueError when they do not combine."""
        raise NotImplementedError

    def fits(self, shape: tuple[int, ...]) -> bool:
        """Whether the product is the layer's weight of `shape`, or that weight as a matrix
        (outputs × inputs·kernel), as LyCORIS stores a convolution's, or a 1×1 convolution's where
        the layer is linear (SD 2.x's proj_in against SD 1.x's): equal sizes are not enough, a
        transposed factor would be laid out as nonsense."""
        raw = self.delta_shape()
        return raw in (tuple(shape), (shape[0], math.prod(shape[1:])), (*shape, 1, 1))

    def forward(self, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        """Δ(x) = x through ΔW with the layer's own stride and padding (no bias)."""
        w = self.delta().to(x.dtype)
        if isinstance(layer, nn.Conv2d):
            return F.conv2d(x, w, None, layer.stride, layer.padding, layer.dilation, layer.groups)
        return F.linear(x, w)


class LowRank(Adapter):
    """ΔW = up · down · alpha / rank (kohya's lora_down / lora_up, PEFT's lora_A / lora_B). On a
    convolution (LoCon), down has the layer's kernel and up is 1×1; applied as two small
    matmuls or convolutions, never as the full ΔW."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor, alpha: float | None, *, trainable: bool = False):
        super().__init__()
        self.down = nn.Parameter(down, requires_grad=trainable)
        self.up = nn.Parameter(up, requires_grad=trainable)
        rank = down.shape[0]
        if rank < 1:
            raise ValueError("rank 0")
        self.alpha = float(rank if alpha is None else alpha)
        self.scale = self.alpha / rank

    def delta(self) -> torch.Tensor:
        down, up = self.down.float(), self.up.float()
        if down.ndim == 4:
            return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:]) * self.scale
        return up @ down * self.scale

    def forward(self, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        down, up = self.down.to(x.dtype), self.up.to(x.dtype)
        if isinstance(layer, nn.Conv2d):
            h = F.conv2d(x, down, None, layer.stride, layer.padding, layer.dilation, layer.groups)
            return F.conv2d(h, up) * self.scale
        return F.linear(F.linear(x, down), up) * self.scale


class Hadamard(Adapter):
    """LoHa: ΔW = (w1_a · w1_b) ⊙ (w2_a · w2_b) · alpha / rank, reshaped to the layer's weight."""

    def __init__(self, w1_a, w1_b, w2_a, w2_b, alpha: float | None, shape: tuple[int, ...]):
        super().__init__()
        self.factors = nn.ParameterList([nn.Parameter(t, requires_grad=False) for t in (w1_a, w1_b, w2_a, w2_b)])
        rank = w1_b.shape[0]
        if rank < 1:
            raise ValueError("rank 0")
        self.scale, self.shape = (rank if alpha is None else float(alpha)) / rank, tuple(shape)

    def delta_shape(self) -> tuple[int, ...]:
        a1, b1, a2, b2 = (tuple(p.shape) for p in self.factors)
        if not all(len(f) == 2 for f in (a1, b1, a2, b2)) or a1[1] != b1[0] or a2[1] != b2[0] or (a1[0], b1[1]) != (a2[0], b2[1]):
            raise ValueError(f"factors {a1}, {b1}, {a2}, {b2} do not make (w1_a · w1_b) ⊙ (w2_a · w2_b)")
        return a1[0], b1[1]

    def delta(self) -> torch.Tensor:
        a1, b1, a2, b2 = (p.float() for p in self.factors)
        return ((a1 @ b1) * (a2 @ b2)).reshape(self.shape) * self.scale


class Kronecker(Adapter):
    """LoKr: ΔW = w1 ⊗ w2 · scale, each factor given whole or as a low-rank pair (w_a · w_b);
    the scale is alpha / rank when a factor is low-rank, else 1 (as LyCORIS defines it)."""

    def __init__(self, w1: list[torch.Tensor], w2: list[torch.Tensor], alpha: float | None, shape: tuple[int, ...]):
        super().__init__()
        self.w1 = nn.ParameterList([nn.Parameter(t, requires_grad=False) for t in w1])
        self.w2 = nn.ParameterList([nn.Parameter(t, requires_grad=False) for t in w2])
        low_rank = [pair[1].shape[0] for pair in (w1, w2) if len(pair) == 2]
        if 0 in low_rank:
            raise ValueError("rank 0")
        rank = low_rank[-1] if low_rank else None
        self.scale = 1.0 if rank is None or alpha is None else float(alpha) / rank
        self.shape = tuple(shape)

    @staticmethod
    def _factor_shape(parts) -> tuple[int, ...]:
        if len(parts) == 1:
            return tuple(parts[0].shape)
        a, b = tuple(parts[0].shape), tuple(parts[1].shape)
        if len(a) != 2 or len(b) != 2 or a[1] != b[0]:
            raise ValueError(f"low-rank factors {a} and {b} do not multiply")
        return a[0], b[1]

    def delta_shape(self) -> tuple[int, ...]:
        w1, w2 = self._factor_shape(self.w1), self._factor_shape(self.w2)
        if len(w1) not in (2, 4) or len(w2) not in (2, 4) or (len(w1) == 4 and len(w2) == 2):
            raise ValueError(f"factors of shapes {w1} and {w2} make no Kronecker product of a layer's weight")
        if len(w1) == 2 and len(w2) == 4:  # delta() gives w1 two unit kernel dimensions
            w1 = (*w1, 1, 1)
        return tuple(a * b for a, b in zip(w1, w2))

    @staticmethod
    def _factor(parts) -> torch.Tensor:
        return parts[0].float() @ parts[1].float() if len(parts) == 2 else parts[0].float()

    def delta(self) -> torch.Tensor:
        w1, w2 = self._factor(self.w1), self._factor(self.w2)
        if w2.ndim == 4 and w1.ndim == 2:
            w1 = w1[:, :, None, None]
        return torch.kron(w1, w2).reshape(self.shape) * self.scale


class Adapted(nn.Module):
    """A Linear or Conv2d with adapters beside it (see the module docstring). `weight`, `bias`
    and the shape attributes read through to the layer, so code that inspects the layer keeps
    working; `weights` holds each adapter's weight (1.0 when loaded)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer
        # Adapter names are the user's (file stems: "style.v2", "train"), so they are not module
        # attribute names: the modules sit in a list beside a list of their names.
        self.adapter_modules = nn.ModuleList()
        self.names: list[str] = []
        self.weights: dict[str, float] = {}
        self.fused: list[str] = []  # adapters added into layer.weight, in order
        self.unfused_weight: torch.Tensor | None = None  # the layer's weight before the first fuse

    @property
    def adapters(self) -> dict[str, Adapter]:
        """name → adapter, in loading order (a read-only view: use add and remove)."""
        return dict(zip(self.names, self.adapter_modules))

    def add(self, name: str, adapter: Adapter, weight: float = 1.0) -> None:
        if name in self.names:
            raise ValueError(f"adapter {name!r} is already on this layer")
        self.adapter_modules.append(adapter)
        self.names.append(name)
        self.weights[name] = float(weight)

    def remove(self, name: str) -> None:
        k = self.names.index(name)
        del self.adapter_modules[k]
        del self.names[k]
        self.weights.pop(name, None)

    @property
    def weight(self) -> torch.Tensor:
        return self.layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.layer.bias

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("in_features", "out_features", "in_channels", "out_channels", "kernel_size", "stride", "padding"):
                return getattr(self._modules["layer"], name)
            raise

    @property
    def active(self) -> bool:
        """Whether any unfused adapter changes the output."""
        return any(self.weights.get(n, 0.0) != 0 and n not in self.fused for n in self.adapters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer(x)
        for name, adapter in self.adapters.items():
            w = self.weights.get(name, 0.0)
            if w != 0 and name not in self.fused:
                out = out + w * adapter(x, self.layer)
        return out

    @torch.no_grad()
    def fuse(self, name: str) -> None:
        """Add w·ΔW into the layer's weight, in place (computed in float32, stored in the
        weight's dtype). The weight as it was before the first fuse is kept, so `unfuse` gives it
        back exactly rather than subtracting (which rounding would make inexact)."""
        if name in self.fused or self.weights.get(name, 0.0) == 0:
            return
        w = self.layer.weight
        if self.unfused_weight is None:
            self.unfused_weight = w.detach().clone()
        w.copy_((w.float() + self.weights[name] * self.adapters[name].delta().to(w.device)).to(w.dtype))
        self.fused.append(name)

    @torch.no_grad()
    def unfuse(self) -> None:
        """Every fused adapter out of the weight again (the weight's own storage, restored exactly)."""
        if self.unfused_weight is not None:
            self.layer.weight.copy_(self.unfused_weight)
        self.unfused_weight, self.fused = None, []
