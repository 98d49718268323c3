"""The full-size Stable Diffusion 1.5 architectures with random weights: one forward of each
network in unfog matches diffusers / transformers. Slow (about a minute on 2 cores)."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from unfog.formats.weights import load_checked  # noqa: E402
from unfog.formats.keymaps import (  # noqa: E402
    map_text_encoder_key, map_unet_key, map_vae_key, text_encoder_config_from_transformers, unet_config_from_diffusers, vae_config_from_diffusers,
)
from unfog.nn import Autoencoder, TextEncoder, UNet  # noqa: E402

pytestmark = pytest.mark.slow


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def count(m):
    return sum(p.numel() for p in m.parameters())


def ours_from(theirs, cls, config, key_map):
    with torch.device("meta"):
        module = cls(config)
    return load_checked(module, theirs.state_dict(), cls.__name__, key_map=key_map)


@torch.no_grad()
def test_sd15_unet():
    torch.manual_seed(0)
    theirs = diffusers.UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=64).eval()
    assert round(count(theirs) / 1e6, 1) == 859.5
    ours = ours_from(theirs, UNet, unet_config_from_diffusers(dict(theirs.config)), map_unet_key)
    x, ctx = torch.randn(1, 4, 32, 32), torch.randn(1, 77, 768)
    t = torch.tensor([421])
    assert rel_err(ours(x, t, ctx), theirs(x, t, encoder_hidden_states=ctx).sample) < 1e-5


@torch.no_grad()
def test_sd15_autoencoder():
    torch.manual_seed(0)
    theirs = diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                                     up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=512).eval()
    assert round(count(theirs) / 1e6, 1) == 83.7
    ours = ours_from(theirs, Autoencoder, vae_config_from_diffusers(dict(theirs.config)), map_vae_key)
    z = torch.randn(1, 4, 16, 16)
    assert rel_err(ours.decode(z), theirs.decode(z).sample) < 1e-5


@torch.no_grad()
def test_sd15_text_encoder():
    torch.manual_seed(0)
    cfg = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                      max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407)
    theirs = transformers.CLIPTextModel(cfg).eval()
    assert round(count(theirs) / 1e6, 1) == 123.1
    ours = ours_from(theirs, TextEncoder, text_encoder_config_from_transformers(cfg.to_dict()), map_text_encoder_key)
    ids = torch.randint(0, 49406, (2, 77))
    ids[:, 0], ids[:, 9] = 49406, 49407
    ids[:, 10:] = 49407
    out = theirs(ids)
    states, pooled = ours(ids)
    assert rel_err(states, out.last_hidden_state) < 1e-5 and rel_err(pooled, out.pooler_output) < 1e-5
