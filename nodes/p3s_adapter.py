"""P3S-Diffusion's trainable condition injection on a ComfyUI UNet (core/p3s.py holds the host-independent parts).

- The trainable copy: the user's UNet itself, deep-copied in float32, with the middle block's second ResBlock and
  the output head removed. Reading of the paper's "simplified U-Net (with only one ResNet block in each block)":
  in ComfyUI's layout every UNet block holds at most one ResBlock except the middle one, and nothing after the last
  self-attention layer is needed, so the copy keeps every transformer layer (one feature f_i per self-attention
  layer of the frozen UNet, eq. 6) and its skip connections.
- Each UNet call (a DIFFUSION_MODEL wrapper) first runs the copy on x_t + I'' (the RNGR encoding of the chosen
  reference, resized to the latent), with the same timestep and prompt, records the hidden state that each of its
  self-attention layers attends with, maps it through the zero projections and the weight eps_t (eq. 9-10), and
  hands the result to the P3SInjection controller of the frozen UNet. The frozen UNet is never changed.
- An adapter file: safetensors (the copy, the zero projections, the RNGR encoder, the references' latents and CLIP
  hidden states) with JSON metadata naming its format and the UNet layout it was trained for.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..core.attention import CROSS, SELF, AttentionSite, RunState, structure_sites
from ..core.files import read_safetensors
from ..core.p3s import (ALPHA, BETA, LAMBDA, POWER, LastCrossProbs, P3SInjection, RNGREncoder, ZeroProjections,
                        injection_weight)
from .comfy_attention import RUN_KEY, _unet, attach_controller, transformer_modules, unet_structure

FORMAT = "editkit-p3s-adapter"
VERSION = 1
FOLDER = "p3s"
WRAPPER_KEY = "editkit_p3s"


def register_folder() -> None:
    """models/p3s: where trained adapters are saved and loaded from."""
    import folder_paths
    if FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[FOLDER] = ([os.path.join(folder_paths.models_dir, FOLDER)],
                                                       {".safetensors"})


def _sites(model_patcher) -> dict[tuple[str, int, int], tuple[AttentionSite, AttentionSite]]:
    sites = structure_sites(unet_structure(model_patcher))
    by_key = {}
    for s in sites:
        by_key.setdefault((s.block, s.block_id, s.index), [None, None])[0 if s.kind == SELF else 1] = s
    return {k: tuple(v) for k, v in by_key.items()}


def unet_layout(model_patcher) -> dict:
    """What an adapter must match: every transformer's place and width, the context width and input channels."""
    unet = _unet(model_patcher)
    modules = transformer_modules(unet)
    return {"transformers": [[b, i, j, modules[(b, i, j)].attn1.to_k.in_features] for b, i, j in sorted(modules)],
            "context_dim": int(next(iter(modules.values())).attn2.to_k.in_features),
            "in_channels": int(unet.in_channels)}


def _build_copy(unet) -> torch.nn.Module:
    """The trainable copy: float32, gradients on, without the middle block's second ResBlock and the output head."""
    with torch.inference_mode(False):
        copied = copy.deepcopy(unet)
        for module in copied.modules():
            for name, p in list(module._parameters.items()):
                if p is not None:
                    module._parameters[name] = torch.nn.Parameter(p.detach().clone().float(), requires_grad=True)
            for name, b in list(module._buffers.items()):
                if b is not None:
                    module._buffers[name] = b.detach().clone()
        if len(copied.middle_block) > 2:
            copied.middle_block[2] = torch.nn.Identity()
        copied.out = torch.nn.Identity()
        copied.dtype = torch.float32
        for module in copied.modules():   # its own float32 weights: no casting, no patches of the original's
            if hasattr(module, "comfy_cast_weights"):
                module.comfy_cast_weights = False
            for name in ("weight_function", "bias_function"):
                if getattr(module, name, None):
                    setattr(module, name, [])
    return copied.float()


@dataclass(eq=False)
class P3SAdapter:
    """A trained (or fresh) P3S adapter: the copy, its zero projections, the RNGR encoder, the references."""
    copy: torch.nn.Module
    zero: ZeroProjections
    rngr: RNGREncoder
    latents: torch.Tensor        # (R, C, h, w) the filled references' latents, in the model's latent space
    clip_states: torch.Tensor    # (R, N, D) their CLIP image encoder's last hidden states
    layout: dict
    metadata: dict = field(default_factory=dict)

    @staticmethod
    def fresh(model_patcher, latents: torch.Tensor, clip_states: torch.Tensor, seed: int = 0) -> "P3SAdapter":
        unet = _unet(model_patcher)
        sites = _sites(model_patcher)
        widths = {sites[(b, i, j)][0].name: w for b, i, j, w in unet_layout(model_patcher)["transformers"]}
        with torch.inference_mode(False):   # nodes run in inference mode; the adapter's tensors must train
            return P3SAdapter(_build_copy(unet), ZeroProjections(widths),
                              RNGREncoder(latents.shape[1], clip_states.shape[-1], seed=seed),
                              latents.detach().float().cpu().clone(), clip_states.detach().float().cpu().clone(),
                              unet_layout(model_patcher))

    @property
    def references(self) -> int:
        return self.latents.shape[0]

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for m in (self.copy, self.zero, self.rngr) for p in m.parameters()]

    def to(self, device) -> "P3SAdapter":
        for m in (self.copy, self.zero, self.rngr):
            m.to(device)
        return self

    def check_model(self, model_patcher) -> None:
        layout = unet_layout(model_patcher)
        if layout != self.layout:
            raise ValueError(f"p3s_adapter: it was trained for another UNet layout ({len(self.layout['transformers'])} "
                             f"transformers, context {self.layout['context_dim']}) than this model's "
                             f"({len(layout['transformers'])} transformers, context {layout['context_dim']}); train "
                             f"it on this checkpoint")

    # -- file ----------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        tensors = {f"copy.{k}": v for k, v in self.copy.state_dict().items()}
        tensors.update({f"zero.{k}": v for k, v in self.zero.state_dict().items()})
        tensors.update({f"rngr.{k}": v for k, v in self.rngr.state_dict().items()})
        tensors["reference.latents"], tensors["reference.clip_states"] = self.latents, self.clip_states
        return {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}

    def save(self, path: str) -> None:
        """Written to a temporary file first: an interrupted save leaves no half-written adapter."""
        from safetensors.torch import save_file
        meta = {"format": FORMAT, "version": str(VERSION), "layout": json.dumps(self.layout),
                "metadata": json.dumps(self.metadata)}
        partial = path + ".partial"
        try:
            save_file(self.state_dict(), partial, metadata=meta)
            os.replace(partial, path)
        finally:
            if os.path.exists(partial):
                os.remove(partial)

    @staticmethod
    def load(path: str, model_patcher) -> "P3SAdapter":
        name = os.path.basename(path)
        meta, tensors = read_safetensors(path, "p3s_adapter")
        if meta.get("format") != FORMAT:
            raise ValueError(f"p3s_adapter: '{name}' is not a P3S adapter (its metadata names no '{FORMAT}' format); "
                             f"train one with the P3S Train node")
        if int(meta.get("version", 0)) != VERSION:
            raise ValueError(f"p3s_adapter: '{name}' is of format version {meta.get('version')}, this pack reads "
                             f"version {VERSION}")
        latents, clip_states = tensors["reference.latents"], tensors["reference.clip_states"]
        adapter = P3SAdapter.fresh(model_patcher, latents, clip_states)
        adapter.layout = json.loads(meta["layout"])
        adapter.check_model(model_patcher)
        for prefix, module in (("copy.", adapter.copy), ("zero.", adapter.zero), ("rngr.", adapter.rngr)):
            module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        adapter.metadata = json.loads(meta.get("metadata", "{}"))
        return adapter


# -- running the copy inside the frozen UNet's evaluation ------------------------------------------------------

def _self_name(block, block_index) -> str:
    return f"{block[0]}{block[1]}.{block_index}.self"


@dataclass(eq=False)
class P3SWrapper:
    """DIFFUSION_MODEL wrapper: the copy's features for this UNet call, handed to the injection controller."""
    adapter: P3SAdapter
    controller: P3SInjection
    reference: int = 0
    alpha: float = ALPHA
    beta: float = BETA
    power: float = POWER
    last_cross: tuple | None = None          # (block, block_id, index) whose copy probabilities are kept (training)
    copy_probs: list = field(default_factory=list)

    def __deepcopy__(self, memo):
        return self

    def features(self, x, timesteps, context, y=None):
        """{site name: eps_t * f_i} for the rows of x (eq. 6, 9, 10)."""
        adapter = self.adapter
        param = next(adapter.copy.parameters())
        device, dtype = param.device, param.dtype
        ref = self.reference
        bias = adapter.rngr(adapter.latents[ref:ref + 1].to(device), adapter.clip_states[ref:ref + 1].to(device))
        if bias.shape[-2:] != x.shape[-2:]:
            bias = F.interpolate(bias, size=x.shape[-2:], mode="bilinear", align_corners=False)
        hidden = {}

        def record(n, context_attn1, value_attn1, extra_options):
            hidden[_self_name(extra_options["block"], extra_options.get("block_index", 0))] = n
            return n, context_attn1, value_attn1

        options = {"patches": {"attn1_patch": [record]}}
        if self.last_cross is not None:
            options["patches_replace"] = {"attn2": {self.last_cross: self._keep_probs}}
        kwargs = {} if y is None else {"y": y.to(device, dtype)}
        adapter.copy(x.to(device, dtype) + bias.to(dtype), timesteps.to(device), context=context.to(device, dtype),
                     transformer_options=options, **kwargs)
        weight = injection_weight(timesteps.to(device, dtype), self.alpha, self.beta, self.power).view(-1, 1, 1)
        return {name: (f * weight).to(x.dtype) for name, f in adapter.zero(hidden).items()}

    def _keep_probs(self, q, k, v, extra_options):
        from ..core.attention import attention_probs, apply_probs
        probs = attention_probs(q, k, extra_options["n_heads"])
        self.copy_probs.append(probs)
        return apply_probs(probs, v, extra_options["n_heads"])

    def __call__(self, executor, x, *args, **kwargs):
        options = args[4] if len(args) > 4 else kwargs.get("transformer_options", {})
        run: RunState | None = options.get(RUN_KEY)
        if run is None:
            return executor(x, *args, **kwargs)
        if next(self.adapter.copy.parameters()).device != x.device:   # follows the model to its device
            self.adapter.to(x.device)
        timesteps = args[0] if args else kwargs["timesteps"]
        context = args[1] if len(args) > 1 else kwargs.get("context")
        y = args[2] if len(args) > 2 else kwargs.get("y")
        self.controller.set_features(run, self.features(x, timesteps, context, y))
        try:
            return executor(x, *args, **kwargs)
        finally:
            self.controller.set_features(run, {})


def projections(model_patcher) -> dict:
    """Site name -> the frozen UNet's own (to_k, to_v) of that self-attention layer."""
    modules = transformer_modules(_unet(model_patcher))
    sites = _sites(model_patcher)
    out = {}
    for key, block in modules.items():
        attn = block.attn1
        if getattr(attn.to_k, "bias", None) is not None or getattr(attn.to_v, "bias", None) is not None:
            raise ValueError("model: this UNet's self-attention projections have biases; P3S injection supports "
                             "SD 1.x / 2.x / XL UNets")
        out[sites[key][0].name] = (lambda a: (lambda w: (a.to_k(w), a.to_v(w))))(attn)
    return out


def last_cross_site(model_patcher) -> AttentionSite:
    return max((s for s in structure_sites(unet_structure(model_patcher)) if s.kind == CROSS),
               key=lambda s: s.execution_order)


def conditioned_model(model_patcher, adapter: P3SAdapter, reference: int = 0, lam: float = LAMBDA,
                      alpha: float = ALPHA, beta: float = BETA, power: float = POWER, keep_probs: bool = False):
    """A clone of the model with the adapter injected; (clone, wrapper, probs controller or None)."""
    import comfy.patcher_extension
    if model_patcher.get_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY):
        raise ValueError("model: a P3S adapter is already on this model (from another P3S Conditioner); connect "
                         "the checkpoint's MODEL, one adapter per model")
    adapter.check_model(model_patcher)
    if not 0 <= reference < adapter.references:
        raise ValueError(f"reference: {reference} is not one of the adapter's {adapter.references} reference images "
                         f"(0 to {adapter.references - 1})")
    controller = P3SInjection(projections(model_patcher), lam)
    patched = attach_controller(model_patcher, controller)
    capture = None
    last = None
    if keep_probs:
        site = last_cross_site(model_patcher)
        capture = LastCrossProbs(site.name)
        patched = attach_controller(patched, capture)
        last = (site.block, site.block_id, site.index)
    wrapper = P3SWrapper(adapter, controller, reference, alpha, beta, power, last)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, wrapper)
    return patched, wrapper, capture


def evaluation_options(patched, run: RunState) -> dict:
    """The transformer options of one direct `apply_model` call on `patched` outside a sampler: its patches, its
    wrappers (which a sampler would merge in) and the run state of its controllers."""
    import comfy.patcher_extension
    options = dict(patched.model_options["transformer_options"])
    wrappers = comfy.patcher_extension.merge_nested_dicts(dict(options.get("wrappers", {})), patched.wrappers,
                                                          copy_dict1=True)
    return {**options, "wrappers": wrappers, RUN_KEY: run}


def loss_curve_image(losses: list[float], size: tuple[int, int] = (512, 256)) -> torch.Tensor:
    """(1, H, W, 3) IMAGE: the training loss per step, a line on a white ground with its range written."""
    from PIL import Image, ImageDraw
    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    if losses:
        low, high = min(losses), max(losses)
        span = (high - low) or 1.0
        margin = 24
        points = [(margin + (width - 2 * margin) * i / max(len(losses) - 1, 1),
                   height - margin - (height - 2 * margin) * (v - low) / span) for i, v in enumerate(losses)]
        draw.line([(margin, height - margin), (width - margin, height - margin)], fill=(160, 160, 160))
        draw.line(points if len(points) > 1 else points * 2, fill=(200, 60, 40), width=2)
        draw.text((margin, 4), f"loss {losses[0]:.4g} -> {losses[-1]:.4g} (min {low:.4g}, max {high:.4g}), "
                               f"{len(losses)} steps", fill=(0, 0, 0))
    import numpy as np
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
    return pixels[None]


def train(model_patcher, adapter: P3SAdapter, text_context: torch.Tensor, empty_context: torch.Tensor, epochs: int,
          lr: float, lam: float = LAMBDA, gamma: float = 0.1, dropout: float = 0.1, seed: int = 0,
          on_step=None) -> list[float]:
    """Fine-tunes the adapter on its references (sec. III-B): per epoch one step per reference image, the denoising
    loss of the frozen UNet with the injection plus gamma times the attention consistency loss of the last
    cross-attention layer; the text condition dropped (empty prompt) with probability `dropout`. Only the copy, the
    zero projections and the RNGR encoder are optimised. Returns the losses; `on_step(step, steps, loss)` is called
    after each step (progress, interruption)."""
    import comfy.model_management
    from ..core.p3s import attention_consistency_loss
    from .comfy_attention import CONTROLS_KEY
    from .inversion import autograd_usable_weights
    comfy.model_management.load_model_gpu(model_patcher)
    inner = model_patcher.model
    device = model_patcher.load_device
    patched, wrapper, capture = conditioned_model(model_patcher, adapter, 0, lam, keep_probs=True)
    controls = patched.model_options["transformer_options"][CONTROLS_KEY]
    g = torch.Generator().manual_seed(seed)
    steps = epochs * adapter.references
    losses = []
    with torch.inference_mode(False), torch.enable_grad(), autograd_usable_weights(inner.diffusion_model):
        # tensors made in inference mode (the prompts' encodings, the schedule) cannot be saved for backward
        text_context, empty_context = text_context.clone().to(device), empty_context.clone().to(device)
        adapter.to(device)
        optimiser = torch.optim.AdamW(adapter.trainable(), lr=lr, weight_decay=0.0)
        for step in range(steps):
            if step % adapter.references == 0:   # every epoch visits each reference once, in a fresh order
                order = torch.randperm(adapter.references, generator=g).tolist()
            ref = order[step % adapter.references]
            wrapper.reference = ref
            x0 = adapter.latents[ref:ref + 1].to(device)
            t = torch.randint(0, 1000, (1,), generator=g)
            noise = torch.randn(x0.shape, generator=g).to(device)
            context = empty_context if float(torch.rand(1, generator=g)) < dropout else text_context
            sigma = inner.model_sampling.sigma(t.float()).to(device).clone()
            x = inner.model_sampling.noise_scaling(sigma, noise, x0)
            run = RunState(controls.controllers)
            wrapper.copy_probs.clear()
            denoised = inner.apply_model(x, sigma, c_crossattn=context,
                                         transformer_options=evaluation_options(patched, run))
            eps = (x - denoised) / sigma.view(-1, 1, 1, 1)
            loss = F.mse_loss(eps.float(), noise.float())
            frozen_probs = run.of(capture).probs
            if gamma and frozen_probs is not None and wrapper.copy_probs:
                loss = loss + gamma * attention_consistency_loss(wrapper.copy_probs[-1].float(), frozen_probs.float())
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(step, steps, losses[-1])
        adapter.to("cpu")
    return losses
