"""Low-memory mode (unfog.offload): the text encoders rest on disk between encodings, the images
stay bit-identical, nothing is left on disk, and changes to the encoders are never lost."""

import os

import numpy as np
import pytest
import torch

from unfog import Pipeline
from unfog.errors import UnfogError
from unfog.nn import packed


def image(pipe, **kw):
    return np.asarray(pipe("a red circle", num_inference_steps=4, seed=5, **kw).images[0])


def resident_bytes(module):
    return sum(t.numel() * t.element_size() for t in module.state_dict().values() if not t.is_meta)


def test_text_encoder_rests_on_disk_and_images_are_unchanged(tiny_model_dir, tmp_path):
    plain = Pipeline.from_pretrained(tiny_model_dir)
    low = Pipeline.from_pretrained(tiny_model_dir, low_memory=True)
    low.disable_low_memory().enable_low_memory(tmp_path)
    assert resident_bytes(low.text_encoder) == 0 and resident_bytes(plain.text_encoder) > 0
    for _ in range(2):  # the second time from the file written by the first release
        assert np.array_equal(image(low), image(plain))
        assert resident_bytes(low.text_encoder) == 0  # released again after encoding
    assert np.array_equal(image(low, negative_prompt="blue"), image(plain, negative_prompt="blue"))
    if os.path.isdir("/proc/self/fd"):
        assert os.listdir(tmp_path) == []  # unlinked at once, read through the open descriptor
    low.disable_low_memory()
    assert resident_bytes(low.text_encoder) == resident_bytes(plain.text_encoder)
    assert np.array_equal(image(low), image(plain))


def test_changed_text_encoder_weights_are_written_again(tiny_model_dir):
    """Weights changed in place after restoring (as fusing a LoRA does) are what the next
    encodings use, not the stale copy on disk."""
    plain = Pipeline.from_pretrained(tiny_model_dir)
    low = Pipeline.from_pretrained(tiny_model_dir, low_memory=True)
    image(low)
    for pipe in (plain, low):
        pipe._resident(changing=True)
        with torch.no_grad():
            pipe.text_encoder.token_embedding.weight.mul_(1.5)
    first = image(low)
    assert np.array_equal(first, image(plain))
    assert np.array_equal(image(low), first)  # released and restored once more


def test_saving_and_embeddings_in_low_memory_mode(tiny_model_dir, tmp_path):
    low = Pipeline.from_pretrained(tiny_model_dir, low_memory=True)
    image(low)
    low.save_pretrained(tmp_path / "saved")
    again = Pipeline.from_pretrained(tmp_path / "saved")
    assert np.array_equal(image(again), image(low))
    from safetensors.torch import save_file

    width = again.text_encoder.config.width
    save_file({"emb_params": torch.randn(2, width, generator=torch.Generator().manual_seed(0))}, str(tmp_path / "sparkle.safetensors"))
    for pipe in (low, again):
        pipe.load_textual_inversion(tmp_path / "sparkle.safetensors")
    assert np.array_equal(image(low, negative_prompt="sparkle"), image(again, negative_prompt="sparkle"))


def test_low_memory_mode_is_for_cpu_pipelines(tiny_model_dir, tmp_path):
    low = Pipeline.from_pretrained(tiny_model_dir, low_memory=True)
    with pytest.raises(UnfogError, match="disable_low_memory"):
        low.to("cuda")
    with pytest.raises(UnfogError, match="does not exist"):
        Pipeline.from_pretrained(tiny_model_dir).enable_low_memory(tmp_path / "nowhere")
    with pytest.raises(UnfogError, match="True or False"):
        Pipeline.from_pretrained(tiny_model_dir, low_memory="false")


def test_a_failed_write_is_an_error_and_leaves_the_pipeline_usable(tiny_model_dir, tmp_path, monkeypatch):
    import unfog.offload as offload

    def no_room(state, path):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(offload, "save_file", no_room)
    pipe = Pipeline.from_pretrained(tiny_model_dir)
    with pytest.raises(UnfogError, match="No space left.*directory"):
        pipe.enable_low_memory(tmp_path)
    assert pipe.disk_rest is None and resident_bytes(pipe.text_encoder) > 0
    assert os.listdir(tmp_path) == []  # the partial file removed
    assert np.array_equal(image(pipe), image(Pipeline.from_pretrained(tiny_model_dir)))
    with pytest.raises(UnfogError, match="folder path"):
        pipe.enable_low_memory(123)


def test_casting_and_threads_in_low_memory_mode(tiny_model_dir):
    """A cast writes the encoders again in the new dtype; several threads may share the pipeline."""
    import copy
    import threading

    plain = Pipeline.from_pretrained(tiny_model_dir).to(dtype=torch.bfloat16)
    low = Pipeline.from_pretrained(tiny_model_dir, low_memory=True).to("cpu").to(dtype=torch.bfloat16)
    assert resident_bytes(low.text_encoder) == 0
    expected = image(plain)
    assert np.array_equal(image(low), expected)
    errors, results = [], []

    def worker():
        try:
            for _ in range(3):
                results.append(image(low))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 9 and all(np.array_equal(r, expected) for r in results)
    with pytest.raises(UnfogError, match="cannot be copied"):
        copy.deepcopy(low)


# ---- low-memory mode on CUDA: each network on the GPU only while it runs (DeviceOffload) ----

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_device_offload_moves_a_network_for_its_block_and_puts_its_own_tensors_back(tiny_model_dir):
    """The bookkeeping, on the meta device (no GPU here): inside the block every weight is on the
    target device; after it the very same CPU tensors are back (no copy), also after an error,
    and a network used by two blocks at once stays until the last one ends."""
    from unfog.offload import DeviceOffload

    pipe = Pipeline.from_pretrained(tiny_model_dir)
    off = DeviceOffload(torch.device("meta"))
    storage = {n: t.data_ptr() for n, t in pipe.unet.state_dict().items()}
    params = list(pipe.unet.parameters())
    with off.using(pipe.unet):
        assert all(t.is_meta for t in pipe.unet.state_dict().values())
        with off.using(pipe.unet):  # a second user
            pass
        assert all(t.is_meta for t in pipe.unet.state_dict().values())  # the first still holds it
        assert not any(t.is_meta for t in pipe.vae.state_dict().values())  # only the network asked for
    assert {n: t.data_ptr() for n, t in pipe.unet.state_dict().items()} == storage
    assert list(pipe.unet.parameters()) == params  # the same Parameter objects
    with pytest.raises(RuntimeError, match="inside"):
        with off.using(pipe.unet):
            raise RuntimeError("inside")
    assert {n: t.data_ptr() for n, t in pipe.unet.state_dict().items()} == storage and not off.users


def test_device_offload_through_generations_puts_the_same_cpu_tensors_back(tiny_model_dir):
    """The whole flow on a CPU, with an offload that copies as a GPU would (new storage for each
    block): every network runs on its copy, and after each of several generations every slot
    holds its original CPU tensor again (the second round once kept the copy: found on an H100)."""
    from unfog.offload import DeviceOffload

    class Copying(DeviceOffload):
        def _copy(self, t):
            return t.clone()

    plain = Pipeline.from_pretrained(tiny_model_dir)
    low = Pipeline.from_pretrained(tiny_model_dir)
    low.offload = Copying(torch.device("cpu"))
    nets = (low.text_encoder, low.unet, low.vae)

    def storage():
        return [{n: t.data_ptr() for n, t in m.state_dict().items()} for m in nets]

    before = storage()
    weight = low.unet.conv_in.weight
    on_copy = []
    low.unet.register_forward_pre_hook(lambda m, a: on_copy.append(weight.data_ptr() != before[1]["conv_in.weight"]))
    for _ in range(3):
        assert np.array_equal(image(low), image(plain))
        assert storage() == before and not low.offload.users and not low.offload.saved
    assert on_copy and all(on_copy)


def test_low_memory_mode_on_cuda_refuses_clearly(tiny_model_dir):
    pipe = Pipeline.from_pretrained(tiny_model_dir)
    if not torch.cuda.is_available():
        with pytest.raises(UnfogError, match="no CUDA GPU"):
            pipe.enable_low_memory(device="cuda")
        with pytest.raises(UnfogError, match="no CUDA GPU"):
            pipe.enable_model_cpu_offload()
    with pytest.raises(UnfogError, match="CPU or a CUDA GPU"):
        pipe.enable_low_memory(device="meta")
    assert pipe.offload is None and pipe.device.type == "cpu"
    from unfog.offload import DeviceOffload

    pipe.offload = offload = DeviceOffload(torch.device("cuda", 0))  # as enable_low_memory(device="cuda") leaves it
    assert pipe.enable_low_memory() is pipe and pipe.enable_model_cpu_offload() is pipe and pipe.offload is offload  # twice is once


@cuda
def test_cuda_low_memory_images_equal_and_the_gpu_holds_one_network(tiny_model_dir):
    full = Pipeline.from_pretrained(tiny_model_dir).to("cuda")
    low = Pipeline.from_pretrained(tiny_model_dir).enable_low_memory(device="cuda")
    assert low.device.type == "cuda" and all(t.device.type == "cpu" for t in low.unet.state_dict().values())
    seen = []
    low.unet.register_forward_pre_hook(lambda m, a: seen.append((next(m.parameters()).device.type, next(low.vae.parameters()).device.type)))
    for _ in range(2):
        assert np.array_equal(image(low), image(full))
    assert set(seen) == {("cuda", "cpu")}  # the U-Net on the GPU while it runs, the autoencoder not
    astray = [(type(m).__name__, k, str(t.device), t.is_pinned()) for m in (low.unet, low.vae, low.text_encoder) for k, t in m.state_dict().items()
              if t.device.type != "cpu" or not t.is_pinned()]
    assert not astray, astray[:8]
    # img2img encodes with the autoencoder; adapters change weights on the CPU between generations
    init = full("a red circle", num_inference_steps=2, seed=1).images[0]
    assert np.array_equal(image(low, image=init, strength=0.5), image(full, image=init, strength=0.5))
    with pytest.raises(UnfogError, match="disable_low_memory"):
        low.to("cuda")
    low.disable_low_memory()
    assert low.offload is None and all(t.is_cuda for t in low.unet.state_dict().values())
    assert np.array_equal(image(low), image(full))


@cuda
def test_cuda_low_memory_with_optimize(tiny_model_dir):
    """optimize() in low-memory mode: bfloat16 and the CUDA fast path without graphs (the
    weights move each stage), close to the fully resident fast path."""
    fast = Pipeline.from_pretrained(tiny_model_dir).to("cuda").optimize(cuda_graphs=False)
    low = Pipeline.from_pretrained(tiny_model_dir).enable_model_cpu_offload().optimize()
    assert not low.cuda_graphs and low.dtype == torch.bfloat16
    assert not any(isinstance(m, (packed.PackedLinear, packed.PackedConv2d)) for m in low.unet.modules())  # not the CPU's oneDNN packing
    with pytest.raises(UnfogError, match="graphs"):
        low.optimize(cuda_graphs=True)
    assert np.array_equal(image(low), image(fast))
