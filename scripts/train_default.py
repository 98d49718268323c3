"""Train a bundled model (autoencoder, then latent U-Net + text encoder) within a wall-clock
budget, export it, and evaluate it: shapes-v1 (the default) or emoji-scenes (`--world emoji`).

    python scripts/train_default.py --out runs/default --ae-seconds 90 --dm-seconds 360
    python scripts/train_default.py --world emoji --out runs/emoji --ae-seconds 90 --dm-seconds 330 --workers 14

emoji-scenes runs write the evaluation images (eval-seed{S}.npz) instead of scoring them, so
the scoring (`unfog eval emoji`, a CPU classifier) can run on another machine.

Each stage first times a few steps, then sets its step count so the stage fits its budget
(the cosine learning-rate schedule is laid out over that count). Runs resume with --resume.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import numpy as np
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
    ap.add_argument("--world", choices=["shapes", "emoji"], default="shapes")
    ap.add_argument("--ae-preset", help="default: the world's (shapes-ae, emoji-ae)")
    ap.add_argument("--dm-preset", help="default: the world's (shapes, emoji)")
    ap.add_argument("--workers", type=int, default=0, help="emoji: render the whole pool up front in this many processes")
    ap.add_argument("--eval-seeds", default="0", help="comma-separated evaluation seeds")
    ap.add_argument("--ae-seconds", type=float, default=90)
    ap.add_argument("--dm-seconds", type=float, default=360)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--init", help="skip the autoencoder and continue the diffusion model from this model folder")
    ap.add_argument("--pool", type=int, help="override the preset's data pool")
    ap.add_argument("--lr", type=float)
    ap.add_argument("--warmup-steps", type=int)
    ap.add_argument("--ema-decay", type=float)
    ap.add_argument("--eval-prompts", type=int, default=500)
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    t_start = time.perf_counter()
    if args.world == "emoji":
        from unfog.data.emoji import EmojiStream as Stream
    else:
        from unfog.data.shapes import ShapesStream as Stream
    ae_preset, dm_preset = args.ae_preset or f"{args.world}-ae", args.dm_preset or args.world

    dm_cfg = preset(dm_preset, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps, ema_decay=args.ema_decay,
                    data_pool=args.pool, checkpoint_every=10**9, sample_every=2000)
    data = Stream(seed=dm_cfg.seed, pool=dm_cfg.data_pool, resolution=dm_cfg.resolution)
    if args.workers:
        t0 = time.perf_counter()
        data.prerender(args.workers)
        print(f"rendered {len(data)} images in {time.perf_counter() - t0:.1f} s", flush=True)

    summary_ae = None
    if not args.init:
        ae_cfg = preset(ae_preset, checkpoint_every=10**9, sample_every=10**9)
        ae_data = data if args.workers else Stream(seed=ae_cfg.seed, resolution=ae_cfg.resolution)
        ae = Trainer(ae_cfg, ae_data, out / "ae", resume=args.resume)
        summary_ae = timed_run(ae, args.ae_seconds)
        ae.save_samples()
        print("autoencoder:", summary_ae, flush=True)

    if args.init:
        dm = Trainer(dm_cfg, data, out / "dm", init=args.init, resume=args.resume)
    else:
        dm = Trainer(dm_cfg, data, out / "dm", vae=out / "ae", resume=args.resume)
    summary_dm = timed_run(dm, args.dm_seconds)
    dm.save_samples()
    print("diffusion:", summary_dm, flush=True)

    model_dir = out / "model"
    export(out / "dm", model_dir, torch.float16)
    pipe = Pipeline.from_pretrained(model_dir).to(dm.device)
    report = {"autoencoder": summary_ae, "diffusion": summary_dm}
    for seed in (int(s) for s in args.eval_seeds.split(",")):
        if args.world == "shapes":
            from unfog.eval.shapes import evaluate, format_table

            result = evaluate(pipe, args.eval_prompts, seed=seed, batch_size=50, progress=False)
            print(format_table(result["scores"]))
            report[f"scores_seed{seed}"] = result["scores"]
        else:
            from unfog.data.emoji import caption
            from unfog.eval.emoji import eval_prompts
            from unfog.eval.shapes import generate

            texts = [caption(p) for p in eval_prompts(args.eval_prompts, seed)]
            images = generate(pipe, texts, seed, batch_size=50, progress=False)
            np.savez_compressed(out / f"eval-seed{seed}.npz", images=np.stack([np.asarray(im) for im in images]), prompts=np.array(texts))
            result = {"images": images}
        grid(result["images"][:64], 8).save(out / f"eval-seed{seed}.png")
    report |= {"total_seconds": time.perf_counter() - t_start, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "torch": torch.__version__}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
