"""Nodes: invert a real photo (NullTextInvert) and sample from the inversion with any deterministic sampler.

The inversion runs on ComfyUI's own schedule (the model's sigmas through a ComfyUI scheduler) and returns
the noised LATENT, the INVERSION and the SIGMAS; `Inversion Guider` is a GUIDER for SamplerCustomAdvanced
that reproduces the inversion's unconditional branch at each step (see core/inversion.py).
"""
from __future__ import annotations

import contextlib
import logging
import os

import comfy.model_management
import comfy.samplers
import comfy.utils
import torch
from comfy_api.latest import io

from ..core.inversion import (MODES, Inversion, NotAnInversionError, NullTextSettings, ddim_invert, direct_denoised,
                              load_inversion, null_text_optimise, save_inversion)
from ..core.schedule import step_index
from .host_helpers import (check_context_width, check_inversion_sampling, conditioning_context, inversion_negative,
                           require_sd_unet)

CATEGORY = "EditKit/inversion"
InversionType = io.Custom("EDITKIT_INVERSION")


class ComfyEps:
    """eps(x, sigma, context) of a ComfyUI model (sigma space), differentiable in the context."""

    def __init__(self, model):
        comfy.model_management.load_models_gpu([model])
        self.inner = model.model
        self.device = model.load_device
        self.options = model.model_options.get("transformer_options", {})

    def __call__(self, x, sigma, context):
        batch = x.shape[0]
        if context.shape[0] != batch:
            context = context.expand(batch, -1, -1)
        if torch.is_tensor(sigma):     # stays on the device: no sync, and replayable from a CUDA graph
            sigma = sigma.to(self.device, torch.float32)
            s = sigma.reshape(1).expand(batch).contiguous()
        else:
            sigma = float(sigma)
            s = torch.full((batch,), sigma, device=self.device, dtype=torch.float32)
        # a copy, as ComfyUI's samplers pass one: the UNet writes its block indices into these options
        options = dict(self.options)
        denoised = self.inner.apply_model(x, s, c_crossattn=context.to(self.device), transformer_options=options)
        return (x - denoised.to(x.dtype)) / sigma


@contextlib.contextmanager
def autograd_usable_weights(module: torch.nn.Module):
    """Temporarily give `module` ordinary copies of weights that were created in inference mode.

    ComfyUI runs nodes under torch.inference_mode, so a model loaded by a node holds inference tensors,
    which autograd refuses to save for a backward pass (needed here for gradients w.r.t. the null-text
    embedding). The copies cost one extra set of weights while they exist; the originals are put back.
    """
    swapped = []
    try:
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None and p.is_inference():
                    swapped.append((sub, name, p))
                    sub._parameters[name] = torch.nn.Parameter(p.detach().clone(), requires_grad=False)
        yield
    finally:
        for sub, name, p in swapped:
            sub._parameters[name] = p


def graph_replayable(model) -> bool:
    """Whether ComfyEps on `model` may be replayed from a CUDA graph: a replay runs no Python, so the model
    must have no patches or wrappers (which may keep state or check the step) and its weights must sit on
    the GPU for good (lowvram and dynamic loading cast or move weights inside the forward). Call it once the
    model is loaded (ComfyEps loads it)."""
    if model.load_device.type != "cuda" or getattr(model.model, "model_lowvram", False):
        return False
    options = model.model_options.get("transformer_options", {})
    if any(options.get(key) for key in ("patches", "patches_replace", "wrappers", "callbacks")):
        return False
    return not any(getattr(m, "comfy_cast_weights", False) or getattr(m, "weight_function", None)
                   or getattr(m, "bias_function", None) for m in model.model.diffusion_model.modules())


class NullTextInvert(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitNullTextInvert",
            display_name="Invert Image (Null-text / DDIM)",
            category=CATEGORY,
            description="Turns a photo's latent into the noise that regenerates it, so the photo can be edited. "
                        "direct: exact reconstruction, fastest (Ju et al. 2023); null_text: optimises the "
                        "unconditional embedding per step (Mokady et al. 2023); negative_prompt: the source prompt "
                        "as negative, no optimisation (Miyake et al. 2023); ddim: plain DDIM inversion.",
            inputs=[
                io.Model.Input("model", tooltip="SD 1.x / 2.x model. Not modified."),
                io.Conditioning.Input("positive", tooltip="The source prompt: a description of the photo."),
                io.Conditioning.Input("negative", tooltip="Usually an empty prompt: the unconditional encoding "
                                                          "(null-text starts its optimisation from it)."),
                io.Latent.Input("latent", tooltip="The photo through VAE Encode, or the frames of a video (a batch, "
                                                  "inverted together; not with null_text)."),
                io.Combo.Input("mode", options=list(MODES), default="direct",
                               tooltip="Inversion method; see the node description."),
                io.Int.Input("steps", default=50, min=1, max=1000, tooltip="Sampling steps of the inversion; sample "
                                                                           "with the SIGMAS output."),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="ddim_uniform",
                               tooltip="ComfyUI scheduler for the schedule (ddim_uniform is DDIM's)."),
                io.Float.Input("guidance", default=7.5, min=1.0, max=30.0, step=0.1,
                               tooltip="The CFG scale the edit will be sampled with (null-text optimises for it)."),
                io.Int.Input("inner_steps", default=10, min=0, max=100,
                             tooltip="null_text: Adam steps per sampling step (paper: 10)."),
                io.Float.Input("learning_rate", default=0.01, min=0.0, max=1.0, step=0.001,
                               tooltip="null_text: Adam learning rate at the first step, decaying along the steps."),
                io.Float.Input("early_stop", default=1e-5, min=0.0, max=1.0, step=1e-6,
                               tooltip="null_text: stop a step's optimisation when the loss is below this (plus "
                                       "2e-5 per step)."),
            ],
            outputs=[
                io.Latent.Output(display_name="noised_latent", tooltip="Start latent for the sampler (disable its "
                                                                       "noise: DisableNoise / add_noise off)."),
                InversionType.Output(display_name="inversion", tooltip="For Inversion Guider and editing nodes."),
                io.Sigmas.Output(display_name="sigmas", tooltip="The inversion's schedule: sample with it."),
            ],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent, mode, steps, scheduler, guidance, inner_steps,
                learning_rate, early_stop) -> io.NodeOutput:
        inner = require_sd_unet(model)
        samples = latent["samples"]
        if samples.is_nested or samples.ndim != 4:
            raise ValueError(f"latent: expected an image latent or a batch of video frames, got shape "
                             f"{tuple(samples.shape)}")
        frames = samples.shape[0]
        if frames > 1 and mode == "null_text":
            raise ValueError(f"mode: null_text optimises one image at a time, and this latent holds {frames} "
                             f"frames; invert a video with direct (exact, and as fast as ddim), ddim or "
                             f"negative_prompt")
        channels = inner.latent_format.latent_channels
        if samples.shape[1] != channels:
            raise ValueError(f"latent: {samples.shape[1]} channels but this model's latents have {channels}; "
                             f"encode the photo with this checkpoint's VAE")
        if steps < 1:
            raise ValueError("steps: must be at least 1")
        if mode not in MODES:
            raise ValueError(f"mode: '{mode}' is not one of {', '.join(MODES)}")
        cond = conditioning_context(positive, "positive")
        uncond = conditioning_context(negative, "negative")
        check_context_width(inner, cond, "positive")
        check_context_width(inner, uncond, "negative")
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps).float().cpu()

        eps = ComfyEps(model)
        total = steps * (2 if mode == "null_text" else 1)
        bar = comfy.utils.ProgressBar(total)
        with torch.inference_mode(False):
            x0 = inner.process_latent_in(samples.clone()).to(eps.device, torch.float32)
            x0 = x0[0] if frames == 1 else x0   # a video's frames are inverted in one batch
            cond_d = cond.clone().to(eps.device)
            uncond_d = uncond.clone().to(eps.device)
            sig = sigmas.clone()
            latents = ddim_invert(eps, x0, sig, cond_d, progress=lambda i, n: bar.update_absolute(i, total))
            embeddings, stats = None, {}
            if mode == "null_text":
                settings = NullTextSettings(inner_steps=inner_steps, learning_rate=learning_rate, early_stop=early_stop)
                with torch.enable_grad(), autograd_usable_weights(inner.diffusion_model):
                    embeddings, stats = null_text_optimise(
                        eps, latents, sig, cond_d, uncond_d, guidance, settings,
                        progress=lambda i, n: bar.update_absolute(steps + i, total),
                        cuda_graph=graph_replayable(model))
                if stats["cuda_graph"].startswith("failed"):
                    logging.warning("EditKit null-text: CUDA graph not usable, ran eagerly (%s)", stats["cuda_graph"])
                embeddings = embeddings.cpu()
            latents = latents.cpu()
        inversion = Inversion(mode=mode, sigmas=sigmas, latents=latents, guidance=guidance,
                              uncond_embeddings=embeddings, source_context=cond.clone().cpu(),
                              negative_context=uncond.clone().cpu(),
                              metadata={"scheduler": scheduler,
                                        "latent_scale": float(inner.latent_format.scale_factor),
                                        "latent_shift": float(getattr(inner.latent_format, "shift_factor", 0.0)),
                                        **{k: v for k, v in stats.items() if k != "losses"}})
        noised = {"samples": inner.process_latent_out(latents[0].reshape(samples.shape).clone())}
        return io.NodeOutput(noised, inversion, sigmas.clone())


class InversionCFGGuider(comfy.samplers.CFGGuider):
    """CFG that reproduces the inversion: the unconditional branch of each step is the one the inversion
    prescribes (null-text embedding of that step, the source prompt, or the negative it was inverted with),
    and rows whose prompt is the source prompt follow the stored trajectory exactly in direct mode."""

    def __init__(self, model_patcher, inversion: Inversion, positive, cfg: float):
        super().__init__(model_patcher)
        self.inversion = inversion
        self.schedule = [float(s) for s in inversion.sigmas]
        negative = [[inversion.negative_context, {}]]
        source = [[inversion.source_context, {}]]
        self.inner_set_conds({"positive": positive, "negative": negative, "source": source})
        self.set_cfg(cfg)
        self.follows_source = torch.equal(conditioning_context(positive, "positive").cpu().float(),
                                          inversion.source_context.float())

    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False,
               seed=None):
        check_inversion_sampling(self.inversion, noise, sampler, sigmas)
        frames = self.inversion.frames
        if frames > 1 and latent_image.shape[0] != frames:
            raise ValueError(f"latent: the inversion is of {frames} frames but the latent holds "
                             f"{latent_image.shape[0]}; sample the inversion's noised_latent")
        return super().sample(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed)

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        step = min(step_index(float(timestep.flatten()[0]), self.schedule), len(self.schedule) - 2)
        if self.inversion.mode == "direct" and self.follows_source:
            latents = self.inversion.latents
            target = direct_denoised(latents, self.schedule, step).to(x.device, x.dtype)
            return target.reshape(-1, *x.shape[1:]).expand_as(x).clone()
        return comfy.samplers.sampling_function(self.inner_model, x, timestep,
                                                inversion_negative(self.conds, self.inversion, step),
                                                self.conds.get("positive"), self.cfg, model_options=model_options,
                                                seed=seed)


class InversionGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitInversionGuider",
            display_name="Inversion Guider",
            category=CATEGORY,
            description="A GUIDER for SamplerCustomAdvanced that samples from an inversion: the source prompt "
                        "reconstructs the photo, another prompt edits it. Use the inversion's SIGMAS and noised "
                        "latent, with DisableNoise and a deterministic sampler.",
            inputs=[
                io.Model.Input("model", tooltip="The model the photo was inverted with (LoRA etc. allowed)."),
                InversionType.Input("inversion", tooltip="From 'Invert Image'."),
                io.Conditioning.Input("positive", tooltip="The source prompt to reconstruct, or a new prompt."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=30.0, step=0.1,
                               tooltip="Guidance scale (null-text inversion was optimised for its 'guidance')."),
            ],
            outputs=[io.Guider.Output(tooltip="Samples from the inversion: connect it to SamplerCustomAdvanced with the "
                                              "inversion's noised latent, SIGMAS and DisableNoise.")],
        )

    @classmethod
    def execute(cls, model, inversion, positive, cfg) -> io.NodeOutput:
        require_sd_unet(model)
        check_context_width(model.model, conditioning_context(positive, "positive"), "positive")
        return io.NodeOutput(InversionCFGGuider(model, inversion, positive, cfg))



INVERSION_FOLDER = "inversions"
NONE_SAVED = "(no saved inversion yet)"


def _saved_inversions() -> list[str]:
    """Saved inversions in ComfyUI's output and input folders, annotated the way LoadImage annotates."""
    import folder_paths
    names = []
    for root, tag in ((folder_paths.get_output_directory(), "output"), (folder_paths.get_input_directory(), "input")):
        folder = os.path.join(root, INVERSION_FOLDER)
        if os.path.isdir(folder):
            names += sorted(f"{INVERSION_FOLDER}/{f} [{tag}]" for f in os.listdir(folder) if f.endswith(".safetensors"))
    return names


class SaveInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitSaveInversion",
            display_name="Save Inversion",
            category=CATEGORY,
            description="Saves an inversion (safetensors with JSON metadata) into output/inversions, so a slow "
                        "null-text inversion is done once per photo. Load it with 'Load Inversion'.",
            inputs=[
                InversionType.Input("inversion", tooltip="From 'Invert Image'."),
                io.String.Input("filename_prefix", default="editkit_inversion",
                                tooltip="File name prefix; a counter is appended."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, inversion, filename_prefix) -> io.NodeOutput:
        import folder_paths
        folder = os.path.join(folder_paths.get_output_directory(), INVERSION_FOLDER)
        full_folder, name, counter, _, _ = folder_paths.get_save_image_path(filename_prefix, folder)
        os.makedirs(full_folder, exist_ok=True)
        file = f"{name}_{counter:05}.safetensors"
        save_inversion(inversion, os.path.join(full_folder, file))
        return io.NodeOutput(ui={"text": [f"{INVERSION_FOLDER}/{file} [output]"]})


class LoadInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitLoadInversion",
            display_name="Load Inversion",
            category=CATEGORY,
            description="Loads an inversion saved by 'Save Inversion' (from output/inversions or input/inversions) "
                        "and gives back its noised latent, the inversion and its sigmas.",
            inputs=[io.Combo.Input("inversion_file", options=_saved_inversions() or [NONE_SAVED],
                                   tooltip="A .safetensors file written by 'Save Inversion' (refresh the page "
                                           "after saving one to see it here).")],
            outputs=[
                io.Latent.Output(display_name="noised_latent", tooltip="Start latent for the sampler (with "
                                                                       "DisableNoise)."),
                InversionType.Output(display_name="inversion", tooltip="For Inversion Guider and the editing "
                                                                       "nodes."),
                io.Sigmas.Output(display_name="sigmas", tooltip="The inversion's schedule: sample with it."),
            ],
        )

    @classmethod
    def validate_inputs(cls, inversion_file):
        import folder_paths
        if not inversion_file or inversion_file == NONE_SAVED:
            return ("inversion_file: no inversion has been saved yet; run a graph with 'Save Inversion' (it "
                    "writes to output/inversions), then refresh the page and pick the file")
        if not folder_paths.exists_annotated_filepath(inversion_file):
            return f"inversion_file: '{inversion_file}' does not exist"
        return True

    @classmethod
    def fingerprint_inputs(cls, inversion_file):
        import folder_paths
        if not inversion_file or not folder_paths.exists_annotated_filepath(inversion_file):
            return inversion_file   # validation reports it
        return os.path.getmtime(folder_paths.get_annotated_filepath(inversion_file))

    @classmethod
    def execute(cls, inversion_file) -> io.NodeOutput:
        import folder_paths
        try:
            inversion = load_inversion(folder_paths.get_annotated_filepath(inversion_file), "inversion_file")
        except NotAnInversionError as e:
            raise ValueError(str(e)) from None
        # stored in the model's latent space; a LATENT is in the VAE's (what the model's process_latent_out gives)
        scale = float(inversion.metadata.get("latent_scale", 1.0))
        shift = float(inversion.metadata.get("latent_shift", 0.0))
        noised = {"samples": inversion.latents[0].reshape(-1, *inversion.latents.shape[-3:]).clone() / scale + shift}
        return io.NodeOutput(noised, inversion, inversion.sigmas.clone())


NODES = [NullTextInvert, InversionGuider, SaveInversion, LoadInversion]
