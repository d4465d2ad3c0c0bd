"""The toy world without ComfyUI (seconds): deterministic scenes with exact masks, a fixed held-out split, an
evaluator that reads every ground-truth render right, and committed weight files that exist. Loading the weights
into the ComfyUI models is tests/host/test_toyworld_host.py."""
import json
import struct

import numpy as np
import pytest

from toyworld import evaluate, world
from toyworld.train import CLIP_FILE, UNET_FILE, VAE_FILE, WEIGHTS


def test_world_has_every_combination_and_captions_parse_back():
    scenes = world.all_scenes()
    assert len(scenes) == len(set(scenes)) == 6 * 3 * 5 * 2 * 3
    for s in scenes:
        assert world.parse_caption(s.caption) == s
    assert world.all_scenes()[0].caption == "a big red circle on the left, grey background"
    with pytest.raises(ValueError):
        world.parse_caption("a big red dog on the left, grey background")


def test_held_out_split_is_fixed_disjoint_and_covers_every_value():
    assert len(world.HELD_OUT) == 54 and len(world.TRAIN) == 486
    assert not set(world.HELD_OUT_CAPTIONS) & set(world.TRAIN_CAPTIONS)
    assert world._split() == (world.TRAIN, world.HELD_OUT)          # a fixed seed, not the run's randomness
    assert world.HELD_OUT_CAPTIONS[0] == "a big red circle on the right, grey background"
    for attr in world.ATTRIBUTES:
        seen = {getattr(s, attr) for s in world.TRAIN}
        assert {getattr(s, attr) for s in world.HELD_OUT} <= seen


def test_render_is_deterministic_and_seeds_jitter():
    cap = world.HELD_OUT_CAPTIONS[0]
    a, b, c = world.render(cap, 3), world.render(cap, 3), world.render(cap, 4)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert not np.array_equal(a.mask, c.mask)
    assert a.image.shape == (64, 64, 3) and a.image.dtype == np.float32 and a.mask.dtype == bool


@pytest.mark.parametrize("scene", world.all_scenes()[::7], ids=lambda s: s.caption)
def test_mask_is_exactly_the_object_pixels(scene):
    r = world.render(scene, seed=11)
    obj = np.asarray(world.COLOURS[scene.colour], np.float32) / 255
    bg = np.asarray(world.BACKGROUNDS[scene.background], np.float32) / 255
    assert np.all(r.image[r.mask] == obj) and np.all(r.image[~r.mask] == bg)
    ys, xs = np.nonzero(r.mask)
    cx, cy = world.POSITIONS[scene.position][1]
    assert abs(xs.mean() + 0.5 - r.centre[0]) < 1.5 and abs(r.centre[0] - cx) <= world.POSITION_JITTER
    assert abs(r.centre[1] - cy) <= world.POSITION_JITTER
    area = {"circle": np.pi, "square": 4 * 0.81, "triangle": 2.0}[scene.shape] * r.radius ** 2
    assert abs(r.mask.sum() - area) < 0.12 * area + 4


def test_evaluator_reads_every_ground_truth_render_right():
    scenes = world.all_scenes()
    images = np.stack([world.render(s, seed=k % 5).image for k, s in enumerate(scenes)])
    result = evaluate.score_batch(images, [s.caption for s in scenes])
    assert result == {a: 1.0 for a in (*world.ATTRIBUTES, "all")}


def test_evaluator_tells_wrong_captions_apart():
    r = world.render("a big red circle on the left, grey background", seed=0)
    assert evaluate.score(r.image, "a small blue square on the right, white background") == {
        "colour": False, "shape": False, "position": False, "size": False, "background": False}
    assert evaluate.score(r.image, "a big red triangle on the left, grey background")["shape"] is False
    empty = np.full((64, 64, 3), 0.5, np.float32)
    s = evaluate.score(empty, "a big red circle on the left, grey background")
    assert s["background"] and not any(s[a] for a in ("colour", "shape", "position", "size"))


def test_evaluator_takes_comfy_image_tensors():
    torch = pytest.importorskip("torch")
    r = world.render(world.HELD_OUT_CAPTIONS[5], seed=2)
    assert all(evaluate.score(torch.from_numpy(r.image)[None], world.HELD_OUT_CAPTIONS[5]).values())


def _safetensors_header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))


def test_committed_weights_exist_and_are_small_float32_safetensors():
    total = 0
    for name in (UNET_FILE, CLIP_FILE, VAE_FILE):
        path = WEIGHTS / name
        assert path.is_file(), f"missing {path}: train with tests/toyworld/train.py (README)"
        header = _safetensors_header(path)
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        assert tensors and all(v["dtype"] == "F32" for v in tensors.values())
        total += path.stat().st_size
    assert total < 30 * 2 ** 20
