"""Prompt-to-Prompt (Hertz et al. 2022) and mutual self-attention (MasaCtrl, Cao et al. 2023) as controllers.

A pair run puts the source and its edits into one batch: latent item 0 is the source, items 1.. are
targets. The source runs untouched; each target takes over parts of the source's attention:
- `PromptToPrompt`: cross-attention maps of the source, per target key and within its own step window (word
  swap and refinement through each target's `TokenMap`, re-weighting by an equaliser), and the source's
  self-attention maps within a shorter window (paper, sec. 3.2). As in the paper's implementation only the
  conditional rows are edited, cross-attention at every layer and self-attention at the small (<= 16x16)
  layers.
- `LocalBlend`: a mask from the cross-attention of chosen words in both prompts (sec. 3.2, "local editing");
  outside it each target's latent is put back onto the source's after every step.
- `MutualSelfAttention`: in chosen steps and layers the targets' queries attend to the source's keys and
  values (MasaCtrl, sec. 4.2), optionally split into foreground and background by masks from a word's
  cross-attention or given by the user (sec. 4.3).

Hosts may repeat a shorter context to batch prompts of different lengths (77 vs 154 tokens); the maps are
folded back to each prompt's own keys (`fold_repeated_context`) before they are compared or mapped.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .attention import (CROSS, SELF, AttentionCall, AttentionController, AttentionSite, biased_attention,
                        frame_groups, level_grid)
from .capture import AttentionMapStore, fold_repeated_context, normalise_per_map, unfold_repeated_context
from .tokens import TokenMap

BLEND_LEVEL = 2   # maps of the 1/4-resolution layers: 16x16 for a 64x64 latent, as the paper's local blend


def pair_rows(call: AttentionCall, branch: str | None = "cond") -> list[tuple[int, list[int]]]:
    """(source row, target rows) of each group of each chunk of `branch` (None: every chunk)."""
    items = call.layout.items
    return [(first, list(range(first + 1, first + items))) for first in call.layout.group_starts(branch)]


@dataclass(frozen=True)
class PromptKeys:
    """Key positions of chosen words in one prompt, and that prompt's context length."""
    context_length: int
    positions: tuple[int, ...] = ()


def _word_maps(call: AttentionCall, probs: torch.Tensor, keys: tuple[PromptKeys, ...]) -> torch.Tensor:
    """(frames * items, h, w): each frame's items' conditional maps of their words, averaged over heads, summed
    over the words (frame-major, as the rows of a group)."""
    h, w = call.grid
    layout = call.layout
    maps = torch.zeros((layout.frames * layout.items, h * w), dtype=probs.dtype, device=probs.device)
    for row in layout.rows("cond"):
        item = layout.item_of(row)
        if item < len(keys) and keys[item].positions:
            token_maps = fold_repeated_context(probs[row].mean(dim=0), keys[item].context_length)
            maps[layout.frame_item_of(row)] += token_maps[:, list(keys[item].positions)].sum(dim=-1)
    return maps.reshape(-1, h, w)


class _WordMaps:
    """Sum of the chosen words' cross-attention maps per latent item, over sites and steps."""

    def __init__(self):
        self.sums: torch.Tensor | None = None   # (frames * items, h, w)

    def add(self, call: AttentionCall, probs: torch.Tensor, keys: tuple[PromptKeys, ...]) -> None:
        maps = _word_maps(call, probs, keys)
        self.sums = maps if self.sums is None else self.sums + maps


def _is_map_site(call: AttentionCall, level: int) -> bool:
    return call.site.kind == CROSS and call.latent_hw is not None and call.grid == level_grid(call.latent_hw, level)


def _has_words(keys: tuple[PromptKeys, ...], device) -> torch.Tensor:
    return torch.tensor([bool(k.positions) for k in keys], device=device)


@dataclass(frozen=True)
class TargetEdit:
    """One target of a Prompt-to-Prompt run.

    `token_map`: how the target's keys take the source's maps. `cross_windows[j]`: the (start, end) fractions
    of the steps during which target key j takes them (word swap and refinement; tokens the target adds keep
    their own). `equalizer[j]` scales target key j's attention within its window (re-weighting; Hertz et al.
    apply it to the replaced maps).
    """
    token_map: TokenMap
    cross_windows: tuple[tuple[float, float], ...]
    equalizer: tuple[float, ...] | None = None

    def __post_init__(self):
        n = self.token_map.target_length
        if len(self.cross_windows) != n or (self.equalizer is not None and len(self.equalizer) != n):
            raise ValueError(f"cross_windows / equalizer need one value per target key ({n})")

    @staticmethod
    def uniform(token_map: TokenMap, cross_end: float, cross_start: float = 0.0,
                equalizer: tuple[float, ...] | None = None) -> "TargetEdit":
        return TargetEdit(token_map, ((cross_start, cross_end),) * token_map.target_length, equalizer)


@dataclass(frozen=True, eq=False)
class PromptToPrompt(AttentionController):
    """Cross- and self-attention replacement from the source (item 0) into the targets (items 1..).

    Windows count steps as the reference implementation does: key j of a target is replaced at steps
    int(start * (N + 1)) <= step < int(end * (N + 1)) (its cross-attention table has N + 1 rows), the
    self-attention at int(start * N) <= step < int(end * N). `max_tokens` caps the cross-attention layers
    edited (None: every layer, as the reference); `self_max_tokens` the self-attention layers (16x16 in the
    paper's generated-image code, 32x32 in its real-image code).

    `fusion`: FateZero's attention fusion (Qi et al. 2023, sec. 3.2): in the self-attention window the
    targets keep their own self-attention inside the region of chosen source words and take the source's
    outside it, M * target + (1 - M) * source, per frame.
    """
    targets: tuple[TargetEdit, ...]
    self_window: tuple[float, float] = (0.0, 0.4)
    max_tokens: int | None = None
    self_max_tokens: int = 16 * 16
    fusion: "AttentionFusion | None" = None
    _tensors: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        # the distinct cross windows, asked at every call
        object.__setattr__(self, "_windows", frozenset(w for t in self.targets for w in t.cross_windows))

    def _target_tensors(self, device) -> list[tuple[torch.Tensor, ...]]:
        """Per target: (gather index, gather weight, aligned, equaliser or None) on `device`."""
        key = str(device)
        if key not in self._tensors:
            tables = []
            for t in self.targets:
                index, weight = t.token_map.gather()
                tables.append((torch.tensor(index, dtype=torch.long, device=device),
                               torch.tensor(weight, dtype=torch.float64, device=device),
                               torch.tensor(t.token_map.aligned, device=device),
                               None if t.equalizer is None else torch.tensor(t.equalizer, dtype=torch.float64,
                                                                             device=device)))
            self._tensors[key] = tables
        return self._tensors[key]

    def new_run_state(self):
        # (device, steps, step) -> per target: keys in their cross window (bool tensor) or None; the fusion's maps
        return {"fusion": _FusionState()}

    def _cross_active(self, call: AttentionCall, device) -> list[torch.Tensor | None]:
        cache = call.state(self)
        key = (str(device), call.num_steps, call.step)
        if key not in cache:
            rows = call.num_steps + 1
            active = []
            for t in self.targets:
                flags = [call.within(start, end, rows) for start, end in t.cross_windows]
                active.append(torch.tensor(flags, device=device) if any(flags) else None)
            cache[key] = active
        return cache[key]

    def acts_on(self, call: AttentionCall) -> bool:
        if call.layout.items != len(self.targets) + 1 or "cond" not in call.layout.chunks:
            return False
        tokens = call.grid[0] * call.grid[1]
        if call.site.kind == SELF:
            return tokens <= self.self_max_tokens and call.within(*self.self_window)
        if self.fusion is not None and _is_map_site(call, self.fusion.level) and call.within(0.0, self.self_window[1]):
            return True   # the fusion's maps
        if self.max_tokens is not None and tokens > self.max_tokens:
            return False
        return self._in_cross_window(call)

    def _in_cross_window(self, call: AttentionCall) -> bool:
        rows = call.num_steps + 1
        return any(call.within(start, end, rows) for start, end in self._windows)

    def needs_probs(self, call: AttentionCall) -> bool:
        return True

    def edit_probs(self, call: AttentionCall, probs: torch.Tensor) -> torch.Tensor:
        probs = probs.clone()
        if call.site.kind == SELF:
            keep = None if self.fusion is None else self.fusion.region(call, call.state(self)["fusion"])
            for source, targets in pair_rows(call):
                if keep is None:
                    probs[targets] = probs[source].clone()
                else:   # (queries,) of this frame: 1 where the targets keep their own attention
                    inside = keep[call.layout.frame_of(source)][None, None, :, None].to(probs.dtype)
                    probs[targets] = inside * probs[targets] + (1 - inside) * probs[source][None]
            return probs
        if self.fusion is not None and _is_map_site(call, self.fusion.level):
            self.fusion.record(call, probs, call.state(self)["fusion"])
            if self.max_tokens is not None and call.grid[0] * call.grid[1] > self.max_tokens \
                    or not self._in_cross_window(call):
                return probs
        active = self._cross_active(call, probs.device)
        tables = self._target_tensors(probs.device)
        for source, targets in pair_rows(call):
            for row, window, table in zip(targets, active, tables):
                if window is not None:
                    probs[row] = self._cross(probs[source], probs[row], window, table)
        return probs

    def _cross(self, source: torch.Tensor, target: torch.Tensor, window: torch.Tensor, table) -> torch.Tensor:
        index, weight, aligned, equalizer = table
        total = target.shape[-1]
        source = fold_repeated_context(source, self._source_length())
        own = fold_repeated_context(target, index.shape[0])
        picked = source[..., index.flatten()].reshape(*source.shape[:-1], *index.shape)
        mapped = (picked * weight.to(picked.dtype)).sum(dim=-1)
        edited = torch.where(window & aligned, mapped, own)
        if equalizer is not None:
            edited = edited * torch.where(window, equalizer.to(edited.dtype), torch.ones_like(equalizer, dtype=edited.dtype))
        return unfold_repeated_context(edited, total)

    def _source_length(self) -> int:
        return self.targets[0].token_map.source_length


@dataclass
class _FusionState:
    evaluation: tuple | None = None      # (step, sigma) of the maps being summed
    sums: torch.Tensor | None = None     # (frames, h, w) the source words' maps of that evaluation
    count: int = 0
    previous: torch.Tensor | None = None  # (frames, h, w) the mean maps of the last evaluation before it


@dataclass(frozen=True)
class AttentionFusion:
    """FateZero's self-attention fusion mask (Qi et al. 2023; its MaskBlend): from the source prompt's chosen
    words, their cross-attention maps of the 1/4-resolution layers (16x16 at 512 px) averaged over heads and
    layers, summed over the words, 3x3 max-pooled, resized (nearest) to the self-attention layer's grid,
    normalised to a peak of 1 per frame, > threshold. FateZero reads the maps of the inversion at the same
    step from memory (every map of every step: 100 GB for 8 frames); here the source is sampled next to the
    targets, and the maps are those of its previous evaluation (before the first one has run, the targets
    take the source's self-attention everywhere, as plain Prompt-to-Prompt)."""
    keys: PromptKeys
    threshold: float = 0.3
    level: int = BLEND_LEVEL

    def record(self, call: AttentionCall, probs: torch.Tensor, state: _FusionState) -> None:
        evaluation = (call.step, call.sigma)
        if state.evaluation != evaluation:
            if state.sums is not None:
                state.previous = state.sums / state.count
            state.evaluation, state.sums, state.count = evaluation, None, 0
        maps = _word_maps(call, probs, (self.keys,))[::call.layout.items]   # the source row of each frame
        state.sums = maps if state.sums is None else state.sums + maps
        state.count += 1

    def region(self, call: AttentionCall, state: _FusionState) -> torch.Tensor | None:
        """(frames, queries) in {0, 1}: where the targets keep their own self-attention, or None before any map."""
        maps = state.previous
        if state.evaluation is not None and state.evaluation != (call.step, call.sigma) and state.sums is not None:
            maps = state.sums / state.count   # the maps of an evaluation that has finished
        if maps is None:
            return None
        pooled = F.max_pool2d(maps[:, None].float(), kernel_size=3, stride=1, padding=1)
        resized = F.interpolate(pooled, size=call.grid, mode="nearest")
        return (normalise_per_map(resized) > self.threshold).flatten(1)


@dataclass
class _BlendState:
    words: _WordMaps = field(default_factory=_WordMaps)
    subtract: _WordMaps = field(default_factory=_WordMaps)
    mask: torch.Tensor | None = None   # (targets, 1, H, W) the last mask computed


@dataclass(frozen=True, eq=False)
class LocalBlend(AttentionController):
    """Keeps each target equal to the source outside the region of chosen words (Hertz et al., sec. 3.2).

    `keys[i]` are the words' key positions in item i's prompt (empty where a prompt lacks them). After each
    step from int(start * N) on, the mask is computed anew from the word maps of the 1/4-resolution layers
    summed over all steps so far: 3x3 max-pooled, resized to the latent (nearest), normalised to a peak of
    1, > threshold, the source's region joined to each target's; the region of the `subtract` words
    (no pooling, > subtract_threshold, also joined) is taken out of it (the paper's real-image code). The
    host then puts each target's latent back onto the source's outside the mask (`blend_denoised`).
    """
    keys: tuple[PromptKeys, ...]
    subtract: tuple[PromptKeys, ...] | None = None
    threshold: float = 0.3
    subtract_threshold: float = 0.3
    start: float = 0.0
    level: int = BLEND_LEVEL
    mask_store: AttentionMapStore = field(default_factory=AttentionMapStore)   # the last run's final mask

    def wants_site(self, site: AttentionSite) -> bool:
        return site.kind == CROSS

    def windows_problem(self) -> str | None:
        return "Prompt-to-Prompt's local blend (its mask comes from the attention maps of the whole image)"

    def acts_on(self, call: AttentionCall) -> bool:
        return call.layout.items == len(self.keys) and _is_map_site(call, self.level) and "cond" in call.layout.chunks

    def needs_probs(self, call: AttentionCall) -> bool:
        return True

    def edit_probs(self, call: AttentionCall, probs: torch.Tensor) -> torch.Tensor:
        state = call.state(self)
        state.words.add(call, probs, self.keys)
        if self.subtract is not None:
            state.subtract.add(call, probs, self.subtract)
        return probs

    def new_run_state(self):
        return _BlendState()

    def end_run(self, state: _BlendState, success: bool) -> None:
        if success and state.mask is not None:
            self.mask_store.publish(state.mask.float().cpu())

    def first_step(self, steps: int) -> int:
        """The first step after which the latents are blended: int(start * steps), as the reference's counter."""
        return int(self.start * steps)

    def _region(self, sums: torch.Tensor, keys, threshold: float, pool: bool, latent_hw) -> torch.Tensor:
        maps = sums[:, None]
        if pool:
            maps = F.max_pool2d(maps, kernel_size=3, stride=1, padding=1)
        maps = F.interpolate(maps, size=tuple(latent_hw), mode="nearest")
        inside = normalise_per_map(maps) > threshold
        per_frame = inside.reshape(-1, len(keys), *inside.shape[1:])                 # (frames, items, 1, H, W)
        per_frame = per_frame & _has_words(keys, inside.device)[None, :, None, None, None]
        return (per_frame[:, :1] | per_frame[:, 1:]).flatten(0, 1)

    def update_mask(self, state: _BlendState, latent_hw: tuple[int, int]) -> torch.Tensor | None:
        """The mask of this step from the maps recorded so far: (frames * targets, 1, H, W) float (each frame's
        targets, frame-major), None before any map."""
        if state.words.sums is None:
            return None
        mask = self._region(state.words.sums, self.keys, self.threshold, True, latent_hw)
        if self.subtract is not None and state.subtract.sums is not None:
            mask = mask & ~self._region(state.subtract.sums, self.subtract, self.subtract_threshold, False, latent_hw)
        state.mask = mask
        return mask.float()


def blend_denoised(x: torch.Tensor, denoised: torch.Tensor, mask: torch.Tensor, sigma: float,
                   sigma_next: float | None, frames: int = 1) -> torch.Tensor:
    """Denoised predictions whose first-order step lands each target on the blended latent.

    x, denoised: (frames * items, C, H, W), each frame's source first; mask: (frames * targets, 1, H, W) in
    {0, 1}. The reference blends the latents after the sampler's step: x_next = x_next_source + mask *
    (x_next_target - x_next_source). An Euler / DDIM step x_next = x + (sigma_next - sigma) / sigma * (x - D)
    lands there exactly when each target's D is solved from it; inside the mask that is the target's own D,
    and outside, where the target already sits on the source, the source's D. Without a `sigma_next` (an
    evaluation between two schedule steps, as second-order samplers make) the predictions themselves are
    blended.
    """
    inside = frame_groups(mask.to(x.device) > 0.5, frames)
    d = frame_groups(denoised, frames)
    source_d, target_d = d[:, :1], d[:, 1:]
    if sigma_next is None or sigma_next == 0.0:
        # the last step returns D itself
        return torch.cat([source_d, torch.where(inside, target_d, source_d)], dim=1).reshape(denoised.shape)
    rate = (sigma_next - sigma) / sigma
    xs = frame_groups(x.to(denoised.dtype), frames)
    source_x, target_x = xs[:, :1], xs[:, 1:]
    source_next = source_x + rate * (source_x - source_d)
    solved = target_x - (source_next - target_x) / rate          # lands target_x on source_next
    outside = torch.where(target_x == source_x, source_d, solved)
    return torch.cat([source_d, torch.where(inside, target_d, outside)], dim=1).reshape(denoised.shape)


@dataclass
class _MutualState:
    evaluation: tuple | None = None    # (step, sigma) of the maps below
    sums: torch.Tensor | None = None   # (frames * items, h, w) this evaluation's word maps over the 16x16 layers
    count: int = 0


@dataclass(frozen=True, eq=False)
class MutualSelfAttention(AttentionController):
    """MasaCtrl: at steps start_step <= step < end_step and transformer layers `layers`, every target's
    self-attention queries attend to the source's keys and values (in each of the conditional and
    unconditional chunks); with `union` to the source's and their own (MasaCtrl's union variant).

    Masked variants (sec. 4.3) split the attention: target foreground queries see only the source's
    foreground keys, background queries only its background. The masks are either `masks` given by the user
    (source, target; (H, W) in {0, 1}, nearest-resized to each layer), or come from the cross-attention of
    a word (`mask_keys`, its positions in each prompt) as in the reference's MaskAuto: the word's conditional
    maps of the current step's 16x16 layers (averaged), min-max normalised, nearest-resized, >= threshold;
    until the current step has produced a map, the attention is unmasked.
    """
    start_step: int = 4
    end_step: int | None = None
    layers: frozenset[int] = frozenset(range(10, 16))
    mask_keys: tuple[PromptKeys, ...] | None = None
    mask_threshold: float = 0.1
    masks: tuple[torch.Tensor, torch.Tensor] | None = None
    union: bool = False
    level: int = BLEND_LEVEL

    def __post_init__(self):
        if self.union and (self.mask_keys is not None or self.masks is not None):
            raise ValueError("MasaCtrl's union of source and target keys takes no mask")

    def wants_site(self, site: AttentionSite) -> bool:
        return (site.kind == SELF and site.layer in self.layers) or (site.kind == CROSS and self.mask_keys is not None)

    def windows_problem(self) -> str | None:
        if self.masks is not None or self.mask_keys is not None:
            return "MasaCtrl with masks (they cover the whole image; MasaCtrl without a mask works per window)"
        return None

    def check_run(self, num_steps: int) -> None:
        if self.start_step >= num_steps:
            raise ValueError(f"start_step: MasaCtrl starts at step {self.start_step}, but the sampler runs "
                             f"{num_steps} steps (0 to {num_steps - 1}), so it would change nothing; lower "
                             f"start_step or sample more steps")

    def _in_window(self, call: AttentionCall) -> bool:
        return self.start_step <= call.step and (self.end_step is None or call.step < self.end_step)

    def acts_on(self, call: AttentionCall) -> bool:
        if call.layout.items < 2:
            return False
        if call.site.kind == CROSS:
            return self.mask_keys is not None and len(self.mask_keys) == call.layout.items \
                and _is_map_site(call, self.level) and self._in_window(call) and "cond" in call.layout.chunks
        return call.site.layer in self.layers and self._in_window(call)

    def needs_probs(self, call: AttentionCall) -> bool:
        return call.site.kind == CROSS   # the word's maps; the masked self-attention is `own_attention`

    def new_run_state(self):
        return _MutualState()

    def edit_qkv(self, call: AttentionCall, q, k, v):
        if call.site.kind == CROSS:
            return q, k, v
        if self.union:
            return q, self._with_source(call, k), self._with_source(call, v)
        k, v = k.clone(), v.clone()
        for source, targets in pair_rows(call, branch=None):
            k[targets] = k[source].clone()
            v[targets] = v[source].clone()
        return q, k, v

    def _with_source(self, call: AttentionCall, x: torch.Tensor) -> torch.Tensor:
        """Each row's tokens preceded by its chunk's source row tokens (the source row sees itself twice,
        which leaves its attention unchanged)."""
        first = torch.cat([x[source:source + 1].expand(len(targets) + 1, -1, -1)
                           for source, targets in pair_rows(call, branch=None)])
        return torch.cat([first, x], dim=1)

    def edit_probs(self, call: AttentionCall, probs: torch.Tensor) -> torch.Tensor:
        if call.site.kind == CROSS:
            self._record(call, probs)
        return probs

    def own_attention(self, call: AttentionCall, q, k, v, out: torch.Tensor) -> torch.Tensor:
        """The masked variants' split attention of the target rows (the keys and values are already the
        source's), computed per region with a key mask: no probabilities are materialised."""
        if call.site.kind == CROSS or (self.masks is None and (self.mask_keys is None or
                                                               self._step_maps(call) is None)):
            return out
        foreground = self._foreground(call, q.device)   # (frames * items, tokens) bool
        layout = call.layout
        out = out.clone()
        for source, targets in pair_rows(call, branch=None):
            query_fg = torch.stack([foreground[layout.frame_item_of(row)] for row in targets])
            out[targets] = _split_attention(q[targets], k[source:source + 1], v[source:source + 1], call.heads,
                                            foreground[layout.frame_item_of(source)], query_fg)
        return out

    def _foreground(self, call: AttentionCall, device) -> torch.Tensor:
        """Each frame's items' foreground at this layer's token grid (frame-major): the source's (item 0) selects
        keys, a target's its queries."""
        if self.masks is not None:
            source, target = (m.to(device)[None] for m in self.masks)
            maps = torch.cat([source] + [target] * (call.layout.items - 1)).repeat(call.layout.frames, 1, 1)
            threshold = 0.5
        else:
            maps = _min_max(self._step_maps(call))
            threshold = self.mask_threshold
        grid = F.interpolate(maps[:, None].to(torch.promote_types(maps.dtype, torch.float32)), size=call.grid,
                             mode="nearest")[:, 0]
        return (grid >= threshold).flatten(1)

    def _record(self, call: AttentionCall, probs: torch.Tensor) -> None:
        state = call.state(self)
        if state.evaluation != (call.step, call.sigma):   # the reference clears its maps after every step
            state.evaluation, state.sums, state.count = (call.step, call.sigma), None, 0
        maps = _word_maps(call, probs, self.mask_keys)
        state.sums = maps if state.sums is None else state.sums + maps
        state.count += 1

    def _step_maps(self, call: AttentionCall) -> torch.Tensor | None:
        """The word's maps of this evaluation's 16x16 layers so far (averaged), or None before the first."""
        state = call.state(self)
        if state.evaluation != (call.step, call.sigma) or state.sums is None:
            return None
        return state.sums / state.count


def _min_max(maps: torch.Tensor) -> torch.Tensor:
    low = maps.flatten(1).amin(dim=1)[:, None, None]
    high = maps.flatten(1).amax(dim=1)[:, None, None]
    return (maps - low) / (high - low)


def _split_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, key_fg: torch.Tensor,
                     query_fg: torch.Tensor) -> torch.Tensor:
    """q: (rows, Nq, C) of rows reading one row's k, v: (1, Nk, C); key_fg (Nk,), query_fg (rows, Nq) bool.
    Foreground queries attend only to the foreground keys and background queries to the background keys, each
    a softmax of its own (what renormalising the probabilities within each region gives); a region without
    keys attends uniformly to all keys, i.e. takes the mean value (what the reference's masking with the float
    minimum gives). One fused call per region with a broadcast key mask, never a (queries x keys) matrix, and
    no read of the device (an empty region is selected on the device)."""
    rows = q.shape[0]
    k, v = k.expand(rows, -1, -1), v.expand(rows, -1, -1)
    mean = v.mean(dim=1, keepdim=True)
    parts = []
    for keys in (key_fg, ~key_fg):
        empty = ~keys.any()
        bias = torch.zeros(keys.shape, dtype=q.dtype, device=q.device).masked_fill(~(keys | empty), float("-inf"))
        parts.append(torch.where(empty, mean, biased_attention(q, k, v, heads, bias.expand(rows, -1))))
    return torch.where(query_fg[..., None], parts[0], parts[1])
