"""The mechanism on a real (tiny) diffusers UNet: identity, sites, capture."""
import pytest
import torch

pytest.importorskip("diffusers")

from editkit.core import schedule
from editkit.core.attention import AttentionController, BatchLayout
from editkit.core.capture import AttentionMapCapture
from editkit.core.diffusers_adapter import DiffusersAttentionAdapter
from support.tiny_models import make_diffusers_unet
from support.controllers import PassThrough

STEPS = 6
LATENT_HW = (8, 8)


@pytest.fixture(scope="module")
def unet():
    return make_diffusers_unet(seed=0)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(1, 4, *LATENT_HW, generator=g)
    cond = torch.randn(1, 77, 32, generator=g)
    uncond = torch.randn(1, 77, 32, generator=g)
    return latent, cond, uncond


@torch.no_grad()
def ddim_sample(unet, latent, cond, uncond, cfg=5.0, session=None):
    """Plain DDIM with classifier-free guidance, batch [cond, uncond] as ComfyUI orders it."""
    alphas = schedule.sd_alphas_cumprod().float()
    timesteps = torch.linspace(999, 0, STEPS).round().long()
    x = latent * (1 - alphas[timesteps[0]]).sqrt()
    for i, t in enumerate(timesteps):
        if session is not None:
            session.step = i
        eps_c, eps_u = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([cond, uncond])).sample.chunk(2)
        eps = eps_u + cfg * (eps_c - eps_u)
        a_next = alphas[timesteps[i + 1]] if i + 1 < STEPS else torch.tensor(1.0)
        x = schedule.ddim_step(x, eps, alphas[t], a_next)
    return x


def _sample_with(unet, controller):
    latent, cond, uncond = _inputs()
    adapter = DiffusersAttentionAdapter(unet, [controller]).install()
    try:
        with adapter.run(STEPS, LATENT_HW, BatchLayout(("cond", "uncond"), 1)) as session:
            return ddim_sample(unet, latent, cond, uncond, session=session)
    finally:
        adapter.uninstall()


@pytest.mark.parametrize("controller", [AttentionController(), PassThrough()])
def test_no_op_controllers_reproduce_plain_sampling(unet, controller):
    plain = ddim_sample(unet, *_inputs())
    assert (_sample_with(unet, controller) - plain).abs().max() < 1e-5
    assert torch.equal(ddim_sample(unet, *_inputs()), plain)   # uninstall restores the processors


@pytest.mark.parametrize("controller", [PassThrough(probs=True), AttentionMapCapture(max_tokens=10**6)])
def test_materialised_probabilities_match_fast_attention(unet, controller):
    """Explicit softmax differs from SDPA by float32 rounding only: 1e-5 on one UNet evaluation, and 1e-5
    relative to the latent's scale after a whole run (a random UNet amplifies rounding along the run)."""
    latent, cond, uncond = _inputs()
    x, ctx = torch.cat([latent, latent]), torch.cat([cond, uncond])
    with torch.no_grad():
        plain_eps = unet(x, 500, encoder_hidden_states=ctx).sample
        adapter = DiffusersAttentionAdapter(unet, [controller]).install()
        with adapter.run(1, LATENT_HW, BatchLayout(("cond", "uncond"), 1)):
            eps = unet(x, 500, encoder_hidden_states=ctx).sample
        adapter.uninstall()
    assert (eps - plain_eps).abs().max() < 1e-5
    plain = ddim_sample(unet, latent, cond, uncond)
    assert (_sample_with(unet, controller) - plain).abs().max() < 1e-5 * plain.abs().max()


def test_site_names_follow_comfyui_blocks(unet):
    adapter = DiffusersAttentionAdapter(unet)
    sites = adapter.site_list()
    blocks = sorted({(s.block, s.block_id) for s in sites}, key=lambda b: ({"input": 0, "middle": 1, "output": 2}[b[0]], b[1]))
    assert blocks == [("input", 1), ("input", 2), ("input", 4), ("input", 5), ("input", 7), ("input", 8),
                      ("middle", 0)] + [("output", i) for i in range(3, 12)]
    assert len(sites) == 32 and sites[-1].layer == 15


def test_capture_on_diffusers_sums_to_one(unet):
    cap = AttentionMapCapture(max_tokens=16)
    latent, cond, uncond = _inputs()
    adapter = DiffusersAttentionAdapter(unet, [cap]).install()
    with adapter.run(STEPS, LATENT_HW, BatchLayout(("cond", "uncond"), 1)) as session:
        ddim_sample(unet, latent, cond, uncond, session=session)
    adapter.uninstall()
    maps = cap.store.maps
    assert maps.shape == (1, 4, 4, 77)   # 4x4, 2x2, 1x1 layers, resized to the largest
    assert torch.allclose(maps.sum(-1), torch.ones(1, 4, 4), atol=1e-5)
