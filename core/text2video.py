"""Text2Video-Zero's motion dynamics in latent codes (Khachatryan et al. 2023, "Text2Video-Zero:
Text-to-Image Diffusion Models are Zero-Shot Video Generators", sec. 3.2).

The starting latents of a text-to-video batch are made from ONE sample, so that the frames share their
scene and the scene moves by a global translation:

1. x_T^1, the first frame's latent at the noise level T where the video's sampling starts;
2. Δt guided DDIM steps from T to T' = T − Δt give x_{T'}^1;
3. frame k = 1..F is x_{T'}^1 warped by the global translation δ^k = λ (k − 1) δ (δ the direction, by default
   (1, 1); λ the motion strength): x̃_{T'}^k = W_k(x_{T'}^1);
4. frames k = 2..F go back to level T by the forward (DDPM) process with fresh noise per frame,
   x_T^k = sqrt(ᾱ_T / ᾱ_{T'}) x̃_{T'}^k + sqrt(1 − ᾱ_T / ᾱ_{T'}) ε^k; frame 1 keeps x_T^1.

All F frames are then sampled from T with cross-frame attention (core/keyframe.py, mode `first`).

Everything here works in ComfyUI's sampling space, x = x_0 + σ ε (core/schedule.py): there the forward
process from σ' to σ > σ' is x_σ = x_{σ'} + sqrt(σ² − σ'²) ε, which is the DDPM forward step above after the
change of parameterisation x_t = sqrt(ᾱ_t) x with ᾱ = 1 / (1 + σ²) (test_text2video_core.py checks it in
float64): 1/ᾱ_T − 1/ᾱ_{T'} = σ_T² − σ_{T'}².

Against the official code (Picsart-AI-Research/Text2Video-Zero, `text_to_video_pipeline.py`), which these
functions follow: its x_T^1 is itself the DDIM trajectory of a sample drawn two steps earlier (timestep 981 ->
941 of 50 DDIM steps, then warped at 881, the `t1 = 47`, `t0 = 44` of its ascending timestep list), which the
composition below allows with `start_step` > 0; the warp samples the latent at p + δ^k (so the scene slides by
−δ^k on screen) with nearest-neighbour lookup and reflection padding, both the defaults here, and in `nearest`
mode on the whole-pixel offsets its resized flow grid rounds to (`official_nearest_offsets`); its forward step
uses the product of the alphas over [t0, t1) (ᾱ_{t1−1} / ᾱ_{t0−1}, one index off), here the exact ratio of the
two levels; its re-noising noise is drawn fresh for every warped frame, as here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

PADDINGS = ("reflection", "border", "zeros")
INTERPOLATIONS = ("nearest", "bilinear")

# denoise(x, sigmas) -> x: the guided deterministic (DDIM) steps from sigmas[0] to sigmas[-1], in sampling space
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _pair(shift_xy, name: str) -> tuple[float, float]:
    values = [float(v) for v in (shift_xy.tolist() if torch.is_tensor(shift_xy) else shift_xy)]
    if len(values) != 2 or not all(math.isfinite(v) for v in values):
        raise ValueError(f"{name}: expected two finite numbers (x, y), got {shift_xy!r}")
    return values[0], values[1]


def translate_latent(x: torch.Tensor, shift_xy, padding: str = "reflection",
                     interpolation: str = "bilinear") -> torch.Tensor:
    """x (..., H, W) with its content moved by shift_xy = (dx, dy) latent pixels:
    out[.., i, j] = x[.., i − dy, j − dx] (torch.roll's direction: positive x to the right, positive y down).

    Sub-pixel shifts are resampled by grid_sample on the exact pixel-centre grid (align_corners=False):
    `bilinear` interpolates, `nearest` first rounds the shift to whole pixels (halves upwards). Whole-pixel shifts
    are exact copies in both modes.
    The strip the shift uncovers is filled by `padding`:
    - `reflection` (default; the official code's): the content mirrored at the frame's edge, so the strip has
      the statistics of the latent around it (at T' the latent is still mostly noise, and a mirrored patch of
      noise is noise of the same variance);
    - `border`: the edge row / column repeated (streaks along the motion);
    - `zeros`: zeros (the strip then carries only the re-noising noise: too little variance at T).
    """
    if padding not in PADDINGS:
        raise ValueError(f"padding: '{padding}' is not one of {', '.join(PADDINGS)}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation: '{interpolation}' is not one of {', '.join(INTERPOLATIONS)}")
    if x.ndim < 2 or not x.is_floating_point():
        raise ValueError(f"x: expected a floating-point tensor (..., H, W), got {x.dtype} {tuple(x.shape)}")
    dx, dy = _pair(shift_xy, "shift_xy")
    if interpolation == "nearest":
        dx, dy = math.floor(dx + 0.5), math.floor(dy + 0.5)
    if dx == 0 and dy == 0:
        return x.clone()
    whole = float(dx).is_integer() and float(dy).is_integer()
    h, w = x.shape[-2:]
    flat = x.reshape(-1, 1, h, w)
    # source pixel of output pixel (i, j) is (i − dy, j − dx); normalised for align_corners=False
    rows = (torch.arange(h, dtype=torch.float64) - dy) * 2.0 / h + (1.0 / h - 1.0)
    cols = (torch.arange(w, dtype=torch.float64) - dx) * 2.0 / w + (1.0 / w - 1.0)
    grid = torch.stack(torch.meshgrid(cols, rows, indexing="xy"), dim=-1)          # (h, w, 2) as (x, y)
    grid = grid.to(x.device, x.dtype).expand(flat.shape[0], h, w, 2)
    out = F.grid_sample(flat, grid, mode="nearest" if whole else "bilinear", padding_mode=padding,
                        align_corners=False)
    return out.reshape(x.shape)


def motion_shifts(frames: int, direction=(1.0, 1.0), strength: float = 1.0) -> torch.Tensor:
    """(frames, 2) float64 translations δ^k = λ (k − 1) δ for k = 1..frames (paper sec. 3.2, step 4): row 0 is
    zero, row k is k·λ·δ. Units are those of `strength` (the node passes latent pixels); δ is not normalised,
    as in the paper (its default (1, 1) moves λ along each axis per frame)."""
    if int(frames) != frames or frames < 1:
        raise ValueError(f"frames: expected a whole number of at least 1, got {frames}")
    dx, dy = _pair(direction, "direction")
    strength = float(strength)
    if not math.isfinite(strength) or strength < 0:
        raise ValueError(f"strength: expected a finite number >= 0, got {strength}")
    k = torch.arange(int(frames), dtype=torch.float64)[:, None]
    return k * strength * torch.tensor([dx, dy], dtype=torch.float64)


def official_nearest_offsets(shifts: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """(F, 2) whole latent pixels at which the official warp samples, for sampling offsets δ^k (x, y) on a latent
    of `latent_hw`. The official flow lives on a 512x512 grid of pixel coordinates resized bilinearly to the
    latent, which puts each latent pixel's sampling point half a flow-grid cell behind p + δ (w / 1024 latent
    pixels across, h / 1024 down: 1/16 at 512 px), and its nearest lookup rounds that point. So 1.5 px per frame
    samples 1, 3, 4, 6 px away, and 6.55 px samples 6 (rounding δ itself gives 7). At an exact tie the official
    rounds half to even per pixel, which tears the frame every other column; here the whole frame rounds up."""
    h, w = latent_hw
    behind = torch.tensor([w / 1024.0, h / 1024.0], dtype=torch.float64)
    return torch.floor(shifts.double() - behind + 0.5)


def renoise(x: torch.Tensor, sigma_from: float, sigma_to: float, noise: torch.Tensor) -> torch.Tensor:
    """The forward (DDPM) process from level sigma_from up to sigma_to in sampling space:
    x + sqrt(sigma_to² − sigma_from²) · noise (paper sec. 3.2, step 6; see the module notes)."""
    sigma_from, sigma_to = float(sigma_from), float(sigma_to)
    if not (math.isfinite(sigma_from) and math.isfinite(sigma_to)) or sigma_from < 0 or sigma_to < sigma_from:
        raise ValueError(f"sigma_to: re-noising goes up in noise, from sigma {sigma_from} to {sigma_to}; "
                         f"expected 0 <= sigma_from <= sigma_to")
    if noise.shape != x.shape:
        raise ValueError(f"noise: shape {tuple(noise.shape)} differs from the latent's {tuple(x.shape)}")
    scale = math.sqrt(sigma_to * sigma_to - sigma_from * sigma_from)
    return x + scale * noise.to(x.device, x.dtype)


@dataclass(frozen=True)
class MotionLatents:
    """latents: (F, C, H, W) the frames at sigmas[start_step], frame 0 the first frame's own x_T;
    warped: (F, C, H, W) the warped x_{T'} before re-noising (frame 0 is x_{T'} itself);
    x_t, x_t_prime: the first frame at the two levels, (1, C, H, W)."""
    latents: torch.Tensor
    warped: torch.Tensor
    x_t: torch.Tensor
    x_t_prime: torch.Tensor


def motion_latents(start: torch.Tensor, sigmas: Sequence[float] | torch.Tensor, start_step: int, warp_step: int,
                   shifts: torch.Tensor, noise: torch.Tensor, denoise: Denoiser, padding: str = "reflection",
                   interpolation: str = "nearest") -> MotionLatents:
    """The F starting latents of a Text2Video-Zero video (paper sec. 3.2).

    start: (1, C, H, W) the first frame's latent at sigmas[0] (sampling space: the seed's noise, scaled);
    sigmas: the run's descending schedule (N steps, N + 1 values); the video is sampled from sigmas[start_step]
    (T), the first frame is warped at sigmas[warp_step] (T'), 0 <= start_step <= warp_step < N;
    shifts: (F, 2) the paper's δ^k (motion_shifts), in latent pixels; the warp samples x_{T'} at p + δ^k as the
    official code does, i.e. the content moves by −δ^k (`nearest`: at the whole pixels the official rounds to);
    noise: (F − 1, C, H, W) fresh standard normal noise of frames 2..F's forward step;
    denoise(x, sigmas): the guided DDIM steps over a slice of the schedule (called on sigmas[:start_step + 1]
    when start_step > 0, then on sigmas[start_step:warp_step + 1] when warp_step > start_step).
    """
    schedule = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
    steps = schedule.numel() - 1
    if start.ndim != 4 or start.shape[0] != 1:
        raise ValueError(f"start: expected the latent of one image (1, C, H, W), got {tuple(start.shape)}")
    if not 0 <= start_step <= warp_step:
        raise ValueError(f"start_step: {start_step} must be between 0 and warp_step ({warp_step})")
    if warp_step >= steps:
        raise ValueError(f"warp_step: {warp_step} must be below the number of steps ({steps})")
    if shifts.ndim != 2 or shifts.shape[1] != 2 or shifts.shape[0] < 1:
        raise ValueError(f"shifts: expected (frames, 2), got {tuple(shifts.shape)}")
    frames = shifts.shape[0]
    if noise.shape != (frames - 1, *start.shape[1:]):
        raise ValueError(f"noise: expected {(frames - 1, *start.shape[1:])} (one per frame after the first), got "
                         f"{tuple(noise.shape)}")
    x_t = denoise(start, schedule[:start_step + 1]) if start_step > 0 else start
    x_t_prime = denoise(x_t, schedule[start_step:warp_step + 1]) if warp_step > start_step else x_t
    if interpolation == "nearest":
        shifts = official_nearest_offsets(shifts, tuple(start.shape[-2:]))
    warped = torch.cat([translate_latent(x_t_prime, (-float(s[0]), -float(s[1])), padding, interpolation)
                        for s in shifts])
    sigma_t, sigma_t_prime = float(schedule[start_step]), float(schedule[warp_step])
    moved = renoise(warped[1:], sigma_t_prime, sigma_t, noise)
    latents = torch.cat([x_t.to(moved.dtype), moved])
    return MotionLatents(latents=latents, warped=warped, x_t=x_t, x_t_prime=x_t_prime)
