"""Structure preservation of Plug-and-Play translations on the tiny model (CPU; a behaviour check of the
method's settings, not a quality figure: the tiny model has random weights).

Structure distance: mean absolute difference between the self-similarity matrices (cosine similarity of
every pair of latent pixels) of the translation and of the photo, the latent-space analogue of the DINO
self-similarity distance the paper evaluates with (Tumanyan et al. 2023, sec. 5). Lower keeps more structure.

The source comes either from our direct inversion with as many steps as the sampling, or, as in the
reference pipeline, from a 20x longer DDIM inversion whose latents at the sampling steps drive the source.

    python benchmarks/pnp_structure.py [--steps 50] [--size 64] [--cfg 7.5]
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def self_similarity(latent: torch.Tensor) -> torch.Tensor:
    flat = torch.nn.functional.normalize(latent.flatten(1).T, dim=1)   # (pixels, channels)
    return flat @ flat.T


def structure_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((self_similarity(a) - self_similarity(b)).abs().mean())


def synthetic_photo(size: int) -> torch.Tensor:
    """A picture with clear structure: a bright disc and a dark bar on a gradient."""
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    disc = ((x - 0.35) ** 2 + (y - 0.4) ** 2 < 0.04).float()
    bar = ((x > 0.6) & (x < 0.75) & (y > 0.2)).float()
    rgb = torch.stack([0.3 + 0.5 * x, 0.3 + 0.4 * y, 0.5 * torch.ones_like(x)], -1)
    rgb = torch.where(disc[..., None] > 0, torch.tensor([1.0, 0.9, 0.2]), rgb)
    rgb = torch.where(bar[..., None] > 0, torch.tensor([0.05, 0.05, 0.1]), rgb)
    return rgb[None]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--cfg", type=float, default=7.5)
    args = parser.parse_args()
    from support import comfy_host
    comfy_host.boot(pathlib.Path(tempfile.mkdtemp(prefix="editkit-pnp-")), cpu=True)
    from support.pack import import_pack
    import_pack()
    import comfy.samplers
    from editkit.core.inversion import Inversion, ddim_invert
    from editkit.nodes.feature_injection import FeatureInjectorNode
    from editkit.nodes.inversion import ComfyEps, NullTextInvert
    from support.tiny_models import tiny_checkpoint
    model, clip, vae = tiny_checkpoint(seed=0)
    encode = lambda text: comfy_host.encode(clip, text)   # noqa: E731
    photo = {"samples": vae.encode(synthetic_photo(args.size))}
    t = time.perf_counter()
    noised, ours, sigmas = NullTextInvert.execute(model, encode(""), encode(""), photo, "direct", args.steps,
                                                  "ddim_uniform", 7.5, 10, 0.01, 1e-5).result
    t_ours = time.perf_counter() - t
    n = sigmas.shape[-1] - 1
    long_sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "ddim_uniform",
                                                  20 * args.steps).float().cpu()
    t = time.perf_counter()
    with torch.no_grad():
        long_latents = ddim_invert(ComfyEps(model), photo["samples"][0], long_sigmas, ours.source_context)
    t_long = time.perf_counter() - t
    picks = [int((long_sigmas - s).abs().argmin()) for s in sigmas.float()]
    gap = max(float((long_sigmas[i] - s).abs() / max(float(s), 1e-3)) for i, s in zip(picks, sigmas.float()))
    reference = Inversion(mode="direct", sigmas=sigmas.float().cpu(), latents=long_latents[picks].cpu(), guidance=7.5,
                          source_context=ours.source_context, negative_context=ours.negative_context)
    sampler = comfy.samplers.sampler_object("ddim")
    settings = [("no injection", 0.0, 0.0), ("residual features only (0.8)", 0.8, 0.0),
                ("self-attention q, k only (0.5)", 0.0, 0.5), ("both (paper: 0.8 / 0.5)", 0.8, 0.5),
                ("both, whole run (1.0 / 1.0)", 1.0, 1.0)]
    print(f"# tiny SD1.5-layout model, CPU; {args.size}x{args.size}, {n} sampling steps; ddim, cfg {args.cfg}")
    print(f"# inversion: ours {n} steps {t_ours:.1f} s; reference {long_sigmas.shape[0] - 1} steps {t_long:.1f} s "
          f"(its latents picked at the sampling sigmas, largest relative sigma gap {gap:.1e})")
    print("| source inversion | injection | structure distance | mean abs(target - photo) |")
    print("|---|---|---|---|")
    for label, inversion in (("ours (direct)", ours), ("reference (20x steps)", reference)):
        start = inversion.noised[None]
        for name, features, attention in settings:
            guider, _ = FeatureInjectorNode.execute(model, inversion, encode("a marble sculpture of a horse"),
                                                    encode("ugly, blurry, black, low res, unrealistic"), "4",
                                                    features, "4-11", attention, 1.0, args.cfg).result
            out = guider.sample(torch.zeros_like(start), start, sampler, sigmas, disable_pbar=True, seed=0)
            target, source = out[1], photo["samples"][0]
            print(f"| {label} | {name} | {structure_distance(target, source):.4f} | "
                  f"{float((target - source).abs().mean()):.4f} |", flush=True)


if __name__ == "__main__":
    main()
