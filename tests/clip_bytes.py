"""Test and benchmark helper: CLIP's reversible map from bytes to printable characters (GPT-2's),
and a tiny but real CLIP-format vocabulary built with it (bench/speed.py uses it too)."""

import json


def bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


WORDS = ["a", "red", "circle", "photo", "of", "cat", "dog", "astronaut", "riding", "horse", "on", "mars", "blue", "square"]


def write_tiny_clip_vocab(directory):
    """A small but real CLIP-format BPE vocabulary: all bytes, with and without </w>, plus
    merges that build a handful of whole words."""
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars]
    merges = []
    for w in WORDS:
        pieces = list(w[:-1]) + [w[-1] + "</w>"]
        while len(pieces) > 1:
            a, b = pieces[0], pieces[1]
            merges.append(f"{a} {b}")
            if a + b not in vocab:
                vocab.append(a + b)
            pieces = [a + b] + pieces[2:]
    merges = list(dict.fromkeys(merges))
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return len(vocab)


WHEELS = __import__("pathlib").Path(__file__).resolve().parent.parent / ".cache" / "clip-vocab"


def write_real_clip_vocab(directory) -> bool:
    """CLIP's real 49,408-token vocabulary (vocab.json + merges.txt) from the open-clip-torch
    wheel that .ci/run downloads into .cache/clip-vocab; False when the wheel is not there."""
    import gzip
    import zipfile

    wheels = sorted(WHEELS.glob("open_clip_torch-*.whl"))
    if not wheels:
        return False
    with zipfile.ZipFile(wheels[-1]) as z:
        lines = gzip.decompress(z.read("open_clip/bpe_simple_vocab_16e6.txt.gz")).decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return True
