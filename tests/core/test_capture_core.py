"""Attention-map capture and map utilities, on synthetic calls."""
import torch

from editkit.core.attention import CROSS, SELF, AttentionCall, AttentionSite, BatchLayout, RunState, attention_probs
from editkit.core.capture import (AttentionMapCapture, combine_maps, fold_repeated_context, heat_colors, heatmap_grid,
                                  word_maps)


def _probs(batch, grid, nk, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, grid[0] * grid[1], 16, generator=g)
    k = torch.randn(batch, nk, 16, generator=g)
    return attention_probs(q, k, heads=2)


def test_capture_selects_sites_steps_and_branch():
    cap = AttentionMapCapture(max_tokens=16, start=0.2, end=0.8)
    run = RunState([cap])
    layout = BatchLayout(("cond", "uncond"), 1)
    cross = AttentionSite(0, CROSS, "input", 1)
    def call(site=cross, grid=(4, 4), step=5, layout=layout):
        return AttentionCall(site, 2, step, 10, grid, layout, run)
    assert not cap.wants_site(AttentionSite(0, SELF, "input", 1))
    assert cap.acts_on(call())
    assert not cap.acts_on(call(grid=(8, 8)))          # above max_tokens
    assert not cap.acts_on(call(step=1)) and not cap.acts_on(call(step=8))
    assert not cap.acts_on(call(layout=BatchLayout(("uncond",), 1)))


def test_captured_maps_sum_to_one_per_pixel_and_come_from_cond_rows():
    cap = AttentionMapCapture()
    run = RunState([cap])
    layout = BatchLayout(("uncond", "cond"), 2)
    site = AttentionSite(0, CROSS, "input", 4)
    probs_a = _probs(4, (4, 4), 77, 0)
    probs_b = _probs(4, (2, 2), 77, 1)
    for probs, grid in ((probs_a, (4, 4)), (probs_b, (2, 2))):
        cap.edit_probs(AttentionCall(site, 2, 0, 1, grid, layout, run), probs)
    run.finish(True)
    maps = cap.store.maps
    assert maps.shape == (2, 4, 4, 77)
    assert torch.allclose(maps.sum(-1), torch.ones(2, 4, 4), atol=1e-5)
    # without the second resolution the map is the cond rows' head average
    only = combine_maps({(4, 4, 77): [probs_a[[2, 3]].mean(1).reshape(2, 4, 4, 77), 1]})
    assert torch.allclose(only, probs_a[[2, 3]].mean(1).reshape(2, 4, 4, 77))


def test_failed_run_publishes_nothing():
    cap = AttentionMapCapture()
    run = RunState([cap])
    cap.edit_probs(AttentionCall(AttentionSite(0, CROSS, "input", 4), 2, 0, 1, (2, 2), BatchLayout(("cond",), 1), run),
                   _probs(1, (2, 2), 77, 0))
    run.finish(False)
    assert cap.store.maps is None and cap.store.runs == 0


def test_fold_repeated_context_and_word_maps():
    maps = torch.rand(1, 2, 2, 154)
    folded = fold_repeated_context(maps, 77)
    assert torch.allclose(folded, maps[..., :77] + maps[..., 77:])
    words = word_maps(maps, [[1], [2, 3]], 77)
    assert words.shape == (1, 2, 2, 2)
    assert torch.allclose(words[:, 1], folded[..., 2] + folded[..., 3])


def test_heat_colors_and_grid_shape():
    assert torch.allclose(heat_colors(torch.tensor([0.0, 1.0])), torch.tensor([[0.0, 0, 0], [1, 1, 1]]))
    grid = heatmap_grid(torch.rand(2, 3, 4, 4), (16, 8))
    assert grid.shape == (1, 32, 24, 3)
    assert grid.min() >= 0 and grid.max() <= 1
