"""A GUIDER that samples a source and its edits as one batch (item 0: source, items 1..: targets).

Editing nodes (attention control, feature injection) patch the model with controllers that read the
source row and write the target rows of each UNet call; this guider makes the batch they expect from a
LATENT of one image, or of the F frames of a video (each frame then gets its own group of rows, source and
targets, and the output holds the source clip followed by each edited clip):
- every item starts from the same latent and noise, and stochastic samplers get one noise shared by all
  items of a frame, so the items differ only where the edit makes them differ (Prompt-to-Prompt keeps x_T
  fixed);
- per-item prompts travel as one conditioning with a batch of contexts (ComfyUI repeats a conditioning to
  the latent batch, and keeps a batch that already matches), repeated to a common length when prompts
  span a different number of 77-token chunks; the targets may have their own negative prompt, and the
  options of the user's conditioning (a ControlNet, for one) apply to the whole batch;
- with an INVERSION the unconditional branch is the inversion's at each step, and the source row follows
  one of the schemes of core/pair.py: `direct` mode moves the source row exactly onto the stored trajectory
  and lets the targets evolve freely (Ju et al. 2023); `pinned` (Plug-and-Play) evaluates the source row at
  the stored latent itself, with its own prompt encoding (contexts[0]) in both branches;
- with a `LocalBlend`, from its first step on, each target's prediction is solved so that the step lands on
  the latent the reference blends after the step (exact for euler and ddim; other samplers get the
  first-order version of it).
"""
from __future__ import annotations

import inspect
import math

import comfy.k_diffusion.sampling as k_sampling
import comfy.samplers
import torch

from ..core.attention import frame_groups
from ..core.inversion import Inversion
from ..core.pair import PairSchedule
from ..core.prompt2prompt import LocalBlend
from ..core.schedule import step_index
from .comfy_attention import FRAMES_KEY, RUN_KEY, evaluation, with_transformer_option
from .host_helpers import check_inversion_sampling, inversion_negative, replace_context


def stack_contexts(contexts: list[torch.Tensor]) -> torch.Tensor:
    """(1, L_i, D) prompt encodings -> (items, L, D), each repeated to the common length L (their lcm)."""
    length = 1
    for c in contexts:
        length = length * c.shape[1] // math.gcd(length, c.shape[1])
    return torch.cat([c.repeat(1, length // c.shape[1], 1) for c in contexts])


def shared_noise_sampler(sampler, items: int):
    """The same KSAMPLER, but its fresh noise (SDE / ancestral samplers) is drawn once per frame and given to all
    the frame's `items` rows (the batch holds one group of `items` rows per frame)."""
    function = getattr(sampler, "sampler_function", None)
    if function is None or "noise_sampler" not in inspect.signature(function).parameters:
        return sampler
    brownian = "sde" in function.__name__

    def with_shared_noise(model, x, sigmas, *args, extra_args=None, noise_sampler=None, **kwargs):
        if noise_sampler is None:
            seed = (extra_args or {}).get("seed")
            frames = x[::items]
            if brownian:
                positive = sigmas[sigmas > 0]
                one = k_sampling.BrownianTreeNoiseSampler(frames, positive.min(), sigmas.max(), seed=seed, cpu=True)
            else:
                one = k_sampling.default_noise_sampler(frames, seed=seed)
            noise_sampler = lambda sigma, sigma_next: one(sigma, sigma_next).repeat_interleave(items, 0)  # noqa: E731
        return function(model, x, sigmas, *args, extra_args=extra_args, noise_sampler=noise_sampler, **kwargs)

    with_shared_noise.__name__ = function.__name__
    return comfy.samplers.KSAMPLER(with_shared_noise, sampler.extra_options, sampler.inpaint_options)


def clips_first(x: torch.Tensor, frames: int) -> torch.Tensor:
    """(frames * items, ...) in groups per frame -> (items * frames, ...): each item's clip, the source's first."""
    return frame_groups(x, frames).transpose(0, 1).reshape(x.shape)


class PairCFGGuider(comfy.samplers.CFGGuider):
    """`contexts`: one prompt encoding per item (source first). `negative`: the unconditional encoding of
    every item (with an inversion: the inversion's own, per step), unless `target_negative` gives the
    targets their own. `positive_options` / `negative_options`: conditioning options (e.g. a ControlNet).
    `pin_source`: with an inversion, the source row is its stored trajectory (Plug-and-Play's scheme)."""

    def __init__(self, model_patcher, contexts: list[torch.Tensor], negative: torch.Tensor | None, cfg: float,
                 inversion: Inversion | None = None, local_blend: LocalBlend | None = None,
                 target_negative: torch.Tensor | None = None, positive_options: dict | None = None,
                 negative_options: dict | None = None, pin_source: bool = False):
        super().__init__(model_patcher)
        if pin_source and inversion is None:
            raise ValueError("inversion: pinning the source needs an inversion")
        self.items = len(contexts)
        self.contexts, self.negative = contexts, negative
        self.inversion = inversion
        self.local_blend = local_blend
        self.target_negative = target_negative
        self.pin_source = pin_source
        if inversion is not None:
            negative = inversion.negative_context
        negative_options = dict(negative_options or {})
        conds = {"positive": [[stack_contexts(contexts), dict(positive_options or {})]],
                 "negative": [[negative, negative_options]]}
        if inversion is not None:
            conds["source"] = [[inversion.source_context, dict(negative_options)]]
        self.inner_set_conds(conds)
        self.set_cfg(cfg)
        self.pair: PairSchedule | None = None

    def _source_scheme(self) -> str:
        if self.inversion is None:
            return "sampled"
        if self.pin_source:
            return "pinned"
        return "direct" if self.inversion.mode == "direct" else "sampled"

    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False,
               seed=None):
        if latent_image.is_nested or latent_image.ndim != 4:
            raise ValueError(f"latent: the edit samples an image latent or a batch of video frames, got shape "
                             f"{tuple(latent_image.shape)}")
        if denoise_mask is not None:
            raise ValueError("latent: masked latents (Set Latent Noise Mask, inpainting) are not supported by "
                             "the edit; use the local blend words to confine it")
        frames = latent_image.shape[0]
        if self.inversion is not None:
            check_inversion_sampling(self.inversion, noise, sampler, sigmas)
            inverted = self.inversion.latents.shape
            if self.inversion.frames != frames or tuple(latent_image.shape[1:]) != tuple(inverted[-3:]):
                raise ValueError(f"latent: {frames} latent(s) of shape {tuple(latent_image.shape[1:])} but the "
                                 f"inversion is of {self.inversion.frames} of shape {tuple(inverted[-3:])}; "
                                 f"sample its noised_latent")
        scheme = self._source_scheme()
        self.pair = PairSchedule(tuple(float(s) for s in sigmas.flatten().tolist()), scheme,
                                 None if scheme == "sampled" else self.inversion.latents, frames)
        samples = super().sample(noise.repeat_interleave(self.items, 0), latent_image.repeat_interleave(self.items, 0),
                                 shared_noise_sampler(sampler, self.items), sigmas, None, callback, disable_pbar, seed)
        return clips_first(samples, frames)

    def _negative(self, step: int):
        """The unconditional conds of the batch: the inversion's at this step (or the user's negative); the
        targets' own negative where given; with a pinned source, the source row's own prompt (no guidance)."""
        negative = self.conds.get("negative")
        if self.inversion is not None:
            negative = inversion_negative(self.conds, self.inversion, step)
        if self.target_negative is None and not self.pin_source:
            return negative
        source = self.contexts[0] if self.pin_source else None

        def per_item(uncond: torch.Tensor) -> torch.Tensor:
            first = (source if source is not None else uncond[:1]).to(uncond.device, uncond.dtype)
            rest = uncond[:1] if self.target_negative is None else \
                self.target_negative.to(uncond.device, uncond.dtype)
            return stack_contexts([first] + [rest] * (self.items - 1))

        return replace_context(negative, per_item)

    def _evaluation(self, timestep, model_options) -> tuple[int, float]:
        """(step, sigma) of this evaluation, found once per evaluation by the attention wrapper (no GPU read)."""
        found = evaluation(model_options, timestep)
        if found is not None and found[2] is not None:
            step, _, sigma = found
        else:
            sigma = float(timestep.flatten()[0])
            step = step_index(sigma, self.pair.schedule)
        return min(step, max(self.pair.steps - 1, 0)), sigma

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        run = model_options.get("transformer_options", {}).get(RUN_KEY)
        if run is not None:
            run.pair = True   # the controllers may copy the source row into the target rows
        step, sigma = self._evaluation(timestep, model_options)
        # the controllers pair rows within each frame's group
        model_options = with_transformer_option(model_options, FRAMES_KEY, self.pair.frames)
        out = comfy.samplers.sampling_function(self.inner_model, self.pair.model_input(x, sigma, step), timestep,
                                               self._negative(step), self.conds.get("positive"), self.cfg,
                                               model_options=model_options, seed=seed)
        mask = None
        if self.local_blend is not None and step >= self.local_blend.first_step(self.pair.steps):
            if run is None:
                raise RuntimeError("the edit's model lost its attention controllers: connect the model the editing "
                                   "node returned")
            mask = self.local_blend.update_mask(run.of(self.local_blend), tuple(x.shape[-2:]))
        return self.pair.denoised(x, out, sigma, step, self.local_blend, mask)
