"""The node help pages: ComfyUI's front end (1.37 and 1.49) shows, in its node help panel, the Markdown file
`/extensions/<pack folder>/docs/<node id>.md` (after a `docs/<node id>/<locale>.md`) from the pack's WEB_DIRECTORY,
and loads every .js file under that folder as a front-end extension. Each page's inputs table must name every input of
the node's schema as ComfyUI serves it (the options of a DynamicCombo and the slots of an Autogrow included) with the
schema's default, and every figure it shows must be a small PNG beside it."""
import glob
import math
import os
import re
import urllib.parse

from support import comfy_host

WEB = comfy_host.REPO_ROOT / "web"
DOCS = WEB / "docs"
INPUT_COLUMNS = ["input", "default", "range / options", "paper / official code", "what it does"]
OUTPUT_COLUMNS = ["output", "type", "what it does"]
MAX_FIGURE_BYTES = 40 * 1024
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e-?\d+)?")
SCOPE = re.compile(r"^When `(\w+)` is (.+)$")   # a heading over the inputs of some options of a DynamicCombo
ROW_NAME = re.compile(r"^`(\w+)`(?:\s*\(([\w ,]+)\))?")   # `name`, or `name` (option, option) inside a scope
IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)[^)]*\)|<img\s[^>]*\bsrc=[\"']([^\"']+)[\"']", re.I)


def _pack_nodes(host) -> dict[str, dict]:
    """{node id: its /object_info entry} of the nodes this pack registers (by the module ComfyUI records)."""
    module = f"custom_nodes.{comfy_host.REPO_ROOT.name}"
    infos = {name: cls.GET_NODE_INFO_V1() for name, cls in host.NODE_CLASS_MAPPINGS.items()
             if getattr(cls, "RELATIVE_PYTHON_MODULE", None) == module}
    assert all(info["python_module"] == module for info in infos.values())   # what the front end builds the URL from
    return infos


# -- the schema ------------------------------------------------------------------------------------------------

def _schema_inputs(inputs: dict, prefix: str = "") -> dict[str, tuple]:
    """{path: (type, options)}: 'name', and 'combo.option.name' for the inputs of a DynamicCombo's options."""
    found = {}
    for section in ("required", "optional"):
        for name, spec in (inputs.get(section) or {}).items():
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            found[prefix + name] = (spec[0], options)
            if spec[0] == "COMFY_DYNAMICCOMBO_V3":
                for option in options["options"]:
                    found.update(_schema_inputs(option.get("inputs") or {}, f"{prefix}{name}.{option['key']}."))
    return found


def _template_input(options: dict) -> tuple:
    """(type, options) of an Autogrow template's one input."""
    template = options["template"]["input"]
    (spec,) = [spec for section in ("required", "optional") for spec in (template.get(section) or {}).values()]
    return spec[0], (spec[1] if len(spec) > 1 else {})


def _default(kind, options: dict):
    if kind == "COMFY_DYNAMICCOMBO_V3":
        return options["options"][0]["key"]   # the front end selects the first option of a fresh node
    if kind == "COMFY_AUTOGROW_V3":
        return _template_input(options)[1].get("default")
    return options.get("default")


# -- the page --------------------------------------------------------------------------------------------------

def _cells(line: str) -> list[str]:
    inner = line.strip()
    inner = inner[1:] if inner.startswith("|") else inner
    inner = inner[:-1] if inner.endswith("|") and not inner.endswith("\\|") else inner
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", inner)]


def _tables(text: str) -> list[dict]:
    """The page's tables: {heading (the nearest one above), header (lower case), rows}."""
    tables, heading, current = [], "", None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            heading, current = stripped.lstrip("#").strip(), None
        elif stripped.startswith("|"):
            if current is None:
                current = {"heading": heading, "header": [c.lower() for c in _cells(stripped)], "rows": []}
                tables.append(current)
            elif not re.fullmatch(r"[|:\- ]+", stripped):
                current["rows"].append(_cells(stripped))
        else:
            current = None
    return tables


def _same_default(cell: str, expected) -> bool:
    cell = cell.strip()
    if expected is None:
        return cell == "—"
    if isinstance(expected, bool):
        return cell.lower() in (("on", "true") if expected else ("off", "false"))
    if isinstance(expected, (int, float)):
        number = NUMBER.search(cell)
        return number is not None and math.isclose(float(number.group()), float(expected), rel_tol=1e-9,
                                                   abs_tol=1e-12)
    if expected == "":
        return cell.lower() == "empty"
    return "\n".join(re.findall(r"`([^`]*)`", cell)) == expected


def _range_problems(path: str, kind, options: dict, cell: str) -> list[str]:
    problems = []
    numbers = [float(n) for n in NUMBER.findall(cell)]
    for bound in ("min", "max"):
        if kind in ("INT", "FLOAT") and bound in options and \
                not any(math.isclose(n, float(options[bound]), rel_tol=1e-9) for n in numbers):
            problems.append(f"{path}: the range does not state its {bound} {options[bound]} ({cell!r})")
    named = set(re.findall(r"`([^`]*)`", cell))
    if kind == "COMFY_DYNAMICCOMBO_V3":
        wanted = [o["key"] for o in options["options"]]
    elif kind == "COMFY_AUTOGROW_V3":
        template = options["template"]
        wanted = [template["prefix"] + "0" if "prefix" in template else template["names"][0]]
    elif kind == "COMBO" and "default" in options:   # a combo without a default lists files (it varies)
        import comfy.samplers
        host_list = set(options["options"]) == set(comfy.samplers.SCHEDULER_NAMES)
        wanted = [options["default"]] if host_list else list(options["options"])   # the host's schedulers vary
    else:
        wanted = []
    problems += [f"{path}: the range / options column does not name `{w}`" for w in wanted if w not in named]
    return problems


def page_problems(info: dict, text: str) -> list[str]:
    """What a node's help page gets wrong against the node's /object_info entry ([] when nothing)."""
    node = info["name"]
    problems = []
    title = next((line[2:].strip() for line in text.splitlines() if line.startswith("# ")), None)
    if title != info["display_name"]:
        problems.append(f"{node}: the page's title {title!r} is not the node's display name {info['display_name']!r}")
    schema = _schema_inputs(info["input"])
    combos = {path: options for path, (kind, options) in schema.items() if kind == "COMFY_DYNAMICCOMBO_V3"}
    documented = {}
    tables = _tables(text)
    for table in (t for t in tables if t["header"] == INPUT_COLUMNS):
        scope = SCOPE.match(table["heading"])
        prefixes = [""]
        if scope:
            combo, keys = scope.group(1), re.findall(r"`(\w+)`", scope.group(2))
            known = [o["key"] for o in combos.get(combo, {}).get("options", [])]
            if not known or not set(keys) <= set(known):
                problems.append(f"{node}: heading {table['heading']!r} names no DynamicCombo or options of it")
                continue
        for row in table["rows"]:
            match = ROW_NAME.match(row[0])
            if match is None or len(row) != len(INPUT_COLUMNS):
                problems.append(f"{node}: cannot read the inputs table row {row}")
                continue
            name, only = match.group(1), match.group(2)
            if scope:
                chosen = [k.strip() for k in only.split(",")] if only else keys
                if not set(chosen) <= set(keys):
                    problems.append(f"{node}: row {row[0]!r} names options outside {table['heading']!r}")
                prefixes = [f"{combo}.{key}." for key in chosen]
            for prefix in prefixes:
                path = prefix + name
                if path in documented:
                    problems.append(f"{node}: {path} is in the inputs table twice")
                documented[path] = row
    for path in sorted(set(documented) - set(schema)):
        problems.append(f"{node}: the page documents {path}, which the node does not have")
    for path in sorted(set(schema) - set(documented)):
        problems.append(f"{node}: the inputs table does not name {path}")
    for path in sorted(set(schema) & set(documented)):
        kind, options = schema[path]
        if isinstance(kind, list):   # a V1-style combo: its options are its type
            kind, options = "COMBO", {**options, "options": kind}
        row = documented[path]
        expected = _default(kind, options)
        if not _same_default(row[1], expected):
            problems.append(f"{node}: {path} default is {expected!r} in the schema, {row[1]!r} on the page")
        problems += [f"{node}: {p}" for p in _range_problems(path, kind, options, row[2])]
    outputs = [row for t in tables if t["header"] == OUTPUT_COLUMNS for row in t["rows"]]
    named = [m.group(1) for m in (re.match(r"^`([^`]+)`", row[0]) for row in outputs) if m]
    if sorted(named) != sorted(info["output_name"]):
        problems.append(f"{node}: the outputs table names {named}, the node has {info['output_name']}")
    return problems


def _images(text: str) -> list[str]:
    return [a or b for a, b in IMAGE.findall(text)]


# -- the tests -------------------------------------------------------------------------------------------------

def test_the_web_directory_is_served_with_only_the_extensions_scripts(host):
    """ComfyUI serves WEB_DIRECTORY at /extensions/<folder>/ and lists every .js under it (recursively) as an
    extension to load: the two scripts of web/js, nothing from the help pages."""
    web_dir = host.EXTENSION_WEB_DIRS.get(comfy_host.REPO_ROOT.name)
    assert web_dir is not None and os.path.samefile(web_dir, WEB), host.EXTENSION_WEB_DIRS
    scripts = sorted(os.path.relpath(f, web_dir).replace("\\", "/")
                     for f in glob.glob(os.path.join(glob.escape(web_dir), "**/*.js"), recursive=True))
    assert scripts == ["js/editkit.js", "js/migrate.js"]
    assert not list(DOCS.rglob("*.js"))


def test_the_extensions_imports_resolve_from_their_served_url(host):
    """editkit.js is served at /extensions/<folder>/js/editkit.js: its import of ComfyUI's app must reach
    /scripts/app.js from there, and its own imports files of the pack."""
    name = comfy_host.REPO_ROOT.name
    for script in (WEB / "js").glob("*.js"):
        url = f"http://host/extensions/{name}/js/{script.name}"
        for target in re.findall(r"^\s*import\s[^;]*?from\s+[\"']([^\"']+)[\"']", script.read_text(), re.M):
            path = urllib.parse.urlparse(urllib.parse.urljoin(url, target)).path
            if path.startswith(f"/extensions/{name}/"):
                assert (WEB / path[len(f"/extensions/{name}/"):]).is_file(), (script.name, target)
            else:
                assert path == "/scripts/app.js", (script.name, target, path)


def test_every_node_has_a_help_page_naming_every_input_with_its_default(host):
    nodes = _pack_nodes(host)
    assert len(nodes) >= 18
    problems = []
    for node, info in sorted(nodes.items()):
        page = DOCS / f"{node}.md"
        if not page.is_file():
            problems.append(f"{node}: no help page {page.relative_to(comfy_host.REPO_ROOT)}")
            continue
        problems += page_problems(info, page.read_text(encoding="utf-8"))
    assert not problems, "\n".join(problems)


def test_the_check_catches_a_missing_input_a_wrong_default_and_an_unknown_row(host):
    info = _pack_nodes(host)["EditKitLatentFuser"]
    text = (DOCS / "EditKitLatentFuser.md").read_text(encoding="utf-8")
    assert page_problems(info, text) == []
    lines = text.splitlines()
    without = "\n".join(line for line in lines if not line.startswith("| `sync_weight`"))
    assert any("does not name mode.syncdiffusion.sync_weight" in p for p in page_problems(info, without))
    wrong = "\n".join(re.sub(r"^(\| `stride` \| )64 ", r"\g<1>32 ", line) for line in lines)
    assert wrong != text
    assert any("stride default is 64" in p for p in page_problems(info, wrong))
    extra = text.replace("| `window` |", "| `windows` |", 1)
    assert any("documents windows" in p for p in page_problems(info, extra))


def test_every_figure_is_a_small_png_beside_the_pages_and_shown_by_one():
    shown = set()
    for page in DOCS.glob("*.md"):
        for src in _images(page.read_text(encoding="utf-8")):
            assert not re.match(r"^(/|[a-z]+:)", src, re.I), f"{page.name}: {src} is not relative to the page"
            path = (DOCS / src).resolve()
            assert path.is_relative_to(DOCS.resolve()) and path.is_file(), f"{page.name}: {src} does not exist"
            data = path.read_bytes()
            assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{src}: not a PNG"
            assert len(data) < MAX_FIGURE_BYTES, f"{src}: {len(data)} bytes"
            shown.add(path)
    unused = sorted(p.name for p in (DOCS / "figures").glob("*") if p.resolve() not in shown)
    assert not unused, f"figures no page shows: {unused}"
