"""How far reduced-precision images are from float32 ones, for diffusers and unfog.

    python bench/fidelity.py [--size 512] [--steps 50] [--device cpu]
    python bench/fidelity.py --bundled


Builds the full-size random SD 1.5 pipeline of bench/speed.py, then generates one image (seed 1,
DPM-Solver++(2M), guidance 7.5) with diffusers in bf16 and fp32 and with unfog in fp32, plain
bf16 and optimize(), and prints the PSNR of each against unfog's float32 image (and diffusers'
bf16 against its own fp32). At 512² and 50 steps this took 21 minutes on 2 CPU cores.

`--components` also makes diffusers' image with one component at a time in bf16 (the text
encoder, the autoencoder, or the U-Net with float32 latents around it) and the rest in float32,
to say where a bf16 image's loss comes from (the CUDA harness reported 11.8 dB for diffusers'
bf16 image, against 47.8 dB on this CPU: run it there). `--size 64 --steps 8 --components` on
this CPU (84 s): diffusers' float32 image 86.0 dB, its bf16 image 47.4 dB; the text encoder alone
in bf16 58.1, the autoencoder alone 51.9, the U-Net alone 50.7.

`--bundled`: the same question on trained weights, the bundled models' (which random weights
cannot answer for the autoencoder): for each of five prompts, the PSNR against the float32 image
of the same final latents decoded by `optimize()`'s autoencoder, and of `optimize()`'s whole image
at the model's defaults and with the deterministic DPM-Solver++(2M).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import PROMPT, build_sd15, image_stats, psnr  # noqa: E402


def one_component_in_bf16(ref, kw, device) -> dict:
    """diffusers' image with the text encoder, the autoencoder, then the U-Net alone in bf16:
    each a bf16 copy swapped in for its image, so `ref`'s float32 weights are never rounded."""
    import copy

    def seed():
        return torch.Generator("cpu").manual_seed(1)

    def swapped(name, module):
        old = getattr(ref, name)
        setattr(ref, name, module)
        return old

    images = {}
    old = swapped("text_encoder", copy.deepcopy(ref.text_encoder).to(torch.bfloat16))  # its states in bf16, handed on as float32
    cond, uncond = ref.encode_prompt(PROMPT, device, 1, True, "")
    swapped("text_encoder", old)
    images["diffusers, text encoder alone in bf16"] = ref(prompt_embeds=cond.float(), negative_prompt_embeds=uncond.float(), generator=seed(), **kw).images[0]
    latents = ref(PROMPT, generator=seed(), output_type="latent", **kw).images
    vae = copy.deepcopy(ref.vae).to(torch.bfloat16)
    pixels = vae.decode(latents.to(torch.bfloat16) / vae.config.scaling_factor).sample.float()
    images["diffusers, autoencoder alone in bf16"] = ref.image_processor.postprocess(pixels, output_type="pil")[0]
    del vae
    unet = copy.deepcopy(ref.unet).to(torch.bfloat16)  # latents and text states stay float32 outside it
    forward = unet.forward

    def bf16_inside(sample, timestep, encoder_hidden_states=None, *args, **kwargs):
        out = forward(sample.to(torch.bfloat16), timestep, encoder_hidden_states.to(torch.bfloat16), *args, **kwargs)
        return (out[0].float(), *out[1:]) if isinstance(out, tuple) else type(out)(sample=out.sample.float())

    unet.forward = bf16_inside
    old = swapped("unet", unet)
    try:
        images["diffusers, U-Net alone in bf16"] = ref(PROMPT, generator=seed(), **kw).images[0]
    finally:
        swapped("unet", old)
    return images


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--components", action="store_true", help="also diffusers with one component at a time in bf16 (see above)")
    ap.add_argument("--bundled", action="store_true", help="the bundled models on this CPU instead (see above)")
    args = ap.parse_args()
    if args.bundled:
        return bundled()
    from unfog import Pipeline

    kw = dict(num_inference_steps=args.steps, guidance_scale=7.5, height=args.size, width=args.size)
    t0 = time.perf_counter()
    images = {}
    if args.device.startswith("cuda"):  # float32 means float32 there too
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        ref, folder = build_sd15(tmp)
        if args.components:  # before the bf16 cast: casting bf16 weights back would round them
            ref.to(args.device, torch.float32)
            images.update(one_component_in_bf16(ref, kw, args.device))
        for dtype in (torch.float32, torch.bfloat16):  # float32 first, likewise
            ref.to(args.device, dtype)
            images[f"diffusers {str(dtype).removeprefix('torch.')}"] = ref(PROMPT, generator=torch.Generator("cpu").manual_seed(1), **kw).images[0]
        del ref
        for name, dtype, fast in (("unfog float32", torch.float32, False), ("unfog bfloat16", torch.bfloat16, False), ("unfog optimize()", torch.bfloat16, True)):
            pipe = Pipeline.from_pretrained(folder).to(args.device, dtype)
            if fast:
                pipe.optimize(dtype)
            images[name] = pipe(PROMPT, seed=1, sampler="dpmpp_2m", **kw).images[0]
            del pipe
    exact = images["unfog float32"]
    result = {name: psnr(im, exact) for name, im in images.items() if name != "unfog float32"}
    result["diffusers bf16 vs diffusers fp32"] = psnr(images["diffusers bfloat16"], images["diffusers float32"])
    meta = {"device": args.device, "size": args.size, "steps": args.steps, "torch": torch.__version__, "seconds": round(time.perf_counter() - t0)}
    stats = {name: image_stats(im) for name, im in images.items()}  # a black or flat image shows here
    for name, value in result.items():
        print(f"PSNR {name} vs unfog float32: {value} dB" if "vs" not in name else f"PSNR {name}: {value} dB")
    for name, st in stats.items():
        print(f"image {name}: {st}")
    print(json.dumps(meta))
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "psnr_db": result, "image_stats": stats}, indent=2))


BUNDLED_PROMPTS = ["a red circle", "a blue square on the left", "a cat face", "a green tree", "two yellow stars"]


def bundled() -> None:
    from unfog import Pipeline
    from unfog.pipeline import BUNDLED_MODELS

    for name, folder in BUNDLED_MODELS.items():
        exact, fast = Pipeline.from_pretrained(folder), Pipeline.from_pretrained(folder).optimize()
        decode, finals = exact.decode, []
        exact.decode = lambda z: decode(finals.append(z) or z)  # keep each image's final latents
        images = [exact(p, seed=i).images[0] for i, p in enumerate(BUNDLED_PROMPTS)]
        decoded = [psnr(fast.decode(z)[0], im) for z, im in zip(finals, images)]
        whole = [psnr(fast(p, seed=i).images[0], im) for (i, p), im in zip(enumerate(BUNDLED_PROMPTS), images)]
        # the same with a deterministic sampler, where bf16 rounding cannot pick other noise paths
        ode = [psnr(fast(p, seed=i, sampler="dpmpp_2m").images[0], exact(p, seed=i, sampler="dpmpp_2m").images[0])
               for i, p in enumerate(BUNDLED_PROMPTS)]
        print(f"{name}: optimize()'s autoencoder ({fast.vae.decoder.conv_in.weight.dtype}) decoding float32's latents: "
              f"{decoded} dB; optimize()'s whole image: {whole} dB at the model's defaults ({exact.defaults.sampler}), "
              f"{ode} dB with dpmpp_2m")


if __name__ == "__main__":
    main()
