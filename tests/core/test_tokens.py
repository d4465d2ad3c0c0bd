"""Word positions on the real CLIP tokenizer files shipped with ComfyUI (read from the host snapshot)."""
import pytest

from support.clip_tokens import sd1_tokenizer, sd1_tokens
from editkit.core.tokens import PromptTokens, UnknownWordError, find_word_positions, prompt_words, word_positions


@pytest.fixture(scope="module")
def tokenizer():
    return sd1_tokenizer()


_tokens = sd1_tokens


def _encode(tokenizer):
    return lambda word: tokenizer(word)["input_ids"][1:-1]


def _piece(tokenizer):
    return lambda i: tokenizer.convert_ids_to_tokens(i)


def test_positions_of_words_skip_the_start_token(tokenizer):
    tokens = _tokens(tokenizer, "a cat riding a bicycle")
    assert tokens.context_length == 77
    assert find_word_positions(tokens, _encode(tokenizer)("cat")) == [2]
    assert find_word_positions(tokens, _encode(tokenizer)("a")) == [1, 4]
    assert prompt_words(tokens, _piece(tokenizer)) == ["a", "cat", "riding", "a", "bicycle"]


def test_multi_token_word_maps_to_all_its_tokens(tokenizer):
    tokens = _tokens(tokenizer, "a photo of a corgidog")
    ids = _encode(tokenizer)("corgidog")
    assert len(ids) > 1
    assert find_word_positions(tokens, ids) == list(range(5, 5 + len(ids)))
    assert prompt_words(tokens, _piece(tokenizer))[-1] == "corgidog"


def test_second_chunk_positions_offset_by_77(tokenizer):
    text = " ".join(["red"] * 80) + " cat"
    tokens = _tokens(tokenizer, text, chunks=2)
    assert tokens.context_length == 154
    assert find_word_positions(tokens, _encode(tokenizer)("cat")) == [77 + 1 + 5]


def test_unknown_word_error_names_word_and_prompt_words(tokenizer):
    tokens = _tokens(tokenizer, "a cat riding a bicycle")
    with pytest.raises(UnknownWordError) as e:
        word_positions(tokens, ["cat", "dog"], _encode(tokenizer), _piece(tokenizer))
    assert "'dog'" in str(e.value) and "a, cat, riding, a, bicycle" in str(e.value)
