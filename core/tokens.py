"""Prompt tokens <-> cross-attention key positions, for the CLIP BPE tokenizers of Stable Diffusion.

Hosts encode a prompt as chunks of 77 tokens ([start, up to 75 tokens, end, padding]) and concatenate the
chunks' encodings, so the key index of a token is chunk * 77 + position. These helpers take the token ids
as the host tokenised them, so word positions always match what the UNet attends to.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

END_OF_WORD = "</w>"


@dataclass(frozen=True)
class PromptTokens:
    """Token ids of a prompt as the host encodes it: one list per 77-token chunk."""
    chunks: tuple[tuple[int, ...], ...]
    special_ids: frozenset[int]

    @property
    def context_length(self) -> int:
        return sum(len(c) for c in self.chunks)

    def content(self) -> list[tuple[int, int]]:
        """(key index, token id) of every token that is not start / end / padding, in prompt order."""
        out, offset = [], 0
        for chunk in self.chunks:
            out.extend((offset + i, t) for i, t in enumerate(chunk) if t not in self.special_ids)
            offset += len(chunk)
        return out


def split_words(text: str) -> list[str]:
    """Comma-separated word list as typed in a node widget."""
    return [w.strip() for w in text.split(",") if w.strip()]


def prompt_words(tokens: PromptTokens, id_to_piece: Callable[[int], str]) -> list[str]:
    """The prompt's words as the tokenizer split them (BPE pieces joined up to each end-of-word mark)."""
    words, current = [], ""
    for _, token_id in tokens.content():
        piece = id_to_piece(token_id)
        if piece.endswith(END_OF_WORD):
            words.append(current + piece[: -len(END_OF_WORD)])
            current = ""
        else:
            current += piece
    if current:
        words.append(current)
    return words


def find_word_positions(tokens: PromptTokens, word_ids: Sequence[int]) -> list[int]:
    """Key indices of every occurrence of the token sequence `word_ids` in the prompt."""
    word_ids = list(word_ids)
    if not word_ids:
        return []
    content = tokens.content()
    ids = [t for _, t in content]
    positions = []
    for start in range(len(ids) - len(word_ids) + 1):
        if ids[start:start + len(word_ids)] == word_ids:
            positions.extend(content[start + j][0] for j in range(len(word_ids)))
    return positions


class UnknownWordError(ValueError):
    pass


def word_positions(tokens: PromptTokens, words: Sequence[str], encode_word: Callable[[str], Sequence[int]],
                   id_to_piece: Callable[[int], str], input_name: str = "words") -> list[list[int]]:
    """Key indices of each word; a word missing from the prompt raises an error listing the prompt's words."""
    result = []
    for word in words:
        positions = find_word_positions(tokens, encode_word(word))
        if not positions:
            known = ", ".join(prompt_words(tokens, id_to_piece)) or "(empty prompt)"
            raise UnknownWordError(f"{input_name}: '{word}' is not in the prompt. The prompt's words are: {known}")
        result.append(positions)
    return result
