"""Run this node pack inside a real (read-only) ComfyUI, in-process, on the CPU.

Typical use (e.g. in a session fixture)::

    from support import comfy_host
    comfy_host.require_host()                 # skip / fail when no ComfyUI
    comfy_host.boot(tmp_path_factory.mktemp("comfy"))
    prompt = comfy_host.ui_to_api(comfy_host.load_workflow("workflows/x.json"))
    prompt = comfy_host.swap_checkpoint_loader(prompt, seed=0)
    result = comfy_host.run_prompt(prompt)
    result.outputs["3"][0]                    # first output of node "3"
    result.ui["9"]["images"]                  # UI output of node "9"

ComfyUI itself is never written to: its input/output/temp/user folders are
pointed at ``tmp_dir`` and Python's bytecode cache is redirected to a temp
folder before anything is imported from it.
"""
from __future__ import annotations

import asyncio
import atexit
import copy
import inspect
import json
import logging
import os
import pathlib
import sys
import tempfile
import threading
import uuid
from typing import Any

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]

__all__ = [
    "REPO_ROOT",
    "HostError",
    "RunResult",
    "comfyui_path",
    "require_host",
    "boot",
    "boot_comfy",
    "load_pack",
    "is_booted",
    "host_dirs",
    "ui_to_api",
    "inputs_of_type",
    "swap_checkpoint_loader",
    "swap_clip_vision_loader",
    "add_random_lpips",
    "run_prompt",
    "load_workflow",
    "TinyCheckpointLoader",
    "TinyCLIPVisionLoader",
]


class HostError(RuntimeError):
    """Raised when ComfyUI rejects or fails to execute a prompt.

    ``str(err)`` contains ComfyUI's own error text (message, details, node id
    and class type); the structured payload is kept on ``.details``.
    """

    def __init__(self, message: str, details: Any = None):
        super().__init__(message)
        self.details = details


# ----------------------------------------------------------------------------
# locating ComfyUI
# ----------------------------------------------------------------------------

def _is_comfyui(path: pathlib.Path) -> bool:
    return (path / "comfy").is_dir() and (path / "nodes.py").is_file()


def comfyui_path() -> pathlib.Path | None:
    """The ComfyUI checkout to test against, or None.

    Order: env ``COMFYUI_PATH`` (if set, it is the only candidate); the
    ComfyUI two folders up when this pack sits in ``ComfyUI/custom_nodes/<pack>``;
    ``<repo>/../shared/ComfyUI``.
    """
    env = os.environ.get("COMFYUI_PATH")
    if env:
        p = pathlib.Path(env).expanduser().resolve()
        return p if _is_comfyui(p) else None
    candidates = []
    if REPO_ROOT.parent.name == "custom_nodes":
        candidates.append(REPO_ROOT.parent.parent)
    candidates.append(REPO_ROOT.parent / "shared" / "ComfyUI")
    for c in candidates:
        if _is_comfyui(c):
            return c.resolve()
    return None


def require_host() -> pathlib.Path:
    """Return the ComfyUI path; otherwise fail (env CI == "true") or skip the test."""
    import pytest

    path = comfyui_path()
    if path is not None:
        return path
    env = os.environ.get("COMFYUI_PATH")
    if env:
        msg = f"COMFYUI_PATH={env!r} is not a ComfyUI checkout (needs comfy/ and nodes.py)"
    else:
        msg = (
            "no ComfyUI found: set COMFYUI_PATH, put this pack in ComfyUI/custom_nodes/, "
            f"or provide {REPO_ROOT.parent / 'shared' / 'ComfyUI'}"
        )
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg)


# ----------------------------------------------------------------------------
# booting
# ----------------------------------------------------------------------------

_boot_lock = threading.RLock()
_state: dict[str, Any] = {"booted": False, "path": None, "dirs": None, "packs": set()}


def _run_async(coro):
    """Run a coroutine to completion, also when called from a running event loop."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    if loop is None:  # (outside the except block: no chained exception context)
        return asyncio.run(coro)
    box: dict[str, Any] = {}

    def target():
        try:
            box["value"] = asyncio.run(coro)
        except BaseException as e:  # re-raised in the caller's thread
            box["error"] = e

    t = threading.Thread(target=target, name="comfy-host-async")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


def is_booted() -> bool:
    return bool(_state["booted"])


def host_dirs() -> dict[str, pathlib.Path]:
    """The folders ComfyUI was pointed at: keys output, input, temp, user."""
    if not _state["booted"]:
        raise RuntimeError("ComfyUI is not booted")
    return dict(_state["dirs"])


def boot_comfy(tmp_dir, cpu: bool = True) -> Any:
    """Import and initialise ComfyUI once per process (no pack loaded). Returns ComfyUI's ``nodes`` module.

    * CPU only (``comfy.cli_args.args.cpu = True`` before model_management is
      imported; ComfyUI does not parse sys.argv unless
      ``comfy.options.enable_args_parsing()`` was called).
    * input/output/temp/user folders -> ``tmp_dir/{input,output,temp,user}``.
    * bytecode cache -> a temp folder (the ComfyUI tree is never written).
    * built-in extra nodes loaded (no custom nodes, no API nodes).
    * test-only node ``TinyCheckpointLoader`` registered.

    Idempotent: later calls return immediately; ``tmp_dir`` of the first call wins.
    """
    with _boot_lock:
        if _state["booted"]:
            return sys.modules["nodes"]
        path = comfyui_path()
        if path is None:
            raise RuntimeError("no ComfyUI checkout found (set COMFYUI_PATH)")

        # Never write __pycache__ into the (read-only) ComfyUI tree.
        if sys.pycache_prefix is None and not sys.dont_write_bytecode:
            sys.pycache_prefix = os.path.join(tempfile.gettempdir(), "comfy_host_pycache")

        if cpu and "comfy.model_management" in sys.modules:
            mm = sys.modules["comfy.model_management"]
            if not mm.is_device_cpu(mm.get_torch_device()):
                raise RuntimeError("comfy.model_management was imported before boot without --cpu")
        # first on sys.path, so that ComfyUI's top-level modules (nodes,
        # execution, utils, ...) win over same-named folders elsewhere
        while str(path) in sys.path:
            sys.path.remove(str(path))
        sys.path.insert(0, str(path))

        import comfy.options  # noqa: F401  (args parsing stays disabled)
        from comfy.cli_args import args

        args.cpu = cpu   # False only for the GPU benchmarks
        args.disable_api_nodes = True
        # every folder ComfyUI derives from its base (models, custom_nodes, input, ...) in the temporary folder:
        # v0.33.0's folder_paths creates input/ at import wherever its base is
        tmp = pathlib.Path(tmp_dir).resolve()
        args.base_directory = str(tmp)

        # ComfyUI's main.py imports its ``utils`` package before nodes.py puts
        # comfy/ (which contains utils.py) on sys.path; do the same, otherwise
        # comfy_extras/nodes_images.py fails to import ``utils.install_util``.
        existing = sys.modules.get("utils")
        if existing is not None and not str(getattr(existing, "__file__", "")).startswith(str(path / "utils")):
            raise RuntimeError(f"a foreign 'utils' module is already imported ({existing!r}); ComfyUI needs its own")
        import utils.install_util  # noqa: F401

        import comfy.model_management as mm

        if cpu and not mm.is_device_cpu(mm.get_torch_device()):
            raise RuntimeError("ComfyUI did not pick the CPU")

        import folder_paths

        dirs = {name: tmp / name for name in ("output", "input", "temp", "user")}
        for d in dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        folder_paths.set_output_directory(str(dirs["output"]))
        folder_paths.set_input_directory(str(dirs["input"]))
        folder_paths.set_temp_directory(str(dirs["temp"]))
        folder_paths.set_user_directory(str(dirs["user"]))

        import nodes
        import execution  # noqa: F401

        _run_async(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        nodes.NODE_CLASS_MAPPINGS["TinyCheckpointLoader"] = TinyCheckpointLoader
        nodes.NODE_DISPLAY_NAME_MAPPINGS["TinyCheckpointLoader"] = "Tiny Checkpoint Loader (tests)"
        nodes.NODE_CLASS_MAPPINGS["TinyCLIPVisionLoader"] = TinyCLIPVisionLoader
        nodes.NODE_DISPLAY_NAME_MAPPINGS["TinyCLIPVisionLoader"] = "Tiny CLIP Vision Loader (tests)"

        _state.update(booted=True, path=path, dirs=dirs)
        atexit.register(_release_models)
        return nodes


def _release_models():
    """At exit, free cached models while ComfyUI's modules are still alive.

    (Otherwise ModelPatcher.__del__ runs during interpreter teardown and
    prints 'Exception ignored ... ON_DETACH'.)
    """
    try:
        for name in (f"{__package__}.tiny_models" if __package__ else "", "tiny_models"):
            mod = sys.modules.get(name) if name else None
            if mod is not None and hasattr(mod, "clear_caches"):
                mod.clear_caches()
        mm = sys.modules.get("comfy.model_management")
        if mm is not None:
            mm.unload_all_models()
        import gc

        gc.collect()
    except Exception:  # pragma: no cover - best effort at shutdown
        pass


class _LogCapture(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.records: list[str] = []

    def emit(self, record):
        try:
            self.records.append(record.getMessage())
        except Exception:  # pragma: no cover
            pass


def load_pack(pack_dir) -> Any:
    """Load a node pack directory with ComfyUI's own ``nodes.load_custom_node`` (once per path).

    Raises ``RuntimeError`` carrying ComfyUI's warnings when it reports failure.
    Returns ComfyUI's ``nodes`` module.
    """
    with _boot_lock:
        if not _state["booted"]:
            raise RuntimeError("call boot_comfy(tmp_dir) first")
        import nodes

        pack = str(pathlib.Path(pack_dir).resolve())
        if pack in _state["packs"]:
            return nodes
        cap = _LogCapture()
        root = logging.getLogger()
        root.addHandler(cap)
        try:
            ok = _run_async(nodes.load_custom_node(pack))
        finally:
            root.removeHandler(cap)
        if ok is not True:
            raise RuntimeError(f"ComfyUI failed to load node pack {pack}:\n" + "\n".join(cap.records))
        _state["packs"].add(pack)
        return nodes


def _boot(tmp_dir, packs=(REPO_ROOT,), cpu: bool = True) -> Any:
    boot_comfy(tmp_dir, cpu=cpu)
    nodes = sys.modules["nodes"]
    for p in packs:
        nodes = load_pack(p)
    return nodes


def boot(tmp_dir, cpu: bool = True) -> Any:
    """Boot ComfyUI (see ``boot_comfy``) and load THIS pack (``REPO_ROOT``) as a custom node.

    Idempotent. Returns ComfyUI's ``nodes`` module (``nodes.NODE_CLASS_MAPPINGS``...).
    """
    return _boot(tmp_dir, packs=(REPO_ROOT,), cpu=cpu)


# ----------------------------------------------------------------------------
# test-only loader node
# ----------------------------------------------------------------------------

class TinyCheckpointLoader:
    """Drop-in for CheckpointLoaderSimple returning the tiny SD1.5-layout models."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "control_after_generate": False})}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    RETURN_NAMES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, seed=0):
        import importlib

        mod = importlib.import_module(f"{__package__}.tiny_models" if __package__ else "tiny_models")
        return mod.tiny_checkpoint(int(seed))


class TinyCLIPVisionLoader:
    """Drop-in for CLIPVisionLoader returning the tiny CLIP vision model (a fresh one per call)."""

    @classmethod
    def INPUT_TYPES(cls):
        return TinyCheckpointLoader.INPUT_TYPES()

    RETURN_TYPES = ("CLIP_VISION",)
    RETURN_NAMES = ("CLIP_VISION",)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, seed=0):
        import importlib

        mod = importlib.import_module(f"{__package__}.tiny_models" if __package__ else "tiny_models")
        return (mod.make_comfy_clip_vision(int(seed)),)


def write_example_photo(name: str = "example.png", size: int = 64) -> None:
    """The photo the shipped workflows load (LoadImage 'example.png'): a smooth synthetic picture."""
    import numpy as np
    from PIL import Image
    y, x = np.mgrid[0:size, 0:size] / (size - 1.0)
    rgb = np.stack([x, y, 0.5 + 0.5 * np.sin(6 * x * y)], axis=-1)
    Image.fromarray((rgb * 255).astype(np.uint8)).save(host_dirs()["input"] / name)


def write_example_video(name: str = "example.mp4", frames: int = 4, size: int = 64, fps: int = 8) -> None:
    """The video the shipped video workflows load (LoadVideo 'example.mp4'): the example photo's picture
    sliding by two pixels a frame."""
    import av
    import numpy as np
    y, x = np.mgrid[0:size, 0:size + 2 * frames] / (size - 1.0)
    rgb = (np.stack([x, y, 0.5 + 0.5 * np.sin(6 * x * y)], axis=-1).clip(0, 1) * 255).astype(np.uint8)
    with av.open(str(host_dirs()["input"] / name), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for f in range(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb[:, 2 * f:2 * f + size]), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def encode(clip, text: str):
    """A CONDITIONING of `text`, as CLIPTextEncode gives it."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def node_of(prompt: dict, class_type: str) -> str:
    """Id of the (first) node of `class_type` in an API-format prompt."""
    return next(k for k, v in prompt.items() if v["class_type"] == class_type)


def tiny_prompt(workflow: dict, steps: int, size: int = 64) -> dict:
    """A UI workflow as an API prompt on the tiny checkpoint, shrunk for the CPU: empty latents of size x size
    pixels, `steps` sampling steps, inversions of `steps` steps with 2 null-text iterations."""
    prompt = swap_checkpoint_loader(ui_to_api(workflow))
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "EmptyLatentImage":
            inputs.update(width=size, height=size)
        elif node["class_type"] in ("BasicScheduler", "KSampler"):
            inputs["steps"] = steps
        elif node["class_type"] == "EditKitNullTextInvert":
            inputs.update(steps=steps, inner_steps=2)
    return prompt


def add_random_lpips(folder, name: str = "vgg_lpips.safetensors") -> str:
    """Random-weight LPIPS (VGG) weights written to `folder` and that folder added to ComfyUI's models/lpips
    paths, where the Latent Fuser's SyncDiffusion looks (the real file comes from tools/make_lpips_weights.py).
    Returns the file name the node's `lpips` list shows."""
    import folder_paths
    from safetensors.torch import save_file
    from editkit.core.lpips import random_lpips
    from editkit.nodes.latent_fuser import LPIPS_FOLDER, _register_lpips_folder
    save_file(random_lpips(0).state_dict(), str(pathlib.Path(folder) / name))
    _register_lpips_folder()
    folder_paths.add_model_folder_path(LPIPS_FOLDER, str(folder))
    return name


def swap_checkpoint_loader(prompt: dict, seed: int = 0) -> dict:
    """Copy of ``prompt`` with every CheckpointLoaderSimple replaced by TinyCheckpointLoader.

    Outputs keep their slots (0 MODEL, 1 CLIP, 2 VAE), so links stay valid.
    """
    out = copy.deepcopy(prompt)
    for node in out.values():
        if isinstance(node, dict) and node.get("class_type") == "CheckpointLoaderSimple":
            node["class_type"] = "TinyCheckpointLoader"
            node["inputs"] = {"seed": int(seed)}
    return out


def swap_clip_vision_loader(prompt: dict, seed: int = 0) -> dict:
    """Copy of ``prompt`` with every CLIPVisionLoader replaced by TinyCLIPVisionLoader (output slot 0 kept)."""
    out = copy.deepcopy(prompt)
    for node in out.values():
        if isinstance(node, dict) and node.get("class_type") == "CLIPVisionLoader":
            node["class_type"] = "TinyCLIPVisionLoader"
            node["inputs"] = {"seed": int(seed)}
    return out


# ----------------------------------------------------------------------------
# UI workflow -> API prompt
# ----------------------------------------------------------------------------

_WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
_DROP_TYPES = {"Note", "MarkdownNote"}
_UPLOAD_KEYS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload")
MODE_MUTED = 2
MODE_BYPASS = 4


def load_workflow(path) -> dict:
    """Read a UI-format workflow JSON file."""
    with open(path, "r", encoding="utf-8") as f:
        return json.load(f)


def _node_classes() -> dict:
    nodes = sys.modules.get("nodes")
    if nodes is None or not _state["booted"]:
        raise RuntimeError("ComfyUI is not booted: call boot(tmp_dir) / boot_comfy(tmp_dir) first")
    return nodes.NODE_CLASS_MAPPINGS


_DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"


def _entries(spec: dict) -> list[tuple[str, Any]]:
    """(name, entry) of the inputs of an INPUT_TYPES-style dict, required then optional."""
    return [(name, entry) for section in ("required", "optional") for name, entry in (spec.get(section) or {}).items()]


def _widget_slots(spec: dict, choose, prefix: str = "") -> list[tuple[str | None, str, dict]]:
    """Ordered widgets_values slots of a node's inputs: (input name or None for extras, type, options).

    Mirrors the front end: one slot per widget input (INT/FLOAT/STRING/BOOLEAN/COMBO and list combos, not
    ``forceInput``), in INPUT_TYPES order (required then optional).  Extra, non-input slots follow their
    widget: ``control_after_generate`` (one for INT -- default on for inputs named seed / noise_seed -- two
    for combos: control + filter), and the upload widget of ``image_upload``-style combos.  A DynamicCombo
    (V3) is a combo whose selected option's widgets follow it at once, named ``<combo>.<input>``;
    ``choose(name, slot_index)`` gives the option selected for the combo ``name`` at that slot.
    """
    layout: list[tuple[str | None, str, dict]] = []
    for name, entry in _entries(spec):
        if not isinstance(entry, (tuple, list)) or len(entry) == 0:
            continue
        typ = entry[0]
        opts = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
        full = prefix + name
        if typ == _DYNAMIC_COMBO:
            layout.append((full, "COMBO", opts))
            key = choose(full, len(layout) - 1)
            option = next((o for o in opts.get("options", []) if o.get("key") == key), None)
            if option is not None:
                inner = _widget_slots(option.get("inputs") or {}, lambda n, i: choose(n, len(layout) + i),
                                      full + ".")
                layout.extend(inner)
            continue
        is_combo = isinstance(typ, (list, tuple)) or typ == "COMBO"
        if not (is_combo or (isinstance(typ, str) and typ in _WIDGET_TYPES)):
            continue
        if opts.get("forceInput"):
            continue
        tname = "COMBO" if is_combo else typ
        layout.append((full, tname, opts))
        cag = opts.get("control_after_generate")
        if tname == "INT":
            if cag is None:
                cag = name in ("seed", "noise_seed")
            if cag:
                layout.append((None, "control_after_generate", {}))
        elif tname == "COMBO":
            if cag:
                layout.append((None, "control_after_generate", {}))
                layout.append((None, "control_filter_list", {}))
            if any(opts.get(k) for k in _UPLOAD_KEYS):
                layout.append((None, "upload", {}))
    return layout


def _widget_layout(class_def, widgets_values=None) -> list[tuple[str | None, str, dict]]:
    """The widgets_values slots of a node class; DynamicCombos expand the option their saved value selects
    (their first option without saved values, as the front end creates them)."""
    def choose(name, index):
        if isinstance(widgets_values, dict):
            value = widgets_values.get(name)
        else:
            value = widgets_values[index] if widgets_values and index < len(widgets_values) else None
        if value is None:
            entry = dict(_entries(class_def.INPUT_TYPES())).get(name)
            options = (entry[1].get("options") or [{}]) if entry else [{}]
            value = options[0].get("key")
        return value
    return _widget_slots(class_def.INPUT_TYPES(), choose)


def _types_compatible(a, b) -> bool:
    if a in ("*", "", None) or b in ("*", "", None):
        return True
    sa = {t.strip() for t in str(a).split(",")}
    sb = {t.strip() for t in str(b).split(",")}
    return bool(sa & sb)


class _Graph:
    def __init__(self, workflow: dict):
        if "nodes" not in workflow:
            raise ValueError("not a UI workflow (no 'nodes'); API prompts need no conversion")
        if (workflow.get("definitions") or {}).get("subgraphs"):
            raise NotImplementedError("workflows with subgraphs are not supported by ui_to_api")
        self.nodes = {str(n["id"]): n for n in workflow["nodes"]}
        self.links: dict[int, tuple[str, int, str, int, Any]] = {}
        for link in workflow.get("links") or []:
            if isinstance(link, dict):
                lid, o, os_, t, ts, typ = (link["id"], link["origin_id"], link["origin_slot"],
                                           link["target_id"], link["target_slot"], link.get("type"))
            else:
                lid, o, os_, t, ts = link[:5]
                typ = link[5] if len(link) > 5 else None
            self.links[int(lid)] = (str(o), int(os_), str(t), int(ts), typ)

    def resolve_link(self, link_id, want_type=None, _seen=None):
        """Follow a link upstream through Reroutes/bypassed/Primitive nodes.

        Returns ``("link", [node_id, slot])``, ``("value", v)`` or ``None`` (dangling / muted).
        """
        if link_id is None:
            return None
        _seen = _seen if _seen is not None else set()
        if link_id in _seen:
            raise ValueError(f"link cycle through link {link_id}")
        _seen.add(link_id)
        link = self.links.get(int(link_id))
        if link is None:
            return None
        origin_id, origin_slot, _, _, ltype = link
        want_type = want_type if want_type not in (None, "*", "") else ltype
        node = self.nodes.get(origin_id)
        if node is None:
            return None
        ntype = node.get("type")
        mode = node.get("mode", 0)
        inputs = node.get("inputs") or []
        if ntype == "Reroute":
            if not inputs:
                return None
            return self.resolve_link(inputs[0].get("link"), want_type, _seen)
        if ntype == "PrimitiveNode":
            values = node.get("widgets_values") or []
            return ("value", values[0]) if values else None
        if ntype in _DROP_TYPES or mode == MODE_MUTED:
            return None
        if mode == MODE_BYPASS:
            idx = self._bypass_input(node, origin_slot, want_type)
            if idx < 0:
                return None
            return self.resolve_link(inputs[idx].get("link"), want_type, _seen)
        return ("link", [origin_id, origin_slot])

    @staticmethod
    def _bypass_input(node, slot, want_type) -> int:
        inputs = node.get("inputs") or []
        outputs = node.get("outputs") or []
        out_type = outputs[slot].get("type") if slot < len(outputs) else want_type
        if want_type in ("*", "", None):
            return slot if slot < len(inputs) else (0 if inputs else -1)
        if slot < len(inputs):
            t = inputs[slot].get("type")
            if _types_compatible(t, out_type) and _types_compatible(t, want_type):
                return slot
        for i, inp in enumerate(inputs):
            if inp.get("type") == want_type:
                return i
        for i, inp in enumerate(inputs):
            t = inp.get("type")
            if _types_compatible(t, out_type) and _types_compatible(t, want_type):
                return i
        return -1


def inputs_of_type(class_def, io_type: str) -> dict[str, dict]:
    """{input name: options} of a V3 node class's inputs of `io_type` (e.g. "COMFY_AUTOGROW_V3"), as /object_info
    serves them; {} for a V1 class."""
    if not hasattr(class_def, "GET_NODE_INFO_V1"):
        return {}
    info = class_def.GET_NODE_INFO_V1()["input"]
    return {name: spec[1] for section in ("required", "optional") for name, spec in (info.get(section) or {}).items()
            if spec[0] == io_type}


def ui_to_api(workflow: dict) -> dict:
    """Convert a front-end (UI) workflow into the API prompt format the executor takes.

    Widget values are mapped to input names in order using each node class's
    INPUT_TYPES (V1 and V3 classes).  widgets_values holds one value per widget
    input whether or not it is linked (a link wins), plus the front end's extra
    control_after_generate / filter / upload values.  Note/MarkdownNote and
    muted (mode 2) nodes are dropped, bypassed (mode 4) nodes are passed
    through type-matched like the front end does, Reroute and PrimitiveNode are
    resolved.  Unknown node types raise ``KeyError`` naming node id and type.
    """
    classes = _node_classes()
    graph = _Graph(workflow)
    prompt: dict[str, dict] = {}
    for nid, node in graph.nodes.items():
        ntype = node.get("type")
        mode = node.get("mode", 0)
        if ntype in _DROP_TYPES or ntype in ("Reroute", "PrimitiveNode"):
            continue
        if mode in (MODE_MUTED, MODE_BYPASS):
            continue
        class_def = classes.get(ntype)
        if class_def is None:
            raise KeyError(f"unknown node type {ntype!r} (node #{nid}): is its node pack loaded?")

        inputs: dict[str, Any] = {}
        linked: dict[str, Any] = {}
        for inp in node.get("inputs") or []:
            name = inp.get("name")
            if inp.get("link") is None or name is None:
                continue
            resolved = graph.resolve_link(inp.get("link"), inp.get("type"))
            if resolved is None:
                continue
            linked[name] = resolved[1]

        # Front ends since 1.4x also save values by name and can restore by them; that save wins when present.
        named = node.get("widgets_values_named")
        wv = named if isinstance(named, dict) else node.get("widgets_values")
        if isinstance(wv, dict):
            for name, _t, _o in _widget_layout(class_def, wv):
                if name is not None and name in wv:
                    inputs[name] = wv[name]
        elif wv:
            for i, (name, _t, _o) in enumerate(_widget_layout(class_def, wv)):
                if i >= len(wv):
                    break
                if name is not None:
                    inputs[name] = wv[i]

        inputs.update(linked)
        entry = {"inputs": inputs, "class_type": ntype}
        entry["_meta"] = {"title": node.get("title") or ntype}
        prompt[nid] = entry

    # drop links to nodes that were not emitted (dangling, like the front end)
    for entry in prompt.values():
        for k, v in list(entry["inputs"].items()):
            if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and isinstance(v[1], int):
                if v[0] not in prompt:
                    del entry["inputs"][k]
    return prompt


# ----------------------------------------------------------------------------
# execution
# ----------------------------------------------------------------------------

class _FakeServer:
    """The bits of server.PromptServer that the executor uses; records every message."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata: dict = {}
        self.messages: list[tuple[Any, Any]] = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def send_progress_text(self, text, node_id, sid=None):
        self.messages.append(("progress_text", {"node_id": node_id, "text": text}))

    def queue_updated(self):
        pass


class RunResult:
    """Result of ``run_prompt``.

    * ``outputs[node_id]``: tuple, one entry per output slot; a slot holding a
      single value is unwrapped, a list-output slot stays a list.
    * ``raw_outputs[node_id]``: the executor's cached output lists as is.
    * ``ui[node_id]``: the node's UI output (e.g. {"images": [...]}), from history_result.
    * ``messages``: (event, data) sent to the fake server; ``status_messages``: the executor's.
    """

    def __init__(self, prompt_id, outputs, raw_outputs, ui, history, messages, status_messages):
        self.prompt_id = prompt_id
        self.outputs = outputs
        self.raw_outputs = raw_outputs
        self.ui = ui
        self.history = history
        self.messages = messages
        self.status_messages = status_messages

    def __getitem__(self, node_id):
        return self.outputs[str(node_id)]

    def __contains__(self, node_id):
        return str(node_id) in self.outputs

    def __repr__(self):
        return f"RunResult(nodes={sorted(self.outputs)}, ui={sorted(self.ui)})"


def _format_validation_error(error: dict, node_errors: dict) -> str:
    if error:
        lines = [f"{error.get('message', '')}: {error.get('details', '')}".rstrip(": ")]
    else:
        lines = ["some prompt outputs failed validation"]
    extra = error.get("extra_info") or {}
    if extra.get("node_id") is not None:
        lines.append(f"node #{extra.get('node_id')} ({extra.get('class_type')})")
    for nid, info in (node_errors or {}).items():
        for reason in info.get("errors", []):
            lines.append(f"node #{nid} ({info.get('class_type')}): {reason.get('message')}: {reason.get('details')}")
    return "Prompt validation failed: " + "\n".join(lines)


async def _run_prompt_async(prompt: dict, extra_data: dict | None):
    import execution

    prompt_id = str(uuid.uuid4())
    valid, error, good_outputs, node_errors = await execution.validate_prompt(prompt_id, prompt, None)
    if not valid or node_errors:  # (partially invalid prompts are failures too)
        raise HostError(_format_validation_error(error or {}, node_errors), {"error": error, "node_errors": node_errors})

    server = _FakeServer()
    # "ram_inactive" is read since v0.23; older executors ignore the extra key.
    executor = execution.PromptExecutor(
        server, cache_type=execution.CacheType.CLASSIC, cache_args={"lru": 0, "ram": 0.0, "ram_inactive": 0.0}
    )
    extra = {"client_id": "comfy-host"}
    extra.update(extra_data or {})
    await executor.execute_async(prompt, prompt_id, extra, good_outputs)

    events = [e for e, _ in executor.status_messages]
    for event, data in executor.status_messages:
        if event in ("execution_error", "execution_interrupted"):
            msg = (
                f"{event} in node #{data.get('node_id')} ({data.get('node_type')}): "
                f"{data.get('exception_type', '')}: {str(data.get('exception_message', '')).strip()}\n"
                + "".join(data.get("traceback") or [])
            )
            raise HostError(msg, data)
    if "execution_success" not in events:
        raise HostError(f"execution did not succeed; messages: {executor.status_messages}", executor.status_messages)

    outputs, raw = {}, {}
    for nid in prompt:
        entry = executor.caches.outputs.get(nid)
        if inspect.isawaitable(entry):  # the cache's get is a coroutine since v0.18
            entry = await entry
        if entry is None:
            continue
        data = entry.outputs
        raw[nid] = data
        outputs[nid] = tuple(slot[0] if isinstance(slot, list) and len(slot) == 1 else slot for slot in data)
    history = executor.history_result
    return RunResult(prompt_id, outputs, raw, dict(history.get("outputs", {})), history,
                     server.messages, list(executor.status_messages))


def run_prompt(prompt: dict, extra_data: dict | None = None) -> RunResult:
    """Validate and execute an API prompt with ComfyUI's own executor (all output nodes).

    Raises ``HostError`` with ComfyUI's error text on validation failure or
    execution error.  Each call uses a fresh ``PromptExecutor`` (no caching
    across runs).
    """
    _node_classes()
    prompt = {str(k): v for k, v in prompt.items()}
    return _run_async(_run_prompt_async(prompt, extra_data))
