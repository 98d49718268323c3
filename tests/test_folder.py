import json

import pytest
from PIL import Image

from unfog.data.folder import ImageCaptionFolder
from unfog.errors import UnfogError


def make_metadata_folder(root, n=3, size=(40, 24)):
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for k in range(n):
        im = Image.new("RGB", size, (10 * k, 0, 0))
        cx, cy = size[0] // 2, size[1] // 2
        im.paste((0, 255, 0), (cx - 3, cy - 3, cx + 3, cy + 3))
        im.save(root / f"{k}.png")
        rows.append({"file_name": f"{k}.png", "text": f"caption {k}"})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def test_metadata_layout_resizes_and_center_crops(tmp_path):
    data = ImageCaptionFolder(make_metadata_folder(tmp_path / "d"), 16)
    assert len(data) == 3
    images = data.images([0, 1, 2, 3])
    assert images.shape == (4, 3, 16, 16) and images.dtype.__str__() == "torch.uint8"
    assert data.captions([1, 4]) == ["caption 1", "caption 1"]
    assert images[0, 1, 7:9, 7:9].min() > 200  # the centre block survives the crop…
    assert images[0, 1, :, :3].max() < 50  # …and the sides were cropped away


def test_png_txt_pairs(tmp_path):
    for k in range(2):
        Image.new("RGB", (8, 8)).save(tmp_path / f"img{k}.png")
        (tmp_path / f"img{k}.txt").write_text(f"text {k}\n")
    data = ImageCaptionFolder(tmp_path, 8)
    assert data.captions([0, 1]) == ["text 0", "text 1"]


def test_unreadable_image_names_the_file_or_is_skipped(tmp_path):
    root = make_metadata_folder(tmp_path / "d")
    (root / "1.png").write_bytes(b"not a png")
    with pytest.raises(UnfogError, match=r"1\.png cannot be read.*--skip-bad"):
        ImageCaptionFolder(root, 16)
    data = ImageCaptionFolder(root, 16, skip_bad=True)
    assert len(data) == 2 and len(data.skipped) == 1 and "1.png" in data.skipped[0][0]


def test_missing_caption_and_missing_file(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(UnfogError, match=r"a\.png has no caption file a\.txt"):
        ImageCaptionFolder(tmp_path, 8)
    root = make_metadata_folder(tmp_path / "m")
    (root / "2.png").unlink()
    with pytest.raises(UnfogError, match="listed in metadata.jsonl but missing"):
        ImageCaptionFolder(root, 8)
    with pytest.raises(UnfogError, match="does not exist"):
        ImageCaptionFolder(tmp_path / "nowhere", 8)


def test_photos_are_read_as_shown_and_16_bit_images_scaled(tmp_path):
    """A phone photo stored sideways with an EXIF orientation was trained on its side, and a 16-bit
    grayscale PNG at mid-grey came out white (PIL's convert clips it)."""
    import numpy as np

    from unfog.data.folder import _load_image

    stored = Image.new("RGB", (40, 20), (0, 0, 0))
    stored.paste((255, 0, 0), (0, 0, 20, 20))  # red on the stored left half
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90° clockwise: 20 wide, 40 tall, red on top
    stored.save(tmp_path / "a.jpg", exif=exif, quality=95)
    shown = _load_image(tmp_path / "a.jpg", 0, buckets=[(40, 20), (20, 40)])
    assert shown.shape == (40, 20, 3)  # (H, W): portrait, as shown
    assert shown[:15, :, 0].mean() > 200 and shown[25:, :, 0].mean() < 50
    Image.fromarray(np.full((16, 16), 30000, dtype=np.uint16)).save(tmp_path / "g.png")
    with Image.open(tmp_path / "g.png") as im:
        assert im.mode.startswith("I")
    grey = _load_image(tmp_path / "g.png", 16)
    assert abs(int(grey.mean()) - 117) <= 1  # 30000 of 65535, in 8 bits


def test_captions_that_are_not_utf8_are_named_and_skippable(tmp_path):
    """A cp1252 caption or metadata line, or a file_name that is not a string, had been a raw
    UnicodeDecodeError or TypeError, --skip-bad or not; a BOM made line 1 "not a JSON object"."""
    d = tmp_path / "pairs"
    d.mkdir()
    for k, caption in enumerate([b"a red circle", b"caf\xe9 au lait", b"\xef\xbb\xbfa blue square"]):
        Image.new("RGB", (16, 16)).save(d / f"{k}.png")
        (d / f"{k}.txt").write_bytes(caption)
    with pytest.raises(UnfogError, match="1.txt that is not UTF-8 text"):
        ImageCaptionFolder(d, 16)
    data = ImageCaptionFolder(d, 16, skip_bad=True)
    assert data.captions([0, 1]) == ["a red circle", "a blue square"] and len(data.skipped) == 1
    m = tmp_path / "meta"
    m.mkdir()
    Image.new("RGB", (16, 16)).save(m / "a.png")
    lines = [b'\xef\xbb\xbf{"file_name": "a.png", "text": "first"}', b'{"file_name": "a.png", "text": "caf\xe9"}', b'{"file_name": 5, "text": "x"}']
    (m / "metadata.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(UnfogError, match=r"metadata.jsonl:2 is not UTF-8 text"):
        ImageCaptionFolder(m, 16)
    data = ImageCaptionFolder(m, 16, skip_bad=True)
    assert data.captions([0]) == ["first"] and [p for _, p in data.skipped] == ["is not UTF-8 text (save the file as UTF-8)",
                                                                                'is not a JSON object with "file_name" and "text"']


def test_an_extreme_aspect_ratio_is_cropped_before_it_is_resized(tmp_path):
    # A 372-byte 100000×1 strip had been resized to 6.4 M × 64 pixels (2 GB) before the crop.
    import subprocess
    import sys

    (tmp_path / "d").mkdir()
    strip = Image.new("RGB", (100000, 1), (255, 0, 0))
    strip.paste((0, 0, 255), (49999, 0, 50001, 1))  # the centre is blue
    strip.save(tmp_path / "d" / "a.png")
    (tmp_path / "d" / "a.txt").write_text("a strip")
    code = ("import resource, sys; from unfog.data.folder import ImageCaptionFolder; "
            "image = ImageCaptionFolder(sys.argv[1], 64).images([0])[0]; "
            "assert image.shape == (3, 64, 64) and image[2].min() > 200 and image[0].max() < 50, image; "  # the centre, blue
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    peak_kb = int(subprocess.run([sys.executable, "-c", code, str(tmp_path / "d")], check=True, capture_output=True, text=True).stdout)
    assert peak_kb < 1024 * 1024, f"{peak_kb / 1024:.0f} MB"
