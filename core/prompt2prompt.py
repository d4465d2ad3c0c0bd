"""Prompt-to-Prompt (Hertz et al. 2022) and mutual self-attention (MasaCtrl, Cao et al. 2023) as controllers.

A pair run puts the source and its edits into one batch: latent item 0 is the source, items 1.. are
targets. The source runs untouched; each target takes over parts of the source's attention:
- `PromptToPrompt`: cross-attention maps of the source (word swap, refinement through a `TokenMap`,
  re-weighting by an equaliser) for the first fraction of steps, per target token, and the source's
  self-attention maps for a shorter fraction (paper, sec. 3.2). As in the paper's implementation only the
  conditional rows are edited and self-attention only at the small (<= 16x16) layers.
- `LocalBlend`: a mask from the cross-attention of chosen words in both prompts (sec. 3.2, "local editing");
  outside it the target is kept equal to the source.
- `MutualSelfAttention`: from a start step and start layer the targets' queries attend to the source's
  keys and values (MasaCtrl, sec. 4.2), optionally split into foreground and background by masks from a
  word's cross-attention (sec. 4.3).

Hosts may repeat a shorter context to batch prompts of different lengths (77 vs 154 tokens); the maps are
folded back to each prompt's own keys (`fold_repeated_context`) before they are compared or mapped.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .capture import AttentionMapStore, fold_repeated_context, normalise_per_map, unfold_repeated_context
from .attention import CROSS, SELF, AttentionCall, AttentionController, AttentionSite, level_grid
from .tokens import TokenMap

BLEND_LEVEL = 2   # maps of the 1/4-resolution layers: 16x16 for a 64x64 latent, as the paper's local blend


def pair_rows(call: AttentionCall, branch: str | None = "cond") -> list[tuple[int, list[int]]]:
    """(source row, target rows) of each chunk of `branch` (None: every chunk)."""
    layout = call.layout
    out = []
    for c, chunk_branch in enumerate(layout.chunks):
        if branch is None or chunk_branch == branch:
            first = c * layout.items
            out.append((first, list(range(first + 1, first + layout.items))))
    return out


@dataclass(frozen=True)
class PromptKeys:
    """Key positions of chosen words in one prompt, and that prompt's context length."""
    context_length: int
    positions: tuple[int, ...] = ()


class _WordMaps:
    """Sum of the chosen words' cross-attention maps per latent item, over heads, sites and steps."""

    def __init__(self):
        self.sums: torch.Tensor | None = None   # (items, h, w)

    def add(self, call: AttentionCall, probs: torch.Tensor, keys: tuple[PromptKeys, ...]) -> None:
        h, w = call.grid
        layout = call.layout
        maps = torch.zeros((layout.items, h * w), dtype=torch.float32, device=probs.device)
        for row in layout.rows("cond"):
            item = layout.item_of(row)
            if item < len(keys) and keys[item].positions:
                token_maps = fold_repeated_context(probs[row].mean(dim=0), keys[item].context_length)
                maps[item] += token_maps[:, list(keys[item].positions)].sum(dim=-1)
        maps = maps.reshape(layout.items, h, w)
        self.sums = maps if self.sums is None else self.sums + maps

    def normalised(self) -> torch.Tensor | None:
        return None if self.sums is None else normalise_per_map(self.sums)


def _is_map_site(call: AttentionCall, level: int) -> bool:
    return call.site.kind == CROSS and call.latent_hw is not None and call.grid == level_grid(call.latent_hw, level)


@dataclass(frozen=True, eq=False)
class PromptToPrompt(AttentionController):
    """Cross- and self-attention replacement from the source (item 0) into the targets (items 1..).

    `cross_until[j]`: fraction of the steps during which target key j takes the source's attention (word
    swap and refinement; tokens the target adds keep their own). `equalizer[j]` scales target key j's
    attention during that window (re-weighting; Hertz et al. apply it to the replaced maps).
    """
    token_map: TokenMap
    cross_until: tuple[float, ...]
    self_until: float = 0.4
    equalizer: tuple[float, ...] | None = None
    max_tokens: int = 32 * 32
    self_max_tokens: int = 16 * 16
    _tensors: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        n = self.token_map.target_length
        if len(self.cross_until) != n or (self.equalizer is not None and len(self.equalizer) != n):
            raise ValueError(f"cross_until / equalizer need one value per target key ({n})")

    def _tensor(self, name: str, device) -> torch.Tensor:
        key = (name, str(device))
        if key not in self._tensors:
            values = {"index": self.token_map.source_index, "aligned": self.token_map.aligned,
                      "until": self.cross_until, "equalizer": self.equalizer}[name]
            dtype = torch.long if name == "index" else torch.float32
            self._tensors[key] = torch.tensor(values, dtype=dtype, device=device)
        return self._tensors[key]

    def wants_site(self, site: AttentionSite) -> bool:
        return True

    def acts_on(self, call: AttentionCall) -> bool:
        if call.layout.items < 2 or "cond" not in call.layout.chunks:
            return False
        tokens = call.grid[0] * call.grid[1]
        if call.site.kind == SELF:
            return tokens <= self.self_max_tokens and call.before(self.self_until)
        return tokens <= self.max_tokens and call.before(max(self.cross_until, default=0.0))

    def needs_probs(self, call: AttentionCall) -> bool:
        return True

    def edit_probs(self, call: AttentionCall, probs: torch.Tensor) -> torch.Tensor:
        probs = probs.clone()
        for source, targets in pair_rows(call):
            if call.site.kind == SELF:
                probs[targets] = probs[source].clone()
            else:
                for row in targets:
                    probs[row] = self._cross(call, probs[source], probs[row])
        return probs

    def _cross(self, call: AttentionCall, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        device = source.device
        total = target.shape[-1]
        mapped = fold_repeated_context(source, self.token_map.source_length)[..., self._tensor("index", device)]
        own = fold_repeated_context(target, self.token_map.target_length)
        in_window = call.before(self._tensor("until", device)).float()
        active = in_window * self._tensor("aligned", device)
        edited = own + active * (mapped - own)
        if self.equalizer is not None:
            edited = edited * (1 + in_window * (self._tensor("equalizer", device) - 1))
        return unfold_repeated_context(edited, total)


@dataclass
class _BlendState:
    maps: _WordMaps = field(default_factory=_WordMaps)
    mask: torch.Tensor | None = None   # (targets, 1, H, W) bool, grows monotonically


@dataclass(frozen=True, eq=False)
class LocalBlend(AttentionController):
    """Keeps each target equal to the source outside the region of chosen words (Hertz et al., sec. 3.2).

    `keys[i]` are the words' key positions in item i's prompt (empty where a prompt lacks them). The mask
    follows the paper: word maps at the 1/4-resolution layers summed over steps so far, 3x3 max-pooled,
    resized to the latent, normalised to 1, thresholded, the source's region joined to each target's.
    A pixel once inside stays inside, so that a sampler keeping the outside equal keeps it equal forever.
    """
    keys: tuple[PromptKeys, ...]
    threshold: float = 0.3
    start: float = 0.0
    level: int = BLEND_LEVEL
    mask_store: AttentionMapStore = field(default_factory=AttentionMapStore)   # the last run's final mask

    def wants_site(self, site: AttentionSite) -> bool:
        return site.kind == CROSS

    def acts_on(self, call: AttentionCall) -> bool:
        return call.layout.items == len(self.keys) and _is_map_site(call, self.level) and "cond" in call.layout.chunks

    def needs_probs(self, call: AttentionCall) -> bool:
        return True

    def edit_probs(self, call: AttentionCall, probs: torch.Tensor) -> torch.Tensor:
        call.state(self).maps.add(call, probs, self.keys)
        return probs

    def new_run_state(self):
        return _BlendState()

    def end_run(self, state: _BlendState, success: bool) -> None:
        if success and state.mask is not None:
            self.mask_store.publish(state.mask.float().cpu())

    def update_mask(self, state: _BlendState, latent_hw: tuple[int, int]) -> torch.Tensor | None:
        """Fold the maps recorded so far into the mask; (targets, 1, H, W) float, or None before any map."""
        maps = state.maps.sums
        if maps is None:
            return None if state.mask is None else state.mask.float()
        pooled = F.max_pool2d(maps[:, None], kernel_size=3, stride=1, padding=1)
        pooled = F.interpolate(pooled, size=tuple(latent_hw), mode="nearest")
        inside = normalise_per_map(pooled) > self.threshold
        has_words = torch.tensor([bool(k.positions) for k in self.keys], device=inside.device)
        inside = inside & has_words[:, None, None, None]
        mask = inside[:1] | inside[1:]
        state.mask = mask if state.mask is None or state.mask.shape != mask.shape else state.mask | mask
        return state.mask.float()

    def blend(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x: (items, C, H, W) with the source first; targets become source + mask * (target - source)."""
        if mask is None:
            return x
        inside = mask.to(x.device) > 0.5   # the mask is binary: select rather than mix, exact on both sides
        return torch.cat([x[:1], torch.where(inside, x[1:], x[:1])])


@dataclass
class _MutualState:
    maps: _WordMaps = field(default_factory=_WordMaps)


@dataclass(frozen=True, eq=False)
class MutualSelfAttention(AttentionController):
    """MasaCtrl: from `start_step` on, at layers >= `start_layer`, every item's self-attention queries attend
    to the source's keys and values (in each of the conditional and unconditional chunks).

    With `mask_keys` (a foreground word's positions per item) the attention is split: target foreground
    queries see only the source's foreground keys, background queries only its background (sec. 4.3). The
    masks come from the word's cross-attention so far, normalised and thresholded, and are applied at
    self-attention sites of at most `mask_max_tokens` (elsewhere the unmasked mutual attention runs on the
    host's fast kernel).
    """
    start_step: int = 4
    start_layer: int = 10
    mask_keys: tuple[PromptKeys, ...] | None = None
    mask_threshold: float = 0.1
    mask_max_tokens: int = 32 * 32
    level: int = BLEND_LEVEL

    def wants_site(self, site: AttentionSite) -> bool:
        return (site.kind == SELF and site.layer >= self.start_layer) or (site.kind == CROSS and self.mask_keys is not None)

    def _mutual(self, call: AttentionCall) -> bool:
        return call.site.kind == SELF and call.site.layer >= self.start_layer and call.step >= self.start_step

    def acts_on(self, call: AttentionCall) -> bool:
        if call.layout.items < 2:
            return False
        if call.site.kind == CROSS:
            return self.mask_keys is not None and len(self.mask_keys) == call.layout.items \
                and _is_map_site(call, self.level)
        return self._mutual(call)

    def needs_probs(self, call: AttentionCall) -> bool:
        if call.site.kind == CROSS:
            return True
        return (self.mask_keys is not None and call.grid[0] * call.grid[1] <= self.mask_max_tokens
                and call.state(self).maps.sums is not None)

    def new_run_state(self):
        return _MutualState()

    def edit_qkv(self, call: AttentionCall, q, k, v):
        if call.site.kind == CROSS:
            return q, k, v
        k, v = k.clone(), v.clone()
        for source, targets in pair_rows(call, branch=None):
            k[targets] = k[source].clone()
            v[targets] = v[source].clone()
        return q, k, v

    def edit_probs(self, call: AttentionCall, probs: torch.Tensor) -> torch.Tensor:
        state = call.state(self)
        if call.site.kind == CROSS:
            state.maps.add(call, probs, self.mask_keys)
            return probs
        masks = self._masks(state, call.grid)   # (items, Nq) in {0, 1}
        probs = probs.clone()
        layout = call.layout
        for source, targets in pair_rows(call, branch=None):
            fg_keys = masks[layout.item_of(source)]
            # a source without foreground (or background) yet keeps plain mutual attention; decided on the
            # device, as reading the count back would stall the GPU at every call
            split = (fg_keys.sum() > 0) & (fg_keys.sum() < fg_keys.numel())
            for row in targets:
                p = probs[row]
                fg = p * fg_keys
                bg = p - fg
                fg = fg / fg.sum(dim=-1, keepdim=True).clamp(min=1e-12)
                bg = bg / bg.sum(dim=-1, keepdim=True).clamp(min=1e-12)
                query_fg = masks[layout.item_of(row)][None, :, None]
                probs[row] = torch.where(split, query_fg * fg + (1 - query_fg) * bg, p)
        return probs

    def _masks(self, state: _MutualState, grid: tuple[int, int]) -> torch.Tensor:
        maps = state.maps.normalised()
        resized = F.interpolate(maps[:, None], size=grid, mode="bilinear", align_corners=False)[:, 0]
        return (resized > self.mask_threshold).float().flatten(1)
