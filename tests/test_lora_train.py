"""LoRA training on a model unfog loads (here a tiny SD 1.x diffusers folder): only adapters
train and are checkpointed, a resumed run equals an uninterrupted one, the exported kohya file
gives the same images in unfog and in diffusers, aspect-ratio buckets, gradient checkpointing."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from unfog import Pipeline
from unfog.cli import main

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    pytest.importorskip("diffusers")
    from test_sd_parity import build_sd

    root = tmp_path_factory.mktemp("lora-train")
    ref = build_sd(root, v2=False, scheduler_cls="EulerDiscreteScheduler")
    return ref, root / "sd"


def picture_folder(path, sizes=((16, 16),), n=6):
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for k in range(n):
        w, h = sizes[k % len(sizes)]
        img = np.zeros((h, w, 3), dtype=np.uint8)
        img[..., k % 3] = 200
        img[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = rng.integers(0, 255, 3)
        Image.fromarray(img).save(path / f"{k}.png")
        rows.append({"file_name": f"{k}.png", "text": f"a photo of a {'cat' if k % 2 else 'dog'}"})
    (path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def train(folder, data, out, steps, *extra):
    return main(["train", "--data", str(data), "--init", str(folder), "--lora-rank", "4", "--out", str(out), "--max-steps", str(steps),
                 "--batch-size", "2", "--lr", "5e-3", "--checkpoint-every", "2", "--seed", "3", "-q", *extra])


def adapters(run):
    from safetensors.torch import load_file

    ckpt = sorted((run / "checkpoints").iterdir())[-1]
    return load_file(str(ckpt / "model.safetensors"))


def test_train_resume_and_export_a_lora(sd1, tmp_path, capsys):
    ref, folder = sd1
    data = picture_folder(tmp_path / "data")
    assert train(folder, data, tmp_path / "a", 4) == 0
    state = adapters(tmp_path / "a")
    assert state and all(k.startswith("unet/") and k.endswith((".down", ".up")) for k in state)  # adapters only, no base weights
    assert any(k.endswith(".up") and v.abs().max() > 0 for k, v in state.items())  # up started at zero and moved
    assert not (tmp_path / "a" / "unet").exists()
    # two steps, then two more after a resume: the same adapters as four in one go
    assert train(folder, data, tmp_path / "b", 2) == 0
    # another --init on resume is refused, and leaves the run's config as it was (it had been rewritten, so the run could no longer resume)
    import shutil

    shutil.copytree(folder, tmp_path / "other")
    config = (tmp_path / "b" / "config.json").read_text()
    assert train(tmp_path / "other", data, tmp_path / "b", 4, "--resume") == 2
    assert (tmp_path / "b" / "config.json").read_text() == config
    assert train(folder, data, tmp_path / "b", 4, "--resume") == 0
    resumed = adapters(tmp_path / "b")
    assert all(torch.equal(resumed[k], state[k]) for k in state)
    # export: unfog and diffusers give the same images with it
    lora = tmp_path / "mine.safetensors"
    assert main(["export", "--lora", str(tmp_path / "a"), str(lora)]) == 0
    ours = Pipeline.from_pretrained(folder)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    kw = dict(num_inference_steps=6, guidance_scale=5.0)
    base = np.asarray(ours("a photo of a cat", latents=latents, sampler="euler", sigma_schedule="leading", **kw).images[0], dtype=np.float32) / 255
    ours.load_lora_weights(lora)
    got = np.asarray(ours("a photo of a cat", latents=latents, sampler="euler", sigma_schedule="leading", **kw).images[0], dtype=np.float32) / 255
    assert np.abs(got - base).max() > 0.02
    ref.load_lora_weights(str(lora), adapter_name="mine")
    try:
        expected = ref("a photo of a cat", latents=latents.clone(), output_type="np", **kw).images[0]
    finally:
        ref.unload_lora_weights()
    assert np.abs(got - expected).max() <= 1e-3 + 0.5 / 255
    assert main(["export", "--lora", str(tmp_path / "a"), str(tmp_path / "x.bin")]) == 2
    capsys.readouterr()
    assert main(["export", str(tmp_path / "a"), str(tmp_path / "model")]) == 2  # a LoRA run without --lora: said so (it had been "tokenizer ... is missing")
    assert "export them with unfog export --lora" in capsys.readouterr().err


def test_text_encoder_adapters_buckets_and_gradient_checkpointing(sd1, tmp_path):
    _, folder = sd1
    data = picture_folder(tmp_path / "data", sizes=((32, 16), (16, 32), (16, 16)))
    assert train(folder, data, tmp_path / "run", 3, "--lora-text-encoder", "--buckets", "--gradient-checkpointing", "--resolution", "32") == 0
    state = adapters(tmp_path / "run")
    assert any(k.startswith("text_encoder/") for k in state)
    from unfog.data.folder import ImageCaptionFolder

    folder_data = ImageCaptionFolder(data, 32, buckets=4)  # the tiny model's pixel factor: 4
    assert len(folder_data.by_size) == 3  # wide, tall and square images each in their own bucket
    with pytest.raises(Exception, match="one aspect-ratio bucket"):
        folder_data.images([0, 1])


def test_gradient_checkpointing_gives_the_same_gradients(tiny_pipe):
    import copy

    unet = copy.deepcopy(tiny_pipe.unet).train()
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 5, 32)
    grads = []
    for flag in (False, True):
        unet.zero_grad()
        unet.gradient_checkpointing = flag
        unet(x, t, ctx).square().mean().backward()
        grads.append([p.grad.clone() for p in unet.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_lora_training_refuses_what_it_cannot_do(sd1, tmp_path, capsys):
    _, folder = sd1
    data = picture_folder(tmp_path / "data")
    assert main(["train", "--data", str(data), "--lora-rank", "4", "--out", str(tmp_path / "r")]) == 2
    assert "--init MODEL" in capsys.readouterr().err
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "r")]) == 2
    assert main(["train", "--data", str(data), "--init", str(folder), "--lora-rank", "0", "--preset", "lora", "--out", str(tmp_path / "r2")]) == 2


def test_sdxl_base_lora_trains_and_exports_with_kohya_sdxl_names(tmp_path_factory, tmp_path):
    pytest.importorskip("diffusers")
    from safetensors.torch import load_file
    from test_sdxl_parity import build_sdxl

    root = tmp_path_factory.mktemp("lora-train-sdxl")
    ref, _ = build_sdxl(root)
    data = picture_folder(tmp_path / "data")
    common = ["--init", str(root / "base"), "--lora-rank", "4", "--max-steps", "2", "--batch-size", "2", "--lr", "5e-3", "--seed", "1", "-q"]
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "u"), *common]) == 0
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "te"), "--lora-text-encoder", *common]) == 0
    assert main(["export", "--lora", str(tmp_path / "u"), str(tmp_path / "u.safetensors")]) == 0
    assert main(["export", "--lora", str(tmp_path / "te"), str(tmp_path / "te.safetensors")]) == 0
    keys = load_file(str(tmp_path / "te.safetensors")).keys()
    assert any(k.startswith("lora_unet_input_blocks_") for k in keys)  # the original layout's names, as kohya's SDXL LoRAs have
    assert any(k.startswith("lora_te1_") for k in keys) and any(k.startswith("lora_te2_") for k in keys)
    ours = Pipeline.from_pretrained(root / "base")
    ours.load_lora_weights(tmp_path / "te.safetensors")  # every key finds its layer
    ours.unload_lora_weights()
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    kw = dict(num_inference_steps=6, guidance_scale=5.0, negative_prompt="blurry")
    ours.load_lora_weights(tmp_path / "u.safetensors")
    got = np.asarray(ours("a photo of a cat", latents=latents, sampler="euler", **kw).images[0], dtype=np.float32) / 255
    ref.load_lora_weights(str(tmp_path / "u.safetensors"), adapter_name="u")
    try:
        expected = ref("a photo of a cat", latents=latents.clone(), output_type="np", **kw).images[0]
    finally:
        ref.unload_lora_weights()
    assert np.abs(got - expected).max() <= 1e-3 + 0.5 / 255
