"""Diffusers adapter: the same controllers on a `UNet2DConditionModel`, through attention processors.

Used by the core tests (a real UNet without a host) and by anyone driving diffusers directly. Sites are
named as ComfyUI names them (`unet_structure`, core/structure.py): down_blocks[i].attentions[j] sits in
ComfyUI's input block 1 + (resnets and downsamplers before it), up_blocks[i].attentions[j] in output block
(resnets before it) + j. Feature sites are the resnets of the same blocks (mid_block.resnets[0] opens the
middle block); their residual branch is the output of `conv2`, which the adapter edits through a forward
hook while installed.
"""
from __future__ import annotations

import contextlib
import re

import torch

from .attention import (CROSS, SELF, AttentionCall, AttentionController, AttentionSite, BatchLayout, ControlSet,
                        FeatureCall, FeatureSite, RunState, controlled_attention, controlled_features, sdpa_attention,
                        structure_sites, token_grid)
from .structure import DECODER, ENCODER, MIDDLE, Block, UNetStructure

_NAME = re.compile(r"^(down_blocks\.(\d+)|up_blocks\.(\d+)|mid_block)\.attentions\.(\d+)"
                   r"\.transformer_blocks\.(\d+)\.(attn1|attn2)\.processor$")


def unet_structure(unet) -> UNetStructure:
    """The structure of a diffusers UNet, in ComfyUI's naming: input block 0 is conv_in, then each resnet of
    down_blocks[i] (with its attention, if any) is one input block at level i, and its downsampler one more;
    the middle block is at the last down block's level; each resnet of up_blocks[i] (with its attention) is
    one output block at level len(up_blocks) - 1 - i."""
    def transformers(blk, j):
        attentions = getattr(blk, "attentions", None)
        return len(attentions[j].transformer_blocks) if attentions else 0

    blocks = [Block(ENCODER, 0, 0)]
    for level, blk in enumerate(unet.down_blocks):
        for j in range(len(blk.resnets)):
            blocks.append(Block(ENCODER, len(blocks), level, transformers(blk, j), True))
        if getattr(blk, "downsamplers", None):
            blocks.append(Block(ENCODER, len(blocks), level))
    blocks.append(Block(MIDDLE, 0, len(unet.down_blocks) - 1, transformers(unet.mid_block, 0), True))
    decoder = []
    for i, blk in enumerate(unet.up_blocks):
        for j in range(len(blk.resnets)):
            decoder.append(Block(DECODER, len(decoder), len(unet.up_blocks) - 1 - i, transformers(blk, j), True))
    return UNetStructure(tuple(blocks + decoder))


def _block_ids(structure: UNetStructure) -> dict[tuple[str, int, int], int]:
    """(part, level, j) -> ComfyUI block id of the j-th ResBlock block of that part at that level: where
    down_blocks[level] / up_blocks[top - level] resnets[j] and attentions[j] sit."""
    ids, counts = {}, {}
    for b in structure.feature_blocks:
        j = counts[(b.part, b.level)] = counts.get((b.part, b.level), -1) + 1
        ids[(b.part, b.level, j)] = b.block_id
    return ids


def _diffusers_path(unet, part: str, level: int) -> str:
    if part == ENCODER:
        return f"down_blocks.{level}"
    if part == DECODER:
        return f"up_blocks.{len(unet.up_blocks) - 1 - level}"
    return "mid_block"


def processor_sites(unet) -> dict[str, AttentionSite]:
    """Processor name -> site, for every transformer self- and cross-attention of the UNet."""
    structure = unet_structure(unet)
    sites = {(s.block, s.block_id, s.index, s.kind): s for s in structure_sites(structure)}
    ids = {(part, _diffusers_path(unet, part, level), j): block_id
           for (part, level, j), block_id in _block_ids(structure).items()}
    placed = {}
    for name in unet.attn_processors:
        m = _NAME.match(name)
        if m is None:
            continue
        part = ENCODER if m.group(2) is not None else DECODER if m.group(3) is not None else MIDDLE
        j, t, attn = int(m.group(4)), int(m.group(5)), m.group(6)
        placed[name] = sites[(part, ids[(part, m.group(1), j)], t, SELF if attn == "attn1" else CROSS)]
    return placed


def feature_modules(unet) -> dict[FeatureSite, torch.nn.Module]:
    """Feature site -> the convolution whose output is that resnet's residual branch."""
    modules = dict(unet.named_modules())
    return {FeatureSite(part, block_id): modules[f"{_diffusers_path(unet, part, level)}.resnets.{j}.conv2"]
            for (part, level, j), block_id in _block_ids(unet_structure(unet)).items()}


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
