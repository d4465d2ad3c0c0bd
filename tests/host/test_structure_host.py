"""The UNet's structure read from ComfyUI's own UNet module (nodes/comfy_attention.py unet_structure): the level of
every block on the SD1.5 and SDXL layouts, the same structure as diffusers gives for the same weights, and the
helpers that now read it (sites, feature sites, the decoder's default layers)."""
import pytest

from editkit.core.structure import DECODER, ENCODER, MIDDLE

SD15_LEVELS = {**{(ENCODER, i): lv for lv, ids in ((0, (0, 1, 2, 3)), (1, (4, 5, 6)), (2, (7, 8, 9)), (3, (10, 11)))
                  for i in ids},
               (MIDDLE, 0): 3,
               **{(DECODER, i): 3 - i // 3 for i in range(12)}}
SDXL_LEVELS = {**{(ENCODER, i): lv for lv, ids in ((0, (0, 1, 2, 3)), (1, (4, 5, 6)), (2, (7, 8))) for i in ids},
               (MIDDLE, 0): 2,
               **{(DECODER, i): 2 - i // 3 for i in range(9)}}


@pytest.fixture(scope="module")
def pack(host):
    import editkit.nodes.comfy_attention as comfy_attention
    return comfy_attention


@pytest.mark.parametrize("fixture, levels, layers", [("tiny", SD15_LEVELS, 16), ("tiny_sdxl", SDXL_LEVELS, 70)])
def test_levels_of_every_block(pack, request, fixture, levels, layers):
    s = pack.unet_structure(request.getfixturevalue(fixture)[0])
    assert {(b.part, b.block_id): b.level for b in s.blocks} == levels
    assert len(s.layers) == layers


@pytest.mark.parametrize("fixture, make", [("tiny", "make_diffusers_unet"), ("tiny_sdxl", "make_diffusers_sdxl_unet")])
def test_comfy_and_diffusers_give_the_same_structure(pack, request, fixture, make):
    import support.tiny_models as tiny_models
    from editkit.core.diffusers_adapter import processor_sites, unet_structure
    model = request.getfixturevalue(fixture)[0]
    unet = getattr(tiny_models, make)(seed=0)
    assert pack.unet_structure(model) == unet_structure(unet)
    assert pack.attention_sites(model) == sorted(processor_sites(unet).values(), key=lambda x: x.execution_order)


def test_helpers_read_the_structure(pack, tiny, tiny_sdxl):
    for model, decoder in ((tiny[0], range(7, 16)), (tiny_sdxl[0], range(34, 70))):
        s = pack.unet_structure(model)
        assert pack.transformer_blocks(model) == [(t.block, t.block_id, t.index) for t in s.layers]
        assert [(f.block, f.block_id) for f in pack.feature_sites(model)] == [
            (b.part, b.block_id) for b in s.feature_blocks]
        assert pack.chosen_self_layers(model, "", decoder=True) == tuple(decoder)
        assert pack.chosen_self_layers(model, "", decoder=False) is None
        modules = pack.transformer_modules(pack._unet(model))
        assert sorted(modules) == sorted(pack.transformer_blocks(model))
    # SD1.5's sites by name, as the nodes have always named them
    sites = pack.attention_sites(tiny[0])
    assert [x.name for x in sites[:4]] == ["input1.0.self", "input1.0.cross", "input2.0.self", "input2.0.cross"]
    assert [(x.layer, x.name) for x in sites[-2:]] == [(15, "output11.0.self"), (15, "output11.0.cross")]
    assert [x.name for x in pack.feature_sites(tiny[0])][:3] == ["input1.res", "input2.res", "input4.res"]
