"""Motion Latents (Text2Video-Zero, sec. 3.2) inside ComfyUI on the tiny model: the first frame's window is
ComfyUI's own sampling of the seed (what KSamplerAdvanced gives with return_with_leftover_noise), frame k is
that latent moved by k·λ·δ and re-noised with its own fresh noise, and the output samples with no added noise
through comfy.sample.sample (KSamplerAdvanced) and sample_custom (SamplerCustomAdvanced)."""
import math

import pytest
import torch

from support.comfy_host import encode

PROMPT = "a horse galloping on a beach"
STEPS, START, WARP = 5, 1, 3          # ddim_uniform: timesteps 801, 601, 401, 201, 1: T = 601, T' = 201
FRAMES, SIZE, CFG, SEED = 4, 16, 5.0, 7


def _latent(batch=1, size=SIZE):
    return {"samples": torch.zeros(batch, 4, size, size)}


def _settings(**overrides):
    values = dict(frames=FRAMES, seed=SEED, steps=STEPS, scheduler="ddim_uniform", cfg=CFG, motion_x=1.0,
                  motion_y=1.0, strength=8.0, start_at_step=START, warp_at_step=WARP)   # 8 px: 1 latent px / frame
    values.update(overrides)
    return values


def _prompts(clip):
    return encode(clip, PROMPT), encode(clip, "")


def _node(model, clip, latent=None, **overrides):
    from editkit.nodes.text2video import MotionLatentsNode
    positive, negative = _prompts(clip)
    return MotionLatentsNode.execute(model, positive, negative, latent or _latent(), **_settings(**overrides)).result


def _work(model, clip, **overrides):
    """The node's intermediate results (sampling space) and full schedule."""
    from editkit.nodes.text2video import make_motion_latents
    positive, negative = _prompts(clip)
    return make_motion_latents(model, positive, negative, _latent(), **_settings(**overrides))


def _ksampler(model, clip, latent, noise, start=None, last=None, disable_noise=False):
    """comfy.sample.sample as KSamplerAdvanced runs it (return_with_leftover_noise: force_full_denoise off)."""
    import comfy.sample
    positive, negative = _prompts(clip)
    return comfy.sample.sample(model, noise, STEPS, CFG, "ddim", "ddim_uniform", positive, negative, latent,
                               disable_noise=disable_noise, start_step=start, last_step=last,
                               force_full_denoise=False, disable_pbar=True, seed=SEED)


def _close(a, b, rtol=1e-5):
    return (a - b).abs().max().item() <= rtol * max(1.0, b.abs().max().item())


def _inside(k):
    """Pixels whose source lies in the frame when the content moved by (-k, -k)."""
    return (..., slice(0, SIZE - k), slice(0, SIZE - k))


def test_the_node_is_registered_with_the_papers_defaults(host):
    from editkit.nodes.text2video import MotionLatentsNode
    assert host.NODE_CLASS_MAPPINGS["EditKitMotionLatents"] is not None
    assert host.NODE_DISPLAY_NAME_MAPPINGS["EditKitMotionLatents"] == "Motion Latents (Text2Video-Zero)"
    schema = MotionLatentsNode.GET_SCHEMA()                  # ComfyUI's own checks of a V3 schema
    defaults = {i.id: i.default for i in schema.inputs if getattr(i, "default", None) is not None}
    assert defaults == dict(frames=8, seed=0, steps=50, scheduler="ddim_uniform", cfg=7.5, motion_x=1.0,
                            motion_y=1.0, strength=12.0, start_at_step=2, warp_at_step=5, padding="reflection",
                            interpolation="nearest")
    assert [o.io_type for o in schema.outputs] == ["LATENT", "SIGMAS"]


def test_the_output_has_the_frames_and_the_schedule_from_the_start_step(tiny, host):
    import comfy.samplers
    model, clip, _ = tiny
    empty = host.NODE_CLASS_MAPPINGS["EmptyLatentImage"]().generate(SIZE * 8, SIZE * 8, 1)[0]
    latent, sigmas = _node(model, clip, latent=empty)
    assert latent["samples"].shape == (FRAMES, 4, SIZE, SIZE) and torch.isfinite(latent["samples"]).all()
    full = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "ddim_uniform", STEPS)
    assert torch.equal(sigmas, full.float().cpu()[START:])
    result, _ = _work(model, clip)
    assert torch.equal(latent["samples"], model.model.process_latent_out(result.latents))


def test_the_first_frame_is_the_seeds_own_sampling_up_to_each_step(tiny):
    """x_T (frame 0 of the output) and x_T' are what KSamplerAdvanced makes from the same seed and an empty
    latent when it stops at start_at_step / warp_at_step with the leftover noise: the window is ComfyUI's own
    sampling, and the first noise is KSampler's."""
    import comfy.sample
    model, clip, _ = tiny
    latent, _ = _node(model, clip)
    result, _ = _work(model, clip)
    noise = comfy.sample.prepare_noise(_latent()["samples"], SEED)
    at_start = _ksampler(model, clip, _latent()["samples"], noise, last=START)
    at_warp = _ksampler(model, clip, _latent()["samples"], noise, last=WARP)
    assert _close(latent["samples"][0:1], at_start)
    assert _close(model.model.process_latent_out(result.x_t_prime), at_warp)


def test_frame_k_is_frame_0_moved_by_k_lambda_delta_and_renoised_with_its_own_noise(tiny):
    """With δ = (1, 1) and λ = 8 px = 1 latent pixel, frame k samples x_T' at p + (k, k): inside the frame it is
    torch.roll by (-k, -k), exactly; then x_T^k = x̃_T'^k + sqrt(σ_T² − σ_T'²) ε^k, ε^k the seed's next
    draws."""
    model, clip, _ = tiny
    result, sigmas = _work(model, clip)
    x = result.x_t_prime[0]
    for k in range(FRAMES):
        assert torch.equal(result.warped[k][_inside(k)], torch.roll(x, (-k, -k), (-2, -1))[_inside(k)])
    assert torch.equal(result.warped[0], x) and torch.equal(result.latents[0], result.x_t[0])
    generator = torch.Generator().manual_seed(SEED)
    torch.randn(1, 4, SIZE, SIZE, generator=generator)                      # the first frame's noise
    fresh = torch.randn(FRAMES - 1, 4, SIZE, SIZE, generator=generator)
    scale = math.sqrt(float(sigmas[START]) ** 2 - float(sigmas[WARP]) ** 2)
    assert torch.allclose(result.latents[1:], result.warped[1:] + scale * fresh, rtol=0, atol=1e-5)


def test_without_motion_the_frames_share_x_t_prime_and_differ_by_their_fresh_noise(tiny):
    """The paper's forward step (and the official code's torch.randn_like over all warped frames) re-noises each
    frame with its own noise, so at strength 0 the frames are not identical: frames 1.. are x_T' plus
    independent noise of scale sqrt(σ_T² − σ_T'²), frame 0 is x_T itself."""
    model, clip, _ = tiny
    result, sigmas = _work(model, clip, strength=0.0)
    assert all(torch.equal(w, result.x_t_prime[0]) for w in result.warped)
    scale = math.sqrt(float(sigmas[START]) ** 2 - float(sigmas[WARP]) ** 2)
    residuals = [(result.latents[k] - result.x_t_prime[0]).flatten() / scale for k in range(1, FRAMES)]
    for r in residuals:
        assert abs(r.mean().item()) < 0.1 and abs(r.std().item() - 1.0) < 0.1
    correlation = torch.corrcoef(torch.stack(residuals))
    assert (correlation - torch.eye(FRAMES - 1)).abs().max() < 0.15
    assert not torch.equal(result.latents[1], result.latents[0])
    latent, _ = _node(model, clip, motion_x=0.0, motion_y=0.0)               # no direction: no motion either
    assert torch.equal(latent["samples"], model.model.process_latent_out(result.latents))


def test_the_seed_decides_everything(tiny):
    model, clip, _ = tiny
    a, _ = _node(model, clip)
    b, _ = _node(model, clip)
    c, _ = _node(model, clip, seed=SEED + 1)
    assert torch.equal(a["samples"], b["samples"]) and not torch.equal(a["samples"], c["samples"])


def test_the_output_samples_with_no_added_noise_and_frame_0_is_the_seeds_image(tiny):
    """KSamplerAdvanced (add_noise off, start_at_step) and SamplerCustomAdvanced (DisableNoise, the SIGMAS
    output) sample the same video; with Keyframe Attention (first) frame 0 reads only itself, so it is the image
    KSampler makes from the seed on its own."""
    import comfy.sample
    import comfy.samplers
    from editkit.nodes.keyframe_attention import KeyframeAttentionNode
    model, clip, _ = tiny
    latent, sigmas = _node(model, clip)
    video_model = KeyframeAttentionNode.execute(model, {"mode": "first"}, "", 0.0, 1.0, 0, 0.0, 0.5).result[0]
    samples = latent["samples"]
    advanced = _ksampler(video_model, clip, samples, torch.zeros_like(samples), start=START, disable_noise=True)
    positive, negative = _prompts(clip)
    custom = comfy.sample.sample_custom(video_model, torch.zeros_like(samples), CFG,
                                        comfy.samplers.sampler_object("ddim"), sigmas, positive, negative, samples,
                                        disable_pbar=True, seed=SEED)
    assert advanced.shape == (FRAMES, 4, SIZE, SIZE) and torch.isfinite(advanced).all()
    assert _close(custom, advanced)
    image = _ksampler(model, clip, _latent()["samples"], comfy.sample.prepare_noise(_latent()["samples"], SEED))
    assert _close(advanced[0:1], image, rtol=1e-4)
    assert not _close(advanced[1:2], image, rtol=1e-2)


def test_the_input_model_is_unchanged(tiny):
    model, clip, _ = tiny
    options = repr(model.model_options)
    patches = dict(model.object_patches)
    _node(model, clip)
    assert repr(model.model_options) == options and model.object_patches == patches


def test_bad_inputs_are_refused_naming_the_input(tiny, host):
    model, clip, _ = tiny
    with pytest.raises(ValueError, match="latent: give the latent of ONE image"):
        _node(model, clip, latent=_latent(batch=2))
    with pytest.raises(ValueError, match="latent: expected the latent of one image"):
        _node(model, clip, latent={"samples": torch.zeros(1, 4, 2, SIZE, SIZE)})
    with pytest.raises(ValueError, match="latent: shape"):
        _node(model, clip, latent={"samples": torch.ones(1, 3, SIZE, SIZE)})
    with pytest.raises(ValueError, match=r"warp_at_step: 0 must be between start_at_step \(1\)"):
        _node(model, clip, warp_at_step=0)
    with pytest.raises(ValueError, match=r"warp_at_step: 5 must be between .* the last step \(4\)"):
        _node(model, clip, warp_at_step=5)
    with pytest.raises(ValueError, match="start_at_step: 7 must be between 0 and the last step"):
        _node(model, clip, start_at_step=7, warp_at_step=7)
    for frames in (0, 1):
        with pytest.raises(ValueError, match=f"frames: expected at least 2, got {frames} .one frame has no motion"):
            _node(model, clip, frames=frames)
    with pytest.raises(ValueError, match="strength: expected a number >= 0"):
        _node(model, clip, strength=-1.0)
    with pytest.raises(ValueError, match="padding: 'wrap' is not one of"):
        _node(model, clip, padding="wrap")
    flow = host.NODE_CLASS_MAPPINGS["ModelSamplingSD3"]().patch(model, 3.0)[0]
    with pytest.raises(ValueError, match="model: motion latents re-noise .* with CONST"):
        _node(flow, clip)
