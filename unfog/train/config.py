"""Training settings and the named presets `unfog train --preset NAME` starts from."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from ..errors import UnfogError
from ..nn.checks import check_ints, check_number

SHAPES_PROMPTS = [
    "a red circle", "a big blue square on the left", "a small green triangle at the top", "a yellow circle in the center",
    "a purple square on the right on a black background", "a orange triangle at the bottom", "a big red square on a gray background",
    "a small blue circle on a white background", "a red circle left of a blue square", "a green triangle above a yellow circle",
    "a big purple circle right of a small orange square", "a blue triangle below a red square", "a yellow square left of a purple triangle on a black background",
    "a small green circle above a big orange triangle", "a orange circle below a blue circle on a gray background", "a red triangle right of a green square",
]

EMOJI_PROMPTS = [
    "a fox", "a big red apple at the top", "a fox left of a red apple on a light blue background", "a small cat in the center",
    "a big sunflower on the left on a pink background", "a rocket above a hamburger", "a big owl at the bottom in grayscale",
    "a guitar right of a small elephant on a light yellow background", "a pizza below a butterfly", "a big bicycle on a light green background",
    "a small octopus on the right", "a teddy bear left of a cactus on a white background", "a big crown in sepia",
    "a watermelon above a small tiger", "a helicopter at the top on a light blue background", "a big strawberry right of a turtle",
]


@dataclass
class TrainConfig:
    stage: str = "diffusion"  # "autoencoder" or "diffusion"
    resolution: int = 64
    batch_size: int = 64  # global, across processes and accumulation steps
    grad_accum: int = 1
    max_steps: int = 10_000
    lr: float = 3e-4
    warmup_steps: int = 200
    lr_schedule: str = "cosine"  # or "constant"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA), "bf16", "fp32"
    # diffusion stage
    caption_dropout: float = 0.1
    loss_weighting: str = "min_snr"
    snr_gamma: float = 5.0
    data_pool: int | None = None  # shapes: wrap the stream to this many images and cache their latents
    unet: dict[str, Any] = field(default_factory=dict)
    text_encoder: dict[str, Any] = field(default_factory=dict)
    scheduler: dict[str, Any] = field(default_factory=dict)
    tokenizer_context_length: int = 24
    defaults: dict[str, Any] = field(default_factory=dict)
    sample_prompts: list[str] = field(default_factory=lambda: list(SHAPES_PROMPTS))
    # LoRA: train rank-`lora_rank` adapters beside the frozen model `init` (any model unfog
    # loads); resolution 0 = the model's native size. No EMA (as LoRA trainers do).
    lora_rank: int = 0
    lora_alpha: float | None = None  # default: the rank (scale 1)
    lora_text_encoder: bool = False
    init: str | None = None
    gradient_checkpointing: bool = False
    fsdp: bool = False  # shard model, gradients, optimizer state and EMA across torchrun processes (FSDP2)
    buckets: bool = False  # image folders: group images into aspect-ratio buckets instead of centre-cropping
    # autoencoder stage
    autoencoder: dict[str, Any] = field(default_factory=dict)
    kl_weight: float = 1e-6
    # bookkeeping
    log_every: int = 25
    checkpoint_every: int = 500
    sample_every: int = 500
    keep_checkpoints: int = 2
    max_nonfinite: int = 5

    def __post_init__(self):
        if self.stage not in ("autoencoder", "diffusion"):
            raise UnfogError(f"stage must be 'autoencoder' or 'diffusion', got {self.stage!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise UnfogError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise UnfogError(f"lr_schedule must be cosine or constant, got {self.lr_schedule!r}")
        self.betas = tuple(self.betas)
        if not isinstance(self.lora_rank, int) or isinstance(self.lora_rank, bool) or not 0 <= self.lora_rank <= 1024:
            raise UnfogError(f"lora_rank must be an integer from 0 (no LoRA) to 1024, got {self.lora_rank!r}")
        if not isinstance(self.resolution, int) or isinstance(self.resolution, bool) or not (self.resolution == 0 or 8 <= self.resolution <= 4096):
            raise UnfogError(f"resolution must be an integer from 8 to 4096 (0: the model's own, with --init), got {self.resolution!r}")
        # The recipe's numbers: a zero batch or interval had been a ZeroDivisionError or IndexError
        # mid-run, and a negative or infinite learning rate a silent no-op or a NaN model.
        many = 10**9
        check_ints(self, {"batch_size": (1, 1 << 20), "grad_accum": (1, 1 << 16), "max_steps": (1, many), "warmup_steps": (0, many),
                          "seed": (0, 2**63 - 1), "tokenizer_context_length": (1, 4096), "log_every": (1, many), "checkpoint_every": (1, many),
                          "sample_every": (1, many), "keep_checkpoints": (1, 10**6), "max_nonfinite": (1, many)})
        if self.data_pool is not None:
            check_ints(self, {"data_pool": (1, many)})
        for name, lo, hi in (("lr", 1e-12, 1e3), ("min_lr_ratio", 0, 1), ("weight_decay", 0, 1e3), ("grad_clip", 0, 1e9), ("ema_decay", 0, 1),
                             ("caption_dropout", 0, 1), ("snr_gamma", 1e-6, 1e6), ("kl_weight", 0, 1e6)):
            check_number(self, name, lo, hi)
        if self.lora_alpha is not None:
            check_number(self, "lora_alpha", 1e-6, 1e6)
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in self.betas):
            raise UnfogError(f"TrainConfig.betas must be two numbers from 0 to below 1, got {self.betas!r}")


SHAPES_AE = dict(block_channels=[32, 64, 128], layers_per_block=1, latent_channels=4, norm_groups=16, mid_attention=False)
PRESETS: dict[str, dict[str, Any]] = {
    # The bundled default model: a 64×64 image is a 16×16×4 latent.
    "shapes-ae": dict(stage="autoencoder", autoencoder=SHAPES_AE, batch_size=64, max_steps=4000, lr=4e-4, ema_decay=0.999),
    "shapes": dict(
        # v-prediction on a zero-terminal-SNR schedule, so the first step from pure noise is
        # trained (Lin et al. 2023); uniform weighting because min-SNR gives that step weight 0.
        stage="diffusion", batch_size=256, max_steps=30_000, lr=4e-4, warmup_steps=500, ema_decay=0.9995, data_pool=300_000,
        loss_weighting="uniform",
        unet=dict(in_channels=4, out_channels=4, block_channels=[64, 128, 160], layers_per_block=1, attention_levels=[True, True, True],
                  num_heads=[2, 4, 5], context_dim=128, norm_groups=16, transformer_depth=1),
        text_encoder=dict(width=128, layers=4, heads=4, mlp_width=512, activation="gelu"),
        scheduler=dict(beta_schedule="scaled_linear", prediction_type="v_prediction", zero_terminal_snr=True, sigma_schedule="trailing"),
        defaults=dict(sampler="dpmpp_2m_sde", num_inference_steps=30, guidance_scale=4.0, height=64, width=64),
    ),
    # The bundled emoji-scenes model (docs/specs/emoji-scenes.md): shapes' recipe, a wider
    # autoencoder for the sprites' detail, a 32-token context for the longer names.
    "emoji-ae": dict(stage="autoencoder", autoencoder=dict(SHAPES_AE, block_channels=[64, 128, 128]), batch_size=64, max_steps=4000, lr=4e-4,
                     ema_decay=0.999),
    "emoji": dict(
        stage="diffusion", batch_size=256, max_steps=30_000, lr=4e-4, warmup_steps=500, ema_decay=0.9995, data_pool=300_000,
        loss_weighting="uniform", tokenizer_context_length=32,
        unet=dict(in_channels=4, out_channels=4, block_channels=[64, 128, 160], layers_per_block=1, attention_levels=[True, True, True],
                  num_heads=[2, 4, 5], context_dim=128, norm_groups=16, transformer_depth=1),
        text_encoder=dict(width=128, layers=4, heads=4, mlp_width=512, activation="gelu"),
        scheduler=dict(beta_schedule="scaled_linear", prediction_type="v_prediction", zero_terminal_snr=True, sigma_schedule="trailing"),
        defaults=dict(sampler="dpmpp_2m_sde", num_inference_steps=30, guidance_scale=4.0, height=64, width=64),
        sample_prompts=EMOJI_PROMPTS,
    ),
    # LoRA on any model (--init): the model's own size, a constant learning rate, min-SNR weighting.
    "lora": dict(stage="diffusion", resolution=0, lora_rank=8, batch_size=4, max_steps=1000, lr=1e-4, warmup_steps=0, lr_schedule="constant",
                 caption_dropout=0.0, loss_weighting="min_snr", checkpoint_every=100, sample_every=250, log_every=10, sample_prompts=[]),
    # Small enough for tests and a CPU smoke run.
    "tiny-ae": dict(stage="autoencoder", resolution=32, autoencoder=dict(block_channels=[16, 32], layers_per_block=1, latent_channels=4, norm_groups=8, mid_attention=False),
                    batch_size=8, max_steps=20, lr=1e-3, warmup_steps=2, log_every=5, checkpoint_every=10, sample_every=10),
    "tiny": dict(
        stage="diffusion", resolution=32, batch_size=8, max_steps=20, lr=1e-3, warmup_steps=2, log_every=5, checkpoint_every=10, sample_every=10,
        unet=dict(in_channels=4, out_channels=4, block_channels=[32, 64], layers_per_block=1, attention_levels=[False, True], num_heads=2, context_dim=32, norm_groups=8),
        text_encoder=dict(width=32, layers=2, heads=2, mlp_width=64, activation="gelu"),
        tokenizer_context_length=24, sample_prompts=SHAPES_PROMPTS[:4],
        defaults=dict(num_inference_steps=4, guidance_scale=3.0, height=32, width=32),
    ),
}


def preset(name: str, **overrides) -> TrainConfig:
    """A preset's TrainConfig with keyword overrides."""
    if name not in PRESETS:
        raise UnfogError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    values = copy.deepcopy(PRESETS[name]) | {k: v for k, v in overrides.items() if v is not None}
    return TrainConfig(**values)
