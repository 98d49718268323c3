"""Train the bundled default model (autoencoder, then latent U-Net + text encoder) within a
wall-clock budget, export it, and evaluate it on shapes-v1.

    python scripts/train_default.py --out runs/default --ae-seconds 90 --dm-seconds 360

Each stage first times a few steps, then sets its step count so the stage fits its budget
(the cosine learning-rate schedule is laid out over that count). Runs resume with --resume.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from unfog.data.shapes import ShapesStream
from unfog.eval.shapes import evaluate, format_table
from unfog.pipeline import Pipeline
from unfog.train import Trainer, export, preset
from unfog.images import grid


def timed_run(trainer: Trainer, seconds: float, warm: int = 20, probe: int = 40) -> dict:
    """Probe the step time, size max_steps to the budget, and train."""
    start = time.perf_counter()
    if trainer.step < warm + probe:
        trainer.config.max_steps = 10**9  # probe in warm-up; the real count is set below
        trainer.run(until=warm)
        t0 = time.perf_counter()
        trainer.run(until=warm + probe)
        per_step = (time.perf_counter() - t0) / probe
        remaining = seconds - (time.perf_counter() - start)
        trainer.config.max_steps = trainer.step + max(1, int(remaining / per_step * 0.97))
        print(f"{trainer.config.stage}: {per_step * 1000:.1f} ms/step → max_steps {trainer.config.max_steps}", flush=True)
    return trainer.run()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/default")
    ap.add_argument("--ae-preset", default="shapes-ae")
    ap.add_argument("--dm-preset", default="shapes")
    ap.add_argument("--ae-seconds", type=float, default=90)
    ap.add_argument("--dm-seconds", type=float, default=360)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--eval-prompts", type=int, default=500)
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    t_start = time.perf_counter()

    ae_cfg = preset(args.ae_preset, checkpoint_every=10**9, sample_every=10**9)
    ae = Trainer(ae_cfg, ShapesStream(seed=ae_cfg.seed, resolution=ae_cfg.resolution), out / "ae", resume=args.resume)
    summary_ae = timed_run(ae, args.ae_seconds)
    ae.save_samples()
    print("autoencoder:", summary_ae, flush=True)

    dm_cfg = preset(args.dm_preset, batch_size=args.batch_size, checkpoint_every=10**9, sample_every=2000)
    data = ShapesStream(seed=dm_cfg.seed, pool=dm_cfg.data_pool, resolution=dm_cfg.resolution)
    dm = Trainer(dm_cfg, data, out / "dm", vae=out / "ae", resume=args.resume)
    summary_dm = timed_run(dm, args.dm_seconds)
    dm.save_samples()
    print("diffusion:", summary_dm, flush=True)

    model_dir = out / "model"
    export(out / "dm", model_dir, torch.float16)
    pipe = Pipeline.from_pretrained(model_dir).to(dm.device)
    result = evaluate(pipe, args.eval_prompts, seed=0, batch_size=100, progress=False)
    print(format_table(result["scores"]))
    grid(result["images"][:64], 8).save(out / "eval.png")
    report = {"autoencoder": summary_ae, "diffusion": summary_dm, "scores": result["scores"], "total_seconds": time.perf_counter() - t_start,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
