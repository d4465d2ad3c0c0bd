"""Keyframe Attention inside ComfyUI on the tiny model: a batch of latents sampled by stock sampling
(comfy.sample.sample, what KSampler runs) with each frame's self-attention reading its keyframes."""
import pytest
import torch

from support.comfy_host import encode
from support.controllers import Recorder

STEPS = 4
PROMPT = "a fox running in the snow"


def _keyframe(model, mode="first", layers="", start_at=0.0, end_at=1.0, indices=None, frame_window=0, pull=0.0,
              pull_until=0.5):
    from editkit.nodes.keyframe_attention import KeyframeAttentionNode
    combo = {"mode": mode} if indices is None else {"mode": mode, "indices": indices}
    return KeyframeAttentionNode.execute(model, combo, layers, start_at, end_at, frame_window, pull,
                                         pull_until).result[0]


def _sample(model, clip, noise):
    import comfy.sample
    return comfy.sample.sample(model, noise, STEPS, 5.0, "euler", "normal", encode(clip, PROMPT), encode(clip, ""),
                               torch.zeros_like(noise), disable_pbar=True, seed=0)


def _noise(frames, seed=0):
    return torch.randn(frames, 4, 16, 16, generator=torch.Generator().manual_seed(seed))


def _close(a, b, rtol=1e-4):
    return (a - b).abs().max() <= rtol * max(1.0, b.abs().max().item())


def test_one_frame_is_refused_as_a_no_op(tiny):
    model, clip, _ = tiny
    for mode in ("first", "middle", "all", "first_and_previous"):
        with pytest.raises(ValueError, match="latent: one image; Keyframe Attention shares keys and values"):
            _sample(_keyframe(model, mode), clip, _noise(1))


@pytest.mark.parametrize("mode", ["first", "all", "first_and_previous"])
def test_identical_frames_each_equal_plain_sampling_of_the_frame(tiny, mode):
    model, clip, _ = tiny
    one = _noise(1)
    frames = _sample(_keyframe(model, mode), clip, one.repeat(3, 1, 1, 1))
    plain = _sample(model, clip, one)
    for f in range(3):
        assert _close(frames[f:f + 1], plain)


def test_with_mode_first_frame_0_is_plain_and_the_others_change(tiny):
    """Frame 0 reads itself; the other frames read frame 0 (whether that makes them look alike is a question
    for a trained model, not for the random tiny one)."""
    model, clip, _ = tiny
    noise = _noise(3)
    plain = _sample(model, clip, noise)
    shared = _sample(_keyframe(model, "first"), clip, noise)
    assert _close(shared[0:1], plain[0:1])
    for f in (1, 2):
        assert not _close(shared[f:f + 1], plain[f:f + 1], rtol=1e-2)


def test_each_frame_reads_exactly_its_keyframes_in_its_branch_at_the_chosen_layers_and_steps(tiny):
    """A recorder before and one after the keyframe controller: where it acts, each row's keys and values are
    the keyframes' of the row's own CFG chunk, concatenated; elsewhere they are the row's own."""
    from editkit.core.keyframe import keyframes
    from editkit.nodes.comfy_attention import attach_controller
    model, clip, _ = tiny
    is_self = lambda site: site.kind == "self"                      # noqa: E731
    before, after = Recorder(attention=is_self), Recorder(attention=is_self)
    patched = attach_controller(model, before)
    patched = _keyframe(patched, "first_and_previous", layers="1, 3", start_at=0.25, end_at=0.75)
    patched = attach_controller(patched, after)
    _sample(patched, clip, _noise(3))
    seen, edited = before.runs[-1], after.runs[-1]
    table = keyframes("first_and_previous", 3)
    acted = set()
    for key, calls in seen.items():
        for original, changed in zip(calls, edited[key]):
            layout = original["layout"]
            if torch.equal(changed["k"], original["k"]):
                continue
            acted.add(key)
            assert layout.items == 3
            for row in range(layout.size):
                first = row - layout.item_of(row)
                rows = [first + f for f in table[layout.item_of(row)]]
                assert torch.equal(changed["k"][row], torch.cat([original["k"][r] for r in rows]))
                assert torch.equal(changed["v"][row], torch.cat([original["v"][r] for r in rows]))
    steps = {step for _, step in acted}
    assert steps == {1, 2}                                          # int(0.25 * 4) <= step < int(0.75 * 4)
    sites = {name for name, _ in acted}
    assert len(sites) == 2                                          # layers 1 and 3 only


@pytest.mark.parametrize("mode, indices", [("first", None), ("middle", None), ("indices", "1, 4")])
def test_frame_windows_give_what_one_batch_gives(tiny, mode, indices):
    """6 frames in windows of 2 (plus the keyframes they read) against one batch of 6: every frame reads the
    same keyframes, so the frames agree to float tolerance; a window as large as the batch is the batch."""
    model, clip, _ = tiny
    noise = _noise(6)
    whole = _sample(_keyframe(model, mode, indices=indices), clip, noise)
    windowed = _sample(_keyframe(model, mode, indices=indices, frame_window=2), clip, noise)
    assert _close(windowed, whole)
    assert torch.equal(_sample(_keyframe(model, mode, indices=indices, frame_window=6), clip, noise), whole)


def test_frame_windows_bound_the_batch_of_each_model_call(tiny):
    from editkit.nodes.comfy_attention import attach_controller
    model, clip, _ = tiny
    recorder = Recorder(attention=lambda site: site.kind == "self" and site.layer == 0)
    patched = attach_controller(_keyframe(model, "first_and_previous", frame_window=2), recorder)
    out = _sample(patched, clip, _noise(6))
    assert torch.isfinite(out).all()
    sizes = {call["layout"].items for calls in recorder.runs[-1].values() for call in calls}
    assert sizes == {2, 4}          # frames 0-1, then frames (0, 1 | 2, 3) and (0, 3 | 4, 5)


def test_the_previous_frame_pull_brings_consecutive_frames_closer(tiny):
    """Pix2Video's guidance on top of its keyframe attention: weight 0 is the keyframe run exactly; a pull over
    every step makes consecutive frames closer than without it (measured: squared gaps 40 and 3600 against
    20000; weight 150 on these 1024-number latents is a pull of 0.3 of the gap per step, where the paper's 100
    on SD's 16384-number latents is 0.01)."""
    model, clip, _ = tiny
    noise = _noise(3)
    keyframed = _sample(_keyframe(model, "first_and_previous"), clip, noise)
    assert torch.equal(_sample(_keyframe(model, "first_and_previous", pull=0.0), clip, noise), keyframed)
    pulled = _sample(_keyframe(model, "first_and_previous", pull=150.0, pull_until=1.0), clip, noise)

    def gaps(x):
        return [(x[i] - x[i - 1]).pow(2).mean().item() for i in (1, 2)]
    assert all(p < k for p, k in zip(gaps(pulled), gaps(keyframed)))
    assert _close(pulled[0:1], keyframed[0:1])           # frame 0 reads only itself and is not pulled


def test_the_pull_runs_on_the_steps_of_the_official_code():
    """Pix2Video's code sets the pull weight to 0 when its step index i > 25 (of 50 DDIM steps): it pulls on i = 0
    to 25. pull_until 0.5 does the same; 0.2 of 10 steps pulls on 0 to 2."""
    from editkit.nodes.keyframe_attention import PreviousFramePull
    denoised = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for steps, until, official in ((50, 0.5, lambda i: not i > 25), (10, 0.2, lambda i: i <= 2)):
        sigmas = torch.linspace(10.0, 0.0, steps + 1)
        pulled = [i for i in range(steps)
                  if not torch.equal(PreviousFramePull(100.0, until)(
                      {"denoised": denoised, "sigma": sigmas[i:i + 1],
                       "model_options": {"transformer_options": {"sample_sigmas": sigmas}}}), denoised)]
        assert pulled == [i for i in range(steps - 1) if official(i)]


def test_the_input_model_is_unchanged(tiny):
    model, clip, _ = tiny
    before = dict(model.model_options.get("transformer_options", {}))
    _sample(_keyframe(model, "all"), clip, _noise(2))
    assert model.model_options.get("transformer_options", {}) == before


def test_bad_inputs_are_refused(tiny):
    model, clip, _ = tiny
    with pytest.raises(ValueError, match="indices: keyframe 5 is outside the batch of 3 frames"):
        _sample(_keyframe(model, "indices", indices="0, 5"), clip, _noise(3))
    with pytest.raises(ValueError, match="indices: cannot read 'x'"):
        _keyframe(model, "indices", indices="0, x")
    with pytest.raises(ValueError, match="layers: 99 is beyond this model's"):
        _keyframe(model, "first", layers="99")
    with pytest.raises(ValueError, match="frame_window: mode all reads every frame"):
        _keyframe(model, "all", frame_window=4)
    with pytest.raises(ValueError, match="frame_window: 1 frame per call"):
        _keyframe(model, "first", frame_window=1)
    with pytest.raises(ValueError, match="start_at: 0.5 must be smaller than end_at"):
        _keyframe(model, "first", start_at=0.5, end_at=0.5)
