"""Single-file Stable Diffusion checkpoints in the original latent-diffusion key layout
(`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*`), SD 1.x and 2.x, and
Stability's SDXL layout (`conditioner.embedders.0/1.*` for the two text encoders; the refiner
has only OpenCLIP bigG, as embedder 0).

Each `convert_*` turns the foreign tensors of one component into unfog's names (one foreign
tensor may become several, as OpenCLIP's fused q/k/v projection does). The architecture is
read from the weights' shapes, or taken from a diffusers-layout config folder.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch

from ..errors import UnfogError
from ..nn import Autoencoder, AutoencoderConfig, TextEncoder, TextEncoderConfig, UNet, UNetConfig
from .diffusers_folder import clip_tokenizer, native_size, translated
from .folder import ModelParts, read_json_object
from .keymaps import (
    map_text_encoder_key, scheduler_config_from_diffusers, stable_diffusion_defaults, text_encoder_config_from_transformers,
    unet_config_from_diffusers, vae_config_from_diffusers,
)
from .weights import lazy_state, load_checked, then
from ..diffusion.config import SchedulerConfig

UNET, VAE, SD1_TEXT, SD2_TEXT = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.", "cond_stage_model.model."
# SDXL base: CLIP ViT-L/14 (transformers layout) and OpenCLIP ViT-bigG/14; the refiner: bigG alone.
XL_TEXT, XL_TEXT_2, XL_REFINER_TEXT = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.", "conditioner.embedders.0.model."
# Where each family keeps its text encoders, in unfog's order (text_encoder, text_encoder_2).
TEXT_PREFIXES = {"sd1": [SD1_TEXT], "sd2": [SD2_TEXT], "sdxl": [XL_TEXT, XL_TEXT_2], "sdxl_refiner": [XL_REFINER_TEXT]}
RES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
VAE_RES = {"nin_shortcut": "conv_shortcut"}


def _sub(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _transformer_key(rest: str) -> str:
    return rest.replace("to_out.0.", "to_out.").replace("ff.net.0.proj.", "ff.proj.").replace("ff.net.2.", "ff.out.")


def _res_key(rest: str, table: dict) -> str:
    for a, b in table.items():
        if rest.startswith(a + "."):
            return b + rest[len(a):]
    return rest


def unet_layout(levels: int, lpb: int):
    """Which LDM input/output block index holds which (level, position) of unfog's U-Net."""
    inputs, k = {}, 1
    for level in range(levels):
        for j in range(lpb):
            inputs[k] = (level, j)
            k += 1
        if level < levels - 1:
            inputs[k] = (level, "down")
            k += 1
    outputs, k = {}, 0
    for up in range(levels):
        for j in range(lpb + 1):
            outputs[k] = (up, j)
            k += 1
    return inputs, outputs


def convert_unet(state: dict, config: UNetConfig) -> dict:
    """LDM U-Net tensors → unfog UNet tensors."""
    levels, lpb = len(config.block_channels), config.layers_per_block
    inputs, outputs = unet_layout(levels, lpb)
    out = {}
    for key, value in state.items():
        if key.startswith("time_embed."):
            new = key.replace("time_embed.0.", "time_embedding.linear_1.").replace("time_embed.2.", "time_embedding.linear_2.")
        elif key.startswith("label_emb.0."):  # SDXL's added-conditioning projection
            new = key.replace("label_emb.0.0.", "add_embedding.linear_1.").replace("label_emb.0.2.", "add_embedding.linear_2.")
        elif key.startswith("input_blocks.0.0."):
            new = "conv_in." + key[len("input_blocks.0.0."):]
        elif key.startswith("out.0."):
            new = "norm_out." + key[len("out.0."):]
        elif key.startswith("out.2."):
            new = "conv_out." + key[len("out.2."):]
        elif key.startswith("middle_block."):
            m = re.match(r"middle_block\.(\d)\.(.*)", key)
            idx, rest = int(m[1]), m[2]
            new = f"mid_block.attentions.0.{_transformer_key(rest)}" if idx == 1 else f"mid_block.resnets.{idx // 2}.{_res_key(rest, RES)}"
        elif key.startswith(("input_blocks.", "output_blocks.")):
            m = re.match(r"(input|output)_blocks\.(\d+)\.(\d)\.(.*)", key)
            table = inputs if key.startswith("input") else outputs
            if not m or int(m[2]) not in table:
                raise UnfogError(f"U-Net weight {UNET + key!r} does not fit a {levels}-level U-Net with {lpb} blocks per level")
            block, j = table[int(m[2])]
            sub, rest = int(m[3]), m[4]
            if m[1] == "input":
                if j == "down":
                    new = f"down_blocks.{block}.resample.{rest.replace('op.', 'conv.')}"
                elif sub == 0:
                    new = f"down_blocks.{block}.resnets.{j}.{_res_key(rest, RES)}"
                else:
                    new = f"down_blocks.{block}.attentions.{j}.{_transformer_key(rest)}"
            elif sub == 0:
                new = f"up_blocks.{block}.resnets.{j}.{_res_key(rest, RES)}"
            elif sub == 1 and config.attention_levels[levels - 1 - block]:
                new = f"up_blocks.{block}.attentions.{j}.{_transformer_key(rest)}"
            else:
                new = f"up_blocks.{block}.resample.{rest}"
        else:
            raise UnfogError(f"U-Net weight {UNET + key!r} is not part of a Stable Diffusion 1.x/2.x U-Net")
        out[new] = value
    return out


def convert_vae(state: dict, config: AutoencoderConfig) -> dict:
    """LDM autoencoder tensors → unfog Autoencoder tensors (1×1-conv attention → linear)."""
    levels = len(config.block_channels)
    out = {}
    for key, value in state.items():
        new = key
        m = re.match(r"(encoder|decoder)\.(down|up)\.(\d+)\.(block\.(\d+)|downsample|upsample)\.(.*)", key)
        if m:
            part, direction, i, j, rest = m[1], m[2], int(m[3]), m[5], m[6]
            level = i if direction == "down" else levels - 1 - i
            group = "down_blocks" if direction == "down" else "up_blocks"
            new = f"{part}.{group}.{level}." + (f"resnets.{j}.{_res_key(rest, VAE_RES)}" if j is not None else f"resample.{rest}")
        else:
            m = re.match(r"(encoder|decoder)\.mid\.(block_1|block_2|attn_1)\.(.*)", key)
            if m:
                part, which, rest = m[1], m[2], m[3]
                if which == "attn_1":
                    name, _, tail = rest.partition(".")
                    new = f"{part}.mid_block.attention.{ {'norm': 'group_norm', 'q': 'to_q', 'k': 'to_k', 'v': 'to_v', 'proj_out': 'to_out'}[name] }.{tail}"
                    if value.ndim == 4:
                        value = then(value, lambda v: v[:, :, 0, 0])
                else:
                    new = f"{part}.mid_block.resnets.{0 if which == 'block_1' else 1}.{_res_key(rest, VAE_RES)}"
        out[new] = value
    return out


def convert_open_clip(state: dict, projection: bool = False) -> dict:
    """OpenCLIP text tower (SD 2.x, SDXL's bigG) → unfog TextEncoder; the fused q/k/v is split.
    `projection`: keep the text projection (OpenCLIP multiplies x @ P; a Linear holds Pᵀ)."""
    out = {}
    for key, value in state.items():
        if key == "text_projection" and projection:
            out["text_projection.weight"] = then(value, lambda v: v.T.contiguous())
            continue
        if key in ("text_projection", "logit_scale") or key.startswith("visual."):
            continue
        if key == "positional_embedding":
            out["position_embedding.weight"] = value
            continue
        m = re.match(r"transformer\.resblocks\.(\d+)\.(.*)", key)
        if not m:
            out[key.replace("ln_final.", "final_layer_norm.")] = value
            continue
        i, rest = m[1], m[2]
        if rest.startswith("attn.in_proj_"):
            for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
                out[f"layers.{i}.{name}.{rest.split('_')[-1]}"] = then(value, lambda v, j=j: v.chunk(3)[j].contiguous())
            continue
        rest = rest.replace("ln_1.", "layer_norm1.").replace("ln_2.", "layer_norm2.").replace("attn.out_proj.", "out_proj.").replace("mlp.c_fc.", "fc1.").replace("mlp.c_proj.", "fc2.")
        out[f"layers.{i}.{rest}"] = value
    return out


def detect(state: dict) -> str:
    """'sd1', 'sd2', 'sdxl' or 'sdxl_refiner' from the text encoders' keys."""
    if not any(k.startswith(UNET) for k in state):
        raise UnfogError("this file has no model.diffusion_model.* weights: it is not a Stable Diffusion checkpoint in the original layout")
    if f"{XL_TEXT_2}transformer.resblocks.0.attn.in_proj_weight" in state and any(k.startswith(XL_TEXT) for k in state):
        return "sdxl"
    if f"{XL_REFINER_TEXT}transformer.resblocks.0.attn.in_proj_weight" in state:
        return "sdxl_refiner"
    if f"{SD2_TEXT}transformer.resblocks.0.attn.in_proj_weight" in state:
        return "sd2"
    if any(k.startswith(SD1_TEXT) for k in state):
        return "sd1"
    raise UnfogError("unknown text encoder in this checkpoint (neither CLIP ViT-L/14 as in SD 1.x nor OpenCLIP ViT-H/14 as in SD 2.x)")


def infer_unet_config(state: dict, family: str) -> UNetConfig:
    """Stable Diffusion's U-Net as the weights' shapes describe it (heads: SD 1.x 8 per block,
    SD 2.x and XL 64 channels per head; SDXL's micro-conditioning numbers in 256 sinusoids)."""
    u = _sub(state, UNET)
    downs = sorted(int(m[1]) for k in u if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.weight", k)))
    levels = len(downs) + 1
    n_inputs = 1 + max(int(re.match(r"input_blocks\.(\d+)", k)[1]) for k in u if k.startswith("input_blocks."))
    lpb = (n_inputs - 1 - (levels - 1)) // levels
    inputs, _ = unet_layout(levels, lpb)
    first = {level: k for k, (level, j) in sorted(inputs.items(), reverse=True) if j == 0}
    channels = [u[f"input_blocks.{first[l]}.0.out_layers.3.weight"].shape[0] for l in range(levels)]
    attention = [f"input_blocks.{first[l]}.1.proj_in.weight" in u for l in range(levels)]
    proj = next(v for k, v in u.items() if k.endswith("proj_in.weight"))
    to_k = next(v for k, v in u.items() if k.endswith("attn2.to_k.weight"))

    def depth(prefix: str) -> int:
        return 1 + max((int(m[1]) for k in u if (m := re.match(re.escape(prefix) + r"transformer_blocks\.(\d+)\.", k))), default=0)

    depths = [depth(f"input_blocks.{first[l]}.1.") if attention[l] else 1 for l in range(levels)]
    if "middle_block.1.proj_in.weight" in u:
        depths[-1] = depth("middle_block.1.")  # a level without attention still sets the middle block's depth
    conv_in = u["input_blocks.0.0.weight"]
    added = {}
    if "label_emb.0.0.weight" in u:
        added = dict(addition_time_embed_dim=256, projection_class_embeddings_input_dim=u["label_emb.0.0.weight"].shape[1])
    return UNetConfig(
        in_channels=conv_in.shape[1], out_channels=u["out.2.weight"].shape[0], block_channels=channels, layers_per_block=lpb,
        attention_levels=attention, num_heads=8, head_dim=None if family == "sd1" else 64,
        transformer_depth=depths if len(set(depths)) > 1 else depths[0], context_dim=to_k.shape[1], linear_projection=proj.ndim == 2,
        mid_attention="middle_block.1.proj_in.weight" in u, **added,
    )


def infer_vae_config(state: dict) -> AutoencoderConfig:
    v = _sub(state, VAE + "encoder.")
    levels = 1 + max(int(m[1]) for k in v if (m := re.match(r"down\.(\d+)\.", k)))
    lpb = 1 + max(int(m[1]) for k in v if (m := re.match(r"down\.0\.block\.(\d+)\.", k)))
    channels = [v[f"down.{l}.block.0.conv2.weight"].shape[0] for l in range(levels)]
    return AutoencoderConfig(block_channels=channels, layers_per_block=lpb, latent_channels=v["conv_out.weight"].shape[0] // 2)


def infer_text_config(state: dict, prefix: str) -> TextEncoderConfig:
    """The text encoder under `prefix` as its shapes describe it: CLIP in transformers' layout
    (quick GELU) or OpenCLIP's (GELU; with its text projection under SDXL's prefixes)."""
    t = {k.removeprefix("text_model."): v for k, v in _sub(state, prefix).items()}
    if "embeddings.token_embedding.weight" in t:
        layers = 1 + max(int(m[1]) for k in t if (m := re.match(r"encoder\.layers\.(\d+)\.", k)))
        vocab, width = t["embeddings.token_embedding.weight"].shape
        return TextEncoderConfig(vocab_size=vocab, context_length=t["embeddings.position_embedding.weight"].shape[0], width=width, layers=layers,
                                 heads=max(1, width // 64), mlp_width=t["encoder.layers.0.mlp.fc1.weight"].shape[0], activation="quick_gelu")
    if "token_embedding.weight" not in t:
        raise UnfogError(f"checkpoint without a text encoder token embedding under {prefix}*")
    layers = 1 + max(int(m[1]) for k in t if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k)))
    vocab, width = t["token_embedding.weight"].shape
    projection = t["text_projection"].shape[1] if prefix != SD2_TEXT and "text_projection" in t else None
    return TextEncoderConfig(vocab_size=vocab, context_length=t["positional_embedding"].shape[0], width=width, layers=layers, heads=max(1, width // 64),
                             mlp_width=t["transformer.resblocks.0.mlp.c_fc.weight"].shape[0], activation="gelu", projection_dim=projection)


def text_encoder_state(state: dict, prefix: str, config: TextEncoderConfig) -> dict:
    """The tensors of the text encoder under `prefix`, in unfog's names."""
    t = _sub(state, prefix)
    if any(k.startswith("transformer.resblocks.") for k in t):
        return convert_open_clip(t, projection=config.projection_dim is not None)
    return {new: v for k, v in t.items() if (new := map_text_encoder_key(k)) is not None}


def load_single_file(path: str | Path, *, config: str | Path | None = None, tokenizer: str | Path | None = None,
                     prediction_type: str | None = None, clip_skip: int = 0, dtype: torch.dtype = torch.float32) -> ModelParts:
    """A single-file SD 1.x / 2.x checkpoint. `config` is a diffusers-layout folder whose
    configs, tokenizer and scheduler are used (its weights are not needed); without it the
    architecture comes from the weights and `tokenizer` must name a CLIP tokenizer folder."""
    path = Path(path)
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        raise UnfogError(
            f"{path} is a pickle checkpoint; unfog does not load pickles because loading one can run arbitrary code. "
            f"Convert it once with: unfog convert --allow-pickle {path} OUT_DIR"
        )
    return parts_from_state(lazy_state(path), str(path), config=config, tokenizer=tokenizer, prediction_type=prediction_type, clip_skip=clip_skip, dtype=dtype)


def read_pickle_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .ckpt/.pt through torch.load(weights_only=True), which refuses to build
    anything but tensors and plain containers; only `unfog convert --allow-pickle` calls this."""
    try:
        with warnings.catch_warnings():  # torch warns of any pickle protocol but 2; a failure is reported below
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError and others here
        # torch's message is a paragraph that ends by suggesting weights_only=False; keep only its cause.
        msg = str(e)
        cause = msg.split("WeightsUnpickler error:", 1)[1].split("Check the documentation")[0] if "WeightsUnpickler error:" in msg else msg
        cause = " ".join(cause.split())[:300] or type(e).__name__
        raise UnfogError(f"{path} could not be read as a weights-only pickle ({cause}): the file is damaged, is not a "
                         "checkpoint, or holds objects other than tensors and plain containers, which unfog does not "
                         "build because unpickling them can run code") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UnfogError(f"{path} does not hold a flat dictionary of tensors")
    return obj


def parts_from_state(state: dict, source: str, *, config=None, tokenizer=None, prediction_type=None, clip_skip: int = 0,
                     dtype: torch.dtype = torch.float32) -> ModelParts:
    """ModelParts from the tensors of a single-file checkpoint (see load_single_file)."""
    family = detect(state)
    sdxl = family.startswith("sdxl")
    prefixes = TEXT_PREFIXES[family]
    file_text = [infer_text_config(state, p) for p in prefixes]
    if config is not None:
        root = Path(config)
        index = read_json_object(root / "model_index.json") if (root / "model_index.json").is_file() else {}
        folder_kind = ("an SDXL refiner" if index.get("requires_aesthetics_score") else "an SDXL base") if (root / "text_encoder_2").is_dir() else "an SD 1.x/2.x model"
        file_kind = {"sdxl": "an SDXL base", "sdxl_refiner": "an SDXL refiner"}.get(family, "an SD 1.x/2.x model")
        if folder_kind != file_kind:
            raise UnfogError(f"{source} is {file_kind} checkpoint but the config folder {root} describes {folder_kind}; pass the config folder of the same kind of model")
        unet_cfg = translated(unet_config_from_diffusers, root / "unet" / "config.json")
        vae_cfg = translated(vae_config_from_diffusers, root / "vae" / "config.json")
        folders = ["text_encoder_2"] if family == "sdxl_refiner" else ["text_encoder", "text_encoder_2"][: len(prefixes)]
        text_cfgs, tokenizers = [], []
        for folder, inferred in zip(folders, file_text):
            if not (root / folder / "config.json").is_file():
                raise UnfogError(f"{source} is {FAMILY_NAMES[family]} but the config folder {root} has no {folder}/ (is it the config of another model?)")
            cfg = translated(text_encoder_config_from_transformers, root / folder / "config.json", clip_skip, sdxl=sdxl, projection=inferred.projection_dim is not None)
            # diffusers' SD 2.x folders drop OpenCLIP's last layer; the single file still has it.
            cfg.skip_last_layers += inferred.layers - cfg.layers
            cfg.layers = inferred.layers
            text_cfgs.append(cfg)
            tokenizers.append(clip_tokenizer(root / folder.replace("text_encoder", "tokenizer"), cfg.context_length))
        sched, hints = translated(scheduler_config_from_diffusers, root / "scheduler" / "scheduler_config.json")
        scheduler_class = hints["class"]
        force_zeros = bool(index.get("force_zeros_for_empty_prompt", family == "sdxl")) and sdxl
        size = native_size(root, vae_cfg.downsample_factor)
    else:
        if tokenizer is None:
            raise UnfogError("a single-file checkpoint carries no tokenizer: pass tokenizer=DIR (a CLIP tokenizer folder) or config=DIR (a diffusers-layout config folder)")
        unet_cfg, vae_cfg, text_cfgs = infer_unet_config(state, family), infer_vae_config(state), file_text
        for cfg in text_cfgs:
            cfg.skip_last_layers = clip_skip + (1 if sdxl or family == "sd2" else 0)
            cfg.states_layer_norm = not sdxl
        if sdxl:
            vae_cfg.scaling_factor = 0.13025
        sched = SchedulerConfig(beta_schedule="scaled_linear", prediction_type="v_prediction" if family == "sd2" else "epsilon",
                                sigma_schedule="leading", steps_offset=1, match_diffusers=True, set_alpha_to_one=False,
                                spacing_given=sdxl)  # as the models' shipped scheduler configs (SDXL's names "leading")
        scheduler_class = "EulerDiscreteScheduler" if sdxl else None
        # SDXL's bigG tokenizer pads with "!", CLIP ViT-L's with the end-of-text token.
        pads = ["!"] if family == "sdxl_refiner" else [None, "!"] if sdxl else [None]
        tokenizers = [clip_tokenizer(Path(tokenizer), cfg.context_length, pad=pad) for cfg, pad in zip(text_cfgs, pads)]
        force_zeros = family == "sdxl"
        size = (128 if sdxl else 64) * vae_cfg.downsample_factor
    if prediction_type:
        sched.prediction_type = prediction_type
    with torch.device("meta"):
        unet, vae = UNet(unet_cfg), Autoencoder(vae_cfg)
        encoders = [TextEncoder(cfg) for cfg in text_cfgs]
    load_checked(unet, convert_unet(_sub(state, UNET), unet_cfg), f"{source} (U-Net)", dtype=dtype)
    load_checked(vae, convert_vae(_sub(state, VAE), vae_cfg), f"{source} (autoencoder)", dtype=dtype)
    for i, (te, prefix) in enumerate(zip(encoders, prefixes)):
        load_checked(te, text_encoder_state(state, prefix, te.config), f"{source} (text encoder{' ' + str(i + 1) if len(encoders) > 1 else ''})", dtype=dtype)
    second = (tokenizers[1], encoders[1].eval()) if len(encoders) > 1 else (None, None)
    return ModelParts(tokenizer=tokenizers[0], text_encoder=encoders[0].eval(), unet=unet.eval(), vae=vae.eval(), scheduler=sched,
                      defaults=stable_diffusion_defaults(scheduler_class, size), tokenizer_2=second[0], text_encoder_2=second[1],
                      force_zeros_for_empty_prompt=force_zeros)


FAMILY_NAMES = {"sd1": "an SD 1.x checkpoint", "sd2": "an SD 2.x checkpoint", "sdxl": "an SDXL base checkpoint", "sdxl_refiner": "an SDXL refiner checkpoint"}


_RES_BACK = {v: k for k, v in RES.items()}


def ldm_unet_key(key: str, config: UNetConfig) -> str:
    """An unfog U-Net key in the original layout's names (without `model.diffusion_model.`): the
    inverse of `convert_unet`, for LoRA files that name modules that way (kohya's SDXL LoRAs)."""
    levels, lpb = len(config.block_channels), config.layers_per_block
    inputs, outputs = unet_layout(levels, lpb)
    inv_in, inv_out = {v: k for k, v in inputs.items()}, {v: k for k, v in outputs.items()}

    def res(rest: str) -> str:
        name, _, tail = rest.partition(".")
        return f"{_RES_BACK.get(name, name)}.{tail}"

    def tf(rest: str) -> str:
        return rest.replace("to_out.", "to_out.0.").replace("ff.proj.", "ff.net.0.proj.").replace("ff.out.", "ff.net.2.")

    for a, b in (("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."), ("add_embedding.linear_1.", "label_emb.0.0."),
                 ("add_embedding.linear_2.", "label_emb.0.2."), ("conv_in.", "input_blocks.0.0."), ("norm_out.", "out.0."), ("conv_out.", "out.2.")):
        if key.startswith(a):
            return b + key[len(a):]
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d)\.(.*)", key)
    if m:
        return f"middle_block.1.{tf(m[3])}" if m[1] == "attentions" else f"middle_block.{2 * int(m[2])}.{res(m[3])}"
    m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|resample)\.(.*)", key)
    if not m:
        raise UnfogError(f"U-Net key {key!r} has no name in the original layout")
    side, block, kind, rest = m[1], int(m[2]), m[3], m[4]
    if side == "down":
        if kind == "resample":
            return f"input_blocks.{inv_in[(block, 'down')]}.0.op.{rest.partition('.')[2]}"
        j, _, rest = rest.partition(".")
        idx = inv_in[(block, int(j))]
        return f"input_blocks.{idx}.0.{res(rest)}" if kind == "resnets" else f"input_blocks.{idx}.1.{tf(rest)}"
    if kind == "resample":
        return f"output_blocks.{inv_out[(block, lpb)]}.{2 if config.attention_levels[levels - 1 - block] else 1}.{rest}"
    j, _, rest = rest.partition(".")
    idx = inv_out[(block, int(j))]
    return f"output_blocks.{idx}.0.{res(rest)}" if kind == "resnets" else f"output_blocks.{idx}.1.{tf(rest)}"
