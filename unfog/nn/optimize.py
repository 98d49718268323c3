"""The U-Net's fast path (what Pipeline.optimize does to it), and whether this CPU has bf16 units."""

from __future__ import annotations

from pathlib import Path

import torch

from .layers import Attention
from .packed import prepack
from .unet import UNet


def optimize_unet(unet: UNet, dtype: torch.dtype | None, channels_last: bool, compile: bool, device: torch.device | None = None) -> UNet:
    """The U-Net part of Pipeline.optimize (also used by bench/speed.py): fused q/k/v for
    self-attention, then the dtype, channels_last and torch.compile as asked. `device`: where it
    will run (default: where its weights are; low-memory mode on CUDA keeps them on the CPU)."""
    cuda = (device or next(unet.parameters()).device).type == "cuda"
    for m in unet.modules():
        if isinstance(m, Attention):
            m.fuse_projections()
    if dtype is not None:
        unet.to(dtype=dtype)
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    if not compile and dtype in (torch.bfloat16, torch.float16) and not cuda:
        prepack(unet)  # oneDNN's weight reorder once per layer, not once per call
    if cuda:
        # Let cuDNN time its convolution algorithms once per shape and keep the fastest.
        torch.backends.cudnn.benchmark = True
        if compile:
            import torch._inductor.config as inductor_config

            inductor_config.conv_1x1_as_mm = True  # 1×1 convolutions as matmuls that fuse with their neighbours
    if compile:
        unet.compile(dynamic=False)  # shapes are static per request: specialise, never go dynamic
    return unet


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX), where bf16 is faster."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
