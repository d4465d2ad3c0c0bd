"""GPU check: null-text's inner step replayed from a CUDA graph does what the eager step does, and is faster.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/check_null_text_graph.py        # GPU only

Full-size SD1.5 UNet layout (random weights, fp16), 512x512, 50-step ddim_uniform schedule:
1. ten inner iterations of the first sampling step, eagerly and from a graph, from the same start: their
   losses and the optimised embeddings must agree (fp16 rounding, not different arithmetic);
2. the NullTextInvert node under inference mode, as ComfyUI's executor runs it, with and without the graph:
   time, whether the graph was used, and each one's reconstruction error against plain DDIM inversion's.
Exits 1 if step 1 disagrees or the node did not use the graph.
"""
from __future__ import annotations

import pathlib
import sys
import tempfile
import time

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))


def _timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


def _inner_iterations(inner, count):
    losses = []
    for _ in range(count):
        losses.append(inner.run().item())
    return losses


def check_inner_step(model, eps, latents, sigmas, cond, uncond) -> bool:
    from editkit.core.inversion import _InnerIteration
    sig = [float(s) for s in sigmas]
    x = latents[0]
    with torch.no_grad():
        eps_c = eps(x[None], sig[0], cond)[0]
    results = {}
    for how in ("eager", "graph"):
        inner = _InnerIteration(eps, x, uncond, 7.5)
        inner.start(x, eps_c, latents[1], sig[0], sig[1], 1e-2)
        if how == "graph":
            inner.capture()
        _inner_iterations(inner, 1)                      # first use: lazy initialisation
        inner.start(x, eps_c, latents[1], sig[0], sig[1], 1e-2)
        with torch.no_grad():
            inner.embedding.copy_(uncond)
        losses, seconds = _timed(lambda: _inner_iterations(inner, 10))
        results[how] = (losses, inner.embedding.detach().clone(), seconds)
        print(f"{how:5}: {seconds / 10 * 1000:6.1f} ms per inner iteration; losses "
              + " ".join(f"{v:.5g}" for v in losses), flush=True)
    (loss_e, emb_e, _), (loss_g, emb_g, _) = results["eager"], results["graph"]
    moved = (emb_e - uncond).abs().max().item()
    apart = (emb_g - emb_e).abs().max().item()
    loss_gap = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(loss_e, loss_g))
    print(f"embedding moved {moved:.4g} (eager); graph vs eager: max embedding difference {apart:.3g}, "
          f"largest relative loss difference {loss_gap:.3g}", flush=True)
    return apart <= 0.05 * moved and loss_gap <= 1e-2


def check_node(model, cond, uncond, x0, steps=50) -> bool:
    import editkit.nodes.inversion as inversion_nodes
    from editkit.core.inversion import Inversion, reconstruct
    inner_model = model.model
    latent = {"samples": inner_model.process_latent_out(x0[None].clone().cpu())}
    positive, negative = [[cond.cpu(), {}]], [[uncond.cpu(), {}]]
    args = dict(steps=steps, scheduler="ddim_uniform", guidance=7.5, inner_steps=10, learning_rate=0.01,
                early_stop=1e-5)
    replayable = inversion_nodes.graph_replayable
    used = {}
    errors = {}
    try:
        for how in ("graph", "eager", "ddim"):
            inversion_nodes.graph_replayable = replayable if how == "graph" else (lambda m: False)
            mode = "ddim" if how == "ddim" else "null_text"
            with torch.inference_mode():
                (_, inversion, _), seconds = _timed(lambda: inversion_nodes.NullTextInvert.execute(
                    model, positive, negative, latent, mode, **args))
            used[how] = inversion.metadata.get("cuda_graph", "-")
            eps = inversion_nodes.ComfyEps(model)
            on_device = Inversion(inversion.mode, inversion.sigmas, inversion.latents.to(x0.device), 7.5,
                                  None if inversion.uncond_embeddings is None
                                  else inversion.uncond_embeddings.to(x0.device))
            with torch.no_grad():
                back = reconstruct(eps, on_device, cond, uncond)
            errors[how] = (back - x0).pow(2).mean().item()
            print(f"node {how:5}: {seconds:6.1f} s, cuda_graph {used[how]}, reconstruction MSE {errors[how]:.4g}",
                  flush=True)
    finally:
        inversion_nodes.graph_replayable = replayable
    return used["graph"] == "on"


def main():
    if not torch.cuda.is_available():
        sys.exit("check_null_text_graph.py needs a CUDA GPU")
    from support import comfy_host
    comfy_host.boot(pathlib.Path(tempfile.mkdtemp(prefix="editkit-graph-")), cpu=False)
    from support.pack import import_pack
    import_pack()
    import bench
    import comfy.model_management
    import comfy.samplers
    from editkit.core.inversion import ddim_invert
    from editkit.nodes.inversion import ComfyEps, graph_replayable
    device = torch.device("cuda")
    model = bench.build_sd15(device, torch.float16)
    comfy.model_management.load_models_gpu([model])
    print(f"# {torch.cuda.get_device_name(device)}, torch {torch.__version__}; graph_replayable: "
          f"{graph_replayable(model)}", flush=True)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 64, 64, generator=g).to(device)
    cond = torch.randn(1, 77, 768, generator=g).to(device)
    uncond = torch.randn(1, 77, 768, generator=g).to(device)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "ddim_uniform", 50).float()
    eps = ComfyEps(model)
    latents = ddim_invert(eps, x0, sigmas, cond)
    with torch.enable_grad():
        inner_ok = check_inner_step(model, eps, latents, sigmas, cond, uncond)
    node_ok = check_node(model, cond, uncond, x0)
    print(f"inner step agrees: {inner_ok}; node used the graph: {node_ok}", flush=True)
    sys.exit(0 if inner_ok and node_ok else 1)


if __name__ == "__main__":
    main()
