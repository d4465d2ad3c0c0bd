"""The toy world: one flat-coloured shape on a plain background, 64 x 64 pixels, with a caption naming every
attribute and the shape's ground-truth mask.

    a big red circle on the left, grey background

Attributes (6 x 3 x 5 x 2 x 3 = 540 captions):

* colour: red, green, blue, yellow, purple, pink
* shape: circle, square, triangle (pointing up)
* position: left, right, top, bottom, middle (the shape's centre at one of five points, jittered by up to
  ``POSITION_JITTER`` pixels)
* size: big, small (radius ``SIZE_RADIUS`` +- ``SIZE_JITTER`` pixels)
* background: grey, white, black

One object and no distractor: a caption that names every attribute of every pixel, and a world a tiny UNet
learns on two CPU cores in about an hour (the issue's 60-minute trial with two objects did not bind position or
shape). ``HELD_OUT`` is a fixed set of 54 captions (10 %) never shown in training; every single attribute value
still occurs in training, so a held-out caption asks for a new combination of known words.

Everything here is numpy; no torch, no ComfyUI. ``render(caption, seed)`` is deterministic.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 64

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 200),
    "pink": (245, 130, 190),
}
SHAPES = ("circle", "square", "triangle")
# position word -> (phrase in the caption, centre (x, y) in pixels)
POSITIONS = {
    "left": ("on the left", (16.0, 32.0)),
    "right": ("on the right", (48.0, 32.0)),
    "top": ("at the top", (32.0, 16.0)),
    "bottom": ("at the bottom", (32.0, 48.0)),
    "middle": ("in the middle", (32.0, 32.0)),
}
SIZE_RADIUS = {"big": 11.0, "small": 6.0}
BACKGROUNDS = {
    "grey": (128, 128, 128),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
}
POSITION_JITTER = 3.0
SIZE_JITTER = 1.0
ATTRIBUTES = ("colour", "shape", "position", "size", "background")


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    position: str
    size: str
    background: str

    @property
    def caption(self) -> str:
        return caption_of(self)

    def attributes(self) -> dict[str, str]:
        return {a: getattr(self, a) for a in ATTRIBUTES}


def caption_of(scene: Scene) -> str:
    return (f"a {scene.size} {scene.colour} {scene.shape} {POSITIONS[scene.position][0]}, "
            f"{scene.background} background")


_CAPTION_RE = re.compile(
    r"^a (?P<size>\w+) (?P<colour>\w+) (?P<shape>\w+) (?P<pos>on the left|on the right|at the top|at the bottom|"
    r"in the middle), (?P<background>\w+) background$")
_PHRASE_TO_POSITION = {phrase: name for name, (phrase, _) in POSITIONS.items()}


def parse_caption(caption: str) -> Scene:
    """The scene a caption names; ValueError for anything that is not a caption of this world."""
    m = _CAPTION_RE.match(caption.strip())
    if m is None:
        raise ValueError(f"not a toy-world caption: {caption!r}")
    scene = Scene(colour=m["colour"], shape=m["shape"], position=_PHRASE_TO_POSITION[m["pos"]], size=m["size"],
                  background=m["background"])
    if (scene.colour not in COLOURS or scene.shape not in SHAPES or scene.size not in SIZE_RADIUS
            or scene.background not in BACKGROUNDS):
        raise ValueError(f"unknown attribute value in {caption!r}")
    return scene


def all_scenes() -> list[Scene]:
    """The 540 scenes (captions) of the world, in a fixed order."""
    return [Scene(c, s, p, z, b) for c, s, p, z, b in
            itertools.product(COLOURS, SHAPES, POSITIONS, SIZE_RADIUS, BACKGROUNDS)]


def _split() -> tuple[list[Scene], list[Scene]]:
    scenes = all_scenes()
    order = np.random.default_rng(20261201).permutation(len(scenes))
    held = sorted(order[:len(scenes) // 10].tolist())
    held_set = set(held)
    return [s for i, s in enumerate(scenes) if i not in held_set], [scenes[i] for i in held]


TRAIN, HELD_OUT = _split()
_SCENE_INDEX = {s: i for i, s in enumerate(all_scenes())}
TRAIN_CAPTIONS = tuple(s.caption for s in TRAIN)
HELD_OUT_CAPTIONS = tuple(s.caption for s in HELD_OUT)


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean (size, size) mask of a shape centred at pixel coordinates (cx, cy) with half-extent r.

    Pixel (i, j) is inside when its centre (j + 0.5, i + 0.5) is: circle of radius r, axis-aligned square of
    half-side 0.9 r, triangle pointing up with base 2 r (at cy + r) and apex at cy - r.
    """
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        h = 0.9 * r
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape == "triangle":
        # height 2r from apex (cy - r) to base (cy + r); half-width grows linearly from 0 to r
        t = (dy + r) / (2 * r)
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= r * t)
    raise ValueError(f"unknown shape {shape!r}")


@dataclass(frozen=True)
class Render:
    image: np.ndarray      # (H, W, 3) float32 in [0, 1]
    mask: np.ndarray       # (H, W) bool, the object
    scene: Scene
    centre: tuple[float, float]
    radius: float


def render(caption_or_scene, seed: int = 0, jitter: bool = True) -> Render:
    """Render a scene: the same (caption, seed) always gives the same image. ``jitter=False`` puts the shape
    exactly at its nominal centre and radius."""
    scene = parse_caption(caption_or_scene) if isinstance(caption_or_scene, str) else caption_or_scene
    cx, cy = POSITIONS[scene.position][1]
    r = SIZE_RADIUS[scene.size]
    if jitter:
        rng = np.random.default_rng([int(seed), _SCENE_INDEX[scene]])
        jx, jy = rng.uniform(-POSITION_JITTER, POSITION_JITTER, size=2)
        cx, cy = cx + jx, cy + jy
        r = r + rng.uniform(-SIZE_JITTER, SIZE_JITTER)
    mask = shape_mask(scene.shape, cx, cy, r)
    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
    img[:] = np.asarray(BACKGROUNDS[scene.background], dtype=np.float32) / 255.0
    img[mask] = np.asarray(COLOURS[scene.colour], dtype=np.float32) / 255.0
    return Render(image=img, mask=mask, scene=scene, centre=(float(cx), float(cy)), radius=float(r))


def render_batch(scenes, seeds) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, H, W, 3) float32 and masks (N, H, W) bool of several scenes."""
    renders = [render(s, int(k)) for s, k in zip(scenes, seeds)]
    return np.stack([r.image for r in renders]), np.stack([r.mask for r in renders])
