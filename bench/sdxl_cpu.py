"""SDXL base on this CPU: peak memory while loading the 2.6 B-parameter U-Net, and seconds per
denoising step at 1024² (batch 2: classifier-free guidance), with random weights.

    python bench/sdxl_cpu.py --dir /tmp/sdxl-bench            # prepare once, then measure
    python bench/sdxl_cpu.py --dir /tmp/sdxl-bench --file-dtype float32

The U-Net is SDXL base's architecture exactly (diffusers' shipped config, through unfog's config
translation). Its weights are written once to DIR as a safetensors file in `--file-dtype`
(float16, as SDXL files are published); the measurement runs in a fresh process that loads that
file into a U-Net built on the meta device, in `--dtype` (bfloat16), through unfog's one loader,
and reports its peak resident memory (VmHWM, torch itself included) against the size of the weights in that dtype,
then the seconds of `--steps` U-Net calls at 1024² (the first includes oneDNN's one-time setup).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

SDXL_BASE_UNET = {
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "in_channels": 4, "layers_per_block": 2, "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10], "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build_meta_unet():
    from unfog.formats.keymaps import unet_config_from_diffusers
    from unfog.nn import UNet

    with torch.device("meta"):
        return UNet(unet_config_from_diffusers(SDXL_BASE_UNET))


def prepare(path: Path, file_dtype: torch.dtype) -> None:
    from safetensors.torch import save_file

    unet = build_meta_unet()
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(v.shape, generator=g) * 0.02).to(file_dtype) for k, v in unet.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))


def peak_rss() -> int:
    """This process's peak resident memory in bytes (VmHWM: unlike ru_maxrss, not inherited from the parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(path: Path, dtype: torch.dtype, steps: int) -> dict:
    from unfog.formats.weights import SafetensorsFile, load_checked

    base = peak_rss()
    t0 = time.perf_counter()
    unet = load_checked(build_meta_unet(), SafetensorsFile(path), str(path), dtype=dtype).eval()
    load_s = time.perf_counter() - t0
    peak = peak_rss()
    params = sum(p.numel() for p in unet.parameters())
    weights = sum(p.numel() * p.element_size() for p in unet.parameters())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 128, 128, generator=g).to(dtype)
    ctx, pooled = torch.randn(2, 77, 2048, generator=g).to(dtype), torch.randn(2, 1280, generator=g).to(dtype)
    ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2)
    times = []
    with torch.inference_mode():
        for _ in range(steps):
            t = time.perf_counter()
            out = unet(x, torch.tensor([500, 500]), ctx, pooled=pooled, time_ids=ids)
            times.append(time.perf_counter() - t)
    assert torch.isfinite(out).all()
    return {"parameters": params, "weights_bytes": weights, "rss_before_load_bytes": base, "peak_rss_bytes": peak,
            "peak_over_weights": round(peak / weights, 3), "load_s": round(load_s, 1), "step_s_1024_cfg": [round(t, 1) for t in times],
            "torch": torch.__version__, "threads": torch.get_num_threads(), "dtype": str(dtype).replace("torch.", "")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", required=True, help="where the random weights are written (about 5 GB in float16)")
    ap.add_argument("--file-dtype", choices=sorted(DTYPES), default="float16")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # the fresh child process
    args = ap.parse_args()
    path = Path(args.dir) / f"sdxl-base-unet-{args.file_dtype}.safetensors"
    if args.measure:
        print(json.dumps(measure(path, DTYPES[args.dtype], args.steps)))
        return
    if not path.is_file():
        print(f"writing random SDXL base U-Net weights to {path} …", file=sys.stderr)
        prepare(path, DTYPES[args.file_dtype])
    out = subprocess.run([sys.executable, __file__, "--measure", *sys.argv[1:]], check=True, capture_output=True, text=True)
    result = json.loads(out.stdout)
    result["file_dtype"] = args.file_dtype
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
