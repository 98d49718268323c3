"""The `unfog` command line's arguments: one sub-command per task (unfog.cli runs them).

Each sub-command's parser sets `func` to the command's name in `unfog.cli.COMMANDS`.
"""

from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    """The `unfog` argument parser: one sub-command per task."""
    from . import __version__

    parser = argparse.ArgumentParser(prog="unfog", description="Text-to-image diffusion from first principles.")
    parser.add_argument("--version", action="version", version=f"unfog {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_generate_parser, _noise_parser, _data_parser, _train_parser, _export_parser, _convert_parser, _serve_parser, _eval_parser):
        add(sub)
    return parser


def _generate_parser(sub) -> None:
    """`unfog generate`: make images from a prompt."""
    from .diffusion import SIGMA_SCHEDULES
    from .samplers import SAMPLERS

    g = sub.add_parser("generate", help="make images from a prompt")
    g.add_argument("prompt", nargs="?", help="what to draw (optional with --from-png)")
    g.add_argument("--from-png", help="make an image again from the settings stored in a PNG (unfog's, or A1111's parameters); flags given override them")
    g.add_argument("-o", "--output", default="out.png", help="output image (several images get -0, -1, … suffixes)")
    g.add_argument("--steps", type=int, help="number of denoising steps (model default if omitted)")
    g.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    g.add_argument("--seed", type=int, help="seed of the first image; image k uses seed + k")
    g.add_argument("--sampler", choices=sorted(SAMPLERS), help="sampling algorithm")
    g.add_argument("--schedule", choices=SIGMA_SCHEDULES, help="sigma schedule (the model's own if omitted)")
    g.add_argument("--sampler-option", action="append", default=[], metavar="NAME=VALUE",
                   help="a sampler option, e.g. eta=0.5, s_churn=10, noise=brownian, solver_type=heun (repeatable)")
    g.add_argument("--negative", help="negative prompt")
    g.add_argument("--prompt-2", help="SDXL: the prompt for the second text encoder (default: the prompt)")
    g.add_argument("--negative-2", help="SDXL: the negative prompt for the second text encoder (default: --negative)")
    g.add_argument("--cfg-truncation", type=float, metavar="F",
                   help="skip the unconditional pass after this fraction of the steps (faster; see README, Performance)")
    g.add_argument("--deep-cache", type=int, metavar="K",
                   help="DeepCache: run the U-Net whole every K calls and only its shallowest level in between (faster; see README, Performance)")
    g.add_argument("--prompt-syntax", choices=["a1111", "plain"], default="a1111",
                   help="a1111 (default): (emphasis:1.2), [less], BREAK, <lora:NAME:w> from --lora-dir; plain: the text as it is")
    g.add_argument("--lora-dir", help="where <lora:NAME:w> tags in the prompt find NAME.safetensors")
    g.add_argument("--lora", action="append", metavar="PATH[:WEIGHT]", help="load a LoRA file (kohya, LyCORIS or diffusers) at a weight (default 1); repeatable")
    g.add_argument("--embedding", action="append", metavar="PATH", help="load a textual-inversion embedding; its file name is its token; repeatable")
    g.add_argument("--refiner", help="SDXL: a refiner model that runs the last steps on the base model's latents")
    g.add_argument("--refiner-start", type=float, default=0.8, help="SDXL: the fraction of the schedule the base runs before the refiner takes over (default 0.8)")
    g.add_argument("--refiner-config", help="SDXL: a diffusers-layout config folder for a single-file refiner")
    g.add_argument("--num-images", type=int, default=1)
    g.add_argument("--height", type=int)
    g.add_argument("--width", type=int)
    g.add_argument("--model", help="unfog or diffusers model folder, or single-file SD checkpoint, or a bundled model by name: shapes, emoji (default: the bundled default, shapes)")
    g.add_argument("--config", help="single-file checkpoints: a diffusers-layout config folder")
    g.add_argument("--tokenizer", help="single-file checkpoints: a CLIP tokenizer folder")
    g.add_argument("--clip-skip", type=int, default=0)
    g.add_argument("--device", help="cpu, cuda, cuda:1, mps …")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    g.add_argument("--optimize", action="store_true", help="the fast path: pipe.optimize() (bf16 U-Net and autoencoder where the hardware has it; on CUDA also the guided denoiser as one CUDA graph)")
    g.add_argument("--low-memory", action="store_true", help="CPU: keep the text encoders on disk except while they encode; CUDA: each network on the GPU only while it runs (pipe.enable_low_memory())")
    g.add_argument("--init-image", help="img2img / inpainting: the starting picture")
    g.add_argument("--strength", type=float, help="img2img: how far to re-noise the init image, (0, 1] (default 0.8; 1 with --mask)")
    g.add_argument("--mask", help="inpainting: a mask image, white = repaint")
    g.add_argument("--trajectory", help="also save a strip of the x0 estimates along the way")
    g.add_argument("--trajectory-frames", type=int, default=8)
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func="generate")


def _noise_parser(sub) -> None:
    """`unfog noise`: the forward process on an image."""
    n = sub.add_parser("noise", help="show the forward process on an image: x_0 → x_T")
    n.add_argument("image")
    n.add_argument("-o", "--output", default="noise.png")
    n.add_argument("--frames", type=int, default=8)
    n.add_argument("--schedule", default="linear", help="beta schedule: linear, scaled_linear, cosine")
    n.add_argument("--beta-start", type=float, default=0.0001)
    n.add_argument("--beta-end", type=float, default=0.02)
    n.add_argument("--size", type=int, help="resize the image to SIZE×SIZE first")
    n.add_argument("--seed", type=int, default=0)
    n.set_defaults(func="noise")


def _data_parser(sub) -> None:
    """`unfog data`: datasets."""
    d = sub.add_parser("data", help="make datasets")
    dsub = d.add_subparsers(dest="dataset", required=True)
    for name, what in (("shapes", "shapes-v1"), ("emoji", "emoji-scenes")):
        ds = dsub.add_parser(name, help=f"render {what} images + metadata.jsonl")
        ds.add_argument("out_dir")
        ds.add_argument("--count", type=int, default=1000)
        ds.add_argument("--seed", type=int, default=0)
        ds.set_defaults(func="data_world")


def _train_parser(sub) -> None:
    """`unfog train`: training."""
    from .train.config import PRESETS

    t = sub.add_parser("train", help="train an autoencoder or a text-to-image model")
    t.add_argument("--data", required=True, help="an image+caption folder, or 'shapes' / 'emoji' for the endless shapes-v1 / emoji-scenes stream")
    t.add_argument("--preset", choices=sorted(PRESETS), help="the settings to start from (default with --lora-rank: lora)")
    t.add_argument("--out", required=True, help="run folder: config, checkpoints, metrics, samples")
    t.add_argument("--vae", help="autoencoder run or model folder (diffusion stage)")
    t.add_argument("--init", help="fine-tune: start from this model's weights (diffusion stage); with --lora-rank any model unfog loads")
    t.add_argument("--lora-rank", type=int, help="train a LoRA of this rank beside the frozen --init model instead of the whole model")
    t.add_argument("--lora-alpha", type=float, help="LoRA alpha (scale alpha/rank; default: the rank)")
    t.add_argument("--lora-text-encoder", action="store_true", help="also train adapters on the text encoder")
    t.add_argument("--resolution", type=int, help="training image size (default: the preset's; for a LoRA the model's own)")
    t.add_argument("--fsdp", action="store_true", help="under torchrun: shard the model, gradients, optimizer state and EMA across the processes (FSDP2)")
    t.add_argument("--gradient-checkpointing", action="store_true", help="recompute U-Net activations in the backward pass (less memory)")
    t.add_argument("--buckets", action="store_true", help="image folders: aspect-ratio buckets (sides multiples of 64) instead of square crops")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    t.add_argument("--max-steps", type=int)
    t.add_argument("--batch-size", type=int, help="global batch size")
    t.add_argument("--grad-accum", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--warmup-steps", type=int)
    t.add_argument("--ema-decay", type=float)
    t.add_argument("--seed", type=int)
    t.add_argument("--precision", choices=["auto", "bf16", "fp32"])
    t.add_argument("--pool", type=int, help="shapes, emoji: wrap the stream to N images and cache their latents")
    t.add_argument("--checkpoint-every", type=int)
    t.add_argument("--sample-every", type=int)
    t.add_argument("--device")
    t.add_argument("--skip-bad", action="store_true", help="skip unreadable images and missing captions")
    t.add_argument("-q", "--quiet", action="store_true")
    t.set_defaults(func="train")


def _export_parser(sub) -> None:
    """`unfog export`: a run's EMA weights as a model folder."""
    x = sub.add_parser("export", help="write a run's EMA weights as a model folder")
    x.add_argument("run_dir")
    x.add_argument("out_dir", help="the model folder to write (with --lora: the .safetensors file)")
    x.add_argument("--lora", action="store_true", help="a LoRA run: write its adapters as a kohya-format .safetensors that unfog, diffusers, A1111 and ComfyUI load")
    x.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32", help="storage precision")
    x.set_defaults(func="export")


def _convert_parser(sub) -> None:
    """`unfog convert`: Stable Diffusion weights to an unfog folder."""
    c = sub.add_parser("convert", help="convert Stable Diffusion weights (diffusers folder, single file, pickle) to an unfog model folder")
    c.add_argument("input", help="diffusers-layout folder, single-file .safetensors, or .ckpt/.pt with --allow-pickle")
    c.add_argument("output", help="unfog model folder to write")
    c.add_argument("--allow-pickle", action="store_true", help="read a pickle checkpoint with torch.load(weights_only=True)")
    c.add_argument("--config", help="single files: a diffusers-layout config folder (configs, tokenizer, scheduler)")
    c.add_argument("--tokenizer", help="single files without --config: a CLIP tokenizer folder")
    c.add_argument("--prediction-type", choices=["epsilon", "v_prediction", "sample"])
    c.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    c.set_defaults(func="convert")


def _serve_parser(sub) -> None:
    """`unfog serve`: the HTTP API and web page."""
    v = sub.add_parser("serve", help="HTTP API and web page")
    v.add_argument("--model", help="model folder or checkpoint (default: the bundled model)")
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=7860)
    v.add_argument("--token", help="require Authorization: Bearer TOKEN on every API call (needed off loopback)")
    v.add_argument("--device")
    v.add_argument("--max-queue", type=int, default=16)
    v.add_argument("--job-timeout", type=float, default=600.0, help="seconds")
    v.add_argument("--max-side", type=int, default=2048)
    v.add_argument("--max-steps", type=int, default=150)
    v.add_argument("--max-images", type=int, default=8)
    v.add_argument("--lora-dir", help="where <lora:NAME:w> tags in prompts find NAME.safetensors")
    v.add_argument("--lora", action="append", metavar="PATH[:WEIGHT]", help="load a LoRA file for every request; repeatable")
    v.add_argument("--embedding", action="append", metavar="PATH", help="load a textual-inversion embedding; repeatable")
    v.add_argument("--max-work", type=float, default=200.0, help="a request's total work limit, megapixels × steps × images")
    v.add_argument("--optimize", action="store_true", help="serve through pipe.optimize()")
    v.add_argument("--low-memory", action="store_true", help="CPU: keep the text encoders on disk except while they encode; CUDA: each network on the GPU only while it runs")
    v.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="load the model in this precision (bfloat16 halves the memory; SDXL on a CPU)")
    v.add_argument("--compile", action="store_true", help="with --optimize: also torch.compile the U-Net (compiled per size: the default size at start-up, see --warmup)")
    v.add_argument("--warmup", metavar="WxH[,WxH]", help="run one short generation at each size before serving, so the first requests "
                   "do not pay for compiling (default with --compile: the model's default size)")
    v.add_argument("--ray", action="store_true", help="serve on Ray Serve with --replicas model replicas (pip install 'unfog[ray]')")
    v.add_argument("--replicas", type=int, default=1, help="--ray: model replicas (one per GPU with --device cuda, else CPU workers)")
    v.add_argument("--ingresses", type=int, default=1, help="--ray: HTTP ingress replicas (any of them answers for any job)")
    v.add_argument("--max-batch", type=int, help="--ray: run up to N queued jobs of the same size and settings as one batch "
                   "(default: 4 on a GPU, 1 on a CPU, where batching gains little)")
    v.add_argument("--ray-address", help="--ray: join this Ray cluster (e.g. ray://head:10001 or auto) instead of starting a local one")
    v.set_defaults(func="serve")


def _eval_parser(sub) -> None:
    """`unfog eval`: measurements of a model."""
    e = sub.add_parser("eval", help="measure a model")
    esub = e.add_subparsers(dest="suite", required=True)
    for name, what, default in (("shapes", "shapes-v1", "the bundled default model"), ("emoji", "emoji-scenes", "the bundled emoji model")):
        es = esub.add_parser(name, help=f"prompt adherence on {what}")
        es.add_argument("model", nargs="?", help=f"model folder (default: {default})")
        es.add_argument("--prompts", type=int, default=500)
        es.add_argument("--seed", type=int, default=0)
        es.add_argument("--steps", type=int)
        es.add_argument("--guidance", type=float)
        es.add_argument("--sampler")
        es.add_argument("--device")
        es.add_argument("--json", help="also write the scores as JSON")
        es.add_argument("--grid", help="also save the first 64 images as a grid PNG")
        es.add_argument("-q", "--quiet", action="store_true")
        if name == "emoji":
            es.add_argument("--images", help="score an .npz of generated images (images, prompts) instead of a model; --seed is the one they were drawn with")
        es.set_defaults(func="eval")
