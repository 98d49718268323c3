"""Pipeline: prompt → context → sampler → latents → decode → images."""

from __future__ import annotations

import math
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .diffusion import DiscreteDenoiser, SchedulerConfig, classifier_free_guidance, make_sigmas
from .errors import UnfogError
from .formats import ModelParts, load_any, save_model
from .nn import Autoencoder, TextEncoder, Tokenizer, UNet
from .graphs import StepGraph
from .samplers import LINEAR_SAMPLERS, get_sampler, run_linear

DEFAULT_MODEL_DIR = Path(__file__).parent / "assets" / "default"
BUILTIN_DEFAULTS = {"sampler": "dpmpp_2m", "num_inference_steps": 30, "guidance_scale": 7.5, "height": 64, "width": 64}


@dataclass
class PipelineOutput:
    images: list[Image.Image]
    seeds: list[int]


def from_pil(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image → (1, 3, H, W) in [-1, 1]; the inverse of to_pil."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] → PIL images."""
    arr = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]


def optimize_unet(unet: UNet, dtype: torch.dtype | None, channels_last: bool, compile: bool) -> UNet:
    """The U-Net part of Pipeline.optimize (also used by bench/speed.py): fused q/k/v for
    self-attention, then the dtype, channels_last and torch.compile as asked."""
    from .nn.layers import Attention

    for m in unet.modules():
        if isinstance(m, Attention):
            m.fuse_projections()
    if dtype is not None:
        unet.to(dtype=dtype)
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    if next(unet.parameters()).is_cuda:
        # Let cuDNN time its convolution algorithms once per shape and keep the fastest.
        torch.backends.cudnn.benchmark = True
        if compile:
            import torch._inductor.config as inductor_config

            inductor_config.conv_1x1_as_mm = True  # 1×1 convolutions as matmuls that fuse with their neighbours
    if compile:
        unet.compile(dynamic=False)  # shapes are static per request: specialise, never go dynamic
    return unet


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX), where bf16 is faster."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class Pipeline:
    """Text-to-image generation with a tokenizer, text encoder, U-Net and optional autoencoder."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        text_encoder: TextEncoder,
        unet: UNet,
        vae: Autoencoder | None,
        scheduler: SchedulerConfig,
        defaults: dict[str, Any] | None = None,
    ):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.eval()
        self.unet = unet.eval()
        self.vae = vae.eval() if vae is not None else None
        self.scheduler = scheduler
        self.defaults = {**BUILTIN_DEFAULTS, **(defaults or {})}
        self.decode_tile: int | None = None  # latent tile size for decoding large images
        # Replay each denoising step as a captured CUDA graph (optimize() turns this on for CUDA;
        # on a CPU the same static-buffer step runs without capture). Graphs are cached per shape.
        self.cuda_graphs = False
        self.max_step_graphs = 4
        self.step_graphs: dict[tuple, StepGraph] = {}
        self.denoiser = DiscreteDenoiser(unet, scheduler.alphas_cumprod(), scheduler.prediction_type)
        self.latent_channels = vae.config.latent_channels if vae is not None else 3
        # An inpainting U-Net (SD's 9-channel one) also takes the mask and the masked image's latents.
        self.is_inpainting_model = unet.config.in_channels == 2 * self.latent_channels + 1
        if unet.config.in_channels != self.latent_channels and not self.is_inpainting_model:
            raise UnfogError(f"the U-Net takes {unet.config.in_channels} channels but the {'autoencoder makes' if vae else 'images have'} {self.latent_channels}")

    # ---- loading and saving -------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, **options) -> "Pipeline":
        """Load an unfog model folder, a diffusers-layout Stable Diffusion folder or a
        single-file SD 1.x/2.x `.safetensors`; `None` loads the default model bundled with
        unfog. Options for Stable Diffusion weights: `clip_skip` (text states that many layers
        before the last), and for single files `config` (a diffusers-layout config folder),
        `tokenizer` (a CLIP tokenizer folder), `prediction_type`."""
        if path is None:
            if not (DEFAULT_MODEL_DIR / "model_index.json").is_file():
                raise UnfogError(
                    "this install of unfog has no bundled default model yet (it comes with the issue "
                    "'shapes-v1 dataset, the trainer, and the bundled default model'); "
                    "pass a model folder: Pipeline.from_pretrained('path/to/model')"
                )
            path = DEFAULT_MODEL_DIR
        p = load_any(path, **options)
        return cls(p.tokenizer, p.text_encoder, p.unet, p.vae, p.scheduler, p.defaults)

    def save_pretrained(self, directory: str | Path, dtype: torch.dtype | None = None) -> None:
        """Write this pipeline as a model folder (JSON configs + safetensors), optionally
        storing the weights in `dtype` (float16 halves the size; loading casts back to float32)."""
        save_model(ModelParts(self.tokenizer, self.text_encoder, self.unet, self.vae, self.scheduler, self.defaults), directory, dtype)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "Pipeline":
        """Move the networks to a device and/or cast them to a dtype; returns self."""
        for m in (self.text_encoder, self.unet, self.vae):
            if m is not None:
                m.to(device=device, dtype=dtype)
        if device is not None:
            self.denoiser.to(device)  # the schedule buffers keep their float64
        self.step_graphs.clear()  # captured graphs point at the old tensors
        return self

    def optimize(self, dtype: torch.dtype | None = None, channels_last: bool = True, compile: bool = False,
                 cuda_graphs: bool | None = None) -> "Pipeline":
        """The fast path, chosen explicitly so the default stays exact. On CUDA: every network
        in `dtype` (bfloat16 by default), channels_last convolutions in the U-Net (not in the
        autoencoder, whose decode it slowed from 21 to 26 ms at 512² on an H200), cuDNN's algorithm
        search (`torch.backends.cudnn.benchmark`, a process-wide switch), and (`cuda_graphs`, on by
        default there) the whole denoising step of every sampler but Heun captured as a CUDA
        graph on the first generation of each shape and replayed each step after. On a CPU with bf16
        units (AVX512-BF16 or AMX): the U-Net, which does nearly all the work, in bfloat16 and
        channels_last; the text encoder and autoencoder stay float32. Elsewhere it changes
        nothing else; the q/k/v projections of self-attention are fused into one matmul
        everywhere. Sampler state and guidance stay float32 throughout. `compile=True` also runs
        the U-Net through torch.compile (in place, so saving still works): it pays for long-lived
        processes such as the server, after a warm-up of tens of seconds per shape; shapes are
        specialised, so past torch._dynamo's recompile limit (8 by default) further shapes run
        uncompiled. With graphs on, one pipeline serves one thread at a time. Returns self."""
        if self.device.type == "cuda":
            dtype = dtype or torch.bfloat16
            for m in (self.text_encoder, self.vae):
                if m is not None:
                    m.to(dtype=dtype)
        elif not (self.device.type == "cpu" and (dtype is not None or cpu_has_bf16())):
            dtype, channels_last = None, False
        elif dtype is None:
            dtype = torch.bfloat16
        optimize_unet(self.unet, dtype, channels_last, compile)
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self.step_graphs.clear()
        return self

    def _step_graph(self, x_shape, context: torch.Tensor, guided: bool, concat: torch.Tensor | None) -> StepGraph | None:
        """The cached step graph for these shapes, captured on first use (the least recently
        used one is dropped beyond `max_step_graphs`, since each holds its activations). The key
        also holds what the captured kernels read but the buffers do not: the U-Net's weight
        storage and dtype and the timestep rounding switch. A capture that fails warns, turns
        graphs off and returns None, so the generation runs eagerly instead."""
        weight = next(self.unet.parameters())
        key = (tuple(x_shape), tuple(context.shape), context.dtype, guided, None if concat is None else tuple(concat.shape),
               weight.data_ptr(), weight.dtype, self.denoiser.round_timesteps)
        graph = self.step_graphs.pop(key, None)
        if graph is None:
            try:
                graph = StepGraph(self.denoiser, tuple(x_shape), tuple(context.shape), guided, None if concat is None else tuple(concat.shape),
                                  context_dtype=context.dtype, device=self.device)
            except Exception as e:  # e.g. an operation that cannot be captured
                warnings.warn(f"capturing the denoising step as a CUDA graph failed ({type(e).__name__}: {e}); running eagerly from now on", stacklevel=3)
                self.cuda_graphs = False
                return None
        self.step_graphs[key] = graph
        while len(self.step_graphs) > self.max_step_graphs:
            self.step_graphs.pop(next(iter(self.step_graphs)))
        return graph

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def downsample_factor(self) -> int:
        """Pixel size must be a multiple of this: autoencoder factor × U-Net factor."""
        vae = self.vae.config.downsample_factor if self.vae is not None else 1
        return vae * self.unet.config.downsample_factor

    # ---- the pieces of a generation -----------------------------------------------------

    @torch.inference_mode()
    def encode_prompt(self, prompts: Sequence[str], long_prompts: str = "chunk") -> torch.Tensor:
        """Per-token text states (B, L, D) that the U-Net cross-attends to. A prompt longer
        than the text encoder's context is, with `long_prompts="chunk"`, cut into windows
        that are encoded separately and concatenated (L = windows × context), as the popular
        UIs do; with "truncate" it is cut off, with a warning."""
        if long_prompts == "truncate":
            ids = self.tokenizer(list(prompts))
            cut = [p for p, t in zip(prompts, self.tokenizer.last_truncated) if t]
            if cut:
                warnings.warn(f"{len(cut)} prompt(s) exceed the {self.tokenizer.config.context_length}-token context and were truncated: {cut[0][:60]!r}…", stacklevel=3)
            return self.text_encoder(ids.to(self.device))[0]
        if long_prompts != "chunk":
            raise UnfogError(f"long_prompts must be 'chunk' or 'truncate', got {long_prompts!r}")
        ids = self.tokenizer.windows(list(prompts)).to(self.device)
        b, windows, length = ids.shape
        states = self.text_encoder(ids.reshape(b * windows, length))[0]
        return states.reshape(b, windows * length, -1)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """Latents (sampler space) → PIL images. A decode that overflows in half precision is
        re-run in float32 (with a warning) instead of returning a black image; with
        `decode_tile` set, large latents are decoded in overlapping tiles to bound memory."""
        if self.vae is None:
            return to_pil(latents)
        c = self.vae.config
        z = (latents / c.scaling_factor + c.shift_factor).to(self.device)
        dtype = next(self.vae.parameters()).dtype
        pixels = self._decode_tiled(z, dtype)
        if not torch.isfinite(pixels).all() and dtype != torch.float32:
            warnings.warn(f"the autoencoder overflowed in {str(dtype).replace('torch.', '')}; decoded again in float32", stacklevel=2)
            self.vae.to(torch.float32)
            try:
                pixels = self._decode_tiled(z, torch.float32)
            finally:
                self.vae.to(dtype)
        return to_pil(pixels)

    def _decode_tiled(self, z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        tile = self.decode_tile
        h, w = z.shape[-2:]
        if tile is None or (h <= tile and w <= tile):
            return self.vae.decode(z.to(dtype)).float()
        f = self.vae.config.downsample_factor
        overlap = max(1, tile // 4)
        stride = tile - overlap
        out = torch.zeros(z.shape[0], self.vae.config.out_channels, h * f, w * f, device=z.device)
        weight = torch.zeros(1, 1, h * f, w * f, device=z.device)
        # Linear ramps across the overlaps blend neighbouring tiles without seams.
        for top in sorted({*range(0, max(h - tile, 0) + 1, stride), max(h - tile, 0)}):
            for left in sorted({*range(0, max(w - tile, 0) + 1, stride), max(w - tile, 0)}):
                piece = self.vae.decode(z[..., top : top + tile, left : left + tile].to(dtype)).float()
                ph, pw = piece.shape[-2:]
                ramp_y = torch.clamp(torch.minimum(torch.arange(ph, device=z.device) + 1, ph - torch.arange(ph, device=z.device)) / (overlap * f), max=1)
                ramp_x = torch.clamp(torch.minimum(torch.arange(pw, device=z.device) + 1, pw - torch.arange(pw, device=z.device)) / (overlap * f), max=1)
                mask = (ramp_y[:, None] * ramp_x[None, :])[None, None]
                out[..., top * f : top * f + ph, left * f : left * f + pw] += piece * mask
                weight[..., top * f : top * f + ph, left * f : left * f + pw] += mask
        return out / weight

    def _pixels(self, image: Image.Image, width: int, height: int) -> torch.Tensor:
        """PIL → (1, 3, H, W) in [-1, 1] at the requested size."""
        if not isinstance(image, Image.Image):
            raise UnfogError(f"image must be a PIL image, got {type(image).__name__}")
        if image.size != (width, height):
            image = image.resize((width, height), Image.LANCZOS)
        return from_pil(image)

    def _mask(self, mask: Image.Image, width: int, height: int) -> torch.Tensor:
        """PIL mask → (1, 1, H, W) of 0/1, where 1 (white) marks pixels to repaint."""
        if not isinstance(mask, Image.Image):
            raise UnfogError(f"mask_image must be a PIL image, got {type(mask).__name__}")
        mask = mask.convert("L")
        if mask.size != (width, height):
            mask = mask.resize((width, height), Image.LANCZOS)
        return (torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255)[None, None] >= 0.5).float()

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """Pixels in [-1, 1] → sampler-space latents, a posterior sample per image drawn from
        that image's generator (pixel-space models return the pixels)."""
        if self.vae is None:
            return pixels.float()
        vae_dtype = next(self.vae.parameters()).dtype
        mean, logvar = self.vae.encode(pixels.to(self.device, vae_dtype))
        noise = torch.stack([torch.randn(mean.shape[1:], generator=g, device=g.device) for g in generators]).to(mean.device)
        z = mean.float() + (0.5 * logvar.float()).exp() * noise
        c = self.vae.config
        return (z - c.shift_factor) * c.scaling_factor

    def _check_size(self, height: int, width: int) -> tuple[int, int]:
        f = self.downsample_factor
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0 or v % f:
                raise UnfogError(f"{name} must be a positive multiple of {f} for this model (its downsampling factor), got {v!r}")
        vf = self.vae.config.downsample_factor if self.vae is not None else 1
        return height // vf, width // vf

    @staticmethod
    def _generators(seed, generator, total: int) -> tuple[list[torch.Generator], list[int]]:
        if generator is not None:
            gens = [generator] * total if isinstance(generator, torch.Generator) else list(generator)
            if len(gens) != total:
                raise UnfogError(f"got {len(gens)} generators for {total} images; pass one per image")
            return gens, [g.initial_seed() for g in gens]
        if seed is None:
            base = random.SystemRandom().randrange(2**32)
            seeds = [base + k for k in range(total)]
        elif isinstance(seed, int) and not isinstance(seed, bool):
            seeds = [seed + k for k in range(total)]
        elif isinstance(seed, (list, tuple)) and all(isinstance(s, int) and not isinstance(s, bool) for s in seed):
            if len(seed) != total:
                raise UnfogError(f"got {len(seed)} seeds for {total} images; pass one per image or a single int")
            seeds = list(seed)
        else:
            raise UnfogError(f"seed must be an int or a list of ints, got {seed!r}")
        return [torch.Generator("cpu").manual_seed(s) for s in seeds], seeds

    # ---- generation ---------------------------------------------------------------------

    @torch.inference_mode()
    def __call__(
        self,
        prompt: str | Sequence[str],
        *,
        negative_prompt: str | Sequence[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        sampler: str | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        seed: int | Sequence[int] | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
        sigma_schedule: str | None = None,
        sampler_options: dict[str, Any] | None = None,
        image: Image.Image | None = None,
        mask_image: Image.Image | None = None,
        strength: float | None = None,
        long_prompts: str = "chunk",
        progress: bool = False,
    ) -> PipelineOutput:
        """Generate images for one prompt or a list; image k of the batch uses its own seed.

        `latents` are standard-normal starting noise (B, C, h, w), scaled here by sqrt(1 + σ_0²).
        `callback(i, x, x0_hat)` is called after each sampler step.

        img2img: `image` with `strength` in (0, 1] (default 0.8) starts that far along the
        schedule from the encoded image. Inpainting: also `mask_image` (white = repaint,
        strength default 1); a 9-channel inpainting U-Net sees the mask and the masked image,
        an ordinary one has the known region re-imposed after every step.
        """
        d = self.defaults
        prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else None
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise UnfogError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
        if isinstance(negative_prompt, (list, tuple)):
            negatives = list(negative_prompt)
            if len(negatives) != len(prompts) or not all(isinstance(n, str) for n in negatives):
                raise UnfogError(f"negative_prompt must be one string or a list of {len(prompts)} strings, one per prompt")
        elif negative_prompt is None or isinstance(negative_prompt, str):
            negatives = [negative_prompt or ""] * len(prompts)
        else:
            raise UnfogError(f"negative_prompt must be a string or a list of strings, got {negative_prompt!r}")
        if not isinstance(num_images_per_prompt, int) or isinstance(num_images_per_prompt, bool) or num_images_per_prompt < 1:
            raise UnfogError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")
        steps = d["num_inference_steps"] if num_inference_steps is None else num_inference_steps
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise UnfogError(f"num_inference_steps must be a positive integer, got {steps!r}")
        scale = d["guidance_scale"] if guidance_scale is None else guidance_scale
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
            raise UnfogError(f"guidance_scale must be a finite number, got {scale!r}")
        sampler_name = d["sampler"] if sampler is None else sampler
        sample = get_sampler(sampler_name)
        if mask_image is not None and image is None:
            raise UnfogError("mask_image needs image: pass the picture to inpaint as image=")
        if self.is_inpainting_model and mask_image is None:
            raise UnfogError("this is an inpainting model: pass image= and mask_image=")
        if image is not None:
            height = height or image.size[1] // self.downsample_factor * self.downsample_factor
            width = width or image.size[0] // self.downsample_factor * self.downsample_factor
        strength = (1.0 if mask_image is not None else 0.8) if strength is None else strength
        if not isinstance(strength, (int, float)) or isinstance(strength, bool) or not 0 < strength <= 1:
            raise UnfogError(f"strength must be in (0, 1], got {strength!r}")
        h, w = self._check_size(d["height"] if height is None else height, d["width"] if width is None else width)
        vae_factor = self.vae.config.downsample_factor if self.vae is not None else 1
        H, W = h * vae_factor, w * vae_factor

        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        negatives = [n for n in negatives for _ in range(num_images_per_prompt)]
        total = len(prompts)
        gens, seeds = self._generators(seed, generator, total)
        shape = (total, self.latent_channels, h, w)
        sigmas = make_sigmas(sigma_schedule or self.scheduler.sigma_schedule, steps, self.denoiser.alphas_cumprod.cpu(), steps_offset=self.scheduler.steps_offset)
        if image is not None:
            # Start part-way: the last int(steps·strength) steps of the full schedule.
            start = steps - min(int(steps * strength), steps)
            if start >= steps:
                raise UnfogError(f"strength {strength} with {steps} steps leaves no step to run; raise strength or num_inference_steps")
            sigmas = sigmas[start:]
        pixels = self._pixels(image, W, H).expand(total, -1, -1, -1) if image is not None else None
        mask = self._mask(mask_image, W, H) if mask_image is not None else None
        repaint_from_noise = image is None or (mask is not None and strength == 1)
        # Per image, draws come in this order: the image's latent sample, the start noise, the
        # masked image's latent sample (diffusers' order, so seeds give the same pictures).
        init = self.encode(pixels, gens) if image is not None and (not repaint_from_noise or (mask is not None and not self.is_inpainting_model)) else None
        if latents is None:
            noise = torch.stack([torch.randn(shape[1:], generator=g, device=g.device) for g in gens])
        else:
            if tuple(latents.shape) != shape:
                raise UnfogError(f"latents must have shape {shape} for this request, got {tuple(latents.shape)}")
            noise = latents.float()
        noise = noise.to(self.device, torch.float32)
        if repaint_from_noise:
            # Start from the forward process's marginal at σ_0 for unit-variance data: x_0 + σ_0·n
            # has standard deviation sqrt(1 + σ_0²) (diffusers' init_noise_sigma for VP models).
            x = noise * (1 + sigmas[0] ** 2).sqrt()
        else:
            x = init + noise * sigmas[0]
        extra, blend = {}, None
        if mask is not None:
            masked = self.encode(pixels * (mask < 0.5), gens)
            small = torch.nn.functional.interpolate(mask, size=(h, w)).to(self.device).expand(total, -1, -1, -1)
            if self.is_inpainting_model:
                extra["concat"] = torch.cat([small, masked], dim=1)
            else:
                sig = sigmas.to(self.device)

                def blend(i, x_i, x0_i):
                    known = init + noise * sig[i + 1]
                    return (1 - small) * known + small * x_i

        if scale != 1:  # encoded together, so both get the same number of windows
            uncond, context = self.encode_prompt(negatives + prompts, long_prompts).chunk(2)
        else:
            context, uncond = self.encode_prompt(prompts, long_prompts), None

        bar = tqdm(total=len(sigmas) - 1, desc="denoising", disable=not progress, leave=False)

        def on_step(i, x_i, x0_i):
            bar.update(1)
            if blend is not None:
                x_i = blend(i, x_i, x0_i)
            if callback is not None:
                callback(i, x_i, x0_i)
            return x_i

        try:
            graph = None
            if self.cuda_graphs and sampler_name in LINEAR_SAMPLERS:
                coefficients = LINEAR_SAMPLERS[sampler_name](sigmas, **(sampler_options or {}))
                graph = self._step_graph(x.shape, context, uncond is not None, extra.get("concat"))
            if graph is not None:
                graph.bind(context, uncond, float(scale), extra.get("concat"), sigmas, coefficients)
                x = run_linear(graph, x, generator=gens, callback=on_step)
            else:
                guided = classifier_free_guidance(self.denoiser, context, uncond, float(scale), **extra)
                x = sample(guided, x, sigmas.to(self.device), generator=gens, callback=on_step, **(sampler_options or {}))
        except TypeError as e:
            if sampler_options and "unexpected keyword" in str(e):
                raise UnfogError(f"sampler does not take these options: {sorted(sampler_options)}") from None
            raise
        finally:
            bar.close()
        return PipelineOutput(images=self.decode(x), seeds=seeds)
