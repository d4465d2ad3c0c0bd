"""A plain reference of ConsiStory's subject-driven self-attention (Tewel et al. 2024, sec. 4.1), for numerical tests.

Written from the paper and from reading the official repository (NVlabs/consistory: ``utils/ptp_utils.py``
AttentionStore, ``attention_processor.py`` ConsistoryExtendedAttnXFormersAttnProcessor, ``consistory_pipeline.py``);
no code of theirs is copied. What it does, as the official code does it:

* every step, each cross-attention layer whose queries form the maps' grid appends the conditional half's
  probabilities averaged over heads (one entry per layer and step);
* after each step, the masks: per layer the last 20 entries, all stacked and averaged; per image and subject token
  the map, resized bilinearly (align_corners False) to each self-attention grid, above scikit-image's
  ``threshold_otsu``, joined over the tokens; then a random share ``dropout`` of each mask dropped;
* from step 1 on, at the decoder's self-attention layers, batch row i (the batch is [uncond images, cond images])
  attends to the keys and values of its own CFG half, flattened over the images, keeping all of its own image's
  tokens and the other images' tokens inside their dropped masks (the loop over rows of the official processor);
  an image reads another only where the anchor mapping allows it;
* everything else is plain attention.

The dropout draws come from a callable given by the test (the official code draws from torch's global generator).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from skimage.filters import threshold_otsu

from .reference_keyframe import ddim_step, plain_attention, transformer_layers

LAST_ENTRIES = 20


class SubjectStore:
    """The maps, the masks and the dropout of one sampling run."""

    def __init__(self, images: int, tokens: Sequence[Sequence[int]], map_grid: tuple[int, int],
                 keep: Callable[[int, tuple[int, int], int], torch.Tensor], readable: torch.Tensor):
        self.images, self.tokens, self.map_grid, self.keep = images, tokens, map_grid, keep
        self.readable = readable        # (images, images) bool: image i may read image j's subject
        self.entries: dict[str, list[torch.Tensor]] = {}
        self.masks: dict[tuple[int, int], torch.Tensor] = {}   # grid -> (images, h*w) bool, after dropout
        self.step = 0

    def record(self, place: str, probs: torch.Tensor, heads: int) -> None:
        """probs (batch * heads, queries, keys) of a cross-attention layer on the batch [uncond, cond]."""
        if probs.shape[1] != self.map_grid[0] * self.map_grid[1]:
            return
        cond = probs[probs.shape[0] // 2:]
        self.entries.setdefault(place, []).append(cond.reshape(-1, heads, *cond.shape[1:]).mean(dim=1))

    def end_step(self, grids: Sequence[tuple[int, int]]) -> None:
        maps = torch.cat([torch.stack(e[-LAST_ENTRIES:]) for e in self.entries.values()]).mean(dim=0)
        self.step += 1
        for grid in grids:
            masks = []
            for i in range(self.images):
                per_token = []
                for t in self.tokens[i]:
                    m = maps[i, :, t].reshape(1, 1, *self.map_grid).double()
                    m = F.interpolate(m, size=grid, mode="bilinear", align_corners=False)[0, 0].numpy()
                    per_token.append(torch.from_numpy(m > threshold_otsu(m)).flatten())
                masks.append(torch.stack(per_token).any(dim=0))
            self.masks[grid] = torch.stack(masks) & self.keep(self.step, grid, self.images)

    def instance(self, i: int, grid: tuple[int, int]) -> torch.Tensor:
        """(images * h*w,) bool: the keys row image i reads, as the official get_extended_attn_mask_instance."""
        mask = self.masks[grid]
        out = torch.zeros(self.images, mask.shape[1], dtype=torch.bool)
        for j in range(self.images):
            out[j] = True if i == j else (mask[j] if self.readable[i, j] else False)
        return out.flatten()


class SubjectReference:
    """A diffusers attention processor: plain attention; cross-attention records into the store; at a shared
    self-attention layer from step 1 on, each row reads its half's images through its mask instance."""

    def __init__(self, store: SubjectStore, place: str, shared: bool):
        self.store, self.place, self.shared = store, place, shared

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        assert attention_mask is None and hidden_states.ndim == 3
        self_attention = encoder_hidden_states is None
        context = hidden_states if self_attention else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        batch, tokens = hidden_states.shape[:2]
        if not self_attention:
            d = q.shape[-1] // attn.heads
            qh = q.reshape(batch, tokens, attn.heads, d).transpose(1, 2)
            kh = k.reshape(batch, -1, attn.heads, d).transpose(1, 2)
            probs = torch.softmax(qh @ kh.transpose(-1, -2) / d ** 0.5, dim=-1)
            self.store.record(self.place, probs.flatten(0, 1), attn.heads)
            out = (probs @ v.reshape(batch, -1, attn.heads, d).transpose(1, 2)).transpose(1, 2).reshape(batch, tokens, -1)
        elif self.shared and self.store.step >= 1:
            side = int(round(tokens ** 0.5))
            half = batch // 2
            rows = []
            for r in range(batch):
                start = 0 if r < half else half
                keep = self.store.instance(r % half, (side, side))
                kr = k[start:start + half].flatten(0, 1)[keep]
                vr = v[start:start + half].flatten(0, 1)[keep]
                rows.append(plain_attention(q[r], kr, vr, attn.heads))
            out = torch.stack(rows)
        else:
            out = torch.stack([plain_attention(q[r], k[r], v[r], attn.heads) for r in range(batch)])
        return attn.to_out[1](attn.to_out[0](out))


def install(unet, store: SubjectStore, shared: Callable[[int, str], bool]) -> None:
    """Every attention of `unet` through a SubjectReference; self-attention of layers `shared(layer, part)` shares."""
    unet.set_attn_processor({name: SubjectReference(store, name, kind == "self" and shared(layer, part))
                             for name, (layer, part, kind) in transformer_layers(unet).items()})


@torch.no_grad()
def sample(unet, store: SubjectStore, x_T: torch.Tensor, conds: torch.Tensor, uncond: torch.Tensor,
           timesteps: Sequence[int], alphas: Sequence[float], guidance: float, grids: Sequence[tuple[int, int]],
           trace: list | None = None) -> torch.Tensor:
    """DDIM with classifier-free guidance over the images x_T (B, C, H, W), each with its own prompt `conds` (B, T,
    D), the official pipeline's batch [uncond images, cond images]; the store's masks are updated after each step."""
    images = x_T.shape[0]
    context = torch.cat([uncond.expand(images, -1, -1), conds])
    x = x_T
    for i, t in enumerate(timesteps):
        eps_u, eps_c = unet(torch.cat([x, x]), int(t), encoder_hidden_states=context).sample.chunk(2)
        x = ddim_step(x, eps_u + guidance * (eps_c - eps_u), alphas[i], alphas[i + 1])
        store.end_step(grids)
        if trace is not None:
            trace.append(x)
    return x
