"""The GPU machine's single benchmark command (benchmarks/bench.py --budget), rehearsed on the CPU with the tiny
models: every row group runs in one process, each row at least twice or reported skipped with its reason, a row
that raises is reported and the run goes on, and bench.json and bench.md are written and agree. A synthetic group
checks the budget rules with rows of known cost."""
from __future__ import annotations

import json
import time

import pytest
import torch

from support.pack import load_script

FAILING = "P2P word swap + local blend"      # made to raise by the test hook


@pytest.fixture(scope="module")
def bench(host):
    return load_script("benchmarks/bench.py")


@pytest.fixture(scope="module")
def rehearsal(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_out")
    report = bench.main(["--tiny", "--steps", "2", "--budget", "75", "--max-repeats", "2", "--out", str(out)],
                        fail_rows={FAILING})
    return report, out


def markdown_rows(text: str) -> dict[tuple[str, str], list[str]]:
    """(group, row name) -> the cells of its line, read from bench.md."""
    rows, group = {}, None
    for line in text.splitlines():
        if line.startswith("### "):
            group = line[4:].strip()
        elif line.startswith("| ") and not line.startswith("| row |"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[(group, cells[0])] = cells
    return rows


def check_files_agree(report: dict, out) -> None:
    on_disk = json.loads((out / "bench.json").read_text())
    assert on_disk["rows"] == report["rows"] and on_disk["meta"] == report["meta"] and on_disk["finished"]
    md = markdown_rows((out / "bench.md").read_text())
    assert len(md) == len(report["rows"])
    for row in report["rows"]:
        cells = md[(row["group"], row["row"].strip())]
        assert cells[1] == ("-" if row["seconds"] is None else f"{row['seconds']:.3f}"), row
        assert cells[7].startswith(row["status"]), row


def test_every_row_runs_twice_or_says_why_not(bench, rehearsal):
    report, _ = rehearsal
    rows = report["rows"]
    assert report["finished"]
    groups = list(dict.fromkeys(r["group"] for r in rows if not r["compare"]))
    assert groups == [bench.group_name(g) for g in bench.GROUPS]
    unexpected = []
    for row in rows:
        status = row["status"]
        if row["row"] == FAILING:
            continue
        if status == "ok":
            if row["kind"] != "derived" and row["repeats"] < 2:
                unexpected.append(row)
        elif not (status.startswith("skipped: ") and len(status) > len("skipped: ") + 5):
            unexpected.append(row)
    assert not unexpected, "\n".join(f"{r['group']}: {r['row']}: {r['status']} {r['trace']}" for r in unexpected)
    measured = [r for r in rows if r["status"] == "ok" and r["kind"] == "measured"]
    assert all(r["seconds"] > 0 and r["seconds"] <= r["first_s"] for r in measured)
    # on the CPU only the CUDA-graph rows cannot run; the others ran unless the budget ran out
    if not any("budget" in r["status"] for r in rows):
        skipped = {r["row"] for r in rows if r["status"].startswith("skipped")}
        assert all("CUDA graph" in name or "graph agrees" in name for name in skipped), skipped
    meta = report["meta"]
    assert meta["device"].startswith("cpu") and meta["torch"] == torch.__version__
    assert meta["comfyui"] != "unknown" and meta["date"][:2] == "20" and meta["budget_s"] == 75


def test_a_row_that_raises_is_reported_and_the_run_goes_on(rehearsal):
    report, _ = rehearsal
    rows = report["rows"]
    failed = next(r for r in rows if r["row"] == FAILING)
    assert failed["status"] == "error: RuntimeError: injected failure (test hook)"
    assert "injected failure" in failed["trace"]
    after = rows[rows.index(failed) + 1:]
    assert after and all(r["status"] not in ("running", "pending") for r in after)
    following = after[0]     # the next row of the same group was measured (or met the end of the budget)
    assert following["group"] == failed["group"]
    assert following["status"] == "ok" or following["status"].startswith("skipped: budget"), following


def test_the_json_and_markdown_files_agree(rehearsal):
    check_files_agree(*rehearsal)


def test_budget_rules_with_rows_of_known_cost(bench, tmp_path):
    """A row runs at least twice; one whose floor shows two runs cannot fit is not started; one whose first run
    shows a second cannot fit is skipped with that run's time; rows needing a skipped row are skipped; comparison
    rows wait for the second pass; a group reached with no budget left is skipped whole; errors do not stop it."""
    def never():
        raise AssertionError("a row skipped for its floor ran")

    def raises():
        raise ValueError("boom")

    def rows_first(b):
        b.row("raises", raises, 0.001, 1)
        b.row("fits", lambda: time.sleep(0.02), 0.001, 1)
        big = b.row("floor too large", never, 5.0, 100)
        b.row("comparison", lambda: time.sleep(0.01), 0.001, 1, compare=True)
        b.row("needs the skipped row", never, 0.001, 1, needs=[big])
        b.row("first run too long", lambda: time.sleep(1.2), 0.001, 1)

    def rows_second(b):
        b.row("never reached", never, 0.001, 1)

    meta = {"device": "cpu", "label": "synthetic", "size": "-", "torch": "-", "comfyui": "-", "date": "-",
            "budget_s": 1.0}
    table = bench.Table(tmp_path, meta, time.monotonic())
    b = bench.Bench(None, torch.device("cpu"), bench.TINY, 32, True, table, deadline=time.monotonic() + 1.0)
    bench.run_groups(b, [rows_first, rows_second])
    table.finished = True
    table.write()
    status = {(r.group, r.name): r for r in table.rows.values()}
    assert status["first", "raises"].status == "error: ValueError: boom"
    assert status["first", "fits"].status == "ok" and status["first", "fits"].repeats >= 2
    assert status["first", "floor too large"].status.startswith("skipped: budget (2 runs of at least the floor 5 s")
    assert status["first", "needs the skipped row"].status.startswith("skipped: needs 'floor too large' (skipped")
    late = status["first", "first run too long"]
    assert late.status.startswith("skipped: budget (its first run took") and late.repeats == 1 and late.first_s >= 1.2
    assert status["second", "(all rows)"].status == "skipped: budget (none left when the group was reached)"
    assert status["first", "comparison"].status == "skipped: budget (none left for the comparison rows)"
    assert [r.name for r in table.rows.values()][:6] == ["raises", "fits", "floor too large", "comparison",
                                                         "needs the skipped row", "first run too long"]
    check_files_agree(table.report(), tmp_path)
