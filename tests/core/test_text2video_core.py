"""Text2Video-Zero's motion dynamics (core/text2video.py) against hand-written float64 references: the warp is a
translation (torch.roll inside the frame, the padding outside), the shifts are λ(k − 1)δ, the re-noising is the
DDPM forward process after the change of parameterisation, and the composition calls the denoiser on the
right slices of the schedule."""
import math

import pytest
import torch

from editkit.core import schedule
from editkit.core.text2video import motion_latents, motion_shifts, renoise, translate_latent

H, W = 6, 7


def _x(*lead, seed=0):
    return torch.randn(*lead, H, W, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _inside(dx: int, dy: int):
    """The pixels whose source lies in the frame after a content shift (dx, dy)."""
    return (..., slice(max(dy, 0), H + min(dy, 0)), slice(max(dx, 0), W + min(dx, 0)))


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
@pytest.mark.parametrize("padding", ["reflection", "border", "zeros"])
@pytest.mark.parametrize("shift", [(1, 0), (0, 2), (-2, 1), (3, -1), (-1, -3)])
def test_an_integer_shift_is_torch_roll_inside_the_frame(shift, padding, interpolation):
    x = _x(2, 3)
    dx, dy = shift
    out = translate_latent(x, (float(dx), float(dy)), padding, interpolation)
    rolled = torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out[_inside(dx, dy)], rolled[_inside(dx, dy)])


def test_the_uncovered_strip_is_filled_by_the_padding():
    x = _x(1)
    # content moved 2 to the right: columns 0 and 1 come from source columns -2 and -1
    reflected = translate_latent(x, (2.0, 0.0), "reflection")
    assert torch.equal(reflected[..., 0], x[..., 1]) and torch.equal(reflected[..., 1], x[..., 0])
    border = translate_latent(x, (2.0, 0.0), "border")
    assert torch.equal(border[..., 0], x[..., 0]) and torch.equal(border[..., 1], x[..., 0])
    zeros = translate_latent(x, (0.0, -1.0), "zeros")
    assert torch.equal(zeros[..., -1, :], torch.zeros(1, W, dtype=torch.float64))


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
def test_a_zero_shift_leaves_the_latent_exactly_as_it_is(interpolation):
    x = _x(2, 4)
    out = translate_latent(x, (0.0, 0.0), interpolation=interpolation)
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()
    assert torch.equal(translate_latent(x, (0.4, -0.3), interpolation="nearest"), x)   # rounds to no shift


def test_bilinear_sub_pixel_shifts_interpolate_neighbours():
    x = _x(1, 1)
    quarter = translate_latent(x, (0.25, 0.0), "reflection", "bilinear")
    assert torch.allclose(quarter[..., 1:], 0.75 * x[..., 1:] + 0.25 * x[..., :-1], atol=1e-14)
    diagonal = translate_latent(x, (0.5, 0.5), "reflection", "bilinear")
    expected = 0.25 * (x[..., 1:, 1:] + x[..., :-1, 1:] + x[..., 1:, :-1] + x[..., :-1, :-1])
    assert torch.allclose(diagonal[..., 1:, 1:], expected, atol=1e-14)


def test_nearest_rounds_halves_upwards():
    """Content shifts of 1.5 k pixels round half up: the content moves by 1, 3, 4, 6 pixels (the official warp's
    1.5 latent pixels per frame ends on the same pixels, see the test below)."""
    x = _x(1)
    for k, moved in zip((1, 2, 3, 4), (1, 3, 4, 6)):
        out = translate_latent(x, (-1.5 * k, 0.0), "reflection", "nearest")
        assert torch.equal(out[_inside(-moved, 0)], torch.roll(x, -moved, -1)[_inside(-moved, 0)])


def _official_warp(latent: torch.Tensor, flow_xy) -> torch.Tensor:
    """Text2Video-Zero's warp_single_latent (text_to_video_pipeline.py), written out: pixel coordinates of a 512x512
    grid plus the flow (in 1/512 of the frame), normalised to [-1, 1], resized bilinearly to the latent, then a
    nearest lookup with reflection padding."""
    import torch.nn.functional as F
    h, w = latent.shape[-2:]
    rows, cols = torch.meshgrid(torch.arange(512), torch.arange(512), indexing="ij")
    coords = torch.stack([cols, rows]).float()[None]
    coords = coords + torch.tensor(flow_xy, dtype=torch.float32).view(1, 2, 1, 1)
    coords = coords / 512.0 * 2.0 - 1.0
    coords = F.interpolate(coords, size=(h, w), mode="bilinear").permute(0, 2, 3, 1)
    return F.grid_sample(latent.float(), coords, mode="nearest", padding_mode="reflection", align_corners=False)


@pytest.mark.parametrize("hw", [(64, 64), (48, 80)])
def test_nearest_warp_samples_where_the_official_does(hw):
    """motion_latents' `nearest` warp equals the official one for shifts across whole and fractional pixels,
    including 6.55 px (fraction just above a half), where rounding the shift itself samples one pixel further
    than the official; exact ties of the official grid (fraction 1/2 + w/1024) are left out: there the official
    tears the frame."""
    h, w = hw
    start = torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(3))
    strengths = [0.0, 0.3, 0.5, 1.0, 1.5, 2.2, 3.25, 5.0, 6.55, 6.8, 9.0]   # latent px per frame along x
    frames = 3
    for direction in ((1.0, 0.0), (0.0, 1.0), (1.0, -0.7)):
        for strength in strengths:
            shifts = motion_shifts(frames, direction, strength)
            flow = shifts * torch.tensor([512.0 / w, 512.0 / h], dtype=torch.float64)   # 1/512 of the frame
            ties = (shifts - torch.tensor([w / 1024, h / 1024], dtype=torch.float64)).remainder(1.0)
            if ((ties - 0.5).abs() < 1e-9).any():
                continue
            noise = torch.zeros(frames - 1, 4, h, w)
            out = motion_latents(start, SIGMAS, 0, 0, shifts, noise, _Recorder(), "reflection", "nearest")
            for k in range(frames):
                expected = _official_warp(start, flow[k].tolist())
                assert torch.equal(out.warped[k:k + 1], expected), (direction, strength, k)
    # the shift 6.55 is one where the rounding matters
    six = motion_shifts(2, (1.0, 0.0), 6.55)
    assert torch.floor(six[1, 0] + 0.5) == 7 and _official_warp(start, [6.55 * 512 / w, 0.0]).equal(
        translate_latent(start, (-6.0, 0.0), "reflection", "nearest"))


def test_bilinear_half_pixel_shifts_halve_the_variance_of_noise_and_nearest_keeps_it():
    """Why nearest is the default: at T' the latent is mostly noise; averaging two neighbours halves its
    variance (a blurred start), copying keeps it."""
    noise = torch.randn(64, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    half = translate_latent(noise, (0.5, 0.0), "reflection", "bilinear")[..., 1:].var().item()
    whole = translate_latent(noise, (0.5, 0.0), "reflection", "nearest").var().item()
    assert abs(half - 0.5) < 0.02 and abs(whole - 1.0) < 0.02


def test_motion_shifts_are_lambda_k_minus_1_delta():
    shifts = motion_shifts(5, (1.0, -0.5), 1.5)
    assert shifts.dtype == torch.float64 and shifts.shape == (5, 2)
    for k in range(1, 6):                                   # the paper's frames k = 1..F
        assert torch.equal(shifts[k - 1], torch.tensor([1.5 * (k - 1) * 1.0, 1.5 * (k - 1) * -0.5],
                                                        dtype=torch.float64))
    assert torch.equal(motion_shifts(3, (1, 1), 0.0), torch.zeros(3, 2, dtype=torch.float64))
    assert motion_shifts(1, (1, 1), 12.0).abs().sum() == 0


def test_renoising_in_sigma_space_is_the_ddpm_forward_process():
    """x_T = sqrt(a_T / a_T') x_T' + sqrt(1 - a_T / a_T') eps in the papers' space equals
    x_sigma = x_sigma' + sqrt(sigma^2 - sigma'^2) eps in ComfyUI's, at the official timesteps 881 -> 941 of SD's
    schedule and at others."""
    alphas = schedule.sd_alphas_cumprod()
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=g)
    eps = torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=g)
    for t_from, t_to in ((881, 941), (1, 981), (500, 501), (700, 700)):
        a_from, a_to = alphas[t_from], alphas[t_to]
        x_from = a_from.sqrt() * x0 + (1 - a_from).sqrt() * torch.randn_like(x0)   # any x_T' will do
        ddpm = (a_to / a_from).sqrt() * x_from + (1 - a_to / a_from).sqrt() * eps
        sigma_from = float(schedule.sigma_from_alpha_bar(a_from))
        sigma_to = float(schedule.sigma_from_alpha_bar(a_to))
        ours = renoise(schedule.to_sigma_space(x_from, a_from), sigma_from, sigma_to, eps)
        assert torch.allclose(schedule.from_sigma_space(ours, a_to), ddpm, rtol=1e-12, atol=1e-12)


def test_renoise_refuses_to_go_down_and_wrong_noise():
    x = _x(1, 2)
    assert torch.equal(renoise(x, 2.0, 2.0, torch.ones_like(x)), x)
    with pytest.raises(ValueError, match="sigma_to: re-noising goes up"):
        renoise(x, 3.0, 2.0, torch.ones_like(x))
    with pytest.raises(ValueError, match="noise: shape"):
        renoise(x, 1.0, 2.0, torch.ones(1, 2, H, W + 1, dtype=torch.float64))


class _Recorder:
    """A stand-in for the guided DDIM steps: a fixed, recognisable map per slice, the slices recorded."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigmas):
        self.calls.append(sigmas.clone())
        return 0.5 * x + float(sigmas[-1])


SIGMAS = torch.tensor([14.0, 10.0, 7.0, 5.0, 3.0, 2.0, 1.0, 0.0], dtype=torch.float64)


def test_the_composition_follows_the_paper():
    start = _x(1, 4, seed=1)
    shifts = motion_shifts(4, (1.0, 1.0), 1.0)
    noise = torch.randn(3, 4, H, W, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    denoise = _Recorder()
    out = motion_latents(start, SIGMAS, 2, 5, shifts, noise, denoise, "reflection", "nearest")
    assert [c.tolist() for c in denoise.calls] == [[14.0, 10.0, 7.0], [7.0, 5.0, 3.0, 2.0]]
    x_t = 0.5 * start + 7.0
    x_t_prime = 0.5 * x_t + 2.0
    assert torch.equal(out.x_t, x_t) and torch.equal(out.x_t_prime, x_t_prime)
    assert out.latents.shape == out.warped.shape == (4, 4, H, W)
    assert torch.equal(out.warped[0], x_t_prime[0])                          # frame 1 is not warped
    assert torch.equal(out.latents[0], x_t[0])                               # nor re-noised: it is x_T^1
    for k in range(1, 4):                  # sampled at p + k(1, 1): the content moves by -k on both axes
        rolled = torch.roll(x_t_prime[0], shifts=(-k, -k), dims=(-2, -1))
        assert torch.equal(out.warped[k][_inside(-k, -k)], rolled[_inside(-k, -k)])
        expected = out.warped[k] + math.sqrt(7.0 ** 2 - 2.0 ** 2) * noise[k - 1]
        assert torch.allclose(out.latents[k], expected, rtol=0, atol=1e-14)


def test_without_motion_every_warped_frame_is_x_t_prime_and_fresh_noise_tells_them_apart():
    start = _x(1, 4, seed=1)
    noise = torch.randn(2, 4, H, W, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out = motion_latents(start, SIGMAS, 1, 3, motion_shifts(3, (1, 1), 0.0), noise, _Recorder())
    assert all(torch.equal(w, out.x_t_prime[0]) for w in out.warped)
    assert not torch.equal(out.latents[1], out.latents[2])
    assert torch.allclose(out.latents[2] - out.latents[1], math.sqrt(10.0 ** 2 - 5.0 ** 2) * (noise[1] - noise[0]),
                          atol=1e-14)


def test_no_denoising_window_when_the_steps_coincide():
    start = _x(1, 4, seed=1)
    denoise = _Recorder()
    noise = torch.zeros(1, 4, H, W, dtype=torch.float64)
    out = motion_latents(start, SIGMAS, 0, 0, motion_shifts(2, (1, 0), 2.0), noise, denoise)
    assert denoise.calls == []
    assert torch.equal(out.latents[0], start[0])
    assert torch.equal(out.latents[1][_inside(-2, 0)], torch.roll(start[0], -2, -1)[_inside(-2, 0)])
    motion_latents(start, SIGMAS, 0, 2, motion_shifts(2, (1, 0), 2.0), noise, denoise)
    assert [c.tolist() for c in denoise.calls] == [[14.0, 10.0, 7.0]]


def test_bad_inputs_are_refused_naming_the_input():
    start = _x(1, 4)
    shifts = motion_shifts(3, (1, 1), 1.0)
    noise = torch.zeros(2, 4, H, W, dtype=torch.float64)
    with pytest.raises(ValueError, match="start_step: 3 must be between 0 and warp_step"):
        motion_latents(start, SIGMAS, 3, 2, shifts, noise, _Recorder())
    with pytest.raises(ValueError, match="warp_step: 7 must be below the number of steps"):
        motion_latents(start, SIGMAS, 0, 7, shifts, noise, _Recorder())
    with pytest.raises(ValueError, match="start: expected the latent of one image"):
        motion_latents(_x(2, 4), SIGMAS, 0, 1, shifts, noise, _Recorder())
    with pytest.raises(ValueError, match="noise: expected"):
        motion_latents(start, SIGMAS, 0, 1, shifts, noise[:1], _Recorder())
    with pytest.raises(ValueError, match="shifts: expected"):
        motion_latents(start, SIGMAS, 0, 1, torch.zeros(3, 3), noise, _Recorder())
    with pytest.raises(ValueError, match="frames: expected a whole number"):
        motion_shifts(0, (1, 1), 1.0)
    with pytest.raises(ValueError, match="strength: expected a finite number >= 0"):
        motion_shifts(2, (1, 1), -1.0)
    with pytest.raises(ValueError, match="direction: expected two finite numbers"):
        motion_shifts(2, (1, float("nan")), 1.0)
    with pytest.raises(ValueError, match="padding: 'wrap' is not one of"):
        translate_latent(start, (1.0, 0.0), "wrap")
    with pytest.raises(ValueError, match="interpolation: 'cubic' is not one of"):
        translate_latent(start, (1.0, 0.0), interpolation="cubic")
    with pytest.raises(ValueError, match="shift_xy: expected two finite numbers"):
        translate_latent(start, (1.0,))
