"""Train the emoji-scenes sprite classifier that `unfog.eval.emoji` uses, on CPU, and write it
(float16 safetensors, the class names in its metadata) to
unfog/assets/emoji-sprites/classifier.safetensors.

    nohup nice -n 10 python scripts/train_emoji_classifier.py > train.log 2>&1 &

On 2 CPU cores shared with another training job this took 819 s (crops 287 s, 2 epochs 530 s);
an epoch took 119 s once the other job eased off. Held-out accuracy after 2 epochs: 100.00 %
on clean crops and on crops degraded as in `validate`, 99.91 % degraded as in training,
99.86 % with rescaled sprites. Runs are repeatable: two runs of a small configuration wrote
bit-identical tensors (only the order of the header's metadata keys differed).

The crops are made exactly as the evaluator makes them: random emoji-scenes (all backgrounds,
styles; half of them with the sprites rescaled to a longer side of 14–34 px, so that generated
objects of slightly wrong size still classify), degraded like a generated image (blur radius
0–1, gaussian noise σ 0–8, sometimes a slight colour shift or a JPEG round trip), segmented by
`segment`, each segmented object matched to the scene object whose sprite box it overlaps most
(ambiguous ones, such as two sprites merged into one object, skipped) and cropped by `crop`.
Held-out crops come from a separate seed namespace: clean renders, and renders degraded as in
`validate` (blur ≤ 0.6, σ ≤ 4) and as in training. Everything is seeded.
"""

from __future__ import annotations

import argparse
import random
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from unfog.data.emoji import SIZE, _overlap, render, sample_scene, sprite_box, sprites  # noqa: E402
from unfog.eval.emoji import CLASSIFIER_PATH, CROP_SIZE, crop, segment  # noqa: E402
from unfog.eval.emoji_validation import degrade  # noqa: E402

WIDTHS = (32, 64, 128, 256)
DEGRADE = {"clean": None, "validate": dict(blur=0.6, noise=4.0), "train": dict(blur=1.0, noise=8.0, jitter=0.3, jpeg=0.3)}


def _rescale(scene, rng: random.Random) -> None:
    """Give each sprite a longer side of 14–34 px about the same centre (kept in the canvas;
    two sprites that would overlap keep their sizes)."""
    old = [(o.side, o.cx, o.cy) for o in scene.objects]
    for o in scene.objects:
        o.side = float(rng.randint(14, 34))
        o.cx = min(max(o.cx, o.side / 2), SIZE - o.side / 2)
        o.cy = min(max(o.cy, o.side / 2), SIZE - o.side / 2)
    if len(scene.objects) == 2 and _overlap(*scene.objects):
        for o, (side, cx, cy) in zip(scene.objects, old):
            o.side, o.cx, o.cy = side, cx, cy


def _area(a, b) -> int:
    return max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))


def make_crops(job: tuple[str, str, int, int, float]) -> tuple[np.ndarray, np.ndarray]:
    """Crops (N, 32, 32, 3) uint8 and labels (N,) of scenes lo..hi of a seed namespace."""
    namespace, mode, lo, hi, p_rescale = job
    index = {n: k for k, n in enumerate(sprites().names)}
    crops, labels = [], []
    for i in range(lo, hi):
        rng = random.Random(f"{namespace}/{i}")
        scene = sample_scene(rng)
        if rng.random() < p_rescale:
            _rescale(scene, rng)
        image = render(scene)
        if DEGRADE[mode]:
            image = degrade(image, rng, **DEGRADE[mode])
        pixels = np.asarray(image)
        background, found = segment(pixels, parts=False)
        if not found:
            continue
        boxes = [sprite_box(o) for o in scene.objects]
        everything = np.logical_or.reduce([f.mask for f in found])
        for f in found:
            overlaps = [_area(f.box, b) for b in boxes]
            best = int(np.argmax(overlaps))
            fa = (f.box[2] - f.box[0]) * (f.box[3] - f.box[1])
            second = sorted(overlaps)[-2] if len(overlaps) > 1 else 0
            if overlaps[best] < 0.5 * fa or second > 0.1 * fa:
                continue  # a speck, or two sprites in one object
            crops.append(crop(pixels, background, f.box, everything & ~f.mask))
            labels.append(index[scene.objects[best].name])
    return np.stack(crops) if crops else np.zeros((0, CROP_SIZE, CROP_SIZE, 3), np.uint8), np.array(labels, np.int64)


def dataset(namespace: str, mode: str, count: int, p_rescale: float, workers: int, chunk: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    jobs = [(namespace, mode, lo, min(lo + chunk, count), p_rescale) for lo in range(0, count, chunk)]
    with ProcessPoolExecutor(workers) as ex:
        parts = list(ex.map(make_crops, jobs))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def accuracy(net, x: np.ndarray, y: np.ndarray) -> float:
    import torch

    net.eval()
    correct = 0
    with torch.inference_mode():
        for k in range(0, len(x), 1024):
            xb = torch.from_numpy(x[k : k + 1024]).permute(0, 3, 1, 2).float() / 127.5 - 1
            correct += int((net(xb).argmax(-1).numpy() == y[k : k + 1024]).sum())
    return correct / len(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenes", type=int, default=60_000, help="training scenes (about 1.4 crops each)")
    ap.add_argument("--held-out", type=int, default=4000, help="held-out scenes per kind (clean, validate-degraded, train-degraded)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--workers", type=int, default=2, help="processes rendering the crops")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for training")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(CLASSIFIER_PATH))
    args = ap.parse_args()

    t0 = time.perf_counter()
    names = sprites().names
    x, y = dataset(f"emoji-classifier/train/{args.seed}", "train", args.scenes, 0.5, args.workers)
    held = {mode: dataset(f"emoji-classifier/held-out/{args.seed}/{mode}", mode, args.held_out, 0.0, args.workers) for mode in DEGRADE}
    held["train-rescaled"] = dataset(f"emoji-classifier/held-out/{args.seed}/rescaled", "train", args.held_out, 1.0, args.workers)
    t_data = time.perf_counter() - t0
    print(f"data: {len(x)} training crops, held-out {', '.join(f'{k} {len(v[0])}' for k, v in held.items())}; {t_data:.0f} s", flush=True)
    missing = sorted(set(range(len(names))) - set(y.tolist()))
    if missing:
        print(f"warning: no training crops of {[names[k] for k in missing]}", flush=True)

    import torch

    from unfog.eval.emoji import build_classifier, save_classifier

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    net = build_classifier(WIDTHS, len(names))
    print(f"classifier: {sum(p.numel() for p in net.parameters())} parameters", flush=True)
    steps_per_epoch = len(x) // args.batch
    total = steps_per_epoch * args.epochs
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total, pct_start=0.15)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()  # uint8; scaled per batch
    yt = torch.from_numpy(y)
    gen = torch.Generator().manual_seed(args.seed)
    t1 = time.perf_counter()
    for epoch in range(args.epochs):
        net.train()
        order = torch.randperm(len(x), generator=gen)
        running = 0.0
        for s in range(steps_per_epoch):
            idx = order[s * args.batch : (s + 1) * args.batch]
            xb = xt[idx].float() / 127.5 - 1
            loss = torch.nn.functional.cross_entropy(net(xb), yt[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += float(loss.detach())
        accs = {k: accuracy(net, *v) for k, v in held.items()}
        print(f"epoch {epoch + 1}/{args.epochs}: loss {running / steps_per_epoch:.3f}; held-out accuracy "
              + ", ".join(f"{k} {100 * a:.2f}%" for k, a in accs.items()) + f"; {time.perf_counter() - t1:.0f} s", flush=True)
    save_classifier(net, names, WIDTHS, args.out)
    size = Path(args.out).stat().st_size
    cpu = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN) for f in ("ru_utime", "ru_stime"))
    print(f"wrote {args.out} ({size / 1e6:.2f} MB); data {t_data:.0f} s, training {time.perf_counter() - t1:.0f} s, "
          f"total {time.perf_counter() - t0:.0f} s wall, {cpu:.0f} CPU-seconds", flush=True)


if __name__ == "__main__":
    main()
