"""Node: Plug-and-Play translation of an inverted photo (Tumanyan et al. 2023).

The node patches the model with the injection controller (core/plug_and_play.py) and returns a GUIDER that
samples the photo's source branch (its inversion) next to the translation in one batch
(nodes/pair_guider.py); the patched MODEL is returned too, so an AttentionController can add its edits on
top of the injection.
"""
from __future__ import annotations

from comfy_api.latest import io

from ..core.attention import parse_layers
from ..core.plug_and_play import DECODER, PlugAndPlay
from .comfy_attention import attach_controller, feature_sites, transformer_blocks
from .host_helpers import check_context_width, conditioning_context, require_sd_unet
from .inversion import InversionType
from .pair_guider import PairCFGGuider

CATEGORY = "EditKit/features"


def _spans(layers) -> str:
    """(3, 4, 5, 7) -> '3-5, 7'"""
    out, layers = [], sorted(layers)
    start = prev = None
    for n in layers + [None]:
        if start is not None and (n is None or n != prev + 1):
            out.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = None
        if n is not None and start is None:
            start = n
        prev = n
    return ", ".join(out) or "none"


def _checked_layers(text: str, input_name: str, available: list[int], what: str) -> frozenset[int]:
    layers = parse_layers(text, input_name)
    missing = [n for n in layers if n not in available]
    if missing:
        raise ValueError(f"{input_name}: decoder layer {missing[0]} has no {what} in this model; decoder layers "
                         f"with {what}: {_spans(available)}")
    return frozenset(layers)


class FeatureInjectorNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitFeatureInjector",
            display_name="Feature Injector (Plug-and-Play)",
            category=CATEGORY,
            description="Translates a photo with a new prompt while keeping its structure: the photo's own "
                        "diffusion features (residual features and self-attention of the decoder) are injected "
                        "into the translation at every step (Plug-and-Play, Tumanyan et al. 2023). Connect the "
                        "GUIDER to SamplerCustomAdvanced with the inversion's noised latent, its SIGMAS, "
                        "DisableNoise and a deterministic sampler (ddim, euler): the output holds the photo "
                        "(first) and the translation (second).",
            inputs=[
                io.Model.Input("model", tooltip="SD 1.x / 2.x model (LoRA allowed). It is cloned; the input is "
                                                "not changed."),
                InversionType.Input("inversion", tooltip="From 'Invert Image' (the paper inverts with an empty "
                                                         "prompt; 'direct' mode is exact and cheap). The photo's "
                                                         "features come from its inversion evaluated with the "
                                                         "negative it was inverted with (keep that empty, as the "
                                                         "paper's code)."),
                io.Conditioning.Input("positive", tooltip="The translation's prompt, e.g. 'a photo of a marble "
                                                          "sculpture'. A ControlNet applied to it also applies."),
                io.Conditioning.Input("negative", tooltip="The translation's negative prompt (paper: 'ugly, "
                                                          "blurry, black, low res, unrealistic')."),
                io.String.Input("feature_layers", default="4",
                                tooltip="Decoder layers (output blocks) whose residual features are injected "
                                        "(paper: 4). Indices and ranges, e.g. '4' or '4-5'; empty: none."),
                io.Float.Input("feature_until", default=0.8, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the steps, from the first, with feature injection (paper: 0.8)."),
                io.String.Input("attention_layers", default="4-11",
                                tooltip="Decoder layers whose self-attention queries and keys are injected "
                                        "(paper: 4-11). Empty: none."),
                io.Float.Input("attention_until", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the steps with self-attention injection (paper: 0.5); "
                                       "lower gives the prompt more freedom over shapes."),
                io.Float.Input("strength", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="1: the translation takes the photo's features; less: a mix; 0: off."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=30.0, step=0.1,
                               tooltip="Guidance scale of the translation (paper: 7.5)."),
            ],
            outputs=[io.Guider.Output(tooltip="Samples the photo's inversion (first) and the translation together: "
                                              "connect it to SamplerCustomAdvanced with the inversion's noised "
                                              "latent, SIGMAS and DisableNoise."),
                     io.Model.Output(display_name="model",
                                                          tooltip="The patched model, to add an Attention "
                                                                  "Controller's edits on top of the injection.")],
        )

    @classmethod
    def execute(cls, model, inversion, positive, negative, feature_layers, feature_until, attention_layers,
                attention_until, strength, cfg) -> io.NodeOutput:
        inner = require_sd_unet(model)
        if inversion.negative_context is None:
            raise ValueError("inversion: it carries no unconditional encoding; invert the photo with 'Invert Image'")
        for conditioning, name in ((positive, "positive"), (negative, "negative")):
            if isinstance(conditioning, list) and len(conditioning) > 1:
                raise ValueError(f"{name}: the translation takes one prompt encoding, got {len(conditioning)} "
                                 f"(from Conditioning Combine or area nodes); connect a single text encoding")
        target = conditioning_context(positive, "positive")
        target_negative = conditioning_context(negative, "negative")
        for context, name in ((target, "positive"), (target_negative, "negative")):
            check_context_width(inner, context, name)
        with_features = sorted(s.block_id for s in feature_sites(model) if s.block == DECODER)
        with_attention = sorted({block_id for block, block_id, _ in transformer_blocks(model) if block == DECODER})
        controller = PlugAndPlay(
            feature_layers=_checked_layers(feature_layers, "feature_layers", with_features, "residual block"),
            feature_until=feature_until,
            attention_layers=_checked_layers(attention_layers, "attention_layers", with_attention, "self-attention"),
            attention_until=attention_until, strength=strength)
        patched = attach_controller(model, controller)
        # pnp-diffusers evaluates the photo's row with the empty prompt whatever it inverted with: here the
        # unconditional encoding of the inversion (the empty prompt of the shipped workflows)
        guider = PairCFGGuider(patched, [inversion.negative_context, target], None, cfg, inversion=inversion,
                               target_negative=target_negative, positive_options=positive[0][1],
                               negative_options=negative[0][1], pin_source=True)
        return io.NodeOutput(guider, patched)


NODES = [FeatureInjectorNode]
