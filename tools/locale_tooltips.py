"""Writes locales/en/nodeDefs.json: the hover help of every setting inside a DynamicCombo, for front end 1.37.

Front end 1.37.11 (ComfyUI v0.12.1) builds a DynamicCombo's settings as widgets named `<combo>.<setting>` and
drops the tooltip of their spec; on hover it then looks the name up in the pack's translations
(`nodeDefs.<node>.inputs.<name with '.' as '_'>.tooltip`) and shows nothing when there is none. 1.49.6 passes
the tooltip on itself. The schemas stay the one source of the text: this file is written from them and
tests/host/test_locale_tooltips.py fails when it is out of date. Run it after changing such a tooltip:

    COMFYUI_PATH=/path/to/ComfyUI python tools/locale_tooltips.py
"""
from __future__ import annotations

import json
import pathlib
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
TARGET = ROOT / "locales" / "en" / "nodeDefs.json"
DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"


def _inputs(spec: dict):
    for section in ("required", "optional"):
        yield from (spec.get(section) or {}).items()


def _combo_settings(spec: dict, prefix: str = ""):
    """(widget name, tooltip) of the settings inside the DynamicCombos of an `input` spec, nested ones included."""
    for name, entry in _inputs(spec):
        if not isinstance(entry, (list, tuple)) or entry[0] != DYNAMIC_COMBO:
            continue
        for option in entry[1].get("options", []):
            inner = option.get("inputs") or {}
            for setting, setting_entry in _inputs(inner):
                options = setting_entry[1] if len(setting_entry) > 1 and isinstance(setting_entry[1], dict) else {}
                if options.get("tooltip"):
                    yield f"{prefix}{name}.{setting}", options["tooltip"]
            yield from _combo_settings(inner, f"{prefix}{name}.")


def combo_tooltips(node_classes: dict) -> dict:
    """{node id: {"inputs": {key: {"tooltip": text}}}} for the pack's nodes, keyed as the front end looks them up.
    A setting shared by several options of a combo must say the same in each (one widget name, one text)."""
    out = {}
    for node_id in sorted(node_classes):
        cls = node_classes[node_id]
        if not node_id.startswith("EditKit") or not hasattr(cls, "GET_NODE_INFO_V1"):
            continue
        inputs = {}
        for widget, tooltip in _combo_settings(cls.GET_NODE_INFO_V1()["input"]):
            key = widget.replace(".", "_")
            if inputs.get(key, {"tooltip": tooltip})["tooltip"] != tooltip:
                raise ValueError(f"{node_id}: '{widget}' has different tooltips in different options; one widget "
                                 f"shows one text, so make them the same")
            inputs[key] = {"tooltip": tooltip}
        if inputs:
            out[node_id] = {"inputs": inputs}
    return out


def render(tooltips: dict) -> str:
    return json.dumps(tooltips, indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    sys.path.insert(0, str(ROOT / "tests"))
    from support import comfy_host
    with tempfile.TemporaryDirectory() as tmp:
        host = comfy_host.boot(tmp)
        TARGET.write_text(render(combo_tooltips(host.NODE_CLASS_MAPPINGS)), encoding="utf-8")
    print(f"wrote {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
