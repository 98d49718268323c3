"""Tokenizer: a `tokenizers.Tokenizer` plus the fixed-length framing a text encoder expects:
[bos] tokens… [eos] [pad]…, truncated to `context_length`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, normalizers, pre_tokenizers, trainers

from ..errors import UnfogError
from .checks import check_ints


@dataclass
class TokenizerConfig:
    context_length: int = 77
    bos_token: str = "<|startoftext|>"
    eos_token: str = "<|endoftext|>"
    pad_token: str = "<|endoftext|>"

    def __post_init__(self):
        check_ints(self, {"context_length": (3, 4096)})  # bos + at least one token + eos
        for name in ("bos_token", "eos_token", "pad_token"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise UnfogError(f"TokenizerConfig.{name} must be a non-empty string, got {getattr(self, name)!r}")


class Tokenizer:
    """`tokenizer(texts) -> LongTensor (B, context_length)`; `frame` also says which were cut off."""

    def __init__(self, backend: HFTokenizer, config: TokenizerConfig):
        self.backend = backend
        self.config = config
        ids = []
        for name in (config.bos_token, config.eos_token, config.pad_token):
            i = backend.token_to_id(name)
            if i is None:
                raise UnfogError(f"special token {name!r} is not in the tokenizer's vocabulary")
            ids.append(i)
        self.bos_id, self.eos_id, self.pad_id = ids

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids without framing, one list per text."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        """(B, context_length) framed ids; longer texts are cut off (see `frame`)."""
        return self.frame([texts] if isinstance(texts, str) else texts)[0]

    def frame(self, texts: Sequence[str]) -> tuple[torch.Tensor, list[bool]]:
        """Framed ids (B, context_length) and, per text, whether it was cut off to fit."""
        n = self.config.context_length
        rows, truncated = [], []
        for ids in self.encode(texts):
            truncated.append(len(ids) > n - 2)
            ids = [self.bos_id, *ids[: n - 2], self.eos_id]
            rows.append(ids + [self.pad_id] * (n - len(ids)))
        return torch.tensor(rows, dtype=torch.long), truncated

    def window_count(self, texts: Sequence[str]) -> int:
        """How many windows `windows` needs for the longest of these texts."""
        n = self.config.context_length - 2
        return max(1, *((len(ids) + n - 1) // n for ids in self.encode(texts)))

    def windows(self, texts: Sequence[str], count: int | None = None) -> torch.Tensor:
        """(B, W, context_length): each text cut into windows of context_length - 2 tokens,
        each framed as [bos] … [eos] [pad]…; shorter texts get empty windows, so all have W
        (`count`, at least `window_count(texts)`)."""
        n = self.config.context_length - 2
        token_lists = self.encode(texts)
        count = max(count or 1, *((len(ids) + n - 1) // n for ids in token_lists))
        rows = []
        for ids in token_lists:
            chunks = [ids[k : k + n] for k in range(0, n * count, n)]
            rows.append([[self.bos_id, *c, self.eos_id] + [self.pad_id] * (n - len(c)) for c in chunks])
        return torch.tensor(rows, dtype=torch.long)

    def weighted_windows(self, fragments: Sequence[tuple[str, float]], comma_backtrack: int = 20) -> tuple[list[list[int]], list[list[float]]]:
        """A1111's windows of (text, weight) fragments (see unfog.prompts): each token carries its
        fragment's weight; a window holds context_length - 2 tokens framed [bos] … [eos] [pad]…
        (weight 1 at the frame); ("BREAK", -1) closes the window; a window that fills up within
        `comma_backtrack` tokens after a comma is cut after the comma, the rest moving on."""
        n = self.config.context_length - 2
        comma = self.backend.token_to_id(",</w>") or self.backend.token_to_id(",")
        windows: list[tuple[list[int], list[float]]] = []
        ids: list[int] = []
        weights: list[float] = []
        last_comma = -1

        def close() -> None:
            nonlocal ids, weights, last_comma
            pad = n - len(ids)
            windows.append(([self.bos_id, *ids, self.eos_id] + [self.pad_id] * pad, [1.0, *weights, 1.0] + [1.0] * pad))
            ids, weights, last_comma = [], [], -1

        texts = [t for t, w in fragments if w != -1]
        encoded = iter(self.encode(texts)) if texts else iter(())
        for text, weight in fragments:
            if weight == -1:  # BREAK
                close()
                continue
            for token in next(encoded):
                if token == comma:
                    last_comma = len(ids)
                elif comma_backtrack and len(ids) == n and last_comma != -1 and len(ids) - last_comma <= comma_backtrack:
                    cut = last_comma + 1
                    moved = ids[cut:], weights[cut:]
                    ids, weights = ids[:cut], weights[:cut]
                    close()
                    ids, weights = list(moved[0]), list(moved[1])
                if len(ids) == n:
                    close()
                ids.append(token)
                weights.append(weight)
        if ids or not windows:
            close()
        return [w[0] for w in windows], [w[1] for w in windows]

    @classmethod
    def train_word_level(cls, texts: Iterable[str], config: TokenizerConfig | None = None, *, min_frequency: int = 1) -> "Tokenizer":
        """A lower-cased word-level vocabulary built from the given captions."""
        config = config or TokenizerConfig(context_length=32, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
        backend = HFTokenizer(models.WordLevel(unk_token="<unk>"))
        backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
        specials = list(dict.fromkeys([config.pad_token, config.bos_token, config.eos_token, "<unk>"]))
        trainer = trainers.WordLevelTrainer(special_tokens=specials, min_frequency=min_frequency)
        backend.train_from_iterator(texts, trainer)
        return cls(backend, config)

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(d / "tokenizer.json"))
        (d / "config.json").write_text(json.dumps(asdict(self.config), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> "Tokenizer":
        d = Path(directory)
        for name in ("tokenizer.json", "config.json"):
            if not (d / name).is_file():
                raise UnfogError(f"tokenizer file {d / name} is missing")
        try:
            backend = HFTokenizer.from_file(str(d / "tokenizer.json"))
            config = TokenizerConfig(**json.loads((d / "config.json").read_text()))
        except Exception as e:  # the tokenizers library raises its own exception types
            raise UnfogError(f"cannot read the tokenizer in {d}: {e}") from None
        return cls(backend, config)
