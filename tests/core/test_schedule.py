"""DDIM arithmetic against hand-written float64 references."""
import math

import torch

from editkit.core import schedule


def test_alpha_sigma_round_trip():
    a = torch.tensor([0.999, 0.5, 0.0047], dtype=torch.float64)
    assert torch.allclose(schedule.alpha_bar_from_sigma(schedule.sigma_from_alpha_bar(a)), a, atol=1e-15)
    assert math.isclose(float(schedule.sigma_from_alpha_bar(0.5)), 1.0)


def test_sd_schedule_matches_published_end_points():
    a = schedule.sd_alphas_cumprod()
    assert a.shape == (1000,)
    assert math.isclose(float(a[0]), 1 - 0.00085, rel_tol=1e-12)
    # SD1.5's last sigma is 14.6146 (the value ComfyUI and diffusers print for its schedule)
    assert abs(float(schedule.sigma_from_alpha_bar(a[-1])) - 14.6146) < 1e-3


def test_ddim_step_matches_formula_and_inverts_exactly():
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=g)
    eps = torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=g)
    a_t, a_prev = 0.3, 0.7
    x0 = (x_t - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    expected = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    x_prev = schedule.ddim_step(x_t, eps, a_t, a_prev)
    assert torch.allclose(x_prev, expected, atol=1e-14)
    back = schedule.ddim_inverse_step(x_prev, eps, a_prev, a_t)
    assert torch.allclose(back, x_t, atol=1e-12)


def test_ddim_is_euler_in_sigma_space():
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(1, 4, 4, 4, dtype=torch.float64, generator=g)
    eps = torch.randn(1, 4, 4, 4, dtype=torch.float64, generator=g)
    a_t, a_next = 0.2, 0.6
    ddim = schedule.ddim_step(x_t, eps, a_t, a_next)
    s, s_next = schedule.sigma_from_alpha_bar(a_t), schedule.sigma_from_alpha_bar(a_next)
    euler = schedule.euler_sigma_step(schedule.to_sigma_space(x_t, a_t), eps, s, s_next)
    assert torch.allclose(schedule.from_sigma_space(euler, a_next), ddim, atol=1e-12)


def test_step_index_finds_steps_and_intermediate_sigmas():
    sigmas = [14.6, 7.0, 3.0, 1.0, 0.0]
    assert [schedule.step_index(s, sigmas) for s in sigmas[:-1]] == [0, 1, 2, 3]
    assert schedule.step_index(5.0, sigmas) == 1      # between 7 and 3: the step that started at 7
    assert schedule.step_index(7.0 * (1 + 1e-6), sigmas) == 1   # float32 round trip of 7.0
    assert schedule.step_index(0.5, sigmas) == 3
