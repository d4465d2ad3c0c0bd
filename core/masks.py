"""Mask helpers shared by the methods that threshold soft maps (ConsiStory's subject masks, P3S's point masks)."""
from __future__ import annotations

import torch

OTSU_BINS = 256


def otsu_threshold(values: torch.Tensor, bins: int = OTSU_BINS) -> torch.Tensor:
    """Otsu's threshold (Otsu 1979) of each row of `values` (..., N) -> (...): the bin centre that maximises the
    between-class variance of a `bins`-bin histogram spanning the row's own range, as scikit-image's
    `threshold_otsu` computes it (ConsiStory thresholds its maps with that function). A constant row gets its
    value, so `values > threshold` is empty there."""
    lead = values.shape[:-1]
    x = values.reshape(-1, values.shape[-1]).double()
    low, high = x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)
    span = high - low
    flat = span[:, 0] <= 0
    scale = torch.where(span > 0, bins / span.clamp(min=torch.finfo(x.dtype).tiny), torch.zeros_like(span))
    index = ((x - low) * scale).floor().long().clamp(0, bins - 1)   # the last bin holds the maximum
    hist = torch.zeros(x.shape[0], bins, dtype=x.dtype, device=x.device).scatter_add_(1, index, torch.ones_like(x))
    edges = torch.linspace(0, 1, bins + 1, dtype=x.dtype, device=x.device)
    centres = low + span * (edges[:-1] + edges[1:]) / 2                      # (rows, bins)
    weight_low = hist.cumsum(1)
    weight_high = hist.flip(1).cumsum(1).flip(1)
    mass = hist * centres
    mean_low = mass.cumsum(1) / weight_low.clamp(min=1)
    mean_high = mass.flip(1).cumsum(1).flip(1) / weight_high.clamp(min=1)
    between = weight_low[:, :-1] * weight_high[:, 1:] * (mean_low[:, :-1] - mean_high[:, 1:]) ** 2
    threshold = centres.gather(1, between.argmax(dim=1, keepdim=True))[:, 0]
    threshold = torch.where(flat, low[:, 0], threshold)
    return threshold.to(values.dtype if values.is_floating_point() else torch.float64).reshape(lead)


def otsu_mask(values: torch.Tensor) -> torch.Tensor:
    """Boolean mask of each row above its Otsu threshold (..., N) -> (..., N)."""
    return values > otsu_threshold(values)[..., None]
