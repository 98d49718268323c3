"""Key maps and config translations from the diffusers / transformers layout to unfog's.

Each `map_*_key(key)` turns one foreign weight name into unfog's (or None to drop it); each
`*_config_from_*` turns a foreign config dict into unfog's dataclass, refusing features that
unfog's networks do not implement instead of loading them wrongly.
"""

from __future__ import annotations

from ..diffusion.config import SamplingDefaults, SchedulerConfig
from ..errors import UnfogError
from ..nn import AutoencoderConfig, TextEncoderConfig, UNetConfig

_COMMON_RENAMES = [
    (".downsamplers.0.", ".resample."),
    (".upsamplers.0.", ".resample."),
    (".to_out.0.", ".to_out."),
    (".ff.net.0.proj.", ".ff.proj."),
    (".ff.net.2.", ".ff.out."),
]


def map_unet_key(key: str) -> str:
    """diffusers UNet2DConditionModel → unfog UNet."""
    if key.startswith("conv_norm_out."):
        return "norm_out." + key[len("conv_norm_out."):]
    for a, b in _COMMON_RENAMES:
        key = key.replace(a, b)
    return key


def map_vae_key(key: str) -> str:
    """diffusers AutoencoderKL → unfog Autoencoder (old attention names included)."""
    for a, b in _COMMON_RENAMES + [(".conv_norm_out.", ".norm_out."), (".mid_block.attentions.0.", ".mid_block.attention."),
                                   (".query.", ".to_q."), (".key.", ".to_k."), (".value.", ".to_v."), (".proj_attn.", ".to_out.")]:
        key = key.replace(a, b)
    return key


def map_text_encoder_key(key: str) -> str | None:
    """transformers CLIPTextModel(WithProjection) → unfog TextEncoder, with or without the
    `text_model.` prefix (transformers 5 saves without it); position_ids are dropped."""
    key = key.removeprefix("text_model.")
    if key == "text_projection.weight":
        return key
    if key.endswith("position_ids") or not key.startswith(("embeddings.", "encoder.", "final_layer_norm.")):
        return None
    key = key.replace("embeddings.", "").replace("encoder.layers.", "layers.").replace("self_attn.", "").replace("mlp.", "")
    return key


def _require_defaults(cfg: dict, defaults: dict, what: str) -> None:
    for name, expected in defaults.items():
        value = cfg.get(name, expected)
        if value != expected and not (isinstance(expected, (list, tuple)) and value in expected):
            raise UnfogError(f"{what}: unsupported setting {name}={value!r} (unfog implements {expected!r})")


def unet_config_from_diffusers(cfg: dict) -> UNetConfig:
    """A diffusers UNet2DConditionModel config (SD 1.x / 2.x / XL family) as a UNetConfig."""
    what = "U-Net config"
    _require_defaults(cfg, {
        "center_input_sample": False, "only_cross_attention": False, "dual_cross_attention": False, "class_embed_type": None,
        "addition_embed_type": (None, "text_time"), "encoder_hid_dim": None, "reverse_transformer_layers_per_block": None,
        "upcast_attention": (None, False), "num_class_embeds": None, "time_embedding_type": "positional", "time_cond_proj_dim": None,
        "resnet_time_scale_shift": "default", "conv_in_kernel": 3, "conv_out_kernel": 3, "act_fn": "silu", "downsample_padding": 1,
        "mid_block_scale_factor": 1, "resnet_out_scale_factor": 1.0, "timestep_post_act": None, "time_embedding_dim": None,
        "attention_type": "default", "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-5,
    }, what)
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    attention = []
    for d in down:
        if d not in ("CrossAttnDownBlock2D", "DownBlock2D"):
            raise UnfogError(f"{what}: unsupported down block {d!r}")
        attention.append(d == "CrossAttnDownBlock2D")
    expected_up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)]
    if up != expected_up:
        raise UnfogError(f"{what}: up blocks {up} do not mirror the down blocks {down}")
    depth = cfg.get("transformer_layers_per_block", 1)
    if isinstance(depth, (list, tuple)):
        if any(isinstance(d, (list, tuple)) for d in depth):
            raise UnfogError(f"{what}: per-block transformer depths {depth} are not supported (one depth per level is)")
        depth = list(depth) if len(set(depth)) > 1 else depth[0]
    lpb = cfg.get("layers_per_block", 2)
    if isinstance(lpb, (list, tuple)):
        raise UnfogError(f"{what}: per-level layers_per_block {lpb} is not supported")
    # diffusers stores the head *count* of SD 1.x/2.x models under attention_head_dim.
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
    context = cfg.get("cross_attention_dim", 1280)
    if isinstance(context, (list, tuple)):
        raise UnfogError(f"{what}: per-level cross_attention_dim is not supported")
    return UNetConfig(
        in_channels=cfg.get("in_channels", 4), out_channels=cfg.get("out_channels", 4), block_channels=list(cfg["block_out_channels"]),
        layers_per_block=lpb, attention_levels=attention, num_heads=list(heads) if isinstance(heads, (list, tuple)) else heads,
        transformer_depth=depth, context_dim=context, linear_projection=bool(cfg.get("use_linear_projection", False)),
        norm_groups=cfg.get("norm_num_groups", 32), flip_sin_to_cos=cfg.get("flip_sin_to_cos", True), freq_shift=float(cfg.get("freq_shift", 0)),
        **_added_conditioning(cfg, what),
    )


def _added_conditioning(cfg: dict, what: str) -> dict:
    if cfg.get("addition_embed_type") != "text_time":
        return {}
    names = ("addition_time_embed_dim", "projection_class_embeddings_input_dim")
    if any(cfg.get(n) is None for n in names):
        raise UnfogError(f"{what}: addition_embed_type 'text_time' needs {' and '.join(names)}")
    return {n: cfg[n] for n in names}


def unet_config_to_diffusers(c: UNetConfig) -> dict:
    """The diffusers UNet2DConditionModel config of an unfog UNetConfig (the inverse of
    `unet_config_from_diffusers`); with `map_unet_key` it moves unfog weights into diffusers."""
    if not c.mid_attention:
        raise UnfogError("diffusers' SD U-Net always has mid-block attention; this config has none")
    levels = len(c.block_channels)
    return dict(
        in_channels=c.in_channels, out_channels=c.out_channels, block_out_channels=tuple(c.block_channels), layers_per_block=c.layers_per_block,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in c.attention_levels),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(c.attention_levels)),
        attention_head_dim=tuple(c.heads_at(level)[0] for level in range(levels)), cross_attention_dim=c.context_dim,
        use_linear_projection=c.linear_projection, norm_num_groups=c.norm_groups,
        transformer_layers_per_block=[c.depth_at(level) for level in range(levels)], flip_sin_to_cos=c.flip_sin_to_cos, freq_shift=c.freq_shift,
        **({} if c.addition_time_embed_dim is None else dict(addition_embed_type="text_time", addition_time_embed_dim=c.addition_time_embed_dim,
                                                            projection_class_embeddings_input_dim=c.projection_class_embeddings_input_dim)),
    )


def vae_config_from_diffusers(cfg: dict) -> AutoencoderConfig:
    what = "autoencoder config"
    _require_defaults(cfg, {"act_fn": "silu", "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True, "force_upcast": (True, False)}, what)
    for t in cfg.get("down_block_types", []):
        if t != "DownEncoderBlock2D":
            raise UnfogError(f"{what}: unsupported block {t!r}")
    return AutoencoderConfig(
        in_channels=cfg.get("in_channels", 3), out_channels=cfg.get("out_channels", 3), latent_channels=cfg.get("latent_channels", 4),
        block_channels=list(cfg["block_out_channels"]), layers_per_block=cfg.get("layers_per_block", 2), norm_groups=cfg.get("norm_num_groups", 32),
        scaling_factor=float(cfg.get("scaling_factor", 0.18215)), shift_factor=float(cfg.get("shift_factor") or 0.0),
    )


def text_encoder_config_from_transformers(cfg: dict, skip_last_layers: int = 0, *, sdxl: bool = False, projection: bool = False) -> TextEncoderConfig:
    """A transformers CLIPTextConfig as a TextEncoderConfig. transformers pools at the highest
    token id when eos_token_id is the legacy 2, else at the first eos token. `sdxl`: the
    encoder as SDXL pipelines read it, the penultimate layer's raw states (plus `skip_last_layers`
    more); `projection`: the weights hold a CLIPTextModelWithProjection's text_projection."""
    act = cfg.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise UnfogError(f"text encoder config: unsupported activation {act!r}")
    eos = cfg.get("eos_token_id", 2)
    return TextEncoderConfig(
        vocab_size=cfg["vocab_size"], context_length=cfg.get("max_position_embeddings", 77), width=cfg["hidden_size"],
        layers=cfg["num_hidden_layers"], heads=cfg["num_attention_heads"], mlp_width=cfg["intermediate_size"], activation=act,
        layer_norm_eps=cfg.get("layer_norm_eps", 1e-5), eos_token_id=None if eos == 2 else eos,
        skip_last_layers=skip_last_layers + (1 if sdxl else 0), states_layer_norm=not sdxl,
        projection_dim=cfg.get("projection_dim", 512) if projection else None,
    )


BETA_SCHEDULE_NAMES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}


def scheduler_config_from_diffusers(cfg: dict) -> tuple[SchedulerConfig, dict]:
    """A diffusers scheduler_config.json as (SchedulerConfig, sampler hints)."""
    beta = cfg.get("beta_schedule", "linear")
    if beta not in BETA_SCHEDULE_NAMES:
        raise UnfogError(f"scheduler config: unsupported beta_schedule {beta!r}; unfog has {', '.join(BETA_SCHEDULE_NAMES)}")
    if cfg.get("trained_betas"):
        raise UnfogError("scheduler config: explicit trained_betas are not supported")
    spacing = cfg.get("timestep_spacing", "leading")
    karras = bool(cfg.get("use_karras_sigmas", False))
    sched = SchedulerConfig(
        num_train_timesteps=cfg.get("num_train_timesteps", 1000), beta_schedule=BETA_SCHEDULE_NAMES[beta], beta_start=cfg.get("beta_start", 0.0001),
        beta_end=cfg.get("beta_end", 0.02), zero_terminal_snr=bool(cfg.get("rescale_betas_zero_snr", False)), prediction_type=cfg.get("prediction_type", "epsilon"),
        sigma_schedule="karras" if karras else spacing, steps_offset=cfg.get("steps_offset", 0),
        match_diffusers=True, set_alpha_to_one=bool(cfg.get("set_alpha_to_one", True)),
        spacing_given=karras or "timestep_spacing" in cfg,
    )
    hints = {"class": cfg.get("_class_name"), "set_alpha_to_one": cfg.get("set_alpha_to_one", True), "timestep_spacing": spacing}
    return sched, hints


SAMPLER_FOR_SCHEDULER = {
    "DDIMScheduler": "ddim", "DDPMScheduler": "ddpm", "EulerDiscreteScheduler": "euler", "EulerAncestralDiscreteScheduler": "euler_ancestral",
    "HeunDiscreteScheduler": "heun", "DPMSolverMultistepScheduler": "dpmpp_2m", "LMSDiscreteScheduler": "lms", "KDPM2DiscreteScheduler": "dpm_2",
    "KDPM2AncestralDiscreteScheduler": "dpm_2_ancestral", "DPMSolverSDEScheduler": "dpmpp_sde", "UniPCMultistepScheduler": "uni_pc", "LCMScheduler": "lcm",
}


def stable_diffusion_defaults(scheduler_class: str | None, size: int) -> SamplingDefaults:
    """The sampling defaults of a Stable Diffusion model, whichever way its weights arrive (a
    diffusers folder, or a single file with or without a config folder): diffusers' 50 steps at
    guidance 7.5, the sampler its scheduler class names (DPM-Solver++(2M) when it names none
    that unfog has, e.g. PNDM), at the model's native size."""
    return SamplingDefaults(sampler=SAMPLER_FOR_SCHEDULER.get(scheduler_class or "", "dpmpp_2m"), num_inference_steps=50,
                            guidance_scale=7.5, height=size, width=size)
