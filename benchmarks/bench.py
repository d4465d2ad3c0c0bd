"""GPU benchmark: each method's time and peak memory against the floor of plain sampling.

Full-size SD1.5 UNet layout through ComfyUI (random weights: speed and memory do not depend on them),
fp16, 512x512, 50 steps, CFG (batch 2). The floor of a row is the number of UNet evaluations the method
cannot avoid times the time of one plain UNet evaluation at the same batch, measured in the same run.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/bench.py            # GPU, full size
    python benchmarks/bench.py --tiny                                   # CPU smoke run of the script itself

Each method issue adds its rows to ROWS below.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import time

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

SD15_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "use_temporal_attention": False,
    "use_temporal_resblock": False,
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_sd15(device, dtype, config=SD15_UNET_CONFIG, seed=0):
    """A ModelPatcher with the SD1.5 UNet layout and seeded random weights (ComfyUI does not initialise)."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    model_config = comfy.supported_models.SD15(dict(config))
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({}, "", device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.diffusion_model.named_parameters():
            if "norm" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif p.ndim >= 2:
                p.normal_(0, 1.0 / p[0].numel() ** 0.5, generator=g)
            else:
                p.normal_(0, 0.02, generator=g)
    model.diffusion_model.to(dtype)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=torch.device("cpu"))


class Bench:
    def __init__(self, model, device, latent_hw, context_dim, steps):
        self.model, self.device, self.latent_hw, self.steps = model, device, latent_hw, steps
        g = torch.Generator().manual_seed(0)
        self.positive = [[torch.randn(1, 77, context_dim, generator=g), {}]]
        self.negative = [[torch.randn(1, 77, context_dim, generator=g), {}]]

    def unet_eval(self, batch, repeats=20):
        """Median seconds of one UNet evaluation at `batch`."""
        import comfy.model_management
        comfy.model_management.load_models_gpu([self.model])
        inner = self.model.model
        dtype = self.model.model_dtype()
        x = torch.randn(batch, 4, *self.latent_hw, device=self.device, dtype=dtype)
        sigma = torch.full((batch,), 5.0, device=self.device)
        ctx = torch.randn(batch, 77, self.positive[0][0].shape[-1], device=self.device, dtype=dtype)
        times = []
        with torch.no_grad():
            for i in range(repeats + 3):
                sync(self.device)
                t = time.perf_counter()
                inner.apply_model(x, sigma, c_crossattn=ctx)
                sync(self.device)
                if i >= 3:
                    times.append(time.perf_counter() - t)
        return statistics.median(times)

    def _fastest(self, run, repeats):
        """(fastest seconds, peak bytes) of `run()` after one warm-up call.

        The fastest of a few runs: on a shared machine the slower runs measure the neighbours."""
        times, peak = [], 0
        for i in range(repeats + 1):
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            sync(self.device)
            t = time.perf_counter()
            run()
            sync(self.device)
            if i >= 1:
                times.append(time.perf_counter() - t)
            if self.device.type == "cuda":
                peak = max(peak, torch.cuda.max_memory_allocated(self.device))
        return min(times), peak

    def sample(self, model=None, sampler="euler", cfg=7.5, batch=1, repeats=4):
        """A full ComfyUI sampling run (the KSampler path)."""
        import comfy.sample
        model = model or self.model
        latent = torch.zeros(batch, 4, *self.latent_hw)
        noise = comfy.sample.prepare_noise(latent, 0)
        return self._fastest(lambda: comfy.sample.sample(model, noise, self.steps, cfg, sampler, "normal", self.positive,
                                                         self.negative, latent, seed=0, disable_pbar=True), repeats)

    def sample_guider(self, guider, sampler="euler", repeats=4):
        """SamplerCustomAdvanced's path with `guider` on a one-image latent."""
        import comfy.sample
        import comfy.samplers
        latent = torch.zeros(1, 4, *self.latent_hw)
        noise = comfy.sample.prepare_noise(latent, 0)
        sigmas = comfy.samplers.calculate_sigmas(self.model.get_model_object("model_sampling"), "normal", self.steps)
        return self._fastest(lambda: guider.sample(noise, latent, comfy.samplers.sampler_object(sampler), sigmas,
                                                   disable_pbar=True, seed=0), repeats)


def host_kernel_patch(model, sites):
    """attn1/attn2 replace patches that only call ComfyUI's own kernel: the cost of ComfyUI's patch path."""
    import comfy.ldm.modules.attention as attention

    def patch(q, k, v, extra_options):
        return attention.optimized_attention(q, k, v, extra_options["n_heads"],
                                             attn_precision=extra_options.get("attn_precision"),
                                             transformer_options=extra_options)
    patched = model.clone()
    for site in sites:
        setter = patched.set_model_attn1_replace if site.kind == "self" else patched.set_model_attn2_replace
        setter(patch, site.block, site.block_id, site.index)
    return patched


def rows_foundation(bench: Bench, pack):
    """Plain sampling, the mechanism with a controller that does nothing, and attention-map capture."""
    from editkit.core.attention import AttentionController
    from editkit.core.capture import AttentionMapCapture
    from editkit.nodes.comfy_attention import attach_controller as attach, attention_sites
    t_eval2 = bench.unet_eval(2)
    floor = bench.steps * t_eval2
    yield "one UNet evaluation, batch 2", t_eval2, None, t_eval2, 1
    for name, model in (("plain sampling, euler, CFG", bench.model),
                        ("replace patches calling the host kernel", host_kernel_patch(bench.model,
                                                                                      attention_sites(bench.model))),
                        ("mechanism installed, no-op controller", attach(bench.model, AttentionController())),
                        ("attention-map capture (cross, <=32x32)", attach(bench.model, AttentionMapCapture()))):
        t, peak = bench.sample(model)
        yield name, t, peak, floor, bench.steps


def timed(device, fn):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return out, time.perf_counter() - t, peak


def reference_null_text(eps_fn, latents, sigmas, cond, uncond, guidance, inner_steps):
    """Cost replica of the reference implementation (Mokady et al.'s code on a diffusers pipeline): float32
    weights that require grad (so every backward also computes weight gradients), and a batch-2 pass at
    the end of each step recomputing the conditional prediction."""
    from editkit.core.inversion import cfg, guided_eps
    from editkit.core.schedule import euler_sigma_step
    sig = [float(s) for s in sigmas]
    embedding, x = uncond.clone(), latents[0]
    for i in range(len(sig) - 1):
        with torch.no_grad():
            eps_c = eps_fn(x[None], sig[i], cond)[0]
        embedding = embedding.detach().requires_grad_(True)
        opt = torch.optim.Adam([embedding], lr=1e-2 * (1 - i / 100))
        for _ in range(inner_steps):
            eps_u = eps_fn(x[None], sig[i], embedding)[0]
            loss = torch.nn.functional.mse_loss(euler_sigma_step(x, cfg(eps_c, eps_u, guidance), sig[i], sig[i + 1]),
                                                latents[i + 1])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            x = euler_sigma_step(x, guided_eps(eps_fn, x, sig[i], cond, embedding.detach(), guidance), sig[i], sig[i + 1])


def rows_inversion(bench: Bench, pack):
    """Each inversion mode through the node's code path; floors in UNet evaluations at batch 1."""
    import comfy.samplers
    from editkit.core.inversion import NullTextSettings, ddim_invert, null_text_optimise
    from editkit.nodes.inversion import ComfyEps, graph_replayable
    inner_steps = 10
    eps = ComfyEps(bench.model)
    t_eval1 = bench.unet_eval(1)
    yield "one UNet evaluation, batch 1", t_eval1, None, t_eval1, 1
    n = bench.steps
    sigmas = comfy.samplers.calculate_sigmas(bench.model.get_model_object("model_sampling"), "ddim_uniform", n).float()
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, *bench.latent_hw, generator=g).to(bench.device)
    cond = bench.positive[0][0].to(bench.device)
    uncond = bench.negative[0][0].to(bench.device)
    latents, t, peak = timed(bench.device, lambda: ddim_invert(eps, x0, sigmas, cond))
    yield "inversion: ddim / direct / negative_prompt", t, peak, n * t_eval1, n
    settings = NullTextSettings(inner_steps=inner_steps, early_stop=0.0, early_stop_growth=0.0)
    # per step: conditional pass, `inner_steps` unconditional passes with their backward (~2 passes), final pass
    evals = n * (2 + 3 * inner_steps)
    for graph in ((True, False) if graph_replayable(bench.model) else (False,)):
        with torch.enable_grad():
            (_, stats), t_opt, peak = timed(bench.device, lambda: null_text_optimise(
                eps, latents, sigmas, cond, uncond, 7.5, settings, cuda_graph=graph))
        how = "CUDA graph" if stats["cuda_graph"] == "on" else "eager"
        yield f"inversion: null_text ({inner_steps} inner, {how})", t + t_opt, peak, (n + evals) * t_eval1, n + evals
        if stats["cuda_graph"].startswith("failed"):
            print(f"# null-text CUDA graph {stats['cuda_graph']}")
    if bench.device.type == "cuda":
        ref_model = build_sd15(bench.device, torch.float32)
        ref_model.model.diffusion_model.requires_grad_(True)
        ref_eps = ComfyEps(ref_model)
        with torch.enable_grad():
            _, t_ref, peak_ref = timed(bench.device, lambda: reference_null_text(ref_eps, latents, sigmas, cond, uncond,
                                                                              7.5, inner_steps))
        yield "  reference null-text cost (fp32, weight grads)", t + t_ref, peak_ref, (n + evals) * t_eval1, n + evals
        del ref_model, ref_eps


def rows_attention_control(bench: Bench, pack):
    """Prompt-to-Prompt and MasaCtrl pairs (source + target, CFG: batch 4 per evaluation) against the floor of
    one batch-4 evaluation per step, and plain two-image sampling for the memory comparison."""
    from editkit.core.prompt2prompt import LocalBlend, MutualSelfAttention, PromptKeys, PromptToPrompt, TargetEdit
    from editkit.core.tokens import TokenMap
    from editkit.nodes.comfy_attention import attach_controller as attach
    from editkit.nodes.pair_guider import PairCFGGuider
    t_eval4 = bench.unet_eval(4)
    floor = bench.steps * t_eval4
    yield "one UNet evaluation, batch 4", t_eval4, None, t_eval4, 1
    t, peak = bench.sample(batch=2)
    yield "plain sampling of two images, euler, CFG", t, peak, floor, bench.steps
    g = torch.Generator().manual_seed(2)
    width = bench.positive[0][0].shape[-1]
    contexts = [torch.randn(1, 77, width, generator=g) for _ in range(2)]
    negative = bench.negative[0][0]
    identity = TokenMap.one_to_one(tuple(range(77)), (True,) * 77, 77)
    windows = [(0.0, 0.8)] * 77
    windows[5] = (0.0, 0.4)
    swap = PromptToPrompt(targets=(TargetEdit(identity, tuple(windows)),), self_window=(0.0, 0.4))
    capped = PromptToPrompt(targets=(TargetEdit(identity, tuple(windows)),), self_window=(0.0, 0.4),
                            max_tokens=32 * 32)
    blend = LocalBlend(keys=(PromptKeys(77, (5,)), PromptKeys(77, (5,))))
    layers = frozenset(range(10, 16))
    masa = MutualSelfAttention(start_step=4, layers=layers)
    masked = MutualSelfAttention(start_step=4, layers=layers, mask_keys=(PromptKeys(77, (2,)), PromptKeys(77, (2,))))
    cases = [("pair guider, no edit", [], None),
             ("P2P word swap (cross 0.8 at every layer, self 0.4)", [swap], None),
             ("P2P word swap, cross capped at 32x32", [capped], None),
             ("P2P word swap + local blend", [swap, blend], blend), ("MasaCtrl (step 4, layers 10-15)", [masa], None),
             ("MasaCtrl with a word mask (every layer)", [masked], None)]
    for name, controllers, local_blend in cases:
        model = bench.model
        for c in controllers:
            model = attach(model, c)
        t, peak = bench.sample_guider(PairCFGGuider(model, contexts, negative, 7.5, local_blend=local_blend))
        yield name, t, peak, floor, bench.steps


def rows_feature_injection(bench: Bench, pack):
    """Plug-and-Play translation of a photo: our direct inversion (n steps) plus the batched source + target
    translation (batch 4 per step), against the reference pipeline's cost: an inversion of 20x the steps
    (1000 for 50) at batch 1, then source + target with CFG at batch 3 per step."""
    import comfy.samplers
    from editkit.core.inversion import Inversion, ddim_invert
    from editkit.core.plug_and_play import PlugAndPlay
    from editkit.nodes.comfy_attention import attach_controller
    from editkit.nodes.inversion import ComfyEps
    from editkit.nodes.pair_guider import PairCFGGuider
    n = bench.steps
    t_eval1, t_eval3, t_eval4 = bench.unet_eval(1), bench.unet_eval(3), bench.unet_eval(4)
    yield "one UNet evaluation, batch 4", t_eval4, None, t_eval4, 1
    model_sampling = bench.model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(model_sampling, "ddim_uniform", n).float().cpu()
    n = sigmas.shape[0] - 1
    eps = ComfyEps(bench.model)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(4, *bench.latent_hw, generator=g).to(bench.device)
    empty = bench.negative[0][0]
    latents, t_inv, peak_inv = timed(bench.device, lambda: ddim_invert(eps, x0, sigmas, empty.to(bench.device)))
    yield f"direct inversion ({n} steps, empty prompt)", t_inv, peak_inv, n * t_eval1, n
    inversion = Inversion(mode="direct", sigmas=sigmas, latents=latents.cpu(), guidance=7.5, source_context=empty,
                          negative_context=empty)
    model = attach_controller(bench.model, PlugAndPlay())
    guider = PairCFGGuider(model, [empty, bench.positive[0][0]], None, 7.5, inversion=inversion,
                           target_negative=bench.negative[0][0], pin_source=True)
    noised = inversion.noised[None]

    def translate():
        guider.sample(torch.zeros_like(noised), noised, comfy.samplers.sampler_object("ddim"), sigmas,
                      disable_pbar=True, seed=0)
    t_pnp, peak = bench._fastest(translate, 3)
    yield "PnP translation, source + target batched", t_pnp, peak, n * t_eval4, n
    yield "  our total: inversion + translation", t_inv + t_pnp, max(peak, peak_inv), n * (t_eval1 + t_eval4), 2 * n
    long_sigmas = comfy.samplers.calculate_sigmas(model_sampling, "ddim_uniform", 20 * n).float().cpu()
    long_n = long_sigmas.shape[0] - 1
    _, t_long, _ = timed(bench.device, lambda: ddim_invert(eps, x0, long_sigmas, empty.to(bench.device)))
    yield f"  reference: {long_n}-step inversion + {n} steps", t_long + n * t_eval3, None, \
        n * (t_eval1 + t_eval4), long_n + n


SD_VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                   "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def build_vae(device, dtype, tiny: bool):
    """The SD VAE layout with seeded random weights (the tiny test VAE with --tiny)."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from support.tiny_models import _generator, init_weights_, make_comfy_vae
    if tiny:
        return make_comfy_vae(seed=0)
    ae = AutoencoderKL(ddconfig=dict(SD_VAE_DDCONFIG), embed_dim=4)
    init_weights_(ae, _generator(0, "vae"))
    return comfy.sd.VAE(sd=ae.state_dict(), device=device, dtype=dtype,
                        config={"params": {"ddconfig": dict(SD_VAE_DDCONFIG), "embed_dim": 4}})


def rows_latent_fuser(bench: Bench, pack):
    """MultiDiffusion panorama of 9x the square size (512x4608 at full size), windows of the square size every
    1/8 of it (the paper's 64 and 8 latents), ddim, against its floor (window batches x steps UNet evaluations
    at the batch they run at) and against the official loop (one window per UNet call); then SyncDiffusion's
    extra cost per synchronised step on a 6x panorama with stride 1/4 (its paper's 512x3072, stride 16)."""
    import math
    import comfy.sample
    from editkit.nodes.latent_fuser import LatentFuserNode
    from support.comfy_host import add_random_lpips
    side = bench.latent_hw[0]
    window_px, n = side * 8, bench.steps

    def panorama(model, width_factor, steps):
        latent = torch.zeros(1, 4, side, side * width_factor)
        noise = comfy.sample.prepare_noise(latent, 0)
        return lambda: comfy.sample.sample(model, noise, steps, 7.5, "ddim", "ddim_uniform", bench.positive,
                                           bench.negative, latent, seed=0, disable_pbar=True)

    def fuser(window_batch, stride_px, mode=None, vae=None):
        return LatentFuserNode.execute(bench.model, window_px, stride_px, window_batch, False,
                                       mode or {"mode": "multidiffusion"}, 0.0, 0, vae=vae).result[0]

    def measure(model, width_factor):
        panorama(model, width_factor, 2)()                        # warm-up: loads, allocator, kernels
        _, t, peak = timed(bench.device, panorama(model, width_factor, n))
        return t, peak

    windows = (9 * side - side) // (side // 8) + 1
    t_eval2 = bench.unet_eval(2)
    yield f"one UNet evaluation, batch 2 (a window)", t_eval2, None, t_eval2, 1
    official_floor = windows * n * t_eval2
    for window_batch in (4, 8, 16):
        calls = math.ceil(windows / window_batch)
        floor = calls * n * bench.unet_eval(2 * window_batch)
        t, peak = measure(fuser(window_batch, window_px // 8), 9)
        yield f"panorama 1x9, {windows} windows, batch {window_batch}", t, peak, floor, calls * n

    def official_loop():
        """The official panorama loop's cost: a CFG UNet call per window, its step, value / count."""
        import comfy.model_management
        import comfy.samplers
        comfy.model_management.load_models_gpu([bench.model])
        inner, dtype = bench.model.model, bench.model.model_dtype()
        sigmas = comfy.samplers.calculate_sigmas(bench.model.get_model_object("model_sampling"), "ddim_uniform", n)
        context = torch.cat([bench.negative[0][0], bench.positive[0][0]]).to(bench.device, dtype)
        x = torch.randn(1, 4, side, 9 * side, device=bench.device) * float(sigmas[0])
        stride = side // 8
        with torch.no_grad():
            for i in range(n):
                sigma, following = float(sigmas[i]), float(sigmas[i + 1])
                value, count = torch.zeros_like(x), torch.zeros_like(x)
                for left in range(0, 8 * side + 1, stride):
                    view = x[..., left:left + side]
                    out = inner.apply_model(torch.cat([view] * 2).to(dtype), torch.full((2,), sigma, device=bench.device),
                                            c_crossattn=context).float()
                    denoised = out[0:1] + 7.5 * (out[1:2] - out[0:1])
                    value[..., left:left + side] += view + (following - sigma) / sigma * (view - denoised)
                    count[..., left:left + side] += 1
                x = value / count
    _, t, peak = timed(bench.device, official_loop)
    yield f"official loop: one window per call", t, peak, official_floor, windows * n

    lpips_file = add_random_lpips(tempfile.mkdtemp(prefix="editkit-lpips-"))
    vae = build_vae(bench.device, torch.float16, bench.device.type != "cuda")
    sync_windows = (6 * side - side) // (side // 4) + 1
    sync_steps = max(1, int(0.2 * n))          # the paper's 10 of 50 (at least one in a short --tiny run)
    t_plain, _ = measure(fuser(8, window_px // 4), 6)
    yield f"panorama 1x6, {sync_windows} windows, batch 8", t_plain, None, \
        math.ceil(sync_windows / 8) * n * bench.unet_eval(16), math.ceil(sync_windows / 8) * n
    for sync_batch in (1, 4):
        mode = {"mode": "syncdiffusion", "lpips": lpips_file, "sync_until": (sync_steps + 0.5) / n,
                "sync_weight": 20.0,
                "sync_decay": 0.95, "sync_every": 1, "sync_batch": sync_batch}
        t, peak = measure(fuser(8, window_px // 4, mode, vae), 6)
        yield f"  + sync, {sync_steps} steps, sync_batch {sync_batch}", t, peak, t_plain, \
            math.ceil(sync_windows / 8) * n
        # floor of the extra: a forward and a backward (about 2 evaluations) per moved window, VAE not counted
        yield f"    extra per sync step", (t - t_plain) / sync_steps, None, (sync_windows - 1) * 2 * t_eval2, \
            2 * (sync_windows - 1)


def rows_keyframe(bench: Bench, pack):
    """Keyframe attention alone on 16 frames (a batch of 16 latents, CFG: batch 32 per evaluation) against plain
    batched sampling of the same frames; the floor is the steps' evaluations at batch 32."""
    from editkit.nodes.keyframe_attention import KeyframeAttentionNode
    frames, n = 16, bench.steps
    t_eval = bench.unet_eval(2 * frames)
    yield f"one UNet evaluation, batch {2 * frames}", t_eval, None, t_eval, 1
    t, peak = bench.sample(batch=frames, repeats=2)
    yield f"plain sampling, {frames} frames batched", t, peak, n * t_eval, n
    for mode in ("first", "first_and_previous", "all"):
        model = KeyframeAttentionNode.execute(bench.model, {"mode": mode}, "", 0.0, 1.0, 0).result[0]
        t, peak = bench.sample(model, batch=frames, repeats=2)
        yield f"keyframe attention {mode}, {frames} frames", t, peak, n * t_eval, n


def build_clip(tiny: bool):
    """A CLIP-L-layout text encoder with seeded random weights on the CPU (the tiny test CLIP with --tiny): the
    Attention Controller tokenises its prompts (word swap, fusion words) and encodes them."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base
    from support.tiny_models import _generator, init_weights_, make_comfy_clip
    if tiny:
        return make_comfy_clip(seed=0)
    cpu = torch.device("cpu")
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    clip = comfy.sd.CLIP(target=target, model_options={"dtype": torch.float32, "load_device": cpu,
                                                       "offload_device": cpu, "initial_device": cpu})
    init_weights_(clip.cond_stage_model, _generator(0, "clip"))
    return clip


def rows_video_edit(bench: Bench, pack):
    """Zero-shot editing of an inverted video (issue 13): 16 frames inverted in one batch (direct: 16 rows per
    evaluation, no CFG), then edited by the Attention Controller's pair guider (ddim; source and edited clips
    with CFG: batch 64 per evaluation): word swap, + FateZero's attention fusion, + keyframe attention
    first_and_previous (the full video edit). Floors: the steps' evaluations at batch 16 and 64. Goal: peak
    <= 12 GB, within 1.3x of the floor."""
    import comfy.samplers
    from editkit.nodes.attention_control import AttentionControllerNode, AttentionFusionNode
    from editkit.nodes.inversion import NullTextInvert
    from editkit.nodes.keyframe_attention import KeyframeAttentionNode
    from support.comfy_host import encode
    from support.node_calls import edit_settings
    from support.tiny_models import CONTEXT_DIM
    frames, source, target = 16, "a cat riding a bicycle", "a dog riding a bicycle"
    t_inv, t_edit = bench.unet_eval(frames), bench.unet_eval(4 * frames)
    yield f"one UNet evaluation, batch {frames}", t_inv, None, t_inv, 1
    yield f"one UNet evaluation, batch {4 * frames}", t_edit, None, t_edit, 1
    clip = build_clip(tiny=bench.positive[0][0].shape[-1] == CONTEXT_DIM)
    positive, negative = encode(clip, source), encode(clip, "")
    g = torch.Generator().manual_seed(4)
    video = {"samples": torch.randn(frames, 4, *bench.latent_hw, generator=g)}
    inverted = []

    def invert():
        inverted[:] = NullTextInvert.execute(bench.model, positive, negative, video, "direct", bench.steps,
                                             "ddim_uniform", 7.5, 10, 0.01, 1e-5).result
    t_invert, peak_invert = bench._fastest(invert, 2)
    noised, inversion, sigmas = inverted
    n = sigmas.shape[0] - 1
    yield f"inversion of {frames} frames (direct, batched)", t_invert, peak_invert, n * t_inv, n
    x = noised["samples"]

    def edit(model, fusion=None):
        guider = AttentionControllerNode.execute(
            model=model, clip=clip, source_prompt=source, target_prompt=target, negative_prompt="",
            edit=edit_settings("word_swap", self_max_resolution=32), cfg=7.5, inversion=inversion,
            fusion=fusion).result[0]
        return bench._fastest(lambda: guider.sample(torch.zeros_like(x), x, comfy.samplers.sampler_object("ddim"),
                                                    sigmas, disable_pbar=True, seed=0), 2)
    fusion = AttentionFusionNode.execute("cat", 0.3).result[0]
    keyframes = KeyframeAttentionNode.execute(bench.model, {"mode": "first_and_previous"}, "", 0.0, 1.0, 0, 0.0,
                                              0.5).result[0]
    for name, model, fused in ((f"edit {frames} frames: word swap", bench.model, None),
                               ("  + attention fusion (cat, 0.3)", bench.model, fusion),
                               ("  + keyframe attn first_and_previous (full)", keyframes, fusion)):
        t, peak = edit(model, fused)
        yield name, t, peak, n * t_edit, n
    yield "  total: inversion + full edit", t_invert + t, max(peak, peak_invert), n * (t_inv + t_edit), 2 * n


def rows_consistory(bench: Bench, pack):
    """Consistent Subject (issue 14) on 4 prompts (a batch of 4 latents, CFG: batch 8 per evaluation) against plain
    batched sampling of the same 4 prompts; the floor is the steps' evaluations at batch 8. Goal: within 1.3x of
    plain sampling in time and memory."""
    import comfy.sample
    from editkit.nodes.consistory import ConsistentSubjectNode
    from support.tiny_models import CONTEXT_DIM
    images, n = 4, bench.steps
    prompts = "\n".join(["a watercolor of a fox reading", "a fox in the snow", "a fox on a boat",
                         "a fox in a kitchen"])
    clip = build_clip(tiny=bench.positive[0][0].shape[-1] == CONTEXT_DIM)
    model, positive, _ = ConsistentSubjectNode.execute(bench.model, clip, prompts, "fox", 0.5, 1.0, 0, "", 0.0, 1.0,
                                                       0).result
    latent = torch.zeros(images, 4, *bench.latent_hw)
    noise = comfy.sample.prepare_noise(latent, 0)

    def sample(m):
        return bench._fastest(lambda: comfy.sample.sample(m, noise, n, 7.5, "euler", "normal", positive,
                                                          bench.negative, latent, seed=0, disable_pbar=True), 3)
    t_eval = bench.unet_eval(2 * images)
    yield f"one UNet evaluation, batch {2 * images}", t_eval, None, t_eval, 1
    t_plain, peak_plain = sample(bench.model)
    yield f"plain sampling, {images} prompts batched", t_plain, peak_plain, n * t_eval, n
    t, peak = sample(model)
    yield f"consistent subject, {images} prompts", t, peak, n * t_eval, n


def rows_p3s(bench: Bench, pack):
    """P3S-Diffusion (issue 15): training an adapter on 4 references for 60 epochs (one step per image: 240 steps of
    the copy and the frozen UNet, forward and backward, batch 1), and sampling with it against plain sampling. Floors:
    the training steps at 3 batch-1 evaluations each (forward of both UNets, backward about twice a forward, not
    counted for the frozen weights), and the sampling steps at 2 evaluations (the copy and the UNet, CFG batched).
    Goals: training <= 3 minutes and a peak that fits a 24 GB card; sampling within 1.3x of plain sampling."""
    import comfy.sample
    from editkit.nodes.p3s_adapter import P3SAdapter, conditioned_model, train
    references, epochs, n = 4, 60 if bench.steps >= 50 else 1, bench.steps
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(references, 4, *bench.latent_hw, generator=g)
    clip_width = 1024 if bench.positive[0][0].shape[-1] == 768 else 32
    states = torch.randn(references, 257, clip_width, generator=g)
    t_eval = bench.unet_eval(1)
    yield "one UNet evaluation, batch 1", t_eval, None, t_eval, 1
    adapter = P3SAdapter.fresh(bench.model, latents, states)
    context = bench.positive[0][0]
    _, t, peak = timed(bench.device, lambda: train(bench.model, adapter, context, context * 0, epochs, 1e-5))
    steps = epochs * references
    yield f"P3S training, {references} images x {epochs} epochs", t, peak, 3 * steps * t_eval, 3 * steps
    latent = torch.zeros(1, 4, *bench.latent_hw)
    noise = comfy.sample.prepare_noise(latent, 0)
    t_eval2 = bench.unet_eval(2)

    def sample(model):
        return bench._fastest(lambda: comfy.sample.sample(model, noise, n, 7.5, "ddim", "ddim_uniform", bench.positive,
                                                          bench.negative, latent, seed=0, disable_pbar=True), 3)
    t_plain, peak_plain = sample(bench.model)
    yield "plain sampling, ddim, CFG", t_plain, peak_plain, n * t_eval2, n
    t, peak = sample(conditioned_model(bench.model, adapter)[0])
    yield "P3S conditioned sampling", t, peak, 2 * n * t_eval2, 2 * n


ROWS = [rows_foundation, rows_inversion, rows_attention_control, rows_feature_injection, rows_latent_fuser,
        rows_keyframe, rows_video_edit, rows_consistory, rows_p3s]


def boot(cpu: bool):
    from support import comfy_host
    comfy_host.boot(pathlib.Path(tempfile.mkdtemp(prefix="editkit-bench-")), cpu=cpu)
    from support.pack import import_pack
    return import_pack()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny model on the CPU (checks the script, not speed)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--size", type=int, default=None, help="image side in pixels")
    parser.add_argument("--rows", default=None, help="comma-separated row groups to run (foundation, inversion, attention_control, feature_injection, latent_fuser, keyframe, video_edit, consistory, p3s)")
    args = parser.parse_args()
    cpu = args.tiny or not torch.cuda.is_available()
    pack = boot(cpu)
    import comfy.model_management
    device = comfy.model_management.get_torch_device()
    if args.tiny:
        from support.tiny_models import CONTEXT_DIM, make_comfy_model
        model, context_dim = make_comfy_model(seed=0), CONTEXT_DIM
        size, steps = args.size or 64, args.steps or 10
        label = "tiny SD1.5-layout UNet, CPU, float32 (script check only: not a speed figure)"
    else:
        model, context_dim = build_sd15(device, torch.float16), 768
        size, steps = args.size or 512, args.steps or 50
        label = f"SD1.5 UNet layout, random weights, fp16, {torch.cuda.get_device_name(device)}"
    bench = Bench(model, device, (size // 8, size // 8), context_dim, steps)
    print(f"# {label}; {size}x{size}, {steps} steps; torch {torch.__version__}")
    print(f"| {'row':44} | {'time s':>8} | {'floor s':>8} | {'x floor':>7} | {'UNet evals':>10} | {'peak GiB':>8} |")
    print(f"|{'-' * 46}|{'-' * 10}|{'-' * 10}|{'-' * 9}|{'-' * 12}|{'-' * 10}|")
    chosen = [r for r in ROWS if args.rows is None or r.__name__.replace("rows_", "") in args.rows.split(",")]
    for rows in chosen:
        for name, t, peak, floor, evals in rows(bench, pack):
            peak_s = f"{peak / 2**30:8.2f}" if peak else f"{'-':>8}"
            print(f"| {name:44} | {t:8.3f} | {floor:8.3f} | {t / floor:7.2f} | {evals:10d} | {peak_s} |", flush=True)


if __name__ == "__main__":
    main()
