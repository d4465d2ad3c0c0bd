"""Point Mask (P3S RNGR) inside the real ComfyUI, with a tiny CLIP vision model built by ComfyUI's own
ClipVisionModel (32 px inputs, 4 px patches: an 8x8 grid): the node reads the encoder's hidden states as the core
expects, its outputs, its errors, and the shipped workflow through the executor."""
import pytest
import torch
import torch.nn.functional as F

from support import comfy_host

NAME = "P3S, points to a subject mask.json"
SETTINGS = dict(positive_points="20,24", negative_points="", resolution={"resolution": "tiled", "tiles": 3},
                hidden_state="penultimate", smoothing=0.5, fill_region="outside_subject", fill="grey")


@pytest.fixture(scope="module")
def clip_vision(host):
    from support.tiny_models import make_comfy_clip_vision
    return make_comfy_clip_vision(0)


def _image(batch=1, height=48, width=64, seed=0):
    """Two bright squares on a dark ground, some noise: something for random weights to tell apart."""
    g = torch.Generator().manual_seed(seed)
    image = 0.15 + 0.05 * torch.rand(batch, height, width, 3, generator=g)
    image[:, 14:34, 8:28] = torch.tensor([0.9, 0.6, 0.2])
    image[:, 14:34, 38:58] = torch.tensor([0.2, 0.7, 0.9])
    return image


def _run(clip_vision, image, **overrides):
    from editkit.nodes.p3s import PointMaskRNGR
    return PointMaskRNGR.execute(image=image, clip_vision=clip_vision, **{**SETTINGS, **overrides}).result


def test_the_node_is_registered_with_tooltips_everywhere(host):
    from editkit.nodes.p3s import PointMaskRNGR
    assert host.NODE_CLASS_MAPPINGS["EditKitPointMaskRNGR"] is not None
    schema = PointMaskRNGR.define_schema()
    assert schema.display_name == "Point Mask (P3S RNGR)" and schema.category == "EditKit/P3S"
    inputs = list(schema.inputs)
    for i in schema.inputs:
        for option in getattr(i, "options", None) or []:
            inputs.extend(getattr(option, "inputs", None) or [])
    assert {i.id for i in inputs} >= {"image", "clip_vision", "positive_points", "negative_points", "resolution",
                                      "tiles", "hidden_state", "smoothing", "fill_region", "fill"}
    for item in inputs + list(schema.outputs):
        assert item.tooltip and len(item.tooltip) > 20, item


def test_the_tiny_encoder_is_a_comfyui_clip_vision_with_every_weight_set(clip_vision):
    import comfy.clip_vision
    assert isinstance(clip_vision, comfy.clip_vision.ClipVisionModel)
    for name, p in clip_vision.model.state_dict().items():   # (normalisation biases are 0 by choice)
        assert torch.isfinite(p.float()).all(), name
        assert "norm" in name or p.float().abs().sum() > 0, name
    out = clip_vision.encode_image(_image(), crop=False)
    assert out["penultimate_hidden_states"].shape == (1, 65, 32) and out["last_hidden_state"].shape == (1, 65, 32)


@pytest.mark.parametrize("resolution", [{"resolution": "coarse"}, {"resolution": "tiled", "tiles": 2},
                                        {"resolution": "tiled", "tiles": 3}], ids=["coarse", "tiled2", "tiled3"])
def test_outputs_have_the_image_size_and_the_fill_replaces_only_what_must_go(clip_vision, resolution):
    image = _image()
    before = image.clone()
    mask, filled, shown = _run(clip_vision, image, resolution=resolution)
    assert torch.equal(image, before)
    assert mask.shape == (1, 48, 64) and mask.dtype == torch.float32
    assert filled.shape == image.shape and shown.shape == (1, 48, 64, 3)
    assert set(mask.unique().tolist()) <= {0.0, 1.0} and 0 < mask.sum() < mask.numel()
    inside = mask[0] > 0
    assert torch.equal(filled[0][inside], image[0][inside]) and (filled[0][~inside] == 0.5).all()


def test_the_mask_is_the_core_pipeline_on_comfyuis_own_encoding(clip_vision):
    """Coarse: the features are the encoder's penultimate hidden state of the whole image, as ComfyUI's
    encode_image(crop=False) resizes it, without the class token, row by row."""
    from editkit.core.pointmask import parse_points, subject_mask
    image = _image()
    for hidden, key in (("penultimate", "penultimate_hidden_states"), ("last", "last_hidden_state")):
        tokens = clip_vision.encode_image(image, crop=False)[key].float()
        features = tokens[0, 1:].reshape(8, 8, 32)
        expected = subject_mask(features, parse_points("20,24", "p", 48, 64), (), (48, 64), 0.5).mask
        mask = _run(clip_vision, image, resolution={"resolution": "coarse"}, hidden_state=hidden)[0]
        assert torch.equal(mask[0] > 0, expected), hidden


def test_tiled_features_are_the_tiles_encodings_averaged(clip_vision):
    """2 tiles a side of a square image: a 12x12 grid, each tile's own 8x8 patch grid (encoded alone, from the
    image resized to 48 px) placed 4 cells apart; the overlaps are the mean of unit vectors."""
    from editkit.core.pointmask import tile_layout
    from editkit.nodes.p3s import patch_features
    image = _image(height=64, width=64)
    layout = tile_layout(64, 64, 8, 4, 2)
    assert layout.cells == (12, 12) and layout.size == (48, 48)
    resized = F.interpolate(image.movedim(-1, 1), size=(48, 48), mode="bicubic", antialias=True,
                            align_corners=False).clamp(0, 1).movedim(1, -1)
    total = torch.zeros(12, 12, 32)
    count = torch.zeros(12, 12, 1)
    for r in (0, 4):
        for c in (0, 4):
            crop = resized[:, 4 * r:4 * r + 32, 4 * c:4 * c + 32]
            tokens = clip_vision.encode_image(crop, crop=False)["penultimate_hidden_states"].float()
            total[r:r + 8, c:c + 8] += F.normalize(tokens[0, 1:].reshape(8, 8, 32), dim=-1)
            count[r:r + 8, c:c + 8] += 1
    got = patch_features(clip_vision, image, "penultimate", layout)
    assert got.shape == (1, 12, 12, 32)
    assert torch.allclose(got[0], total / count, atol=1e-5)


def test_a_batch_takes_the_same_points_and_runs_are_deterministic(clip_vision):
    image = torch.cat([_image(seed=1), _image(seed=2)])
    first = _run(clip_vision, image, negative_points="48,24", fill="mean")
    again = _run(clip_vision, image, negative_points="48,24", fill="mean")
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert first[0].shape == (2, 48, 64)
    alone = _run(clip_vision, image[1:], negative_points="48,24", fill="mean")
    assert torch.equal(alone[0][0], first[0][1])


def test_negative_subjects_fill_keeps_the_subject_and_the_rest_of_the_background(clip_vision):
    image = _image()
    mask, filled, _ = _run(clip_vision, image, negative_points="48,24", fill_region="negative_subjects")
    changed = (filled != image).any(dim=-1)[0]
    assert not (changed & (mask[0] > 0)).any()
    assert (filled[0][changed] == 0.5).all()


@pytest.mark.parametrize("overrides,message", [
    (dict(positive_points="70,10"), r"^positive_points: the point \(70, 10\) is outside the 64x48 image \(valid: "
                                    r"0 <= x < 64, 0 <= y < 48"),
    (dict(negative_points="5,50"), r"^negative_points: the point \(5, 50\) is outside"),
    (dict(positive_points=""), r"^positive_points: give at least one point"),
    (dict(positive_points="12"), r"^positive_points: cannot read '12' as a point"),
    (dict(negative_points='[{"x": 3}]'), r'^negative_points: item 0 .* needs "x" and "y"'),
    (dict(fill_region="negative_subjects"), r"^negative_points: fill_region negative_subjects"),
    (dict(fill="pink"), r"^fill: 'pink'"),
])
def test_bad_inputs_are_clear_errors(clip_vision, overrides, message):
    with pytest.raises(ValueError, match=message):
        _run(clip_vision, _image(), **overrides)


def test_an_encoder_without_a_patch_grid_or_of_another_kind_is_refused_for_its_reason(clip_vision):
    class Naflex:
        model_type, image_size, config = "siglip2_vision_model", 0, {"patch_size": 16}

    class Dinov2:   # 518 px inputs of 14 px patches: a square 37 x 37 grid, of an encoder the node does not read
        model_type, image_size, config = "dinov2", 518, {"patch_size": 14}

    class Uneven:
        model_type, image_size, config = "clip_vision_model", 230, {"patch_size": 14}
    with pytest.raises(ValueError, match="^clip_vision: this siglip2_vision_model has no fixed input size"):
        _run(Naflex(), _image())
    with pytest.raises(ValueError, match="^clip_vision: a dinov2 encoder is not supported; .* CLIP or SigLIP"):
        _run(Dinov2(), _image())
    with pytest.raises(ValueError, match="^clip_vision: its 230 px inputs are not a whole number of its 14 px"):
        _run(Uneven(), _image())


def _prompt():
    prompt = comfy_host.swap_clip_vision_loader(comfy_host.ui_to_api(
        comfy_host.load_workflow(comfy_host.REPO_ROOT / "workflows" / NAME)))
    node = prompt[comfy_host.node_of(prompt, "EditKitPointMaskRNGR")]["inputs"]
    node.update(positive_points="18,37", negative_points="46,37")   # the 512 px points, on the 64 px example photo
    return prompt


def test_shipped_settings(host):
    prompt = comfy_host.ui_to_api(comfy_host.load_workflow(comfy_host.REPO_ROOT / "workflows" / NAME))
    node = prompt[comfy_host.node_of(prompt, "EditKitPointMaskRNGR")]["inputs"]
    assert (node["positive_points"], node["negative_points"]) == ("150,300", "370,300")
    assert (node["resolution"], node["resolution.tiles"], node["hidden_state"], node["smoothing"]) == \
        ("tiled", 3, "penultimate", 0.5)
    assert (node["fill_region"], node["fill"]) == ("outside_subject", "grey")
    loader = prompt[comfy_host.node_of(prompt, "CLIPVisionLoader")]["inputs"]
    assert loader["clip_name"] == "model.safetensors"


def test_the_workflow_runs_in_the_executor(host):
    prompt = _prompt()
    result = comfy_host.run_prompt(prompt)
    node = comfy_host.node_of(prompt, "EditKitPointMaskRNGR")
    mask, filled, shown = result.outputs[node]
    assert mask.shape == (1, 64, 64) and filled.shape == (1, 64, 64, 3) and shown.shape == (1, 64, 64, 3)
    assert 0 < mask.sum() < mask.numel()
    for kind in ("PreviewImage", "MaskPreview", "SaveImage"):
        assert result.ui[comfy_host.node_of(prompt, kind)]["images"], kind
    saved = list(comfy_host.host_dirs()["output"].glob("editkit_p3s_reference*.png"))
    assert saved
    again = comfy_host.run_prompt(_prompt()).outputs[node]
    assert torch.equal(again[0], mask)


def test_the_executor_passes_the_resolution_settings(host, clip_vision):
    """The DynamicCombo's tiles reach the node: the executor's mask at 2 tiles is the direct call's."""
    prompt = _prompt()
    node = comfy_host.node_of(prompt, "EditKitPointMaskRNGR")
    prompt[node]["inputs"]["resolution.tiles"] = 2
    result = comfy_host.run_prompt(prompt)
    photo = result.outputs[comfy_host.node_of(prompt, "LoadImage")][0]
    points = dict(positive_points="18,37", negative_points="46,37")
    for tiles in (2, 3):
        direct = _run(clip_vision, photo, resolution={"resolution": "tiled", "tiles": tiles}, **points)[0]
        assert torch.equal(result.outputs[node][0], direct) == (tiles == 2)
