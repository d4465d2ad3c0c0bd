"""Plain reference implementations of the official latent-fusion algorithms, for numerical tests.

Everything here is written from the papers and from reading the official repositories; no code of theirs is
copied. Each function's docstring names the official behaviour it reproduces and where it was read:

* MultiDiffusion panorama -- omerbt/MultiDiffusion ``panorama.py`` (``get_views``,
  ``MultiDiffusion.text2panorama``; the guidance formula as fixed by commit 8b32ff0 "fix cfg": the versions
  before it, cb7a1b8 to 1afd732, computed ``eps_c + g (eps_c - eps_u)``).
* Circular padding and view batching -- huggingface/diffusers
  ``src/diffusers/pipelines/stable_diffusion_panorama/pipeline_stable_diffusion_panorama.py``
  (``StableDiffusionPanoramaPipeline.get_views`` and ``__call__``).
* MultiDiffusion region-based generation -- omerbt/MultiDiffusion ``region_based.py`` (``get_views``,
  ``MultiDiffusion.get_random_background``, ``MultiDiffusion.generate``, ``preprocess_mask`` and the mask
  assembly in ``__main__``).
* SyncDiffusion -- KAIST-Visual-AI-Group/SyncDiffusion ``syncdiffusion/syncdiffusion_model.py``
  (``SyncDiffusion.sample_syncdiffusion``, ``decode_latents``), ``syncdiffusion/utils.py`` (``get_views``,
  ``set_latent_view``, ``exponential_decay_list``), ``sample_syncdiffusion.sh`` (the paper's settings, used as
  the defaults here) and ``sample_syncdiffusion.py``.

Conventions shared by every function (those of ``support.reference_editing``, whose ``ddim_step`` and
``cfg_eps`` are used):

* ``unet`` is a diffusers ``UNet2DConditionModel`` called as
  ``unet(latents, int(t), encoder_hidden_states=context).sample``, in the dtype of the inputs.
* Deterministic DDIM (eta 0) in the alpha parameterisation: ``alphas[i]`` is alpha-bar at ``timesteps[i]`` and
  ``alphas[len(timesteps)]`` the value after the last step (1.0 for the clean latent). The official code calls
  ``DDIMScheduler.step(...).prev_sample`` (and ``.pred_original_sample``), which is this arithmetic.
* Classifier-free guidance ``eps_u + g (eps_c - eps_u)`` with the official batch layout ``torch.cat([x] * 2)``
  and contexts ``[uncond rows..., cond rows...]``.
* All sizes (height, width, window, stride) are in latent pixels. The official code takes the image size in
  pixels and divides it by 8 inside ``get_views``; its window is 64 latents (512 px).
* The official code runs under ``torch.autocast('cuda')`` (half precision); the references run in the dtype
  of the inputs.
* Views are ``(h_start, h_end, w_start, w_end)`` tuples in the official row-major order.
"""
from __future__ import annotations

import inspect
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from support.reference_editing import cfg_eps, ddim_step

__all__ = [
    "views",
    "pred_x0",
    "multidiffusion_panorama_reference",
    "multidiffusion_regions_reference",
    "region_masks",
    "syncdiffusion_reference",
    "sync_weights",
]

View = tuple[int, int, int, int]


# =============================================================================================================
# Views
# =============================================================================================================

def views(height: int, width: int, window: int = 64, stride: int = 8, circular: bool = False) -> list[View]:
    """The official list of views ``(h_start, h_end, w_start, w_end)`` over a latent of ``height`` x ``width``.

    ``circular=False`` -- omerbt/MultiDiffusion ``panorama.py`` / ``region_based.py`` ``get_views`` (and the
    identical first half of SyncDiffusion's ``syncdiffusion/utils.py`` ``get_views``):
    ``blocks = (size - window) // stride + 1`` per axis, view ``i`` starts at row ``(i // blocks_w) * stride``
    and column ``(i % blocks_w) * stride``, every view is ``window`` x ``window``. When ``size - window`` is
    not a multiple of ``stride`` the floor leaves the last ``(size - window) % stride`` rows/columns covered
    by no view (the samplers then zero them, see ``multidiffusion_panorama_reference``). For a size smaller
    than the window the official formula gives zero or negative block counts (no views, or views at negative
    offsets); that input is refused here (``ValueError``). (diffusers' pipeline uses 1 block there instead.)

    ``circular=True`` -- diffusers ``StableDiffusionPanoramaPipeline.get_views(circular_padding=True)``:
    rows as above but 1 block when ``height <= window``; columns ``width // stride`` blocks (1 when
    ``width <= window``), so views start every ``stride`` columns all around the width and the last ones end
    past the right edge (``w_end > width``): such a view wraps around to the left columns. Every column is
    covered (unevenly when ``stride`` does not divide ``width``); a latent lower than the window gives views
    of the latent's height (slicing clamps ``h_end``), and one narrower than the window a single view that
    wraps onto itself (both checked against the diffusers pipeline in the self-checks).
    """
    height, width, window, stride = int(height), int(width), int(window), int(stride)
    if window <= 0 or stride <= 0:
        raise ValueError("window and stride must be positive")
    if circular:
        blocks_h = (height - window) // stride + 1 if height > window else 1
        blocks_w = width // stride if width > window else 1
    else:
        if height < window or width < window:
            raise ValueError(f"latent {height}x{width} is smaller than the window {window}: the official "
                             "get_views gives no usable view list")
        blocks_h = (height - window) // stride + 1
        blocks_w = (width - window) // stride + 1
    out = []
    for i in range(blocks_h * blocks_w):
        h0 = (i // blocks_w) * stride
        w0 = (i % blocks_w) * stride
        out.append((h0, h0 + window, w0, w0 + window))
    return out


def _crop(x: torch.Tensor, view: View) -> torch.Tensor:
    """The latent of one view.

    Inside the latent: ``x[:, :, h_start:h_end, w_start:w_end]`` (omerbt ``text2panorama``). A view ending past
    the right edge (circular padding only) -- diffusers ``StableDiffusionPanoramaPipeline.__call__``: the
    columns ``w_start:`` followed by the columns ``:w_end - width`` from the left.
    """
    h0, h1, w0, w1 = view
    width = x.shape[-1]
    if w1 > width:
        return torch.cat([x[:, :, h0:h1, w0:], x[:, :, h0:h1, :w1 - width]], dim=-1)
    return x[:, :, h0:h1, w0:w1]


def _add_view(value: torch.Tensor, count: torch.Tensor, denoised: torch.Tensor, view: View) -> None:
    """Add one view's denoised latent back into ``value`` / ``count`` in place.

    omerbt ``text2panorama``: ``value[view] += denoised; count[view] += 1``. A view wrapping past the right edge
    -- diffusers ``StableDiffusionPanoramaPipeline.__call__``: its first ``width - w_start`` columns are added
    to ``w_start:`` and the rest to ``:w_end - width``, each part with count + 1.

    The official wrap-around branch indexes the *view* with the panorama's rows (``denoised[:, :,
    h_start:h_end, ...]``); that selects every row of the view for the first row of views (h_start 0) and
    fails with a shape mismatch for every later row, so such a view is refused here.
    """
    h0, h1, w0, w1 = view
    width = value.shape[-1]
    if w1 > width:
        if h0 != 0:
            raise ValueError("circular padding with more than one row of views: the official wrap-around "
                             "accumulation fails there (shape mismatch)")
        split = width - w0
        value[:, :, h0:h1, w0:] += denoised[..., :split]
        value[:, :, h0:h1, :w1 - width] += denoised[..., split:]
        count[:, :, h0:h1, w0:] += 1
        count[:, :, h0:h1, :w1 - width] += 1
    else:
        value[:, :, h0:h1, w0:w1] += denoised
        count[:, :, h0:h1, w0:w1] += 1


def _fuse(value: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """The MultiDiffusion step ``torch.where(count > 0, value / count, value)`` (omerbt ``text2panorama`` and
    ``generate``, diffusers ``__call__``, SyncDiffusion ``sample_syncdiffusion``): where no view (or no mask
    weight) covers a pixel, ``value`` is 0 there, so the latent becomes **0** at that pixel."""
    return torch.where(count > 0, value / count, value)


def _check_schedule(timesteps, alphas) -> None:
    if len(alphas) != len(timesteps) + 1:
        raise ValueError("alphas must have len(timesteps) + 1 entries")


def _check_circular(view_list: Sequence[View], width: int) -> None:
    for h0, _, _, w1 in view_list:
        if w1 > width and h0 != 0:
            raise ValueError("circular padding with more than one row of views (latent height > window): "
                             "the official diffusers wrap-around accumulation fails there (shape mismatch)")


def pred_x0(x: torch.Tensor, eps: torch.Tensor, alpha: float) -> torch.Tensor:
    """Predicted clean latent, diffusers ``DDIMScheduler.step(...).pred_original_sample`` for the epsilon
    parameterisation without clipping or thresholding (the SD 1.5 / 2.0 scheduler configs):
    ``(x - (1 - a) ** 0.5 * eps) / a ** 0.5`` -- the first line of ``reference_editing.ddim_step``."""
    a = float(alpha)
    return (x - (1.0 - a) ** 0.5 * eps) / a ** 0.5


def _cfg_views_interleaved(unet, crops: torch.Tensor, t: int, uncond: torch.Tensor, cond: torch.Tensor,
                           guidance: float) -> torch.Tensor:
    """Guided noise of several views in one UNet call with diffusers' batch layout
    (``StableDiffusionPanoramaPipeline.__call__`` with ``view_batch_size > 1``):
    ``latents_for_view.repeat_interleave(2)`` against ``torch.cat([cat([uncond, cond])] * views)``, then
    ``eps_u = out[::2]``, ``eps_c = out[1::2]``."""
    n = crops.shape[0]
    model_in = crops.repeat_interleave(2, dim=0)
    context = torch.cat([torch.cat([uncond, cond])] * n)
    out = unet(model_in, int(t), encoder_hidden_states=context).sample
    eps_u, eps_c = out[0::2], out[1::2]
    return eps_u + guidance * (eps_c - eps_u)


# =============================================================================================================
# MultiDiffusion panorama
# =============================================================================================================

@torch.no_grad()
def multidiffusion_panorama_reference(unet, cond: torch.Tensor, uncond: torch.Tensor, x_T: torch.Tensor,
                                      timesteps: Sequence[int], alphas: Sequence[float], guidance: float, *,
                                      window: int = 64, stride: int = 8, circular: bool = False,
                                      view_batch_size: int = 1) -> torch.Tensor:
    """MultiDiffusion panorama sampling; returns the final latent (1, C, H, W).

    omerbt/MultiDiffusion ``panorama.py`` ``MultiDiffusion.text2panorama`` (``get_views`` with window 64,
    stride 8 by default): the latent starts as the initial noise (``x_T``); at every step, ``value`` and
    ``count`` are zeroed, then for each view in order the view's latent gets one CFG UNet call
    (``torch.cat([view] * 2)`` against ``[uncond, cond]``) and its own DDIM step from the *undenoised* latent of
    this step, and ``value[view] += denoised``, ``count[view] += 1``; the next latent is
    ``torch.where(count > 0, value / count, value)``. Pixels covered by no view (the last
    ``(size - window) % stride`` rows/columns) therefore become 0 at the first step and stay 0.

    ``circular=True`` -- diffusers ``StableDiffusionPanoramaPipeline`` with ``circular_padding=True``: the
    views of ``views(..., circular=True)``; a view crossing the right edge is the concatenation of the columns
    ``w_start:`` and ``:w_end - W``, and its denoised latent is added back split the same way (count + 1 on
    both parts). The official only works there with a single row of views (``H <= window``); more rows raise
    ``ValueError`` here (the official fails with a shape mismatch).

    ``view_batch_size`` -- diffusers ``__call__``: views are denoised in batches of that many with the
    interleaved CFG layout (``repeat_interleave(2)``); mathematically the same as 1 (omerbt's loop), and
    accumulated in the same view order.
    """
    _check_schedule(timesteps, alphas)
    if x_T.shape[0] != 1:
        raise ValueError("x_T must be (1, C, H, W)")
    height, width = x_T.shape[-2:]
    view_list = views(height, width, window, stride, circular)
    if circular:
        _check_circular(view_list, width)
    batches = [view_list[k:k + view_batch_size] for k in range(0, len(view_list), max(1, int(view_batch_size)))]
    x = x_T
    for i, t in enumerate(timesteps):
        a, a_next = alphas[i], alphas[i + 1]
        value = torch.zeros_like(x)
        count = torch.zeros_like(x)
        for batch in batches:
            crops = torch.cat([_crop(x, v) for v in batch])
            if len(batch) == 1:
                eps = cfg_eps(unet, crops, t, uncond, cond, guidance)
            else:
                eps = _cfg_views_interleaved(unet, crops, t, uncond, cond, guidance)
            denoised = ddim_step(crops, eps, a, a_next)
            for d, v in zip(denoised.split(1), batch):
                _add_view(value, count, d, v)
        x = _fuse(value, count)
    return x


# =============================================================================================================
# MultiDiffusion region-based generation
# =============================================================================================================

def region_masks(masks: torch.Tensor | None, height: int, width: int, dtype=None, device=None) -> torch.Tensor:
    """The official mask stack (prompts, 1, H, W): background first, then the regions.

    omerbt/MultiDiffusion ``region_based.py``: ``preprocess_mask`` binarises each mask at 0.5
    (``mask < 0.5 -> 0``, ``mask >= 0.5 -> 1``) and then resizes it to the latent size with
    ``F.interpolate(mode='nearest')`` (a no-op when ``masks`` is already at latent resolution); ``__main__``
    builds ``bg_mask = 1 - sum(fg_masks)`` and sets its negative entries to 0 (where regions overlap the
    background weight is 0, not negative; it is never clamped above, which cannot matter for binary masks),
    and stacks ``[bg_mask, fg_masks...]``. ``masks``: (regions, h, w) or None / empty for no region.
    """
    if masks is None or masks.shape[0] == 0:
        return torch.ones(1, 1, height, width, dtype=dtype, device=device)
    m = masks.to(dtype=dtype or masks.dtype, device=device or masks.device).clone()
    if m.ndim == 3:
        m = m[:, None]
    m[m < 0.5] = 0
    m[m >= 0.5] = 1
    m = F.interpolate(m, size=(int(height), int(width)), mode="nearest")
    bg = 1 - torch.sum(m, dim=0, keepdim=True)
    bg[bg < 0] = 0
    return torch.cat([bg, m])


def _choice_caller(bootstrap_choice, colours: int, regions: int) -> Callable[[int, int], list[int]]:
    """``(step, view_index) -> colour index per region``.

    Official (``generate``): ``torch.randint(0, bootstrapping, (len(prompts) - 1,))`` drawn afresh *for every
    view at every bootstrapped step* from torch's global CPU generator; that is the default here. A given
    ``bootstrap_choice`` is called as ``bootstrap_choice(step, view_index)`` when it takes two positional
    arguments, else as ``bootstrap_choice(step)`` (the same colours for every view of that step).
    """
    if bootstrap_choice is None:
        return lambda step, view: torch.randint(0, colours, (regions,)).tolist()
    two = False
    try:
        params = list(inspect.signature(bootstrap_choice).parameters.values())
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        two = len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)
    except (TypeError, ValueError):
        pass
    if two:
        return lambda step, view: list(bootstrap_choice(step, view))
    return lambda step, view: list(bootstrap_choice(step))


@torch.no_grad()
def multidiffusion_regions_reference(unet, conds: Sequence[torch.Tensor], uncond, masks: torch.Tensor | None,
                                     x_T: torch.Tensor, timesteps: Sequence[int], alphas: Sequence[float],
                                     guidance: float, *, window: int = 64, stride: int = 8,
                                     bootstrap_steps: int = 0, bootstrap_latents: torch.Tensor | None = None,
                                     bootstrap_choice: Callable | None = None) -> torch.Tensor:
    """MultiDiffusion region-based sampling; returns the final latent (1, C, H, W).

    omerbt/MultiDiffusion ``region_based.py`` ``MultiDiffusion.generate``:

    * ``conds`` = [background, region 1, ...], each (1, L, C); ``uncond``: one (1, L, C) for every prompt or a
      list with one per prompt (the official encodes one negative prompt per prompt and builds
      ``cat([negatives..., positives...])``). ``masks``: (regions, h, w), made into the official stack
      [background, regions...] by ``region_masks``.
    * The latent starts as the initial noise ``x_T`` and the bootstrapping noise is a clone of that same
      initial latent (``noise = latent.clone().repeat(regions, 1, 1, 1)``), cropped to each view.
    * Per step, per view (``get_views``, row-major): the view latent is repeated once per prompt; while
      ``step < bootstrap_steps`` the region copies (never the background copy) become
      ``view * m + bg * (1 - m)`` where ``m`` is the region's mask in the view and ``bg`` the chosen colour
      latent noised to the current timestep with the initial noise:
      ``scheduler.add_noise(bg, noise_view, t) = a_t ** 0.5 * bg + (1 - a_t) ** 0.5 * noise_view``
      (``a_t = alphas[step]``). One UNet call on ``cat([views] * 2)`` against ``[uncond rows, cond rows]``,
      CFG, a DDIM step of every copy from its (bootstrapped) input, then
      ``value[view] += (denoised * masks_view).sum(0)``, ``count[view] += masks_view.sum(0)``; the next
      latent is ``torch.where(count > 0, value / count, value)``.
    * ``bootstrap_latents``: (colours, C, window, window) already encoded constant-colour backgrounds (the
      official encodes ``bootstrapping`` random 512x512 colours with ``posterior.sample() * 0.18215``, i.e.
      64x64 latents = one window); ``bootstrap_choice`` replaces the official ``torch.randint`` draw (see
      ``_choice_caller``). The official uses its single ``bootstrapping`` argument (default 20) both as the
      number of bootstrapped steps and as the number of colours.
    """
    _check_schedule(timesteps, alphas)
    if x_T.shape[0] != 1:
        raise ValueError("x_T must be (1, C, H, W)")
    conds = list(conds)
    prompts = len(conds)
    regions = prompts - 1
    height, width = x_T.shape[-2:]
    stack = region_masks(masks, height, width, dtype=x_T.dtype, device=x_T.device)
    if stack.shape[0] != prompts:
        raise ValueError(f"{stack.shape[0] - 1} region masks for {regions} region prompts")
    cond_rows = torch.cat(conds)
    if isinstance(uncond, torch.Tensor):
        uncond_rows = uncond.expand(prompts, *uncond.shape[1:]) if uncond.shape[0] == 1 else uncond
    else:
        uncond_rows = torch.cat(list(uncond))
    if uncond_rows.shape[0] != prompts:
        raise ValueError("uncond must have 1 row or one per prompt")
    if bootstrap_steps > 0 and regions > 0:
        if bootstrap_latents is None:
            raise ValueError("bootstrapping needs bootstrap_latents")
        bootstrap_latents = bootstrap_latents.to(dtype=x_T.dtype, device=x_T.device)
        if tuple(bootstrap_latents.shape[-2:]) != (window, window):
            raise ValueError("bootstrap_latents must be (colours, C, window, window): the official backgrounds are "
                             "one window (512 px -> 64 latents)")
        choose = _choice_caller(bootstrap_choice, bootstrap_latents.shape[0], regions)
    view_list = views(height, width, window, stride, False)
    noise = x_T.clone()
    x = x_T
    for i, t in enumerate(timesteps):
        a, a_next = float(alphas[i]), float(alphas[i + 1])
        value = torch.zeros_like(x)
        count = torch.zeros_like(x)
        for vi, view in enumerate(view_list):
            h0, h1, w0, w1 = view
            m = stack[:, :, h0:h1, w0:w1]
            latent_view = _crop(x, view).repeat(prompts, 1, 1, 1)
            if i < bootstrap_steps and regions > 0:
                idx = choose(i, vi)
                if len(idx) != regions:
                    raise ValueError(f"bootstrap_choice gave {len(idx)} colours for {regions} regions")
                bg = bootstrap_latents[torch.as_tensor(idx, dtype=torch.long)]
                bg = a ** 0.5 * bg + (1.0 - a) ** 0.5 * _crop(noise, view)
                latent_view[1:] = latent_view[1:] * m[1:] + bg * (1 - m[1:])
            eps = cfg_eps(unet, latent_view, t, uncond_rows, cond_rows, guidance)
            denoised = ddim_step(latent_view, eps, a, a_next)
            value[:, :, h0:h1, w0:w1] += (denoised * m).sum(dim=0, keepdim=True)
            count[:, :, h0:h1, w0:w1] += m.sum(dim=0, keepdim=True)
        x = _fuse(value, count)
    return x


# =============================================================================================================
# SyncDiffusion
# =============================================================================================================

def sync_weights(sync_weight: float, sync_decay_rate: float, num_steps: int) -> torch.Tensor:
    """SyncDiffusion ``syncdiffusion/utils.py`` ``exponential_decay_list``:
    ``torch.tensor([w * rate ** i for i in range(num_steps)])`` -- indexed by the step index ``i`` (not by
    the number of synchronised steps so far), and a tensor of torch's default dtype (float32), so the weight
    applied is the float32 rounding of ``w * rate ** i`` even when the latents are float64."""
    return torch.tensor([sync_weight * (sync_decay_rate ** k) for k in range(num_steps)])


def syncdiffusion_reference(unet, decode: Callable[[torch.Tensor], torch.Tensor],
                            lpips: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                            cond: torch.Tensor, uncond: torch.Tensor, x_T: torch.Tensor,
                            timesteps: Sequence[int], alphas: Sequence[float], guidance: float, *,
                            window: int = 64, stride: int = 16, sync_weight: float = 20.0,
                            sync_decay_rate: float = 0.95, sync_freq: int = 1, sync_thres: int = 10,
                            strict: bool = True, trace: list | None = None) -> torch.Tensor:
    """SyncDiffusion sampling (without loop closure); returns the final latent (1, C, H, W).

    KAIST-Visual-AI-Group/SyncDiffusion ``syncdiffusion/syncdiffusion_model.py``
    ``SyncDiffusion.sample_syncdiffusion``. Defaults: the paper's settings of ``sample_syncdiffusion.sh``
    (weight 20, decay 0.95, freq 1, thres 10, stride 16); the function's own defaults differ only in
    ``sync_thres=50`` and ``sample_syncdiffusion.py``'s argparse defaults are 0.1 / 0.99 / thres 40 / stride 8.

    * Views: ``get_views`` (the MultiDiffusion formula), anchor = ``views[len(views) // 2]`` (middle of the
      row-major list). The latent starts as ``x_T``.
    * ``strict`` reproduces the official asserts in latent units, with the window in place of SD's 64:
      ``H >= window and W >= window`` (official ``height >= 512 and width >= 512`` px),
      ``H % stride == 0 and W % stride == 0`` (official ``height % (stride * 8) == 0`` px), ``stride % 8 == 0
      and stride < window`` (official ``stride < 64``, whatever its ``latent_size``).
    * A step ``i`` synchronises when ``(i + 1) % sync_freq == 0 and i < sync_thres`` (so with
      ``sync_freq > 1`` step 0 is not synchronised). Then, before any view is touched, the anchor's latent
      (of the current, not yet updated, latent) gets a CFG UNet call and its predicted x0 (the scheduler's
      ``pred_original_sample``) is decoded, without gradient: ``anchor_image = decode(x0_anchor)``.
    * Every view, in order, starts from a detached copy of the current latent's crop. On a synchronising step
      a non-anchor view also gets: CFG UNet call *with gradient* on the crop, predicted x0, ``decode``, loss
      ``lpips(image * 2 - 1, anchor_image * 2 - 1)``, ``grad = d loss / d crop`` (through decode, the x0
      formula and the UNet; **not** normalised, despite the official variable name ``norm_grad``), and the
      copy becomes ``copy - w_i * grad`` with ``w_i = sync_weights(...)[i]``. The anchor is never updated (the
      official also computes its gradient, then discards it; it is skipped here, which changes nothing).
    * Then the normal MultiDiffusion step of every view from its (updated) copy: a **new** CFG UNet call on
      the copy (no gradient), a DDIM step, ``value += denoised``, ``count += 1``, and
      ``latent = torch.where(count > 0, value / count, value)``. Every view's gradient is taken at the same
      pre-step latent; the updates meet only in the average.

    ``decode(latents) -> images in [0, 1]`` stands for the official ``decode_latents`` (``1 / 0.18215`` scale,
    VAE decode, ``(x / 2 + 0.5).clamp(0, 1)``) and ``lpips(a, b) -> (batch,)`` for ``lpips.LPIPS(net='vgg')``
    (inputs in [-1, 1]); the loss is summed over the batch of 1. ``trace``: when a list, one dict per
    synchronising step is appended: ``step``, ``anchor`` (index), ``anchor_image``, ``before`` and ``after``
    (the crops of every view before and after the gradient step) and ``grads`` (None for the anchor).
    """
    _check_schedule(timesteps, alphas)
    if x_T.shape[0] != 1:
        raise ValueError("x_T must be (1, C, H, W)")
    height, width = x_T.shape[-2:]
    if strict:
        if not (height >= window and width >= window):
            raise ValueError("height and width must be at least the window (official: at least 512 px)")
        if not (height % stride == 0 and width % stride == 0):
            raise ValueError("height and width must be divisible by the stride (official assert)")
        if not (stride % 8 == 0 and stride < window):
            raise ValueError("stride must be divisible by 8 and smaller than the window (official assert)")
    view_list = views(height, width, window, stride, False)
    anchor = len(view_list) // 2
    weights = sync_weights(sync_weight, sync_decay_rate, len(timesteps))
    x = x_T.detach()
    for i, t in enumerate(timesteps):
        a, a_next = float(alphas[i]), float(alphas[i + 1])
        sync = (i + 1) % sync_freq == 0 and i < sync_thres
        anchor_image = None
        if sync:
            with torch.no_grad():
                crop = _crop(x, view_list[anchor])
                eps = cfg_eps(unet, crop, t, uncond, cond, guidance)
                anchor_image = decode(pred_x0(crop, eps, a))
        record = {"step": i, "anchor": anchor, "anchor_image": anchor_image, "before": [], "after": [],
                  "grads": []} if (sync and trace is not None) else None
        value = torch.zeros_like(x)
        count = torch.zeros_like(x)
        for vi, view in enumerate(view_list):
            crop = _crop(x, view).detach()
            copy = crop.clone()
            grad = None
            if sync and vi != anchor:
                with torch.enable_grad():
                    latent_view = crop.clone().requires_grad_(True)
                    eps = cfg_eps(unet, latent_view, t, uncond, cond, guidance)
                    image = decode(pred_x0(latent_view, eps, a))
                    loss = lpips(image * 2.0 - 1.0, anchor_image * 2.0 - 1.0)
                    grad = torch.autograd.grad(loss.sum(), latent_view)[0]
                copy = copy - weights[i] * grad
            if record is not None:
                record["before"].append(crop)
                record["after"].append(copy.detach())
                record["grads"].append(grad)
            with torch.no_grad():
                eps = cfg_eps(unet, copy, t, uncond, cond, guidance)
                denoised = ddim_step(copy, eps, a, a_next)
                _add_view(value, count, denoised, view)
        if record is not None:
            trace.append(record)
        x = _fuse(value, count)
    return x
