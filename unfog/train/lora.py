"""LoRA training: trainable low-rank adapters beside a frozen model's layers, and their export as
a kohya-format file (the format A1111, ComfyUI, diffusers and unfog all load).

The adapters go where kohya's sd-scripts put them: every Linear (and 1×1 convolution) of the
U-Net's transformer blocks (attention q/k/v/out, feed-forward, proj_in/out), and with
`text_encoder=True` the text encoder's attention and MLP layers. Each starts as
down ~ Kaiming-uniform, up = 0, so training starts from exactly the base model.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import UnfogError
from ..formats.lora import diffusers_unet_path, transformers_text_path
from ..nn.lora import Adapted, LowRank

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out", "proj", "out", "proj_in", "proj_out")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def _targets(component: str, module: nn.Module) -> list[str]:
    found = []
    for path, layer in module.named_modules():
        leaf = path.rsplit(".", 1)[-1]
        if component == "unet":
            inside = ".attentions." in f".{path}" or path.startswith("mid_block.attentions")
            ok = inside and leaf in UNET_TARGETS and (isinstance(layer, nn.Linear) or (isinstance(layer, nn.Conv2d) and layer.kernel_size == (1, 1)))
        else:
            ok = leaf in TEXT_TARGETS and isinstance(layer, nn.Linear)
        if ok:
            found.append(path)
    return found


def attach_trainable(components: dict[str, nn.Module], rank: int, alpha: float | None, seed: int) -> nn.ModuleDict:
    """Freeze the components and put a trainable LowRank beside each target layer; returns the
    adapters keyed "component/module/path" (the checkpoint and export names)."""
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= 1024:
        raise UnfogError(f"--lora-rank must be an integer from 1 to 1024, got {rank!r}")
    g = torch.Generator().manual_seed(seed)
    adapters = nn.ModuleDict()
    for comp, module in components.items():
        module.requires_grad_(False)
        for path in _targets(comp, module):
            layer = module.get_submodule(path)
            w = layer.weight
            shape_in = (w.shape[1], *w.shape[2:])
            bound = 1 / math.sqrt(math.prod(shape_in))  # kaiming_uniform(a=√5), as nn.Linear initialises
            down = (torch.rand(rank, *shape_in, generator=g) * 2 - 1) * bound
            up = torch.zeros(w.shape[0], rank, *([1, 1] if w.ndim == 4 else []))
            adapter = LowRank(down.to(w.device), up.to(w.device), alpha, trainable=True)
            wrapped = Adapted(layer)
            wrapped.add("train", adapter)
            parent_path, _, child = path.rpartition(".")
            setattr(module.get_submodule(parent_path) if parent_path else module, child, wrapped)
            adapters[f"{comp}/{path.replace('.', '/')}"] = adapter
    if not adapters:
        raise UnfogError("the model has no layers a LoRA adapts (attention and feed-forward layers of the U-Net)")
    return adapters


def kohya_state(adapters: dict[str, torch.Tensor], alpha: float, unet_config=None, sdxl: bool = False) -> dict[str, torch.Tensor]:
    """Checkpointed adapter tensors ("unet/a/b.down", …) as a kohya-format state dict: U-Net
    modules by their diffusers paths (SD 1.x/2.x) or, for SDXL as kohya's SDXL scripts write them,
    by the original layout's; text encoders as lora_te_ (one) or lora_te1_ / lora_te2_ (SDXL)."""
    from ..formats.single_file import ldm_unet_key

    out = {}
    for key, value in adapters.items():
        name, _, part = key.rpartition(".")
        comp, _, path = name.partition("/")
        path = path.replace("/", ".")
        if comp == "unet":
            module = ldm_unet_key(path + ".weight", unet_config).removesuffix(".weight") if sdxl else diffusers_unet_path(path)
            kohya = "lora_unet_" + module.replace(".", "_")
        elif comp in ("text_encoder", "text_encoder_2"):
            prefix = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}[comp] if sdxl else "lora_te_"
            kohya = prefix + transformers_text_path(path).replace(".", "_")
        else:
            raise UnfogError(f"unexpected adapter {key!r} in the checkpoint")
        out[f"{kohya}.lora_{part}.weight"] = value.detach().float().contiguous()
        out[f"{kohya}.alpha"] = torch.tensor(float(alpha))
    return out


def export_lora(run_dir: str | Path, out_file: str | Path, dtype: torch.dtype | None = None) -> Path:
    """A LoRA run's newest adapters as a kohya-format .safetensors (written to a temporary file
    and renamed into place)."""
    from .checkpoint import read_tensors
    from .trainer import read_run

    run = Path(run_dir)
    c, ckpt = read_run(run, "diffusion", "LoRA export needs a diffusion run")
    if not c.lora_rank:
        raise UnfogError(f"{run} trained the whole model, not a LoRA; export it as a model folder with `unfog export RUN OUT_DIR`")
    from ..nn import UNetConfig

    unet_config = UNetConfig(**c.unet)
    state = kohya_state(read_tensors(ckpt / "model.safetensors"), c.lora_alpha if c.lora_alpha is not None else c.lora_rank, unet_config,
                        sdxl=unet_config.addition_time_embed_dim is not None)
    if dtype is not None:
        state = {k: v.to(dtype) if k.endswith(".weight") else v for k, v in state.items()}
    out = Path(out_file)
    if out.suffix != ".safetensors":
        raise UnfogError(f"the LoRA file must end in .safetensors, got {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file(state, str(tmp), metadata={"ss_network_dim": str(c.lora_rank), "ss_network_alpha": str(c.lora_alpha or c.lora_rank),
                                         "ss_base_model": str(c.init or "")})
    tmp.chmod(0o644)  # a file to share
    tmp.replace(out)
    return out
