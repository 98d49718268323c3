"""optimize()'s CPU fast path: weights packed once in oneDNN's layout (unfog.nn.packed)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unfog import Pipeline
from unfog.nn import packed
from unfog.nn.layers import GEGLU

pytestmark = pytest.mark.skipif(not packed.available(), reason="this torch has no oneDNN")

bf16 = torch.bfloat16


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def conv_pair(cin, cout, k, **kw):
    torch.manual_seed(0)
    plain = nn.Conv2d(cin, cout, k, **kw).to(bf16)
    fast = nn.Conv2d(cin, cout, k, **kw).to(bf16)
    fast.load_state_dict(plain.state_dict())
    assert packed.prepack(fast) == 1
    return plain, fast


@pytest.mark.parametrize("k,stride,pad", [(3, 1, 1), (3, 2, 1), (1, 1, 0)])
def test_packed_convolution_gives_the_plain_convolution(k, stride, pad):
    plain, fast = conv_pair(64, 96, k, stride=stride, padding=pad)
    assert isinstance(fast, nn.Conv2d) and type(fast) is packed.PackedConv2d
    assert list(fast.state_dict()) == list(plain.state_dict())
    with torch.inference_mode():
        for shape in [(2, 64, 16, 16), (1, 64, 9, 12)]:  # one packed weight serves every input shape
            x = torch.randn(*shape).to(bf16).contiguous(memory_format=torch.channels_last)
            assert torch.equal(fast(x), plain(x))
        assert "_packed" in fast.__dict__


WIDE = packed.MATMUL_MIN_CHANNELS
SLOTS = {"conv": "_packed", "matmul": "_packed_matmul", "taps": "_packed_taps"}


@pytest.mark.parametrize("cin,cout,k,size,route", [
    (WIDE, 32, 3, (4, 4), "matmul"),  # a wide 3×3 layer on a deep level's few pixels: one im2col matmul
    (WIDE, 32, 3, (4, 5), "taps"),  # …on a few more: one matmul per kernel tap
    (WIDE, 32, 3, (8, 8), "taps"),
    (WIDE, WIDE, 3, (16, 16), "taps"),  # as many outputs as inputs: taps up to 16×16
    (WIDE, 32, 3, (16, 16), "conv"),  # …else oneDNN's convolution on a larger map
    (WIDE // 2, 32, 3, (4, 4), "conv"),  # a narrower 3×3 layer never
    (WIDE, 32, 1, (16, 16), "matmul"),  # a wide 1×1 layer at any size
    (64, 32, 1, (4, 4), "conv"),  # a narrow one never
])
def test_convolutions_take_the_faster_route_within_bf16_rounding(cin, cout, k, size, route):
    plain, fast = conv_pair(cin, cout, k, padding=k // 2)
    x = torch.randn(2, cin, *size).to(bf16).contiguous(memory_format=torch.channels_last)
    assert fast._route(x) == route
    with torch.inference_mode():
        got, want = fast(x), plain(x)
        exact = F.conv2d(x.float(), plain.weight.float(), plain.bias.float(), padding=k // 2)
    assert got.shape == want.shape and got.is_contiguous(memory_format=torch.channels_last)
    assert [slot for slot in SLOTS.values() if slot in fast.__dict__] == [SLOTS[route]]
    if route == "conv":
        assert torch.equal(got, want)
    else:  # another order of accumulation (and, for taps, a bf16 sum after each tap)
        assert rel(got, exact) < 1e-2 and rel(got, exact) < 2 * rel(want, exact) + 1e-3


def test_one_layer_serves_every_route_at_different_sizes():
    """A wide 3×3 layer meets a 16×16 map at one resolution, an 8×8 and a 4×4 one at others: each
    route keeps its own packed weight (the layouts differ), and all stay right after a change."""
    plain, fast = conv_pair(WIDE, 16, 3, padding=1)
    tiny, small, large = (torch.randn(1, WIDE, s, s).to(bf16).contiguous(memory_format=torch.channels_last) for s in (4, 8, 16))
    assert [fast._route(x) for x in (tiny, small, large)] == ["matmul", "taps", "conv"]
    for _ in range(2):
        with torch.inference_mode():
            for x in (small, large, tiny, small):
                exact = F.conv2d(x.float(), plain.weight.float(), plain.bias.float(), padding=1)
                assert rel(fast(x), exact) < 1e-2
            assert torch.equal(fast(large), plain(large))
        assert all(slot in fast.__dict__ for slot in SLOTS.values())
        with torch.no_grad():
            for m in (plain, fast):
                m.weight.mul_(-1)


def test_packed_weights_follow_changes_to_the_weights():
    plain, fast = conv_pair(32, 32, 3, padding=1)
    lin = nn.Linear(32, 48).to(bf16)
    ref = nn.Linear(32, 48).to(bf16)
    ref.load_state_dict(lin.state_dict())
    packed.prepack(lin)
    x = torch.randn(2, 32, 8, 8).to(bf16)
    t = torch.randn(5, 32).to(bf16)
    with torch.inference_mode():
        fast(x), lin(t)  # packed now
    with torch.no_grad():  # as load_state_dict and a fused LoRA change them: in place
        for m in (plain, fast, lin, ref):
            m.weight.mul_(-2)
    with torch.inference_mode():
        assert torch.equal(fast(x), plain(x))
        assert rel(lin(t), ref(t)) < 1e-2
        assert rel(lin(t), -ref(t)) > 1  # not the stale weights


def test_packing_stays_out_of_training_and_float32():
    plain, fast = conv_pair(16, 16, 3, padding=1)
    x = torch.randn(1, 16, 8, 8).to(bf16)
    fast(x).sum().backward()  # with autograd: the ordinary convolution, gradients flow
    assert fast.weight.grad is not None and "_packed" not in fast.__dict__
    fast32 = nn.Conv2d(16, 16, 3, padding=1)
    packed.prepack(fast32)
    with torch.inference_mode():
        fast32(torch.randn(1, 16, 8, 8))
    assert "_packed" not in fast32.__dict__


def test_fused_geglu_matches_the_plain_one():
    torch.manual_seed(0)
    plain = GEGLU(64).to(bf16)
    fast = GEGLU(64).to(bf16)
    fast.load_state_dict(plain.state_dict())
    packed.prepack(fast)
    x = torch.randn(2, 50, 64).to(bf16)
    exact = GEGLU(64)
    exact.load_state_dict(plain.state_dict())
    with torch.inference_mode():
        got, want, ref = fast(x), plain(x), exact(x.float())
    assert "_packed_geglu" in fast.__dict__
    assert rel(got, ref) < 1e-2 and rel(got, want) < 1e-2


def test_optimized_pipeline_on_cpu_packs_and_keeps_the_picture(tiny_model_dir):
    plain = Pipeline.from_pretrained(tiny_model_dir)
    fast = Pipeline.from_pretrained(tiny_model_dir).optimize(dtype=bf16)
    assert type(fast.unet.conv_in) is packed.PackedConv2d and type(fast.vae.decoder.conv_in) is packed.PackedConv2d
    assert fast.vae.decoder.conv_in.weight.dtype == bf16
    assert not any(isinstance(m, packed.PackedLinear) for m in fast.text_encoder.modules())  # the U-Net and the autoencoder only
    a = np.asarray(plain("a red circle", seed=2).images[0], dtype=np.float32)
    b = np.asarray(fast("a red circle", seed=2).images[0], dtype=np.float32)
    assert "_packed" in fast.unet.conv_in.__dict__ and "_packed" in fast.vae.decoder.conv_in.__dict__
    assert np.abs(a - b).mean() < 6  # bf16 rounding, not a different picture
    assert set(fast.unet.state_dict()) == set(plain.unet.state_dict())


def test_optimize_keeps_the_layout_it_was_asked_for(tiny_model_dir):
    for channels_last in (True, False):
        fast = Pipeline.from_pretrained(tiny_model_dir).optimize(dtype=bf16, channels_last=channels_last)
        for w in (fast.unet.conv_in.weight, fast.vae.decoder.conv_in.weight):
            assert w.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_weights_made_under_inference_mode_are_packed_and_forgotten_on_request():
    with torch.inference_mode():
        plain, fast = conv_pair(32, 32, 3, padding=1)
        x = torch.randn(2, 32, 8, 8).to(bf16)
        assert fast.weight.is_inference()
        assert torch.equal(fast(x), plain(x)) and "_packed" in fast.__dict__
        for m in (plain, fast):
            m.weight.mul_(-2)  # no version counter to see this: unfog's own in-place changes call forget
        packed.forget(fast)
        assert torch.equal(fast(x), plain(x))


def test_pipeline_loaded_under_inference_mode_generates(tiny_model_dir):
    """Once crashed the process: asking an inference tensor for its version raised inside the
    sampler's greenlet."""
    with torch.inference_mode():
        fast = Pipeline.from_pretrained(tiny_model_dir).optimize(dtype=bf16)
        image = fast("a red circle", seed=2, num_inference_steps=3).images[0]
    assert image.size == (fast.defaults.width, fast.defaults.height) and "_packed" in fast.unet.conv_in.__dict__


def test_a_used_packed_module_can_be_copied_and_saved(tmp_path):
    """oneDNN's packed tensors can be neither copied nor pickled: a copy or a saved module drops
    them and packs its own weights on first use (it used to raise NotImplementedError)."""
    import copy

    torch.manual_seed(0)
    layer = nn.Linear(64, 64).to(bf16)
    packed.prepack(layer)
    x = torch.randn(3, 64).to(bf16)
    with torch.inference_mode():
        want = layer(x)
        assert "_packed" in layer.__dict__
    twin = copy.deepcopy(layer)
    torch.save(layer, tmp_path / "layer.pt")
    loaded = torch.load(tmp_path / "layer.pt", weights_only=False)
    with torch.no_grad():
        twin.weight.mul_(-1)  # the copy has its own weights: its packed copy must follow them
    with torch.inference_mode():
        assert torch.equal(loaded(x), want) and "_packed" in loaded.__dict__
        assert rel(twin(x), F.linear(x.float(), -layer.weight.float(), layer.bias.float())) < 1e-2
