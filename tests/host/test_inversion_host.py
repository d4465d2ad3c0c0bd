"""NullTextInvert and the Inversion Guider in the real ComfyUI executor, on the tiny model."""
import pytest
import torch

from support import comfy_host
from support.comfy_host import encode
from support.node_calls import invert

STEPS = 10


def _prompt(name, mode=None, steps=STEPS, **inversion_inputs):
    """A shipped workflow on the tiny model, with fewer steps (and other settings) for the CPU."""
    wf = comfy_host.load_workflow(comfy_host.REPO_ROOT / "workflows" / name)
    prompt = comfy_host.swap_checkpoint_loader(comfy_host.ui_to_api(wf))
    inv = prompt[comfy_host.node_of(prompt, "EditKitNullTextInvert")]["inputs"]
    inv["steps"] = steps
    if mode:
        inv["mode"] = mode
    inv.update(inversion_inputs)
    return prompt


def _latents(prompt, result):
    source = result.outputs[comfy_host.node_of(prompt, "VAEEncode")][0]["samples"]
    output = result.outputs[comfy_host.node_of(prompt, "SamplerCustomAdvanced")][0]["samples"]
    return source, output


def test_direct_inversion_reconstructs_the_input_latent(host):
    prompt = _prompt("Inversion, reconstruct a photo.json", mode="direct")
    source, output = _latents(prompt, comfy_host.run_prompt(prompt))
    assert output.shape == source.shape
    assert (output - source).abs().max() < 1e-4


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "ddim"])
def test_direct_reconstruction_holds_for_other_deterministic_samplers(host, sampler):
    prompt = _prompt("Inversion, reconstruct a photo.json", mode="direct")
    prompt[comfy_host.node_of(prompt, "KSamplerSelect")]["inputs"]["sampler_name"] = sampler
    source, output = _latents(prompt, comfy_host.run_prompt(prompt))
    assert (output - source).abs().max() < 1e-4


def test_null_text_reconstructs_better_than_ddim_at_guidance_7_5(host):
    errors = {}
    for mode in ("ddim", "null_text"):
        prompt = _prompt("Inversion, reconstruct a photo.json", mode=mode)
        source, output = _latents(prompt, comfy_host.run_prompt(prompt))
        errors[mode] = (output - source).pow(2).mean().item()
    print(f"latent reconstruction MSE, {STEPS} steps, guidance 7.5: {errors}")
    assert errors["null_text"] < 0.8 * errors["ddim"]


def test_negative_prompt_inversion_runs_without_optimisation(host):
    prompt = _prompt("Inversion, reconstruct a photo.json", mode="negative_prompt", inner_steps=0)
    result = comfy_host.run_prompt(prompt)
    inversion = result.outputs[comfy_host.node_of(prompt, "EditKitNullTextInvert")][1]
    assert inversion.uncond_embeddings is None and inversion.mode == "negative_prompt"
    source, output = _latents(prompt, result)
    assert torch.isfinite(output).all()


def test_edit_workflow_changes_the_photo(host):
    prompt = _prompt("Inversion, edit a photo with a new prompt.json", inner_steps=2)
    result = comfy_host.run_prompt(prompt)
    source, output = _latents(prompt, result)
    assert (output - source).abs().mean() > 1e-3
    saved = list((comfy_host.host_dirs()["output"]).glob("editkit_edit*.png"))
    assert saved


def test_inversion_uses_comfyui_schedule(host):
    prompt = _prompt("Inversion, reconstruct a photo.json", mode="direct", scheduler="karras")
    result = comfy_host.run_prompt(prompt)
    sigmas = result.outputs[comfy_host.node_of(prompt, "EditKitNullTextInvert")][2]
    import comfy.samplers
    from support.tiny_models import tiny_checkpoint
    model_sampling = tiny_checkpoint(0)[0].get_model_object("model_sampling")
    expected = comfy.samplers.calculate_sigmas(model_sampling, "karras", STEPS)
    assert torch.allclose(sigmas, expected.float().cpu())


def test_ancestral_sampler_is_a_clear_error(host):
    prompt = _prompt("Inversion, reconstruct a photo.json", mode="direct")
    prompt[comfy_host.node_of(prompt, "KSamplerSelect")]["inputs"]["sampler_name"] = "euler_ancestral"
    with pytest.raises(comfy_host.HostError) as e:
        comfy_host.run_prompt(prompt)
    assert "euler_ancestral" in str(e.value) and "deterministic" in str(e.value)


def test_zero_steps_is_rejected_naming_the_input(host):
    prompt = _prompt("Inversion, reconstruct a photo.json", steps=0)
    with pytest.raises(comfy_host.HostError) as e:
        comfy_host.run_prompt(prompt)
    assert "steps" in str(e.value)


def test_bad_latents_are_clear_errors(host):
    from support.tiny_models import tiny_checkpoint
    import editkit.nodes.inversion as inversion_nodes
    model, clip, _ = tiny_checkpoint(0)
    cond = comfy_host.encode(clip, "a cat")
    empty = comfy_host.encode(clip, "")
    args = dict(mode="direct", steps=4, scheduler="normal", guidance=7.5, inner_steps=0, learning_rate=0.01,
                early_stop=1e-5)
    with pytest.raises(ValueError, match="latent: expected an image latent or a batch of video frames"):
        inversion_nodes.NullTextInvert.execute(model, cond, empty, {"samples": torch.zeros(2, 4, 2, 8, 8)}, **args)
    with pytest.raises(ValueError, match="latent: 16 channels but this model's latents have 4"):
        inversion_nodes.NullTextInvert.execute(model, cond, empty, {"samples": torch.zeros(1, 16, 8, 8)}, **args)
    wide = [[torch.zeros(1, 77, 768), {}]]
    with pytest.raises(ValueError, match="positive: the text encoding is 768 wide"):
        inversion_nodes.NullTextInvert.execute(model, wide, empty, {"samples": torch.zeros(1, 4, 8, 8)}, **args)


def test_saved_inversion_reloads_and_reconstructs_the_same(host):
    prompt = _prompt("Inversion, reconstruct a photo.json", mode="null_text", inner_steps=2)
    inv_node = comfy_host.node_of(prompt, "EditKitNullTextInvert")
    prompt["900"] = {"class_type": "EditKitSaveInversion",
                     "inputs": {"inversion": [inv_node, 1], "filename_prefix": "roundtrip"}}
    first = comfy_host.run_prompt(prompt)
    saved = first.ui["900"]["text"][0]
    assert saved.startswith("inversions/roundtrip_") and saved.endswith(" [output]")

    reload = _prompt("Inversion, reconstruct a photo.json")
    reload[inv_node] = {"class_type": "EditKitLoadInversion", "inputs": {"inversion_file": saved}}
    second = comfy_host.run_prompt(reload)
    sampler = comfy_host.node_of(prompt, "SamplerCustomAdvanced")
    assert torch.equal(first.outputs[sampler][0]["samples"], second.outputs[sampler][0]["samples"])
    assert torch.equal(first.outputs[inv_node][0]["samples"], second.outputs[inv_node][0]["samples"])


def test_loading_a_file_that_is_not_an_inversion_is_a_clear_error(host):
    from safetensors.torch import save_file
    folder = comfy_host.host_dirs()["input"] / "inversions"
    folder.mkdir(exist_ok=True)
    save_file({"lora_up": torch.zeros(2)}, str(folder / "some_lora.safetensors"))
    prompt = _prompt("Inversion, reconstruct a photo.json")
    prompt[comfy_host.node_of(prompt, "EditKitNullTextInvert")] = {
        "class_type": "EditKitLoadInversion", "inputs": {"inversion_file": "inversions/some_lora.safetensors [input]"}}
    with pytest.raises(comfy_host.HostError) as e:
        comfy_host.run_prompt(prompt)
    assert "inversion_file" in str(e.value) and "not a saved inversion" in str(e.value)


def test_cuda_graph_only_for_an_unpatched_model_held_on_the_gpu(host):
    from support.tiny_models import tiny_checkpoint
    from editkit.nodes.inversion import graph_replayable
    model, _, _ = tiny_checkpoint(0)
    assert not graph_replayable(model)            # the CPU: nothing to replay
    on_gpu = model.clone()
    on_gpu.load_device = torch.device("cuda")     # the policy only reads where the model is meant to run
    assert graph_replayable(on_gpu)
    patched = on_gpu.clone()
    patched.set_model_attn1_patch(lambda q, k, v, extra_options: (q, k, v))
    assert not graph_replayable(patched)
    lowvram = getattr(on_gpu.model, "model_lowvram", False)
    on_gpu.model.model_lowvram = True             # partially loaded: ComfyUI casts the rest per forward
    try:
        assert not graph_replayable(on_gpu)
    finally:
        on_gpu.model.model_lowvram = lowvram
    first_conv = next(m for m in on_gpu.model.diffusion_model.modules() if isinstance(m, torch.nn.Conv2d))
    first_conv.comfy_cast_weights = True          # what lowvram loading sets: weights move inside the forward
    try:
        assert not graph_replayable(on_gpu)
    finally:
        del first_conv.comfy_cast_weights


def test_eps_leaves_the_models_options_alone_and_takes_a_tensor_sigma(host):
    from support.tiny_models import tiny_checkpoint
    from editkit.nodes.inversion import ComfyEps
    model, clip, _ = tiny_checkpoint(0)
    eps = ComfyEps(model)
    before = dict(model.model_options["transformer_options"])
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    context = comfy_host.encode(clip, "a cat")[0][0]
    with torch.no_grad():
        as_float = eps(x, 3.0, context)
        as_tensor = eps(x, torch.tensor(3.0), context)
    assert model.model_options["transformer_options"] == before
    assert torch.equal(as_float, as_tensor)


def test_null_text_inner_step_reads_nothing_back_to_the_host(host):
    """What CUDA graph capture needs from ComfyUI's UNet and from our step, checked on the CPU."""
    from support.tiny_models import tiny_checkpoint
    from editkit.core.inversion import _InnerIteration
    from editkit.nodes.inversion import ComfyEps, autograd_usable_weights
    from support.host_reads import HostReads
    model, clip, _ = tiny_checkpoint(0)
    eps = ComfyEps(model)
    g = torch.Generator().manual_seed(0)
    x, eps_c, target = (torch.randn(4, 8, 8, generator=g) for _ in range(3))
    uncond = comfy_host.encode(clip, "")[0][0]
    inner = _InnerIteration(eps, x, uncond, 7.5)
    # as the node does: the cached tiny model may have been built under the executor's inference mode
    with autograd_usable_weights(model.model.diffusion_model):
        inner.start(x, eps_c, target, 3.0, 2.0, 1e-2)
        with pytest.raises(AssertionError, match="read back to the host: item"), HostReads(forbid=True):
            inner.run().item()                     # the guard works
        inner.start(x, eps_c, target, 3.0, 2.0, 1e-2)
        with torch.no_grad():
            inner.embedding.copy_(uncond)
        with HostReads(forbid=True):
            first = inner.run().clone()
            inner.run()
    assert 0 < first.item() and not torch.equal(inner.embedding.detach(), uncond)


@pytest.mark.parametrize("value", ["", "(no saved inversion yet)"])
def test_loading_before_anything_was_saved_says_what_to_do(host, value):
    prompt = _prompt("Inversion, reconstruct a photo.json")
    prompt[comfy_host.node_of(prompt, "EditKitNullTextInvert")] = {
        "class_type": "EditKitLoadInversion", "inputs": {"inversion_file": value}}
    with pytest.raises(comfy_host.HostError, match="inversion_file: no inversion has been saved yet; run a graph "
                                                   "with 'Save Inversion'"):
        comfy_host.run_prompt(prompt)


def test_the_inversion_guider_refuses_random_noise(host, tiny):
    """DisableNoise belongs with an inversion; random noise would edit another image (measured: a mean pixel
    difference of 31 in a real ComfyUI before this check)."""
    import comfy.samplers
    from editkit.nodes.inversion import InversionGuider
    model, clip, vae = tiny
    latent = {"samples": vae.encode(torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(1)))}
    noised, inversion, sigmas = invert(model, clip, latent, "direct", 4, "a photo")
    guider = InversionGuider.execute(model, inversion, encode(clip, "a photo"), 5.0).result[0]
    noise = torch.randn(noised.shape, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="noise: sampling from an inversion needs no added noise.*DisableNoise"):
        guider.sample(noise, noised, comfy.samplers.sampler_object("euler"), sigmas, disable_pbar=True, seed=0)
