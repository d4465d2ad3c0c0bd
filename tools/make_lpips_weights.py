"""Creates the pack's LPIPS (VGG16) weights file, once, on your own machine.

It combines torchvision's ImageNet VGG16 (`vgg16(weights=VGG16_Weights.IMAGENET1K_V1)`, which torchvision
downloads into its cache the first time) with the learned linear layers of LPIPS v0.1 (`weights/v0.1/vgg.pth`
of the `lpips` package, or a copy given with --lin), and writes them in the pack's layout (see core/lpips.py).

Usage, from the ComfyUI folder, with ComfyUI's Python:

    pip install lpips          # only for its vgg.pth; or pass --lin /path/to/vgg.pth
    python custom_nodes/<this pack>/tools/make_lpips_weights.py
    python custom_nodes/<this pack>/tools/make_lpips_weights.py --lin ~/vgg.pth --out models/lpips/vgg_lpips.safetensors

The default --out, models/lpips/vgg_lpips.safetensors, is relative to the current folder.
"""
from __future__ import annotations

import argparse
import importlib.util
import pathlib

import torch

PACK = pathlib.Path(__file__).resolve().parents[1]


def _load_core_lpips():
    # Loaded by file path: the pack is not an installed package, and `core` may name something else on sys.path
    spec = importlib.util.spec_from_file_location("editkit_core_lpips", PACK / "core" / "lpips.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _installed_lin_weights() -> pathlib.Path:
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the lpips package is not installed: `pip install lpips`, or pass --lin path/to/vgg.pth")
    path = pathlib.Path(spec.submodule_search_locations[0]) / "weights" / "v0.1" / "vgg.pth"
    if not path.is_file():
        raise SystemExit(f"the installed lpips package has no {path}; pass --lin path/to/vgg.pth")
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write the pack's VGG LPIPS weights (.safetensors).")
    parser.add_argument("--lin", type=pathlib.Path, default=None,
                        help="LPIPS v0.1 vgg.pth (default: the one inside the installed lpips package)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("models/lpips/vgg_lpips.safetensors"),
                        help="file to write (default: %(default)s, relative to the current folder)")
    args = parser.parse_args(argv)

    from safetensors.torch import save_file
    from torchvision.models import VGG16_Weights, vgg16

    core_lpips = _load_core_lpips()
    lin_path = args.lin or _installed_lin_weights()
    print(f"linear layers: {lin_path}")
    lin_state = torch.load(lin_path, map_location="cpu", weights_only=True)
    print("VGG16: torchvision IMAGENET1K_V1 (downloaded by torchvision if not cached)")
    vgg_state = vgg16(weights=VGG16_Weights.IMAGENET1K_V1).state_dict()

    state = core_lpips.convert_official(vgg_state, lin_state)
    state = {key: tensor.float().contiguous() for key, tensor in state.items()}
    core_lpips.LPIPS.from_state_dict(state)   # refuse to write anything the loader would not accept

    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(args.out), metadata={"format": "editkit-lpips-vgg16", "lpips_version": "0.1"})
    print(f"wrote {args.out.resolve()}")


if __name__ == "__main__":
    main()
