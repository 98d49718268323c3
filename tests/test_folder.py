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
