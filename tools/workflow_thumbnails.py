"""Draws the thumbnail the template browser shows beside each shipped workflow (<name>.jpg): the workflow's
own graph (its nodes and links, coloured by kind) under its title. Run it after changing a workflow:

    python tools/workflow_thumbnails.py
"""
from __future__ import annotations

import json
import pathlib

from PIL import Image, ImageDraw, ImageFont

WORKFLOWS = pathlib.Path(__file__).resolve().parents[1] / "workflows"
SIZE = (768, 512)
BANNER = 96
MARGIN = 24
COLOURS = {   # fill of a node by what it does
    "EditKit": (86, 60, 150), "Load": (45, 90, 140), "Save": (40, 120, 80), "Preview": (40, 120, 80),
    "Note": (110, 100, 50), "Sampler": (150, 70, 40), "KSampler": (150, 70, 40),
}
DEFAULT = (70, 70, 78)


def _font(size: int):
    for name in ("DejaVuSans-Bold.ttf", "DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default()


def _colour(node_type: str):
    for prefix, colour in COLOURS.items():
        if node_type.startswith(prefix) or prefix in node_type:
            return colour
    return DEFAULT


def _label(node: dict) -> str:
    name = node.get("title") or node["type"]
    return name.replace("EditKit", "").replace("MarkdownNote", "Note")


def draw(path: pathlib.Path) -> Image.Image:
    workflow = json.loads(path.read_text(encoding="utf-8"))
    nodes = {n["id"]: n for n in workflow["nodes"]}
    left = min(n["pos"][0] for n in nodes.values())
    top = min(n["pos"][1] - 30 for n in nodes.values())
    right = max(n["pos"][0] + n["size"][0] for n in nodes.values())
    bottom = max(n["pos"][1] + n["size"][1] for n in nodes.values())
    area = (SIZE[0] - 2 * MARGIN, SIZE[1] - BANNER - 2 * MARGIN)
    scale = min(area[0] / (right - left), area[1] / (bottom - top))

    def at(x, y):
        return MARGIN + (x - left) * scale, BANNER + MARGIN + (y - top) * scale

    image = Image.new("RGB", SIZE, (28, 28, 32))
    draw_ = ImageDraw.Draw(image)
    for link in workflow.get("links") or []:
        origin, target = (link[1], link[3]) if isinstance(link, list) else (link["origin_id"], link["target_id"])
        if origin in nodes and target in nodes:
            a, b = nodes[origin], nodes[target]
            start = at(a["pos"][0] + a["size"][0], a["pos"][1] + 10)
            end = at(b["pos"][0], b["pos"][1] + 10)
            draw_.line([start, end], fill=(150, 150, 160), width=2)
    small = _font(max(9, int(11 * min(1.0, scale * 2.5))))
    for node in nodes.values():
        x0, y0 = at(node["pos"][0], node["pos"][1] - 30)
        x1, y1 = at(node["pos"][0] + node["size"][0], node["pos"][1] + node["size"][1])
        bypassed = node.get("mode") == 4
        fill = tuple(c // 2 for c in _colour(node["type"])) if bypassed else _colour(node["type"])
        draw_.rounded_rectangle([x0, y0, x1, y1], radius=6, fill=fill, outline=(220, 220, 230), width=1)
        label = _label(node)
        while len(label) > 1 and draw_.textlength(label, font=small) > x1 - x0 - 10:
            label = label[:-2] + "…"
        draw_.text((x0 + 5, y0 + 4), label, font=small, fill=(240, 240, 245))
    draw_.rectangle([0, 0, SIZE[0], BANNER - 12], fill=(18, 18, 22))
    size = 30
    while size > 16 and draw_.textlength(path.stem, font=_font(size)) > SIZE[0] - 2 * MARGIN:
        size -= 1
    draw_.text((MARGIN, 14), path.stem, font=_font(size), fill=(255, 255, 255))
    draw_.text((MARGIN, 56), "EditKit workflow for ComfyUI", font=_font(16), fill=(190, 190, 200))
    return image


def main() -> None:
    for path in sorted(WORKFLOWS.glob("*.json")):
        draw(path).save(path.with_suffix(".jpg"), quality=88)
        print(path.with_suffix(".jpg").name)


if __name__ == "__main__":
    main()
