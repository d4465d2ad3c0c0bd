"""What a UNet's structure is, so that methods state their layers by structure, not by SD1.5 numbers.

A `UNetStructure` lists the UNet's blocks in execution order, named as ComfyUI names them (input blocks, the
middle block, output blocks, each with its block id), with each block's **level** (0: the latent's
resolution, +1 per downsampling), how many transformer layers it holds and whether it opens with a ResBlock
(a feature site). Each host builds it once from the model itself (`nodes/comfy_attention.py unet_structure`,
`core/diffusers_adapter.py unet_structure`); everything else asks it.

Methods ask by structure: `attention_levels` (levels holding attention, highest resolution first),
`layers_in(part, levels)` (transformer layers of the encoder ("input"), middle or decoder ("output"), at given
levels), `blocks_in(part, levels)`. Example: MasaCtrl's SD1.5 layers 10-15 are
`layers_in(DECODER, attention_levels[:2])`, the decoder's layers at its two highest-resolution attention levels.

Torch-free and host-free: plain frozen dataclasses.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

ENCODER = "input"
MIDDLE = "middle"
DECODER = "output"
BLOCK_ORDER = {ENCODER: 0, MIDDLE: 1, DECODER: 2}


@dataclass(frozen=True)
class Block:
    """One UNet block: `part` ("input" / "middle" / "output") and `block_id` as ComfyUI names it, its level, how
    many transformer layers it holds and whether it opens with a ResBlock (whose residual branch is a feature
    site)."""
    part: str
    block_id: int
    level: int
    transformers: int = 0
    resblock: bool = False

    @property
    def attention(self) -> bool:
        return self.transformers > 0


@dataclass(frozen=True)
class TransformerLayer:
    """One transformer layer: `layer` counts them through the UNet in execution order (AttentionSite.layer);
    `index` is its place inside its block (SDXL stacks several)."""
    layer: int
    block: str
    block_id: int
    index: int
    level: int


@dataclass(frozen=True)
class UNetStructure:
    blocks: tuple[Block, ...]   # in execution order

    def __post_init__(self):
        key = [(BLOCK_ORDER[b.part], b.block_id) for b in self.blocks]
        if key != sorted(key):
            raise ValueError("UNetStructure: blocks must be given in execution order")

    @property
    def layers(self) -> tuple[TransformerLayer, ...]:
        """Every transformer layer, in execution order."""
        blocks = [(b, i) for b in self.blocks for i in range(b.transformers)]
        return tuple(TransformerLayer(n, b.part, b.block_id, i, b.level) for n, (b, i) in enumerate(blocks))

    @property
    def feature_blocks(self) -> tuple[Block, ...]:
        """The blocks that open with a ResBlock (feature sites), in execution order."""
        return tuple(b for b in self.blocks if b.resblock)

    @property
    def attention_levels(self) -> tuple[int, ...]:
        """The levels that hold attention, highest resolution (lowest level) first."""
        return tuple(sorted({b.level for b in self.blocks if b.attention}))

    def blocks_in(self, part: str | None = None, levels: Iterable[int] | None = None) -> tuple[Block, ...]:
        """The blocks of `part` (None: every part) at `levels` (None: every level), in execution order."""
        levels = None if levels is None else set(levels)
        return tuple(b for b in self.blocks
                     if (part is None or b.part == part) and (levels is None or b.level in levels))

    def layers_in(self, part: str | None = None,
                  levels: Iterable[int] | None = None) -> tuple[TransformerLayer, ...]:
        """The transformer layers of `part` (None: every part) at `levels` (None: every level)."""
        levels = None if levels is None else set(levels)
        return tuple(t for t in self.layers
                     if (part is None or t.block == part) and (levels is None or t.level in levels))
