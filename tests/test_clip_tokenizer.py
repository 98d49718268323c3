"""unfog's CLIP tokenizer against transformers' CLIPTokenizer on the real CLIP vocabulary.

The vocabulary ships inside the open-clip-torch wheel (open_clip/bpe_simple_vocab_16e6.txt.gz);
.ci/run downloads that wheel, without installing it, into .cache/clip-vocab/.
"""

import json
import os
import random

import pytest
from clip_bytes import WHEELS, write_real_clip_vocab
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from unfog.formats.diffusers_folder import clip_tokenizer  # noqa: E402



@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip")
    if not write_real_clip_vocab(d):
        pytest.skip(f"no open-clip-torch wheel in {WHEELS}; run: pip download --no-deps open-clip-torch -d {WHEELS}")
    return d


def prompts(n=300):
    rng = random.Random(0)
    words = ["a", "photo", "of", "an", "astronaut", "riding", "horse", "on", "Mars", "highly", "detailed", "8k", "trending", "artstation",
             "don't", "it's", "we're", "café", "naïve", "Zürich", "東京", "猫", "🐱", "🚀", "(masterpiece:1.2)", "[blue|red]", "<lora:x:0.5>",
             "x-ray", "3.14159", "1920s", "ÉCOLE", "straße", "ﬁne", "e\u0301", "—", "“quoted”", "#hashtag", "@user", "a/b", "..."]
    out = ["", " ", "a", "A PHOTO OF A CAT", "  spaced\t\tout \n text  ", "<|endoftext|>", "hello<|startoftext|>world"]
    while len(out) < n:
        k = rng.choice([1, 3, 8, 20, 60, 120])
        out.append(" ".join(rng.choice(words) for _ in range(k)) + rng.choice(["", ".", "!", " ,", "?"]))
    return out


@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"])
def test_real_clip_vocabulary_matches_transformers(clip_files, pad):
    ref = transformers.CLIPTokenizer(str(clip_files / "vocab.json"), str(clip_files / "merges.txt"), pad_token=pad, model_max_length=77)
    if pad == "!":
        (clip_files / "special_tokens_map.json").write_text(json.dumps({"pad_token": "!"}))
    try:
        ours = clip_tokenizer(clip_files)
    finally:
        (clip_files / "special_tokens_map.json").unlink(missing_ok=True)
    texts = prompts()
    expected = ref(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    got = ours(texts)
    mismatches = [t for t, a, b in zip(texts, got, expected) if not torch.equal(a, b)]
    assert not mismatches, mismatches[:3]
    assert ours.vocab_size == 49408
