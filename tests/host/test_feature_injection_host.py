"""The Feature Injector node (Plug-and-Play) and its pair guider inside the real ComfyUI, on the tiny model."""
import pytest
import torch

from support.comfy_host import encode
from support.controllers import Recorder
from support.node_calls import attention_controller, feature_injector, invert

STEPS = 6
PHOTO_PROMPT = ""   # Plug-and-Play inverts with an empty prompt
TARGET_PROMPT = "a marble sculpture of a cat"
NEGATIVE_PROMPT = "ugly, blurry, black, low res, unrealistic"


@pytest.fixture(scope="module")
def photo(tiny):
    model, clip, vae = tiny
    g = torch.Generator().manual_seed(5)
    return {"samples": vae.encode(torch.rand(1, 64, 64, 3, generator=g))}


def _invert(tiny, photo, mode):
    model, clip, _ = tiny
    return invert(model, clip, photo, mode, STEPS, PHOTO_PROMPT)


@pytest.fixture(scope="module")
def direct(tiny, photo):
    return _invert(tiny, photo, "direct")


def _inject(tiny, inversion, target=TARGET_PROMPT, negative=NEGATIVE_PROMPT, **overrides):
    model, clip, _ = tiny
    return feature_injector(model, clip, inversion, target, negative, **overrides)


def _sample(guider, noised, sigmas, sampler="ddim"):
    import comfy.samplers
    return guider.sample(torch.zeros_like(noised), noised, comfy.samplers.sampler_object(sampler), sigmas,
                         disable_pbar=True, seed=0)


@pytest.mark.parametrize("mode", ["direct", "ddim"])
def test_the_source_row_is_the_photos_inversion_whatever_the_translation(tiny, photo, mode):
    """The source row is pinned to the stored inversion (pnp-diffusers' scheme): it ends on the photo's latent
    for every inversion mode, and the translation evolves on its own."""
    noised, inversion, sigmas = _invert(tiny, photo, mode)
    guider, _ = _inject(tiny, inversion, feature_until=1.0, attention_until=1.0)
    out = _sample(guider, noised, sigmas)
    assert out.shape == (2, *photo["samples"].shape[1:])
    assert (out[0] - photo["samples"][0]).abs().max() < 1e-4
    assert (out[1] - out[0]).abs().max() > 1e-3


def test_fractions_zero_give_what_the_unpatched_model_gives_the_target_prompt(tiny, photo):
    """No injection: the translation is plain CFG sampling of the target prompt from the noised photo."""
    import comfy.samplers
    model, clip, _ = tiny
    noised, inversion, sigmas = _invert(tiny, photo, "ddim")
    guider, _ = _inject(tiny, inversion, feature_until=0.0, attention_until=0.0)
    out = _sample(guider, noised, sigmas)
    plain = comfy.samplers.CFGGuider(model)
    plain.set_conds(encode(clip, TARGET_PROMPT), encode(clip, NEGATIVE_PROMPT))
    plain.set_cfg(5.0)
    expected = _sample(plain, noised, sigmas)[0]
    assert (out[1] - expected).abs().max() <= 1e-4 * expected.abs().max()
    injected = _sample(_inject(tiny, inversion)[0], noised, sigmas)
    assert (injected[1] - expected).abs().max() > 1e-2


def test_the_patched_model_samples_a_plain_batch_exactly_as_the_input_model(tiny, photo, direct):
    """Outside the pair guider nothing is injected (a batch's first image does not drive the others), and no
    hook stays on the shared UNet."""
    import comfy.samplers
    model, clip, _ = tiny
    noised, inversion, sigmas = direct
    _, patched = _inject(tiny, inversion)
    batch = torch.cat([noised, noised.flip(-1)])
    outs = []
    for m in (model, patched):
        guider = comfy.samplers.CFGGuider(m)
        guider.set_conds(encode(clip, TARGET_PROMPT), encode(clip, NEGATIVE_PROMPT))
        guider.set_cfg(5.0)
        outs.append(_sample(guider, batch, sigmas, sampler="euler"))
    assert torch.equal(outs[0], outs[1])
    unet = model.model.diffusion_model
    assert not any(m._forward_hooks for m in unet.modules())


def test_injected_features_and_queries_keys_equal_the_source_branch_at_each_step(tiny, direct):
    from editkit.nodes.comfy_attention import attach_controller
    from editkit.nodes.inversion import conditioning_context
    from editkit.nodes.pair_guider import PairCFGGuider
    model, clip, _ = tiny
    noised, inversion, sigmas = direct
    _, patched = _inject(tiny, inversion)
    recorder = Recorder(attention=lambda s: s.kind == "self" and s.block == "output",
                        features=lambda s: s.block == "output" and s.block_id in (4, 5))
    recorded = attach_controller(patched, recorder)   # after the injection: it sees the injected tensors
    guider = PairCFGGuider(recorded, [inversion.source_context, conditioning_context(encode(clip, TARGET_PROMPT), "p")],
                           None, 5.0, inversion=inversion,
                           target_negative=conditioning_context(encode(clip, NEGATIVE_PROMPT), "n"))
    _sample(guider, noised, sigmas)
    run = recorder.runs[-1]
    steps = sigmas.shape[-1] - 1   # ddim_uniform may give one step more than asked

    def pairs(tensor, layout):   # (chunk, item, ...)
        return tensor.reshape(len(layout.chunks), layout.items, *tensor.shape[1:])

    seen = 0
    for step in range(steps):
        for record in run[("output4.res", step)]:
            h = pairs(record["h"], record["layout"])
            assert torch.equal(h[:, 1], h[:, 0]) == (step < int(0.8 * steps)), step
            seen += 1
        for record in run[("output5.res", step)]:
            h = pairs(record["h"], record["layout"])
            assert not torch.equal(h[:, 1], h[:, 0])
        for block_id in range(3, 12):
            for record in run[(f"output{block_id}.0.self", step)]:
                injected = block_id >= 4 and step < int(0.5 * steps)
                for name in ("q", "k"):
                    t = pairs(record[name], record["layout"])
                    assert torch.equal(t[:, 1], t[:, 0]) == injected, (block_id, step, name)
    assert seen >= steps


def test_translation_keeps_the_photo_and_moves_the_target_only(tiny, photo, direct):
    model, clip, _ = tiny
    noised, inversion, sigmas = direct
    before = dict(model.model_options.get("transformer_options", {}))
    out = _sample(_inject(tiny, inversion)[0], noised, sigmas)
    free = _sample(_inject(tiny, inversion, feature_until=0.0, attention_until=0.0)[0], noised, sigmas)
    assert model.model_options.get("transformer_options", {}) == before
    assert (out[0] - photo["samples"][0]).abs().max() < 1e-4
    assert (out[1] - out[0]).abs().max() > 1e-3
    # structure kept: the injected translation stays closer to the photo than the free one
    assert (out[1] - out[0]).abs().mean() < (free[1] - free[0]).abs().mean()


def test_it_composes_with_an_attention_controller_on_its_model(tiny, photo, direct):
    """The Attention Controller's pair run on the injector's model gets both edits: the photo stays the source
    (direct inversion) and the injection changes the Prompt-to-Prompt translation."""
    model, clip, _ = tiny
    noised, inversion, sigmas = direct
    _, patched = _inject(tiny, inversion, feature_until=1.0, attention_until=1.0)
    settings = dict(negative_prompt="", edit="refine", inversion=inversion, source_prompt=PHOTO_PROMPT,
                    target_prompt="a watercolor painting")
    both = _sample(attention_controller(patched, clip, **settings), noised, sigmas)
    alone = _sample(attention_controller(model, clip, **settings), noised, sigmas)
    assert torch.isfinite(both).all()
    assert (both[0] - photo["samples"][0]).abs().max() < 1e-4
    assert (both[1] - both[0]).abs().max() > 1e-3
    assert (both[1] - alone[1]).abs().max() > 1e-3   # the injection acted


@pytest.mark.parametrize("overrides,message", [
    ({"feature_layers": "12"}, "feature_layers: decoder layer 12 has no residual block in this model; decoder "
                               "layers with residual block: 0-11"),
    ({"attention_layers": "1-11"}, "attention_layers: decoder layer 1 has no self-attention in this model; decoder "
                                   "layers with self-attention: 3-11"),
    ({"attention_layers": "4-x"}, "attention_layers: cannot read '4-x'"),
    ({"feature_layers": "5-4"}, "feature_layers: '5-4' is not a range"),
])
def test_bad_layers_are_refused_with_a_clear_error(tiny, direct, overrides, message):
    with pytest.raises(ValueError, match=message):
        _inject(tiny, direct[1], **overrides)


def test_a_combined_conditioning_is_refused(tiny, direct):
    from editkit.nodes.feature_injection import FeatureInjectorNode
    model, clip, _ = tiny
    combined = encode(clip, "a cat") + encode(clip, "a dog")
    with pytest.raises(ValueError, match="positive: the translation takes one prompt encoding, got 2"):
        FeatureInjectorNode.execute(model, direct[1], combined, encode(clip, ""), "4", 0.8, "4-11", 0.5, 1.0, 7.5)


def test_a_sampler_that_cannot_follow_the_inversion_is_refused(tiny, direct):
    noised, inversion, sigmas = direct
    with pytest.raises(ValueError, match="sampler"):
        _sample(_inject(tiny, inversion)[0], noised, sigmas, sampler="dpmpp_2m_sde")


def test_a_lora_patched_model_keeps_its_patch_and_the_invariants(tiny, photo, direct):
    """Weight patches (what LoraLoader adds) travel with the clone the node patches."""
    model, clip, _ = tiny
    noised, inversion, sigmas = direct
    lora = model.clone()
    key = "diffusion_model.output_blocks.6.0.out_layers.3.weight"
    weight = lora.get_model_object(key.replace(".weight", "")).weight
    delta = 0.5 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(7))
    lora.add_patches({key: (delta,)}, 1.0)
    _, _, vae = tiny

    def translate(m, **overrides):
        return _sample(_inject((m, clip, vae), inversion, **overrides)[0], noised, sigmas)
    with_lora, without = translate(lora), translate(model)
    assert (with_lora[0] - photo["samples"][0]).abs().max() < 1e-4
    assert (with_lora[1] - without[1]).abs().max() > 1e-3   # the LoRA is applied
    assert not model.patches   # the input model never got the patch


def test_random_noise_is_refused(tiny, direct):
    """The translation starts from the inversion's noised latent: added noise would translate another image."""
    import comfy.samplers
    noised, inversion, sigmas = direct
    noise = torch.randn(noised.shape, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="noise: sampling from an inversion needs no added noise.*DisableNoise"):
        _inject(tiny, inversion)[0].sample(noise, noised, comfy.samplers.sampler_object("ddim"), sigmas,
                                           disable_pbar=True, seed=0)
