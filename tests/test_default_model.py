"""The bundled default model: present, small, fast to load, and following its prompts."""

from pathlib import Path

import numpy as np
from PIL import Image

from unfog import Pipeline
from unfog.cli import main
from unfog.data.shapes import random_prompt, caption
from unfog.eval.shapes import check
from unfog.pipeline import DEFAULT_MODEL_DIR


def test_bundled_model_is_small():
    size = sum(p.stat().st_size for p in DEFAULT_MODEL_DIR.rglob("*") if p.is_file())
    assert size <= 30 * 2**20


def test_default_model_follows_simple_prompts():
    import random

    pipe = Pipeline.from_pretrained()
    rng = random.Random(123)
    prompts = [random_prompt(rng, objects=1) for _ in range(12)]
    images = pipe([caption(p) for p in prompts], seed=0).images
    followed = sum(all(check(im, p).values()) for im, p in zip(images, prompts))
    assert followed >= 9, followed


def test_cli_generates_with_the_bundled_model(tmp_path):
    out = tmp_path / "out.png"
    assert main(["generate", "a red circle on the left", "-o", str(out), "--seed", "1", "-q"]) == 0
    with Image.open(out) as im:
        pixels = np.asarray(im.convert("RGB")).astype(int)
    red = (np.abs(pixels - [220, 30, 30]).sum(-1) < 90)
    ys, xs = np.nonzero(red)
    assert red.sum() > 50 and xs.mean() < 26


def test_loading_does_not_import_the_compiler():
    """Building networks on the meta device must not pull in torch._dynamo (1.6 s of start-up)."""
    import subprocess
    import sys

    code = "import sys; from unfog import Pipeline; Pipeline.from_pretrained(); print('torch._dynamo' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_bundled_emoji_model_loads_by_name_and_draws_what_it_can(tmp_path):
    from unfog.pipeline import BUNDLED_MODELS

    folder = BUNDLED_MODELS["emoji"]
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) <= 30 * 2**20
    pipe = Pipeline.from_pretrained("emoji")
    assert pipe.defaults.height == pipe.defaults.width == 64
    # an object word the model never saw is not an error: it draws what it can
    images = pipe(["a fox left of a red apple", "a unicorn left of a fox"], seed=0, num_inference_steps=4).images
    assert [im.size for im in images] == [(64, 64), (64, 64)]
    assert main(["generate", "a big red apple", "--model", "emoji", "-o", str(tmp_path / "a.png"), "--steps", "4", "-q"]) == 0
    assert (tmp_path / "a.png").stat().st_size > 0
