"""Node: Prompt-to-Prompt and MasaCtrl edits of a generated image or of an inverted photo.

The node patches the model with the edit's controllers (core/prompt2prompt.py) and returns a GUIDER that
samples the source and the targets together (nodes/pair_guider.py); the sampler's LATENT holds them all.
Each edit shows only its own settings (a DynamicCombo); several targets can be edited in one run.
"""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..core.attention import parse_layers
from ..core.prompt2prompt import (AttentionFusion, LocalBlend, MutualSelfAttention, PromptKeys, PromptToPrompt,
                                  TargetEdit)
from ..core.tokens import (AlignmentError, PromptTokens, UnknownWordError, find_word_positions, parse_word_values,
                           parse_word_windows, prompt_words, refinement_alignment, split_words, swap_alignment,
                           word_positions)
from .comfy_attention import attach_controller, attention_sites
from .comfy_tokens import prompt_tokens, word_codec
from .host_helpers import check_context_width, dynamic_choice, dynamic_combo, require_sd_unet
from .inversion import InversionType
from .pair_guider import PairCFGGuider

CATEGORY = "EditKit/attention"
PROMPT_TO_PROMPT = ("word_swap", "refine", "reweight")
EDITS = PROMPT_TO_PROMPT + ("masactrl",)
MASACTRL_KV = ("source", "source_and_target")
MAX_EXTRA_TARGETS = 7
FusionType = io.Custom("EDITKIT_ATTENTION_FUSION")


class EncodedPrompt:
    """A prompt as the model's CLIP tokenises and encodes it."""

    def __init__(self, clip, text: str, name: str, allow_empty: bool = False):
        if not allow_empty and not text.strip():
            raise ValueError(f"{name}: the prompt is empty; type the edited prompt")
        self.text, self.name = text, name
        self.tokens: PromptTokens = prompt_tokens(clip, text)
        self.encode_word, self.id_to_piece = word_codec(clip)
        self.context, self.extras = clip.encode_from_tokens_scheduled(clip.tokenize(text))[0][:2]   # extras: pooled

    def positions(self, words: list[str], input_name: str) -> list[list[int]]:
        try:
            return word_positions(self.tokens, words, self.encode_word, self.id_to_piece, input_name=input_name)
        except UnknownWordError as e:
            raise ValueError(f"{e} (in {self.name})") from None

    def find(self, word: str) -> list[int]:
        return find_word_positions(self.tokens, self.encode_word(word))

    def words(self) -> str:
        return ", ".join(prompt_words(self.tokens, self.id_to_piece)) or "(empty)"


def _in_some(prompts: list[EncodedPrompt], word: str, input_name: str) -> list[list[int]]:
    """The word's positions in each prompt; a word in none of them is an error listing their words."""
    hits = [p.find(word) for p in prompts]
    if not any(hits):
        listed = "; ".join(f"{p.name}: {p.words()}" for p in prompts)
        raise ValueError(f"{input_name}: '{word}' is in none of the prompts ({listed})")
    return hits


def _per_target_key(targets: list[EncodedPrompt], pairs: list[tuple[str, object]], input_name: str,
                    default) -> list[tuple]:
    """Per target, one value per key: `default`, and each pair's value at its word's tokens."""
    out = [[default] * t.tokens.context_length for t in targets]
    for word, value in pairs:
        for values, positions in zip(out, _in_some(targets, word, input_name)):
            for p in positions:
                values[p] = value
    return [tuple(v) for v in out]


def _word_keys(prompts: list[EncodedPrompt], text: str, input_name: str) -> tuple[PromptKeys, ...] | None:
    """Per prompt, the key positions of the words of `text` it contains (None for no words)."""
    words = split_words(text)
    if not words:
        return None
    found = [set() for _ in prompts]
    for word in words:
        for f, hits in zip(found, _in_some(prompts, word, input_name)):
            f.update(hits)
    return tuple(PromptKeys(p.tokens.context_length, tuple(sorted(f))) for p, f in zip(prompts, found))


def _fraction(name: str, tooltip: str, default: float) -> io.Float.Input:
    return io.Float.Input(name, default=default, min=0.0, max=1.0, step=0.01, tooltip=tooltip)


def _prompt_to_prompt_inputs(edit: str) -> list:
    """The settings of one Prompt-to-Prompt edit (each option needs its own input objects)."""
    inputs = [
        _fraction("cross_replace", "End of the window (fraction of the steps, from cross_replace_start on) in which "
                                   "the targets take the source's cross-attention (paper: 0.8; a swapped word about "
                                   "0.4).", 0.8),
        _fraction("cross_replace_start", "Fraction of the steps before the cross-attention replacement starts.", 0.0),
        _fraction("self_replace", "End of the window (fraction of the steps, from self_replace_start on) in which "
                                  "the targets take the source's self-attention (keeps the layout; lower allows "
                                  "bigger changes).", 0.4),
        _fraction("self_replace_start", "Fraction of the steps before the self-attention replacement starts.", 0.0),
        io.String.Input("word_windows", default="",
                        tooltip="Own cross-attention window for some target words: 'dog: 0.4' (from the first step "
                                "to 0.4) or 'dog: 0.1-0.4'; a swapped word released early can change its shape."),
        io.String.Input("reweight", default="red: 2" if edit == "reweight" else "",
                        tooltip="Scale target words' attention within their window, e.g. 'red: 2, snow: -1' (1 "
                                "changes nothing; negative removes)."),
        io.String.Input("blend_words", default="",
                        tooltip="Local blend: words of any prompt (e.g. 'bicycle'); the edit is confined to where "
                                "they appear and the rest stays equal to the source. Empty: off."),
        io.String.Input("blend_subtract_words", default="",
                        tooltip="Local blend: words whose region always stays equal to the source (the paper's "
                                "real-image edits). Empty: none."),
        _fraction("blend_threshold", "Local blend: threshold on the normalised, max-pooled word maps (paper: 0.3).",
                  0.3),
        _fraction("blend_subtract_threshold", "Local blend: threshold of the subtracted words' maps (paper: 0.3).",
                  0.3),
        _fraction("blend_start", "Local blend: fraction of the steps before the blend starts (paper: 0 on "
                                 "generated images, 0.2 on photos).", 0.0),
        io.Int.Input("cross_max_resolution", default=0, min=0, max=256,
                     tooltip="0: cross-attention is edited at every layer (the paper's code). N: only at layers of at "
                             "most N x N tokens (faster; 32 leaves SD1.5's 64x64 layers unedited at 512 px)."),
        io.Int.Input("self_max_resolution", default=16, min=1, max=256,
                     tooltip="Self-attention is replaced at layers of at most N x N tokens (paper: 16 for generated "
                             "images, 32 for photos)."),
    ]
    return inputs


def _masactrl_inputs() -> list:
    return [
        io.Int.Input("start_step", default=4, min=0, max=10000,
                     tooltip="First step of mutual self-attention (paper: 4 of 50)."),
        io.Int.Input("end_step", default=10000, min=1, max=10000,
                     tooltip="Step where mutual self-attention stops (exclusive); 10000: through the last step."),
        io.String.Input("layers", default="10-15",
                        tooltip="Transformer layers with mutual self-attention, counted through the UNet in order "
                                "(SD1.5 has 16: 0-15; paper: 10-15). Indices and ranges, e.g. '10-15' or '4, 10-15'."),
        io.Combo.Input("keys_values", options=list(MASACTRL_KV), default="source",
                       tooltip="source: the targets read the source's keys and values (the paper); "
                               "source_and_target: the source's and their own (MasaCtrl's union variant)."),
        io.String.Input("mask_word", default="",
                        tooltip="A word of every prompt naming the subject: its cross-attention keeps subject and "
                                "background apart (MasaCtrl's automatic mask). Empty: no mask."),
        _fraction("mask_threshold", "Threshold of the word's min-max normalised map (MasaCtrl: 0.1).", 0.1),
        io.Mask.Input("source_mask", optional=True,
                      tooltip="The subject in the source image (instead of mask_word): its keys are the foreground."),
        io.Mask.Input("target_mask", optional=True,
                      tooltip="The subject's region in the edited image (default: source_mask)."),
    ]


class AttentionControllerNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitAttentionController",
            display_name="Attention Controller (Prompt-to-Prompt / MasaCtrl)",
            category=CATEGORY,
            description="Edits an image by changing its prompt while keeping its layout: each target is sampled "
                        "next to the source and takes over the source's attention (Hertz et al. 2022; MasaCtrl, "
                        "Cao et al. 2023). Connect the GUIDER to SamplerCustomAdvanced with a one-image latent (or "
                        "the frames of a video): its output holds the source (first) and the edits. For a photo, connect an INVERSION and "
                        "sample its noised latent with its SIGMAS and DisableNoise.",
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
                dynamic_combo("edit", tooltip="word_swap: words changed, as many words; refine: words added "
                                              "or changed, tokens aligned; reweight: scale chosen words' "
                                              "attention; masactrl: change pose or action, keep the look.",
                              options=[io.DynamicCombo.Option(e, _prompt_to_prompt_inputs(e))
                                       for e in PROMPT_TO_PROMPT]
                              + [io.DynamicCombo.Option("masactrl", _masactrl_inputs())]),
                io.Float.Input("cfg", default=7.5, min=0.0, max=30.0, step=0.1, tooltip="Guidance scale."),
                InversionType.Input("inversion", optional=True,
                                    tooltip="From 'Invert Image': edit that photo (source = its inversion)."),
                io.Autogrow.Input("more_targets", optional=True,
                                  # min 1 of an optional slot: a fresh node offers one empty slot to connect
                                  template=io.Autogrow.TemplatePrefix(
                                      io.String.Input("target", multiline=True, optional=True,
                                                      tooltip="Another edited prompt, sampled in the same run."),
                                      prefix="target_", min=1, max=MAX_EXTRA_TARGETS),
                                  tooltip="More target prompts, each edited like target_prompt in the same run "
                                          "(connect text nodes)."),
                FusionType.Input("fusion", optional=True,
                                 tooltip="From 'Attention Fusion (FateZero)': the targets keep their own "
                                         "self-attention inside the region of words of the source prompt."),
            ],
            outputs=[io.Guider.Output(tooltip="Samples the source (first) and each target together: connect it to "
                                              "SamplerCustomAdvanced with a one-image latent (or the frames of a "
                                              "video, clip by clip).")],
        )

    @classmethod
    def execute(cls, model, clip, source_prompt, target_prompt, negative_prompt, edit=None, cfg=None, inversion=None,
                more_targets=None, fusion=None) -> io.NodeOutput:   # edit=None: see dynamic_choice
        inner = require_sd_unet(model)
        kind = dynamic_choice(edit, "edit", EDITS)
        settings = dict(edit)
        settings.pop("edit")
        source = EncodedPrompt(clip, source_prompt, "source_prompt", allow_empty=True)   # a photo inverted with ""
        targets = [EncodedPrompt(clip, target_prompt, "target_prompt")]
        for name, text in sorted((more_targets or {}).items()):
            if text is not None:
                targets.append(EncodedPrompt(clip, text, f"more_targets.{name}"))
        prompts = [source] + targets
        for p in prompts:
            check_context_width(inner, p.context, p.name)
        if inversion is not None and (source.context.shape != inversion.source_context.shape or not torch.allclose(
                source.context.float().cpu(), inversion.source_context.float(), rtol=1e-3, atol=1e-3)):
            raise ValueError("source_prompt: it differs from the prompt the photo was inverted with; type the "
                             "inversion's prompt as the source (the edit goes in target_prompt)")

        local_blend = None
        if kind == "masactrl":
            if fusion is not None:
                raise ValueError("fusion: the attention fusion blends Prompt-to-Prompt's self-attention "
                                 "replacement; choose word_swap, refine or reweight, or disconnect it")
            controllers = [_masactrl(model, prompts, settings)]
        else:
            controllers = [_prompt_to_prompt(kind, source, targets, settings, _fusion(source, fusion))]
            local_blend = _local_blend(prompts, settings)
            if local_blend is not None:
                controllers.append(local_blend)

        patched = model
        for c in controllers:
            patched = attach_controller(patched, c)
        negative = None if inversion is not None else clip.encode_from_tokens_scheduled(clip.tokenize(negative_prompt))[0][0]
        guider = PairCFGGuider(patched, [p.context for p in prompts], negative, cfg, inversion=inversion,
                               local_blend=local_blend)
        return io.NodeOutput(guider)


def _window(settings: dict, name: str) -> tuple[float, float]:
    start, end = settings[f"{name}_start"], settings[name]
    if start > end:
        raise ValueError(f"{name}_start: {start} is after {name} ({end}); the window runs from start to end")
    return start, end


def _fusion(source: EncodedPrompt, settings: dict | None) -> AttentionFusion | None:
    if settings is None:
        return None
    words = split_words(settings["words"])
    if not words:
        raise ValueError("fusion: name at least one word of the source prompt (its region keeps the edit)")
    positions = set()
    for word in words:
        found = source.find(word)
        if not found:
            raise ValueError(f"fusion: the word '{word}' is not in the source_prompt ({source.words()}); the fusion's "
                             f"region comes from the source's attention to its words")
        positions.update(found)
    return AttentionFusion(PromptKeys(source.tokens.context_length, tuple(sorted(positions))), settings["threshold"])


def _prompt_to_prompt(kind: str, source: EncodedPrompt, targets: list[EncodedPrompt], settings: dict,
                      fusion: AttentionFusion | None = None) -> PromptToPrompt:
    reweight = parse_word_values(settings["reweight"], "reweight", -10.0, 10.0)
    if kind == "reweight" and not reweight:
        raise ValueError("reweight: the reweight edit needs at least one 'word: factor', e.g. 'red: 2'")
    try:
        maps = [swap_alignment(source.tokens, t.tokens, source.id_to_piece) if kind == "word_swap"
                else refinement_alignment(source.tokens, t.tokens) for t in targets]
    except AlignmentError as e:
        raise ValueError(str(e)) from None
    windows = _per_target_key(targets, parse_word_windows(settings["word_windows"], "word_windows"),
                              "word_windows", _window(settings, "cross_replace"))
    equalizers = _per_target_key(targets, reweight, "reweight", 1.0) if reweight else [None] * len(targets)
    cross_cap, self_cap = settings["cross_max_resolution"], settings["self_max_resolution"]
    return PromptToPrompt(targets=tuple(TargetEdit(m, w, e) for m, w, e in zip(maps, windows, equalizers)),
                          self_window=_window(settings, "self_replace"),
                          max_tokens=cross_cap * cross_cap if cross_cap > 0 else None,
                          self_max_tokens=self_cap * self_cap, fusion=fusion)


def _local_blend(prompts: list[EncodedPrompt], settings: dict) -> LocalBlend | None:
    keys = _word_keys(prompts, settings["blend_words"], "blend_words")
    subtract = _word_keys(prompts, settings["blend_subtract_words"], "blend_subtract_words")
    if keys is None:
        if subtract is not None:
            raise ValueError("blend_subtract_words: they take a region out of the local blend; give blend_words too")
        return None
    return LocalBlend(keys=keys, subtract=subtract, threshold=settings["blend_threshold"],
                      subtract_threshold=settings["blend_subtract_threshold"], start=settings["blend_start"])


def _mask_image(mask, name: str) -> torch.Tensor:
    if mask.ndim == 3:
        mask = mask[0]
    if mask.ndim != 2 or mask.numel() == 0:
        raise ValueError(f"{name}: expected a MASK, got a tensor of shape {tuple(mask.shape)}")
    return mask.float().cpu()


def _masactrl(model, prompts: list[EncodedPrompt], settings: dict) -> MutualSelfAttention:
    count = max(s.layer for s in attention_sites(model)) + 1
    layers = parse_layers(settings["layers"], "layers")
    if not layers:
        raise ValueError(f"layers: give at least one transformer layer (this model has 0 to {count - 1})")
    if layers[-1] >= count:
        raise ValueError(f"layers: {layers[-1]} is beyond this model's {count} transformer layers "
                         f"(valid: 0 to {count - 1})")
    if settings["end_step"] <= settings["start_step"]:
        raise ValueError(f"end_step: {settings['end_step']} must be after start_step ({settings['start_step']})")
    word = settings["mask_word"].strip()
    source_mask, target_mask = settings.get("source_mask"), settings.get("target_mask")
    if target_mask is not None and source_mask is None:
        raise ValueError("target_mask: give source_mask too (the target's region defaults to it)")
    if word and source_mask is not None:
        raise ValueError("mask_word: give either a mask word or source_mask, not both")
    union = settings["keys_values"] == "source_and_target"
    if union and (word or source_mask is not None):
        raise ValueError("keys_values: source_and_target (the union variant) takes no mask; clear mask_word and "
                         "source_mask, or read the source's keys only")
    mask_keys = None
    if word:
        mask_keys = tuple(PromptKeys(p.tokens.context_length, tuple(p.positions([word], "mask_word")[0]))
                          for p in prompts)
    masks = None
    if source_mask is not None:
        source = _mask_image(source_mask, "source_mask")
        target = source if target_mask is None else _mask_image(target_mask, "target_mask")
        masks = (source, target)
    return MutualSelfAttention(start_step=settings["start_step"],
                               end_step=None if settings["end_step"] >= 10000 else settings["end_step"],
                               layers=frozenset(layers), mask_keys=mask_keys, mask_threshold=settings["mask_threshold"],
                               masks=masks, union=union)


class AttentionFusionNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitAttentionFusion",
            display_name="Attention Fusion (FateZero)",
            category=CATEGORY,
            description="FateZero's attention fusion (Qi et al. 2023) for a Prompt-to-Prompt edit: during the "
                        "self-attention replacement the edited image keeps its own self-attention inside the "
                        "region of the named source words and takes the source's outside it, so the edit "
                        "changes the subject and keeps the rest (for videos: per frame). Connect it to the "
                        "Attention Controller's 'fusion' input; raise self_max_resolution to 32 (FateZero's layers).",
            inputs=[
                io.String.Input("words", default="",
                                tooltip="Words of the source prompt whose region may change, e.g. 'car'."),
                io.Float.Input("threshold", default=0.3, min=0.0, max=1.0, step=0.01,
                               tooltip="Threshold of the words' max-pooled, per-frame normalised attention "
                                       "(FateZero: 0.3)."),
            ],
            outputs=[FusionType.Output(tooltip="For the Attention Controller's 'fusion' input.")],
        )

    @classmethod
    def execute(cls, words, threshold) -> io.NodeOutput:
        if not split_words(words):
            raise ValueError("words: name at least one word of the source prompt (its region keeps the edit)")
        return io.NodeOutput({"words": words, "threshold": float(threshold)})


NODES = [AttentionControllerNode, AttentionFusionNode]
