"""Textual-inversion embeddings (Gal et al. 2022) as people share them: new tokens whose input
vectors were learned, added to the tokenizer(s) and the text encoder(s)' token embedding.

Files (safetensors only): A1111's `emb_params` (or `string_to_param.*`), diffusers' single
`{token: vectors}`, and SDXL's `clip_l` / `clip_g` pair (one set of vectors per encoder). An
embedding of n vectors becomes tokens `T`, `T_1` … `T_{n-1}`; a prompt's `T` expands to all of
them (diffusers' convention), so it works in plain prompts and in A1111's syntax alike.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from tokenizers import AddedToken
from torch import nn

from .errors import UnfogError
from .formats.weights import all_finite, read_safetensors


def read_embedding(path: Path) -> dict[str, torch.Tensor]:
    """{"": vectors} for one encoder, or {"clip_l": ..., "clip_g": ...} for SDXL; each (n, D)."""
    if path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        raise UnfogError(f"{path} is a pickle file; unfog does not load pickles because loading one can run arbitrary code. Use a .safetensors embedding")
    state = read_safetensors(path)
    if "clip_l" in state or "clip_g" in state:
        vectors = {k: state[k] for k in ("clip_l", "clip_g") if k in state}
    elif "emb_params" in state:
        vectors = {"": state["emb_params"]}
    elif any(k.startswith("string_to_param.") for k in state):
        vectors = {"": next(v for k, v in state.items() if k.startswith("string_to_param."))}
    elif len(state) == 1:
        vectors = {"": next(iter(state.values()))}
    else:
        raise UnfogError(f"{path} is not a textual-inversion embedding unfog knows (emb_params, string_to_param, clip_l/clip_g, or one tensor): keys {sorted(state)[:5]}")
    out = {}
    for k, v in vectors.items():
        v = v[None] if v.ndim == 1 else v
        if v.ndim != 2 or not v.is_floating_point() or not 1 <= v.shape[0] <= 75 or not all_finite(v):
            raise UnfogError(f"{path}: the embedding {k or 'vectors'} must be 1 to 75 finite vectors (n, width), got {tuple(v.shape)} {v.dtype}")
        out[k] = v.float()
    return out


def _as_matched(tok, piece: str) -> str:
    """A token as the tokenizer sees it in a prompt: through its normalizer (CLIP's lower-cases),
    so "EasyNegative" in a prompt finds the embedding loaded as easynegative, as in A1111."""
    normalizer = tok.backend.normalizer
    return normalizer.normalize_str(piece) if normalizer is not None else piece


class EmbeddingMixin:
    """`load_textual_inversion` and the prompt expansion of `Pipeline`."""

    def expand_embeddings(self, text: str) -> str:
        """The prompt with each loaded embedding's token spelled out as all its vector tokens."""
        for token, pieces in getattr(self, "embedding_tokens", {}).items():
            if len(pieces) > 1:
                text = re.sub(rf"(?<![\w]){re.escape(token)}(?![\w])", lambda m: " ".join(pieces), text, flags=re.IGNORECASE)
        return text

    def load_textual_inversion(self, path: str | Path, token: str | None = None) -> str:
        """Load an embedding; `token` (default: the file's stem) in a prompt then stands for its
        vectors. Everything is checked before the pipeline changes: a new token, one set of vectors
        per text encoder, each as wide as its encoder. Returns the token."""
        path = Path(path)
        token = token or path.stem
        if not isinstance(token, str) or not token.strip() or any(c.isspace() for c in token):
            raise UnfogError(f"token must be a non-empty string without spaces, got {token!r}", "token")
        vectors = read_embedding(path)
        self._resident(changing=True)  # low-memory mode: the text encoders back from disk, as new vectors change them
        pairs = [(self.tokenizer, self.text_encoder)] + ([(self.tokenizer_2, self.text_encoder_2)] if self.text_encoder_2 is not None else [])
        if len(pairs) == 2:
            if set(vectors) != {"clip_l", "clip_g"}:
                raise UnfogError(f"{path} holds vectors for one text encoder; this SDXL model needs an SDXL embedding (clip_l and clip_g)")
            per_encoder = [vectors["clip_l"], vectors["clip_g"]]
        elif "" in vectors:
            per_encoder = [vectors[""]]
        elif self.sdxl == "refiner" and "clip_g" in vectors:
            per_encoder = [vectors["clip_g"]]  # the refiner's one encoder is SDXL's second
        else:
            raise UnfogError(f"{path} is an SDXL embedding (clip_l / clip_g); this model is not SDXL base")
        if len({v.shape[0] for v in per_encoder}) != 1:
            raise UnfogError(f"{path}: clip_l and clip_g hold different numbers of vectors")
        n = per_encoder[0].shape[0]
        pieces = [token] + [f"{token}_{i}" for i in range(1, n)]
        for (tok, encoder), v in zip(pairs, per_encoder):
            if v.shape[1] != encoder.config.width:
                raise UnfogError(f"{path}: the embedding's vectors are {v.shape[1]} wide but the text encoder's tokens are {encoder.config.width}; "
                                 "it is an embedding for another model")
            taken = [p for p in pieces if tok.backend.token_to_id(_as_matched(tok, p)) is not None]
            if taken:
                raise UnfogError(f"the token {taken[0]!r} is already in the vocabulary; pass another token=", "token")
            if tok.vocab_size != encoder.token_embedding.num_embeddings:
                raise UnfogError("the tokenizer and the text encoder's embedding disagree in size; cannot add tokens")
        for (tok, encoder), v in zip(pairs, per_encoder):
            first = tok.vocab_size
            # matched in the normalized text (lower-cased, for CLIP), as a whole word, never inside another
            tok.backend.add_tokens([AddedToken(_as_matched(tok, p), normalized=True, single_word=True) for p in pieces])
            assert [tok.backend.token_to_id(_as_matched(tok, p)) for p in pieces] == list(range(first, first + n))
            old = encoder.token_embedding
            grown = nn.Embedding(first + n, old.embedding_dim, device=old.weight.device, dtype=old.weight.dtype)
            with torch.no_grad():
                grown.weight[:first] = old.weight
                grown.weight[first:] = v.to(old.weight)
            encoder.token_embedding = grown
            if encoder.config.eos_token_id is None:  # pool at the end-of-text token, not at the highest id (now a new token)
                encoder.config.eos_token_id = tok.eos_id
            encoder.config.vocab_size = first + n
        if not hasattr(self, "embedding_tokens"):
            self.embedding_tokens = {}
        self.embedding_tokens[token] = pieces
        return token
