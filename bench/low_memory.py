"""Peak memory of one CPU generation, plain and in low-memory mode, for SD 1.5 and SDXL base at
full size (random weights).

    python bench/low_memory.py --model sd15 --dir /var/tmp/unfog-lowmem      # prepare once, then measure
    python bench/low_memory.py --model sdxl --dir /var/tmp/unfog-lowmem

Prepare writes an unfog model folder with random weights in DIR (SD 1.5 in float32, 4.3 GB;
SDXL base in bfloat16, 7 GB: the U-Net, both text encoders and the autoencoder at their
published sizes, built from diffusers' and transformers' configs). Then, for each mode, a fresh
process loads the folder in that dtype (`from_pretrained(low_memory=...)`), makes one image at
the model's native size (`--steps` DPM-Solver++(2M) steps, guidance 7.5: the peak does not
depend on the step count) and reports its peak resident memory (VmHWM, torch included) after
loading and after the image, each network's weights, the seconds, and in low-memory mode the
resident memory just before and after the text encoders are released.
Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from sdxl_cpu import SDXL_BASE_UNET, peak_rss  # noqa: E402

CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
              hidden_act="quick_gelu")
BIG_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, max_position_embeddings=77,
             hidden_act="gelu", projection_dim=1280)
VAE = dict(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
           layers_per_block=2, latent_channels=4, in_channels=3, out_channels=3, norm_num_groups=32, scaling_factor=0.18215)
MODELS = {"sd15": (torch.float32, 512), "sdxl": (torch.bfloat16, 1024)}


def _random(module: torch.nn.Module, dtype: torch.dtype, g: torch.Generator) -> torch.nn.Module:
    module = module.to_empty(device="cpu").to(dtype)
    with torch.no_grad():
        for t in module.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * 0.02)
    return module.eval()


def prepare(which: str, folder: Path) -> None:
    """Write a full-size model folder with random weights (see the module docstring)."""
    import diffusers

    from clip_bytes import write_tiny_clip_vocab
    from unfog import Pipeline
    from unfog.diffusion import SamplingDefaults, SchedulerConfig
    from unfog.formats.diffusers_folder import clip_tokenizer
    from unfog.formats.keymaps import text_encoder_config_from_transformers, unet_config_from_diffusers, vae_config_from_diffusers
    from unfog.nn import Autoencoder, TextEncoder, UNet

    dtype, size = MODELS[which]
    g = torch.Generator().manual_seed(0)
    write_tiny_clip_vocab(folder / "_tok")
    tokenizer = clip_tokenizer(folder / "_tok")
    with torch.device("meta"):
        unet_cfg = SDXL_BASE_UNET if which == "sdxl" else dict(cross_attention_dim=768, attention_head_dim=8, sample_size=64)
        unet_cfg = dict(diffusers.UNet2DConditionModel(**unet_cfg).config)
        unet = UNet(unet_config_from_diffusers(unet_cfg))
        vae = Autoencoder(vae_config_from_diffusers({**VAE, "scaling_factor": 0.13025 if which == "sdxl" else 0.18215}))
        te = TextEncoder(text_encoder_config_from_transformers(CLIP_L, sdxl=which == "sdxl"))
        te2 = TextEncoder(text_encoder_config_from_transformers(BIG_G, sdxl=True, projection=True)) if which == "sdxl" else None
    parts = [_random(m, dtype, g) if m is not None else None for m in (unet, vae, te, te2)]
    pipe = Pipeline(tokenizer, parts[2], parts[0], parts[1], SchedulerConfig(), SamplingDefaults(height=size, width=size),
                    tokenizer_2=tokenizer if which == "sdxl" else None, text_encoder_2=parts[3], force_zeros_for_empty_prompt=which == "sdxl")
    pipe.save_pretrained(folder / which)


def rss() -> int:
    """This process's resident memory now, in bytes (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def measure(folder: Path, dtype: torch.dtype, low_memory: bool, steps: int) -> dict:
    from unfog import Pipeline

    base = peak_rss()
    t = time.perf_counter()
    pipe = Pipeline.from_pretrained(folder, dtype=dtype)
    load_s, after_load = time.perf_counter() - t, peak_rss()
    nets = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    sizes = {name: sum(t.numel() * t.element_size() for t in m.state_dict().values()) for name, m in nets.items() if m is not None}
    released = {}
    if low_memory:  # what from_pretrained(low_memory=True) does after loading
        released["rss_before_release_bytes"] = rss()
        pipe.enable_low_memory()
        released["rss_after_release_bytes"] = rss()
    t = time.perf_counter()
    pipe("a photo of an astronaut riding a horse on mars", num_inference_steps=steps, seed=0)
    return {"low_memory": low_memory, "rss_before_load_bytes": base, "peak_after_load_bytes": after_load, "peak_after_image_bytes": peak_rss(),
            "weights_bytes": sizes, **released, "load_s": round(load_s, 1), "image_s": round(time.perf_counter() - t, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="sd15")
    ap.add_argument("--dir", required=True, help="where the random model folder is written")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--measure", choices=["plain", "low"], help=argparse.SUPPRESS)  # the fresh child process
    args = ap.parse_args()
    folder = Path(args.dir) / args.model
    dtype, size = MODELS[args.model]
    if args.measure:
        print(json.dumps(measure(folder, dtype, args.measure == "low", args.steps)))
        return
    if not (folder / "model_index.json").is_file():
        print(f"writing a random full-size {args.model} model to {folder} …", file=sys.stderr)
        prepare(args.model, Path(args.dir))
    rows = []
    for mode in ("plain", "low"):
        out = subprocess.run([sys.executable, __file__, "--measure", mode, "--model", args.model, "--dir", args.dir, "--steps", str(args.steps)],
                             check=True, capture_output=True, text=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    gb = 1e9
    print(json.dumps({"model": args.model, "dtype": str(dtype).replace("torch.", ""), "size": size, "steps": args.steps, "runs": rows,
                      "peak_gb": {("low_memory" if r["low_memory"] else "plain"): round(r["peak_after_image_bytes"] / gb, 2) for r in rows}}, indent=2))


if __name__ == "__main__":
    main()
