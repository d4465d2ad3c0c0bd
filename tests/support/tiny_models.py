"""Tiny, deterministic Stable-Diffusion-1.5-layout models for tests.

The models share SD1.5's *block layout* (4 levels, 2 res blocks per level,
cross-attention transformers at the first three levels and in the middle, so
ComfyUI block ids input 1,2,4,5,7,8 / middle 0 / output 3..11 carry a
transformer exactly as in SD1.5) but use tiny widths so that everything runs
in well under a second on a CPU.

Every parameter is initialised explicitly from a seed: ComfyUI's layers skip
PyTorch's default initialisation (uninitialised memory -> NaN), and diffusers
zero-initialises some output convolutions, so both are overwritten here.

Public API (float32, CPU):

* ``TINY_UNET_CONFIG``       -- kwargs for ``diffusers.UNet2DConditionModel``
* ``TINY_COMFY_UNET_CONFIG`` -- the matching ComfyUI ``unet_config``
* ``TINY_CLIP_CONFIG``       -- overrides of ComfyUI's CLIP-L text config
* ``TINY_VAE_DDCONFIG``      -- ComfyUI ``AutoencoderKL`` ddconfig
* ``make_diffusers_unet(seed=0)``
* ``make_comfy_model(seed=0)``  -> ``comfy.model_patcher.ModelPatcher``
* ``make_comfy_clip(seed=0)``   -> ``comfy.sd.CLIP``
* ``make_comfy_vae(seed=0)``    -> ``comfy.sd.VAE``
* ``tiny_checkpoint(seed=0)``   -> ``(MODEL, CLIP, VAE)``
* ``TINY_CLIP_VISION_CONFIG``  -- a tiny CLIP ViT config (32 px inputs, 4 px patches: an 8x8 patch grid)
* ``make_comfy_clip_vision(seed=0)`` -> ``comfy.clip_vision.ClipVisionModel`` (what CLIPVisionLoader returns)
* ``tiny_controlnet_state_dict(seed=0)`` -> a ControlNet state dict for ``comfy.controlnet``
* ``toyworld_checkpoint()``   -> ``(MODEL, CLIP, VAE)`` of the same layout with the trained toy-world weights
  (tests/toyworld/weights; see tests/toyworld/README.md)
* ``save_tiny_controlnet(folder, seed=0, name=...)`` -> its file, for ControlNetLoader
  (``.safetensors``, or a ``torch.save`` dict under any other name, e.g. ``.pth``)

SDXL layout (issue 24): SDXL's real block structure (3 levels, 2 res blocks per level, transformer depths
0 / 2 / 10 per level and 10 in the middle: the 70 transformer blocks of SDXL at SDXL's ComfyUI sites) at tiny
widths (32/64/128 channels, 16-channel heads, CLIP-L 32 + CLIP-G 64 = context 96, ADM 64 + 6 * 256 = 1600):

* ``TINY_SDXL_UNET_CONFIG``       -- kwargs for ``diffusers.UNet2DConditionModel`` (``text_time`` added conditioning)
* ``TINY_SDXL_COMFY_UNET_CONFIG`` -- the matching ComfyUI ``unet_config`` (``supported_models.SDXL``)
* ``TINY_SDXL_CLIP_L_CONFIG`` / ``TINY_SDXL_CLIP_G_CONFIG`` -- overrides of ComfyUI's CLIP-L / CLIP-bigG text configs
* ``SDXL_CLIP_L_WIDTH``, ``SDXL_CLIP_G_WIDTH``, ``SDXL_CONTEXT_DIM``, ``SDXL_POOLED_DIM``, ``SDXL_ADM_CHANNELS``,
  ``SDXL_HEAD_CHANNELS``, ``SDXL_TRANSFORMER_SITES`` (the 11 transformer sites and their depths)
* ``make_diffusers_sdxl_unet(seed=0)`` (works without ComfyUI, like ``make_diffusers_unet``)
* ``comfy_sdxl_unet_state_dict(seed=0)`` -- the same weights under ComfyUI keys
* ``make_comfy_sdxl_model(seed=0)`` -> ``comfy.model_patcher.ModelPatcher`` (``model_base.SDXL``, eps)
* ``make_comfy_sdxl_clip(seed=0)``  -> ``comfy.sd.CLIP`` (``SDXLTokenizer`` / ``SDXLClipModel``)
* ``make_comfy_sdxl_vae(seed=0)``   -> ``comfy.sd.VAE`` (the tiny SD-VAE: SDXL's VAE has the SD-VAE layout, and
  its 0.13025 scale lives in ``latent_formats.SDXL``, i.e. in the MODEL, not in the VAE)
* ``tiny_sdxl_checkpoint(seed=0)``  -> ``(MODEL, CLIP, VAE)``, cached and cloned like ``tiny_checkpoint``

Only ``make_diffusers_unet`` works without ComfyUI; the ``make_comfy_*``
functions need ComfyUI to have been booted first
(``support.comfy_host.boot_comfy`` / ``boot``).
"""
from __future__ import annotations

import math
import sys
import threading

import torch

__all__ = [
    "TINY_UNET_CONFIG",
    "TINY_COMFY_UNET_CONFIG",
    "TINY_CLIP_CONFIG",
    "TINY_VAE_DDCONFIG",
    "CONTEXT_DIM",
    "LATENT_CHANNELS",
    "VAE_DOWNSCALE",
    "TRANSFORMER_BLOCK_IDS",
    "init_weights_",
    "make_diffusers_unet",
    "make_comfy_model",
    "make_comfy_clip",
    "make_comfy_vae",
    "tiny_checkpoint",
    "TINY_CLIP_VISION_CONFIG",
    "make_comfy_clip_vision",
    "TINY_CONTROLNET_CONFIG",
    "tiny_controlnet_state_dict",
    "save_tiny_controlnet",
    "clear_caches",
    "TOYWORLD_WEIGHTS",
    "TOYWORLD_VAE_DDCONFIG",
    "make_toyworld_model",
    "make_toyworld_clip",
    "make_toyworld_vae",
    "toyworld_checkpoint",
    "SDXL_CLIP_L_WIDTH",
    "SDXL_CLIP_G_WIDTH",
    "SDXL_CONTEXT_DIM",
    "SDXL_POOLED_DIM",
    "SDXL_ADM_CHANNELS",
    "SDXL_HEAD_CHANNELS",
    "SDXL_TRANSFORMER_SITES",
    "TINY_SDXL_UNET_CONFIG",
    "TINY_SDXL_COMFY_UNET_CONFIG",
    "TINY_SDXL_CLIP_L_CONFIG",
    "TINY_SDXL_CLIP_G_CONFIG",
    "make_diffusers_sdxl_unet",
    "comfy_sdxl_unet_state_dict",
    "make_comfy_sdxl_model",
    "make_comfy_sdxl_clip",
    "make_comfy_sdxl_vae",
    "tiny_sdxl_checkpoint",
]

CONTEXT_DIM = 32
LATENT_CHANNELS = 4
VAE_DOWNSCALE = 8

# ComfyUI block ids carrying a SpatialTransformer, exactly as in SD1.5.
TRANSFORMER_BLOCK_IDS = {
    "input": (1, 2, 4, 5, 7, 8),
    "middle": (0,),
    "output": (3, 4, 5, 6, 7, 8, 9, 10, 11),
}

# diffusers UNet2DConditionModel kwargs.  NOTE: like the real SD1.5 config,
# ``attention_head_dim=8`` is (a historical diffusers quirk) the number of
# heads, so width 32 -> 8 heads of 4 dims, width 64 -> 8 heads of 8 dims,
# matching ComfyUI's SD15 ``num_heads=8, num_head_channels=-1``.
TINY_UNET_CONFIG = {
    "sample_size": 8,
    "in_channels": LATENT_CHANNELS,
    "out_channels": LATENT_CHANNELS,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ),
    "block_out_channels": (32, 32, 64, 64),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": CONTEXT_DIM,
    "attention_head_dim": 8,
    "use_linear_projection": False,
    "upcast_attention": False,
}

# The matching ComfyUI unet_config (same keys ComfyUI's model detection
# produces for SD1.5, tiny widths).  supported_models.SD15 adds
# num_heads=8 / num_head_channels=-1 itself.
TINY_COMFY_UNET_CONFIG = {
    "use_checkpoint": False,
    "image_size": 32,
    "out_channels": LATENT_CHANNELS,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "in_channels": LATENT_CHANNELS,
    "model_channels": 32,
    "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "channel_mult": [1, 1, 2, 2],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": False,
    "context_dim": CONTEXT_DIM,
    "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}

# Overrides applied by ComfyUI on top of comfy/sd1_clip_config.json (CLIP-L).
TINY_CLIP_CONFIG = {
    "hidden_size": CONTEXT_DIM,
    "intermediate_size": 64,
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "projection_dim": CONTEXT_DIM,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
}

# ComfyUI AutoencoderKL (SD-VAE layout): 4 levels -> downscale 8, 4 latent ch.
TINY_VAE_DDCONFIG = {
    "double_z": True,
    "z_channels": LATENT_CHANNELS,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 32,
    "ch_mult": [1, 1, 1, 1],
    "num_res_blocks": 1,
    "attn_resolutions": [],
    "dropout": 0.0,
}

# Distinct sub-seeds so that UNet / CLIP / VAE weights are independent.
_SUBSEED = {"unet": 0, "clip": 1, "vae": 2, "controlnet": 3, "clip_vision": 4}
_SUBSEED.update({"sdxl_unet": 5, "sdxl_clip": 6})   # the SDXL VAE is the tiny VAE ("vae")
_BIAS_STD = 0.02


def _generator(seed: int, part: str) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed) * 1000 + _SUBSEED[part])
    return g


def _is_norm(module: torch.nn.Module) -> bool:
    if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.BatchNorm2d)):
        return True
    return "norm" in type(module).__name__.lower()


@torch.no_grad()
def init_weights_(module: torch.nn.Module, generator: torch.Generator, gain: float = 1.0) -> torch.nn.Module:
    """Deterministically (re)initialise every parameter of ``module`` in place.

    * normalisation layers: weight 1, bias 0
    * weights (ndim >= 2, incl. embeddings): N(0, gain / sqrt(fan_in))
    * biases / other 1-d params: N(0, 0.02)
    * 0-d params (e.g. CLIP ``logit_scale``): ln(100)

    Float buffers are checked to be finite (none of the tiny models has an
    uninitialised buffer; this guards against future regressions).
    """
    for _, mod in module.named_modules():
        norm = _is_norm(mod)
        for pname, p in mod.named_parameters(recurse=False):
            if norm:
                p.fill_(1.0 if pname == "weight" else 0.0)
            elif p.ndim >= 2:
                fan_in = p[0].numel()
                std = gain / math.sqrt(fan_in)
                p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.dtype) * std)
            elif p.ndim == 1:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.dtype) * _BIAS_STD)
            else:
                p.fill_(math.log(100.0))
        for bname, b in mod.named_buffers(recurse=False):
            if torch.is_floating_point(b) and not torch.isfinite(b).all():
                raise RuntimeError(f"uninitialised buffer {bname!r} in {type(mod).__name__}")
    return module


# ----------------------------------------------------------------------------
# diffusers
# ----------------------------------------------------------------------------

def make_diffusers_unet(seed: int = 0, heads: int | None = None):
    """A tiny diffusers ``UNet2DConditionModel`` (float32, CPU, eval mode).

    ``heads`` overrides the 8 attention heads of SD1.5 (and of ComfyUI's tiny model): tests at a 64x64 latent
    use 2, which is four times faster on a CPU and changes no rule that depends on resolution.
    """
    from diffusers import UNet2DConditionModel

    config = dict(TINY_UNET_CONFIG)
    if heads is not None:
        config["attention_head_dim"] = heads   # (diffusers' historical name for the number of heads)
    unet = UNet2DConditionModel(**config)
    init_weights_(unet, _generator(seed, "unet"))
    unet.eval()
    unet.requires_grad_(False)
    return unet


_lock = threading.RLock()
_unet_sd_cache: dict[int, dict[str, torch.Tensor]] = {}


def _cached(cache: dict, key, build):
    """cache[key], built once (under the module's lock) by build()."""
    with _lock:
        if key not in cache:
            cache[key] = build()
        return cache[key]


def _weights_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _diffusers_unet_state_dict(seed: int) -> dict[str, torch.Tensor]:
    return _cached(_unet_sd_cache, seed, lambda: _weights_of(make_diffusers_unet(seed)))


# ----------------------------------------------------------------------------
# ComfyUI
# ----------------------------------------------------------------------------

def _require_comfy():
    if "comfy.model_management" not in sys.modules:
        raise RuntimeError(
            "ComfyUI is not booted: call support.comfy_host.boot_comfy(tmp_dir) "
            "(or boot(tmp_dir)) before building ComfyUI models"
        )


def comfy_unet_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """The weights of ``make_diffusers_unet(seed)`` under ComfyUI (ldm) keys.

    Converted with ComfyUI's own ``comfy.utils.unet_to_diffusers`` mapping.
    """
    return _ldm_state_dict(_diffusers_unet_state_dict(seed), TINY_COMFY_UNET_CONFIG)


def _ldm_state_dict(diffusers_sd: dict[str, torch.Tensor], unet_config: dict) -> dict[str, torch.Tensor]:
    """A diffusers UNet state dict under ComfyUI's keys for `unet_config`, by ComfyUI's own mapping."""
    _require_comfy()
    import comfy.utils

    mapping = comfy.utils.unet_to_diffusers(unet_config)  # diffusers key -> ldm key
    # (the mapping also lists conv_shortcut keys of res blocks whose channel
    # count does not change; those simply do not exist in either model)
    unmapped = sorted(set(diffusers_sd) - set(mapping))
    if unmapped:
        raise RuntimeError(f"diffusers keys without a ComfyUI mapping: {unmapped[:5]}")
    return {mapping[k]: v.clone() for k, v in diffusers_sd.items()}


def _comfy_patcher(model_config, unet_sd: dict[str, torch.Tensor], what: str):
    """A float32 CPU ``ModelPatcher`` of `model_config`'s model holding exactly `unet_sd`."""
    import comfy.model_patcher

    cpu = torch.device("cpu")
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, "", device=cpu)
    _load_strict(model.diffusion_model, unet_sd, what)
    model = model.to(cpu).eval()
    model.requires_grad_(False)
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def make_comfy_model(seed: int = 0):
    """A ComfyUI MODEL (``ModelPatcher``) with exactly the weights of ``make_diffusers_unet(seed)``.

    Built through ``comfy.supported_models.SD15`` (eps prediction, SD1.5
    noise schedule, SD1.5 latent format) with the tiny ``unet_config``;
    load and offload device are the CPU.
    """
    _require_comfy()
    import comfy.supported_models

    return _comfy_patcher(comfy.supported_models.SD15(TINY_COMFY_UNET_CONFIG), comfy_unet_state_dict(seed),
                          "tiny unet")


def make_comfy_clip(seed: int = 0):
    """A tiny CLIP-L-layout text encoder (hidden 32, 2 layers, 2 heads) as ``comfy.sd.CLIP``.

    Uses ComfyUI's shipped SD1 tokenizer (``comfy/sd1_tokenizer``), so long
    prompts are chunked by 77 tokens: context shape ``(1, 77 * chunks, 32)``.
    """
    _require_comfy()
    import comfy.sd1_clip

    return _comfy_clip(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel,
                       {"clip_l_model_config": TINY_CLIP_CONFIG}, _generator(seed, "clip"))


def _comfy_clip(tokenizer, encoder, configs: dict[str, dict], generator: torch.Generator):
    """A float32 CPU ``comfy.sd.CLIP`` of `tokenizer` / `encoder` with the text-model config overrides `configs`
    ({"clip_l_model_config": ..., ...}), every weight drawn from `generator`."""
    import comfy.sd
    import comfy.supported_models_base

    cpu = torch.device("cpu")
    model_options = {**{name: dict(config) for name, config in configs.items()}, "dtype": torch.float32,
                     "load_device": cpu, "offload_device": cpu, "initial_device": cpu}
    clip = comfy.sd.CLIP(target=comfy.supported_models_base.ClipTarget(tokenizer, encoder), model_options=model_options)
    init_weights_(clip.cond_stage_model, generator)
    return clip


def _vae_state_dict(seed: int) -> dict[str, torch.Tensor]:
    from comfy.ldm.models.autoencoder import AutoencoderKL

    ae = AutoencoderKL(ddconfig=dict(TINY_VAE_DDCONFIG), embed_dim=LATENT_CHANNELS)
    init_weights_(ae, _generator(seed, "vae"), gain=1.0)
    return {k: v.detach().to(torch.float32).clone() for k, v in ae.state_dict().items()}


_vae_sd_cache: dict[int, dict[str, torch.Tensor]] = {}


def make_comfy_vae(seed: int = 0):
    """A tiny SD-VAE-layout ``comfy.sd.VAE`` (downscale 8, 4 latent channels, float32, CPU)."""
    _require_comfy()
    import comfy.sd

    sd = _cached(_vae_sd_cache, seed, lambda: _vae_state_dict(seed))
    config = {"params": {"ddconfig": dict(TINY_VAE_DDCONFIG), "embed_dim": LATENT_CHANNELS}}
    sd = {k: v.clone() for k, v in sd.items()}
    return comfy.sd.VAE(sd=sd, device=torch.device("cpu"), config=config, dtype=torch.float32)


_ckpt_cache: dict[int, tuple] = {}


def tiny_checkpoint(seed: int = 0):
    """``(MODEL, CLIP, VAE)`` like CheckpointLoaderSimple returns.

    The UNet and text encoder are built once per seed and cached; every call
    returns clones (``ModelPatcher.clone()`` / ``CLIP.clone()``), so patches a
    test adds never leak into other tests.  The VAE is rebuilt on every call
    (cheap) from the cached weights.
    """
    return _checkpoint_clones(_ckpt_cache, seed, lambda: (make_comfy_model(seed), make_comfy_clip(seed)),
                              lambda: make_comfy_vae(seed))


def _checkpoint_clones(cache: dict, key, build, make_vae):
    """(MODEL, CLIP, VAE): clones of the (MODEL, CLIP) built once by build(), and a fresh VAE."""
    model, clip = _cached(cache, key, build)
    return model.clone(), clip.clone(), make_vae()


# A CLIP vision model of ViT-L/14's kind (class token, quick_gelu, pre-layer-norm, projection) at tiny widths,
# in the keys of ComfyUI's comfy/clip_vision_config_vitl.json.
TINY_CLIP_VISION_CONFIG = {
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "hidden_act": "quick_gelu",
    "hidden_size": 32,
    "image_size": 32,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 64,
    "layer_norm_eps": 1e-05,
    "model_type": "clip_vision_model",
    "num_attention_heads": 2,
    "num_channels": 3,
    "num_hidden_layers": 3,
    "patch_size": 4,
    "projection_dim": 16,
    "torch_dtype": "float32",
}


def make_comfy_clip_vision(seed: int = 0):
    """A tiny CLIP vision model as ``comfy.clip_vision.ClipVisionModel``, built by ComfyUI from a config file
    like every CLIP vision it loads, with every weight set from the seed (ComfyUI's layers skip init)."""
    _require_comfy()
    import json
    import pathlib
    import tempfile

    import comfy.clip_vision

    with tempfile.TemporaryDirectory() as folder:   # ClipVisionModel reads its config from a file
        config = pathlib.Path(folder) / "clip_vision_config_tiny.json"
        config.write_text(json.dumps(TINY_CLIP_VISION_CONFIG))
        clip_vision = comfy.clip_vision.ClipVisionModel(str(config))
    init_weights_(clip_vision.model, _generator(seed, "clip_vision"))
    return clip_vision


def clear_caches() -> None:
    """Drop every cached weight / model (the next call rebuilds them)."""
    with _lock:
        _unet_sd_cache.clear()
        _vae_sd_cache.clear()
        _ckpt_cache.clear()
        _toyworld_cache.clear()
        _sdxl_unet_sd_cache.clear()
        _sdxl_ckpt_cache.clear()


# ----------------------------------------------------------------------------
# ControlNet
# ----------------------------------------------------------------------------

# The tiny UNet's layout (channels, res blocks, down-sampling, context) for ``comfy.cldm.cldm.ControlNet``, with
# transformers only where ComfyUI can rebuild them from a file: an SD1.5 ControlNet of unknown size is detected
# as ``supported_models_base.BASE`` (``model_detection.model_config_from_unet`` finds no SD15 match at 32
# channels), which means heads of 64 channels. A 32-channel level would get 0 heads (zero-size layers that do
# not load), so the transformers sit on the 64-channel level and in the middle (one head of 64 each). The
# ControlNet's own attention never has to match the UNet's: only its outputs (one per input block and the
# middle block, added to the UNet's skip connections) must have the UNet's channels, and they do.
TINY_CONTROLNET_CONFIG = {
    **{k: v for k, v in TINY_COMFY_UNET_CONFIG.items() if k not in ("out_channels", "transformer_depth_output")},
    "transformer_depth": [0, 0, 0, 0, 1, 1, 0, 0],
    "num_heads": -1,
    "num_head_channels": 64,
    "hint_channels": 3,
}
_ZERO_CONV_GAIN = 0.5


def tiny_controlnet_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights of a tiny SD1.5-layout ControlNet (hint: an RGB image at 8x the latent size), under the keys
    ``comfy.controlnet.load_controlnet_state_dict`` reads for an ldm ControlNet without prefix
    (``input_hint_block.*``, ``input_blocks.*``, ``zero_convs.N.0.*``, ``middle_block.*``,
    ``middle_block_out.0.*``).

    Every weight is initialised from the seed, the "zero" convolutions too (a ControlNet with zero outputs
    would change nothing to test): they get N(0, 0.5 / sqrt(fan_in)) weights.
    """
    _require_comfy()
    import comfy.cldm.cldm
    import comfy.ops

    net = comfy.cldm.cldm.ControlNet(**TINY_CONTROLNET_CONFIG, dtype=torch.float32, device=torch.device("cpu"),
                                     operations=comfy.ops.disable_weight_init)
    generator = _generator(seed, "controlnet")
    init_weights_(net, generator)
    for conv in list(net.zero_convs) + [net.middle_block_out]:
        init_weights_(conv, generator, gain=_ZERO_CONV_GAIN)
    sd = {k: v.detach().to(torch.float32).clone().contiguous() for k, v in net.state_dict().items()}
    dead = [k for k, v in sd.items() if (k.startswith("zero_convs.") or k.startswith("middle_block_out."))
            and k.endswith(".weight") and not v.abs().sum() > 0]
    if dead:
        raise RuntimeError(f"zero convolutions left at zero: {dead[:3]}")
    return sd


def save_tiny_controlnet(folder, seed: int = 0, name: str = "tiny_controlnet_sd15.safetensors"):
    """Write ``tiny_controlnet_state_dict(seed)`` to ``folder/name`` and return the path: safetensors for a
    ``.safetensors`` name, otherwise a plain ``torch.save`` dict of tensors (what ComfyUI reads from ``.pth``
    / ``.ckpt`` files with ``weights_only``), so a test can give it the name a shipped workflow expects.

    Put the folder on ComfyUI's ``controlnet`` search path
    (``folder_paths.add_model_folder_path("controlnet", folder)``) and ControlNetLoader lists ``name``.
    """
    import pathlib

    path = pathlib.Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = tiny_controlnet_state_dict(seed)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save(sd, str(path))
    return path


# ----------------------------------------------------------------------------
# The toy-world checkpoint (trained weights, tests/toyworld)
# ----------------------------------------------------------------------------

import pathlib as _pathlib

TOYWORLD_WEIGHTS = _pathlib.Path(__file__).resolve().parents[1] / "toyworld" / "weights"
# The toy-world VAE: the tiny SD-VAE layout at 64 channels instead of 32. ComfyUI's Normalize is GroupNorm with
# 32 groups, so at 32 channels every norm is an instance norm, which erases a flat image's colour (a background
# is a per-channel constant); with two channels per group the colour survives (measured: 20 dB after 80 steps at
# 64 channels, 10 dB after 450 at 32).
TOYWORLD_VAE_DDCONFIG = {**TINY_VAE_DDCONFIG, "ch": 64}
TOYWORLD_FILES = {
    "unet": "toyworld_unet.safetensors",   # model.diffusion_model.state_dict() (ldm keys)
    "clip": "toyworld_clip.safetensors",   # CLIP.cond_stage_model.state_dict() (clip_l.transformer.*)
    "vae": "toyworld_vae.safetensors",     # AutoencoderKL.state_dict() (what comfy.sd.VAE(sd=...) takes)
}


def _load_toyworld_file(part: str, folder=None) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = _pathlib.Path(folder or TOYWORLD_WEIGHTS) / TOYWORLD_FILES[part]
    if not path.is_file():
        raise FileNotFoundError(f"toy-world weights missing: {path} (train them with tests/toyworld/train.py; "
                                "see tests/toyworld/README.md)")
    return load_file(str(path))


def _load_strict(module: torch.nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    missing, unexpected = module.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{what} load mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")


def make_toyworld_model(folder=None):
    """The tiny ComfyUI MODEL of ``make_comfy_model`` (SD15: eps, scaled-linear schedule, SD15 latent format) with
    the trained toy-world UNet weights."""
    _require_comfy()
    import comfy.supported_models

    return _comfy_patcher(comfy.supported_models.SD15(TINY_COMFY_UNET_CONFIG), _load_toyworld_file("unet", folder),
                          "toy-world unet")


def make_toyworld_clip(folder=None):
    """The tiny CLIP of ``make_comfy_clip`` (ComfyUI's SD1 tokenizer) with the trained toy-world text encoder."""
    clip = make_comfy_clip(seed=0)
    _load_strict(clip.cond_stage_model, _load_toyworld_file("clip", folder), "toy-world text encoder")
    return clip


def make_toyworld_vae(folder=None):
    """The toy-world VAE (``TOYWORLD_VAE_DDCONFIG``: the layout of ``make_comfy_vae`` at 64 channels) with its
    trained weights, as ``comfy.sd.VAE``."""
    _require_comfy()
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    sd = _load_toyworld_file("vae", folder)
    config = {"params": {"ddconfig": dict(TOYWORLD_VAE_DDCONFIG), "embed_dim": LATENT_CHANNELS}}
    expected = set(AutoencoderKL(ddconfig=dict(TOYWORLD_VAE_DDCONFIG), embed_dim=LATENT_CHANNELS).state_dict())
    if set(sd) != expected:
        raise RuntimeError(f"toy-world vae load mismatch: missing={sorted(expected - set(sd))[:5]} "
                           f"unexpected={sorted(set(sd) - expected)[:5]}")
    return comfy.sd.VAE(sd=sd, device=torch.device("cpu"), config=config, dtype=torch.float32)


_toyworld_cache: dict[str, tuple] = {}


def toyworld_checkpoint(folder=None):
    """``(MODEL, CLIP, VAE)`` of the toy-world checkpoint (tests/toyworld/README.md): the tiny SD1.5-layout models
    of this module with the committed trained weights of ``tests/toyworld/weights``. Cached like
    ``tiny_checkpoint``; every call returns clones (and a fresh VAE). Raises ``FileNotFoundError`` when the
    weights are missing (a failure, never a skip)."""
    key = str(_pathlib.Path(folder or TOYWORLD_WEIGHTS).resolve())
    return _checkpoint_clones(_toyworld_cache, key, lambda: (make_toyworld_model(folder), make_toyworld_clip(folder)),
                              lambda: make_toyworld_vae(folder))


# ----------------------------------------------------------------------------
# SDXL layout (issue 24)
# ----------------------------------------------------------------------------

# Text encoders: ComfyUI's SDXLClipModel concatenates CLIP-L's penultimate hidden state with CLIP-bigG's
# penultimate hidden state (context width L + G) and returns CLIP-G's projected pooled output. ComfyUI's
# comfy.clip_model.CLIPTextModel projects to ``hidden_size`` (it ignores ``projection_dim``), so the pooled width
# is always CLIP-G's hidden width, as in the real model (1280).
SDXL_CLIP_L_WIDTH = 32
SDXL_CLIP_G_WIDTH = 64
SDXL_CONTEXT_DIM = SDXL_CLIP_L_WIDTH + SDXL_CLIP_G_WIDTH            # real SDXL: 768 + 1280 = 2048
SDXL_POOLED_DIM = SDXL_CLIP_G_WIDTH                                 # real SDXL: 1280
# model_base.SDXL.encode_adm: [pooled CLIP-G, Timestep(256) of height, width, crop_h, crop_w, target_height,
# target_width] -> pooled + 6 * 256 (real SDXL: 1280 + 1536 = 2816)
SDXL_ADM_CHANNELS = SDXL_POOLED_DIM + 6 * 256
# Channels per attention head (real SDXL: 64 -> 10 heads at 640 channels, 20 at 1280). 16 keeps several heads
# per layer at tiny widths: 4 heads at 64 channels, 8 at 128 (the 1 : 2 ratio of the real model).
SDXL_HEAD_CHANNELS = 16

# Where SDXL's transformers sit, as ComfyUI names them: ((block, block_id), depth) with block_id the index in
# input_blocks / output_blocks (the middle block is ("middle", 0)); 2 * 2 + 2 * 10 + 10 + 3 * 2 + 3 * 10 = 70
# transformer blocks (attention patches see block_index 0 .. depth - 1 at each site).
SDXL_TRANSFORMER_SITES = (
    (("input", 4), 2), (("input", 5), 2), (("input", 7), 10), (("input", 8), 10),
    (("middle", 0), 10),
    (("output", 0), 10), (("output", 1), 10), (("output", 2), 10),
    (("output", 3), 2), (("output", 4), 2), (("output", 5), 2),
)

# diffusers UNet2DConditionModel kwargs: diffusers' SDXL config (stabilityai/stable-diffusion-xl-base-1.0,
# unet/config.json) at tiny widths. ``attention_head_dim`` is (the historical diffusers quirk) the number of
# heads per level: 32/2, 64/4, 128/8 -> 16 channels each (real: 5, 10, 20 -> 64). ``transformer_layers_per_block``
# (1, 2, 10) as in the real config: the first level's value is ignored (DownBlock2D / UpBlock2D have no
# attention); the middle block takes the last value (10), the up blocks the reversed list.
TINY_SDXL_UNET_CONFIG = {
    "sample_size": 8,
    "in_channels": LATENT_CHANNELS,
    "out_channels": LATENT_CHANNELS,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (32, 64, 128),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": SDXL_CONTEXT_DIM,
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (2, 4, 8),
    "use_linear_projection": True,
    "upcast_attention": False,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": SDXL_ADM_CHANNELS,
}

# The matching ComfyUI unet_config: the keys and values model_detection gives for SDXL
# (unet_config_from_diffusers_unet's ``SDXL``), with tiny widths (model_channels, context_dim, adm_in_channels,
# num_head_channels). supported_models.SDXL's constructor resets num_heads / num_head_channels to its
# unet_extra_config (-1 / 64); make_comfy_sdxl_model sets SDXL_HEAD_CHANNELS back after construction.
TINY_SDXL_COMFY_UNET_CONFIG = {
    "use_checkpoint": False,
    "image_size": 32,
    "out_channels": LATENT_CHANNELS,
    "use_spatial_transformer": True,
    "legacy": False,
    "num_classes": "sequential",
    "adm_in_channels": SDXL_ADM_CHANNELS,
    "in_channels": LATENT_CHANNELS,
    "model_channels": 32,
    "num_res_blocks": [2, 2, 2],
    "transformer_depth": [0, 0, 2, 2, 10, 10],
    "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10,
    "use_linear_in_transformer": True,
    "context_dim": SDXL_CONTEXT_DIM,
    "num_heads": -1,
    "num_head_channels": SDXL_HEAD_CHANNELS,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}

# Overrides of comfy/sd1_clip_config.json (CLIP-L, read by SDClipModel as model_options["clip_l_model_config"])
# and of comfy/clip_config_bigg.json (CLIP-bigG, model_options["clip_g_model_config"]). Three layers each:
# SDXL reads the penultimate hidden state (layer_idx -2, and SDClipModel asserts abs(layer_idx) < num_layers, so
# two layers are refused); CLIP-G's last layer feeds only its pooled output, CLIP-L's last layer nothing.
TINY_SDXL_CLIP_L_CONFIG = {
    "hidden_size": SDXL_CLIP_L_WIDTH,
    "intermediate_size": 2 * SDXL_CLIP_L_WIDTH,
    "num_attention_heads": 2,
    "num_hidden_layers": 3,
    "projection_dim": SDXL_CLIP_L_WIDTH,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
}
TINY_SDXL_CLIP_G_CONFIG = {
    "hidden_size": SDXL_CLIP_G_WIDTH,
    "intermediate_size": 2 * SDXL_CLIP_G_WIDTH,
    "num_attention_heads": 4,
    "num_hidden_layers": 3,
    "projection_dim": SDXL_POOLED_DIM,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
}


def make_diffusers_sdxl_unet(seed: int = 0):
    """A tiny SDXL-layout diffusers ``UNet2DConditionModel`` (float32, CPU, eval mode); call it with
    ``added_cond_kwargs={"text_embeds": pooled (B, SDXL_POOLED_DIM), "time_ids": (B, 6)}`` (time ids: original
    height, width, crop top, crop left, target height, target width, as ComfyUI's encode_adm orders them)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**TINY_SDXL_UNET_CONFIG)
    init_weights_(unet, _generator(seed, "sdxl_unet"))
    unet.eval()
    unet.requires_grad_(False)
    return unet


_sdxl_unet_sd_cache: dict[int, dict[str, torch.Tensor]] = {}


def _diffusers_sdxl_unet_state_dict(seed: int) -> dict[str, torch.Tensor]:
    return _cached(_sdxl_unet_sd_cache, seed, lambda: _weights_of(make_diffusers_sdxl_unet(seed)))


def comfy_sdxl_unet_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """The weights of ``make_diffusers_sdxl_unet(seed)`` under ComfyUI (ldm) keys, converted with ComfyUI's own
    ``comfy.utils.unet_to_diffusers`` mapping (``add_embedding.*`` -> ``label_emb.0.*``)."""
    return _ldm_state_dict(_diffusers_sdxl_unet_state_dict(seed), TINY_SDXL_COMFY_UNET_CONFIG)


def make_comfy_sdxl_model(seed: int = 0):
    """A ComfyUI MODEL (``ModelPatcher`` of ``model_base.SDXL``) with exactly the weights of
    ``make_diffusers_sdxl_unet(seed)``.

    Built through ``comfy.supported_models.SDXL`` (eps prediction, SD's scaled-linear schedule,
    ``latent_formats.SDXL``) with the tiny ``unet_config``; load and offload device are the CPU. The
    conditioning needs ``pooled_output`` (CLIPTextEncode on an SDXL CLIP gives it); ``width`` / ``height`` default
    to the latent's size times 8 in the sampler, crops to 0, targets to width / height.
    """
    _require_comfy()
    import comfy.supported_models

    model_config = comfy.supported_models.SDXL(TINY_SDXL_COMFY_UNET_CONFIG)
    # BASE.__init__ overwrote the head layout with SDXL's unet_extra_config (64-channel heads: 0 heads at 32)
    model_config.unet_config["num_heads"] = TINY_SDXL_COMFY_UNET_CONFIG["num_heads"]
    model_config.unet_config["num_head_channels"] = TINY_SDXL_COMFY_UNET_CONFIG["num_head_channels"]
    return _comfy_patcher(model_config, comfy_sdxl_unet_state_dict(seed), "tiny sdxl unet")


def make_comfy_sdxl_clip(seed: int = 0):
    """Tiny SDXL text encoders as ``comfy.sd.CLIP``: ComfyUI's ``SDXLTokenizer`` (the shipped CLIP tokenizer for
    both, CLIP-G padding with 0) and ``SDXLClipModel`` with ``TINY_SDXL_CLIP_L_CONFIG`` / ``TINY_SDXL_CLIP_G_CONFIG``.

    ``encode_from_tokens`` gives a context of ``(1, 77 * chunks, SDXL_CONTEXT_DIM)`` and a pooled output of
    ``(1, SDXL_POOLED_DIM)``.
    """
    _require_comfy()
    import comfy.sdxl_clip

    return _comfy_clip(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel,
                       {"clip_l_model_config": TINY_SDXL_CLIP_L_CONFIG, "clip_g_model_config": TINY_SDXL_CLIP_G_CONFIG},
                       _generator(seed, "sdxl_clip"))


def make_comfy_sdxl_vae(seed: int = 0):
    """The VAE of ``tiny_sdxl_checkpoint``: ``make_comfy_vae(seed)`` itself. SDXL's VAE has the SD-VAE layout
    (4 latent channels, downscale 8); its different scale (0.13025 instead of 0.18215) is applied by the MODEL's
    ``latent_formats.SDXL`` when sampling (process_in / process_out), never by ``comfy.sd.VAE``."""
    return make_comfy_vae(seed)


_sdxl_ckpt_cache: dict[int, tuple] = {}


def tiny_sdxl_checkpoint(seed: int = 0):
    """``(MODEL, CLIP, VAE)`` of the tiny SDXL-layout checkpoint, like CheckpointLoaderSimple returns for SDXL.

    As ``tiny_checkpoint``: the UNet and text encoders are built once per seed and cached, every call returns
    clones (``ModelPatcher.clone()`` / ``CLIP.clone()``) and a fresh VAE.
    """
    return _checkpoint_clones(_sdxl_ckpt_cache, seed, lambda: (make_comfy_sdxl_model(seed), make_comfy_sdxl_clip(seed)),
                              lambda: make_comfy_sdxl_vae(seed))
