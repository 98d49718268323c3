import pytest
import torch

from unfog.errors import UnfogError
from unfog.nn import Autoencoder, AutoencoderConfig, TextEncoder, TextEncoderConfig, Tokenizer, TokenizerConfig, UNet, UNetConfig
from unfog.nn.layers import timestep_embedding


@pytest.mark.parametrize(
    "cfg, size",
    [
        (UNetConfig(in_channels=3, out_channels=3, block_channels=[16, 32], layers_per_block=1, attention_levels=[False, True], num_heads=2, context_dim=24, norm_groups=8), (13, 7)),
        (UNetConfig(in_channels=4, out_channels=8, block_channels=[16, 32, 48], layers_per_block=2, attention_levels=[True, False, True], head_dim=8, context_dim=24, norm_groups=8, linear_projection=True, transformer_depth=2), (16, 12)),
        (UNetConfig(in_channels=1, out_channels=1, block_channels=[8], layers_per_block=1, attention_levels=[True], num_heads=[1], context_dim=24, norm_groups=4, mid_attention=False), (5, 5)),
    ],
)
def test_unet_output_shapes_for_odd_configs(cfg, size):
    torch.manual_seed(0)
    net = UNet(cfg)
    x = torch.randn(2, cfg.in_channels, *size)
    out = net(x, torch.tensor([3.0, 500.5]), torch.randn(2, 5, 24))
    assert out.shape == (2, cfg.out_channels, *size)
    assert torch.isfinite(out).all()


def test_unet_is_equivariant_to_batch_order():
    torch.manual_seed(0)
    net = UNet(UNetConfig(in_channels=4, out_channels=4, block_channels=[16, 32], layers_per_block=1, attention_levels=[True, True], num_heads=2, context_dim=8, norm_groups=8))
    x, t, ctx = torch.randn(4, 4, 8, 8), torch.tensor([1.0, 10.0, 100.0, 900.0]), torch.randn(4, 3, 8)
    perm = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(net(x, t, ctx)[perm], net(x[perm], t[perm], ctx[perm]), atol=1e-5, rtol=1e-4)


def test_unet_uses_timestep_and_context():
    torch.manual_seed(0)
    net = UNet(UNetConfig(in_channels=4, out_channels=4, block_channels=[16], layers_per_block=1, attention_levels=[True], num_heads=2, context_dim=8, norm_groups=8))
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 3, 8)
    base = net(x, torch.tensor([10.0]), ctx)
    assert not torch.allclose(base, net(x, torch.tensor([500.0]), ctx))
    assert not torch.allclose(base, net(x, torch.tensor([10.0]), torch.randn(1, 3, 8)))


def test_unet_config_errors_are_clear():
    with pytest.raises(UnfogError, match="norm_groups"):
        UNet(UNetConfig(block_channels=[20, 40], attention_levels=[False, False], norm_groups=8))
    with pytest.raises(UnfogError, match="attention_levels"):
        UNet(UNetConfig(block_channels=[16, 32], attention_levels=[True], norm_groups=8))


def test_timestep_embedding():
    e = timestep_embedding(torch.tensor([0.0, 1.0, 999.0]), 32)
    assert e.shape == (3, 32)
    torch.testing.assert_close(e[0, :16], torch.ones(16))  # cos(0) first with flip_sin_to_cos
    torch.testing.assert_close(e[0, 16:], torch.zeros(16))
    assert timestep_embedding(torch.tensor([2.0]), 7).shape == (1, 7)


def tiny_text_encoder(**kw):
    torch.manual_seed(0)
    return TextEncoder(TextEncoderConfig(vocab_size=50, context_length=12, width=32, layers=3, heads=4, mlp_width=64, **kw))


def test_text_encoder_is_causal():
    te = tiny_text_encoder()
    ids = torch.randint(0, 49, (2, 12))
    ids2 = ids.clone()
    ids2[:, 5] = (ids[:, 5] + 1) % 49
    a, _ = te(ids)
    b, _ = te(ids2)
    torch.testing.assert_close(a[:, :5], b[:, :5])
    assert not torch.allclose(a[:, 5:], b[:, 5:])


def test_text_encoder_pooled_is_eos_state_and_skip_layers():
    te = tiny_text_encoder(activation="quick_gelu")
    ids = torch.tensor([[1, 5, 7, 49, 0, 0, 0, 0, 0, 0, 0, 0]])
    states, pooled = te(ids)
    assert states.shape == (1, 12, 32) and pooled.shape == (1, 32)
    torch.testing.assert_close(pooled, states[:, 3])
    penultimate, _ = te(ids, skip_last_layers=1)
    assert not torch.allclose(penultimate, states)
    with pytest.raises(UnfogError, match="skip_last_layers"):
        te(ids, skip_last_layers=3)
    with pytest.raises(UnfogError, match="context length"):
        te(torch.zeros(1, 13, dtype=torch.long))


def test_autoencoder_shapes_and_latent_distribution():
    torch.manual_seed(0)
    vae = Autoencoder(AutoencoderConfig(block_channels=[16, 32, 32], layers_per_block=1, norm_groups=8, latent_channels=4))
    x = torch.rand(2, 3, 32, 24) * 2 - 1
    mean, logvar = vae.encode(x)
    assert mean.shape == logvar.shape == (2, 4, 8, 6)
    assert vae.decode(mean).shape == (2, 3, 32, 24)
    rec, m, lv = vae(x, generator=torch.Generator().manual_seed(0))
    assert rec.shape == x.shape and vae.config.downsample_factor == 4


@torch.no_grad()
def test_autoencoder_reconstructs_through_a_posterior_sample():
    torch.manual_seed(0)
    vae = Autoencoder(AutoencoderConfig(block_channels=[16, 32], layers_per_block=1, norm_groups=8, latent_channels=4))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    # The encoder's two halves are the mean and log-variance, the latter clamped to [-30, 20].
    moments = vae.quant_conv(vae.encoder(x))
    mean, logvar = vae.encode(x)
    torch.testing.assert_close(mean, moments[:, :4])
    torch.testing.assert_close(logvar, moments[:, 4:].clamp(-30, 20))
    bias = vae.quant_conv.bias.data.clone()
    vae.quant_conv.bias.data[4:] = 50.0
    assert vae.encode(x)[1].max().item() == 20.0
    vae.quant_conv.bias.data.copy_(bias)
    # forward decodes z = mean + exp(logvar / 2)·n with n drawn from the given generator.
    rec, _, _ = vae(x, generator=torch.Generator().manual_seed(7))
    n = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(rec, vae.decode(mean + (0.5 * logvar).exp() * n))
    other, _, _ = vae(x, generator=torch.Generator().manual_seed(8))
    assert not torch.allclose(rec, other) and not torch.allclose(rec, vae.decode(mean))


def test_tokenizer_pads_truncates_and_frames():
    tok = Tokenizer.train_word_level(["a red circle", "a blue square left of a green triangle"], TokenizerConfig(context_length=6, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"))
    ids = tok(["a red circle", "a blue square left of a green triangle", "A RED zebra"])
    assert ids.shape == (3, 6) and ids.dtype == torch.long
    assert ids[0].tolist()[:5] == [tok.bos_id, *tok.encode(["a red circle"])[0], tok.eos_id]
    assert ids[0, 5] == tok.pad_id
    assert ids[1, -1] == tok.eos_id and tok.frame(["a red circle", "a blue square left of a green triangle", "A RED zebra"])[1] == [False, True, False]
    assert ids[2].tolist()[:3] == ids[0].tolist()[:3]  # lower-cased
    assert tok.backend.token_to_id("<unk>") in ids[2].tolist()


def test_tokenizer_save_load(tmp_path):
    tok = Tokenizer.train_word_level(["a red circle"])
    tok.save(tmp_path / "tok")
    again = Tokenizer.load(tmp_path / "tok")
    assert torch.equal(tok(["a red circle", "red"]), again(["a red circle", "red"]))
    with pytest.raises(UnfogError, match="missing"):
        Tokenizer.load(tmp_path / "nothing")


def test_fused_qkv_projection_equals_separate_ones():
    from unfog.nn.layers import Attention

    torch.manual_seed(0)
    attn = Attention(32, 4, 8)
    x = torch.randn(2, 10, 32)
    plain = attn(x)
    attn.fuse_projections()
    assert attn.qkv_weight.shape == (96, 32)
    torch.testing.assert_close(attn(x), plain, atol=1e-6, rtol=1e-5)
    assert "qkv_weight" not in attn.state_dict()  # saving still writes the separate projections
    cross = Attention(32, 4, 8, context_dim=16)
    cross.fuse_projections()
    assert getattr(cross, "qkv_weight", None) is None


@pytest.mark.parametrize("bias", [True, False])
def test_pointwise_convolution_as_matmul_equals_the_convolution(bias, monkeypatch):
    """A float32 1×1 convolution on a CPU runs as a matmul (no convolution call), with the
    convolution's result, and gradients still flow; other inputs, and a layer with hooks, take
    the layer's own forward."""
    from torch import nn

    from unfog.nn.layers import pointwise

    torch.manual_seed(0)
    conv = nn.Conv2d(12, 7, 1, bias=bias)
    x = torch.randn(3, 12, 5, 9, requires_grad=True)
    expected = torch.nn.functional.conv2d(x, conv.weight, conv.bias)
    calls = []
    real = torch.nn.functional.conv2d
    monkeypatch.setattr(torch.nn.functional, "conv2d", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = pointwise(conv, x)
    assert not calls, "the float32 CPU path should not call the convolution"
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert x.grad is not None and conv.weight.grad is not None
    hooked = nn.Conv2d(12, 7, 1, bias=bias)
    hooked.register_forward_hook(lambda m, i, o: None)
    half = nn.Conv2d(12, 7, 1, bias=bias).to(torch.bfloat16)
    for layer, inp in ((half, x.detach().to(torch.bfloat16)), (conv, x.detach().contiguous(memory_format=torch.channels_last)), (hooked, x.detach())):
        calls.clear()
        pointwise(layer, inp)
        assert calls, "bfloat16, channels_last and hooked layers take the layer's forward"


def test_the_unet_runs_its_pointwise_convolutions_as_matmuls(monkeypatch):
    """In float32 on a CPU no 1×1 convolution of the U-Net (transformer projections, shortcuts)
    reaches the convolution kernel."""
    cfg = UNetConfig(in_channels=4, out_channels=4, block_channels=[16, 32], layers_per_block=1, attention_levels=[True, True], num_heads=2,
                     context_dim=24, norm_groups=8)
    net = UNet(cfg).eval()
    assert any(m.kernel_size == (1, 1) for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    kernels = []
    real = torch.nn.functional.conv2d
    monkeypatch.setattr(torch.nn.functional, "conv2d", lambda x, w, *a, **k: kernels.append(tuple(w.shape[2:])) or real(x, w, *a, **k))
    with torch.no_grad():
        net(torch.randn(2, 4, 8, 8), torch.tensor([3.0, 500.0]), torch.randn(2, 5, 24))
    assert kernels and (1, 1) not in kernels


def _kv_net():
    torch.manual_seed(0)
    return UNet(UNetConfig(in_channels=4, out_channels=4, block_channels=[16, 32], layers_per_block=1, attention_levels=[True, True], num_heads=2, context_dim=8, norm_groups=8)).eval()


def test_cross_attention_keys_and_values_are_kept_for_one_generations_context(monkeypatch):
    """At inference the text context is the same at every step: each cross-attention layer
    computes its keys and values once and reuses them, giving exactly the uncached output, and
    computes them afresh when the context's values (changed in place) or the key/value weights
    change."""
    import copy

    net = _kv_net()
    cross = [m for n, m in net.named_modules() if n.endswith("attn2")]
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 10.0])
    ctx = torch.randn(2, 3, 8)

    def fresh(c):  # a copy holds no kept values (copy.deepcopy drops them)
        with torch.inference_mode():
            return copy.deepcopy(net)(x, t, c)

    from unfog.nn.layers import Attention

    calls = []
    heads = Attention._heads

    def counted(self, proj, inp):  # counts key projections of cross-attention (a hook would turn keeping off)
        if self in cross and proj is self.to_k:
            calls.append(1)
        return heads(self, proj, inp)

    monkeypatch.setattr(Attention, "_heads", counted)
    with torch.inference_mode():
        first = net(x, t, ctx)
        n_first = len(calls)
        assert n_first == len(cross) and all("_packed_kv" in m.__dict__ for m in cross)
        again = net(x, t, ctx.clone())  # equal values in another tensor: the same generation
        assert len(calls) == n_first and torch.equal(again, first)
        assert torch.equal(first, fresh(ctx))
        ctx.mul_(-1)  # changed in place: recomputed
        before = len(calls)
        changed = net(x, t, ctx)
        assert len(calls) == before + n_first and torch.equal(changed, fresh(ctx))
    with torch.no_grad():
        cross[0].to_v.weight.mul_(2)  # a weight changed (with a version counter)
    with torch.inference_mode():
        assert torch.equal(net(x, t, ctx), fresh(ctx))


def test_cross_attention_keeps_nothing_when_training():
    net = _kv_net().train()
    ctx = torch.randn(2, 3, 8, requires_grad=True)
    net(torch.randn(2, 4, 8, 8), torch.tensor([10.0, 20.0]), ctx).square().mean().backward()
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0
    assert not any("_packed_kv" in m.__dict__ for m in net.modules()) and "_packed_context" not in net.__dict__


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_kept_cross_attention_values_follow_dtype_inference_weights_and_tracing():
    """What keeps keys and values must not outlive what they were made from: the network's dtype
    (optimize() after a first image), weights made under inference mode and loaded over in place
    (no version counter), and a torch.jit trace (which would bake one prompt's values in)."""
    import copy

    net, other = _kv_net(), _kv_net()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.1)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 10.0]), torch.randn(2, 3, 8)
    with torch.no_grad():
        net(x, t, ctx)
        half = copy.deepcopy(net).to(torch.bfloat16)
        net.to(torch.bfloat16)
        assert torch.equal(net(x.bfloat16(), t, ctx), half(x.bfloat16(), t, ctx))
    with torch.inference_mode():
        made = copy.deepcopy(other)
        frozen = _kv_net()  # parameters made under inference mode
        assert frozen.conv_in.weight.is_inference()
        frozen(x, t, ctx)
        frozen.load_state_dict(made.state_dict())
        assert torch.equal(frozen(x, t, ctx), made(x, t, ctx))
    net = _kv_net()
    with torch.no_grad():
        net(x, t, ctx)
        traced = torch.jit.trace(net, (x, t, ctx), check_trace=False)
        other_ctx = torch.randn(2, 3, 8)
        assert torch.equal(traced(x, t, other_ctx), net(x, t, other_ctx))


def test_a_generation_leaves_no_kept_cross_attention_values(tiny_pipe, monkeypatch):
    """Kept for one generation only (SDXL's come to tens of MB), and used during it."""
    from unfog.nn.layers import Attention

    kept = []
    keeps = Attention._keeps_kv
    monkeypatch.setattr(Attention, "_keeps_kv", lambda self, c: kept.append(keeps(self, c)) or kept[-1])
    tiny_pipe("a red circle", num_inference_steps=2, seed=0)
    assert kept and all(kept)
    assert not any("_packed_kv" in m.__dict__ for m in tiny_pipe.unet.modules()) and "_packed_context" not in tiny_pipe.unet.__dict__


def test_a_hook_on_a_key_projection_sees_every_call():
    """Attention-editing tools hook the projections and may change their output per step: with
    a hook there, keys and values are computed on every call."""
    net = _kv_net()
    seen = []
    next(m for n, m in net.named_modules() if n.endswith("attn2")).to_k.register_forward_hook(lambda *a: seen.append(1))
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 10.0]), torch.randn(2, 3, 8)
    with torch.inference_mode():
        net(x, t, ctx)
        net(x, t, ctx)
    assert len(seen) == 2
