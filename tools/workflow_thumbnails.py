"""Draws the thumbnail the template browser shows beside each shipped workflow (<name>.jpg): the workflow's
own graph (its nodes and links, coloured by kind) under a banner with its method group and one line saying
what it does. Run it after changing a workflow or its line in DESCRIPTIONS:

    python tools/workflow_thumbnails.py

For a pack's templates the front end (1.37 and 1.49) writes the card's title and its description from the
file name alone (the description is the name again, hyphens turned into spaces), so the thumbnail is the only
place where a pack can say more; the banner leaves the title to the card's own text.
"""
from __future__ import annotations

import json
import pathlib

from PIL import Image, ImageDraw, ImageFont

WORKFLOWS = pathlib.Path(__file__).resolve().parents[1] / "workflows"
SIZE = (768, 512)
BANNER = 132
MARGIN = 24
# Method group and one line per workflow, keyed by the file name without ".json" (the template's name). Kept
# here, beside the only code that draws them, all in one table so that neighbours can be told apart by
# reading them together; facts from README.md's Workflows table. A line holds at most LINE_CHARS characters
# (at card size the banner is about 300 px wide). tests/host/test_shipped_workflows.py requires an entry for
# every workflow and none for a workflow that is gone.
DESCRIPTIONS: dict[str, tuple[str, str]] = {
    "Attention maps, where words land":
        ("Attention maps", "Heat maps and a mask of where 'cat' and 'table' land"),
    "Inversion, reconstruct a photo":
        ("Inversion (direct)", "A photo inverted and sampled back: the same photo again"),
    "Inversion, edit a photo with a new prompt":
        ("Inversion (null-text)", "A photo inverted (null-text), sampled with a new prompt"),
    "Prompt-to-Prompt, word swap":
        ("Prompt-to-Prompt: word_swap", "One word swapped (cat -> dog), the scene kept"),
    "Prompt-to-Prompt, refine by adding words":
        ("Prompt-to-Prompt: refine", "Words added ('in winter'), the layout kept"),
    "Prompt-to-Prompt, reweight a word":
        ("Prompt-to-Prompt: reweight", "The same prompt with 'fluffy' three times as strong"),
    "Prompt-to-Prompt, local blend":
        ("Prompt-to-Prompt: word_swap + local blend", "Swap bicycle -> motorcycle, only where they appear"),
    "Prompt-to-Prompt, edit a real photo":
        ("Prompt-to-Prompt: refine + local blend", "A real photo (null-text inversion): the cat to a tiger"),
    "MasaCtrl, change the pose in a real photo":
        ("MasaCtrl", "A real photo re-posed (sitting -> running), its look kept"),
    "Plug-and-Play, translate a photo":
        ("Plug-and-Play", "A photo into a marble sculpture, its layout kept"),
    "Plug-and-Play, translate a photo with depth ControlNet":
        ("Plug-and-Play + ControlNet", "The same translation, held to a depth map (strength 0.8)"),
    "Latent Fuser, panorama":
        ("Latent Fuser (MultiDiffusion)", "A 4608x512 panorama: 512 px windows every 64 px"),
    "Latent Fuser, 360-degree panorama":
        ("Latent Fuser (MultiDiffusion, circular)", "A panorama whose left and right edges meet seamlessly"),
    "Latent Fuser, region prompts":
        ("Latent Fuser (MultiDiffusion, regions)", "A background prompt plus two prompts placed by masks"),
    "Latent Fuser, SyncDiffusion panorama":
        ("Latent Fuser (SyncDiffusion)", "A 3072x512 panorama, windows kept in one style (LPIPS)"),
    "Latent Fuser, tiled refine of a large image":
        ("Latent Fuser (MultiDiffusion, img2img)", "A photo upscaled 2x, refined at denoise 0.4 in 512 px tiles"),
    "Keyframe Attention, a batch of images sharing attention":
        ("Keyframe Attention (all)", "Four images of one prompt: one look, four layouts"),
    "Keyframe Attention, consistent text-to-video":
        ("Keyframe Attention + Motion Latents", "Text2Video-Zero: 8 frames from one seed, saved as a video"),
    "Video editing, restyle a real video":
        ("Inversion + Prompt-to-Prompt + Keyframes", "A real video inverted and restyled, its frames consistent"),
    "Consistent Subject, one subject across a batch of prompts":
        ("Consistent Subject", "Four prompts in one batch: the same fox in four scenes"),
    "P3S, points to a subject mask":
        ("P3S, step 1 of 3: mask", "Two points on a photo to a subject mask and a reference"),
    "P3S, train a subject adapter":
        ("P3S, step 2 of 3: train", "Three masked photos train a subject adapter (loss curve)"),
    "P3S, generate the subject":
        ("P3S, step 3 of 3: generate", "The trained adapter puts the subject in a new scene"),
}
LINE_CHARS = 60


def group_font():
    return _font(28)


def line_font():
    return _font(24, bold=False)
COLOURS = {   # fill of a node by what it does
    "EditKit": (86, 60, 150), "Load": (45, 90, 140), "Save": (40, 120, 80), "Preview": (40, 120, 80),
    "Note": (110, 100, 50), "Sampler": (150, 70, 40), "KSampler": (150, 70, 40),
}
DEFAULT = (70, 70, 78)


def _font(size: int, bold: bool = True):
    for name in ("DejaVuSans-Bold.ttf", "DejaVuSans.ttf") if bold else ("DejaVuSans.ttf",):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size)
    except TypeError:   # Pillow < 10.1
        return ImageFont.load_default()


def description(name: str) -> tuple[str, str]:
    """The method group and the line of the workflow named ``name`` (its file name without ".json")."""
    if name not in DESCRIPTIONS:
        raise KeyError(f"no line for workflow {name!r}: add it to DESCRIPTIONS in {pathlib.Path(__file__).name}")
    return DESCRIPTIONS[name]


def fits(text: str, font) -> bool:
    """Whether ``text`` in ``font`` fits the banner's width."""
    return ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(text, font=font) <= SIZE[0] - 2 * MARGIN


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
    group, line = description(path.stem)
    draw_.rectangle([0, 0, SIZE[0], BANNER - 12], fill=(18, 18, 22))
    for text, font in ((group, group_font()), (line, line_font())):
        if not fits(text, font):
            raise ValueError(f"{path.stem}: {text!r} is wider than the banner; shorten it in DESCRIPTIONS")
    draw_.text((MARGIN, 14), group, font=group_font(), fill=(196, 170, 255))
    draw_.text((MARGIN, 64), line, font=line_font(), fill=(255, 255, 255))
    return image


def main() -> None:
    for path in sorted(WORKFLOWS.glob("*.json")):
        draw(path).save(path.with_suffix(".jpg"), quality=88)
        print(path.with_suffix(".jpg").name)


if __name__ == "__main__":
    main()
