"""Prints the slowest test files of a run as a Markdown table (the README's CI-time table): seconds per file,
summed over its tests, from pytest's JUnit report.

    python -m pytest --junitxml=/tmp/run.xml && python tools/slowest_files.py /tmp/run.xml [rows]
"""
from __future__ import annotations

import collections
import sys
import xml.etree.ElementTree as ET


def seconds_per_file(report: str) -> collections.Counter:
    per_file = collections.Counter()
    for case in ET.parse(report).iter("testcase"):
        per_file[case.get("classname", "").replace(".", "/") + ".py"] += float(case.get("time", 0.0))
    return per_file


def main(report: str, rows: int = 12) -> None:
    per_file = seconds_per_file(report)
    print("| file | s |\n|---|---|")
    for name, seconds in per_file.most_common(rows):
        print(f"| `{name}` | {seconds:.0f} |")
    print(f"| all {len(per_file)} files | {sum(per_file.values()):.0f} |")


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:3]))
