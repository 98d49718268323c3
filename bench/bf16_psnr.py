"""Where diffusers' bfloat16 image loses PSNR against float32 (issue 17: the CUDA harness reported
11.8 dB for diffusers' bf16 image and 50.4 dB for unfog's, against unfog's float32 image).

    python bench/bf16_psnr.py [--device cuda] [--size 512] [--steps 50] [--json out.json]

Builds the harness's full-size random SD 1.5 (bench/speed.py build_sd15) and makes the same image
(seed 1, DPM-Solver++ 2M, guidance 7.5) several ways, each compared with unfog's float32 image:
diffusers in float32 (do the two libraries agree at all: noise, schedule, seeds), diffusers with
every component in bf16 (what the harness times), diffusers with one component in bf16 and the
rest, latents included, in float32 (which component the loss comes from), and unfog in bf16.
On this CPU at 128² and 50 steps diffusers' bf16 image was 47.8 dB from float32, so the 11.8 dB
is CUDA's: run this there to attribute it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402


def bf16_unet_only(pipe) -> None:
    """The U-Net computes in bf16; what goes in and out of it (latents, text states) stays float32."""
    unet = pipe.unet.to(torch.bfloat16)
    forward = unet.forward

    def wrapped(sample, timestep, encoder_hidden_states=None, *args, **kw):
        out = forward(sample.to(torch.bfloat16), timestep, encoder_hidden_states.to(torch.bfloat16), *args, **kw)
        if isinstance(out, tuple):
            return (out[0].float(), *out[1:])
        out.sample = out.sample.float()
        return out

    unet.forward = wrapped


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--json")
    args = ap.parse_args()
    from unfog import Pipeline

    device = torch.device(args.device)
    kw = dict(num_inference_steps=args.steps, guidance_scale=7.5, height=args.size, width=args.size)
    rows = []

    def row(name, image, reference):
        rows.append({"variant": name, "psnr_vs_unfog_fp32_db": speed.psnr(image, reference)})
        print(rows[-1], flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({"device": str(device), "size": args.size, "steps": args.steps, "rows": rows}, indent=1))

    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        ref, folder = speed.build_sd15(tmp)
        reference = Pipeline.from_pretrained(folder).to(device)(speed.PROMPT, seed=1, sampler="dpmpp_2m", **kw).images[0]

        def theirs():
            return ref(speed.PROMPT, generator=torch.Generator("cpu").manual_seed(1), **kw).images[0]

        ref.to(device, torch.float32)
        row("diffusers float32", theirs(), reference)
        ref.to(device, torch.bfloat16)
        row("diffusers bf16, every component (the harness's row)", theirs(), reference)
        ref.to(device, torch.float32)
        ref.text_encoder.to(torch.bfloat16)  # the text states in bf16, given to the float32 rest as float32
        cond, uncond = ref.encode_prompt(speed.PROMPT, device, 1, True, "")
        ref.text_encoder.to(torch.float32)
        image = ref(prompt_embeds=cond.float(), negative_prompt_embeds=uncond.float(), generator=torch.Generator("cpu").manual_seed(1), **kw).images[0]
        row("diffusers, text encoder alone in bf16", image, reference)
        latents = ref(speed.PROMPT, generator=torch.Generator("cpu").manual_seed(1), output_type="latent", **kw).images
        ref.vae.to(torch.bfloat16)
        pixels = ref.vae.decode(latents.to(torch.bfloat16) / ref.vae.config.scaling_factor).sample.float()
        row("diffusers, autoencoder alone in bf16", ref.image_processor.postprocess(pixels, output_type="pil")[0], reference)
        ref.to(device, torch.float32)
        bf16_unet_only(ref)
        row("diffusers, U-Net alone in bf16 (latents float32)", theirs(), reference)
        del ref
        ours = Pipeline.from_pretrained(folder, dtype=torch.bfloat16).to(device)
        row("unfog bf16", ours(speed.PROMPT, seed=1, sampler="dpmpp_2m", **kw).images[0], reference)


if __name__ == "__main__":
    main()
