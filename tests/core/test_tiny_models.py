"""Tests of the tiny SD1.5-layout test models (tests/support/tiny_models.py)."""
import pytest
import torch

from support import comfy_host, tiny_models


@pytest.fixture(scope="module")
def diffusers_unet():
    return tiny_models.make_diffusers_unet(seed=0)


@pytest.fixture(scope="module")
def comfy_booted(tmp_path_factory):
    comfy_host.require_host()
    return comfy_host.boot_comfy(tmp_path_factory.mktemp("comfy_host"))


def _inputs(seed=1, batch=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    c = torch.randn(batch, 77, tiny_models.CONTEXT_DIM, generator=g)
    c2 = torch.randn(batch, 77, tiny_models.CONTEXT_DIM, generator=g)
    t = torch.tensor([999.0, 25.0][:batch])
    return x, t, c, c2


def test_diffusers_unet_has_sd15_layout(diffusers_unet):
    cfg = diffusers_unet.config
    assert list(cfg.block_out_channels) == [32, 32, 64, 64]
    assert cfg.layers_per_block == 2
    assert [len(b.attentions) if hasattr(b, "attentions") else 0 for b in diffusers_unet.down_blocks] == [2, 2, 2, 0]
    assert [len(b.attentions) if hasattr(b, "attentions") else 0 for b in diffusers_unet.up_blocks] == [0, 3, 3, 3]
    # 8 heads everywhere, like SD1.5
    attn = diffusers_unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    assert attn.heads == 8 and attn.to_k.in_features == tiny_models.CONTEXT_DIM


def test_diffusers_unet_finite_and_context_dependent(diffusers_unet):
    x, t, c, c2 = _inputs()
    with torch.no_grad():
        y = diffusers_unet(x, t, encoder_hidden_states=c).sample
        y2 = diffusers_unet(x, t, encoder_hidden_states=c2).sample
    assert y.shape == x.shape
    assert torch.isfinite(y).all()
    assert 0.05 < y.std().item() < 5.0, y.std()
    rel = ((y - y2).norm() / y.norm()).item()
    assert rel > 0.1, f"cross-attention barely matters (rel diff {rel})"


def test_diffusers_unet_is_deterministic_per_seed(diffusers_unet):
    other = tiny_models.make_diffusers_unet(seed=0)
    different = tiny_models.make_diffusers_unet(seed=1)
    sd, so, sdiff = diffusers_unet.state_dict(), other.state_dict(), different.state_dict()
    assert all(torch.equal(sd[k], so[k]) for k in sd)
    assert not torch.equal(sd["conv_out.weight"], sdiff["conv_out.weight"])
    # diffusers zero-initialises conv_out; it must have been overwritten
    assert sd["conv_out.weight"].abs().sum() > 0


def test_comfy_model_matches_diffusers(comfy_booted, diffusers_unet):
    patcher = tiny_models.make_comfy_model(seed=0)
    import comfy.model_base

    model = patcher.model
    assert model.model_type == comfy.model_base.ModelType.EPS
    x, t, c, _ = _inputs()
    with torch.no_grad():
        ref = diffusers_unet(x, t, encoder_hidden_states=c).sample
        out = model.diffusion_model(x, timesteps=t, context=c)
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max().item() < 1e-5


def test_comfy_model_transformer_blocks_like_sd15(comfy_booted):
    dm = tiny_models.make_comfy_model(seed=0).model.diffusion_model

    def has_transformer(block):
        return any(type(m).__name__ == "SpatialTransformer" for m in block)

    ids = {
        "input": tuple(i for i, b in enumerate(dm.input_blocks) if has_transformer(b)),
        "middle": tuple(i for i, b in enumerate(dm.middle_block) if type(b).__name__ == "SpatialTransformer"),
        "output": tuple(i for i, b in enumerate(dm.output_blocks) if has_transformer(b)),
    }
    assert ids["input"] == tiny_models.TRANSFORMER_BLOCK_IDS["input"]
    assert ids["output"] == tiny_models.TRANSFORMER_BLOCK_IDS["output"]
    assert len(ids["middle"]) == 1  # middle_block = [ResBlock, SpatialTransformer, ResBlock]


def test_comfy_model_sd15_schedule(comfy_booted):
    ms = tiny_models.make_comfy_model(seed=0).get_model_object("model_sampling")
    # SD1.5: scaled-linear betas 0.00085..0.012, 1000 steps
    assert ms.sigmas.shape[0] == 1000
    assert abs(ms.sigma_max.item() - 14.6146) < 1e-3
    assert abs(ms.sigma_min.item() - 0.0292) < 1e-3


def test_tiny_clip_long_prompt(comfy_booted):
    clip = tiny_models.make_comfy_clip(seed=0)
    tokens = clip.tokenize("cat " * 100)  # 100 tokens -> two chunks of 77
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    assert cond.shape == (1, 154, tiny_models.CONTEXT_DIM)
    assert pooled.shape == (1, tiny_models.CONTEXT_DIM)
    assert torch.isfinite(cond).all()
    short = clip.encode_from_tokens(clip.tokenize("a photo of a cat"))
    other = clip.encode_from_tokens(clip.tokenize("a drawing of a house"))
    assert short.shape == (1, 77, tiny_models.CONTEXT_DIM)
    assert not torch.allclose(short, other)
    again = tiny_models.make_comfy_clip(seed=0).encode_from_tokens(clip.tokenize("a photo of a cat"))
    assert torch.equal(short, again)


@pytest.mark.parametrize("size", [64, 128])
def test_tiny_vae_round_trip(comfy_booted, size):
    vae = tiny_models.make_comfy_vae(seed=0)
    img = torch.rand(1, size, size, 3, generator=torch.Generator().manual_seed(0))
    lat = vae.encode(img)
    assert lat.shape == (1, 4, size // 8, size // 8)
    assert torch.isfinite(lat).all()
    dec = vae.decode(lat)
    assert dec.shape == (1, size, size, 3)
    assert torch.isfinite(dec).all()
    assert dec.min() >= 0.0 and dec.max() <= 1.0


def test_tiny_checkpoint_returns_independent_clones(comfy_booted):
    m1, c1, v1 = tiny_models.tiny_checkpoint(0)
    m2, c2, v2 = tiny_models.tiny_checkpoint(0)
    assert m1 is not m2 and c1 is not c2 and v1 is not v2
    m1.set_model_unet_function_wrapper(lambda f, args: f(args["input"], args["timestep"], **args["c"]))
    assert "model_function_wrapper" in m1.model_options
    assert "model_function_wrapper" not in m2.model_options
    assert "model_function_wrapper" not in tiny_models.tiny_checkpoint(0)[0].model_options
