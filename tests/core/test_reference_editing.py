"""Self-checks of the plain reference implementations in ``support.reference_editing``.

They check the references against facts that follow from the official algorithms (token tables worked out by
hand, edits that must leave the source untouched, controls that reduce to plain DDIM), on the tiny 2-head
SD1.5-layout UNet with 2 sampling steps. Prompt-to-Prompt runs at a 64x64 latent (its rules depend on the token
counts of SD1.5 at 512 px: 16x16 blend maps, self-attention replaced up to 16x16 queries); the checks whose
outcome does not depend on the resolution run at 32x32 to keep the file cheap on a CPU, those comparing runs of
different batch composition in float64 so that they can be tight.
"""
import pytest
import torch

from support import reference_editing as R
from support.clip_tokens import sd1_tokenizer
from support.tiny_models import make_diffusers_unet

STEPS = 2
GUIDANCE = 4.0


def _schedule(steps):
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1 - betas, 0)
    timesteps = [999 - i * (1000 // steps) for i in range(steps)]
    return timesteps, [float(alpha_bar[t]) for t in timesteps] + [1.0]


TIMESTEPS, ALPHAS = _schedule(STEPS)


def _randn(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _ctx(seed):
    return _randn(seed, 1, 77, 32)


SMALL = 32      # latent size of the resolution-independent checks


def _close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(1.0, b.abs().max().item()))


@pytest.fixture(scope="module")
def unet():
    return make_diffusers_unet(seed=0, heads=2)


@pytest.fixture(scope="module")
def unet64():
    return make_diffusers_unet(seed=0, heads=2).double()


@pytest.fixture(scope="module")
def tok():
    return sd1_tokenizer()


# ---------------------------------------------------------------------------------------------------------------
# DDIM step (no UNet)
# ---------------------------------------------------------------------------------------------------------------

def test_ddim_step_matches_the_diffusers_scheduler():
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    sched.set_timesteps(10)
    x, eps = _randn(1, 1, 4, 8, 8), _randn(2, 1, 4, 8, 8)
    for t in sched.timesteps:
        prev = int(t) - 1000 // 10
        a = float(sched.alphas_cumprod[int(t)])
        a_prev = float(sched.alphas_cumprod[prev]) if prev >= 0 else float(sched.final_alpha_cumprod)
        expected = sched.step(eps, t, x).prev_sample
        _close(R.ddim_step(x, eps, a, a_prev), expected, tol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# token tables and schedules (no UNet)
# ---------------------------------------------------------------------------------------------------------------

def test_refinement_map_for_an_inserted_word(tok):
    mapper, alphas = R.refinement_token_map("a cat riding a bicycle", "a cat riding a red bicycle", tok)
    # source: [SOT a cat riding a bicycle EOT]; target: [SOT a cat riding a red bicycle EOT]
    assert mapper[:8].tolist() == [0, 1, 2, 3, 4, -1, 5, 6]
    assert mapper[8:].tolist() == list(range(8, 77))          # padding key j reads source key j
    expected = torch.ones(77)
    expected[5] = 0.0                                          # "red" is new
    assert torch.equal(alphas, expected)


def test_refinement_map_for_identical_prompts_is_identity(tok):
    mapper, alphas = R.refinement_token_map("a photo of a cat", "a photo of a cat", tok)
    assert mapper.tolist() == list(range(77))
    assert torch.equal(alphas, torch.ones(77))


def test_swap_map_with_a_multi_token_word(tok):
    assert tok.encode("a corgidog")[1:-1] == [320, 851, 707, 1929]      # a, cor, gi, dog
    m = R.swap_token_map("a cat", "a corgidog", tok)
    expected = torch.zeros(77, 77)
    expected[0, 0] = expected[1, 1] = 1.0
    expected[2, 2] = expected[2, 3] = expected[2, 4] = 1.0 / 3.0      # "cat" spread over the 3 target tokens
    expected[3, 5] = 1.0                                               # end token: source 3 -> target 5 (bug fix)
    for j in range(6, 77):
        expected[j, j] = 1.0                                           # padding keys
    torch.testing.assert_close(m, expected, rtol=0, atol=0)

    back = R.swap_token_map("a corgidog", "a cat", tok)
    expected = torch.zeros(77, 77)
    expected[0, 0] = expected[1, 1] = 1.0
    expected[2, 2] = expected[3, 2] = expected[4, 2] = 1.0              # ratio 1 / (1 target token)
    expected[5, 3] = 1.0
    for j in range(4, 77):
        expected[j, j] = 1.0
    torch.testing.assert_close(back, expected, rtol=0, atol=0)


def test_swap_map_with_equal_token_counts_and_word_count_check(tok):
    assert torch.equal(R.swap_token_map("a cat riding a bicycle", "a dog riding a bicycle", tok), torch.eye(77))
    with pytest.raises(ValueError):
        R.swap_token_map("a cat", "a big cat", tok)


def test_word_indices_windows_and_equalizer(tok):
    assert R.word_token_indices("a photo of a corgidog", "corgidog", tok) == [5, 6, 7]
    assert R.word_token_indices("a cat and a cat", "cat", tok) == [2, 5]
    assert R.word_token_indices("a cat", "dog", tok) == []

    prompts = ["a cat riding a bicycle", "a cat riding a red bicycle"]
    table = R.time_word_alpha(prompts, 4, {"default_": 0.5, "red": (0.25, 1.0)}, tok)
    assert table.shape == (5, 1, 1, 1, 77)
    t = table[:, 0, 0, 0]
    other = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0])            # rows int(0 * 5) .. int(0.5 * 5) - 1
    red = torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0])              # rows int(0.25 * 5) .. int(1.0 * 5) - 1
    for j in range(77):
        assert torch.equal(t[:, j], red if j == 5 else other), j
    assert R.self_replace_window(4, 0.6) == (0, 2)
    assert R.self_replace_window(4, (0.25, 0.75)) == (1, 3)

    eq = R.equalizer_table(["a cat riding a bicycle", "a dog riding a bicycle"], {"cat": 2.0, "bicycle": 0.5}, tok)
    assert eq.shape == (2, 77)
    assert eq[0, 2] == 2.0 and eq[0, 5] == 0.5 and eq[1, 2] == 1.0 and eq[1, 5] == 0.5
    assert (eq[:, [0, 1, 3, 4, 6]] == 1).all()


# ---------------------------------------------------------------------------------------------------------------
# editing runs (tiny UNet, 64x64 latents, 2 steps)
# ---------------------------------------------------------------------------------------------------------------

def test_p2p_leaves_the_source_and_an_identical_copy_alone_and_edits_the_target(unet, tok):
    # items: source, an identical copy of it (same prompt and context), an edited target
    prompts = ["a cat riding a bicycle", "a cat riding a bicycle", "a cat riding a red bicycle"]
    conds = [_ctx(1), _ctx(1), _ctx(2)]
    uncond = _ctx(0)
    x_T = _randn(10, 1, 4, 64, 64)
    trace = []
    out = R.p2p_reference(unet, tok, prompts, conds, uncond, x_T, TIMESTEPS, ALPHAS, GUIDANCE, edit="reweight",
                          prev="refine", equalizer={"red": 2.0}, cross_replace_steps={"default_": 1.0, "red": 0.5},
                          self_replace_steps=(0.0, 1.0),
                          local_blend=dict(words=[["cat"], ["cat"], ["cat"]], subtract_words=[["bicycle"]] * 3,
                                           threshold=(0.3, 0.3), start_blend=0.5), trace=trace)
    assert out.shape == (3, 4, 64, 64)
    assert len(trace) == STEPS and torch.equal(trace[-1], out)
    _close(out[1], out[0])
    unedited = R.ddim_cfg_reference(unet, [conds[0], conds[2]], uncond, x_T.expand(2, -1, -1, -1), TIMESTEPS,
                                    ALPHAS, GUIDANCE)
    _close(out[:1], unedited[:1], tol=1e-4)          # float32, a batch of 6 rows against a batch of 4
    assert (out[2] - out[0]).abs().max() > 1e-2
    assert (out[2] - unedited[1]).abs().max() > 1e-2   # the target is not just sampled with its own prompt
    # local blend from the second step on (counter 2 > int(0.5 * 2)): the target keeps the source's values
    # outside the mask, and the mask is neither empty nor full
    same = (trace[1][2] - trace[1][0]).abs().amax(0) < 1e-6
    assert 0 < same.float().mean() < 1
    assert not ((trace[0][2] - trace[0][0]).abs().amax(0) < 1e-6).any()


def test_masactrl_after_the_last_step_is_plain_ddim(unet):
    conds = [_ctx(1), _ctx(2)]
    uncond = _ctx(0)
    x_T = torch.cat([_randn(10, 1, 4, SMALL, SMALL), _randn(11, 1, 4, SMALL, SMALL)])
    plain = R.ddim_cfg_reference(unet, conds, uncond, x_T, TIMESTEPS, ALPHAS, GUIDANCE)
    late = R.masactrl_reference(unet, conds, uncond, x_T, TIMESTEPS, ALPHAS, GUIDANCE, start_step=STEPS,
                                start_layer=0, mode="plain")
    _close(late, plain)
    # edited from the first step: the source attends to itself (unchanged), the target to the source
    edited = R.masactrl_reference(unet, conds, uncond, x_T, TIMESTEPS, ALPHAS, GUIDANCE, start_step=0,
                                  start_layer=0, mode="plain")
    _close(edited[:1], plain[:1])
    assert (edited[1] - plain[1]).abs().max() > 1e-2


@pytest.mark.parametrize("mode", ["union", "mask", "mask_auto"])
def test_masactrl_variants_leave_the_source_alone(unet, mode):
    conds = [_ctx(1), _ctx(2)]
    uncond = _ctx(0)
    x_T = torch.cat([_randn(10, 1, 4, SMALL, SMALL), _randn(11, 1, 4, SMALL, SMALL)])
    plain = R.ddim_cfg_reference(unet, conds, uncond, x_T, TIMESTEPS, ALPHAS, GUIDANCE)
    masks = {}
    if mode == "mask":
        masks = dict(mask_s=(_randn(3, 16, 16) > 0).float(), mask_t=(_randn(4, 16, 16) > 0).float())
    kw = dict(layer_idx=[3, 4, 5, 9, 10, 11, 14], ref_token_idx=[1, 2], cur_token_idx=[2], thres=0.3)
    out = R.masactrl_reference(unet, conds, uncond, x_T, TIMESTEPS, ALPHAS, GUIDANCE, start_step=0, mode=mode,
                               **kw, **masks)
    plain_ctrl = R.masactrl_reference(unet, conds, uncond, x_T, TIMESTEPS, ALPHAS, GUIDANCE, start_step=0,
                                      mode="plain", **kw)
    _close(out[:1], plain[:1])
    assert (out[1] - plain[1]).abs().max() > 1e-2
    assert (out[1] - plain_ctrl[1]).abs().max() > 1e-3      # the variant differs from plain MasaCtrl


def test_pnp_without_injection_is_plain_cfg_ddim(unet64):
    cond, negative, source_context = (_ctx(s).double() for s in (1, 2, 0))
    source_latents = [_randn(20 + i, 1, 4, SMALL, SMALL).double() for i in range(STEPS)]
    x_T = _randn(10, 1, 4, SMALL, SMALL).double()
    out = R.pnp_reference(unet64, source_latents, source_context, cond, negative, TIMESTEPS, ALPHAS, GUIDANCE,
                          pnp_f_t=0.0, pnp_attn_t=0.0, x_T=x_T)
    plain = R.ddim_cfg_reference(unet64, [cond], negative, x_T, TIMESTEPS, ALPHAS, GUIDANCE)
    assert out.shape == (1, 4, SMALL, SMALL) and out.dtype == torch.float64
    _close(out, plain, tol=1e-10)
    injected = R.pnp_reference(unet64, source_latents, source_context, cond, negative, TIMESTEPS, ALPHAS, GUIDANCE,
                               pnp_f_t=0.5, pnp_attn_t=0.5, x_T=x_T)
    assert (injected - plain).abs().max() > 1e-3


def test_direct_inversion_source_row_follows_the_inversion(unet64, tok):
    prompts = ["a cat riding a bicycle", "a corgidog riding a bicycle"]
    conds = [_ctx(1).double(), _ctx(2).double()]
    uncond = _ctx(0).double()
    inversion = [(_randn(30 + i, 1, 4, SMALL, SMALL) * (1 - ALPHAS[i]) ** 0.5 + 0.1 * i).double()
                 for i in range(STEPS + 1)]
    trace = []
    out = R.direct_p2p_reference(unet64, tok, prompts, conds, uncond, inversion, TIMESTEPS, ALPHAS, GUIDANCE,
                                 edit="replace", cross_replace_steps=0.4, self_replace_steps=0.6, trace=trace)
    for i in range(STEPS):
        _close(trace[i][:1], inversion[i + 1], tol=1e-10)
    _close(out[:1], inversion[-1], tol=1e-10)
    # the source row alone (no offsets) would not land there, and the target is edited
    free = R.ddim_cfg_reference(unet64, [conds[0]], uncond, inversion[0], TIMESTEPS, ALPHAS, GUIDANCE)
    assert (free - inversion[-1]).abs().max() > 1e-2
    assert (out[1] - out[0]).abs().max() > 1e-2
