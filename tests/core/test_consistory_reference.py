"""Reference equivalence of ConsiStory's subject-driven self-attention: the pack's ConsistentSubject on the diffusers
adapter against a plain loop of the official algorithm (tests/support/reference_consistory.py: the AttentionStore's
maps of the last 20 steps, scikit-image's Otsu per token, the dropout, the official processor's loop over rows
with masked keys), on a separate copy of the same tiny SD1.5-layout UNet.

Three images, each with its own prompt (random contexts whose subject token sits at a different position in
each), their own noise, CFG. The pack samples ComfyUI's way ([cond images, uncond images], Euler in sigma space),
the reference the official way ([uncond, cond], DDIM in the alpha parameterisation); the two loops alone agree to
about 3e-6 of the latents' scale in float32. A 32x32 latent: the maps' grid is then 8x8 (the 1/4-resolution
layers) and the decoder's self-attention grids 8, 16 and 32; nothing depends on the resolution.
"""
import copy

import pytest
import torch

from editkit.core import schedule
from editkit.core.attention import BatchLayout
from editkit.core.consistory import ConsistentSubject, dropout_seed
from editkit.core.prompt2prompt import PromptKeys

pytest.importorskip("diffusers")
pytest.importorskip("skimage")

from editkit.core.diffusers_adapter import DiffusersAttentionAdapter  # noqa: E402
from support import reference_consistory as ref  # noqa: E402
from support.pair_sampling import ddim_schedule  # noqa: E402
from support.tiny_models import make_diffusers_unet  # noqa: E402

IMAGES = 3
HW = (32, 32)
MAP_GRID = (8, 8)
DECODER_GRIDS = [(8, 8), (16, 16), (32, 32)]
DECODER = tuple(range(7, 16))
SUBJECT_AT = (2, 4, 6)          # the subject token's position in each image's prompt
CFG = 5.0
TOLERANCE = 1e-5        # relative to the scale; the two loops alone differ by about 2e-6
MOVES = 30 * TOLERANCE


@pytest.fixture(scope="module")
def unet():
    return make_diffusers_unet(seed=0, heads=2)


@pytest.fixture(scope="module")
def reference_unet(unet):
    return copy.deepcopy(unet)


def _randn(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).float()


def _contexts():
    """(conds (3, 77, 32), uncond (1, 77, 32)): the subject token is one shared vector, at its own place in each."""
    conds = _randn(IMAGES, 77, 32, seed=11)
    subject = _randn(32, seed=12) * 3
    for i, at in enumerate(SUBJECT_AT):
        conds[i, at] = subject
    return conds, _randn(1, 77, 32, seed=13)


def _controller(**settings):
    keys = tuple((PromptKeys(77, (at,)),) for at in SUBJECT_AT)
    return ConsistentSubject(keys=keys, layers=DECODER, **settings)


def _keep(seed, dropout):
    """The documented dropout draw: a generator seeded from (seed, step, grid), uniform draws, kept >= dropout."""
    def keep(step, grid, images):
        g = torch.Generator().manual_seed(dropout_seed(seed, step, grid))
        return torch.rand(images, grid[0] * grid[1], generator=g, dtype=torch.float64) >= dropout
    return keep


@torch.no_grad()
def _pack_sample(unet, controllers, x_T, timesteps, sigmas, trace=None):
    conds, uncond = _contexts()
    context = torch.cat([conds, uncond.expand(IMAGES, -1, -1)])
    x = x_T * (sigmas[0] ** 2 + 1.0) ** 0.5
    adapter = DiffusersAttentionAdapter(unet, controllers).install()
    try:
        with adapter.run(len(timesteps), HW, BatchLayout(("cond", "uncond"), IMAGES)) as session:
            for i, t in enumerate(timesteps):
                sigma = sigmas[i]
                session.step, session.sigma = i, sigma
                scaled = x / (sigma ** 2 + 1.0) ** 0.5
                eps_c, eps_u = unet(torch.cat([scaled, scaled]), t, encoder_hidden_states=context).sample.chunk(2)
                denoised = x - sigma * (eps_u + CFG * (eps_c - eps_u))
                x = schedule.euler_sigma_step(x, (x - denoised) / sigma, sigma, sigmas[i + 1]) \
                    if sigmas[i + 1] > 0 else denoised
                if trace is not None:
                    trace.append(x / (sigmas[i + 1] ** 2 + 1.0) ** 0.5)
    finally:
        adapter.uninstall()
    return x


def _reference_sample(reference_unet, x_T, timesteps, sigmas, seed, dropout, anchors=0, trace=None):
    readable = torch.ones(IMAGES, IMAGES, dtype=torch.bool)
    if anchors:   # the official create_anchor_mapping: the diagonal and the anchors' columns
        readable = torch.eye(IMAGES, dtype=torch.bool)
        readable[:, :anchors] = True
    store = ref.SubjectStore(IMAGES, [[at] for at in SUBJECT_AT], MAP_GRID, _keep(seed, dropout), readable)
    ref.install(reference_unet, store, lambda layer, part: part == "up")
    conds, uncond = _contexts()
    alphas = [1.0 / (1.0 + s * s) for s in sigmas]
    return ref.sample(reference_unet, store, x_T, conds, uncond, timesteps, alphas, CFG, DECODER_GRIDS, trace), store


def _relative(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def loop():
    timesteps, sigmas = ddim_schedule(4)
    return {"timesteps": timesteps, "sigmas": sigmas, "x_T": _randn(IMAGES, 4, *HW, seed=3)}


@pytest.fixture(scope="module")
def plain(unet, loop):
    return _pack_sample(unet, [], loop["x_T"], loop["timesteps"], loop["sigmas"])


CASES = {
    # name: (settings of the pack, the reference's dropout, its anchors)
    "paper_dropout": ({"dropout": 0.5, "seed": 7}, 0.5, 0),
    "no_dropout": ({"dropout": 0.0}, 0.0, 0),
    "one_anchor": ({"dropout": 0.5, "seed": 3, "anchors": 1}, 0.5, 1),
}


@pytest.mark.parametrize("name", list(CASES))
def test_sampling_loop_against_the_official_algorithm(unet, reference_unet, loop, plain, name):
    settings, dropout, anchors = CASES[name]
    ours, theirs = [], []
    _pack_sample(unet, [_controller(**settings)], loop["x_T"], loop["timesteps"], loop["sigmas"], ours)
    _, store = _reference_sample(reference_unet, loop["x_T"], loop["timesteps"], loop["sigmas"],
                                 settings.get("seed", 0), dropout, anchors, theirs)
    for grid, mask in store.masks.items():   # partial masks, so the keys are really selected
        assert 0 < mask.float().mean() < 1, f"the reference's last mask at {grid} is all or nothing"
    for i, (a, b) in enumerate(zip(ours, theirs)):
        error = _relative(a, b)
        assert error <= TOLERANCE, f"step {i}: pack and reference differ by {error:.3g} of the scale ({name})"
    assert _relative(ours[-1], plain) > MOVES, "sharing the subject does not change the images: the test shows nothing"
