"""GPU check: null-text's inner step replayed from a CUDA graph does what the eager step does, and is faster.

Run as rows of bench.py's inversion group (`bench.py --rows inversion`; GPU rows, skipped on the CPU):
1. ten inner iterations of the first sampling step, eagerly and from a graph, from the same start: their
   losses and the optimised embeddings must agree (fp16 rounding, not different arithmetic);
2. the NullTextInvert node under inference mode, as ComfyUI's executor runs it, with and without the graph:
   time, whether the graph was used, and each one's reconstruction error against plain DDIM inversion's.
The row "null-text check: graph agrees with eager, node uses it" says "check failed" if step 1 disagrees or the
node did not use the graph.
"""
from __future__ import annotations

import time

import torch


def inner_iterations(eps, latents, sigmas, cond, uncond, graph: bool, count: int = 10, guidance: float = 7.5):
    """`count` inner iterations of the first sampling step from the same start, eagerly or replayed from a CUDA
    graph (built and used once first: lazy initialisation). Returns (seconds of the `count` iterations,
    (their losses, the optimised embedding))."""
    from editkit.core.inversion import _InnerIteration
    sig = [float(s) for s in sigmas]
    x = latents[0]
    with torch.enable_grad():
        with torch.no_grad():
            eps_c = eps(x[None], sig[0], cond)[0]
        inner = _InnerIteration(eps, x, uncond, guidance)
        inner.start(x, eps_c, latents[1], sig[0], sig[1], 1e-2)
        if graph:
            inner.capture()
        inner.run().item()
        inner.start(x, eps_c, latents[1], sig[0], sig[1], 1e-2)
        with torch.no_grad():
            inner.embedding.copy_(uncond)
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        start = time.perf_counter()
        losses = [inner.run().item() for _ in range(count)]      # .item() waits for each iteration
        seconds = time.perf_counter() - start
    return seconds, (losses, inner.embedding.detach().clone())


def verdict(eager, graph, uncond, node_inversion) -> tuple[bool, str]:
    """Whether the graph's iterations agree with the eager ones (results of inner_iterations) and the node (its
    INVERSION output) used the graph; and the figures compared."""
    (loss_e, emb_e), (loss_g, emb_g) = eager, graph
    moved = (emb_e - uncond).abs().max().item()
    apart = (emb_g - emb_e).abs().max().item()
    loss_gap = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(loss_e, loss_g))
    used = node_inversion.metadata.get("cuda_graph", "-")
    agree = apart <= 0.05 * moved and loss_gap <= 1e-2
    return agree and used == "on", (f"embedding moved {moved:.4g} (eager); graph vs eager: max embedding difference "
                                    f"{apart:.3g}, largest relative loss difference {loss_gap:.3g}; node cuda_graph "
                                    f"{used}")


def node_run(model, cond, uncond, x0, mode: str, graph: bool, steps: int, inner_steps: int):
    """A function running the Invert Image node under inference mode (as ComfyUI's executor does) on the latent
    x0, with the CUDA graph allowed or not; it returns the node's INVERSION."""
    import editkit.nodes.inversion as inversion_nodes
    latent = {"samples": model.model.process_latent_out(x0[None].clone().cpu())}
    positive, negative = [[cond.cpu(), {}]], [[uncond.cpu(), {}]]

    def run():
        replayable = inversion_nodes.graph_replayable
        inversion_nodes.graph_replayable = replayable if graph else (lambda m: False)
        try:
            with torch.inference_mode():
                return inversion_nodes.NullTextInvert.execute(model, positive, negative, latent, mode, steps,
                                                              "ddim_uniform", 7.5, inner_steps, 0.01, 1e-5).result[1]
        finally:
            inversion_nodes.graph_replayable = replayable
    return run


def node_note(model, inversion, cond, uncond, x0) -> str:
    """Whether the node used the graph, and the reconstruction error of its inversion."""
    from editkit.core.inversion import Inversion, reconstruct
    from editkit.nodes.inversion import ComfyEps
    eps = ComfyEps(model)
    embeddings = inversion.uncond_embeddings
    on_device = Inversion(inversion.mode, inversion.sigmas, inversion.latents.to(x0.device), 7.5,
                          None if embeddings is None else embeddings.to(x0.device))
    with torch.no_grad():
        back = reconstruct(eps, on_device, cond, uncond)
    used = inversion.metadata.get("cuda_graph")
    return (f"cuda_graph {used}, " if used else "") + f"reconstruction MSE {(back - x0).pow(2).mean().item():.4g}"
