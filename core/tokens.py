"""Prompt tokens <-> cross-attention key positions, for the CLIP BPE tokenizers of Stable Diffusion.

Hosts encode a prompt as chunks of 77 tokens ([start, up to 75 tokens, end, padding]) and concatenate the
chunks' encodings, so the key index of a token is chunk * 77 + position. These helpers take the token ids
as the host tokenised them, so word positions always match what the UNet attends to.
"""
from __future__ import annotations

import math
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


def parse_word_values(text: str, input_name: str, low: float | None = None,
                      high: float | None = None) -> list[tuple[str, float]]:
    """'cat: 0.4, red bicycle: 2' -> [("cat", 0.4), ("red bicycle", 2.0)]; errors name the widget."""
    out = []
    for item in split_words(text):
        word, sep, value = item.rpartition(":")
        try:
            number = float(value)
        except ValueError:
            number = None
        if not sep or not word.strip() or number is None or not math.isfinite(number):
            raise ValueError(f"{input_name}: '{item}' should be a word and a number, like 'cat: 0.5'")
        if (low is not None and number < low) or (high is not None and number > high):
            raise ValueError(f"{input_name}: {number} for '{word.strip()}' is outside [{low}, {high}]")
        out.append((word.strip(), number))
    return out


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


class AlignmentError(ValueError):
    pass


@dataclass(frozen=True)
class TokenMap:
    """How a target prompt's keys take over a source prompt's cross-attention (Prompt-to-Prompt, sec. 3.2).

    For target key j, `source_index[j]` is the source key whose attention it receives and `aligned[j]` is
    False for tokens the target adds (they keep their own attention). Lengths are the target's context.
    """
    source_index: tuple[int, ...]
    aligned: tuple[bool, ...]
    source_length: int

    @property
    def target_length(self) -> int:
        return len(self.source_index)


def _end_of_content(ids: tuple[int, ...], special: frozenset[int]) -> int:
    """Index of a chunk's end token: the first special token after the start token."""
    return next((i for i in range(1, len(ids)) if ids[i] in special), len(ids) - 1)


def _special_source_index(source: PromptTokens, chunk: int, position: int, target_end: int) -> int:
    """Start tokens map to the source's start token; the end token and the padding after it map to the
    source's end token and padding at the same distance from it (the source's last chunk if it has fewer)."""
    chunk = min(chunk, len(source.chunks) - 1)
    ids = source.chunks[chunk]
    offset = sum(len(c) for c in source.chunks[:chunk])
    if position == 0:
        return offset
    end = _end_of_content(ids, source.special_ids)
    return offset + min(end + max(position - target_end, 0), len(ids) - 1)


def _map_with_content(source: PromptTokens, target: PromptTokens, content_map: dict[int, int]) -> TokenMap:
    index, aligned, offset = [], [], 0
    for c, chunk in enumerate(target.chunks):
        end = _end_of_content(chunk, target.special_ids)
        for p, token in enumerate(chunk):
            key = offset + p
            if token in target.special_ids:
                index.append(_special_source_index(source, c, p, end))
                aligned.append(True)
            elif key in content_map:
                index.append(content_map[key])
                aligned.append(True)
            else:
                index.append(0)
                aligned.append(False)
        offset += len(chunk)
    return TokenMap(tuple(index), tuple(aligned), source.context_length)


def swap_alignment(source: PromptTokens, target: PromptTokens) -> TokenMap:
    """Word swap: token i of the target takes token i of the source, so both need the same token count."""
    src, tgt = source.content(), target.content()
    if len(src) != len(tgt) or len(source.chunks) != len(target.chunks):
        raise AlignmentError(
            f"target_prompt: word swap needs prompts of the same token length, but the source prompt has "
            f"{len(src)} tokens and the target {len(tgt)} (a swapped word may split into several tokens); "
            f"use the 'refine' edit, which aligns prompts of different lengths")
    return _map_with_content(source, target, {t[0]: s[0] for s, t in zip(src, tgt)})


def refinement_alignment(source: PromptTokens, target: PromptTokens) -> TokenMap:
    """Refinement: align the prompts' tokens by their longest common subsequence; target tokens outside it
    are added words. Hertz et al. align with match +1, mismatch -1, gap 0, which yields such a subsequence."""
    src, tgt = source.content(), target.content()
    n, m = len(src), len(tgt)
    # lcs[i][j]: length of the longest common subsequence of src[i:] and tgt[j:]
    lcs = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n - 1, -1, -1):
        for j in range(m - 1, -1, -1):
            lcs[i][j] = lcs[i + 1][j + 1] + 1 if src[i][1] == tgt[j][1] else max(lcs[i + 1][j], lcs[i][j + 1])
    content_map, i, j = {}, 0, 0
    while i < n and j < m:
        if src[i][1] == tgt[j][1] and lcs[i][j] == lcs[i + 1][j + 1] + 1:
            content_map[tgt[j][0]] = src[i][0]
            i, j = i + 1, j + 1
        elif lcs[i + 1][j] >= lcs[i][j + 1]:
            i += 1
        else:
            j += 1
    return _map_with_content(source, target, content_map)
