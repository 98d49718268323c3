import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from unfog import Pipeline
from unfog.cli import main
from unfog.data.shapes import ShapesStream
from unfog.errors import UnfogError
from unfog.train import Trainer, TrainingStopped, export, preset
from unfog.train.checkpoint import latest_checkpoint, list_checkpoints
from unfog.train.trainer import DiffusionModel


def stream(cfg):
    return ShapesStream(seed=cfg.seed, resolution=cfg.resolution, pool=cfg.data_pool)


@pytest.fixture(scope="module")
def ae_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "ae"
    cfg = preset("tiny-ae", max_steps=6, checkpoint_every=3)
    summary = Trainer(cfg, stream(cfg), out, progress=False).run()
    assert summary["step"] == 6
    return out


def train(out, vae, until=None, resume=False, **overrides):
    cfg = preset("tiny", **({"max_steps": 8, "checkpoint_every": 4, "sample_every": 1000} | overrides))
    t = Trainer(cfg, stream(cfg), out, vae=vae, resume=resume, progress=False)
    t.run(until=until)
    return t


def tensors(run, name):
    return load_file(str(latest_checkpoint(run) / name))


def assert_same(a: dict, b: dict, exact=True, atol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=atol, msg=k)


@pytest.fixture(scope="module")
def initial(ae_run, tmp_path_factory):
    """The tiny preset's weights before any step (every run of it starts from these)."""
    cfg = preset("tiny")
    t = Trainer(cfg, stream(cfg), tmp_path_factory.mktemp("runs") / "init", vae=ae_run, progress=False)
    return {k: v.clone() for k, v in t.model.state_dict().items()}


def assert_trained(state: dict, initial: dict) -> None:
    """The optimizer really stepped: weights moved by about the learning rate (1e-3), far more
    than float rounding could move them."""
    moved = max((state[k].float() - initial[k].float()).abs().max().item() for k in initial)
    assert moved > 5e-4, f"weights moved by at most {moved}: no optimizer step happened"


def losses(run) -> list[float]:
    import json

    return [row["loss"] for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if row.get("loss") is not None]


def test_autoencoder_run_leaves_checkpoints_metrics_and_pictures(ae_run):
    assert [p.name for p in list_checkpoints(ae_run)] == ["step-0000003", "step-0000006"]
    assert (ae_run / "metrics.jsonl").read_text().count("\n") >= 1
    with Image.open(ae_run / "loss.png") as im:
        assert im.size == (640, 360)
    with Image.open(ae_run / "samples" / "step-0000006.png") as im:
        assert im.size == (8 * 32, 2 * 32)


def test_resume_equals_an_uninterrupted_run(ae_run, initial, tmp_path):
    train(tmp_path / "full", ae_run)
    assert_trained(tensors(tmp_path / "full", "model.safetensors"), initial)
    part = train(tmp_path / "split", ae_run, until=4)
    assert part.step == 4 and latest_checkpoint(tmp_path / "split").name == "step-0000004"
    resumed = train(tmp_path / "split", ae_run, resume=True)
    assert resumed.step == 8
    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        assert_same(tensors(tmp_path / "full", name), tensors(tmp_path / "split", name))


def test_gradient_accumulation_matches_the_full_batch(ae_run, initial, tmp_path):
    train(tmp_path / "one", ae_run, max_steps=3, log_every=1)
    train(tmp_path / "acc", ae_run, max_steps=3, grad_accum=2, log_every=1)
    one = tensors(tmp_path / "one", "model.safetensors")
    assert_trained(one, initial)
    # AdamW turns float-rounding differences in near-zero gradients into a small fraction of one
    # step (lr = 1e-3), as in the DDP test; a wrong split of the batch moves weights by ~lr.
    assert_same(one, tensors(tmp_path / "acc", "model.safetensors"), exact=False, atol=1e-4)
    # AdamW does not see the gradient's scale; the loss does: micro-batch losses must average.
    assert losses(tmp_path / "acc") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)


def test_existing_run_needs_resume(ae_run, tmp_path):
    train(tmp_path / "r", ae_run, max_steps=2)
    with pytest.raises(UnfogError, match="--resume"):
        train(tmp_path / "r", ae_run, max_steps=2)


def test_non_finite_losses_skip_steps_then_stop_keeping_the_last_good_checkpoint(ae_run, tmp_path, monkeypatch):
    real = DiffusionModel.forward
    calls = {"n": 0}

    def poisoned(self, *args):
        calls["n"] += 1
        loss = real(self, *args)
        return loss * float("nan") if calls["n"] == 2 or calls["n"] >= 4 else loss

    monkeypatch.setattr(DiffusionModel, "forward", poisoned)
    cfg = preset("tiny", max_steps=20, checkpoint_every=1, sample_every=1000, max_nonfinite=3)
    t = Trainer(cfg, stream(cfg), tmp_path / "nan", vae=ae_run, progress=False)
    with pytest.raises(TrainingStopped, match="3 non-finite losses in a row"):
        t.run()
    # step 2 was skipped, step 3 trained, steps 4-6 failed: checkpoints stop at the last good step
    assert latest_checkpoint(tmp_path / "nan").name == "step-0000003"
    log = (tmp_path / "nan" / "metrics.jsonl").read_text()
    assert log.count('"nonfinite": true') == 4
    for p in t.model.parameters():
        assert torch.isfinite(p).all()


def test_export_gives_a_loadable_model(ae_run, initial, tmp_path):
    train(tmp_path / "run", ae_run, max_steps=4)
    with pytest.raises(UnfogError, match="autoencoder run"):
        export(ae_run, tmp_path / "nope")
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "model"), "--dtype", "float16"]) == 0
    pipe = Pipeline.from_pretrained(tmp_path / "model")
    assert pipe.unet.conv_in.weight.dtype == torch.float32
    # The exported U-Net is the run's EMA (stored in float16), and the EMA has moved from the start.
    ema = tensors(tmp_path / "run", "ema.safetensors")
    exported = {f"denoiser.network.{k}": v for k, v in pipe.unet.state_dict().items()}
    for k, v in exported.items():
        torch.testing.assert_close(v, ema[k].half().float(), rtol=0, atol=0, msg=k)
    assert_trained(ema, {k: initial[k] for k in exported})
    assert pipe("a red circle", seed=0).images[0].size == (32, 32)


def test_train_cli_reports_bad_dataset_files(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.png").write_bytes(b"garbage")
    (tmp_path / "data" / "x.txt").write_text("a red circle")
    code = main(["train", "--data", str(tmp_path / "data"), "--preset", "tiny-ae", "--out", str(tmp_path / "run"), "-q"])
    assert code == 2 and "x.png cannot be read" in capsys.readouterr().err


def test_train_on_an_image_folder(ae_run, tmp_path):
    assert main(["data", "shapes", str(tmp_path / "data"), "--count", "8"]) == 0
    code = main(["train", "--data", str(tmp_path / "data"), "--preset", "tiny", "--vae", str(ae_run), "--out", str(tmp_path / "run"), "--max-steps", "3", "-q"])
    assert code == 0 and latest_checkpoint(tmp_path / "run").name == "step-0000003"


def _cli(*args):
    return [sys.executable, "-m", "unfog", *args]


def test_sigterm_checkpoints_and_resume_continues(ae_run, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(_cli("train", "--data", "shapes", "--preset", "tiny", "--vae", str(ae_run), "--out", str(out), "--max-steps", "100000", "--checkpoint-every", "100000", "-q"), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").is_file():
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "stopped by SIGTERM" in stdout
    step = int(latest_checkpoint(out).name.split("-")[1])
    assert step >= 5
    t = Trainer(preset("tiny"), None, out, resume=True, progress=False)
    assert t.step == step


def test_ddp_two_processes_equal_one_process(ae_run, initial, tmp_path):
    common = ["train", "--data", "shapes", "--preset", "tiny", "--vae", str(ae_run), "--max-steps", "3", "--sample-every", "1000", "-q"]
    single = subprocess.run(_cli(*common, "--out", str(tmp_path / "single")), capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "unfog", *common, "--out", str(tmp_path / "ddp")],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, b = tensors(tmp_path / "single", "model.safetensors"), tensors(tmp_path / "ddp", "model.safetensors")
    assert_trained(a, initial)
    # AdamW turns float-rounding differences in near-zero gradients into differences of a small
    # fraction of one step (lr = 1e-3); a wrong split of the batch moves weights by ~lr.
    assert_same(a, b, exact=False, atol=1e-4)
    assert (tmp_path / "ddp" / "metrics.jsonl").read_text().count('"step": 3') == 1


def test_overflowing_gradients_skip_the_step(ae_run, tmp_path):
    cfg = preset("tiny", max_steps=3, checkpoint_every=100, sample_every=1000)
    t = Trainer(cfg, stream(cfg), tmp_path / "inf", vae=ae_run, progress=False)
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    p = next(t.model.parameters())
    hook = p.register_hook(lambda g: g * float("inf"))
    assert math.isnan(t._train_step(0))  # reported as non-finite: the step was skipped
    hook.remove()
    assert all(torch.equal(before[k], v) for k, v in t.model.state_dict().items())


def test_resume_can_extend_a_run_but_not_change_its_recipe(ae_run, tmp_path):
    train(tmp_path / "r", ae_run, max_steps=3)
    cfg = preset("tiny")
    t = Trainer(cfg, stream(cfg), tmp_path / "r", vae=ae_run, resume=True, progress=False, resume_overrides={"max_steps": 5})
    assert t.run()["step"] == 5
    with pytest.raises(UnfogError, match="cannot change when resuming"):
        Trainer(cfg, stream(cfg), tmp_path / "r", vae=ae_run, resume=True, progress=False, resume_overrides={"lr": 1.0})


def test_a_torn_metrics_line_does_not_break_the_loss_plot(tmp_path):
    from unfog.train.plots import loss_curve

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo\n{"step": 4, "loss": 0.3}\n[1]\n')
    loss_curve(metrics, tmp_path / "loss.png")
    with Image.open(tmp_path / "loss.png") as im:
        assert im.size == (640, 360)


def test_a_damaged_newest_checkpoint_falls_back_to_the_last_complete_one(ae_run, tmp_path):
    run = tmp_path / "r"
    train(run, ae_run, max_steps=8, checkpoint_every=4)
    newest = latest_checkpoint(run)
    assert newest.name == "step-0000008"
    (newest / "state.json").write_text('{"step": 8, "optim')  # torn by a kill
    (run / "checkpoints" / ".tmp-left-by-a-kill").mkdir()
    with pytest.warns(UserWarning, match="damaged checkpoint"):
        t = Trainer(preset("tiny"), None, run, resume=True, progress=False)
    assert t.step == 4
    with pytest.warns(UserWarning):
        t.checkpoint()
    assert not (run / "checkpoints" / ".tmp-left-by-a-kill").exists()


def test_a_vae_copy_cut_short_does_not_break_resume(ae_run, tmp_path, monkeypatch):
    import unfog.train.trainer as trainer_module
    from unfog.train.trainer import load_autoencoder, write_vae

    vae, _ = load_autoencoder(ae_run)
    d = tmp_path / "vae"

    def killed(module, path):
        path.write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer_module, "save_weights", killed)
    with pytest.raises(KeyboardInterrupt):
        write_vae(vae, d)
    assert not (d / "config.json").exists() and not (d / "model.safetensors").exists()  # so --resume copies it again
    monkeypatch.undo()
    write_vae(vae, d)
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors"]
    again, _ = load_autoencoder(d)
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), again.state_dict().values()))


@pytest.mark.parametrize("flag, value, field", [("--batch-size", "0", "batch_size"), ("--grad-accum", "-1", "grad_accum"), ("--max-steps", "0", "max_steps"),
                                                ("--checkpoint-every", "0", "checkpoint_every"), ("--lr", "inf", "lr"), ("--lr", "-1", "lr"),
                                                ("--resolution", "3", "resolution")])
def test_a_recipe_number_out_of_range_is_refused_before_training(tmp_path, capsys, flag, value, field):
    """These had been a ZeroDivisionError or IndexError mid-run, or a run that trained nothing or
    wrote a NaN model with exit status 0."""
    from unfog.cli import main

    assert main(["train", "--data", "shapes", "--preset", "tiny-ae", "--out", str(tmp_path / "run"), flag, value, "-q"]) == 2
    assert field in capsys.readouterr().err and not (tmp_path / "run" / "checkpoints").exists()
