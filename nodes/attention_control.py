"""Node: Prompt-to-Prompt and MasaCtrl edits of a generated image or of an inverted photo.

The node patches the model with the edit's controllers (core/prompt2prompt.py) and returns a GUIDER that
samples the source and the target together (nodes/pair_guider.py); the sampler's LATENT holds both.
"""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..core.prompt2prompt import LocalBlend, MutualSelfAttention, PromptKeys, PromptToPrompt
from ..core.tokens import (AlignmentError, PromptTokens, UnknownWordError, find_word_positions, parse_word_values,
                           prompt_words, refinement_alignment, split_words, swap_alignment, word_positions)
from .comfy_attention import attach_controller, attention_sites
from .comfy_tokens import prompt_tokens, word_codec
from .inversion import InversionType, _check_context, _unet_model
from .pair_guider import PairCFGGuider

CATEGORY = "EditKit/attention"
EDITS = ("word_swap", "refine", "reweight", "masactrl")


class _Prompt:
    """A prompt as the model's CLIP tokenises and encodes it."""

    def __init__(self, clip, text: str, name: str):
        self.text, self.name = text, name
        self.tokens: PromptTokens = prompt_tokens(clip, text)
        self.encode_word, self.id_to_piece = word_codec(clip)
        self.context = clip.encode_from_tokens_scheduled(clip.tokenize(text))[0][0]

    def positions(self, words: list[str], input_name: str) -> list[list[int]]:
        try:
            return word_positions(self.tokens, words, self.encode_word, self.id_to_piece, input_name=input_name)
        except UnknownWordError as e:
            raise ValueError(f"{e} (in {self.name})") from None

    def find(self, word: str) -> list[int]:
        return find_word_positions(self.tokens, self.encode_word(word))

    def words(self) -> str:
        return ", ".join(prompt_words(self.tokens, self.id_to_piece)) or "(empty)"


def _per_target_key(target: _Prompt, text: str, input_name: str, default: float, low: float,
                    high: float) -> tuple[float, ...] | None:
    """One value per target key from 'word: value' pairs (`default` elsewhere); None when none is given."""
    pairs = parse_word_values(text, input_name, low, high)
    if not pairs:
        return None
    values = [default] * target.tokens.context_length
    for (word, value), positions in zip(pairs, target.positions([w for w, _ in pairs], input_name)):
        for p in positions:
            values[p] = value
    return tuple(values)


def _blend_keys(prompts: list[_Prompt], blend_words: str) -> tuple[PromptKeys, ...] | None:
    words = split_words(blend_words)
    if not words:
        return None
    found = [[] for _ in prompts]
    for word in words:
        hits = [p.find(word) for p in prompts]
        if not any(hits):
            raise ValueError(f"blend_words: '{word}' is in neither prompt. Source words: {prompts[0].words()}; "
                             f"target words: {prompts[1].words()}")
        for f, h in zip(found, hits):
            f.extend(h)
    return tuple(PromptKeys(p.tokens.context_length, tuple(sorted(set(f)))) for p, f in zip(prompts, found))


def _mask_keys(prompts: list[_Prompt], mask_word: str) -> tuple[PromptKeys, ...] | None:
    word = mask_word.strip()
    if not word:
        return None
    keys = []
    for p in prompts:
        positions = p.positions([word], "masactrl_mask_word")[0]
        keys.append(PromptKeys(p.tokens.context_length, tuple(positions)))
    return tuple(keys)


class AttentionControllerNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitAttentionController",
            display_name="Attention Controller (Prompt-to-Prompt / MasaCtrl)",
            category=CATEGORY,
            description="Edits an image by changing its prompt while keeping its layout: the target is sampled "
                        "next to the source and takes over the source's attention (Hertz et al. 2022; MasaCtrl, "
                        "Cao et al. 2023). Connect the GUIDER to SamplerCustomAdvanced with a one-image latent: "
                        "its output holds the source (first) and the edit (second). For a photo, connect an "
                        "INVERSION and sample its noised latent with its SIGMAS and DisableNoise.",
            inputs=[
                io.Model.Input("model", tooltip="SD 1.x / 2.x model. It is cloned; the input is not changed."),
                io.Clip.Input("clip", tooltip="The model's text encoder (encodes the prompts, aligns their words)."),
                io.String.Input("source_prompt", multiline=True, default="a cat riding a bicycle",
                                tooltip="What the source image shows (for a photo: the prompt it was inverted with)."),
                io.String.Input("target_prompt", multiline=True, default="a cat riding a red bicycle",
                                tooltip="The edited prompt."),
                io.String.Input("negative_prompt", multiline=True, default="",
                                tooltip="Negative prompt for generated images; with an inversion its own "
                                        "unconditional branch is used instead."),
                io.Combo.Input("edit", options=list(EDITS), default="refine",
                               tooltip="word_swap: same-length prompts, one word changed; refine: words added or "
                                       "changed, tokens aligned; reweight: scale chosen words' attention (use "
                                       "'reweight'); masactrl: change pose or action, keep the subject's look."),
                io.Float.Input("cross_replace", default=0.8, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the steps during which the target uses the source's "
                                       "cross-attention (paper: 0.8 for refinement, about 0.4 for a swapped word)."),
                io.Float.Input("self_replace", default=0.4, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the steps during which the target uses the source's "
                                       "self-attention (keeps the layout; lower allows bigger shape changes)."),
                io.String.Input("word_release", default="",
                                tooltip="Own cross_replace for some target words, e.g. 'dog: 0.4' releases the "
                                        "swapped word earlier so its shape can change."),
                io.String.Input("reweight", default="",
                                tooltip="Scale target words' attention during cross_replace, e.g. 'red: 2, "
                                        "snow: -1' (1 changes nothing; negative removes)."),
                io.String.Input("blend_words", default="",
                                tooltip="Local blend: words of either prompt (e.g. 'bicycle'); the edit is confined "
                                        "to where they appear, the rest stays equal to the source. Empty: off."),
                io.Float.Input("blend_threshold", default=0.3, min=0.0, max=1.0, step=0.01,
                               tooltip="Local blend: threshold on the normalised word maps (paper: 0.3)."),
                io.Float.Input("blend_start", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Local blend: fraction of steps before it starts (paper: 0.2 on photos)."),
                io.Int.Input("masactrl_start_step", default=4, min=0, max=10000,
                             tooltip="MasaCtrl: first step of mutual self-attention (paper: 4 of 50)."),
                io.Int.Input("masactrl_start_layer", default=10, min=0, max=1000,
                             tooltip="MasaCtrl: first transformer layer (paper: 10 of SD1.5's 16)."),
                io.String.Input("masactrl_mask_word", default="",
                                tooltip="MasaCtrl: a word of both prompts naming the subject; its attention mask "
                                        "keeps subject and background apart. Empty: no mask."),
                io.Int.Input("max_resolution", default=32, min=1, max=256,
                             tooltip="Cross-attention is edited at layers of at most this many tokens on a side "
                                     "(32: the 32x32 and smaller layers of SD1.5 at 512 px); larger layers keep "
                                     "the fast kernel."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=30.0, step=0.1, tooltip="Guidance scale."),
                InversionType.Input("inversion", optional=True,
                                    tooltip="From 'Invert Image': edit that photo (source = its inversion)."),
            ],
            outputs=[io.Guider.Output()],
        )

    @classmethod
    def execute(cls, model, clip, source_prompt, target_prompt, negative_prompt, edit, cross_replace, self_replace,
                word_release, reweight, blend_words, blend_threshold, blend_start, masactrl_start_step,
                masactrl_start_layer, masactrl_mask_word, max_resolution, cfg, inversion=None) -> io.NodeOutput:
        inner = _unet_model(model)
        if edit not in EDITS:
            raise ValueError(f"edit: '{edit}' is not one of {', '.join(EDITS)}")
        layers = max(s.layer for s in attention_sites(model)) + 1
        source = _Prompt(clip, source_prompt, "source_prompt")
        target = _Prompt(clip, target_prompt, "target_prompt")
        for p in (source, target):
            _check_context(inner, p.context, p.name)
        if inversion is not None and (source.context.shape != inversion.source_context.shape or not torch.allclose(
                source.context.float().cpu(), inversion.source_context.float(), rtol=1e-3, atol=1e-3)):
            raise ValueError("source_prompt: it differs from the prompt the photo was inverted with; type the "
                             "inversion's prompt as the source (the edit goes in target_prompt)")

        controllers = []
        if edit == "masactrl":
            if masactrl_start_layer >= layers:
                raise ValueError(f"masactrl_start_layer: {masactrl_start_layer} is beyond this model's {layers} "
                                 f"transformer layers (valid: 0 to {layers - 1})")
            controllers.append(MutualSelfAttention(start_step=masactrl_start_step, start_layer=masactrl_start_layer,
                                                   mask_keys=_mask_keys([source, target], masactrl_mask_word),
                                                   mask_max_tokens=max_resolution ** 2))
        else:
            if edit == "reweight" and not parse_word_values(reweight, "reweight"):
                raise ValueError("reweight: the reweight edit needs at least one 'word: factor', e.g. 'red: 2'")
            try:
                token_map = (swap_alignment if edit == "word_swap" else refinement_alignment)(source.tokens, target.tokens)
            except AlignmentError as e:
                raise ValueError(str(e)) from None
            cross_until = (_per_target_key(target, word_release, "word_release", cross_replace, 0.0, 1.0)
                           or (cross_replace,) * target.tokens.context_length)
            controllers.append(PromptToPrompt(token_map=token_map, cross_until=cross_until, self_until=self_replace,
                                              equalizer=_per_target_key(target, reweight, "reweight", 1.0, -10.0, 10.0),
                                              max_tokens=max_resolution ** 2))
        blend_keys = _blend_keys([source, target], blend_words)
        local_blend = None
        if blend_keys is not None:
            local_blend = LocalBlend(keys=blend_keys, threshold=blend_threshold, start=blend_start)
            controllers.append(local_blend)

        patched = model
        for c in controllers:
            patched = attach_controller(patched, c)
        negative = None if inversion is not None else clip.encode_from_tokens_scheduled(clip.tokenize(negative_prompt))[0][0]
        guider = PairCFGGuider(patched, [source.context, target.context], negative, cfg, inversion=inversion,
                               local_blend=local_blend)
        return io.NodeOutput(guider)


NODES = [AttentionControllerNode]
