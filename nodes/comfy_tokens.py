"""Prompt tokenisation with the CLIP of the model in use (ComfyUI side of core/tokens.py)."""
from __future__ import annotations

from ..core.tokens import PromptTokens, word_positions


def _sd_tokenizer(clip):
    """The 77-token CLIP tokenizer whose positions the UNet's cross-attention keys follow."""
    tokenizer = clip.tokenizer
    for name, key in (("clip_l", "l"), ("clip_g", "g")):
        if hasattr(tokenizer, name):
            return getattr(tokenizer, name), key
    raise ValueError("clip: this text encoder has no CLIP-L or CLIP-G tokenizer; word maps need an SD 1.x, "
                     "SD 2.x or SDXL text encoder")


EMBEDDING = -1   # the id given to a textual-inversion embedding's vectors (they arrive as tensors)


def _token_id(entry) -> int:
    token = entry[0]
    return int(token) if isinstance(token, int) else EMBEDDING


def prompt_tokens(clip, text: str) -> PromptTokens:
    sd_tokenizer, key = _sd_tokenizer(clip)
    chunks = clip.tokenize(text)[key]
    special = {sd_tokenizer.start_token, sd_tokenizer.end_token, sd_tokenizer.pad_token}
    return PromptTokens(tuple(tuple(_token_id(e) for e in chunk) for chunk in chunks),
                        frozenset(t for t in special if t is not None))


def word_codec(clip):
    """(encode_word, id_to_piece) of the model's tokenizer: a word's token ids, and a token id's BPE piece."""
    sd_tokenizer, _ = _sd_tokenizer(clip)

    def encode_word(word: str) -> list[int]:
        return [t for _, t in prompt_tokens(clip, word).content()]

    def id_to_piece(token_id: int) -> str:
        return sd_tokenizer.inv_vocab.get(token_id, "<embedding></w>")   # each embedding vector: its own word

    return encode_word, id_to_piece


def prompt_word_positions(clip, prompt: str, words: list[str], input_name: str = "words") -> tuple[PromptTokens, list[list[int]]]:
    """Key positions of each word in `prompt`, as CLIP tokenises both; unknown words raise a clear error."""
    tokens = prompt_tokens(clip, prompt)
    encode_word, id_to_piece = word_codec(clip)
    return tokens, word_positions(tokens, words, encode_word, id_to_piece, input_name=input_name)
