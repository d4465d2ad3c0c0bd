"""Draws the figures of the node help pages (web/docs/figures/*.png). Run it after changing a layout rule:

    python tools/doc_figures.py

The layouts are not drawn by hand: the windows come from core/multidiffusion.py `window_layout`, the keyframes and
frame windows from core/keyframe.py `keyframes` / `frame_windows`, the point-mask tiles from core/pointmask.py
`tile_layout`, the SD1.5 layer numbering from the order the pack counts transformer layers in (nodes/comfy_attention.py
`attention_sites`), and the step windows from the counting rule of core/attention.py `AttentionCall.within`.

The pages reference the figures by relative paths (`figures/<name>.png`). Both tested front ends (1.37.11 with
ComfyUI v0.12.1, 1.49.6 with v0.33.0) render a help page with a base URL of `/extensions/<pack folder>/docs/` and
prefix every relative image `src` with it (their `createMarkdownRenderer` / `renderMarkdownToHtml`), so the figures
load from the pack's own `web/docs/figures/` whatever the pack's folder is called.

Only PIL draws; each file is a palette PNG well under 40 KB.
"""
from __future__ import annotations

import pathlib
import sys

from PIL import Image, ImageDraw, ImageFont

REPO = pathlib.Path(__file__).resolve().parents[1]
OUT = REPO / "web" / "docs" / "figures"
sys.path.insert(0, str(REPO / "tests"))
from support.pack import import_pack  # noqa: E402

import_pack()
from editkit.core.keyframe import frame_windows, keyframes  # noqa: E402
from editkit.core.multidiffusion import window_layout  # noqa: E402
from editkit.core.pointmask import tile_layout  # noqa: E402

BG = (28, 28, 32)
PANEL = (40, 40, 46)
TEXT = (235, 235, 240)
DIM = (160, 160, 170)
GRID = (75, 75, 84)
COLOURS = [(90, 160, 230), (230, 150, 70), (110, 200, 120), (210, 100, 160), (200, 200, 90), (140, 120, 230),
           (90, 200, 200), (230, 110, 100)]
ACCENT = (250, 200, 80)
MAX_BYTES = 40 * 1024


def _font(size: int, bold: bool = False):
    names = ("DejaVuSans-Bold.ttf", "DejaVuSans.ttf") if bold else ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf")
    for name in names:
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size)   # Pillow >= 10.1 has a scalable default font
    except TypeError:
        return ImageFont.load_default()


FONT = _font(13)
SMALL = _font(11)
TITLE = _font(15, bold=True)


def _canvas(width: int, height: int):
    image = Image.new("RGB", (width, height), BG)
    return image, ImageDraw.Draw(image)


def _save(image: Image.Image, name: str) -> pathlib.Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / name
    image.convert("P", palette=Image.Palette.ADAPTIVE, colors=48).save(path, optimize=True)
    size = path.stat().st_size
    if size >= MAX_BYTES:
        raise SystemExit(f"{name}: {size} bytes, over the 40 KB a help page figure may take")
    return path


# -- Latent Fuser ------------------------------------------------------------------------------------------------

def latent_fuser_windows() -> Image.Image:
    """Windows of 512 px every 192 px over a 1216 px wide image, without and with `circular`."""
    width_px, window_px, stride_px, ratio = 1216, 512, 192, 8
    scale = 0.55                        # figure pixels per image pixel
    left_margin, lane = 30, 17
    panels = []
    for circular in (False, True):
        windows = window_layout((64, width_px // ratio), (64, window_px // ratio), (64, stride_px // ratio),
                                circular=circular)
        panels.append((circular, [(w.left * ratio, w.width * ratio) for w in windows]))
    heights = [60 + lane * len(w) + 52 for _, w in panels]
    image, draw = _canvas(int(left_margin * 2 + width_px * scale) + 10, 40 + sum(heights))
    draw.text((left_margin, 12), f"Latent Fuser: window {window_px} px, stride {stride_px} px, image {width_px} px "
                                 f"wide", font=TITLE, fill=TEXT)
    top = 40
    for (circular, windows), height in zip(panels, heights):
        x0 = left_margin
        x1 = x0 + width_px * scale
        draw.rounded_rectangle([x0 - 12, top, x1 + 12, top + height - 10], radius=8, fill=PANEL)
        label = "circular on: windows start every stride all around and wrap across the right edge" if circular \
            else "circular off: windows every stride; the last one is moved back to the right edge"
        draw.text((x0, top + 8), label, font=FONT, fill=TEXT)
        y = top + 34
        coverage = [0] * width_px
        for i, (left, width) in enumerate(windows):
            colour = COLOURS[i % len(COLOURS)]
            parts = [(left, min(left + width, width_px))]
            if left + width > width_px:
                parts.append((0, left + width - width_px))
            for a, b in parts:
                draw.rectangle([x0 + a * scale, y, x0 + b * scale - 1, y + lane - 5], fill=colour)
                for c in range(a, b):
                    coverage[c] += 1
            if len(parts) == 2:
                draw.text((x0 + parts[1][1] * scale + 4, y), "wrapped part", font=SMALL, fill=DIM)
            draw.text((x0 - 26, y), f"{i}", font=SMALL, fill=DIM)
            if not circular and i == len(windows) - 1 and left % stride_px:
                draw.text((x0 + left * scale - 6, y - 1), "◀", font=SMALL, fill=ACCENT)
                draw.text((x0 + 2, y), f"last window moved back to {left} px to end at the edge",
                          font=SMALL, fill=ACCENT)
            y += lane
        # the image strip, shaded by how many windows cover each column
        y += 6
        top_count = max(coverage)
        runs, start = [], 0
        for c in range(1, width_px + 1):
            if c == width_px or coverage[c] != coverage[start]:
                runs.append((start, c, coverage[start]))
                start = c
        for a, b, n in runs:
            shade = int(70 + 150 * n / top_count)
            draw.rectangle([x0 + a * scale, y, x0 + b * scale - 1, y + 22], fill=(shade, shade, shade + 8))
            if (b - a) * scale > 14:
                draw.text((x0 + (a + b) / 2 * scale - 4, y + 4), str(n), font=SMALL, fill=BG)
        draw.text((x0, y + 27), "the image: each column is the mean of the windows that cover it (number = how many)",
                  font=SMALL, fill=DIM)
        for px in range(0, width_px + 1, 256):
            draw.line([x0 + px * scale, y + 22, x0 + px * scale, y + 25], fill=DIM)
        top += height
    return image


# -- Keyframe Attention ------------------------------------------------------------------------------------------

def keyframe_modes() -> Image.Image:
    """Which frames each frame of an 8-frame batch reads its keys and values from, per mode."""
    frames, cell = 8, 15
    modes = [("first", "first", (), "Text2Video-Zero"), ("first_and_previous", "first_and_previous", (), "Pix2Video"),
             ("middle", "middle", (), "FateZero"), ("all", "all", (), "shared attention"),
             ("indices '0, 5'", "indices", (0, 5), "your keyframes")]
    block = frames * cell
    column = block + 60
    image, draw = _canvas(30 + column * len(modes), block + 136)
    draw.text((20, 10), "Keyframe Attention: frame i (row) reads the keys and values of frame j (column), 8 frames",
              font=TITLE, fill=TEXT)
    for m, (label, mode, indices, method) in enumerate(modes):
        x0, y0 = 50 + m * column, 80
        table = keyframes(mode, frames, indices)
        draw.text((x0 - 10, 36), label, font=FONT, fill=TEXT)
        draw.text((x0 - 10, 54), method, font=SMALL, fill=DIM)
        for i in range(frames):
            for j in range(frames):
                fill = COLOURS[0] if j in table[i] else PANEL
                draw.rectangle([x0 + j * cell, y0 + i * cell, x0 + (j + 1) * cell - 2, y0 + (i + 1) * cell - 2],
                               fill=fill)
        for k in range(frames):
            draw.text((x0 + k * cell + 3, y0 + block + 1), str(k), font=SMALL, fill=DIM)
            draw.text((x0 - 12, y0 + k * cell), str(k), font=SMALL, fill=DIM)
    draw.text((20, block + 112), "blue: read. A frame reads only these frames (its own keys count only where it is its "
                                 "own keyframe; frame 0 of first_and_previous reads [0, 0], the same as itself).",
              font=SMALL, fill=DIM)
    return image


def keyframe_frame_windows() -> Image.Image:
    """frame_window 3 over 8 frames: each model call holds its frames plus the keyframes they read."""
    frames, size = 8, 3
    cell, gap = 24, 16
    rows = [(mode, frame_windows(mode, frames, size)) for mode in ("first", "first_and_previous")]
    width = 40 + (frames + 2) * cell + 320
    image, draw = _canvas(width, 44 + sum(36 + len(w) * (cell + 6) for _, w in rows) + 38)
    draw.text((20, 10), f"frame_window {size} over {frames} frames: what each model call holds", font=TITLE, fill=TEXT)
    y = 44
    for mode, windows in rows:
        draw.text((20, y), f"mode {mode}", font=FONT, fill=TEXT)
        y += 24
        for n, (ids, kept) in enumerate(windows):
            draw.text((20, y + 4), f"call {n}", font=SMALL, fill=DIM)
            x = 80
            for p, frame in enumerate(ids):
                borrowed = p < kept
                fill = PANEL if borrowed else COLOURS[n % len(COLOURS)]
                draw.rectangle([x, y, x + cell - 3, y + cell - 3], fill=fill,
                               outline=ACCENT if borrowed else None, width=2 if borrowed else 1)
                draw.text((x + 7, y + 4), str(frame), font=SMALL, fill=ACCENT if borrowed else BG)
                x += cell + (gap if p == kept - 1 else 0)
            y += cell + 6
        y += 12
    draw.text((20, y), "first_and_previous: a borrowed previous frame (2, 5) is evaluated without its own", font=SMALL,
              fill=DIM)
    draw.text((20, y + 14), "previous frame, a small difference from one batch.", font=SMALL, fill=DIM)
    draw.text((80 + 5 * cell, 44), "outlined: a keyframe borrowed for the call;", font=SMALL, fill=DIM)
    draw.text((80 + 5 * cell, 58), "its output is dropped (it is kept from its own call)", font=SMALL, fill=DIM)
    return image


# -- step windows ------------------------------------------------------------------------------------------------

def _within(step: int, start: float, end: float, rows: int) -> bool:
    """core/attention.py AttentionCall.within: steps int(start * rows) <= step < int(end * rows)."""
    return int(start * rows) <= step < int(end * rows)


def _timelines(title: str, steps: int, bars: list[tuple[str, list[bool], tuple]], note: str) -> Image.Image:
    cell, label_w = 11, 300
    image, draw = _canvas(label_w + steps * cell + 40, 70 + 30 * len(bars) + 40)
    draw.text((20, 10), title, font=TITLE, fill=TEXT)
    x0, y0 = label_w, 52
    for s in range(0, steps + 1, 10):
        draw.text((x0 + s * cell - 4, y0 - 18), str(s), font=SMALL, fill=DIM)
    for b, (label, active, colour) in enumerate(bars):
        y = y0 + b * 30
        draw.text((20, y + 2), label, font=FONT, fill=TEXT)
        for s in range(steps):
            draw.rectangle([x0 + s * cell, y, x0 + (s + 1) * cell - 2, y + 18], fill=colour if active[s] else PANEL)
        on = [s for s in range(steps) if active[s]]
        if not on:
            draw.text((x0 + 4, y + 2), "off", font=SMALL, fill=DIM)
        elif on[-1] < steps - 8:   # room after the bar
            draw.text((x0 + (on[-1] + 1) * cell + 4, y + 2), f"steps {on[0]}–{on[-1]}", font=SMALL, fill=DIM)
        else:
            draw.text((x0 + on[0] * cell + 4, y + 3), f"steps {on[0]}–{on[-1]}", font=SMALL, fill=BG)
    draw.text((20, y0 + 30 * len(bars) + 8), note, font=SMALL, fill=DIM)
    return image


def attention_controller_windows() -> Image.Image:
    n = 50
    bars = [
        ("cross_replace 0.8 (start 0)", [_within(s, 0.0, 0.8, n + 1) for s in range(n)], COLOURS[0]),
        ("word_windows 'dog: 0.1-0.4'", [_within(s, 0.1, 0.4, n + 1) for s in range(n)], COLOURS[6]),
        ("self_replace 0.4 (start 0)", [_within(s, 0.0, 0.4, n) for s in range(n)], COLOURS[1]),
        ("local blend, blend_start 0.2", [s >= int(0.2 * n) for s in range(n)], COLOURS[2]),
        ("masactrl start_step 4, end_step 10000", [4 <= s < 10000 for s in range(n)], COLOURS[3]),
    ]
    return _timelines("Attention Controller: which of 50 steps each setting acts on", n, bars,
                      "cross windows count int(f·(N+1)) as the reference's table of N+1 rows; self windows int(f·N); "
                      "the blend runs after each step from int(blend_start·N).")


def feature_injector_windows() -> Image.Image:
    n = 50
    bars = [
        ("feature_until 0.8 (features, layer 4)", [_within(s, 0.0, 0.8, n) for s in range(n)], COLOURS[0]),
        ("attention_until 0.5 (q, k, layers 4-11)", [_within(s, 0.0, 0.5, n) for s in range(n)], COLOURS[1]),
    ]
    return _timelines("Feature Injector: which of 50 steps take the photo's features", n, bars,
                      "steps 0 to int(f·N) − 1, as pnp-diffusers' timesteps[:int(N·f)].")


# -- SD1.5 layer numbering ---------------------------------------------------------------------------------------

def sd15_layers() -> Image.Image:
    """SD1.5's blocks with the two numberings the nodes use, and the layers each default touches."""
    # (block, block id, resolution at 512 px, transformer layer or None) in the order the UNet runs them
    blocks = [("in", 1, 64, 0), ("in", 2, 64, 1), ("in", 4, 32, 2), ("in", 5, 32, 3), ("in", 7, 16, 4),
              ("in", 8, 16, 5), ("mid", 0, 8, 6)] + \
             [("out", i, (8, 8, 8, 16, 16, 16, 32, 32, 32, 64, 64, 64)[i], None if i < 3 else i + 4) for i in range(12)]
    cell, x0 = 40, 210
    uses = [
        ("MasaCtrl layers 10-15", lambda b: b[3] is not None and 10 <= b[3] <= 15, COLOURS[3]),
        ("Pix2Video mode, Consistent Subject: decoder", lambda b: b[0] == "out" and b[3] is not None, COLOURS[2]),
        ("P2P self_max_resolution 16", lambda b: b[3] is not None and b[2] <= 16, COLOURS[1]),
        ("Feature Injector feature_layers 4", lambda b: b[0] == "out" and b[1] == 4, COLOURS[0]),
        ("Feature Injector attention_layers 4-11", lambda b: b[0] == "out" and 4 <= b[1] <= 11, COLOURS[6]),
    ]
    image, draw = _canvas(x0 + cell * len(blocks) + 20, 140 + 26 * len(uses) + 30)
    draw.text((20, 10), "SD1.5 at 512 px: the two layer numberings of the nodes", font=TITLE, fill=TEXT)
    rows = [("block", lambda b: f"{b[0]}{b[1] if b[0] != 'mid' else ''}"),
            ("tokens per side", lambda b: str(b[2])),
            ("transformer layer", lambda b: "" if b[3] is None else str(b[3])),
            ("output block (FI)", lambda b: str(b[1]) if b[0] == "out" else "")]
    for r, (label, value) in enumerate(rows):
        y = 40 + r * 22
        draw.text((20, y), label, font=FONT, fill=TEXT if r != 3 else DIM)
        for i, b in enumerate(blocks):
            x = x0 + i * cell
            fill = PANEL if b[3] is not None or r == 3 else BG
            draw.rectangle([x, y - 2, x + cell - 3, y + 17], fill=fill)
            draw.text((x + 5, y), value(b), font=SMALL, fill=TEXT)
    y = 40 + len(rows) * 22 + 12
    for label, chosen, colour in uses:
        draw.text((20, y + 2), label, font=SMALL, fill=TEXT)
        for i, b in enumerate(blocks):
            if chosen(b):
                draw.rectangle([x0 + i * cell, y, x0 + (i + 1) * cell - 3, y + 18], fill=colour)
        y += 26
    draw.text((20, y + 6), "transformer layers (0-15): Attention Controller, Keyframe Attention, Consistent Subject. "
                           "Output blocks (0-11): Feature Injector (FI).", font=SMALL, fill=DIM)
    return image


# -- Point Mask --------------------------------------------------------------------------------------------------

def point_mask_tiles() -> Image.Image:
    """`tiled`, tiles 3 on a square photo: 9 encoder inputs half a tile apart, a 32x32 grid of cells."""
    layout = tile_layout(512, 512, 16, 14, 3)
    rows, cols = layout.cells
    size = 288
    step = size / cols
    image, draw = _canvas(int(2 * size + 110), int(size + 100))
    draw.text((20, 10), "Point Mask, resolution tiled, tiles 3 (ViT-L/14: 16x16 patches per input)", font=TITLE,
              fill=TEXT)
    x0, y0 = 30, 50
    count = [[0] * cols for _ in range(rows)]
    for r, c in layout.origins:
        for i in range(r, r + layout.grid):
            for j in range(c, c + layout.grid):
                count[i][j] += 1
    top = max(max(row) for row in count)
    for i in range(rows):
        for j in range(cols):
            shade = int(50 + 120 * count[i][j] / top)
            draw.rectangle([x0 + j * step, y0 + i * step, x0 + (j + 1) * step, y0 + (i + 1) * step],
                           fill=(shade, shade, shade + 8))
    for i in range(0, rows, layout.stride):
        for j in range(0, cols, layout.stride):
            draw.text((x0 + (j + layout.stride / 2) * step - 4, y0 + (i + layout.stride / 2) * step - 7),
                      str(count[i][j]), font=SMALL, fill=BG)
    for n, colour in ((0, COLOURS[0]), (4, COLOURS[1]), (8, COLOURS[2])):
        r, c = layout.origins[n]
        draw.rectangle([x0 + c * step + 1, y0 + r * step + 1, x0 + (c + layout.grid) * step - 1,
                        y0 + (r + layout.grid) * step - 1], outline=colour, width=3)
    draw.text((x0, y0 + size + 8), f"{len(layout.origins)} tiles of {layout.grid}x{layout.grid} patches, "
                                   f"{layout.stride} cells apart", font=SMALL, fill=DIM)
    draw.text((x0, y0 + size + 22), "3 of them outlined; number: tiles covering that part", font=SMALL, fill=DIM)
    x1 = x0 + size + 50
    draw.rectangle([x1, y0, x1 + size, y0 + size], fill=PANEL)
    for k in range(cols + 1):
        draw.line([x1 + k * step, y0, x1 + k * step, y0 + size], fill=GRID)
        draw.line([x1, y0 + k * step, x1 + size, y0 + k * step], fill=GRID)
    draw.text((x1, y0 + size + 8), f"the mask's grid: {rows}x{cols} cells (coarse: 16x16)", font=SMALL, fill=DIM)
    draw.text((x1, y0 + size + 22), "overlapping features averaged per cell", font=SMALL, fill=DIM)
    return image


# -- Motion Latents ----------------------------------------------------------------------------------------------

def motion_latents_steps() -> Image.Image:
    """start_at_step 2, warp_at_step 5 of 50: frame 0 alone to step 5, warped, noised back to step 2."""
    n, start, warp = 50, 2, 5
    shown = 14
    cell, x0 = 46, 170
    image, draw = _canvas(x0 + cell * shown + 60, 230)
    draw.text((20, 10), f"Motion Latents: start_at_step {start}, warp_at_step {warp} (of {n} steps)", font=TITLE,
              fill=TEXT)
    for s in range(shown + 1):
        draw.text((x0 + s * cell - 4, 40), str(s), font=SMALL, fill=DIM)
        draw.line([x0 + s * cell, 56, x0 + s * cell, 190], fill=GRID)
    draw.text((20, 66), "frame 0, alone", font=FONT, fill=TEXT)
    draw.rectangle([x0, 68, x0 + warp * cell, 84], fill=COLOURS[0])
    draw.text((x0 + warp * cell + 16, 69), "from the seed's noise, guided DDIM steps (ComfyUI's ddim)", font=SMALL,
              fill=TEXT)
    draw.ellipse([x0 + start * cell - 6, 70, x0 + start * cell + 6, 82], fill=COLOURS[2], outline=BG)
    draw.text((20, 104), "frames 1 … F−1", font=FONT, fill=TEXT)
    draw.rectangle([x0 + warp * cell - 10, 100, x0 + warp * cell + 10, 120], fill=ACCENT)
    draw.text((x0 + warp * cell + 16, 104), "frame 0's latent here, the view moved by k · strength · "
                                            "(motion_x, motion_y)", font=SMALL, fill=TEXT)
    draw.line([x0 + warp * cell, 132, x0 + start * cell, 132], fill=COLOURS[1], width=3)
    draw.polygon([(x0 + start * cell, 132), (x0 + start * cell + 10, 127), (x0 + start * cell + 10, 137)],
                 fill=COLOURS[1])
    draw.text((x0 + warp * cell + 16, 126), "noised back to start_at_step, each frame with its own noise",
              font=SMALL, fill=TEXT)
    draw.text((20, 156), "the video (output)", font=FONT, fill=TEXT)
    draw.rectangle([x0 + start * cell, 158, x0 + shown * cell, 174], fill=COLOURS[2])
    draw.text((x0 + start * cell + 4, 159), f"all F frames sampled from step {start} with the SIGMAS output",
              font=SMALL, fill=BG)
    draw.text((20, 200), "frame 0 of the video is frame 0's own latent at start_at_step (green dot); "
                         "warp_at_step is never before start_at_step.", font=SMALL, fill=DIM)
    return image


FIGURES = {
    "latent_fuser_windows.png": latent_fuser_windows,
    "keyframe_modes.png": keyframe_modes,
    "keyframe_frame_windows.png": keyframe_frame_windows,
    "attention_controller_windows.png": attention_controller_windows,
    "feature_injector_windows.png": feature_injector_windows,
    "sd15_layers.png": sd15_layers,
    "point_mask_tiles.png": point_mask_tiles,
    "motion_latents_steps.png": motion_latents_steps,
}


def main() -> None:
    for name, draw in FIGURES.items():
        path = _save(draw(), name)
        print(f"{path.relative_to(REPO)}  {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
