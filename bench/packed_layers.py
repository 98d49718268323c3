"""Layer by layer: what unfog/nn/packed.py's choices gain on this CPU, in bfloat16, batch 2.

    python bench/packed_layers.py

Prints, per case, the median milliseconds of: a plain eager convolution against the same
convolution with its weight packed once (cold caches: 512 MB touched before each call, as inside
a full U-Net whose weights do not fit in cache); then each route PackedConv2d can take for a wide
layer (`PackedConv2d._route`: oneDNN's convolution, one matmul over image patches, one matmul per
kernel tap), called in turn 15 times each, with the median of each route's time over the
convolution's in the same turn (this VM's speed swings 2× within seconds, so only ratios of
neighbouring calls mean anything) and the route the rule picks; GEGLU plain against fused
(unfog.nn.packed.geglu); and this machine's bf16 matmul rate at 2048³, the ceiling the U-Net's
matmuls and convolutions run against.
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


def in_turn(fns, n: int = 25, cold: bool = False) -> list[list[float]]:
    """The functions called in turn, n turns (after two calls each): each one's times in ms."""
    for _ in range(2):
        for fn in fns:
            fn()
    out = [[] for _ in fns]
    for _ in range(n):
        for fn, times in zip(fns, out):
            if cold:
                junk.add_(1)  # evict the caches
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1000)
    return out



def conv(cin, cout, k, size, route):
    torch.manual_seed(0)
    plain = nn.Conv2d(cin, cout, k, padding=k // 2).to(bf16).to(memory_format=torch.channels_last)
    fast = nn.Conv2d(cin, cout, k, padding=k // 2).to(bf16).to(memory_format=torch.channels_last)
    fast.load_state_dict(plain.state_dict())
    packed.prepack(fast)
    fast._route = lambda x: route
    x = torch.randn(2, cin, size, size).to(bf16).contiguous(memory_format=torch.channels_last)
    return plain, fast, x


def main() -> None:
    with torch.inference_mode():
        print("convolution, bf16, batch 2, cold caches: plain | packed (ms)")
        for cin, cout, k, size in [(320, 320, 3, 32), (640, 640, 3, 16), (1280, 1280, 3, 8), (1280, 1280, 3, 4)]:
            plain, fast, x = conv(cin, cout, k, size, "conv")
            print(f"  {cin}→{cout} {k}×{k} at {size}×{size}: {ms(lambda: plain(x), True):.2f} | {ms(lambda: fast(x), True):.2f}")
        print("routes of a packed convolution, bf16, batch 2: ms (medians); each route's time over the convolution's (median of per-turn ratios)")
        for cin, cout, k, size in [(1280, 1280, 3, 4), (2560, 1280, 3, 4), (1280, 1280, 3, 8), (2560, 1280, 3, 8), (1920, 1280, 3, 8),
                                   (1920, 640, 3, 8), (1280, 1280, 3, 12), (1920, 640, 3, 12), (1280, 640, 3, 16), (1920, 640, 3, 16),
                                   (1280, 1280, 3, 16), (1920, 1280, 3, 16), (2560, 1280, 3, 16), (1280, 1280, 3, 32), (1920, 640, 3, 32),
                                   (640, 640, 3, 8), (640, 640, 3, 16), (320, 320, 3, 32), (960, 320, 3, 32), (1280, 1280, 1, 4), (1920, 640, 1, 16), (320, 320, 1, 32), (640, 640, 1, 16),
                                   (320, 320, 1, 64), (960, 320, 1, 32)]:
            routes = ("conv", "matmul", "taps") if k == 3 else ("conv", "matmul")
            layers = {}
            for route in routes:
                _, layers[route], x = conv(cin, cout, k, size, route)
            pick = packed.PackedConv2d._route(layers["conv"], x)
            times = in_turn([lambda m=m: m(x) for m in layers.values()], 15)
            cells = [f"{r} {statistics.median(t):.2f} ({statistics.median(a / b for a, b in zip(t, times[0])):.2f})" for r, t in zip(routes, times)]
            print(f"  {cin}→{cout} {k}×{k} at {size}×{size}: {', '.join(cells)}; the rule picks {pick}")
        print("GEGLU, bf16, batch 2, cold caches: packed matmul + plain GELU and product | fused (ms, medians), ratio (median of paired ratios)")
        for tokens, dim in [(64, 1280), (256, 640), (1024, 640), (1024, 320), (4096, 320), (4096, 640)]:
            torch.manual_seed(0)
            unfused, fast = GEGLU(dim).to(bf16), GEGLU(dim).to(bf16)
            fast.load_state_dict(unfused.state_dict())
            packed.prepack(fast)
            packed.prepack(unfused)
            x = torch.randn(2, tokens, dim).to(bf16)
            a, b = in_turn([lambda: plain_geglu(unfused, x), lambda: fast(x)], cold=True)
            print(f"  {2 * tokens} rows × {dim}: {statistics.median(a):.2f} | {statistics.median(b):.2f}, "
                  f"ratio {statistics.median(x / y for x, y in zip(a, b)):.2f}")
        a, b = torch.randn(2048, 2048).to(bf16), torch.randn(2048, 2048).to(bf16)
        t = ms(lambda: a @ b, False, 20)
        print(f"bf16 matmul 2048³: {2 * 2048**3 / t / 1e9:.2f} TFLOP/s with {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
