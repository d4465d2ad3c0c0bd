"""The Attention Controller node and its pair guider inside the real ComfyUI, on the tiny model."""
import pytest
import torch

from support.comfy_host import encode
from support.node_calls import attention_controller, invert

STEPS = 6
SIZE = (16, 16)   # latent: 128 px


def _guider(tiny, **overrides):
    model, clip, _ = tiny
    return attention_controller(model, clip, **overrides)


def _sample(guider, model, sampler="euler", latent=None, sigmas=None, noise=True, steps=STEPS):
    import comfy.sample
    import comfy.samplers
    latent = torch.zeros(1, 4, *SIZE) if latent is None else latent
    noise = comfy.sample.prepare_noise(latent, 0) if noise else torch.zeros_like(latent)
    if sigmas is None:
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps).cpu()
    xs = []
    out = guider.sample(noise, latent, comfy.samplers.sampler_object(sampler), sigmas,
                        callback=lambda i, d, x, n: xs.append(x.clone().cpu()), disable_pbar=True, seed=0)
    return out, xs


@pytest.mark.parametrize("edit,extra", [("word_swap", {}), ("refine", {}), ("reweight", {"reweight": "red: 1"}),
                                        ("masactrl", {"masactrl_start_step": 0, "masactrl_start_layer": 0}),
                                        ("refine", {"blend_words": "bicycle", "blend_threshold": 0.9})])
def test_identical_prompts_give_a_target_identical_to_the_source(tiny, edit, extra):
    prompt = "a cat riding a red bicycle"
    out, _ = _sample(_guider(tiny, edit=edit, source_prompt=prompt, target_prompt=prompt, **extra), tiny[0])
    assert out.shape == (2, 4, *SIZE)
    assert (out[1] - out[0]).abs().max() < 1e-5


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "dpmpp_2m_sde", "euler_ancestral"])
def test_identity_holds_for_every_sampler_as_the_pair_shares_its_noise(tiny, sampler):
    out, _ = _sample(_guider(tiny, target_prompt="a cat riding a bicycle"), tiny[0], sampler=sampler)
    assert (out[1] - out[0]).abs().max() < 1e-5


def test_prompts_longer_than_77_tokens(tiny):
    long = ", ".join(["a cat riding a bicycle"] * 12) + ", a red bus"
    out, _ = _sample(_guider(tiny, source_prompt="a cat riding a bicycle", target_prompt=long), tiny[0])
    assert torch.isfinite(out).all() and (out[1] - out[0]).abs().max() > 1e-3
    same, _ = _sample(_guider(tiny, source_prompt=long, target_prompt=long), tiny[0])
    assert (same[1] - same[0]).abs().max() < 1e-5


def test_pair_without_an_active_edit_equals_plain_sampling_of_each_prompt(tiny):
    """MasaCtrl starting after the last step edits nothing: each item is what KSampler gives its prompt alone."""
    import comfy.sample
    model, clip, _ = tiny
    out, _ = _sample(_guider(tiny, edit="masactrl", masactrl_start_step=STEPS, masactrl_start_layer=0), model)
    latent = torch.zeros(1, 4, *SIZE)
    noise = comfy.sample.prepare_noise(latent, 0)
    for item, text in enumerate(["a cat riding a bicycle", "a cat riding a red bicycle"]):
        alone = comfy.sample.sample(model, noise, STEPS, 5.0, "euler", "normal",
                                    encode(clip, text),
                                    encode(clip, ""), latent, disable_pbar=True, seed=0)
        assert (out[item] - alone[0]).abs().max() < 1e-4 * alone.abs().max()


@pytest.mark.parametrize("sampler,start", [("euler", 0.0), ("dpmpp_2m", 0.5), ("dpmpp_2m_sde", 0.0),
                                           ("dpmpp_2m_sde", 0.5)])
def test_local_blend_keeps_the_target_equal_to_the_source_outside_the_mask(tiny, sampler, start):
    guider = _guider(tiny, blend_words="bicycle", blend_threshold=0.97, blend_start=start)
    out, xs = _sample(guider, tiny[0], sampler=sampler)
    mask = guider.local_blend.mask_store.maps[0, 0]
    assert 0 < mask.mean() < 1, "the test needs pixels on both sides of the mask"
    first = int(start * STEPS + 0.999)
    for i, x in enumerate(xs[first:] + [out]):
        outside = (x[1] - x[0]).abs().amax(dim=0) * (1 - mask)
        assert outside.max() == 0, f"step {first + i}"
    assert (out[1] - out[0]).abs().amax(dim=0)[mask > 0].max() > 1e-3   # inside, the edit happens
    if start > 0:
        assert (xs[first - 1][1] - xs[first - 1][0]).abs().amax(dim=0)[mask == 0].max() > 0   # not before it


def test_word_swap_at_full_strength_copies_the_source_cross_maps(tiny):
    from editkit.core.capture import AttentionMapCapture
    from editkit.nodes.comfy_attention import attach_controller
    from editkit.nodes.pair_guider import PairCFGGuider
    model, clip, _ = tiny
    guider = _guider(tiny, edit="word_swap", target_prompt="a dog riding a bicycle", cross_replace=1.0,
                     self_replace=1.0)
    capture = AttentionMapCapture(max_tokens=32 * 32)
    captured = PairCFGGuider(attach_controller(guider.model_patcher, capture), guider.contexts, guider.negative, 5.0)
    _sample(captured, model)
    maps = capture.store.maps
    assert maps.shape[0] == 2 and (maps[1] - maps[0]).abs().max() < 1e-6


def test_the_input_model_is_left_unchanged(tiny):
    import comfy.sample
    model, clip, _ = tiny
    before = dict(model.model_options.get("transformer_options", {}))
    _sample(_guider(tiny, edit="masactrl", masactrl_start_step=0, masactrl_start_layer=0, blend_words="cat"), model)
    assert model.model_options.get("transformer_options", {}) == before


@pytest.mark.parametrize("mode", ["direct", "null_text"])
def test_real_photo_identity_edit_reproduces_the_reconstruction(tiny, mode):
    model, clip, vae = tiny
    g = torch.Generator().manual_seed(3)
    photo = torch.rand(1, 64, 64, 3, generator=g)
    latent = {"samples": vae.encode(photo)}
    prompt = "a cat sitting next to a mirror"
    noised, inversion, sigmas = invert(model, clip, latent, mode, 4, prompt)
    guider = _guider(tiny, source_prompt=prompt, target_prompt=prompt, inversion=inversion, blend_words="cat",
                     blend_start=0.5)
    out, _ = _sample(guider, model, latent=noised, sigmas=sigmas, noise=False)
    assert (out[1] - out[0]).abs().max() < 1e-5
    if mode == "direct":
        assert (out[0] - latent["samples"][0]).abs().max() < 1e-4
    edited, _ = _sample(_guider(tiny, source_prompt=prompt, target_prompt="a tiger sitting next to a mirror",
                                inversion=inversion), model, latent=noised, sigmas=sigmas, noise=False)
    # the source row does not depend on the target (up to float32 rounding of a differently filled batch;
    # null-text on the random tiny model reaches latents of a few hundred)
    assert (edited[0] - out[0]).abs().max() < 1e-6 * max(1.0, out.abs().max().item())
    assert (edited[1] - edited[0]).abs().max() > 1e-3


@pytest.mark.parametrize("overrides,message", [
    ({"word_release": "horse: 0.3"}, "word_release: 'horse' is not in the prompt"),
    ({"reweight": "red: two"}, "reweight: 'red: two' should be a word and a number"),
    ({"edit": "reweight", "reweight": "cat: 2", "target_prompt": "a dog"}, "reweight: 'cat' is not in the prompt"),
    ({"blend_words": "horse"}, "blend_words: 'horse' is in neither prompt"),
    ({"edit": "masactrl", "masactrl_mask_word": "red"}, "masactrl_mask_word: 'red' is not in the prompt"),
    ({"edit": "word_swap"}, "word swap needs prompts of the same token length"),
    ({"edit": "masactrl", "masactrl_start_layer": 16}, "masactrl_start_layer: 16 is beyond this model's 16"),
    ({"edit": "reweight"}, "reweight: the reweight edit needs at least one"),
])
def test_bad_input_is_refused_with_a_clear_error(tiny, overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _guider(tiny, **overrides)


def test_an_inversion_of_another_prompt_is_refused(tiny):
    from editkit.core.inversion import Inversion
    g = torch.Generator().manual_seed(5)
    inversion = Inversion(mode="direct", sigmas=torch.linspace(10, 0, 5), latents=torch.randn(5, 4, 8, 8, generator=g),
                          guidance=5.0, source_context=torch.randn(1, 77, 32, generator=g),
                          negative_context=torch.randn(1, 77, 32, generator=g))
    with pytest.raises(ValueError, match="source_prompt: it differs from the prompt the photo was inverted with"):
        _guider(tiny, inversion=inversion)


def test_a_latent_batch_is_refused(tiny):
    with pytest.raises(ValueError, match="latent: the edit samples one image"):
        _sample(_guider(tiny), tiny[0], latent=torch.zeros(2, 4, *SIZE))
