"""What an identity edit of a photo gives (the Attention Controller with the target prompt equal to the source
prompt), on the tiny model (CPU; the random weights make the reconstructions poor, the comparison between rows
is the point).

With direct inversion (Ju et al. 2023) the source row lands on the photo by construction and the targets
evolve freely, so an identity edit is not the photo: it is the DDIM reconstruction, pulled towards the photo
by whatever attention the edit copies from the source. With null-text inversion both rows follow the
optimised unconditional embeddings and the identity edit equals the source row.

    python benchmarks/photo_identity_edit.py [--steps 20] [--size 64]

Prints the PSNR of the decoded rows against the VAE round trip of the photo (what a perfect inversion gives).
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.clamp(0, 1) - b.clamp(0, 1)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    args = parser.parse_args()
    from support import comfy_host
    comfy_host.boot(pathlib.Path(tempfile.mkdtemp(prefix="editkit-identity-")), cpu=True)
    from support.pack import import_pack
    import_pack()
    import comfy.samplers
    from pnp_structure import synthetic_photo
    from support.node_calls import attention_controller, invert
    from support.tiny_models import tiny_checkpoint
    model, clip, vae = tiny_checkpoint(seed=0)
    prompt = "a yellow disc next to a dark bar"
    photo = {"samples": vae.encode(synthetic_photo(args.size))}
    with torch.no_grad():
        round_trip = vae.decode(photo["samples"])
    sampler = comfy.samplers.sampler_object("ddim")
    print(f"# tiny SD1.5-layout model (random weights), CPU; {args.size}x{args.size}, {args.steps} steps, ddim, cfg 5; "
          f"PSNR in dB against the photo's VAE round trip")
    print("| inversion | edit settings | source row | identity target |")
    print("|---|---|---|---|")
    for mode in ("direct", "null_text"):
        noised, inversion, sigmas = invert(model, clip, photo, mode, args.steps, prompt, inner_steps=10)
        for label, settings in (("refine, paper's windows (cross 0.8, self 0.4)", {}),
                                ("refine, empty windows (no attention copied)",
                                 dict(cross_replace=0.0, self_replace=0.0))):
            guider = attention_controller(model, clip, source_prompt=prompt, target_prompt=prompt,
                                          inversion=inversion, **settings)
            out = guider.sample(torch.zeros_like(noised), noised, sampler, sigmas, disable_pbar=True, seed=0)
            with torch.no_grad():
                images = vae.decode(out)
            print(f"| {mode} | {label} | {psnr(images[0], round_trip[0]):.1f} | {psnr(images[1], round_trip[0]):.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
