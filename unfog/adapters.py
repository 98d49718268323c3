"""LoRA adapters on a pipeline, with diffusers' method names so people can switch:
`load_lora_weights`, `set_adapters`, `fuse_lora` / `unfuse_lora`, `unload_lora_weights`,
`delete_adapters`, `get_list_adapters`, `get_active_adapters`.

Each adapted layer is replaced in its parent by an `Adapted` that holds the original layer
untouched; unloading puts the original layer object back, so the network is exactly what it was
(the same weight tensors, bit-identical outputs). Every change clears the pipeline's captured
CUDA graphs (they were recorded without the change) and refreshes the fused q/k/v copies of
`optimize()`.
"""

from __future__ import annotations

import contextlib
import numbers
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .errors import UnfogError, finite_number
from .nn import packed
from .nn.layers import Attention
from .nn.lora import Adapted


class LoraMixin:
    """The adapter methods of `Pipeline` (kept here so pipeline.py stays about generation)."""

    def _components(self) -> dict[str, nn.Module]:
        # (In low-memory mode the text encoders' module trees stay whole on the meta device, so
        # reading which adapters sit where needs no weights; the methods that change weights or
        # adapters bring the encoders back first, with _resident(changing=True).)
        return {"unet": self.unet, "text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}

    def _adapted_layers(self):
        for comp, module in self._components().items():
            if module is None:
                continue
            for path, layer in module.named_modules():
                if isinstance(layer, Adapted):
                    yield comp, path, layer

    def get_list_adapters(self) -> dict[str, list[str]]:
        """Loaded adapters per component: {"unet": [...], "text_encoder": [...]}."""
        out: dict[str, list[str]] = {}
        for comp, _, layer in self._adapted_layers():
            for name in layer.adapters:
                if name not in out.setdefault(comp, []):
                    out[comp].append(name)
        return out

    def _loaded(self) -> set[str]:
        return {n for names in self.get_list_adapters().values() for n in names}

    def _check_loaded(self, names: str | Sequence[str]) -> list[str]:
        """The names as a list (one name is a name, not its letters), each a loaded adapter."""
        names = [names] if isinstance(names, str) else list(names)
        loaded = self._loaded()
        missing = [n for n in names if n not in loaded]
        if missing:
            raise UnfogError(f"no adapter named {missing}; loaded: {sorted(loaded)}", "adapter_names")
        return names

    def get_active_adapters(self) -> list[str]:
        names = []
        for _, _, layer in self._adapted_layers():
            names += [n for n, w in layer.weights.items() if w != 0 and n not in names]
        return names

    def load_lora_weights(self, path: str | Path, adapter_name: str | None = None, *, strict: bool = True, weight: float = 1.0) -> str:
        """Load a LoRA file (kohya, LyCORIS LoCon/LoHa/LoKr, or diffusers/PEFT; float32, float16 or
        bfloat16) beside the U-Net's and text encoders' layers, active at `weight`. The name
        defaults to the file's stem and must be new. Everything is read and checked before the
        pipeline is touched: a file that fails leaves the pipeline as it was. Returns the name."""
        from .formats.lora import read_lora

        self._resident(changing=True)
        weight = finite_number("weight", weight)
        name = adapter_name or Path(path).stem
        if not isinstance(name, str) or not name:
            raise UnfogError(f"adapter_name must be a non-empty string, got {name!r}", "adapter_name")
        if name in self._loaded():
            raise UnfogError(f"an adapter named {name!r} is already loaded; pass another adapter_name or delete_adapters({name!r}) first", "adapter_name")
        lora = read_lora(path, self._components(), strict=strict)
        if lora.unmatched:
            import warnings

            warnings.warn(f"{path}: {len(lora.unmatched)} weights match no layer and were not loaded, e.g. {lora.unmatched[:3]}", stacklevel=2)
        for comp, adapters in lora.adapters.items():
            module = self._components()[comp]
            for target, adapter in adapters.items():
                layer = module.get_submodule(target)
                if not isinstance(layer, Adapted):
                    layer = Adapted(layer)
                    self._put(comp, target, layer)
                weight_tensor = layer.layer.weight
                layer.add(name, adapter.to(device=weight_tensor.device), weight)
        self._adapters_changed()
        return name

    def set_adapters(self, adapter_names: str | Sequence[str], adapter_weights: float | Sequence[float] | None = None) -> None:
        """Make exactly these adapters active, each at its weight (default 1.0); the others stay
        loaded at weight 0. An adapter's U-Net and text-encoder parts are scaled together."""
        names = self._check_loaded(adapter_names)
        weights = [1.0] * len(names) if adapter_weights is None else (
            [adapter_weights] * len(names) if isinstance(adapter_weights, numbers.Real) else list(adapter_weights))
        try:
            if len(weights) != len(names):
                raise UnfogError("count")
            weights = [finite_number("adapter_weights", w) for w in weights]
        except UnfogError:  # one message for every way the list can be wrong
            raise UnfogError(f"adapter_weights must be one finite number or {len(names)} of them, got {adapter_weights!r}", "adapter_weights") from None
        if any(layer.fused for _, _, layer in self._adapted_layers()):
            raise UnfogError("adapters are fused into the weights; unfuse_lora() before changing their weights")
        chosen = dict(zip(names, map(float, weights)))
        for _, _, layer in self._adapted_layers():
            layer.weights = {n: chosen.get(n, 0.0) for n in layer.adapters}
        self._adapters_changed()

    def fuse_lora(self, adapter_names: Sequence[str] | None = None, lora_scale: float = 1.0) -> None:
        """Fold the active adapters (or those named) at their weights × lora_scale into the base
        weights, in place, so generation runs at the base model's speed."""
        self._resident(changing=True)
        lora_scale = finite_number("lora_scale", lora_scale)
        if adapter_names is not None:
            adapter_names = self._check_loaded(adapter_names)
        for _, _, layer in self._adapted_layers():
            for name in list(layer.adapters):
                if adapter_names is None or name in adapter_names:
                    w = layer.weights.get(name, 0.0)
                    layer.weights[name] = w * lora_scale
                    layer.fuse(name)
                    layer.weights[name] = w
        self._adapters_changed()

    def unfuse_lora(self) -> None:
        """Take every fused adapter out of the base weights again (restored exactly)."""
        self._resident(changing=True)
        for _, _, layer in self._adapted_layers():
            layer.unfuse()
        self._adapters_changed()

    def delete_adapters(self, adapter_names: str | Sequence[str]) -> None:
        names = set(self._check_loaded(adapter_names))  # an unknown name is refused, as set_adapters (and PEFT) refuse it
        self._resident(changing=True)
        for _, _, layer in list(self._adapted_layers()):
            if names & set(layer.fused):
                layer.unfuse()
            for n in names & set(layer.adapters):
                layer.remove(n)
        self._unwrap(lambda layer: not layer.adapters)

    def unload_lora_weights(self) -> None:
        """Remove every adapter: fused ones are taken out of the weights, and each layer object
        goes back where it was, so outputs are bit-identical to never having loaded any."""
        self._resident(changing=True)
        for _, _, layer in self._adapted_layers():
            layer.unfuse()
        self._unwrap(lambda layer: True)

    @contextlib.contextmanager
    def prompt_loras(self, request):
        """The request's <lora:NAME:w> tags applied for the length of the block: NAME (a loaded
        adapter, or NAME.safetensors from the request's lora_dir, loaded for the call) at weight w
        beside the adapters already active; afterwards the adapters are as they were. The weights are
        the pipeline's own for that time, so a call from another thread meanwhile sees them too:
        such calls are not run beside others on one pipeline (the server runs one job at a time)."""
        if not request.loras:
            yield
            return
        if any(layer.fused for _, _, layer in self._adapted_layers()):
            raise UnfogError("adapters are fused into the weights; unfuse_lora() before using <lora:…> tags", "prompt")
        loaded = self._loaded()
        before = {(comp, path): dict(layer.weights) for comp, path, layer in self._adapted_layers()}
        added = []
        try:
            for name, _ in request.loras:
                if name not in loaded and name not in added:
                    self.load_lora_weights(Path(request.lora_dir) / f"{name}.safetensors", name, weight=0.0)
                    added.append(name)
            tags = dict(request.loras)
            for _, _, layer in self._adapted_layers():
                for name in layer.adapters:
                    if name in tags:
                        layer.weights[name] = tags[name]
            self._adapters_changed()
            yield
        finally:
            if added:
                self.delete_adapters(added)
            for comp, path, layer in self._adapted_layers():
                layer.weights = {n: before.get((comp, path), {}).get(n, 0.0) for n in layer.adapters}
            self._adapters_changed()

    @contextlib.contextmanager
    def _adapters_set_aside(self):
        """The plain layers back in place for a while (saving writes their weights, fused or not)."""
        wrapped = list(self._adapted_layers())
        for comp, path, layer in wrapped:
            self._put(comp, path, layer.layer)
        try:
            yield
        finally:
            for comp, path, layer in wrapped:
                self._put(comp, path, layer)

    def _put(self, comp: str, path: str, module: nn.Module) -> None:
        root = self._components()[comp]
        parent_path, _, child = path.rpartition(".")
        setattr(root.get_submodule(parent_path) if parent_path else root, child, module)

    def _unwrap(self, which) -> None:
        for comp, path, layer in list(self._adapted_layers()):
            if which(layer):
                self._put(comp, path, layer.layer)
        self._adapters_changed()

    def _adapters_changed(self) -> None:
        self.denoiser_graphs.clear()  # captured with the old computation
        for module in self._components().values():
            if module is None:
                continue
            packed.forget(module)  # optimize()'s packed copies of weights that may have changed in place
            for m in module.modules():
                if isinstance(m, Attention) and getattr(m, "qkv_weight", None) is not None:
                    m.fuse_projections()  # the fused copy of optimize() follows the (un)fused weights
        if hasattr(self.unet, "_compiled_call_impl") and self.unet._compiled_call_impl is not None:
            torch._dynamo.reset()  # the compiled U-Net was traced through the old modules
