"""The shipped video workflows in the real ComfyUI executor, on the tiny model: a real video (a small mp4 in the
input folder) restyled by inversion and editing, and a consistent text-to-video clip; both saved as videos."""
import torch

from support import comfy_host

RESTYLE = "Video editing, restyle a real video.json"
TEXT_TO_VIDEO = "Keyframe Attention, consistent text-to-video.json"
STEPS = 3
FRAMES = 3


def _workflow(name):
    return comfy_host.load_workflow(comfy_host.REPO_ROOT / "workflows" / name)


def _saved_frames(result, prefix) -> int:
    """Frames of the video SaveVideo wrote under output/<prefix>*."""
    import av
    folder = comfy_host.host_dirs()["output"]
    files = sorted(folder.glob(prefix + "*"), key=lambda f: f.stat().st_mtime)
    assert files, f"no video saved under {prefix}"
    with av.open(str(files[-1])) as container:
        return sum(1 for _ in container.decode(video=0))


def _restyle_prompt():
    prompt = comfy_host.tiny_prompt(_workflow(RESTYLE), STEPS)
    for node in prompt.values():
        if node["class_type"] == "ImageScale":
            node["inputs"].update(width=64, height=64)
        elif node["class_type"] == "PrimitiveInt":
            node["inputs"]["value"] = FRAMES
    return prompt


def test_shipped_restyle_settings(host):
    prompt = comfy_host.ui_to_api(_workflow(RESTYLE))
    invert = prompt[comfy_host.node_of(prompt, "EditKitNullTextInvert")]["inputs"]
    assert invert["mode"] == "direct" and invert["steps"] == 50
    keyframe = prompt[comfy_host.node_of(prompt, "EditKitKeyframeAttention")]["inputs"]
    assert keyframe["mode"] == "first_and_previous"
    controller = prompt[comfy_host.node_of(prompt, "EditKitAttentionController")]["inputs"]
    assert controller["edit"] == "refine" and controller["edit.self_max_resolution"] == 32
    assert controller["model"][0] == comfy_host.node_of(prompt, "EditKitKeyframeAttention")
    frames = comfy_host.node_of(prompt, "PrimitiveInt")
    picks = [n["inputs"] for n in prompt.values() if n["class_type"] == "ImageFromBatch"]
    assert sorted(p["batch_index"] == [frames, 0] for p in picks) == [False, True]   # the edited clip follows the source
    assert all(p["length"] == [frames, 0] for p in picks)


def test_the_restyle_workflow_edits_the_video_and_saves_the_edited_clip(host):
    comfy_host.write_example_video()
    prompt = _restyle_prompt()
    result = comfy_host.run_prompt(prompt)
    sampled = result.outputs[comfy_host.node_of(prompt, "SamplerCustomAdvanced")][0]["samples"]
    encoded = result.outputs[comfy_host.node_of(prompt, "VAEEncode")][0]["samples"]
    assert sampled.shape == (2 * FRAMES, *encoded.shape[1:]) and encoded.shape[0] == FRAMES
    # direct inversion: the source clip is the video's latents again; the edited clip is another
    assert (sampled[:FRAMES] - encoded).abs().max() <= 1e-5 * encoded.abs().max()
    assert (sampled[FRAMES:] - encoded).abs().max() > 1e-2
    assert _saved_frames(result, "video/editkit_video_restyle") == FRAMES


def test_the_text_to_video_workflow_saves_a_clip_whose_frames_share_attention(host):
    def prompt_of(with_keyframes):
        prompt = comfy_host.tiny_prompt(_workflow(TEXT_TO_VIDEO), STEPS)
        motion = prompt[comfy_host.node_of(prompt, "EditKitMotionLatents")]["inputs"]
        motion.update(frames=FRAMES, steps=4, start_at_step=1, warp_at_step=2, strength=8.0)
        if not with_keyframes:
            keyframe = comfy_host.node_of(prompt, "EditKitKeyframeAttention")
            guider = comfy_host.node_of(prompt, "CFGGuider")
            prompt[guider]["inputs"]["model"] = prompt[keyframe]["inputs"]["model"]
            del prompt[keyframe]
        return prompt

    prompt = prompt_of(True)
    result = comfy_host.run_prompt(prompt)
    shared = result.outputs[comfy_host.node_of(prompt, "SamplerCustomAdvanced")][0]["samples"]
    assert shared.shape[0] == FRAMES and torch.isfinite(shared).all()
    assert _saved_frames(result, "video/editkit_text_to_video") == FRAMES
    plain_prompt = prompt_of(False)
    plain = comfy_host.run_prompt(plain_prompt).outputs[comfy_host.node_of(plain_prompt, "SamplerCustomAdvanced")][0]
    assert torch.equal(shared[0], plain["samples"][0])                  # frame 0 reads itself
    assert (shared[1:] - plain["samples"][1:]).abs().max() > 1e-3       # the others read frame 0


def test_shipped_text_to_video_settings(host):
    prompt = comfy_host.ui_to_api(_workflow(TEXT_TO_VIDEO))
    motion = prompt[comfy_host.node_of(prompt, "EditKitMotionLatents")]["inputs"]
    assert (motion["frames"], motion["steps"], motion["scheduler"], motion["strength"]) == (8, 50, "ddim_uniform", 12.0)
    assert (motion["start_at_step"], motion["warp_at_step"]) == (2, 5)
    guider = prompt[comfy_host.node_of(prompt, "CFGGuider")]["inputs"]
    assert guider["cfg"] == motion["cfg"]
    assert guider["model"][0] == comfy_host.node_of(prompt, "EditKitKeyframeAttention")
    sampler = prompt[comfy_host.node_of(prompt, "SamplerCustomAdvanced")]["inputs"]
    assert sampler["sigmas"] == [comfy_host.node_of(prompt, "EditKitMotionLatents"), 1]
    assert prompt[comfy_host.node_of(prompt, "KSamplerSelect")]["inputs"]["sampler_name"] == "ddim"
