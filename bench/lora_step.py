"""One LoRA training step of the SD 1.5 architecture at 512² on this machine: peak memory and
seconds per step, random weights.

    python bench/lora_step.py [--steps 3] [--precision bf16|fp32] [--no-checkpointing] [--rank 8]

The step is what `unfog train --lora-rank R --init SD15 --gradient-checkpointing` runs per image
with latents cached (the autoencoder encodes each image once, before training): the frozen CLIP
ViT-L text encoder on the caption, the frozen U-Net (860 M parameters, float32) with rank-R
adapters beside its attention and feed-forward layers, the loss, the backward pass into the
adapters only, and an AdamW step. Batch 1, latent 64×64. Peak memory is the process's VmHWM.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from sdxl_cpu import peak_rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--no-checkpointing", action="store_true")
    args = ap.parse_args()

    from unfog.diffusion import SchedulerConfig
    from unfog.nn import TextEncoder, TextEncoderConfig, UNet, UNetConfig
    from unfog.train.lora import attach_trainable
    from unfog.train.trainer import DiffusionModel

    torch.manual_seed(0)
    unet = UNet(UNetConfig())  # Stable Diffusion 1.5's U-Net
    te = TextEncoder(TextEncoderConfig())  # CLIP ViT-L/14's text tower
    sched = SchedulerConfig(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    model = DiffusionModel(unet, te, sched, "min_snr", 5.0)
    adapters = attach_trainable({"unet": unet}, args.rank, None, 0)
    te.requires_grad_(False)
    unet.gradient_checkpointing = not args.no_checkpointing
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    x0, ids = torch.randn(1, 4, 64, 64), torch.randint(0, 49405, (1, 77))
    base_rss = peak_rss()
    times = []
    for step in range(args.steps):
        t0 = time.perf_counter()
        with torch.autocast("cpu", torch.bfloat16, enabled=args.precision == "bf16"):
            loss = model(x0, ids, torch.tensor([500 + step]), torch.randn_like(x0))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(round(time.perf_counter() - t0, 1))
    print(json.dumps({
        "unet_parameters": sum(p.numel() for p in unet.parameters()) - sum(p.numel() for p in adapters.parameters()),
        "lora_parameters": sum(p.numel() for p in adapters.parameters()), "rank": args.rank, "precision": args.precision,
        "gradient_checkpointing": not args.no_checkpointing, "seconds_per_step": times, "peak_rss_bytes": peak_rss(),
        "rss_after_building_bytes": base_rss, "torch": torch.__version__, "threads": torch.get_num_threads(),
    }, indent=2))


if __name__ == "__main__":
    main()
