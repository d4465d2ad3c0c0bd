"""The LatentFuser (MultiDiffusion) inside the real ComfyUI, on the tiny model: windows sampled by stock
sampling (comfy.sample.sample, what KSampler runs), regions, circular panoramas, ControlNet crops."""
import pytest
import torch

from support.comfy_host import encode

STEPS = 4
PROMPT = "a mountain landscape"
WINDOW = 128   # px: 16x16 latents, the tiny model's size


def _fuser(model, window=WINDOW, stride=64, window_batch=4, circular=False, regions=None, bootstrap=0.0, vae=None,
           seed=0, mode=None):
    from editkit.nodes.latent_fuser import LatentFuserNode
    return LatentFuserNode.execute(model, window, stride, window_batch, circular, mode or {"mode": "multidiffusion"},
                                   bootstrap, seed, regions=regions, vae=vae).result[0]


def _region(clip, text, mask):
    from editkit.nodes.latent_fuser import RegionPrompt
    return RegionPrompt.execute(encode(clip, text), mask).result[0]


def _sample(model, clip, latent, prompt=PROMPT, seed=0, sampler="euler", denoise=1.0, positive=None, negative=None):
    import comfy.sample
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, STEPS, 5.0, sampler, "normal",
                               positive if positive is not None else encode(clip, prompt),
                               negative if negative is not None else encode(clip, ""), latent, denoise=denoise,
                               disable_pbar=True, seed=seed)


def _close(a, b, rtol=1e-4):
    return (a - b).abs().max() <= rtol * max(1.0, b.abs().max().item())


def test_one_window_covering_the_latent_is_plain_sampling(tiny):
    model, clip, _ = tiny
    latent = torch.zeros(1, 4, 16, 16)
    assert torch.equal(_sample(_fuser(model), clip, latent), _sample(model, clip, latent))


def test_one_window_with_regions_of_the_same_prompt_is_plain_sampling(tiny):
    """Every prompt evaluated on the window and fused by the masks: the general path, no shortcut."""
    model, clip, _ = tiny
    latent = torch.zeros(1, 4, 16, 16)
    left = torch.zeros(128, 128)
    left[:, :64] = 1.0
    regions = {"region_0": _region(clip, PROMPT, left), "region_1": _region(clip, PROMPT, 1 - left)}
    fused = _sample(_fuser(model, regions=regions), clip, latent)
    assert _close(fused, _sample(model, clip, latent))


def test_windows_as_wide_as_the_stride_are_independent_tiles(tiny):
    import comfy.sample
    model, clip, _ = tiny
    latent = torch.zeros(1, 4, 16, 32)
    noise = comfy.sample.prepare_noise(latent, 0)
    tiles = _sample(_fuser(model, stride=WINDOW), clip, latent)
    for left in (0, 16):
        alone = comfy.sample.sample(model, noise[..., left:left + 16], STEPS, 5.0, "euler", "normal",
                                    encode(clip, PROMPT), encode(clip, ""), latent[..., left:left + 16],
                                    disable_pbar=True, seed=0)
        assert _close(tiles[..., left:left + 16], alone)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "dpmpp_2m_sde", "heun"])
def test_a_panorama_samples_with_any_sampler(tiny, sampler):
    model, clip, _ = tiny
    out = _sample(_fuser(model), clip, torch.zeros(1, 4, 16, 48), sampler=sampler)
    assert out.shape == (1, 4, 16, 48) and torch.isfinite(out).all()


def test_a_panorama_is_the_average_of_its_windows_predictions(tiny):
    """Two windows overlapping by half: in the overlap the prediction is the mean of both windows'."""
    from editkit.core.multidiffusion import window_layout
    model, clip, _ = tiny
    fused = _fuser(model, stride=64)
    windows = window_layout((16, 24), (16, 16), (8, 8))
    assert [w.left for w in windows] == [0, 8]
    out = _sample(fused, clip, torch.zeros(1, 4, 16, 24))
    assert out.shape == (1, 4, 16, 24) and torch.isfinite(out).all()


def test_the_input_model_is_unchanged(tiny):
    model, clip, _ = tiny
    before = dict(model.model_options.get("transformer_options", {}))
    wrappers = {k: dict(v) for k, v in model.wrappers.items()}
    _sample(_fuser(model), clip, torch.zeros(1, 4, 16, 32))
    assert model.model_options.get("transformer_options", {}) == before
    assert {k: dict(v) for k, v in model.wrappers.items()} == wrappers


def test_a_circular_panorama_has_no_seam_anywhere(tiny):
    """360 degrees: the windows wrap, so the left and right edges are neighbours like any two columns. Then
    rolling the initial noise by half the width rolls the panorama by half its width: the seam is sampled like
    the middle. Without wrapping it is not (the edges are two ends)."""
    import comfy.sample
    model, clip, _ = tiny
    latent = torch.zeros(1, 4, 16, 48)
    noise = comfy.sample.prepare_noise(latent, 0)

    def sample(model_, noise_):
        return comfy.sample.sample(model_, noise_, STEPS, 5.0, "euler", "normal", encode(clip, PROMPT),
                                   encode(clip, ""), latent, disable_pbar=True, seed=0)
    circular = _fuser(model, circular=True)
    rolled = sample(circular, noise.roll(24, dims=-1))
    assert _close(rolled, sample(circular, noise).roll(24, dims=-1))
    flat = _fuser(model)
    assert not _close(sample(flat, noise.roll(24, dims=-1)), sample(flat, noise).roll(24, dims=-1), rtol=1e-2)


def test_a_region_prompt_changes_its_region_most(tiny):
    model, clip, vae = tiny
    latent = torch.zeros(1, 4, 16, 32)
    mask = torch.zeros(128, 256)
    mask[:, 160:] = 1.0
    region = {"region_0": _region(clip, "a red car", mask)}
    background = _sample(_fuser(model), clip, latent)
    with_region = _sample(_fuser(model, regions=region, bootstrap=1.0, vae=vae), clip, latent)
    difference = (with_region - background).abs().mean(dim=(0, 1, 2))   # per latent column
    assert difference[20:].mean() > 3 * difference[:8].mean()


def test_a_region_prompt_leaves_the_tiles_without_its_mask_as_the_background_run(tiny):
    """Bootstrapping on every step and windows as wide as the stride: the tile that holds no part of the region
    is sampled exactly as without the region; inside the region's tile the region's prompt shows."""
    model, clip, vae = tiny
    latent = torch.zeros(1, 4, 16, 32)
    mask = torch.zeros(128, 256)
    mask[32:96, 160:224] = 1.0
    region = {"region_0": _region(clip, "a red car", mask)}
    background = _sample(_fuser(model, stride=WINDOW), clip, latent)
    with_region = _sample(_fuser(model, stride=WINDOW, regions=region, bootstrap=1.0, vae=vae), clip, latent)
    assert _close(with_region[..., :16], background[..., :16], rtol=1e-5)
    assert not _close(with_region[..., 20:28], background[..., 20:28], rtol=1e-2)


def test_bad_inputs_are_refused(tiny):
    model, clip, vae = tiny
    with pytest.raises(ValueError, match="window: 130 px is not a multiple of 8"):
        _fuser(model, window=130)
    with pytest.raises(ValueError, match="stride: 136 px between windows of window 128 px leaves the 8 px"):
        _fuser(model, window=128, stride=136)
    with pytest.raises(ValueError, match="window: 16x16 latents is larger than the latent"):
        _sample(_fuser(model), clip, torch.zeros(1, 4, 8, 32))
    mask = torch.ones(128, 128)
    with pytest.raises(ValueError, match="vae: region prompts with bootstrapping need the VAE"):
        _fuser(model, regions={"region_0": _region(clip, "a car", mask)}, bootstrap=0.4)
    with pytest.raises(ValueError, match="mask: the region's mask is empty"):
        _region(clip, "a car", torch.zeros(128, 128))
    with pytest.raises(ValueError, match="model: it already samples in windows"):
        _fuser(_fuser(model))
    square = {"region_0": _region(clip, "a car", torch.ones(128, 128))}
    with pytest.raises(ValueError, match="regions: region 1's mask is 128x128 but the image is 256x128 px"):
        _sample(_fuser(model, regions=square), clip, torch.zeros(1, 4, 16, 32))


def test_each_window_gets_its_crop_of_the_controlnet_hint(tiny, tmp_path):
    """The hint is resized to the whole image and cropped per window (stacked per row of the batch), where
    ComfyUI alone would squeeze the whole hint into each window; the control object is left as it was."""
    import comfy.controlnet
    import comfy.utils
    import nodes
    from editkit.core.multidiffusion import Window, crop, window_layout
    from support.tiny_models import save_tiny_controlnet
    model, clip, _ = tiny
    control = comfy.controlnet.load_controlnet(str(save_tiny_controlnet(tmp_path, seed=0)))
    y, x = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 192), indexing="ij")
    hint = torch.stack([x, y, x * y], dim=-1)[None]                       # (1, 64, 192, 3): half the image size
    positive, negative = nodes.ControlNetApplyAdvanced().apply_controlnet(encode(clip, PROMPT), encode(clip, ""),
                                                                          control, hint, 1.0, 0.0, 1.0)
    applied = positive[0][1]["control"]
    seen = []
    get_control = applied.get_control

    def recording(x_noisy, t, cond, batched_number, transformer_options):
        seen.append((applied.cond_hint_original.clone(), x_noisy.shape))
        return get_control(x_noisy, t, cond, batched_number, transformer_options)
    applied.get_control = recording
    latent = torch.zeros(1, 4, 16, 48)
    out = _sample(_fuser(model, window_batch=2), clip, latent, positive=positive, negative=negative)
    assert torch.isfinite(out).all()
    windows = window_layout((16, 48), (16, 16), (8, 8))
    full = comfy.utils.common_upscale(hint.movedim(-1, 1), 384, 128, "nearest-exact", "center")
    first, shape = seen[0]
    assert shape[0] == 2 * 2   # two windows x (cond, uncond), one call
    expected = torch.cat([crop(full, Window(w.top * 8, w.left * 8, 128, 128)) for w in windows[:2]])
    assert torch.equal(first, expected)
    assert len(seen) == STEPS * len(range(0, len(windows), 2))
    assert applied.cond_hint_original.shape == (1, 3, 64, 192)   # put back after each batch


def _pair_edit(model, clip, latent, **settings):
    """Prompt-to-Prompt's pair (source, target) sampled from one noise with ddim; (2, C, H, W)."""
    import comfy.samplers
    from support.node_calls import attention_controller
    guider = attention_controller(model, clip, source_prompt="a cat riding a bicycle",
                                  target_prompt="a dog riding a bicycle", negative_prompt="", cfg=5.0, **settings)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "ddim_uniform", STEPS)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
    return guider.sample(noise, latent, comfy.samplers.sampler_object("ddim"), sigmas, disable_pbar=True, seed=0)


def test_prompt_to_prompt_on_a_panorama_edits_each_window_with_its_own_source(tiny):
    """Windows as wide as the stride are independent tiles: the word swap on the panorama equals the word swap
    on each tile alone (the controller pairs each window's target row with that window's source row)."""
    model, clip, _ = tiny
    latent = torch.zeros(1, 4, 16, 32)
    edit = dict(edit="word_swap", cross_replace=0.8, self_replace=0.4)
    tiled = _pair_edit(_fuser(model, stride=WINDOW), clip, latent, **edit)
    whole = _pair_edit(model, clip, latent, **edit)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
    for left in (0, 16):
        import comfy.samplers
        from support.node_calls import attention_controller
        guider = attention_controller(model, clip, source_prompt="a cat riding a bicycle",
                                      target_prompt="a dog riding a bicycle", negative_prompt="", cfg=5.0, **edit)
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "ddim_uniform", STEPS)
        alone = guider.sample(noise[..., left:left + 16], latent[..., left:left + 16],
                              comfy.samplers.sampler_object("ddim"), sigmas, disable_pbar=True, seed=0)
        assert _close(tiled[..., left:left + 16], alone)
    assert not _close(tiled, whole, rtol=1e-2)          # the tiles are not the whole latent's edit
    assert not _close(tiled[1], tiled[0], rtol=1e-2)     # the target is edited


def test_prompt_to_prompt_with_overlapping_windows_keeps_the_source_the_plain_panorama(tiny):
    """The source row is the MultiDiffusion panorama of the source prompt; the target row differs from it."""
    import comfy.samplers
    model, clip, _ = tiny
    latent = torch.zeros(1, 4, 16, 32)
    fused = _fuser(model)
    pair = _pair_edit(fused, clip, latent, edit="word_swap", cross_replace=0.8, self_replace=0.4)
    guider = comfy.samplers.CFGGuider(fused)
    guider.set_conds(encode(clip, "a cat riding a bicycle"), encode(clip, ""))
    guider.set_cfg(5.0)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "ddim_uniform", STEPS)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
    source = guider.sample(noise, latent, comfy.samplers.sampler_object("ddim"), sigmas, disable_pbar=True, seed=0)
    assert _close(pair[0:1], source)
    assert not _close(pair[1:2], source, rtol=1e-2)


def test_controllers_that_need_the_whole_image_are_refused_on_windows(tiny):
    from editkit.nodes.attention_maps import CaptureAttentionMaps
    model, clip, _ = tiny
    latent = torch.zeros(1, 4, 16, 32)
    with pytest.raises(ValueError, match="local blend .* does not combine with the Latent Fuser's windows"):
        _pair_edit(_fuser(model), clip, latent, edit="word_swap", blend_words="cat")
    with pytest.raises(ValueError, match="MasaCtrl with masks"):
        _pair_edit(_fuser(model), clip, latent, edit="masactrl", mask_word="bicycle")
    captured = CaptureAttentionMaps.execute(_fuser(model), 16, 0.0, 1.0).result[0]
    with pytest.raises(ValueError, match="attention-map capture"):
        _sample(captured, clip, latent)
