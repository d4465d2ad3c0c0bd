"""Tests of the ComfyUI host harness itself (tests/support/comfy_host.py)."""
import pathlib
import textwrap

import pytest
import torch

from support import comfy_host

THROWAWAY_PACK = textwrap.dedent(
    '''
    from comfy_api.latest import ComfyExtension, io


    class HarnessDouble(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(
                node_id="HarnessDouble",
                display_name="Harness Double",
                category="testing",
                is_output_node=True,
                inputs=[
                    io.Int.Input("value", default=1, min=0, max=1000),
                    io.Int.Input("seed", default=0, min=0, max=1000),
                    io.Combo.Input("mode", options=["twice", "thrice"], default="twice"),
                    io.Float.Input("scale", default=1.0),
                ],
                outputs=[io.Int.Output()],
            )

        @classmethod
        def execute(cls, value, seed, mode, scale):
            out = value * (2 if mode == "twice" else 3) + seed
            return io.NodeOutput(out, ui={"text": [str(out)]})


    class HarnessFail(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(
                node_id="HarnessFail",
                category="testing",
                is_output_node=True,
                inputs=[io.Int.Input("value", default=1)],
                outputs=[],
            )

        @classmethod
        def execute(cls, value):
            raise ValueError(f"harness boom {value}")


    class _Extension(ComfyExtension):
        async def get_node_list(self):
            return [HarnessDouble, HarnessFail]


    async def comfy_entrypoint():
        return _Extension()
    '''
)


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    comfy_host.require_host()
    pack = tmp_path_factory.mktemp("throwaway_pack")
    (pack / "__init__.py").write_text(THROWAWAY_PACK)
    return comfy_host._boot(tmp_path_factory.mktemp("comfy_host"), packs=(pack,))


# --- a hand-written UI workflow (what the front end saves) -------------------

def _ui_workflow(seed=42, steps=2):
    return {
        "last_node_id": 12,
        "last_link_id": 12,
        "nodes": [
            {"id": 4, "type": "CheckpointLoaderSimple", "mode": 0, "inputs": [],
             "outputs": [{"name": "MODEL", "type": "MODEL", "links": [1], "slot_index": 0},
                         {"name": "CLIP", "type": "CLIP", "links": [3, 5], "slot_index": 1},
                         {"name": "VAE", "type": "VAE", "links": [8], "slot_index": 2}],
             "widgets_values": ["v1-5-pruned-emaonly.safetensors"]},
            {"id": 6, "type": "CLIPTextEncode", "mode": 0,
             "inputs": [{"name": "clip", "type": "CLIP", "link": 3}],
             "outputs": [{"name": "CONDITIONING", "type": "CONDITIONING", "links": [4]}],
             "widgets_values": ["a photo of a cat sitting on a chair"]},
            {"id": 7, "type": "CLIPTextEncode", "mode": 0,
             "inputs": [{"name": "clip", "type": "CLIP", "link": 5}],
             "outputs": [{"name": "CONDITIONING", "type": "CONDITIONING", "links": [6]}],
             "widgets_values": ["blurry, low quality"]},
            {"id": 5, "type": "EmptyLatentImage", "mode": 0, "inputs": [],
             "outputs": [{"name": "LATENT", "type": "LATENT", "links": [2]}],
             "widgets_values": [64, 64, 1]},
            {"id": 3, "type": "KSampler", "mode": 0,
             "inputs": [{"name": "model", "type": "MODEL", "link": 1},
                        {"name": "positive", "type": "CONDITIONING", "link": 4},
                        {"name": "negative", "type": "CONDITIONING", "link": 6},
                        {"name": "latent_image", "type": "LATENT", "link": 2}],
             "outputs": [{"name": "LATENT", "type": "LATENT", "links": [7]}],
             "widgets_values": [seed, "randomize", steps, 7.0, "euler", "normal", 1.0]},
            {"id": 8, "type": "VAEDecode", "mode": 0,
             "inputs": [{"name": "samples", "type": "LATENT", "link": 7},
                        {"name": "vae", "type": "VAE", "link": 8}],
             "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [9]}],
             "widgets_values": []},
            {"id": 9, "type": "SaveImage", "mode": 0,
             "inputs": [{"name": "images", "type": "IMAGE", "link": 9}],
             "outputs": [], "widgets_values": ["harness"]},
            {"id": 12, "type": "Note", "mode": 0, "inputs": [], "outputs": [],
             "widgets_values": ["just a note"]},
        ],
        "links": [
            [1, 4, 0, 3, 0, "MODEL"],
            [2, 5, 0, 3, 3, "LATENT"],
            [3, 4, 1, 6, 0, "CLIP"],
            [4, 6, 0, 3, 1, "CONDITIONING"],
            [5, 4, 1, 7, 0, "CLIP"],
            [6, 7, 0, 3, 2, "CONDITIONING"],
            [7, 3, 0, 8, 0, "LATENT"],
            [8, 4, 2, 8, 1, "VAE"],
            [9, 8, 0, 9, 0, "IMAGE"],
        ],
        "groups": [],
        "config": {},
        "extra": {},
        "version": 0.4,
    }


def _tiny_prompt(seed=42):
    return comfy_host.swap_checkpoint_loader(comfy_host.ui_to_api(_ui_workflow(seed=seed)), seed=0)


# --- boot ---------------------------------------------------------------------

def test_boot_is_cpu_and_redirects_folders(host):
    import comfy.model_management as mm
    import folder_paths

    assert mm.is_device_cpu(mm.get_torch_device())
    comfy_root = comfy_host.comfyui_path()
    for name, getter in [("output", folder_paths.get_output_directory),
                         ("input", folder_paths.get_input_directory),
                         ("temp", folder_paths.get_temp_directory),
                         ("user", folder_paths.get_user_directory)]:
        d = pathlib.Path(getter()).resolve()
        assert d == comfy_host.host_dirs()[name]
        assert comfy_root not in d.parents, f"{name} dir inside the ComfyUI tree: {d}"
    # idempotent
    assert comfy_host.boot_comfy("/nonexistent/ignored") is host


def test_throwaway_v3_pack_loaded(host):
    assert "HarnessDouble" in host.NODE_CLASS_MAPPINGS
    assert host.NODE_DISPLAY_NAME_MAPPINGS["HarnessDouble"] == "Harness Double"
    assert "TinyCheckpointLoader" in host.NODE_CLASS_MAPPINGS
    assert "KSampler" in host.NODE_CLASS_MAPPINGS and "SaveImage" in host.NODE_CLASS_MAPPINGS


def test_load_pack_reports_failure(host, tmp_path):
    bad = tmp_path / "bad_pack"
    bad.mkdir()
    (bad / "__init__.py").write_text("raise ImportError('broken pack for the harness test')\n")
    with pytest.raises(RuntimeError, match="broken pack for the harness test"):
        comfy_host.load_pack(bad)


def test_boot_loads_this_pack(tmp_path_factory):
    comfy_host.require_host()
    if not (comfy_host.REPO_ROOT / "__init__.py").exists():
        pytest.skip("the pack has no __init__.py yet")
    nodes = comfy_host.boot(tmp_path_factory.mktemp("comfy_host_pack"))
    assert str(comfy_host.REPO_ROOT.resolve()) in {str(pathlib.Path(p).resolve()) for p in nodes.LOADED_MODULE_DIRS.values()}


# --- ui_to_api --------------------------------------------------------------------

def test_ui_to_api_maps_widgets_and_links(host):
    prompt = comfy_host.ui_to_api(_ui_workflow())
    assert "12" not in prompt  # Note dropped
    ks = prompt["3"]
    assert ks["class_type"] == "KSampler"
    assert ks["inputs"] == {
        "seed": 42, "steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
        "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0],
    }
    assert prompt["5"]["inputs"] == {"width": 64, "height": 64, "batch_size": 1}
    assert prompt["6"]["inputs"] == {"text": "a photo of a cat sitting on a chair", "clip": ["4", 1]}
    assert prompt["4"]["inputs"] == {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}
    assert prompt["9"]["inputs"] == {"filename_prefix": "harness", "images": ["8", 0]}


def test_ui_to_api_v3_node_and_linked_widget(host):
    wf = {
        "nodes": [
            {"id": 1, "type": "HarnessDouble", "mode": 0,
             "inputs": [{"name": "value", "type": "INT", "widget": {"name": "value"}, "link": 1}],
             "outputs": [{"name": "INT", "type": "INT", "links": []}],
             # value (linked, still has a slot), seed + its control value, mode, scale
             "widgets_values": [5, 3, "fixed", "thrice", 0.5]},
            {"id": 2, "type": "PrimitiveNode", "mode": 0, "inputs": [],
             "outputs": [{"name": "INT", "type": "INT", "links": [1], "widget": {"name": "value"}}],
             "widgets_values": [7, "fixed"]},
        ],
        "links": [[1, 2, 0, 1, 0, "INT"]],
    }
    prompt = comfy_host.ui_to_api(wf)
    assert list(prompt) == ["1"]
    assert prompt["1"]["inputs"] == {"value": 7, "seed": 3, "mode": "thrice", "scale": 0.5}
    result = comfy_host.run_prompt(prompt)
    assert result.outputs["1"] == (7 * 3 + 3,)
    assert result.ui["1"]["text"] == ["24"]


def test_ui_to_api_reroute_bypass_mute(host):
    wf = _ui_workflow()
    nodes = {n["id"]: n for n in wf["nodes"]}
    # Reroute between the loader's MODEL and the KSampler
    wf["nodes"].append({"id": 20, "type": "Reroute", "mode": 0,
                        "inputs": [{"name": "", "type": "*", "link": 1}],
                        "outputs": [{"name": "", "type": "MODEL", "links": [20]}]})
    wf["links"][0] = [1, 4, 0, 20, 0, "MODEL"]
    wf["links"].append([20, 20, 0, 3, 0, "MODEL"])
    nodes[3]["inputs"][0]["link"] = 20
    # a bypassed LatentUpscaleBy between EmptyLatentImage and the KSampler
    wf["nodes"].append({"id": 21, "type": "LatentUpscaleBy", "mode": 4,
                        "inputs": [{"name": "samples", "type": "LATENT", "link": 2}],
                        "outputs": [{"name": "LATENT", "type": "LATENT", "links": [21]}],
                        "widgets_values": ["nearest-exact", 1.5]})
    wf["links"][1] = [2, 5, 0, 21, 0, "LATENT"]
    wf["links"].append([21, 21, 0, 3, 3, "LATENT"])
    nodes[3]["inputs"][3]["link"] = 21
    # a muted PreviewImage
    wf["nodes"].append({"id": 22, "type": "PreviewImage", "mode": 2,
                        "inputs": [{"name": "images", "type": "IMAGE", "link": 22}], "outputs": []})
    wf["links"].append([22, 8, 0, 22, 0, "IMAGE"])

    prompt = comfy_host.ui_to_api(wf)
    assert "20" not in prompt and "21" not in prompt and "22" not in prompt
    assert prompt["3"]["inputs"]["model"] == ["4", 0]
    assert prompt["3"]["inputs"]["latent_image"] == ["5", 0]


def test_ui_to_api_unknown_node_type(host):
    wf = {"nodes": [{"id": 1, "type": "NoSuchNodeAnywhere", "mode": 0, "inputs": [], "outputs": []}], "links": []}
    with pytest.raises(KeyError, match="NoSuchNodeAnywhere"):
        comfy_host.ui_to_api(wf)


def test_swap_checkpoint_loader_does_not_mutate(host):
    prompt = comfy_host.ui_to_api(_ui_workflow())
    swapped = comfy_host.swap_checkpoint_loader(prompt, seed=3)
    assert prompt["4"]["class_type"] == "CheckpointLoaderSimple"
    assert swapped["4"] == {"class_type": "TinyCheckpointLoader", "inputs": {"seed": 3},
                            "_meta": prompt["4"]["_meta"]}


# --- run_prompt -----------------------------------------------------------------

def test_workflow_runs_and_saves_png(host):
    prompt = _tiny_prompt()
    result = comfy_host.run_prompt(prompt)
    latent = result.outputs["3"][0]["samples"]
    assert latent.shape == (1, 4, 8, 8) and torch.isfinite(latent).all()
    image = result.outputs["8"][0]
    assert image.shape == (1, 64, 64, 3)
    saved = result.ui["9"]["images"]
    assert len(saved) == 1 and saved[0]["type"] == "output"
    out_dir = comfy_host.host_dirs()["output"]
    png = out_dir / saved[0]["subfolder"] / saved[0]["filename"]
    assert png.is_file() and png.suffix == ".png"
    assert comfy_host.comfyui_path() not in png.resolve().parents
    assert any(e == "execution_success" for e, _ in result.status_messages)


def test_same_seed_same_latent(host):
    a = comfy_host.run_prompt(_tiny_prompt(seed=7)).outputs["3"][0]["samples"]
    b = comfy_host.run_prompt(_tiny_prompt(seed=7)).outputs["3"][0]["samples"]
    c = comfy_host.run_prompt(_tiny_prompt(seed=8)).outputs["3"][0]["samples"]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_invalid_prompt_raises_with_comfy_message(host):
    prompt = _tiny_prompt()
    prompt["3"]["inputs"]["sampler_name"] = "not_a_sampler"
    with pytest.raises(comfy_host.HostError) as info:
        comfy_host.run_prompt(prompt)
    msg = str(info.value)
    assert "Value not in list" in msg and "not_a_sampler" in msg
    assert "KSampler" in msg and "#3" in msg


def test_missing_node_type_raises(host):
    with pytest.raises(comfy_host.HostError, match="not found"):
        comfy_host.run_prompt({"1": {"class_type": "NoSuchNodeAnywhere", "inputs": {}}})


def test_execution_error_raises_with_node_and_message(host):
    with pytest.raises(comfy_host.HostError) as info:
        comfy_host.run_prompt({"5": {"class_type": "HarnessFail", "inputs": {"value": 3}}})
    msg = str(info.value)
    assert "harness boom 3" in msg and "#5" in msg and "HarnessFail" in msg
