"""The shipped Latent Fuser workflows in the real ComfyUI executor, on the tiny model, shrunk 4x (windows of
128 px: the tiny model's 16x16 latents)."""
import pytest
import torch

from support import comfy_host

STEPS = 3
SHRINK = 4
WORKFLOWS = ["Latent Fuser, panorama.json", "Latent Fuser, 360-degree panorama.json",
             "Latent Fuser, region prompts.json", "Latent Fuser, tiled refine of a large image.json",
             "Latent Fuser, SyncDiffusion panorama.json"]
LPIPS_FILE = "vgg_lpips.safetensors"   # the name tools/make_lpips_weights.py writes, here with random weights


pytestmark = pytest.mark.usefixtures("lpips_weights")   # random LPIPS weights under LPIPS_FILE (conftest)


def _prompt(name):
    wf = comfy_host.load_workflow(comfy_host.REPO_ROOT / "workflows" / name)
    prompt = comfy_host.swap_checkpoint_loader(comfy_host.ui_to_api(wf))
    for node in prompt.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "EditKitLatentFuser":
            inputs.update(window=inputs["window"] // SHRINK, stride=max(8, inputs["stride"] // SHRINK))
            if "SyncDiffusion" in name:   # one synchronised step of 3, over fewer windows, to keep it short
                inputs.update({"stride": 64, "mode.sync_until": 0.34})
        elif kind in ("EmptyLatentImage", "SolidMask"):
            inputs.update(width=inputs["width"] // SHRINK, height=inputs["height"] // SHRINK)
        elif kind == "MaskComposite":
            inputs.update(x=inputs["x"] // SHRINK, y=inputs["y"] // SHRINK)
        elif kind == "KSampler":
            inputs["steps"] = STEPS
        elif kind in ("VAEEncodeTiled", "VAEDecodeTiled"):
            inputs.update(tile_size=128, overlap=32)
        elif kind == "ImageScaleBy":
            inputs["scale_by"] = 4.0   # the 64 px example photo to 256 px: 3x3 windows of 128 px every 64 px
    return prompt


def _latent(prompt, result):
    return result.outputs[comfy_host.node_of(prompt, "KSampler")][0]["samples"]


def test_shipped_settings_are_the_papers(host):
    for name in WORKFLOWS:
        prompt = comfy_host.ui_to_api(comfy_host.load_workflow(comfy_host.REPO_ROOT / "workflows" / name))
        fuser = prompt[comfy_host.node_of(prompt, "EditKitLatentFuser")]["inputs"]
        sampler = prompt[comfy_host.node_of(prompt, "KSampler")]["inputs"]
        assert fuser["window"] == 512 and sampler["cfg"] == 7.5
        if "SyncDiffusion" in name:   # the paper's sample_syncdiffusion.sh
            assert fuser["stride"] == 128 and fuser["mode"] == "syncdiffusion" and fuser["vae"]
            assert (fuser["mode.sync_weight"], fuser["mode.sync_decay"], fuser["mode.sync_until"],
                    fuser["mode.sync_every"], fuser["mode.lpips"]) == (20.0, 0.95, 0.2, 1, LPIPS_FILE)
        elif "refine" not in name:
            assert fuser["stride"] == 64 and sampler["steps"] == 50 and sampler["sampler_name"] == "ddim"
        assert fuser["circular"] == ("360" in name)


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_runs_and_samples_the_whole_latent(host, name):
    prompt = _prompt(name)
    result = comfy_host.run_prompt(prompt)
    latent = _latent(prompt, result)
    assert torch.isfinite(latent).all()
    if "refine" in name:
        assert latent.shape[-2:] == (32, 32)
    else:
        empty = prompt[comfy_host.node_of(prompt, "EmptyLatentImage")]["inputs"]
        assert latent.shape[-2:] == (empty["height"] // 8, empty["width"] // 8)
    images = result.ui[comfy_host.node_of(prompt, "SaveImage")]["images"]
    assert len(images) == 1


def _change_of_the_fuser_setting(name, change):
    """Largest difference of the sampled latent between the workflow and the same workflow with its fuser's
    inputs changed by `change`."""
    shipped = _latent(prompt := _prompt(name), comfy_host.run_prompt(prompt))
    changed = _prompt(name)
    change(changed[comfy_host.node_of(changed, "EditKitLatentFuser")]["inputs"])
    return (shipped - _latent(changed, comfy_host.run_prompt(changed))).abs().max()


def test_the_regions_change_the_panorama_inside_their_masks(host):
    def drop_regions(fuser):
        for key in [k for k in fuser if k.startswith("regions.")]:
            del fuser[key]
    assert _change_of_the_fuser_setting("Latent Fuser, region prompts.json", drop_regions) > 1e-3


def test_the_syncdiffusion_workflow_synchronises(host):
    def plain_multidiffusion(fuser):
        for key in [k for k in fuser if k.startswith("mode.")]:
            del fuser[key]
        fuser["mode"] = "multidiffusion"
    assert _change_of_the_fuser_setting("Latent Fuser, SyncDiffusion panorama.json", plain_multidiffusion) > 1e-3
