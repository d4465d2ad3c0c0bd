"""ComfyUI adapter of the attention-control mechanism (core/attention.py).

How it hooks in (ComfyUI v0.12.1):
- `attach_controller` clones the ModelPatcher and adds the controller to an immutable `ControlSet` kept in
  `model_options["transformer_options"]`, then puts an attn1/attn2 *replace* patch on every transformer
  site some controller wants. The patch receives ComfyUI's projected q, k, v and `extra_options`.
- An OUTER_SAMPLE wrapper creates a fresh `RunState` for each sampling run and puts it in the run's own
  copy of the transformer options (CFGGuider.sample copies them per run), so state never outlives a run
  nor crosses between graphs; the wrapper closes the run (controllers publish results) in `finally`.
- Feature sites (residual branches of ResBlocks) have no ComfyUI patch point: a DIFFUSION_MODEL wrapper
  registers a forward hook on each wanted ResBlock's last convolution for the duration of one UNet call
  and removes it in `finally`, so nothing stays on the shared module between calls or across clones.
- The patches read the ControlSet and the RunState from the call's options, not from themselves:
  ModelPatcher.clone deep-copies model options but only shallow-copies wrappers, so nothing may rely on
  object identity across a clone.
"""
from __future__ import annotations

import comfy.ldm.modules.attention as comfy_attention
import comfy.patcher_extension
from comfy.ldm.modules.attention import SpatialTransformer
from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, ResBlock, Upsample

from ..core.attention import (SELF, AttentionCall, AttentionController, AttentionSite, BatchLayout, ControlSet,
                              FeatureCall, FeatureSite, RunState, controlled_attention, controlled_features,
                              parse_layers, structure_sites)
from ..core.schedule import step_index
from ..core.structure import DECODER, Block, UNetStructure

CONTROLS_KEY = "editkit_controls"
RUN_KEY = "editkit_run"
WRAPPER_KEY = "editkit_attention"
# Set by the LatentFuser on the evaluations of a batch of windows: how many windows (groups of the batch
# layout) each chunk of the batch holds.
WINDOW_GROUPS_KEY = "editkit_window_groups"
# Set by Keyframe Attention's frame windows: which frames of the batch an evaluation holds (core FrameWindow).
FRAME_WINDOW_KEY = "editkit_frame_window"
# Set by the pair guider on the evaluations of a video edit: how many frames (groups of the batch layout, each
# holding that frame's source and targets) each chunk of the batch holds.
FRAMES_KEY = "editkit_frames"


class UnsupportedModelError(ValueError):
    pass


def _unet(model_patcher):
    diffusion_model = getattr(model_patcher.model, "diffusion_model", None)
    if diffusion_model is None or not all(hasattr(diffusion_model, a) for a in
                                          ("input_blocks", "middle_block", "output_blocks")):
        name = type(getattr(model_patcher.model, "diffusion_model", model_patcher.model)).__name__
        raise UnsupportedModelError(
            f"model: attention control needs a UNet with spatial transformers (SD 1.x, SD 2.x, SDXL); "
            f"this model's diffusion model is {name}")
    return diffusion_model


def _unet_blocks(unet):
    """(block, block_id, module sequence) of every UNet block, in ComfyUI's naming."""
    yield from (("input", i, seq) for i, seq in enumerate(unet.input_blocks))
    yield "middle", 0, unet.middle_block
    yield from (("output", i, seq) for i, seq in enumerate(unet.output_blocks))


def _block(unet, block: str, block_id: int):
    """The module sequence of UNet block (`block`, `block_id`)."""
    return unet.middle_block if block == "middle" else getattr(unet, f"{block}_blocks")[block_id]


def structure_of(unet) -> UNetStructure:
    """The structure of a ComfyUI UNet module (core/structure.py), read from its modules: the level rises after
    a block holding a Downsample (openaimodel puts each in an input block of its own, or in a ResBlock with
    down=True) and falls after one holding an Upsample (the last output block of a level ends with it)."""
    blocks, level = [], 0
    for block, block_id, seq in _unet_blocks(unet):
        transformers = sum(len(m.transformer_blocks) for m in seq if isinstance(m, SpatialTransformer))
        blocks.append(Block(block, block_id, level, transformers, len(seq) > 0 and isinstance(seq[0], ResBlock)))
        level += _holds(seq, Downsample) - _holds(seq, Upsample)
    return UNetStructure(tuple(blocks))


def _holds(seq, kind) -> bool:
    """Whether a block holds a `kind` (Downsample / Upsample) module: on its own or as a ResBlock's up / down."""
    return any(isinstance(m, kind) or isinstance(getattr(m, "h_upd", None), kind) for m in seq)


def unet_structure(model_patcher) -> UNetStructure:
    """The structure of the model's UNet, found from the model itself."""
    return structure_of(_unet(model_patcher))


def transformer_modules(unet) -> dict[tuple[str, int, int], "torch.nn.Module"]:
    """(block, block_id, index) -> transformer block (BasicTransformerBlock), for every transformer layer."""
    found = {}
    for b in structure_of(unet).blocks:
        layers = [tb for m in _block(unet, b.part, b.block_id) if isinstance(m, SpatialTransformer)
                  for tb in m.transformer_blocks]
        found.update(((b.part, b.block_id, i), tb) for i, tb in enumerate(layers))
    return found


def transformer_blocks(model_patcher) -> list[tuple[str, int, int]]:
    """(block, block_id, index) of every transformer block, found from the model itself."""
    return [(t.block, t.block_id, t.index) for t in unet_structure(model_patcher).layers]


def _residual_branches(unet) -> dict[FeatureSite, "torch.nn.Module"]:
    """Feature site -> the last layer of its ResBlock's residual branch (out_layers' convolution)."""
    return {FeatureSite(b.part, b.block_id): _block(unet, b.part, b.block_id)[0].out_layers[-1]
            for b in structure_of(unet).feature_blocks}


def feature_sites(model_patcher) -> list[FeatureSite]:
    """Every block that opens with a ResBlock, found from the model itself."""
    return [FeatureSite(b.part, b.block_id) for b in unet_structure(model_patcher).feature_blocks]


def attention_sites(model_patcher) -> list[AttentionSite]:
    sites = structure_sites(unet_structure(model_patcher))
    if not sites:
        raise UnsupportedModelError("model: no transformer attention blocks found in this UNet")
    return sites


def chosen_self_layers(model_patcher, text: str, decoder: bool) -> tuple[int, ...] | None:
    """The self-attention layers typed in a `layers` widget ('4-11', '10, 12'), checked against the model; ''
    is the method's own choice: the decoder's layers when `decoder`, else None (every layer)."""
    sites = [s for s in attention_sites(model_patcher) if s.kind == SELF]
    count = max(s.layer for s in sites) + 1
    if not text.strip():
        return tuple(t.layer for t in unet_structure(model_patcher).layers_in(DECODER)) if decoder else None
    layers = parse_layers(text, "layers")
    if not layers:
        raise ValueError(f"layers: give at least one transformer layer (this model has 0 to {count - 1}), or leave "
                         f"it empty for the method's layers")
    if layers[-1] >= count:
        raise ValueError(f"layers: {layers[-1]} is beyond this model's {count} transformer layers "
                         f"(valid: 0 to {count - 1})")
    return layers


def host_fast_attention(extra_options: dict):
    """ComfyUI's selected attention kernel (looked up per call: the host may switch it)."""
    def fast(q, k, v, heads):
        return comfy_attention.optimized_attention(q, k, v, heads, attn_precision=extra_options.get("attn_precision"),
                                                   transformer_options=extra_options)
    return fast


class SitePatch:
    """attn1/attn2 replace patch for one site. Keeps any patch that was there before as its fast path."""

    def __init__(self, site: AttentionSite, previous=None):
        self.site = site
        self.previous = previous

    def _fast(self, extra_options):
        if self.previous is None:
            return host_fast_attention(extra_options)
        previous = self.previous
        return lambda q, k, v, heads: previous(q, k, v, extra_options)

    def __call__(self, q, k, v, extra_options):
        fast = self._fast(extra_options)
        controls: ControlSet | None = extra_options.get(CONTROLS_KEY)
        run: RunState | None = extra_options.get(RUN_KEY)
        if controls is None or run is None:   # model called outside a sampling run: behave as the host
            return fast(q, k, v, extra_options["n_heads"])
        return controlled_attention(call_from_options(self.site, q, extra_options, run), q, k, v,
                                    controls.controllers, fast)

    def __deepcopy__(self, memo):
        return self


def with_transformer_option(model_options: dict, key: str, value) -> dict:
    """A copy of `model_options` for one evaluation, with `key` set in its transformer options (which reach
    every attention call); the run's own options are left as they are."""
    options = dict(model_options)
    options["transformer_options"] = {**model_options.get("transformer_options", {}), key: value}
    return options


def _step_of(run: RunState, sigmas, schedule) -> tuple[int, int, float | None]:
    """(step, steps, sigma) of a model evaluation; reads the GPU, so it runs once per evaluation."""
    if sigmas is None:
        return 0, 1, None
    sigma = float(sigmas.flatten()[0])
    if schedule is None:
        return 0, 1, sigma
    values = run.host.get("schedule")
    if values is None or values[0] is not schedule:
        values = (schedule, [float(v) for v in schedule.tolist()])
        run.host["schedule"] = values
    return step_index(sigma, values[1]), max(len(values[1]) - 1, 1), sigma


def _current_step(run: RunState, extra_options: dict) -> tuple[int, int, float | None]:
    """The step of the evaluation in progress, computed once per evaluation and cached on the run.

    Reading a GPU tensor synchronises the device; doing it in every attention call would stall the
    launch queue 32 times per UNet pass. The cache keeps the `sigmas` tensor itself (every attention call
    of one pass shares it), so a freed tensor's id can never be mistaken for a new one.
    """
    sigmas = extra_options.get("sigmas")
    cached = run.host.get("step")
    if cached is not None and cached[0] is sigmas:
        return cached[1]
    result = _step_of(run, sigmas, extra_options.get("sample_sigmas"))
    run.host["step"] = (sigmas, result)
    return result


def call_from_options(site: AttentionSite, q, extra_options: dict, run: RunState) -> AttentionCall:
    shape = extra_options.get("activations_shape")
    grid = (int(shape[-2]), int(shape[-1])) if shape is not None else (q.shape[1], 1)
    step, num_steps, sigma = _current_step(run, extra_options)
    layout = BatchLayout.from_cond_or_uncond(extra_options.get("cond_or_uncond"), q.shape[0],
                                             extra_options.get(WINDOW_GROUPS_KEY, 1), extra_options.get(FRAMES_KEY, 1))
    original = extra_options.get("original_shape")
    latent_hw = (int(original[-2]), int(original[-1])) if original is not None and len(original) == 4 else None
    return AttentionCall(site=site, heads=extra_options["n_heads"], step=step, num_steps=num_steps, grid=grid,
                         layout=layout, run=run, sigma=sigma, latent_hw=latent_hw,
                         frames=extra_options.get(FRAME_WINDOW_KEY))


def _outer_sample_wrapper(executor, *args, **kwargs):
    """A fresh RunState per sampling run (args: noise, latent, sampler, sigmas, ...)."""
    guider = executor.class_obj
    options = guider.model_options.setdefault("transformer_options", {})   # this run's own copy
    controls: ControlSet | None = options.get(CONTROLS_KEY)
    if controls is None:
        return executor(*args, **kwargs)
    sigmas = args[3] if len(args) > 3 else kwargs.get("sigmas")
    if sigmas is not None:
        for controller in controls.controllers:
            controller.check_run(max(int(sigmas.shape[-1]) - 1, 0))
    run = RunState(controls.controllers)
    options[RUN_KEY] = run
    ok = False
    try:
        result = executor(*args, **kwargs)
        ok = True
        return result
    finally:
        options.pop(RUN_KEY, None)
        run.finish(ok)


def _predict_noise_wrapper(executor, x, timestep, model_options={}, seed=None):
    """Find the step before the UNet pass starts, so no attention call has to read the GPU."""
    run = model_options.get("transformer_options", {}).get(RUN_KEY)
    if run is not None:
        schedule = model_options["transformer_options"].get("sample_sigmas")
        run.host["step"] = (timestep, _step_of(run, timestep, schedule))
    return executor(x, timestep, model_options, seed)


class _FeatureHook:
    """Forward hook on a residual branch: its output goes through the controllers of that feature site."""

    def __init__(self, site: FeatureSite, options: dict, run: RunState, controls: ControlSet, latent_hw):
        self.site, self.options, self.run, self.controls, self.latent_hw = site, options, run, controls, latent_hw

    def __call__(self, module, args, output):
        step, num_steps, sigma = _current_step(self.run, self.options)
        layout = BatchLayout.from_cond_or_uncond(self.options.get("cond_or_uncond"), output.shape[0],
                                                 self.options.get(WINDOW_GROUPS_KEY, 1), self.options.get(FRAMES_KEY, 1))
        call = FeatureCall(site=self.site, step=step, num_steps=num_steps, layout=layout, run=self.run,
                           sigma=sigma, latent_hw=self.latent_hw)
        return controlled_features(call, output, self.controls.controllers)


def _diffusion_model_wrapper(executor, x, *args, **kwargs):
    """Hooks the wanted residual branches for this one UNet call (args: timesteps, context, y, control,
    transformer_options, as UNetModel._forward takes them)."""
    options = args[4] if len(args) > 4 else kwargs.get("transformer_options", {})
    controls: ControlSet | None = options.get(CONTROLS_KEY)
    run: RunState | None = options.get(RUN_KEY)
    if controls is None or run is None:
        return executor(x, *args, **kwargs)
    latent_hw = (int(x.shape[-2]), int(x.shape[-1]))
    handles = []
    try:
        for site, module in _residual_branches(executor.class_obj).items():
            if controls.wants_feature(site):
                handles.append(module.register_forward_hook(_FeatureHook(site, options, run, controls, latent_hw)))
        return executor(x, *args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()


def evaluation(model_options: dict, timestep) -> tuple[int, int, float | None] | None:
    """(step, steps, sigma) the PREDICT_NOISE wrapper found for the evaluation at `timestep` (None outside a
    controlled run); reading it costs no GPU read."""
    run = model_options.get("transformer_options", {}).get(RUN_KEY)
    cached = run.host.get("step") if run is not None else None
    return cached[1] if cached is not None and cached[0] is timestep else None


def attach_controller(model_patcher, controller: AttentionController):
    """A clone of `model_patcher` with `controller` appended to its controllers. The input is untouched."""
    sites = attention_sites(model_patcher)
    patched = model_patcher.clone()
    options = patched.model_options.setdefault("transformer_options", {})
    controls = options.get(CONTROLS_KEY) or ControlSet()
    controls = controls.with_controller(controller)
    replace = options.get("patches_replace", {})
    for site in sites:
        if not controller.wants_site(site):
            continue
        name = "attn1" if site.kind == "self" else "attn2"
        key = (site.block, site.block_id, site.index)
        existing = replace.get(name, {}).get(key)
        if isinstance(existing, SitePatch):
            continue
        patch = SitePatch(site, previous=existing)
        if name == "attn1":
            patched.set_model_attn1_replace(patch, site.block, site.block_id, site.index)
        else:
            patched.set_model_attn2_replace(patch, site.block, site.block_id, site.index)
    # set_model_*_replace rebuilds the transformer_options dict: store the controls in the final one
    patched.model_options["transformer_options"][CONTROLS_KEY] = controls
    wrappers = comfy.patcher_extension.WrappersMP
    if not patched.get_wrappers(wrappers.OUTER_SAMPLE, WRAPPER_KEY):
        patched.add_wrapper_with_key(wrappers.OUTER_SAMPLE, WRAPPER_KEY, _outer_sample_wrapper)
        patched.add_wrapper_with_key(wrappers.PREDICT_NOISE, WRAPPER_KEY, _predict_noise_wrapper)
    if (any(controller.wants_feature(site) for site in feature_sites(model_patcher))
            and not patched.get_wrappers(wrappers.DIFFUSION_MODEL, WRAPPER_KEY)):
        patched.add_wrapper_with_key(wrappers.DIFFUSION_MODEL, WRAPPER_KEY, _diffusion_model_wrapper)
    return patched


def controllers_of(model_patcher) -> tuple[AttentionController, ...]:
    controls = model_patcher.model_options.get("transformer_options", {}).get(CONTROLS_KEY)
    return controls.controllers if controls is not None else ()
