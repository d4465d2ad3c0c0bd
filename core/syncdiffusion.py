"""SyncDiffusion (Lee et al., NeurIPS 2023): in the first steps of a MultiDiffusion panorama, every window's
latent takes a gradient step that brings its predicted image closer (LPIPS) to the anchor window's, so that
distant windows agree on colours and style.

Paper, Alg. 1 and eq. 6: x_t^(i) <- x_t^(i) - w_t * grad_{x_t^(i)} LPIPS(D(x0(x_t^(i))), D(x0(x_t^(anchor)))),
with x0 the prediction of the (guided) model, D the VAE decoder, the gradient flowing through the decoder, the
x0 formula and the UNet; then the MultiDiffusion step of every window from its updated latent. Settings of
the paper's code: anchor = the middle window, w_t = 20 * 0.95^t at step t, synchronised on the first 10 of 50
steps, every step.

The host's samplers work on x = x_t / sqrt(alpha_t) (sigma = sqrt((1 - alpha_t) / alpha_t)); in that space the
same step is x <- x - (w / alpha_t) grad_x L, since grad_{x_t} L = grad_x L / sqrt(alpha_t).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch


@dataclass(frozen=True)
class SyncSettings:
    weight: float = 20.0       # w_0 (paper: 20)
    decay: float = 0.95        # w_t = weight * decay^t (paper: 0.95)
    until: float = 0.2         # fraction of the steps that synchronise (paper: 10 of 50)
    every: int = 1             # synchronise when (t + 1) % every == 0 (paper: 1)
    batch: int = 1             # windows whose gradient is taken in one backward pass

    def active(self, step: int, steps: int) -> bool:
        """Whether step `step` of `steps` synchronises (the paper's code: (t + 1) % every == 0 and t < until)."""
        return self.weight != 0 and (step + 1) % self.every == 0 and step < int(self.until * steps)

    def weight_at(self, step: int) -> float:
        return self.weight * self.decay ** step


def anchor_index(windows: Sequence) -> int:
    """The anchor of the paper's code: the middle window of the row-major list."""
    return len(windows) // 2


def sync_shifts(guided: Callable[[list[int], torch.Tensor], torch.Tensor],
                decode: Callable[[torch.Tensor], torch.Tensor], lpips: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                crops: Sequence[torch.Tensor], anchor: int, weight: float, sigma: float, batch: int = 1) -> list:
    """How much each window's latent moves in this step: shift_v = (w / alpha) * grad_x LPIPS, so that its
    updated latent is crop_v - shift_v (None for the anchor, which never moves).

    guided(indices, x): the guided prediction of x0 for the stacked crops of windows `indices` (each crop is
    (rows, C, h, w); the rows are the batch's latents), differentiable w.r.t. x. decode(x0) -> images in [0, 1].
    lpips(a, b) -> one distance per image pair, images in [-1, 1]. Each latent row is compared to the anchor's
    image of the same row. Must run where autograd may record (outside inference mode).
    """
    rows = crops[anchor].shape[0]
    with torch.no_grad():
        anchor_image = decode(guided([anchor], crops[anchor])) * 2.0 - 1.0
    scale = weight * (1.0 + sigma ** 2)          # w / alpha_t
    others = [v for v in range(len(crops)) if v != anchor]
    shifts: list = [None] * len(crops)
    for start in range(0, len(others), max(1, batch)):
        chunk = others[start:start + max(1, batch)]
        with torch.enable_grad():
            x = torch.cat([crops[v] for v in chunk]).detach().requires_grad_(True)
            images = decode(guided(chunk, x)) * 2.0 - 1.0
            loss = lpips(images, anchor_image.repeat(len(chunk), 1, 1, 1)).sum()
            (grad,) = torch.autograd.grad(loss, x)
        for k, v in enumerate(chunk):
            shifts[v] = scale * grad[k * rows:(k + 1) * rows].detach()
    return shifts


def shift_correction(sigma: float, sigma_next: float) -> float:
    """The factor k with which the prediction D_v of a window evaluated at its shifted latent x - s_v is
    reported as D_v + k * s_v: a first-order step (Euler, DDIM) from the unshifted x with that prediction lands
    where the same step from x - s_v lands, so the sampler's update from the one shared latent gives each
    window's own update, averaged (x' = x + c (x - D), c = (sigma_next - sigma) / sigma: k = (1 + c) / c)."""
    return sigma_next / (sigma_next - sigma)
