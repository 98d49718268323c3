"""Convolution and linear weights kept in oneDNN's own blocked layout for CPU inference.

A plain `F.conv2d` / `F.linear` on a CPU hands oneDNN a weight in PyTorch's layout, and oneDNN
reorders it into its blocked layout on every call; for bfloat16 that reorder is a small part of
a convolution's time at 32×32 feature maps and half of it at 4×4 (bench/packed_layers.py). `prepack(module)` turns every
`nn.Conv2d` and `nn.Linear` inside into a `PackedConv2d` / `PackedLinear` (same parameters, same
state dict, still instances of the torch classes), whose forward reorders the weight once and
reuses it. A packed convolution's output is bit-identical to the plain call's (the same oneDNN
kernel; tested); a packed linear layer, a convolution run as matmuls (`PackedConv2d._route`)
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


class _Same:
    """A weak reference that equals another only when both point to the same live tensor (a
    plain weakref.ref compares its referents with ==, which for two tensors is elementwise)."""

    __slots__ = ("ref",)

    def __init__(self, tensor: torch.Tensor):
        self.ref = weakref.ref(tensor)

    def __eq__(self, other) -> bool:
        mine = self.ref()
        return isinstance(other, _Same) and mine is not None and mine is other.ref()

    __hash__ = None


def _key(weight: torch.Tensor):
    """What identifies the weight's current values: the tensor, its storage and its version counter.
    A tensor made under torch.inference_mode has no version counter (and asking raises, which is
    checked first: a C++ exception inside the sampler's greenlet crashed a whole-image run), so it
    is keyed without one: such weights can only change in place under inference mode, and unfog's
    own in-place changes (fusing a LoRA) call `forget`."""
    ref = (_Same(weight), weight.data_ptr(), weight.dtype, tuple(weight.shape))
    return ref if weight.is_inference() else (*ref, weight._version)


class Held(tuple):
    """A value derived from a module's weights and kept on it as a plain attribute (a `_packed…`
    slot): (key, value…). A copy or a pickle of the module drops it (it comes back as None and is
    made again on use): oneDNN's packed tensors can be neither copied nor saved, and a copy's
    weights are other tensors anyway."""

    def __deepcopy__(self, memo):
        return None

    def __reduce__(self):
        return (type(None), ())


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
            entry = Held((key, pack()))
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


# A convolution with at least MATMUL_MIN_CHANNELS input channels may run as packed matmuls
# (`PackedConv2d._route`):
# - a 1×1 one as one matmul, pixels × channels times the weight (no copy for a channels_last input);
# - a 3×3 one on a map of at most MATMUL_MAX_PIXELS pixels as one matmul over the image's patches
#   (im2col, "matmul");
# - a 3×3 one on a map of at most TAPS_MAX_PIXELS pixels, or of at most TAPS_SQUARE_MAX_PIXELS when
#   it has at least as many output channels as input ones, as nine matmuls, one per kernel tap, each adding
#   into the last one's output inside oneDNN (a sum post-op: "taps"). Each tap reads only the
#   shifted input (pixels × channels, which stays in the core's cache) and its slice of the weight,
#   where one im2col matmul rereads a patch matrix nine times wider, and oneDNN's own convolution
#   picks a slow blocking for 1,280 output channels on such maps.
# Each route keeps its own packed weight (their layouts differ). `python bench/packed_layers.py`
# times the routes against each other, alternately, on this machine (2-core Sapphire Rapids, bf16,
# batch 2); the thresholds are where its winner changed, listed there. Narrower layers, 3×3 or 1×1,
# came out either way from run to run, so they stay convolutions.
MATMUL_MIN_CHANNELS = 1280
MATMUL_MAX_PIXELS = 16
TAPS_MAX_PIXELS = 64
TAPS_SQUARE_MAX_PIXELS = 256


class PackedConv2d(nn.Conv2d):
    def _route(self, x: torch.Tensor) -> str:
        """How this layer runs on x: "conv" (oneDNN's convolution), "matmul" or "taps" (see above)."""
        if self.groups != 1 or self.stride != (1, 1) or self.dilation != (1, 1) or self.in_channels < MATMUL_MIN_CHANNELS:
            return "conv"
        if self.kernel_size == (1, 1):
            return "matmul" if self.padding == (0, 0) else "conv"
        if self.kernel_size != (3, 3) or self.padding != (1, 1):
            return "conv"
        pixels = x.shape[-2] * x.shape[-1]
        if pixels <= MATMUL_MAX_PIXELS:
            return "matmul"
        if pixels <= TAPS_MAX_PIXELS or (pixels <= TAPS_SQUARE_MAX_PIXELS and self.out_channels >= self.in_channels):
            return "taps"
        return "conv"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.padding_mode == "zeros" and isinstance(self.padding, tuple) and x.dim() == 4 and _usable(x, w):
            route = self._route(x)
            n, _, h, wd = x.shape
            if route == "matmul":
                # weight as [out, kh·kw·in], patches as [pixels, kh·kw·in], both in (kh, kw, in) order
                packed = _cached(self, "_packed_matmul", w, lambda: torch.ops.mkldnn._reorder_linear_weight(w.detach().permute(0, 2, 3, 1).reshape(w.shape[0], -1), None))
                if packed is not None:
                    xh = x.permute(0, 2, 3, 1)  # NHWC: free for a channels_last input
                    if self.kernel_size == (3, 3):
                        xh = F.pad(xh, (0, 0, 1, 1, 1, 1)).unfold(1, 3, 1).unfold(2, 3, 1).permute(0, 1, 2, 4, 5, 3)
                    y = torch.ops.mkldnn._linear_pointwise(xh.reshape(n * h * wd, -1), packed, self.bias, "none", [], "")
                    return y.view(n, h, wd, -1).permute(0, 3, 1, 2)  # channels_last, as the convolution gives
            elif route == "taps":
                packed = _cached(self, "_packed_taps", w, lambda: [torch.ops.mkldnn._reorder_linear_weight(w.detach()[:, :, i, j].contiguous(), None)
                                                                   for i in range(3) for j in range(3)])
                if packed is not None:
                    xh = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))  # NHWC, zero-padded
                    y = None
                    for k, wk in enumerate(packed):
                        i, j = divmod(k, 3)
                        tap = xh[:, i:i + h, j:j + wd].reshape(n * h * wd, -1)
                        y = (torch.ops.mkldnn._linear_pointwise(tap, wk, self.bias, "none", [], "") if y is None
                             else torch.ops.mkldnn._linear_pointwise.binary(tap, y, wk, None, "add"))
                    return y.view(n, h, wd, -1).permute(0, 3, 1, 2)
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
