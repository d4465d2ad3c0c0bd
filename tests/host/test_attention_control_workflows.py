"""The shipped Prompt-to-Prompt / MasaCtrl workflows in the real ComfyUI executor, on the tiny model."""
import pytest
import torch

from support import comfy_host

STEPS = 6
GENERATED = ["Prompt-to-Prompt, word swap.json", "Prompt-to-Prompt, refine by adding words.json", "Prompt-to-Prompt, reweight a word.json", "Prompt-to-Prompt, local blend.json"]
PHOTO = ["Prompt-to-Prompt, edit a real photo.json", "MasaCtrl, change the pose in a real photo.json"]


def _prompt(name, **controller_inputs):
    """A shipped workflow on the tiny model, shrunk for the CPU (64x64 image, few steps)."""
    wf = comfy_host.load_workflow(comfy_host.REPO_ROOT / "workflows" / name)
    for node in wf["nodes"]:
        if node["type"] == "EmptyLatentImage":
            assert node["widgets_values"][2] == 1   # a one-image latent: the guider makes the pair
    prompt = comfy_host.tiny_prompt(wf, STEPS)
    prompt[comfy_host.node_of(prompt, "EditKitAttentionController")]["inputs"].update(controller_inputs)
    return prompt


def _pair(prompt, result):
    """The sampler's LATENT: (source, target)."""
    samples = result.outputs[comfy_host.node_of(prompt, "SamplerCustomAdvanced")][0]["samples"]
    assert samples.shape[0] == 2, samples.shape
    assert torch.isfinite(samples).all()
    return samples[0], samples[1]


def test_shipped_workflows_use_the_full_size_settings(host):
    for name in GENERATED + PHOTO:
        prompt = comfy_host.ui_to_api(comfy_host.load_workflow(comfy_host.REPO_ROOT / "workflows" / name))
        assert prompt[comfy_host.node_of(prompt, "CheckpointLoaderSimple")]["inputs"]["ckpt_name"] == "v1-5-pruned-emaonly.safetensors"
        controller = prompt[comfy_host.node_of(prompt, "EditKitAttentionController")]["inputs"]
        assert controller["cfg"] == 7.5
        if controller["edit"] != "masactrl":
            assert controller["edit.cross_max_resolution"] == 0          # every layer, as the paper's code
            # the paper's real-image code: self-attention up to 32x32, the blend from step int(0.2 N) on
            assert controller["edit.self_max_resolution"] == (32 if name in PHOTO else 16)
            if name in PHOTO:
                assert controller["edit.blend_start"] == 0.2
        if name in PHOTO:
            invert = comfy_host.node_of(prompt, "EditKitNullTextInvert")
            assert prompt[invert]["inputs"]["steps"] == 50 and prompt[invert]["inputs"]["guidance"] == 7.5
            assert controller["inversion"] == [invert, 1]
            # the controller's source prompt is the text the photo was inverted with
            positive = prompt[invert]["inputs"]["positive"][0]
            assert prompt[positive]["inputs"]["text"] == controller["source_prompt"]
            sampler = prompt[comfy_host.node_of(prompt, "SamplerCustomAdvanced")]["inputs"]
            assert sampler["sigmas"] == [invert, 2] and sampler["latent_image"] == [invert, 0]
            assert prompt[sampler["noise"][0]]["class_type"] == "DisableNoise"
        else:
            latent = prompt[comfy_host.node_of(prompt, "EmptyLatentImage")]["inputs"]
            assert (latent["width"], latent["height"], latent["batch_size"]) == (512, 512, 1)
            assert prompt[comfy_host.node_of(prompt, "BasicScheduler")]["inputs"]["steps"] == 50
            assert "inversion" not in controller


@pytest.mark.parametrize("name", GENERATED + PHOTO)
def test_workflow_edits_the_target_and_keeps_the_source(host, name):
    prompt = _prompt(name)
    result = comfy_host.run_prompt(prompt)
    source, target = _pair(prompt, result)
    assert (target - source).abs().max() > 1e-3, "the edit changed nothing"
    images = result.ui[comfy_host.node_of(prompt, "SaveImage")]["images"]
    assert len(images) == 2
    if name == "MasaCtrl, change the pose in a real photo.json":
        # direct inversion: the source branch reconstructs the photo's latent exactly
        photo = result.outputs[comfy_host.node_of(prompt, "VAEEncode")][0]["samples"]
        assert (source - photo[0]).abs().max() < 1e-4


IDENTITY = {
    "Prompt-to-Prompt, word swap.json": {"edit.word_windows": ""},
    "Prompt-to-Prompt, refine by adding words.json": {},
    "Prompt-to-Prompt, reweight a word.json": {"edit.reweight": "fluffy: 1"},
    "Prompt-to-Prompt, local blend.json": {"edit.blend_words": "bicycle"},
}


@pytest.mark.parametrize("name", GENERATED)
def test_identity_edit_reproduces_the_source(host, name):
    wf_prompt = _prompt(name)
    source_prompt = wf_prompt[comfy_host.node_of(wf_prompt, "EditKitAttentionController")]["inputs"]["source_prompt"]
    prompt = _prompt(name, target_prompt=source_prompt, **IDENTITY[name])
    source, target = _pair(prompt, comfy_host.run_prompt(prompt))
    assert (target - source).abs().max() < 1e-5


def test_more_targets_are_edited_in_the_same_run(host):
    """Targets connected to more_targets (an Autogrow of text sockets) each get their own token map; the output
    holds the source and every target."""
    name = "Prompt-to-Prompt, refine by adding words.json"
    prompt = _prompt(name)
    controller = comfy_host.node_of(prompt, "EditKitAttentionController")
    source_prompt = prompt[controller]["inputs"]["source_prompt"]
    prompt["900"] = {"class_type": "PrimitiveStringMultiline", "inputs": {"value": source_prompt}}
    prompt["901"] = {"class_type": "PrimitiveStringMultiline", "inputs": {"value": source_prompt + " at night"}}
    prompt[controller]["inputs"].update({"more_targets.target_0": ["900", 0], "more_targets.target_1": ["901", 0]})
    result = comfy_host.run_prompt(prompt)
    samples = result.outputs[comfy_host.node_of(prompt, "SamplerCustomAdvanced")][0]["samples"]
    assert samples.shape[0] == 4 and torch.isfinite(samples).all()
    assert (samples[2] - samples[0]).abs().max() < 1e-5            # the source prompt as a target: the source
    assert (samples[3] - samples[0]).abs().max() > 1e-3
    assert (samples[1] - samples[3]).abs().max() > 1e-3            # each target its own edit
