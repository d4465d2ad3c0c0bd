"""Test setup: `support` (tests/support) importable, and the pack importable as `editkit`.

The pack's root is the repository itself (ComfyUI loads it from custom_nodes/<any name>), so the tests
register it under a fixed package name; its __init__ imports nothing from ComfyUI until the host loads it.
"""
import pathlib
import sys

TESTS = pathlib.Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from support.pack import import_pack  # noqa: E402

import_pack()
