"""Workflows saved with the Attention Controller's earlier layout load with their values: the front-end
extension (web/js/migrate.js, run here with Node.js) rewrites them before the graph is built, and the result
runs in the real executor."""
import json
import os
import shutil
import subprocess

import pytest

from support import comfy_host

SAVED = comfy_host.REPO_ROOT / "tests" / "fixtures" / "saved_workflows"
STEPS = 3


def _node():
    node = shutil.which("node")
    if node is None:
        message = "Node.js is needed to run the front-end migration (web/js/migrate.js)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return node


def migrate(workflow: dict, tmp_path) -> tuple[dict, int]:
    """(migrated workflow, nodes changed), from the extension's own code."""
    script = tmp_path / "migrate.mjs"
    shutil.copy(comfy_host.REPO_ROOT / "web" / "js" / "migrate.js", script)   # .mjs: an ES module for Node
    runner = tmp_path / "run.mjs"
    runner.write_text("import { migrateWorkflow } from './migrate.mjs';\n"
                      "let text = ''; process.stdin.on('data', (d) => { text += d; });\n"
                      "process.stdin.on('end', () => { const wf = JSON.parse(text); const n = migrateWorkflow(wf);\n"
                      "  process.stdout.write(JSON.stringify({ wf, n })); });\n")
    done = subprocess.run([_node(), str(runner)], input=json.dumps(workflow), capture_output=True, text=True,
                          timeout=60, check=True)
    out = json.loads(done.stdout)
    return out["wf"], out["n"]


def _controller(prompt):
    return prompt[comfy_host.node_of(prompt, "EditKitAttentionController")]["inputs"]


@pytest.mark.parametrize("name", sorted(p.name for p in SAVED.glob("*.json")))
def test_a_saved_workflow_of_the_old_layout_keeps_its_values_and_runs(host, tmp_path, name):
    saved = comfy_host.load_workflow(SAVED / name)
    old = next(n for n in saved["nodes"] if n["type"] == "EditKitAttentionController")["widgets_values"]
    migrated, changed = migrate(saved, tmp_path)
    assert changed == 1
    prompt = comfy_host.tiny_prompt(migrated, STEPS)
    inputs = _controller(prompt)
    assert [inputs.get(k) for k in ("target_prompt", "negative_prompt", "edit", "cfg")] == [old[1], old[2], old[3], old[15]]
    if old[3] == "masactrl":
        assert (inputs["edit.start_step"], inputs["edit.layers"], inputs["edit.mask_word"]) == \
            (old[11], f"{old[12]}-15", old[13])
    else:
        assert (inputs["edit.cross_replace"], inputs["edit.self_replace"], inputs["edit.word_windows"],
                inputs["edit.reweight"], inputs["edit.blend_words"], inputs["edit.blend_start"]) == \
            (old[4], old[5], old[6], old[7], old[8], old[10])
    if old[3] == "masactrl":
        inputs["edit.start_step"] = 1   # within the shrunk run
    result = comfy_host.run_prompt(prompt)
    samples = result.outputs[comfy_host.node_of(prompt, "SamplerCustomAdvanced")][0]["samples"]
    assert samples.shape[0] == 2


@pytest.mark.parametrize("name", sorted(p.name for p in (comfy_host.REPO_ROOT / "workflows").glob("*.json")))
def test_the_shipped_workflows_need_no_migration(host, tmp_path, name):
    _, changed = migrate(comfy_host.load_workflow(comfy_host.REPO_ROOT / "workflows" / name), tmp_path)
    assert changed == 0
