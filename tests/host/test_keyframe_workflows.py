"""The shipped Keyframe Attention workflows in the real ComfyUI executor, on the tiny model (128 px images)."""
import torch

from support import comfy_host

NAME = "Keyframe Attention, a batch of images sharing attention.json"


def _prompt():
    prompt = comfy_host.swap_checkpoint_loader(comfy_host.ui_to_api(
        comfy_host.load_workflow(comfy_host.REPO_ROOT / "workflows" / NAME)))
    for node in prompt.values():
        if node["class_type"] == "EmptyLatentImage":
            node["inputs"].update(width=128, height=128)
        elif node["class_type"] == "KSampler":
            node["inputs"]["steps"] = 3
    return prompt


def test_shipped_settings(host):
    prompt = comfy_host.ui_to_api(comfy_host.load_workflow(comfy_host.REPO_ROOT / "workflows" / NAME))
    keyframe = prompt[comfy_host.node_of(prompt, "EditKitKeyframeAttention")]["inputs"]
    assert keyframe["mode"] == "all" and keyframe["layers"] == "" and (keyframe["start_at"], keyframe["end_at"]) == (0, 1)
    assert prompt[comfy_host.node_of(prompt, "EmptyLatentImage")]["inputs"]["batch_size"] == 4


def test_the_batch_workflow_runs_and_shares_attention(host):
    prompt = _prompt()
    sampler = comfy_host.node_of(prompt, "KSampler")
    shared = comfy_host.run_prompt(prompt).outputs[sampler][0]["samples"]
    assert shared.shape == (4, 4, 16, 16) and torch.isfinite(shared).all()
    plain = _prompt()
    keyframe = comfy_host.node_of(plain, "EditKitKeyframeAttention")
    plain[sampler]["inputs"]["model"] = plain[keyframe]["inputs"]["model"]
    del plain[keyframe]
    alone = comfy_host.run_prompt(plain).outputs[sampler][0]["samples"]
    assert (shared - alone).abs().max() > 1e-3
