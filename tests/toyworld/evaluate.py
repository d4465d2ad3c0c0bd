"""Score an image against a toy-world caption: segment it by colour and read back every attribute.

* background: the median colour of the one-pixel border, named by the nearest background colour;
* object: the largest 4-connected region of pixels farther than ``OBJECT_DISTANCE`` (RGB, 0-255) from that
  background colour, then refined at the midpoint: the largest region of pixels nearer that region's median colour
  than the background colour (a blurred edge stays where it is, whatever the contrast); none (every object
  attribute wrong) when it has fewer than ``MIN_OBJECT_PIXELS`` pixels;
* colour: the nearest palette colour to the region's median colour;
* position: the nearest of the five nominal centres to the region's centroid;
* size: ``big`` when half the larger side of its bounding box is at least ``SIZE_THRESHOLD`` pixels (big shapes:
  9-12, small: 4.5-7);
* shape: the template (circle, square, triangle pointing up) fitted to the region's bounding box with the highest
  IoU with the region.

Nothing here uses the caption to segment; the caption is only what the reading is compared with. Ground-truth
renders score 100 % on every attribute (tests/toyworld/test_toyworld.py checks all 540 scenes).

``score(image, caption)`` -> {attribute: bool}; ``score_batch(images, captions)`` -> {attribute: fraction, "all":
fraction of images right on every attribute}; ``round_trip(vae, captions, seeds)``: the same scores and the PSNR of
ComfyUI-VAE round trips of fresh renders, the bound a model sampling through that VAE can reach.
"""
from __future__ import annotations

import math

import numpy as np

try:
    from . import world
except ImportError:  # run as a script from tests/toyworld
    import world  # type: ignore

_PALETTE = {k: np.asarray(v, dtype=np.float64) for k, v in world.COLOURS.items()}
_BACKGROUNDS = {k: np.asarray(v, dtype=np.float64) for k, v in world.BACKGROUNDS.items()}
# half the smallest RGB distance between an object colour and a background colour (purple on grey: 101)
OBJECT_DISTANCE = 0.5 * min(float(np.linalg.norm(c - b)) for c in _PALETTE.values() for b in _BACKGROUNDS.values())
MIN_OBJECT_PIXELS = 8
SIZE_THRESHOLD = 8.0


def _as_hwc255(image) -> np.ndarray:
    """(H, W, 3) float64 in 0-255 from a ComfyUI IMAGE tensor ((1,) H, W, 3 in [0, 1]) or a numpy array."""
    if hasattr(image, "detach"):
        image = image.detach().cpu().float().numpy()
    a = np.asarray(image, dtype=np.float64)
    if a.ndim == 4:
        if a.shape[0] != 1:
            raise ValueError("score one image at a time (or use score_batch)")
        a = a[0]
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {a.shape}")
    return np.clip(a, 0.0, 1.0) * 255.0


def _nearest(rgb: np.ndarray, table: dict) -> str:
    return min(table, key=lambda k: float(np.linalg.norm(rgb - table[k])))


def _largest_component(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = ndimage.sum(mask, labels, index=np.arange(1, n + 1))
    return labels == (1 + int(np.argmax(sizes)))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    u = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / u) if u else 0.0


def segment(image) -> dict:
    """The evaluator's reading of an image: ``background`` (name), ``background_rgb``, ``mask`` (the object, bool
    (H, W)), and, when an object was found, ``colour``, ``shape``, ``position``, ``size``, ``centroid`` (x, y),
    ``half_extent`` and ``shape_iou`` ({shape: IoU}); object attributes are None when none was found."""
    a = _as_hwc255(image)
    h, w, _ = a.shape
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    bg = np.median(border, axis=0)
    out = {"background_rgb": bg, "background": _nearest(bg, _BACKGROUNDS),
           "colour": None, "shape": None, "position": None, "size": None}
    mask = _largest_component(np.linalg.norm(a - bg, axis=-1) > OBJECT_DISTANCE)
    out["mask"] = mask
    if mask.sum() < MIN_OBJECT_PIXELS:
        return out
    # refine at the midpoint between the two colours: a pixel is the object's when it is nearer the object's
    # median colour than the background's (an edge blurred symmetrically keeps its place, whatever the contrast)
    obj = np.median(a[mask], axis=0)
    mask = _largest_component((np.linalg.norm(a - obj, axis=-1) < np.linalg.norm(a - bg, axis=-1))
                              & (np.linalg.norm(a - bg, axis=-1) > 0.5 * OBJECT_DISTANCE))
    out["mask"] = mask
    if mask.sum() < MIN_OBJECT_PIXELS:
        return out
    out["colour"] = _nearest(np.median(a[mask], axis=0), _PALETTE)
    ys, xs = np.nonzero(mask)
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    out["centroid"] = (float(cx), float(cy))
    out["position"] = min(world.POSITIONS, key=lambda p: math.dist((cx, cy), world.POSITIONS[p][1]))
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    bw, bh = x1 - x0, y1 - y0
    half = max(bw, bh) / 2.0
    out["half_extent"] = float(half)
    out["size"] = "big" if half >= SIZE_THRESHOLD else "small"
    bx, by, r = (x0 + x1) / 2.0, (y0 + y1) / 2.0, (bw + bh) / 4.0
    templates = {
        "circle": world.shape_mask("circle", bx, by, r, size=h),
        "square": world.shape_mask("square", bx, by, r / 0.9, size=h),
        "triangle": world.shape_mask("triangle", bx, by, r, size=h),
    }
    ious = {k: _iou(mask, t) for k, t in templates.items()}
    out["shape_iou"] = ious
    out["shape"] = max(ious, key=ious.get)
    return out


def score(image, caption) -> dict[str, bool]:
    """{attribute: whether the image shows the caption's value}, for colour, shape, position, size, background."""
    scene = world.parse_caption(caption) if isinstance(caption, str) else caption
    seg = segment(image)
    return {a: seg[a] == getattr(scene, a) for a in world.ATTRIBUTES}


def score_batch(images, captions) -> dict[str, float]:
    """Fractions of images right on each attribute, and on all of them ("all")."""
    if hasattr(images, "detach"):
        images = images.detach().cpu().float().numpy()
    images = np.asarray(images)
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images for {len(captions)} captions")
    rows = [score(img, cap) for img, cap in zip(images, captions)]
    res = {a: float(np.mean([r[a] for r in rows])) for a in world.ATTRIBUTES}
    res["all"] = float(np.mean([all(r.values()) for r in rows]))
    return res


def psnr(a, b) -> float:
    a = np.asarray(a.detach().cpu().numpy() if hasattr(a, "detach") else a, dtype=np.float64)
    b = np.asarray(b.detach().cpu().numpy() if hasattr(b, "detach") else b, dtype=np.float64)
    mse = float(np.mean((np.clip(a, 0, 1) - np.clip(b, 0, 1)) ** 2))
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def round_trip(vae, captions=None, seeds=(0, 1, 2, 3)) -> dict[str, float]:
    """Encode and decode fresh renders (``seeds`` x ``captions``, default the held-out captions) with a ComfyUI VAE
    (``comfy.sd.VAE``: ``encode(IMAGE) -> latent``, ``decode(latent) -> IMAGE``) and score the decoded images:
    the bound of what a model sampling through this VAE can reach. Adds "psnr" (dB, over all images) and
    "object_psnr" (dB, over the objects' pixels only)."""
    import torch

    captions = list(world.HELD_OUT_CAPTIONS if captions is None else captions)
    caps = [c for k in seeds for c in captions]
    renders = [world.render(c, 10_000 + k) for k in seeds for c in captions]
    images = torch.from_numpy(np.stack([r.image for r in renders]))
    decoded = vae.decode(vae.encode(images)).reshape(images.shape).float().cpu()
    res = score_batch(decoded, caps)
    res["psnr"] = psnr(decoded, images)
    m = np.stack([r.mask for r in renders])
    d = decoded.numpy()[m]
    res["object_psnr"] = psnr(d, images.numpy()[m])
    return res
