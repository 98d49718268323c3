"""Build the emoji-scenes sprite set (docs/specs/emoji-scenes.md) from Microsoft's Fluent Emoji
(flat style, MIT) as packaged by Iconify, and write it to unfog/assets/emoji-sprites/.

    npm pack @iconify-json/fluent-emoji-flat@1.2.6 && tar xzf iconify-json-fluent-emoji-flat-1.2.6.tgz
    pip install resvg-py==0.5.0
    python scripts/build_emoji_sprites.py package/ --count 160

Writes icons.json (the chosen icons' SVG bodies, IconifyJSON), sprites.png (each icon rasterised
by resvg at 64 px, cropped to its opaque box and scaled so its longer side is 64 px, one 64×64
cell per icon) and sprites.json (names, groups, cell boxes). Only the build needs resvg; unfog
reads the PNG.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import re
from pathlib import Path

import numpy as np
from PIL import Image

CELL = 64
CATEGORIES = {"Animals & Nature": "animals", "Food & Drink": "food", "Objects": "objects", "Activities": "objects", "Travel & Places": "travel"}
PLANTS = {"blossom", "bouquet", "cactus", "cherry-blossom", "deciduous-tree", "evergreen-tree", "fallen-leaf", "four-leaf-clover", "herb",
          "hibiscus", "hyacinth", "leaf-fluttering-in-wind", "lotus", "maple-leaf", "mushroom", "palm-tree", "potted-plant", "rose", "rosette",
          "seedling", "sheaf-of-rice", "sunflower", "tulip", "white-flower", "wilted-flower", "empty-nest", "nest-with-eggs", "coral", "wood", "rock"}
QUOTA = {"animals": 50, "food": 45, "objects": 40, "travel": 25}
# Not concrete objects, or pictures whose name a person would not say for them.
EXCLUDE = re.compile(r"face|hand|button|flag|keycap|o-clock|thirty|moon|globe|symbol|sign|mark|arrow|suit|heart|medal|night|dusk|sunset|sunrise|"
                     r"cityscape|map|mountain|volcano|desert|island|park|stadium|building|house|houses|derelict|office|hospital|hotel|store|"
                     r"school|station|post|factory|castle|tower|statue|church|mosque|synagogue|temple|shrine|kaaba|fountain|tent|wedding|"
                     r"bridge|milky|shooting|fog|wind|tornado|cyclone|snowflake|sparkle|collision|dizzy|zzz|speech|thought|vs|id|new|free|"
                     r"ng|ok|up|cool|sos|tickets?|label|page|ledger|notebook|card|chart|calendar|clipboard|pushpin|paperclip|link|chains|"
                     r"ballot|envelope|e-mail|incoming|outbox|inbox|mailbox|postbox|postal|scroll|newspaper|bookmark|books|book|memo|"
                     r"high-voltage|droplet|water-wave|bubbles|dashing|sweat|fire$|jack-o|piñata|nesting|knot|yarn|thread|puzzle|joker|"
                     r"mahjong|oclock|nose|speaker|urn|elevator|seat|microbe|cigarette|bikini|briefs|arrival|departure|syringe|pill|dna|petri|test-tube|playing|flower-playing|framed|artist|performing|reminder|sparkler|firecracker|fireworks|confetti|tanabata|"
                     r"pine-decoration|wind-chime|carp|red-envelope|receipt|dollar|yen|euro|pound|money|coin|credit|abacus|bar-chart|"
                     r"file|folder|card-index|spiral|triangular|straight-ruler|placard|identification|level-slider|control-knobs|"
                     r"pager|fax|satellite|shopping|prayer|beads|amphora|oil-drum|motorway|railway|-track|station|light-rail|monorail|"
                     r"mountain-railway|tram-car|trolleybus|oncoming|minibus|bus-stop|fuel-pump|police-car-light|vertical|horizontal|"
                     r"construction|stop|anchor|barber|circus|carousel|ferris|roller|world|earth|comet|ringed|star|sun-|cloud-with|"
                     r"-with-|^sun$|umbrella-on|hot-springs|rainbow|thermometer|hourglass|timer|stopwatch|mantelpiece|watch")
WHITE = 235
# Taken first (in this order) when they pass the tests; the rest follow in a seeded shuffle.
PREFERRED = ("fox red-apple hot-air-balloon cat dog rabbit bear panda penguin owl frog lion tiger horse cow pig elephant mouse "
             "duck chicken snail turtle fish octopus butterfly honeybee whale dolphin shark snake monkey giraffe zebra koala "
             "banana grapes watermelon strawberry lemon tangerine pear peach cherries carrot broccoli pizza hamburger doughnut "
             "cookie birthday-cake ice-cream croissant bread cheese-wedge hot-pepper avocado mushroom pineapple green-apple "
             "teacup-without-handle hot-beverage "
             "guitar trumpet violin drum soccer-ball basketball tennis kite balloon teddy-bear crown gem-stone light-bulb "
             "lipstick scissors key umbrella backpack closed-umbrella camera telephone alarm-clock rocket airplane bicycle "
             "automobile bus locomotive sailboat helicopter tractor fire-engine ambulance racing-car "
             "sunflower tulip rose cactus deciduous-tree evergreen-tree palm-tree maple-leaf four-leaf-clover potted-plant").split()


def svg(icons: dict, name: str) -> str:
    w, h = icons.get("width", 16), icons.get("height", 16)
    return f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}">{icons["icons"][name]["body"]}</svg>'


def rasterise(markup: str) -> Image.Image:
    """The icon at 4× cell size, cropped to its opaque box and scaled so its longer side is CELL."""
    from resvg_py import svg_to_bytes

    im = Image.open(io.BytesIO(bytes(svg_to_bytes(svg_string=markup, width=CELL * 4, height=CELL * 4)))).convert("RGBA")
    im = im.crop(im.getchannel("A").point(lambda a: 255 if a > 8 else 0).getbbox())
    s = CELL / max(im.size)
    return im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.LANCZOS)


def thumb(sprite: Image.Image, n: int = 16) -> np.ndarray:
    """A small, centred, grey-backed picture of the sprite for the distinctness test."""
    canvas = Image.new("RGBA", (CELL, CELL), (128, 128, 128, 255))
    canvas.alpha_composite(sprite, ((CELL - sprite.width) // 2, (CELL - sprite.height) // 2))
    return np.asarray(canvas.convert("RGB").resize((n, n), Image.BOX), np.float32).ravel() / 255


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("package", help="the unpacked npm package folder (holds icons.json, metadata.json)")
    ap.add_argument("--out", default="unfog/assets/emoji-sprites")
    ap.add_argument("--min-distance", type=float, default=3.2, help="L2 distance between 16×16 thumbnails below which the later icon is dropped")
    args = ap.parse_args()
    pkg = Path(args.package)
    icons = json.loads((pkg / "icons.json").read_text())
    categories = json.loads((pkg / "metadata.json").read_text())["categories"]
    version = json.loads((pkg / "package.json").read_text())["version"]
    chosen: list[tuple[str, str, Image.Image, np.ndarray]] = []
    counts = dict.fromkeys(QUOTA, 0)
    candidates = [(n, CATEGORIES[c]) for c, names in categories.items() if c in CATEGORIES for n in names]
    rank = {n: k for k, n in enumerate(PREFERRED)}
    random.Random(0).shuffle(candidates)
    candidates.sort(key=lambda c: rank.get(c[0], len(rank)))  # stable: the shuffle orders the rest
    for name, group in candidates:
        if name in PLANTS:
            group = "plants"
        elif EXCLUDE.search(name) or name not in icons["icons"] or re.search(r"-(light|dark|medium)", name):
            continue
        if group != "plants" and counts[group] >= QUOTA[group]:
            continue
        sprite = rasterise(svg(icons, name))
        alpha = np.asarray(sprite.getchannel("A")) > 128
        rgb = np.asarray(sprite.convert("RGB"))
        if min(sprite.size) < CELL / 2.2 or (rgb[alpha].min(-1) > WHITE).mean() > 0.4:
            continue  # too thin to read at 18 px, or mostly white
        t = thumb(sprite)
        if chosen and min(np.linalg.norm(t - c[3]) for c in chosen) < args.min_distance:
            continue
        chosen.append((name, group, sprite, t))
        if group != "plants":
            counts[group] += 1
    chosen = [c for c in chosen if c[1] != "plants"] + [c for c in chosen if c[1] == "plants"][:15]
    chosen.sort(key=lambda c: (c[1], c[0]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cols = 16
    rows = (len(chosen) + cols - 1) // cols
    atlas = Image.new("RGBA", (cols * CELL, rows * CELL), (0, 0, 0, 0))
    meta = []
    for k, (name, group, sprite, _) in enumerate(chosen):
        x, y = (k % cols) * CELL, (k // cols) * CELL
        atlas.paste(sprite, (x, y))
        meta.append({"id": name, "name": name.replace("-", " "), "group": group, "box": [x, y, sprite.width, sprite.height]})
    atlas.save(out / "sprites.png", optimize=True)
    subset = {"prefix": icons["prefix"], "width": icons.get("width"), "height": icons.get("height"), "icons": {c[0]: icons["icons"][c[0]] for c in chosen}}
    (out / "icons.json").write_text(json.dumps(subset, separators=(",", ":")) + "\n")
    source = {"package": "@iconify-json/fluent-emoji-flat", "version": version, "licence": "MIT", "author": "Microsoft Corporation",
              "upstream": "https://github.com/microsoft/fluentui-emoji", "cell": CELL}
    (out / "sprites.json").write_text(json.dumps({"source": source, "sprites": meta}, indent=1) + "\n")
    by_group = {g: sum(1 for m in meta if m["group"] == g) for g in sorted({m["group"] for m in meta})}
    print(f"{len(meta)} sprites: {by_group}")


if __name__ == "__main__":
    main()
