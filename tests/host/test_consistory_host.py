"""Consistent Subject (ConsiStory) inside ComfyUI on the tiny model: a batch of prompts sampled by stock sampling
(comfy.sample.sample, what KSampler runs), each image's decoder self-attention also reading the other images'
subject tokens; and the shipped workflow through ComfyUI's executor."""
import pytest
import torch

from support import comfy_host
from support.comfy_host import encode
from support.controllers import Recorder

STEPS = 4
PROMPTS = ["a fox in the snow", "a small fox on a boat", "the big red fox reading"]
SUBJECT_AT = [2, 3, 4]   # where CLIP puts 'fox' in each prompt (after the start token)
SIZE = 32                # latent side: the decoder's self-attention grids are 32, 16 and 8, the maps' 8


def _node(model, clip, prompts=PROMPTS, subject="fox", dropout=0.5, share_weight=1.0, anchors=0, layers="",
          start_at=0.0, end_at=1.0, seed=0):
    from editkit.nodes.consistory import ConsistentSubjectNode
    return ConsistentSubjectNode.execute(model, clip, "\n".join(prompts), subject, dropout, share_weight, anchors,
                                         layers, start_at, end_at, seed).result


def _sample(model, clip, positive, images, seed=0):
    import comfy.sample
    noise = torch.randn(images, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
    return comfy.sample.sample(model, noise, STEPS, 5.0, "euler", "normal", positive, encode(clip, ""),
                               torch.zeros_like(noise), disable_pbar=True, seed=seed)


def test_one_prompt_is_refused_and_share_weight_0_is_plain_sampling(tiny):
    model, clip, _ = tiny
    with pytest.raises(ValueError, match="prompts: one prompt; the subject is shared across two or more images"):
        _node(model, clip, prompts=PROMPTS[:1])
    patched, positive, batch = _node(model, clip, share_weight=0.0)
    assert batch == 3 and positive[0][0].shape[0] == 3
    assert torch.equal(_sample(patched, clip, positive, 3), _sample(model, clip, positive, 3))


def test_the_positive_output_is_one_prompt_per_image(tiny):
    model, clip, _ = tiny
    _, positive, _ = _node(model, clip)
    for i, text in enumerate(PROMPTS):
        assert torch.equal(positive[0][0][i:i + 1], encode(clip, text)[0][0])


def test_sharing_changes_the_images_and_the_dropout_is_seeded(tiny):
    model, clip, _ = tiny
    patched, positive, _ = _node(model, clip, seed=1)
    shared = _sample(patched, clip, positive, 3)
    plain = _sample(model, clip, positive, 3)
    assert torch.isfinite(shared).all()
    assert (shared - plain).abs().max() > 1e-3 * plain.abs().max()
    again, positive_again, _ = _node(model, clip, seed=1)
    assert torch.equal(_sample(again, clip, positive_again, 3), shared)
    other, positive_other, _ = _node(model, clip, seed=2)
    assert not torch.equal(_sample(other, clip, positive_other, 3), shared)


def _subject_masks(cross_calls, step, grid, seed, dropout):
    """What the masks of `step` must be, from the recorded cross-attention of the earlier steps: the conditional
    rows' softmax at 'fox', averaged over heads and layers of the 8x8 grid per step, then over the steps,
    resized bilinearly to `grid`, above scikit-image's Otsu threshold, minus the dropped tokens."""
    from skimage.filters import threshold_otsu
    from editkit.core.consistory import keep_draw
    per_step = []
    for s in range(step):
        layer_maps = []
        for call in cross_calls[s]:
            layout, heads = call["layout"], call["heads"]
            rows = layout.rows("cond")
            q, k = call["q"][rows], call["k"][rows]
            d = q.shape[-1] // heads
            qh = q.reshape(len(rows), -1, heads, d).transpose(1, 2).double()
            kh = k.reshape(len(rows), -1, heads, d).transpose(1, 2).double()
            probs = torch.softmax(qh @ kh.transpose(-1, -2) / d ** 0.5, dim=-1).mean(dim=1)
            layer_maps.append(torch.stack([probs[i, :, SUBJECT_AT[layout.item_of(r)]] for i, r in enumerate(rows)]))
        per_step.append(torch.stack(layer_maps).mean(dim=0))
    maps = torch.stack(per_step).mean(dim=0).reshape(3, 1, 8, 8)
    resized = torch.nn.functional.interpolate(maps, size=grid, mode="bilinear", align_corners=False)
    masks = torch.stack([torch.from_numpy((m > threshold_otsu(m)).flatten()) for m in resized[:, 0].numpy()])
    return masks & keep_draw(seed, step, grid, 3, dropout)


def test_the_shared_keys_come_only_from_the_other_images_subject_masks_per_cfg_branch(tiny):
    """A recorder before the controller (the layer's own keys, and the cross-attention the masks come from) and
    one after (the keys and the key bias each row attends with): a row reads the keys of its own CFG chunk's
    images: all of its own image, the others' only inside the masks computed here from the recorded maps."""
    from editkit.nodes.comfy_attention import attach_controller
    model, clip, _ = tiny
    before = Recorder(attention=lambda site: True)
    after = Recorder(attention=lambda site: site.kind == "self")
    patched, positive, _ = _node(attach_controller(model, before), clip, seed=3)
    _sample(attach_controller(patched, after), clip, positive, 3)
    seen, edited = before.runs[-1], after.runs[-1]
    cross = {}
    for (name, step), calls in seen.items():
        if name.endswith("cross") and calls[0]["grid"] == (8, 8):
            cross.setdefault(step, []).extend(calls)
    checked = set()
    for (name, step), calls in edited.items():
        for original, changed in zip(seen[(name, step)], calls):
            block = name.startswith("output")
            if step == 0 or not block:
                assert changed["bias"] is None and torch.equal(changed["k"], original["k"]), f"{name} step {step}"
                continue
            layout, tokens = original["layout"], original["k"].shape[1]
            assert layout.chunks == ("cond", "uncond") or layout.chunks == ("uncond", "cond")
            masks = _subject_masks(cross, step, original["grid"], 3, 0.5)
            for row in range(layout.size):
                image, first = layout.item_of(row), row - layout.item_of(row)
                read = changed["bias"][row] > float("-inf")
                assert (changed["bias"][row][read] == 0).all()       # share weight 1
                chunk = torch.cat([original["k"][first + j] for j in range(3)])   # the chunk's keys, image by image
                expected = torch.cat([torch.arange(tokens) + image * tokens] +   # its own first, then the others
                                     [masks[j].nonzero()[:, 0] + j * tokens for j in range(3) if j != image])
                assert torch.equal(changed["k"][row][read], chunk[expected]), f"{name} step {step} row {row}"
            assert 0 < masks.float().mean() < 0.5
            checked.add((name, step))
    assert {step for _, step in checked} == {1, 2, 3}
    assert len({name for name, _ in checked}) == 9   # SD1.5's decoder: 9 transformer layers


def test_the_input_model_is_unchanged(tiny):
    from editkit.nodes.comfy_attention import controllers_of
    model, clip, _ = tiny
    options = repr(sorted(model.model_options.get("transformer_options", {}).keys()))
    patched, positive, _ = _node(model, clip)
    _sample(patched, clip, positive, 3)
    assert controllers_of(model) == ()
    assert repr(sorted(model.model_options.get("transformer_options", {}).keys())) == options


@pytest.mark.parametrize("kwargs, message", [
    ({"prompts": ["a fox in the snow", "a cat on a boat"]}, r"subject: 'fox' is not in the prompt.*prompt 2 \('a cat"),
    ({"prompts": ["", " "]}, "prompts"),
    ({"subject": " , "}, "subject"),
    ({"anchors": 5}, "anchors"),
    ({"layers": "40"}, "layers"),
    ({"start_at": 0.6, "end_at": 0.5}, "start_at"),
])
def test_bad_inputs(tiny, kwargs, message):
    model, clip, _ = tiny
    with pytest.raises(ValueError, match=message):
        _node(model, clip, **kwargs)


def test_a_second_consistent_subject_on_the_model_is_an_error(tiny):
    model, clip, _ = tiny
    patched, _, _ = _node(model, clip)
    with pytest.raises(ValueError, match="model: it already shares a subject"):
        _node(patched, clip)


def test_a_latent_of_another_batch_size_is_an_error(tiny):
    model, clip, _ = tiny
    patched, positive, _ = _node(model, clip)
    with pytest.raises(ValueError, match="batch_size: the latent holds 2 images but Consistent Subject has 3"):
        _sample(patched, clip, positive, 2)


def test_another_positive_prompt_is_an_error(tiny):
    model, clip, _ = tiny
    patched, _, _ = _node(model, clip)
    other = [[torch.cat([encode(clip, "a dog")[0][0]] * 3), {}]]
    with pytest.raises(ValueError, match="positive"):
        _sample(patched, clip, other, 3)


# ---- the shipped workflow -----------------------------------------------------------------------------------

NAME = "Consistent Subject, one subject across a batch of prompts.json"


def _workflow(**settings):
    prompt = comfy_host.tiny_prompt(comfy_host.load_workflow(comfy_host.REPO_ROOT / "workflows" / NAME), steps=3,
                                    size=128)
    prompt[comfy_host.node_of(prompt, "EditKitConsistentSubject")]["inputs"].update(settings)
    return prompt


def test_shipped_settings(host):
    prompt = comfy_host.ui_to_api(comfy_host.load_workflow(comfy_host.REPO_ROOT / "workflows" / NAME))
    node = prompt[comfy_host.node_of(prompt, "EditKitConsistentSubject")]["inputs"]
    assert (node["dropout"], node["share_weight"], node["anchors"], node["layers"]) == (0.5, 1.0, 0, "")
    assert len([p for p in node["prompts"].splitlines() if p.strip()]) == 4 and node["subject"] == "fox"
    latent = prompt[comfy_host.node_of(prompt, "EmptyLatentImage")]["inputs"]
    assert latent["batch_size"] == [comfy_host.node_of(prompt, "EditKitConsistentSubject"), 2]


def test_the_workflow_runs_and_shares_the_subject(host):
    prompt = _workflow()
    sampler = comfy_host.node_of(prompt, "KSampler")
    shared = comfy_host.run_prompt(prompt).outputs[sampler][0]["samples"]
    assert shared.shape == (4, 4, 16, 16) and torch.isfinite(shared).all()
    plain = comfy_host.run_prompt(_workflow(share_weight=0.0)).outputs[sampler][0]["samples"]
    assert (shared - plain).abs().max() > 1e-3
