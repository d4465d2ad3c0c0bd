"""Core tests of ConsiStory's subject-driven shared self-attention (core/consistory.py) and of Otsu's threshold
(core/masks.py): the masks' arithmetic against scikit-image (what the official code thresholds with), the window of
the last 20 steps, the seeded dropout, and the keys and key bias one call gets: its own image whole, the other
images inside their masks only, within its own CFG chunk."""
import math

import pytest
import torch

from editkit.core.attention import SELF, AttentionCall, AttentionSite, BatchLayout, RunState, controlled_attention, sdpa_attention
from editkit.core.consistory import MASK_STEPS, ConsistentSubject, keep_draw, subject_masks
from editkit.core.masks import otsu_mask, otsu_threshold
from editkit.core.prompt2prompt import PromptKeys

skimage_filters = pytest.importorskip("skimage.filters")

IMAGES = 3
GRID = (8, 8)


def _controller(**settings):
    keys = tuple((PromptKeys(77, (2 + i,)),) for i in range(IMAGES))
    return ConsistentSubject(keys=keys, layers=(0,), **settings)


def _call(controller, run, step, chunks=("cond", "uncond"), grid=GRID, layer=0):
    return AttentionCall(site=AttentionSite(layer, SELF, "output", 3), heads=2, step=step, num_steps=40, grid=grid,
                         layout=BatchLayout(chunks, IMAGES), run=run, latent_hw=(4 * grid[0], 4 * grid[1]))


def _blobs():
    """(images, 1, 8, 8) maps: image i's subject a 3x3 square at its own place, on a faint uneven background."""
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(IMAGES, 1, *GRID, generator=g) * 0.1
    for i in range(IMAGES):
        maps[i, 0, i:i + 3, 2 * i:2 * i + 3] += 1.0
    return maps


def _store(controller, run, per_step):
    """Put maps (images, words, h, w) into the run's state as recorded at each step of `per_step`."""
    state = run.of(controller)
    for step, maps in per_step.items():
        state.maps[step] = [maps.flatten(2).clone(), 1]
    state.grid = GRID
    return state


# ---- Otsu ---------------------------------------------------------------------------------------------------

def test_otsu_equals_scikit_image():
    g = torch.Generator().manual_seed(1)
    rows = [torch.rand(500, generator=g, dtype=torch.float64) ** 3,
            torch.cat([torch.rand(300, generator=g, dtype=torch.float64) * 0.2,
                       0.6 + torch.rand(40, generator=g, dtype=torch.float64) * 0.4]),
            torch.randn(64, generator=g, dtype=torch.float64)]
    for row in rows:
        assert otsu_threshold(row).item() == pytest.approx(skimage_filters.threshold_otsu(row.numpy()), abs=1e-12)
    batch = torch.stack([r[:64] for r in rows])   # rows thresholded independently
    expected = [skimage_filters.threshold_otsu(r[:64].numpy()) for r in rows]
    assert otsu_threshold(batch).tolist() == pytest.approx(expected, abs=1e-12)


def test_otsu_of_a_constant_row_selects_nothing():
    assert not otsu_mask(torch.full((2, 10), 0.3)).any()


# ---- masks --------------------------------------------------------------------------------------------------

def test_subject_masks_are_each_words_otsu_region_joined():
    maps = torch.cat([_blobs(), _blobs().flip(-1)], dim=1)   # two words, their regions mirrored
    masks = subject_masks(maps, (16, 16))
    for i in range(IMAGES):
        expected = torch.zeros(16 * 16, dtype=torch.bool)
        for word in range(2):
            resized = torch.nn.functional.interpolate(maps[i, word][None, None].double(), size=(16, 16),
                                                      mode="bilinear", align_corners=False)[0, 0].numpy()
            expected |= torch.from_numpy(resized > skimage_filters.threshold_otsu(resized)).flatten()
        assert torch.equal(masks[i], expected)
        assert 0 < masks[i].float().mean() < 0.5


def test_the_mask_averages_the_last_20_steps_before_the_call():
    """Steps 0-9 put every subject on the left, steps 10-29 on the right: at step 30 the last 20 steps see only the
    right, while all 30 would also see the left."""
    left, right = torch.zeros(IMAGES, 1, *GRID), torch.zeros(IMAGES, 1, *GRID)
    left[..., :, :4] = 1.0
    right[..., 3:5, 6:8] = 1.0
    controller = _controller(dropout=0.0)
    run = RunState([controller])
    _store(controller, run, {s: left if s < 10 else right for s in range(30)})
    assert MASK_STEPS == 20
    mask = controller._mask(_call(controller, run, 30))
    assert torch.equal(mask, subject_masks(right, GRID))
    everything = (10 * left + 20 * right) / 30
    assert not torch.equal(subject_masks(everything, GRID), mask), "the window does not matter here"
    # a call of step 12 sees steps 0-11 only
    early = controller._mask(_call(controller, run, 12))
    assert torch.equal(early, subject_masks((10 * left + 2 * right) / 12, GRID))


def test_no_mask_before_the_first_maps():
    controller = _controller()
    run = RunState([controller])
    assert controller._mask(_call(controller, run, 0)) is None
    assert not controller.acts_on(_call(controller, run, 0))
    _store(controller, run, {0: _blobs()})
    assert controller.acts_on(_call(controller, run, 1))


# ---- dropout ------------------------------------------------------------------------------------------------

def test_dropout_is_seeded_per_step_and_grid():
    a = keep_draw(5, 3, (16, 16), IMAGES, 0.5)
    assert torch.equal(a, keep_draw(5, 3, (16, 16), IMAGES, 0.5))
    assert not torch.equal(a, keep_draw(6, 3, (16, 16), IMAGES, 0.5))
    assert not torch.equal(a, keep_draw(5, 4, (16, 16), IMAGES, 0.5))
    assert abs(a.float().mean().item() - 0.5) < 0.05
    assert keep_draw(5, 3, (16, 16), IMAGES, 0.0).all()


def test_the_dropout_removes_only_mask_tokens():
    controller = _controller(dropout=0.5, seed=9)
    run = RunState([controller])
    _store(controller, run, {0: _blobs()})
    mask = controller._mask(_call(controller, run, 1))
    full = subject_masks(_blobs(), GRID)
    assert torch.equal(mask, full & keep_draw(9, 1, GRID, IMAGES, 0.5))
    assert 0 < mask.sum() < full.sum()


# ---- the keys one call reads --------------------------------------------------------------------------------

@pytest.mark.parametrize("anchors", [0, 1])
def test_each_row_reads_its_image_whole_and_the_others_inside_their_masks(anchors):
    """Keys and values that say where they come from (row * 1000 + token): each row reads, with a finite bias,
    exactly its own image's tokens and the other readable images' mask tokens, all of its own CFG chunk."""
    controller = _controller(dropout=0.5, seed=2, anchors=anchors, share_weight=0.5)
    run = RunState([controller])
    _store(controller, run, {0: _blobs()})
    call = _call(controller, run, 1)
    tokens = GRID[0] * GRID[1]
    rows = 2 * IMAGES
    origin = (torch.arange(rows)[:, None] * 1000 + torch.arange(tokens)[None, :]).double()
    k = origin[..., None].repeat(1, 1, 8)
    q, v = torch.zeros_like(k), -k
    _, k2, v2 = controller.edit_qkv(call, q, k, v)
    bias = controller.edit_bias(call, k2, None)
    mask = controller._mask(call)
    assert k2.shape[:2] == bias.shape and k2.shape[0] == rows and k2.shape[1] < IMAGES * tokens
    assert torch.equal(v2, -k2)
    for r in range(rows):
        chunk, image = divmod(r, IMAGES)
        read = bias[r] > float("-inf")
        sources = [divmod(int(x), 1000) for x in k2[r, read, 0]]
        expected = {(r, t) for t in range(tokens)} | {
            (chunk * IMAGES + j, t) for j in range(anchors or IMAGES) if j != image
            for t in mask[j].nonzero()[:, 0].tolist()}
        assert sorted(sources) == sorted(expected)
        for (source, _), b in zip(sources, bias[r, read].tolist()):
            assert b == (0.0 if source == r else pytest.approx(math.log(0.5)))


def test_share_weight_scales_the_attention_to_the_shared_keys():
    """softmax with log w on the shared keys = their weights multiplied by w before normalising."""
    controller = _controller(dropout=0.0, share_weight=0.25)
    run = RunState([controller])
    _store(controller, run, {0: _blobs()})
    call = _call(controller, run, 1, chunks=("cond",))
    tokens = GRID[0] * GRID[1]
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(IMAGES, tokens, 8, generator=g, dtype=torch.float64) for _ in range(3))
    out = controlled_attention(call, q, k, v, [controller], sdpa_attention)
    mask = controller._mask(call)
    for i in range(IMAGES):
        keys, values, weights = [k[i]], [v[i]], [torch.ones(tokens, dtype=torch.float64)]
        for j in range(IMAGES):
            if j != i:
                keys.append(k[j][mask[j]])
                values.append(v[j][mask[j]])
                weights.append(torch.full((int(mask[j].sum()),), 0.25, dtype=torch.float64))
        keys, values, weights = torch.cat(keys), torch.cat(values), torch.cat(weights)
        for head in range(2):   # two heads of 4 channels
            cols = slice(4 * head, 4 * head + 4)
            logits = q[i, :, cols] @ keys[:, cols].T / math.sqrt(4)
            p = torch.exp(logits - logits.amax(-1, keepdim=True)) * weights
            expected = (p / p.sum(-1, keepdim=True)) @ values[:, cols]
            assert torch.allclose(out[i, :, cols], expected, atol=1e-10)


def test_plain_cases_do_nothing():
    one = ConsistentSubject(keys=((PromptKeys(77, (2,)),),), layers=(0,))
    run = RunState([one])
    assert not one.acts_on(AttentionCall(site=AttentionSite(0, SELF, "output", 3), heads=2, step=3, num_steps=10,
                                         grid=GRID, layout=BatchLayout(("cond",), 1), run=run, latent_hw=(32, 32)))
    off = _controller(share_weight=0.0)
    run = RunState([off])
    _store(off, run, {0: _blobs()})
    assert not off.acts_on(_call(off, run, 1))
    paired = _controller()
    run = RunState([paired])
    run.pair = True
    _store(paired, run, {0: _blobs()})
    assert not paired.acts_on(_call(paired, run, 1))


def test_a_batch_of_other_size_than_the_prompts_is_an_error():
    controller = _controller()
    run = RunState([controller])
    call = AttentionCall(site=AttentionSite(0, SELF, "output", 3), heads=2, step=1, num_steps=10, grid=GRID,
                         layout=BatchLayout(("cond",), 2), run=run, latent_hw=(32, 32))
    with pytest.raises(ValueError, match="batch_size"):
        controller.acts_on(call)


@pytest.mark.parametrize("settings, message", [
    ({"dropout": 1.0}, "dropout"), ({"share_weight": -1.0}, "share_weight"), ({"anchors": 4}, "anchors"),
    ({"start": 0.5, "end": 0.5}, "start"),
])
def test_bad_settings(settings, message):
    with pytest.raises(ValueError, match=message):
        _controller(**settings)
