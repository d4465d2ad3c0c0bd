"""What a user of the template browser and the canvas sees of the shipped workflows: titles, thumbnails,
declared models, a description, and nodes that do not overlap."""
import json

import pytest

from support import comfy_host
from support.pack import load_script

WORKFLOWS = sorted((comfy_host.REPO_ROOT / "workflows").glob("*.json"))
LOADERS = {"CheckpointLoaderSimple": "ckpt_name", "ControlNetLoader": "control_net_name",
           "CLIPVisionLoader": "clip_name"}
# LiteGraph's metrics: a title bar above the node's position, one row per socket, one per widget
TITLE, SLOT, WIDGET, MULTILINE = 30, 20, 24, 80


def _ids(paths):
    return [p.stem for p in paths]


@pytest.mark.parametrize("path", WORKFLOWS, ids=_ids(WORKFLOWS))
def test_the_template_browser_shows_a_title_and_a_thumbnail(path):
    """ComfyUI's front end (1.37) titles a pack's template by its file name and shows <name>.jpg beside it."""
    assert "_" not in path.stem and " " in path.stem, "the file name is the template's title: write it for people"
    thumbnail = path.with_suffix(".jpg")
    assert thumbnail.is_file(), f"missing thumbnail {thumbnail.name}"
    from PIL import Image
    with Image.open(thumbnail) as image:
        assert image.format == "JPEG" and min(image.size) >= 256


THUMBNAILS = load_script("tools/workflow_thumbnails.py")


@pytest.mark.parametrize("path", WORKFLOWS, ids=_ids(WORKFLOWS))
def test_the_thumbnail_names_the_method_and_says_what_the_workflow_does(path):
    """The card's own text is the file name twice, so the thumbnail's banner carries the method group and one
    line (tools/workflow_thumbnails.py DESCRIPTIONS), short enough to read at card size."""
    assert path.stem in THUMBNAILS.DESCRIPTIONS, f"no description line for {path.stem!r} in DESCRIPTIONS"
    group, line = THUMBNAILS.description(path.stem)
    assert group.strip() and line.strip() and line.strip() != path.stem
    assert len(line) <= THUMBNAILS.LINE_CHARS, f"{len(line)} characters: {line!r}"
    assert THUMBNAILS.fits(group, THUMBNAILS.group_font()) and THUMBNAILS.fits(line, THUMBNAILS.line_font())


def test_every_description_line_belongs_to_a_shipped_workflow():
    stale = set(THUMBNAILS.DESCRIPTIONS) - {p.stem for p in WORKFLOWS}
    assert not stale, f"DESCRIPTIONS has lines for workflows that are gone: {sorted(stale)}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=_ids(WORKFLOWS))
def test_the_thumbnail_on_disk_shows_the_current_banner(path):
    """python tools/workflow_thumbnails.py was run after the last change of a line (the banner as drawn now
    matches <name>.jpg's up to JPEG noise)."""
    from PIL import Image, ImageChops, ImageStat
    if "DejaVu" not in str(getattr(THUMBNAILS.line_font(), "path", "")):
        pytest.skip("the DejaVu fonts the thumbnails were drawn with are not installed")
    box = (0, 0, THUMBNAILS.SIZE[0], THUMBNAILS.BANNER - 12)
    with Image.open(path.with_suffix(".jpg")) as saved:
        on_disk = saved.convert("L").crop(box)
    drawn = THUMBNAILS.draw(path).convert("L").crop(box)
    difference = ImageStat.Stat(ImageChops.difference(drawn, on_disk)).mean[0]
    assert difference < 3, f"{path.with_suffix('.jpg').name} is stale (mean difference {difference:.1f})"


@pytest.mark.parametrize("path", WORKFLOWS, ids=_ids(WORKFLOWS))
def test_a_workflow_explains_itself_in_a_note(path):
    notes = [n for n in comfy_host.load_workflow(path)["nodes"] if n["type"] in ("MarkdownNote", "Note")]
    assert len(notes) == 1 and len(notes[0]["widgets_values"][0]) > 200


@pytest.mark.parametrize("path", WORKFLOWS, ids=_ids(WORKFLOWS))
def test_loaders_declare_their_models_with_a_download_the_front_end_accepts(host, path):
    """The Missing Models dialog lists properties.models whose name is the loader's value; it offers a download
    for huggingface.co / civitai.com URLs of .safetensors files only."""
    import folder_paths
    loaders = [n for n in comfy_host.load_workflow(path)["nodes"] if n["type"] in LOADERS]
    assert loaders
    for node in loaders:
        (model,) = node["properties"]["models"]
        assert model["name"] == node["widgets_values"][0]
        assert model["url"].startswith("https://huggingface.co/") and model["url"].endswith("/" + model["name"])
        assert model["name"].endswith(".safetensors") and model["directory"] in folder_paths.folder_names_and_paths


def _min_height(node, classes) -> int:
    """The least height the front end draws a node at (sockets and widgets of its class, the saved values
    choosing a DynamicCombo's widgets)."""
    if node["type"] in ("MarkdownNote", "Note"):
        return 60
    class_def = classes[node["type"]]
    layout = [slot for slot in comfy_host._widget_layout(class_def, node.get("widgets_values"))
              if slot[0] is not None]
    widgets = sum(MULTILINE if opts.get("multiline") else WIDGET for _, _, opts in layout)
    names = {name for name, _, _ in layout}
    sockets = [i for i in node.get("inputs") or [] if i["name"] not in names]
    rows = max(len(sockets), len(node.get("outputs") or []))
    return rows * SLOT + widgets


@pytest.mark.parametrize("path", WORKFLOWS, ids=_ids(WORKFLOWS))
def test_nodes_are_big_enough_for_their_widgets_and_do_not_overlap(host, path):
    import nodes as comfy_nodes
    wf = comfy_host.load_workflow(path)
    boxes = []
    for node in wf["nodes"]:
        x, y = node["pos"]
        w, h = node["size"]
        need = _min_height(node, comfy_nodes.NODE_CLASS_MAPPINGS)
        assert h >= need, f"node #{node['id']} ({node['type']}) is {h} high but its widgets need {need}"
        boxes.append((node["id"], node["type"], x, y - TITLE, x + w, y + h))
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            overlap = a[2] < b[4] and b[2] < a[4] and a[3] < b[5] and b[3] < a[5]
            assert not overlap, f"node #{a[0]} ({a[1]}) overlaps node #{b[0]} ({b[1]})"


NEWEST_HOST_FILES = comfy_host.REPO_ROOT / "tests" / "host" / "newest_host_files.txt"


@pytest.mark.parametrize("path", WORKFLOWS, ids=_ids(WORKFLOWS))
def test_the_newest_host_runs_a_test_file_that_executes_the_workflow(path):
    """.ci/run runs the files newest_host_files.txt lists on the newest tested ComfyUI; a workflow is executed
    there only if one of them names it."""
    files = [comfy_host.REPO_ROOT / line for line in NEWEST_HOST_FILES.read_text().splitlines()
             if line and not line.startswith("#")]
    assert all(f.is_file() for f in files), [str(f) for f in files if not f.is_file()]
    texts = {f.name: f.read_text() for f in files}
    runners = [name for name, text in texts.items() if path.stem in text and "run_prompt" in text]
    assert runners, f"no file of {NEWEST_HOST_FILES.name} runs {path.name}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=_ids(WORKFLOWS))
def test_saved_autogrow_slots_are_labelled_like_grown_ones(host, path):
    """The front end labels a slot it grows by its name inside the group (`region_2` of `regions.region_2`); a
    saved slot carries the same label, or it shows its full name beside the grown ones."""
    import nodes as comfy_nodes
    for node in comfy_host.load_workflow(path)["nodes"]:
        class_def = comfy_nodes.NODE_CLASS_MAPPINGS.get(node["type"])
        groups = comfy_host.inputs_of_type(class_def, "COMFY_AUTOGROW_V3") if class_def else {}
        for slot in node.get("inputs") or []:
            group, _, inner = slot["name"].partition(".")
            if group in groups:
                assert slot.get("label") == inner, f"node #{node['id']} slot {slot['name']}"
