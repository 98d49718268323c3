"""Training checkpoints, written atomically and without pickle.

    checkpoints/step-0001000/
        model.safetensors      the trained modules
        ema.safetensors        their exponential moving average
        optimizer.safetensors  AdamW moments, one key per parameter and slot
        state.json             step, samples seen, LR schedule, optimizer hyperparameters, RNG
                               states, non-finite streak

A checkpoint is written to a temporary folder and renamed into place, so a step-* folder is
always complete; a crash mid-write leaves only a temporary folder that is ignored.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..formats.weights import load_checked, read_safetensors

PREFIX = "step-"


def _flat(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu().clone() for k, v in module.state_dict().items()}


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors = {}
    for pid, slots in sd["state"].items():
        for name, value in slots.items():
            tensors[f"{pid}.{name}"] = torch.as_tensor(value).detach().contiguous().cpu().clone()
    return tensors, {"param_groups": sd["param_groups"]}


def save_checkpoint(run_dir: Path, step: int, model, ema, optimizer, state: dict, keep: int = 2) -> Path:
    """Write checkpoint `step` atomically and delete all but the newest `keep`."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a kill mid-write; one writer per run, so none is live
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"{PREFIX}{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        save_file(_flat(model), str(tmp / "model.safetensors"))
        save_file(_flat(ema), str(tmp / "ema.safetensors"))
        opt_tensors, opt_meta = _optimizer_tensors(optimizer)
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng |= {f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
        save_file(opt_tensors | {f"rng.{k}": v for k, v in rng.items()}, str(tmp / "optimizer.safetensors"))
        full = dict(state, step=step, optimizer=opt_meta, python_random=_py_state())
        (tmp / "state.json").write_text(json.dumps(full, indent=1))
        publish(tmp, final, keep)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def publish(tmp: Path, final: Path, keep: int) -> None:
    """Make a fully written checkpoint folder visible as `final`: its files on disk first, then
    the rename (a re-saved step's old copy set aside, never leaving the step missing), then
    all but the newest `keep` checkpoints deleted. Both checkpoint layouts (this module's and
    FSDP's) go through here."""
    for f in [f for f in tmp.rglob("*") if f.is_file()]:  # on disk before the rename makes the checkpoint visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    root = final.parent
    if final.exists():
        aside = root / f".old-{final.name}"
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
        os.replace(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(tmp, final)
    dir_fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    for old in list_checkpoints(root.parent)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def _py_state():
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _complete(path: Path) -> bool:
    """Whether a checkpoint folder holds all its files and a readable state.json."""
    sharded = (path / "dcp" / ".metadata").is_file()  # an FSDP checkpoint (unfog/train/fsdp.py)
    files = ("ema.safetensors", "state.json") if sharded else ("model.safetensors", "ema.safetensors", "optimizer.safetensors", "state.json")
    if not all((path / name).is_file() for name in files):
        return False
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and all(k in state for k in ("step", "python_random") + (() if sharded else ("optimizer",)))


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first; a damaged one (a torn state.json, a missing file) is
    passed over with a warning, so resuming falls back to the newest complete one."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))
    damaged = [p for p in found if not _complete(p)]
    if damaged:
        warnings.warn(f"skipping damaged checkpoint(s) {', '.join(p.name for p in damaged)} in {root} (incomplete or unreadable)", stacklevel=2)
    return [p for p in found if p not in damaged]


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint file's tensors, through the one safetensors reader."""
    return read_safetensors(path, hint="delete that checkpoint folder to resume from an older one")


def load_checkpoint(path: Path, model, ema, optimizer) -> dict:
    """Restore modules, optimizer and RNG states; returns the saved state dict."""
    path = Path(path)
    load_checked(model, read_tensors(path / "model.safetensors"), f"checkpoint {path / 'model.safetensors'}")
    if ema is not None:
        load_checked(ema, read_tensors(path / "ema.safetensors"), f"checkpoint {path / 'ema.safetensors'}")
    state = json.loads((path / "state.json").read_text())
    tensors = read_tensors(path / "optimizer.safetensors")
    if optimizer is not None:
        slots: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("rng."):
                continue
            pid, name = key.split(".", 1)
            slots.setdefault(int(pid), {})[name] = value
        optimizer.load_state_dict({"state": slots, "param_groups": state["optimizer"]["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = state["python_random"]
    random.setstate((version, tuple(internal), gauss))
    return state
