"""Host facilities the pack builds on and no other test reaches yet, on whichever ComfyUI runs the tests (CI runs
this file on v0.12.1 and v0.33.0): `transformer_options["optimized_attention_override"]`, the route every
attention call of the flow transformers takes (GUIDE.md, hook rules), checked here on the UNet, whose attention
calls take the same route."""
import torch

from support.comfy_host import encode

STEPS = 2


def _sample(model, clip, noise):
    import comfy.sample
    return comfy.sample.sample(model, noise, STEPS, 5.0, "euler", "normal", encode(clip, "a cat"), encode(clip, ""),
                               torch.zeros_like(noise), disable_pbar=True, seed=0)


def _with_override(model, override):
    patched = model.clone()   # clone deep-copies model_options: the fixture's model stays stock
    patched.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = override
    return patched


def _attention_layers(model) -> int:
    from comfy.ldm.modules.attention import CrossAttention
    return sum(isinstance(m, CrossAttention) for m in model.get_model_object("diffusion_model").modules())


def test_the_attention_override_sees_every_attention_call_with_its_block(tiny):
    model, clip, _ = tiny
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    blocks = []

    def passthrough(func, *args, **kwargs):
        blocks.append(kwargs["transformer_options"].get("block"))
        return func(*args, **kwargs)

    stock = _sample(model, clip, noise)
    routed = _sample(_with_override(model, passthrough), clip, noise)
    assert torch.equal(routed, stock)
    layers = _attention_layers(model)
    assert layers > 0 and blocks and len(blocks) % layers == 0
    assert {block[0] for block in blocks} == {"input", "middle", "output"}


def test_what_the_attention_override_returns_is_what_the_model_uses(tiny):
    model, clip, _ = tiny
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def silenced(func, *args, **kwargs):
        return torch.zeros_like(func(*args, **kwargs))

    assert not torch.allclose(_sample(_with_override(model, silenced), clip, noise), _sample(model, clip, noise))
