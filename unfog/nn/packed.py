"""Convolution and linear weights kept in oneDNN's own blocked layout for CPU inference.

A plain `F.conv2d` / `F.linear` on a CPU hands oneDNN a weight in PyTorch's layout, and oneDNN
reorders it into its blocked layout on every call; for bfloat16 that reorder is a small part of
a convolution's time at 32×32 feature maps and half of it at 4×4 (bench/packed_layers.py). `prepack(module)` turns every
`nn.Conv2d` and `nn.Linear` inside into a `PackedConv2d` / `PackedLinear` (same parameters, same
state dict, still instances of the torch classes), whose forward reorders the weight once and
reuses it. A packed convolution's output is bit-identical to the plain call's (the same oneDNN
kernel; tested); a packed linear layer, a convolution run as a matmul (`PackedConv2d._as_matmul`)
and the fused GEGLU (`geglu`) accumulate in another order and differ by bfloat16 rounding. The
packed copy is used only when it applies:

- inference (no autograd), on a CPU, input and weight of the same low-precision dtype
  (bfloat16/float16: float32 gained little when tried by hand), not while torch.compile traces;
- the weight unchanged since it was packed: the cache is keyed by the weight's storage and version
  counter, so `load_state_dict`, a fused LoRA or `.to()` repacks on the next call (weights made
  under inference mode have no version counter: see `_key`).

Everything else takes the ordinary path. The packed copy costs the memory of the weights once more.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def available() -> bool:
    """Whether this torch build has oneDNN's packed convolution and linear ops."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def _key(weight: torch.Tensor):
    """What identifies the weight's current values: the tensor, its storage and its version counter.
    A tensor made under torch.inference_mode has no version counter (and asking raises, which is
    checked first: a C++ exception inside the sampler's greenlet crashed a whole-image run), so it
    is keyed without one: such weights can only change in place under inference mode, and unfog's
    own in-place changes (fusing a LoRA) call `forget`."""
    ref = (weakref.ref(weight), weight.data_ptr(), weight.dtype, tuple(weight.shape))
    return ref if weight.is_inference() else (*ref, weight._version)


def forget(module: nn.Module) -> None:
    """Drop the packed copies held in module and its children (after changing weights in place)."""
    for m in module.modules():
        for slot in [k for k in m.__dict__ if k.startswith("_packed")]:
            del m.__dict__[slot]


def _usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu" and weight.device.type == "cpu" and x.dtype == weight.dtype and x.dtype in _LOW_PRECISION
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and not torch.compiler.is_compiling()
    )


def _cached(owner: nn.Module, slot: str, weight: torch.Tensor, pack):
    """The packed copy of `weight` held on `owner` under `slot`, made by pack() when missing or stale."""
    key = _key(weight)
    entry = owner.__dict__.get(slot)
    if entry is None or entry[0] != key:
        with torch.inference_mode(False), torch.no_grad():
            entry = (key, pack())
        owner.__dict__[slot] = entry  # a plain attribute: not a buffer, so never saved or moved
    return entry[1]


def linear(owner: nn.Module, slot: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias), through a packed copy of weight cached on owner when it applies."""
    if _usable(x, weight):
        packed = _cached(owner, slot, weight, lambda: torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None))
        if packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return F.linear(x, weight, bias)


def geglu(owner: nn.Module, x: torch.Tensor, proj: nn.Module) -> torch.Tensor | None:
    """h · GELU(gate) for [h, gate] = proj(x), as two packed matmuls with oneDNN's GELU and product
    fused into their outputs, so the wide hidden activation is written once, not four times (GEGLU
    with its output projection at a 64×64 latent's 8,192 rows: 62.7 → 43.5 ms in one run of
    bench/packed_layers.py; about even at a few hundred rows). Only for a PackedLinear proj, where
    it applies; else None and the caller computes it plainly. Rounded once rather than at each
    step, so it differs from the plain bfloat16 result by bfloat16 rounding."""
    w = proj.weight
    if type(proj) is not PackedLinear or not _usable(x, w):
        return None
    inner = w.shape[0] // 2

    def pack():
        b = proj.bias if proj.bias is not None else torch.zeros(2 * inner, dtype=w.dtype)
        return (torch.ops.mkldnn._reorder_linear_weight(w.detach()[:inner].contiguous(), None), b.detach()[:inner].contiguous(),
                torch.ops.mkldnn._reorder_linear_weight(w.detach()[inner:].contiguous(), None), b.detach()[inner:].contiguous())

    packed = _cached(owner, "_packed_geglu", w, pack)
    if packed is None:
        return None
    wh, bh, wg, bg = packed
    gate = torch.ops.mkldnn._linear_pointwise(x, wg, bg, "gelu", [], "none")
    return torch.ops.mkldnn._linear_pointwise.binary(x, gate, wh, bh, "mul")


class PackedLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self, "_packed", x, self.weight, self.bias)


# A convolution with at least MATMUL_MIN_CHANNELS input channels runs as one packed matmul: a
# 1×1 one as pixels × channels times the weight (no copy for a channels_last input), a 3×3 one
# over the image's patches (im2col) on maps of at most MATMUL_MAX_PIXELS pixels. Its weight (29 MB
# and up in bfloat16 for 1,280 channels) is read from memory once either way, and oneDNN's matmul
# streams it faster than its convolution at the few pixels of a U-Net's deep levels; on larger
# maps the patch copy makes the 3×3 matmul lose. `python bench/packed_layers.py` times both,
# alternately, on this machine (2-core Sapphire Rapids, bf16, batch 2); in two runs 1280→1280
# 3×3 was 1.17–1.42× faster as a matmul at 4×4 and 8×8, while 1920→640 and 1280→640 3×3 were
# 0.45–0.60× (slower) at 16×16 and 1920→640 0.52–0.59× at 32×32, where the U-Net used to run
# them as matmuls. Narrower layers, 3×3 or 1×1, came out either way from run to run, so they
# stay convolutions.
MATMUL_MIN_CHANNELS = 1280
MATMUL_MAX_PIXELS = 144


class PackedConv2d(nn.Conv2d):
    def _as_matmul(self, x: torch.Tensor) -> bool:
        if self.groups != 1 or self.stride != (1, 1) or self.dilation != (1, 1) or self.in_channels < MATMUL_MIN_CHANNELS:
            return False
        if self.kernel_size == (1, 1):
            return self.padding == (0, 0)
        return self.kernel_size == (3, 3) and self.padding == (1, 1) and x.shape[-2] * x.shape[-1] <= MATMUL_MAX_PIXELS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.padding_mode == "zeros" and isinstance(self.padding, tuple) and x.dim() == 4 and _usable(x, w):
            if self._as_matmul(x):
                # weight as [out, kh·kw·in], patches as [pixels, kh·kw·in], both in (kh, kw, in) order
                packed = _cached(self, "_packed_matmul", w, lambda: torch.ops.mkldnn._reorder_linear_weight(w.detach().permute(0, 2, 3, 1).reshape(w.shape[0], -1), None))
                if packed is not None:
                    n, _, h, wd = x.shape
                    xh = x.permute(0, 2, 3, 1)  # NHWC: free for a channels_last input
                    if self.kernel_size == (3, 3):
                        xh = F.pad(xh, (0, 0, 1, 1, 1, 1)).unfold(1, 3, 1).unfold(2, 3, 1).permute(0, 1, 2, 4, 5, 3)
                    y = torch.ops.mkldnn._linear_pointwise(xh.reshape(n * h * wd, -1), packed, self.bias, "none", [], "")
                    return y.view(n, h, wd, -1).permute(0, 3, 1, 2)  # channels_last, as the convolution gives
            else:
                args = (list(self.padding), list(self.stride), list(self.dilation), self.groups)
                packed = _cached(self, "_packed", w, lambda: torch.ops.mkldnn._reorder_convolution_weight(w.detach(), *args, list(x.shape)))
                if packed is not None:
                    return torch.ops.mkldnn._convolution_pointwise(x, packed, self.bias, *args, "none", [], "")
        return super().forward(x)


def prepack(module: nn.Module) -> int:
    """Make every plain nn.Conv2d and nn.Linear in module pack its weight on first use (see the
    module docstring). Returns how many layers were changed; a no-op without oneDNN."""
    if not available():
        return 0
    n = 0
    for m in module.modules():
        if type(m) is nn.Linear:
            m.__class__ = PackedLinear
        elif type(m) is nn.Conv2d:
            m.__class__ = PackedConv2d
        else:
            continue
        n += 1
    return n
