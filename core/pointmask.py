"""P3S-Diffusion's point-supervised subject mask, the first half of its RNGR-Encoder (Hu et al., "P3S-Diffusion:
A Selective Subject-driven Generation Framework via Point Supervision", sec. III-A, eq. 1-3).

Given an image, points on the subject (positive) and points on what must not be learnt (negative, e.g. a second
dog), the paper takes the CLIP image encoder's patch features and:

1. eq. 1: M_{P,N}[i, j] = Cos(patch under the point, patch (i, j)), one map per point;
2. eq. 2: Mask = Otsu(Ψ(M_P · (1 − M_N))), Ψ a Gaussian filter, then "remove outliers that are not connected to
   the specified points";
3. eq. 3: I' = inpainting(I, Mask): "the masked area can be filled with any content as long as it is not
   similar to the target subject".

Where the paper is silent, this module chooses (and core tests pin down):

- cosine similarities are clamped to [0, 1] before eq. 2: a negative cosine is "not alike", as 0 is; without
  the clamp 1 − M_N would exceed 1 and a patch unlike the negative points would be boosted above the subject;
- several positive points: M_P is the pixel-wise maximum of their maps (a patch is subject-like when it is like
  any of the clicked parts, e.g. head and tail); likewise M_N; no negative point: M_N = 0;
- Ψ: a separable Gaussian of standard deviation `sigma` in cells of the patch grid, truncated at ceil(3 sigma),
  replicate padding (edges are not darkened); sigma 0 skips it;
- Otsu: `core.masks.otsu_threshold` (scikit-image's threshold_otsu over the grid's values); the mask is
  score > threshold;
- components: 8-connectivity on the patch grid (a diagonal step of one patch is still the same object at this
  resolution); the mask is the union of the components holding a positive point. A positive point whose own
  patch is at or below the threshold is an error, never an empty mask;
- image size: the grid's score is resized bilinearly and thresholded again, so the edges follow the interpolated
  score rather than the patch staircase. The level is the same split of the grid's values, placed midway between
  the highest value below the Otsu threshold and the lowest above it (Otsu's first-argmax tie-break sits at the
  bottom of that gap, which is harmless on the grid but would widen the mask by up to a cell between pixels);
  every cell outside the kept components is capped at that level, so (8-connectivity: no 2x2 block of cells
  mixes two components) nothing of another component comes back;
- the fill: by default everything outside the subject mask (the paper's "any content unlike the subject"; the
  DreamBooth-style fine-tuning ignores the background anyway), or only the negative subjects' region: eq. 2 with
  the roles swapped, Otsu(Ψ(M_N · (1 − M_P))), its components holding a negative point, less the subject mask.
  A plain colour replaces the paper's inpainting model (a stock inpainting graph can take the MASK instead).

Resolution: one 224 px encoding of ViT-L/14 gives a 16x16 grid, 32 px cells on a 512 px photo. `tile_layout`
cuts the image into overlapping square tiles (half a tile apart) that are encoded as one batch with the stock
encoder, and `stitch_tiles` averages the tiles' unit-length patch features into a finer grid (3 tiles a side:
32x32 cells). Interpolated position embeddings or dense-CLIP attention would need the encoder's internals; tiles
need only `encode_image`.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .masks import otsu_threshold

POSITIVE, NEGATIVE = "positive_points", "negative_points"
FILL_REGIONS = ("outside_subject", "negative_subjects")
FILL_COLOURS = ("grey", "mean", "black", "white")
_PLAIN = {"grey": 0.5, "black": 0.0, "white": 1.0}
_EXAMPLE = "write x,y pairs in image pixels, e.g. '120,80; 300,200' (or one per line), or the JSON list " \
           "[{\"x\": 120, \"y\": 80}] of a points editor"


@dataclass(frozen=True)
class Point:
    """A point in image pixels: x to the right, y down, from the top-left corner."""
    x: float
    y: float

    def __str__(self) -> str:
        return f"({self.x:g}, {self.y:g})"


# ----------------------------------------------------------------------------------------------------------------
# points from text
# ----------------------------------------------------------------------------------------------------------------

def _number(value, name: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{name}: {where} has the coordinate {value!r}, not a number; {_EXAMPLE}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{name}: cannot read {value!r} in {where} as a number; {_EXAMPLE}") from None
    if not math.isfinite(number):
        raise ValueError(f"{name}: {where} has the coordinate {value!r}; coordinates must be finite numbers")
    return number


def _json_points(text: str, name: str) -> list[Point]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{name}: cannot read it as JSON ({e.msg} at character {e.pos}); {_EXAMPLE}") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise ValueError(f"{name}: the JSON is a {type(data).__name__}, not a list of points; {_EXAMPLE}")
    points = []
    for i, item in enumerate(data):
        where = f"item {i} ({json.dumps(item)})"
        if isinstance(item, dict) and "x" in item and "y" in item:
            points.append(Point(_number(item["x"], name, where), _number(item["y"], name, where)))
        elif isinstance(item, list) and len(item) == 2:
            points.append(Point(_number(item[0], name, where), _number(item[1], name, where)))
        else:
            raise ValueError(f"{name}: {where} is not a point; each item needs \"x\" and \"y\"; {_EXAMPLE}")
    return points


def _pair_points(text: str, name: str) -> list[Point]:
    points = []
    for part in re.split(r"[;\n]", text):
        part = part.strip()
        if not part:
            continue
        numbers = [n for n in re.split(r"[,\s]+", part.strip("()[] \t")) if n]
        if len(numbers) != 2:
            hint = "separate points with ';' or new lines" if len(numbers) > 2 else "a point is two numbers"
            raise ValueError(f"{name}: cannot read '{part}' as a point ({hint}); {_EXAMPLE}")
        where = f"'{part}'"
        points.append(Point(_number(numbers[0], name, where), _number(numbers[1], name, where)))
    return points


def parse_points(text: str, name: str, height: int, width: int) -> tuple[Point, ...]:
    """The points of `text` (empty text: none) inside an image of `height` x `width` pixels.

    Accepts `x,y` pairs separated by ';' or new lines (brackets and spaces allowed: '(120, 80)'), and JSON: a
    list of {"x": .., "y": ..} objects (what ComfyUI point-editor nodes such as KJNodes' Points Editor emit), of
    [x, y] pairs, or one object. `name` (the input's name) starts every error message."""
    text = (text or "").strip()
    if not text:
        return ()
    points = _json_points(text, name) if text[0] in "[{" else _pair_points(text, name)
    for p in points:
        if not (0 <= p.x < width and 0 <= p.y < height):
            raise ValueError(f"{name}: the point {p} is outside the {width}x{height} image (valid: 0 <= x < "
                             f"{width}, 0 <= y < {height}, in image pixels from the top-left corner)")
    return tuple(points)


def point_cell(point: Point, image_size: tuple[int, int], grid: tuple[int, int]) -> tuple[int, int]:
    """(row, column) of the grid cell under `point`: the grid covers the whole image, cells of equal size."""
    (height, width), (rows, cols) = image_size, grid
    return min(int(point.y * rows / height), rows - 1), min(int(point.x * cols / width), cols - 1)


# ----------------------------------------------------------------------------------------------------------------
# eq. 1-2 on a patch grid
# ----------------------------------------------------------------------------------------------------------------

def similarity_map(features: torch.Tensor, cells: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Eq. 1 for several points: the maximum over the points of the cosine similarity of the point's patch
    with every patch, clamped to [0, 1]. features (h, w, C) -> (h, w); no points: zeros."""
    unit = F.normalize(features.detach().float(), dim=-1)
    if not cells:
        return torch.zeros(unit.shape[:2], dtype=unit.dtype, device=unit.device)
    references = torch.stack([unit[r, c] for r, c in cells])                       # (points, C)
    return torch.einsum("hwc,pc->phw", unit, references).clamp(0, 1).amax(dim=0)


def gaussian_smooth(values: torch.Tensor, sigma: float) -> torch.Tensor:
    """Ψ: separable Gaussian of std `sigma` cells, kernel radius ceil(3 sigma), replicate padding. (h, w)."""
    if sigma <= 0:
        return values
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(values.dtype).to(values.device)
    x = F.pad(values[None, None], (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    return x[0, 0]


def connected_to(foreground: torch.Tensor, seeds: Sequence[tuple[int, int]]) -> torch.Tensor:
    """The 8-connected components of the boolean (h, w) `foreground` that hold a seed cell (their union)."""
    region = torch.zeros_like(foreground)
    for r, c in seeds:
        region[r, c] = foreground[r, c]
    while True:
        grown = (F.max_pool2d(region[None, None].float(), 3, stride=1, padding=1)[0, 0] > 0) & foreground
        if torch.equal(grown, region):
            return region
        region = grown


def image_level(score: torch.Tensor, threshold: float) -> float:
    """The level that splits the grid's values as `score > threshold` does, midway in the gap between the two
    classes (the threshold itself when one class is empty)."""
    above, below = score[score > threshold], score[score <= threshold]
    if above.numel() == 0 or below.numel() == 0:
        return threshold
    return float((below.max() + above.min()) / 2)


def _to_image(score: torch.Tensor, kept: torch.Tensor, level: float, size: tuple[int, int]) -> torch.Tensor:
    """The kept cells' region at image size: the score resized bilinearly, cells outside `kept` capped at
    `level`, > level. A grid larger than the image can lose a kept cell between pixels; then each pixel takes
    the maximum of the kept cells it overlaps, so a kept component never vanishes."""
    capped = torch.where(kept, score, score.clamp(max=level))
    fine = F.interpolate(capped[None, None], size=size, mode="bilinear", align_corners=False)[0, 0] > level
    if kept.any() and not fine.any():
        fine = F.adaptive_max_pool2d(kept[None, None].float(), size)[0, 0] > 0
    return fine


@dataclass(frozen=True)
class PointMask:
    """The masks of one image. `mask` and `negative` are (H, W) booleans at image size; `score` is the smoothed
    M_P · (1 − M_N) on the patch grid, `threshold` its Otsu threshold, `cells` the kept grid cells."""
    mask: torch.Tensor
    negative: torch.Tensor
    score: torch.Tensor
    threshold: float
    cells: torch.Tensor


def _score(features, seeds, others, sigma):
    return gaussian_smooth(similarity_map(features, seeds) * (1 - similarity_map(features, others)), sigma)


def subject_mask(features: torch.Tensor, positive: Sequence[Point], negative: Sequence[Point],
                 image_size: tuple[int, int], sigma: float = 1.0) -> PointMask:
    """Eq. 2 on a grid of patch features (h, w, C) covering an image of `image_size` (H, W) pixels.

    Raises ValueError (naming positive_points) when there is no positive point, or when a positive point's
    patch is not above the threshold (the negative points' similarity removed it, or the map is flat)."""
    if not positive:
        raise ValueError(f"{POSITIVE}: give at least one point on the subject ({_EXAMPLE})")
    grid = tuple(features.shape[:2])
    seeds = [point_cell(p, image_size, grid) for p in positive]
    others = [point_cell(p, image_size, grid) for p in negative]
    score = _score(features, seeds, others, sigma)
    threshold = float(otsu_threshold(score.flatten()))
    foreground = score > threshold
    like_negative = similarity_map(features, others)
    for p, (r, c) in zip(positive, seeds):
        if not foreground[r, c]:
            if negative and like_negative[r, c] > 0.5:
                why = (f"its patch is {float(like_negative[r, c]):.2f} alike (cosine) to a negative point's, and "
                       f"M_P · (1 − M_N) removes what resembles the negative points; move them off this subject, "
                       f"or use fewer")
            elif score.max() - score.min() <= 1e-6:
                why = "the similarity map is flat (every patch is alike to the encoder), so nothing stands out"
            else:
                why = ("what it marks is too small or too unlike the rest of the subject at this smoothing; click "
                       "nearer its middle, lower the smoothing or use a finer resolution")
            raise ValueError(f"{POSITIVE}: the point {p} is not in the mask: its score {float(score[r, c]):.3f} "
                             f"is not above the Otsu threshold {threshold:.3f}; {why}")
    kept = connected_to(foreground, seeds)
    mask = _to_image(score, kept, image_level(score, threshold), image_size)
    negative_mask = torch.zeros_like(mask)
    if negative:
        nscore = _score(features, others, seeds, sigma)
        nthreshold = float(otsu_threshold(nscore.flatten()))
        nkept = connected_to(nscore > nthreshold, others) & ~kept
        negative_mask = _to_image(nscore, nkept, image_level(nscore, nthreshold), image_size) & ~mask
    return PointMask(mask=mask, negative=negative_mask, score=score, threshold=threshold, cells=kept)


# ----------------------------------------------------------------------------------------------------------------
# eq. 3: the fill, and a preview
# ----------------------------------------------------------------------------------------------------------------

def fill_region(mask: PointMask, region: str) -> torch.Tensor:
    """What must go, (H, W) boolean: everything outside the subject, or the negative subjects only."""
    if region == "outside_subject":
        return ~mask.mask
    if region == "negative_subjects":
        return mask.negative
    raise ValueError(f"fill_region: '{region}' is not one of {', '.join(FILL_REGIONS)}")


def fill_image(images: torch.Tensor, regions: torch.Tensor, colour: str = "grey") -> torch.Tensor:
    """A new (B, H, W, C) image with each image's `regions` (B, H, W) painted a plain colour: grey, black,
    white, or `mean` (the mean colour of the pixels being replaced). The input is not changed."""
    if colour not in FILL_COLOURS:
        raise ValueError(f"fill: '{colour}' is not one of {', '.join(FILL_COLOURS)}")
    out = images.clone()
    for b in range(images.shape[0]):
        region = regions[b].to(images.device)
        if not region.any():
            continue
        if colour == "mean":
            value = images[b][region].mean(dim=0)
        else:
            value = torch.full((images.shape[-1],), _PLAIN[colour], dtype=images.dtype, device=images.device)
            if images.shape[-1] == 4:
                value[3] = 1.0   # (an alpha channel stays opaque)
        out[b][region] = value.to(images.dtype)
    return out


def _disc(height: int, width: int, point: Point, radius: float) -> torch.Tensor:
    y = torch.arange(height, dtype=torch.float32)[:, None] + 0.5
    x = torch.arange(width, dtype=torch.float32)[None, :] + 0.5
    return (x - point.x) ** 2 + (y - point.y) ** 2 <= radius ** 2


def preview(images: torch.Tensor, masks: torch.Tensor, positive: Sequence[Point],
            negative: Sequence[Point]) -> torch.Tensor:
    """(B, H, W, 3): the subject in its own colours with a yellow outline, the rest dimmed, positive points as
    green dots and negative points as red dots (white rims)."""
    rgb = images[..., :3].float().cpu()
    masks = masks.cpu()
    out = torch.where(masks[..., None], rgb, 0.3 * rgb + 0.1)
    outside = (~masks).float()[:, None]
    edge = masks & (F.max_pool2d(outside, 3, stride=1, padding=1)[:, 0] > 0)
    out[edge] = torch.tensor([1.0, 0.85, 0.1])
    height, width = rgb.shape[1:3]
    radius = max(2.0, min(height, width) / 80)
    for points, colour in ((positive, (0.1, 0.9, 0.2)), (negative, (0.95, 0.15, 0.1))):
        for p in points:
            out[:, _disc(height, width, p, radius + max(1.0, radius / 3))] = 1.0
            out[:, _disc(height, width, p, radius)] = torch.tensor(colour)
    return out


# ----------------------------------------------------------------------------------------------------------------
# a finer grid from overlapping tiles
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TileLayout:
    """Square tiles of `grid` x `grid` encoder cells of `patch` pixels (one encoder input each), `stride` cells
    apart, `rows` x `cols` of them over the image resized to `size`. One tile (1 x 1) is the plain encoding of
    the whole image, stretched to the encoder's square."""
    grid: int
    patch: int
    rows: int
    cols: int
    stride: int

    @property
    def cells(self) -> tuple[int, int]:
        return self.grid + (self.rows - 1) * self.stride, self.grid + (self.cols - 1) * self.stride

    @property
    def size(self) -> tuple[int, int]:
        return self.cells[0] * self.patch, self.cells[1] * self.patch

    @property
    def tile(self) -> int:
        return self.grid * self.patch

    @property
    def origins(self) -> list[tuple[int, int]]:
        """Top-left cell of each tile, row by row."""
        return [(r * self.stride, c * self.stride) for r in range(self.rows) for c in range(self.cols)]


def tile_layout(height: int, width: int, grid: int, patch: int, tiles: int) -> TileLayout:
    """`tiles` tiles along the image's longer side, half a tile apart; along the shorter side as many as keep
    the cells square to within half a stride (at least one). The image is resized to the layout's size, so
    its aspect ratio changes by at most that much; masks come back at the image's own size."""
    if tiles < 1:
        raise ValueError(f"tiles: {tiles}; give at least 1 tile along the longer side")
    stride = max(1, grid // 2)
    long_side, short_side = max(height, width), min(height, width)
    cell = long_side / (grid + (tiles - 1) * stride)
    across = max(1, round((short_side / cell - grid) / stride) + 1)
    rows, cols = (tiles, across) if height >= width else (across, tiles)
    return TileLayout(grid=grid, patch=patch, rows=rows, cols=cols, stride=stride)


def cut_tiles(images: torch.Tensor, layout: TileLayout) -> torch.Tensor:
    """(B, H, W, C) -> (B · tiles, T, T, C): each image resized to the layout (bicubic, antialiased, as
    ComfyUI's CLIP preprocessing resizes) and cut into its tiles, image by image, row by row."""
    x = images.movedim(-1, 1).float()
    if tuple(x.shape[-2:]) != layout.size:
        x = F.interpolate(x, size=layout.size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    side, patch = layout.tile, layout.patch
    crops = [x[:, :, r * patch:r * patch + side, c * patch:c * patch + side] for r, c in layout.origins]
    return torch.stack(crops, dim=1).flatten(0, 1).movedim(1, -1).to(images.dtype)


def stitch_tiles(features: torch.Tensor, layout: TileLayout) -> torch.Tensor:
    """(B · tiles, g, g, C) tile features -> (B, h, w, C) on the layout's fine grid: each cell the mean of the
    unit-length features of the tiles that cover it (unit length, so that no tile outweighs another)."""
    g, channels = layout.grid, features.shape[-1]
    per_image = F.normalize(features.float(), dim=-1).reshape(-1, len(layout.origins), g, g, channels)
    total = torch.zeros(per_image.shape[0], *layout.cells, channels, dtype=per_image.dtype,
                        device=per_image.device)
    count = torch.zeros(layout.cells, dtype=per_image.dtype, device=per_image.device)
    for t, (r, c) in enumerate(layout.origins):
        total[:, r:r + g, c:c + g] += per_image[:, t]
        count[r:r + g, c:c + g] += 1
    return total / count[None, :, :, None]


def patch_grid(tokens: torch.Tensor, grid: int) -> torch.Tensor:
    """An encoder's hidden states (B, N, C) -> the patch grid (B, grid, grid, C): a class token first
    (N = grid² + 1, CLIP) is dropped, N = grid² (SigLIP) is taken as is."""
    count = tokens.shape[1]
    if count == grid * grid + 1:
        tokens = tokens[:, 1:]
    elif count != grid * grid:
        raise ValueError(f"clip_vision: the encoder returned {count} tokens per image, not a {grid}x{grid} patch "
                         f"grid (with or without a class token); use a CLIP or SigLIP vision model")
    return tokens.reshape(tokens.shape[0], grid, grid, tokens.shape[-1])


def encode_grid(encode: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, layout: TileLayout,
                batch: int = 16) -> torch.Tensor:
    """Patch features (B, h, w, C) of `images` (B, H, W, C) on the layout's grid. `encode` takes tiles
    (n, T, T, C) and returns their patch grids (n, g, g, C); it is called on at most `batch` tiles at a time."""
    tiles = cut_tiles(images, layout)
    features = torch.cat([encode(tiles[i:i + batch]) for i in range(0, tiles.shape[0], batch)])
    if tuple(features.shape[1:3]) != (layout.grid, layout.grid):
        raise ValueError(f"clip_vision: the encoder gave a {tuple(features.shape[1:3])} grid per tile, not the "
                         f"expected {layout.grid}x{layout.grid}")
    if layout.rows == layout.cols == 1:
        return features.float()
    return stitch_tiles(features, layout)
