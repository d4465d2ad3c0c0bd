"""Plain reference implementations of cross-frame (keyframe) self-attention, for numerical tests.

Written from the papers and from reading the official repositories; no code of theirs is copied:

* Text2Video-Zero (Khachatryan et al. 2023, sec. 3.3, "cross-frame attention";
  Picsart-AI-Research/Text2Video-Zero ``utils.py``, CrossFrameAttnProcessor): at every self-attention layer
  the batch is cut into its classifier-free-guidance chunks of F frames, and within a chunk every frame's
  keys and values (after the projections) are replaced by frame 0's; the queries stay the frame's own;
  cross-attention is left alone.
* Pix2Video (Ceylan et al. 2023, sec. 3.2; duyguceylan/pix2video ``code/custom_utils.py``): only the
  decoder's self-attention layers (SD1.5: the 9 of ``up_blocks``); frame i > 0 attends to the keys and values
  of frame 0 and of frame i - 1, concatenated (its own tokens are not among them); frame 0 is plain
  self-attention. The features are those of the same step and layer, which a batch of frames gives at once.
* FateZero (Qi et al. 2023, ChenyangQiQi/FateZero): the keyframe option that reads the middle frame F // 2.
* Shared attention over a batch (every frame reads the keys and values of all frames) and a fixed list of
  keyframes: the same operation with other source lists.

The reference is a diffusers attention processor (``CrossFrameReference``) installed on the self-attention
layers that read other frames, on its own copy of a ``UNet2DConditionModel`` with ``unet.set_attn_processor``
(every other attention keeps diffusers' processor); its attention is written out as
softmax(q k^T / sqrt(d)) v per head, a block of queries at a time (the keys of a frame reading all four frames
of a 64x64 latent are 16384 tokens), in the model's dtype: in float64 it takes twice the time and agrees with the
pack no better, the difference being float32 rounding through the rest of the UNet.
"""
from __future__ import annotations

import math
import re
from typing import Callable, Sequence

import torch

# frame, number of frames -> the frames whose keys and values that frame reads
Sources = Callable[[int, int], Sequence[int]]

QUERY_BLOCK = 512


def text2video_zero(frame: int, frames: int) -> list[int]:
    return [0]


def pix2video(frame: int, frames: int) -> list[int]:
    return [frame] if frame == 0 else [0, frame - 1]


def fatezero_middle(frame: int, frames: int) -> list[int]:
    return [frames // 2]


def every_frame(frame: int, frames: int) -> list[int]:
    return list(range(frames))


def fixed_keyframes(*keyframes: int) -> Sources:
    return lambda frame, frames: list(keyframes)


def plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """One batch row: q (N, C), k and v (M, C) -> (N, C): softmax(q k^T / sqrt(d)) v per head, written out,
    a block of queries at a time, in the dtype of q (at least float32)."""
    n, c = q.shape
    d = c // heads
    dtype = torch.promote_types(q.dtype, torch.float32)
    qh = q.to(dtype).reshape(n, heads, d).transpose(0, 1) / math.sqrt(d)     # (heads, N, d)
    kt = k.to(dtype).reshape(-1, heads, d).permute(1, 2, 0)                  # (heads, d, M)
    vh = v.to(dtype).reshape(-1, heads, d).transpose(0, 1)                   # (heads, M, d)
    out = torch.empty(heads, n, d, dtype=dtype)
    for s in range(0, n, QUERY_BLOCK):
        weights = qh[:, s:s + QUERY_BLOCK] @ kt                             # (heads, block, M)
        weights = weights.sub_(weights.amax(-1, keepdim=True)).exp_()
        out[:, s:s + QUERY_BLOCK] = (weights @ vh).div_(weights.sum(-1, keepdim=True))
    return out.transpose(0, 1).reshape(n, c).to(q.dtype)


class CrossFrameReference:
    """A diffusers attention processor: plain attention, and at a self-attention layer with `sources` (while
    `enabled`) each frame's keys and values taken from the frames `sources(frame, frames)` of its own CFG chunk.

    The batch holds len(batch) // frames chunks of `frames` rows each ([uncond frames, cond frames] as the
    diffusers pipelines of Text2Video-Zero and Pix2Video order it, or one chunk of frames)."""

    def __init__(self, frames: int, sources: Sources | None = None):
        self.frames = frames
        self.sources = sources
        self.enabled = True

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        # SD1.5's transformer attention: none of diffusers' optional extras is in play
        assert attention_mask is None and hidden_states.ndim == 3
        assert attn.spatial_norm is None and attn.group_norm is None and attn.norm_cross is None
        assert not attn.residual_connection and attn.rescale_output_factor == 1.0
        self_attention = encoder_hidden_states is None
        context = hidden_states if self_attention else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        batch = hidden_states.shape[0]
        rows = []
        for r in range(batch):
            kr, vr = k[r], v[r]
            if self_attention and self.sources is not None and self.enabled:
                assert batch % self.frames == 0
                chunk_start = r - r % self.frames
                read = [chunk_start + f for f in self.sources(r % self.frames, self.frames)]
                kr, vr = torch.cat([k[s] for s in read]), torch.cat([v[s] for s in read])
            rows.append(plain_attention(q[r], kr, vr, attn.heads))
        out = torch.stack(rows)
        return attn.to_out[1](attn.to_out[0](out))


_NAME = re.compile(r"^(down_blocks|mid_block|up_blocks)\.?(\d*)\.attentions\.(\d+)\.transformer_blocks\.(\d+)"
                   r"\.(attn1|attn2)\.processor$")
_PART = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


def transformer_layers(unet) -> dict[str, tuple[int, str, str]]:
    """Processor name -> (transformer layer in the order the UNet runs them, 'down' / 'mid' / 'up',
    'self' / 'cross'). SD1.5: layers 0-5 in the encoder, 6 in the middle, 7-15 in the decoder."""
    placed = {}
    for name in unet.attn_processors:
        m = _NAME.match(name)
        assert m is not None, name
        part, block, attention, block_index = m.group(1), int(m.group(2) or 0), int(m.group(3)), int(m.group(4))
        placed[name] = ((_PART[part], block, attention, block_index), part.split("_")[0],
                        "self" if m.group(5) == "attn1" else "cross")
    order = sorted({key for key, _, _ in placed.values()})
    return {name: (order.index(key), part, kind) for name, (key, part, kind) in placed.items()}


def install(unet, frames: int, sources: Sources | None = None,
            layers: Callable[[int, str], bool] = lambda layer, part: True,
            written_out_everywhere: bool = False) -> list[CrossFrameReference]:
    """Set the processors of `unet`: a CrossFrameReference reading its frames' `sources` on the self-attention
    of each transformer layer that `layers(layer, part)` accepts, diffusers' own attention everywhere else (as
    the official code leaves those layers alone), or with `written_out_everywhere` a CrossFrameReference of
    plain attention there. Returns the cross-frame processors (to switch them off outside a window of steps)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    processors, acting = {}, []
    for name, (layer, part, kind) in transformer_layers(unet).items():
        if kind == "self" and sources is not None and layers(layer, part):
            processors[name] = CrossFrameReference(frames, sources)
            acting.append(processors[name])
        else:
            processors[name] = CrossFrameReference(frames) if written_out_everywhere else AttnProcessor2_0()
    unet.set_attn_processor(processors)
    return acting


def ddim_step(x: torch.Tensor, eps: torch.Tensor, alpha: float, alpha_next: float) -> torch.Tensor:
    """Deterministic DDIM (eta 0) in the alpha parameterisation, as the official pipelines step."""
    x0 = (x - (1.0 - alpha) ** 0.5 * eps) / alpha ** 0.5
    return alpha_next ** 0.5 * x0 + (1.0 - alpha_next) ** 0.5 * eps


@torch.no_grad()
def sample(unet, x_T: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, timesteps: Sequence[int],
           alphas: Sequence[float], guidance: float, acting: Sequence[CrossFrameReference] = (),
           window: tuple[int, int] | None = None, trace: list | None = None) -> torch.Tensor:
    """DDIM with classifier-free guidance over the frames x_T (F, C, H, W), the official pipelines' batch:
    torch.cat([x] * 2) with contexts [uncond frames, cond frames]. `window` (first, last + 1): the steps in
    which the `acting` processors read other frames (all steps when None). `trace` gets x after every step."""
    frames = x_T.shape[0]
    context = torch.cat([uncond.expand(frames, -1, -1), cond.expand(frames, -1, -1)])
    x = x_T
    for i, t in enumerate(timesteps):
        for p in acting:
            p.enabled = window is None or window[0] <= i < window[1]
        eps_u, eps_c = unet(torch.cat([x, x]), int(t), encoder_hidden_states=context).sample.chunk(2)
        x = ddim_step(x, eps_u + guidance * (eps_c - eps_u), alphas[i], alphas[i + 1])
        if trace is not None:
            trace.append(x)
    return x
