"""How much finer is the tiled point mask? The mask pipeline of the Point Mask (P3S RNGR) node
(core/pointmask.py: tiles, stitching, eq. 1-2, upsampling) on synthetic 512 px scenes whose true subject is
known, with a handcrafted stand-in for CLIP's patch encoder, so the table measures the pipeline's geometry
(grid size, stitching, smoothing, upsampling), not CLIP's understanding of images:

    OMP_NUM_THREADS=1 python tools/pointmask_resolution.py

The stand-in has ViT-L/14's geometry (224 px input, 14 px patches, a 16x16 grid): each patch's feature is the
mean over its pixels of a soft assignment of the pixel's colour to 8 reference colours (`colour`), or that mixed
half-and-half with the mean of its 3x3 patch neighbourhood in the same tile (`colour+context`, a crude stand-in
for the spatial mixing of a transformer's attention). Real CLIP features blur more and are noisier, so read the
gain as what the grid allows, not as a promise for every photo. IoU of the mask against the true subject at
512x512; columns: one 224 px encoding (coarse, the paper) and n x n overlapping tiles.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

import torch
import torch.nn.functional as F

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from support.pack import import_pack  # noqa: E402

import_pack()
from editkit.core.pointmask import Point, encode_grid, subject_mask, tile_layout  # noqa: E402

SIZE = 512
GRID, PATCH = 16, 14
PALETTE = torch.tensor([[0.85, 0.45, 0.15], [0.75, 0.5, 0.2], [0.3, 0.55, 0.35], [0.35, 0.45, 0.6],
                        [0.9, 0.9, 0.85], [0.1, 0.1, 0.12], [0.6, 0.2, 0.5], [0.5, 0.5, 0.5]])


def _coords():
    y, x = torch.meshgrid(torch.arange(SIZE) + 0.5, torch.arange(SIZE) + 0.5, indexing="ij")
    return x, y


def _disc(cx, cy, r):
    x, y = _coords()
    return (x - cx) ** 2 + (y - cy) ** 2 <= r * r


def _scene(shapes, seed=0):
    """A textured green-blue background with the shapes painted over it; (1, H, W, 3)."""
    g = torch.Generator().manual_seed(seed)
    x, y = _coords()
    image = torch.stack([0.3 + 0.1 * torch.sin(x / 57), 0.5 + 0.05 * torch.cos(y / 43),
                         0.45 + 0.1 * torch.sin((x + y) / 91)], dim=-1)
    for region, colour in shapes:
        image[region] = torch.tensor(colour)
    image = image + 0.04 * torch.randn(image.shape, generator=g)
    return image.clamp(0, 1)[None]


def scenes():
    """(name, image, subject, positive points, negative points)."""
    disc = _disc(256, 256, 110)
    yield "disc r=110", _scene([(disc, (0.85, 0.45, 0.15))]), disc, [Point(256, 256)], []
    small = _disc(300, 200, 36)
    yield "small disc r=36", _scene([(small, (0.85, 0.45, 0.15))]), small, [Point(300, 200)], []
    left, right = _disc(160, 256, 86), _disc(352, 256, 86)   # a gap of 20 px between two similar subjects
    yield ("two discs, 20 px apart", _scene([(left, (0.85, 0.45, 0.15)), (right, (0.75, 0.5, 0.2))]), left,
           [Point(160, 256)], [Point(352, 256)])
    x, y = _coords()
    cross = ((x - 256).abs() < 24) & ((y - 256).abs() < 180) | ((y - 256).abs() < 24) & ((x - 256).abs() < 180)
    yield "cross, arms 48 px", _scene([(cross, (0.6, 0.2, 0.5))]), cross, [Point(256, 256)], []


def make_encoder(context: bool):
    def encode(tiles: torch.Tensor) -> torch.Tensor:
        d2 = ((tiles[..., None, :] - PALETTE) ** 2).sum(-1)                      # (n, T, T, K)
        soft = torch.softmax(-d2 / 0.02, dim=-1).movedim(-1, 1)
        patches = F.avg_pool2d(soft, PATCH)                                       # (n, K, g, g)
        if context:
            patches = 0.5 * patches + 0.5 * F.avg_pool2d(F.pad(patches, (1, 1, 1, 1), mode="replicate"), 3, 1)
        return patches.movedim(1, -1)
    return encode


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum() / (a | b).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, nargs="+", default=[1, 2, 3, 4], help="tiles a side (1: coarse)")
    parser.add_argument("--sigma", type=float, nargs="+", default=[0.0, 0.5, 1.0], help="smoothing sigma(s), in cells")
    args = parser.parse_args()
    torch.set_num_threads(1)
    layouts = [tile_layout(SIZE, SIZE, GRID, PATCH, n) for n in args.tiles]
    heads = [("coarse" if n == 1 else f"tiled {n}x{n}") + f" ({lay.cells[0]}x{lay.cells[1]})"
             for n, lay in zip(args.tiles, layouts)]
    print(f"IoU with the true subject, {SIZE}x{SIZE} scenes, stand-in encoder of ViT-L/14 geometry")
    print("| scene | features | sigma | " + " | ".join(heads) + " |")
    print("| --- | --- | --- |" + " --- |" * len(heads))
    seconds = [0.0] * len(layouts)
    for name, image, truth, positive, negative in scenes():
        for context in (False, True):
            encode = make_encoder(context)
            for sigma in args.sigma:
                cells = []
                for k, layout in enumerate(layouts):
                    start = time.perf_counter()
                    features = encode_grid(encode, image, layout)[0]
                    try:
                        mask = subject_mask(features, positive, negative, (SIZE, SIZE), sigma).mask
                        cells.append(f"{iou(mask, truth):.3f}")
                    except ValueError as e:
                        cells.append("error: " + str(e).split(";")[0])
                    seconds[k] += time.perf_counter() - start
                label = "colour+context" if context else "colour"
                print(f"| {name} | {label} | {sigma:g} | " + " | ".join(cells) + " |")
    print("encoder inputs per image: " + ", ".join(f"{h.split(' (')[0]}: {lay.rows * lay.cols}"
                                                   for h, lay in zip(heads, layouts)))


if __name__ == "__main__":
    main()
