"""MultiDiffusion's windows and fusion (core/multidiffusion.py), on plain tensors."""
import pytest
import torch

from editkit.core.multidiffusion import (Fusion, Window, add_into, bootstrap_choices, crop, region_weights,
                                         window_layout)


def test_windows_cover_the_latent_with_the_last_one_on_the_edge():
    windows = window_layout((64, 150), (64, 64), (8, 8))
    lefts = [w.left for w in windows]
    assert lefts[:3] == [0, 8, 16] and lefts[-1] == 150 - 64 and lefts[-2] == 80   # 86 is not a multiple of 8
    covered = torch.zeros(64, 150)
    for w in windows:
        covered[w.top:w.top + 64, w.left:w.left + 64] += 1
    assert covered.min() >= 1
    assert window_layout((64, 64), (64, 64), (8, 8)) == [Window(0, 0, 64, 64)]
    assert len(window_layout((64, 576), (64, 64), (8, 8))) == (576 - 64) // 8 + 1   # the paper's 512x4608


def test_circular_windows_wrap_around_and_start_all_around():
    windows = window_layout((16, 48), (16, 16), (8, 8), circular=True)
    assert [w.left for w in windows] == [0, 8, 16, 24, 32, 40]
    x = torch.arange(48.0).expand(2, 16, 48)
    assert crop(x, windows[-1])[0, 0].tolist() == list(range(40, 48)) + list(range(0, 8))
    canvas = torch.zeros(2, 16, 48)
    add_into(canvas, torch.ones(2, 16, 16), windows[-1])
    assert canvas[0, 0, :8].eq(1).all() and canvas[0, 0, 40:].eq(1).all() and canvas[0, 0, 8:40].eq(0).all()


@pytest.mark.parametrize("latent,window,stride,message", [
    ((32, 64), (64, 64), (8, 8), "window: 64x64 latents is larger than the latent"),
    ((64, 64), (64, 64), (0, 8), "stride: must be at least 1"),
])
def test_bad_layouts_are_refused(latent, window, stride, message):
    with pytest.raises(ValueError, match=message):
        window_layout(latent, window, stride)


def test_fusion_averages_overlapping_windows_per_pixel():
    like = torch.zeros(1, 1, 1, 12)
    fusion = Fusion(like, 1)
    a, b = Window(0, 0, 1, 8), Window(0, 4, 1, 8)
    fusion.add(0, a, torch.full((1, 1, 1, 8), 2.0))
    fusion.add_weight(a)
    fusion.add(0, b, torch.full((1, 1, 1, 8), 4.0))
    fusion.add_weight(b)
    (out,) = fusion.result()
    assert out[0, 0, 0].tolist() == [2.0] * 4 + [3.0] * 4 + [4.0] * 4


def test_region_weights_binarise_resize_and_give_the_background_the_rest():
    masks = torch.zeros(2, 8, 8)
    masks[0, :, :4] = 0.7          # left half (above 0.5)
    masks[1, :4, :] = 0.4          # below 0.5: not a region pixel
    masks[1, :2, :] = 1.0          # the top quarter overlaps the left region
    weights = region_weights(masks, (4, 4))   # nearest: every other pixel
    assert weights.shape == (3, 4, 4)
    assert weights[1].tolist() == [[1, 1, 0, 0]] * 4
    assert weights[2].tolist() == [[1, 1, 1, 1]] + [[0, 0, 0, 0]] * 3
    assert weights[0].tolist() == [[0, 0, 0, 0]] + [[0, 0, 1, 1]] * 3   # clamp(1 - sum), 0 where regions overlap
    assert torch.equal(region_weights(None, (4, 4)), torch.ones(1, 4, 4))


def test_bootstrap_choices_are_seeded():
    assert bootstrap_choices(7, 3, 4, 20) == bootstrap_choices(7, 3, 4, 20)
    assert all(0 <= c < 20 for c in bootstrap_choices(7, 3, 4, 20))
    assert len({tuple(bootstrap_choices(7, s, 4, 20)) for s in range(10)}) > 1


def test_a_mask_value_of_one_half_is_inside_the_region_as_in_the_official_code():
    weights = region_weights(torch.tensor([[[0.5, 0.49], [1.0, 0.0]]]), (2, 2))
    assert weights[1].tolist() == [[1.0, 0.0], [1.0, 0.0]]
    assert weights[0].tolist() == [[0.0, 1.0], [0.0, 1.0]]
