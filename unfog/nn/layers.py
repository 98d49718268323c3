"""Building blocks shared by the U-Net and the autoencoder."""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from . import packed


def timestep_embedding(t: torch.Tensor, dim: int, *, flip_sin_to_cos: bool = True, freq_shift: float = 0.0, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps (Vaswani et al. 2017, §3.5),
    frequencies max_period^(-i / (half - freq_shift)); cos first when flip_sin_to_cos."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift))
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)] if flip_sin_to_cos else [torch.sin(args), torch.cos(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def pointwise(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """conv(x) for a 1×1 convolution. On a CPU in float32 with a contiguous (NCHW) input it is
    computed as the matmul it is, weight @ pixels: oneDNN's convolution has a fixed set-up cost
    per call that outweighs the arithmetic at the bundled model's small feature maps (its whole
    image: `python bench/pointwise.py`). Anything else (a LoRA-adapted or packed layer, a layer
    with forward hooks, other dtypes or devices) takes the layer's own forward."""
    if (type(conv) is nn.Conv2d and conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding == (0, 0) and conv.groups == 1
            and not (conv._forward_hooks or conv._forward_pre_hooks or "forward" in conv.__dict__)  # hooks and overrides see the call
            and x.device.type == "cpu" and x.dtype == conv.weight.dtype == torch.float32 and x.dim() == 4 and x.is_contiguous()):
        n, c, h, w = x.shape
        weight = conv.weight.view(conv.out_channels, c)
        y = torch.matmul(weight, x.view(n, c, h * w)) if conv.bias is None else torch.baddbmm(conv.bias[:, None].expand(n, -1, h * w), weight.expand(n, -1, -1), x.view(n, c, h * w))
        return y.view(n, conv.out_channels, h, w)
    return conv(x)


class TimestepMLP(nn.Module):
    """Linear → SiLU → Linear on the sinusoidal embedding."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(emb)))


class ResBlock(nn.Module):
    """GroupNorm → SiLU → conv, plus the projected timestep embedding, twice, with a skip
    (Ho et al. 2020, after the Wide ResNet block). `temb_dim=None` for the autoencoder."""

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int | None, *, groups: int = 32, eps: float = 1e-5, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, out_ch) if temb_dim is not None else None
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (x if self.conv_shortcut is None else pointwise(self.conv_shortcut, x)) + h


class Downsample(nn.Module):
    """Stride-2 3×3 convolution. `asymmetric_pad` pads right/bottom only (the autoencoder's)."""

    def __init__(self, ch: int, *, asymmetric_pad: bool = False):
        super().__init__()
        self.asymmetric_pad = asymmetric_pad
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0 if asymmetric_pad else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.asymmetric_pad:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour ×2 (or to `size`, to meet an odd-sized skip), then a 3×3 convolution."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


# Text contexts whose cross-attention keys and values each layer may keep: the U-Net's own
# converted copy of one generation's context, which nothing changes in place (UNet._context).
# Held by id with a weak reference (a WeakSet would compare tensors with ==, elementwise).
_SHARED_CONTEXTS: dict[int, weakref.ref] = {}


def share_context(context: torch.Tensor) -> torch.Tensor:
    """Mark `context` as fixed for as long as it lives, so that cross-attention layers compute its
    keys and values once and reuse them on every later call with this same tensor."""
    i = id(context)
    _SHARED_CONTEXTS[i] = weakref.ref(context, lambda _: _SHARED_CONTEXTS.pop(i, None))
    return context


def _is_shared(context: torch.Tensor) -> bool:
    ref = _SHARED_CONTEXTS.get(id(context))
    return ref is not None and ref() is context


class Attention(nn.Module):
    """Multi-head attention on scaled_dot_product_attention; cross-attention when
    `context_dim` is given (keys and values come from the context)."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None, *, qkv_bias: bool = False):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=qkv_bias)
        self.to_out = nn.Linear(inner, dim)

    def fuse_projections(self) -> None:
        """For inference: one matmul for q, k and v of self-attention (a non-persistent fused
        copy, so saving still writes to_q/to_k/to_v; it goes stale if the weights are trained)."""
        if self.to_q.in_features != self.to_k.in_features:
            return  # cross-attention: k and v read the context, q the image
        self.register_buffer("qkv_weight", torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight]).detach(), persistent=False)
        biases = [p.bias for p in (self.to_q, self.to_k, self.to_v)]
        self.register_buffer("qkv_bias", torch.cat(biases).detach() if biases[0] is not None else None, persistent=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b = x.shape[0]
        # The fused copy is the plain weights: not while an unfused LoRA adapter changes q, k or v.
        if context is None and getattr(self, "qkv_weight", None) is not None and not any(getattr(p, "active", False) for p in (self.to_q, self.to_k, self.to_v)):
            inner = self.to_q.out_features
            qkv = packed.linear(self, "_packed_qkv", x, self.qkv_weight, self.qkv_bias).view(b, -1, 3, self.heads, inner // self.heads)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q = self._heads(self.to_q, x)
            k, v = self._context_kv(context) if context is not None else (self._heads(self.to_k, x), self._heads(self.to_v, x))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, -1, self.to_out.in_features))

    def _heads(self, proj: nn.Module, inp: torch.Tensor) -> torch.Tensor:
        return proj(inp).view(inp.shape[0], -1, self.heads, proj.out_features // self.heads).transpose(1, 2)

    def _context_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention's keys and values. For a shared context (`share_context`: the same
        text at every step of a generation) they are kept on the layer and reused while the
        context and the key and value weights stay the same (see `_keeps_kv` for when); the
        kept copy is dropped by `UNet.release_context` and `packed.forget`."""
        if not self._keeps_kv(context):
            return self._heads(self.to_k, context), self._heads(self.to_v, context)
        key = (packed._key(context), packed._key(self.to_k.weight), packed._key(self.to_v.weight))
        held = self.__dict__.get("_packed_kv")
        if held is None or held[0] != key:
            held = packed.Held((key, self._heads(self.to_k, context), self._heads(self.to_v, context)))
            self.__dict__["_packed_kv"] = held  # a plain attribute, never saved, moved or copied
        return held[1], held[2]

    def _keeps_kv(self, context: torch.Tensor) -> bool:
        """Whether keys and values for `context` may be kept: not under autograd, torch.compile
        or tracing (a trace would bake them in); not while an unfused adapter or a hook can change
        what to_k or to_v give; and not for weights made under inference mode (no version counter
        shows an in-place change) unless optimize() packed them, where `packed.forget` is the
        contract for in-place changes."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling() or torch.jit.is_tracing() or not _is_shared(context):
            return False
        for proj in (self.to_k, self.to_v):
            if getattr(proj, "active", False) or proj._forward_hooks or proj._forward_pre_hooks:
                return False
            if proj.weight.is_inference() and type(proj) is not packed.PackedLinear:
                return False
        return True


class GEGLU(nn.Module):
    """Feed-forward with a GELU-gated linear unit (Shazeer 2020)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        inner = dim * mult
        self.proj = nn.Linear(dim, inner * 2)
        self.out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = packed.geglu(self, x, self.proj)  # after optimize() on a CPU
        if fused is not None:
            return self.out(fused)
        h, gate = self.proj(x).chunk(2, dim=-1)
        return self.out(h * F.gelu(gate))


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the text context, and GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, head_dim, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = GEGLU(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Feature map → tokens → transformer blocks → feature map, with a residual
    (Rombach et al. 2022). Projections are 1×1 convs or, with `linear_proj`, linear layers."""

    def __init__(self, ch: int, heads: int, head_dim: int, context_dim: int, *, depth: int = 1, groups: int = 32, linear_proj: bool = False):
        super().__init__()
        inner = heads * head_dim
        self.linear_proj = linear_proj
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.proj_in = nn.Linear(ch, inner) if linear_proj else nn.Conv2d(ch, inner, 1)
        self.transformer_blocks = nn.ModuleList(TransformerBlock(inner, heads, head_dim, context_dim) for _ in range(depth))
        self.proj_out = nn.Linear(inner, ch) if linear_proj else nn.Conv2d(inner, ch, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        y = self.norm(x)
        if not self.linear_proj:
            y = pointwise(self.proj_in, y)
        y = y.flatten(2).transpose(1, 2)
        if self.linear_proj:
            y = self.proj_in(y)
        for block in self.transformer_blocks:
            y = block(y, context)
        if self.linear_proj:
            y = self.proj_out(y)
        y = y.transpose(1, 2).reshape(b, -1, h, w)
        if not self.linear_proj:
            y = pointwise(self.proj_out, y)
        return x + y
