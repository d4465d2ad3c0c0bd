"""What the front end builds from each of the pack's nodes: their `/object_info` entries, as ComfyUI's server
serves them (`GET_NODE_INFO_V1`), and how the nodes answer values those entries do not allow."""
import pytest

from support import comfy_host


def _pack_classes(host):
    return {name: cls for name, cls in host.NODE_CLASS_MAPPINGS.items() if name.startswith("EditKit")}


def test_a_fresh_node_offers_an_empty_autogrow_slot_that_may_stay_empty(host):
    """The front end (1.37) creates `min` slots of an Autogrow when a node is created from the search box; with
    none a user has nothing to connect. A slot below `min` of a required template is required by validation, so
    the template is optional: the fresh slot may stay unconnected."""
    grown = {(name, input_name): options["template"] for name, cls in _pack_classes(host).items()
             for input_name, options in comfy_host.inputs_of_type(cls, "COMFY_AUTOGROW_V3").items()}
    assert {("EditKitLatentFuser", "regions"), ("EditKitAttentionController", "more_targets")} <= set(grown)
    for (name, input_name), template in grown.items():
        assert template["min"] >= 1, f"{name}.{input_name}: a fresh node gets no slot"
        assert not template["input"].get("required") and template["input"].get("optional"), \
            f"{name}.{input_name}: the fresh slot would be required"


def _widget(info, path):
    """The options of a widget by its path ('mode.syncdiffusion.sync_weight' reaches into a DynamicCombo)."""
    name, *inner = path.split(".")
    spec = {**(info["input"].get("required") or {}), **(info["input"].get("optional") or {})}[name]
    if not inner:
        return spec[1]
    option = next(o for o in spec[1]["options"] if o["key"] == inner[0])
    return _widget({"input": option["inputs"]}, ".".join(inner[1:]))


# (node, widget, the paper's value): a maximum far past the paper's value only lets a typo through
PAPER_SCALED = [("EditKitLatentFuser", "mode.syncdiffusion.sync_weight", 20.0),
                ("EditKitKeyframeAttention", "previous_frame_pull", 100.0),
                ("EditKitMotionLatents", "strength", 12.0)]


def test_strengths_stop_at_ten_times_the_papers_value(host):
    classes = _pack_classes(host)
    for node, path, paper in PAPER_SCALED:
        options = _widget(classes[node].GET_NODE_INFO_V1(), path)
        assert options["max"] <= 10 * paper, (node, path, options)


def test_every_dynamic_combo_reaches_its_node_even_when_comfyui_drops_it(host):
    """ComfyUI drops a DynamicCombo input whose saved value is not an option; a node that requires the argument
    fails with a bare TypeError before it can say which input is wrong."""
    import inspect
    combos = [(node, cls, name) for node, cls in _pack_classes(host).items()
              for name in comfy_host.inputs_of_type(cls, "COMFY_DYNAMICCOMBO_V3")]
    assert len(combos) >= 4
    for node, cls, name in combos:
        parameter = inspect.signature(cls.execute).parameters[name]
        assert parameter.default is None, f"{node}.execute: {name} has no default"


@pytest.mark.parametrize("workflow,node,name,options", [
    ("Latent Fuser, panorama.json", "EditKitLatentFuser", "mode", "multidiffusion, syncdiffusion"),
    ("Prompt-to-Prompt, word swap.json", "EditKitAttentionController", "edit", "word_swap, refine, reweight, masactrl"),
])
def test_a_workflow_with_an_unknown_mode_fails_naming_the_input_and_its_options(host, workflow, node, name, options):
    prompt = comfy_host.tiny_prompt(comfy_host.load_workflow(comfy_host.REPO_ROOT / "workflows" / workflow), 2)
    prompt[comfy_host.node_of(prompt, node)]["inputs"][name] = "an_old_mode"
    with pytest.raises(comfy_host.HostError, match=f"{name}: the saved value is not one of {options} .an old or"):
        comfy_host.run_prompt(prompt)


def test_every_dynamic_combo_names_its_first_option_as_default(host):
    """The front end's node-search preview prints each widget's default: without one a DynamicCombo reads
    'mode undefined'. The value a fresh node takes is the first option, so that is the default."""
    combos = {(name, input_name): spec for name, cls in _pack_classes(host).items()
              for input_name, spec in comfy_host.inputs_of_type(cls, "COMFY_DYNAMICCOMBO_V3").items()}
    assert len(combos) >= 4
    for (name, input_name), spec in combos.items():
        assert spec.get("default") == spec["options"][0]["key"], f"{name}.{input_name}: default {spec.get('default')!r}"
