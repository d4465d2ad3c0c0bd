"""The editing nodes called directly with test settings (tiny model, CFG 5), shared by the host tests."""
from __future__ import annotations

from .comfy_host import encode

ATTENTION_CONTROLLER_SETTINGS = dict(
    source_prompt="a cat riding a bicycle", target_prompt="a cat riding a red bicycle", negative_prompt="",
    edit="refine", cross_replace=0.8, self_replace=0.4, word_release="", reweight="", blend_words="",
    blend_threshold=0.3, blend_start=0.0, masactrl_start_step=1, masactrl_start_layer=5, masactrl_mask_word="",
    max_resolution=32, cfg=5.0)

FEATURE_INJECTOR_SETTINGS = dict(feature_layers="4", feature_until=0.8, attention_layers="4-11",
                                 attention_until=0.5, strength=1.0, cfg=5.0)


def attention_controller(model, clip, **overrides):
    """The Attention Controller's GUIDER for these settings (overrides by input name)."""
    from editkit.nodes.attention_control import AttentionControllerNode
    return AttentionControllerNode.execute(model=model, clip=clip,
                                           **{**ATTENTION_CONTROLLER_SETTINGS, **overrides}).result[0]


def feature_injector(model, clip, inversion, target: str, negative: str, **overrides):
    """(GUIDER, patched MODEL) of the Feature Injector translating `inversion` to the prompt `target`."""
    from editkit.nodes.feature_injection import FeatureInjectorNode
    return FeatureInjectorNode.execute(model=model, inversion=inversion, positive=encode(clip, target),
                                       negative=encode(clip, negative),
                                       **{**FEATURE_INJECTOR_SETTINGS, **overrides}).result


def invert(model, clip, photo: dict, mode: str, steps: int, prompt: str = "", inner_steps: int = 2):
    """NullTextInvert on a LATENT with an empty negative: (noised samples, INVERSION, SIGMAS)."""
    from editkit.nodes.inversion import NullTextInvert
    noised, inversion, sigmas = NullTextInvert.execute(model, encode(clip, prompt), encode(clip, ""), photo, mode,
                                                       steps, "ddim_uniform", 5.0, inner_steps, 0.01, 1e-5).result
    return noised["samples"], inversion, sigmas
