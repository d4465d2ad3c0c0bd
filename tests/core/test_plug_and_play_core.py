"""Plug-and-Play injection (Tumanyan et al. 2023) on a tiny diffusers UNet sampling a source and a target
in one batch."""
import pytest
import torch

from editkit.core.attention import BatchLayout
from editkit.core.plug_and_play import PlugAndPlay, inject_source
from support.controllers import Recorder
from support.pair_sampling import STEPS, pair_sample


def test_inject_source_copies_or_interpolates_each_chunks_source_row():
    layout = BatchLayout(("cond", "uncond"), 3)
    x = torch.randn(6, 2, 3, 3, dtype=torch.float64)
    full = inject_source(x, layout)
    for first in (0, 3):
        assert torch.equal(full[first], x[first])
        assert torch.equal(full[first + 1], x[first]) and torch.equal(full[first + 2], x[first])
    half = inject_source(x, layout, 0.5)
    assert torch.allclose(half[4], (x[4] + x[3]) / 2) and torch.equal(half[3], x[3])
    assert torch.equal(inject_source(x, layout, 0.0), x)
    assert torch.equal(inject_source(x[:2], BatchLayout(("cond", "uncond"), 1)), x[:2])   # no target: unchanged


@pytest.fixture(scope="module")
def unet():
    pytest.importorskip("diffusers")
    from support.tiny_models import make_diffusers_unet
    return make_diffusers_unet(seed=0)


def _prompts():
    g = torch.Generator().manual_seed(3)
    return tuple(torch.randn(1, 77, 32, generator=g) for _ in range(4))   # source, target, uncond, target uncond


def test_source_prompt_as_target_with_full_injection_reproduces_the_source(unet):
    source, _, uncond, _ = _prompts()
    pnp = PlugAndPlay(feature_until=1.0, attention_until=1.0)
    x = pair_sample(unet, [pnp], source, source.clone(), uncond)
    assert (x[1] - x[0]).abs().max() < 1e-5
    alone = pair_sample(unet, [], source, source, uncond, items=1)
    assert (x[0] - alone[0]).abs().max() <= 1e-4 * alone.abs().max()   # batch size changes float rounding only


def test_a_plain_batch_is_never_injected(unet):
    source, target, uncond, target_uncond = _prompts()
    plain = pair_sample(unet, [], source, target, uncond, target_uncond=target_uncond, pair=False)
    patched = pair_sample(unet, [PlugAndPlay(feature_until=1.0, attention_until=1.0)], source, target, uncond,
                          target_uncond=target_uncond, pair=False)
    assert torch.equal(patched, plain)


def test_injection_fractions_zero_change_nothing(unet):
    source, target, uncond, target_uncond = _prompts()
    plain = pair_sample(unet, [], source, target, uncond, target_uncond=target_uncond)
    none = pair_sample(unet, [PlugAndPlay(feature_until=0.0, attention_until=0.0)], source, target, uncond,
                       target_uncond=target_uncond)
    assert torch.equal(none, plain)


def test_injected_features_and_queries_keys_equal_the_source_branch_at_each_step(unet):
    source, target, uncond, target_uncond = _prompts()
    pnp = PlugAndPlay()   # features at decoder layer 4 until 0.8, q and k at decoder layers 4..11 until 0.5
    recorder = Recorder(attention=lambda s: s.kind == "self" and s.block == "output",
                        features=lambda s: s.block == "output" and s.block_id in (4, 5))
    pair_sample(unet, [pnp, recorder], source, target, uncond, target_uncond=target_uncond)
    run = recorder.runs[-1]
    feature_steps, attention_steps = int(0.8 * STEPS), int(0.5 * STEPS)
    for step in range(STEPS):
        (record,) = run[("output4.res", step)]
        h = record["h"].reshape(2, 2, *record["h"].shape[1:])   # (chunk, item, ...)
        assert torch.equal(h[:, 1], h[:, 0]) == (step < feature_steps), step
        (untouched,) = run[("output5.res", step)]   # not an injected layer
        assert not torch.equal(untouched["h"][1], untouched["h"][0])
        for block_id in range(3, 12):
            (call,) = run[(f"output{block_id}.0.self", step)]
            injected = block_id >= 4 and step < attention_steps
            for name in ("q", "k"):
                t = call[name].reshape(2, 2, *call[name].shape[1:])
                assert torch.equal(t[:, 1], t[:, 0]) == injected, (block_id, step, name)
            v = call["v"].reshape(2, 2, *call["v"].shape[1:])
            assert not torch.equal(v[:, 1], v[:, 0])   # values are never injected


def test_injection_never_changes_the_source_and_keeps_the_target_closer_to_it(unet):
    source, target, uncond, target_uncond = _prompts()
    plain = pair_sample(unet, [], source, target, uncond, target_uncond=target_uncond)
    injected = pair_sample(unet, [PlugAndPlay()], source, target, uncond, target_uncond=target_uncond)
    assert torch.equal(injected[0], plain[0])
    assert not torch.allclose(injected[1], plain[1])
    assert (injected[1] - injected[0]).abs().mean() < (plain[1] - plain[0]).abs().mean()


def test_layer_lists_read_indices_and_ranges_and_refuse_anything_else():
    from editkit.core.attention import parse_layers
    assert parse_layers("4-11", "attention_layers") == tuple(range(4, 12))
    assert parse_layers(" 6, 4; 5-6 ", "x") == (4, 5, 6)
    assert parse_layers("", "x") == ()
    with pytest.raises(ValueError, match="feature_layers: cannot read 'four'"):
        parse_layers("four", "feature_layers")
    with pytest.raises(ValueError, match="attention_layers: '11-4' is not a range"):
        parse_layers("11-4", "attention_layers")
