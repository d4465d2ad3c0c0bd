"""Reference equivalence of keyframe (cross-frame) attention: the pack's KeyframeAttention on the diffusers
adapter against plain attention processors written from the papers (tests/support/reference_keyframe.py:
Text2Video-Zero's cross-frame attention, Pix2Video's first-and-previous-frame attention in the decoder,
FateZero's middle frame, shared attention over all frames, fixed keyframes), installed on a separate copy of
the same tiny SD1.5-layout UNet with `set_attn_processor`.

Batches are F = 4 frames, each with its own noise (frames that start alike stay alike under cross-frame
attention, and the test would show nothing), one prompt for the video, classifier-free guidance as two chunks
of F rows. The pack side is given the batch the way each host orders it: [uncond frames, cond frames] (the
official diffusers pipelines) for the single passes, [cond frames, uncond frames] (ComfyUI) with Euler in sigma
space in the sampling loops, whose reference is DDIM in the alpha parameterisation on [uncond, cond] (the two
loops alone, in float32, agree to about 3e-6 of the latents' scale).

Sizes: one UNet call of 8 rows at a 64x64 latent takes about 3 s on one CPU thread with PyTorch's fused
attention, and the reference's written-out softmax several times that, so the sweep of modes and the sampling
loops run at a 32x32 latent (tokens 1024, 256, 64, 16); one test runs Pix2Video at a 64x64 latent (SD1.5's token
counts at 512 px: 4096 at the outer layers, 8192 keys there for frames 1-3) with the conditional chunk only.
Nothing in KeyframeAttention depends on the resolution. Tolerance: 1e-5 of the output's scale in float32; every
feature moves the output by far more (asserted, so each test can fail).
"""
import copy

import pytest
import torch

from editkit.core import schedule
from editkit.core.attention import BatchLayout
from editkit.core.keyframe import KeyframeAttention
from support import reference_keyframe as ref

pytest.importorskip("diffusers")

from editkit.core.diffusers_adapter import DiffusersAttentionAdapter  # noqa: E402
from support.pair_sampling import ddim_schedule  # noqa: E402
from support.tiny_models import make_diffusers_unet  # noqa: E402

FRAMES = 4
HW = (32, 32)
TIMESTEP = 500
CFG = 5.0
TOLERANCE = 1e-5        # relative to the scale of what is compared
MOVES = 100 * TOLERANCE  # the least change a feature must make for its test to mean something
DECODER = tuple(range(7, 16))   # SD1.5's transformer layers in up_blocks (0-5 encoder, 6 middle)

# name -> (the pack's controller, the reference's sources, the reference's layers, frames that read only
# themselves at every acting layer and so keep their plain output)
CASES = {
    "first": (KeyframeAttention(mode="first"), ref.text2video_zero, None, [0]),
    "first_and_previous": (KeyframeAttention(mode="first_and_previous", layers=DECODER), ref.pix2video,
                           lambda layer, part: part == "up", [0]),
    "middle": (KeyframeAttention(mode="middle"), ref.fatezero_middle, None, [FRAMES // 2]),
    "all": (KeyframeAttention(mode="all"), ref.every_frame, None, []),
    "indices": (KeyframeAttention(mode="indices", indices=(3, 1)), ref.fixed_keyframes(3, 1), None, []),
    "first_at_layers": (KeyframeAttention(mode="first", layers=(3, 6, 12)), ref.text2video_zero,
                        lambda layer, part: layer in (3, 6, 12), [0]),
}


@pytest.fixture(scope="module")
def unet():
    return make_diffusers_unet(seed=0, heads=2)


@pytest.fixture(scope="module")
def reference_unet(unet):
    """The same weights on their own module, which only ever runs the reference processors."""
    return copy.deepcopy(unet)


def _randn(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).float()


def _contexts():
    """(uncond, cond), each (1, 77, 32): one prompt for every frame."""
    return _randn(1, 77, 32, seed=1), _randn(1, 77, 32, seed=2)


def _rows(context, n):
    return context.expand(n, -1, -1)


def _batch(hw, chunks=("uncond", "cond")):
    """Frames with their own noise, once per CFG chunk, and the chunks' contexts in the same order."""
    frames = _randn(FRAMES, 4, *hw, seed=0)
    uncond, cond = _contexts()
    by_branch = {"uncond": uncond, "cond": cond}
    return torch.cat([frames] * len(chunks)), torch.cat([_rows(by_branch[c], FRAMES) for c in chunks])


@torch.no_grad()
def _pack_pass(unet, controller, x, context, layout, hw):
    adapter = DiffusersAttentionAdapter(unet, [controller]).install()
    try:
        with adapter.run(1, hw, layout) as session:
            session.step = 0
            return unet(x, TIMESTEP, encoder_hidden_states=context).sample
    finally:
        adapter.uninstall()


@torch.no_grad()
def _reference_pass(reference_unet, sources, layers, x, context, written_out_everywhere=False):
    ref.install(reference_unet, FRAMES, sources, layers or (lambda layer, part: True), written_out_everywhere)
    return reference_unet(x, TIMESTEP, encoder_hidden_states=context).sample


def _relative(a, b, scale):
    return ((a - b).abs().max() / scale.abs().max()).item()


def assert_same(pack, reference, where=""):
    error = _relative(pack, reference, reference)
    assert error <= TOLERANCE, f"pack and reference differ by {error:.3g} of the output's scale{where}"


def assert_moves(changed, plain, what):
    change = _relative(changed, plain, plain)
    assert change > MOVES, f"{what} changes the output by only {change:.3g} of its scale; the test shows nothing"


@pytest.fixture(scope="module")
def single_pass(unet):
    """The batch [uncond frames, cond frames] at one timestep, diffusers' own attention on it, and a cache of
    the pack's outputs by case."""
    x, context = _batch(HW)
    with torch.no_grad():
        plain = unet(x, TIMESTEP, encoder_hidden_states=context).sample
    return {"x": x, "context": context, "plain": plain, "pack": {}}


def _pack_case(unet, single_pass, name):
    cache = single_pass["pack"]
    if name not in cache:
        cache[name] = _pack_pass(unet, CASES[name][0], single_pass["x"], single_pass["context"],
                                 BatchLayout(("uncond", "cond"), FRAMES), HW)
    return cache[name]


def test_the_reference_layers_are_sd15s(unet):
    layers = ref.transformer_layers(unet)
    assert sorted({(layer, part) for layer, part, _ in layers.values()}) == \
        [(i, "down") for i in range(6)] + [(6, "mid")] + [(i, "up") for i in DECODER]
    assert len(layers) == 32


def test_the_reference_attention_is_diffusers_attention(reference_unet, single_pass):
    """The reference processors with no keyframes reproduce the UNet's own attention: what they add in the
    other tests is the cross-frame reading alone."""
    plain = _reference_pass(reference_unet, None, None, single_pass["x"], single_pass["context"],
                            written_out_everywhere=True)
    assert_same(plain, single_pass["plain"])


@pytest.mark.parametrize("name", list(CASES))
def test_one_call_on_cfg_chunks_of_frames(unet, reference_unet, single_pass, name):
    _, sources, layers, own_frames = CASES[name]
    pack = _pack_case(unet, single_pass, name)
    reference = _reference_pass(reference_unet, sources, layers, single_pass["x"], single_pass["context"])
    assert_same(pack, reference, f" ({name})")
    assert_moves(pack, single_pass["plain"], name)
    # a frame that reads only itself (Pix2Video's frame 0 reads [itself, itself]) keeps its plain output
    for frame in own_frames:
        for row in (frame, FRAMES + frame):
            assert_same(pack[row], single_pass["plain"][row], f" ({name}, frame {frame} against plain attention)")
    if name == "first_at_layers":   # the layers option matters: not the same as every layer
        assert_moves(pack, _pack_case(unet, single_pass, "first"), "restricting the layers")


def test_pix2video_at_sd15_token_counts(unet, reference_unet):
    """A 64x64 latent (4096 tokens at the outer decoder layers, whose frames 1-3 read 8192 keys), a batch of
    the conditional chunk only."""
    hw = (64, 64)
    x, context = _batch(hw, chunks=("cond",))
    controller, sources, layers, _ = CASES["first_and_previous"]
    pack = _pack_pass(unet, controller, x, context, BatchLayout(("cond",), FRAMES), hw)
    reference = _reference_pass(reference_unet, sources, layers, x, context)
    assert_same(pack, reference)
    with torch.no_grad():   # plain attention keeps the rows apart: frames 0 and 1 suffice
        plain = unet(x[:2], TIMESTEP, encoder_hidden_states=context[:2]).sample
    assert_same(pack[0], plain[0], " (frame 0 against plain attention)")
    assert_moves(pack[1], plain[1], "Pix2Video at 64x64 (frame 1)")


# ---- sampling loops ------------------------------------------------------------------------------------------

@torch.no_grad()
def _pack_sample(unet, controller, x_T, timesteps, sigmas, trace):
    """Euler in sigma space (= DDIM) with CFG over [cond frames; uncond frames], ComfyUI's row order."""
    uncond, cond = _contexts()
    context = torch.cat([_rows(cond, FRAMES), _rows(uncond, FRAMES)])
    x = x_T * (sigmas[0] ** 2 + 1.0) ** 0.5
    adapter = DiffusersAttentionAdapter(unet, [controller]).install()
    try:
        with adapter.run(len(timesteps), HW, BatchLayout(("cond", "uncond"), FRAMES)) as session:
            for i, t in enumerate(timesteps):
                sigma = sigmas[i]
                session.step, session.sigma = i, sigma
                scaled = x / (sigma ** 2 + 1.0) ** 0.5
                eps_c, eps_u = unet(torch.cat([scaled, scaled]), t, encoder_hidden_states=context).sample.chunk(2)
                denoised = x - sigma * (eps_u + CFG * (eps_c - eps_u))
                x = schedule.euler_sigma_step(x, (x - denoised) / sigma, sigma, sigmas[i + 1]) \
                    if sigmas[i + 1] > 0 else denoised
                trace.append(x / (sigmas[i + 1] ** 2 + 1.0) ** 0.5)
    finally:
        adapter.uninstall()


LOOP_STEPS = 3
LOOPS = {
    # name: (case, the pack's window (start, end), the reference's acting steps (first, last + 1))
    "text2video_zero": ("first", (0.0, 1.0), (0, LOOP_STEPS)),
    # steps int(0.4 * 3) = 1 to int(0.7 * 3) - 1 = 1: plain attention before and after, both edges checked
    "pix2video_in_a_window_of_steps": ("first_and_previous", (0.4, 0.7), (1, 2)),
}


@pytest.fixture(scope="module")
def loop():
    """The schedule (DDIM timesteps from 999 to 0, their sigmas and alpha-bars, then 0 and 1) and the frames'
    starting noise in the alpha parameterisation."""
    timesteps, sigmas = ddim_schedule(LOOP_STEPS)
    alphas = [1.0 / (1.0 + s * s) for s in sigmas]
    return {"timesteps": timesteps, "sigmas": sigmas, "alphas": alphas, "x_T": _randn(FRAMES, 4, *HW, seed=3)}


@pytest.fixture(scope="module")
def plain_loop(unet, loop):
    """The final latents of the same sampling with diffusers' own attention, which every feature must move."""
    uncond, cond = _contexts()
    return ref.sample(unet, loop["x_T"], cond, uncond, loop["timesteps"], loop["alphas"], CFG)


@pytest.mark.parametrize("name", list(LOOPS))
def test_sampling_loop(unet, reference_unet, loop, plain_loop, name):
    case, (start, end), window = LOOPS[name]
    base, sources, layers, _ = CASES[case]
    controller = KeyframeAttention(mode=base.mode, indices=base.indices, layers=base.layers, start=start, end=end)
    uncond, cond = _contexts()
    ours, theirs = [], []
    _pack_sample(unet, controller, loop["x_T"], loop["timesteps"], loop["sigmas"], ours)
    acting = ref.install(reference_unet, FRAMES, sources, layers or (lambda layer, part: True))
    ref.sample(reference_unet, loop["x_T"], cond, uncond, loop["timesteps"], loop["alphas"], CFG, acting, window,
               theirs)
    assert len(ours) == len(theirs) == LOOP_STEPS
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert_same(a, b, f" after step {i} ({name})")
    assert_moves(ours[-1], plain_loop, name)
