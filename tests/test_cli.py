import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from unfog.cli import main
from unfog.errors import UnfogError


def run(*args):
    # Buffered streams, as for a user (PYTHONUNBUFFERED would hide output lost at exit).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    return subprocess.run([sys.executable, "-m", "unfog", *args], capture_output=True, text=True, timeout=300, env=env)


def test_generate_writes_a_png(tiny_model_dir, tmp_path):
    out = tmp_path / "out.png"
    r = run("generate", "a red circle on the left", "-o", str(out), "--model", str(tiny_model_dir), "--steps", "3", "--seed", "7", "--sampler", "euler", "--guidance", "3")
    assert r.returncode == 0, r.stderr
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (32, 32) and im.mode == "RGB"
    assert "seed=7" in r.stdout
    assert "denoising" in r.stderr  # the tqdm bar


def test_generate_several_images_and_trajectory(tiny_model_dir, tmp_path):
    out, traj = tmp_path / "img.png", tmp_path / "new" / "traj.png"  # the trajectory's folder is made, as the output's is
    code = main(["generate", "a blue square", "-o", str(out), "--model", str(tiny_model_dir), "--num-images", "2", "--steps", "5", "--trajectory", str(traj), "--trajectory-frames", "3", "--negative", "red", "-q"])
    assert code == 0
    assert (tmp_path / "img-0.png").is_file() and (tmp_path / "img-1.png").is_file()
    with Image.open(traj) as im:
        assert im.size == (3 * 32, 32)


def test_noise_strip(tmp_path):
    src = tmp_path / "in.png"
    Image.new("RGB", (20, 16), (200, 30, 30)).save(src)
    out = tmp_path / "strip.png"
    assert main(["noise", str(src), "-o", str(out), "--frames", "5"]) == 0
    with Image.open(out) as im:
        assert im.size == (5 * 20, 16)
        first, last = im.crop((0, 0, 20, 16)), im.crop((80, 0, 100, 16))
        assert first.getpixel((3, 3))[0] > 150  # t = 0 is the image itself
        assert abs(np.asarray(last.convert("L")).mean() - 128) < 40  # t = T is noise


def test_errors_exit_2_with_a_message(tiny_model_dir, tmp_path, capsys):
    assert main(["generate", "x", "--model", str(tmp_path / "missing"), "-o", str(tmp_path / "o.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    r = run("generate", "x", "--steps", "0", "--model", str(tiny_model_dir), "-o", str(tmp_path / "o.png"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "num_inference_steps must be a positive integer, got 0" in r.stderr
    assert not (tmp_path / "o.png").exists()


def test_generate_img2img_and_inpainting(tiny_model_dir, tmp_path):
    src, mask = tmp_path / "in.png", tmp_path / "mask.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(src)
    m = Image.new("L", (32, 32), 0)
    m.paste(255, (0, 0, 16, 32))
    m.save(mask)
    common = ["--model", str(tiny_model_dir), "--steps", "4", "--seed", "1", "-q"]
    assert main(["generate", "a blue square", "--init-image", str(src), "--strength", "0.5", "-o", str(tmp_path / "a.png"), *common]) == 0
    assert main(["generate", "a blue square", "--init-image", str(src), "--mask", str(mask), "-o", str(tmp_path / "b.png"), *common]) == 0
    for name in ("a.png", "b.png"):
        with Image.open(tmp_path / name) as im:
            assert im.size == (32, 32)
    exif = Image.Exif()
    exif[0x0112] = 6  # a phone photo stored 64×32, shown turned: 32 wide, 64 tall
    Image.new("RGB", (64, 32), (200, 30, 30)).save(tmp_path / "phone.jpg", exif=exif)
    assert main(["generate", "a blue square", "--init-image", str(tmp_path / "phone.jpg"), "--strength", "0.5", "-o", str(tmp_path / "c.png"), *common]) == 0
    with Image.open(tmp_path / "c.png") as im:
        assert im.size == (32, 64)
    assert main(["generate", "x", "--mask", str(mask), "-o", str(tmp_path / "c.png"), *common]) == 2
    assert main(["generate", "x", "--init-image", str(tmp_path / "nope.png"), "-o", str(tmp_path / "c.png"), *common]) == 2


def test_generate_with_the_fast_path(tiny_model_dir, tmp_path):
    out = tmp_path / "fast.png"
    assert main(["generate", "a red circle", "-o", str(out), "--model", str(tiny_model_dir), "--steps", "3", "--optimize", "-q"]) == 0
    with Image.open(out) as im:
        assert im.size == (32, 32)


def test_generate_with_every_sampler_option_kind(tiny_model_dir, tmp_path, capsys):
    common = ["--model", str(tiny_model_dir), "--steps", "3", "--seed", "1", "-q"]
    assert main(["generate", "a red circle", "-o", str(tmp_path / "a.png"), "--sampler", "dpmpp_2m_sde", "--schedule", "beta",
                 "--sampler-option", "eta=0.5", "--sampler-option", "solver_type=heun", *common]) == 0
    assert main(["generate", "a red circle", "-o", str(tmp_path / "b.png"), "--sampler", "lms", "--sampler-option", "order=3",
                 "--schedule", "simple", *common]) == 0
    assert main(["generate", "a red circle", "-o", str(tmp_path / "c.png"), "--sampler", "euler", "--sampler-option", "eta=0.5", *common]) == 2
    assert "does not take the options ['eta']" in capsys.readouterr().err
    assert main(["generate", "a red circle", "-o", str(tmp_path / "c.png"), "--sampler-option", "eta", *common]) == 2
    assert "NAME=VALUE" in capsys.readouterr().err
    assert not (tmp_path / "c.png").exists()


def test_bad_output_device_and_port_are_refused_before_any_work(tmp_path, capsys, monkeypatch):
    import unfog.pipeline

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(unfog.pipeline.Pipeline, "from_pretrained", no_loading)
    for out, message in (("", "must name an image file"), (str(tmp_path), "must name an image file"), (str(tmp_path / "x.nope"), "no image extension"),
                         (str(tmp_path / "noext"), "no image extension"), (str(tmp_path / "a.xbm"), "cannot write an RGB image as .xbm")):
        assert main(["generate", "x", "-o", out]) == 2
        assert message in capsys.readouterr().err
    (tmp_path / "m-1.png").mkdir()  # the second image's name is taken by a folder: nothing is made, nothing written
    assert main(["generate", "x", "-o", str(tmp_path / "m.png"), "--num-images", "2"]) == 2
    assert "m-1.png is a folder" in capsys.readouterr().err and not (tmp_path / "m-0.png").exists()
    (tmp_path / "afile").write_text("")  # a file where a folder of the path would have to be made
    for flag in ("-o", "--trajectory"):
        args = {"-o": str(tmp_path / "a.png"), flag: str(tmp_path / "afile" / "sub" / "x.png")}
        assert main(["generate", "x", *[v for kv in args.items() for v in kv]]) == 2
        assert "afile is not a folder" in capsys.readouterr().err
    assert main(["generate", "x", "-o", str(tmp_path / "a.png"), "--trajectory", str(tmp_path / "a.png")]) == 2
    assert "--trajectory names an image that -o/--output writes" in capsys.readouterr().err
    assert main(["noise", "x.png", "-o", str(tmp_path / "afile" / "x.png")]) == 2
    assert "afile is not a folder" in capsys.readouterr().err
    assert main(["generate", "x", "-o", str(tmp_path / "a.png"), "--device", "warp9"]) == 2
    assert "not a device name" in capsys.readouterr().err
    import torch

    if not torch.cuda.is_available():
        assert main(["generate", "x", "-o", str(tmp_path / "a.png"), "--device", "cuda"]) == 2
        assert "sees no CUDA GPU" in capsys.readouterr().err
    assert main(["serve", "--port", "99999"]) == 2
    assert "--port must be from 1 to 65535" in capsys.readouterr().err
    pytest = __import__("pytest")
    pytest.importorskip("fastapi")
    for warmup, message in (("abc", "--warmup takes sizes as WIDTHxHEIGHT"), ("99999x99999", "--warmup 99999x99999: each side must be from 1 to --max-side")):
        assert main(["serve", "--warmup", warmup]) == 2  # before the model loads (it had been after)
        assert message in capsys.readouterr().err


def test_unexpected_errors_are_one_line_unless_debug(monkeypatch, tmp_path, capsys):
    import unfog.pipeline

    def broken(*a, **k):
        raise KeyError("surprise")

    monkeypatch.setattr(unfog.pipeline.Pipeline, "from_pretrained", broken)
    assert main(["generate", "x", "-o", str(tmp_path / "a.png")]) == 1
    err = capsys.readouterr().err
    assert "KeyError" in err and "--debug" in err and "Traceback" not in err
    import pytest

    with pytest.raises(KeyError):
        main(["--debug", "generate", "x", "-o", str(tmp_path / "a.png")])


def test_png_carries_its_settings_and_from_png_makes_it_again(tiny_model_dir, tmp_path, capsys):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    common = ["--model", str(tiny_model_dir), "-q"]
    assert main(["generate", "a red circle", "-o", str(a), "--steps", "3", "--seed", "9", "--sampler", "euler_ancestral",
                 "--negative", "blue", "--sampler-option", "eta=0.5", *common]) == 0
    with Image.open(a) as im:
        text = dict(im.text)
    assert text["parameters"].startswith("a red circle\nNegative prompt: blue\nSteps: 3, Sampler: Euler a,")
    assert "Seed: 9, Size: 32x32" in text["parameters"]
    assert main(["generate", "--from-png", str(a), "-o", str(b), *common]) == 0
    with Image.open(a) as x, Image.open(b) as y:
        assert np.array_equal(np.asarray(x), np.asarray(y))  # the same image: prompt, seed, sampler and its options came back
    assert main(["generate", "--from-png", str(a), "-o", str(b), "--seed", "10", *common]) == 0  # flags override
    with Image.open(a) as x, Image.open(b) as y:
        assert not np.array_equal(np.asarray(x), np.asarray(y))
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    assert main(["generate", "--from-png", str(tmp_path / "plain.png"), "-o", str(b), *common]) == 2
    assert "carries no generation settings" in capsys.readouterr().err
    assert main(["generate", "-o", str(b), *common]) == 2


def test_a1111_parameters_are_read():
    from unfog.request import settings_from_png

    text = {"parameters": "masterpiece, a fox\nin the snow\nNegative prompt: blurry, lowres\n"
                          "Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234, Size: 512x768, Model hash: abc, Model: x"}
    assert settings_from_png(text) == {"prompt": "masterpiece, a fox\nin the snow", "negative_prompt": "blurry, lowres", "steps": 25,
                                       "guidance_scale": 6.5, "seed": 1234, "width": 512, "height": 768, "sampler": "dpmpp_2m",
                                       "sigma_schedule": "karras"}
    # Found by a review: a prompt-only chunk became an empty prompt, an empty one raised
    # IndexError, and A1111's older "DPM++ 2M Karras" was dropped without a word.
    assert settings_from_png({"parameters": "a red circle"}) == {"prompt": "a red circle", "negative_prompt": ""}
    assert settings_from_png({"parameters": "a red circle\nNegative prompt: blue\ngreen"}) == {"prompt": "a red circle", "negative_prompt": "blue\ngreen"}
    with pytest.raises(UnfogError, match="'parameters' text chunk is empty"):
        settings_from_png({"parameters": "  "})
    old = settings_from_png({"parameters": "a fox\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1, Size: 512x512"})
    assert old["sampler"] == "dpmpp_2m" and old["sigma_schedule"] == "karras"
    with pytest.warns(UserWarning, match="sampler 'Restart' is not one unfog has"):
        assert "sampler" not in settings_from_png({"parameters": "a fox\nSteps: 20, Sampler: Restart, Seed: 1"})


def test_out_of_range_seed_and_invalid_utf8_prompt_are_one_line_errors(tiny_model_dir, tmp_path):
    common = ["--model", str(tiny_model_dir), "-o", str(tmp_path / "x.png"), "-q"]
    r = run("generate", "a red circle", "--seed", "18446744073709551616", *common)
    assert r.returncode == 2 and "seed must be" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable.encode(), b"-m", b"unfog", b"generate", b"a \xff circle", *[a.encode() for a in common]],
                       capture_output=True, timeout=300)
    assert r.returncode == 2 and b"not valid Unicode text" in r.stderr and b"Traceback" not in r.stderr


def test_the_command_exits_quickly_only_when_nothing_else_runs(monkeypatch):
    """`unfog` skips interpreter teardown (os._exit) after a command, but exits normally while
    another thread still runs, so that thread's work is not cut off."""
    import threading

    import unfog.cli as cli

    exits = []
    monkeypatch.setattr(cli, "main", lambda: 3)
    monkeypatch.setattr(cli.os, "_exit", lambda code: exits.append(code))
    cli.run()
    assert exits == [3]
    sys.setprofile(lambda *a: None)  # a profiler (python -m cProfile -m unfog …) writes its report at exit
    try:
        with pytest.raises(SystemExit) as exited:
            cli.run()
    finally:
        sys.setprofile(None)
    assert exited.value.code == 3
    stop = threading.Event()
    worker = threading.Thread(target=stop.wait)
    worker.start()
    try:
        with pytest.raises(SystemExit) as exited:
            cli.run()
    finally:
        stop.set()
        worker.join()
    assert exited.value.code == 3 and exits == [3]


def test_serve_warmup_sizes_are_checked(tiny_model_dir, capsys):
    assert main(["serve", "--model", str(tiny_model_dir), "--warmup", "64x64,big"]) == 2
    assert "WIDTHxHEIGHT" in capsys.readouterr().err
    assert main(["serve", "--model", str(tiny_model_dir), "--warmup", "33x64"]) == 2  # the request's own check: a multiple of the model's factor
    assert "multiple" in capsys.readouterr().err


def test_generate_low_memory_gives_the_same_image(tiny_model_dir, tmp_path, monkeypatch):
    from unfog import Pipeline

    common = ["--model", str(tiny_model_dir), "--steps", "3", "--seed", "4", "-q"]
    assert main(["generate", "a blue square", "-o", str(tmp_path / "a.png"), *common]) == 0
    modes = []
    enable = Pipeline.enable_low_memory
    monkeypatch.setattr(Pipeline, "enable_low_memory", lambda self, *a, **k: modes.append(1) or enable(self, *a, **k))
    assert main(["generate", "a blue square", "-o", str(tmp_path / "b.png"), "--low-memory", *common]) == 0
    assert modes, "--low-memory turns low-memory mode on"
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))


def test_generate_with_stdout_closed_still_succeeds(tiny_model_dir, tmp_path):
    """A command run with its stdout closed (`unfog … >&-`) writes its file and exits 0."""
    out = tmp_path / "o.png"
    r = subprocess.run([sys.executable, "-m", "unfog", "generate", "a red circle", "-o", str(out), "--model", str(tiny_model_dir), "--steps", "2", "-q"],
                       stderr=subprocess.PIPE, text=True, timeout=300, preexec_fn=lambda: os.close(1))
    assert r.returncode == 0, r.stderr
    assert out.is_file() and "Traceback" not in r.stderr


def test_serve_flags_ray_cannot_honour_are_refused(capsys):
    for flag in (["--low-memory"], ["--warmup", "64x64"], ["--compile"]):
        assert main(["serve", "--ray", *flag]) == 2
        assert "not available with --ray" in capsys.readouterr().err


def test_convert_checks_its_output_before_loading(tmp_path, capsys, monkeypatch):
    import unfog.formats

    def no_loading(*a, **k):
        raise AssertionError("the checkpoint was loaded before the output was checked")

    monkeypatch.setattr(unfog.formats, "load_any", no_loading)
    (tmp_path / "afile").write_text("")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    for out, message in ((tmp_path / "afile", "is not an unfog model folder"), (tmp_path / "notes", "is not an unfog model folder")):
        assert main(["convert", str(tmp_path / "in.safetensors"), str(out)]) == 2
        assert message in capsys.readouterr().err
    monkeypatch.chdir(tmp_path / "notes")
    assert main(["convert", str(tmp_path / "in.safetensors"), "."]) == 2
    assert "is the folder you are in" in capsys.readouterr().err and (tmp_path / "notes" / "a.txt").read_text() == "mine"


def test_eval_checks_its_outputs_and_device_before_evaluating(tmp_path, capsys, monkeypatch):
    """A bad --grid or --json had failed after the whole evaluation (minutes), a bad --device with a raw error."""
    import unfog.pipeline

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(unfog.pipeline.Pipeline, "from_pretrained", no_loading)
    for extra, message in ((["--grid", str(tmp_path / "g.txt")], "no image extension"), (["--json", str(tmp_path / "nope" / "s.json")], "its folder does not exist"),
                           (["--device", "warp9"], "not a device name"), (["--json", str(tmp_path)], "is a folder"),
                           (["--seed", str(2**63 - 2)], "--seed must be from 0"), (["--seed", "-1"], "--seed must be from 0")):
        assert main(["eval", "shapes", "--prompts", "2", *extra]) == 2
        assert message in capsys.readouterr().err


def test_eval_emoji_loads_the_bundled_model_by_its_path(tmp_path, monkeypatch):
    """A folder named emoji in the current directory had been loaded instead of the bundled model."""
    import unfog.pipeline

    asked = []

    def record(cls, path=None, **kw):
        asked.append(path)
        raise UnfogError("stop here")

    monkeypatch.setattr(unfog.pipeline.Pipeline, "from_pretrained", classmethod(record))
    (tmp_path / "emoji").mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "emoji", "--prompts", "1", "-q"]) == 2
    assert asked == [unfog.pipeline.BUNDLED_MODELS["emoji"]]
