"""Loading the diffusers folder layout (model_index.json, unet/, vae/, text_encoder/,
tokenizer/, scheduler/) into unfog's own networks, through explicit key maps."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers

from ..errors import UnfogError
from ..nn import Autoencoder, TextEncoder, Tokenizer, TokenizerConfig, UNet
from .folder import ModelParts, read_json_object
from .keymaps import (
    map_text_encoder_key, map_unet_key, map_vae_key, scheduler_config_from_diffusers, stable_diffusion_defaults,
    text_encoder_config_from_transformers, unet_config_from_diffusers, vae_config_from_diffusers,
)
from .weights import lazy_state, load_checked

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
# CLIP's pre-tokenizer pattern: special tokens, English contractions, letter runs, single
# digits, and runs of other non-space characters.
CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def is_diffusers_folder(path: str | Path) -> bool:
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return False
    try:
        data = read_json_object(index)
    except UnfogError:
        return False
    return "_diffusers_version" in data or "_class_name" in data


def translated(fn, path: Path, *args, **kwargs):
    """fn(the JSON object in path, …): a diffusers or transformers config turned into unfog's.
    A field missing or of the wrong kind (a KeyError or TypeError inside the translation) is an
    error naming the file, not a traceback."""
    data = read_json_object(path)
    try:
        return fn(data, *args, **kwargs)
    except UnfogError as e:  # a value the config dataclass refused: said with the file it came from
        raise UnfogError(f"{path}: {e}", e.field) from None
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError) as e:
        raise UnfogError(f"{path}: a field is missing or of the wrong kind ({type(e).__name__}: {str(e)[:200]}); is this config from a model unfog loads?") from None


def component_state(directory: Path, stem: str) -> dict:
    """All tensors of one component, each read when loaded (LazyTensors): `stem.safetensors`, its
    fp16 variant, or shards listed in `stem.safetensors.index.json`. Pickled weights are refused."""
    for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors"):
        if (directory / name).is_file():
            return lazy_state(directory / name)
    index = directory / f"{stem}.safetensors.index.json"
    if index.is_file():
        state = {}
        weight_map = read_json_object(index).get("weight_map", {})
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) and v and Path(v).name == v and v != ".." for v in weight_map.values()):
            raise UnfogError(f"{index}: weight_map must map tensor names to shard file names in this folder")
        for shard in sorted(set(weight_map.values())):
            state.update(lazy_state(directory / shard))
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
    vocab = read_json_object(vocab_path)
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


def clip_tokenizer(directory: Path, context_length: int = 77, pad: str | None = None) -> Tokenizer:
    """CLIP's byte-level BPE from vocab.json + merges.txt, framed like transformers'
    CLIPTokenizer: NFC, whitespace collapsed, lower-cased, <|startoftext|> … <|endoftext|>, padded
    (with the folder's pad token, or `pad` when given)."""
    if (directory / "tokenizer.json").is_file():  # transformers 5 saves the whole pipeline in one file
        try:
            backend = HFTokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as e:  # the tokenizers library raises its own exception types
            raise UnfogError(f"cannot read {directory / 'tokenizer.json'}: {e}") from None
    else:
        backend = _clip_bpe(directory)
    pad_override, pad = pad, "<|endoftext|>"
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (directory / name).is_file():
            value = read_json_object(directory / name).get("pad_token")
            pad = (value.get("content") if isinstance(value, dict) else value) or pad
            if not isinstance(pad, str):
                raise UnfogError(f"{directory / name}: pad_token must be a string, got {pad!r}")
            break
    pad = pad if pad_override is None else pad_override
    # transformers registers the special tokens, the pad token included, as whole-text matches:
    # with SD 2.x's pad "!", a "!" in a prompt becomes the pad id, not the BPE piece "!</w>".
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys([pad, "<|startoftext|>", "<|endoftext|>"])])
    cfg = read_json_object(directory / "tokenizer_config.json") if (directory / "tokenizer_config.json").is_file() else {}
    length = cfg.get("model_max_length", context_length)
    if not isinstance(length, (int, float)) or isinstance(length, bool) or not length >= 1:  # (transformers writes 1e30 for "no limit")
        raise UnfogError(f"{directory / 'tokenizer_config.json'}: model_max_length must be a positive number, got {length!r}")
    length = int(min(length, context_length))
    return Tokenizer(backend, TokenizerConfig(context_length=length, bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token=pad))


def native_size(root: Path, vae_factor: int) -> int:
    """The image side a diffusers-layout model was trained at: its U-Net's sample_size × the autoencoder's factor."""
    sample = read_json_object(root / "unet" / "config.json").get("sample_size", 64)
    sample = sample[0] if isinstance(sample, (list, tuple)) and sample else sample
    if not isinstance(sample, int) or isinstance(sample, bool) or sample < 1:
        raise UnfogError(f"{root / 'unet' / 'config.json'}: sample_size must be a positive integer, got {sample!r}")
    return sample * vae_factor


def _present(index: dict, root: Path, part: str) -> bool:
    """Whether model_index.json lists a component (diffusers writes [null, null] for an absent one) and its folder exists."""
    entry = index.get(part)
    return isinstance(entry, list) and len(entry) == 2 and entry[0] is not None and (root / part).is_dir()


def load_text_encoder(root: Path, part: str, *, clip_skip: int, sdxl: bool, dtype: torch.dtype = torch.float32) -> TextEncoder:
    state = component_state(root / part, "model")
    cfg = translated(text_encoder_config_from_transformers, root / part / "config.json", clip_skip, sdxl=sdxl,
                                                projection=any(k.endswith("text_projection.weight") for k in state))
    with torch.device("meta"):
        te = TextEncoder(cfg)
    return load_checked(te, state, str(root / part), key_map=map_text_encoder_key, dtype=dtype).eval()


def load_diffusers(path: str | Path, *, clip_skip: int = 0, prediction_type: str | None = None, dtype: torch.dtype = torch.float32) -> ModelParts:
    """A Stable Diffusion 1.x / 2.x / XL (base or refiner) folder in diffusers' layout."""
    root = Path(path)
    index = read_json_object(root / "model_index.json")
    sdxl = _present(index, root, "text_encoder_2")
    needed = ["unet", "vae", "scheduler"] + (["tokenizer_2"] if sdxl else ["text_encoder", "tokenizer"])
    for part in needed:
        if not _present(index, root, part):
            raise UnfogError(f"{root} lacks the {part}/ component that unfog needs")
    unet_cfg = translated(unet_config_from_diffusers, root / "unet" / "config.json")
    vae_cfg = translated(vae_config_from_diffusers, root / "vae" / "config.json")
    sched, hints = translated(scheduler_config_from_diffusers, root / "scheduler" / "scheduler_config.json")
    if prediction_type:
        sched.prediction_type = prediction_type
    with torch.device("meta"):
        unet, vae = UNet(unet_cfg), Autoencoder(vae_cfg)
    load_checked(unet, component_state(root / "unet", "diffusion_pytorch_model"), str(root / "unet"), key_map=map_unet_key, dtype=dtype)
    load_checked(vae, component_state(root / "vae", "diffusion_pytorch_model"), str(root / "vae"), key_map=map_vae_key, dtype=dtype)
    # SDXL's refiner has only the second encoder (OpenCLIP bigG): unfog holds it as its one encoder.
    encoders = [(part, tok) for part, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")) if _present(index, root, part)]
    loaded = []
    for part, tok in encoders:
        te = load_text_encoder(root, part, clip_skip=clip_skip, sdxl=sdxl, dtype=dtype)
        loaded.append((te, clip_tokenizer(root / tok, te.config.context_length)))
    (te, tokenizer), second = loaded[0], (loaded[1] if len(loaded) > 1 else (None, None))
    size = native_size(root, vae_cfg.downsample_factor)
    parts = ModelParts(tokenizer=tokenizer, text_encoder=te, unet=unet.eval(), vae=vae.eval(), scheduler=sched,
                       defaults=stable_diffusion_defaults(hints["class"], size), text_encoder_2=second[0], tokenizer_2=second[1],
                       force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", False)) and sdxl)
    check_aesthetics_flag(index.get("requires_aesthetics_score"), unet_cfg, parts, str(root / "model_index.json"))
    return parts


def check_aesthetics_flag(flag, unet_cfg, parts: ModelParts, source: str) -> None:
    """An SDXL refiner's config says requires_aesthetics_score; its U-Net takes 5 micro-conditioning
    numbers where the base takes 6. A folder whose flag and U-Net disagree is a mix of the two."""
    if flag is None or unet_cfg.addition_time_embed_dim is None:
        return
    last = parts.text_encoder_2 or parts.text_encoder
    count = unet_cfg.micro_conditioning_count(last.config.projection_dim or last.config.width)
    if bool(flag) != (count == 5):
        raise UnfogError(f"{source} says requires_aesthetics_score={bool(flag)} (an SDXL {'refiner' if flag else 'base'}) but the U-Net is an SDXL "
                         f"{'refiner' if count == 5 else 'base'} ({count} micro-conditioning numbers); the components come from different models")
