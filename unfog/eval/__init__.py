"""Metrics: prompt adherence on shapes-v1."""

from .shapes import check, eval_prompts, evaluate, format_table, score

__all__ = ["check", "eval_prompts", "evaluate", "format_table", "score"]
