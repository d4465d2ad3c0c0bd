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
                                        ("masactrl", {"start_step": 0, "layers": "0-15"}),
                                        ("masactrl", {"start_step": 0, "layers": "0-15",
                                                      "keys_values": "source_and_target"}),
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
    """Empty replacement windows edit nothing: each item is what KSampler gives its prompt alone."""
    import comfy.sample
    model, clip, _ = tiny
    out, _ = _sample(_guider(tiny, cross_replace=0.0, self_replace=0.0), model)
    latent = torch.zeros(1, 4, *SIZE)
    noise = comfy.sample.prepare_noise(latent, 0)
    for item, text in enumerate(["a cat riding a bicycle", "a cat riding a red bicycle"]):
        alone = comfy.sample.sample(model, noise, STEPS, 5.0, "euler", "normal",
                                    encode(clip, text),
                                    encode(clip, ""), latent, disable_pbar=True, seed=0)
        assert (out[item] - alone[0]).abs().max() < 1e-4 * alone.abs().max()


@pytest.mark.parametrize("sampler,start", [("euler", 0.0), ("euler", 0.5), ("ddim", 0.5)])
def test_local_blend_keeps_the_target_equal_to_the_source_outside_the_mask(tiny, sampler, start):
    """Exact for first-order samplers: each blended step lands the target on the source outside that step's
    mask (the last one is published); the steps before the blend's first step are not blended."""
    guider = _guider(tiny, blend_words="bicycle", blend_threshold=0.97, blend_start=start)
    out, xs = _sample(guider, tiny[0], sampler=sampler)
    mask = guider.local_blend.mask_store.maps[0, 0]
    assert 0 < mask.mean() < 1, "the test needs pixels on both sides of the mask"
    assert ((out[1] - out[0]).abs().amax(dim=0) * (1 - mask)).max() == 0
    assert (out[1] - out[0]).abs().amax(dim=0)[mask > 0].max() > 1e-3   # inside, the edit happens
    first = int(start * STEPS)   # the latent after step `first` is the first blended one: xs[first + 1]
    if first > 0:
        assert (xs[first][1] - xs[first][0]).abs().amax(dim=0)[mask == 0].max() > 0


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "dpmpp_2m_sde", "heun"])
def test_local_blend_pulls_other_samplers_towards_the_source_outside_the_mask(tiny, sampler):
    """Multistep, second-order and SDE samplers get the first-order blend of the predictions: not exact, but
    the outside stays far closer to the source than without the blend."""
    blended_guider = _guider(tiny, blend_words="bicycle", blend_threshold=0.97)
    blended, _ = _sample(blended_guider, tiny[0], sampler=sampler)
    free, _ = _sample(_guider(tiny), tiny[0], sampler=sampler)
    outside = 1 - blended_guider.local_blend.mask_store.maps[0, 0]
    assert 0 < outside.mean() < 1
    gap = lambda x: ((x[1] - x[0]).abs().amax(dim=0) * outside).max()   # noqa: E731
    assert gap(blended) < 0.1 * gap(free), (gap(blended), gap(free))


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
    _sample(_guider(tiny, edit="masactrl", start_step=0, layers="0-15", mask_word="cat"), model)
    assert model.model_options.get("transformer_options", {}) == before


def _photo_inversion(tiny, mode, prompt="a cat sitting next to a mirror", steps=4):
    model, clip, vae = tiny
    g = torch.Generator().manual_seed(3)
    latent = {"samples": vae.encode(torch.rand(1, 64, 64, 3, generator=g))}
    return (latent["samples"],) + invert(model, clip, latent, mode, steps, prompt)


def test_null_text_photo_identity_edit_reproduces_the_reconstruction(tiny):
    model = tiny[0]
    prompt = "a cat sitting next to a mirror"
    photo, noised, inversion, sigmas = _photo_inversion(tiny, "null_text", prompt)
    guider = _guider(tiny, source_prompt=prompt, target_prompt=prompt, inversion=inversion, blend_words="cat",
                     blend_start=0.5)
    out, _ = _sample(guider, model, latent=noised, sigmas=sigmas, noise=False)
    assert (out[1] - out[0]).abs().max() < 1e-5


def test_direct_inversion_corrects_the_source_row_only(tiny):
    """Ju et al.'s method: the source row lands on the photo, the targets evolve freely; with the edit's
    windows empty the target is plain CFG sampling of its prompt from the inverted noise."""
    import comfy.sample
    import comfy.samplers
    model, clip, _ = tiny
    prompt = "a cat sitting next to a mirror"
    photo, noised, inversion, sigmas = _photo_inversion(tiny, "direct", prompt)
    out, _ = _sample(_guider(tiny, source_prompt=prompt, target_prompt=prompt, inversion=inversion,
                             cross_replace=0.0, self_replace=0.0), model, latent=noised, sigmas=sigmas, noise=False)
    assert (out[0] - photo[0]).abs().max() < 1e-4
    plain = comfy.sample.sample_custom(model, torch.zeros_like(noised), 5.0, comfy.samplers.sampler_object("euler"),
                                       sigmas, encode(clip, prompt), encode(clip, ""), noised, disable_pbar=True, seed=0)
    assert (out[1] - plain[0]).abs().max() < 1e-4 * max(1.0, plain.abs().max().item())
    assert (out[1] - out[0]).abs().max() > 1e-3   # a DDIM reconstruction, not the photo


@pytest.mark.parametrize("mode", ["direct", "null_text"])
def test_real_photo_source_row_does_not_depend_on_the_targets(tiny, mode):
    model = tiny[0]
    prompt = "a cat sitting next to a mirror"
    photo, noised, inversion, sigmas = _photo_inversion(tiny, mode, prompt)
    same, _ = _sample(_guider(tiny, source_prompt=prompt, target_prompt=prompt, inversion=inversion), model,
                      latent=noised, sigmas=sigmas, noise=False)
    edited, _ = _sample(_guider(tiny, source_prompt=prompt, target_prompt="a tiger sitting next to a mirror",
                                inversion=inversion), model, latent=noised, sigmas=sigmas, noise=False)
    # up to float32 rounding of a differently filled batch; null-text on the random tiny model reaches latents
    # of a few hundred
    assert (edited[0] - same[0]).abs().max() < 1e-6 * max(1.0, same.abs().max().item())
    assert (edited[1] - edited[0]).abs().max() > 1e-3
    if mode == "direct":
        assert (same[0] - photo[0]).abs().max() < 1e-4


def test_random_noise_with_an_inversion_is_refused(tiny):
    model = tiny[0]
    prompt = "a cat sitting next to a mirror"
    _, noised, inversion, sigmas = _photo_inversion(tiny, "direct", prompt)
    with pytest.raises(ValueError, match="noise: .*DisableNoise"):
        _sample(_guider(tiny, source_prompt=prompt, inversion=inversion), model, latent=noised, sigmas=sigmas,
                noise=True)


def test_masactrl_starting_at_or_after_the_last_step_is_refused(tiny):
    with pytest.raises(ValueError, match="start_step: MasaCtrl starts at step 6, but the sampler runs 6 steps"):
        _sample(_guider(tiny, edit="masactrl", start_step=STEPS), tiny[0])


@pytest.mark.parametrize("overrides,message", [
    ({"word_windows": "horse: 0.3"}, "word_windows: 'horse' is in none of the prompts"),
    ({"word_windows": "red: 0.5-0.3"}, "word_windows: the window 0.5-0.3 of 'red' should go from low to high"),
    ({"cross_replace_start": 0.9}, "cross_replace_start: 0.9 is after cross_replace"),
    ({"target_prompt": "  "}, "target_prompt: the prompt is empty"),
    ({"blend_subtract_words": "cat"}, "blend_subtract_words: they take a region out of the local blend"),
    ({"reweight": "red: two"}, "reweight: 'red: two' should be a word and a number"),
    ({"edit": "reweight", "reweight": "cat: 2", "target_prompt": "a dog"}, "reweight: 'cat' is in none of the prompts"),
    ({"blend_words": "horse"}, "blend_words: 'horse' is in none of the prompts"),
    ({"edit": "masactrl", "mask_word": "red"}, "mask_word: 'red' is not in the prompt"),
    ({"edit": "word_swap"}, "word swap needs prompts with the same number of words"),
    ({"edit": "masactrl", "layers": "10-16"}, "layers: 16 is beyond this model's 16"),
    ({"edit": "masactrl", "start_step": 5, "end_step": 5}, "end_step: 5 must be after start_step"),
    ({"edit": "masactrl", "keys_values": "source_and_target", "mask_word": "cat"},
     "keys_values: source_and_target (the union variant) takes no mask"),
    ({"edit": "reweight", "reweight": ""}, "reweight: the reweight edit needs at least one"),
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


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_a_batch_of_latents_is_edited_as_each_alone_and_returned_clip_by_clip(tiny, sampler):
    """A latent batch is the frames of a video: without keyframe attention each frame gets what the one-image
    edit of it gives, the source frames first."""
    import comfy.samplers
    model = tiny[0]
    g = torch.Generator().manual_seed(3)
    latents, noise = torch.randn(2, 2, 4, *SIZE, generator=g)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", STEPS).cpu()

    def edit(latent, noise_):
        return _guider(tiny).sample(noise_, latent, comfy.samplers.sampler_object(sampler), sigmas,
                                    disable_pbar=True, seed=0)

    both = edit(latents, noise)
    for f in range(2):
        alone = edit(latents[f:f + 1], noise[f:f + 1])
        for item in range(2):
            assert (both[item * 2 + f] - alone[item]).abs().max() <= 1e-4 * alone.abs().max()


def test_the_defaults_are_the_papers(host):
    """Every edit's defaults reproduce the official code: cross-attention at every layer for 0.8 of the steps,
    self-attention at the 16x16 layers for 0.4, the blend's 0.3 thresholds; MasaCtrl from step 4 at layers
    10-15 with a 0.1 mask threshold."""
    from support.node_calls import edit_settings
    for edit in ("word_swap", "refine", "reweight"):
        settings = edit_settings(edit)
        assert {k: settings[k] for k in ("cross_replace", "cross_replace_start", "self_replace", "self_replace_start",
                                         "cross_max_resolution", "self_max_resolution", "blend_threshold",
                                         "blend_subtract_threshold", "blend_start")} == dict(
            cross_replace=0.8, cross_replace_start=0.0, self_replace=0.4, self_replace_start=0.0,
            cross_max_resolution=0, self_max_resolution=16, blend_threshold=0.3, blend_subtract_threshold=0.3,
            blend_start=0.0)
    from editkit.nodes.attention_control import AttentionControllerNode
    combo = next(i for i in AttentionControllerNode.define_schema().inputs if i.id == "edit")
    masactrl = {i.id: getattr(i, "default", None) for o in combo.options if o.key == "masactrl" for i in o.inputs}
    assert (masactrl["start_step"], masactrl["end_step"], masactrl["layers"], masactrl["keys_values"],
            masactrl["mask_threshold"]) == (4, 10000, "10-15", "source", 0.1)
