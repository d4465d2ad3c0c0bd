"""Prompt-to-Prompt and MasaCtrl controllers: token alignment on the real CLIP tokenizer, and the edits on a
tiny diffusers UNet sampling a source and a target in one batch."""
import pytest
import torch

from editkit.core import schedule
from editkit.core.attention import AttentionCall, BatchLayout, RunState, AttentionSite, attention_probs
from editkit.core.capture import AttentionMapCapture, fold_repeated_context, unfold_repeated_context
from editkit.core.prompt2prompt import blend_denoised, LocalBlend, MutualSelfAttention, PromptKeys, PromptToPrompt, TargetEdit
from editkit.core.tokens import AlignmentError, TokenMap, refinement_alignment, swap_alignment
from support.clip_tokens import sd1_tokenizer, sd1_tokens
from support.pair_sampling import LATENT_HW, STEPS, pair_sample

@pytest.fixture(scope="module")
def tokenizer():
    return sd1_tokenizer()


# ---- token alignment ------------------------------------------------------------------------------------

def _piece(tokenizer):
    return lambda i: tokenizer.convert_ids_to_tokens(i)


def _first(m):
    """Target key -> its (only) source key, or None for an added token."""
    return tuple(s[0] if s else None for s in m.sources)


def test_refinement_aligns_every_source_token_to_its_target_token(tokenizer):
    source = sd1_tokens(tokenizer, "a cat riding a bicycle")
    target = sd1_tokens(tokenizer, "a cat riding a red bicycle")
    m = refinement_alignment(source, target)
    # keys: 0 start, 1 a, 2 cat, 3 riding, 4 a, 5 (red), 6 bicycle, 7 end; the source has no 'red'
    assert _first(m)[:8] == (0, 1, 2, 3, 4, None, 5, 6)   # end token to end token
    assert _first(m)[8:] == tuple(range(8, 77))            # padding key j takes source key j (the reference)
    src_ids = [t for c in source.chunks for t in c]
    tgt_ids = [t for c in target.chunks for t in c]
    for j, i in enumerate(_first(m)):
        if i is not None:
            assert src_ids[i] == tgt_ids[j]
    assert m.target_length == 77 and m.source_length == 77 and set(m.weights) == {1.0}


def test_refinement_breaks_ties_as_the_reference_traceback(tokenizer):
    """'a cat' -> 'a cat and a cat': the reference traceback (from the end, a target gap before a source gap
    before a match) makes the later tokens the added ones, so the source's words go to the first 'a cat'."""
    m = refinement_alignment(sd1_tokens(tokenizer, "a cat"), sd1_tokens(tokenizer, "a cat and a cat"))
    assert _first(m)[:7] == (0, 1, 2, None, None, None, 3)


@pytest.mark.parametrize("swap", [True, False])
def test_alignment_of_a_prompt_with_itself_is_the_identity(tokenizer, swap):
    tokens = sd1_tokens(tokenizer, "a photo of a house on a mountain")
    m = swap_alignment(tokens, tokens, _piece(tokenizer)) if swap else refinement_alignment(tokens, tokens)
    assert _first(m) == tuple(range(77)) and all(m.aligned) and set(m.weights) == {1.0}


def test_word_swap_keeps_positions_and_refuses_different_word_counts(tokenizer):
    m = swap_alignment(sd1_tokens(tokenizer, "a cat riding a bicycle"), sd1_tokens(tokenizer, "a dog riding a bicycle"),
                       _piece(tokenizer))
    assert _first(m) == tuple(range(77)) and all(m.aligned)
    with pytest.raises(AlignmentError, match="same number of words.*refine"):
        swap_alignment(sd1_tokens(tokenizer, "a cat"), sd1_tokens(tokenizer, "a cat riding a red bicycle"),
                       _piece(tokenizer))


def test_word_swap_splits_a_word_over_the_target_tokens_and_keeps_later_words(tokenizer):
    """'cat' (1 token) -> 'corgidog' (several): each target token takes the source word's map divided by their
    count; the words after it keep their own source words (the reference mapper shifts them)."""
    source = sd1_tokens(tokenizer, "a cat riding a bicycle")
    target = sd1_tokens(tokenizer, "a corgidog riding a bicycle")
    n = len(tokenizer("corgidog")["input_ids"]) - 2
    m = swap_alignment(source, target, _piece(tokenizer))
    assert n > 1 and m.sources[2:2 + n] == ((2,),) * n and m.weights[2:2 + n] == (1.0 / n,) * n
    assert _first(m)[2 + n:2 + n + 4] == (3, 4, 5, 6)   # riding, a, bicycle, end token
    assert _first(m)[2 + n + 4:] == tuple(range(2 + n + 4, 77))   # padding key j: source key j
    back = swap_alignment(target, source, _piece(tokenizer))
    assert back.sources[2] == tuple(range(2, 2 + n)) and back.weights[2] == 1.0   # several source tokens summed


def test_refinement_across_77_token_chunks(tokenizer):
    base = ", ".join(["a cat riding a bicycle"] * 10)     # 59 tokens: one chunk
    longer = base + ", " + ", ".join(["a red bus"] * 8)  # two chunks
    source, target = sd1_tokens(tokenizer, base), sd1_tokens(tokenizer, longer)
    assert (source.context_length, target.context_length) == (77, 154)
    m = refinement_alignment(source, target)
    src_ids = [t for c in source.chunks for t in c]
    tgt_ids = [t for c in target.chunks for t in c]
    first = _first(m)
    mapped_content = sorted(i for j, i in enumerate(first) if i is not None and tgt_ids[j] not in target.special_ids)
    assert mapped_content == [k for k, _ in source.content()]   # every source word is kept, in order
    assert all(src_ids[i] == tgt_ids[j] for j, i in enumerate(first)
               if i is not None and tgt_ids[j] not in target.special_ids)
    assert first[77] == 0   # second chunk's start token to the source's start token


def test_folding_repeated_keys_recovers_the_prompt_attention():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 5, 16, generator=g), torch.randn(1, 7, 16, generator=g)
    probs = attention_probs(q, k, heads=2)
    repeated = attention_probs(q, k.repeat(1, 3, 1), heads=2)
    assert torch.allclose(fold_repeated_context(repeated, 7), probs, atol=1e-6)
    assert torch.allclose(unfold_repeated_context(probs, 21), repeated, atol=1e-6)


# ---- controllers on a tiny diffusers UNet ---------------------------------------------------------------

@pytest.fixture(scope="module")
def unet():
    pytest.importorskip("diffusers")
    from support.tiny_models import make_diffusers_unet
    return make_diffusers_unet(seed=0)


def _contexts(same=False):
    g = torch.Generator().manual_seed(1)
    source, target, uncond = (torch.randn(1, 77, 32, generator=g) for _ in range(3))
    return source, (source.clone() if same else target), uncond


def _identity_map(length=77):
    return TokenMap.one_to_one(tuple(range(length)), (True,) * length, length)


def _refine_map():
    """Target key 5 is an added word; target keys 6.. take source keys 5.."""
    index = tuple(range(5)) + (0,) + tuple(range(5, 76))
    return TokenMap.one_to_one(index, (True,) * 5 + (False,) + (True,) * 71, 77)


def _p2p(token_map=None, cross=0.8, self_until=0.4, equalizer=None):
    token_map = token_map or _identity_map()
    return PromptToPrompt(targets=(TargetEdit.uniform(token_map, cross, equalizer=equalizer),),
                          self_window=(0.0, self_until))


EDITS = {
    "word_swap": lambda: [_p2p(cross=1.0, self_until=1.0)],
    "refine": lambda: [_p2p(_identity_map())],
    "reweight": lambda: [_p2p(equalizer=(1.0,) * 77)],
    "local_blend": lambda: [_p2p(), LocalBlend(keys=(PromptKeys(77, (2,)), PromptKeys(77, (2,))))],
    "masactrl": lambda: [MutualSelfAttention(start_step=0, layers=frozenset(range(16)))],
    "masactrl_mask": lambda: [MutualSelfAttention(start_step=1, layers=frozenset(range(16)),
                                                  mask_keys=(PromptKeys(77, (2,)), PromptKeys(77, (2,))))],
    "masactrl_union": lambda: [MutualSelfAttention(start_step=0, layers=frozenset(range(16)), union=True)],
}


# The masked MasaCtrl splits the target's attention by region where the source attends everywhere, so even an
# identity edit differs from the source (as in the reference); the other edits reproduce it.
@pytest.mark.parametrize("edit", [e for e in EDITS if e != "masactrl_mask"])
def test_identity_edit_reproduces_the_source_and_leaves_it_untouched(unet, edit):
    source, target, uncond = _contexts(same=True)
    out = pair_sample(unet, EDITS[edit](), source, target, uncond)
    assert (out[1] - out[0]).abs().max() < 1e-5
    alone = pair_sample(unet, [], source, target, uncond, items=1)
    assert (out[0] - alone[0]).abs().max() < 1e-4 * alone.abs().max()


@pytest.mark.parametrize("edit", ["word_swap", "masactrl"])
def test_edits_change_the_target_but_never_the_source(unet, edit):
    source, target, uncond = _contexts()
    plain = pair_sample(unet, [], source, target, uncond)
    out = pair_sample(unet, EDITS[edit](), source, target, uncond)
    assert (out[0] - plain[0]).abs().max() < 1e-4 * plain.abs().max()
    assert (out[1] - plain[1]).abs().max() > 1e-2 * plain.abs().max()


def test_full_word_swap_gives_the_target_the_source_cross_maps(unet):
    """Cross replace 1.0, self replace 1.0: at every edited site the captured target maps are the source's."""
    source, target, uncond = _contexts()
    capture = AttentionMapCapture(max_tokens=32 * 32)
    pair_sample(unet, [_p2p(cross=1.0, self_until=1.0), capture], source, target, uncond)
    maps = capture.store.maps
    assert (maps[1] - maps[0]).abs().max() < 1e-6
    free = AttentionMapCapture(max_tokens=32 * 32)
    pair_sample(unet, [free], source, target, uncond)
    assert (free.store.maps[1] - free.store.maps[0]).abs().max() > 1e-3   # prompts differ without the edit


def test_reweight_by_one_is_the_identity_and_other_factors_scale_the_word(unet):
    source, target, uncond = _contexts()
    plain = pair_sample(unet, [_p2p(_refine_map())], source, target, uncond)
    by_one = pair_sample(unet, [_p2p(_refine_map(), equalizer=(1.0,) * 77)], source, target, uncond)
    assert torch.equal(plain, by_one)
    eq = [1.0] * 77
    eq[2] = 3.0
    capture = AttentionMapCapture(max_tokens=32 * 32)
    pair_sample(unet, [_p2p(_refine_map(), cross=1.0, equalizer=tuple(eq)), capture], source, target, uncond)
    maps = capture.store.maps
    assert torch.allclose(maps[1, ..., 2], 3.0 * maps[0, ..., 2], rtol=1e-4, atol=1e-7)


def test_masactrl_starting_after_the_last_step_is_the_identity(unet):
    source, target, uncond = _contexts()
    plain = pair_sample(unet, [], source, target, uncond)
    late = pair_sample(unet, [MutualSelfAttention(start_step=STEPS, layers=frozenset(range(16)))], source, target, uncond)
    assert torch.equal(plain, late)


# ---- local blend and MasaCtrl masks on synthetic maps ----------------------------------------------------

def test_local_blend_mask_joins_source_and_target_regions_and_follows_the_summed_maps():
    blend = LocalBlend(keys=(PromptKeys(77, (1,)), PromptKeys(77, (1,))), threshold=0.5)
    state = blend.new_run_state()
    maps = torch.zeros(2, 8, 8)
    maps[0, 0, 0] = 1.0      # source word: top-left
    maps[1, 7, 7] = 1.0      # target word: bottom-right
    state.words.sums = maps.clone()
    mask = blend.update_mask(state, (16, 16))
    assert mask.shape == (1, 1, 16, 16)
    assert mask[0, 0, :4, :4].all() and mask[0, 0, -4:, -4:].all()   # 3x3 max-pool, then 2x nearest upsampling
    assert mask[0, 0, 8, 8] == 0 and mask.sum() == 2 * 16
    state.words.sums[1, 4, 4] = 3.0     # a stronger target peak: the corner falls under the threshold
    shrunk = blend.update_mask(state, (16, 16))
    assert shrunk[0, 0, 6:12, 6:12].all() and shrunk[0, 0, :4, :4].all() and not shrunk[0, 0, -4:, -4:].any()
    subtract = LocalBlend(keys=blend.keys, subtract=(PromptKeys(77, (2,)), PromptKeys(77, ())), threshold=0.5)
    state = subtract.new_run_state()
    state.words.sums = maps.clone()
    state.subtract.sums = torch.zeros(2, 8, 8)
    state.subtract.sums[0, 0, 0] = 1.0   # the source's subtracted word covers the top-left (no pooling)
    cut = subtract.update_mask(state, (16, 16))
    assert not cut[0, 0, :2, :2].any() and cut[0, 0, 2:4, 2:4].all() and cut[0, 0, -4:, -4:].all()


def test_blend_denoised_lands_a_first_order_step_on_the_blended_latent():
    g = torch.Generator().manual_seed(4)
    x, d = torch.randn(3, 4, 6, 6, generator=g, dtype=torch.float64), torch.randn(3, 4, 6, 6, generator=g, dtype=torch.float64)
    x[2, :, :3] = x[0, :, :3]                     # the second target already sits on the source at the top
    mask = (torch.rand(2, 1, 6, 6, generator=g) > 0.5).double()
    sigma, nxt = 2.0, 1.5
    out = blend_denoised(x, d, mask, sigma, nxt)
    step = lambda xx, dd: xx + (nxt - sigma) / sigma * (xx - dd)   # noqa: E731
    want = step(x[:1], d[:1]) + mask * (step(x[1:], d[1:]) - step(x[:1], d[:1]))
    assert torch.equal(out[0], d[0])
    assert torch.allclose(step(x[1:], out[1:]), want, rtol=0, atol=1e-12)
    assert torch.equal(out[1:][mask.expand_as(x[1:]) > 0], d[1:][mask.expand_as(x[1:]) > 0])   # inside: own
    outside_equal = (mask[1, :, :3] == 0).expand(4, 3, 6)
    assert torch.equal(out[2, :, :3][outside_equal], d[0, :, :3][outside_equal])   # on the source: its D exactly
    last = blend_denoised(x, d, mask, sigma, 0.0)
    assert torch.equal(last[1:], torch.where(mask > 0.5, d[1:], d[:1]))


def test_local_blend_ignores_a_prompt_without_the_words():
    blend = LocalBlend(keys=(PromptKeys(77, ()), PromptKeys(77, (3,))), threshold=0.5)
    state = blend.new_run_state()
    state.words.sums = torch.ones(2, 4, 4)
    state.words.sums[1] = 0
    state.words.sums[1, 0, 0] = 1
    mask = blend.update_mask(state, (4, 4))
    assert mask.sum() == 4   # the target's pooled corner only; the source map (no words) does not count


def _split_by_probabilities(q, k, v, key_fg, query_fg):
    """The masked variants' attention written with the probability matrix (one head): softmax over all keys,
    each query's probabilities kept on its region's keys and renormalised; uniform where the region has none."""
    p = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    rows = []
    for i in range(q.shape[0]):
        keys = key_fg if query_fg[i] else ~key_fg
        part = p[i] * keys.double()
        rows.append(part / part.sum() if keys.any() else torch.full_like(part, 1.0 / part.numel()))
    return torch.stack(rows) @ v


@pytest.mark.parametrize("background_keys", [True, False])
def test_masked_mutual_attention_keeps_foreground_and_background_apart(background_keys):
    """The target's foreground queries read only the source's foreground keys, its background queries only the
    background ones, with no probability matrix (two attention calls on key subsets); a region without keys
    reads the mean value. The source row is untouched."""
    from editkit.core.attention import sdpa_attention
    fg = torch.zeros(2, 2, 2, dtype=torch.float64)
    fg[:, 0, :] = 1.0          # top row is the subject in both images
    if background_keys:        # the word's maps of this step
        keys = (PromptKeys(4, (1,)), PromptKeys(4, (1,)))
        masa = MutualSelfAttention(start_step=0, layers=frozenset({0}), mask_keys=keys, mask_threshold=0.5)
    else:                      # the user's masks, the source all subject: its background has no keys
        fg[0] = 1.0
        masa = MutualSelfAttention(start_step=0, layers=frozenset({0}), masks=(fg[0], fg[1]))
    run = RunState([masa])
    run.of(masa).evaluation, run.of(masa).sums, run.of(masa).count = (0, None), fg, 1
    site = AttentionSite(0, "self", "output", 3)
    call = AttentionCall(site, heads=1, step=0, num_steps=1, grid=(2, 2), layout=BatchLayout(("cond",), 2), run=run)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 8, generator=g, dtype=torch.float64) for _ in range(3))
    assert not masa.needs_probs(call)
    q, k, v = masa.edit_qkv(call, q, k, v)
    plain = sdpa_attention(q, k, v, 1)
    out = masa.own_attention(call, q, k, v, plain)
    assert torch.equal(out[0], plain[0])
    key_fg, query_fg = (fg[0] >= 0.5).flatten(), (fg[1] >= 0.5).flatten()
    expected = _split_by_probabilities(q[1], k[0], v[0], key_fg, query_fg)
    assert torch.allclose(out[1], expected, atol=1e-12)
    assert not torch.allclose(out[1], plain[1])
    later = AttentionCall(site, heads=1, step=1, num_steps=2, grid=(2, 2), layout=BatchLayout(("cond",), 2), run=run)
    if background_keys:   # the maps of step 0 do not serve step 1: unmasked until it has its own
        assert torch.equal(masa.own_attention(later, q, k, v, plain), plain)


def test_masactrl_word_mask_is_min_max_normalised_nearest_resized_and_includes_the_threshold():
    """MaskAuto: (map - min) / (max - min), nearest resize, >= threshold (a value at the threshold is foreground)."""
    keys = (PromptKeys(4, (1,)), PromptKeys(4, (1,)))
    masa = MutualSelfAttention(start_step=0, layers=frozenset({0}), mask_keys=keys, mask_threshold=0.25)
    run = RunState([masa])
    state = run.of(masa)
    maps = torch.tensor([[[2.0, 2.5], [3.0, 4.0]]], dtype=torch.float64).repeat(2, 1, 1)   # min 2, max 4
    state.evaluation, state.sums, state.count = (0, None), maps, 1
    call = AttentionCall(AttentionSite(0, "self", "output", 3), heads=1, step=0, num_steps=1, grid=(4, 4),
                         layout=BatchLayout(("cond",), 2), run=run)
    fg = masa._foreground(call, torch.device("cpu")).reshape(2, 4, 4)
    # normalised: [[0, 0.25], [0.5, 1]] -> >= 0.25 everywhere but the top-left, each value over a 2x2 block
    expected = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(fg[0], expected) and torch.equal(fg[1], expected)


# ---- FateZero's attention fusion --------------------------------------------------------------------------

def _fusion_setup(threshold=0.3):
    """A word swap of 2 frames (source, target per frame) with fusion on source key 1; the latent is 16x16, so
    the maps' level (SD1.5's 16x16 at 512 px) is 4x4 here."""
    from editkit.core.prompt2prompt import AttentionFusion
    keys = PromptKeys(4, (1,))
    p2p = PromptToPrompt(targets=(TargetEdit.uniform(TokenMap.one_to_one(range(4), [True] * 4, 4), 0.0),), self_window=(0.0, 1.0),
                         self_max_tokens=8 * 8, fusion=AttentionFusion(keys, threshold))
    return p2p, RunState([p2p]), BatchLayout(("cond", "uncond"), items=2, frames=2)


def _call(run, layout, kind, step, grid, sigma):
    site = AttentionSite(4, kind, "input", 7)
    return AttentionCall(site, heads=1, step=step, num_steps=4, grid=grid, layout=layout, run=run, sigma=sigma,
                         latent_hw=(16, 16))


def test_fusion_takes_the_source_self_attention_until_the_maps_of_an_evaluation_exist():
    p2p, run, layout = _fusion_setup()
    probs = torch.softmax(torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    out = p2p.edit_probs(_call(run, layout, "self", 0, (4, 4), 10.0), probs)
    for source in layout.group_starts("cond"):
        assert torch.equal(out[source + 1], probs[source])          # no maps yet: plain Prompt-to-Prompt
    for row in layout.rows("uncond"):
        assert torch.equal(out[row], probs[row])                    # the unconditional chunk is left alone


def test_fusion_mask_of_a_frame_is_the_source_words_map_of_the_last_evaluation_pooled_resized_and_thresholded():
    """Reference (FateZero's MaskBlend, written out): the source row's map of the words, averaged over heads and
    over the evaluation's 16x16 layers, 3x3 max-pooled, nearest-resized to the self-attention grid, divided by
    its maximum, > threshold; targets keep M * own + (1 - M) * source."""
    import torch.nn.functional as F
    p2p, run, layout = _fusion_setup(threshold=0.5)
    g = torch.Generator().manual_seed(1)
    cross = [torch.softmax(torch.randn(8, 2, 16, 4, generator=g, dtype=torch.float64), dim=-1) for _ in range(2)]
    for c in cross:   # the word's attention grows along the queries, so the region is a part of the frame
        c[..., 1] *= torch.linspace(0.0, 2.0, 16, dtype=torch.float64)
    for probs in cross:                                   # two 4x4-level layers of evaluation (step 0, sigma 10)
        p2p.edit_probs(_call(run, layout, "cross", 0, (4, 4), 10.0), probs)
    self_probs = torch.softmax(torch.randn(8, 2, 64, 64, generator=g, dtype=torch.float64), dim=-1)
    out = p2p.edit_probs(_call(run, layout, "self", 1, (8, 8), 5.0), self_probs)
    for source in layout.group_starts("cond"):
        word = sum(c[source].mean(dim=0)[:, 1] for c in cross) / 2           # (16,) = 4x4 map of the word
        pooled = F.max_pool2d(word.reshape(1, 1, 4, 4), 3, 1, 1)
        resized = F.interpolate(pooled, size=(8, 8), mode="nearest")
        inside = (resized / resized.max() > 0.5).flatten().to(torch.float64)[None, :, None]
        expected = inside * self_probs[source + 1] + (1 - inside) * self_probs[source]
        assert torch.allclose(out[source + 1], expected, atol=1e-12)
        assert 0 < inside.sum() < 64                                         # a real split, not all or nothing
    assert torch.equal(out[0], self_probs[0])


def test_word_maps_and_local_blend_masks_are_per_frame():
    """With 2 frames, each frame's blend mask comes from that frame's rows only."""
    layout = BatchLayout(("cond",), items=2, frames=2)
    keys = (PromptKeys(4, (1,)), PromptKeys(4, (1,)))
    blend = LocalBlend(keys=keys, threshold=0.5)
    run = RunState([blend])
    probs = torch.zeros(4, 1, 16, 4)
    probs[..., 0] = 1.0                                   # attention on the start token by default
    probs[0, :, 0, :] = torch.tensor([0.0, 1.0, 0.0, 0.0])    # frame 0's source: the word at the top-left
    probs[3, :, 15, :] = torch.tensor([0.0, 1.0, 0.0, 0.0])   # frame 1's target: the word at the bottom-right
    call = AttentionCall(AttentionSite(4, "cross", "input", 7), heads=1, step=0, num_steps=1, grid=(4, 4),
                         layout=layout, run=run, latent_hw=(16, 16))
    blend.edit_probs(call, probs)
    mask = blend.update_mask(run.of(blend), (16, 16))
    assert mask.shape == (2, 1, 16, 16)
    # 3x3 pooling spreads a corner token over 2x2 tokens (8x8 latent pixels)
    assert mask[0, 0, :8, :8].all() and not mask[0, 0, 8:].any() and not mask[0, 0, :, 8:].any()
    assert mask[1, 0, 8:, 8:].all() and not mask[1, 0, :8].any() and not mask[1, 0, :, :8].any()
