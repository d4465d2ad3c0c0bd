"""Plug-and-Play feature and self-attention injection (Tumanyan et al., CVPR 2023).

The source image's diffusion features carry its structure: the residual features of the first decoder
levels hold the spatial layout, and the decoder's self-attention (its queries and keys, i.e. the affinity
between positions) holds how the parts relate. Translating the image with a new prompt while injecting
these from the source's own denoising pass keeps the layout and changes the appearance (paper, sec. 4;
reference: residual features at decoder layer 4 for the first 0.8 of the steps, self-attention queries and
keys at decoder layers 4 to 11 for the first 0.5, values never injected).

Here "decoder layer n" is ComfyUI's output block n (diffusers: up_blocks[n // 3].resnets[n % 3] for SD1.5).
The source runs in the same batch as its targets (item 0 of each chunk, as the pair guider lays them out),
so its features are injected at the same step and call they are computed in: target rows of a chunk take
the source row of that chunk, which keeps the unconditional chunk consistent under any batching.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import SELF, AttentionCall, AttentionController, AttentionSite, BatchLayout, FeatureCall, FeatureSite
from .structure import DECODER


def inject_source(x: torch.Tensor, layout: BatchLayout, strength: float = 1.0) -> torch.Tensor:
    """Target rows of each group moved towards the group's source row (item 0); strength 1 copies it."""
    if layout.items < 2 or strength == 0 or x.shape[0] != layout.size:
        return x
    shaped = x.reshape(-1, layout.items, *x.shape[1:])   # one group of items per row
    source = shaped[:, :1]
    targets = shaped[:, 1:]
    targets = source.expand_as(targets) if strength == 1 else torch.lerp(targets, source.expand_as(targets), strength)
    return torch.cat([source, targets], dim=1).reshape(x.shape)


@dataclass(frozen=True, eq=False)
class PlugAndPlay(AttentionController):
    """Injects the source's residual features and self-attention q, k into the targets (in pair runs only:
    a plain batch sampled with the patched model is left alone).

    `feature_layers` / `attention_layers`: decoder (output block) indices; `*_until`: fraction of the steps
    from the first during which they are injected; `strength`: 1 replaces the target's by the source's,
    smaller values interpolate (0 is no injection).
    """
    feature_layers: frozenset[int] = frozenset({4})
    feature_until: float = 0.8
    attention_layers: frozenset[int] = frozenset(range(4, 12))
    attention_until: float = 0.5
    strength: float = 1.0

    def wants_site(self, site: AttentionSite) -> bool:
        return site.kind == SELF and site.block == DECODER and site.block_id in self.attention_layers

    def acts_on(self, call: AttentionCall) -> bool:
        return (call.run.pair and call.layout.items > 1 and self.strength != 0 and self.wants_site(call.site)
                and call.before(self.attention_until))

    def edit_qkv(self, call: AttentionCall, q, k, v):
        return inject_source(q, call.layout, self.strength), inject_source(k, call.layout, self.strength), v

    def wants_feature(self, site: FeatureSite) -> bool:
        return site.block == DECODER and site.block_id in self.feature_layers

    def edit_features(self, call: FeatureCall, features: torch.Tensor) -> torch.Tensor:
        if not call.run.pair or call.layout.items < 2 or not call.before(self.feature_until):
            return features
        return inject_source(features, call.layout, self.strength)
