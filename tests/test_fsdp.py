"""Sharded training (FSDP2, `unfog train --fsdp`) on CPU with gloo: the same weights as DDP after
the same steps, checkpoints that resume on another number of processes, export as usual."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from unfog import Pipeline
from unfog.cli import main
from unfog.train import Trainer, preset
from unfog.train.checkpoint import latest_checkpoint
from unfog.data.shapes import ShapesStream

COMMON = ["train", "--data", "shapes", "--preset", "tiny", "--sample-every", "1000", "--ema-decay", "0", "-q"]


def torchrun(n: int, *args: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), "-m", "unfog", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]


def ema(run) -> dict:  # with --ema-decay 0 the EMA is the model itself
    return load_file(str(latest_checkpoint(run) / "ema.safetensors"))


def close(a: dict, b: dict, atol: float = 1e-4) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=atol, msg=k)


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp") / "ae"
    assert main(["train", "--data", "shapes", "--preset", "tiny-ae", "--out", str(out), "--max-steps", "2", "-q"]) == 0
    return out


@pytest.mark.slow
def test_fsdp_equals_ddp_and_exports(vae, tmp_path):
    common = [*COMMON, "--vae", str(vae), "--max-steps", "3"]
    torchrun(2, *common, "--out", str(tmp_path / "ddp"))
    torchrun(2, *common, "--fsdp", "--out", str(tmp_path / "fsdp"))
    ckpt = latest_checkpoint(tmp_path / "fsdp")
    assert (ckpt / "dcp" / ".metadata").is_file() and not (ckpt / "model.safetensors").exists()
    a, b = ema(tmp_path / "ddp"), ema(tmp_path / "fsdp")
    cfg = preset("tiny")
    initial = Trainer(cfg, ShapesStream(resolution=cfg.resolution), tmp_path / "init", vae=vae, progress=False).model.state_dict()
    moved = max((a[k] - initial[k]).abs().max().item() for k in a)
    assert moved > 5e-4  # the optimizer stepped (lr 1e-3): a wrong shard or a lost gradient would show
    close(a, b)
    # export from rank 0's full EMA, as for any run
    assert main(["export", str(tmp_path / "fsdp"), str(tmp_path / "model")]) == 0
    image = Pipeline.from_pretrained(tmp_path / "model")("a red circle", seed=0, num_inference_steps=2).images[0]
    assert image.size == (32, 32)


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_on_another_number_of_processes(vae, tmp_path):
    common = [*COMMON, "--vae", str(vae), "--batch-size", "12", "--checkpoint-every", "2"]
    torchrun(2, *common, "--fsdp", "--max-steps", "4", "--out", str(tmp_path / "whole"))
    torchrun(2, *common, "--fsdp", "--max-steps", "2", "--out", str(tmp_path / "split"))
    torchrun(3, *common, "--fsdp", "--max-steps", "4", "--resume", "--out", str(tmp_path / "split"))
    assert latest_checkpoint(tmp_path / "split").name == "step-0000004"
    close(ema(tmp_path / "whole"), ema(tmp_path / "split"))


def test_fsdp_needs_torchrun_and_a_whole_model(vae, tmp_path, capsys):
    assert main(["train", "--data", "shapes", "--preset", "tiny", "--vae", str(vae), "--fsdp", "--out", str(tmp_path / "one")]) != 0
    assert "torchrun" in capsys.readouterr().err
    assert not (tmp_path / "one").exists()  # refused before anything was written
