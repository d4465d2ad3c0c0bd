"""Node: Consistent Subject (ConsiStory), one subject shared across a batch of prompts (core/consistory.py).

MODEL + CLIP + prompts -> MODEL, the batch's positive CONDITIONING (one prompt per image) and its batch size: wire
them into a KSampler (or any sampler node) with an Empty Latent Image of that batch size. The controller is one
more attention controller of the pack (nodes/comfy_attention.py): it composes with the others on one model.
"""
from __future__ import annotations

import math

import comfy.patcher_extension
import torch
from comfy_api.latest import io

from ..core.consistory import ConsistentSubject
from ..core.prompt2prompt import PromptKeys
from ..core.tokens import split_words
from .attention_control import EncodedPrompt
from .comfy_attention import attach_controller, chosen_self_layers, controllers_of

CATEGORY = "EditKit/consistency"
CHECK_KEY = "editkit_consistent_subject"


def _prompt_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def _batched_conditioning(prompts: list[EncodedPrompt]) -> tuple[list, int]:
    """One CONDITIONING holding every prompt (batch row i: prompt i), and its context length. Prompts of other
    lengths (over 77 tokens) are repeated to a common length, which leaves cross-attention unchanged (a key seen
    k times keeps its share of the softmax)."""
    lengths = [p.context.shape[1] for p in prompts]
    length = math.lcm(*lengths)
    rows = [p.context.repeat(1, length // p.context.shape[1], 1) for p in prompts]
    extras = {}
    pooled = [p.extras.get("pooled_output") for p in prompts]
    if all(torch.is_tensor(x) for x in pooled):
        extras["pooled_output"] = torch.cat(pooled)
    return [[torch.cat(rows), extras]], length


class _CheckBatch:
    """OUTER_SAMPLE wrapper: the sampled latent has one image per prompt and the positive prompt is this node's."""

    def __init__(self, context: torch.Tensor):
        self.context = context.detach().float().cpu()

    def __call__(self, executor, *args, **kwargs):
        latent = args[1] if len(args) > 1 else kwargs.get("latent_image")
        images = self.context.shape[0]
        if latent is not None and latent.shape[0] != images:
            raise ValueError(f"batch_size: the latent holds {latent.shape[0]} images but Consistent Subject has "
                             f"{images} prompts; set the Empty Latent Image's batch_size to {images} (the node's "
                             f"batch_size output)")
        positive = (getattr(executor.class_obj, "conds", None) or {}).get("positive") or []
        contexts = [c.get("cross_attn") for c in positive if torch.is_tensor(c.get("cross_attn"))]
        if not any(c.shape == self.context.shape and torch.allclose(c.detach().float().cpu(), self.context,
                                                                    rtol=1e-2, atol=1e-2) for c in contexts):
            raise ValueError("positive: the sampler's positive prompt is not the CONDITIONING of Consistent Subject; "
                             "connect that node's positive output to the sampler (its subject masks follow those "
                             "prompts' words)")
        return executor(*args, **kwargs)

    def __deepcopy__(self, memo):
        return self


class ConsistentSubjectNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitConsistentSubject",
            display_name="Consistent Subject (ConsiStory)",
            category=CATEGORY,
            description="The same subject in every image of a batch of prompts (Tewel et al. 2024, training-free): "
                        "each image's self-attention also reads the other images' keys and values inside their "
                        "subject masks (from the subject words' cross-attention, Otsu-thresholded, refreshed every "
                        "step). Connect MODEL and positive to a KSampler and batch_size to its Empty Latent Image.",
            inputs=[
                io.Model.Input("model", tooltip="SD 1.x / 2.x model. It is cloned; the input is not changed."),
                io.Clip.Input("clip", tooltip="The text encoder of the same checkpoint (it encodes the prompts and "
                                              "finds the subject words)."),
                io.String.Input("prompts", multiline=True,
                                default="a watercolor of a fox reading a book\na fox in the snow\na fox on a boat",
                                tooltip="One prompt per line, one image per prompt; every prompt names the subject."),
                io.String.Input("subject", default="fox",
                                tooltip="The subject's word(s), comma-separated (e.g. 'fox' or 'teddy, bear'); each "
                                        "must be in every prompt."),
                io.Float.Input("dropout", default=0.5, min=0.0, max=0.95, step=0.05,
                               tooltip="Share of the other images' subject tokens left out, drawn anew every step "
                                       "(paper: 0.5). Higher keeps layouts more varied, lower the subject more alike."),
                io.Float.Input("share_weight", default=1.0, min=0.0, max=4.0, step=0.05,
                               tooltip="Weight of the attention to the other images' subjects (1: the paper's; 0: "
                                       "plain sampling)."),
                io.Int.Input("anchors", default=0, min=0, max=64,
                             tooltip="0: every image reads every other image's subject. N: all read the subjects of "
                                     "the first N images only (the official scripts use 2)."),
                io.String.Input("layers", default="",
                                tooltip="Self-attention layers that share (transformer layers in UNet order, SD1.5: "
                                        "0-15), e.g. '7-15'. Empty: the decoder's (the paper's 'up' layers)."),
                io.Float.Input("start_at", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the steps before sharing starts (the first step always runs "
                                       "plain: its masks come from it)."),
                io.Float.Input("end_at", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the steps after which each image attends to itself only."),
                io.Int.Input("seed", default=0, min=0, max=2 ** 31 - 1,
                             tooltip="Seed of the dropout: the same seed gives the same images."),
            ],
            outputs=[
                io.Model.Output(tooltip="The model that shares the subject: connect it to the sampler."),
                io.Conditioning.Output(display_name="positive",
                                       tooltip="The prompts, one per image: the sampler's positive input."),
                io.Int.Output(display_name="batch_size",
                              tooltip="The number of prompts: the Empty Latent Image's batch_size."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, prompts, subject, dropout, share_weight, anchors, layers, start_at, end_at,
                seed) -> io.NodeOutput:
        if any(isinstance(c, ConsistentSubject) for c in controllers_of(model)):
            raise ValueError("model: it already shares a subject (a Consistent Subject node is before this one); "
                             "apply one per model, with all the prompts")
        lines = _prompt_lines(prompts)
        if not lines:
            raise ValueError("prompts: type one prompt per line, each naming the subject")
        if len(lines) == 1:
            raise ValueError("prompts: one prompt; the subject is shared across two or more images, one prompt per "
                             "line (one image alone samples the same without this node)")
        words = split_words(subject)
        if not words:
            raise ValueError("subject: name the subject's word(s), e.g. 'fox', as written in every prompt")
        if start_at >= end_at:
            raise ValueError(f"start_at: {start_at} must be smaller than end_at ({end_at})")
        if anchors > len(lines):
            raise ValueError(f"anchors: {anchors} is more than the {len(lines)} prompts (0: every image)")
        batch = [EncodedPrompt(clip, text, f"prompt {i + 1} ('{text}')") for i, text in enumerate(lines)]
        conditioning, length = _batched_conditioning(batch)
        keys = []
        for prompt in batch:
            found = prompt.positions(words, "subject")
            copies = length // prompt.tokens.context_length
            keys.append(tuple(PromptKeys(length, tuple(p + c * prompt.tokens.context_length for c in range(copies)
                                                       for p in positions)) for positions in found))
        controller = ConsistentSubject(keys=tuple(keys), layers=chosen_self_layers(model, layers, decoder=True), dropout=dropout, share_weight=share_weight,
                                       seed=seed, anchors=anchors, start=start_at, end=end_at)
        patched = attach_controller(model, controller)
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, CHECK_KEY,
                                     _CheckBatch(conditioning[0][0]))
        return io.NodeOutput(patched, conditioning, len(batch))


NODES = [ConsistentSubjectNode]
