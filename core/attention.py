"""One attention-control mechanism for every method that touches attention.

A host adapter (ComfyUI in `nodes/comfy_attention.py`, diffusers in `core/diffusers_adapter.py`) routes
each attention call of a UNet through `controlled_attention`. The call is described by an
`AttentionCall`: its `AttentionSite` (self or cross, block, transformer index, layer), the sampling step,
the token grid of the queries and the `BatchLayout` (which rows are conditional / unconditional and which
latent item each row belongs to). Controllers are small immutable objects; whatever they learn during a
sampling run lives in a `RunState` that the adapter creates at the start of the run, never in the
controller itself, so one patched model can serve several runs and several graphs without shared state.

The same controllers may also edit residual features: a `FeatureSite` is the residual branch of a UNet
block's residual block, seen through a `FeatureCall` with the same step and batch layout (Plug-and-Play).

Tensor conventions (those of the host's attention functions):
- q: (batch, query_tokens, heads * head_dim); k, v: (batch, key_tokens, heads * head_dim)
- probabilities: (batch, heads, query_tokens, key_tokens)
- key bias: (batch, key_tokens), added to every head's and query's logits before the softmax (-inf: a key the
  row does not read)
- output: (batch, query_tokens, heads * head_dim)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch

from .structure import BLOCK_ORDER, UNetStructure

SELF = "self"
CROSS = "cross"

# fast_attention(q, k, v, heads) -> out: the host's own attention kernel for the untouched path.
FastAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class AttentionSite:
    """Where an attention call happens, named as ComfyUI names UNet blocks.

    `block`/`block_id` are ComfyUI's ("input", 4), ("middle", 0), ("output", 7); `index` is the transformer
    block inside that UNet block (SDXL stacks several); `layer` counts transformer blocks through the UNet in
    execution order (SD1.5 has 16: the "layer 10" of MasaCtrl is layer index 10).
    """
    layer: int
    kind: str
    block: str
    block_id: int
    index: int = 0

    @property
    def name(self) -> str:
        return f"{self.block}{self.block_id}.{self.index}.{self.kind}"

    @property
    def execution_order(self) -> tuple[int, int]:
        """Sort key: layer by layer, self-attention before cross-attention, as a UNet runs them."""
        return self.layer, 0 if self.kind == SELF else 1


def sites_for_transformers(transformers: Iterable[tuple[str, int, int]]) -> list[AttentionSite]:
    """The self- and cross-attention sites of transformer blocks given as (block, block_id, index).

    Sorted into UNet execution order; `structure_sites` builds every adapter's site list through this function.
    """
    ordered = sorted(transformers, key=lambda t: (BLOCK_ORDER[t[0]], t[1], t[2]))
    sites = []
    for layer, (block, block_id, index) in enumerate(ordered):
        sites.append(AttentionSite(layer, SELF, block, block_id, index))
        sites.append(AttentionSite(layer, CROSS, block, block_id, index))
    return sites


def structure_sites(structure: UNetStructure) -> list[AttentionSite]:
    """The self- and cross-attention sites of every transformer layer of a UNet (core/structure.py)."""
    return sites_for_transformers((t.block, t.block_id, t.index) for t in structure.layers)


@dataclass(frozen=True)
class BatchLayout:
    """How the rows of a UNet batch map to branches, latent items and frames.

    Hosts concatenate the conditional and unconditional passes: rows are `len(chunks)` chunks, chunk c holding
    branch chunks[c] ("cond" / "uncond"). A chunk holds `groups` windows, each holding `frames` groups of
    `items` rows, a group holding latent items 0..items-1. A batch of windows of one latent (MultiDiffusion)
    has one window per group of rows, each an independent copy of the items; a pair run over the frames of a
    video has one group per frame, holding that frame's source (item 0) and targets. Controllers that pair
    the source with its targets pair rows within a group only.
    """
    chunks: tuple[str, ...]
    items: int
    groups: int = 1
    frames: int = 1

    @property
    def size(self) -> int:
        return len(self.chunks) * self.groups * self.frames * self.items

    @property
    def _per_chunk_groups(self) -> int:
        return self.groups * self.frames

    def rows(self, branch: str | None = None, item: int | None = None) -> list[int]:
        return [start + i for start in self.group_starts(branch) for i in range(self.items)
                if item is None or i == item]

    def group_starts(self, branch: str | None = None) -> list[int]:
        """The first row of every group of paired items (every frame of every window) of every chunk of
        `branch` (None: all chunks)."""
        per_chunk = self._per_chunk_groups
        return [(c * per_chunk + g) * self.items for c, chunk_branch in enumerate(self.chunks)
                if branch is None or chunk_branch == branch for g in range(per_chunk)]

    def window_starts(self, branch: str | None = None) -> list[int]:
        """The first row of every window of every chunk of `branch`: its frames follow, `items` rows each."""
        return self.group_starts(branch)[::self.frames]

    def item_of(self, row: int) -> int:
        return row % self.items

    def frame_of(self, row: int) -> int:
        return (row // self.items) % self.frames

    def frame_item_of(self, row: int) -> int:
        """The row's place in its window, frame-major: frame_of(row) * items + item_of(row)."""
        return row % (self.frames * self.items)

    def branch_of(self, row: int) -> str:
        return self.chunks[row // (self._per_chunk_groups * self.items)]

    @staticmethod
    def from_cond_or_uncond(cond_or_uncond: Sequence[int] | None, batch: int, groups: int = 1,
                            frames: int = 1) -> "BatchLayout":
        """ComfyUI passes 0 for a conditional chunk and 1 for an unconditional one. `groups` windows and
        `frames` frames per chunk apply when the batch divides into them."""
        chunks = tuple("uncond" if c == 1 else "cond" for c in cond_or_uncond) if cond_or_uncond else ("cond",)
        if batch % len(chunks):
            return BatchLayout(("cond",), batch)
        per_chunk = batch // len(chunks)
        groups = groups if groups > 1 and per_chunk % groups == 0 else 1
        frames = frames if frames > 1 and per_chunk % (groups * frames) == 0 else 1
        return BatchLayout(chunks, per_chunk // (groups * frames), groups, frames)


def frame_groups(x: torch.Tensor, frames: int) -> torch.Tensor:
    """(frames * items, ...) rows in one group per frame (the batch of a pair run) -> (frames, items, ...)."""
    return x.reshape(frames, x.shape[0] // frames, *x.shape[1:])


class RunState:
    """Mutable state of one sampling run: one slot per controller, created by `controller.new_run_state()`."""

    def __init__(self, controllers: Sequence["AttentionController"] = ()):
        self._slots = {id(c): c.new_run_state() for c in controllers}
        self._controllers = list(controllers)
        self.host: dict = {}   # the adapter's own per-run cache (e.g. the step of the current evaluation)
        # True when the run samples a source (latent item 0) with its targets (items 1..), set by the pair
        # sampler; controllers that copy the source into the targets act only then, never on a plain batch.
        self.pair = False

    def of(self, controller: "AttentionController"):
        key = id(controller)
        if key not in self._slots:  # a controller added after the run began still gets its slot
            self._slots[key] = controller.new_run_state()
            self._controllers.append(controller)
        return self._slots[key]

    def finish(self, success: bool) -> None:
        for c in self._controllers:
            c.end_run(self._slots[id(c)], success)


class _StepWindow:
    """Step arithmetic shared by every call a controller sees (attention calls and feature calls)."""
    step: int
    num_steps: int
    run: RunState

    @property
    def progress(self) -> float:
        """Fraction of the run's steps already done when this call happens (0 at the first step)."""
        return self.step / max(self.num_steps, 1)

    def within(self, start: float, end: float, rows: int | None = None) -> bool:
        """Whether this step lies in the window [start, end) of the run, counted as the reference
        implementations count it: steps int(start * rows) to int(end * rows) - 1, where rows is the number of
        steps (Prompt-to-Prompt's cross-attention table has one row more than there are steps)."""
        rows = self.num_steps if rows is None else rows
        return int(start * rows) <= self.step < int(end * rows)

    def before(self, fraction: float) -> bool:
        """Whether this step lies in the first `fraction` of the run: step < int(fraction * steps)."""
        return self.within(0.0, fraction)

    def state(self, controller: "AttentionController"):
        return self.run.of(controller)


@dataclass
class AttentionCall(_StepWindow):
    site: AttentionSite
    heads: int
    step: int
    num_steps: int
    grid: tuple[int, int]          # (h, w) of the query tokens
    layout: BatchLayout
    run: RunState
    sigma: float | None = None
    latent_hw: tuple[int, int] | None = None   # (h, w) of the latent the UNet is denoising
    frames: "FrameWindow | None" = None        # which frames of a longer batch the items are (frame windows)


@dataclass(frozen=True)
class FrameWindow:
    """The items of an evaluation that holds some frames of a longer batch: item i is frame ids[i] of `total`."""
    ids: tuple[int, ...]
    total: int


@dataclass(frozen=True)
class FeatureSite:
    """The residual branch of the residual block that opens UNet block (`block`, `block_id`), named as
    ComfyUI names blocks: the output of its last convolution, before the skip connection is added
    (Plug-and-Play's "residual features", Tumanyan et al. 2023, sec. 4)."""
    block: str
    block_id: int

    @property
    def name(self) -> str:
        return f"{self.block}{self.block_id}.res"


@dataclass
class FeatureCall(_StepWindow):
    """One evaluation of a feature site; features are (batch, channels, h, w)."""
    site: FeatureSite
    step: int
    num_steps: int
    layout: BatchLayout
    run: RunState
    sigma: float | None = None
    latent_hw: tuple[int, int] | None = None


class AttentionController:
    """Base controller: does nothing. Override what the method needs.

    `wants_site` is asked once, when a model is patched: sites no controller wants get no patch and keep
    the host's attention untouched. `acts_on` is asked per call (step, grid and batch known then); when no
    controller acts on a call the host's fast kernel runs. Probabilities are materialised only when an
    acting controller says `needs_probs`.
    """

    def wants_site(self, site: AttentionSite) -> bool:
        return True

    def acts_on(self, call: AttentionCall) -> bool:
        return False

    def needs_probs(self, call: AttentionCall) -> bool:
        return False

    def edit_qkv(self, call: AttentionCall, q, k, v):
        return q, k, v

    def edit_bias(self, call: AttentionCall, k: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        """The key bias of the call (None: no bias), given the keys after every `edit_qkv` and the bias of the
        controllers before this one."""
        return bias

    def edit_probs(self, call: AttentionCall, probs: torch.Tensor) -> torch.Tensor:
        return probs

    def own_attention(self, call: AttentionCall, q, k, v, out: torch.Tensor) -> torch.Tensor:
        """The call's output after the controller computed some rows' attention itself from the edited q, k, v
        (with fused kernels), instead of asking for the whole batch's probabilities; `out` holds every row's
        output as computed so far."""
        return out

    def edit_output(self, call: AttentionCall, out: torch.Tensor) -> torch.Tensor:
        return out

    def new_run_state(self):
        return None

    def windows_problem(self) -> str | None:
        """Why the controller cannot run on a batch of windows of one latent (each window a group of the
        batch layout), or None when it acts within each window as it would on a whole latent."""
        return None

    def check_run(self, num_steps: int) -> None:
        """Raise a ValueError when a run of `num_steps` steps cannot do what the controller was set up for."""

    def end_run(self, state, success: bool) -> None:
        pass

    # Feature sites (residual branches of UNet blocks), asked like attention sites: once when patching,
    # then every call of a wanted site goes through `edit_features`.
    def wants_feature(self, site: FeatureSite) -> bool:
        return False

    def edit_features(self, call: FeatureCall, features: torch.Tensor) -> torch.Tensor:
        return features

    # Controllers are configuration: a host deep-copying its model options must share, not clone, them.
    def __deepcopy__(self, memo):
        return self


@dataclass(frozen=True)
class ControlSet:
    """The ordered controllers attached to one patched model. Immutable: adding one gives a new set."""
    controllers: tuple[AttentionController, ...] = field(default_factory=tuple)

    def with_controller(self, controller: AttentionController) -> "ControlSet":
        return ControlSet(self.controllers + (controller,))

    def wants_site(self, site: AttentionSite) -> bool:
        return any(c.wants_site(site) for c in self.controllers)

    def wants_feature(self, site: FeatureSite) -> bool:
        return any(c.wants_feature(site) for c in self.controllers)

    def __deepcopy__(self, memo):
        return self


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, d = x.shape
    return x.reshape(b, n, heads, d // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """At least float32: half-precision models get float32 probabilities, float64 ones keep float64."""
    return torch.promote_types(x.dtype, torch.float32)


def attention_probs(q: torch.Tensor, k: torch.Tensor, heads: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) per head, in float32 or wider whatever the model's dtype."""
    dtype = compute_dtype(q)
    qh = split_heads(q, heads).to(dtype)
    kh = split_heads(k, heads).to(dtype)
    scale = 1.0 / math.sqrt(qh.shape[-1])
    logits = qh @ kh.transpose(-1, -2) * scale
    if bias is not None:
        logits = logits + bias.to(dtype)[:, None, None, :]
    return torch.softmax(logits, dim=-1)


def apply_probs(probs: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    vh = split_heads(v, heads)
    dtype = torch.promote_types(probs.dtype, compute_dtype(v))
    return merge_heads((probs.to(dtype) @ vh.to(dtype)).to(v.dtype))


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Reference fast path (PyTorch SDPA) for hosts that have none of their own."""
    out = torch.nn.functional.scaled_dot_product_attention(split_heads(q, heads), split_heads(k, heads),
                                                           split_heads(v, heads))
    return merge_heads(out)


def biased_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, bias: torch.Tensor) -> torch.Tensor:
    """Attention with a key bias (batch, key_tokens), through PyTorch's fused kernels: the bias is broadcast over
    heads and queries, never materialised per query."""
    mask = bias.to(q.dtype)[:, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(split_heads(q, heads), split_heads(k, heads),
                                                           split_heads(v, heads), attn_mask=mask)
    return merge_heads(out)


def controlled_attention(call: AttentionCall, q, k, v, controllers: Sequence[AttentionController],
                         fast_attention: FastAttention) -> torch.Tensor:
    """Run one attention call through the controllers that act on it, in order."""
    active = [c for c in controllers if c.acts_on(call)]
    if not active:
        return fast_attention(q, k, v, call.heads)
    for c in active:
        q, k, v = c.edit_qkv(call, q, k, v)
    bias = None
    for c in active:
        bias = c.edit_bias(call, k, bias)
    if any(c.needs_probs(call) for c in active):
        probs = attention_probs(q, k, call.heads, bias)
        for c in active:
            probs = c.edit_probs(call, probs)
        out = apply_probs(probs, v, call.heads)
    elif bias is not None:   # the host's kernels take no bias of this shape
        out = biased_attention(q, k, v, call.heads, bias)
    else:
        out = fast_attention(q, k, v, call.heads)
    for c in active:
        out = c.own_attention(call, q, k, v, out)
    for c in active:
        out = c.edit_output(call, out)
    return out


def controlled_features(call: FeatureCall, features: torch.Tensor,
                        controllers: Sequence[AttentionController]) -> torch.Tensor:
    """Run one feature site's output through the controllers that want the site, in order."""
    for c in controllers:
        if c.wants_feature(call.site):
            features = c.edit_features(call, features)
    return features


def level_grid(latent_hw: tuple[int, int], level: int) -> tuple[int, int]:
    """Feature-map size at UNet level `level` (0: the latent's size); each level halves, rounding up."""
    h, w = latent_hw
    for _ in range(level):
        h, w = (h + 1) // 2, (w + 1) // 2
    return h, w


def token_grid(tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of a UNet feature map with `tokens` positions for a latent of size latent_hw.

    UNet levels halve the size with rounding up, so try successive downsampling factors.
    """
    h, w = latent_hw
    for _ in range(16):
        if h * w == tokens:
            return h, w
        h, w = (h + 1) // 2, (w + 1) // 2
    side = int(round(math.sqrt(tokens)))
    if side * side == tokens:
        return side, side
    raise ValueError(f"cannot place {tokens} attention tokens on a grid for a {latent_hw} latent")


def parse_layers(text: str, input_name: str) -> tuple[int, ...]:
    """'4-11', '4, 6, 8' or '' (none) -> sorted unique layer indices; malformed text is a ValueError."""
    layers: set[int] = set()
    for part in text.replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        low, dash, high = part.partition("-")
        try:
            first, last = (int(low), int(high)) if dash else (int(part), int(part))
        except ValueError:
            raise ValueError(f"{input_name}: cannot read '{part}'; write layer indices and ranges such as "
                             f"'4-11' or '4, 6, 8'") from None
        if first < 0 or last < first:
            raise ValueError(f"{input_name}: '{part}' is not a range of layer indices (from low to high, from 0)")
        layers.update(range(first, last + 1))
    return tuple(sorted(layers))
