"""Zero-shot video editing inside ComfyUI on the tiny model: the frames of a video inverted in one batch, then
edited by the pack's pair sampling over F frames (F source rows next to F target rows, one group per frame),
with Prompt-to-Prompt (and FateZero's attention fusion), Plug-and-Play and keyframe attention composed."""
import copy

import pytest
import torch

from support.comfy_host import encode
from support.controllers import Recorder
from support.node_calls import attention_controller, feature_injector, invert

STEPS = 5
FRAMES = 3
PROMPT = "a cat riding a bicycle"


@pytest.fixture(scope="module")
def video(tiny):
    """Three frames of a 'video': one random picture shifted by a pixel per frame."""
    _, _, vae = tiny
    g = torch.Generator().manual_seed(11)
    picture = torch.rand(1, 64, 72, 3, generator=g)
    frames = torch.cat([picture[:, :, f:f + 64] for f in range(FRAMES)])
    return {"samples": vae.encode(frames)}


def _frame(video, f):
    return {"samples": video["samples"][f:f + 1]}


def _invert(tiny, latent, mode="direct", prompt=PROMPT):
    model, clip, _ = tiny
    return invert(model, clip, latent, mode, STEPS, prompt)


@pytest.fixture(scope="module")
def inverted(tiny, video):
    return _invert(tiny, video)


def _sample(guider, noised, sigmas, sampler="ddim"):
    import comfy.samplers
    return guider.sample(torch.zeros_like(noised), noised, comfy.samplers.sampler_object(sampler), sigmas,
                         disable_pbar=True, seed=0)


def _keyframe(model, mode="first", frame_window=0, pull=0.0):
    from editkit.nodes.keyframe_attention import KeyframeAttentionNode
    return KeyframeAttentionNode.execute(model, {"mode": mode}, "", 0.0, 1.0, frame_window, pull, 0.5).result[0]


def _psnr(a, b):
    peak = b.abs().max()
    return float(10 * torch.log10(peak ** 2 / ((a - b) ** 2).mean()))


@pytest.mark.parametrize("mode", ["direct", "ddim", "negative_prompt"])
def test_the_frames_are_inverted_in_one_batch_as_each_alone(tiny, video, mode):
    noised, inversion, _ = _invert(tiny, video, mode)
    assert noised.shape == video["samples"].shape and inversion.frames == FRAMES
    assert inversion.latents.shape == (STEPS + 1, FRAMES, *video["samples"].shape[1:])
    for f in range(FRAMES):
        alone = _invert(tiny, _frame(video, f), mode)[1].latents
        assert (inversion.latents[:, f] - alone).abs().max() <= 1e-4 * alone.abs().max()   # batched kernels


def test_null_text_refuses_a_batch_of_frames_by_name(tiny, video):
    with pytest.raises(ValueError, match="mode: null_text.*3 frames"):
        _invert(tiny, video, "null_text")


def test_a_video_edit_returns_the_source_clip_then_the_edited_clip_and_the_source_is_the_video(tiny, video, inverted):
    model, clip, _ = tiny
    noised, inversion, sigmas = inverted
    out = _sample(attention_controller(model, clip, "word_swap", target_prompt="a dog riding a bicycle",
                                       inversion=inversion), noised, sigmas)
    assert out.shape == (2 * FRAMES, *video["samples"].shape[1:])
    source, edited = out[:FRAMES], out[FRAMES:]
    assert (source - video["samples"]).abs().max() <= 1e-5 * video["samples"].abs().max()   # direct: exact
    assert (edited - source).abs().max() > 1e-2


def test_an_identity_edit_gives_each_frame_what_the_single_image_edit_gives_it(tiny, video, inverted):
    """Target prompt = source prompt: frame f of the edited clip equals the one-image identity edit of frame f,
    so it keeps that edit's PSNR to the frame."""
    model, clip, _ = tiny
    noised, inversion, sigmas = inverted
    settings = dict(target_prompt=PROMPT, self_max_resolution=32)
    edited = _sample(attention_controller(model, clip, "refine", inversion=inversion, **settings),
                     noised, sigmas)[FRAMES:]
    for f in range(FRAMES):
        alone_noised, alone, _ = _invert(tiny, _frame(video, f))
        single = _sample(attention_controller(model, clip, "refine", inversion=alone, **settings),
                         alone_noised, sigmas)[1:]
        # batched kernels round differently, and the tiny random model's free target amplifies it
        assert (edited[f:f + 1] - single).abs().max() <= 1e-3 * single.abs().max()
        frame = video["samples"][f:f + 1]
        assert abs(_psnr(edited[f:f + 1], frame) - _psnr(single, frame)) < 0.05


def test_keyframe_attention_in_a_video_edit_reads_keyframes_of_the_rows_own_clip(tiny, inverted):
    """A recorder before and after Keyframe Attention (first) in a word-swap edit of 3 frames: each row's keys
    are those of frame 0 of its own clip (source or edited) in its own CFG chunk."""
    from editkit.nodes.comfy_attention import attach_controller
    model, clip, _ = tiny
    noised, inversion, sigmas = inverted
    is_self = lambda site: site.kind == "self"                      # noqa: E731
    before, after = Recorder(attention=is_self), Recorder(attention=is_self)
    patched = attach_controller(_keyframe(attach_controller(model, before)), after)
    _sample(attention_controller(patched, clip, "word_swap", target_prompt="a dog riding a bicycle",
                                 inversion=inversion), noised, sigmas)
    checked = 0
    for key, calls in before.runs[-1].items():
        for original, changed in zip(calls, after.runs[-1][key]):
            k, k_after = original["k"], changed["k"]
            rows_per_chunk = 2 * FRAMES
            for row in range(k.shape[0]):
                chunk, within = divmod(row, rows_per_chunk)
                keyframe_row = chunk * rows_per_chunk + within % 2          # frame 0, same clip
                assert torch.equal(k_after[row], k[keyframe_row])
                checked += 1
    assert checked > 0


def test_frame_windows_in_a_video_edit_equal_one_batch(tiny, inverted):
    model, clip, _ = tiny
    noised, inversion, sigmas = inverted

    def edit(window):
        patched = _keyframe(model, "first", frame_window=window)
        return _sample(attention_controller(patched, clip, "word_swap", target_prompt="a dog riding a bicycle",
                                            inversion=inversion), noised, sigmas)

    whole = edit(0)
    assert (edit(2) - whole).abs().max() <= 1e-5 * whole.abs().max()
    assert torch.equal(edit(FRAMES), whole)


def test_the_previous_frame_pull_moves_each_clip_along_its_own_frames(tiny, inverted):
    model, clip, _ = tiny
    noised, inversion, sigmas = inverted

    def edit(pull):
        return _sample(attention_controller(_keyframe(model, "first", pull=pull), clip, "word_swap",
                                            target_prompt="a dog riding a bicycle", inversion=inversion),
                       noised, sigmas)

    plain, pulled = edit(0.0), edit(30.0)   # on 256-number latents: about 0.3 of the gap per step
    assert torch.equal(pulled[:FRAMES], plain[:FRAMES])        # the source clip is the inversion either way
    assert torch.equal(pulled[FRAMES], plain[FRAMES])          # frame 0 is pulled towards nothing
    gap = lambda clip_: (clip_[1:] - clip_[:-1]).abs().mean()   # noqa: E731
    assert gap(pulled[FRAMES:]) < gap(plain[FRAMES:])


def test_fusion_keeps_the_sources_self_attention_outside_the_words_region(tiny, inverted):
    """FateZero's attention fusion: a threshold no map exceeds keeps the source's self-attention everywhere
    (plain Prompt-to-Prompt, exactly); a threshold of 0 lets the targets keep their own where the word's map
    is positive, which changes the edit."""
    from editkit.nodes.attention_control import AttentionFusionNode
    model, clip, _ = tiny
    noised, inversion, sigmas = inverted
    # cross_replace 1: the fusion's map sites take explicit probabilities at every step, so do the plain run's
    # (outside its cross window it would use the host's fused kernel, which rounds differently)
    settings = dict(target_prompt="a dog riding a bicycle", inversion=inversion, self_replace=1.0,
                    self_max_resolution=32, cross_replace=1.0)
    plain = _sample(attention_controller(model, clip, "word_swap", **settings), noised, sigmas)
    fusion = lambda words, threshold: AttentionFusionNode.execute(words, threshold).result[0]   # noqa: E731
    none = _sample(attention_controller(model, clip, "word_swap", fusion=fusion("cat", 1.0), **settings),
                   noised, sigmas)
    everywhere = _sample(attention_controller(model, clip, "word_swap", fusion=fusion("cat", 0.0), **settings),
                         noised, sigmas)
    assert torch.equal(none, plain)
    assert (everywhere[FRAMES:] - plain[FRAMES:]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="fusion: the word 'dog' is not in the source_prompt"):
        attention_controller(model, clip, "word_swap", fusion=fusion("dog", 0.3), **settings)


def test_keyframes_injection_and_attention_control_compose_and_leave_the_input_model_as_it_was(tiny, video,
                                                                                               inverted):
    """Keyframe Attention + Feature Injector (Plug-and-Play) + Attention Controller on one model: the edit runs,
    each stage changes it, and the input MODEL's options are unchanged afterwards."""
    from editkit.nodes.comfy_attention import CONTROLS_KEY
    model, clip, _ = tiny
    noised, inversion, sigmas = inverted
    options_before = copy.copy(model.model_options["transformer_options"])
    wrappers_before = copy.copy(model.wrappers)
    keyed = _keyframe(model, "first_and_previous")
    _, injected = feature_injector(keyed, clip, inversion, "a dog riding a bicycle", "")
    edit = dict(target_prompt="a dog riding a bicycle", inversion=inversion)
    composed = _sample(attention_controller(injected, clip, "word_swap", **edit), noised, sigmas)
    without_keyframes = _sample(attention_controller(feature_injector(model, clip, inversion, "a dog riding a bicycle",
                                                                      "")[1], clip, "word_swap", **edit),
                                noised, sigmas)
    only_p2p = _sample(attention_controller(model, clip, "word_swap", **edit), noised, sigmas)
    assert (composed[:FRAMES] - video["samples"]).abs().max() <= 1e-5 * video["samples"].abs().max()
    assert (composed[FRAMES:] - without_keyframes[FRAMES:]).abs().max() > 1e-3
    assert (without_keyframes[FRAMES:] - only_p2p[FRAMES:]).abs().max() > 1e-3
    assert model.model_options["transformer_options"].keys() == options_before.keys()
    assert CONTROLS_KEY not in model.model_options["transformer_options"]
    assert model.wrappers == wrappers_before


def test_a_latent_of_other_frames_than_the_inversion_is_refused(tiny, video, inverted):
    model, clip, _ = tiny
    noised, inversion, sigmas = inverted
    guider = attention_controller(model, clip, "word_swap", target_prompt="a dog riding a bicycle",
                                  inversion=inversion)
    with pytest.raises(ValueError, match="latent: 2 latent.*inversion is of 3"):
        _sample(guider, noised[:2], sigmas)


def test_plug_and_play_translates_a_video_with_the_source_clip_pinned_to_its_inversion(tiny, video, inverted):
    model, clip, _ = tiny
    noised, inversion, sigmas = inverted
    guider, _ = feature_injector(model, clip, inversion, "a marble sculpture of a cat", "")
    out = _sample(guider, noised, sigmas)
    assert out.shape == (2 * FRAMES, *video["samples"].shape[1:])
    assert (out[:FRAMES] - video["samples"]).abs().max() <= 1e-4 * video["samples"].abs().max()
    assert (out[FRAMES:] - out[:FRAMES]).abs().max() > 1e-2


def test_the_inversion_guider_reconstructs_every_frame(tiny, video, inverted):
    from editkit.nodes.inversion import InversionGuider
    model, clip, _ = tiny
    noised, inversion, sigmas = inverted
    guider = InversionGuider.execute(model, inversion, encode(clip, PROMPT), 5.0).result[0]
    out = _sample(guider, noised, sigmas)
    assert (out - video["samples"]).abs().max() <= 1e-5 * video["samples"].abs().max()
    with pytest.raises(ValueError, match="latent: the inversion is of 3 frames but the latent holds 2"):
        _sample(guider, noised[:2], sigmas)
