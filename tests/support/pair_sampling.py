"""A source and its targets sampled as one batch on a diffusers UNet, the way the pack's pair guider samples
them in ComfyUI: the controllers through the diffusers adapter, the source scheme and the local blend through
core/pair.py, CFG over [cond rows; uncond rows] (ComfyUI's row order), Euler in sigma space (= DDIM)."""
import torch

from editkit.core import schedule
from editkit.core.attention import BatchLayout
from editkit.core.pair import PairSchedule

STEPS = 6
LATENT_HW = (16, 16)


def ddim_schedule(steps: int, dtype=torch.float64) -> tuple[list[int], list[float]]:
    """(UNet timesteps, sigmas): `steps` timesteps evenly from 999 to 0, their SD sigmas, then 0."""
    alphas = schedule.sd_alphas_cumprod(dtype=dtype)
    timesteps = torch.linspace(999, 0, steps).round().long().tolist()
    return timesteps, [float(schedule.sigma_from_alpha_bar(alphas[t])) for t in timesteps] + [0.0]


@torch.no_grad()
def pair_run(unet, controllers, conds, unconds, x, timesteps, sigmas, cfg, pair: PairSchedule | None = None,
             local_blend=None, pair_batch: bool = True, trace: list | None = None):
    """Sample items [source, targets...] from the sigma-space latent x (1, C, H, W).

    conds / unconds: one (1, T, D) context per item (the source's first). `pair_batch=False`: tell the
    controllers it is a plain batch of images. Returns the final latents (items, C, H, W) (sigma space equals
    alpha space there, as the last sigma is 0); `trace` receives the latents after every step, in the alpha
    parameterisation (x * sqrt(alpha-bar)) as the papers' loops hold them.
    """
    from editkit.core.diffusers_adapter import DiffusersAttentionAdapter
    items = len(conds)
    pair = pair or PairSchedule(tuple(sigmas))
    contexts = torch.cat(list(conds) + list(unconds)).to(x.dtype)
    latent_hw = tuple(x.shape[-2:])
    x = x.repeat(items, 1, 1, 1)
    adapter = DiffusersAttentionAdapter(unet, controllers).install()
    try:
        with adapter.run(pair.steps, latent_hw, BatchLayout(("cond", "uncond"), items),
                         pair=pair_batch and items > 1) as session:
            for i, t in enumerate(timesteps):
                sigma = sigmas[i]
                session.step, session.sigma = i, sigma
                model_x = pair.model_input(x, sigma, i)
                scaled = model_x / (sigma * sigma + 1.0) ** 0.5
                eps_c, eps_u = unet(torch.cat([scaled, scaled]), t, encoder_hidden_states=contexts).sample.chunk(2)
                denoised = model_x - sigma * (eps_u + cfg * (eps_c - eps_u))
                mask = None
                if local_blend is not None and i >= local_blend.first_step(pair.steps):
                    mask = local_blend.update_mask(session.run.of(local_blend), latent_hw)
                denoised = pair.denoised(x, denoised, sigma, i, local_blend, mask)
                x = schedule.euler_sigma_step(x, (x - denoised) / sigma, sigma, sigmas[i + 1]) if sigmas[i + 1] > 0 \
                    else denoised
                if trace is not None:
                    trace.append(x / (sigmas[i + 1] ** 2 + 1.0) ** 0.5)
    finally:
        adapter.uninstall()
    return x


@torch.no_grad()
def pair_sample(unet, controllers, source, target, uncond, cfg=5.0, items=2, target_uncond=None, pair=True):
    """DDIM with CFG over the batch [source, target] x [cond, uncond] on STEPS steps of a LATENT_HW latent from a
    fixed x_T; the target's unconditional context may differ from the source's. `pair=False`: a plain batch of
    two images (the controllers that act on pair runs only leave it alone)."""
    timesteps, sigmas = ddim_schedule(STEPS)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, *LATENT_HW, generator=g) * sigmas[0] / (sigmas[0] ** 2 + 1) ** 0.5
    target_uncond = uncond if target_uncond is None else target_uncond
    conds = [source, target][:items]
    unconds = [uncond] + [target_uncond] * (items - 1)
    return pair_run(unet, controllers, conds, unconds, x, timesteps, sigmas, cfg, pair_batch=pair)

