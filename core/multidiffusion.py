"""MultiDiffusion (Bar-Tal et al., ICML 2023) and SyncDiffusion (Lee et al., NeurIPS 2023): windows over a large
latent, fused per pixel at every step.

At each step every window (a crop of the latent the model was trained at, e.g. 64x64 latents for SD1.5) is
denoised on its own; each pixel takes the average of the predictions of the windows that cover it (paper,
eq. 5: the least-squares fusion of the views). Averaging the denoised predictions of windows that all see the
same x_t equals averaging their next latents for DDIM / Euler, and works for any sampler.

Region prompts (paper, sec. 4.2): every window is denoised with every prompt (a background and the regions);
prompt k's prediction counts with weight mask_k at each pixel, the background's mask being
clamp(1 - sum of the region masks). For the first steps ("bootstrapping") each region's window sees, outside
its mask, a random constant colour noised to the current step with the run's starting noise x_T (as the model's
input sees it) instead of the latent, so the region's subject forms on its own.

Everything here works on tensors (..., H, W) of the host's latents; windows may wrap around horizontally
(circular / 360-degree panoramas).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Window:
    """A window of the latent: rows top .. top + height - 1, columns left .. left + width - 1 (mod the latent's
    width when the layout is circular)."""
    top: int
    left: int
    height: int
    width: int


def _starts(size: int, window: int, stride: int) -> list[int]:
    """Window starts along one axis: every `stride`, the last one aligned to the edge when the stride does not
    divide (size - window) (the official code leaves those last pixels uncovered)."""
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


def window_layout(latent_hw: tuple[int, int], window_hw: tuple[int, int], stride: tuple[int, int],
                  circular: bool = False) -> list[Window]:
    """The windows over a latent of size latent_hw, row by row.

    Circular: the columns wrap, so windows start at every `stride` columns all around (the last ones cross the
    right edge into the left), as a 360-degree panorama needs; rows never wrap.
    """
    (h, w), (wh, ww), (sh, sw) = latent_hw, window_hw, stride
    if sh < 1 or sw < 1:
        raise ValueError(f"stride: must be at least 1, got {stride}")
    if wh > h or ww > w:
        raise ValueError(f"window: {wh}x{ww} latents is larger than the latent ({h}x{w}); use a smaller window or "
                         f"a larger image")
    tops = _starts(h, wh, sh)
    lefts = list(range(0, w, sw)) if circular and ww < w else _starts(w, ww, sw)
    return [Window(t, l, wh, ww) for t in tops for l in lefts]


def columns(window: Window, width: int, device=None) -> torch.Tensor:
    """Column indices of a window in a latent of `width` columns (wrapping past the right edge)."""
    return (torch.arange(window.left, window.left + window.width, device=device) % width)


def crop(x: torch.Tensor, window: Window) -> torch.Tensor:
    """x[..., window] (columns wrap)."""
    rows = x[..., window.top:window.top + window.height, :]
    if window.left + window.width <= x.shape[-1]:
        return rows[..., window.left:window.left + window.width]
    return rows.index_select(-1, columns(window, x.shape[-1], x.device))


def add_into(canvas: torch.Tensor, values: torch.Tensor, window: Window) -> None:
    """canvas[..., window] += values, in place (columns wrap)."""
    rows = canvas[..., window.top:window.top + window.height, :]
    if window.left + window.width <= canvas.shape[-1]:
        rows[..., window.left:window.left + window.width] += values
    else:
        rows.index_add_(rows.ndim - 1, columns(window, canvas.shape[-1], canvas.device), values)


def region_weights(masks: torch.Tensor | None, latent_hw: tuple[int, int]) -> torch.Tensor:
    """(1 + regions, H, W): the background's weight clamp(1 - sum of the regions), then each region's mask
    binarised at 0.5 and resized to the latent (nearest), as the official region code prepares them."""
    h, w = latent_hw
    if masks is None or masks.shape[0] == 0:
        return torch.ones(1, h, w)
    regions = torch.nn.functional.interpolate(masks[:, None].float(), size=(h, w), mode="nearest")[:, 0]
    regions = (regions >= 0.5).float()
    background = (1.0 - regions.sum(dim=0, keepdim=True)).clamp(min=0.0)
    return torch.cat([background, regions])


def bootstrap_choices(seed: int, step: int, regions: int, colours: int) -> list[int]:
    """Which bootstrapping colour each region's windows see at `step` (seeded by the run's seed and the step)."""
    generator = torch.Generator().manual_seed((int(seed) * 1000003 + step) % (2 ** 63))
    return torch.randint(0, colours, (regions,), generator=generator).tolist()


class Fusion:
    """Accumulates weighted window predictions into full-size canvases; `result` divides by the weights."""

    def __init__(self, like: torch.Tensor, outputs: int):
        self.values = [torch.zeros_like(like) for _ in range(outputs)]
        self.weights = torch.zeros((1, 1) + like.shape[2:], dtype=like.dtype, device=like.device)

    def add(self, index: int, window: Window, values: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        add_into(self.values[index], values if weight is None else values * weight, window)

    def add_weight(self, window: Window, weight: torch.Tensor | None = None) -> None:
        one = torch.ones((1, 1, window.height, window.width), dtype=self.weights.dtype, device=self.weights.device)
        add_into(self.weights, one if weight is None else weight, window)

    def result(self) -> list[torch.Tensor]:
        return [v / self.weights.clamp(min=1e-37) for v in self.values]
