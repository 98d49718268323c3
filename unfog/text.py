"""Prompts to framed token ids for the text encoders, and A1111's emphasis on their states.

`frame` turns each encoder's prompts into (B, W, L) ids with the same number of windows W for
every encoder and prompt (so SDXL's two encoders' states line up and both halves of guidance
have the same length), in one of three ways: windows of plain text ("chunk"), one truncated
window ("truncate"), or A1111's syntax (see unfog.prompts), which also gives each token a weight.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch

from .errors import UnfogError
from .nn import Tokenizer
from .prompts import MAX_WINDOWS, as_texts, parse_attention  # noqa: F401 (as_texts: for the pipeline, which imports prompts through text)

SYNTAXES = ("plain", "a1111")


def _check_windows(count: int) -> None:
    if count > MAX_WINDOWS:
        raise UnfogError(f"the prompt takes {count} windows of 75 tokens (each BREAK starts one); at most {MAX_WINDOWS}: shorten it", "prompt")


def frame(encoders: Sequence[tuple[Tokenizer, list[str]]], long_prompts: str = "chunk", syntax: str = "plain"
          ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """(ids per encoder, each (B, W, L); with the "a1111" syntax each encoder's token weights
    (B, W, L), from its own texts (SDXL's prompt_2 has its own emphasis), else None)."""
    if long_prompts not in ("chunk", "truncate"):
        raise UnfogError(f"long_prompts must be 'chunk' or 'truncate', got {long_prompts!r}", "long_prompts")
    if syntax not in SYNTAXES:
        raise UnfogError(f"prompt_syntax must be one of {', '.join(SYNTAXES)}, got {syntax!r}", "prompt_syntax")
    if syntax == "a1111":  # A1111 always cuts long prompts into windows
        per_encoder = [[tok.weighted_windows(parse_attention(t)) for t in texts] for tok, texts in encoders]
        count = max(len(ids) for rows in per_encoder for ids, _ in rows)
        _check_windows(count)
        framed, weights = [], []
        for (tok, _), rows in zip(encoders, per_encoder):
            empty_ids, empty_w = tok.weighted_windows([("", 1.0)])
            framed.append(torch.tensor([r[0] + empty_ids * (count - len(r[0])) for r in rows], dtype=torch.long))
            weights.append(torch.tensor([r[1] + empty_w * (count - len(r[1])) for r in rows]))
        return framed, weights
    if long_prompts == "truncate":
        framed = []
        for tok, texts in encoders:
            ids, truncated = tok.frame(texts)
            cut = [p for p, t in zip(texts, truncated) if t]
            if cut:
                warnings.warn(f"{len(cut)} prompt(s) exceed the {tok.config.context_length}-token context and were truncated: {cut[0][:60]!r}…", stacklevel=4)
            framed.append(ids[:, None])
        return framed, None
    count = max(tok.window_count(texts) for tok, texts in encoders)
    _check_windows(count)
    return [tok.windows(texts, count) for tok, texts in encoders], None


def apply_emphasis(states: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's emphasis on one window's states per row: z·w per token, then rescaled so the
    window's mean over all its values is what it was. A row without emphasis is left exactly as
    it is, and so is the mean of a row whose mean is near zero (the ratio would be noise)."""
    w = weights.to(states.device, torch.float32)[..., None]
    z = states.float()
    weighted = z * w
    before, after = z.mean(dim=(1, 2), keepdim=True), weighted.mean(dim=(1, 2), keepdim=True)
    scale = z.abs().mean(dim=(1, 2), keepdim=True)
    ratio = torch.where((after.abs() > 1e-4 * scale) & (before.abs() > 1e-4 * scale), before / after, torch.ones_like(after))
    plain = (w == 1).all(dim=1, keepdim=True)
    return torch.where(plain, z, weighted * ratio).to(states.dtype)
