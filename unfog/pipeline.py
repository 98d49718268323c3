"""Pipeline: prompt → context → sampler → latents → decode → images.

A generation is four steps, each a method a caller can use on its own:

    request = pipe.request(prompt, ...)          # validated, typed (unfog.request)
    state = pipe.initial_state(request)          # text states, start noise, image/mask latents
    for step in pipe.denoise(request, state):    # one Step per sampler step; state.x at the end
        ...                                      # progress, previews, cancel (stop iterating)
    images = pipe.decode(state.x)
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from .adapters import LoraMixin
from .embeddings import EmbeddingMixin
from .diffusion import DiscreteDenoiser, SamplingDefaults, SchedulerConfig, classifier_free_guidance, make_sigmas
from .errors import UnfogError, flag, integer, device as checked_device
from .formats import ModelParts, check_dtype, load_any, save_model
from .graphs import DenoiserGraph
from .images import from_pil, mask_from_pil, resized, to_pil
from .nn import Autoencoder, TextEncoder, Tokenizer, UNet
from .nn.layers import ResBlock, TransformerBlock
from .nn.optimize import cpu_has_bf16, optimize_unet  # bench scripts import optimize_unet from here
from .nn.packed import prepack
from .nn.unet import DeepCache
from .offload import LowMemoryMixin
from .request import GenerationRequest, ModelFacts, make_request, size_pairs
from .samplers import Step, get_sampler, iterate, randn_like
from .text import apply_emphasis, as_texts, frame  # (as_texts is unfog.prompts', which text imports)
from .threads import fit_threads

DEFAULT_MODEL_DIR = Path(__file__).parent / "assets" / "default"
# The models shipped in the package, by the names `from_pretrained` and `--model` accept (a
# folder or file of that name, if one exists, wins).
BUNDLED_MODELS = {"shapes": DEFAULT_MODEL_DIR, "emoji": Path(__file__).parent / "assets" / "emoji"}


class Interrupted(Exception):
    """A generation stopped part-way through a network call because its `should_stop` said so."""


@dataclass
class PipelineOutput:
    images: list[Image.Image]  # empty with output_type="latent"
    seeds: list[int]
    request: GenerationRequest | None = None  # the settings as resolved (defaults filled in)
    latents: torch.Tensor | None = None  # the final state in sampler space, x_0 + σ·n (σ > 0 after denoising_end)


@dataclass
class DenoisingState:
    """Everything the denoising loop reads, made from a request by `Pipeline.initial_state`."""

    x: torch.Tensor  # the state at sigmas[0]; after `denoise` has run, the final latents
    sigmas: torch.Tensor
    cond: dict[str, torch.Tensor]  # the denoiser's conditioning: "context" (text states); SDXL adds "pooled" and "time_ids"
    uncond: dict[str, torch.Tensor] | None  # the negative prompt's, when guidance runs
    generators: list[torch.Generator]
    concat: torch.Tensor | None = None  # a 9-channel inpainting U-Net's mask and masked-image latents
    keep_known: Callable | None = None  # inpainting with an ordinary U-Net: re-impose the known region


# The most output pixels one autoencoder call decodes (Pipeline.decode): four 512² images; its
# activations at full resolution are what grows (about 1 GB per megapixel in float32).
DECODE_PIXELS = 1 << 20


class Pipeline(LoraMixin, EmbeddingMixin, LowMemoryMixin):
    """Text-to-image generation with a tokenizer, text encoder, U-Net and optional autoencoder."""

    def __init__(self, tokenizer: Tokenizer, text_encoder: TextEncoder, unet: UNet, vae: Autoencoder | None,
                 scheduler: SchedulerConfig, defaults: SamplingDefaults | dict | None = None, *,
                 tokenizer_2: Tokenizer | None = None, text_encoder_2: TextEncoder | None = None, force_zeros_for_empty_prompt: bool = False):
        """SDXL base models have a second tokenizer and text encoder (OpenCLIP bigG, whose
        projected pooled output the U-Net also takes); the SDXL refiner has only that one, as
        `text_encoder`. `force_zeros_for_empty_prompt`: with no negative prompt given, the negative
        half of guidance is all zeros rather than the encoded "" (as SDXL base was trained)."""
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.eval()
        self.tokenizer_2 = tokenizer_2
        self.text_encoder_2 = text_encoder_2.eval() if text_encoder_2 is not None else None
        if (tokenizer_2 is None) != (text_encoder_2 is None):
            raise UnfogError("tokenizer_2 and text_encoder_2 go together (SDXL's second text encoder)")
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        self.embedding_tokens: dict[str, list[str]] = {}  # textual-inversion token → its vector tokens
        self.unet = unet.eval()
        self.vae = vae.eval() if vae is not None else None
        self.scheduler = scheduler
        self.defaults = defaults if isinstance(defaults, SamplingDefaults) else SamplingDefaults.from_dict(defaults or {})
        try:
            get_sampler(self.defaults.sampler)
        except UnfogError as e:
            raise UnfogError(f"the model's default sampler is not one unfog has: {e}") from None
        self.decode_tile: int | None = None  # latent tile size for decoding large images
        # Checked before anything is allocated: images per request, pixels per image and per side, steps.
        self.max_images, self.max_pixels, self.max_side, self.max_steps = 64, 4096 * 4096, 8192, 1000
        d, f = self.defaults, self.downsample_factor  # said once at load, not as if each caller had passed them
        bad = [f"{name} {v} (must be a multiple of {f}, at most {self.max_side})" for name, v in (("height", d.height), ("width", d.width))
               if v % f or v > self.max_side]
        bad += [f"num_inference_steps {d.num_inference_steps} (more than {self.max_steps})"] if d.num_inference_steps > self.max_steps else []
        if bad:
            warnings.warn(f"the model's default {', '.join(bad)} cannot be used as they are: pass "
                          f"{' and '.join(b.split()[0] for b in bad)} to every call", stacklevel=2)
        # Replay the guided denoiser as a captured CUDA graph (optimize() turns this on for CUDA;
        # on a CPU the same static-buffer call runs without capture). Graphs are cached per shape.
        self.cuda_graphs = False
        self.disk_rest = None  # low-memory mode's DiskRest (enable_low_memory on a CPU)
        self.offload = None  # low-memory mode's DeviceOffload (enable_low_memory on CUDA): `device` is its GPU, where the networks run
        self.max_denoiser_graphs = 4
        self.denoiser_graphs: dict[tuple, DenoiserGraph] = {}
        self.denoiser = DiscreteDenoiser(unet, scheduler.alphas_cumprod(), scheduler.prediction_type)
        self.latent_channels = vae.config.latent_channels if vae is not None else 3
        # An inpainting U-Net (SD's 9-channel one) also takes the mask and the masked image's latents.
        self.is_inpainting_model = unet.config.in_channels == 2 * self.latent_channels + 1
        if unet.config.in_channels != self.latent_channels and not self.is_inpainting_model:
            raise UnfogError(f"the U-Net takes {unet.config.in_channels} channels but the {'autoencoder makes' if vae else 'images have'} {self.latent_channels}")
        self.sdxl = self._sdxl_kind()

    def _sdxl_kind(self) -> str | None:
        """"base" or "refiner" for an SDXL U-Net (6 or 5 micro-conditioning numbers beside the
        pooled embedding), None otherwise; checks that the text encoders fit the U-Net."""
        encoders = [e for e in (self.text_encoder, self.text_encoder_2) if e is not None]
        width = sum(e.config.width for e in encoders)
        if width != self.unet.config.context_dim:
            raise UnfogError(f"the text encoder{'s' if len(encoders) > 1 else ''} make{'' if len(encoders) > 1 else 's'} {width}-wide states but the "
                             f"U-Net cross-attends to {self.unet.config.context_dim}; the components are from different models")
        c = self.unet.config
        if c.addition_time_embed_dim is None:
            if self.text_encoder_2 is not None:
                raise UnfogError("a second text encoder needs an SDXL U-Net (with added conditioning); this U-Net has none")
            return None
        pooled = encoders[-1].config.projection_dim or encoders[-1].config.width
        count = c.micro_conditioning_count(pooled)
        if count not in (5, 6):
            raise UnfogError(f"the SDXL U-Net's added conditioning takes {c.projection_class_embeddings_input_dim} features, which is not a "
                             f"{pooled}-wide pooled embedding plus 5 (refiner) or 6 (base) micro-conditioning numbers of {c.addition_time_embed_dim}")
        return "refiner" if count == 5 else "base"

    # ---- loading, saving, devices -------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, **options) -> "Pipeline":
        """Load an unfog model folder, a diffusers-layout Stable Diffusion folder or a
        single-file SD 1.x/2.x/XL `.safetensors`; `None` loads the default model bundled with
        unfog, and "shapes" or "emoji" a bundled model by name. Options (see `unfog.formats.load_any`): `dtype` (or diffusers' name `torch_dtype`;
        the networks are loaded straight into it, e.g. torch.bfloat16 for SDXL on a CPU),
        `clip_skip`, `prediction_type`, and for single files `config` (a diffusers-layout config
        folder) and `tokenizer`; `low_memory=True` calls `enable_low_memory()` on the result."""
        low_memory = flag(options.pop("low_memory", False), "low_memory")
        if "torch_dtype" in options:
            alias = options.pop("torch_dtype")
            if options.get("dtype") not in (None, alias):
                raise UnfogError(f"dtype={options['dtype']} and torch_dtype={alias} disagree; pass one", "dtype")
            options["dtype"] = alias
        if path is None:
            if not (DEFAULT_MODEL_DIR / "model_index.json").is_file():
                raise UnfogError("this install of unfog has no bundled default model; pass a model folder: Pipeline.from_pretrained('path/to/model')")
            path = DEFAULT_MODEL_DIR
        elif str(path) in BUNDLED_MODELS and not Path(path).exists():
            bundled = BUNDLED_MODELS[str(path)]
            if not (bundled / "model_index.json").is_file():
                raise UnfogError(f"this install of unfog lacks the bundled model {str(path)!r} ({bundled}); reinstall unfog from a full checkout")
            path = bundled
        pipe = cls.from_parts(load_any(path, **options))
        return pipe.enable_low_memory() if low_memory else pipe

    @classmethod
    def from_parts(cls, p: ModelParts) -> "Pipeline":
        return cls(p.tokenizer, p.text_encoder, p.unet, p.vae, p.scheduler, p.defaults, tokenizer_2=p.tokenizer_2,
                   text_encoder_2=p.text_encoder_2, force_zeros_for_empty_prompt=p.force_zeros_for_empty_prompt)

    def save_pretrained(self, directory: str | Path, dtype: torch.dtype | None = None) -> None:
        """Write this pipeline as a model folder (JSON configs + safetensors), optionally
        storing the weights in `dtype` (float16 halves the size; loading casts back to float32).
        LoRA adapters are saved only as fused into the weights (`fuse_lora()` first)."""
        if self.get_active_adapters() and not all(layer.fused or not layer.active for _, _, layer in self._adapted_layers()):
            raise UnfogError("LoRA adapters are loaded but not fused: fuse_lora() to save a model with them baked in, or unload_lora_weights()")
        self._resident(changing=False)
        with self._adapters_set_aside():
            save_model(ModelParts(self.tokenizer, self.text_encoder, self.unet, self.vae, self.scheduler, self.defaults, tokenizer_2=self.tokenizer_2,
                              text_encoder_2=self.text_encoder_2, force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt), directory, dtype)
        self._rest()

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "Pipeline":
        """Move the networks to a device and/or cast them to a dtype (`.to(torch.float16)` too); returns self."""
        device, dtype = (None, device) if isinstance(device, torch.dtype) else (device, dtype)
        self._check_move(device)
        device = None if device is None else checked_device(device)
        if check_dtype(dtype) is not None:
            self._resident(changing=True)  # low-memory mode: cast the encoders, then write them again
        for m in (self.text_encoder, self.text_encoder_2, self.unet, self.vae):
            if m is not None and not (self.disk_rest is not None and self.disk_rest.is_away(m)):  # (on disk they stay on the CPU)
                m.to(device=device, dtype=dtype)
        if device is not None:
            self.denoiser.to(device)  # the schedule buffers keep their float64
        self.denoiser_graphs.clear()  # captured graphs point at the old tensors
        self._rest()
        return self

    def optimize(self, dtype: torch.dtype | None = None, channels_last: bool = True, compile: bool = False,
                 cuda_graphs: bool | None = None) -> "Pipeline":
        """The fast path, chosen explicitly so the default stays exact. On CUDA: every network
        in `dtype` (bfloat16 by default), channels_last convolutions in the U-Net (not in the
        autoencoder, whose decode it slowed from 21 to 26 ms at 512² on an H200), cuDNN's algorithm
        search (`torch.backends.cudnn.benchmark`, a process-wide switch), and (`cuda_graphs`, on by
        default there) the guided denoiser (CFG batch, U-Net, blend) captured as a CUDA graph on
        the first generation of each shape and replayed by every sampler's every call after. On
        a CPU with bf16 units (AVX512-BF16 or AMX): the U-Net, which does nearly all the work, in
        bfloat16 and channels_last, with its weights packed once in oneDNN's layout (unfog.nn.packed:
        no reorder per call, wide convolutions as matmuls, GEGLU fused; about 1.4× the plain bfloat16
        U-Net, at the cost of the U-Net's weights held twice); the autoencoder likewise (SD 1.5's
        decode of a 256² image: 3.5 s in float32, 1.0 s so, in one run of bench/decode_cpu.py; bf16
        decodes the bundled models' latents at 52–63 dB PSNR against float32); the text encoder
        stays float32. Elsewhere it
        changes nothing else; the q/k/v projections of self-attention are fused into one matmul
        everywhere. Sampler state and guidance stay float32 throughout. `compile=True` also runs
        the U-Net through torch.compile (in place, so saving still works): it pays for long-lived
        processes such as the server, after a warm-up of tens of seconds per shape; shapes are
        specialised, so past torch._dynamo's recompile limit (8 by default) further shapes run
        uncompiled. With graphs on, one pipeline serves one thread at a time. Returns self."""
        channels_last, compile, cuda_graphs = flag(channels_last, "channels_last"), flag(compile, "compile"), flag(cuda_graphs, "cuda_graphs", none=True)
        self._check_graphs(cuda_graphs)  # before anything is changed
        dtype = check_dtype(dtype or (torch.bfloat16 if self.device.type == "cuda" else None))
        if self.device.type == "cuda":
            for m in (self.text_encoder, self.text_encoder_2, self.vae):
                if m is not None:
                    m.to(dtype=dtype)
        elif not (self.device.type == "cpu" and (dtype is not None or cpu_has_bf16())):
            dtype, channels_last = None, False
        elif dtype is None:
            dtype = torch.bfloat16
        optimize_unet(self.unet, dtype, channels_last, compile, self.device)
        if self.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and self.vae is not None:  # see the docstring
            prepack(self.vae.to(dtype=dtype, memory_format=torch.channels_last if channels_last else torch.preserve_format))
        self.cuda_graphs = self.device.type == "cuda" and self.offload is None if cuda_graphs is None else cuda_graphs
        self.denoiser_graphs.clear()
        return self

    @property
    def device(self) -> torch.device:
        return self.offload.device if self.offload is not None else next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def vae_factor(self) -> int:
        return self.vae.config.downsample_factor if self.vae is not None else 1

    @property
    def downsample_factor(self) -> int:
        """Sizes are multiples of this, the autoencoder's factor (8 for SD) as in diffusers (the U-Net meets odd-sized skips)."""
        return self.vae_factor

    # ---- the four steps of a generation -------------------------------------------------

    def request(self, prompt: str | Sequence[str], **options) -> GenerationRequest:
        """Step 1: a validated request for this model; options are those of `__call__`."""
        facts = ModelFacts(self.defaults, self.scheduler.sigma_schedule, self.downsample_factor, self.vae_factor,
                           self.latent_channels, self.is_inpainting_model, self.scheduler.match_diffusers, self.scheduler.spacing_given,
                           self.max_images, self.max_pixels, self.sdxl, self.force_zeros_for_empty_prompt, self.max_side, self.max_steps)
        return make_request(facts, prompt, **options)

    @torch.inference_mode()
    def initial_state(self, request: GenerationRequest) -> DenoisingState:
        """Step 2: the text states, the sigmas and the state at σ_0 for the request's mode:
        text-to-image from noise, img2img part-way from the encoded image, inpainting with
        either kind of U-Net. Per image, random draws come in this order: the image's latent
        sample, the start noise, the masked image's latent sample (diffusers' order)."""
        r = request
        gens = r.generators or [torch.Generator("cpu").manual_seed(s) for s in r.seeds]
        h, w = r.height // self.vae_factor, r.width // self.vae_factor
        sigmas = make_sigmas(r.sigma_schedule, r.num_inference_steps, self.denoiser.alphas_cumprod.cpu(), steps_offset=self.scheduler.steps_offset,
                             diffusers_sampler=r.sampler if r.match_diffusers else None, set_alpha_to_one=self.scheduler.set_alpha_to_one)
        sigmas = self._schedule_part(r, sigmas)
        latent_image = isinstance(r.image, torch.Tensor)
        pixels = from_pil(resized(r.image, r.width, r.height)).expand(r.batch, -1, -1, -1) if r.image is not None and not latent_image else None
        mask = mask_from_pil(r.mask_image, r.width, r.height) if r.mask_image is not None else None
        from_noise = r.image is None or (mask is not None and r.strength == 1)
        init = None
        if latent_image:
            init = r.image.to(self.device, torch.float32).expand(r.batch, -1, -1, -1)
        elif r.image is not None and (not from_noise or (mask is not None and not self.is_inpainting_model)):
            init = self.encode(pixels, gens)
        noise = torch.stack([torch.randn((self.latent_channels, h, w), generator=g, device=g.device) for g in gens]) if r.latents is None else r.latents
        noise = noise.to(self.device, torch.float32)
        # From noise: the forward process's marginal at σ_0 for unit-variance data, x_0 + σ_0·n,
        # has standard deviation sqrt(1 + σ_0²) (diffusers' init_noise_sigma for VP models).
        # With denoising_start the image already is the state at σ_0 (a base model's hand-off).
        if from_noise:
            x = noise * (1 + sigmas[0] ** 2).sqrt()
        else:
            x = init.clone() if r.denoising_start is not None else init + noise * sigmas[0]
        state = DenoisingState(x, sigmas.to(self.device), *self._conditioning(r), gens)
        if mask is not None:
            masked = self.encode(pixels * (mask < 0.5), gens)
            small = torch.nn.functional.interpolate(mask, size=(h, w)).to(self.device).expand(r.batch, -1, -1, -1)
            if self.is_inpainting_model:
                state.concat = torch.cat([small, masked], dim=1)
            else:
                state.keep_known = functools.partial(_keep_known, init, noise, small, state.sigmas)
        return state

    @torch.inference_mode()
    def denoise(self, request: GenerationRequest, state: DenoisingState, should_stop: Callable[[], bool] | None = None) -> Iterator[Step]:
        """Step 3: run the request's sampler from `state`, yielding each step (index, state,
        x_0 estimate); when it is exhausted, `state.x` holds the final latents. Stopping the
        iteration early (closing the generator) stops the sampler at its next step. With
        `should_stop`, it is also asked before each residual and transformer block of the U-Net,
        and a True raises `Interrupted` within one block rather than one step (a step at 1024² on
        a CPU can take many seconds; eager U-Net calls only: under CUDA graphs or torch.compile a
        U-Net call runs whole and the stop comes at the next step)."""
        compiled = getattr(self.unet, "_compiled_call_impl", None) is not None
        # One thread fewer per core other processes keep busy (unfog.threads); not for a compiled
        # U-Net, which a new thread count recompiles (a first image's compile workers looked like
        # other load, and the second image then spent 50 s recompiling: bench/compile_cache.py).
        if self.device.type == "cpu" and not compiled:
            fit_threads()
        sample = get_sampler(request.sampler)
        denoiser = self._guided_denoiser(request, state)
        hooks = []
        # Not with graphs (a replay runs whole) or torch.compile (new hooks would recompile the U-Net).
        if should_stop is not None and not self.cuda_graphs and not compiled:
            def check(module, args):
                if should_stop():
                    raise Interrupted("stopped within a U-Net call")
            hooks = [m.register_forward_pre_hook(check) for m in self.unet.modules() if isinstance(m, (ResBlock, TransformerBlock))]
        try:
            with self._on_device(self.unet):  # low-memory mode on CUDA: on the GPU for the denoising only
                state.x = yield from iterate(sample, denoiser, state.x, state.sigmas, generator=state.generators,
                                             callback=state.keep_known, **request.sampler_options)
        finally:
            self.unet.release_context()  # the text context's kept cross-attention keys and values
            for hook in hooks:
                hook.remove()
        if not torch.isfinite(state.x).all():  # one check at the end: per step it would stall the GPU every step
            raise UnfogError(f"the denoising ended in NaN or infinite latents (guidance_scale {request.guidance_scale:g}, sampler {request.sampler}); "
                             "lower guidance_scale, or check the model's weights and dtype (float16 can overflow)")

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """Step 4: latents (sampler space) → PIL images. A decode that overflows in half
        precision is re-run with a float32 copy of the autoencoder (with a warning) instead of
        returning a black image; with `decode_tile` set, large latents are decoded in overlapping
        tiles to bound memory. A batch is decoded a few images at a time (at most DECODE_PIXELS
        output pixels per call), so its memory does not grow with the number of images."""
        if self.vae is None:
            return to_pil(latents)
        c = self.vae.config
        z = (latents / c.scaling_factor + c.shift_factor).to(self.device)
        per_call = max(1, DECODE_PIXELS // (z.shape[-2] * z.shape[-1] * self.vae_factor ** 2))

        def decode_with(vae: Autoencoder) -> torch.Tensor:
            return torch.cat([self._decode_tiled(vae, part) for part in z.split(per_call)])

        with self._on_device(self.vae):
            pixels = decode_with(self.vae)
            if not torch.isfinite(pixels).all() and next(self.vae.parameters()).dtype != torch.float32:
                warnings.warn(f"the autoencoder overflowed in {str(next(self.vae.parameters()).dtype).replace('torch.', '')}; decoded again in float32", stacklevel=2)
                pixels = decode_with(copy.deepcopy(self.vae).float())
        return to_pil(pixels)

    @torch.inference_mode()
    def __call__(self, prompt: str | Sequence[str], *, callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
                 progress: bool = False, **options) -> PipelineOutput:
        """Generate images for one prompt or a list; image k of the batch uses its own seed.

        Options, with diffusers' names: `negative_prompt`, `num_inference_steps`,
        `guidance_scale`, `height`, `width`, `num_images_per_prompt`, `latents` (standard-normal
        starting noise (B, C, h, w), scaled here by sqrt(1 + σ_0²)), `generator`; and `seed` (an
        int, image k using seed + k, or one per image), `sampler`, `sampler_options` (e.g.
        {"eta": 0.5}), `sigma_schedule`, `long_prompts` ("chunk" or "truncate"), `round_timesteps`,
        `match_diffusers` (walk the sigmas diffusers' scheduler of the same name walks on the model's
        scheduler config; default: on for Stable Diffusion weights, see README "Samplers").
        img2img: `image` with `strength` in (0, 1] (default 0.8) starts that far along the
        schedule from the encoded image. Inpainting: also `mask_image` (white = repaint,
        strength default 1); a 9-channel inpainting U-Net sees the mask and the masked image,
        an ordinary one has the known region re-imposed after every step.
        `callback(i, x, x0_hat)` is called after each sampler step; `progress` shows a bar.
        """
        request = self.request(prompt, **options)
        with self.prompt_loras(request):  # the prompt's <lora:…> tags (A1111 syntax), for this call only
            state = self.initial_state(request)
            steps = contextlib.closing(self.denoise(request, state))  # a callback that raises stops the sampler too
            with steps as steps, tqdm(total=len(state.sigmas) - 1, desc="denoising", disable=not progress, leave=False) as bar:
                for step in steps:
                    bar.update(1)
                    if callback is not None:
                        callback(step.index, step.x, step.x0)
        images = self.decode(state.x) if request.output_type == "pil" else []
        return PipelineOutput(images=images, seeds=request.seeds, request=request, latents=state.x)

    def warm_up(self, sizes: Sequence[tuple[int, int]] = (), **options) -> list[float]:
        """One short generation (2 steps, the model's defaults otherwise) at each (height, width),
        the model's default size when none is given, so that what is built on a first call of
        each shape (a torch.compile'd U-Net, captured CUDA graphs) is built now rather than in a
        user's first request; `options` as for a call (e.g. `num_images_per_prompt`, a different
        batch being a different shape). Returns the seconds each took."""
        times = []
        for height, width in size_pairs(sizes) or [(None, None)]:
            t = time.perf_counter()
            self("", **{"num_inference_steps": 2, "seed": 0, **options, "height": height, "width": width})
            times.append(time.perf_counter() - t)
        return times

    def _schedule_part(self, r: GenerationRequest, sigmas: torch.Tensor) -> torch.Tensor:
        """The part of the schedule this request runs. img2img: the last int(steps·strength)
        steps. SDXL's hand-off, in diffusers' rule: `denoising_end` keeps the steps whose timestep
        is at least round(T·(1 - denoising_end)), `denoising_start` those below it."""
        steps = len(self.denoiser.alphas_cumprod)

        def timesteps_from(frac: float) -> torch.Tensor:  # a step's timestep ≥ this; whole numbers up to float error
            return self.denoiser.sigma_to_t(sigmas[:-1]).double() - (round(steps - frac * steps) - 1e-3)

        if r.denoising_start is not None:
            keep = int((timesteps_from(r.denoising_start) < 0).sum())
            if keep == 0:
                raise UnfogError(f"denoising_start {r.denoising_start} with {r.num_inference_steps} steps leaves no step to run; lower it or add steps", "denoising_start")
            sigmas = sigmas[len(sigmas) - 1 - keep:]
        elif r.image is not None:
            sigmas = sigmas[r.num_inference_steps - int(r.num_inference_steps * r.strength):]
        if r.denoising_end is not None:
            keep = int((timesteps_from(r.denoising_end) >= 0).sum())
            if keep == 0:
                raise UnfogError(f"denoising_end {r.denoising_end} with {r.num_inference_steps} steps leaves no step to run; raise it or add steps", "denoising_end")
            sigmas = sigmas[: keep + 1]
        return sigmas

    # ---- the pieces the steps are made of -----------------------------------------------

    @torch.inference_mode()
    def encode_prompt(self, prompts: Sequence[str], long_prompts: str = "chunk", prompts_2: Sequence[str] | None = None) -> torch.Tensor:
        """Per-token text states (B, L, D) that the U-Net cross-attends to. A prompt longer
        than the text encoder's context is, with `long_prompts="chunk"`, cut into windows
        that are encoded separately and concatenated (L = windows × context), as the popular
        UIs do; with "truncate" it is cut off, with a warning. SDXL base: `prompts_2` (default
        `prompts`) go to the second encoder and the two encoders' states are concatenated."""
        return self.encode_text(prompts, long_prompts, prompts_2)[0]

    @torch.inference_mode()
    def encode_text(self, prompts: Sequence[str], long_prompts: str = "chunk", prompts_2: Sequence[str] | None = None,
                    syntax: str = "plain") -> tuple[torch.Tensor, torch.Tensor]:
        """(states (B, L, D), pooled (B, P)): `encode_prompt`'s states and the last text
        encoder's pooled output of each prompt's first window (SDXL's pooled conditioning).
        `syntax="a1111"` reads A1111's emphasis, BREAK and windows (see unfog.prompts)."""
        texts, prompts_2 = [self.expand_embeddings(p) for p in as_texts("prompts", prompts)], None if prompts_2 is None else as_texts("prompts_2", prompts_2)
        encoders = [(self.tokenizer, self.text_encoder, texts)]
        if self.text_encoder_2 is not None:
            encoders.append((self.tokenizer_2, self.text_encoder_2, texts if prompts_2 is None else [self.expand_embeddings(p) for p in prompts_2]))
        framed, weights = frame([(tok, t) for tok, _, t in encoders], long_prompts, syntax)
        states = []
        for (_, encoder, _), ids, w in zip(encoders, framed, weights or [None] * len(framed)):
            b, windows, length = ids.shape
            with self._encoding_with(encoder):  # low-memory mode: from disk for this encoding only
                s, pooled = encoder(ids.reshape(b * windows, length).to(self.device))
            if w is not None:  # each encoder's own prompt's emphasis
                s = apply_emphasis(s, w.reshape(b * windows, length))
            states.append(s.reshape(b, windows * length, -1))
            pooled = pooled.reshape(b, windows, -1)[:, 0]
        return torch.cat(states, dim=-1) if len(states) > 1 else states[0], pooled

    def _conditioning(self, r: GenerationRequest) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        """(cond, uncond), the denoiser's conditioning keywords for each half of guidance: the
        text states, and for SDXL the pooled embedding and micro-conditioning numbers. Both halves
        are encoded together, so they get the same number of windows."""
        zeros = r.guided and r.zero_negative
        if r.guided and not zeros:
            states, pooled = self.encode_text(r.negative_prompts + r.prompts, r.long_prompts,
                                              None if r.prompts_2 is None else r.negative_prompts_2 + r.prompts_2, r.prompt_syntax)
            (u_states, states), (u_pooled, pooled) = states.chunk(2), pooled.chunk(2)
        else:
            states, pooled = self.encode_text(r.prompts, r.long_prompts, r.prompts_2, r.prompt_syntax)
            u_states, u_pooled = torch.zeros_like(states), torch.zeros_like(pooled)
        cond, uncond = {"context": states}, {"context": u_states}
        if self.sdxl is not None:
            ids = torch.tensor([r.time_ids], device=self.device).expand(r.batch, -1)
            neg_ids = torch.tensor([r.negative_time_ids], device=self.device).expand(r.batch, -1)
            cond.update(pooled=pooled, time_ids=ids)
            uncond.update(pooled=u_pooled, time_ids=neg_ids)
        return cond, (uncond if r.guided else None)

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """Pixels in [-1, 1] → sampler-space latents, a posterior sample per image drawn from
        that image's generator (pixel-space models return the pixels)."""
        if self.vae is None:
            return pixels.float().to(self.device)
        vae_dtype = next(self.vae.parameters()).dtype
        with self._on_device(self.vae):
            mean, logvar = self.vae.encode(pixels.to(self.device, vae_dtype))
        z = mean.float() + (0.5 * logvar.float()).exp() * randn_like(mean.float(), generators)  # checks one per image
        c = self.vae.config
        return (z - c.shift_factor) * c.scaling_factor

    def _guided_denoiser(self, r: GenerationRequest, state: DenoisingState) -> Callable:
        """D_cfg(x, σ) for this request: the cached CUDA graph of it when graphs are on, else eager.
        With `cfg_truncation` f, calls at σ at or below that of step round(f·steps) run the
        conditional half alone (one U-Net batch instead of two). DeepCache's features are this
        generation's own, passed to each U-Net call (eager: a captured graph would compute more)."""
        cache = DeepCache(r.deep_cache) if r.deep_cache is not None else None
        full = self._denoiser_for(r, state, cache)
        if state.uncond is None or r.cfg_truncation is None:
            return full
        cond_only = self._denoiser_for(r, dataclasses.replace(state, uncond=None), cache)
        steps = len(state.sigmas) - 1
        cut = float(state.sigmas[min(steps, round(r.cfg_truncation * steps))])

        def truncated(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            return cond_only(x, sigma) if float(sigma.max()) <= cut else full(x, sigma)

        return truncated

    def _denoiser_for(self, r: GenerationRequest, state: DenoisingState, cache: DeepCache | None = None) -> Callable:
        base = functools.partial(self.denoiser, round_timesteps=r.round_timesteps, **({} if cache is None else {"deep_cache": cache}))
        if self.cuda_graphs and r.deep_cache is None and self.offload is None:
            graph = self._denoiser_graph(base, r, state)
            if graph is not None:
                return graph.bind(state.cond, state.uncond, r.guidance_scale, state.concat)
        extra = {} if state.concat is None else {"concat": state.concat}
        return classifier_free_guidance(base, state.cond, state.uncond, r.guidance_scale, **extra)

    def _denoiser_graph(self, base: Callable, r: GenerationRequest, state: DenoisingState) -> DenoiserGraph | None:
        """The cached denoiser graph for these shapes, captured on first use (the least recently
        used one is dropped beyond `max_denoiser_graphs`, since each holds its activations). The
        key also holds what the captured kernels read but the buffers do not: the U-Net's weight
        storage and dtype and the timestep rounding. A capture that fails warns, turns graphs off
        and returns None, so the generation runs eagerly instead."""
        weight = next(self.unet.parameters())
        concat_shape = None if state.concat is None else tuple(state.concat.shape)
        key = (tuple(state.x.shape), tuple((k, tuple(v.shape), v.dtype) for k, v in state.cond.items()), state.uncond is not None, concat_shape,
               weight.data_ptr(), weight.dtype, r.round_timesteps)
        graph = self.denoiser_graphs.pop(key, None)
        if graph is None:
            try:
                graph = DenoiserGraph(base, tuple(state.x.shape), state.cond, state.uncond is not None, concat_shape, device=self.device)
            except Exception as e:  # e.g. an operation that cannot be captured
                warnings.warn(f"capturing the denoiser as a CUDA graph failed ({type(e).__name__}: {e}); running eagerly from now on", stacklevel=3)
                self.cuda_graphs = False
                return None
        self.denoiser_graphs[key] = graph
        while len(self.denoiser_graphs) > self.max_denoiser_graphs:
            self.denoiser_graphs.pop(next(iter(self.denoiser_graphs)))
        return graph

    @property
    def decode_tile(self) -> int | None:
        """Latent tile size for decoding large images in overlapping tiles (None: whole)."""
        return self._decode_tile

    @decode_tile.setter
    def decode_tile(self, tile: int | None) -> None:
        if tile is not None and (integer(tile) is None or tile < 8):
            raise UnfogError(f"decode_tile must be None (decode whole) or a latent tile size of at least 8, got {tile!r}", "decode_tile")
        self._decode_tile = None if tile is None else int(tile)

    def _decode_tiled(self, vae: Autoencoder, z: torch.Tensor) -> torch.Tensor:
        tile = self.decode_tile
        h, w = z.shape[-2:]
        dtype = next(vae.parameters()).dtype
        if tile is None or (h <= tile and w <= tile):
            return vae.decode(z.to(dtype)).float()
        f = vae.config.downsample_factor
        overlap = max(1, tile // 4)
        stride = tile - overlap
        out = torch.zeros(z.shape[0], vae.config.out_channels, h * f, w * f, device=z.device)
        weight = torch.zeros(1, 1, h * f, w * f, device=z.device)
        # Linear ramps across the overlaps blend neighbouring tiles without seams.
        for top in sorted({*range(0, max(h - tile, 0) + 1, stride), max(h - tile, 0)}):
            for left in sorted({*range(0, max(w - tile, 0) + 1, stride), max(w - tile, 0)}):
                piece = vae.decode(z[..., top : top + tile, left : left + tile].to(dtype)).float()
                ph, pw = piece.shape[-2:]
                ramp_y = torch.clamp(torch.minimum(torch.arange(ph, device=z.device) + 1, ph - torch.arange(ph, device=z.device)) / (overlap * f), max=1)
                ramp_x = torch.clamp(torch.minimum(torch.arange(pw, device=z.device) + 1, pw - torch.arange(pw, device=z.device)) / (overlap * f), max=1)
                mask = (ramp_y[:, None] * ramp_x[None, :])[None, None]
                out[..., top * f : top * f + ph, left * f : left * f + pw] += piece * mask
                weight[..., top * f : top * f + ph, left * f : left * f + pw] += mask
        return out / weight


def _keep_known(init: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor, sigmas: torch.Tensor, i: int, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """After step i, the known region (mask 0) is the original image noised to σ_{i+1}, and the image itself after the last step (as diffusers)."""
    known = init + noise * sigmas[i + 1] if i + 2 < len(sigmas) else init
    return (1 - mask) * known + mask * x
