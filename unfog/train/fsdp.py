"""Sharded training with FSDP2 (`unfog train --fsdp` under torchrun).

Each process holds 1/N of the weights, their gradients, the AdamW moments and the EMA: every
ResBlock and transformer of the U-Net and every text-encoder layer is its own `fully_shard`
unit (gathered for its forward and backward, freed after), the rest is the root unit.

Checkpoints go through torch.distributed.checkpoint, so a run resumes on a different number
of processes (DCP reshards on load). Beside the sharded state, rank 0 writes the full EMA
weights as ema.safetensors, so `unfog export` reads an FSDP run like any other:

    checkpoints/step-0001000/
        dcp/                   model, EMA and optimizer state, sharded (torch.distributed.checkpoint)
        ema.safetensors        the full EMA weights (for export)
        state.json             step, non-finite streak, processes, Python RNG
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from ..errors import UnfogError

DCP = "dcp"


def shard(model: torch.nn.Module) -> None:
    """FSDP2 in place: each ResBlock and transformer of the U-Net's blocks and each
    text-encoder layer a unit (the modules the forward passes call; a U-Net block is a
    container whose own forward is never called), then the rest as the root."""
    from torch.distributed.fsdp import fully_shard

    from ..nn.text_encoder import EncoderLayer
    from ..nn.unet import UNetBlock

    units = [m for m in model.modules() if isinstance(m, EncoderLayer)]
    for block in [m for m in model.modules() if isinstance(m, UNetBlock)]:
        units += [*block.resnets, *(block.attentions or [])]
    for module in units:
        fully_shard(module)
    fully_shard(model)


def full_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict on CPU on rank 0 (empty elsewhere). Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.contiguous() for k, v in state.items()} if dist.get_rank() == 0 else {}


def _states(model, ema, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "ema": get_model_state_dict(ema), "optimizer": optim_state}


def save_sharded(run_dir: Path, step: int, model, ema, optimizer, state: dict, keep: int = 2) -> Path:
    """Every rank writes its shards into a temporary folder; rank 0 adds the full EMA and
    state.json and renames the folder into place (a step-* folder is always complete)."""
    import torch.distributed.checkpoint as dcp

    from .checkpoint import PREFIX, _py_state, publish

    root = Path(run_dir) / "checkpoints"
    final = root / f"{PREFIX}{step:07d}"
    tmp = root / f".tmp-{final.name}"
    rank = dist.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):  # left by a kill mid-write; one run writes here at a time
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    dcp.save(_states(model, ema, optimizer), checkpoint_id=str(tmp / DCP))
    ema_full = full_state(ema)
    if rank == 0:
        save_file(ema_full, str(tmp / "ema.safetensors"))
        full = dict(state, step=step, fsdp=True, processes=dist.get_world_size(), python_random=_py_state())
        (tmp / "state.json").write_text(json.dumps(full, indent=1))
        publish(tmp, final, keep)
    dist.barrier()
    return final


def load_sharded(path: Path, model, ema, optimizer) -> dict:
    """Restore a sharded checkpoint written by any number of processes."""
    import random

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    states = _states(model, ema, optimizer)
    dcp.load(states, checkpoint_id=str(Path(path) / DCP))
    set_state_dict(model, optimizer, model_state_dict=states["model"], optim_state_dict=states["optimizer"])
    set_model_state_dict(ema, states["ema"])
    state = json.loads((Path(path) / "state.json").read_text())
    version, internal, gauss = state["python_random"]
    random.setstate((version, tuple(internal), gauss))
    return state


def check_setup(world: int, stage: str, lora: bool) -> None:
    if world < 2:
        raise UnfogError("--fsdp shards the model across processes and needs torchrun: "
                         "torchrun --nproc_per_node N -m unfog train --fsdp ... (N ≥ 2; one process per GPU)")
    if stage != "diffusion" or lora:
        raise UnfogError("--fsdp shards a whole diffusion model (U-Net and text encoder); autoencoder and LoRA runs use DDP (no --fsdp)")


def is_sharded(path: Path) -> bool:
    return (Path(path) / DCP).is_dir()
