"""Node: Motion Latents (Text2Video-Zero), the starting latents of a text-to-video batch (core/text2video.py).

One seed's latent is sampled a few guided DDIM steps with ComfyUI's own sampler (`ddim` on a slice of the
schedule, through comfy.sample.sample_custom), warped by a global translation per frame and taken back to the
video's first noise level (Khachatryan et al. 2023, sec. 3.2, "Motion dynamics in latent codes"). The user
samples the F frames from there, with the schedule this node returns, no added noise, and the Keyframe
Attention node (mode first) on the model: the rest of Text2Video-Zero (sec. 3.3).
"""
from __future__ import annotations

import math

import comfy.model_sampling
import comfy.sample
import comfy.samplers
import comfy.utils
import torch
from comfy_api.latest import io

from ..core.text2video import INTERPOLATIONS, PADDINGS, MotionLatents, motion_latents, motion_shifts

CATEGORY = "EditKit/video"


def _sampling(model):
    sampling = model.get_model_object("model_sampling")
    if not isinstance(sampling, comfy.model_sampling.EPS) or isinstance(sampling, comfy.model_sampling.IMG_TO_IMG):
        kind = next((c.__name__ for c in type(sampling).__mro__
                     if not c.__name__.startswith("ModelSampling") and c not in (object, torch.nn.Module)),
                    type(sampling).__name__)
        raise ValueError(f"model: motion latents re-noise in the x = x0 + sigma * noise space of noise / v "
                         f"prediction models (SD 1.x, 2.x, XL); this model samples with {kind} (a flow or other "
                         f"parameterisation), which is not supported")
    return sampling


def _one_image(model, latent) -> torch.Tensor:
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not torch.is_tensor(samples) or samples.is_nested or samples.ndim != 4:
        shape = tuple(samples.shape) if torch.is_tensor(samples) and not samples.is_nested else None
        raise ValueError(f"latent: expected the latent of one image (Empty Latent Image), got "
                         f"{'shape ' + str(shape) if shape else 'no image latent'}")
    if samples.shape[0] != 1:
        raise ValueError(f"latent: give the latent of ONE image (Empty Latent Image with batch_size 1): the node "
                         f"makes the frames itself; this latent holds {samples.shape[0]}")
    samples = comfy.sample.fix_empty_latent_channels(model, samples, latent.get("downscale_ratio_spacial"))
    channels = model.get_model_object("latent_format").latent_channels
    if samples.ndim != 4 or samples.shape[1] != channels:
        raise ValueError(f"latent: shape {tuple(samples.shape)} does not fit this model's latents "
                         f"({channels} channels, one image)")
    return samples


def make_motion_latents(model, positive, negative, latent, frames: int, seed: int, steps: int, scheduler: str,
                        cfg: float, motion_x: float, motion_y: float, strength: float, start_at_step: int,
                        warp_at_step: int, padding: str = "reflection",
                        interpolation: str = "nearest") -> tuple[MotionLatents, torch.Tensor]:
    """(core result in the model's sampling space, the full schedule). The node's work, for the node and the
    tests."""
    sampling = _sampling(model)
    samples = _one_image(model, latent)
    if frames < 2:
        raise ValueError(f"frames: expected at least 2, got {frames} (one frame has no motion: sample it with "
                         f"KSampler)")
    if steps < 1:
        raise ValueError(f"steps: expected at least 1, got {steps}")
    if scheduler not in comfy.samplers.SCHEDULER_NAMES:
        raise ValueError(f"scheduler: '{scheduler}' is not one of {', '.join(comfy.samplers.SCHEDULER_NAMES)}")
    if not math.isfinite(strength) or strength < 0:
        raise ValueError(f"strength: expected a number >= 0 (pixels per frame), got {strength}")
    if not (math.isfinite(motion_x) and math.isfinite(motion_y)):
        raise ValueError(f"motion_x: expected finite numbers, got ({motion_x}, {motion_y})")
    if padding not in PADDINGS:
        raise ValueError(f"padding: '{padding}' is not one of {', '.join(PADDINGS)}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation: '{interpolation}' is not one of {', '.join(INTERPOLATIONS)}")

    sigmas = comfy.samplers.calculate_sigmas(sampling, scheduler, steps).float().cpu()
    last = sigmas.numel() - 2           # the last step's index (ddim_uniform may give a step more than asked)
    if not 0 <= start_at_step <= last:
        raise ValueError(f"start_at_step: {start_at_step} must be between 0 and the last step ({last})")
    if not start_at_step <= warp_at_step <= last:
        raise ValueError(f"warp_at_step: {warp_at_step} must be between start_at_step ({start_at_step}) and the "
                         f"last step ({last})")
    if not float(sigmas[warp_at_step]) > 0:
        raise ValueError(f"warp_at_step: the schedule reaches sigma 0 at step {warp_at_step}; warp earlier")
    inner = model.model
    # the seed's noise exactly as KSampler draws it (comfy.sample.prepare_noise), then one fresh noise per
    # further frame for the forward step, from the same generator
    generator = torch.Generator().manual_seed(seed)
    first = torch.randn(samples.size(), dtype=samples.dtype, layout=samples.layout, generator=generator, device="cpu")
    fresh = torch.randn((frames - 1, *samples.shape[1:]), dtype=samples.dtype, generator=generator, device="cpu")
    # the first frame at sigmas[0] as ComfyUI's sampler starts it (KSAMPLER: noise_scaling, max_denoise)
    image = inner.process_latent_in(samples) if torch.count_nonzero(samples) > 0 else samples
    max_denoise = math.isclose(float(sampling.sigma_max), float(sigmas[0]), rel_tol=1e-5) or \
        float(sigmas[0]) > float(sampling.sigma_max)
    start = sampling.noise_scaling(sigmas[0], first.clone(), image.float(), max_denoise)

    sampler = comfy.samplers.sampler_object("ddim")
    bar = comfy.utils.ProgressBar(max(warp_at_step, 1))
    done = [0]

    def denoise(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
        """Guided DDIM over the window of the schedule, by ComfyUI's sampling (x in sampling space)."""
        offset = done[0]

        def progress(step, x0, x_, total):
            bar.update_absolute(offset + step + 1, max(warp_at_step, 1))
        out = comfy.sample.sample_custom(model, torch.zeros_like(x), cfg, sampler, window.float(), positive,
                                         negative, inner.process_latent_out(x.clone()), callback=progress,
                                         disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        done[0] += window.numel() - 1
        return inner.process_latent_in(out.float().cpu())

    ratio = float(getattr(inner.latent_format, "spacial_downscale_ratio", 8))
    shifts = motion_shifts(frames, (motion_x, motion_y), strength / ratio)
    result = motion_latents(start.float().cpu(), sigmas.double(), start_at_step, warp_at_step, shifts,
                            fresh.float(), denoise, padding, interpolation)
    return result, sigmas


class MotionLatentsNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitMotionLatents",
            display_name="Motion Latents (Text2Video-Zero)",
            category=CATEGORY,
            description="Text2Video-Zero's motion dynamics (Khachatryan et al. 2023, sec. 3.2): the starting latents "
                        "of a video made from one seed. The seed's image is sampled a few DDIM steps with the prompt, "
                        "moved by a global translation per frame, and noised back to the step the video starts at. "
                        "Sample the LATENT with the SIGMAS output (SamplerCustomAdvanced with DisableNoise, or "
                        "KSamplerAdvanced: add_noise disable, same steps and scheduler, start_at_step as here) and "
                        "a model through Keyframe Attention (mode first).",
            inputs=[
                io.Model.Input("model", tooltip="The model the video will be sampled with (SD 1.x / 2.x / XL). Not "
                                                "modified."),
                io.Conditioning.Input("positive", tooltip="The video's prompt (the first frame's DDIM steps are "
                                                          "guided by it)."),
                io.Conditioning.Input("negative", tooltip="The negative prompt."),
                io.Latent.Input("latent", tooltip="Empty Latent Image of ONE image: its size is the frames' size."),
                io.Int.Input("frames", default=8, min=2, max=4096,
                             tooltip="Number of frames F (official demo: 8)."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="Seed of the first frame's noise (drawn as KSampler draws it, so frame 0 is "
                                     "the image KSampler makes from this seed) and of each frame's re-noising."),
                io.Int.Input("steps", default=50, min=1, max=10000,
                             tooltip="The sampling steps the video will be sampled with (paper: 50 DDIM steps)."),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="ddim_uniform",
                               tooltip="ComfyUI scheduler of the schedule (ddim_uniform: the official code's DDIM "
                                       "timesteps 981, 961, ..., 1)."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="CFG scale of the first frame's DDIM steps; use the same in the sampler "
                                       "(official: 7.5)."),
                io.Float.Input("motion_x", default=1.0, min=-100.0, max=100.0, step=0.1,
                               tooltip="Direction δ of the camera motion, x (paper default δ = (1, 1)). Frame k "
                                       "looks at the first frame moved by k·strength·δ: the view pans by δ, so the "
                                       "scene slides the opposite way on screen (positive x: the scene moves left)."),
                io.Float.Input("motion_y", default=1.0, min=-100.0, max=100.0, step=0.1,
                               tooltip="Direction δ of the camera motion, y (positive: the scene moves up)."),
                io.Float.Input("strength", default=12.0, min=0.0, max=120.0, step=0.5,
                               tooltip="λ: image pixels per frame along δ (official: 12 at 512 px, i.e. 1.5 latent "
                                       "pixels). 0: no motion."),
                io.Int.Input("start_at_step", default=2, min=0, max=10000,
                             tooltip="T: the step the video is sampled from (official t1 = 47 of its 50 ascending "
                                     "DDIM timesteps: timestep 941, step 2). The first frame is sampled alone up "
                                     "to here; the SIGMAS output starts here (KSamplerAdvanced: start_at_step)."),
                io.Int.Input("warp_at_step", default=5, min=0, max=10000,
                             tooltip="T' = T − Δt: the step whose latent is warped (official t0 = 44: timestep "
                                     "881, step 5), after Δt guided DDIM steps from start_at_step."),
                io.Combo.Input("padding", options=list(PADDINGS), default="reflection", advanced=True,
                               tooltip="What fills the strip a shift uncovers: reflection (official; keeps the "
                                       "latent's statistics), border (edge repeated: streaks) or zeros."),
                io.Combo.Input("interpolation", options=list(INTERPOLATIONS), default="nearest", advanced=True,
                               tooltip="nearest (official): shifts rounded to whole latent pixels, values copied. "
                                       "bilinear: exact sub-pixel shifts, but averaging neighbours lowers the "
                                       "noise's variance (up to half at half a pixel), which blurs."),
            ],
            outputs=[
                io.Latent.Output(display_name="latent", tooltip="The F frames at the noise of start_at_step: sample "
                                                                "them with no added noise (DisableNoise / add_noise "
                                                                "off)."),
                io.Sigmas.Output(display_name="sigmas", tooltip="The schedule to sample with: steps from "
                                                                "start_at_step on."),
            ],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent, frames, seed, steps, scheduler, cfg, motion_x, motion_y,
                strength, start_at_step, warp_at_step, padding="reflection", interpolation="nearest") -> io.NodeOutput:
        result, sigmas = make_motion_latents(model, positive, negative, latent, frames, seed, steps, scheduler, cfg,
                                             motion_x, motion_y, strength, start_at_step, warp_at_step, padding,
                                             interpolation)
        samples = model.model.process_latent_out(result.latents.clone())
        return io.NodeOutput({"samples": samples}, sigmas[start_at_step:].clone())


NODES = [MotionLatentsNode]
