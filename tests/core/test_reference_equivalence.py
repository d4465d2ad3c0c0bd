"""Reference equivalence: each editing method of the pack against a plain loop of the official algorithm
(tests/support/reference_editing.py, written from the papers and their official code), on the same tiny
SD1.5-layout UNet at a 64x64 latent, so that the token counts of its layers (4096, 1024, 256, 64) are those of
SD1.5 at 512 px and the official resolution rules mean what they mean there.

The pack side is the pack's controllers on the diffusers adapter, sampled as the pack's pair guider samples
(tests/support/pair_sampling.py: core/pair.py for the source scheme and the local blend, Euler in sigma space,
which is DDIM); the reference side is the official loop (DDIM in the alpha parameterisation). Both sides
run in float32 (float64 for direct inversion, whose offsets cancel large numbers), two loops of different
operation order agreeing to a few 1e-6 of the latents' scale; the tolerance is 1e-5 (1e-8 in float64), and
every departure these tests guard against moves the result by far more (README: the departures and their
sizes). Step counts: 10, and 7 (not a multiple of 5: the Prompt-to-Prompt cross window of N + 1 table rows
differs there from a window of N steps); 6 where the count does not matter.
"""
import pytest
import torch

from editkit.core.inversion import ddim_invert
from editkit.core.pair import PairSchedule
from editkit.core.plug_and_play import PlugAndPlay
from editkit.core.prompt2prompt import LocalBlend, MutualSelfAttention, PromptKeys, PromptToPrompt, TargetEdit
from editkit.core.tokens import find_word_positions, refinement_alignment, swap_alignment
from support import reference_editing as ref
from support.clip_tokens import sd1_tokenizer, sd1_tokens
from support.pair_sampling import ddim_schedule, pair_run

HW = (64, 64)
CFG = 5.0
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-8}   # relative to the latents' scale


def _unet(dtype):
    pytest.importorskip("diffusers")
    from support.tiny_models import make_diffusers_unet
    return make_diffusers_unet(seed=0, heads=2).to(dtype)


@pytest.fixture(scope="module")
def unet():
    return _unet(torch.float32)


@pytest.fixture(scope="module")
def unet64():
    return _unet(torch.float64)


@pytest.fixture(scope="module")
def tokenizer():
    return sd1_tokenizer()


def _contexts(n, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 77, 32, generator=g, dtype=torch.float64).to(dtype) for _ in range(n)]


class Setup:
    """A schedule of `steps` steps, its starting noise in both parameterisations, prompts' encodings."""

    def __init__(self, steps, prompts, seed=0, dtype=torch.float32):
        self.timesteps, self.sigmas = ddim_schedule(steps)
        self.alphas = [1.0 / (1.0 + s * s) for s in self.sigmas]
        g = torch.Generator().manual_seed(seed)
        self.x_T = torch.randn(1, 4, *HW, generator=g, dtype=torch.float64).to(dtype)   # alpha space
        self.x = self.x_T * (self.sigmas[0] ** 2 + 1.0) ** 0.5                  # sigma space
        *self.conds, self.uncond = _contexts(len(prompts) + 1, dtype)
        self.prompts = prompts

    def pack(self, unet, controllers, local_blend=None, unconds=None, pair=None, trace=None):
        unconds = unconds or [self.uncond] * len(self.conds)
        return pair_run(unet, controllers, self.conds, unconds, self.x, self.timesteps, self.sigmas, CFG, pair=pair,
                        local_blend=local_blend, trace=trace)

    def reference(self, unet, tokenizer, **kwargs):
        return ref.p2p_reference(unet, tokenizer, self.prompts, self.conds, self.uncond, self.x_T, self.timesteps,
                                 self.alphas, CFG, **kwargs)

    def compare_p2p(self, unet, tokenizer, controllers, blend=None, **reference):
        """The latents of every step, not only the last (a departure at one step may fade by the end)."""
        ours, theirs = [], []
        self.pack(unet, controllers, local_blend=blend, trace=ours)
        self.reference(unet, tokenizer, trace=theirs, **reference)
        assert_same_trace(ours, theirs)


def assert_same(pack, reference, where=""):
    scale = reference.abs().max().item()
    error = (pack - reference).abs().max().item()
    tolerance = TOLERANCE[reference.dtype]
    assert error <= tolerance * scale, \
        f"pack and reference differ by {error:.3g}{where} (latents of scale {scale:.3g})"


def assert_same_trace(ours, theirs):
    assert len(ours) == len(theirs)
    for step, (a, b) in enumerate(zip(ours, theirs)):
        assert_same(a, b, f" after step {step}")


def assert_partial(blend):
    """The test means something only if the mask leaves pixels on both sides."""
    inside = blend.mask_store.maps.mean().item()
    assert 0.05 < inside < 0.95, f"the blend mask covers {inside:.0%} of the latent"


def _tokens(tokenizer, prompts):
    return [sd1_tokens(tokenizer, p) for p in prompts]


def _piece(tokenizer):
    return lambda i: tokenizer.convert_ids_to_tokens(i)


def _word_keys(tokenizer, tokens, word):
    return find_word_positions(tokens, tokenizer(word)["input_ids"][1:-1])


def _targets(tokenizer, prompts, align, window, words=None, equalizer=None):
    """One TargetEdit per target prompt: `window` for every key, `words` {word: window} on their tokens,
    `equalizer` {word: factor}."""
    tokens = _tokens(tokenizer, prompts)
    out = []
    for t in tokens[1:]:
        windows = [window] * t.context_length
        eq = None if equalizer is None else [1.0] * t.context_length
        for word, w in (words or {}).items():
            for k in _word_keys(tokenizer, t, word):
                windows[k] = w
        for word, factor in (equalizer or {}).items():
            for k in _word_keys(tokenizer, t, word):
                eq[k] = factor
        token_map = swap_alignment(tokens[0], t, _piece(tokenizer)) if align == "swap" else \
            refinement_alignment(tokens[0], t)
        out.append(TargetEdit(token_map, tuple(windows), None if eq is None else tuple(eq)))
    return tuple(out)


def _blend_keys(tokenizer, prompts, words):
    tokens = _tokens(tokenizer, prompts)
    return tuple(PromptKeys(77, tuple(sorted(k for w in ws for k in _word_keys(tokenizer, t, w))))
                 for t, ws in zip(tokens, words))


# ---- Prompt-to-Prompt ------------------------------------------------------------------------------------

SWAP = ["a cat riding a bicycle", "a corgidog riding a bicycle"]    # 'corgidog' is several tokens
REFINE = ["a cat riding a bicycle", "a cat riding a red bicycle"]


@pytest.mark.parametrize("steps", [10, 7])
def test_word_swap_with_a_word_window(unet, tokenizer, steps):
    s = Setup(steps, SWAP)
    p2p = PromptToPrompt(_targets(tokenizer, SWAP, "swap", (0.0, 0.8), words={"corgidog": (0.0, 0.4)}),
                         self_window=(0.0, 0.4))
    s.compare_p2p(unet, tokenizer, [p2p], edit="replace", cross_replace_steps={"default_": 0.8, "corgidog": 0.4},
                  self_replace_steps=0.4)


@pytest.mark.parametrize("steps", [10, 7])
def test_refinement_with_windows_that_start_late(unet, tokenizer, steps):
    s = Setup(steps, REFINE)
    p2p = PromptToPrompt(_targets(tokenizer, REFINE, "refine", (0.1, 0.8)), self_window=(0.1, 0.5))
    s.compare_p2p(unet, tokenizer, [p2p], edit="refine", cross_replace_steps=(0.1, 0.8), self_replace_steps=(0.1, 0.5))


def test_reweight_on_a_refinement(unet, tokenizer):
    s = Setup(7, REFINE)
    p2p = PromptToPrompt(_targets(tokenizer, REFINE, "refine", (0.0, 0.8), equalizer={"red": 3.0}),
                         self_window=(0.0, 0.4))
    s.compare_p2p(unet, tokenizer, [p2p], edit="reweight", prev="refine", equalizer={"red": 3.0},
                  cross_replace_steps=0.8, self_replace_steps=0.4)


def test_several_targets_each_with_its_own_token_map(unet, tokenizer):
    prompts = REFINE + ["a small cat riding a blue bicycle"]
    s = Setup(6, prompts)
    p2p = PromptToPrompt(_targets(tokenizer, prompts, "refine", (0.0, 0.8)), self_window=(0.0, 0.4))
    s.compare_p2p(unet, tokenizer, [p2p], edit="refine", cross_replace_steps=0.8, self_replace_steps=0.4)


def test_local_blend_of_a_generated_image(unet, tokenizer):
    """Threshold 0.6: on the random tiny model the mask at 0.3 covers the whole latent; at 0.6 it covers about
    half and shrinks over the steps (2992 -> 2208 of 4096 pixels), where a mask that only grows departs."""
    prompts = ["a cat riding a bicycle", "a cat riding a motorcycle"]
    s = Setup(10, prompts)
    p2p = PromptToPrompt(_targets(tokenizer, prompts, "swap", (0.0, 0.8)), self_window=(0.0, 0.4))
    blend = LocalBlend(keys=_blend_keys(tokenizer, prompts, [["bicycle"], ["motorcycle"]]), threshold=0.6)
    s.compare_p2p(unet, tokenizer, [p2p, blend], blend=blend, edit="replace", cross_replace_steps=0.8,
                  self_replace_steps=0.4, local_blend=dict(words=[["bicycle"], ["motorcycle"]], threshold=(0.6, 0.3)))
    assert_partial(blend)


def test_local_blend_of_the_real_image_code_with_subtracted_words_and_a_late_start(unet, tokenizer):
    s = Setup(7, REFINE)
    p2p = PromptToPrompt(_targets(tokenizer, REFINE, "refine", (0.0, 0.8)), self_window=(0.0, 0.5),
                         self_max_tokens=32 * 32)
    words, subtract = [["bicycle"], ["red", "bicycle"]], [["cat"], ["cat"]]
    blend = LocalBlend(keys=_blend_keys(tokenizer, REFINE, words), subtract=_blend_keys(tokenizer, REFINE, subtract),
                       threshold=0.3, subtract_threshold=0.4, start=0.2)
    s.compare_p2p(unet, tokenizer, [p2p, blend], blend=blend, edit="refine", cross_replace_steps=0.8,
                  self_replace_steps=0.5, self_max_tokens=32 * 32,
                  local_blend=dict(words=words, subtract_words=subtract, threshold=(0.3, 0.4), start_blend=0.2))
    assert_partial(blend)


# ---- MasaCtrl -------------------------------------------------------------------------------------------

MASA = ["a photo of a cat sitting", "a photo of a cat running"]


def _masactrl(unet, tokenizer, steps, start, controller, **reference):
    s = Setup(steps, MASA)
    pack = s.pack(unet, [controller])
    expected = ref.masactrl_reference(unet, s.conds, s.uncond, s.x_T, s.timesteps, s.alphas, CFG, start_step=start,
                                      start_layer=10, **reference)
    assert_same(pack, expected)


def test_masactrl(unet, tokenizer):
    _masactrl(unet, tokenizer, 7, 2, MutualSelfAttention(start_step=2, layers=frozenset(range(10, 16))))


# the masked variants on layers 3 (32x32, before any 16x16 map of the step exists), 11 (32x32) and 13 (64x64)
MASKED_LAYERS = (3, 11, 13)


def test_masactrl_with_the_mask_of_a_word(unet, tokenizer):
    cat = [_word_keys(tokenizer, t, "cat") for t in _tokens(tokenizer, MASA)]
    controller = MutualSelfAttention(start_step=2, layers=frozenset(MASKED_LAYERS),
                                     mask_keys=tuple(PromptKeys(77, tuple(c)) for c in cat), mask_threshold=0.1)
    _masactrl(unet, tokenizer, 6, 2, controller, mode="mask_auto", ref_token_idx=cat[0], cur_token_idx=cat[1],
              thres=0.1, layer_idx=list(MASKED_LAYERS))


def test_masactrl_with_masks_of_the_user(unet, tokenizer):
    source = torch.zeros(*HW)
    source[16:48, 8:40] = 1.0
    target = torch.zeros(*HW)
    target[20:60, 24:56] = 1.0
    controller = MutualSelfAttention(start_step=2, layers=frozenset(MASKED_LAYERS), masks=(source, target))
    _masactrl(unet, tokenizer, 6, 2, controller, mode="mask", mask_s=source, mask_t=target,
              layer_idx=list(MASKED_LAYERS))


def test_masactrl_reading_source_and_target_keys(unet, tokenizer):
    _masactrl(unet, tokenizer, 7, 2, MutualSelfAttention(start_step=2, layers=frozenset(range(10, 16)), union=True),
              mode="union")


# ---- photos: Plug-and-Play and direct inversion ----------------------------------------------------------

def _eps(unet):
    """eps(x, sigma, context) of the diffusers UNet in the host's sigma space (what core/inversion.py takes)."""
    from editkit.core.schedule import sd_alphas_cumprod, timestep_from_sigma
    alphas = sd_alphas_cumprod()

    def eps_fn(x, sigma, context):
        sigma = float(sigma)
        t = round(timestep_from_sigma(sigma, alphas))
        return unet(x / (sigma * sigma + 1.0) ** 0.5, t, encoder_hidden_states=context.expand(x.shape[0], -1, -1)).sample
    return eps_fn


def _photo_trajectory(unet, s, context):
    """A DDIM inversion of a random 'photo' latent: (N + 1, 4, H, W) in sigma space, [0] the noisiest."""
    g = torch.Generator().manual_seed(9)
    photo = torch.randn(4, *HW, generator=g, dtype=torch.float64).to(context.dtype)
    with torch.no_grad():
        return ddim_invert(_eps(unet), photo, torch.tensor(s.sigmas, dtype=context.dtype), context)


def test_plug_and_play_with_the_source_pinned_to_the_inversion(unet, tokenizer):
    s = Setup(6, ["", "a marble statue"])
    empty, target = s.conds
    negative = s.uncond
    trajectory = _photo_trajectory(unet, s, empty)
    alpha_space = [trajectory[i][None] * s.alphas[i] ** 0.5 for i in range(len(s.timesteps))]
    pair = PairSchedule(tuple(s.sigmas), "pinned", trajectory)
    s.x = trajectory[0][None]
    pack = s.pack(unet, [PlugAndPlay()], unconds=[empty, negative], pair=pair)
    expected = ref.pnp_reference(unet, alpha_space, empty, target, negative, s.timesteps, s.alphas, CFG)
    assert_same(pack[1:], expected)
    assert_same(pack[:1], trajectory[-1][None])   # the source row ends on the photo


def test_direct_inversion_moves_the_source_row_only(unet64, tokenizer):
    unet = unet64
    s = Setup(6, REFINE, dtype=torch.float64)
    trajectory = _photo_trajectory(unet, s, s.conds[0])
    alpha_space = [trajectory[i][None] * s.alphas[i] ** 0.5 for i in range(len(s.sigmas))]
    p2p = PromptToPrompt(_targets(tokenizer, REFINE, "refine", (0.0, 0.8)), self_window=(0.0, 0.4),
                         self_max_tokens=32 * 32)
    s.x = trajectory[0][None]
    ours, theirs = [], []
    s.pack(unet, [p2p], pair=PairSchedule(tuple(s.sigmas), "direct", trajectory), trace=ours)
    ref.direct_p2p_reference(unet, tokenizer, REFINE, s.conds, s.uncond, alpha_space, s.timesteps, s.alphas, CFG,
                             edit="refine", cross_replace_steps=0.8, self_replace_steps=0.4, self_max_tokens=32 * 32,
                             trace=theirs)
    assert_same_trace(ours, theirs)
