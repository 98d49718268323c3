"""LoRA files as people share them, read into (component, module, adapter factors).

Formats, told apart by their keys:
- kohya (sd-scripts, A1111, ComfyUI): `lora_unet_<module>`, `lora_te_<module>` (SD 1.x/2.x),
  `lora_te1_` / `lora_te2_` (SDXL's two encoders), with `.lora_down.weight`, `.lora_up.weight`
  and `.alpha`; the module is its diffusers / transformers path or (SDXL) the original layout's,
  with dots as underscores. LyCORIS's LoHa (`.hada_w1_a` …) and LoKr (`.lokr_w1` …) use the same
  names; LoCon is the same LoRA keys on convolutions.
- diffusers / PEFT: `unet.<path>.lora_A.weight` / `.lora_B.weight` (and `text_encoder.`,
  `text_encoder_2.`, or no prefix for a U-Net-only file), alpha from the `lora_adapter_metadata`
  header (`unet.lora_alpha`, `unet.r`, per-module `alpha_pattern`) or else scale 1.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ..errors import UnfogError
from ..nn.lora import Adapter, Hadamard, Kronecker, LowRank
from .keymaps import map_text_encoder_key, map_unet_key
from .single_file import ldm_unet_key
from .weights import SafetensorsFile, all_finite

KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2", "lora_te_": "text_encoder"}
PEFT_PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2"}
SUFFIXES = ("lora_down.weight", "lora_up.weight", "lora_A.weight", "lora_B.weight", "alpha", "hada_w1_a", "hada_w1_b", "hada_w2_a",
            "hada_w2_b", "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
UNSUPPORTED = {"dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", "lora_mid.weight": "LoCon's Tucker (lora_mid)", "hada_t1": "LoHa's Tucker",
               "hada_t2": "LoHa's Tucker", "lokr_t2": "LoKr's Tucker", "diff": "a full weight difference", "diff_b": "a full bias difference"}


@dataclass
class LoraFile:
    """A LoRA file read and matched to a pipeline: per component, module path → Adapter."""

    path: Path
    adapters: dict[str, dict[str, Adapter]] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)


def diffusers_unet_path(path: str) -> str:
    """unfog U-Net module path → diffusers' (the inverse of map_unet_key's renames)."""
    side = ".downsamplers.0." if path.startswith("down_blocks.") else ".upsamplers.0."
    out = (path + ".").replace(".resample.", side).replace(".to_out.", ".to_out.0.").replace(".ff.proj.", ".ff.net.0.proj.").replace(".ff.out.", ".ff.net.2.")
    return out[:-1]


def transformers_text_path(path: str) -> str:
    """unfog text encoder module path → transformers' CLIPTextModel path."""
    m = re.match(r"layers\.(\d+)\.(.*)", path)
    if not m:
        return path if path == "text_projection" else f"text_model.{path}"
    rest = m[2]
    rest = f"self_attn.{rest}" if rest in ("q_proj", "k_proj", "v_proj", "out_proj") else f"mlp.{rest}" if rest in ("fc1", "fc2") else rest
    return f"text_model.encoder.layers.{m[1]}.{rest}"


def module_names(component: str, module: nn.Module) -> dict[str, str]:
    """Every name a LoRA file may give each adaptable layer (Linear / Conv2d) of a component, in
    dotted form: unfog's own path, diffusers' / transformers' path, and for the U-Net the original
    layout's; each checked to map back through the loader's own key maps."""
    names: dict[str, str] = {}
    for path, layer in module.named_modules():
        if path.endswith(".layer"):  # the layer inside an Adapted: named by the Adapted's path
            continue
        if not isinstance(layer, (nn.Linear, nn.Conv2d)) and type(layer).__name__ != "Adapted":
            continue
        names[path] = path
        if component == "unet":
            d = diffusers_unet_path(path)
            if map_unet_key(d + ".weight") == path + ".weight":
                names[d] = path
            names[ldm_unet_key(path + ".weight", module.config).removesuffix(".weight")] = path
        else:
            t = transformers_text_path(path)
            if map_text_encoder_key(t + ".weight") == path + ".weight":
                names[t] = path
                names[t.removeprefix("text_model.")] = path
    return names


def _split(key: str) -> tuple[str, str] | None:
    for suffix in (*SUFFIXES, *UNSUPPORTED):
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    return None


def _peft_header(f: SafetensorsFile) -> dict | None:
    raw = f.metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        meta = json.loads(raw)
    except ValueError:
        raise UnfogError(f"{f.path}: the lora_adapter_metadata header is not valid JSON") from None
    if not isinstance(meta, dict):
        raise UnfogError(f"{f.path}: the lora_adapter_metadata header is not a JSON object")
    return meta


# An alpha_pattern key that is not a plain module name is a regular expression, run on every
# adapted module's path; the file is not trusted, and a pattern such as (a|a)*X or .*.*.*.*X
# backtracks for ever. So such keys are run only when small: at most MAX_PATTERN_QUANTIFIERS
# repetition operators (a path's length to that power bounds each match) and MAX_REGEX_PATTERNS of them.
MAX_PATTERN_QUANTIFIERS = 2
MAX_REGEX_PATTERNS = 16


@functools.lru_cache(maxsize=256)
def _pattern(pattern: str) -> re.Pattern | None:
    """An alpha_pattern key as a compiled pattern, or None for a plain module name (matched as text)."""
    if not re.search(r"[\\\[\]()*+?{}|^$]", pattern):
        return None
    bare = re.sub(r"\\.", "", pattern)  # escapes are literal characters
    repeats = len(re.findall(r"[*+?{]", bare.replace("(?", "(")))
    if len(pattern) > 200 or repeats > MAX_PATTERN_QUANTIFIERS or re.search(r"\)\s*(\*|\+|\{\d*,)", bare):
        raise UnfogError(f"the PEFT metadata's alpha_pattern key {pattern[:80]!r} is a pattern with more than {MAX_PATTERN_QUANTIFIERS} "
                         "repetitions, a repeated group or over 200 characters, which unfog does not run (such a pattern can take "
                         "forever to match); name the modules instead")
    try:
        return re.compile(pattern)
    except (re.error, RecursionError, OverflowError):
        raise UnfogError(f"the PEFT metadata's alpha_pattern key {pattern[:80]!r} is not a valid pattern; the file is damaged") from None


def _alpha_key_matches(key: str, path: str) -> bool:
    """Whether an alpha_pattern key names the module at `path`, as PEFT matches it
    (`(.*\.)?(key)$`: the whole path or its end after a dot)."""
    if path == key or path.endswith("." + key):
        return True
    pattern = _pattern(key)
    return pattern is not None and any(pattern.fullmatch(path, start) for start in [0] + [i + 1 for i, c in enumerate(path) if c == "."])


def _peft_alpha(meta: dict | None, component: str, path: str, rank: int) -> float:
    """PEFT's scale is lora_alpha / r, with per-module overrides in alpha_pattern (matched on the
    module path's end); without metadata diffusers takes alpha = rank (scale 1)."""
    if meta is None:
        return float(rank)
    prefix = {"unet": "unet", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2"}[component]
    alpha = meta.get(f"{prefix}.lora_alpha", meta.get("lora_alpha", rank))
    patterns = meta.get(f"{prefix}.alpha_pattern") or {}
    if not isinstance(patterns, dict):
        raise UnfogError(f"the PEFT metadata's {prefix}.alpha_pattern is {type(patterns).__name__}, not an object of module names; the file is damaged")
    if sum(_pattern(key) is not None for key in patterns) > MAX_REGEX_PATTERNS:
        raise UnfogError(f"the PEFT metadata's {prefix}.alpha_pattern has more than {MAX_REGEX_PATTERNS} patterns that are not module names; "
                         "unfog does not run that many")
    alpha = next((value for key, value in patterns.items() if _alpha_key_matches(key, path)), alpha)  # the first that matches, as PEFT takes it
    try:
        return float(alpha)
    except (TypeError, ValueError):
        raise UnfogError(f"the PEFT metadata gives {path} the lora_alpha {alpha!r}, which is not a number; the file is damaged") from None


def read_lora(path: str | Path, components: dict[str, nn.Module], *, strict: bool = True) -> LoraFile:
    """Read a LoRA file and match every adapter to a layer of `components` ({"unet": ...,
    "text_encoder": ..., "text_encoder_2": ...}). Shapes are checked against each layer; a name
    that matches no layer is an error listing it (with strict=False it is left out, and listed
    in `unmatched`). Nothing in `components` is changed."""
    path = Path(path)
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        raise UnfogError(f"{path} is a pickle file; unfog does not load pickles because loading one can run arbitrary code. "
                         "Use the LoRA's .safetensors release")
    f = SafetensorsFile(path)
    groups: dict[tuple[str, str, str], dict[str, str]] = {}  # (format, component, name) → suffix → key
    unknown = []
    for key in f:
        split = _split(key)
        found = None
        if split is not None:
            name, suffix = split
            for prefix, comp in KOHYA_PREFIXES.items():
                if name.startswith(prefix):
                    found = ("kohya", comp, name[len(prefix):])
                    break
            else:
                if suffix in ("lora_A.weight", "lora_B.weight"):
                    comp = next((c for p, c in PEFT_PREFIXES.items() if name.startswith(p)), None)
                    name = name[len(next(p for p, c in PEFT_PREFIXES.items() if c == comp)):] if comp else name.removeprefix("base_model.model.")
                    found = ("peft", comp or "unet", name)
        if found is None:
            unknown.append(key)
            continue
        if split[1] in UNSUPPORTED:
            raise UnfogError(f"{path}: {key!r} is {UNSUPPORTED[split[1]]}, which unfog does not load")
        groups.setdefault(found, {})[split[1]] = key
    if unknown:
        raise UnfogError(f"{path} is not a LoRA file unfog knows (kohya, LyCORIS or diffusers/PEFT): keys such as {unknown[:3]}")
    tables = {c: module_names(c, m) for c, m in components.items() if m is not None}
    underscored = {c: {n.replace(".", "_"): p for n, p in t.items()} for c, t in tables.items()}
    out = LoraFile(path)
    header = _peft_header(f)
    for (fmt, comp, name), parts in groups.items():
        table = underscored if fmt == "kohya" else tables
        target = table.get(comp, {}).get(name)
        if target is None:
            shown = next(iter(parts.values()))
            if comp not in tables:
                out.unmatched.append(f"{shown} (this model has no {comp})")
            else:
                out.unmatched.append(shown)
            continue
        layer = components[comp].get_submodule(target)
        layer = getattr(layer, "layer", layer)
        out.adapters.setdefault(comp, {})[target] = _adapter(f, parts, layer, fmt, comp, name, header)
    if out.unmatched and strict:
        kinds = ", ".join(f"{c}" for c in tables)
        raise UnfogError(f"{path}: {len(out.unmatched)} LoRA weights match no layer of this model ({kinds}), e.g. {out.unmatched[:3]}; "
                         "is it a LoRA for another architecture (SD 1.x, 2.x or XL)? strict=False loads the rest")
    if not out.adapters:
        raise UnfogError(f"{path}: no LoRA weight in it matches a layer of this model; is it a LoRA for another architecture?")
    return out


def _adapter(f: SafetensorsFile, parts: dict[str, str], layer: nn.Module, fmt: str, comp: str, name: str, header: dict | None) -> Adapter:
    def t(suffix):
        if suffix not in parts:
            raise UnfogError(f"{where} has {sorted(parts)} but lacks {suffix}; the file is damaged")
        return f[parts[suffix]].float()

    shape = tuple(layer.weight.shape)
    where = f"{f.path}: {next(iter(parts.values())).rsplit('.', 2)[0]}"
    alpha = None
    if "alpha" in parts:
        a = t("alpha")
        if a.numel() != 1 or not all_finite(a):
            raise UnfogError(f"{where}: alpha must be one finite number, got {a.numel()} value(s) {a.flatten()[:4].tolist()}; the file is damaged")
        alpha = a.item()
    if "hada_w1_a" in parts or any(s.startswith("lokr_") for s in parts):  # LyCORIS
        try:
            if "hada_w1_a" in parts:
                adapter = Hadamard(t("hada_w1_a"), t("hada_w1_b"), t("hada_w2_a"), t("hada_w2_b"), alpha, shape)
            else:
                w1 = [t("lokr_w1")] if "lokr_w1" in parts else [t("lokr_w1_a"), t("lokr_w1_b")]
                w2 = [t("lokr_w2")] if "lokr_w2" in parts else [t("lokr_w2_a"), t("lokr_w2_b")]
                adapter = Kronecker(w1, w2, alpha, shape)
            fits = adapter.fits(shape)  # checked before delta() builds anything
        except UnfogError:
            raise
        except (ValueError, IndexError) as e:
            raise UnfogError(f"{where}: the LyCORIS factors do not combine ({e})") from None
        if not fits:
            raise UnfogError(f"{where}: the adapter's factors make a {adapter.delta_shape()} update but the layer's weight is {shape}; "
                             "is it for another architecture?")
    else:
        down_key, up_key = ("lora_down.weight", "lora_up.weight") if fmt == "kohya" else ("lora_A.weight", "lora_B.weight")
        if down_key not in parts or up_key not in parts:
            raise UnfogError(f"{where} has {sorted(parts)} but a LoRA needs both {down_key} and {up_key}")
        down, up = t(down_key), t(up_key)
        if down.ndim not in (2, 4) or up.ndim != down.ndim:
            raise UnfogError(f"{where}: LoRA weights must be matrices (or 4-d for a convolution), got down {tuple(down.shape)} and up {tuple(up.shape)}; the file is damaged")
        conv = isinstance(layer, nn.Conv2d)
        if conv and down.ndim == 2 and layer.kernel_size == (1, 1):  # a 1×1 convolution trained as a Linear (SD 2.x vs 1.x proj_in)
            down, up = down[:, :, None, None], up[:, :, None, None]
        if not conv and down.ndim == 4 and down.shape[2:] == (1, 1):
            down, up = down[:, :, 0, 0], up[:, :, 0, 0]
        want_down = (down.shape[0], *shape[1:2], *(layer.kernel_size if conv else ()))
        want_up = (shape[0], down.shape[0], *((1, 1) if conv else ()))
        if tuple(down.shape) != want_down or tuple(up.shape) != want_up:
            raise UnfogError(f"{where}: LoRA shapes down {tuple(down.shape)} / up {tuple(up.shape)} do not fit the layer's weight {shape} "
                             f"(rank {down.shape[0]} needs down {want_down} and up {want_up}); is it a LoRA for another architecture?")
        if fmt == "peft":
            alpha = _peft_alpha(header, comp, name, down.shape[0])
        try:
            adapter = LowRank(down, up, alpha)
        except ValueError:
            raise UnfogError(f"{where}: a LoRA of rank 0 (down {tuple(down.shape)}); the file is damaged") from None
    if not all(all_finite(p) for p in adapter.parameters()) or not math.isfinite(adapter.scale):
        raise UnfogError(f"{where}: holds NaN or infinite values (or an alpha that makes its scale so); the file is damaged")
    return adapter
