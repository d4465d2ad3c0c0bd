"""locales/en/nodeDefs.json carries the hover help of the settings inside DynamicCombos for front end 1.37.11,
which drops their tooltips (tools/locale_tooltips.py says how); the schemas are the one source of the text."""
import json

from support import comfy_host
from support.pack import load_script


def _tool():
    return load_script("tools/locale_tooltips.py")


def test_the_shipped_file_is_the_schemas_tooltips(host):
    tool = _tool()
    expected = tool.combo_tooltips(host.NODE_CLASS_MAPPINGS)
    shipped = json.loads(tool.TARGET.read_text(encoding="utf-8"))
    assert shipped == expected, "locales/en/nodeDefs.json is out of date: run python tools/locale_tooltips.py"


def test_every_setting_inside_a_dynamic_combo_has_its_help_under_the_name_the_front_end_looks_up(host):
    """The front end names such a widget '<combo>.<setting>' and looks up '<combo>_<setting>'."""
    tooltips = _tool().combo_tooltips(host.NODE_CLASS_MAPPINGS)
    expected = {("EditKitAttentionController", "edit_cross_replace"), ("EditKitAttentionController", "edit_start_step"),
                ("EditKitLatentFuser", "mode_sync_weight"), ("EditKitKeyframeAttention", "mode_indices"),
                ("EditKitPointMaskRNGR", "resolution_tiles")}
    found = {(node, key) for node, entry in tooltips.items() for key in entry["inputs"]}
    assert expected <= found, sorted(expected - found)
    for node, entry in tooltips.items():
        combos = comfy_host.inputs_of_type(host.NODE_CLASS_MAPPINGS[node], "COMFY_DYNAMICCOMBO_V3")
        settings = {f"{name}_{setting}" for name, spec in combos.items() for option in spec["options"]
                    for section in ("required", "optional") for setting in (option["inputs"].get(section) or {})}
        assert set(entry["inputs"]) == settings, f"{node}: settings without help {sorted(settings - set(entry['inputs']))}"
