"""Keyframe (cross-frame) self-attention for a batch of frames or images.

Each latent of the batch is a frame. At the chosen self-attention layers and steps, a frame's keys and values
are taken from its keyframes instead of from itself, so the frames share appearance:

- `first`: frame 0 (Text2Video-Zero, Khachatryan et al. 2023, sec. 3.3, "cross-frame attention");
- `first_and_previous`: frames 0 and i-1, concatenated (Pix2Video, Ceylan et al. 2023, sec. 3.2; its
  frame 0 reads itself);
- `middle`: frame F // 2 (FateZero's keyframe option, Qi et al. 2023);
- `all`: every frame of the batch (shared attention over a batch of images);
- `indices`: frames the user names.

Keys and values are only ever read within one chunk (CFG branch) and one window of the batch layout, so
the conditional frames read conditional keyframes and the unconditional ones unconditional keyframes, as
the official code does per CFG chunk; in a pair run (a video edit: the source clip and its edited clips
sampled side by side, core/pair.py) each clip's frames read keyframes of their own clip. Duplicated keyframes (frame 0's [0, 0] in `first_and_previous`) leave
the attention unchanged: a key and value pair seen twice keeps its share of the softmax.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from .attention import SELF, AttentionCall, AttentionController, AttentionSite, FrameWindow

MODES = ("first", "first_and_previous", "middle", "all", "indices")


def keyframes(mode: str, frames: int, indices: tuple[int, ...] = ()) -> list[list[int]]:
    """For each of `frames` frames, the frames whose keys and values it reads (every list the same length)."""
    if mode not in MODES:
        raise ValueError(f"mode: '{mode}' is not one of {', '.join(MODES)}")
    if mode == "first_and_previous" and frames < 2:
        raise ValueError("mode: first_and_previous (Pix2Video) needs a batch of at least 2 frames; this batch has 1")
    if mode == "indices":
        if not indices:
            raise ValueError("indices: name at least one keyframe (frame numbers from 0)")
        outside = [i for i in indices if not 0 <= i < frames]
        if outside:
            raise ValueError(f"indices: keyframe {outside[0]} is outside the batch of {frames} frames "
                             f"(valid: 0 to {frames - 1})")
        return [list(indices) for _ in range(frames)]
    if mode == "first":
        return [[0] for _ in range(frames)]
    if mode == "first_and_previous":
        return [[0, max(i - 1, 0)] for i in range(frames)]
    if mode == "middle":
        return [[frames // 2] for _ in range(frames)]
    return [list(range(frames)) for _ in range(frames)]


@dataclass(frozen=True, eq=False)
class KeyframeAttention(AttentionController):
    """Self-attention keys and values from keyframes, at `layers` (None: every self-attention layer) and in
    the steps int(start * N) <= step < int(end * N)."""
    mode: str = "first"
    indices: tuple[int, ...] = ()
    layers: tuple[int, ...] | None = None
    start: float = 0.0
    end: float = 1.0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode: '{self.mode}' is not one of {', '.join(MODES)}")
        if not 0.0 <= self.start < self.end <= 1.0:
            raise ValueError(f"start, end: need 0 <= start < end <= 1, got {self.start} and {self.end}")

    def wants_site(self, site: AttentionSite) -> bool:
        return site.kind == SELF and (self.layers is None or site.layer in self.layers)

    def acts_on(self, call: AttentionCall) -> bool:
        if not (self.wants_site(call.site) and call.within(self.start, self.end)):
            return False
        frames, _ = _frames_and_clips(call)
        table = _item_table(self.mode, self.indices, frames, call.frames)
        return any(row != (i,) for i, row in enumerate(table))   # not every frame reading only itself

    def new_run_state(self):
        return {}   # (layout, frames, device) -> the rows each batch row reads

    def edit_qkv(self, call: AttentionCall, q, k, v):
        key = (call.layout, call.frames, str(k.device))
        cache = call.state(self)
        if key not in cache:   # every self-attention call of a run has one of a few layouts
            frames, clips = _frames_and_clips(call)
            table = torch.tensor(_item_table(self.mode, self.indices, frames, call.frames), device=k.device)
            starts = torch.tensor(call.layout.window_starts(), device=k.device)        # every chunk and window
            clip = torch.arange(clips, device=k.device)
            # row (window w, frame f, clip c) reads rows (w, keyframe, c)
            rows = starts[:, None, None, None] + table[None, :, None, :] * clips + clip[None, None, :, None]
            cache[key] = rows.reshape(-1, table.shape[1])
        rows = cache[key]                                                              # (batch rows, keyframes)
        return q, gather_rows(k, rows), gather_rows(v, rows)


def _frames_and_clips(call: AttentionCall) -> tuple[int, int]:
    """(frames, clips) of each window of the batch: a pair run samples a source clip and its edited clips
    side by side, one group of rows per frame; any other batch is one clip whose items are its frames."""
    if call.run.pair:
        return call.layout.frames, call.layout.items
    return call.layout.items * call.layout.frames, 1


@lru_cache(maxsize=64)
def _item_table(mode: str, indices: tuple[int, ...], items: int,
                frames: FrameWindow | None) -> tuple[tuple[int, ...], ...]:
    """Each item's keyframes as item positions; with a frame window, the keyframes of the whole batch, which
    the window holds for its own frames (frame_windows puts them there). A borrowed keyframe whose own
    keyframes lie outside the window (Pix2Video's previous frame) reads itself in their place."""
    if frames is None:
        return tuple(tuple(row) for row in keyframes(mode, items, indices))
    table = keyframes(mode, frames.total, indices)
    position = {frame: i for i, frame in enumerate(frames.ids)}
    return tuple(tuple(position.get(f, i) for f in table[frame]) for i, frame in enumerate(frames.ids))


def gather_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(batch, tokens, dim) -> (batch, n * tokens, dim) for `rows` (batch, n): row r's tokens are those of the rows
    rows[r], in order (the keys and values a row reads from other latents of its batch)."""
    picked = x[rows.flatten()]
    return picked.reshape(rows.shape[0], rows.shape[1] * x.shape[1], x.shape[2])


def frame_windows(mode: str, total: int, size: int, indices: tuple[int, ...] = ()) -> list[tuple[list[int], int]]:
    """Long videos in windows of `size` frames (Text2Video-Zero's chunks with frame 0 prepended, generalised):
    each window is (frame ids, first kept position): the keyframes its frames read that lie outside it come
    first (their outputs are dropped), then its own frames, so memory is bounded by the window and the
    keyframes, not the video. With first, middle and indices every frame reads what it reads in one batch (the
    keyframes read only keyframes); with first_and_previous the borrowed previous frame is computed without
    its own previous frame, which one batch would give it. size 0 or >= total: one window."""
    table = keyframes(mode, total, indices)
    if size <= 0 or size >= total:
        return [(list(range(total)), 0)]
    if mode == "all":
        raise ValueError("frame_window: mode all reads every frame, so it cannot run in windows; use first, "
                         "first_and_previous, middle or indices, or set frame_window to 0")
    windows = []
    for start in range(0, total, size):
        own = list(range(start, min(start + size, total)))
        context = sorted({f for frame in own for f in table[frame]} - set(own))
        windows.append((context + own, len(context)))
    return windows


def previous_frame_pull(denoised: torch.Tensor, weight: float, sigma: float, sigma_next: float) -> torch.Tensor:
    """Pix2Video's latent guidance (Ceylan et al. 2023, sec. 3.3) as a change of the frames' predictions.

    The paper moves each frame's next latent against the gradient of weight * MSE(x0_prev, x0) taken with
    respect to the frame's predicted clean latent x0 only (the previous frame's prediction at the same step
    held fixed): x_{t-1} <- x_{t-1} - g, g = weight * 2 (x0_i - x0_{i-1}) / numel (frame 0 keeps its own).
    `denoised` (frames, C, H, W) are the guided predictions of one step from sigma to sigma_next; returned is
    the change of each prediction after which a first-order (Euler / DDIM) step from the shared latent lands
    on the moved latent: the step x + c (x - D) with c = (sigma_next - sigma) / sigma, in the sampler's space
    x = x_t / sqrt(alpha), moves by -c dD, so dD = g / (c sqrt(alpha_next))."""
    change = torch.zeros_like(denoised)
    if denoised.shape[0] < 2 or weight == 0 or sigma_next <= 0:
        return change
    per_frame = denoised[0].numel()
    gradient = weight * 2.0 * (denoised[1:] - denoised[:-1]) / per_frame
    c = (sigma_next - sigma) / sigma
    change[1:] = gradient * ((1.0 + sigma_next ** 2) ** 0.5 / c)
    return change
