"""Loading the diffusers folder layout (model_index.json, unet/, vae/, text_encoder/,
tokenizer/, scheduler/) into unfog's own networks, through explicit key maps."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers

from ..errors import UnfogError
from ..nn import Autoencoder, TextEncoder, Tokenizer, TokenizerConfig, UNet
from .folder import ModelParts
from .keymaps import (
    map_text_encoder_key, map_unet_key, map_vae_key, scheduler_config_from_diffusers, stable_diffusion_defaults,
    text_encoder_config_from_transformers, unet_config_from_diffusers, vae_config_from_diffusers,
)
from .weights import load_checked, read_safetensors

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
# CLIP's pre-tokenizer pattern: special tokens, English contractions, letter runs, single
# digits, and runs of other non-space characters.
CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def is_diffusers_folder(path: str | Path) -> bool:
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return False
    try:
        data = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return "_diffusers_version" in data or "_class_name" in data


def _json(path: Path) -> dict:
    if not path.is_file():
        raise UnfogError(f"{path} is missing")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UnfogError(f"{path} is not valid JSON: {e}") from None


def component_state(directory: Path, stem: str) -> dict[str, torch.Tensor]:
    """All tensors of one component: `stem.safetensors`, its fp16 variant, or shards listed
    in `stem.safetensors.index.json`. Pickled weights are refused."""
    for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors"):
        if (directory / name).is_file():
            return read_safetensors(directory / name)
    index = directory / f"{stem}.safetensors.index.json"
    if index.is_file():
        state = {}
        for shard in sorted(set(_json(index).get("weight_map", {}).values())):
            state.update(read_safetensors(directory / shard))
        return state
    pickles = [p.name for p in directory.glob("*") if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise UnfogError(
            f"{directory} holds only pickled weights ({', '.join(pickles)}); unfog does not load pickles because loading one can run "
            f"arbitrary code. Convert them to safetensors first: unfog convert --allow-pickle {directory / pickles[0]} OUT_DIR"
        )
    raise UnfogError(f"no {stem}.safetensors in {directory}")


def _clip_bpe(directory: Path) -> HFTokenizer:
    vocab_path, merges_path = directory / "vocab.json", directory / "merges.txt"
    for p in (vocab_path, merges_path):
        if not p.is_file():
            raise UnfogError(f"tokenizer file {p} is missing (a CLIP tokenizer needs tokenizer.json, or vocab.json and merges.txt)")
    vocab = _json(vocab_path)
    lines = merges_path.read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<|endoftext|>", end_of_word_suffix="</w>", continuing_subword_prefix="", fuse_unk=False))
    backend.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    backend.decoder = decoders.ByteLevel()
    return backend


def clip_tokenizer(directory: Path, context_length: int = 77) -> Tokenizer:
    """CLIP's byte-level BPE from vocab.json + merges.txt, framed like transformers'
    CLIPTokenizer: NFC, whitespace collapsed, lower-cased, <|startoftext|> … <|endoftext|>, padded."""
    if (directory / "tokenizer.json").is_file():  # transformers 5 saves the whole pipeline in one file
        try:
            backend = HFTokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as e:  # the tokenizers library raises its own exception types
            raise UnfogError(f"cannot read {directory / 'tokenizer.json'}: {e}") from None
    else:
        backend = _clip_bpe(directory)
    pad = "<|endoftext|>"
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (directory / name).is_file():
            value = _json(directory / name).get("pad_token")
            pad = (value.get("content") if isinstance(value, dict) else value) or pad
            break
    # transformers registers the special tokens, the pad token included, as whole-text matches:
    # with SD 2.x's pad "!", a "!" in a prompt becomes the pad id, not the BPE piece "!</w>".
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys([pad, "<|startoftext|>", "<|endoftext|>"])])
    cfg = _json(directory / "tokenizer_config.json") if (directory / "tokenizer_config.json").is_file() else {}
    length = min(int(cfg.get("model_max_length", context_length)), context_length)
    return Tokenizer(backend, TokenizerConfig(context_length=length, bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token=pad))


def native_size(root: Path, vae_factor: int) -> int:
    """The image side a diffusers-layout model was trained at: its U-Net's sample_size × the autoencoder's factor."""
    sample = _json(root / "unet" / "config.json").get("sample_size", 64)
    sample = sample[0] if isinstance(sample, (list, tuple)) and sample else sample
    if not isinstance(sample, int) or isinstance(sample, bool) or sample < 1:
        raise UnfogError(f"{root / 'unet' / 'config.json'}: sample_size must be a positive integer, got {sample!r}")
    return sample * vae_factor


def load_diffusers(path: str | Path, *, clip_skip: int = 0, prediction_type: str | None = None) -> ModelParts:
    """A Stable Diffusion 1.x / 2.x folder in diffusers' layout."""
    root = Path(path)
    index = _json(root / "model_index.json")
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if part not in index or not (root / part).is_dir():
            raise UnfogError(f"{root} lacks the {part}/ component that unfog needs")
    unet_cfg = unet_config_from_diffusers(_json(root / "unet" / "config.json"))
    vae_cfg = vae_config_from_diffusers(_json(root / "vae" / "config.json"))
    te_cfg = text_encoder_config_from_transformers(_json(root / "text_encoder" / "config.json"), clip_skip)
    sched, hints = scheduler_config_from_diffusers(_json(root / "scheduler" / "scheduler_config.json"))
    if prediction_type:
        sched.prediction_type = prediction_type
    with torch.device("meta"):
        unet, vae, te = UNet(unet_cfg), Autoencoder(vae_cfg), TextEncoder(te_cfg)
    load_checked(unet, component_state(root / "unet", "diffusion_pytorch_model"), str(root / "unet"), key_map=map_unet_key)
    load_checked(vae, component_state(root / "vae", "diffusion_pytorch_model"), str(root / "vae"), key_map=map_vae_key)
    load_checked(te, component_state(root / "text_encoder", "model"), str(root / "text_encoder"), key_map=map_text_encoder_key)
    tokenizer = clip_tokenizer(root / "tokenizer", te_cfg.context_length)
    size = native_size(root, vae_cfg.downsample_factor)
    return ModelParts(tokenizer=tokenizer, text_encoder=te.eval(), unet=unet.eval(), vae=vae.eval(), scheduler=sched,
                      defaults=stable_diffusion_defaults(hints["class"], size))
