"""Score the toy-world checkpoint: sample captions through ComfyUI and print the per-attribute table.

Sampling is ComfyUI's own: the committed weights loaded by ``support.tiny_models.toyworld_checkpoint()`` into the
tiny SD15 models, prompts encoded as CLIPTextEncode does (negative: the empty prompt), and the core ``KSampler``
node with sampler ``ddim`` and scheduler ``ddim_uniform`` (ComfyUI's ddim is the Euler step on the DDIM timesteps,
which is deterministic DDIM, eta 0), ``--steps`` steps at CFG ``--cfg``, ``--seeds`` images per caption, sampled
in latent batches whose rows carry their own captions (a CONDITIONING of the latent's batch size; ComfyUI draws
each row's noise from the seed). Images are decoded by the toy-world VAE and read by ``evaluate.score``. The VAE round trip of fresh renders of the same captions is printed as the bound.

    OMP_NUM_THREADS=1 python tests/toyworld/score.py                 # held-out captions, 30 steps, CFG 6
    OMP_NUM_THREADS=1 python tests/toyworld/score.py --split train --grid /tmp/train.png
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

import numpy as np
import torch

HERE = pathlib.Path(__file__).resolve().parent
TESTS = HERE.parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from toyworld import evaluate, world  # noqa: E402

CHANCE = {"colour": 1 / len(world.COLOURS), "shape": 1 / len(world.SHAPES), "position": 1 / len(world.POSITIONS),
          "size": 1 / len(world.SIZE_RADIUS), "background": 1 / len(world.BACKGROUNDS)}
TARGETS = {"colour": 0.95, "shape": 0.90, "position": 0.90, "background": 1.0}


def batch_conditioning(clip, captions):
    """One CONDITIONING whose row i is CLIPTextEncode's encoding of captions[i] (ComfyUI uses a cond of the
    latent's batch size row by row)."""
    from support.comfy_host import encode

    encoded = [encode(clip, c)[0] for c in captions]
    cond = torch.cat([e[0] for e in encoded])
    extra = dict(encoded[0][1])
    if extra.get("pooled_output") is not None:
        extra["pooled_output"] = torch.cat([e[1]["pooled_output"] for e in encoded])
    return [[cond, extra]]


def sample_captions(model, clip, vae, captions, seeds: int, steps: int, cfg: float, seed: int = 0,
                    chunk: int = 72):
    """Decoded IMAGEs (len(captions) * seeds, 64, 64, 3) and their captions (each caption ``seeds`` times in a
    row), sampled by ComfyUI's KSampler in latent batches of ``chunk`` rows, each row with its own caption."""
    import nodes
    from support.comfy_host import encode

    caps = [c for c in captions for _ in range(seeds)]
    negative = encode(clip, "")
    images = []
    for j in range(0, len(caps), chunk):
        rows = caps[j:j + chunk]
        latent = {"samples": torch.zeros(len(rows), 4, world.IMAGE_SIZE // 8, world.IMAGE_SIZE // 8)}
        (out,) = nodes.KSampler().sample(model, seed + j, steps, cfg, "ddim", "ddim_uniform",
                                         batch_conditioning(clip, rows), negative, latent, denoise=1.0)
        images.append(vae.decode(out["samples"]).reshape(len(rows), world.IMAGE_SIZE, world.IMAGE_SIZE, 3).float())
    return torch.cat(images), caps


def save_grid(images, path, cols: int):
    from PIL import Image
    a = (images.clamp(0, 1).numpy() * 255).astype(np.uint8)
    n, h, w, _ = a.shape
    rows = (n + cols - 1) // cols
    grid = np.full((rows * (h + 2), cols * (w + 2), 3), 255, np.uint8)
    for k in range(n):
        r, c = divmod(k, cols)
        grid[r * (h + 2):r * (h + 2) + h, c * (w + 2):c * (w + 2) + w] = a[k]
    Image.fromarray(grid).save(path)


def table(rows: dict[str, dict[str, float]]) -> str:
    names = list(rows)
    out = ["| attribute | " + " | ".join(names) + " | target | chance |",
           "|---|" + "---|" * len(names) + "---|---|"]
    for a in list(world.ATTRIBUTES) + ["all", "psnr", "object_psnr"]:
        if not any(a in r for r in rows.values()):
            continue
        cells = []
        for r in rows.values():
            v = r.get(a)
            cells.append("" if v is None else (f"{v:.1f} dB" if "psnr" in a else f"{v:.0%}"))
        tgt = f"≥ {TARGETS[a]:.0%}" if a in TARGETS else ""
        ch = f"{CHANCE[a]:.0%}" if a in CHANCE else ""
        out.append(f"| {a} | " + " | ".join(cells) + f" | {tgt} | {ch} |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", choices=["held_out", "train"], default="held_out")
    p.add_argument("--seeds", type=int, default=4, help="images per caption")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--cfg", type=float, default=6.0)
    p.add_argument("--limit", type=int, default=0, help="only the first N captions (train: every k-th, N in all)")
    p.add_argument("--grid", type=str, default="", help="save the sampled images as a PNG grid")
    p.add_argument("--weights", type=str, default="", help="folder of the weights (default tests/toyworld/weights)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    from support import comfy_host
    comfy_host.boot_comfy(tempfile.mkdtemp(prefix="toyworld_score_"))
    from support.tiny_models import toyworld_checkpoint
    model, clip, vae = toyworld_checkpoint(args.weights or None)

    captions = list(world.HELD_OUT_CAPTIONS if args.split == "held_out" else world.TRAIN_CAPTIONS)
    if args.limit:
        captions = captions[::max(1, len(captions) // args.limit)][:args.limit]
    t0 = time.time()
    with torch.no_grad():
        images, caps = sample_captions(model, clip, vae, captions, args.seeds, args.steps, args.cfg)
        bound = evaluate.round_trip(vae, captions)
    sampled = evaluate.score_batch(images, caps)
    name = f"{args.split} ({len(captions)} captions x {args.seeds} seeds, {args.steps} DDIM steps, CFG {args.cfg:g})"
    print(table({name: sampled, "VAE round trip": bound}))
    print(f"({time.time() - t0:.0f} s)")
    if args.grid:
        save_grid(images, args.grid, cols=args.seeds * 6)
        print("grid:", args.grid)
    return sampled, bound


if __name__ == "__main__":
    main()
