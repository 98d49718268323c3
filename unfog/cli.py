"""The `unfog` command line: a thin front end over the pipeline."""

from __future__ import annotations

import argparse
import io
import os
import re
import sys
from pathlib import Path

from . import errors
from .errors import UnfogError


def _open_image(path: str | None, flag: str):
    """A PIL image from a CLI path (None stays None); unreadable files are a clear error."""
    if not path:
        return None
    from PIL import Image

    from .images import upright

    try:
        image = Image.open(path)
        image.load()
        return upright(image)  # a phone photo as it is shown, so an --init-image and a --mask drawn on it line up
    except (OSError, ValueError) as e:
        raise UnfogError(f"cannot read {flag} {path}: {e}") from None


def _check_output(path: str | None, flag: str, images: int = 1) -> None:
    """Refuse an output path that could not be written, before any work: no name, a folder (also
    any of a batch's numbered names), or an extension no image format has."""
    if path is None:
        return
    from PIL import Image

    p = Path(path)
    if not path or p.is_dir():
        raise UnfogError(f"{flag} must name an image file (e.g. out.png), got {path!r}")
    taken = [q for q in _output_paths(p, images) if q.is_dir()]
    if taken:
        raise UnfogError(f"{taken[0]} is a folder; choose another {flag}")
    if p.suffix.lower() not in Image.registered_extensions():
        raise UnfogError(f"{flag} {path!r} has no image extension PIL can write; use .png, .jpg or .webp")
    try:  # an extension PIL knows is not always a format that can hold an RGB image (.xbm, .h5, …)
        Image.new("RGB", (1, 1)).save(io.BytesIO(), format=Image.registered_extensions()[p.suffix.lower()])
    except (OSError, KeyError, ValueError):
        raise UnfogError(f"{flag} {path!r}: PIL cannot write an RGB image as {p.suffix}; use .png, .jpg or .webp") from None
    folder = p.parent  # made at the end if missing: the nearest one that exists must be a folder we can write in
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise UnfogError(f"{flag} {path!r}: {folder} is not a folder")
    if not os.access(folder, os.W_OK):
        raise UnfogError(f"{flag} {path!r}: the folder {folder} is not writable")


def _png_settings(path: str | None) -> dict:
    """The generation settings stored in a PNG (unfog's own, or A1111's parameters line)."""
    if not path:
        return {}
    from .request import settings_from_png

    image = _open_image(path, "--from-png")
    return settings_from_png({k: v for k, v in getattr(image, "text", {}).items() if isinstance(v, str)})


def _placed(pipe, args):
    """The pipeline on --device; with --low-memory on CUDA, resting on the CPU with each network
    on the GPU only while it runs (so the whole model never has to fit on the GPU at once)."""
    import torch

    if args.low_memory and args.device and torch.device(args.device).type == "cuda":
        return pipe.enable_low_memory(device=args.device)
    return pipe.to(args.device)


def _check_device(device: str | None) -> None:
    """Refuse a device this torch cannot use, before the model is loaded."""
    if device is not None:
        errors.device(device, "--device")


def _sampler_options(pairs: list[str]) -> dict | None:
    """NAME=VALUE strings as sampler options: numbers where they parse as numbers, else names."""
    options = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise UnfogError(f"--sampler-option takes NAME=VALUE, got {pair!r}")
        try:
            options[name] = int(value)
        except ValueError:
            try:
                options[name] = float(value)
            except ValueError:
                options[name] = value
    return options or None


def _output_paths(out: Path, n: int) -> list[Path]:
    if n == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{k}{out.suffix}") for k in range(n)]


def _adapters(pipe, args) -> None:
    """--lora PATH[:WEIGHT] and --embedding PATH, loaded before any generation."""
    names, weights = [], []
    for spec in args.lora or []:
        path, _, weight = spec.rpartition(":") if re.search(r":-?[\d.]+$", spec) else (spec, "", "")
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            raise UnfogError(f"--lora {spec}: the weight after ':' must be a number") from None
        names.append(pipe.load_lora_weights(path))
        weights.append(w)
    if names:
        pipe.set_adapters(names, weights)
    for path in args.embedding or []:
        pipe.load_textual_inversion(path)


def cmd_generate(args: argparse.Namespace) -> None:
    import torch

    from .images import grid, save
    from .pipeline import Pipeline
    from .request import png_text

    if args.trajectory_frames < 2:
        raise UnfogError("--trajectory-frames must be at least 2")
    _check_output(args.output, "-o/--output", args.num_images)
    _check_output(args.trajectory, "--trajectory")
    if args.trajectory and Path(args.trajectory).resolve() in {q.resolve() for q in _output_paths(Path(args.output), args.num_images)}:
        raise UnfogError("--trajectory names an image that -o/--output writes; choose another name for one of them")
    _check_device(args.device)
    options = {k: v for k, v in (("config", args.config), ("tokenizer", args.tokenizer), ("clip_skip", args.clip_skip)) if v}
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype] if args.dtype else None
    pipe = _placed(Pipeline.from_pretrained(args.model, dtype=dtype, **options), args)  # loaded straight into dtype: no float32 copy
    _adapters(pipe, args)
    if args.optimize:
        pipe.optimize()
    if args.low_memory:  # (after _placed's offload on CUDA, a no-op)
        pipe.enable_low_memory()
    trajectory: list = []

    def record(i, x, x0):
        if args.trajectory:
            trajectory.append(x0[:1].clone())

    png = _png_settings(args.from_png)

    def pick(value, key):
        return value if value is not None else png.get(key)

    prompt = pick(args.prompt, "prompt")
    if prompt is None:
        raise UnfogError("give a prompt, or --from-png IMAGE to make an image again from its settings")
    sdxl = {k: v for k, v in (("prompt_2", args.prompt_2), ("negative_prompt_2", args.negative_2)) if v is not None}
    refiner = None
    if args.refiner:
        if not 0 < args.refiner_start < 1:
            raise UnfogError(f"--refiner-start must be a fraction between 0 and 1, got {args.refiner_start}")
        if args.init_image or args.mask:
            raise UnfogError("--refiner refines a text-to-image generation; it does not combine with --init-image or --mask")
        refiner = Pipeline.from_pretrained(args.refiner, dtype=dtype, **({"config": args.refiner_config} if args.refiner_config else {}))
        if refiner.sdxl != "refiner" or pipe.sdxl != "base":
            raise UnfogError(f"--refiner needs an SDXL base as --model and an SDXL refiner as --refiner; got {pipe.sdxl or 'a non-SDXL model'} "
                             f"and {refiner.sdxl or 'a non-SDXL model'}")
        refiner = _placed(refiner, args)
        if args.optimize:
            refiner.optimize()
        if args.low_memory:  # (after _placed's offload on CUDA, a no-op)
            refiner.enable_low_memory()
        sdxl.update(denoising_end=args.refiner_start, output_type="latent")
    result = pipe(
        prompt,
        **sdxl,
        prompt_syntax=args.prompt_syntax,
        cfg_truncation=args.cfg_truncation,
        deep_cache=args.deep_cache,
        **({"lora_dir": args.lora_dir} if args.prompt_syntax == "a1111" else {}),
        image=_open_image(args.init_image, "--init-image"),
        mask_image=_open_image(args.mask, "--mask"),
        strength=args.strength,
        negative_prompt=pick(args.negative, "negative_prompt"),
        num_inference_steps=pick(args.steps, "steps"),
        guidance_scale=pick(args.guidance, "guidance_scale"),
        sampler=pick(args.sampler, "sampler"),
        sigma_schedule=pick(args.schedule, "sigma_schedule"),
        sampler_options=_sampler_options(args.sampler_option) or png.get("sampler_options") or None,
        height=pick(args.height, "height"),
        width=pick(args.width, "width"),
        num_images_per_prompt=args.num_images,
        seed=pick(args.seed, "seed"),
        callback=record,
        progress=not args.quiet,
    )
    if refiner is not None:  # the base's partly denoised latents go on through the refiner's last steps
        r = result.request
        result = refiner(r.prompts[:: args.num_images], image=result.latents, denoising_start=args.refiner_start, negative_prompt=r.negative_prompts[:: args.num_images],
                         num_inference_steps=r.num_inference_steps, guidance_scale=r.guidance_scale, sampler=r.sampler, sigma_schedule=r.sigma_schedule,
                         sampler_options=r.sampler_options or None, num_images_per_prompt=args.num_images, seed=r.seeds, progress=not args.quiet,
                         prompt_syntax=args.prompt_syntax)  # parsed as the base parsed them (its <lora:> tags are already out)
    if not args.quiet:
        for g in pipe.denoiser_graphs.values():
            if g.graph is not None:
                print(f"guided denoiser captured as one CUDA graph in {g.warmup_s:.2f} s", file=sys.stderr)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    model_name = Path(args.model).name if args.model else "unfog-default"
    for k, (path, image) in enumerate(zip(_output_paths(out, len(result.images)), result.images)):
        save(image, path, png_text(result.request, k, model_name))  # the settings ride along (PNG only)
        print(f"{path}  seed={result.seeds[k]}")
    if args.trajectory:
        n = len(trajectory)
        picks = sorted({round(k * (n - 1) / (args.trajectory_frames - 1)) for k in range(args.trajectory_frames)})
        frames = [im for k in picks for im in pipe.decode(trajectory[k])]
        Path(args.trajectory).parent.mkdir(parents=True, exist_ok=True)
        save(grid(frames), args.trajectory)
        print(f"{args.trajectory}  x0 estimates at {len(frames)} of {n} steps")


def cmd_noise(args: argparse.Namespace) -> None:
    import torch
    from PIL import Image

    from .diffusion import SchedulerConfig, q_sample
    from .images import from_pil, grid, rgb, save, to_pil

    _check_output(args.output, "-o/--output")
    if not 2 <= args.frames <= 100:
        raise UnfogError(f"--frames must be from 2 to 100, got {args.frames}")
    if args.size is not None and not 1 <= args.size <= 4096:
        raise UnfogError(f"--size must be from 1 to 4096 pixels, got {args.size}")
    image = rgb(_open_image(args.image, "image"))
    if args.size:
        image = image.resize((args.size, args.size), Image.BICUBIC)
    x0 = from_pil(image)
    sched = SchedulerConfig(beta_schedule=args.schedule, beta_start=args.beta_start, beta_end=args.beta_end)
    ac = sched.alphas_cumprod().float()
    T = len(ac)
    ts = torch.tensor([round(k * (T - 1) / (args.frames - 1)) for k in range(args.frames)])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(args.seed))
    frames = to_pil(q_sample(x0.expand(len(ts), -1, -1, -1), ts, noise.expand(len(ts), -1, -1, -1), ac))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    save(grid(frames), args.output)
    print(f"{args.output}  x_t at t = {', '.join(str(int(t)) for t in ts)}")


def cmd_data_world(args: argparse.Namespace) -> None:
    """`unfog data shapes|emoji DIR`: render a procedural world's images + metadata.jsonl."""
    import importlib

    if args.count < 1:
        raise UnfogError("--count must be at least 1")
    world = importlib.import_module(f".data.{args.dataset}", __package__)
    out = world.write_dataset(args.out_dir, args.count, args.seed)
    print(f"{out}  {args.count} images + metadata.jsonl")


def _data_source(args, config):
    """The dataset, or (resolution unknown until the model is loaded) a function of the resolution."""
    from .data.folder import ImageCaptionFolder

    def make(resolution, factor=64):  # buckets' sides: multiples of the model's pixel factor (SD: 64, as kohya's)
        if args.data == "shapes":
            from .data.shapes import ShapesStream

            return ShapesStream(seed=config.seed, pool=config.data_pool, resolution=resolution)
        if args.data == "emoji":
            from .data.emoji import EmojiStream

            return EmojiStream(seed=config.seed, pool=config.data_pool, resolution=resolution)
        data = ImageCaptionFolder(args.data, resolution, skip_bad=args.skip_bad, buckets=factor if config.buckets else None)
        if data.skipped:
            print(f"skipped {len(data.skipped)} bad files, e.g. {data.skipped[0][0]}: {data.skipped[0][1]}", file=sys.stderr)
        return data

    if args.data not in ("shapes", "emoji") and not Path(args.data).is_dir():
        raise UnfogError(f"dataset folder {args.data} does not exist")
    return make if not config.resolution else make(config.resolution)


def cmd_train(args: argparse.Namespace) -> None:
    from .train import Trainer, preset

    overrides = {"max_steps": args.max_steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, "warmup_steps": args.warmup_steps, "ema_decay": args.ema_decay,
                 "grad_accum": args.grad_accum, "precision": args.precision, "data_pool": args.pool,
                 "checkpoint_every": args.checkpoint_every, "sample_every": args.sample_every, "resolution": args.resolution,
                 "lora_rank": args.lora_rank, "lora_alpha": args.lora_alpha, "lora_text_encoder": args.lora_text_encoder or None,
                 "gradient_checkpointing": args.gradient_checkpointing or None, "buckets": args.buckets or None, "fsdp": args.fsdp or None}
    name = args.preset or ("lora" if args.lora_rank else None)
    if name is None:
        raise UnfogError("choose a --preset (or --lora-rank R with --init MODEL to train a LoRA)")
    config = preset(name, **overrides)
    given = {k: v for k, v in overrides.items() if v is not None}
    trainer = Trainer(config, _data_source(args, config), args.out, vae=args.vae, init=args.init, device=args.device, resume=args.resume,
                      progress=not args.quiet, resume_overrides=given if args.resume else None)
    summary = trainer.run()
    if trainer.rank == 0:
        print(f"{args.out}  step {summary['step']}  loss {summary['loss']:.4f}  {summary['images_per_s']:.1f} images/s  {summary['seconds']:.0f} s"
              + (f"  (stopped by {summary['stopped']}; continue with --resume)" if summary["stopped"] else ""))


def cmd_export(args: argparse.Namespace) -> None:
    import torch

    from .train import export
    from .train.lora import export_lora

    dtype = {"float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    print(export_lora(args.run_dir, args.out_dir, dtype) if args.lora else export(args.run_dir, args.out_dir, dtype))


def cmd_convert(args: argparse.Namespace) -> None:
    import torch

    from .formats import load_any, save_model
    from .formats.folder import check_save_target
    from .formats.single_file import parts_from_state, read_pickle_checkpoint

    check_save_target(args.output)  # before a load that can take minutes
    src = Path(args.input)
    options = {"config": args.config, "tokenizer": args.tokenizer, "prediction_type": args.prediction_type}
    if src.is_file() and src.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        if not args.allow_pickle:
            raise UnfogError(f"{src} is a pickle; loading one can run arbitrary code. If you trust its source, pass --allow-pickle "
                             "(it is then read with torch.load(weights_only=True), which only builds tensors)")
        parts = parts_from_state(read_pickle_checkpoint(src), str(src), **options)
    else:
        parts = load_any(src, **options)
    dtype = {"float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    save_model(parts, args.output, dtype)  # written to a temporary folder, renamed into place at the end
    print(f"{args.output}  (from {src})")


def _sizes(text: str) -> list[tuple[int, int]]:
    """"512x768,1024x1024" → [(768, 512), (1024, 1024)], as (height, width)."""
    sizes = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", part)
        if not m:
            raise UnfogError(f"--warmup takes sizes as WIDTHxHEIGHT separated by commas (e.g. 512x512,768x512), got {part!r}")
        sizes.append((int(m.group(2)), int(m.group(1))))
    return sizes


def _warmup_sizes(text: str | None, max_side: int) -> list[tuple[int, int]]:
    """--warmup's sizes, checked before the model loads (a bad one had failed only after it)."""
    sizes = _sizes(text) if text else []
    for h, w in sizes:
        if not (1 <= h <= max_side and 1 <= w <= max_side):
            raise UnfogError(f"--warmup {w}x{h}: each side must be from 1 to --max-side {max_side} (a larger size the server would refuse)")
    return sizes


def cmd_serve(args: argparse.Namespace) -> None:
    try:
        import uvicorn

        from .server import ServerSettings, create_app, server_options
    except ImportError as e:
        raise UnfogError(f"the server needs the serve extra ({e.name} is missing): pip install 'unfog[serve]'") from None
    from .pipeline import Pipeline

    if not 1 <= args.port <= 65535:
        raise UnfogError(f"--port must be from 1 to 65535, got {args.port}")
    _check_device(args.device)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.token:
        raise UnfogError(f"binding to {args.host} exposes the server to the network: pass --token T, and clients send Authorization: Bearer T")
    settings = ServerSettings(host=args.host, port=args.port, token=args.token, max_queue=args.max_queue, job_timeout_s=args.job_timeout,
                              max_side=args.max_side, max_steps=args.max_steps, max_images=args.max_images, max_work=args.max_work,
                              lora_dir=args.lora_dir)
    if args.ray:
        return _serve_ray(args, settings)
    if args.ray_address or args.replicas != 1 or args.ingresses != 1 or args.max_batch:
        raise UnfogError("--replicas, --ingresses, --max-batch and --ray-address apply with --ray")
    import torch

    sizes = _warmup_sizes(args.warmup, settings.max_side)
    if args.lora_dir and not Path(args.lora_dir).is_dir():
        raise UnfogError(f"--lora-dir {args.lora_dir} is not a folder")
    dtype = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    pipe = _placed(Pipeline.from_pretrained(args.model, dtype=dtype), args)
    _adapters(pipe, args)
    for h, w in sizes:  # the model's own constraint (a multiple of its downsampling factor), named as --warmup's
        try:
            pipe.request("", height=h, width=w)
        except UnfogError as e:
            raise UnfogError(f"--warmup {w}x{h}: {e}") from None
    if args.optimize:
        pipe.optimize(compile=args.compile)
    if args.low_memory:  # (after _placed's offload on CUDA, a no-op)
        pipe.enable_low_memory()
    if sizes or (args.optimize and args.compile):  # a compiled U-Net's first call of a shape compiles it: do that before listening
        for (h, w), s in zip(sizes or [(None, None)], pipe.warm_up(sizes)):
            print(f"warmed up {f'{w}x{h}' if h else 'the default size'} in {s:.1f} s", file=sys.stderr, flush=True)
    app = create_app(pipe, settings, model_name=Path(args.model).name if args.model else "unfog-default")
    print(f"unfog serving on http://{f'[{args.host}]' if ':' in args.host else args.host}:{args.port}/  (API docs at /docs)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", **server_options(settings))


def _serve_ray(args: argparse.Namespace, settings) -> None:
    """`unfog serve --ray`: start (or join) Ray, the replicas and the ingress; drain on SIGTERM."""
    import threading

    from .server import ray_serve

    if args.lora or args.embedding or args.optimize or args.compile or args.lora_dir or args.low_memory or args.warmup:
        raise UnfogError("--lora, --embedding, --lora-dir, --optimize, --compile, --low-memory and --warmup are not available with --ray yet")
    gpus = 1.0 if (args.device or "").startswith("cuda") else 0.0
    name = Path(args.model).name if args.model else "unfog-default"
    stop = threading.Event()
    registry, _ = ray_serve.start(args.model, settings, replicas=args.replicas, ingresses=args.ingresses, address=args.ray_address,
                                  dtype=args.dtype, device=args.device, replica_gpus=gpus, model_name=name,
                                  max_batch=args.max_batch or (4 if gpus else 1), stop_event=stop)
    print(f"unfog serving on http://{f'[{args.host}]' if ':' in args.host else args.host}:{args.port}/ with {args.replicas} model replica(s) on Ray", flush=True)
    while not stop.wait(1.0):  # a timed wait, so the signal handler runs promptly
        pass
    print("draining: no new jobs; finishing the queued and running ones", flush=True)
    ray_serve.stop(registry, timeout=settings.job_timeout_s, shared=bool(args.ray_address))


def cmd_eval(args: argparse.Namespace) -> None:
    """`unfog eval shapes|emoji [MODEL]`: prompt adherence of a model on its procedural world."""
    import importlib
    import json

    from .images import grid, save
    from .pipeline import BUNDLED_MODELS, Pipeline

    world = importlib.import_module(f".eval.{args.suite}", __package__)
    if args.prompts < 1:
        raise UnfogError("--prompts must be at least 1")
    _check_output(args.grid, "--grid")  # before minutes of evaluation, not after
    if args.json and not Path(os.path.abspath(args.json)).parent.is_dir():
        raise UnfogError(f"--json {args.json}: its folder does not exist")
    if args.json and Path(args.json).is_dir():
        raise UnfogError(f"--json {args.json} is a folder; name a file (e.g. scores.json)")
    if not 0 <= args.seed <= 2**63 - 1 - args.prompts:  # image k uses seed + k
        raise UnfogError(f"--seed must be from 0 to 2^63 - 1 - --prompts ({2**63 - 1 - args.prompts}), got {args.seed}")
    if not getattr(args, "images", None):
        _check_device(args.device)
    if getattr(args, "images", None):  # emoji: score images generated elsewhere (scripts/train_default.py --world emoji)
        if args.model:
            raise UnfogError("pass a MODEL or --images, not both")
        result = world.score_file(args.images, args.seed)
    else:
        pipe = Pipeline.from_pretrained(args.model or (BUNDLED_MODELS["emoji"] if args.suite == "emoji" else None)).to(args.device)
        result = world.evaluate(pipe, args.prompts, args.seed, num_inference_steps=args.steps, guidance_scale=args.guidance, sampler=args.sampler,
                                progress=not args.quiet)
    print(world.format_table(result["scores"]))
    if args.json:
        Path(args.json).write_text(json.dumps(result["scores"], indent=2) + "\n")
    if args.grid:
        save(grid(result["images"][:64], 8), args.grid)


COMMANDS = {"convert": cmd_convert, "data_world": cmd_data_world, "eval": cmd_eval, "export": cmd_export, "generate": cmd_generate, "noise": cmd_noise, "serve": cmd_serve, "train": cmd_train}


def main(argv: list[str] | None = None) -> int:
    """Run one command: bad input is one line and exit 2, any other failure one line and exit 1
    (with its traceback under --debug)."""
    from .cli_args import build_parser

    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.func](args)
    except UnfogError as e:
        print(f"unfog: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("unfog: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # files, devices, out of memory, a bug: say it in one line
        if args.debug:
            raise
        print(f"unfog: error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} (run with --debug for the traceback)", file=sys.stderr)
        return 1
    return 0


def run() -> None:
    """The `unfog` command (and `python -m unfog`): main(), then a quick exit. Interpreter
    teardown after `import torch` takes about half a second on a 2-core CPU (bench/first_image.py),
    a sixth of the time to a first image, and does nothing a finished command needs: its files
    are written and closed.
    So once main() returns, with no other non-daemon thread (which a normal exit would wait for)
    or child process still running and no profiler, tracer or coverage waiting to write its
    report at exit, the streams are flushed and the process ends with os._exit; otherwise it
    exits normally."""
    code = main()
    import multiprocessing
    import threading

    others = [t for t in threading.enumerate() if t is not threading.current_thread() and not t.daemon]
    observed = sys.getprofile() is not None or sys.gettrace() is not None or "coverage" in sys.modules  # their reports are written at exit
    if others or observed or multiprocessing.active_children():
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):  # closed, missing (None) or a broken pipe: nothing more can be written
            pass
    try:
        import ctypes

        ctypes.CDLL(None).fflush(None)  # C-level stdio too (native libraries' own output)
    except (OSError, AttributeError, TypeError):
        pass
    os._exit(code)


if __name__ == "__main__":
    run()
