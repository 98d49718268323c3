"""The full-size SDXL architectures (base and refiner U-Nets, CLIP ViT-L and OpenCLIP bigG text
encoders, the autoencoder), built on the meta device: every key and shape of diffusers' and
transformers' modules maps one-to-one onto unfog's. And one bfloat16 forward of the base U-Net
with random weights against diffusers' (slow)."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from unfog.formats.keymaps import (  # noqa: E402
    map_text_encoder_key, map_unet_key, map_vae_key, text_encoder_config_from_transformers, unet_config_from_diffusers, vae_config_from_diffusers,
)
from unfog.formats.weights import load_checked  # noqa: E402
from unfog.nn import Autoencoder, TextEncoder, UNet  # noqa: E402

BASE = {"addition_embed_type": "text_time", "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
        "cross_attention_dim": 2048, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "layers_per_block": 2,
        "projection_class_embeddings_input_dim": 2816, "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": True}
REFINER = {"addition_embed_type": "text_time", "addition_time_embed_dim": 256, "attention_head_dim": [6, 12, 24, 24], "block_out_channels": [384, 768, 1536, 1536],
           "cross_attention_dim": 1280, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"], "layers_per_block": 2,
           "projection_class_embeddings_input_dim": 2560, "sample_size": 128, "transformer_layers_per_block": 4,
           "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": True}
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
              hidden_act="quick_gelu", eos_token_id=2)
BIG_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, max_position_embeddings=77,
             hidden_act="gelu", projection_dim=1280, eos_token_id=2)
VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
           layers_per_block=2, latent_channels=4, sample_size=1024, scaling_factor=0.13025)


def meta(cls, *args, **kwargs):
    with torch.device("meta"):
        return cls(*args, **kwargs)


def shapes(state, key_map):
    out = {}
    for k, v in state.items():
        new = key_map(k)
        if new is not None:
            assert new not in out, f"two keys map to {new}"
            out[new] = tuple(v.shape)
    return out


def count(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("which, cfg, params", [("base", BASE, 2567.5), ("refiner", REFINER, 2259.5)])
def test_unet_keys_and_shapes_map_one_to_one(which, cfg, params):
    theirs = meta(diffusers.UNet2DConditionModel, **cfg)
    assert round(count(theirs) / 1e6, 1) == params
    ours = meta(UNet, unet_config_from_diffusers(dict(theirs.config)))
    assert shapes(theirs.state_dict(), map_unet_key) == {k: tuple(v.shape) for k, v in ours.state_dict().items()}


@pytest.mark.parametrize("cls, cfg, params", [("CLIPTextModel", CLIP_L, 123.1), ("CLIPTextModelWithProjection", BIG_G, 694.7)])
def test_text_encoder_keys_and_shapes_map_one_to_one(cls, cfg, params):
    config = transformers.CLIPTextConfig(**cfg)
    theirs = meta(getattr(transformers, cls), config)
    assert round(count(theirs) / 1e6, 1) == params
    ours = meta(TextEncoder, text_encoder_config_from_transformers(config.to_dict(), sdxl=True, projection=cls.endswith("Projection")))
    assert shapes(theirs.state_dict(), map_text_encoder_key) == {k: tuple(v.shape) for k, v in ours.state_dict().items()}


def test_autoencoder_keys_and_shapes_map_one_to_one():
    theirs = meta(diffusers.AutoencoderKL, **VAE)
    ours = meta(Autoencoder, vae_config_from_diffusers(dict(theirs.config)))
    assert ours.config.scaling_factor == 0.13025
    assert shapes(theirs.state_dict(), map_vae_key) == {k: tuple(v.shape) for k, v in ours.state_dict().items()}


@pytest.mark.slow
@torch.no_grad()
def test_base_unet_forward_in_bfloat16_matches_diffusers():
    """Random weights (bfloat16, shared by both modules: 5 GB), one call at a 32×32 latent."""
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        available = None
    if available is not None and available < 9e9:
        pytest.skip(f"needs about 9 GB of free memory, {available / 1e9:.1f} GB available")
    theirs = meta(diffusers.UNet2DConditionModel, **BASE).to(torch.bfloat16).to_empty(device="cpu").eval()
    g = torch.Generator().manual_seed(0)
    for p in theirs.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    ours = load_checked(meta(UNet, unet_config_from_diffusers(dict(theirs.config))), theirs.state_dict(), "diffusers SDXL U-Net",
                        key_map=map_unet_key, dtype=torch.bfloat16).eval()
    assert ours.conv_in.weight.data_ptr() == theirs.conv_in.weight.data_ptr()  # shared, not copied
    x, ctx = torch.randn(1, 4, 32, 32, generator=g).bfloat16(), torch.randn(1, 77, 2048, generator=g).bfloat16()
    pooled, ids = torch.randn(1, 1280, generator=g).bfloat16(), torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]])
    t = torch.tensor([500])
    expected = theirs(x, t, encoder_hidden_states=ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample.float()
    got = ours(x, t, ctx, pooled=pooled, time_ids=ids).float()
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 2e-2
