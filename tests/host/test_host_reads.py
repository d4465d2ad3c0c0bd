"""How often each editing guider reads a tensor back to the host while sampling, against stock ComfyUI.

On a GPU each read waits for the device; the budget is one per UNet evaluation (the step's sigma, read once
and shared by every attention call) plus a few per run. Counted on the CPU, where the same Python runs.
"""
import pytest
import torch

from support.comfy_host import encode
from support.host_reads import HostReads
from support.node_calls import attention_controller, feature_injector, invert

STEPS = 6
PER_RUN = 4     # reads once per run: the schedule, a mask published for preview


def _count(guider, latent, sigmas, sampler):
    import comfy.samplers
    with HostReads() as reads:
        guider.sample(torch.zeros_like(latent), latent, comfy.samplers.sampler_object(sampler), sigmas,
                      disable_pbar=True, seed=0)
    return reads


def _stock(model, clip, prompt, latent, sigmas, sampler):
    import comfy.samplers
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(encode(clip, prompt), encode(clip, ""))
    guider.set_cfg(5.0)
    return _count(guider, latent, sigmas, sampler)


def _within_budget(ours, stock, evaluations):
    extra = ours.total - stock.total
    assert extra <= evaluations + PER_RUN, f"{extra} reads over stock ComfyUI in {evaluations} evaluations: {ours.report()}"


@pytest.fixture(scope="module")
def schedule(tiny):
    import comfy.samplers
    model = tiny[0]
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    return latent, comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", STEPS).cpu()


@pytest.mark.parametrize("edit,extra", [("word_swap", {"target_prompt": "a dog riding a bicycle"}),
                                        ("refine", {"blend_words": "bicycle"}),
                                        ("reweight", {"reweight": "red: 2"}),
                                        ("masactrl", {"start_step": 0, "layers": "0-15", "mask_word": "cat"})])
def test_attention_control_reads_the_step_once_per_evaluation(tiny, schedule, edit, extra):
    model, clip, _ = tiny
    latent, sigmas = schedule
    ours = _count(attention_controller(model, clip, edit=edit, **extra), latent, sigmas, "euler")
    stock = _stock(model, clip, "a cat riding a bicycle", latent, sigmas, "euler")
    _within_budget(ours, stock, STEPS)
    assert ours.total > stock.total      # the count sees our reads at all


@pytest.mark.parametrize("mode", ["direct", "null_text"])
def test_feature_injection_from_an_inversion_reads_the_step_once_per_evaluation(tiny, mode):
    model, clip, vae = tiny
    photo = {"samples": vae.encode(torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(5)))}
    noised, inversion, sigmas = invert(model, clip, photo, mode, STEPS, inner_steps=1)
    guider, _ = feature_injector(model, clip, inversion, "a sculpture", "")
    ours = _count(guider, noised, sigmas, "ddim")
    stock = _stock(model, clip, "a sculpture", noised, sigmas, "ddim")
    _within_budget(ours, stock, sigmas.shape[0] - 1)
