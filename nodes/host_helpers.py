"""Host helpers shared by the inversion and editing nodes: model and input checks, and the unconditional
branch an inversion prescribes to a guider."""
from __future__ import annotations

import comfy.model_sampling
import torch
from comfy_api.latest import io

from ..core.inversion import Inversion


def require_sd_unet(model):
    """The inner model of an SD 1.x / 2.x MODEL; anything else gets an error naming the input."""
    inner = model.model
    if not isinstance(inner.model_sampling, comfy.model_sampling.EPS) or not hasattr(inner, "diffusion_model") \
            or not hasattr(inner.diffusion_model, "input_blocks"):
        raise ValueError(f"model: real-image inversion and editing need an SD 1.x / SD 2.x UNet (noise or v "
                         f"prediction); got "
                         f"{type(inner).__name__} with {type(inner.model_sampling).__name__} sampling")
    if getattr(inner, "adm_channels", 0):
        raise ValueError("model: SDXL-style models (pooled text conditioning) are not supported by the "
                         "inversion and editing nodes yet; use an SD 1.x or SD 2.x checkpoint")
    return inner


def conditioning_context(conditioning, name: str) -> torch.Tensor:
    """The prompt encoding of a one-prompt CONDITIONING."""
    if not conditioning or not isinstance(conditioning[0], (list, tuple)) or not torch.is_tensor(conditioning[0][0]):
        raise ValueError(f"{name}: expected a CONDITIONING from a text encoder (e.g. CLIPTextEncode)")
    context = conditioning[0][0]
    if context.ndim != 3 or context.shape[0] != 1:
        raise ValueError(f"{name}: expected one prompt encoding of shape (1, tokens, width), got {tuple(context.shape)}")
    return context


def check_context_width(inner, context, name: str) -> None:
    width = inner.model_config.unet_config.get("context_dim")
    if width is not None and context.shape[-1] != width:
        raise ValueError(f"{name}: the text encoding is {context.shape[-1]} wide but this model's cross-attention "
                         f"expects {width}; encode the prompt with the CLIP of the same checkpoint")


def map_cond_tensors(cond: dict, transform) -> dict:
    """A copy of one of the sampler's conds whose mask and model-cond tensors went through
    transform(tensor, name) (name: 'mask' or the model cond's name); transform returns the tensor itself where
    it does not apply."""
    cond = cond.copy()
    if torch.is_tensor(cond.get("mask")):
        cond["mask"] = transform(cond["mask"], "mask")
    model_conds = {}
    for name, value in cond["model_conds"].items():
        data = getattr(value, "cond", None)
        if torch.is_tensor(data):
            changed = transform(data, name)
            if changed is not data:
                value = value._copy_with(changed)
        model_conds[name] = value
    cond["model_conds"] = model_conds
    return cond


DETERMINISTIC_HINT = "euler, ddim, dpmpp_2m, heun, lms, deis, uni_pc"


def check_deterministic_sampler(sampler) -> None:
    name = getattr(getattr(sampler, "sampler_function", None), "__name__", "")
    if any(part in name for part in ("ancestral", "sde", "lcm", "ddpm", "restart")):
        raise ValueError(f"sampler: '{name.replace('sample_', '')}' adds fresh noise at every step, so it cannot "
                         f"retrace an inversion; use a deterministic sampler ({DETERMINISTIC_HINT})")


def check_inversion_sigmas(inversion: Inversion, sigmas) -> None:
    if sigmas.shape[-1] != inversion.sigmas.shape[-1] or not torch.allclose(
            sigmas.float().cpu(), inversion.sigmas.float(), rtol=1e-4, atol=1e-6):
        raise ValueError(f"sigmas: sample with the schedule the inversion used ({inversion.sigmas.shape[-1] - 1} "
                         f"steps); connect the 'sigmas' output of the inversion node")


def check_no_noise(noise: torch.Tensor) -> None:
    """An inversion's noised latent already is the noise: a sampler that adds more edits something else."""
    if torch.count_nonzero(noise):
        raise ValueError("noise: sampling from an inversion needs no added noise, but this sampler was given "
                         "random noise; connect a DisableNoise node to SamplerCustomAdvanced's noise input "
                         "(or turn add_noise off)")


def check_inversion_sampling(inversion: Inversion, noise, sampler, sigmas) -> None:
    """Everything sampling from an inversion needs: no added noise, a deterministic sampler, its schedule."""
    check_no_noise(noise)
    check_deterministic_sampler(sampler)
    check_inversion_sigmas(inversion, sigmas)


def inversion_negative(conds: dict, inversion: Inversion, step: int):
    """The unconditional branch an inversion prescribes at `step`, from a guider's processed conds
    ("negative": the encoding it was inverted with, "source": the source prompt)."""
    if inversion.mode == "negative_prompt":
        return conds["source"]
    if inversion.mode == "null_text":
        embedding = inversion.uncond_embeddings[step][None]
        return replace_context(conds["negative"], lambda old: embedding.to(old.device, old.dtype))
    return conds["negative"]


def replace_context(conds: list, make_context) -> list:
    """Copies of processed conds whose cross-attention context is `make_context(current context)`."""
    out = []
    for c in conds:
        c = c.copy()
        model_conds = dict(c["model_conds"])
        template = model_conds["c_crossattn"]
        model_conds["c_crossattn"] = template._copy_with(make_context(template.cond))
        c["model_conds"] = model_conds
        out.append(c)
    return out


def dynamic_combo(input_name: str, options: list, tooltip: str) -> io.DynamicCombo.Input:
    """A DynamicCombo whose schema also names its first option as the default: the front end's node-search
    preview prints a widget's default and shows 'undefined' for a DynamicCombo without one."""
    return io.DynamicCombo.Input(input_name, options=options, tooltip=tooltip,
                                 extra_dict={"default": options[0].key})


def dynamic_choice(value, input_name: str, options) -> str:
    """The option a DynamicCombo input chose. ComfyUI drops the input altogether when a saved value is not one of
    the options (an old or hand-edited workflow), so the nodes take it with a None default and refuse it here,
    naming the input and its options, instead of failing with a bare TypeError about a missing argument."""
    name = value.get(input_name) if isinstance(value, dict) else value
    if name not in options:
        saved = "the saved value" if value is None else f"'{name}'"
        raise ValueError(f"{input_name}: {saved} is not one of {', '.join(options)} (an old or edited workflow?); "
                         f"choose one")
    return name
