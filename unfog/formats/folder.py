"""unfog's model folder: one subfolder per component, each a JSON config plus safetensors.

    model_index.json          format version, which components exist, sampling defaults
    scheduler/config.json     the noise process (SchedulerConfig)
    tokenizer/                tokenizer.json + config.json
    text_encoder/             config.json + model.safetensors
    tokenizer_2/, text_encoder_2/   SDXL base's second tokenizer and text encoder (OpenCLIP bigG)
    unet/                     config.json + model.safetensors
    vae/                      config.json + model.safetensors (absent for pixel-space models)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..diffusion.config import SamplingDefaults, SchedulerConfig
from ..errors import UnfogError
from ..nn import Autoencoder, AutoencoderConfig, TextEncoder, TextEncoderConfig, Tokenizer, UNet, UNetConfig
from .weights import SafetensorsFile, all_finite, load_checked

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
MAX_CONFIG_BYTES = 1 << 20
MAX_JSON_BYTES = 64 << 20  # other JSON files: a tokenizer's vocabulary (CLIP's is 2 MB), a shard index
MAX_PARAMETERS = 20_000_000_000  # per component; the largest published diffusion U-Nets are near 3 billion  # configs are a few hundred bytes; a bigger one is not read whole


@dataclass
class ModelParts:
    """Everything a pipeline is made of, as loaded from or saved to a folder."""

    tokenizer: Tokenizer
    text_encoder: TextEncoder
    unet: UNet
    vae: Autoencoder | None
    scheduler: SchedulerConfig
    defaults: SamplingDefaults = field(default_factory=SamplingDefaults)
    tokenizer_2: Tokenizer | None = None
    text_encoder_2: TextEncoder | None = None
    force_zeros_for_empty_prompt: bool = False  # SDXL base: no negative prompt → zero negative conditioning

    def __post_init__(self):
        # A token id past the encoder's embedding table fails only at generation (an IndexError; on
        # CUDA a device-side assert that spoils the process), so a mismatched pair is refused here.
        for tok, enc, name in ((self.tokenizer, self.text_encoder, "tokenizer"), (self.tokenizer_2, self.text_encoder_2, "tokenizer_2")):
            if tok is not None and enc is not None:
                ids = max(tok.backend.get_vocab(with_added_tokens=True).values(), default=-1) + 1
                if ids > enc.token_embedding.num_embeddings:
                    raise UnfogError(f"the {name} has token ids up to {ids - 1} but its text encoder embeds only {enc.token_embedding.num_embeddings} "
                                     "tokens: the tokenizer does not belong to this model (a tokenizer file from another model, or edited?)")


def read_json_object(path: Path, limit: int = MAX_JSON_BYTES) -> dict:
    """The JSON object in a file (a config, an index, a vocabulary): a missing, oversized,
    malformed or non-object file is an error naming it."""
    if not path.is_file():
        raise UnfogError(f"{path} is missing")
    if path.stat().st_size > limit:
        kind = "a config" if limit <= MAX_CONFIG_BYTES else "such a file"
        raise UnfogError(f"{path} is {path.stat().st_size} bytes; {kind} is at most {limit} (is this the right file?)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:  # (absurd nesting: RecursionError)
        raise UnfogError(f"{path} is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(data, dict):
        raise UnfogError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def read_config(path: Path, cls):
    """A dataclass from a JSON file; unknown or malformed fields name the file."""
    data = read_json_object(path, MAX_CONFIG_BYTES)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UnfogError(f"config file {path} has unknown fields {unknown}; expected fields of {cls.__name__}: {sorted(names)}")
    try:
        return cls(**data)
    except TypeError as e:
        raise UnfogError(f"config file {path} does not describe a {cls.__name__}: {e}") from None
    except UnfogError as e:
        raise UnfogError(f"config file {path}: {e}") from None


def write_config(path: Path, config) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")


def load_weights(module: nn.Module, path: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load a safetensors file into `module` through the checked loader; floating tensors are
    cast to `dtype` (files may be stored in half precision to save space)."""
    return load_checked(module, SafetensorsFile(path), f"weight file {path}", dtype=dtype)


def save_weights(module: nn.Module, path: Path, dtype: torch.dtype | None = None) -> None:
    """Write `module`'s weights, optionally cast to `dtype` (e.g. float16 to halve the size).
    Weights holding NaN or infinite values (a diverged run, a damaged adapter fused in, a cast
    that overflowed) are refused before anything is written: the loader would refuse the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype or v.dtype).contiguous().cpu().clone() for k, v in module.state_dict().items()}
    for k, v in state.items():
        if v.is_floating_point() and not all_finite(v):
            raise UnfogError(f"weight {k!r} holds NaN or infinite values{' once cast to ' + str(dtype).replace('torch.', '') if dtype else ''}; "
                             "nothing was saved (a diverged training run, or a LoRA fused with a non-finite weight?)")
    save_file(state, str(path))


def check_save_target(directory: str | Path) -> Path:
    """The folder a model may be saved to, as an absolute path ("." has no name to make siblings
    from; links are not followed): new, empty, or an unfog model folder, and not the folder this
    process is in. Checked by save_model, and by a command before it loads anything."""
    target = Path(os.path.abspath(directory))
    here = Path(os.getcwd())
    if target.exists() and (here == target.resolve() or target.resolve() in here.parents):
        raise UnfogError(f"{target} is the folder you are in (or holds it), and saving replaces the folder, which would leave you in a "
                         f"deleted one; save from outside it (e.g. cd .. and save to {target.name})")
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not _is_unfog_folder(target))):
        raise UnfogError(f"{target} exists and is not an unfog model folder; choose an empty or new directory")
    return target


def save_model(parts: ModelParts, directory: str | Path, dtype: torch.dtype | None = None) -> None:
    """Write a model folder atomically: everything goes to a temporary sibling, which then
    replaces `directory`. An existing non-empty folder that is not a model is refused."""
    target = check_save_target(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    kept: list[str] = []  # the user's own files in the folder being replaced, carried over
    old = None  # where the previous model goes during the swap: a new name, so nothing of the user's is in the way
    try:
        index = {
            "format": "unfog",
            "format_version": FORMAT_VERSION,
            "components": {name: getattr(parts, name) is not None for name in COMPONENTS},
            "defaults": dataclasses.asdict(parts.defaults),
            "force_zeros_for_empty_prompt": parts.force_zeros_for_empty_prompt,
        }
        write_config(tmp / "scheduler" / "config.json", parts.scheduler)
        parts.tokenizer.save(tmp / "tokenizer")
        if parts.tokenizer_2 is not None:
            parts.tokenizer_2.save(tmp / "tokenizer_2")
        for name, module in (("text_encoder", parts.text_encoder), ("text_encoder_2", parts.text_encoder_2), ("unet", parts.unet), ("vae", parts.vae)):
            if module is not None:
                write_config(tmp / name / "config.json", module.config)
                save_weights(module, tmp / name / WEIGHTS, dtype)
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        for p in [tmp, *tmp.rglob("*")]:  # mkdtemp makes the folder private; a model is for sharing
            p.chmod(0o755 if p.is_dir() else 0o644)
        if target.exists():
            for p in target.iterdir():
                if p.name not in MODEL_ENTRIES:
                    os.replace(p, tmp / p.name)
                    kept.append(p.name)
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            os.replace(target, old)  # (onto the new empty folder)
            try:
                os.replace(tmp, target)
            except OSError:
                os.replace(old, target)  # put the previous model back
                raise
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    except BaseException:
        if kept and not target.exists() and old is not None and old.is_dir():  # interrupted between the two renames: the old model back first
            with contextlib.suppress(OSError):
                os.replace(old, target)
        for name in kept:  # the user's files back where they were, if the swap did not happen
            if (tmp / name).exists() and target.is_dir() and not (target / name).exists():
                with contextlib.suppress(OSError):
                    os.replace(tmp / name, target / name)
        if old is not None and old.is_dir() and not any(old.iterdir()):  # made, but the swap never reached it
            old.rmdir()
        if any((tmp / name).exists() for name in kept):  # never delete the user's files: say where they are
            warnings.warn(f"saving to {target} failed, and your other files from it are in {tmp} (the previous model, if not back "
                          f"in place, is in {old}); move them back by hand", stacklevel=2)
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# A model folder's components (each a subfolder; the index says which exist), and what save_model
# writes at its top level: anything else there is the user's and is kept.
COMPONENTS = ("tokenizer", "text_encoder", "unet", "vae", "tokenizer_2", "text_encoder_2")
MODEL_ENTRIES = {"model_index.json", "scheduler", *COMPONENTS}


def _is_unfog_folder(directory: Path) -> bool:
    try:
        return read_json_object(directory / "model_index.json").get("format") == "unfog"
    except (OSError, UnfogError):
        return False


def is_model_folder(directory: str | Path) -> bool:
    return (Path(directory) / "model_index.json").is_file()


def load_model(directory: str | Path, *, clip_skip: int = 0, prediction_type: str | None = None, dtype: torch.dtype = torch.float32) -> ModelParts:
    """Read a model folder written by `save_model`. `clip_skip` takes the text states that many
    layers before the usual ones; `prediction_type` overrides the scheduler's."""
    d = Path(directory)
    if not d.is_dir():
        raise UnfogError(f"model folder {d} does not exist")
    if not is_model_folder(d):
        raise UnfogError(f"{d} is not an unfog model folder (no model_index.json); create one with Pipeline.save_pretrained or `unfog export`")
    index = read_json_object(d / "model_index.json")
    if index.get("format") != "unfog" or index.get("format_version") != FORMAT_VERSION:
        raise UnfogError(f"{d / 'model_index.json'} is not unfog format version {FORMAT_VERSION}")
    components = index.get("components", {})
    if not isinstance(components, dict) or not all(isinstance(v, bool) for v in components.values()):
        raise UnfogError(f"{d / 'model_index.json'}: components must be an object of true/false like {{\"vae\": true}}, got {components!r}")
    modules = {}
    for name, cls, cfg_cls in (("text_encoder", TextEncoder, TextEncoderConfig), ("text_encoder_2", TextEncoder, TextEncoderConfig),
                               ("unet", UNet, UNetConfig), ("vae", Autoencoder, AutoencoderConfig)):
        if name in ("vae", "text_encoder_2") and components.get(name) is not True:
            modules[name] = None
            continue
        config = read_config(d / name / "config.json", cfg_cls)
        if name.startswith("text_encoder"):
            config.skip_last_layers += clip_skip
        # Built on the meta device: no time is spent initialising weights that are replaced next.
        with torch.device("meta"):
            module = cls(config)
        count = sum(p.numel() for p in module.parameters())  # counted on the meta device: nothing allocated yet
        if count > MAX_PARAMETERS:
            raise UnfogError(f"{d / name / 'config.json'} describes a network of {count / 1e9:.1f} billion parameters; unfog loads at most "
                             f"{MAX_PARAMETERS / 1e9:.0f} billion per component (is the config right?)")
        load_weights(module, d / name / WEIGHTS, dtype)
        modules[name] = module.eval()
    scheduler = read_config(d / "scheduler" / "config.json", SchedulerConfig)
    if prediction_type:
        scheduler = dataclasses.replace(scheduler, prediction_type=prediction_type)
    force_zeros = index.get("force_zeros_for_empty_prompt", False)
    if not isinstance(force_zeros, bool):
        raise UnfogError(f"{d / 'model_index.json'}: force_zeros_for_empty_prompt must be true or false, got {force_zeros!r}")
    return ModelParts(
        tokenizer=Tokenizer.load(d / "tokenizer"),
        tokenizer_2=Tokenizer.load(d / "tokenizer_2") if modules["text_encoder_2"] is not None else None,
        force_zeros_for_empty_prompt=force_zeros,
        scheduler=scheduler,
        defaults=SamplingDefaults.from_dict(index.get("defaults", {}), f"{d / 'model_index.json'} defaults"),
        **modules,
    )
