"""Node: Keyframe Attention, cross-frame self-attention over the latents of a batch (core/keyframe.py).

MODEL -> MODEL: the batch's latents are frames (of a video, or images that should share a look); any sampler
node samples them. The controller is one more attention controller of the pack (nodes/comfy_attention.py), so it
composes with the Attention Controller, the Feature Injector and the Latent Fuser on the same model.
"""
from __future__ import annotations

from comfy_api.latest import io

from ..core.attention import SELF, parse_layers
from ..core.keyframe import MODES, KeyframeAttention
from .comfy_attention import attach_controller, attention_sites

CATEGORY = "EditKit/video"
METHOD_OF_MODE = {"first": "Text2Video-Zero", "first_and_previous": "Pix2Video", "middle": "FateZero",
                  "all": "shared attention", "indices": "your keyframes"}


def _indices(text: str) -> tuple[int, ...]:
    values = []
    for part in text.replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            values.append(int(part))
        except ValueError:
            raise ValueError(f"indices: cannot read '{part}'; write frame numbers from 0, e.g. '0, 8'") from None
    return tuple(values)


def _layers(model, text: str, mode: str) -> tuple[int, ...] | None:
    """The chosen self-attention layers, or None for all; '' is the method's own choice: Pix2Video's decoder
    layers, every layer for the others."""
    sites = [s for s in attention_sites(model) if s.kind == SELF]
    count = max(s.layer for s in sites) + 1
    if not text.strip():
        return tuple(s.layer for s in sites if s.block == "output") if mode == "first_and_previous" else None
    layers = parse_layers(text, "layers")
    if not layers:
        raise ValueError(f"layers: give at least one transformer layer (this model has 0 to {count - 1}), or leave "
                         f"it empty for the method's layers")
    if layers[-1] >= count:
        raise ValueError(f"layers: {layers[-1]} is beyond this model's {count} transformer layers "
                         f"(valid: 0 to {count - 1})")
    return layers


class KeyframeAttentionNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitKeyframeAttention",
            display_name="Keyframe Attention (cross-frame)",
            category=CATEGORY,
            description="Makes the latents of a batch share their look: each frame's self-attention reads the keys "
                        "and values of keyframes (Text2Video-Zero: the first frame; Pix2Video: the first and the "
                        "previous; FateZero: the middle one; or every frame of the batch). Connect the MODEL to "
                        "any sampler and sample a batch.",
            inputs=[
                io.Model.Input("model", tooltip="SD 1.x / 2.x model. It is cloned; the input is not changed."),
                io.DynamicCombo.Input("mode", tooltip="Which frames each frame reads its keys and values from.",
                                      options=[
                    io.DynamicCombo.Option("first", []),
                    io.DynamicCombo.Option("first_and_previous", []),
                    io.DynamicCombo.Option("middle", []),
                    io.DynamicCombo.Option("all", []),
                    io.DynamicCombo.Option("indices", [
                        io.String.Input("indices", default="0",
                                        tooltip="Keyframes, frame numbers from 0 in the batch: '0' or '0, 8'."),
                    ]),
                ]),
                io.String.Input("layers", default="",
                                tooltip="Self-attention layers (transformer layers in UNet order, SD1.5: 0-15) as "
                                        "'4-11' or '10, 12'. Empty: the method's own (Pix2Video: the decoder's; the "
                                        "others: every layer)."),
                io.Float.Input("start_at", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the steps before keyframe attention starts."),
                io.Float.Input("end_at", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the steps after which each frame attends to itself again."),
            ],
            outputs=[io.Model.Output(tooltip="The model whose batch shares attention: connect it to the sampler.")],
        )

    @classmethod
    def execute(cls, model, mode, layers, start_at, end_at) -> io.NodeOutput:
        name = mode.get("mode") if isinstance(mode, dict) else mode
        if name not in MODES:
            raise ValueError(f"mode: '{name}' is not one of {', '.join(MODES)}")
        if start_at >= end_at:
            raise ValueError(f"start_at: {start_at} must be smaller than end_at ({end_at})")
        indices = _indices(mode.get("indices", "")) if name == "indices" else ()
        if name == "indices" and not indices:
            raise ValueError("indices: name at least one keyframe (frame numbers from 0, e.g. '0' or '0, 8')")
        controller = KeyframeAttention(mode=name, indices=indices, layers=_layers(model, layers, name),
                                       start=start_at, end=end_at)
        return io.NodeOutput(attach_controller(model, controller))


NODES = [KeyframeAttentionNode]
