"""A bundled model's 4×4 sample grid for the README: 16 fixed prompts, seed 0, no picking.

    python scripts/readme_grid.py docs/default-model-grid.png
    python scripts/readme_grid.py docs/emoji-model-grid.png --model emoji
"""

import argparse
import textwrap

from PIL import Image, ImageDraw

from unfog import Pipeline

PROMPTS = [
    "a red circle", "a big blue square on the left", "a small green triangle at the top", "a yellow circle in the center",
    "a purple square on the right on a black background", "a orange triangle at the bottom", "a big red square on a gray background",
    "a small blue circle on a white background", "a red circle left of a blue square", "a green triangle above a yellow circle",
    "a big purple circle right of a small orange square", "a blue triangle below a red square",
    "a yellow square left of a purple triangle on a black background", "a small green circle above a big orange triangle",
    "a orange circle below a blue circle on a gray background", "a red triangle right of a green square",
]


def main(out: str, model: str) -> None:
    from unfog.train.config import EMOJI_PROMPTS  # the emoji preset's sample prompts, fixed before training

    prompts = EMOJI_PROMPTS if model == "emoji" else PROMPTS
    pipe = Pipeline.from_pretrained(model)
    images = pipe(prompts, seed=0).images
    cell, scale, text_h = 64 * 3, 3, 44
    sheet = Image.new("RGB", (4 * cell, 4 * (cell + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (im, prompt) in enumerate(zip(images, prompts)):
        x, y = (k % 4) * cell, (k // 4) * (cell + text_h)
        sheet.paste(im.resize((64 * scale, 64 * scale), Image.NEAREST), (x, y))
        for j, line in enumerate(textwrap.wrap(prompt, 30)[:3]):
            draw.text((x + 4, y + cell + 2 + 13 * j), line, fill=(0, 0, 0))
    sheet.save(out)
    print(out)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?", default="docs/default-model-grid.png")
    ap.add_argument("--model", choices=["shapes", "emoji"], default="shapes")
    args = ap.parse_args()
    main(args.out, args.model)
