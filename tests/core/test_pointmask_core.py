"""P3S-Diffusion's point mask (core/pointmask.py, paper sec. III-A, eq. 1-3) on hand-made patch features, and the
Otsu threshold it uses (core/masks.py) against a float64 numpy reference."""
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from editkit.core.masks import otsu_mask, otsu_threshold
from editkit.core.pointmask import (Point, connected_to, cut_tiles, encode_grid, fill_image, fill_region,
                                    gaussian_smooth, parse_points, patch_grid, point_cell, preview,
                                    similarity_map, stitch_tiles, subject_mask, tile_layout)

SIZE = 160   # image pixels; a 16x16 grid: 10 px cells


# ----------------------------------------------------------------------------------------------------------------
# Otsu against a float64 reference
# ----------------------------------------------------------------------------------------------------------------

def otsu_reference(values) -> float:
    """Otsu (1979) as scikit-image's threshold_otsu: a 256-bin histogram over the data's range, the
    between-class variance at every cut, the centre of the first bin that maximises it."""
    x = np.asarray(values, dtype=np.float64).ravel()
    low, high = x.min(), x.max()
    if low == high:
        return float(low)
    hist, edges = np.histogram(x, bins=256, range=(low, high))
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(hist)                       # >= 1: the minimum is in the first bin
    weight_high = np.cumsum(hist[::-1])[::-1]           # >= 1: the maximum is in the last bin
    mean_low = np.cumsum(hist * centres) / weight_low
    mean_high = (np.cumsum((hist * centres)[::-1]) / weight_high[::-1])[::-1]
    between = weight_low[:-1] * weight_high[1:] * (mean_low[:-1] - mean_high[1:]) ** 2
    return float(centres[int(np.argmax(between))])


def _arrays():
    g = np.random.default_rng(3)
    yield "uniform", g.random(500)
    yield "normal", g.normal(size=(1000,))
    yield "exponential", g.exponential(size=(777,))
    yield "bimodal", np.concatenate([g.normal(0.2, 0.03, 400), g.normal(0.8, 0.05, 300)])
    yield "two values", np.array([0.1] * 30 + [0.9] * 70)
    yield "gap", np.concatenate([g.random(200) * 0.1, 0.9 + g.random(50) * 0.1])
    yield "quantised", g.integers(0, 256, 2000).astype(np.float64)
    yield "few levels", g.integers(0, 10, 300).astype(np.float64)


@pytest.mark.parametrize("name,values", list(_arrays()), ids=[n for n, _ in _arrays()])
def test_otsu_matches_the_float64_reference(name, values):
    expected = otsu_reference(values)
    span = values.max() - values.min()
    for dtype in (torch.float64, torch.float32):
        x = torch.tensor(values, dtype=dtype)
        got = float(otsu_threshold(x))
        tolerance = span * (1e-12 if dtype == torch.float64 else 1e-6)
        assert abs(got - expected) <= tolerance, (name, dtype, got, expected)
    x = torch.tensor(values, dtype=torch.float64)
    assert torch.equal(otsu_mask(x), x > expected)
    assert 0 < int(otsu_mask(x).sum()) < x.numel()


def test_otsu_splits_bimodal_data_between_its_modes():
    g = np.random.default_rng(0)
    values = np.concatenate([g.normal(0.2, 0.02, 300), g.normal(0.7, 0.02, 200)])
    t = float(otsu_threshold(torch.tensor(values)))
    assert values[:300].max() < t < values[300:].min()


def test_otsu_of_rows_is_each_rows_own():
    g = np.random.default_rng(1)
    rows = g.random((2, 3, 64)) ** np.array([1, 2, 3])[None, :, None]
    got = otsu_threshold(torch.tensor(rows))
    assert got.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            assert abs(float(got[i, j]) - otsu_reference(rows[i, j])) <= 1e-12


def test_otsu_of_a_constant_row_is_its_value_and_masks_nothing():
    rows = torch.tensor([[0.25] * 10, [-3.0] * 10, [0.0] * 10], dtype=torch.float64)
    assert torch.equal(otsu_threshold(rows), torch.tensor([0.25, -3.0, 0.0], dtype=torch.float64))
    assert not otsu_mask(rows).any()
    assert otsu_reference(rows[0].numpy()) == 0.25


# ----------------------------------------------------------------------------------------------------------------
# points from text
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["120,80; 30,20", "120,80\n30,20", " (120, 80) ;\n(30 ,20); ", "120 80; 30 20",
                                  '[{"x": 120, "y": 80}, {"x": 30, "y": 20}]', "[[120, 80], [30.0, 20]]"])
def test_points_are_read_from_pairs_and_from_a_points_editors_json(text):
    assert parse_points(text, "positive_points", 100, 200) == (Point(120, 80), Point(30, 20))


def test_points_keep_fractions_and_empty_text_is_no_points():
    assert parse_points('[{"x": 10.5, "y": 0}]', "p", 20, 20) == (Point(10.5, 0.0),)
    assert parse_points('{"x": 1, "y": 2}', "p", 20, 20) == (Point(1, 2),)
    assert parse_points("", "p", 20, 20) == () and parse_points("  \n ", "p", 20, 20) == ()
    assert parse_points("[]", "p", 20, 20) == ()


@pytest.mark.parametrize("text,point", [("200,10", "(200, 10)"), ("-1,10", "(-1, 10)"), ("10,100", "(10, 100)"),
                                        ('[{"x": 5, "y": 5}, {"x": 5, "y": 250.5}]', "(5, 250.5)")])
def test_a_point_outside_the_image_is_an_error_naming_the_input_the_point_and_the_range(text, point):
    with pytest.raises(ValueError) as e:
        parse_points(text, "negative_points", 100, 200)
    message = str(e.value)
    assert message.startswith("negative_points:") and point in message
    assert "0 <= x < 200" in message and "0 <= y < 100" in message


@pytest.mark.parametrize("text,says", [("120", "a point is two numbers"), ("1,2,3,4", "separate points"),
                                       ("a,b", "'a'"), ("1,2; 3", "'3'"), ("nan, 3", "finite"),
                                       ('[{"x": 1}]', 'needs "x" and "y"'), ('[{"x": "one", "y": 2}]', "one"),
                                       ('[{"x": 1, "y": 2}', "JSON"), ('"1,2"', "JSON"),
                                       ('{"x": true, "y": 1}', "True")])
def test_malformed_points_are_a_clear_error(text, says):
    with pytest.raises(ValueError) as e:
        parse_points(text, "positive_points", 100, 100)
    assert str(e.value).startswith("positive_points:") and says in str(e.value), str(e.value)


def test_a_point_falls_in_the_cell_under_it():
    assert point_cell(Point(0, 0), (100, 200), (10, 16)) == (0, 0)
    assert point_cell(Point(199.9, 99.9), (100, 200), (10, 16)) == (9, 15)
    assert point_cell(Point(12.5, 10), (100, 200), (10, 16)) == (1, 1)   # 12.5 px wide cells: x 12.5 starts cell 1
    assert point_cell(Point(12.4, 9.9), (100, 200), (10, 16)) == (0, 0)


# ----------------------------------------------------------------------------------------------------------------
# eq. 1-2 on hand-made features
# ----------------------------------------------------------------------------------------------------------------

def _disc(cy, cx, r, n=16):
    y, x = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    return (y - cy) ** 2 + (x - cx) ** 2 <= r * r


def _features(*blobs, n=16):
    """(n, n, 4) features: background along axis 3, each blob its own vector."""
    f = torch.zeros(n, n, 4)
    f[..., 3] = 1
    for region, vector in blobs:
        f[region] = torch.tensor(vector, dtype=torch.float32)
    return f


def _at(r, c, cell=SIZE / 16):
    return Point((c + 0.5) * cell, (r + 0.5) * cell)


def _pixels(region, size=SIZE):
    return F.interpolate(region[None, None].float(), size=(size, size), mode="nearest")[0, 0] > 0


def test_two_blobs_with_the_same_feature_the_mask_keeps_only_the_clicked_one():
    a, b = _disc(4, 4, 2.5), _disc(11, 11, 2.5)
    features = _features((a, (1, 0, 0, 0)), (b, (1, 0, 0, 0)))
    result = subject_mask(features, [_at(4, 4)], [], (SIZE, SIZE), sigma=0)
    assert torch.equal(result.cells, a)
    assert not (result.mask & _pixels(b)).any()
    core = _pixels(a & ~(torch.roll(~a, 1, 0) | torch.roll(~a, -1, 0) | torch.roll(~a, 1, 1) | torch.roll(~a, -1, 1)))
    assert result.mask[core].all()
    assert result.mask.sum() < 1.2 * _pixels(a).sum()
    smoothed = subject_mask(features, [_at(4, 4)], [], (SIZE, SIZE), sigma=1.0)
    assert smoothed.mask[core].all() and not (smoothed.mask & _pixels(b)).any()


def _touching_pair():
    """Two subjects of one class side by side, touching (one component): a shared feature plus a smaller one of
    their own, as CLIP sees two dogs."""
    a = torch.zeros(16, 16, dtype=torch.bool)
    b = torch.zeros(16, 16, dtype=torch.bool)
    a[4:12, 2:8] = True
    b[4:12, 8:14] = True
    return a, b, _features((a, (1, 0.35, 0, 0)), (b, (1, 0, 0.35, 0)))


def test_a_negative_point_on_a_similar_subject_removes_it():
    a, b, features = _touching_pair()
    alone = subject_mask(features, [_at(7, 4)], [], (SIZE, SIZE), sigma=0.5)
    assert alone.mask[_pixels(b)].float().mean() > 0.9          # one component: the positive map takes both
    exact = subject_mask(features, [_at(7, 4)], [_at(7, 11)], (SIZE, SIZE), sigma=0)
    assert torch.equal(exact.cells, a) and not (exact.mask & _pixels(b)).any()
    result = subject_mask(features, [_at(7, 4)], [_at(7, 11)], (SIZE, SIZE), sigma=0.5)
    assert (result.mask & _pixels(b)).sum() < 0.1 * _pixels(b).sum()   # smoothing blurs the border a little
    assert result.mask[_pixels(a)].float().mean() > 0.9
    inner_b = torch.zeros_like(b)
    inner_b[5:11, 10:14] = True
    assert result.negative[_pixels(inner_b)].all() and not (result.negative & result.mask).any()
    # M = M_P (1 - M_N), similarities clamped to [0, 1], at sigma 0 exactly:
    plain = subject_mask(features, [_at(7, 4)], [_at(7, 11)], (SIZE, SIZE), sigma=0)
    unit = F.normalize(features.double(), dim=-1)
    m_p = (unit @ unit[7, 4]).clamp(0, 1)
    m_n = (unit @ unit[7, 11]).clamp(0, 1)
    assert torch.allclose(plain.score.double(), m_p * (1 - m_n), atol=1e-6)


def test_identical_subjects_cannot_be_told_apart_by_a_negative_point():
    a, b = _disc(4, 4, 2.5), _disc(11, 11, 2.5)
    features = _features((a, (1, 0, 0, 0)), (b, (1, 0, 0, 0)))
    with pytest.raises(ValueError, match=r"^positive_points: the point \(45, 45\) is not in the mask.*1.00 alike "
                                         r"\(cosine\) to a negative point's"):
        subject_mask(features, [_at(4, 4)], [_at(11, 11)], (SIZE, SIZE), sigma=0.5)


def test_a_positive_point_whose_patch_is_below_the_threshold_is_an_error_not_an_empty_mask():
    a = _disc(8, 8, 4)
    speck = torch.zeros(16, 16, dtype=torch.bool)
    speck[1, 1] = True                              # one cell of its own: smoothing leaves it below the threshold
    features = _features((a, (1, 0, 0, 0)), (speck, (0, 1, 0, 0)))
    assert subject_mask(features, [_at(8, 8), _at(1, 1)], [], (SIZE, SIZE), sigma=0).cells[1, 1]
    with pytest.raises(ValueError, match=r"^positive_points: the point \(15, 15\) is not in the mask: its score "
                                         r"0\.\d+ is not above the Otsu threshold 0\.\d+; what it marks is too small"):
        subject_mask(features, [_at(8, 8), _at(1, 1)], [], (SIZE, SIZE), sigma=1.0)
    a = _disc(8, 8, 3)
    features = _features((a, (1, 0, 0, 0)))
    flat = torch.ones(16, 16, 4)
    with pytest.raises(ValueError, match="flat"):
        subject_mask(flat, [_at(8, 8)], [], (SIZE, SIZE))
    with pytest.raises(ValueError, match="^positive_points: give at least one"):
        subject_mask(features, [], [], (SIZE, SIZE))


def test_several_positive_points_keep_each_of_their_components():
    a, b, c = _disc(4, 4, 2), _disc(11, 11, 2), _disc(3, 12, 1.5)
    features = _features((a, (1, 0, 0, 0)), (b, (1, 0, 0, 0)), (c, (1, 0, 0, 0)))
    result = subject_mask(features, [_at(4, 4), _at(11, 11)], [], (SIZE, SIZE), sigma=0)
    assert torch.equal(result.cells, a | b)
    assert not (result.mask & _pixels(c)).any()


def test_similarity_is_the_clamped_cosine_maximum_over_the_points():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(5, 6, 8, generator=g, dtype=torch.float64)
    cells = [(0, 0), (3, 2)]
    unit = features / features.norm(dim=-1, keepdim=True)
    expected = torch.stack([(unit * unit[r, c]).sum(-1).clamp(0, 1) for r, c in cells]).amax(0)
    got = similarity_map(features, cells)
    assert torch.allclose(got.double(), expected, atol=1e-6)
    assert got.min() >= 0 and float(got[0, 0]) == pytest.approx(1.0)
    assert torch.equal(similarity_map(features, []), torch.zeros(5, 6))


def test_the_gaussian_filter_is_a_normalised_truncated_gaussian_with_replicate_edges():
    g = torch.Generator().manual_seed(1)
    values = torch.rand(9, 11, generator=g, dtype=torch.float64)
    sigma = 1.3
    radius = math.ceil(3 * sigma)
    padded = np.pad(values.numpy(), radius, mode="edge")
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (offsets[:, None] ** 2 + offsets[None, :] ** 2) / sigma ** 2)
    weights /= weights.sum()
    expected = np.array([[(padded[i:i + 2 * radius + 1, j:j + 2 * radius + 1] * weights).sum()
                          for j in range(11)] for i in range(9)])
    assert np.allclose(gaussian_smooth(values, sigma).numpy(), expected, atol=1e-12)
    assert torch.equal(gaussian_smooth(values, 0), values)
    assert torch.allclose(gaussian_smooth(torch.full((4, 4), 0.7, dtype=torch.float64), 2.0),
                          torch.full((4, 4), 0.7, dtype=torch.float64))


def test_components_are_8_connected():
    fg = torch.zeros(6, 6, dtype=torch.bool)
    fg[0, 0] = fg[1, 1] = fg[2, 2] = True          # a diagonal line: one component
    fg[4, 4] = fg[4, 5] = fg[5, 4] = True          # another, 2 cells away
    assert torch.equal(connected_to(fg, [(0, 0)]), torch.eye(6, dtype=torch.bool) & fg & (torch.arange(6) < 3))
    assert connected_to(fg, [(4, 5)]).sum() == 3
    assert connected_to(fg, [(0, 0), (5, 4)]).sum() == 6
    assert not connected_to(fg, [(3, 0)]).any()   # a seed on the background holds nothing


def test_at_image_size_nothing_of_another_component_comes_back_and_edges_follow_the_score():
    score = torch.zeros(8, 8)
    score[1:4, 1:4] = 1.0
    score[5:7, 5:7] = 1.0                           # a second component, a gap of one cell
    kept = connected_to(score > 0.5, [(2, 2)])
    from editkit.core.pointmask import _to_image
    mask = _to_image(score, kept, 0.5, (80, 80))
    assert not mask[45:, 45:].any()
    assert mask[15:35, 15:35].all()
    # bilinear edges: halfway between a kept cell's centre (1) and the next (0), so at the cells' border
    row = mask[25]
    assert row[10:40].all() and not row[:10].any() and not row[40:].any()
    single = torch.zeros(8, 8)
    single[1, 1] = 1.0                              # on a 4x4 image it falls between the pixels' samples
    small = _to_image(single, single > 0.5, 0.5, (4, 4))
    assert torch.equal(small, torch.eye(4, dtype=torch.bool) & (torch.arange(4) == 0))


def test_the_upsampled_mask_is_closer_to_a_round_subject_than_its_cells():
    features = _features((_disc(8, 8, 5.5), (1, 0, 0, 0)))
    result = subject_mask(features, [_at(8, 8)], [], (SIZE, SIZE), sigma=0)
    blocky = _pixels(result.cells)
    y, x = torch.meshgrid(torch.arange(SIZE) + 0.5, torch.arange(SIZE) + 0.5, indexing="ij")
    truth = (y - 85) ** 2 + (x - 85) ** 2 <= 55 ** 2

    def iou(m):
        return float((m & truth).sum() / (m | truth).sum())
    assert (result.mask != blocky).any() and iou(result.mask) > iou(blocky)


# ----------------------------------------------------------------------------------------------------------------
# eq. 3: the fill, and the preview
# ----------------------------------------------------------------------------------------------------------------

def _image():
    g = torch.Generator().manual_seed(2)
    return torch.rand(2, 20, 30, 3, generator=g)


def test_the_fill_paints_only_the_region_and_leaves_the_input_alone():
    image = _image()
    before = image.clone()
    region = torch.zeros(2, 20, 30, dtype=torch.bool)
    region[0, :, :10] = True
    region[1, 5:8, 3:9] = True
    grey = fill_image(image, region, "grey")
    assert torch.equal(image, before)
    assert (grey[region] == 0.5).all() and torch.equal(grey[~region], image[~region])
    mean = fill_image(image, region, "mean")
    for b in range(2):
        assert torch.allclose(mean[b][region[b]], image[b][region[b]].mean(0).expand(int(region[b].sum()), 3))
    assert (fill_image(image, region, "black")[region] == 0).all()
    assert torch.equal(fill_image(image, torch.zeros_like(region), "mean"), image)
    with pytest.raises(ValueError, match="^fill: 'pink'"):
        fill_image(image, region, "pink")


def test_the_fill_keeps_an_alpha_channel_opaque():
    image = torch.rand(1, 4, 4, 4)
    region = torch.ones(1, 4, 4, dtype=torch.bool)
    out = fill_image(image, region, "white")
    assert (out[..., :3] == 1).all() and (out[..., 3] == 1).all()


def test_what_must_go_is_outside_the_subject_or_the_negative_subjects():
    a, b, features = _touching_pair()
    result = subject_mask(features, [_at(7, 4)], [_at(7, 11)], (SIZE, SIZE), sigma=0.5)
    assert torch.equal(fill_region(result, "outside_subject"), ~result.mask)
    assert torch.equal(fill_region(result, "negative_subjects"), result.negative)
    image = torch.rand(1, SIZE, SIZE, 3)
    filled = fill_image(image, fill_region(result, "negative_subjects")[None], "grey")
    assert torch.equal(filled[0][result.mask], image[0][result.mask])
    with pytest.raises(ValueError, match="^fill_region:"):
        fill_region(result, "everything")


def test_the_preview_marks_the_points_and_dims_the_rest():
    image = torch.full((1, 40, 40, 3), 0.8)
    mask = torch.zeros(1, 40, 40, dtype=torch.bool)
    mask[0, 5:25, 5:25] = True
    out = preview(image, mask, [Point(15, 15)], [Point(35, 35)])
    assert out.shape == (1, 40, 40, 3)
    assert torch.allclose(out[0, 15, 15], torch.tensor([0.1, 0.9, 0.2]))    # green, positive
    assert torch.allclose(out[0, 35, 35], torch.tensor([0.95, 0.15, 0.1]))  # red, negative
    assert torch.allclose(out[0, 10, 20], image[0, 10, 20])                 # the subject keeps its colours
    assert (out[0, 30, 5] < image[0, 30, 5]).all()                          # the rest is dimmed
    assert torch.allclose(out[0, 5, 12], torch.tensor([1.0, 0.85, 0.1]))    # the outline


# ----------------------------------------------------------------------------------------------------------------
# tiles
# ----------------------------------------------------------------------------------------------------------------

def test_tile_layouts_of_vit_l_14():
    coarse = tile_layout(512, 512, 16, 14, 1)
    assert (coarse.rows, coarse.cols, coarse.cells, coarse.size, coarse.tile) == (1, 1, (16, 16), (224, 224), 224)
    fine = tile_layout(512, 512, 16, 14, 3)
    assert (fine.rows, fine.cols, fine.stride, fine.cells, fine.size) == (3, 3, 8, (32, 32), (448, 448))
    assert fine.origins == [(r, c) for r in (0, 8, 16) for c in (0, 8, 16)]
    wide = tile_layout(384, 512, 16, 14, 3)                  # 16 px cells: 24 cells high
    assert (wide.rows, wide.cols, wide.cells) == (2, 3, (24, 32))
    tall = tile_layout(512, 100, 16, 14, 4)                 # narrower than one tile: one column
    assert (tall.rows, tall.cols, tall.cells) == (4, 1, (40, 16))
    assert tile_layout(300, 300, 7, 32, 2).stride == 3      # ViT-B/32: 7x7 grid
    with pytest.raises(ValueError, match="^tiles:"):
        tile_layout(10, 10, 16, 14, 0)


def test_tiles_are_crops_of_the_resized_image():
    layout = tile_layout(50, 70, 4, 3, 3)          # 4x4 cells of 3 px, stride 2
    image = torch.rand(2, 50, 70, 3)
    tiles = cut_tiles(image, layout)
    assert tiles.shape == (2 * layout.rows * layout.cols, 12, 12, 3)
    resized = F.interpolate(image.movedim(-1, 1), size=layout.size, mode="bicubic", antialias=True,
                            align_corners=False).clamp(0, 1).movedim(1, -1)
    for b in range(2):
        for t, (r, c) in enumerate(layout.origins):
            assert torch.equal(tiles[b * len(layout.origins) + t], resized[b, 3 * r:3 * r + 12, 3 * c:3 * c + 12])
    exact = torch.rand(1, *layout.size, 3)
    assert torch.equal(cut_tiles(exact, layout)[0], exact[0, :12, :12])    # no resampling at the layout's size


def _position_encoder(layout):
    """Tiles -> features that are a function of each cell's place in the resized image, read from the pixels
    (each tile's top-left pixel carries its origin)."""
    def encode(tiles):
        out = []
        for tile in tiles:
            r0, c0 = int(round(float(tile[0, 0, 0]) * 100)), int(round(float(tile[0, 0, 1]) * 100))
            rows = torch.arange(layout.grid, dtype=torch.float32)[:, None].expand(layout.grid, layout.grid) + r0
            cols = torch.arange(layout.grid, dtype=torch.float32)[None, :].expand(layout.grid, layout.grid) + c0
            out.append(torch.stack([torch.cos(rows / 5), torch.sin(rows / 5), torch.cos(cols / 7),
                                    torch.sin(cols / 7)], dim=-1) / math.sqrt(2))
        return torch.stack(out)
    return encode


def test_stitched_tiles_that_agree_give_the_fine_grid_itself():
    layout = tile_layout(40, 40, 4, 2, 3)           # tiles of 4x4 cells (2 px), 2 cells apart: 3 span 8 cells
    assert layout.cells == (8, 8)
    image = torch.zeros(1, *layout.size, 3)
    for r, c in layout.origins:                     # write each tile's origin into its top-left pixel
        image[0, 2 * r, 2 * c, :2] = torch.tensor([r / 100, c / 100])
    features = encode_grid(_position_encoder(layout), image, layout, batch=4)
    rows = torch.arange(8, dtype=torch.float32)[:, None].expand(8, 8)
    cols = torch.arange(8, dtype=torch.float32)[None, :].expand(8, 8)
    expected = torch.stack([torch.cos(rows / 5), torch.sin(rows / 5), torch.cos(cols / 7), torch.sin(cols / 7)],
                           dim=-1) / math.sqrt(2)
    assert features.shape == (1, 8, 8, 4)
    assert torch.allclose(features[0], expected, atol=1e-6)


def test_overlapping_tiles_are_averaged_as_unit_vectors():
    layout = tile_layout(20, 30, 4, 1, 2)           # 5 px cells: the short side is 4 cells, one row of tiles
    assert (layout.rows, layout.cols, layout.cells) == (1, 2, (4, 6))
    tiles = torch.zeros(2, 4, 4, 3)
    tiles[0, ..., 0] = 2.0                          # tile 0: length 2 along x
    tiles[1, ..., 1] = 1.0                          # tile 1: along y
    stitched = stitch_tiles(tiles, layout)
    assert stitched.shape == (1, 4, 6, 3)
    assert torch.equal(stitched[0, :, :2], torch.tensor([1.0, 0, 0]).expand(4, 2, 3))
    assert torch.equal(stitched[0, :, 2:4], torch.tensor([0.5, 0.5, 0]).expand(4, 2, 3))
    assert torch.equal(stitched[0, :, 4:], torch.tensor([0.0, 1, 0]).expand(4, 2, 3))


def test_the_encoder_is_called_in_batches_and_one_tile_is_the_plain_encoding():
    calls = []

    def encode(tiles):
        calls.append(tiles.shape[0])
        return tiles[:, ::2, ::2, :].mean(-1, keepdim=True).expand(-1, -1, -1, 2) + 1

    image = torch.rand(3, 16, 16, 3)
    coarse = tile_layout(16, 16, 4, 2, 1)
    out = encode_grid(encode, image, coarse)
    assert calls == [3] and out.shape == (3, 4, 4, 2)
    calls.clear()
    fine = tile_layout(16, 16, 4, 2, 3)
    assert encode_grid(encode, image, fine, batch=4).shape == (3, 8, 8, 2)
    assert calls == [4, 4, 4, 4, 4, 4, 3]


def test_hidden_states_become_a_patch_grid_without_the_class_token():
    tokens = torch.arange(2 * 10 * 3, dtype=torch.float32).reshape(2, 10, 3)
    grid = patch_grid(tokens, 3)
    assert grid.shape == (2, 3, 3, 3)
    assert torch.equal(grid[1, 0, 1], tokens[1, 2]) and torch.equal(grid[0, 2, 2], tokens[0, 9])
    assert torch.equal(patch_grid(tokens[:, 1:], 3), grid)
    with pytest.raises(ValueError, match="^clip_vision: the encoder returned 10 tokens"):
        patch_grid(tokens, 4)


def _colour_encoder(patch):
    """Patch features = the patch's mean soft assignment to a few reference colours."""
    palette = torch.tensor([[0.9, 0.4, 0.1], [0.2, 0.5, 0.6], [0.5, 0.5, 0.5]])

    def encode(tiles):
        d2 = ((tiles[..., None, :] - palette) ** 2).sum(-1)
        return F.avg_pool2d(torch.softmax(-d2 / 0.02, -1).movedim(-1, 1), patch).movedim(1, -1)
    return encode


@pytest.mark.parametrize("gap", [12, 16])
def test_tiles_separate_two_subjects_that_one_coarse_encoding_merges(gap):
    """Two alike discs `gap` px apart on a 128 px image, the positive point on the left one; an encoder of 8x8
    patches of 8 px: coarse cells are 16 px, so the gap falls inside a cell and the two make one component."""
    size, r = 128, 24
    y, x = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    left_x, right_x = 64 - gap / 2 - r, 64 + gap / 2 + r
    left = (y - 64) ** 2 + (x - left_x) ** 2 <= r ** 2
    right = (y - 64) ** 2 + (x - right_x) ** 2 <= r ** 2
    image = torch.empty(1, size, size, 3)
    image[0] = torch.tensor([0.2, 0.5, 0.6])
    image[0][left | right] = torch.tensor([0.9, 0.4, 0.1])
    encode = _colour_encoder(8)

    def mask(tiles):
        layout = tile_layout(size, size, 8, 8, tiles)
        return subject_mask(encode_grid(encode, image, layout)[0], [Point(left_x, 64)], [], (size, size), 0.5).mask

    assert mask(1)[right].float().mean() > 0.9
    for tiles in (3, 4):
        fine = mask(tiles)
        assert not fine[right].any() and fine[left].float().mean() > 0.9
