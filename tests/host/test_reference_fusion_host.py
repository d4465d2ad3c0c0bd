"""The LatentFuser inside ComfyUI against the official algorithms (tests/support/reference_fusion.py): the node's
MODEL, sampled by ComfyUI's own ddim sampler on the tiny model, equals a plain loop of the official MultiDiffusion
(panorama, diffusers' circular padding, region prompts with and without bootstrapping) on the diffusers UNet that
holds the same weights.

This checks what the references' self-checks (tests/core/test_reference_fusion.py) cannot: how the node lays out
and batches its windows, fuses the windows' predictions inside ComfyUI's evaluation, turns the region prompts and
their masks into per-prompt rows and weights, and noises the bootstrapping colours in ComfyUI's sigma space.

A 16x40 latent (128x320 px) with windows of 16 latents (128 px, the tiny model's size) and a stride of 8: four
windows, or five all around with circular padding; (40 - 16) is a multiple of 8, so the official floor layout
and the node's edge-aligned one coincide. The schedule is ComfyUI's `simple`: it starts at sigma_max, where
ComfyUI scales the noise to unit variance in the model's input space, so the sampler's initial latent is the
official x_T = randn. Bootstrapping is also run on `ddim_uniform`, which starts below sigma_max, where ComfyUI
starts from sigma times its unit noise: the official noises the colours with its x_T, the starting latent as the
model's input sees it, so the node must too (not with the sampler's unit noise). Float32 on both sides, with two
UNet implementations: agreement to 1e-4 of the latents' scale, where every departure the tests guard against
moves the result by far more.
"""
import math

import pytest
import torch

from support import reference_fusion as ref
from support.comfy_host import encode

SIZE = (16, 40)           # latents: 128 x 320 px
WINDOW_PX, STRIDE_PX = 128, 64
WINDOW, STRIDE = 16, 8    # latents (the tiny model's latent pixel is 8 px)
WINDOW_BATCH = 3          # fewer than the windows: a full batch and a partial one
STEPS = 6
CFG = 5.0
TOLERANCE = 1e-4
BACKGROUND, NEGATIVE = "a mountain landscape", "blurry"
REGION_PROMPTS = ("a red car", "a blue sky with clouds")
NOISE_SEED, SAMPLER_SEED, COLOUR_SEED = 0, 5, 3
BOOTSTRAP = 0.5           # int(0.5 * 6) = 3 bootstrapped steps


@pytest.fixture(scope="module")
def reference_unet(host):
    pytest.importorskip("diffusers")
    from support.tiny_models import make_diffusers_unet
    return make_diffusers_unet(seed=0)   # the weights of the tiny ComfyUI model


def _context(clip, text):
    return encode(clip, text)[0][0]


def _fuser(model, circular=False, regions=None, bootstrap=0.0, vae=None):
    from editkit.nodes.latent_fuser import LatentFuserNode
    return LatentFuserNode.execute(model, WINDOW_PX, STRIDE_PX, WINDOW_BATCH, circular, {"mode": "multidiffusion"},
                                   bootstrap, COLOUR_SEED, regions=regions, vae=vae).result[0]


def _region(clip, text, mask):
    from editkit.nodes.latent_fuser import RegionPrompt
    return RegionPrompt.execute(encode(clip, text), mask).result[0]


def _sigmas(model, scheduler="simple"):
    import comfy.samplers
    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, STEPS).cpu()


def _schedule(model, sigmas):
    """(timesteps, alphas) of a ComfyUI schedule, for the reference's DDIM."""
    model_sampling = model.get_model_object("model_sampling")
    timesteps = [int(round(float(model_sampling.timestep(s)))) for s in sigmas[:-1]]
    alphas = [1.0 / (1.0 + float(s) ** 2) for s in sigmas]
    return timesteps, alphas


def _initial(model, sigmas, noise):
    """The reference's x_T: ComfyUI's initial latent (its noise scaling of an empty latent, as KSAMPLER.sample does
    it) in the model's input space (times sqrt(alpha-bar))."""
    model_sampling = model.get_model_object("model_sampling")
    sigma, sigma_max = float(sigmas[0]), float(model_sampling.sigma_max)
    max_denoise = math.isclose(sigma_max, sigma, rel_tol=1e-05) or sigma > sigma_max   # KSAMPLER.max_denoise
    start = model_sampling.noise_scaling(sigmas[:1], noise.clone(), torch.zeros_like(noise), max_denoise)
    return start * (1.0 / (1.0 + sigma ** 2)) ** 0.5


def _sample(model, clip, noise, sigmas):
    """The fuser MODEL sampled by ComfyUI's ddim with a CFG guider, in the model's latent space."""
    import comfy.samplers
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(encode(clip, BACKGROUND), encode(clip, NEGATIVE))
    guider.set_cfg(CFG)
    latent = torch.zeros(1, 4, *SIZE)
    out = guider.sample(noise, latent, comfy.samplers.sampler_object("ddim"), sigmas, disable_pbar=True,
                        seed=SAMPLER_SEED)
    return model.model.latent_format.process_in(out)


def _error(ours, expected):
    return (ours - expected).abs().max().item()


def assert_close(ours, expected):
    scale = expected.abs().max().item()
    error = _error(ours, expected)
    assert error <= TOLERANCE * scale, f"node and reference differ by {error:.3g} (latents of scale {scale:.3g})"


def assert_apart(a, b, factor=100.0):
    """`a` and `b` differ by far more than the tolerance: a test comparing them would fail."""
    scale = b.abs().max().item()
    assert _error(a, b) > factor * TOLERANCE * scale, f"results too close: {_error(a, b):.3g} (scale {scale:.3g})"


def _setup(tiny, scheduler):
    model, clip, vae = tiny
    sigmas = _sigmas(model, scheduler)
    timesteps, alphas = _schedule(model, sigmas)
    assert alphas[-1] == 1.0
    noise = torch.randn(1, 4, *SIZE, generator=torch.Generator().manual_seed(NOISE_SEED))
    return dict(model=model, clip=clip, vae=vae, sigmas=sigmas, timesteps=timesteps, alphas=alphas, noise=noise,
                x_T=_initial(model, sigmas, noise), cond=_context(clip, BACKGROUND), uncond=_context(clip, NEGATIVE))


@pytest.fixture(scope="module")
def setup(tiny):
    s = _setup(tiny, "simple")
    assert s["timesteps"][0] == 999
    return s


def _masks():
    """Two region masks at the image's pixel size: overlapping (rows 32.., columns 144..191 px), some pixels
    covered by the background only (columns ..47 px and 280.. px), and values that binarise at 0.5 both ways on
    whole 8x8 blocks (nearest resizing picks one pixel per block)."""
    h, w = 8 * SIZE[0], 8 * SIZE[1]
    a = torch.zeros(h, w)
    a[:, 48:192] = 1.0
    a[:, 48:96] = 0.7            # -> 1
    a[64:, 160:192] = 0.3        # -> 0
    b = torch.zeros(h, w)
    b[32:, 144:280] = 1.0
    b[32:, 240:264] = 0.51       # -> 1
    b[32:, 264:280] = 0.5        # -> 1, as the official `mask >= 0.5`
    b[:, 296:312] = 0.49         # -> 0: background only
    return a, b


@pytest.fixture(scope="module")
def panorama(setup, reference_unet):
    s = setup
    ours = _sample(_fuser(s["model"]), s["clip"], s["noise"], s["sigmas"])
    expected = ref.multidiffusion_panorama_reference(reference_unet, s["cond"], s["uncond"], s["x_T"], s["timesteps"],
                                                     s["alphas"], CFG, window=WINDOW, stride=STRIDE)
    return ours, expected


@pytest.fixture(scope="module")
def regions(setup, reference_unet):
    """The node's regions and the reference's inputs for them, and both results without bootstrapping."""
    s = setup
    masks = _masks()
    nodes = {f"region_{k}": _region(s["clip"], text, m) for k, (text, m) in enumerate(zip(REGION_PROMPTS, masks))}
    conds = [s["cond"]] + [_context(s["clip"], text) for text in REGION_PROMPTS]
    ours = _sample(_fuser(s["model"], regions=nodes), s["clip"], s["noise"], s["sigmas"])
    expected = ref.multidiffusion_regions_reference(reference_unet, conds, s["uncond"], torch.stack(masks), s["x_T"],
                                                    s["timesteps"], s["alphas"], CFG, window=WINDOW, stride=STRIDE)
    return dict(nodes=nodes, conds=conds, masks=torch.stack(masks), ours=ours, expected=expected)


def test_panorama_node(panorama):
    from editkit.core.multidiffusion import window_layout
    assert [w.left for w in window_layout(SIZE, (WINDOW, WINDOW), (STRIDE, STRIDE))] == \
        [v[2] for v in ref.views(*SIZE, WINDOW, STRIDE)] == [0, 8, 16, 24]
    ours, expected = panorama
    assert_close(ours, expected)


def test_circular_panorama_node(setup, reference_unet, panorama):
    s = setup
    ours = _sample(_fuser(s["model"], circular=True), s["clip"], s["noise"], s["sigmas"])
    expected = ref.multidiffusion_panorama_reference(reference_unet, s["cond"], s["uncond"], s["x_T"], s["timesteps"],
                                                     s["alphas"], CFG, window=WINDOW, stride=STRIDE, circular=True,
                                                     view_batch_size=WINDOW_BATCH)
    assert [v[2:] for v in ref.views(*SIZE, WINDOW, STRIDE, circular=True)][-1] == (32, 48)   # wraps
    assert_close(ours, expected)
    assert_apart(ours, panorama[0])


def test_region_prompts_node(regions, panorama):
    assert_close(regions["ours"], regions["expected"])
    assert_apart(regions["ours"], panorama[0])
    # the weights are the official ones: binarised at 0.5, overlaps, background-only pixels
    from editkit.core.multidiffusion import region_weights
    stack = ref.region_masks(regions["masks"], *SIZE)
    assert torch.equal(region_weights(regions["masks"], SIZE), stack[:, 0])
    assert (stack[1:].sum(0) > 1).any() and (stack[0] == 1).any() and (stack[0] == 0).any()


@pytest.mark.parametrize("scheduler", ["simple", "ddim_uniform"])
def test_region_prompts_with_bootstrapping_node(setup, tiny, reference_unet, regions, scheduler):
    from editkit.core.multidiffusion import bootstrap_choices
    from editkit.nodes.latent_fuser import BOOTSTRAP_COLOURS, _colour_latents
    s = setup if scheduler == "simple" else _setup(tiny, scheduler)
    if scheduler != "simple":   # starts below sigma_max: ComfyUI's unit noise is not the official x_T there
        assert not torch.allclose(s["x_T"], s["noise"], rtol=1e-3)
    colours = _colour_latents(s["vae"], s["model"], WINDOW_PX, COLOUR_SEED)   # deterministic: the node's own
    assert colours.shape == (BOOTSTRAP_COLOURS, 4, WINDOW, WINDOW)
    fuser = _fuser(s["model"], regions=regions["nodes"], bootstrap=BOOTSTRAP, vae=s["vae"])
    ours = _sample(fuser, s["clip"], s["noise"], s["sigmas"])
    n_regions = len(REGION_PROMPTS)

    def reference(choice):
        return ref.multidiffusion_regions_reference(
            reference_unet, regions["conds"], s["uncond"], regions["masks"], s["x_T"], s["timesteps"], s["alphas"],
            CFG, window=WINDOW, stride=STRIDE, bootstrap_steps=int(BOOTSTRAP * STEPS), bootstrap_latents=colours,
            bootstrap_choice=choice)

    node_choice = lambda step: bootstrap_choices(SAMPLER_SEED, step, n_regions, BOOTSTRAP_COLOURS)
    expected = reference(node_choice)
    assert_close(ours, expected)
    # bootstrapping and the colours chosen do matter
    if scheduler == "simple":
        assert_apart(ours, regions["ours"])
        other = reference(lambda step: [(c + 1) % BOOTSTRAP_COLOURS for c in node_choice(step)])
        assert_apart(ours, other, factor=10.0)
