"""The loss curve a training run leaves behind (PIL only); sample grids use unfog.images.grid."""

from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image, ImageDraw


def loss_curve(metrics_path: Path, out_path: Path, size: tuple[int, int] = (640, 360)) -> None:
    """Plot the logged loss against step (log scale), with its running mean."""
    points = []
    for line in Path(metrics_path).read_text().splitlines():
        try:  # a line torn by a kill mid-write is skipped, not fatal to every later run
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "step" in row and "loss" in row and row["loss"] is not None and math.isfinite(row["loss"]) and row["loss"] > 0:
            points.append((row["step"], math.log10(row["loss"])))
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)
    W, H, pad = size[0], size[1], 40
    d.rectangle((pad, 10, W - 10, H - pad), outline=(0, 0, 0))
    if len(points) < 2:
        d.text((pad + 10, 20), "not enough logged steps for a curve", fill=(0, 0, 0))
        im.save(out_path)
        return
    s0, s1 = points[0][0], points[-1][0]
    lo, hi = min(p[1] for p in points), max(p[1] for p in points)
    hi = hi if hi > lo else lo + 1

    def xy(step, v):
        return pad + (W - 10 - pad) * (step - s0) / max(s1 - s0, 1), H - pad - (H - pad - 10) * (v - lo) / (hi - lo)

    d.line([xy(*p) for p in points], fill=(170, 190, 230), width=1)
    k = max(1, len(points) // 30)
    smooth = [(points[i][0], sum(p[1] for p in points[max(0, i - k) : i + 1]) / len(points[max(0, i - k) : i + 1])) for i in range(len(points))]
    d.line([xy(*p) for p in smooth], fill=(20, 60, 200), width=2)
    d.text((pad, H - pad + 5), f"step {s0}", fill=(0, 0, 0))
    d.text((W - 120, H - pad + 5), f"step {s1}", fill=(0, 0, 0))
    d.text((2, 12), f"{10 ** hi:.3g}", fill=(0, 0, 0))
    d.text((2, H - pad - 12), f"{10 ** lo:.3g}", fill=(0, 0, 0))
    d.text((W // 2 - 40, 14), "training loss", fill=(0, 0, 0))
    im.save(out_path)
