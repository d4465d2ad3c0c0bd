"""The attention mechanism and the attention-map nodes inside the real ComfyUI, on the tiny model."""
import copy

import pytest
import torch

from editkit.core.attention import AttentionController
from support import comfy_host
from support.controllers import PassThrough

STEPS = 4


@pytest.fixture(scope="module")
def pack(host):
    import editkit.nodes.comfy_attention as comfy_attention
    return comfy_attention


@pytest.fixture()
def tiny(host):
    """Fresh clones for every test here (the shared fixture's are per module): these tests patch them."""
    from support.tiny_models import tiny_checkpoint
    return tiny_checkpoint(seed=0)


def _sample(model, clip, sampler="euler", prompt="a cat riding a bicycle", seed=0, size=(8, 8), cfg=5.0, steps=STEPS):
    import comfy.sample
    latent = torch.zeros(1, 4, *size)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, sampler, "normal", comfy_host.encode(clip, prompt),
                               comfy_host.encode(clip, "blurry"), latent, seed=seed, disable_pbar=True)


@pytest.mark.parametrize("sampler", ["euler", "ddim", "dpmpp_2m"])
def test_no_op_controllers_reproduce_unpatched_sampling(pack, tiny, sampler):
    model, clip, _ = tiny
    plain = _sample(model, clip, sampler)
    for controller in (AttentionController(), PassThrough()):
        patched = _sample(pack.attach_controller(model, controller), clip, sampler)
        assert (patched - plain).abs().max().item() < 1e-5, type(controller).__name__


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_materialised_probabilities_match_the_host_kernel(pack, tiny, sampler):
    """Explicit softmax differs from ComfyUI's kernel by float32 rounding, which a random UNet amplifies
    along a run: 1e-5 relative to the latent's scale."""
    from editkit.core.capture import AttentionMapCapture
    model, clip, _ = tiny
    plain = _sample(model, clip, sampler)
    for controller in (PassThrough(probs=True), AttentionMapCapture(max_tokens=10**6)):
        patched = _sample(pack.attach_controller(model, controller), clip, sampler)
        assert (patched - plain).abs().max().item() < 1e-5 * plain.abs().max().item(), type(controller).__name__


class _SiteOrder(AttentionController):
    """Records the sites of every attention call (run one model evaluation through it)."""

    def __init__(self):
        self.seen = []

    def acts_on(self, call):
        self.seen.append(call.site)
        return False


def test_comfy_and_diffusers_adapters_report_the_same_sites_in_order(pack, tiny):
    from editkit.core.attention import BatchLayout
    from editkit.core.diffusers_adapter import DiffusersAttentionAdapter
    from support.tiny_models import make_diffusers_unet
    model, clip, _ = tiny
    comfy_sites = pack.attention_sites(model)
    unet = make_diffusers_unet(seed=0)
    adapter = DiffusersAttentionAdapter(unet)
    assert comfy_sites == adapter.site_list()

    comfy_order = _SiteOrder()
    _sample(pack.attach_controller(model, comfy_order), clip, steps=1, cfg=1.0)
    diffusers_order = _SiteOrder()
    adapter = DiffusersAttentionAdapter(unet, [diffusers_order]).install()
    with adapter.run(1, (8, 8), BatchLayout(("cond",), 1)):
        unet(torch.randn(1, 4, 8, 8), 999, encoder_hidden_states=torch.randn(1, 77, 32))
    adapter.uninstall()
    assert comfy_order.seen == diffusers_order.seen == comfy_sites


def test_input_model_is_unchanged_after_patching_and_sampling(pack, tiny):
    from editkit.core.capture import AttentionMapCapture
    model, clip, _ = tiny
    before_options = copy.deepcopy(model.model_options)
    before_wrappers = copy.copy(model.wrappers)
    before = _sample(model, clip)
    patched = pack.attach_controller(model, AttentionMapCapture())
    _sample(patched, clip)
    assert model.model_options == before_options
    assert model.wrappers == before_wrappers
    assert "patches_replace" not in model.model_options.get("transformer_options", {})
    assert torch.equal(_sample(model, clip), before)
    assert pack.controllers_of(model) == ()


def test_runs_and_models_do_not_share_capture_state(pack, tiny):
    from editkit.core.capture import AttentionMapCapture
    model, clip, _ = tiny
    cap_a, cap_b = AttentionMapCapture(), AttentionMapCapture()
    model_a, model_b = pack.attach_controller(model, cap_a), pack.attach_controller(model, cap_b)
    _sample(model_a, clip, prompt="a cat riding a bicycle")
    first_a = cap_a.store.maps.clone()
    _sample(model_b, clip, prompt="a dog in the snow", seed=3)
    assert cap_a.store.runs == 1 and cap_b.store.runs == 1
    assert not torch.allclose(first_a, cap_b.store.maps)
    _sample(model_a, clip, prompt="a cat riding a bicycle")      # a second run starts from fresh state
    assert cap_a.store.runs == 2
    assert torch.allclose(cap_a.store.maps, first_a, atol=1e-6)
    # a clone of a patched model (another node downstream) still publishes to the same capture
    _sample(model_a.clone(), clip)
    assert cap_a.store.runs == 3


def test_captured_maps_sum_to_one_over_tokens(pack, tiny):
    from editkit.core.capture import AttentionMapCapture
    model, clip, _ = tiny
    cap = AttentionMapCapture(max_tokens=24)      # the 4x6 and smaller layers of an 8x12 latent
    _sample(pack.attach_controller(model, cap), clip, size=(8, 12))
    maps = cap.store.maps
    assert maps.shape == (1, 4, 6, 77)
    assert torch.allclose(maps.sum(-1), torch.ones(1, 4, 6), atol=1e-5)


def _node_of(prompt, class_type):
    return next(k for k, v in prompt.items() if v["class_type"] == class_type)


def _workflow_prompt(seed=0):
    """The shipped workflow on the tiny model; 64 px and 4 steps instead of 512 px and 25 keep the CPU run short."""
    wf = comfy_host.load_workflow(comfy_host.REPO_ROOT / "workflows" / "Attention maps, where words land.json")
    prompt = comfy_host.tiny_prompt(wf, steps=4)
    prompt[_node_of(prompt, "TinyCheckpointLoader")]["inputs"]["seed"] = seed
    return prompt


def test_attention_map_workflow_runs_in_the_executor(host):
    prompt = _workflow_prompt()
    result = comfy_host.run_prompt(prompt)
    mask_node = _node_of(prompt, "EditKitAttentionMapsToMask")
    mask, heat = result.outputs[mask_node][0], result.outputs[mask_node][1]
    width, height = prompt[_node_of(prompt, "EmptyLatentImage")]["inputs"]["width"], \
        prompt[_node_of(prompt, "EmptyLatentImage")]["inputs"]["height"]
    assert mask.shape == (1, height, width)
    assert 0.0 <= mask.min() and mask.max() <= 1.0 and mask.max() > 0.99
    assert heat.shape == (1, height, 2 * width, 3)          # two words: "cat, table"
    again = comfy_host.run_prompt(_workflow_prompt())
    assert torch.equal(again.outputs[mask_node][0], mask)   # deterministic


def test_mask_has_the_latent_aspect_ratio_at_image_size(host):
    prompt = _workflow_prompt()
    latent = _node_of(prompt, "EmptyLatentImage")
    prompt[latent]["inputs"].update(width=64, height=96)
    mask_node = _node_of(prompt, "EditKitAttentionMapsToMask")
    del prompt[mask_node]["inputs"]["images"]
    result = comfy_host.run_prompt(prompt)
    assert result.outputs[mask_node][0].shape == (1, 96, 64)


def test_unknown_word_is_a_clear_error(host):
    prompt = _workflow_prompt()
    mask_node = _node_of(prompt, "EditKitAttentionMapsToMask")
    prompt[mask_node]["inputs"]["words"] = "cat, dog"
    with pytest.raises(comfy_host.HostError) as e:
        comfy_host.run_prompt(prompt)
    assert "'dog' is not in the prompt" in str(e.value)
    assert "a, photo, of, a, cat, sitting, on, a, wooden, table" in str(e.value)


def test_queued_prompts_with_different_controllers_do_not_share_state(host):
    """Prompt A, then prompt B with another capture setting and text, then A again: A is unchanged."""
    first = _workflow_prompt()
    mask_node = _node_of(first, "EditKitAttentionMapsToMask")
    a1 = comfy_host.run_prompt(first).outputs[mask_node][0]
    other = _workflow_prompt()
    other[_node_of(other, "EditKitCaptureAttentionMaps")]["inputs"]["end_at"] = 0.5
    text = other[_node_of(other, "PrimitiveStringMultiline")]["inputs"]
    text["value"] = "a wooden table under a cat in a garden"
    b = comfy_host.run_prompt(other).outputs[mask_node][0]
    a2 = comfy_host.run_prompt(_workflow_prompt()).outputs[mask_node][0]
    assert not torch.allclose(a1, b)
    assert torch.equal(a1, a2)


def test_a_capture_window_without_steps_says_so(host):
    prompt = _workflow_prompt()
    prompt[_node_of(prompt, "EditKitCaptureAttentionMaps")]["inputs"].update(start_at=0.9, end_at=0.95)
    with pytest.raises(comfy_host.HostError, match="none of its steps fell between the capture's start_at and end_at"):
        comfy_host.run_prompt(prompt)


def test_a_window_that_ends_before_it_starts_is_one_error_naming_start_at(host):
    prompt = _workflow_prompt()
    prompt[_node_of(prompt, "EditKitCaptureAttentionMaps")]["inputs"].update(start_at=0.8, end_at=0.2)
    with pytest.raises(comfy_host.HostError) as e:
        comfy_host.run_prompt(prompt)
    message = str(e.value).splitlines()[0]   # (a traceback follows)
    assert message.count("must be smaller than end_at") == 1 and "start_at: 0.8" in message
    assert "max_resolution" not in message


def test_a_mask_prompt_other_than_the_sampled_one_is_refused(host):
    prompt = _workflow_prompt()
    text = _node_of(prompt, "PrimitiveStringMultiline")
    mask_node = _node_of(prompt, "EditKitAttentionMapsToMask")
    assert prompt[mask_node]["inputs"]["prompt"] == [text, 0]   # the shipped workflow types the prompt once
    prompt[mask_node]["inputs"]["prompt"] = "a photo of a cat sitting on a wooden chair and a table"
    with pytest.raises(comfy_host.HostError, match="prompt: it is not the prompt the sampler used"):
        comfy_host.run_prompt(prompt)
