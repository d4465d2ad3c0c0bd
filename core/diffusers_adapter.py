"""Diffusers adapter: the same controllers on a `UNet2DConditionModel`, through attention processors.

Used by the core tests (a real UNet without a host) and by anyone driving diffusers directly. Sites are
named as ComfyUI names them: down_blocks[i].attentions[j] sits in ComfyUI's input block
1 + (resnets and downsamplers before it), up_blocks[i].attentions[j] in output block (resnets before it) + j.
Feature sites are the resnets of the same blocks (mid_block.resnets[0] opens the middle block); their
residual branch is the output of `conv2`, which the adapter edits through a forward hook while installed.
"""
from __future__ import annotations

import contextlib
import re

import torch

from .attention import (AttentionCall, AttentionController, AttentionSite, BatchLayout, ControlSet, FeatureCall,
                        FeatureSite, RunState, controlled_attention, controlled_features, sdpa_attention,
                        sites_for_transformers, token_grid)

_NAME = re.compile(r"^(down_blocks\.(\d+)|up_blocks\.(\d+)|mid_block)\.attentions\.(\d+)"
                   r"\.transformer_blocks\.(\d+)\.(attn1|attn2)\.processor$")


def _comfy_block_ids(unet) -> tuple[dict, dict]:
    """Map (down block, attention j) and (up block, attention j) to ComfyUI's input / output block ids."""
    down, up = {}, {}
    block_id = 1   # input block 0 is conv_in
    for i, blk in enumerate(unet.down_blocks):
        for j in range(len(blk.resnets)):
            down[(i, j)] = block_id
            block_id += 1
        if getattr(blk, "downsamplers", None):
            block_id += 1
    block_id = 0
    for i, blk in enumerate(unet.up_blocks):
        for j in range(len(blk.resnets)):
            up[(i, j)] = block_id
            block_id += 1
    return down, up


def processor_sites(unet) -> dict[str, AttentionSite]:
    """Processor name -> site, for every transformer self- and cross-attention of the UNet."""
    down, up = _comfy_block_ids(unet)
    placed = {}
    for name in unet.attn_processors:
        m = _NAME.match(name)
        if m is None:
            continue
        j, t, attn = int(m.group(4)), int(m.group(5)), m.group(6)
        if m.group(2) is not None:
            key = ("input", down[(int(m.group(2)), j)], t)
        elif m.group(3) is not None:
            key = ("output", up[(int(m.group(3)), j)], t)
        else:
            key = ("middle", 0, t)
        placed[name] = (key, "self" if attn == "attn1" else "cross")
    sites = {(s.block, s.block_id, s.index, s.kind): s for s in sites_for_transformers({k for k, _ in placed.values()})}
    return {name: sites[key + (kind,)] for name, (key, kind) in placed.items()}


def feature_modules(unet) -> dict[FeatureSite, torch.nn.Module]:
    """Feature site -> the convolution whose output is that resnet's residual branch."""
    down, up = _comfy_block_ids(unet)
    out = {}
    for (i, j), block_id in down.items():
        out[FeatureSite("input", block_id)] = unet.down_blocks[i].resnets[j].conv2
    out[FeatureSite("middle", 0)] = unet.mid_block.resnets[0].conv2
    for (i, j), block_id in up.items():
        out[FeatureSite("output", block_id)] = unet.up_blocks[i].resnets[j].conv2
    return out


class _Session:
    """Per-run state of the adapter: the run's controller states, the current step and batch layout."""

    def __init__(self, controls: ControlSet, num_steps: int, layout: BatchLayout | None, latent_hw, pair: bool):
        self.run = RunState(controls.controllers)
        self.run.pair = pair
        self.num_steps = num_steps
        self.step = 0
        self.layout = layout
        self.latent_hw = latent_hw
        self.sigma = None


class _ControlledProcessor:
    def __init__(self, adapter: "DiffusersAttentionAdapter", site: AttentionSite, fallback):
        self.adapter, self.site, self.fallback = adapter, site, fallback

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        session = self.adapter.session
        if session is None or attention_mask is not None or hidden_states.ndim != 3:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        batch, tokens = hidden_states.shape[:2]
        layout = session.layout or BatchLayout(("cond",), batch)
        call = AttentionCall(site=self.site, heads=attn.heads, step=session.step, num_steps=session.num_steps,
                             grid=token_grid(tokens, session.latent_hw), layout=layout, run=session.run,
                             sigma=session.sigma, latent_hw=tuple(session.latent_hw))
        out = controlled_attention(call, q, k, v, self.adapter.controls.controllers, sdpa_attention)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


class DiffusersAttentionAdapter:
    """Installs controllers on a diffusers UNet; `with adapter.session(...)` brackets one sampling run."""

    def __init__(self, unet, controllers: list[AttentionController] | ControlSet = ()):
        self.unet = unet
        self.controls = controllers if isinstance(controllers, ControlSet) else ControlSet(tuple(controllers))
        self.sites = processor_sites(unet)
        self.session: _Session | None = None
        self._original = None
        self._hooks = []

    def site_list(self) -> list[AttentionSite]:
        return sorted(self.sites.values(), key=lambda s: s.execution_order)

    def install(self) -> "DiffusersAttentionAdapter":
        if self._original is not None:
            return self
        self._original = dict(self.unet.attn_processors)
        procs = {}
        for name, proc in self._original.items():
            site = self.sites.get(name)
            if site is not None and self.controls.wants_site(site):
                procs[name] = _ControlledProcessor(self, site, proc)
            else:
                procs[name] = proc
        self.unet.set_attn_processor(procs)
        for site, module in feature_modules(self.unet).items():
            if self.controls.wants_feature(site):
                self._hooks.append(module.register_forward_hook(self._feature_hook(site)))
        return self

    def _feature_hook(self, site: FeatureSite):
        def hook(module, args, output):
            session = self.session
            if session is None:
                return output
            layout = session.layout or BatchLayout(("cond",), output.shape[0])
            call = FeatureCall(site=site, step=session.step, num_steps=session.num_steps, layout=layout,
                               run=session.run, sigma=session.sigma, latent_hw=tuple(session.latent_hw))
            return controlled_features(call, output, self.controls.controllers)
        return hook

    def uninstall(self) -> None:
        if self._original is not None:
            self.unet.set_attn_processor(self._original)
            self._original = None
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    @contextlib.contextmanager
    def run(self, num_steps: int, latent_hw: tuple[int, int], layout: BatchLayout | None = None, pair: bool = False):
        """One sampling run: set `.step` (and `.sigma`, `.layout`) on the yielded session before each call.
        `pair`: the batch holds a source (item 0) and its targets."""
        session = _Session(self.controls, num_steps, layout, latent_hw, pair)
        self.session = session
        ok = False
        try:
            yield session
            ok = True
        finally:
            self.session = None
            session.run.finish(ok)


@torch.no_grad()
def unet_eps(unet, x: torch.Tensor, timestep, context: torch.Tensor) -> torch.Tensor:
    return unet(x, timestep, encoder_hidden_states=context).sample
