"""The `unfog` command line: a thin front end over the pipeline."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import UnfogError


def _grid(images, columns: int | None = None):
    from PIL import Image

    columns = columns or len(images)
    rows = (len(images) + columns - 1) // columns
    w, h = images[0].size
    grid = Image.new("RGB", (columns * w, rows * h), "white")
    for k, im in enumerate(images):
        grid.paste(im, ((k % columns) * w, (k // columns) * h))
    return grid


def _output_paths(out: Path, n: int) -> list[Path]:
    if n == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{k}{out.suffix}") for k in range(n)]


def cmd_generate(args: argparse.Namespace) -> None:
    import torch

    from .pipeline import Pipeline

    if args.trajectory_frames < 2:
        raise UnfogError("--trajectory-frames must be at least 2")
    pipe = Pipeline.from_pretrained(args.model)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype] if args.dtype else None
    pipe.to(args.device, dtype)
    trajectory: list = []
    steps = args.steps if args.steps is not None else pipe.defaults["num_inference_steps"]
    keep = {round(k * (steps - 1) / (args.trajectory_frames - 1)) for k in range(args.trajectory_frames)}

    def record(i, x, x0):
        if args.trajectory and i in keep:
            trajectory.append(x0[:1].clone())

    result = pipe(
        args.prompt,
        negative_prompt=args.negative,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        sampler=args.sampler,
        height=args.height,
        width=args.width,
        num_images_per_prompt=args.num_images,
        seed=args.seed,
        callback=record,
        progress=not args.quiet,
    )
    out = Path(args.output)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise UnfogError(f"output {out} must end in .png, .jpg or .webp")
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, image, seed in zip(_output_paths(out, len(result.images)), result.images, result.seeds):
        image.save(path)
        print(f"{path}  seed={seed}")
    if args.trajectory:
        frames = [im for x0 in trajectory for im in pipe.decode(x0)]
        _grid(frames).save(args.trajectory)
        print(f"{args.trajectory}  x0 estimates at {len(frames)} of {steps} steps")


def cmd_noise(args: argparse.Namespace) -> None:
    import numpy as np
    import torch
    from PIL import Image

    from .diffusion import SchedulerConfig, q_sample
    from .pipeline import to_pil

    if args.frames < 2:
        raise UnfogError("--frames must be at least 2")
    try:
        image = Image.open(args.image).convert("RGB")
    except (OSError, ValueError) as e:
        raise UnfogError(f"cannot read image {args.image}: {e}") from None
    if args.size:
        image = image.resize((args.size, args.size), Image.BICUBIC)
    x0 = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    sched = SchedulerConfig(beta_schedule=args.schedule, beta_start=args.beta_start, beta_end=args.beta_end)
    ac = sched.alphas_cumprod().float()
    T = len(ac)
    ts = torch.tensor([round(k * (T - 1) / (args.frames - 1)) for k in range(args.frames)])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(args.seed))
    frames = to_pil(q_sample(x0.expand(len(ts), -1, -1, -1), ts, noise.expand(len(ts), -1, -1, -1), ac))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    _grid(frames).save(args.output)
    print(f"{args.output}  x_t at t = {', '.join(str(int(t)) for t in ts)}")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .samplers import SAMPLERS

    parser = argparse.ArgumentParser(prog="unfog", description="Text-to-image diffusion from first principles.")
    parser.add_argument("--version", action="version", version=f"unfog {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="make images from a prompt")
    g.add_argument("prompt")
    g.add_argument("-o", "--output", default="out.png", help="output image (several images get -0, -1, … suffixes)")
    g.add_argument("--steps", type=int, help="number of denoising steps (model default if omitted)")
    g.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    g.add_argument("--seed", type=int, help="seed of the first image; image k uses seed + k")
    g.add_argument("--sampler", choices=sorted(SAMPLERS), help="sampling algorithm")
    g.add_argument("--negative", help="negative prompt")
    g.add_argument("--num-images", type=int, default=1)
    g.add_argument("--height", type=int)
    g.add_argument("--width", type=int)
    g.add_argument("--model", help="model folder (default: the bundled model)")
    g.add_argument("--device", help="cpu, cuda, cuda:1, mps …")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    g.add_argument("--trajectory", help="also save a strip of the x0 estimates along the way")
    g.add_argument("--trajectory-frames", type=int, default=8)
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=cmd_generate)

    n = sub.add_parser("noise", help="show the forward process on an image: x_0 → x_T")
    n.add_argument("image")
    n.add_argument("-o", "--output", default="noise.png")
    n.add_argument("--frames", type=int, default=8)
    n.add_argument("--schedule", default="linear", help="beta schedule: linear, scaled_linear, cosine")
    n.add_argument("--beta-start", type=float, default=0.0001)
    n.add_argument("--beta-end", type=float, default=0.02)
    n.add_argument("--size", type=int, help="resize the image to SIZE×SIZE first")
    n.add_argument("--seed", type=int, default=0)
    n.set_defaults(func=cmd_noise)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UnfogError as e:
        print(f"unfog: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("unfog: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
