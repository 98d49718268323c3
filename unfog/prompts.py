"""A1111's prompt syntax (stable-diffusion-webui's emphasis, "Original" mode), opt-in per call.

    (text)        weight × 1.1        ((text)) × 1.21, and so on
    (text:1.5)    weight × 1.5
    [text]        weight ÷ 1.1
    \\( \\) \\[ \\] \\\\   the characters themselves
    BREAK         ends the current 75-token window; what follows starts a new one
    <lora:NAME:w> loads LoRA NAME (from lora_dir) at weight w for this call; removed from the text

Brackets nest and multiply. An unclosed bracket applies to the end of the prompt; a closing
bracket with nothing open is text. Each token gets the product of the weights around it;
its text states (the encoder's output at that position) are multiplied by that weight, and
then the window's states are scaled back to their original mean:

    z' = z · w[token],   z'' = z' · mean(z) / mean(z')     (means over the whole window, L × D)

Worked example: "a (red:1.5) [circle]" → fragments ("a ", 1.0), ("red", 1.5), (" ", 1.0),
("circle", 0.909…); tokens [bos] a red circle [eos] pad… get weights 1, 1, 1.5, 0.909…, 1, 1…;
the states at "red" grow by 1.5 and those at "circle" shrink by 1/1.1 before the whole window is
rescaled so that its mean is what it was. Unlike A1111, which takes that mean over the batch,
unfog takes it per prompt, so an image does not depend on what else is in the batch.
"""

from __future__ import annotations

import re

from .errors import UnfogError

ROUND, SQUARE = 1.1, 1 / 1.1
BREAK = "BREAK"
# One token of the syntax: an escape, a bracket, a ":weight)" closing, or a run of plain text.
_TOKEN = re.compile(r"\\[()\[\]\\]|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
_LORA = re.compile(r"<lora:([^:<>]+)(?::([^:<>]*))?(?::[^<>]*)?>")  # no "<" inside: a failed tag is not re-scanned from every "<lora:"
# The largest emphasis a token may get: past it the weighted text states overflow half precision
# (and 1.1 to the power of a few hundred nested brackets, or (x:1e400), is no longer a number).
MAX_WEIGHT = 1000.0
# The most windows of 75 tokens a prompt may take (about 4,800 tokens; unfog.text checks the
# count, the request the BREAKs): each window is one more text-encoder pass per image, so
# thousands of BREAKs in a short prompt took gigabytes for a 64² image.
MAX_WINDOWS = 64
# The most brackets open at once: each closing one rescales the text since its opening, so
# thousands left open made parsing quadratic (a 96 KB prompt took 25 s); A1111 prompts nest a few deep.
MAX_NESTING = 100


def as_texts(name: str, texts) -> list[str]:
    """Prompts as a list: one string is one prompt (not one per character); anything but a string
    or a non-empty list of strings is an error naming `name`."""
    if isinstance(texts, str):
        return [texts]
    if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) for t in texts):
        raise UnfogError(f"{name} must be a string or a non-empty list of strings, got {texts!r}"[:300], name)
    return list(texts)


def parse_attention(text: str, field: str = "prompt") -> list[tuple[str, float]]:
    """(fragment, weight) pairs of a prompt in A1111's syntax, neighbours of equal weight merged;
    a BREAK is the pair (BREAK, -1). A weight beyond ±MAX_WEIGHT raises an UnfogError naming
    `field`."""
    out: list[list] = []  # [text, weight], mutable while brackets close
    open_round: list[int] = []
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for item in out[start:]:
            item[1] *= factor

    for m in _TOKEN.finditer(text):
        piece, weight = m.group(0), m.group(1)
        if piece.startswith("\\"):  # an escaped character; a lone backslash is dropped, as A1111 drops it
            out.append([piece[1:], 1.0])
        elif piece in ("(", "["):
            (open_round if piece == "(" else open_square).append(len(out))
            if len(open_round) + len(open_square) > MAX_NESTING:
                raise UnfogError(f"{field} has more than {MAX_NESTING} brackets open at once; close them, or escape literal ones as \\( \\[", field)
        elif weight is not None and open_round:
            try:
                scale_from(open_round.pop(), float(weight))
            except ValueError:  # "(x:1.2.3)": not a number, so the text it is
                out.append([piece, 1.0])
        elif piece == ")" and open_round:
            scale_from(open_round.pop(), ROUND)
        elif piece == "]" and open_square:
            scale_from(open_square.pop(), SQUARE)
        else:
            for k, part in enumerate(_BREAK.split(piece)):
                if k:
                    out.append([BREAK, -1.0])
                out.append([part, 1.0])
    for start in open_round:
        scale_from(start, ROUND)
    for start in open_square:
        scale_from(start, SQUARE)
    for t, w in out:
        if t is not BREAK and not abs(w) <= MAX_WEIGHT:  # also catches inf and nan
            raise UnfogError(f"{field} gives {t.strip()[:40]!r} the emphasis weight {w:g}; weights must be within ±{MAX_WEIGHT:g} "
                             "(each ( ) multiplies by 1.1, so nest fewer brackets or write (text:1.5))", field)
    merged: list[list] = []
    for item in out or [["", 1.0]]:
        if merged and merged[-1][1] == item[1] and item[1] != -1:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    return [(t, w) for t, w in merged]


def extract_loras(text: str, field: str = "prompt") -> tuple[str, list[tuple[str, float]]]:
    """The prompt without its `<lora:NAME:w>` tags, and the (NAME, w) pairs (w defaults to 1);
    a weight that is not a number raises an UnfogError naming `field`."""
    found = []
    for m in _LORA.finditer(text):
        name, weight = m.group(1).strip(), m.group(2)
        try:
            found.append((name, 1.0 if weight in (None, "") else float(weight)))
        except ValueError:
            raise UnfogError(f"<lora:{name[:60]}:{weight[:40]}> has a weight that is not a number", field) from None
    return _LORA.sub("", text), found
