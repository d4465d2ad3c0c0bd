"""Test setup: `support` (tests/support) importable, and the pack importable as `editkit`.

The pack's root is the repository itself (ComfyUI loads it from custom_nodes/<any name>), so the tests
register it under a fixed package name; its __init__ imports nothing from ComfyUI until the host loads it.
"""
import os
import pathlib
import sys

TESTS = pathlib.Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from support.pack import import_pack  # noqa: E402

import_pack()

import pytest  # noqa: E402
import torch  # noqa: E402


# Two test workers (pytest-xdist, pyproject's addopts) share the cores: one torch thread each on two cores runs
# nearly twice as fast as one process on two threads, whose small ops gain little from the second.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def pytest_configure(config):
    config.addinivalue_line("markers", "single_thread: run the test on one CPU thread (bitwise-reproducible "
                                       "backward passes; see the fixture below)")


@pytest.fixture(autouse=True)
def _single_thread(request):
    """Tests that compare two runs of an optimisation bit for bit, or an autograd step with a reference to 1e-4,
    run on one thread: on some CPUs torch's multithreaded backward kernels sum in a varying order, and Adam's
    normalised updates (null-text) or a gradient through the VAE (SyncDiffusion) turn that rounding into visible
    differences. Nothing in the pack depends on it; the reproducibility is the tests'."""
    if request.node.get_closest_marker("single_thread") is None:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
