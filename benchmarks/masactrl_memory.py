"""Peak memory of masked MasaCtrl against plain two-image sampling, on the CPU, full-size SD1.5 layout.

One UNet evaluation of a source and a target with CFG (batch 4) at a 64x64 latent (512 px), random weights,
float32, through the diffusers adapter: plain (no controller), MasaCtrl (layers 10-15, no mask) and masked
MasaCtrl (the user's masks, which split the attention at every layer of the window, 64x64 included). Each
mode runs in a fresh process and reports its peak resident memory (ru_maxrss: weights, activations and the
interpreter), so the modes differ only by what the method allocates.

    python benchmarks/masactrl_memory.py              # 64x64 latent (512 px)
    python benchmarks/masactrl_memory.py --latent 32  # quicker
"""
from __future__ import annotations

import argparse
import json
import pathlib
import resource
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODES = ("plain", "masactrl", "masactrl_masked")
SD15 = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


def _measure(mode: str, latent: int) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    import torch
    from diffusers import UNet2DConditionModel
    from support.pack import import_pack
    import_pack()
    from editkit.core import attention, prompt2prompt as p2p
    from editkit.core import diffusers_adapter as adapter_module
    torch.manual_seed(0)
    torch.set_num_threads(2)
    unet = UNet2DConditionModel(**SD15).eval().requires_grad_(False)
    x = torch.randn(4, 4, latent, latent)
    context = torch.randn(4, 77, 768)
    controllers = []
    if mode != "plain":
        masks = None
        if mode == "masactrl_masked":
            source = torch.zeros(latent * 8, latent * 8)
            source[:, : latent * 4] = 1.0
            target = torch.zeros_like(source)
            target[latent * 2:, :] = 1.0
            masks = (source, target)
        controllers = [p2p.MutualSelfAttention(start_step=0, layers=frozenset(range(10, 16)), masks=masks)]
    adapter = adapter_module.DiffusersAttentionAdapter(unet, controllers).install()
    layout = attention.BatchLayout(("uncond", "cond"), 2)
    start = time.perf_counter()
    with torch.no_grad(), adapter.run(1, (latent, latent), layout=layout, pair=True) as session:
        session.step = 0
        unet(x, 981, encoder_hidden_states=context)
    seconds = time.perf_counter() - start
    return {"mode": mode, "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
            "seconds": seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)   # one measurement, in this process
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(_measure(args.mode, args.latent)))
        return 0
    rows = []
    for mode in MODES:
        done = subprocess.run([sys.executable, __file__, "--mode", mode, "--latent", str(args.latent)],
                              capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    plain = rows[0]["peak_gib"]
    print(f"| mode ({args.latent}x{args.latent} latent, batch 4) | peak GiB | x plain | s |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['mode']} | {row['peak_gib']:.2f} | {row['peak_gib'] / plain:.2f} | {row['seconds']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
