"""A generation request: every argument of a generation, validated once and typed.

`Pipeline.request(...)` builds one; the Python call, the CLI and the server all go through it,
so a value is checked in one place and every front end reports the same error, naming the field.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import math
import os
import random
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from .diffusion import SIGMA_SCHEDULES, SamplingDefaults
from .diffusion.schedules import DIFFUSERS_DEFAULT_SPACING, DIFFUSERS_FIXED_SCHEDULE
from .errors import UnfogError, finite_number, flag, integer, real
from .prompts import BREAK, MAX_WINDOWS, as_texts, extract_loras, parse_attention
from .samplers import OPTION_CHOICES, OPTION_RANGES, get_sampler

LONG_PROMPTS = ("chunk", "truncate")
# Sampler arguments that the pipeline itself passes; the rest of a sampler's keywords are options.
_SAMPLER_ARGS = {"denoiser", "x", "sigmas", "generator", "callback"}


@dataclass
class GenerationRequest:
    """One validated generation. `prompts` and `negative_prompts` hold one entry per image
    (each prompt repeated `num_images_per_prompt` times), and `seeds` one seed per image."""

    prompts: list[str]
    negative_prompts: list[str]
    num_inference_steps: int
    guidance_scale: float
    sampler: str
    height: int
    width: int
    seeds: list[int]
    sigma_schedule: str
    sampler_options: dict[str, Any] = field(default_factory=dict)
    generators: list[torch.Generator] | None = None  # given by the caller instead of seeds
    latents: torch.Tensor | None = None
    image: Image.Image | None = None
    mask_image: Image.Image | None = None
    strength: float = 1.0
    long_prompts: str = "chunk"
    round_timesteps: bool = False
    match_diffusers: bool = False
    # SDXL: the second text encoder's prompts (default: the first's), the micro-conditioning
    # numbers of the positive and negative halves, and whether the negative half is all zeros
    # (no negative prompt given on a model with force_zeros_for_empty_prompt).
    prompts_2: list[str] | None = None
    negative_prompts_2: list[str] | None = None
    time_ids: list[float] | None = None
    negative_time_ids: list[float] | None = None
    zero_negative: bool = False
    # Part of the schedule only (SDXL's base → refiner hand-off, as diffusers names it): stop
    # where the fraction `denoising_end` of the training timesteps is done, or start the image
    # (then taken as the partly denoised state) where `denoising_start` of them is.
    denoising_start: float | None = None
    denoising_end: float | None = None
    output_type: str = "pil"
    prompt_syntax: str = "plain"  # or "a1111": emphasis, BREAK, <lora:…> (unfog.prompts)
    cfg_truncation: float | None = None  # after this fraction of the steps, the unconditional half is skipped
    deep_cache: int | None = None  # DeepCache: the U-Net runs whole every this many calls, shallow in between
    loras: list[tuple[str, float]] = field(default_factory=list)  # <lora:NAME:w> tags of the prompt, for this call
    lora_dir: str | None = None

    @property
    def batch(self) -> int:
        return len(self.prompts)

    @property
    def guided(self) -> bool:
        """Whether the unconditional half runs: classifier-free guidance at any scale but 1, or 0
        (which means no guidance, as SDXL-Turbo's documented setting and diffusers have it)."""
        return self.guidance_scale not in (0, 1)


@dataclass
class ModelFacts:
    """What validation needs to know about the model: its defaults and its shapes."""

    defaults: SamplingDefaults
    sigma_schedule: str
    downsample_factor: int  # sizes must be multiples of it (the autoencoder's factor: Pipeline.downsample_factor)
    vae_factor: int
    latent_channels: int
    inpainting: bool
    match_diffusers: bool = False
    spacing_given: bool = True  # False: a diffusers config named no spacing (see SchedulerConfig)
    max_images: int = 64  # per request (Pipeline.max_images)
    max_pixels: int = 16_777_216  # per image, width × height (Pipeline.max_pixels): 4096²
    sdxl: str | None = None  # "base" or "refiner" for an SDXL U-Net (size and crop micro-conditioning; the refiner's aesthetic score)
    force_zeros_for_empty_prompt: bool = False
    max_side: int = 8192  # per side (Pipeline.max_side)
    max_steps: int = 1000  # num_inference_steps (Pipeline.max_steps)


def _int(name: str, v: Any) -> int:
    n = integer(v)
    if n is None or n < 1:
        raise UnfogError(f"{name} must be a positive integer, got {v!r}", name)
    return n


def _text(name: str, v: Any) -> str:
    if not isinstance(v, str):
        raise UnfogError(f"{name} must be a string, got {v!r}", name)
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise UnfogError(f"{name} is not valid Unicode text (it holds a lone surrogate); send UTF-8 text", name) from None
    return v


def _prompts(prompt: Any, negative_prompt: Any) -> tuple[list[str], list[str]]:
    prompts = [_text("prompt", p) for p in as_texts("prompt", prompt)]
    if isinstance(negative_prompt, (list, tuple)):
        if len(negative_prompt) != len(prompts) or not all(isinstance(n, str) for n in negative_prompt):
            raise UnfogError(f"negative_prompt must be one string or a list of {len(prompts)} strings, one per prompt", "negative_prompt")
        return prompts, [_text("negative_prompt", n) for n in negative_prompt]
    return prompts, [_text("negative_prompt", "" if negative_prompt is None else negative_prompt)] * len(prompts)


def _seeds(seed: Any, generator: Any, total: int) -> tuple[list[int], list[torch.Generator] | None]:
    if generator is not None:
        gens = [generator] * total if isinstance(generator, torch.Generator) else list(generator) if isinstance(generator, (list, tuple)) else []
        if len(gens) != total or not all(isinstance(g, torch.Generator) for g in gens):
            raise UnfogError(f"generator must be one torch.Generator or a list of {total}, one per image", "generator")
        return [g.initial_seed() for g in gens], gens
    if seed is None:
        base = random.SystemRandom().randrange(2**32)
        return [base + k for k in range(total)], None
    if integer(seed) is not None and 0 <= integer(seed) < 2**63 - total:
        return [integer(seed) + k for k in range(total)], None
    if isinstance(seed, (list, tuple)) and all(integer(s) is not None and 0 <= integer(s) < 2**63 for s in seed):
        if len(seed) != total:
            raise UnfogError(f"got {len(seed)} seeds for {total} images; pass one per image or a single int", "seed")
        return [integer(s) for s in seed], None
    raise UnfogError(f"seed must be a non-negative int below 2^63 or a list of them, got {seed!r}", "seed")


def _sampler(name: Any, options: Any) -> tuple[str, dict[str, Any]]:
    sampler = get_sampler(name)
    if options is None:
        return name, {}
    if not isinstance(options, dict):
        raise UnfogError(f"sampler_options must be a dict of option names to values, got {options!r}", "sampler_options")
    # A sampler's options are its keywords with a number or a name as default (callables such as
    # noise_sampler are for Python callers of the sampler itself).
    accepted = {p.name: p.default for p in inspect.signature(sampler).parameters.values()
                if p.name not in _SAMPLER_ARGS and isinstance(p.default, (int, float, str))}
    unknown = sorted(set(options) - set(accepted), key=str)
    if unknown:
        raise UnfogError(f"sampler {name} does not take the options {unknown}; it takes {sorted(accepted) or 'none'}", "sampler_options")
    return name, {k: _option(name, k, v, accepted[k]) for k, v in options.items()}


def _option(sampler: str, key: str, value: Any, default: Any) -> Any:
    """One sampler option, checked against the kind of its default (a name, a count, a number)."""
    where = f"sampler_options[{key!r}]"
    if isinstance(default, str):
        choices = OPTION_CHOICES.get(key, ())
        if value not in choices:
            raise UnfogError(f"{where} must be one of {', '.join(choices)}, got {value!r}", "sampler_options")
        if value == "brownian" and importlib.util.find_spec("torchsde") is None:
            raise UnfogError("noise='brownian' needs torchsde: pip install 'unfog[brownian]' (or pip install torchsde)", "sampler_options")
        return value
    lo, hi = OPTION_RANGES.get(f"{sampler}.{key}", OPTION_RANGES.get(key, (-math.inf, math.inf)))
    if isinstance(default, int) and not isinstance(default, bool):
        if integer(value) is None or value < max(1, lo) or value > hi:
            raise UnfogError(f"{where} of {sampler} must be an integer from {max(1, lo)} to {hi}, got {value!r}", "sampler_options")
        return integer(value)
    if real(value) is None or math.isnan(value) or (math.isinf(value) and not math.isinf(default)):
        raise UnfogError(f"{where} must be a finite number, got {value!r}", "sampler_options")
    if not lo <= value <= hi:
        raise UnfogError(f"{where} must be from {lo:g} to {hi:g}, got {value!r}", "sampler_options")
    return float(value)


def size_pairs(sizes: Any) -> list[tuple[Any, Any]]:
    """A list of (height, width) pairs, each side checked later by the request it makes."""
    if not isinstance(sizes, (list, tuple)) or not all(isinstance(s, (list, tuple)) and len(s) == 2 for s in sizes):
        raise UnfogError(f"sizes must be a list of (height, width) pairs, e.g. [(512, 512), (768, 512)], got {sizes!r}"[:300], "sizes")
    return [tuple(s) for s in sizes]


def _size(name: str, v: Any, factor: int) -> int:
    n = integer(v)
    if n is None or n <= 0 or n % factor:
        raise UnfogError(f"{name} must be a positive multiple of {factor} for this model (its downsampling factor), got {v!r}", name)
    return n


def _image_inputs(image: Any, mask_image: Any, strength: Any, steps: int, inpainting: bool) -> float:
    """Checks img2img and inpainting inputs; returns the strength to use."""
    if image is not None and not isinstance(image, (Image.Image, torch.Tensor)):
        raise UnfogError(f"image must be a PIL image or a latents tensor (B, C, h, w), got {type(image).__name__}", "image")
    if mask_image is not None and not isinstance(mask_image, Image.Image):
        raise UnfogError(f"mask_image must be a PIL image, got {type(mask_image).__name__}", "mask_image")
    if isinstance(image, torch.Tensor) and mask_image is not None:
        raise UnfogError("inpainting takes a PIL image; a latents tensor as image= is for img2img and the refiner hand-off", "image")
    if mask_image is not None and image is None:
        raise UnfogError("mask_image needs image: pass the picture to inpaint as image=", "mask_image")
    if inpainting and mask_image is None:
        raise UnfogError("this is an inpainting model: pass image= and mask_image=", "mask_image")
    if strength is not None and image is None:
        raise UnfogError("strength applies to img2img and inpainting: pass image= too (or leave strength out)", "strength")
    for name, im in (("image", image), ("mask_image", mask_image)):
        if isinstance(im, Image.Image) and min(im.size) < 1:
            raise UnfogError(f"{name} is empty ({im.size[0]}×{im.size[1]} pixels)", name)
    given, strength = strength, real((1.0 if mask_image is not None else 0.8) if strength is None else strength)
    if strength is None or not 0 < strength <= 1:
        raise UnfogError(f"strength must be in (0, 1], got {given!r}", "strength")
    if image is not None and int(steps * strength) < 1:
        raise UnfogError(f"strength {strength} with {steps} steps leaves no step to run; raise strength or num_inference_steps", "strength")
    return float(strength)


def make_request(
    model: ModelFacts,
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
    sigma_schedule: str | None = None,
    sampler_options: dict[str, float] | None = None,
    image: Image.Image | None = None,
    mask_image: Image.Image | None = None,
    strength: float | None = None,
    long_prompts: str = "chunk",
    round_timesteps: bool = False,
    match_diffusers: bool | None = None,
    denoising_start: float | None = None,
    denoising_end: float | None = None,
    output_type: str = "pil",
    prompt_syntax: str = "plain",
    lora_dir: str | None = None,
    cfg_truncation: float | None = None,
    deep_cache: int | None = None,
    **sdxl: Any,
) -> GenerationRequest:
    """Validate a generation's arguments against the model and fill the omitted ones from its
    defaults (see Pipeline.__call__ for what each means)."""
    d, f = model.defaults, model.downsample_factor
    prompts, negatives = _prompts(prompt, negative_prompt)
    loras: list[tuple[str, float]] = []
    if prompt_syntax not in ("plain", "a1111"):
        raise UnfogError(f"prompt_syntax must be 'plain' or 'a1111', got {prompt_syntax!r}", "prompt_syntax")
    if prompt_syntax == "a1111":
        prompts, loras = _lora_tags(prompts, lora_dir)
        negatives = [extract_loras(q, "negative_prompt")[0] for q in negatives]
        for field, texts in (("prompt", prompts), ("negative_prompt", negatives), ("prompt_2", sdxl.get("prompt_2")),
                             ("negative_prompt_2", sdxl.get("negative_prompt_2"))):  # SDXL's second prompts, when given
            for text in [texts] if isinstance(texts, str) else texts if isinstance(texts, (list, tuple)) else []:
                _check_a1111(text, field)
        for key in ("prompt_2", "negative_prompt_2"):  # a tag sets the adapters; its text reaches no encoder
            v = sdxl.get(key)
            if isinstance(v, str) or (isinstance(v, (list, tuple)) and all(isinstance(t, str) for t in v)):
                sdxl[key] = extract_loras(v, key)[0] if isinstance(v, str) else [extract_loras(t, key)[0] for t in v]
    unknown = sorted(set(sdxl) - set(SDXL_OPTIONS))
    if unknown:
        raise UnfogError(f"unknown generation option(s) {unknown}", unknown[0])
    given = sorted(k for k, v in sdxl.items() if v is not None)
    if given and model.sdxl is None:
        raise UnfogError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to SDXL models; this model is not one", given[0])
    n = _int("num_images_per_prompt", num_images_per_prompt)
    steps = _int("num_inference_steps", d.num_inference_steps if num_inference_steps is None else num_inference_steps)
    scale = finite_number("guidance_scale", d.guidance_scale if guidance_scale is None else guidance_scale)
    sampler_name, options = _sampler(d.sampler if sampler is None else sampler, sampler_options)
    strength = _image_inputs(image, mask_image, strength, steps, model.inpainting)
    for name, v in (("denoising_start", denoising_start), ("denoising_end", denoising_end)):
        if v is not None and (real(v) is None or not 0 < v < 1):
            raise UnfogError(f"{name} must be a fraction strictly between 0 and 1, got {v!r}", name)
    if denoising_start is not None and denoising_end is not None and real(denoising_end) is not None and denoising_end <= denoising_start:
        raise UnfogError(f"denoising_end ({denoising_end}) must come after denoising_start ({denoising_start})", "denoising_end")
    if denoising_start is not None and image is None:
        raise UnfogError("denoising_start needs image= (the partly denoised latents or image to continue from)", "denoising_start")
    if cfg_truncation is not None and (real(cfg_truncation) is None or not 0 <= cfg_truncation <= 1):
        raise UnfogError(f"cfg_truncation must be a fraction from 0 to 1 (of the steps run with guidance), got {cfg_truncation!r}", "cfg_truncation")
    if deep_cache is not None and (integer(deep_cache) is None or not 1 <= deep_cache <= 100):
        raise UnfogError(f"deep_cache must be an integer from 1 (every call whole) to 100, got {deep_cache!r}", "deep_cache")
    if output_type not in OUTPUT_TYPES:
        raise UnfogError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}", "output_type")
    if model.sdxl == "refiner" and image is None:
        raise UnfogError("this is an SDXL refiner: it refines an image or a base model's latents (image=..., denoising_start=...), "
                         "it does not draw from pure noise; load an SDXL base model for text-to-image", "image")
    if isinstance(image, torch.Tensor):  # latents: the size they decode to
        shape = tuple(image.shape)
        if image.ndim != 4 or shape[1] != model.latent_channels:
            raise UnfogError(f"image as a tensor must be latents of shape (B, {model.latent_channels}, h, w), got {shape}", "image")
        height, width = (shape[2] * model.vae_factor if height is None else height), (shape[3] * model.vae_factor if width is None else width)
        if (height, width) != (shape[2] * model.vae_factor, shape[3] * model.vae_factor):
            raise UnfogError(f"height and width ({height}×{width}) disagree with the latents' size {shape[2]}×{shape[3]}", "height")
    elif image is not None:  # the image's own size, rounded down to what the model takes
        height = max(f, image.size[1] // f * f) if height is None else height
        width = max(f, image.size[0] // f * f) if width is None else width
    height, width = _size("height", d.height if height is None else height, f), _size("width", d.width if width is None else width, f)
    matching = model.match_diffusers if match_diffusers is None else match_diffusers
    schedule = sigma_schedule
    if schedule is None and matching and sampler_name in DIFFUSERS_FIXED_SCHEDULE:
        schedule = DIFFUSERS_FIXED_SCHEDULE[sampler_name]
    elif schedule is None:
        schedule = DIFFUSERS_DEFAULT_SPACING.get(sampler_name, model.sigma_schedule) if matching and not model.spacing_given else model.sigma_schedule
    if schedule not in SIGMA_SCHEDULES:
        raise UnfogError(f"unknown sigma schedule {schedule!r}; choose one of {', '.join(SIGMA_SCHEDULES)}", "sigma_schedule")
    flag(round_timesteps, "round_timesteps"), flag(match_diffusers, "match_diffusers", none=True)
    if long_prompts not in LONG_PROMPTS:
        raise UnfogError(f"long_prompts must be 'chunk' or 'truncate', got {long_prompts!r}", "long_prompts")
    total = len(prompts) * n
    if total > model.max_images:
        raise UnfogError(f"this request makes {total} images; at most {model.max_images} per request (raise Pipeline.max_images to allow more)",
                         "num_images_per_prompt")
    if height * width > model.max_pixels:
        raise UnfogError(f"height × width is {height * width} pixels; at most {model.max_pixels} (raise Pipeline.max_pixels to allow more)", "width")
    for name, side in (("height", height), ("width", width)):
        if side > model.max_side:  # self-attention's cost grows with the square of the pixels: no 100000 × 64 strips
            raise UnfogError(f"{name} is {side}; at most {model.max_side} per side (raise Pipeline.max_side to allow more)", name)
    if steps > model.max_steps:
        raise UnfogError(f"num_inference_steps is {steps}; at most {model.max_steps} (the models' training schedules have 1000 timesteps; "
                         "raise Pipeline.max_steps to allow more)", "num_inference_steps")
    for name, tensor in (("latents", latents), ("image", image)):
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UnfogError(f"{name} holds NaN or infinite values", name)
    seeds, generators = _seeds(seed, generator, total)
    if isinstance(image, torch.Tensor) and image.shape[0] not in (1, total):
        raise UnfogError(f"image latents hold {image.shape[0]} images; pass {'1' if total == 1 else f'1 or {total}, one per image'}", "image")
    if latents is not None:
        shape = (total, model.latent_channels, height // model.vae_factor, width // model.vae_factor)
        if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != shape:
            raise UnfogError(f"latents must be a tensor of shape {shape} for this request, got {getattr(latents, 'shape', latents)!r}", "latents")
    return GenerationRequest(
        prompts=[p for p in prompts for _ in range(n)], negative_prompts=[q for q in negatives for _ in range(n)],
        num_inference_steps=steps, guidance_scale=scale, sampler=sampler_name, height=height, width=width, seeds=seeds,
        sigma_schedule=schedule, sampler_options=options, generators=generators, latents=latents, image=image,
        mask_image=mask_image, strength=strength, long_prompts=long_prompts, round_timesteps=round_timesteps,
        match_diffusers=matching, denoising_start=None if denoising_start is None else float(denoising_start),
        denoising_end=None if denoising_end is None else float(denoising_end), output_type=output_type,
        prompt_syntax=prompt_syntax, loras=loras, lora_dir=None if lora_dir is None else str(lora_dir),
        cfg_truncation=None if cfg_truncation is None else float(cfg_truncation), deep_cache=None if deep_cache is None else integer(deep_cache),
        **(_sdxl_conditioning(model, sdxl, prompt, negative_prompt, prompts, negatives, n, height, width) if model.sdxl else {}),
    )


OUTPUT_TYPES = ("pil", "latent")


def _check_a1111(text: Any, field: str) -> None:
    """A prompt's emphasis weights and BREAK count, checked when the request is made rather than
    at encoding (a type error is left to the check that names it)."""
    if isinstance(text, str):
        breaks = sum(t == BREAK and w == -1 for t, w in parse_attention(text, field))
        if breaks >= MAX_WINDOWS:
            raise UnfogError(f"{field} has {breaks} BREAKs; at most {MAX_WINDOWS - 1} (each starts a window of 75 tokens)", field)


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name too long for the filesystem, or one it cannot hold
        return False


def _lora_tags(prompts: list[str], lora_dir: Any) -> tuple[list[str], list[tuple[str, float]]]:
    """The prompts without their <lora:NAME:w> tags, and the tags (the same for every prompt of
    the batch, since an adapter applies to the whole batch); each NAME a file in lora_dir."""
    stripped, tags = zip(*(extract_loras(p) for p in prompts))
    if any(t != tags[0] for t in tags):
        raise UnfogError("the prompts of one batch carry different <lora:…> tags; an adapter applies to the whole batch", "prompt")
    for name, weight in tags[0]:
        if not math.isfinite(weight):
            raise UnfogError(f"<lora:{name}:{weight}> needs a finite weight", "prompt")
        if lora_dir is None:
            raise UnfogError(f"the prompt asks for <lora:{name}:…>: pass lora_dir= (--lora-dir) to say where LoRA files are", "prompt")
        if not isinstance(lora_dir, (str, os.PathLike)):
            raise UnfogError(f"lora_dir must be a folder path, got {lora_dir!r}", "lora_dir")
        if len(name) > 200 or "/" in name or "\\" in name or "\0" in name or name.startswith(".") or not _is_file(Path(lora_dir) / f"{name}.safetensors"):
            short = name[:60] + ("…" if len(name) > 60 else "")
            raise UnfogError(f"<lora:{short}:…>: no {short}.safetensors in {lora_dir}", "prompt")
    return list(stripped), list(tags[0])
# SDXL's keywords, with diffusers' names and defaults (None: derived as `_sdxl_conditioning` says).
SDXL_OPTIONS = ("prompt_2", "negative_prompt_2", "original_size", "crops_coords_top_left", "target_size", "negative_original_size",
                "negative_crops_coords_top_left", "negative_target_size", "aesthetic_score", "negative_aesthetic_score")


def _pair(name: str, v: Any) -> tuple[float, float]:
    if (not isinstance(v, (list, tuple)) or len(v) != 2
            or not all(real(x) is not None and math.isfinite(x) and 0 <= x <= 1 << 20 for x in v)):
        raise UnfogError(f"{name} must be a pair of non-negative numbers (height, width) or (top, left), got {v!r}", name)
    return float(v[0]), float(v[1])


def _sdxl_conditioning(model: ModelFacts, o: dict, prompt: Any, negative_prompt: Any, prompts: list[str], negatives: list[str],
                       n: int, height: int, width: int) -> dict:
    """SDXL's second prompts and micro-conditioning. `original_size` and `target_size` default to
    (height, width), the crop to (0, 0); each negative_* defaults to its positive counterpart.
    The base takes original size, crop and target size; the refiner original size, crop and
    aesthetic score (default 6.0, negative 2.5)."""
    # by default the second encoder reads the first's prompts, as given less their <lora:> tags
    prompts_2, negatives_2 = _prompts(prompts if o.get("prompt_2") is None else o["prompt_2"],
                                      (negatives if negative_prompt is not None else None) if o.get("negative_prompt_2") is None else o["negative_prompt_2"])
    if len(prompts_2) != len(prompts):
        raise UnfogError(f"prompt_2 must be one string or a list of {len(prompts)} strings, one per prompt", "prompt_2")
    size = (float(height), float(width))
    original = _pair("original_size", o["original_size"]) if o.get("original_size") is not None else size
    crop = _pair("crops_coords_top_left", o["crops_coords_top_left"]) if o.get("crops_coords_top_left") is not None else (0.0, 0.0)
    target = _pair("target_size", o["target_size"]) if o.get("target_size") is not None else size
    neg = {k: _pair(f"negative_{k}", o[f"negative_{k}"]) if o.get(f"negative_{k}") is not None else v
           for k, v in (("original_size", original), ("crops_coords_top_left", crop), ("target_size", target))}
    scores = {}
    for name, default in (("aesthetic_score", 6.0), ("negative_aesthetic_score", 2.5)):
        scores[name] = default if o.get(name) is None else finite_number(name, o[name])
        if not 0 <= scores[name] <= 100:  # trained on 0–10; a huge one ended in NaN latents after every step had run
            raise UnfogError(f"{name} must be from 0 to 100 (the refiner was trained on scores of 0 to 10), got {o[name]!r}", name)
    if model.sdxl == "refiner":
        ids = [*original, *crop, scores["aesthetic_score"]]
        neg_ids = [*neg["original_size"], *neg["crops_coords_top_left"], scores["negative_aesthetic_score"]]
    else:
        for name in ("aesthetic_score", "negative_aesthetic_score"):
            if o.get(name) is not None:
                raise UnfogError(f"{name} applies to the SDXL refiner; this is an SDXL base model", name)
        ids = [*original, *crop, *target]
        neg_ids = [*neg["original_size"], *neg["crops_coords_top_left"], *neg["target_size"]]
    return dict(prompts_2=[p for p in prompts_2 for _ in range(n)], negative_prompts_2=[q for q in negatives_2 for _ in range(n)],
                time_ids=ids, negative_time_ids=neg_ids, zero_negative=negative_prompt is None and model.force_zeros_for_empty_prompt)


# The sampler names A1111's web UI writes into its PNGs ("Sampler: ..."), for the parameters chunk.
A1111_SAMPLERS = {"euler": "Euler", "euler_ancestral": "Euler a", "heun": "Heun", "dpm_2": "DPM2", "dpm_2_ancestral": "DPM2 a", "lms": "LMS",
                  "dpmpp_2s_ancestral": "DPM++ 2S a", "dpmpp_sde": "DPM++ SDE", "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_sde": "DPM++ 2M SDE",
                  "dpmpp_3m_sde": "DPM++ 3M SDE", "ddim": "DDIM", "ddpm": "DDPM", "uni_pc": "UniPC", "lcm": "LCM"}


def png_text(r: GenerationRequest, k: int, model: str) -> dict[str, str]:
    """Text chunks for image k of a request: A1111's `parameters` line (which A1111, ComfyUI and
    image sites read), unfog's own JSON (`unfog`, read back by `settings_from_png`), and the plain
    fields one by one."""
    settings = {"prompt": r.prompts[k], "negative_prompt": r.negative_prompts[k], "seed": r.seeds[k], "steps": r.num_inference_steps,
                "sampler": r.sampler, "sampler_options": r.sampler_options, "sigma_schedule": r.sigma_schedule,
                "guidance_scale": r.guidance_scale, "width": r.width, "height": r.height, "model": model}
    parameters = (f"{r.prompts[k]}\nNegative prompt: {r.negative_prompts[k]}\n"
                  f"Steps: {r.num_inference_steps}, Sampler: {A1111_SAMPLERS.get(r.sampler, r.sampler)}, Schedule type: {r.sigma_schedule}, "
                  f"CFG scale: {r.guidance_scale:g}, Seed: {r.seeds[k]}, Size: {r.width}x{r.height}, Model: {model}")
    plain = {key: str(v) for key, v in settings.items() if key != "sampler_options"}
    return {**plain, "software": "unfog", "parameters": parameters, "unfog": json.dumps(settings)}


def settings_from_png(text: dict[str, str]) -> dict[str, Any]:
    """Generation settings from a PNG's text chunks: unfog's JSON if present, else A1111's
    `parameters` (prompt, negative prompt, steps, sampler, CFG scale, seed, size)."""
    if "unfog" in text:
        try:
            data = json.loads(text["unfog"])
        except ValueError:
            raise UnfogError("the PNG's unfog settings are not valid JSON") from None
        keys = ("prompt", "negative_prompt", "seed", "steps", "sampler", "sampler_options", "sigma_schedule", "guidance_scale", "width", "height")
        return {k: data[k] for k in keys if isinstance(data, dict) and k in data}
    if "parameters" not in text:
        raise UnfogError("the PNG carries no generation settings (no 'unfog' or 'parameters' text chunk)")
    lines = text["parameters"].strip().splitlines()
    if not lines:
        raise UnfogError("the PNG's 'parameters' text chunk is empty")
    # A1111 ends with a settings line that always names Steps; without one, every line is prompt.
    settings = lines[-1] if re.search(r"(^|, )Steps: ", lines[-1]) else ""
    body = lines[:-1] if settings else lines
    fields = dict(re.findall(r"(\w[\w ]*): ([^,]+)", settings))
    cut = next((k for k, line in enumerate(body) if line.startswith("Negative prompt: ")), len(body))  # the rest is the negative prompt
    prompt = "\n".join(body[:cut])
    negative = "\n".join(body[cut:])[len("Negative prompt: "):]
    by_a1111 = {v: k for k, v in A1111_SAMPLERS.items()}
    out: dict[str, Any] = {"prompt": prompt, "negative_prompt": negative}
    try:
        if "Steps" in fields:
            out["steps"] = int(fields["Steps"])
        if "CFG scale" in fields:
            out["guidance_scale"] = float(fields["CFG scale"])
        if "Seed" in fields:
            out["seed"] = int(fields["Seed"])
        if "Size" in fields:
            out["width"], out["height"] = (int(v) for v in fields["Size"].split("x"))
    except ValueError as e:
        raise UnfogError(f"the PNG's parameters line has a malformed value: {e}") from None
    sampler, schedule = fields.get("Sampler", "").strip(), fields.get("Schedule type", "").strip()
    for suffix in ("Karras", "Exponential", "SGM Uniform"):  # A1111 before 1.9 named the schedule in the sampler: "DPM++ 2M Karras"
        if sampler.endswith(" " + suffix) and sampler not in by_a1111:
            sampler, schedule = sampler[: -len(suffix) - 1], schedule or suffix
    if sampler in by_a1111:
        out["sampler"] = by_a1111[sampler]
    elif sampler:
        warnings.warn(f"the PNG's sampler {sampler!r} is not one unfog has; the model's default sampler is used", stacklevel=2)
    schedule = schedule.lower().replace(" ", "_")
    if schedule in SIGMA_SCHEDULES:
        out["sigma_schedule"] = schedule
    elif schedule and schedule != "automatic":
        warnings.warn(f"the PNG's schedule type {schedule!r} is not one unfog has; the sampler's default schedule is used", stacklevel=2)
    return out
