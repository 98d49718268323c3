import pytest
import torch

from unfog import Pipeline
from unfog.diffusion import SchedulerConfig
from unfog.nn import Autoencoder, AutoencoderConfig, TextEncoder, TextEncoderConfig, Tokenizer, UNet, UNetConfig

CAPTIONS = [
    "a red circle", "a blue square on the left", "a green triangle above a yellow circle",
    "a small purple square", "a big orange triangle at the bottom", "on a black background",
]


def tiny_pipeline(*, latent: bool = True, prediction_type: str = "epsilon", seed: int = 0) -> Pipeline:
    """A randomly initialised miniature of Stable Diffusion, small enough for unit tests."""
    torch.manual_seed(seed)
    tok = Tokenizer.train_word_level(CAPTIONS)
    te = TextEncoder(TextEncoderConfig(vocab_size=tok.vocab_size, context_length=tok.config.context_length, width=32, layers=2, heads=2, mlp_width=64, activation="gelu", eos_token_id=tok.eos_id))
    vae = AutoencoderConfig(block_channels=[16, 32], layers_per_block=1, norm_groups=8, latent_channels=4, scaling_factor=0.5) if latent else None
    unet = UNet(UNetConfig(in_channels=4 if latent else 3, out_channels=4 if latent else 3, block_channels=[32, 64], layers_per_block=1, attention_levels=[False, True], num_heads=2, context_dim=32, norm_groups=8))
    return Pipeline(tok, te, unet, Autoencoder(vae) if vae else None, SchedulerConfig(prediction_type=prediction_type), {"height": 32, "width": 32, "num_inference_steps": 4})


@pytest.fixture(scope="session")
def tiny_pipe() -> Pipeline:
    return tiny_pipeline()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_pipe):
    d = tmp_path_factory.mktemp("models") / "tiny"
    tiny_pipe.save_pretrained(d)
    return d
