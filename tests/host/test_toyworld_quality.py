"""What each edit does on a model that understands its words: the toy-world checkpoint (tests/toyworld), scored by
the world's evaluator against ground truth (issue 16).

Each method is measured once (a module fixture, printed with pytest -s) and tested twice: against its own
baseline (plain sampling, injection off, DDIM), and against issue 16's target. The thresholds are the issue's;
where the committed model falls short, the target test is a strict xfail that names the measured value (it
fails the run once the target is reached, so the mark is removed then). A shortfall is a finding about the
method on this model (tests/toyworld/README.md, "What the edits do"), never a reason to move a threshold."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from support.comfy_host import encode
from toyworld import evaluate, world

STEPS = 30
SHORT = dict(strict=True, raises=AssertionError)   # a measured shortfall (see the module docstring)
CFG = 6.0
LATENT = world.IMAGE_SIZE // 8


@pytest.fixture(scope="module")
def toy(host):
    from support.tiny_models import toyworld_checkpoint
    return toyworld_checkpoint(os.environ.get("TOYWORLD_WEIGHTS") or None)   # another folder: compare retrainings


def _images(vae, samples) -> torch.Tensor:
    with torch.no_grad():
        return vae.decode(samples.detach()).reshape(-1, world.IMAGE_SIZE, world.IMAGE_SIZE, 3).float().cpu()


def _noise(seed: int, rows: int = 1) -> torch.Tensor:
    import comfy.sample
    return comfy.sample.prepare_noise(torch.zeros(rows, 4, LATENT, LATENT), seed)


def _ddim_sigmas(model, steps=STEPS):
    import comfy.samplers
    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "ddim_uniform", steps).cpu()


def _sample(guider, noise, sigmas, latent=None):
    import comfy.samplers
    latent = torch.zeros_like(noise) if latent is None else latent
    return guider.sample(noise, latent, comfy.samplers.sampler_object("ddim"), sigmas, disable_pbar=True, seed=0)


def _plain(model, clip, caption, noise, cfg=CFG):
    """What KSampler (ddim, ddim_uniform) gives the caption from this noise."""
    import comfy.sample
    return comfy.sample.sample(model, noise, STEPS, cfg, "ddim", "ddim_uniform", encode(clip, caption),
                               encode(clip, ""), torch.zeros_like(noise), disable_pbar=True, seed=0)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def _mask(image) -> np.ndarray:
    return evaluate.segment(image)["mask"]


def _render_latent(vae, caption, seed):
    r = world.render(caption, seed)
    image = torch.from_numpy(r.image)[None]
    return r, image, {"samples": vae.encode(image)}


# ---------------------------------------------------------------------------------------------------------------
# inversion (Mokady et al. 2023; Ju et al. 2024)
# ---------------------------------------------------------------------------------------------------------------

INVERSION_CAPTIONS = world.HELD_OUT_CAPTIONS[::18]      # 3 held-out scenes, freshly rendered (unseen)
INVERSION_GUIDANCE = 7.5


def _reconstruct(toy, caption, seed, mode):
    from editkit.nodes.inversion import InversionGuider, NullTextInvert
    model, clip, vae = toy
    r, image, latent = _render_latent(vae, caption, seed)
    noised, inversion, sigmas = NullTextInvert.execute(
        model, encode(clip, caption), encode(clip, ""), latent, mode, STEPS, "ddim_uniform", INVERSION_GUIDANCE,
        10, 0.01, 1e-5).result
    guider = InversionGuider.execute(model, inversion, encode(clip, caption), INVERSION_GUIDANCE).result[0]
    out = _sample(guider, torch.zeros_like(noised["samples"]), sigmas, noised["samples"])
    return evaluate.psnr(_images(vae, out), image), evaluate.psnr(_images(vae, latent["samples"]), image)


@pytest.fixture(scope="module")
def inversion(toy):
    """Mean PSNR (dB) of the decoded reconstructions of unseen renders, per mode, and of their VAE round trips
    (what any latent method is bounded by)."""
    psnr = {m: [] for m in ("ddim", "null_text", "direct")}
    bound = []
    for k, caption in enumerate(INVERSION_CAPTIONS):
        for mode in psnr:
            got, vae_bound = _reconstruct(toy, caption, 500 + k, mode)
            psnr[mode].append(got)
        bound.append(vae_bound)
    mean = {m: float(np.mean(v)) for m, v in psnr.items()}
    mean["round_trip"] = float(np.mean(bound))
    print(f"\ninversion, {len(INVERSION_CAPTIONS)} unseen renders, {STEPS} steps, guidance {INVERSION_GUIDANCE}: "
          + ", ".join(f"{m} {v:.2f} dB" for m, v in mean.items()))
    return mean


def test_null_text_and_direct_inversion_reach_the_vae_round_trip(inversion):
    assert inversion["null_text"] > inversion["round_trip"] - 1.0
    assert inversion["direct"] > inversion["round_trip"] - 1.0


def test_ddim_inversion_falls_short_of_the_vae_round_trip_at_guidance_7_5(inversion):
    """The gap null-text and direct inversion exist to close (Mokady et al. 2023, sec. 3)."""
    assert inversion["ddim"] < inversion["round_trip"] - 1.0


# ---------------------------------------------------------------------------------------------------------------
# Prompt-to-Prompt (Hertz et al. 2022)
# ---------------------------------------------------------------------------------------------------------------

SWAP_PAIRS = [("a big red circle on the left, grey background", "blue"),
              ("a big green square on the right, white background", "purple"),
              ("a big yellow triangle in the middle, black background", "red"),
              ("a big blue circle at the top, grey background", "yellow"),
              ("a big pink square at the bottom, white background", "green")]
SWAP_SEEDS = range(4)


def _swap(caption: str, colour: str) -> str:
    scene = world.parse_caption(caption)
    return caption.replace(f" {scene.colour} ", f" {colour} ", 1)


def _swap_guider(model, clip, source, colour, **settings):
    from support.node_calls import attention_controller
    return attention_controller(model, clip, edit="word_swap", source_prompt=source,
                                target_prompt=_swap(source, colour), cfg=CFG, **settings)


def _noises(seeds) -> torch.Tensor:
    """One row per seed, each the noise _noise(seed) gives: sampled as one batch."""
    return torch.cat([_noise(seed) for seed in seeds])


@pytest.fixture(scope="module")
def swap_pairs(toy):
    """(source, edit) images of each swap at the node's defaults, per (caption, colour, seed); word swap and
    local blend's no-blend baseline read the same samples."""
    model, clip, vae = toy
    pairs = {}
    for source, colour in SWAP_PAIRS:
        guider = _swap_guider(model, clip, source, colour)
        for seed in SWAP_SEEDS:
            pairs[source, colour, seed] = _images(vae, _sample(guider, _noise(seed), _ddim_sigmas(model)))
    return pairs


@pytest.fixture(scope="module")
def word_swap(toy, swap_pairs):
    """Word swap at the node's defaults ("red circle" -> "blue circle"), 20 edits: the fraction whose object took
    the new colour, and the mean mask IoU of the object with the source's, for the edit and for plain sampling
    of the target prompt from the same noise."""
    model, clip, vae = toy
    changed, iou_edit, iou_plain = [], [], []
    for source, colour in SWAP_PAIRS:
        plain = _images(vae, _plain(model, clip, _swap(source, colour), _noises(SWAP_SEEDS)))
        for seed, alone in zip(SWAP_SEEDS, plain):
            pair = swap_pairs[source, colour, seed]
            src, edit, alone = (evaluate.segment(x) for x in (pair[0], pair[1], alone))
            changed.append(edit["colour"] == colour)
            iou_edit.append(_iou(src["mask"], edit["mask"]))
            iou_plain.append(_iou(src["mask"], alone["mask"]))
    found = {"changed": float(np.mean(changed)), "iou": float(np.mean(iou_edit)),
             "iou_plain": float(np.mean(iou_plain))}
    print(f"\nword swap, {len(changed)} edits: colour changed {found['changed']:.0%}, mask IoU with the source "
          f"{found['iou']:.3f} (plain sampling of the target prompt: {found['iou_plain']:.3f})")
    return found


def test_word_swap_changes_the_colour(word_swap):
    assert word_swap["changed"] >= 0.95


def test_word_swap_keeps_the_object_better_than_plain_sampling(word_swap):
    assert word_swap["iou"] > word_swap["iou_plain"]


@pytest.mark.xfail(**SHORT, reason="measured IoU 0.71 (plain sampling 0.70): the toy model draws the object from "
                                   "the caption's position and shape words; its cross-attention maps carry little")
def test_word_swap_keeps_the_objects_mask(word_swap):
    assert word_swap["iou"] >= 0.8


@pytest.fixture(scope="module")
def local_blend(toy, swap_pairs):
    """The same swaps with the object's shape word blended, and without: the fraction of the pixels outside the
    source's object that change by more than 0.05 (of 1)."""
    model, clip, vae = toy
    moved = {"blend": [], "free": []}
    for source, colour in SWAP_PAIRS:
        shape = world.parse_caption(source).shape
        blended = _swap_guider(model, clip, source, colour, blend_words=shape)
        for seed in SWAP_SEEDS:
            pairs = {"blend": _images(vae, _sample(blended, _noise(seed), _ddim_sigmas(model))),
                     "free": swap_pairs[source, colour, seed]}
            for name, pair in pairs.items():
                outside = ~evaluate.segment(pair[0])["mask"]
                change = (pair[1] - pair[0]).abs().amax(-1).numpy()
                moved[name].append(float((change[outside] > 0.05).mean()))
    found = {n: float(np.mean(v)) for n, v in moved.items()}
    print(f"\nlocal blend, pixels outside the object that changed: blend {found['blend']:.1%}, "
          f"no blend {found['free']:.1%}")
    return found


@pytest.mark.xfail(**SHORT, reason="measured 25.0 % with the blend and without: at 64 px the 1/4-resolution maps are 2x2 and the pooled mask covers the whole latent")
def test_local_blend_changes_fewer_pixels_outside_the_object_than_the_swap_alone(local_blend):
    assert local_blend["blend"] < local_blend["free"]


@pytest.mark.xfail(**SHORT, reason="measured 25.0 % with the blend and without: at 64 px the 1/4-resolution maps are 2x2 and the pooled mask covers the whole latent")
def test_local_blend_keeps_the_pixels_outside_the_object(local_blend):
    assert local_blend["blend"] <= 0.05


# ---------------------------------------------------------------------------------------------------------------
# Plug-and-Play (Tumanyan et al. 2023)
# ---------------------------------------------------------------------------------------------------------------

PNP_PHOTOS = [("a big red circle on the left, grey background", "green"),
              ("a big blue square on the right, white background", "yellow"),
              ("a big yellow triangle in the middle, grey background", "purple"),
              ("a big green circle at the bottom, black background", "pink")]


@pytest.fixture(scope="module")
def plug_and_play(toy):
    """Rendered photos, DDIM-inverted with the empty prompt (the paper's setting), translated to the caption with
    another colour at the node's defaults and with the injection off (plain sampling of the target from the same
    inverted noise): the fraction whose object took the colour, and the mean mask IoU with the photo's VAE round
    trip."""
    from support.node_calls import feature_injector, invert
    model, clip, vae = toy
    found = {"injected": [], "off": []}
    for k, (caption, colour) in enumerate(PNP_PHOTOS):
        _, _, latent = _render_latent(vae, caption, 700 + k)
        reference = _mask(_images(vae, latent["samples"])[0])
        noised, inversion, sigmas = invert(model, clip, latent, "ddim", STEPS, "")
        for name, settings in (("injected", {}), ("off", dict(feature_until=0.0, attention_until=0.0))):
            guider, _ = feature_injector(model, clip, inversion, _swap(caption, colour), "", cfg=CFG, **settings)
            seg = evaluate.segment(_images(vae, _sample(guider, torch.zeros_like(noised), sigmas, noised))[1])
            found[name].append((seg["colour"] == colour, _iou(reference, seg["mask"])))
    summary = {f"{n}_{what}": float(np.mean([r[i] for r in v]))
               for n, v in found.items() for i, what in enumerate(("changed", "iou"))}
    print("\nplug-and-play, colour changed / mask IoU with the photo: "
          + ", ".join(f"{n} {summary[n + '_changed']:.0%} / {summary[n + '_iou']:.3f}" for n in found))
    return summary


def test_plug_and_play_changes_the_colour(plug_and_play):
    assert plug_and_play["injected_changed"] >= 0.95


def test_plug_and_play_keeps_the_layout_better_than_without_injection(plug_and_play):
    assert plug_and_play["injected_iou"] > plug_and_play["off_iou"]


@pytest.mark.xfail(**SHORT, reason="measured IoU 0.66 (injection off 0.66): the object's outline is the "
                                   "caption's more than the injected features'")
def test_plug_and_play_keeps_the_photos_mask(plug_and_play):
    assert plug_and_play["injected_iou"] >= 0.8


# ---------------------------------------------------------------------------------------------------------------
# MasaCtrl (Cao et al. 2023), keyframe attention (Khachatryan et al. 2023), consistent subject (Tewel et al. 2024)
# ---------------------------------------------------------------------------------------------------------------

MASA_EDITS = [("a big red circle on the left, grey background", "a big circle on the right, grey background"),
              ("a big blue square at the top, white background", "a small square at the top, white background"),
              ("a big green triangle on the right, black background",
               "a big triangle in the middle, black background"),
              ("a small purple circle in the middle, grey background", "a big circle in the middle, grey background")]


def _colours(vae, samples) -> list:
    return [evaluate.segment(x)["colour"] for x in _images(vae, samples)]


def _agreement(colours) -> float:
    """The fraction of the images after the first whose colour is the first image's."""
    return float(np.mean([c == colours[0] for c in colours[1:]]))


@pytest.fixture(scope="module")
def masactrl(toy):
    """The target prompt moves or resizes the subject and leaves its colour unsaid (the model was trained with a
    quarter of its captions so: the noise then decides the colour); the fraction of the edits whose subject has
    the source's colour, for MasaCtrl at the node's defaults and for plain sampling of the target prompt."""
    from support.node_calls import attention_controller
    model, clip, vae = toy
    kept = {"masactrl": [], "plain": []}
    for source, target in MASA_EDITS:
        colour = world.parse_caption(source).colour
        guider = attention_controller(model, clip, edit="masactrl", source_prompt=source, target_prompt=target,
                                      cfg=CFG)
        for seed in range(3):
            kept["masactrl"].append(_colours(vae, _sample(guider, _noise(seed), _ddim_sigmas(model)))[1] == colour)
        kept["plain"] += [c == colour for c in _colours(vae, _plain(model, clip, target, _noises(range(3))))]
    found = {n: float(np.mean(v)) for n, v in kept.items()}
    print(f"\nMasaCtrl, {len(kept['plain'])} edits, the source's colour kept: "
          + ", ".join(f"{n} {v:.0%}" for n, v in found.items()))
    return found


def test_masactrl_keeps_the_colour_more_often_than_plain_sampling(masactrl):
    assert masactrl["masactrl"] > masactrl["plain"]


@pytest.mark.xfail(**SHORT, reason="measured 33 % (plain sampling 17 %)")
def test_masactrl_keeps_the_subjects_colour(masactrl):
    assert masactrl["masactrl"] >= 0.9


UNSAID = ["a big circle on the left, grey background", "a big circle on the right, grey background",
          "a small circle at the top, grey background", "a big circle in the middle, grey background"]


@pytest.fixture(scope="module")
def keyframes(toy):
    """Four frames of one caption that leaves the colour unsaid, each from its own noise: the fraction of frames
    with the first frame's colour, with every frame reading the first frame's keys and values and without."""
    import comfy.sample
    from editkit.nodes.keyframe_attention import KeyframeAttentionNode
    model, clip, vae = toy
    keyed = KeyframeAttentionNode.execute(model, {"mode": "first"}, "", 0.0, 1.0, 0).result[0]
    agree = {"keyframe": [], "plain": []}
    for seed in range(4):
        noise = comfy.sample.prepare_noise(torch.zeros(4, 4, LATENT, LATENT), seed)
        for name, m in (("keyframe", keyed), ("plain", model)):
            agree[name].append(_agreement(_colours(vae, _plain(m, clip, UNSAID[0], noise))))
    found = {n: float(np.mean(v)) for n, v in agree.items()}
    print("\nkeyframe attention, frames with the first frame's colour: "
          + ", ".join(f"{n} {v:.0%}" for n, v in found.items()))
    return found


@pytest.mark.xfail(**SHORT, reason="measured 17 % with and without: the frames' colour comes from their own cross-attention, not the keyframe's values")
def test_keyframe_attention_agrees_more_than_plain_frames(keyframes):
    assert keyframes["keyframe"] > keyframes["plain"]


@pytest.mark.xfail(**SHORT, reason="measured 17 % with and without: the frames' colour comes from their own cross-attention, not the keyframe's values")
def test_keyframe_attention_gives_every_frame_the_first_frames_colour(keyframes):
    assert keyframes["keyframe"] >= 0.9


@pytest.fixture(scope="module")
def consistent_subject(toy):
    """Four prompts that place and size the subject but leave its colour unsaid: the fraction of the images with
    the first image's colour, with the subject ("circle") shared across the batch and plainly."""
    import comfy.sample
    from editkit.nodes.consistory import ConsistentSubjectNode
    model, clip, vae = toy
    patched, positive, batch = ConsistentSubjectNode.execute(model, clip, "\n".join(UNSAID), "circle", 0.5, 1.0, 0,
                                                             "", 0.0, 1.0, 0).result
    agree = {"shared": [], "plain": []}
    for seed in range(4):
        noise = comfy.sample.prepare_noise(torch.zeros(batch, 4, LATENT, LATENT), seed)
        for name, m in (("shared", patched), ("plain", model)):
            out = comfy.sample.sample(m, noise, STEPS, CFG, "ddim", "ddim_uniform", positive, encode(clip, ""),
                                      torch.zeros_like(noise), disable_pbar=True, seed=seed)
            agree[name].append(_agreement(_colours(vae, out)))
    found = {n: float(np.mean(v)) for n, v in agree.items()}
    print("\nconsistent subject, images with the first image's colour: "
          + ", ".join(f"{n} {v:.0%}" for n, v in found.items()))
    return found


@pytest.mark.xfail(**SHORT, reason="measured 17 % shared and plain: sharing the subject's self-attention tokens does not carry the colour here")
def test_consistent_subject_agrees_more_than_plain_sampling(consistent_subject):
    assert consistent_subject["shared"] > consistent_subject["plain"]


@pytest.mark.xfail(**SHORT, reason="measured 17 % shared and plain: sharing the subject's self-attention tokens does not carry the colour here")
def test_consistent_subject_keeps_one_colour_across_the_batch(consistent_subject):
    assert consistent_subject["shared"] >= 0.9


# ---------------------------------------------------------------------------------------------------------------
# MultiDiffusion regions (Bar-Tal et al. 2023)
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def regions(toy):
    """A 64 x 128 canvas of 64-pixel windows (stride 16 px), its left half prompted with one caption and its
    right half with another (bootstrapping 0.4, the paper's): the fraction of seeds where each half shows its own
    caption's colour; baseline, the same windows with the left caption everywhere."""
    from editkit.nodes.latent_fuser import LatentFuserNode, RegionPrompt
    model, clip, vae = toy
    left_caption = "a big red circle in the middle, grey background"
    right_caption = "a big blue square in the middle, grey background"
    left = torch.zeros(64, 128)
    left[:, :64] = 1.0
    prompts = {"region_0": RegionPrompt.execute(encode(clip, left_caption), left).result[0],
               "region_1": RegionPrompt.execute(encode(clip, right_caption), 1 - left).result[0]}
    right = {}
    for name, settings in (("regions", dict(regions=prompts, vae=vae)), ("one prompt", {})):
        fused = LatentFuserNode.execute(model, 64, 16, 8, False, {"mode": "multidiffusion"}, 0.4, 0,
                                        **settings).result[0]
        right[name] = []
        for seed in range(4):
            noise = torch.randn(1, 4, LATENT, 2 * LATENT, generator=torch.Generator().manual_seed(seed))
            with torch.no_grad():
                out = vae.decode(_plain(fused, clip, left_caption, noise)).float().cpu()[0]
            right[name].append(evaluate.segment(out[:, :64])["colour"] == "red"
                               and evaluate.segment(out[:, 64:])["colour"] == "blue")
    found = {n: float(np.mean(v)) for n, v in right.items()}
    print("\nregion prompts, both halves the right colour: " + ", ".join(f"{n} {v:.0%}" for n, v in found.items()))
    return found


def test_region_prompts_put_each_colour_in_its_region(regions):
    assert regions["regions"] >= 0.75
    assert regions["regions"] > regions["one prompt"]
