"""Layer by layer: what unfog/nn/packed.py's choices gain on this CPU, in bfloat16, batch 2.

    python bench/packed_layers.py

Prints, per case, the median milliseconds of: a plain eager convolution against the same
convolution with its weight packed once (cold caches: 512 MB touched before each call, as inside
a full U-Net whose weights do not fit in cache); then a packed convolution against the same layer
as one packed matmul over image patches (what PackedConv2d does from MATMUL_MIN_CHANNELS input
channels on maps of at most MATMUL_MAX_PIXELS pixels), called alternately 25 times each, with the
median of the 25 paired ratios (this VM's speed swings 2× within seconds, so only ratios of
neighbouring calls mean anything) and the rule's choice; GEGLU plain against fused (unfog.nn.packed.geglu); and this machine's bf16 matmul
rate at 2048³, the ceiling the U-Net's matmuls and convolutions run against.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from unfog.nn import packed
from unfog.nn.layers import GEGLU

bf16 = torch.bfloat16
junk = torch.ones(2**28, dtype=bf16)


def ms(fn, cold: bool, n: int = 10) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(n):
        if cold:
            junk.add_(1)  # evict the caches
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def plain_geglu(m: GEGLU, x: torch.Tensor) -> torch.Tensor:
    """GEGLU through its (packed) projection, then a separate GELU and product, then its output projection: the unfused way."""
    h, gate = m.proj(x).chunk(2, dim=-1)
    return m.out(h * F.gelu(gate))


def paired(f, g, n: int = 25, cold: bool = False) -> tuple[list[float], list[float]]:
    """f and g called alternately n times each (after two calls each): their times in ms."""
    for _ in range(2):
        f(), g()
    a, b = [], []
    for _ in range(n):
        for fn, out in ((f, a), (g, b)):
            if cold:
                junk.add_(1)  # evict the caches
            t = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t) * 1000)
    return a, b


def conv(cin, cout, k, size, as_matmul):
    torch.manual_seed(0)
    plain = nn.Conv2d(cin, cout, k, padding=k // 2).to(bf16).to(memory_format=torch.channels_last)
    fast = nn.Conv2d(cin, cout, k, padding=k // 2).to(bf16).to(memory_format=torch.channels_last)
    fast.load_state_dict(plain.state_dict())
    packed.prepack(fast)
    fast._as_matmul = lambda x: as_matmul
    x = torch.randn(2, cin, size, size).to(bf16).contiguous(memory_format=torch.channels_last)
    return plain, fast, x


def main() -> None:
    with torch.inference_mode():
        print("convolution, bf16, batch 2, cold caches: plain | packed (ms)")
        for cin, cout, k, size in [(320, 320, 3, 32), (640, 640, 3, 16), (1280, 1280, 3, 8), (1280, 1280, 3, 4)]:
            plain, fast, x = conv(cin, cout, k, size, as_matmul=False)
            print(f"  {cin}→{cout} {k}×{k} at {size}×{size}: {ms(lambda: plain(x), True):.2f} | {ms(lambda: fast(x), True):.2f}")
        print("packed convolution against packed matmul, bf16, batch 2: ms each (medians), convolution/matmul (median of paired ratios)")
        for cin, cout, k, size in [(1280, 1280, 3, 4), (1280, 1280, 3, 8), (1920, 640, 3, 8), (1280, 1280, 3, 12), (1920, 640, 3, 12),
                                   (1280, 640, 3, 16), (1920, 640, 3, 16), (1280, 1280, 3, 16), (2560, 1280, 3, 16),
                                   (1920, 640, 3, 32), (640, 640, 3, 8), (1280, 1280, 1, 4), (1920, 640, 1, 16), (320, 320, 1, 32),
                                   (640, 640, 1, 16), (320, 320, 1, 64), (960, 320, 1, 32)]:
            _, fast, x = conv(cin, cout, k, size, as_matmul=False)
            _, wide, _ = conv(cin, cout, k, size, as_matmul=True)
            wide.load_state_dict(fast.state_dict())
            rule = packed.PackedConv2d._as_matmul(fast, x)
            a, b = paired(lambda: fast(x), lambda: wide(x))
            print(f"  {cin}→{cout} {k}×{k} at {size}×{size}: {statistics.median(a):.2f} | {statistics.median(b):.2f} ms, "
                  f"ratio {statistics.median(x / y for x, y in zip(a, b)):.2f}; the rule picks {'matmul' if rule else 'convolution'}")
        print("GEGLU, bf16, batch 2, cold caches: packed matmul + plain GELU and product | fused (ms, medians), ratio (median of paired ratios)")
        for tokens, dim in [(64, 1280), (256, 640), (1024, 640), (1024, 320), (4096, 320), (4096, 640)]:
            torch.manual_seed(0)
            unfused, fast = GEGLU(dim).to(bf16), GEGLU(dim).to(bf16)
            fast.load_state_dict(unfused.state_dict())
            packed.prepack(fast)
            packed.prepack(unfused)
            x = torch.randn(2, tokens, dim).to(bf16)
            a, b = paired(lambda: plain_geglu(unfused, x), lambda: fast(x), cold=True)
            print(f"  {2 * tokens} rows × {dim}: {statistics.median(a):.2f} | {statistics.median(b):.2f}, "
                  f"ratio {statistics.median(x / y for x, y in zip(a, b)):.2f}")
        a, b = torch.randn(2048, 2048).to(bf16), torch.randn(2048, 2048).to(bf16)
        t = ms(lambda: a @ b, False, 20)
        print(f"bf16 matmul 2048³: {2 * 2048**3 / t / 1e9:.2f} TFLOP/s with {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
