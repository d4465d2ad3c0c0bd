"""A GUIDER that samples a source and its edits as one batch (item 0: source, items 1..: targets).

Editing nodes (attention control, feature injection) patch the model with controllers that read the
source row and write the target rows of each UNet call; this guider makes the batch they expect from a
one-image LATENT:
- every item starts from the same latent and noise, and stochastic samplers get one noise shared by all
  items, so the items differ only where the edit makes them differ (Prompt-to-Prompt keeps x_T fixed);
- per-item prompts travel as one conditioning with a batch of contexts (ComfyUI repeats a conditioning to
  the latent batch, and keeps a batch that already matches), repeated to a common length when prompts
  span a different number of 77-token chunks; the targets may have their own negative prompt, and the
  options of the user's conditioning (a ControlNet, for one) apply to the whole batch;
- with an INVERSION the unconditional branch is the inversion's at each step, and in direct mode the
  source's deviation from the stored trajectory is removed from every item (Ju et al. 2023), so the
  source reconstructs the photo exactly and an identity edit reproduces it too;
- with a `LocalBlend` the denoised predictions of the targets are kept equal to the source's outside the
  blend mask; a blend starting after step 0 first runs the steps before it, pulls the targets' latents onto
  the source outside the mask, then runs the rest (two sampler calls; multistep history restarts there).
"""
from __future__ import annotations

import inspect
import math

import comfy.k_diffusion.sampling as k_sampling
import comfy.model_patcher
import comfy.patcher_extension
import comfy.samplers
import torch

from ..core.inversion import Inversion, direct_denoised
from ..core.prompt2prompt import LocalBlend
from ..core.schedule import step_index
from .comfy_attention import RUN_KEY, evaluation_step
from .inversion import check_deterministic_sampler, check_inversion_sigmas, inversion_negative, replace_context


def stack_contexts(contexts: list[torch.Tensor]) -> torch.Tensor:
    """(1, L_i, D) prompt encodings -> (items, L, D), each repeated to the common length L (their lcm)."""
    length = 1
    for c in contexts:
        length = length * c.shape[1] // math.gcd(length, c.shape[1])
    return torch.cat([c.repeat(1, length // c.shape[1], 1) for c in contexts])


def shared_noise_sampler(sampler, items: int):
    """The same KSAMPLER, but its fresh noise (SDE / ancestral samplers) is drawn once and given to all items."""
    function = getattr(sampler, "sampler_function", None)
    if function is None or "noise_sampler" not in inspect.signature(function).parameters:
        return sampler
    brownian = "sde" in function.__name__

    def with_shared_noise(model, x, sigmas, *args, extra_args=None, noise_sampler=None, **kwargs):
        if noise_sampler is None:
            seed = (extra_args or {}).get("seed")
            first = x[:1]
            if brownian:
                positive = sigmas[sigmas > 0]
                one = k_sampling.BrownianTreeNoiseSampler(first, positive.min(), sigmas.max(), seed=seed, cpu=True)
            else:
                one = k_sampling.default_noise_sampler(first, seed=seed)
            noise_sampler = lambda sigma, sigma_next: one(sigma, sigma_next).expand_as(x)  # noqa: E731
        return function(model, x, sigmas, *args, extra_args=extra_args, noise_sampler=noise_sampler, **kwargs)

    with_shared_noise.__name__ = function.__name__
    return comfy.samplers.KSAMPLER(with_shared_noise, sampler.extra_options, sampler.inpaint_options)


class PairCFGGuider(comfy.samplers.CFGGuider):
    """`contexts`: one prompt encoding per item (source first). `negative`: the unconditional encoding of
    every item (with an inversion: the inversion's own, per step), unless `target_negative` gives the
    targets their own. `positive_options` / `negative_options`: conditioning options (e.g. a ControlNet)."""

    def __init__(self, model_patcher, contexts: list[torch.Tensor], negative: torch.Tensor | None, cfg: float,
                 inversion: Inversion | None = None, local_blend: LocalBlend | None = None,
                 target_negative: torch.Tensor | None = None, positive_options: dict | None = None,
                 negative_options: dict | None = None):
        super().__init__(model_patcher)
        self.items = len(contexts)
        self.contexts, self.negative = contexts, negative
        self.inversion = inversion
        self.local_blend = local_blend
        self.target_negative = target_negative
        if inversion is not None:
            negative = inversion.negative_context
        negative_options = dict(negative_options or {})
        conds = {"positive": [[stack_contexts(contexts), dict(positive_options or {})]],
                 "negative": [[negative, negative_options]]}
        if inversion is not None:
            conds["source"] = [[inversion.source_context, dict(negative_options)]]
        self.inner_set_conds(conds)
        self.set_cfg(cfg)
        self.schedule: list[float] = []

    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False,
               seed=None):
        if latent_image.is_nested or latent_image.shape[0] != 1:
            raise ValueError(f"latent: the edit samples one image (the guider makes the source and target batch "
                             f"from it); got a batch of {latent_image.shape[0]}")
        if denoise_mask is not None:
            raise ValueError("latent: masked latents (Set Latent Noise Mask, inpainting) are not supported by "
                             "the edit; use the local blend words to confine it")
        if self.inversion is not None:
            check_deterministic_sampler(sampler)
            check_inversion_sigmas(self.inversion, sigmas)
            if tuple(latent_image.shape[1:]) != tuple(self.inversion.latents.shape[1:]):
                raise ValueError(f"latent: shape {tuple(latent_image.shape[1:])} but the inversion is of a "
                                 f"{tuple(self.inversion.latents.shape[1:])} latent; use its noised_latent")
        self.schedule = [float(s) for s in sigmas.flatten().tolist()]
        repeat = (self.items,) + (1,) * (latent_image.ndim - 1)
        return super().sample(noise.repeat(repeat), latent_image.repeat(repeat), shared_noise_sampler(sampler, self.items),
                              sigmas, None, callback, disable_pbar, seed)

    def _blend_from(self, steps: int) -> int:
        """First step whose prediction is blended (the paper's real-image edits start at 0.2 of the steps)."""
        return math.ceil(self.local_blend.start * steps) if self.local_blend.start > 0 else 0

    def _blend_split(self, steps: int) -> int | None:
        """Where the sampler is split to pull the targets onto the source (None: no split needed)."""
        if self.local_blend is None:
            return None
        split = self._blend_from(steps)
        return split if 0 < split < steps else None

    def inner_sample(self, noise, latent_image, device, sampler, sigmas, denoise_mask, callback, disable_pbar, seed,
                     latent_shapes=None):
        split = self._blend_split(len(sigmas) - 1)
        if split is None:
            return super().inner_sample(noise, latent_image, device, sampler, sigmas, denoise_mask, callback,
                                        disable_pbar, seed, latent_shapes=latent_shapes)
        # CFGGuider.inner_sample, with the sampler run in two segments around the blend start
        if latent_image is not None and torch.count_nonzero(latent_image) > 0:
            latent_image = self.inner_model.process_latent_in(latent_image)
        self.conds = comfy.samplers.process_conds(self.inner_model, noise, self.conds, device, latent_image,
                                                  denoise_mask, seed, latent_shapes=latent_shapes)
        options = comfy.model_patcher.create_model_options_clone(self.model_options)
        options.setdefault("transformer_options", {})["sample_sigmas"] = sigmas   # steps count over the whole run
        extra_args = {"model_options": options, "seed": seed}
        executor = comfy.patcher_extension.WrapperExecutor.new_class_executor(
            sampler.sample, sampler,
            comfy.patcher_extension.get_all_wrappers(comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, options,
                                                     is_model_options=True))
        total = len(sigmas) - 1

        def shifted(offset):
            return None if callback is None else (lambda i, denoised, x, _: callback(i + offset, denoised, x, total))

        x = executor.execute(self, sigmas[:split + 1], extra_args, shifted(0), noise, latent_image, denoise_mask,
                             disable_pbar)
        x = self._blend(x, options)
        x = executor.execute(self, sigmas[split:], extra_args, shifted(split), torch.zeros_like(noise), x,
                             denoise_mask, disable_pbar)
        return self.inner_model.process_latent_out(x.to(torch.float32))

    def _blend(self, x, model_options):
        """Fold this run's word maps so far into the blend mask and keep the targets' outside on the source."""
        run = model_options.get("transformer_options", {}).get(RUN_KEY)
        if run is None:
            raise RuntimeError("the edit's model lost its attention controllers: connect the model the editing "
                               "node returned")
        mask = self.local_blend.update_mask(run.of(self.local_blend), tuple(x.shape[-2:]))
        return self.local_blend.blend(x, mask)

    def _with_target_negative(self, source_negative: torch.Tensor) -> torch.Tensor:
        """The unconditional contexts of the batch: the source's, then the targets' own."""
        target = self.target_negative.to(source_negative.device, source_negative.dtype)
        return stack_contexts([source_negative[:1]] + [target] * (self.items - 1))

    def _step(self, timestep, model_options) -> int:
        step = evaluation_step(model_options, timestep)   # found once per evaluation, without a GPU read
        return step if step is not None else step_index(float(timestep.flatten()[0]), self.schedule)

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        run = model_options.get("transformer_options", {}).get(RUN_KEY)
        if run is not None:
            run.pair = True   # the controllers may copy the source row into the target rows
        step = min(self._step(timestep, model_options), max(len(self.schedule) - 2, 0))
        negative = self.conds.get("negative")
        if self.inversion is not None:
            negative = inversion_negative(self.conds, self.inversion, step)
        if self.target_negative is not None:
            negative = replace_context(negative, self._with_target_negative)
        out = comfy.samplers.sampling_function(self.inner_model, x, timestep, negative, self.conds.get("positive"),
                                               self.cfg, model_options=model_options, seed=seed)
        if self.inversion is not None and self.inversion.mode == "direct":
            target = direct_denoised(self.inversion.latents, self.schedule, step).to(out.device, out.dtype)
            out = out + (target - out[0])[None]
        if self.local_blend is not None and step >= self._blend_from(len(self.schedule) - 1):
            out = self._blend(out, model_options)
        return out
