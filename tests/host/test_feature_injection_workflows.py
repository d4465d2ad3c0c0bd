"""The shipped Plug-and-Play workflows in the real ComfyUI executor, on the tiny model (and a tiny ControlNet)."""
import pytest
import torch

from support import comfy_host

STEPS = 6
PLAIN = "Plug-and-Play, translate a photo.json"
CONTROLNET = "Plug-and-Play, translate a photo with depth ControlNet.json"
WORKFLOWS = [PLAIN, CONTROLNET]
CONTROLNET_FILE = "control_v11f1p_sd15_depth_fp16.safetensors"   # the name the shipped workflow loads
DEPTH_MAP = "example_depth.png"
NEGATIVE = "ugly, blurry, black, low res, unrealistic"


def _write_depth_map(size: int = 64) -> None:
    """A synthetic depth map (near in the middle, far at the edges), grey as a depth preprocessor gives it."""
    import numpy as np
    from PIL import Image
    y, x = np.mgrid[0:size, 0:size] / (size - 1.0)
    depth = np.clip(1.0 - 1.6 * np.hypot(x - 0.5, y - 0.4), 0.0, 1.0)
    Image.fromarray((np.repeat(depth[..., None], 3, axis=-1) * 255).astype(np.uint8)).save(
        comfy_host.host_dirs()["input"] / DEPTH_MAP)


@pytest.fixture(scope="module")
def host(host):
    """The shared host, with the ControlNet workflow's depth map in its input folder too."""
    _write_depth_map()
    return host


@pytest.fixture(scope="module")
def controlnet_folder(host, tmp_path_factory):
    """The tiny ControlNet under the shipped workflow's file name, in a folder ComfyUI's ControlNetLoader lists
    first (the ComfyUI tree stays untouched); the folder is unregistered afterwards."""
    import folder_paths
    from support.tiny_models import save_tiny_controlnet
    folder = tmp_path_factory.mktemp("controlnet")
    save_tiny_controlnet(folder, seed=0, name=CONTROLNET_FILE)
    folder_paths.add_model_folder_path("controlnet", str(folder), is_default=True)
    yield folder
    folder_paths.folder_names_and_paths["controlnet"][0].remove(str(folder))
    folder_paths.filename_list_cache.pop("controlnet", None)


def _workflow(name):
    return comfy_host.load_workflow(comfy_host.REPO_ROOT / "workflows" / name)


def _prompt(name, target=None, negative=None, **injector_inputs):
    """A shipped workflow on the tiny model, shrunk for the CPU (the 64x64 photo, few steps)."""
    prompt = comfy_host.tiny_prompt(_workflow(name), STEPS)
    injector = prompt[comfy_host.node_of(prompt, "EditKitFeatureInjector")]["inputs"]
    injector.update(injector_inputs)
    for text, port in ((target, "positive"), (negative, "negative")):
        if text is not None:
            encoder = _text_encoder(prompt, injector[port])
            prompt[encoder]["inputs"]["text"] = text
    return prompt


def _text_encoder(prompt, link):
    """The CLIPTextEncode behind a conditioning link (through Apply ControlNet)."""
    node, slot = link
    if prompt[node]["class_type"] == "ControlNetApplyAdvanced":
        return _text_encoder(prompt, prompt[node]["inputs"][("positive", "negative")[slot]])
    assert prompt[node]["class_type"] == "CLIPTextEncode"
    return node


def _run(prompt):
    """(source, translation, photo latent) of one run."""
    result = comfy_host.run_prompt(prompt)
    samples = result.outputs[comfy_host.node_of(prompt, "SamplerCustomAdvanced")][0]["samples"]
    assert samples.shape[0] == 2, samples.shape
    assert torch.isfinite(samples).all()
    assert len(result.ui[comfy_host.node_of(prompt, "SaveImage")]["images"]) == 2
    photo = result.outputs[comfy_host.node_of(prompt, "VAEEncode")][0]["samples"]
    return samples[0], samples[1], photo[0]


@pytest.fixture(scope="module")
def shipped_runs(host, controlnet_folder):
    """Each shipped workflow as shipped, run once for the module."""
    return {name: _run(_prompt(name)) for name in WORKFLOWS}


def test_shipped_workflows_use_the_full_size_settings(host):
    for name in WORKFLOWS:
        wf = _workflow(name)
        prompt = comfy_host.ui_to_api(wf)
        assert prompt[comfy_host.node_of(prompt, "CheckpointLoaderSimple")]["inputs"]["ckpt_name"] == "v1-5-pruned-emaonly.safetensors"
        invert = comfy_host.node_of(prompt, "EditKitNullTextInvert")
        inputs = prompt[invert]["inputs"]
        assert (inputs["mode"], inputs["steps"], inputs["guidance"], inputs["scheduler"]) == ("direct", 50, 7.5, "ddim_uniform")
        # the photo is inverted with the empty prompt, which is also its unconditional prompt
        assert inputs["positive"] == inputs["negative"]
        assert prompt[inputs["positive"][0]]["inputs"]["text"] == ""
        injector = prompt[comfy_host.node_of(prompt, "EditKitFeatureInjector")]["inputs"]
        assert {k: injector[k] for k in ("feature_layers", "feature_until", "attention_layers", "attention_until",
                                         "strength", "cfg")} == dict(feature_layers="4", feature_until=0.8,
                                                                     attention_layers="4-11", attention_until=0.5,
                                                                     strength=1.0, cfg=7.5)
        assert injector["inversion"] == [invert, 1]
        assert injector["model"] == prompt[invert]["inputs"]["model"]
        assert prompt[_text_encoder(prompt, injector["positive"])]["inputs"]["text"] == "a photo of a marble sculpture"
        assert prompt[_text_encoder(prompt, injector["negative"])]["inputs"]["text"] == NEGATIVE
        sampler = prompt[comfy_host.node_of(prompt, "SamplerCustomAdvanced")]["inputs"]
        assert sampler["sigmas"] == [invert, 2] and sampler["latent_image"] == [invert, 0]
        assert prompt[sampler["noise"][0]]["class_type"] == "DisableNoise"
        assert prompt[sampler["sampler"][0]]["inputs"]["sampler_name"] == "ddim"
        assert prompt[sampler["guider"][0]]["class_type"] == "EditKitFeatureInjector"
        notes = [n for n in wf["nodes"] if n["type"] == "MarkdownNote"]
        assert len(notes) == 1 and "Tumanyan" in notes[0]["widgets_values"][0]
        # every node runs as shipped: a workflow named for its ControlNet uses it
        assert all(n.get("mode", 0) == 0 for n in wf["nodes"])
        if name == CONTROLNET:
            apply = comfy_host.node_of(prompt, "ControlNetApplyAdvanced")
            assert injector["positive"] == [apply, 0] and injector["negative"] == [apply, 1]
            settings = prompt[apply]["inputs"]
            assert (settings["strength"], settings["start_percent"], settings["end_percent"]) == (0.8, 0.0, 1.0)
            assert prompt[settings["control_net"][0]]["inputs"]["control_net_name"] == CONTROLNET_FILE
            assert prompt[settings["image"][0]]["inputs"]["image"] == DEPTH_MAP
        else:
            assert "ControlNetApplyAdvanced" not in {n["class_type"] for n in prompt.values()}


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_reconstructs_the_photo_and_translates_it(shipped_runs, name):
    source, translation, photo = shipped_runs[name]
    assert (source - photo).abs().max() < 1e-4   # direct inversion: the source branch is the photo
    assert (translation - source).abs().max() > 1e-3, "the translation changed nothing"


@pytest.mark.parametrize("name", WORKFLOWS)
def test_the_source_is_the_photo_whatever_the_translation(host, controlnet_folder, name):
    """The source row is pinned to the photo's inversion, even when the translation's prompt is the photo's."""
    prompt = _prompt(name, target="", negative="", feature_until=1.0, attention_until=1.0)
    source, translation, photo = _run(prompt)
    assert (source - photo).abs().max() < 1e-4
    assert torch.isfinite(translation).all()


def test_the_controlnet_workflow_conditions_the_translation_with_its_controlnet(shipped_runs, controlnet_folder):
    """The two workflows differ only by the ControlNet branch: it moves the translation and not the photo's
    reconstruction, and at strength 0 (Apply ControlNet passes the prompts on unchanged) the translation is the
    plain workflow's."""
    source, translation, photo = shipped_runs[CONTROLNET]
    assert (source - photo).abs().max() < 1e-4
    plain = shipped_runs[PLAIN][1]
    assert (translation - plain).abs().max() > 1e-4, "the ControlNet changed nothing"
    off = _prompt(CONTROLNET)
    off[comfy_host.node_of(off, "ControlNetApplyAdvanced")]["inputs"]["strength"] = 0.0
    assert torch.equal(_run(off)[1], plain)
