"""Bad input gets one clear UnfogError, never a traceback from deep inside torch."""

import json
import math
import shutil

import torch

import pytest

from unfog import Pipeline, UnfogError


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"prompt": []}, "non-empty list"),
        ({"prompt": ["ok", 3]}, "non-empty list of strings"),
        ({"num_inference_steps": 0}, "positive integer"),
        ({"num_inference_steps": -3}, "positive integer"),
        ({"num_inference_steps": 2.5}, "positive integer"),
        ({"guidance_scale": math.nan}, "finite"),
        ({"guidance_scale": math.inf}, "finite"),
        ({"height": 31}, "multiple of 2"),
        ({"width": 0}, "multiple of 2"),
        ({"sampler": "plms"}, "dpmpp_2m_sde"),
        ({"num_images_per_prompt": 0}, "positive integer"),
        ({"seed": "abc"}, "seed must be"),
        ({"seed": [1, 2]}, "2 seeds for 1 images"),
        ({"negative_prompt": ["a", "b"]}, "one per prompt"),
        ({"sampler": "euler", "sampler_options": {"eta": 1.0}}, "does not take"),
        # Found by a review: each of these ran, then crashed deep inside a sampler or ran for hours.
        ({"sampler": "dpmpp_3m_sde", "sampler_options": {"eta": -1.0}}, r"eta'\] must be from 0 to 10"),
        ({"sampler": "dpmpp_sde", "sampler_options": {"r": 0.0}}, r"'r'\] must be from"),
        ({"sampler": "dpmpp_sde", "sampler_options": {"r": -1.0}}, r"'r'\] must be from"),
        ({"sampler": "ddim", "sampler_options": {"eta": 1e308}}, "must be from 0 to 10"),
        ({"sampler": "euler", "sampler_options": {"s_churn": -5.0}}, "must be from 0"),
        ({"sampler": "euler_ancestral", "sampler_options": {"s_noise": 1e30}}, "must be from 0 to 10"),
        ({"sampler": "lms", "sampler_options": {"order": 50}}, "integer from 1 to 4"),
        ({"sampler": "uni_pc", "sampler_options": {"order": 4}}, "uni_pc must be an integer from 1 to 3"),
        ({"round_timesteps": "yes"}, "round_timesteps must be True or False"),
        ({"match_diffusers": 1}, "match_diffusers must be True or False or None"),
        ({"width": 100000, "height": 64}, "width is 100000; at most 8192 per side"),
        ({"num_inference_steps": 10**9, "sigma_schedule": "karras"}, "at most 1000"),
        ({"latents": torch.full((1, 4, 8, 8), float("nan"))}, "latents holds NaN"),
        ({"image": torch.full((1, 4, 8, 8), float("inf"))}, "image holds NaN or infinite"),
        ({"negative_prompt": 0}, "negative_prompt must be a string"),
        ({"strength": 0.5}, "strength applies to img2img"),
        ({"image": __import__("PIL.Image", fromlist=["Image"]).new("RGB", (0, 0))}, "image is empty"),
    ],
)
def test_bad_call_arguments(tiny_pipe, kwargs, match):
    kwargs = {"prompt": "a red circle", **kwargs}
    with pytest.raises(UnfogError, match=match):
        tiny_pipe(kwargs.pop("prompt"), **kwargs)


def copy_model(src, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def test_missing_weight_file(tiny_model_dir, tmp_path):
    d = copy_model(tiny_model_dir, tmp_path)
    (d / "unet" / "model.safetensors").unlink()
    with pytest.raises(UnfogError, match="unet/model.safetensors is missing"):
        Pipeline.from_pretrained(d)


def test_mismatched_weight_file(tiny_model_dir, tmp_path):
    d = copy_model(tiny_model_dir, tmp_path)
    cfg = json.loads((d / "unet" / "config.json").read_text())
    cfg["block_channels"] = [32, 48]
    (d / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnfogError, match=r"weight '.*' has shape .* but the config needs"):
        Pipeline.from_pretrained(d)


def test_weights_from_another_component(tiny_model_dir, tmp_path):
    d = copy_model(tiny_model_dir, tmp_path)
    shutil.copy(d / "vae" / "model.safetensors", d / "unet" / "model.safetensors")
    with pytest.raises(UnfogError, match="missing keys"):
        Pipeline.from_pretrained(d)


def test_corrupted_weight_file(tiny_model_dir, tmp_path):
    d = copy_model(tiny_model_dir, tmp_path)
    path = d / "text_encoder" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(UnfogError, match="not a readable safetensors file"):
        Pipeline.from_pretrained(d)


def test_bad_config(tiny_model_dir, tmp_path):
    d = copy_model(tiny_model_dir, tmp_path)
    (d / "unet" / "config.json").write_text('{"wings": 2}')
    with pytest.raises(UnfogError, match="unknown fields"):
        Pipeline.from_pretrained(d)
    (d / "unet" / "config.json").write_text("{not json")
    with pytest.raises(UnfogError, match="not valid JSON"):
        Pipeline.from_pretrained(d)


def test_not_a_model_folder(tmp_path):
    with pytest.raises(UnfogError, match="does not exist"):
        Pipeline.from_pretrained(tmp_path / "nope")
    with pytest.raises(UnfogError, match="neither an unfog model folder nor a diffusers"):
        Pipeline.from_pretrained(tmp_path)


def test_save_refuses_to_overwrite_a_foreign_folder(tiny_pipe, tmp_path):
    (tmp_path / "notes.txt").write_text("precious")
    with pytest.raises(UnfogError, match="not an unfog model folder"):
        tiny_pipe.save_pretrained(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "precious"


def test_save_over_an_existing_model_replaces_it(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "m")
    tiny_pipe.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    Pipeline.from_pretrained(tmp_path / "m")


def test_default_model_missing_is_explained(tmp_path, monkeypatch):
    import unfog.pipeline

    monkeypatch.setattr(unfog.pipeline, "DEFAULT_MODEL_DIR", tmp_path / "absent")
    with pytest.raises(UnfogError, match="no bundled default model"):
        Pipeline.from_pretrained()


def test_save_never_replaces_a_diffusers_folder(tiny_pipe, tmp_path):
    d = tmp_path / "sd"
    d.mkdir()
    (d / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    with pytest.raises(UnfogError, match="not an unfog model folder"):
        tiny_pipe.save_pretrained(d)
    assert (d / "model_index.json").is_file()


def test_non_finite_weights_in_an_unfog_folder_are_refused(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    d = copy_model(tiny_model_dir, tmp_path)
    path = d / "unet" / "model.safetensors"
    state = load_file(str(path))
    key = sorted(state)[3]
    state[key][0] = float("inf")
    save_file(state, str(path))
    with pytest.raises(UnfogError, match=f"{key}.*NaN or infinite"):
        Pipeline.from_pretrained(d)


def test_float8_weights_load_and_their_nans_are_refused(tiny_model_dir, tmp_path):
    """fp8 checkpoints (common for SDXL) are read and cast; torch's isfinite has no float8 kernel,
    which had made loading one a raw NotImplementedError."""
    from safetensors.torch import load_file, save_file

    d = copy_model(tiny_model_dir, tmp_path)
    path = d / "unet" / "model.safetensors"
    state = {k: v.to(torch.float8_e4m3fn) if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
    save_file(state, str(path))
    pipe = Pipeline.from_pretrained(d)
    key = sorted(state)[3]
    assert pipe.unet.state_dict()[key].dtype == torch.float32
    assert torch.equal(pipe.unet.state_dict()[key], state[key].float())
    state[key][0] = float("nan")
    save_file(state, str(path))
    with pytest.raises(UnfogError, match=f"{key}.*NaN or infinite"):
        Pipeline.from_pretrained(d)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int8, "bfloat16"])
def test_a_dtype_networks_cannot_run_in_is_refused_up_front(tiny_model_dir, tiny_pipe, dtype):
    with pytest.raises(UnfogError, match="dtype must be one of"):
        Pipeline.from_pretrained(tiny_model_dir, dtype=dtype)
    before = tiny_pipe.dtype
    with pytest.raises(UnfogError, match="dtype must be one of"):
        tiny_pipe.to(dtype=dtype)
    with pytest.raises(UnfogError, match="dtype must be one of"):
        tiny_pipe.optimize(dtype)
    assert tiny_pipe.dtype == before and all(p.dtype == before for p in tiny_pipe.text_encoder.parameters())


def test_a_tokenizer_with_ids_past_the_text_encoders_table_is_refused_at_load(tiny_model_dir, tmp_path):
    """It had loaded, then failed at the first prompt using the word with a raw IndexError."""
    d = copy_model(tiny_model_dir, tmp_path)
    path = d / "tokenizer" / "tokenizer.json"
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    vocab["zebra"] = max(vocab.values()) + 1
    path.write_text(json.dumps(data))
    with pytest.raises(UnfogError, match="tokenizer has token ids up to .* text encoder embeds only"):
        Pipeline.from_pretrained(d)


def test_saving_to_the_current_folder_is_refused_and_keeps_the_users_files(tiny_pipe, tmp_path, monkeypatch):
    """save_pretrained(".") inside a model folder had moved the user's files into a hidden folder
    and failed ("." has no name); replacing the folder one is in would leave one in a deleted
    folder, so it is refused. A folder of the user's named like the swap's old one was deleted."""
    d = tmp_path / "m"
    tiny_pipe.save_pretrained(d)
    (d / "NOTES.md").write_text("notes")
    (tmp_path / ".m.old").mkdir()
    (tmp_path / ".m.old" / "mine.txt").write_text("mine")
    monkeypatch.chdir(d)
    for where in (".", "..", str(d)):
        with pytest.raises(UnfogError, match="is the folder you are in"):
            tiny_pipe.save_pretrained(where)
    assert sorted(p.name for p in d.iterdir()) == ["NOTES.md", "model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae"]
    monkeypatch.chdir(tmp_path)
    tiny_pipe.save_pretrained("m")
    assert (d / "NOTES.md").read_text() == "notes" and (tmp_path / ".m.old" / "mine.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m.old", "m"]  # no temporary folder left behind
    assert Pipeline.from_pretrained("m").unet.config == tiny_pipe.unet.config


def test_weights_of_the_wrong_kind_are_refused(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    d = copy_model(tiny_model_dir, tmp_path)
    path = d / "unet" / "model.safetensors"
    state = load_file(str(path))
    key = sorted(state)[0]
    state[key] = state[key].to(torch.int32)
    save_file(state, str(path))
    with pytest.raises(UnfogError, match=f"{key}.*int32"):
        Pipeline.from_pretrained(d)


@pytest.mark.parametrize("defaults, match", [([1], "must be a JSON object"), ({"steps": 3}, "unknown fields"),
                                             ({"num_inference_steps": "30"}, "positive integer"), ({"guidance_scale": None}, "finite number")])
def test_bad_sampling_defaults_name_the_file(tiny_model_dir, tmp_path, defaults, match):
    d = copy_model(tiny_model_dir, tmp_path)
    index = json.loads((d / "model_index.json").read_text())
    index["defaults"] = defaults
    (d / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UnfogError, match=f"model_index.json.*{match}"):
        Pipeline.from_pretrained(d)


def test_a_non_finite_result_is_an_error_not_a_black_image(tiny_pipe):
    with pytest.raises(UnfogError, match="NaN or infinite latents.*guidance_scale 1e\\+30"):
        tiny_pipe("a red circle", guidance_scale=1e30, num_inference_steps=3, seed=0)


@pytest.mark.parametrize("component, field, value, match", [
    ("vae", "scaling_factor", 0, "scaling_factor"), ("vae", "scaling_factor", None, "scaling_factor"),
    ("vae", "block_channels", [16, 10**9], "block_channels"), ("scheduler", "beta_end", 1.5, "beta_end"),
    ("scheduler", "num_train_timesteps", 10**9, "num_train_timesteps"), ("scheduler", "steps_offset", -1, "steps_offset"),
])
def test_out_of_range_config_values_name_the_file_and_field(tiny_model_dir, tmp_path, component, field, value, match):
    d = copy_model(tiny_model_dir, tmp_path)
    path = d / component / "config.json"
    cfg = json.loads(path.read_text())
    cfg[field] = value
    path.write_text(json.dumps(cfg))
    with pytest.raises(UnfogError, match=f"{component}/config.json.*{match}"):
        Pipeline.from_pretrained(d)


@pytest.mark.parametrize("component, field, value", [
    ("unet", "num_heads", 0), ("unet", "norm_groups", 0), ("unet", "layers_per_block", 10**6), ("unet", "block_channels", "wide"),
    ("unet", "context_dim", None), ("text_encoder", "context_length", -1), ("text_encoder", "layers", 10**6),
    ("tokenizer", "context_length", 10**9),
])
def test_absurd_architecture_values_are_refused_before_building(tiny_model_dir, tmp_path, component, field, value):
    import time

    d = copy_model(tiny_model_dir, tmp_path)
    path = d / component / "config.json"
    cfg = json.loads(path.read_text())
    cfg[field] = value
    path.write_text(json.dumps(cfg))
    start = time.perf_counter()
    with pytest.raises(UnfogError, match=field):
        Pipeline.from_pretrained(d)
    assert time.perf_counter() - start < 5


def test_a_huge_config_file_is_not_read(tiny_model_dir, tmp_path):
    d = copy_model(tiny_model_dir, tmp_path)
    (d / "unet" / "config.json").write_text('{"in_channels": 4' + " " * (2 << 20) + "}")
    with pytest.raises(UnfogError, match="a config is at most"):
        Pipeline.from_pretrained(d)


def test_requests_too_big_to_allocate_are_refused_up_front(tiny_pipe):
    import time

    start = time.perf_counter()
    with pytest.raises(UnfogError, match="at most 64 per request"):
        tiny_pipe("a red circle", num_images_per_prompt=100_000)
    with pytest.raises(UnfogError, match="raise Pipeline.max_pixels"):
        tiny_pipe("a red circle", width=100_000, height=100_000)
    assert time.perf_counter() - start < 1
    tiny_pipe.max_images = 2
    try:
        with pytest.raises(UnfogError, match="at most 2 per request"):
            tiny_pipe(["a", "b"], num_images_per_prompt=2)
    finally:
        tiny_pipe.max_images = 64


@pytest.mark.parametrize("index, match", [([1, 2], "model_index.json must hold a JSON object"), (5, "model_index.json must hold a JSON object"),
                                          ("[" * 200_000, "model_index.json is not valid JSON"),  # nested past the parser's recursion limit
                                          ({"format": "unfog", "format_version": 1, "components": []}, "components must be"),
                                          ({"format": "unfog", "format_version": 1, "components": {"vae": 1}}, "components must be")])
def test_malformed_model_index_is_named(tiny_model_dir, tmp_path, index, match):
    d = copy_model(tiny_model_dir, tmp_path)
    (d / "model_index.json").write_text(index if isinstance(index, str) else json.dumps(index))
    with pytest.raises(UnfogError, match=match):
        Pipeline.from_pretrained(d)


def test_a_config_describing_billions_of_parameters_is_refused_before_loading(tiny_model_dir, tmp_path):
    d = copy_model(tiny_model_dir, tmp_path)
    path = d / "unet" / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(block_channels=[8192] * 4, layers_per_block=16, transformer_depth=8, attention_levels=[True] * 4, context_dim=8192)
    path.write_text(json.dumps(cfg))
    with pytest.raises(UnfogError, match="billion parameters"):
        Pipeline.from_pretrained(d)


def test_a_nan_scaling_factor_is_refused(tiny_model_dir, tmp_path):
    d = copy_model(tiny_model_dir, tmp_path)
    path = d / "vae" / "config.json"
    path.write_text(path.read_text().replace('"scaling_factor": 0.5', '"scaling_factor": NaN'))
    with pytest.raises(UnfogError, match="scaling_factor"):
        Pipeline.from_pretrained(d)


def test_a_failed_image_write_leaves_neither_a_truncated_file_nor_a_damaged_old_one(tmp_path, monkeypatch):
    """A full disk cut the PNG short at the target and destroyed the image it replaced; the write
    now goes to a sibling that is renamed over the target only once complete."""
    from PIL import Image

    from unfog.images import save

    target = tmp_path / "out.png"
    save(Image.new("RGB", (8, 8), "red"), target, {"prompt": "old"})
    before = target.read_bytes()
    real_save = Image.Image.save

    def full_disk(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save(Image.new("RGB", (8, 8), "blue"), target, {"prompt": "new"})
    assert target.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]
    monkeypatch.setattr(Image.Image, "save", real_save)
    save(Image.new("RGB", (8, 8), "blue"), target, {"prompt": "new"})
    with Image.open(target) as im:
        assert im.getpixel((0, 0)) == (0, 0, 255) and im.text["prompt"] == "new"
    assert oct(target.stat().st_mode & 0o777) != oct(0o600)  # the usual mode, not a temporary file's
    save(Image.new("RGB", (8, 8)), tmp_path / "a.jpg")  # the format still follows the extension
    with Image.open(tmp_path / "a.jpg") as im:
        assert im.format == "JPEG"


def test_decode_tile_takes_none_or_a_real_tile_size(tiny_pipe):
    for bad in (0, -4, 1, 2.5, "16", True):
        with pytest.raises(UnfogError, match="decode_tile must be None"):
            tiny_pipe.decode_tile = bad
    tiny_pipe.decode_tile = 16
    tiny_pipe.decode_tile = None
    assert tiny_pipe.decode_tile is None


def test_a_prompt_is_bounded_in_windows(tiny_pipe):
    """6,000 BREAKs (a 48 KB prompt) took gigabytes for one 64² image; a 200,000-word prompt ran out
    of memory inside torch."""
    with pytest.raises(UnfogError, match="has 6000 BREAKs; at most 63") as e:
        tiny_pipe.request("a", negative_prompt="a BREAK " * 6000, prompt_syntax="a1111")
    assert e.value.field == "negative_prompt"
    with pytest.raises(UnfogError, match="windows of 75 tokens.*at most 64"):
        tiny_pipe("word " * 20000, num_inference_steps=1)
    assert tiny_pipe("a BREAK " * 10, prompt_syntax="a1111", num_inference_steps=1).images


def test_model_defaults_that_no_request_could_use_are_said_at_load(tiny_model_dir, tmp_path):
    """A model whose own defaults fail every call that leaves them out is still usable when the
    caller passes them; it is said once, at load, not as if the caller had passed a bad value."""
    for key, value, match in (("height", 63, "default height 63 \\(must be a multiple of"), ("num_inference_steps", 5000, "default num_inference_steps 5000")):
        d = copy_model(tiny_model_dir, tmp_path / key)
        index = json.loads((d / "model_index.json").read_text())
        index["defaults"][key] = value
        (d / "model_index.json").write_text(json.dumps(index))
        with pytest.warns(UserWarning, match=match):
            pipe = Pipeline.from_pretrained(d)
        assert pipe("a", height=32, width=32, num_inference_steps=2).images


def test_sdxl_second_prompts_are_checked_like_the_first(tiny_pipe, monkeypatch):
    """prompt_2 and negative_prompt_2 reached the text encoders unchecked: the server accepted the
    job and it failed later (a 500 behind the Ray ingress)."""
    monkeypatch.setattr(tiny_pipe, "sdxl", "base")  # the checks come before anything SDXL-specific is built
    with pytest.raises(UnfogError, match="has 70 BREAKs") as e:
        tiny_pipe.request("a", prompt_2="x BREAK " * 70, prompt_syntax="a1111")
    assert e.value.field == "prompt_2"
    with pytest.raises(UnfogError, match="emphasis weight") as e:
        tiny_pipe.request("a", negative_prompt_2=["(((red:900)))"], prompt_syntax="a1111")
    assert e.value.field == "negative_prompt_2"


def test_saving_an_image_keeps_a_links_target_an_old_files_mode_and_fits_long_names(tmp_path):
    import os

    from PIL import Image

    from unfog.images import save

    real = tmp_path / "real.png"
    save(Image.new("RGB", (4, 4)), real)
    os.chmod(real, 0o640)
    (tmp_path / "link.png").symlink_to(real)
    save(Image.new("RGB", (4, 4), "red"), tmp_path / "link.png")
    assert (tmp_path / "link.png").is_symlink() and Image.open(real).getpixel((0, 0)) == (255, 0, 0)
    assert real.stat().st_mode & 0o777 == 0o640
    long = tmp_path / ("x" * 246 + ".png")  # 250 bytes: a legal name, with no room for a long temporary one
    save(Image.new("RGB", (4, 4)), long)
    assert long.exists() and sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".part")) == []


def test_encode_takes_one_generator_per_image(tiny_pipe):
    # One generator for two images had been broadcast: both got the same posterior noise.
    pixels = torch.zeros(2, 3, 32, 32)
    with pytest.raises(UnfogError, match="got 1 generators for a batch of 2"):
        tiny_pipe.encode(pixels, [torch.Generator().manual_seed(0)])
    a = tiny_pipe.encode(pixels, [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)])
    b = tiny_pipe.encode(pixels[:1], [torch.Generator().manual_seed(1)])
    torch.testing.assert_close(a[1:], b)  # image k's noise comes from generator k alone


def test_a_pickle_with_objects_is_refused_in_one_line(tmp_path):
    import pickle

    from unfog.formats.single_file import read_pickle_checkpoint

    path = tmp_path / "model.ckpt"
    path.write_bytes(pickle.dumps({"state_dict": {"w": torch.zeros(1)}, "callback": math.sqrt}))
    with pytest.raises(UnfogError) as e:
        read_pickle_checkpoint(path)
    # torch's own message is a paragraph that ends by suggesting weights_only=False
    assert "objects other than tensors" in str(e.value) and "\n" not in str(e.value) and "weights_only" not in str(e.value)


def test_device_dtype_and_flag_arguments_are_checked(tiny_pipe):
    # Each had been a raw TypeError/RuntimeError/AssertionError, or (a string flag) silently truthy.
    for call, match in ((lambda: tiny_pipe.to("gpu"), "device 'gpu' is not a device name"),
                        (lambda: tiny_pipe.enable_low_memory(device="gpu"), "device 'gpu' is not a device name"),
                        (lambda: tiny_pipe.enable_model_cpu_offload(gpu_id="x"), "gpu_id must be"),
                        (lambda: tiny_pipe.optimize(compile="no"), "compile must be True or False"),
                        (lambda: tiny_pipe.optimize(channels_last=1), "channels_last must be True or False"),
                        (lambda: tiny_pipe.optimize(cuda_graphs="yes"), "cuda_graphs must be True or False or None")):
        with pytest.raises(UnfogError, match=match):
            call()
    if not torch.cuda.is_available():
        with pytest.raises(UnfogError, match="sees no CUDA GPU"):
            tiny_pipe.to("cuda")
    assert tiny_pipe.unet._compiled_call_impl is None  # nothing was changed by the refused calls
    pipe = Pipeline.from_pretrained()  # (not the shared tiny_pipe: a round trip through float16 rounds its weights)
    assert next(pipe.to(torch.float16).unet.parameters()).dtype == torch.float16  # diffusers' idiom: a dtype on its own
