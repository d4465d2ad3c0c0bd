"""The UNet's structure (core/structure.py) read from diffusers UNets, and the structural statements of the
methods' SD1.5 layer defaults: what they select on SD1.5 and on SDXL."""
import pytest

pytest.importorskip("diffusers")

from editkit.core.diffusers_adapter import DiffusersAttentionAdapter, feature_modules, processor_sites, unet_structure
from editkit.core.structure import DECODER, ENCODER, MIDDLE, Block, UNetStructure
from support.tiny_models import make_diffusers_sdxl_unet, make_diffusers_unet

# (part, block_id) -> level of every block holding attention or opening with a ResBlock
SD15_LEVELS = {**{(ENCODER, i): lv for lv, ids in ((0, (1, 2)), (1, (4, 5)), (2, (7, 8)), (3, (10, 11))) for i in ids},
               (MIDDLE, 0): 3,
               **{(DECODER, i): 3 - i // 3 for i in range(12)}}
SDXL_LEVELS = {**{(ENCODER, i): lv for lv, ids in ((0, (1, 2)), (1, (4, 5)), (2, (7, 8))) for i in ids},
               (MIDDLE, 0): 2,
               **{(DECODER, i): 2 - i // 3 for i in range(9)}}


@pytest.fixture(scope="module")
def sd15():
    return make_diffusers_unet(seed=0)


@pytest.fixture(scope="module")
def sdxl():
    return make_diffusers_sdxl_unet(seed=0)


# --- the structural statements of today's SD1.5 defaults (one function each, asserted on both layouts) ---

def masactrl_layers(s: UNetStructure) -> list[int]:
    """MasaCtrl: the decoder's transformer layers at its two highest-resolution attention levels."""
    return [t.layer for t in s.layers_in(DECODER, s.attention_levels[:2])]


def decoder_layers(s: UNetStructure) -> list[int]:
    """Pix2Video / ConsiStory: the decoder's transformer layers."""
    return [t.layer for t in s.layers_in(DECODER)]


def pnp_attention_blocks(s: UNetStructure) -> list[int]:
    """Plug-and-Play's self-attention injection: the decoder's blocks holding attention, all but the first."""
    return [b.block_id for b in s.blocks_in(DECODER) if b.attention][1:]


def pnp_feature_block(s: UNetStructure) -> int:
    """Plug-and-Play's residual feature injection: the decoder's second block holding attention (the first of
    the attention injection's blocks)."""
    return pnp_attention_blocks(s)[0]


def test_sd15_levels_of_every_block(sd15):
    s = unet_structure(sd15)
    assert {(b.part, b.block_id): b.level for b in s.blocks if b.resblock or b.attention} == SD15_LEVELS
    assert [(b.part, b.block_id, b.level) for b in s.blocks if not b.resblock] == [
        (ENCODER, 0, 0), (ENCODER, 3, 0), (ENCODER, 6, 1), (ENCODER, 9, 2)]   # conv_in, the downsamplers
    assert s.attention_levels == (0, 1, 2, 3)   # the middle block holds the lowest level's attention
    assert len(s.layers) == 16
    assert {t.layer: t.level for t in s.layers} == {
        0: 0, 1: 0, 2: 1, 3: 1, 4: 2, 5: 2, 6: 3, 7: 2, 8: 2, 9: 2, 10: 1, 11: 1, 12: 1, 13: 0, 14: 0, 15: 0}


def test_sdxl_levels_of_every_block(sdxl):
    s = unet_structure(sdxl)
    assert {(b.part, b.block_id): b.level for b in s.blocks if b.resblock or b.attention} == SDXL_LEVELS
    assert s.attention_levels == (1, 2)
    assert len(s.layers) == 70
    assert [b.transformers for b in s.blocks_in(ENCODER)] == [0, 0, 0, 0, 2, 2, 0, 10, 10]
    assert s.blocks_in(MIDDLE)[0].transformers == 10
    assert [b.transformers for b in s.blocks_in(DECODER)] == [10, 10, 10, 2, 2, 2, 0, 0, 0]


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_sites_follow_the_structure(name, request):
    unet = request.getfixturevalue(name)
    s = unet_structure(unet)
    sites = sorted(processor_sites(unet).values(), key=lambda x: x.execution_order)
    assert [(x.layer, x.block, x.block_id, x.index) for x in sites[::2]] == [
        (t.layer, t.block, t.block_id, t.index) for t in s.layers]
    assert DiffusersAttentionAdapter(unet).site_list() == sites
    assert [(f.block, f.block_id) for f in feature_modules(unet)] == [(b.part, b.block_id) for b in s.feature_blocks]


def test_sd15_statements_select_todays_numbers(sd15):
    s = unet_structure(sd15)
    assert masactrl_layers(s) == list(range(10, 16))        # MasaCtrl's layers 10-15
    assert decoder_layers(s) == list(range(7, 16))          # Pix2Video / ConsiStory: the "decoder layers"
    assert pnp_attention_blocks(s) == list(range(4, 12))    # Plug-and-Play's attention output blocks 4-11
    assert pnp_feature_block(s) == 4                        # ... and its residual feature output block 4
    assert [b.block_id for b in s.blocks_in(DECODER) if b.resblock] == list(range(12))
    assert [b.block_id for b in s.blocks_in(DECODER) if b.attention] == list(range(3, 12))


def test_sdxl_statements_select(sdxl):
    s = unet_structure(sdxl)
    assert masactrl_layers(s) == list(range(34, 70))        # SDXL has two attention levels: the whole decoder
    assert decoder_layers(s) == list(range(34, 70))
    assert pnp_attention_blocks(s) == [1, 2, 3, 4, 5]
    assert pnp_feature_block(s) == 1
    assert [b.block_id for b in s.blocks_in(DECODER) if b.attention] == [0, 1, 2, 3, 4, 5]
    # MasaCtrl's official SDXL layers (GUIDE §8): the first transformer of the decoder's first level's second
    # and third blocks, and of its second level's first block
    first_level, second_level = (s.blocks_in(DECODER, [lv]) for lv in sorted(s.attention_levels, reverse=True))
    first_layer = {(t.block, t.block_id): t.layer for t in s.layers if t.index == 0}
    assert [first_layer[(DECODER, b.block_id)] for b in (first_level[1], first_level[2], second_level[0])] == [
        44, 54, 64]


def test_structure_rejects_blocks_out_of_order():
    with pytest.raises(ValueError):
        UNetStructure((Block(DECODER, 0, 0), Block(ENCODER, 1, 0)))
