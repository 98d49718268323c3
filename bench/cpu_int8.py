"""The int8 routes for the U-Net on this CPU, measured (issue 17 asked for them to be tried, not
assumed). Two parts:

    python bench/cpu_int8.py layers            # oneDNN's int8 matmul in eager PyTorch, per layer
    python bench/cpu_int8.py eager [--latent 32] [--min-weight 1638400]   # ... in the whole U-Net
    pip install torchao==0.18.0                # bench-only: PT2E quantization lives there now
    python bench/cpu_int8.py unet [--model default|sd15] [--latent 16] [--rounds 10]

`layers`: for linear layers of SD 1.5's U-Net (rows = pixels × CFG batch of 2), the median
milliseconds (15 calls, after 3) of
  - bf16: unfog's packed bfloat16 matmul (`optimize()`'s path, oneDNN AMX);
  - int8 matmul: oneDNN's u8×s8 matmul (`onednn::qlinear_pointwise`, per-channel weight scales,
    bfloat16 out) on an input already quantized: the most int8 could give;
  - quantize: turning the bfloat16 activation into uint8 with a per-tensor scale in eager
    PyTorch (`aminmax`, then `quantize_per_tensor`), which an int8 layer must add;
and the relative error of each against a float32 matmul. Without a kernel that fuses the
quantization into the layer before (which eager PyTorch does not have), int8 pays both.

`eager`: the SD 1.5 U-Net (random weights) after `optimize()`, against a copy whose linear
layers with at least --min-weight weights (default 640 × 2560: the feed-forward layers below
the first level) run through that int8 matmul, quantizing their input per call as above.
Prints the relative error of each against the float32 U-Net and the median ms per call
(interleaved rounds, median of per-round ratios).

`unet`: the PT2E route the issue names: `torch.export` of unfog's float32 U-Net, torchao's
`prepare_pt2e` with the `X86InductorQuantizer` (static, per-tensor activations, per-channel
weights), calibration on a few random inputs, `convert_pt2e`, then `torch.compile` with
inductor's weight freezing (which lowers the quantized patterns to oneDNN's int8 kernels).
Prints the export / compile seconds, the relative error against the float32 U-Net, the median
ms per call against `optimize()` (interleaved rounds, median of per-round ratios) and the
compiled call's most expensive ops from `torch.profiler`.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_openvino import interleave  # noqa: E402  (each implementation once per round, in turn)

# (rows, in, out): the U-Net's attention and feed-forward layers at a 32×32 latent, CFG batch 2
SHAPES = [(2048, 320, 320), (2048, 320, 2560), (2048, 1280, 320), (512, 640, 640), (512, 640, 5120),
          (512, 2560, 640), (128, 1280, 1280), (128, 1280, 10240), (128, 5120, 1280)]


def _median_ms(fn, calls: int = 15) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def _quantize(x: torch.Tensor):
    lo, hi = torch.aminmax(x)
    scale = max(float(hi) - float(lo), 1e-8) / 255
    zero = int(round(-float(lo) / scale))
    return torch.quantize_per_tensor(x.float(), scale, zero, torch.quint8).int_repr(), scale, zero


def layers() -> None:
    torch.manual_seed(0)
    print("rows×in→out        bf16 ms  int8 matmul ms  quantize ms  int8 total/bf16  error bf16 / int8")
    for rows, cin, cout in SHAPES:
        x = torch.randn(rows, cin).bfloat16()
        w = torch.randn(cout, cin) / cin ** 0.5
        bias = (torch.randn(cout) * 0.1).bfloat16()
        packed = torch.ops.mkldnn._reorder_linear_weight(w.bfloat16(), None)
        w_scale = w.abs().amax(1) / 127
        qw = torch.round(w / w_scale[:, None]).clamp(-128, 127).to(torch.int8)
        qpacked = torch.ops.onednn.qlinear_prepack(qw, [rows, cin])
        w_zero = torch.zeros(cout, dtype=torch.int64)
        qx, x_scale, x_zero = _quantize(x)

        def bf16():
            return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")

        def int8(q=qx, s=x_scale, z=x_zero):
            return torch.ops.onednn.qlinear_pointwise(q, s, z, qpacked, w_scale, w_zero, bias, 1.0, 0, torch.bfloat16, "none", [], "")

        ref = x.float() @ w.t() + bias.float()
        err = [((f().float() - ref).norm() / ref.norm()).item() for f in (bf16, lambda: int8(*_quantize(x)))]
        t_bf16, t_int8, t_quant = _median_ms(bf16), _median_ms(int8), _median_ms(lambda: _quantize(x))
        print(f"{rows:5d}×{cin:5d}→{cout:5d}  {t_bf16:7.3f}  {t_int8:14.3f}  {t_quant:11.3f}  {(t_int8 + t_quant) / t_bf16:15.2f}  "
              f"{err[0]:.4f} / {err[1]:.4f}", flush=True)


def _int8_weight(w: torch.Tensor):
    w = w.detach().float()
    scale = w.abs().amax(1).clamp_min(1e-12) / 127
    q = torch.round(w / scale[:, None]).clamp(-128, 127).to(torch.int8)
    return torch.ops.onednn.qlinear_prepack(q, None), scale, torch.zeros(w.shape[0], dtype=torch.int64)


def eager(latent: int, rounds: int, min_weight: int) -> None:
    from speed import unet_pair
    from unfog.nn import packed
    from unfog.pipeline import optimize_unet

    class Int8Linear(packed.PackedLinear):
        def forward(self, x):
            if not packed._usable(x, self.weight):
                return super().forward(x)
            qw, w_scale, w_zero = packed._cached(self, "_packed_int8", self.weight, lambda: _int8_weight(self.weight))
            qx, x_scale, x_zero = _quantize(x.reshape(-1, x.shape[-1]))
            y = torch.ops.onednn.qlinear_pointwise(qx, x_scale, x_zero, qw, w_scale, w_zero, self.bias, 1.0, 0, x.dtype, "none", [], "")
            return y.view(*x.shape[:-1], -1)

    _, base, width = unet_pair("sd15")
    bf16 = optimize_unet(copy.deepcopy(base).eval(), torch.bfloat16, True, False)
    int8 = optimize_unet(copy.deepcopy(base).eval(), torch.bfloat16, True, False)
    n = 0
    for m in int8.modules():
        if type(m) is packed.PackedLinear and m.in_features * m.out_features >= min_weight:
            m.__class__ = Int8Linear  # GEGLU's fused path takes only a PackedLinear: this one runs it plainly
            n += 1
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, latent, latent, generator=g)
    t = torch.tensor([500.0, 500.0])
    ctx = torch.randn(2, 77, width, generator=g)
    xb, cb = x.bfloat16().to(memory_format=torch.channels_last), ctx.bfloat16()
    with torch.no_grad():
        ref = base(x, t, ctx)
        for name, net in (("optimize()", bf16), (f"int8 ({n} layers)", int8)):
            print(f"relative error vs float32, {name}: {((net(xb, t, cb).float() - ref).norm() / ref.norm()).item():.4f}")
        times = interleave({"bf16": lambda: bf16(xb, t, cb), "int8": lambda: int8(xb, t, cb)}, rounds, unit=1.0)
    ratio = statistics.median(i / b for i, b in zip(times["int8"], times["bf16"]))
    print(f"SD 1.5 U-Net, {latent}×{latent} latent, CFG batch 2, {rounds} rounds: optimize() {statistics.median(times['bf16']) * 1000:.1f} ms, "
          f"with int8 layers {statistics.median(times['int8']) * 1000:.1f} ms, int8 / optimize() {ratio:.3f}", flush=True)


def unet(model: str, latent: int, rounds: int, calibration: int) -> None:
    import torch._inductor.config as inductor_config
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from speed import unet_pair
    from unfog.pipeline import optimize_unet

    _, base, width = unet_pair(model)
    base = base.eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, latent, latent, generator=g)
    t = torch.tensor([500.0, 500.0])
    ctx = torch.randn(2, 77, width, generator=g)
    with torch.no_grad():
        ref = base(x, t, ctx)
        start = time.perf_counter()
        exported = torch.export.export(base, (x, t, ctx)).module()
        quantizer = xiq.X86InductorQuantizer()
        quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(exported, quantizer)
        for i in range(calibration):
            prepared(torch.randn(x.shape, generator=g), torch.full((2,), 50.0 + 900.0 * i / max(calibration - 1, 1)), ctx)
        quantized = convert_pt2e(prepared)
        print(f"export, calibration ({calibration} inputs) and conversion: {time.perf_counter() - start:.1f} s", flush=True)
        inductor_config.freezing = True
        compiled = torch.compile(quantized)
        start = time.perf_counter()
        a = compiled(x, t, ctx)
        print(f"compile (first call): {time.perf_counter() - start:.1f} s", flush=True)
        eager = optimize_unet(copy.deepcopy(base).eval(), torch.bfloat16, True, False)
        xb, cb = x.bfloat16().to(memory_format=torch.channels_last), ctx.bfloat16()
        b = eager(xb, t, cb)
        for name, out in (("int8 PT2E", a), ("optimize() bf16", b)):
            print(f"relative error vs float32, {name}: {((out.float() - ref).norm() / ref.norm()).item():.4f}")
        times = interleave({"int8": lambda: compiled(x, t, ctx), "bf16": lambda: eager(xb, t, cb)}, rounds, unit=1.0)
        ratio = statistics.median(i / e for i, e in zip(times["int8"], times["bf16"]))
        print(f"{model} U-Net, {latent}×{latent} latent, CFG batch 2, {rounds} rounds: int8 PT2E "
              f"{statistics.median(times['int8']) * 1000:.1f} ms, optimize() {statistics.median(times['bf16']) * 1000:.1f} ms, "
              f"int8 / optimize() {ratio:.2f}", flush=True)
        with torch.profiler.profile() as prof:
            compiled(x, t, ctx)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=6))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["layers", "eager", "unet"])
    ap.add_argument("--model", default="default", choices=["default", "sd15"])
    ap.add_argument("--latent", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--calibration", type=int, default=4)
    ap.add_argument("--min-weight", type=int, default=640 * 2560)
    args = ap.parse_args()
    if args.part == "layers":
        layers()
    elif args.part == "eager":
        eager(args.latent, args.rounds, args.min_weight)
    else:
        unet(args.model, args.latent, args.rounds, args.calibration)


if __name__ == "__main__":
    main()
