"""Fixtures shared by the host tests: ComfyUI booted with this pack, and the tiny checkpoint."""
import pytest

from support import comfy_host


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    """ComfyUI's `nodes` module, with this pack loaded and the shipped workflows' example photo in its input
    folder (booting is once per process; the folders are temporary)."""
    comfy_host.require_host()
    nodes = comfy_host.boot(tmp_path_factory.mktemp("comfyui"))
    comfy_host.write_example_photo()
    return nodes


@pytest.fixture(scope="module")
def tiny(host):
    """(MODEL, CLIP, VAE) of the tiny SD1.5-layout checkpoint; fresh clones per module."""
    from support.tiny_models import tiny_checkpoint
    return tiny_checkpoint(seed=0)


@pytest.fixture(scope="module")
def tiny_sdxl(host):
    """(MODEL, CLIP, VAE) of the tiny SDXL-layout checkpoint; fresh clones per module."""
    from support.tiny_models import tiny_sdxl_checkpoint
    return tiny_sdxl_checkpoint(seed=0)


@pytest.fixture(scope="module")
def lpips_weights(host, tmp_path_factory):
    """The file name of random LPIPS weights in a temporary models/lpips folder (SyncDiffusion needs one)."""
    return comfy_host.add_random_lpips(tmp_path_factory.mktemp("lpips"))
