"""Subject-driven shared self-attention over a batch of images (ConsiStory, Tewel et al. 2024, sec. 4.1).

Each latent of the batch is one image of its own prompt, every prompt naming the same subject. At the chosen
self-attention layers (the decoder's, as the paper's 'up' layers) an image's queries read, besides its own keys
and values, those of the other images that lie inside their subject masks, so the subject takes one look across
the batch while the rest of each image keeps its own layout:

- the masks come from the subject words' cross-attention at the 1/4-resolution layers (SDXL's 32x32 at 1024 px,
  SD1.5's 16x16 at 512 px) of the conditional rows, averaged over heads, layers and the last `MASK_STEPS` steps
  recorded before the current one, resized bilinearly to each self-attention layer's grid, thresholded by Otsu
  per word and joined over the subject words (the official code's AttentionStore);
- a random half (`dropout`) of each shared mask is dropped, drawn anew every step from the run's `seed`, which
  keeps the layouts varied (paper, "subject-driven self-attention", attention dropout);
- keys are read within one CFG chunk (the unconditional rows read unconditional keys through the same masks, as
  the official code does) and within one window of the batch layout;
- `share_weight` w scales the attention to the shared keys (their logits get log w): 1 is the paper's, 0 is plain
  attention (the controller then does nothing);
- `anchors` > 0: the images read only the subjects of the first `anchors` images (the official scripts' anchor
  mapping, two anchors); 0: every image reads every other.

The first step has no maps yet and runs plain (the official extended attention starts at step 1).

Not implemented: the paper's vanilla-query mixing of the first steps and its feature injection between images
(a second pass with DIFT correspondences); see the README.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .attention import CROSS, SELF, AttentionCall, AttentionController, AttentionSite, level_grid
from .capture import fold_repeated_context
from .masks import otsu_mask
from .prompt2prompt import PromptKeys

MASK_STEPS = 20   # the official AttentionStore averages the last 20 recorded maps of each layer
MASK_LEVEL = 2    # maps of the 1/4-resolution layers


@dataclass
class _SubjectState:
    maps: dict = field(default_factory=dict)    # step -> [summed (items, words, h*w) maps, count]
    grid: tuple[int, int] | None = None         # the maps' (h, w)
    masks: dict = field(default_factory=dict)   # (step, h, w) -> (items, h*w) bool, after dropout
    reads: dict = field(default_factory=dict)   # (step, h, w, device) -> (positions each image reads, key bias)


def dropout_seed(seed: int, step: int, grid: tuple[int, int]) -> int:
    """The seed of the dropout drawn at `step` for a self-attention grid: the same whatever the order of calls."""
    return (((seed * 1009 + step) * 4099 + grid[0]) * 4099 + grid[1]) % (2 ** 63)


def keep_draw(seed: int, step: int, grid: tuple[int, int], items: int, dropout: float) -> torch.Tensor:
    """(items, h*w) bool: the mask tokens kept at this step, each dropped with probability `dropout`."""
    generator = torch.Generator().manual_seed(dropout_seed(seed, step, grid))
    return torch.rand(items, grid[0] * grid[1], generator=generator, dtype=torch.float64) >= dropout


def subject_masks(maps: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(items, words, h, w) averaged maps -> (items, H*W) bool at `grid`: each word's map resized bilinearly,
    above its Otsu threshold, joined over the words."""
    items, words = maps.shape[:2]
    resized = F.interpolate(maps.reshape(items * words, 1, *maps.shape[2:]).float(), size=grid, mode="bilinear",
                            align_corners=False)
    return otsu_mask(resized.reshape(items, words, -1)).any(dim=1)


@dataclass(frozen=True, eq=False)
class ConsistentSubject(AttentionController):
    """`keys[i][j]`: the key positions of subject word j in image i's prompt (every image has every word).
    `layers`: the self-attention layers that share (transformer layers in UNet order)."""
    keys: tuple[tuple[PromptKeys, ...], ...]
    layers: tuple[int, ...]
    dropout: float = 0.5
    share_weight: float = 1.0
    seed: int = 0
    anchors: int = 0
    start: float = 0.0
    end: float = 1.0

    def __post_init__(self):
        if not self.keys or any(not words for words in self.keys):
            raise ValueError("subject: every prompt needs at least one subject word")
        if len({len(words) for words in self.keys}) != 1:
            raise ValueError("subject: every prompt must hold every subject word")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: {self.dropout} is not in [0, 1)")
        if self.share_weight < 0:
            raise ValueError(f"share_weight: {self.share_weight} is negative")
        if not 0 <= self.anchors <= len(self.keys):
            raise ValueError(f"anchors: {self.anchors} is not between 0 and the {len(self.keys)} prompts")
        if not 0.0 <= self.start < self.end <= 1.0:
            raise ValueError(f"start, end: need 0 <= start < end <= 1, got {self.start} and {self.end}")

    @property
    def images(self) -> int:
        return len(self.keys)

    def windows_problem(self) -> str | None:
        return "consistent subjects (their masks are of whole images, not of windows)"

    def wants_site(self, site: AttentionSite) -> bool:
        return site.kind == CROSS or site.layer in self.layers

    def _plain_batch(self, call: AttentionCall) -> bool:
        """A batch of the prompts' images; a pair run (an edit) or a one-image batch is left alone."""
        if call.run.pair or self.share_weight == 0 or self.images < 2:
            return False
        if call.frames is not None:
            raise ValueError("consistent subject: Keyframe Attention's frame windows split the batch of images; "
                             "set frame_window to 0")
        if call.layout.items != self.images:
            raise ValueError(f"batch_size: the sampled latent has {call.layout.items} images "
                             f"per batch but there are {self.images} prompts; give the latent one image per prompt")
        return True

    def acts_on(self, call: AttentionCall) -> bool:
        if not self._plain_batch(call) or call.latent_hw is None:
            return False
        if call.site.kind == CROSS:
            return call.grid == level_grid(call.latent_hw, MASK_LEVEL) and "cond" in call.layout.chunks
        return (call.site.layer in self.layers and call.within(self.start, self.end)
                and self._mask(call) is not None)

    def needs_probs(self, call: AttentionCall) -> bool:
        return call.site.kind == CROSS

    def new_run_state(self):
        return _SubjectState()

    # -- the subject maps (cross-attention) ----------------------------------------------------------------

    def edit_probs(self, call: AttentionCall, probs: torch.Tensor) -> torch.Tensor:
        state = call.state(self)
        layout = call.layout
        h, w = call.grid
        words = len(self.keys[0])
        maps = torch.zeros(self.images, words, h * w, dtype=torch.float32, device=probs.device)
        counts = torch.zeros(self.images, 1, 1, dtype=torch.float32, device=probs.device)
        for row in layout.rows("cond"):
            item = layout.item_of(row)
            prompt = self.keys[item]
            token_maps = fold_repeated_context(probs[row].mean(dim=0), prompt[0].context_length)
            maps[item] += torch.stack([token_maps[:, list(k.positions)].sum(dim=-1) for k in prompt]).float()
            counts[item] += 1
        maps = maps / counts.clamp(min=1)
        entry = state.maps.get(call.step)
        if entry is None:
            state.maps[call.step] = [maps, 1]
        else:
            entry[0] += maps
            entry[1] += 1
        state.grid = (h, w)
        return probs

    def _mask(self, call: AttentionCall) -> torch.Tensor | None:
        """(images, h*w) bool: the shared tokens of every image at this call's grid, None before any map."""
        state = call.state(self)
        key = (call.step,) + tuple(call.grid)
        if key not in state.masks:
            earlier = sorted(s for s in state.maps if s < call.step)[-MASK_STEPS:]
            if not earlier:
                return None
            mean = torch.stack([state.maps[s][0] / state.maps[s][1] for s in earlier]).mean(dim=0)
            mask = subject_masks(mean.reshape(*mean.shape[:2], *state.grid), call.grid)
            if self.dropout > 0:
                mask = mask & keep_draw(self.seed, call.step, call.grid, self.images, self.dropout).to(mask.device)
            state.masks = {k: v for k, v in state.masks.items() if k[0] == call.step}   # earlier steps are done
            state.masks[key] = mask
        return state.masks[key]

    # -- the shared keys (self-attention) ------------------------------------------------------------------

    def _reads(self, call: AttentionCall, device) -> tuple[torch.Tensor, torch.Tensor]:
        """What each image's rows read at this step and grid, as positions in its chunk's keys flattened over the
        images (image j's token t at j * tokens + t): (images, L) positions and (images, L) key bias. Its own
        tokens first (bias 0), then the other readable images' kept mask tokens (bias log share_weight), padded to
        the longest image's L (bias -inf). Only the readable keys are gathered, so the attention costs what the
        masks hold, not images times the tokens."""
        state = call.state(self)
        key = (call.step,) + tuple(call.grid) + (str(device),)
        if key not in state.reads:
            mask = self._mask(call).cpu()   # one read of the GPU per step and grid
            tokens = mask.shape[1]
            shared = math.log(self.share_weight) if self.share_weight != 1 else 0.0
            readable = range(self.anchors or self.images)
            positions, biases = [], []
            for i in range(self.images):
                others = [j * tokens + mask[j].nonzero()[:, 0] for j in readable if j != i]
                positions.append(torch.cat([i * tokens + torch.arange(tokens)] + others))
                biases.append(torch.cat([torch.zeros(tokens), torch.full((len(positions[-1]) - tokens,), shared)]))
            length = max(len(p) for p in positions)
            table = torch.zeros(self.images, length, dtype=torch.long)
            bias = torch.full((self.images, length), float("-inf"))
            for i, (p, b) in enumerate(zip(positions, biases)):
                table[i, :len(p)], bias[i, :len(b)] = p, b
            state.reads = {k: v for k, v in state.reads.items() if k[0] == call.step}   # earlier steps are done
            state.reads[key] = table.to(device), bias.to(device)
        return state.reads[key]

    def edit_qkv(self, call: AttentionCall, q, k, v):
        if call.site.kind != SELF:
            return q, k, v
        if k.shape[1] != q.shape[1]:
            raise ValueError("consistent subject: another controller already changed this layer's keys (Keyframe "
                             "Attention on the same layers?); share the subject on other layers")
        table, _ = self._reads(call, k.device)
        return q, _read(k, table, self.images), _read(v, table, self.images)

    def edit_bias(self, call: AttentionCall, k: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        if call.site.kind != SELF:
            return bias
        if bias is not None:
            raise ValueError("consistent subject: another controller already biases this layer's keys (a second "
                             "Consistent Subject?); apply one per model")
        table, own_bias = self._reads(call, k.device)
        if k.shape[1] != table.shape[1]:
            raise ValueError("consistent subject: another controller changes this layer's keys after it (Keyframe "
                             "Attention on the same layers?); share the subject on other layers")
        return own_bias.repeat(k.shape[0] // self.images, 1)


def _read(x: torch.Tensor, table: torch.Tensor, images: int) -> torch.Tensor:
    """(chunks * images, tokens, dim) -> (chunks * images, L, dim): row (chunk c, image i) gets the positions
    table[i] of chunk c's rows flattened over the images."""
    chunks = x.reshape(-1, images * x.shape[1], x.shape[2])           # each chunk's keys, image after image
    return chunks[:, table].reshape(-1, table.shape[1], x.shape[2])
