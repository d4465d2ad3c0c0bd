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


def parse_word_windows(text: str, input_name: str) -> list[tuple[str, tuple[float, float]]]:
    """'dog: 0.4, red hat: 0.1-0.5' -> [("dog", (0.0, 0.4)), ("red hat", (0.1, 0.5))]: step windows as fractions."""
    out = []
    for item in split_words(text):
        word, sep, value = item.rpartition(":")
        low, dash, high = value.partition("-")
        try:
            window = (float(low), float(high)) if dash else (0.0, float(low))
        except ValueError:
            window = None
        if not sep or not word.strip() or window is None or not all(math.isfinite(v) for v in window):
            raise ValueError(f"{input_name}: '{item}' should be a word and a window, like 'dog: 0.4' or "
                             f"'dog: 0.1-0.4'")
        if not 0.0 <= window[0] <= window[1] <= 1.0:
            raise ValueError(f"{input_name}: the window {value.strip()} of '{word.strip()}' should go from low to "
                             f"high within 0 to 1")
        out.append((word.strip(), window))
    return out


def prompt_word_spans(tokens: PromptTokens, id_to_piece: Callable[[int], str]) -> list[tuple[str, list[int]]]:
    """The prompt's words as the tokenizer split them, with their key indices: BPE pieces joined up to each
    end-of-word mark (so 'cat,' is two words, 'cat' and ',')."""
    words, current, keys = [], "", []
    for key, token_id in tokens.content():
        piece = id_to_piece(token_id)
        keys.append(key)
        if piece.endswith(END_OF_WORD):
            words.append((current + piece[: -len(END_OF_WORD)], keys))
            current, keys = "", []
        else:
            current += piece
    if keys:
        words.append((current, keys))
    return words


def prompt_words(tokens: PromptTokens, id_to_piece: Callable[[int], str]) -> list[str]:
    """The prompt's words as the tokenizer split them (BPE pieces joined up to each end-of-word mark)."""
    return [word for word, _ in prompt_word_spans(tokens, id_to_piece)]


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

    Target key j receives `weights[j]` times the sum of the source maps of keys `sources[j]`; an empty
    `sources[j]` marks a token the target adds (it keeps its own attention). Lengths are the target's context.
    """
    sources: tuple[tuple[int, ...], ...]
    weights: tuple[float, ...]
    source_length: int

    @staticmethod
    def one_to_one(source_index: Sequence[int], aligned: Sequence[bool], source_length: int) -> "TokenMap":
        """Target key j takes source key source_index[j] where aligned[j]."""
        return TokenMap(tuple((i,) if ok else () for i, ok in zip(source_index, aligned)),
                        (1.0,) * len(source_index), source_length)

    @property
    def target_length(self) -> int:
        return len(self.sources)

    @property
    def aligned(self) -> tuple[bool, ...]:
        return tuple(bool(s) for s in self.sources)

    def gather(self) -> tuple[list[list[int]], list[list[float]]]:
        """(index, weight) tables of shape (target keys, widest source set), padded with key 0 at weight 0."""
        width = max((len(s) for s in self.sources), default=1) or 1
        index = [list(s) + [0] * (width - len(s)) for s in self.sources]
        weight = [[w] * len(s) + [0.0] * (width - len(s)) for s, w in zip(self.sources, self.weights)]
        return index, weight


def _special_source_key(source: PromptTokens, chunk: int, position: int, is_end: bool) -> int:
    """Start and end tokens take the source's start and end token (of the same 77-token chunk, or the source's
    last); a padding key takes the source key at its own position, as the reference mapper does."""
    chunk = min(chunk, len(source.chunks) - 1)
    ids = source.chunks[chunk]
    offset = sum(len(c) for c in source.chunks[:chunk])
    if is_end:
        return offset + _end_of_content(ids, source.special_ids)
    return offset + min(position, len(ids) - 1)


def _end_of_content(ids: tuple[int, ...], special: frozenset[int]) -> int:
    """Index of a chunk's end token: the first special token after the start token."""
    return next((i for i in range(1, len(ids)) if ids[i] in special), len(ids) - 1)


def _map_with_content(source: PromptTokens, target: PromptTokens,
                      content_map: dict[int, tuple[tuple[int, ...], float]]) -> TokenMap:
    sources, weights, offset = [], [], 0
    for c, chunk in enumerate(target.chunks):
        end = _end_of_content(chunk, target.special_ids)
        for p, token in enumerate(chunk):
            key = offset + p
            if token in target.special_ids:
                keys, weight = (_special_source_key(source, c, p, p == end),), 1.0
            else:
                keys, weight = content_map.get(key, ((), 1.0))
            sources.append(keys)
            weights.append(weight)
        offset += len(chunk)
    return TokenMap(tuple(sources), tuple(weights), source.context_length)


def swap_alignment(source: PromptTokens, target: PromptTokens, id_to_piece: Callable[[int], str]) -> TokenMap:
    """Word swap: word i of the target takes word i of the source (Prompt-to-Prompt's replacement mapper).

    Unchanged words and swapped words of equal token count map token to token; a swapped word of another
    token count gives each of its tokens the sum of the source word's maps divided by its own token count,
    as the reference mapper does. Unlike the reference, the words after such a swap keep their own source
    words (its mapper shifts them by the difference in token count).
    """
    src, tgt = prompt_word_spans(source, id_to_piece), prompt_word_spans(target, id_to_piece)
    if len(src) != len(tgt):
        raise AlignmentError(
            f"target_prompt: word swap needs prompts with the same number of words, but the source prompt has "
            f"{len(src)} and the target {len(tgt)}; use the 'refine' edit, which aligns prompts of different lengths")
    content_map = {}
    for (_, s_keys), (_, t_keys) in zip(src, tgt):
        if len(s_keys) == len(t_keys):
            content_map.update({t: ((s,), 1.0) for s, t in zip(s_keys, t_keys)})
        else:
            content_map.update({t: (tuple(s_keys), 1.0 / len(t_keys)) for t in t_keys})
    return _map_with_content(source, target, content_map)


def refinement_alignment(source: PromptTokens, target: PromptTokens) -> TokenMap:
    """Refinement: align the prompts' tokens by a global alignment with match +1, mismatch -1 and gap 0
    (Hertz et al.); target tokens without a partner are added words. Ties are broken as the reference
    traceback breaks them (from the end: a target gap first, then a source gap, then a match)."""
    src, tgt = source.content(), target.content()
    n, m = len(src), len(tgt)
    # score[i][j]: best score of src[:i] against tgt[:j] (gaps cost 0, so it is their longest common subsequence)
    score = [[0] * (m + 1) for _ in range(n + 1)]
    move = [[0] * (m + 1) for _ in range(n + 1)]      # 1: target gap, 2: source gap, 3: match
    for j in range(1, m + 1):
        move[0][j] = 1
    for i in range(1, n + 1):
        move[i][0] = 2
        for j in range(1, m + 1):
            left, up = score[i][j - 1], score[i - 1][j]
            diag = score[i - 1][j - 1] + (1 if src[i - 1][1] == tgt[j - 1][1] else -1)
            best = max(left, up, diag)
            score[i][j] = best
            move[i][j] = 1 if best == left else 2 if best == up else 3
    content_map, i, j = {}, n, m
    while i > 0 or j > 0:
        step = move[i][j]
        if step == 3:
            content_map[tgt[j - 1][0]] = ((src[i - 1][0],), 1.0)
            i, j = i - 1, j - 1
        elif step == 1:
            j -= 1
        else:
            i -= 1
    return _map_with_content(source, target, content_map)
