"""Test helper: write an unfog pipeline's weights in the original latent-diffusion single-file
layout, independently of unfog's loader (the reverse direction, spelled out)."""

import re

import torch
from safetensors.torch import save_file

from unfog.formats.single_file import unet_layout

RES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _tf(rest):
    return rest.replace("to_out.", "to_out.0.").replace("ff.proj.", "ff.net.0.proj.").replace("ff.out.", "ff.net.2.")


def _res(rest, table=RES):
    name, _, tail = rest.partition(".")
    return f"{table.get(name, name)}.{tail}"


def unet_to_ldm(unet):
    c = unet.config
    levels, lpb = len(c.block_channels), c.layers_per_block
    inputs, outputs = unet_layout(levels, lpb)
    inv_in = {v: k for k, v in inputs.items()}
    inv_out = {v: k for k, v in outputs.items()}
    out = {}
    for key, v in unet.state_dict().items():
        if key.startswith("time_embedding."):
            new = key.replace("time_embedding.linear_1.", "time_embed.0.").replace("time_embedding.linear_2.", "time_embed.2.")
        elif key.startswith("add_embedding."):
            new = key.replace("add_embedding.linear_1.", "label_emb.0.0.").replace("add_embedding.linear_2.", "label_emb.0.2.")
        elif key.startswith("conv_in."):
            new = "input_blocks.0.0." + key[8:]
        elif key.startswith("norm_out."):
            new = "out.0." + key[9:]
        elif key.startswith("conv_out."):
            new = "out.2." + key[9:]
        elif key.startswith("mid_block."):
            m = re.match(r"mid_block\.(resnets|attentions)\.(\d)\.(.*)", key)
            new = f"middle_block.1.{_tf(m[3])}" if m[1] == "attentions" else f"middle_block.{2 * int(m[2])}.{_res(m[3])}"
        elif key.startswith("down_blocks."):
            m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions|resample)\.(.*)", key)
            level, kind, rest = int(m[1]), m[2], m[3]
            if kind == "resample":
                new = f"input_blocks.{inv_in[(level, 'down')]}.0.op.{rest.partition('.')[2]}"
            else:
                j, _, rest = rest.partition(".")
                idx = inv_in[(level, int(j))]
                new = f"input_blocks.{idx}.0.{_res(rest)}" if kind == "resnets" else f"input_blocks.{idx}.1.{_tf(rest)}"
        else:
            m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions|resample)\.(.*)", key)
            up, kind, rest = int(m[1]), m[2], m[3]
            if kind == "resample":
                has_attn = c.attention_levels[levels - 1 - up]
                new = f"output_blocks.{inv_out[(up, lpb)]}.{2 if has_attn else 1}.{rest}"
            else:
                j, _, rest = rest.partition(".")
                idx = inv_out[(up, int(j))]
                new = f"output_blocks.{idx}.0.{_res(rest)}" if kind == "resnets" else f"output_blocks.{idx}.1.{_tf(rest)}"
        out["model.diffusion_model." + new] = v
    return out


def vae_to_ldm(vae):
    levels = len(vae.config.block_channels)
    out = {}
    for key, v in vae.state_dict().items():
        new = key
        m = re.match(r"(encoder|decoder)\.(down_blocks|up_blocks)\.(\d+)\.(resnets\.(\d+)|resample)\.(.*)", key)
        if m:
            part, group, level, j, rest = m[1], m[2], int(m[3]), m[5], m[6]
            i = level if group == "down_blocks" else levels - 1 - level
            d = "down" if group == "down_blocks" else "up"
            new = f"{part}.{d}.{i}." + (f"block.{j}.{_res(rest, {'conv_shortcut': 'nin_shortcut'})}" if j is not None else f"{'downsample' if d == 'down' else 'upsample'}.{rest}")
        m = re.match(r"(encoder|decoder)\.mid_block\.(resnets\.(\d)|attention)\.(.*)", key)
        if m:
            part, idx, rest = m[1], m[3], m[4]
            if idx is not None:
                new = f"{part}.mid.block_{int(idx) + 1}.{_res(rest, {})}"
            else:
                name, _, tail = rest.partition(".")
                new = f"{part}.mid.attn_1.{ {'group_norm': 'norm', 'to_q': 'q', 'to_k': 'k', 'to_v': 'v', 'to_out': 'proj_out'}[name] }.{tail}"
                if v.ndim == 2:
                    v = v[:, :, None, None]  # the original stores these as 1×1 convolutions
        new = new.replace(".norm_out.", ".norm_out.")
        out["first_stage_model." + new] = v
    return out


def text_to_ldm(te, open_clip: bool, prefix: str | None = None):
    """One text encoder in the original layout: CLIP in transformers' names under
    `prefix` (default SD 1.x's), or OpenCLIP's under `prefix` (default SD 2.x's)."""
    out = {}
    state = te.state_dict()
    if not open_clip:
        prefix = prefix or "cond_stage_model.transformer."
        for key, v in state.items():
            m = re.match(r"layers\.(\d+)\.(.*)", key)
            if key.startswith(("token_embedding", "position_embedding")):
                new = "embeddings." + key
            elif m:
                rest = m[2]
                rest = ("self_attn." + rest) if rest.startswith(("q_proj", "k_proj", "v_proj", "out_proj")) else ("mlp." + rest) if rest.startswith("fc") else rest
                new = f"encoder.layers.{m[1]}.{rest}"
            else:
                new = key
            out[prefix + "text_model." + new] = v
        return out
    p = prefix or "cond_stage_model.model."
    out[p + "token_embedding.weight"] = state["token_embedding.weight"]
    out[p + "positional_embedding"] = state["position_embedding.weight"]
    out[p + "ln_final.weight"], out[p + "ln_final.bias"] = state["final_layer_norm.weight"], state["final_layer_norm.bias"]
    proj = state.get("text_projection.weight")
    out[p + "text_projection"] = proj.T if proj is not None else torch.zeros(te.config.width, te.config.width)
    out[p + "logit_scale"] = torch.tensor(1.0)
    for i in range(te.config.layers):
        q = f"layers.{i}."
        r = f"{p}transformer.resblocks.{i}."
        for t in ("weight", "bias"):
            out[r + f"attn.in_proj_{t}"] = torch.cat([state[q + f"{n}.{t}"] for n in ("q_proj", "k_proj", "v_proj")])
            out[r + f"attn.out_proj.{t}"] = state[q + f"out_proj.{t}"]
            out[r + f"ln_1.{t}"], out[r + f"ln_2.{t}"] = state[q + f"layer_norm1.{t}"], state[q + f"layer_norm2.{t}"]
            out[r + f"mlp.c_fc.{t}"], out[r + f"mlp.c_proj.{t}"] = state[q + f"fc1.{t}"], state[q + f"fc2.{t}"]
    return out


def write_ldm_checkpoint(pipe, path, *, open_clip: bool = False, extra_text_layer=None):
    """SD 1.x/2.x, or for an SDXL pipeline Stability's layout: conditioner.embedders.0 (CLIP) and
    .1 (OpenCLIP bigG) for the base, .0 (bigG) alone for the refiner."""
    if getattr(pipe, "sdxl", None) == "base":
        text = {**text_to_ldm(pipe.text_encoder, False, "conditioner.embedders.0.transformer."),
                **text_to_ldm(pipe.text_encoder_2, True, "conditioner.embedders.1.model.")}
    elif getattr(pipe, "sdxl", None) == "refiner":
        text = text_to_ldm(pipe.text_encoder, True, "conditioner.embedders.0.model.")
    else:
        text = text_to_ldm(pipe.text_encoder, open_clip)
    state = {**unet_to_ldm(pipe.unet), **vae_to_ldm(pipe.vae), **text}
    save_file({k: v.contiguous().clone() for k, v in state.items()}, str(path))
