"""The editing nodes called directly with test settings (tiny model, CFG 5), shared by the host tests."""
from __future__ import annotations

from .comfy_host import encode

ATTENTION_CONTROLLER_SETTINGS = dict(
    source_prompt="a cat riding a bicycle", target_prompt="a cat riding a red bicycle", negative_prompt="", cfg=5.0)
# test values of an edit's own settings (the rest keep the node's defaults): MasaCtrl early enough for few steps
EDIT_SETTINGS = {"masactrl": dict(start_step=1, layers="5-15")}


def edit_settings(edit: str, **overrides) -> dict:
    """The value of the Attention Controller's `edit` input: the option's defaults, the test values, overrides."""
    from editkit.nodes.attention_control import AttentionControllerNode
    schema = AttentionControllerNode.define_schema()
    combo = next(i for i in schema.inputs if i.id == "edit")
    option = next(o for o in combo.options if o.key == edit)
    values = {i.id: i.default for i in option.inputs if getattr(i, "default", None) is not None}
    values.update(EDIT_SETTINGS.get(edit, {}))
    unknown = set(overrides) - {i.id for i in option.inputs}
    if unknown:
        raise KeyError(f"not settings of the '{edit}' edit: {sorted(unknown)}")
    values.update(overrides)
    return {"edit": edit, **values}

FEATURE_INJECTOR_SETTINGS = dict(feature_layers="4", feature_until=0.8, attention_layers="4-11",
                                 attention_until=0.5, strength=1.0, cfg=5.0)


def attention_controller(model, clip, edit: str = "refine", **overrides):
    """The Attention Controller's GUIDER for these settings: overrides of its own inputs by name, anything
    else a setting of the chosen edit."""
    from editkit.nodes.attention_control import AttentionControllerNode
    top = {k: v for k, v in overrides.items() if k in ATTENTION_CONTROLLER_SETTINGS or k in ("inversion", "more_targets", "fusion")}
    own = {k: v for k, v in overrides.items() if k not in top}
    return AttentionControllerNode.execute(model=model, clip=clip, edit=edit_settings(edit, **own),
                                           **{**ATTENTION_CONTROLLER_SETTINGS, **top}).result[0]


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
