"""Noise-schedule and DDIM arithmetic shared by every method.

Two parameterisations of the same variance-preserving process appear in practice:
- diffusers / the papers: x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps, with a_t = alpha-bar ("alphas_cumprod");
- ComfyUI / k-diffusion: x = x_0 + sigma eps, with sigma = sqrt((1 - a) / a), so x = x_t / sqrt(a_t).
The helpers below convert between them; DDIM (Song et al. 2021, eq. 12 with eta = 0) in the first is
exactly the Euler step in the second, which is why ComfyUI's `ddim` sampler is Euler.
"""
from __future__ import annotations

import torch


def alpha_bar_from_sigma(sigma: torch.Tensor | float) -> torch.Tensor:
    sigma = torch.as_tensor(sigma)
    return 1.0 / (1.0 + sigma * sigma)


def sigma_from_alpha_bar(alpha_bar: torch.Tensor | float) -> torch.Tensor:
    alpha_bar = torch.as_tensor(alpha_bar)
    return ((1.0 - alpha_bar) / alpha_bar).sqrt()


def sd_alphas_cumprod(num_train_steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                      dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Stable Diffusion's "scaled linear" training schedule (the one SD 1.x/2.x/XL were trained with)."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_steps, dtype=dtype) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def predict_x0(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar) -> torch.Tensor:
    """x_0 implied by a noise prediction, in the sqrt(a) x_0 + sqrt(1-a) eps parameterisation."""
    a = torch.as_tensor(alpha_bar, dtype=x_t.dtype, device=x_t.device)
    return (x_t - (1.0 - a).sqrt() * eps) / a.sqrt()


def ddim_step(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar_t, alpha_bar_next) -> torch.Tensor:
    """One deterministic DDIM step (eta = 0) from a_t to a_next, reusing the same eps.

    Used both ways: denoising (a_next > a_t) and inversion (a_next < a_t). Applying it from a to b and
    then from b to a with the same eps returns the input exactly (up to rounding): this is the
    inversion of Mokady et al. 2023 (Null-text Inversion), which approximates eps(x_next) by eps(x_t).
    """
    a_next = torch.as_tensor(alpha_bar_next, dtype=x_t.dtype, device=x_t.device)
    x0 = predict_x0(x_t, eps, alpha_bar_t)
    return a_next.sqrt() * x0 + (1.0 - a_next).sqrt() * eps


def ddim_inverse_step(x_prev: torch.Tensor, eps: torch.Tensor, alpha_bar_prev, alpha_bar_t) -> torch.Tensor:
    """DDIM inversion step: from the less noisy a_prev up to the noisier a_t (same formula, other direction)."""
    return ddim_step(x_prev, eps, alpha_bar_prev, alpha_bar_t)


def to_sigma_space(x_t: torch.Tensor, alpha_bar) -> torch.Tensor:
    """sqrt(a) x_0 + sqrt(1-a) eps  ->  x_0 + sigma eps."""
    return x_t / torch.as_tensor(alpha_bar, dtype=x_t.dtype, device=x_t.device).sqrt()


def from_sigma_space(x: torch.Tensor, alpha_bar) -> torch.Tensor:
    """x_0 + sigma eps  ->  sqrt(a) x_0 + sqrt(1-a) eps."""
    return x * torch.as_tensor(alpha_bar, dtype=x.dtype, device=x.device).sqrt()


def euler_sigma_step(x: torch.Tensor, eps: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """DDIM (eta = 0) written in sigma space: x_next = x + (sigma_next - sigma) eps."""
    return x + (sigma_next - sigma) * eps


def step_index(sigma: float, schedule_sigmas) -> int:
    """Index i of the sampling step that evaluates the model at `sigma`.

    `schedule_sigmas` is the descending list of a run's sigmas (N steps -> N + 1 values, the last often 0).
    A sigma between two schedule values (second-order samplers evaluate there) belongs to the step that
    started at the larger one. Relative tolerance absorbs float32 round trips of the same value.
    """
    values = [float(s) for s in schedule_sigmas]
    if not values:
        return 0
    count = sum(1 for s in values if s >= float(sigma) * (1.0 - 1e-4))
    return min(max(count - 1, 0), max(len(values) - 2, 0))


def sigmas_of_schedule(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


def timestep_from_sigma(sigma: float, alphas_cumprod: torch.Tensor) -> float:
    """Fractional training timestep of `sigma`, interpolating log-sigma linearly (as k-diffusion does)."""
    log_sigmas = sigmas_of_schedule(alphas_cumprod.double()).log()
    target = torch.log(torch.tensor(float(sigma), dtype=torch.float64))
    idx = int(torch.searchsorted(log_sigmas, target).clamp(1, len(log_sigmas) - 1))
    lo, hi = log_sigmas[idx - 1], log_sigmas[idx]
    w = ((target - lo) / (hi - lo)).clamp(0, 1)
    return float(idx - 1 + w)


def uniform_sigmas(steps: int, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """`steps` sigmas at evenly spaced training timesteps from the last to the first, then 0."""
    all_sigmas = sigmas_of_schedule(alphas_cumprod.double())
    t = torch.linspace(len(all_sigmas) - 1, 0, steps, dtype=torch.float64)
    lo = t.floor().long()
    w = t - lo
    hi = (lo + 1).clamp(max=len(all_sigmas) - 1)
    log_s = (1 - w) * all_sigmas[lo].log() + w * all_sigmas[hi].log()
    return torch.cat([log_s.exp(), torch.zeros(1, dtype=torch.float64)])
