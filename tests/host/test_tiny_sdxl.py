"""The tiny SDXL-layout checkpoint (tests/support/tiny_models.py, issue 24) inside the real ComfyUI.

The layout is checked against SDXL itself: diffusers' published SDXL UNet config, built on the meta device (no
memory), read by ComfyUI's own model detection into ComfyUI's real SDXL unet_config, and ComfyUI's UNetModel
built from that on the meta device gives the transformer sites the tiny model must have.
"""
import copy

import pytest
import torch

from support import tiny_models

# diffusers' config of stabilityai/stable-diffusion-xl-base-1.0 (unet/config.json; the keys that differ from
# UNet2DConditionModel's defaults): an independent statement of SDXL's layout, not derived from the tiny model.
SDXL_BASE_DIFFUSERS_CONFIG = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_embed_type_num_heads=64,
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
# the unet_config keys that carry widths (everything else must be SDXL's)
WIDTH_KEYS = {"model_channels", "context_dim", "adm_in_channels", "num_head_channels", "num_heads", "dtype"}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread for this module (what each pytest-xdist worker already has, tests/conftest.py): the tiny
    SDXL's ops (at most 128 channels on 8x8 latents) gain nothing from a second thread, and on shared cores two
    threads spin-wait (measured with -n 0 on 2 busy cores: 12 s with one thread, 38 to 140 s with two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def real_sdxl(host):
    """(ComfyUI's unet_config of real SDXL, ComfyUI's SDXL UNetModel on the meta device)."""
    import comfy.model_detection
    import comfy.ops
    import comfy.supported_models
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        diffusers_sdxl = UNet2DConditionModel(**SDXL_BASE_DIFFUSERS_CONFIG)
    detected = comfy.model_detection.unet_config_from_diffusers_unet(diffusers_sdxl.state_dict())
    assert detected is not None and comfy.supported_models.SDXL.matches(detected)
    unet_config = comfy.supported_models.SDXL(detected).unet_config   # what CheckpointLoader builds SDXL from
    unet = UNetModel(**unet_config, device="meta", operations=comfy.ops.disable_weight_init)
    return unet_config, unet


def _transformer_sites(diffusion_model):
    """[(block, block_id, block_index, heads)] of every transformer block, in execution order, with ComfyUI's
    names: ("input", i) / ("middle", 0) / ("output", i) as in transformer_options["block"]."""
    from comfy.ldm.modules.attention import SpatialTransformer

    sites = []
    for name, module in diffusion_model.named_modules():
        if not isinstance(module, SpatialTransformer):
            continue
        parts = name.split(".")
        block = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}[parts[0]]
        block_id = 0 if block == "middle" else int(parts[1])
        for index, transformer in enumerate(module.transformer_blocks):
            sites.append((block, block_id, index, transformer.attn1.heads))
    return sites


def _sample(model, positive, negative, seed=0, steps=3, cfg=5.0, size=64):
    import nodes
    latent = nodes.EmptyLatentImage().generate(size, size, 1)[0]
    return nodes.KSampler().sample(model, seed, steps, cfg, "euler", "normal", positive, negative, latent)[0]["samples"]


def _encode(clip, text):
    import nodes
    return nodes.CLIPTextEncode().encode(clip, text)[0]


# --- (a) layout ----------------------------------------------------------------------------------------------

def test_real_sdxl_has_70_transformer_blocks(real_sdxl):
    unet_config, unet = real_sdxl
    assert len(_transformer_sites(unet)) == 70
    assert unet_config["transformer_depth"] == [0, 0, 2, 2, 10, 10]


def test_tiny_config_is_sdxl_but_for_widths(real_sdxl):
    unet_config, _ = real_sdxl
    tiny = tiny_models.TINY_SDXL_COMFY_UNET_CONFIG
    assert {k: v for k, v in tiny.items() if k not in WIDTH_KEYS} == \
           {k: v for k, v in unet_config.items() if k not in WIDTH_KEYS}
    # the text and ADM widths follow SDXL's composition: context L + G, ADM pooled G + 6 Timestep(256)
    assert unet_config["context_dim"] == 768 + 1280 and tiny["context_dim"] == tiny_models.SDXL_CONTEXT_DIM
    assert unet_config["adm_in_channels"] == 1280 + 6 * 256
    assert tiny["adm_in_channels"] == tiny_models.SDXL_POOLED_DIM + 6 * 256


def test_tiny_model_has_sdxl_transformer_sites(real_sdxl, tiny_sdxl):
    _, real_unet = real_sdxl
    model, _, _ = tiny_sdxl
    real = _transformer_sites(real_unet)
    tiny = _transformer_sites(model.model.diffusion_model)
    assert [s[:3] for s in tiny] == [s[:3] for s in real]
    assert len(tiny) == 70
    # several heads everywhere, in SDXL's proportions (real 10 / 20 heads of 64 channels)
    ratios = {r[3] / t[3] for r, t in zip(real, tiny)}
    assert len(ratios) == 1 and min(t[3] for t in tiny) > 1, (ratios, tiny)
    expected = [(block, block_id, index) for (block, block_id), depth in tiny_models.SDXL_TRANSFORMER_SITES
                for index in range(depth)]
    assert [s[:3] for s in real] == expected


def test_attention_patches_see_sdxl_sites_at_run_time(real_sdxl, tiny_sdxl):
    """One sampling step (cfg 1: one evaluation): ComfyUI's attn1 / attn2 patches report SDXL's 70 sites."""
    _, real_unet = real_sdxl
    model, clip, _ = tiny_sdxl
    seen = {"attn1": [], "attn2": []}

    def recorder(kind):
        def patch(q, k, v, extra_options):
            seen[kind].append((*extra_options["block"], extra_options["block_index"], extra_options["n_heads"]))
            return q, k, v
        return patch

    patched = model.clone()
    patched.set_model_attn1_patch(recorder("attn1"))
    patched.set_model_attn2_patch(recorder("attn2"))
    _sample(patched, _encode(clip, "a cat"), _encode(clip, ""), steps=1, cfg=1.0)
    real = [s[:3] for s in _transformer_sites(real_unet)]
    assert [s[:3] for s in seen["attn1"]] == real
    assert [s[:3] for s in seen["attn2"]] == real
    assert seen["attn1"] == _transformer_sites(model.model.diffusion_model)


def test_tiny_model_is_comfyui_sdxl(tiny_sdxl):
    import comfy.latent_formats
    import comfy.model_base
    import comfy.supported_models

    model, _, vae = tiny_sdxl
    assert type(model.model) is comfy.model_base.SDXL
    assert type(model.model.model_config) is comfy.supported_models.SDXL
    assert model.model.model_type == comfy.model_base.ModelType.EPS
    assert isinstance(model.model.latent_format, comfy.latent_formats.SDXL)
    assert model.model.latent_format.scale_factor == pytest.approx(0.13025)
    sampling = model.get_model_object("model_sampling")
    assert abs(sampling.sigma_max.item() - 14.6146) < 1e-3   # SD's scaled-linear schedule
    assert model.model.model_config.unet_config["num_head_channels"] == tiny_models.SDXL_HEAD_CHANNELS
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    assert vae.encode(image).shape == (1, 4, 8, 8)


def test_checkpoint_returns_independent_clones(host):
    m1, c1, v1 = tiny_models.tiny_sdxl_checkpoint(0)
    m2, c2, v2 = tiny_models.tiny_sdxl_checkpoint(0)
    assert m1 is not m2 and c1 is not c2 and v1 is not v2
    assert m1.model is m2.model   # the cached weights are shared, the patches are not
    m1.set_model_attn1_patch(lambda q, k, v, extra_options: (q, k, v))
    assert "patches" in m1.model_options["transformer_options"]
    assert "patches" not in m2.model_options.get("transformer_options", {})
    assert "patches" not in tiny_models.tiny_sdxl_checkpoint(0)[0].model_options.get("transformer_options", {})


# --- (b) ComfyUI and diffusers agree --------------------------------------------------------------------------

def test_comfy_model_matches_diffusers_with_adm(tiny_sdxl):
    model, _, _ = tiny_sdxl
    base = model.model
    unet = tiny_models.make_diffusers_sdxl_unet(seed=0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([999.0, 25.0])
    context = torch.randn(2, 77, tiny_models.SDXL_CONTEXT_DIM, generator=g)
    pooled = torch.randn(2, tiny_models.SDXL_POOLED_DIM, generator=g)
    # ComfyUI order: height, width, crop_h, crop_w, target_height, target_width; diffusers: original (h, w),
    # crop (top, left), target (h, w). Every value distinct, so a swap would show.
    sizes = [dict(height=64, width=96, crop_h=8, crop_w=16, target_height=128, target_width=160),
             dict(height=1024, width=768, crop_h=0, crop_w=32, target_height=896, target_width=1152)]
    adm = torch.cat([base.encode_adm(pooled_output=pooled[i:i + 1], **sizes[i]) for i in range(2)])
    time_ids = torch.tensor([[s["height"], s["width"], s["crop_h"], s["crop_w"], s["target_height"],
                              s["target_width"]] for s in sizes], dtype=torch.float32)
    assert adm.shape == (2, tiny_models.SDXL_ADM_CHANNELS)
    with torch.no_grad():
        out = base.diffusion_model(x, timesteps=t, context=context, y=adm)
        ref = unet(x, t, encoder_hidden_states=context,
                   added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        swapped = unet(x, t, encoder_hidden_states=context,
                       added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids[:, [1, 0, 2, 3, 4, 5]]}).sample
    assert torch.isfinite(out).all() and 0.05 < ref.std().item() < 5.0
    scale = ref.abs().max().item()
    assert (out - ref).abs().max().item() < 1e-5 * scale
    # the ADM path is live: swapping height and width changes the prediction far beyond the tolerance
    assert (swapped - ref).abs().max().item() > 1e-2 * scale


# --- (c) text encoders --------------------------------------------------------------------------------------

def test_clip_text_encode_gives_sdxl_conditioning(tiny_sdxl):
    model, clip, _ = tiny_sdxl
    [[cond, extras]] = _encode(clip, "a photo of a cat")
    assert cond.shape == (1, 77, tiny_models.SDXL_CONTEXT_DIM)
    assert extras["pooled_output"].shape == (1, tiny_models.SDXL_POOLED_DIM)
    assert torch.isfinite(cond).all() and torch.isfinite(extras["pooled_output"]).all()
    # context = [CLIP-L penultimate | CLIP-G penultimate]; pooled = CLIP-G's projected pooled output
    tokens = clip.tokenize("a photo of a cat")
    te = clip.cond_stage_model
    l_out, _ = te.clip_l.encode_token_weights(tokens["l"])
    g_out, g_pooled = te.clip_g.encode_token_weights(tokens["g"])
    assert torch.allclose(cond[..., :tiny_models.SDXL_CLIP_L_WIDTH], l_out, atol=1e-6)
    assert torch.allclose(cond[..., tiny_models.SDXL_CLIP_L_WIDTH:], g_out, atol=1e-6)
    assert torch.allclose(extras["pooled_output"], g_pooled, atol=1e-6)
    # both tokenizers put the words at the same positions; only the padding differs (L: end token, G: 0)
    l_ids = [t for t, _ in tokens["l"][0]]
    g_ids = [t for t, _ in tokens["g"][0]]
    words = l_ids.index(49407) + 1
    assert l_ids[:words] == g_ids[:words] and set(l_ids[words:]) == {49407} and set(g_ids[words:]) == {0}

    [[other, _]] = _encode(clip, "a drawing of a house")
    assert not torch.allclose(cond, other)
    [[again, _]] = _encode(tiny_models.make_comfy_sdxl_clip(seed=0), "a photo of a cat")
    assert torch.equal(cond, again)


def test_long_prompts_give_154_tokens(tiny_sdxl):
    _, clip, _ = tiny_sdxl
    [[cond, extras]] = _encode(clip, "cat " * 100)
    assert cond.shape == (1, 154, tiny_models.SDXL_CONTEXT_DIM)
    assert extras["pooled_output"].shape == (1, tiny_models.SDXL_POOLED_DIM)
    assert torch.isfinite(cond).all()


# --- (d) stock KSampler, (e) the input MODEL unchanged -----------------------------------------------------------

def test_ksampler_is_deterministic_and_finite(tiny_sdxl):
    model, clip, _ = tiny_sdxl
    positive, negative = _encode(clip, "a cat riding a bicycle"), _encode(clip, "blurry")
    first = _sample(model, positive, negative, seed=3)
    assert first.shape == (1, 4, 8, 8) and torch.isfinite(first).all()
    assert torch.equal(_sample(model, positive, negative, seed=3), first)
    assert not torch.allclose(_sample(model, positive, negative, seed=4), first)
    assert not torch.allclose(_sample(model, _encode(clip, "a dog in the snow"), negative, seed=3), first)


def test_sampler_feeds_the_latent_size_to_encode_adm(tiny_sdxl):
    """CLIPTextEncode sets no size: the sampler's encode_model_conds gives width / height = latent * 8 (64 here),
    crops 0 and targets = width / height; encode_adm's own defaults (768) apply only outside the sampler."""
    model, clip, _ = tiny_sdxl
    positive, negative = _encode(clip, "a cat"), _encode(clip, "")
    seen = []

    def wrapper(apply_model, args):
        seen.append(args["c"]["y"].clone())
        return apply_model(args["input"], args["timestep"], **args["c"])

    patched = model.clone()
    patched.set_model_unet_function_wrapper(wrapper)
    _sample(patched, positive, negative, steps=1, cfg=2.0)
    y = torch.cat(seen)                                    # cond and uncond rows (one batch or two)
    assert y.shape == (2, tiny_models.SDXL_ADM_CHANNELS)
    pooled = torch.cat([negative[0][1]["pooled_output"], positive[0][1]["pooled_output"]])
    expected = torch.cat([model.model.encode_adm(pooled_output=p[None], width=64, height=64) for p in pooled])
    by_pooled = {tuple(row[:4].tolist()): row for row in y}
    for row in expected:
        assert torch.allclose(by_pooled[tuple(row[:4].tolist())], row, atol=1e-6)
    default = model.model.encode_adm(pooled_output=pooled[:1])
    assert not torch.allclose(default, expected[:1])


def test_input_model_is_unchanged_after_sampling(tiny_sdxl):
    model, clip, _ = tiny_sdxl
    positive, negative = _encode(clip, "a cat riding a bicycle"), _encode(clip, "blurry")
    options = copy.deepcopy(model.model_options)
    wrappers = copy.copy(model.wrappers)
    weights = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    before = _sample(model, positive, negative)
    patched = model.clone()
    patched.set_model_attn1_patch(lambda q, k, v, extra_options: (q * 1.5, k, v))
    changed = _sample(patched, positive, negative)
    assert not torch.allclose(changed, before)
    assert model.model_options == options and model.wrappers == wrappers
    after = model.model.diffusion_model.state_dict()
    assert set(after) == set(weights) and all(torch.equal(after[k], weights[k]) for k in weights)
    assert torch.equal(_sample(model, positive, negative), before)
