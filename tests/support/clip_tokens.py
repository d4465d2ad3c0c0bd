"""Prompts tokenised as ComfyUI's SD1 tokenizer chunks them, from the real CLIP files in the host snapshot."""
from editkit.core.tokens import PromptTokens


def sd1_tokenizer():
    from support.comfy_host import require_host
    from transformers import CLIPTokenizer
    return CLIPTokenizer.from_pretrained(str(require_host() / "comfy" / "sd1_tokenizer"))


def sd1_tokens(tokenizer, text: str, chunks: int | None = None) -> PromptTokens:
    """[start, up to 75 tokens, end, end padding] per 77-token chunk, as ComfyUI's SD1Tokenizer pads."""
    ids = tokenizer(text)["input_ids"]
    end = tokenizer.eos_token_id
    body = ids[1:-1]
    if chunks is None:
        chunks = max(1, -(-len(body) // 75))
    out = []
    for c in range(chunks):
        part = body[c * 75:(c + 1) * 75]
        out.append(tuple([ids[0]] + part + [end] * (76 - len(part))))
    return PromptTokens(tuple(out), frozenset({ids[0], end}))
