"""Where a U-Net call's time goes on a CPU, for unfog optimize() and OpenVINO, in one process.

    python bench/cpu_profile.py [--latent 32] [--rounds 3]

Needs `pip install openvino==2026.4.0` (bench-only). The SD 1.5 U-Net with random weights, CFG's
batch of 2, in bf16 on both sides (as bench/cpu_openvino.py builds them). Each round times one
OpenVINO call with its per-layer counters on (`PERF_COUNT`) and one unfog call under
torch.profiler, and sums the time by kind of layer: convolutions (unfog's wide 3×3 convolutions
run as one matmul over image patches are counted here, by their weight's shape; those run as one
matmul per kernel tap, and its wide 1×1 ones, count as "linear", where OpenVINO counts them as
convolutions, so compare the two kinds' sum), other
matmuls ("linear": OpenVINO's FullyConnected), attention (OpenVINO's fused Subgraph; unfog's scaled_dot_product_attention),
normalisation, and everything else. Both profilers add their own overhead to the wall time.

Then a U-Net of the same structure with tiny channels (32, 64, 128, 128) at an 8×8 latent: its
time is nearly all per-layer overhead (Python, dispatch, oneDNN primitive set-up), the floor of
what fewer Python calls could save.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_openvino import openvino_unet  # noqa: E402
from speed import unet_pair  # noqa: E402

KINDS = ("conv", "linear", "attention", "norm", "other")


def unfog_kinds(prof) -> dict[str, float]:
    out = collections.defaultdict(float)
    for e in prof.key_averages(group_by_input_shape=True):
        name, shapes = e.key, str(e.input_shapes)
        if name == "mkldnn::_convolution_pointwise":
            kind = "conv"
        elif name == "mkldnn::_linear_pointwise":  # a 3×3 convolution's weight as a matmul is [out, 9·in]
            kind = "conv" if any(f", {9 * c}]" in shapes for c in (1280, 1920, 2560)) else "linear"
        elif "scaled_dot_product" in name:
            kind = "attention"
        elif "norm" in name:
            kind = "norm"
        else:
            kind = "other"
        out[kind] += e.self_cpu_time_total / 1000
    return out


def openvino_kinds(infos) -> dict[str, float]:
    names = {"Convolution": "conv", "FullyConnected": "linear", "Subgraph": "attention", "MVN": "norm"}
    out = collections.defaultdict(float)
    for p in infos:
        if p.status == p.Status.EXECUTED:
            out[names.get(p.node_type, "other")] += p.real_time.total_seconds() * 1000
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latent", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    from torch.profiler import profile

    from unfog.pipeline import optimize_unet

    theirs, ours, ctx_dim = unet_pair("sd15")
    example = (torch.randn(2, 4, args.latent, args.latent), torch.full((2,), 500.0), torch.randn(2, 77, ctx_dim))
    run_ov = openvino_unet(theirs, example, counters=True)
    del theirs
    optimize_unet(ours, torch.bfloat16, True, False)
    x, t, c = example[0].bfloat16().contiguous(memory_format=torch.channels_last), example[1], example[2].bfloat16()
    with torch.inference_mode():
        for _ in range(2):
            run_ov(*example)
            ours(x, t, c)
        for r in range(args.rounds):
            start = time.perf_counter()
            run_ov(*example)
            wall_ov = (time.perf_counter() - start) * 1000
            ov_kinds = openvino_kinds(run_ov.request.get_profiling_info())
            start = time.perf_counter()
            with profile(record_shapes=True) as prof:
                ours(x, t, c)
            wall_u = (time.perf_counter() - start) * 1000
            u_kinds = unfog_kinds(prof)
            for name, wall, kinds in (("OpenVINO", wall_ov, ov_kinds), ("unfog   ", wall_u, u_kinds)):
                print(f"round {r} {name} wall {wall:6.0f} ms, layers {sum(kinds.values()):6.0f} ms: "
                      + ", ".join(f"{k} {kinds[k]:.0f}" for k in KINDS))
        tiny_unet()


def tiny_unet() -> None:
    import diffusers

    from unfog.formats.keymaps import unet_config_from_diffusers
    from unfog.nn import UNet
    from unfog.pipeline import optimize_unet

    torch.manual_seed(0)
    config = dict(diffusers.UNet2DConditionModel(cross_attention_dim=64, attention_head_dim=8, sample_size=8, block_out_channels=(32, 64, 128, 128)).config)
    tiny = optimize_unet(UNet(unet_config_from_diffusers(config)).eval(), torch.bfloat16, True, False)
    x = torch.randn(2, 4, 8, 8).bfloat16().contiguous(memory_format=torch.channels_last)
    t, c = torch.full((2,), 500.0), torch.randn(2, 77, 64).bfloat16()
    for _ in range(5):
        tiny(x, t, c)
    times = []
    for _ in range(20):
        start = time.perf_counter()
        tiny(x, t, c)
        times.append((time.perf_counter() - start) * 1000)
    print(f"SD 1.5's U-Net structure with tiny channels, 8×8 latent, optimize(): {statistics.median(times):.1f} ms per call (median of 20)")


if __name__ == "__main__":
    main()
