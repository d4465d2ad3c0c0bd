"""Nodes: capture cross-attention maps during sampling, and turn them into a MASK and a heat-map IMAGE."""
from __future__ import annotations

import logging

import comfy.patcher_extension
import torch
from comfy_api.latest import io

from ..core.capture import AttentionMapCapture, heatmap_grid, normalise_per_map, resize_maps, word_maps
from ..core.tokens import UnknownWordError, split_words
from .comfy_attention import attach_controller
from .comfy_tokens import prompt_word_positions

CATEGORY = "EditKit/attention"
LATENT_TO_IMAGE = 8   # VAE downscale factor of every UNet family the attention control supports

AttentionMaps = io.Custom("EDITKIT_ATTENTION_MAPS")
PROMPTS_KEY = "editkit_capture_prompts"


class _RecordPrompts:
    """OUTER_SAMPLE wrapper: keeps the positive prompt encodings a captured run samples with, so the mask node
    can tell whether it reads the maps at the right words."""

    def __init__(self, store):
        self.store = store

    def __call__(self, executor, *args, **kwargs):
        positive = (getattr(executor.class_obj, "conds", None) or {}).get("positive") or []
        contexts = [c.get("cross_attn") for c in positive if torch.is_tensor(c.get("cross_attn"))]
        self.store.contexts = contexts[0].detach().float().cpu() if len(contexts) == 1 else None
        return executor(*args, **kwargs)

    def __deepcopy__(self, memo):
        return self


class CaptureAttentionMaps(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitCaptureAttentionMaps",
            display_name="Capture Attention Maps",
            category=CATEGORY,
            description="Records where each prompt token lands: cross-attention maps averaged over heads, layers "
                        "and steps of any sampler that uses the returned model. Feed the maps and the sampler's "
                        "LATENT to 'Attention Maps to Mask'.",
            inputs=[
                io.Model.Input("model", tooltip="The model to sample with. It is cloned; the input is not changed."),
                io.Int.Input("max_resolution", default=32, min=1, max=256,
                             tooltip="Only layers whose feature map is at most this many tokens on a side are "
                                     "recorded (32: the 32x32, 16x16 and 8x8 layers of SD1.5 at 512 px). Larger "
                                     "values cost more memory and time."),
                io.Float.Input("start_at", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the sampling steps after which recording starts."),
                io.Float.Input("end_at", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the sampling steps after which recording stops."),
            ],
            outputs=[
                io.Model.Output(tooltip="The model with capture attached: connect it to the sampler."),
                AttentionMaps.Output(display_name="attention_maps",
                                     tooltip="Filled when the sampler using the model has run."),
            ],
        )

    @classmethod
    def execute(cls, model, max_resolution, start_at, end_at) -> io.NodeOutput:
        if start_at >= end_at:
            raise ValueError(f"start_at: {start_at} must be smaller than end_at ({end_at}); the maps are recorded "
                             f"from start_at to end_at of the steps")
        capture = AttentionMapCapture(max_tokens=max_resolution * max_resolution, start=start_at, end=end_at)
        patched = attach_controller(model, capture)
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, PROMPTS_KEY,
                                     _RecordPrompts(capture.store))
        return io.NodeOutput(patched, capture)


class AttentionMapsToMask(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitAttentionMapsToMask",
            display_name="Attention Maps to Mask",
            category=CATEGORY,
            description="A MASK of the chosen words (normalised to 1 at their peak) and an IMAGE grid of heat maps, "
                        "one column per word and one row per image in the batch.",
            inputs=[
                AttentionMaps.Input("attention_maps", tooltip="From 'Capture Attention Maps'."),
                io.Latent.Input("samples", tooltip="The LATENT from the sampler that used the captured model: it "
                                                   "makes this node run after sampling and sets the mask size."),
                io.Clip.Input("clip", tooltip="The text encoder used for the prompt (its tokenizer finds the words)."),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="The positive prompt the sampler used, exactly as typed."),
                io.String.Input("words", default="",
                                tooltip="Comma-separated words of the prompt to show; several words are combined "
                                        "into one mask by their maximum."),
                io.Float.Input("threshold", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="0 gives a soft mask; above 0 the mask is 1 where the normalised map "
                                       "exceeds it and 0 elsewhere."),
                io.Image.Input("images", optional=True,
                               tooltip="Decoded images to draw the heat maps over (same batch as the latent)."),
            ],
            outputs=[
                io.Mask.Output(tooltip="One mask per image of the batch, at image resolution."),
                io.Image.Output(display_name="heatmaps", tooltip="Heat maps of each word, over the images if given."),
            ],
        )

    @classmethod
    def execute(cls, attention_maps, samples, clip, prompt, words, threshold, images=None) -> io.NodeOutput:
        store = attention_maps.store
        if store.maps is None and store.runs > 0:
            raise ValueError("attention_maps: the sampler ran, but none of its steps fell between the capture's "
                             "start_at and end_at; widen that window on 'Capture Attention Maps'")
        if store.maps is None:
            raise ValueError("attention_maps: nothing was captured yet. Connect the MODEL output of 'Capture "
                             "Attention Maps' to the sampler, and that sampler's LATENT output to 'samples'.")
        chosen = split_words(words)
        if not chosen:
            raise ValueError("words: give at least one word of the prompt (comma-separated)")
        try:
            tokens, positions = prompt_word_positions(clip, prompt, chosen)
        except UnknownWordError as e:
            raise ValueError(str(e)) from None
        _check_sampled_prompt(store, clip, prompt)
        maps = attention_maps.store.maps
        latent = samples["samples"]
        if maps.shape[0] != latent.shape[0]:
            raise ValueError(f"samples: the captured run had {maps.shape[0]} image(s) but this LATENT has "
                             f"{latent.shape[0]}; connect the LATENT of the sampler that used the captured model")
        per_word = normalise_per_map(word_maps(maps, positions, tokens.context_length))   # (items, words, h, w)
        if images is not None:
            size = (images.shape[1], images.shape[2])
            if images.shape[0] != maps.shape[0]:
                raise ValueError(f"images: {images.shape[0]} image(s) given for {maps.shape[0]} captured latent(s)")
        else:
            size = (latent.shape[-2] * LATENT_TO_IMAGE, latent.shape[-1] * LATENT_TO_IMAGE)
        mask = resize_maps(per_word.amax(dim=1), size).clamp(0, 1)
        if threshold > 0:
            mask = (mask > threshold).to(torch.float32)
        grid = heatmap_grid(per_word, size, images)
        return io.NodeOutput(mask, grid)


def _check_sampled_prompt(store, clip, prompt: str) -> None:
    """The words are looked up in `prompt`: it must be the prompt the captured run sampled (of at least one of
    its images; the others get a warning, as their maps are read at this prompt's word positions)."""
    if store.contexts is None:
        return
    encoded = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))[0][0].float().cpu()[0]
    sampled = store.contexts
    same = [c.shape == encoded.shape and torch.allclose(c, encoded, rtol=1e-3, atol=1e-3) for c in sampled]
    if not any(same):
        raise ValueError("prompt: it is not the prompt the sampler used, so its words would point at the wrong "
                         "tokens; type the sampler's positive prompt exactly")
    if not all(same):
        logging.warning("EditKit Attention Maps to Mask: image(s) %s of the batch were sampled with another prompt; "
                        "their maps are read at this prompt's word positions",
                        ", ".join(str(i) for i, ok in enumerate(same) if not ok))


NODES = [CaptureAttentionMaps, AttentionMapsToMask]
