"""The text-conditioned U-Net (Ronneberger et al. 2015; Rombach et al. 2022's latent variant).

Widths, depth, attention levels and heads come from `UNetConfig`, which can express the
Stable Diffusion 1.x, 2.x and XL U-Nets as well as the miniature models unfog trains. SDXL adds
two things, both config fields: a transformer depth per level, and "added conditioning"
(Podell et al. 2023, §2.2): the pooled text embedding and the size/crop micro-conditioning
numbers, each number embedded sinusoidally, concatenated, projected and added to the timestep
embedding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.utils.checkpoint
import torch.nn.functional as F
from torch import nn

from ..errors import UnfogError
from .checks import check_ints, check_number
from . import packed
from .layers import Downsample, ResBlock, SpatialTransformer, TimestepMLP, Upsample, share_context, timestep_embedding


def _per_level(value, levels: int, name: str) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * levels
    if len(values) != levels:
        raise UnfogError(f"UNetConfig.{name} has {len(values)} entries but there are {levels} levels")
    return values


@dataclass
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    block_channels: list[int] = field(default_factory=lambda: [320, 640, 1280, 1280])
    layers_per_block: int = 2
    attention_levels: list[bool] = field(default_factory=lambda: [True, True, True, False])
    # Either a head count per level (SD 1.x: 8) or, when head_dim is set, heads = width / head_dim (SD 2.x: 64).
    num_heads: int | list[int] = 8
    head_dim: int | None = None
    transformer_depth: int | list[int] = 1  # per level (SDXL base: 1/2/10); the middle block takes the last level's
    context_dim: int = 768
    linear_projection: bool = False
    mid_attention: bool = True
    norm_groups: int = 32
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    dropout: float = 0.0
    # SDXL's added conditioning (diffusers' names): each micro-conditioning number is embedded
    # in addition_time_embed_dim sinusoids; pooled text embedding + those embeddings, concatenated,
    # are projection_class_embeddings_input_dim wide. None: no added conditioning (SD 1.x/2.x).
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None

    def __post_init__(self):
        check_ints(self, {"in_channels": (1, 64), "out_channels": (1, 64), "block_channels": (1, 8192), "layers_per_block": (1, 16),
                          "transformer_depth": (1, 64), "context_dim": (1, 16384), "norm_groups": (1, 1024)})
        if self.head_dim is not None:
            check_ints(self, {"head_dim": (1, 1024)})
        else:
            check_ints(self, {"num_heads": (1, 1024)})
        check_number(self, "freq_shift", -10, 10)
        check_number(self, "dropout", 0, 1)
        if (self.addition_time_embed_dim is None) != (self.projection_class_embeddings_input_dim is None):
            raise UnfogError("UNetConfig: addition_time_embed_dim and projection_class_embeddings_input_dim go together (SDXL's added conditioning)")
        if self.addition_time_embed_dim is not None:
            check_ints(self, {"addition_time_embed_dim": (2, 8192), "projection_class_embeddings_input_dim": (1, 65536)})

    def depth_at(self, level: int) -> int:
        """Transformer blocks per attention block at one level (the middle block: the last level)."""
        return _per_level(self.transformer_depth, len(self.block_channels), "transformer_depth")[level]

    def heads_at(self, level: int) -> tuple[int, int]:
        """(heads, head_dim) of the attention blocks at one resolution level."""
        ch = self.block_channels[level]
        if self.head_dim is not None:
            return ch // self.head_dim, self.head_dim
        heads = _per_level(self.num_heads, len(self.block_channels), "num_heads")[level]
        return heads, ch // heads

    def micro_conditioning_count(self, pooled_dim: int) -> int | None:
        """How many micro-conditioning numbers the added conditioning takes beside a `pooled_dim`
        pooled embedding (SDXL base 6, refiner 5); None without added conditioning or if it does not divide."""
        if self.addition_time_embed_dim is None:
            return None
        count, rest = divmod(self.projection_class_embeddings_input_dim - pooled_dim, self.addition_time_embed_dim)
        return None if rest or count < 0 else count

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_channels) - 1)


class DeepCache:
    """DeepCache (Ma et al. 2023) for one generation: every `interval`-th U-Net call runs whole and
    keeps the features entering the shallowest up block; the calls between run only the
    shallowest down and up blocks on those cached deep features (the skip connections of the
    shallowest level are still computed from the current input)."""

    def __init__(self, interval: int):
        self.interval, self.calls, self.features = interval, 0, None

    def reusable(self, batch: int) -> bool:
        return self.features is not None and self.calls % self.interval != 0 and self.features.shape[0] == batch


class UNetBlock(nn.Module):
    """One resolution level: ResBlocks, each optionally followed by a SpatialTransformer, then
    an optional down- or upsampler."""

    def __init__(self, resnets: list[nn.Module], attentions: list[nn.Module] | None, resample: nn.Module | None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions) if attentions else None
        self.resample = resample


class UNet(nn.Module):
    """ε/v/x_0 network: `unet(x, t, context) -> output` shaped like x."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = c = config
        levels = len(c.block_channels)
        attn = _per_level(c.attention_levels, levels, "attention_levels")
        for ch in c.block_channels:
            if ch % c.norm_groups:
                raise UnfogError(f"UNetConfig.block_channels entry {ch} is not divisible by norm_groups={c.norm_groups}")
        ch0 = c.block_channels[0]
        temb = ch0 * 4
        self.time_embedding = TimestepMLP(ch0, temb)
        self.conv_in = nn.Conv2d(c.in_channels, ch0, 3, padding=1)

        def res(i, o):
            return ResBlock(i, o, temb, groups=c.norm_groups, dropout=c.dropout)

        def transformer(level):
            heads, hd = c.heads_at(level)
            return SpatialTransformer(c.block_channels[level], heads, hd, c.context_dim, depth=c.depth_at(level), groups=c.norm_groups, linear_proj=c.linear_projection)

        # SDXL: pooled text embedding + embedded micro-conditioning numbers → added to the timestep embedding.
        self.add_embedding = TimestepMLP(c.projection_class_embeddings_input_dim, temb) if c.addition_time_embed_dim else None

        skips = [ch0]
        self.down_blocks = nn.ModuleList()
        ch = ch0
        for level, out in enumerate(c.block_channels):
            resnets, attentions = [], []
            for _ in range(c.layers_per_block):
                resnets.append(res(ch, out))
                ch = out
                if attn[level]:
                    attentions.append(transformer(level))
                skips.append(ch)
            last = level == levels - 1
            self.down_blocks.append(UNetBlock(resnets, attentions, None if last else Downsample(ch)))
            if not last:
                skips.append(ch)

        self.mid_block = UNetBlock([res(ch, ch), res(ch, ch)], [transformer(levels - 1)] if c.mid_attention else None, None)

        self.up_blocks = nn.ModuleList()
        for level in reversed(range(levels)):
            out = c.block_channels[level]
            resnets, attentions = [], []
            for _ in range(c.layers_per_block + 1):
                resnets.append(res(ch + skips.pop(), out))
                ch = out
                if attn[level]:
                    attentions.append(transformer(level))
            self.up_blocks.append(UNetBlock(resnets, attentions, Upsample(ch) if level > 0 else None))

        self.norm_out = nn.GroupNorm(c.norm_groups, ch)
        self.conv_out = nn.Conv2d(ch, c.out_channels, 3, padding=1)
        # Training: recompute each block's activations in the backward pass instead of keeping
        # them (torch.utils.checkpoint), trading about a third more compute for far less memory.
        self.gradient_checkpointing = False

    def _run(self, block: nn.Module, *args) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor | None = None,
                time_ids: torch.Tensor | None = None, deep_cache: DeepCache | None = None) -> torch.Tensor:
        """`pooled` (B, P) and `time_ids` (B, N) are SDXL's added conditioning: required when the
        config has it, refused otherwise. `deep_cache`: one generation's DeepCache (inference,
        opt-in: Pipeline's deep_cache=k), passed per call so that generations sharing the network
        never share features."""
        c = self.config
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = timestep_embedding(t, c.block_channels[0], flip_sin_to_cos=c.flip_sin_to_cos, freq_shift=c.freq_shift)
        emb = self.time_embedding(emb.to(x.dtype))
        if self.add_embedding is not None:
            emb = emb + self.add_embedding(self.added_conditioning(pooled, time_ids).to(x.dtype))
        elif pooled is not None or time_ids is not None:
            raise UnfogError("this U-Net takes no pooled text embedding or micro-conditioning (it is not an SDXL U-Net)")
        context = self._context(context, x.dtype)

        h = self.conv_in(x)
        skips = [h]
        cache = deep_cache
        reuse = cache is not None and cache.reusable(x.shape[0])
        for level, block in enumerate(self.down_blocks):
            if reuse and level > 0:
                break
            for j, resnet in enumerate(block.resnets):
                h = self._run(resnet, h, emb)
                if block.attentions is not None:
                    h = self._run(block.attentions[j], h, context)
                skips.append(h)
            if block.resample is not None and not reuse:
                h = block.resample(h)
                skips.append(h)

        if reuse:  # DeepCache: the deep features from the last full call stand in for everything below the shallowest level
            h = cache.features
        else:
            mid = self.mid_block
            h = self._run(mid.resnets[0], h, emb)
            if mid.attentions is not None:
                h = self._run(mid.attentions[0], h, context)
            h = self._run(mid.resnets[1], h, emb)

        for i, block in enumerate(self.up_blocks):
            last = i == len(self.up_blocks) - 1
            if not last and reuse:
                continue
            if last and cache is not None and not reuse:
                cache.features = h
            for j, resnet in enumerate(block.resnets):
                h = self._run(resnet, torch.cat([h, skips.pop()], dim=1), emb)
                if block.attentions is not None:
                    h = self._run(block.attentions[j], h, context)
            if block.resample is not None:
                h = block.resample(h, size=skips[-1].shape[-2:])
        if cache is not None:
            cache.calls += 1
        return self.conv_out(F.silu(self.norm_out(h)))

    def _context(self, context: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The text context in the network's dtype. At inference on a CPU, the converted copy is
        kept and handed out again while the caller passes equal values for the same dtype (every
        step of one generation), and is shared (layers.share_context): each cross-attention layer
        computes its keys and values from it once per generation rather than once per step.
        Equality is checked by value on every call (a few microseconds), so a context changed in
        place, or another prompt in the same buffer, is converted afresh. `release_context` drops
        what is kept (the pipeline calls it when a generation ends)."""
        if torch.is_grad_enabled() or context.device.type != "cpu" or torch.compiler.is_compiling() or torch.jit.is_tracing():
            return context.to(dtype)
        held = self.__dict__.get("_packed_context")
        if (held is not None and held[1].dtype == dtype and held[0].shape == context.shape and held[0].dtype == context.dtype
                and torch.equal(held[0], context)):
            return held[1]
        converted = share_context(context.to(dtype, copy=True))
        self.__dict__["_packed_context"] = packed.Held((context.clone(), converted))  # a plain attribute, never saved, moved or copied
        return converted

    def release_context(self) -> None:
        """Drop the kept text context and every cross-attention layer's keys and values for it
        (tens of MB for SDXL), e.g. when a generation ends."""
        for m in self.modules():
            m.__dict__.pop("_packed_kv", None)
        self.__dict__.pop("_packed_context", None)

    def added_conditioning(self, pooled: torch.Tensor | None, time_ids: torch.Tensor | None) -> torch.Tensor:
        """[pooled, sinusoidal embedding of each micro-conditioning number], the add_embedding's input."""
        c = self.config
        if pooled is None or time_ids is None:
            raise UnfogError("this SDXL U-Net needs pooled= (the pooled text embedding) and time_ids= (size and crop micro-conditioning)")
        b = pooled.shape[0]
        ids = timestep_embedding(time_ids.flatten(), c.addition_time_embed_dim, flip_sin_to_cos=c.flip_sin_to_cos, freq_shift=c.freq_shift)
        added = torch.cat([pooled.float(), ids.reshape(b, -1)], dim=-1)
        if added.shape[-1] != c.projection_class_embeddings_input_dim:
            raise UnfogError(f"pooled embedding ({pooled.shape[-1]} wide) and {time_ids.shape[-1]} micro-conditioning numbers make {added.shape[-1]} "
                             f"features; this U-Net takes {c.projection_class_embeddings_input_dim}")
        return added
