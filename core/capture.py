"""Attention-map capture: average cross-attention maps per prompt token over chosen layers and steps.

As in Prompt-to-Prompt (Hertz et al. 2022, sec. 3), each pixel's cross-attention probabilities over the
prompt tokens say where each word lands; averaging them over heads, layers of moderate resolution and
steps gives a stable map per word. Local blend, MasaCtrl's masks and P3S reuse these maps.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .attention import CROSS, AttentionCall, AttentionController, AttentionSite


class AttentionMapStore:
    """Where a capture publishes the maps of its last successful run, for nodes downstream to read.

    A run whose steps all fell outside the capture's window publishes no maps (`maps` None, `runs` counted),
    so a reader can tell an empty window from a capture that never ran. Hosts may also record the prompt
    encodings the run sampled (`contexts`, one per latent item) so a reader can check the prompt it is given.
    """

    def __init__(self):
        self.maps: torch.Tensor | None = None   # (items, h, w, key_tokens), float32, CPU
        self.runs = 0
        self.contexts: torch.Tensor | None = None   # (items or 1, tokens, width) of the last run, CPU

    def publish(self, maps: torch.Tensor | None) -> None:
        self.maps = maps
        self.runs += 1


@dataclass
class _Accumulator:
    sums: dict = field(default_factory=dict)   # (h, w, key_tokens) -> [summed maps, count]


@dataclass(frozen=True, eq=False)
class AttentionMapCapture(AttentionController):
    """Records cross-attention maps of one branch ("cond" by default) at sites of at most `max_tokens`.

    `start` / `end` are fractions of the run's steps; `blocks` limits the UNet blocks that count.
    """
    store: AttentionMapStore = field(default_factory=AttentionMapStore)
    max_tokens: int = 32 * 32
    start: float = 0.0
    end: float = 1.0
    branch: str = "cond"
    blocks: tuple[str, ...] = ("input", "middle", "output")

    def windows_problem(self) -> str | None:
        return "attention-map capture (its maps are of whole images, not of windows)"

    def wants_site(self, site: AttentionSite) -> bool:
        return site.kind == CROSS and site.block in self.blocks

    def acts_on(self, call: AttentionCall) -> bool:
        h, w = call.grid
        in_steps = self.start <= call.progress and (call.progress < self.end or self.end >= 1.0)
        return (self.wants_site(call.site) and h * w <= self.max_tokens and in_steps
                and bool(call.layout.rows(self.branch)))

    def needs_probs(self, call: AttentionCall) -> bool:
        return True

    def new_run_state(self):
        return _Accumulator()

    def edit_probs(self, call: AttentionCall, probs: torch.Tensor) -> torch.Tensor:
        layout = call.layout
        rows = layout.rows(self.branch)
        per_row = probs[rows].mean(dim=1)                       # average over heads: (rows, Nq, Nk)
        per_item = torch.zeros((layout.items,) + per_row.shape[1:], dtype=torch.float32, device=probs.device)
        counts = torch.zeros(layout.items, dtype=torch.float32, device=probs.device)
        for r, row in enumerate(rows):                          # several cond chunks of one item: average
            per_item[layout.item_of(row)] += per_row[r]
            counts[layout.item_of(row)] += 1
        per_item = per_item / counts.clamp(min=1).view(-1, 1, 1)
        h, w = call.grid
        maps = per_item.reshape(layout.items, h, w, per_item.shape[-1]).detach()
        acc = call.state(self)
        key = (h, w, maps.shape[-1])
        if key in acc.sums:
            acc.sums[key][0] += maps
            acc.sums[key][1] += 1
        else:
            acc.sums[key] = [maps.clone(), 1]
        return probs

    def end_run(self, state: _Accumulator, success: bool) -> None:
        if success:
            self.store.publish(combine_maps(state.sums) if state is not None and state.sums else None)


def combine_maps(sums: dict) -> torch.Tensor:
    """Average maps recorded at several resolutions: resize each to the largest grid, weight by count.

    Bilinear resizing mixes neighbouring pixels with weights summing to one, so every pixel's
    probabilities over the key tokens still sum to one.
    """
    key_tokens = max(k[2] for k in sums)
    target = max(((k[0], k[1]) for k in sums), key=lambda hw: hw[0] * hw[1])
    total, weight = None, 0
    for (h, w, nk), (summed, count) in sums.items():
        maps = summed.float().cpu()
        if nk != key_tokens:   # different context lengths in one run: only the longest is kept
            continue
        maps = maps.permute(0, 3, 1, 2)
        if (h, w) != target:
            maps = F.interpolate(maps, size=target, mode="bilinear", align_corners=False)
        total = maps if total is None else total + maps
        weight += count
    return (total / weight).permute(0, 2, 3, 1).contiguous()


def fold_repeated_context(maps: torch.Tensor, context_length: int) -> torch.Tensor:
    """Hosts repeat a shorter context to batch it with a longer one; sum each token's repeats back up.

    A repeated key has the same logit in every copy, so the folded maps are the prompt's own."""
    nk = maps.shape[-1]
    if nk == context_length:
        return maps
    if nk % context_length:
        raise ValueError(f"attention has {nk} key tokens, which is not a multiple of the prompt's "
                         f"{context_length}: the conditioning does not come from this prompt")
    return maps.reshape(*maps.shape[:-1], nk // context_length, context_length).sum(dim=-2)


def unfold_repeated_context(maps: torch.Tensor, total: int) -> torch.Tensor:
    """The inverse of `fold_repeated_context`: spread each key's probability evenly over its repeats."""
    length = maps.shape[-1]
    if total == length:
        return maps
    copies = total // length
    return (maps / copies).repeat(*([1] * (maps.ndim - 1)), copies)


def word_maps(maps: torch.Tensor, positions: list[list[int]], context_length: int) -> torch.Tensor:
    """Maps of words from token maps: (items, h, w, Nk) -> (items, words, h, w), each word's tokens summed."""
    maps = fold_repeated_context(maps, context_length)
    return torch.stack([maps[..., pos].sum(dim=-1) for pos in positions], dim=1)


def normalise_per_map(maps: torch.Tensor) -> torch.Tensor:
    """Scale each (h, w) map to a maximum of 1."""
    peak = maps.flatten(-2).amax(dim=-1).clamp(min=1e-12)
    return maps / peak[..., None, None]


def resize_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(..., h, w) -> (..., H, W), bilinear."""
    lead = maps.shape[:-2]
    flat = maps.reshape(-1, 1, *maps.shape[-2:])
    out = F.interpolate(flat, size=size, mode="bilinear", align_corners=False)
    return out.reshape(*lead, *size)


def heat_colors(values: torch.Tensor) -> torch.Tensor:
    """Values in [0, 1], shape (...), to RGB (..., 3): black -> blue -> red -> yellow -> white."""
    stops = torch.tensor([[0, 0, 0], [0.1, 0.1, 0.8], [0.9, 0.1, 0.1], [1.0, 0.9, 0.1], [1, 1, 1]],
                         dtype=torch.float32)
    x = values.clamp(0, 1).float() * (len(stops) - 1)
    lo = x.floor().long().clamp(max=len(stops) - 2)
    frac = (x - lo.float()).unsqueeze(-1)
    return stops[lo] * (1 - frac) + stops[lo + 1] * frac


def heatmap_grid(maps: torch.Tensor, size: tuple[int, int], images: torch.Tensor | None = None,
                 overlay: float = 0.6) -> torch.Tensor:
    """(items, words, h, w) maps -> one RGB grid image (1, items*H, words*W, 3): a row per item, a column per word.

    With `images` (items, H, W, 3) the heat map is blended over each item's image.
    """
    items, words = maps.shape[:2]
    colored = heat_colors(resize_maps(normalise_per_map(maps), size))      # (items, words, H, W, 3)
    if images is not None:
        base = images[:, None, :, :, :3].float().cpu()
        colored = overlay * colored + (1 - overlay) * base
    rows = [torch.cat(list(colored[i]), dim=1) for i in range(items)]      # each (H, words*W, 3)
    return torch.cat(rows, dim=0).unsqueeze(0)
