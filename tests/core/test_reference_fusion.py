"""Self-checks of the plain reference implementations in ``support.reference_fusion`` (MultiDiffusion panorama
and regions, diffusers' circular padding, SyncDiffusion).

They check the references against facts that follow from the official algorithms: view lists worked out by
hand, fusions that must reduce to plain CFG DDIM (one view, disjoint tiles, a region covering everything),
runs that must agree with each other (regions with equal prompts against the panorama, circular padding
against a rolled latent, a bootstrapping background made to be neutral), and SyncDiffusion's gradient step
(weight 0 changes nothing, a positive weight brings the views towards the anchor). Everything runs on the
tiny 2-head SD1.5-layout UNet with windows of 16 latents and 3 steps; the comparisons of runs with a different
batch composition or operation order run in float64 so that they can be tight.
"""
import math

import pytest
import torch

from support import reference_fusion as F
from support.reference_editing import cfg_eps, ddim_step
from support.tiny_models import make_diffusers_unet

STEPS = 3
GUIDANCE = 5.0
WIN = 16
H, W = 16, 40


def _schedule(steps):
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1 - betas, 0)
    timesteps = [999 - i * (1000 // steps) for i in range(steps)]
    return timesteps, [float(alpha_bar[t]) for t in timesteps] + [1.0]


TIMESTEPS, ALPHAS = _schedule(STEPS)


def _randn(seed, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _ctx(seed, dtype=torch.float32):
    return _randn(seed, 1, 77, 32, dtype=dtype)


def _close(a, b, tol):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(1.0, b.abs().max().item()))


def _plain(unet, cond, uncond, x):
    """Plain CFG DDIM with the shared helpers (the official single-window loop)."""
    for i, t in enumerate(TIMESTEPS):
        x = ddim_step(x, cfg_eps(unet, x, t, uncond, cond, GUIDANCE), ALPHAS[i], ALPHAS[i + 1])
    return x


@pytest.fixture(scope="module")
def unet():
    return make_diffusers_unet(seed=0, heads=2)


@pytest.fixture(scope="module")
def unet64():
    return make_diffusers_unet(seed=0, heads=2).double()


@pytest.fixture(scope="module")
def ctx64():
    return {"bg": _ctx(1, torch.float64), "fg": _ctx(2, torch.float64), "u": _ctx(3, torch.float64)}


@pytest.fixture(scope="module")
def x64():
    return _randn(10, 1, 4, H, W, dtype=torch.float64)


@pytest.fixture(scope="module")
def panorama64(unet64, ctx64, x64):
    """The float64 panorama (background prompt) on the 16x40 latent, window 16, stride 8 (4 views)."""
    with torch.no_grad():
        return F.multidiffusion_panorama_reference(unet64, ctx64["bg"], ctx64["u"], x64, TIMESTEPS, ALPHAS,
                                                   GUIDANCE, window=WIN, stride=8)


# ---------------------------------------------------------------------------------------------------------------
# views (no UNet)
# ---------------------------------------------------------------------------------------------------------------

def test_views_match_the_official_lists():
    # the official default panorama: 512 x 2048 px -> 64 x 256 latents, window 64, stride 8: 25 views
    v = F.views(64, 256, 64, 8)
    assert len(v) == 25 and v[0] == (0, 64, 0, 64) and v[-1] == (0, 64, 192, 256)
    assert v[1] == (0, 64, 8, 72)
    # row-major over a 2-D grid
    assert F.views(24, 24, 16, 8) == [(0, 16, 0, 16), (0, 16, 8, 24), (8, 24, 0, 16), (8, 24, 8, 24)]
    # (size - window) not a multiple of the stride: the floor leaves the last columns uncovered
    v = F.views(16, 44, 16, 8)
    assert [w0 for _, _, w0, _ in v] == [0, 8, 16, 24] and v[-1][3] == 40
    # circular (diffusers): width // stride views, the last ones end past the right edge
    v = F.views(16, 40, 16, 8, circular=True)
    assert [(w0, w1) for _, _, w0, w1 in v] == [(0, 16), (8, 24), (16, 32), (24, 40), (32, 48)]
    assert F.views(16, 16, 16, 8, circular=True) == [(0, 16, 0, 16)]
    assert F.views(8, 40, 16, 8, circular=True)[0] == (0, 16, 0, 16)     # height < window: 1 row
    with pytest.raises(ValueError):
        F.views(8, 40, 16, 8)
    # SyncDiffusion (stride 16 at the paper's 512 x 3072 px): 21 views, anchor index 10
    assert len(F.views(64, 384, 64, 16)) == 21


def test_region_masks_binarise_and_clamp_the_background():
    masks = torch.tensor([[[0.2, 0.5], [0.9, 0.49]], [[0.7, 0.6], [0.0, 0.1]]])
    stack = F.region_masks(masks, 2, 2)
    assert stack.shape == (3, 1, 2, 2)
    assert stack[1, 0].tolist() == [[0.0, 1.0], [1.0, 0.0]]
    assert stack[2, 0].tolist() == [[1.0, 1.0], [0.0, 0.0]]
    assert stack[0, 0].tolist() == [[0.0, 0.0], [0.0, 1.0]]     # 1 - 2 at the overlap -> 0
    up = F.region_masks(torch.tensor([[[1.0, 0.0]]]), 2, 4)       # nearest resize to the latent size
    assert up[1, 0].tolist() == [[1.0, 1.0, 0.0, 0.0]] * 2


def test_sync_weights_decay_per_step_in_float32():
    w = F.sync_weights(20.0, 0.95, 5)
    assert w.dtype == torch.float32
    assert w.tolist() == torch.tensor([20.0 * 0.95 ** k for k in range(5)], dtype=torch.float32).tolist()


# ---------------------------------------------------------------------------------------------------------------
# MultiDiffusion panorama
# ---------------------------------------------------------------------------------------------------------------

def test_one_view_covering_the_latent_is_plain_cfg_ddim(unet):
    cond, uncond, x = _ctx(1), _ctx(3), _randn(10, 1, 4, WIN, WIN)
    with torch.no_grad():
        out = F.multidiffusion_panorama_reference(unet, cond, uncond, x, TIMESTEPS, ALPHAS, GUIDANCE,
                                                  window=WIN, stride=8)
        assert torch.equal(out, _plain(unet, cond, uncond, x))


def test_stride_equal_to_window_gives_independent_tiles_and_zeroes_the_uncovered_strip(unet):
    cond, uncond, x = _ctx(1), _ctx(3), _randn(11, 1, 4, H, W)
    with torch.no_grad():
        out = F.multidiffusion_panorama_reference(unet, cond, uncond, x, TIMESTEPS, ALPHAS, GUIDANCE,
                                                  window=WIN, stride=WIN)
        for w0 in (0, WIN):   # (40 - 16) // 16 + 1 = 2 tiles
            assert torch.equal(out[..., w0:w0 + WIN], _plain(unet, cond, uncond, x[..., w0:w0 + WIN]))
    assert torch.count_nonzero(out[..., 2 * WIN:]) == 0          # count == 0 -> value (0)


def test_view_batches_match_one_view_at_a_time(unet64, ctx64, x64, panorama64):
    with torch.no_grad():
        out = F.multidiffusion_panorama_reference(unet64, ctx64["bg"], ctx64["u"], x64, TIMESTEPS, ALPHAS,
                                                  GUIDANCE, window=WIN, stride=8, view_batch_size=3)
    _close(out, panorama64, 1e-10)
    assert not torch.allclose(panorama64[..., :8], _plain(unet64, ctx64["bg"], ctx64["u"], x64[..., :WIN])[..., :8],
                              atol=1e-4)   # overlapping views do change the result


# ---------------------------------------------------------------------------------------------------------------
# circular padding
# ---------------------------------------------------------------------------------------------------------------

def test_circular_two_windows_stride_window_are_two_tiles(unet):
    cond, uncond, x = _ctx(1), _ctx(3), _randn(12, 1, 4, WIN, 2 * WIN)
    with torch.no_grad():
        out = F.multidiffusion_panorama_reference(unet, cond, uncond, x, TIMESTEPS, ALPHAS, GUIDANCE,
                                                  window=WIN, stride=WIN, circular=True)
        for w0 in (0, WIN):
            assert torch.equal(out[..., w0:w0 + WIN], _plain(unet, cond, uncond, x[..., w0:w0 + WIN]))


def test_circular_is_equivariant_to_rolling_by_the_stride(unet64, ctx64, x64):
    run = lambda x: F.multidiffusion_panorama_reference(unet64, ctx64["bg"], ctx64["u"], x, TIMESTEPS, ALPHAS,
                                                        GUIDANCE, window=WIN, stride=8, circular=True)
    with torch.no_grad():
        out = run(x64)
        rolled = run(torch.roll(x64, 8, dims=-1))
    _close(rolled, torch.roll(out, 8, dims=-1), 1e-10)
    assert not torch.allclose(rolled, out, atol=1e-3)


def _diffusers_panorama(unet, window, stride):
    """diffusers' own StableDiffusionPanoramaPipeline (deprecated, still shipped) around the tiny UNet, with
    the window of its ``get_views`` set to ``window`` (its ``__call__`` always uses the default 64)."""
    import functools

    diffusers = pytest.importorskip("diffusers")
    pipeline_cls = getattr(diffusers, "StableDiffusionPanoramaPipeline", None)
    if pipeline_cls is None:
        pytest.skip("this diffusers has no StableDiffusionPanoramaPipeline")
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=True, steps_offset=0)
    pipe = pipeline_cls(vae=None, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
                        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.get_views = functools.partial(pipeline_cls.get_views, pipe, window_size=window, stride=stride)
    scheduler.set_timesteps(STEPS)
    timesteps = [int(t) for t in scheduler.timesteps]
    alphas = [float(scheduler.alphas_cumprod[t]) for t in timesteps] + [float(scheduler.final_alpha_cumprod)]

    def run(cond, uncond, x, **kw):
        return pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, height=8 * x.shape[-2],
                    width=8 * x.shape[-1], num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                    latents=x.clone(), output_type="latent", **kw).images

    return run, timesteps, alphas


def test_panorama_matches_the_diffusers_pipeline(unet64, ctx64):
    """Circular padding (wrapping views, a latent lower than the window, a latent narrower than the window
    whose single view wraps onto itself), view batches, and the zeroed strip of a width that the stride does
    not divide, against diffusers' pipeline itself (its DDIM arithmetic uses float32 alpha-bars: 1e-7)."""
    run, timesteps, alphas = _diffusers_panorama(unet64, WIN, 8)
    cases = [((16, 40), dict(circular_padding=True, view_batch_size=2)),
             ((8, 40), dict(circular_padding=True)),
             ((16, 12), dict(circular_padding=True)),
             ((16, 44), dict(circular_padding=False, view_batch_size=3))]
    for seed, ((h, w), kw) in enumerate(cases):
        x = _randn(20 + seed, 1, 4, h, w, dtype=torch.float64)
        with torch.no_grad():
            expected = run(ctx64["bg"], ctx64["u"], x, **kw)
            out = F.multidiffusion_panorama_reference(unet64, ctx64["bg"], ctx64["u"], x, timesteps, alphas,
                                                      GUIDANCE, window=WIN, stride=8,
                                                      circular=kw["circular_padding"],
                                                      view_batch_size=kw.get("view_batch_size", 1))
        _close(out, expected, 1e-7)
    assert torch.count_nonzero(out[..., 40:]) == 0
    # several rows of views with circular padding: diffusers fails, the reference refuses
    x = _randn(30, 1, 4, 24, 32, dtype=torch.float64)
    with torch.no_grad(), pytest.raises(RuntimeError):
        run(ctx64["bg"], ctx64["u"], x, circular_padding=True)


def test_circular_with_several_rows_of_views_is_refused(unet):
    with pytest.raises(ValueError):
        F.multidiffusion_panorama_reference(unet, _ctx(1), _ctx(3), _randn(1, 1, 4, 24, 32), TIMESTEPS, ALPHAS,
                                            GUIDANCE, window=WIN, stride=8, circular=True)


# ---------------------------------------------------------------------------------------------------------------
# MultiDiffusion regions
# ---------------------------------------------------------------------------------------------------------------

def _half_mask(dtype=torch.float64):
    m = torch.zeros(1, H, W, dtype=dtype)
    m[:, 4:12, 10:30] = 1.0
    return m


def test_regions_with_every_prompt_the_background_equal_the_panorama(unet64, ctx64, x64, panorama64):
    with torch.no_grad():
        out = F.multidiffusion_regions_reference(unet64, [ctx64["bg"], ctx64["bg"]], ctx64["u"], _half_mask(),
                                                 x64, TIMESTEPS, ALPHAS, GUIDANCE, window=WIN, stride=8)
    _close(out, panorama64, 1e-10)


def test_one_region_covering_everything_is_plain_sampling_with_its_prompt(unet64, ctx64):
    x = _randn(13, 1, 4, WIN, WIN, dtype=torch.float64)
    full = torch.ones(1, WIN, WIN, dtype=torch.float64)
    with torch.no_grad():
        out = F.multidiffusion_regions_reference(unet64, [ctx64["bg"], ctx64["fg"]], ctx64["u"], full, x,
                                                 TIMESTEPS, ALPHAS, GUIDANCE, window=WIN, stride=8)
        plain = _plain(unet64, ctx64["fg"], ctx64["u"], x)
        # two regions overlapping everywhere: background weight clamped to 0, the two averaged
        both = F.multidiffusion_regions_reference(unet64, [ctx64["bg"], ctx64["fg"], ctx64["fg"]], ctx64["u"],
                                                  torch.cat([full, full]), x, TIMESTEPS, ALPHAS, GUIDANCE,
                                                  window=WIN, stride=8)
        # a mask below 0.5 is binarised away: background only
        faint = F.multidiffusion_regions_reference(unet64, [ctx64["bg"], ctx64["fg"]], ctx64["u"], 0.49 * full,
                                                   x, TIMESTEPS, ALPHAS, GUIDANCE, window=WIN, stride=8)
        bg_plain = _plain(unet64, ctx64["bg"], ctx64["u"], x)
    _close(out, plain, 1e-10)
    _close(both, plain, 1e-10)
    _close(faint, bg_plain, 1e-10)
    assert not torch.allclose(plain, bg_plain, atol=1e-3)


def test_bootstrapping_uses_the_initial_noise_at_the_current_timestep(unet64, ctx64, x64):
    """Backgrounds chosen so that ``a_t ** 0.5 * bg + (1 - a_t) ** 0.5 * x_T[view]`` equals the current view
    latent make bootstrapping a no-op; this holds only with the initial noise, the view's crop of it and
    alpha-bar of the current step."""
    conds, mask = [ctx64["bg"], ctx64["fg"]], _half_mask()
    kw = dict(window=WIN, stride=8)
    view_list = F.views(H, W, WIN, 8)
    with torch.no_grad():
        plain = F.multidiffusion_regions_reference(unet64, conds, ctx64["u"], mask, x64, TIMESTEPS, ALPHAS,
                                                   GUIDANCE, **kw)
        x1 = F.multidiffusion_regions_reference(unet64, conds, ctx64["u"], mask, x64, TIMESTEPS[:1], ALPHAS[:2],
                                                GUIDANCE, **kw)
    backgrounds = []
    for step, current in ((0, x64), (1, x1)):
        a = ALPHAS[step]
        for h0, h1, w0, w1 in view_list:
            noise = x64[0, :, h0:h1, w0:w1]
            backgrounds.append((current[0, :, h0:h1, w0:w1] - (1 - a) ** 0.5 * noise) / a ** 0.5)
    bootstrap = torch.stack(backgrounds)
    nv = len(view_list)
    with torch.no_grad():
        neutral = F.multidiffusion_regions_reference(
            unet64, conds, ctx64["u"], mask, x64, TIMESTEPS, ALPHAS, GUIDANCE, bootstrap_steps=2,
            bootstrap_latents=bootstrap, bootstrap_choice=lambda step, view: [step * nv + view], **kw)
        colour = torch.zeros(1, 4, WIN, WIN, dtype=torch.float64)
        coloured = F.multidiffusion_regions_reference(
            unet64, conds, ctx64["u"], mask, x64, TIMESTEPS, ALPHAS, GUIDANCE, bootstrap_steps=2,
            bootstrap_latents=colour, bootstrap_choice=lambda step: [0], **kw)
    _close(neutral, plain, 1e-9)
    assert not torch.allclose(coloured, plain, atol=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# SyncDiffusion
# ---------------------------------------------------------------------------------------------------------------

class _Decoder(torch.nn.Module):
    """A fixed random differentiable 'VAE decoder': 3x3 conv to RGB, 2x nearest upsampling, sigmoid."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 3, 3, padding=1)
        with torch.no_grad():
            g = torch.Generator().manual_seed(7)
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.3)
            self.conv.bias.zero_()
        self.requires_grad_(False)

    def forward(self, z):
        return torch.sigmoid(torch.nn.functional.interpolate(self.conv(z), scale_factor=2.0, mode="nearest"))


def _mse(a, b):
    return ((a - b) ** 2).mean(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def sync_setup(unet):
    cond, uncond, x = _ctx(1), _ctx(3), _randn(14, 1, 4, H, W)
    with torch.no_grad():
        pano = F.multidiffusion_panorama_reference(unet, cond, uncond, x, TIMESTEPS, ALPHAS, GUIDANCE,
                                                   window=WIN, stride=8)
    return cond, uncond, x, pano


def test_sync_weight_zero_is_the_panorama_exactly(unet, sync_setup):
    cond, uncond, x, pano = sync_setup
    trace = []
    out = F.syncdiffusion_reference(unet, _Decoder(), _mse, cond, uncond, x, TIMESTEPS, ALPHAS, GUIDANCE,
                                    window=WIN, stride=8, sync_weight=0.0, sync_thres=10, trace=trace)
    assert [r["step"] for r in trace] == [0, 1, 2]            # the gradients were taken, with weight 0
    assert torch.equal(out, pano)


def test_sync_pulls_the_views_towards_the_anchor(unet, sync_setup):
    """One synchronised step (weight 1: the stand-in's gradients are far larger than LPIPS-VGG's, the paper's
    20 overshoots here): the anchor is kept, every other view moves by -w * grad of the full chain (UNet, x0,
    decode), which brings its decoded x0 closer to the anchor's, and the step then re-evaluates the UNet on
    the moved views before the DDIM step and the average."""
    cond, uncond, x, _ = sync_setup
    decode = _Decoder()
    trace = []
    t, a, a_next = TIMESTEPS[0], ALPHAS[0], ALPHAS[1]
    out = F.syncdiffusion_reference(unet, decode, _mse, cond, uncond, x, TIMESTEPS[:1], ALPHAS[:2], GUIDANCE,
                                    window=WIN, stride=8, sync_weight=1.0, trace=trace)
    with torch.no_grad():
        pano1 = F.multidiffusion_panorama_reference(unet, cond, uncond, x, TIMESTEPS[:1], ALPHAS[:2], GUIDANCE,
                                                    window=WIN, stride=8)
    assert not torch.allclose(out, pano1, atol=1e-4)
    first, = trace
    anchor = first["anchor"]
    assert first["step"] == 0 and anchor == 2                 # 4 views: len // 2
    assert torch.equal(first["after"][anchor], first["before"][anchor]) and first["grads"][anchor] is None

    def image(z):
        return decode(F.pred_x0(z, cfg_eps(unet, z, t, uncond, cond, GUIDANCE), a))

    with torch.no_grad():
        assert torch.equal(first["anchor_image"], image(first["before"][anchor]))

    def distance(z):
        with torch.no_grad():
            return _mse(image(z) * 2 - 1, first["anchor_image"] * 2 - 1).item()

    for vi in (0, 1, 3):
        step = first["after"][vi] - first["before"][vi]
        torch.testing.assert_close(step, -first["grads"][vi])
        assert step.abs().max() > 0
        assert distance(first["after"][vi]) < distance(first["before"][vi])
    # the gradient runs through the UNet (not only through the x0 formula's linear term)
    z = first["before"][0].clone().requires_grad_(True)
    full = torch.autograd.grad(_mse(image(z) * 2 - 1, first["anchor_image"] * 2 - 1).sum(), z)[0]
    z = first["before"][0].clone().requires_grad_(True)
    eps = cfg_eps(unet, z.detach(), t, uncond, cond, GUIDANCE)
    linear = torch.autograd.grad(_mse(decode(F.pred_x0(z, eps, a)) * 2 - 1, first["anchor_image"] * 2 - 1).sum(),
                                 z)[0]
    _close(first["grads"][0], full, 1e-5)
    assert not torch.allclose(full, linear, rtol=0.05, atol=1e-3 * full.abs().max().item())
    # the DDIM step of every view starts from its moved latent with a new UNet call
    value, count = torch.zeros_like(x), torch.zeros_like(x)
    with torch.no_grad():
        for (h0, h1, w0, w1), z in zip(F.views(H, W, WIN, 8), first["after"]):
            value[..., h0:h1, w0:w1] += ddim_step(z, cfg_eps(unet, z, t, uncond, cond, GUIDANCE), a, a_next)
            count[..., h0:h1, w0:w1] += 1
    _close(out, value / count, 1e-6)


def test_sync_frequency_skips_step_zero(unet, sync_setup):
    cond, uncond, x, pano = sync_setup
    trace = []
    F.syncdiffusion_reference(unet, _Decoder(), _mse, cond, uncond, x, TIMESTEPS[:2], ALPHAS[:3], GUIDANCE,
                              window=WIN, stride=8, sync_weight=20.0, sync_freq=2, trace=trace)
    assert [r["step"] for r in trace] == [1]                  # (i + 1) % sync_freq == 0
    assert math.isclose(float(F.sync_weights(20.0, 0.95, 2)[1]), 19.0, rel_tol=1e-6)


def test_sync_official_asserts(unet, sync_setup):
    cond, uncond, x, _ = sync_setup
    for kw in (dict(stride=4), dict(stride=16), dict(stride=24, window=32)):
        with pytest.raises(ValueError):
            F.syncdiffusion_reference(unet, _Decoder(), _mse, cond, uncond, x, TIMESTEPS, ALPHAS, GUIDANCE,
                                      **{"window": WIN, **kw})
