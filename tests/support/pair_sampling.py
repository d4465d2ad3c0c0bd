"""A source and its targets sampled as one batch on a tiny diffusers UNet, for the core controller tests."""
import torch

from editkit.core import schedule
from editkit.core.attention import BatchLayout

STEPS = 6
LATENT_HW = (16, 16)


@torch.no_grad()
def pair_sample(unet, controllers, source, target, uncond, cfg=5.0, items=2, target_uncond=None, pair=True):
    """DDIM with CFG over the batch [source, target] x [cond, uncond] (ComfyUI's row order), same x_T; the
    target's unconditional context may differ from the source's. `pair=False`: a plain batch of two images."""
    from editkit.core.diffusers_adapter import DiffusersAttentionAdapter
    alphas = schedule.sd_alphas_cumprod().float()
    timesteps = torch.linspace(999, 0, STEPS).round().long()
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(1, 4, *LATENT_HW, generator=g) * (1 - alphas[timesteps[0]]).sqrt()).repeat(items, 1, 1, 1)
    target_uncond = uncond if target_uncond is None else target_uncond
    contexts = torch.cat([source, target][:items] + [uncond] + [target_uncond] * (items - 1))
    adapter = DiffusersAttentionAdapter(unet, controllers).install()
    try:
        with adapter.run(STEPS, LATENT_HW, BatchLayout(("cond", "uncond"), items), pair=pair) as session:
            for i, t in enumerate(timesteps):
                session.step = i
                eps_c, eps_u = unet(torch.cat([x, x]), t, encoder_hidden_states=contexts).sample.chunk(2)
                eps = eps_u + cfg * (eps_c - eps_u)
                a_next = alphas[timesteps[i + 1]] if i + 1 < STEPS else torch.tensor(1.0)
                x = schedule.ddim_step(x, eps, alphas[t], a_next)
    finally:
        adapter.uninstall()
    return x
