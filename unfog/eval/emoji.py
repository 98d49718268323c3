"""Prompt adherence on emoji-scenes (docs/specs/emoji-scenes.md, Evaluation)."""

from __future__ import annotations

import random

from ..data.emoji import Prompt, random_prompt


def eval_prompts(n: int, seed: int) -> list[Prompt]:
    """n prompts from the canonical grammar, half with one object and half with two."""
    rng = random.Random(f"emoji-eval/{seed}")
    return [random_prompt(rng, objects=1 if k < (n + 1) // 2 else 2) for k in range(n)]
