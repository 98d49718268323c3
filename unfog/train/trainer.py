"""The training loop: AdamW with warm-up, EMA, gradient clipping and accumulation, bf16
autocast, atomic checkpoints with exact resume, non-finite-loss guard, DDP under torchrun.

Every random draw of a step (which samples, their captions, timesteps, noise, caption
dropout) comes from generators seeded by (seed, step) for the whole global batch, and each
process takes its slice. So a run does not depend on how many processes share it, and a
resumed run computes the same steps as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import signal
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from ..diffusion import DiscreteDenoiser, SamplingDefaults, SchedulerConfig
from ..errors import UnfogError
from ..formats.folder import check_save_target, load_weights, read_config, save_weights
from ..formats.weights import load_checked
from ..images import grid, to_pil
from ..nn import Autoencoder, AutoencoderConfig, TextEncoder, TextEncoderConfig, Tokenizer, TokenizerConfig, UNet, UNetConfig
from . import fsdp, plots
from .checkpoint import latest_checkpoint, load_checkpoint, read_tensors, save_checkpoint
from .config import TrainConfig


class TrainingStopped(UnfogError):
    """The run stopped early (too many non-finite losses); the last good checkpoint is kept."""


class AutoencoderModel(nn.Module):
    """KL autoencoder objective: L1 + L2 reconstruction plus a small KL term."""

    def __init__(self, config: AutoencoderConfig, kl_weight: float):
        super().__init__()
        self.autoencoder = Autoencoder(config)
        self.kl_weight = kl_weight

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        mean, logvar = self.autoencoder.encode(x)
        rec = self.autoencoder.decode(mean + (0.5 * logvar).exp() * noise.to(mean))
        rec, x = rec.float(), x.float()
        kl = 0.5 * (mean.float() ** 2 + logvar.float().exp() - 1 - logvar.float()).sum(dim=(1, 2, 3)).mean()
        return (rec - x).abs().mean() + ((rec - x) ** 2).mean() + self.kl_weight * kl


class DiffusionModel(nn.Module):
    """U-Net and text encoder trained jointly; the denoiser owns the loss. An SDXL base also has
    its second text encoder, whose pooled output and the micro-conditioning numbers go to the U-Net."""

    def __init__(self, unet: UNet, text_encoder: TextEncoder, scheduler: SchedulerConfig, weighting: str, snr_gamma: float,
                 text_encoder_2: TextEncoder | None = None):
        super().__init__()
        self.denoiser = DiscreteDenoiser(unet, scheduler.alphas_cumprod(), scheduler.prediction_type)
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.weighting, self.snr_gamma = weighting, snr_gamma

    @property
    def unet(self) -> UNet:
        return self.denoiser.network

    def forward(self, x0: torch.Tensor, ids: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                ids_2: torch.Tensor | None = None, time_ids: torch.Tensor | None = None) -> torch.Tensor:
        context, pooled = self.text_encoder(ids)
        added = {}
        if self.text_encoder_2 is not None:
            context_2, pooled = self.text_encoder_2(ids_2)
            context = torch.cat([context, context_2], dim=-1)
        if self.unet.config.addition_time_embed_dim is not None:
            added = {"pooled": pooled, "time_ids": time_ids}
        return self.denoiser.loss(x0, t=t, noise=noise, weighting=self.weighting, snr_gamma=self.snr_gamma, context=context, **added)


def _step_generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + salt) % (2**63))


def read_run(run: Path, stage: str, hint: str) -> tuple[TrainConfig, Path]:
    """A run's config and newest checkpoint, requiring the given stage."""
    if not (run / "config.json").is_file():
        raise UnfogError(f"{run} is not a training run (no config.json)")
    cfg = read_config(run / "config.json", TrainConfig)
    if cfg.stage != stage:
        raise UnfogError(f"{run} is a {cfg.stage} run, not a {stage} run; {hint}")
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise UnfogError(f"{stage} run {run} has no checkpoint yet")
    return cfg, ckpt


def text_encoder_config(c: TrainConfig, tokenizer: Tokenizer) -> TextEncoderConfig:
    """The text encoder a diffusion run trains, sized to its tokenizer."""
    return TextEncoderConfig(vocab_size=tokenizer.vocab_size, context_length=c.tokenizer_context_length, eos_token_id=tokenizer.eos_id, **c.text_encoder)


def load_autoencoder(source: str | Path) -> tuple[Autoencoder, bool]:
    """An autoencoder from an autoencoder training run (its newest EMA weights) or from a model
    folder's vae/. Returns (autoencoder, came_from_a_run)."""
    src = Path(source)
    if (src / "config.json").is_file() and (src / "checkpoints").is_dir():
        cfg, ckpt = read_run(src, "autoencoder", "pass an autoencoder run")
        model = AutoencoderModel(AutoencoderConfig(**cfg.autoencoder), 0.0)
        load_checked(model, read_tensors(ckpt / "ema.safetensors"), f"checkpoint {ckpt / 'ema.safetensors'}")
        return model.autoencoder.eval(), True
    vae_dir = src / "vae" if (src / "vae").is_dir() else src
    if not (vae_dir / "config.json").is_file():
        raise UnfogError(f"{src} is neither an autoencoder training run nor a model folder with a vae/")
    vae = Autoencoder(read_config(vae_dir / "config.json", AutoencoderConfig))
    load_weights(vae, vae_dir / "model.safetensors")
    return vae.eval(), False


def write_vae(vae: Autoencoder, directory: Path) -> None:
    """The run's copy of its autoencoder, weights first and each file renamed into place, so
    that a kill mid-copy never leaves a config.json without its weights (which --resume reads)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, write in (("model.safetensors", lambda p: save_weights(vae, p)),
                        ("config.json", lambda p: p.write_text(json.dumps(asdict(vae.config), indent=2) + "\n"))):
        tmp = directory / f".{name}.tmp"
        write(tmp)
        os.replace(tmp, directory / name)


class Trainer:
    """One training run in `out_dir`; `run()` trains until max_steps or a stop."""

    RESUMABLE_OVERRIDES = ("max_steps", "checkpoint_every", "sample_every", "log_every", "keep_checkpoints", "max_nonfinite")

    def __init__(self, config: TrainConfig, data, out_dir: str | Path, *, vae: str | Path | None = None,
                 init: str | Path | None = None, device: str | None = None, resume: bool = False, progress: bool = True,
                 resume_overrides: dict | None = None):
        self.out = Path(out_dir)
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device is None:
            device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.world > 1 and not dist.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        ckpt = latest_checkpoint(self.out)
        if ckpt is not None and not resume:
            raise UnfogError(f"{self.out} already holds checkpoints; pass --resume to continue that run or choose a new --out")
        if resume and (self.out / "config.json").is_file():
            config = read_config(self.out / "config.json", TrainConfig)
            for key, value in (resume_overrides or {}).items():
                if key not in self.RESUMABLE_OVERRIDES and value != getattr(config, key):  # the same value again is fine
                    raise UnfogError(f"--{key.replace('_', '-')} cannot change when resuming (the run was configured with {getattr(config, key)!r}); "
                                     f"only {', '.join(self.RESUMABLE_OVERRIDES)} may")
                setattr(config, key, value)
        self.config = c = config
        if c.fsdp:  # before anything is written
            fsdp.check_setup(self.world, c.stage, bool(c.lora_rank))
        per_step = self.world * c.grad_accum
        if c.batch_size % per_step:
            raise UnfogError(f"batch_size {c.batch_size} must be divisible by processes × grad_accum = {per_step}")
        self.data = data  # or a function of the resolution, called once the model fixes it (LoRA at the model's own size)
        self.progress = progress and self.rank == 0
        self.autocast = c.precision == "bf16" or (c.precision == "auto" and self.device.type == "cuda")
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(c.seed)
        self.lora = None
        self.tokenizer_2, self.force_zeros = None, False  # an SDXL base's second tokenizer (LoRA runs)
        if c.stage == "autoencoder":
            if init is not None:
                raise UnfogError("--init applies to the diffusion stage; it starts from a model folder")
            self.model = AutoencoderModel(AutoencoderConfig(**c.autoencoder), c.kl_weight)
            self.latent_shape = None
        elif c.lora_rank:
            if resume and c.init and init is not None and str(Path(init).resolve()) != c.init:  # adapters fit only the model they were trained on
                raise UnfogError(f"this run trains adapters for {c.init}; --init cannot change when resuming (leave it out to use that model)")
            self._init_lora(c.init if resume and c.init else init)
        elif init is not None and ckpt is None:
            self._init_from_model(init)
        else:
            self._build_diffusion(vae, resume)
        if callable(self.data):
            self.data = self.data(c.resolution, self.vae.config.downsample_factor * self.model.unet.config.downsample_factor)
        self.model.to(self.device)
        # A LoRA run keeps no EMA (and no copy of the frozen model): samples and export use the adapters as trained.
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval() if self.lora is None else None
        if c.fsdp:  # model, EMA and (through the sharded parameters) gradients and optimizer state: 1/N per process
            fsdp.shard(self.model)
            fsdp.shard(self.ema)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=c.lr, betas=c.betas, weight_decay=c.weight_decay)
        self.train_model = self.model
        if self.world > 1 and not c.fsdp:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.step, self.nonfinite, self.latent_cache = 0, 0, {}
        if resume and ckpt is not None:
            if fsdp.is_sharded(ckpt) != c.fsdp:
                raise UnfogError(f"{ckpt} was written {'with' if fsdp.is_sharded(ckpt) else 'without'} --fsdp; resume it the same way")
            load = fsdp.load_sharded if c.fsdp else load_checkpoint
            state = load(ckpt, self.lora or self.model, self.ema, self.optimizer)
            self.step, self.nonfinite = state["step"], state["nonfinite"]
            self._say(f"resumed from {ckpt} at step {self.step}")
        if self.rank == 0:  # once the run is set up (and a resumed one loaded): a failed resume leaves the run's config as it was
            (self.out / "config.json").write_text(json.dumps(asdict(c), indent=2) + "\n")
        self.stop_signal = None

    # ---- setup --------------------------------------------------------------------------

    def _build_diffusion(self, vae_source, resume: bool) -> None:
        c = self.config
        tok_dir, vae_dir = self.out / "tokenizer", self.out / "vae"
        if resume and tok_dir.is_dir():
            self.tokenizer = Tokenizer.load(tok_dir)
        else:
            texts = self.data.vocabulary_captions() if hasattr(self.data, "vocabulary_captions") else self.data.texts
            tcfg = TokenizerConfig(context_length=c.tokenizer_context_length, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
            self.tokenizer = Tokenizer.train_word_level(texts, tcfg)
            if self.rank == 0:
                self.tokenizer.save(tok_dir)
        if resume and (vae_dir / "config.json").is_file():
            self.vae, from_run = load_autoencoder(vae_dir)
        elif vae_source is not None:
            self.vae, from_run = load_autoencoder(vae_source)
        else:
            raise UnfogError("the diffusion stage needs an autoencoder: pass --vae with an autoencoder run or a model folder")
        self.vae.to(self.device).requires_grad_(False)
        if from_run or not (vae_dir / "config.json").is_file():
            if from_run:
                self.vae.config.scaling_factor = self._measure_scaling_factor()
            if self.rank == 0:
                write_vae(self.vae, vae_dir)
        f = self.vae.config.downsample_factor
        if c.resolution % f:
            raise UnfogError(f"resolution {c.resolution} is not a multiple of the autoencoder's factor {f}")
        self.latent_shape = (self.vae.config.latent_channels, c.resolution // f, c.resolution // f)
        self.scheduler = SchedulerConfig(**c.scheduler)
        te_cfg = text_encoder_config(c, self.tokenizer)
        unet_cfg = UNetConfig(**c.unet)
        if unet_cfg.in_channels != self.vae.config.latent_channels:
            raise UnfogError(f"the U-Net preset takes {unet_cfg.in_channels} channels but the autoencoder makes {self.vae.config.latent_channels}")
        if unet_cfg.context_dim != te_cfg.width:
            raise UnfogError(f"the U-Net's context_dim {unet_cfg.context_dim} must equal the text encoder width {te_cfg.width}")
        self.model = DiffusionModel(UNet(unet_cfg), TextEncoder(te_cfg), self.scheduler, c.loss_weighting, c.snr_gamma)

    def _init_lora(self, init) -> None:
        """LoRA: the frozen model `init` (any model unfog loads, reloaded from there on resume)
        with trainable adapters beside its layers; only the adapters are checkpointed."""
        from ..formats import load_any
        from .lora import attach_trainable

        c = self.config
        if init is None:
            raise UnfogError("--lora-rank trains adapters for an existing model: pass --init MODEL (a folder or single file unfog loads)")
        parts = load_any(init)
        if parts.vae is None:
            raise UnfogError(f"{init} is a pixel-space model; the trainer's diffusion stage trains latent models")
        if parts.unet.config.addition_time_embed_dim is not None and parts.text_encoder_2 is None:
            raise UnfogError(f"{init} is an SDXL refiner; LoRA training covers SD 1.x/2.x, SDXL base and unfog's models")
        c.init = str(Path(init).resolve())
        c.resolution = c.resolution or parts.defaults.height
        self.tokenizer, self.vae, self.scheduler = parts.tokenizer, parts.vae.to(self.device).requires_grad_(False), parts.scheduler
        c.text_encoder, c.unet, c.scheduler = asdict(parts.text_encoder.config), asdict(parts.unet.config), asdict(parts.scheduler)
        c.defaults = {**asdict(parts.defaults), **c.defaults}
        f = self.vae.config.downsample_factor
        if c.resolution % (f * parts.unet.config.downsample_factor):
            raise UnfogError(f"resolution {c.resolution} is not a multiple of the model's factor {f * parts.unet.config.downsample_factor}")
        self.latent_shape = (self.vae.config.latent_channels, c.resolution // f, c.resolution // f)
        self.tokenizer_2, self.text_encoder_2 = parts.tokenizer_2, parts.text_encoder_2
        self.force_zeros = parts.force_zeros_for_empty_prompt
        self.model = DiffusionModel(parts.unet, parts.text_encoder, self.scheduler, c.loss_weighting, c.snr_gamma, parts.text_encoder_2)
        components = {"unet": parts.unet}
        if c.lora_text_encoder:
            components["text_encoder"] = parts.text_encoder
            if parts.text_encoder_2 is not None:
                components["text_encoder_2"] = parts.text_encoder_2
        for encoder in (parts.text_encoder, parts.text_encoder_2):
            if encoder is not None:
                encoder.requires_grad_(False)
        self.lora = attach_trainable(components, c.lora_rank, c.lora_alpha, c.seed)
        parts.unet.gradient_checkpointing = c.gradient_checkpointing
        self.model.train()

    def _init_from_model(self, init) -> None:
        """Fine-tune: start from a model folder's tokenizer, text encoder, U-Net and
        autoencoder; the run's config takes the folder's architecture and noise process."""
        from ..formats import load_model

        c = self.config
        parts = load_model(init)
        if parts.vae is None:
            raise UnfogError(f"{init} is a pixel-space model; the trainer's diffusion stage trains latent models")
        self.tokenizer, self.vae, self.scheduler = parts.tokenizer, parts.vae.to(self.device).requires_grad_(False), parts.scheduler
        te = asdict(parts.text_encoder.config)
        c.tokenizer_context_length = te.pop("context_length")
        for key in ("vocab_size", "eos_token_id"):
            te.pop(key)
        c.text_encoder, c.unet, c.scheduler = te, asdict(parts.unet.config), asdict(parts.scheduler)
        c.defaults = {**c.defaults, **asdict(parts.defaults)}
        f = self.vae.config.downsample_factor
        self.latent_shape = (self.vae.config.latent_channels, c.resolution // f, c.resolution // f)
        self.model = DiffusionModel(parts.unet.train(), parts.text_encoder.train(), self.scheduler, c.loss_weighting, c.snr_gamma)
        if self.rank == 0:
            self.tokenizer.save(self.out / "tokenizer")
            write_vae(self.vae, self.out / "vae")

    @torch.no_grad()
    def _measure_scaling_factor(self, n: int = 512) -> float:
        """1 / std of the latents, so the diffusion model sees roughly unit variance (Rombach
        et al. 2022, App. D.1)."""
        mean, _ = self.vae.encode(self._to_pixels(self.data.images(list(range(n)))))
        return 1.0 / mean.float().std().item()

    def _to_pixels(self, images: torch.Tensor) -> torch.Tensor:
        return images.to(self.device, non_blocking=True).float() / 127.5 - 1

    def _say(self, message: str) -> None:
        if self.rank == 0:
            tqdm.write(message)

    # ---- one step -----------------------------------------------------------------------

    def _indices(self, step: int) -> list[int]:
        B = self.config.batch_size
        if getattr(self.data, "endless", False):  # every sample is new
            return list(range(step * B, (step + 1) * B))
        g = _step_generator(self.config.seed, step, 1)
        groups = list(getattr(self.data, "by_size", {}).values())
        if len(groups) > 1:  # aspect-ratio buckets: one bucket per step, chosen in proportion to its size
            group = groups[torch.multinomial(torch.tensor([len(x) for x in groups], dtype=torch.float), 1, generator=g).item()]
            return [group[k] for k in torch.randint(len(group), (B,), generator=g).tolist()]
        return torch.randint(len(self.data), (B,), generator=g).tolist()

    @torch.no_grad()
    def _latents(self, indices: list[int]) -> torch.Tensor:
        """Scaled latents of these samples; finite datasets cache them, so each image is
        rendered or decoded and encoded once."""
        cacheable = not getattr(self.data, "endless", False)
        missing = [k for k, i in enumerate(indices) if not (cacheable and i % len(self.data) in self.latent_cache)]
        if missing:
            images = self.data.images([indices[k] for k in missing])
            with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
                mean, _ = self.vae.encode(self._to_pixels(images))
            z = mean.float() * self.vae.config.scaling_factor
            if not cacheable:
                return z
            for k, zk in zip(missing, z):
                self.latent_cache[indices[k] % len(self.data)] = zk
        return torch.stack([self.latent_cache[i % len(self.data)] for i in indices])

    def _lr(self, step: int) -> float:
        c = self.config
        if step < c.warmup_steps:
            return c.lr * (step + 1) / c.warmup_steps
        if c.lr_schedule == "constant":
            return c.lr
        progress = (step - c.warmup_steps) / max(1, c.max_steps - c.warmup_steps)
        return c.lr * (c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))

    def _batch(self, step: int):
        """This process's share of the step's global batch, as model inputs."""
        c = self.config
        B = c.batch_size
        indices = self._indices(step)
        lo, hi = self.rank * B // self.world, (self.rank + 1) * B // self.world
        g = _step_generator(c.seed, step, 2)
        if c.stage == "autoencoder":
            images = self.data.images(indices[lo:hi])
            ae = self.model.autoencoder.config
            lat = c.resolution // ae.downsample_factor
            noise = torch.randn(B, ae.latent_channels, lat, lat, generator=g)[lo:hi]
            return (self._to_pixels(images), noise.to(self.device))
        t = torch.randint(0, self.scheduler.num_train_timesteps, (B,), generator=g)[lo:hi]
        shape = self.latent_shape
        if hasattr(self.data, "images_list"):  # the latents of this step's bucket
            f = self.vae.config.downsample_factor
            h, w = self.data.images_list[indices[0] % len(self.data)].shape[1:]
            shape = (shape[0], h // f, w // f)
        noise = torch.randn(B, *shape, generator=g)[lo:hi]
        drop = (torch.rand(B, generator=g) < c.caption_dropout)[lo:hi]
        texts = ["" if d else s for d, s in zip(drop.tolist(), self.data.captions(indices[lo:hi], epoch_seed=step))]
        x0 = self._latents(indices[lo:hi])
        batch = (x0, self.tokenizer(texts).to(self.device), t.to(self.device), noise.to(self.device))
        if self.tokenizer_2 is not None:  # SDXL base: the second encoder's ids and the micro-conditioning
            f = self.vae.config.downsample_factor
            h, w = x0.shape[-2] * f, x0.shape[-1] * f  # the image as trained: its (bucket) size, uncropped
            time_ids = torch.tensor([[h, w, 0.0, 0.0, h, w]] * len(texts), device=self.device)
            batch += (self.tokenizer_2(texts).to(self.device), time_ids)
        return batch

    def _train_step(self, step: int) -> float:
        c = self.config
        batch = self._batch(step)
        n = batch[0].shape[0]
        micro = n // c.grad_accum
        total = torch.zeros((), device=self.device)
        for k in range(c.grad_accum):
            part = [b[k * micro : (k + 1) * micro] for b in batch]
            sync = k == c.grad_accum - 1 or self.world == 1
            if c.fsdp:
                self.model.set_requires_gradient_sync(sync)
                ctx = contextlib.nullcontext()
            else:
                ctx = self.train_model.no_sync() if not sync else contextlib.nullcontext()
            with ctx, torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
                loss = self.train_model(*part) / c.grad_accum
            loss.backward()
            total += loss.detach().float()
        flags = torch.stack([total, torch.tensor(float(self.stop_signal is not None), device=self.device)])
        if self.world > 1:
            dist.all_reduce(flags)
            flags[0] /= self.world
        if flags[1] > 0 and self.stop_signal is None:
            self.stop_signal = "peer"
        loss_value = flags[0].item()
        if not math.isfinite(loss_value):
            self.optimizer.zero_grad(set_to_none=True)
            return loss_value
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr(step)
        # A finite loss can still have overflowed gradients (bf16); stepping would poison the weights.
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip if c.grad_clip > 0 else float("inf"))
        if hasattr(norm, "full_tensor"):  # FSDP: the norm over every process's shards
            norm = norm.full_tensor()
        if not torch.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            return float("nan")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            decay = min(c.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():  # one fused update per dtype, not a kernel per tensor
                torch._foreach_lerp_(list(self.ema.parameters()), [p.detach() for p in self.model.parameters()], 1 - decay)
        return loss_value

    # ---- the loop -----------------------------------------------------------------------

    def checkpoint(self) -> None:
        if self.config.fsdp:  # every process writes its shards
            fsdp.save_sharded(self.out, self.step, self.model, self.ema, self.optimizer, {"nonfinite": self.nonfinite},
                              keep=self.config.keep_checkpoints)
        elif self.rank == 0:
            model = self.lora if self.lora is not None else self.model
            save_checkpoint(self.out, self.step, model, self.ema if self.ema is not None else model, self.optimizer, {"nonfinite": self.nonfinite},
                            keep=self.config.keep_checkpoints)

    def _log(self, row: dict) -> None:
        if self.rank == 0:
            with (self.out / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")

    def run(self, until: int | None = None) -> dict:
        """Train to max_steps (or `until`); checkpoint every K steps, at the end, and on
        SIGINT/SIGTERM. Returns a summary."""
        c = self.config
        end = min(c.max_steps, until) if until is not None else c.max_steps
        handlers = {}

        def on_signal(signum, frame):
            self.stop_signal = signal.Signals(signum).name

        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                handlers[s] = signal.signal(s, on_signal)
            except ValueError:  # not the main thread
                pass
        bar = tqdm(total=end, initial=self.step, desc=f"train {c.stage}", disable=not self.progress, dynamic_ncols=True)
        start, start_step, last_loss = time.perf_counter(), self.step, float("nan")
        window = []
        try:
            while self.step < end:
                loss = self._train_step(self.step)
                self.step += 1
                bar.update(1)
                if not math.isfinite(loss):
                    self.nonfinite += 1
                    self._log({"step": self.step, "nonfinite": True, "loss": None})
                    self._say(f"step {self.step}: non-finite loss ({loss}); step skipped ({self.nonfinite} in a row)")
                    if self.nonfinite >= c.max_nonfinite:
                        raise TrainingStopped(
                            f"{self.nonfinite} non-finite losses in a row at step {self.step}; stopped. The last good checkpoint in "
                            f"{self.out / 'checkpoints'} is kept: lower --lr, check the data, or resume with --resume"
                        )
                    continue
                self.nonfinite, last_loss = 0, loss
                window.append(loss)
                elapsed = time.perf_counter() - start
                ips = (self.step - start_step) * c.batch_size / max(elapsed, 1e-9)
                if self.step % c.log_every == 0 or self.step == end:
                    self._log({"step": self.step, "loss": sum(window) / len(window), "lr": self._lr(self.step - 1), "images_per_s": ips, "elapsed_s": elapsed})
                    bar.set_postfix(loss=f"{sum(window) / len(window):.4f}", img_s=f"{ips:.0f}")
                    window = []
                if self.step % c.checkpoint_every == 0:
                    self.checkpoint()
                if self.step % c.sample_every == 0 or self.step == c.max_steps:
                    self.save_samples()
                if self.stop_signal is not None:
                    self._say(f"stopping on {self.stop_signal} at step {self.step}")
                    break
            if self.step % c.checkpoint_every != 0 or self.stop_signal is not None:
                self.checkpoint()
        finally:
            bar.close()
            for s, h in handlers.items():
                signal.signal(s, h)
        if self.rank == 0 and (self.out / "metrics.jsonl").is_file():
            plots.loss_curve(self.out / "metrics.jsonl", self.out / "loss.png")
        elapsed = time.perf_counter() - start
        return {"step": self.step, "loss": last_loss, "seconds": elapsed, "images_per_s": (self.step - start_step) * c.batch_size / max(elapsed, 1e-9), "stopped": self.stop_signal}

    @torch.no_grad()
    def save_samples(self) -> Path | None:
        """A PNG grid: generated images for the fixed prompts (diffusion) or originals above
        reconstructions (autoencoder), from the EMA weights."""
        if self.rank != 0 or self.config.fsdp:  # a sharded EMA cannot run on one process: export the run to see samples
            return None
        out = self.out / "samples" / f"step-{self.step:07d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        if self.config.stage == "autoencoder":
            images = self.data.images(list(range(8)))
            rec = self.ema.autoencoder.decode(self.ema.autoencoder.encode(self._to_pixels(images))[0])
            grid(to_pil(self._to_pixels(images)) + to_pil(rec), 8).save(out)
            return out
        prompts = self.config.sample_prompts
        if not prompts:
            return None
        pipe = self.pipeline()
        images = pipe(prompts, seed=0).images
        if self.lora is not None:
            self.model.train()  # the pipeline put the (shared) networks in eval mode
        grid(images, math.ceil(math.sqrt(len(images)))).save(out)
        return out

    def pipeline(self):
        """A Pipeline over the EMA weights (diffusion runs)."""
        from ..pipeline import Pipeline

        source = self.ema if self.ema is not None else self.model
        return Pipeline(self.tokenizer, source.text_encoder, source.unet, self.vae, self.scheduler, SamplingDefaults.from_dict(self.config.defaults),
                        tokenizer_2=self.tokenizer_2, text_encoder_2=source.text_encoder_2,
                        force_zeros_for_empty_prompt=self.force_zeros)


def export(run_dir: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write a diffusion run's newest EMA weights as a model folder for Pipeline.from_pretrained."""
    from ..pipeline import Pipeline

    run = Path(run_dir)
    c, ckpt = read_run(run, "diffusion", "an autoencoder run goes to the diffusion stage with --vae instead of being exported")
    if c.lora_rank:
        raise UnfogError(f"{run} trained LoRA adapters, not a model: export them with unfog export --lora {run} FILE.safetensors")
    check_save_target(out_dir)  # before anything is read
    tokenizer = Tokenizer.load(run / "tokenizer")
    vae, _ = load_autoencoder(run / "vae")
    te_cfg = text_encoder_config(c, tokenizer)
    scheduler = SchedulerConfig(**c.scheduler)
    with torch.device("meta"):
        model = DiffusionModel(UNet(UNetConfig(**c.unet)), TextEncoder(te_cfg), SchedulerConfig(), c.loss_weighting, c.snr_gamma)
    load_checked(model, read_tensors(ckpt / "ema.safetensors"), f"checkpoint {ckpt / 'ema.safetensors'}")
    pipe = Pipeline(tokenizer, model.text_encoder, model.unet, vae, scheduler, SamplingDefaults.from_dict(c.defaults, f"{run / 'config.json'} defaults"))
    pipe.save_pretrained(out_dir, dtype)
    return Path(out_dir)
