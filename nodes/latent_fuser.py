"""Node: LatentFuser, MultiDiffusion panoramas and region prompts (Bar-Tal et al. 2023), circular panoramas.

How it hooks into ComfyUI: the node returns a clone of the MODEL with two wrappers, so any sampler node
(KSampler, SamplerCustomAdvanced, the pack's guiders) and any sampler and scheduler sample a large latent in
windows:
- OUTER_SAMPLE: per-run state (the window layout for this latent, the noise of the run's starting latent and
  the seed for bootstrapping, the region masks at latent size), kept in the run's own copy of the model options;
- CALC_COND_BATCH: where ComfyUI evaluates the conditionings on the latent, each batch of windows (and, with
  regions, each window with every prompt) goes through ComfyUI's own evaluation as one batch of crops, so
  ControlNets, LoRA hooks, masks and the pack's attention controllers apply as they do without windows; the
  predictions are fused per pixel (core/multidiffusion.py). A ControlNet's hint is resized to the whole image
  and each window gets its own crop of it.
SyncDiffusion (Lee et al. 2023) runs inside the same CALC_COND_BATCH call: on a synchronising step every
window but the anchor is first moved by its LPIPS gradient (core/syncdiffusion.py; autograd through the UNet
and the VAE decoder, outside ComfyUI's inference mode), then evaluated at the moved latent; its prediction is
reported so that the sampler's step from the shared latent lands where the window's own step lands (exact for
first-order samplers: euler, ddim).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import comfy.patcher_extension
import comfy.utils
import torch
from comfy_api.latest import io

from ..core.lpips import LPIPS, load_lpips
from ..core.multidiffusion import (Fusion, Window, bootstrap_choices, crop, region_weights, window_layout)
from ..core.schedule import step_index
from ..core.syncdiffusion import SyncSettings, anchor_index, shift_correction, sync_shifts
from .comfy_attention import CONTROLS_KEY, WINDOW_GROUPS_KEY, with_transformer_option
from .host_helpers import dynamic_choice, dynamic_combo, map_cond_tensors
from .inversion import autograd_usable_weights

CATEGORY = "EditKit/fusion"
WRAPPER_KEY = "editkit_latent_fuser"
RUN_KEY = "editkit_latent_fuser_run"
BOOTSTRAP_COLOURS = 20   # the official code draws as many random colours as it bootstraps steps (20 of 50)
RegionType = io.Custom("EDITKIT_REGION")
LPIPS_FOLDER = "lpips"
NO_LPIPS = "(no LPIPS weights in models/lpips)"
MODES = ("multidiffusion", "syncdiffusion")


def _register_lpips_folder() -> None:
    """models/lpips: where SyncDiffusion's perceptual network lives (tools/make_lpips_weights.py writes it)."""
    import folder_paths
    if LPIPS_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[LPIPS_FOLDER] = ([os.path.join(folder_paths.models_dir, LPIPS_FOLDER)],
                                                             {".safetensors"})


def _lpips_files() -> list[str]:
    import folder_paths
    _register_lpips_folder()
    return folder_paths.get_filename_list(LPIPS_FOLDER) or [NO_LPIPS]


@dataclass(frozen=True)
class Region:
    """A region prompt: its prompt encoding (1, tokens, width) and its MASK (H, W) at any resolution."""
    context: torch.Tensor
    mask: torch.Tensor


@dataclass
class _Run:
    """What one sampling run needs besides the settings."""
    schedule: list[float]
    start_noise: torch.Tensor                    # the noise of the starting latent in the model's input space
    seed: int
    windows: list[Window]
    weights: torch.Tensor                        # (1 + regions, H, W): background, then each region
    cfg: float | None = None                     # the sampler's CFG scale (SyncDiffusion guides its gradients)
    device_cache: dict = field(default_factory=dict)

    def on(self, name: str, tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        key = (name, str(like.device), like.dtype)
        if key not in self.device_cache:
            self.device_cache[key] = tensor.to(like.device, like.dtype)
        return self.device_cache[key]

    def lpips_on(self, state: dict, device) -> LPIPS:
        """The LPIPS network on `device`, built outside inference mode so that autograd may save its weights."""
        key = ("lpips", str(device))
        if key not in self.device_cache:
            with torch.inference_mode(False):
                self.device_cache[key] = LPIPS.from_state_dict({k: v.clone() for k, v in state.items()}).to(device)
        return self.device_cache[key]


@dataclass(frozen=True, eq=False)
class LatentFuser:
    """The settings of one LatentFuser (in latents) and its two wrappers."""
    window: int
    stride: int
    window_batch: int
    circular: bool = False
    regions: tuple[Region, ...] = ()
    bootstrap: float = 0.0
    bootstrap_latents: torch.Tensor | None = None   # (colours, C, window, window) in the model's latent space
    sync: SyncSettings | None = None
    lpips: dict | None = None                       # LPIPS (VGG) state dict, on the CPU
    vae: object = None                              # ComfyUI VAE: decodes the windows' predictions for sync

    # -- OUTER_SAMPLE --------------------------------------------------------------------------------------
    def outer_sample(self, executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
        guider = executor.class_obj
        options = guider.model_options.setdefault("transformer_options", {})   # this run's own copy
        seed = args[3] if len(args) > 3 else kwargs.get("seed")
        latent_hw = tuple(noise.shape[-2:])
        self._check_conds(guider.conds)
        self._check_masks(latent_hw)
        self._check_controllers(options)
        masks = torch.stack([r.mask for r in self.regions]) if self.regions else None
        options[RUN_KEY] = _Run(schedule=[float(s) for s in sigmas.flatten().tolist()],
                                start_noise=_start_noise(guider.model_patcher, noise, sigmas),
                                seed=int(seed or 0), windows=self.layout(latent_hw),
                                weights=region_weights(masks, latent_hw), cfg=self._sampler_cfg(guider))
        try:
            return executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
        finally:
            options.pop(RUN_KEY, None)

    def layout(self, latent_hw: tuple[int, int]) -> list[Window]:
        try:
            return window_layout(latent_hw, (self.window, self.window), (self.stride, self.stride), self.circular)
        except ValueError as e:
            raise ValueError(f"{e} (the image is {latent_hw[1] * 8}x{latent_hw[0] * 8} px)") from None

    def _check_masks(self, latent_hw: tuple[int, int]) -> None:
        """A region's mask is stretched onto the image: one of another shape is a mistake, not a stretch."""
        aspect = latent_hw[1] / latent_hw[0]
        for k, region in enumerate(self.regions):
            h, w = region.mask.shape
            if abs(w / h - aspect) > 0.02 * aspect:
                raise ValueError(f"regions: region {k + 1}'s mask is {w}x{h} but the image is "
                                 f"{latent_hw[1] * 8}x{latent_hw[0] * 8} px; give a mask of the image's size (or "
                                 f"at least its aspect ratio)")

    def _sampler_cfg(self, guider) -> float | None:
        if self.sync is None:
            return None
        cfg = getattr(guider, "cfg", None)
        if not isinstance(cfg, (int, float)) or set(guider.conds) - {"positive", "negative"}:
            raise ValueError(f"mode: syncdiffusion needs a sampler with a positive and a negative prompt and one CFG "
                             f"scale (KSampler, CFGGuider); {type(guider).__name__} is not one")
        return float(cfg)

    @staticmethod
    def _check_controllers(options: dict) -> None:
        """The pack's attention controllers act within each window; refuse those that need the whole image."""
        controls = options.get(CONTROLS_KEY)
        for controller in controls.controllers if controls is not None else ():
            problem = controller.windows_problem()
            if problem:
                raise ValueError(f"model: {problem} does not combine with the Latent Fuser's windows; apply it to "
                                 f"a model without a Latent Fuser")

    def _check_conds(self, conds: dict) -> None:
        for name, entries in conds.items():
            for c in entries:
                if "area" in c:
                    raise ValueError(f"{name}: conditioning areas (Conditioning Set Area) do not combine with the "
                                     f"LatentFuser's windows; give regions as masks (EditKit Region Prompt)")
        if self.regions and len(conds.get("positive", [])) != 1:
            raise ValueError("positive: with region prompts the sampler's positive conditioning is the background "
                             "prompt: connect a single text encoding (not a combined conditioning)")

    # -- CALC_COND_BATCH -----------------------------------------------------------------------------------
    def calc_cond_batch(self, executor, model, conds, x_in, timestep, model_options):
        run: _Run | None = model_options.get("transformer_options", {}).get(RUN_KEY)
        if run is None or tuple(x_in.shape[-2:]) != tuple(run.start_noise.shape[-2:]):
            return executor(model, conds, x_in, timestep, model_options)   # not a run this fuser prepared
        prompts = run.weights.shape[0]
        if len(run.windows) == 1 and prompts == 1:
            return executor(model, conds, x_in, timestep, model_options)   # one window: the plain evaluation
        sigma = float(timestep.flatten()[0])
        step = step_index(sigma, run.schedule)
        weights = run.on("weights", run.weights, x_in)
        bootstrap = prompts > 1 and self.bootstrap_latents is not None and step < int(self.bootstrap * (len(run.schedule) - 1))
        choices = bootstrap_choices(run.seed, step, prompts - 1, len(self.bootstrap_latents)) if bootstrap else None
        shifts, correction = [None] * len(run.windows), 0.0
        if self.sync is not None and self.sync.active(step, len(run.schedule) - 1):
            shifts = self._sync_shifts(executor, model, conds, x_in, timestep, model_options, run, sigma, step)
            correction = shift_correction(sigma, run.schedule[step + 1])
        fusion = Fusion(x_in, len(conds))
        for start in range(0, len(run.windows), self.window_batch):
            windows = run.windows[start:start + self.window_batch]
            moved = shifts[start:start + self.window_batch]
            rows = self._rows(run, windows, x_in, sigma, weights, choices, moved)
            batch_conds = [None if c is None else self._window_conds(c, i, windows, run, x_in) for i, c in enumerate(conds)]
            times = timestep.repeat(len(windows) * prompts) if timestep.ndim else timestep
            with _cropped_hints(conds, windows, prompts, x_in):
                outputs = executor(model, batch_conds, rows, times,
                                   with_transformer_option(model_options, WINDOW_GROUPS_KEY, len(windows) * prompts))
            regions = [crop(weights, window) for window in windows]           # (prompts, h, w) each
            for i, out in enumerate(outputs):
                out = out.reshape(len(windows), prompts, x_in.shape[0], *out.shape[1:])
                for w, window in enumerate(windows):
                    prediction = (out[w] * regions[w][:, None, None]).sum(dim=0)
                    if moved[w] is not None:
                        prediction = prediction + correction * moved[w]
                    fusion.add(i, window, prediction)
            for window, region in zip(windows, regions):
                fusion.add_weight(window, region.sum(dim=0)[None, None])
        return fusion.result()

    def _sync_shifts(self, executor, model, conds, x_in, timestep, model_options, run: _Run, sigma: float,
                     step: int) -> list:
        """SyncDiffusion's gradient step of every window but the anchor (core/syncdiffusion.py), in the
        sampler's latent space; the gradients flow through ComfyUI's own evaluation of the window crops."""
        vae, windows = self.vae, run.windows

        def guided(indices, x):
            chosen = [windows[i] for i in indices]
            batch_conds = [None if c is None else [map_cond_tensors(entry, lambda t, _: t.clone()) for entry in
                                                   self._window_conds(c, i, chosen, run, x_in)]
                           for i, c in enumerate(conds)]
            times = timestep.clone().repeat(len(chosen)) if timestep.ndim else timestep.clone()
            with _cropped_hints(conds, chosen, 1, x_in):
                outputs = executor(model, batch_conds, x, times,
                                   with_transformer_option(model_options, WINDOW_GROUPS_KEY, len(chosen)))
            if len(outputs) < 2 or conds[1] is None or run.cfg == 1.0:
                return outputs[0]
            return outputs[1] + run.cfg * (outputs[0] - outputs[1])

        def decode(x0):
            latent = model.process_latent_out(x0).to(vae.device, vae.vae_dtype)
            return vae.process_output(vae.first_stage_model.decode(latent)).to(x0.device, torch.float32)

        lpips = run.lpips_on(self.lpips, x_in.device)
        with torch.inference_mode(False), autograd_usable_weights(model.diffusion_model), \
                autograd_usable_weights(vae.first_stage_model):
            crops = [crop(x_in, w).clone() for w in windows]
            shifts = sync_shifts(guided, decode, lambda a, b: lpips(a.float(), b.float()), crops,
                                 anchor_index(windows), self.sync.weight_at(step), sigma, self.sync.batch)
        return [None if s is None else s.to(x_in.dtype) for s in shifts]

    def _rows(self, run: _Run, windows, x_in, sigma: float, weights, choices, moved=None) -> torch.Tensor:
        """The model's input: for each window, for each prompt (background first), the latent's crop; in the
        bootstrapping steps a region's crop is a noised constant colour outside its mask; a window SyncDiffusion
        moved is its crop minus its shift."""
        rows = []
        for w, window in enumerate(windows):
            view = crop(x_in, window)
            if moved is not None and moved[w] is not None:
                view = view - moved[w]
            for k in range(weights.shape[0]):
                if k == 0 or choices is None:
                    rows.append(view)
                    continue
                colour = self.bootstrap_latents[choices[k - 1]][None].to(view.device, view.dtype)
                noisy = colour + sigma * crop(run.on("start_noise", run.start_noise, view), window)
                inside = crop(weights[k], window)
                rows.append(view * inside + noisy * (1 - inside))
        return torch.cat(rows)

    def _window_conds(self, conds: list, index: int, windows, run: _Run, x_in) -> list:
        """Each cond as ComfyUI evaluates it on the rows of `_rows`: masks and latent-shaped model conds cropped
        per window, and for the positive (index 0) with regions, each prompt's encoding on its rows."""
        prompts = run.weights.shape[0]
        batch = x_in.shape[0]

        def per_window(tensor, name):
            if name == "mask" or (tensor.ndim == 4 and tuple(tensor.shape[-2:]) == tuple(x_in.shape[-2:])):
                return _per_row(tensor, windows, prompts, batch)
            return tensor
        out = []
        for c in conds:
            c = map_cond_tensors(c, per_window)
            if index == 0 and prompts > 1:   # the positive with regions: each prompt's encoding on its rows
                template = c["model_conds"]["c_crossattn"]
                c["model_conds"]["c_crossattn"] = template._copy_with(
                    self._region_contexts(template.cond, windows, batch))
            out.append(c)
        return out

    def _region_contexts(self, background: torch.Tensor, windows, batch: int) -> torch.Tensor:
        if background.shape[0] != 1:
            raise ValueError("regions: region prompts take a one-prompt positive conditioning (this sampler gives "
                             f"{background.shape[0]} prompts per latent, e.g. an editing guider's pair)")
        contexts = [background] + [r.context.to(background.device, background.dtype) for r in self.regions]
        length = math.lcm(*(ctx.shape[1] for ctx in contexts))
        per_prompt = [ctx.repeat(batch, length // ctx.shape[1], 1) for ctx in contexts]   # (batch, L, D) each
        return torch.cat(per_prompt * len(windows))


def _per_row(tensor: torch.Tensor, windows, prompts: int, batch: int) -> torch.Tensor:
    """A latent-sized tensor (rows, ..., H, W) as rows of windows x prompts x batch (its rows tiled to the batch)."""
    pieces = []
    for window in windows:
        piece = comfy.utils.repeat_to_batch_size(crop(tensor, window), batch)
        pieces.extend([piece] * prompts)
    return torch.cat(pieces)


class _cropped_hints:
    """For one evaluation of a batch of windows, every ControlNet of the conds sees the crops of its hint
    (resized to the whole image first, as ComfyUI would resize it) instead of the whole hint squeezed into a
    window; the hints are put back afterwards. The control objects belong to this run's conditionings."""

    def __init__(self, conds, windows, prompts: int, x_in: torch.Tensor):
        self.controls = []
        seen = set()
        for entries in conds:
            for c in entries or []:
                control = c.get("control")
                while control is not None and id(control) not in seen:
                    seen.add(id(control))
                    self.controls.append(control)
                    control = control.previous_controlnet
        self.windows, self.prompts, self.x_in = windows, prompts, x_in
        self.saved = []

    def _crops(self, control) -> torch.Tensor:
        ratio = control.compression_ratio * (control.vae.spacial_compression_encode() if control.vae is not None else 1)
        h, w = self.x_in.shape[-2:]
        full = comfy.utils.common_upscale(control.cond_hint_original, w * ratio, h * ratio, control.upscale_algorithm,
                                          "center")
        scaled = [Window(v.top * ratio, v.left * ratio, v.height * ratio, v.width * ratio) for v in self.windows]
        return _per_row(full, scaled, self.prompts, self.x_in.shape[0])

    def __enter__(self):
        for control in self.controls:
            if control.cond_hint_original is None:
                continue
            self.saved.append((control, control.cond_hint_original, control.cond_hint))
            control.cond_hint_original = self._crops(control)
            control.cond_hint = None
        return self

    def __exit__(self, *exc):
        for control, original, cached in self.saved:
            control.cond_hint_original = original
            control.cond_hint = cached
        return False


def attach_fuser(model, fuser: LatentFuser):
    """A clone of `model` whose sampling runs in windows. The input is untouched."""
    if model.get_wrappers(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, WRAPPER_KEY):
        raise ValueError("model: it already samples in windows (a LatentFuser is applied); apply one LatentFuser")
    patched = model.clone()
    if fuser.vae is not None:   # loaded with the UNet for the sampling, as ControlNets are
        patched.set_additional_models(WRAPPER_KEY, [fuser.vae.patcher])
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, fuser.outer_sample)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, WRAPPER_KEY, fuser.calc_cond_batch)
    return patched


class RegionPrompt(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitRegionPrompt",
            display_name="Region Prompt",
            category=CATEGORY,
            description="A prompt for one region of the image, for the LatentFuser (MultiDiffusion's region "
                        "prompts, Bar-Tal et al. 2023).",
            inputs=[
                io.Conditioning.Input("conditioning", tooltip="The region's prompt (CLIPTextEncode)."),
                io.Mask.Input("mask", tooltip="Where the region is: any MASK of the image's aspect (painted, loaded, "
                                              "Solid Mask, an attention-map mask); binarised at 0.5."),
            ],
            outputs=[RegionType.Output(display_name="region", tooltip="Connect to a LatentFuser's regions.")],
        )

    @classmethod
    def execute(cls, conditioning, mask) -> io.NodeOutput:
        if not conditioning or not torch.is_tensor(conditioning[0][0]):
            raise ValueError("conditioning: expected a CONDITIONING from a text encoder (e.g. CLIPTextEncode)")
        if len(conditioning) > 1:
            raise ValueError(f"conditioning: a region takes one prompt encoding, got {len(conditioning)} (from "
                             f"Conditioning Combine); connect a single text encoding")
        mask = mask[0] if mask.ndim == 3 else mask
        if mask.ndim != 2:
            raise ValueError(f"mask: expected a MASK, got shape {tuple(mask.shape)}")
        if not (mask >= 0.5).any():
            raise ValueError("mask: the region's mask is empty (nothing at 0.5 or above); paint the region or drop it")
        return io.NodeOutput(Region(conditioning[0][0].detach().cpu(), mask.detach().float().cpu()))


class LatentFuserNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitLatentFuser",
            display_name="Latent Fuser (MultiDiffusion)",
            category=CATEGORY,
            description="Samples images larger than the model was trained for, in overlapping windows whose "
                        "predictions are averaged at every step (MultiDiffusion, Bar-Tal et al. 2023): panoramas "
                        "without seams, region prompts, 360-degree panoramas, and tiled refinement with a denoise "
                        "below 1. Connect the MODEL to any sampler; the image size is the latent's.",
            inputs=[
                io.Model.Input("model", tooltip="SD 1.x / 2.x model. It is cloned; the input is not changed."),
                io.Int.Input("window", default=512, min=64, max=4096, step=8,
                             tooltip="Window side in pixels: the model's training size (SD1.5: 512)."),
                io.Int.Input("stride", default=64, min=8, max=4096, step=8,
                             tooltip="Pixels between windows (paper: 64, i.e. 8 latents; larger is faster, with "
                                     "less overlap)."),
                io.Int.Input("window_batch", default=8, min=1, max=256,
                             tooltip="Windows evaluated in one model call (with CFG, twice as many rows). Memory "
                                     "grows with it, not with the image."),
                io.Boolean.Input("circular", default=False,
                                 tooltip="360-degree panorama: windows wrap around horizontally, so the left and "
                                         "right edges meet without a seam."),
                dynamic_combo("mode", tooltip="multidiffusion: windows fused by averaging (Bar-Tal et al. "
                                              "2023); syncdiffusion: in the first steps every window is also "
                                              "pulled towards the middle window's look (Lee et al. 2023).",
                              options=[
                    io.DynamicCombo.Option("multidiffusion", []),
                    io.DynamicCombo.Option("syncdiffusion", [
                        io.Combo.Input("lpips", options=_lpips_files(),
                                       tooltip="LPIPS (VGG) weights in models/lpips; make them once with "
                                               "tools/make_lpips_weights.py (see the README)."),
                        io.Float.Input("sync_until", default=0.2, min=0.0, max=1.0, step=0.01,
                                       tooltip="Fraction of the steps with synchronisation (paper: 10 of 50)."),
                        io.Float.Input("sync_weight", default=20.0, min=0.0, max=200.0, step=0.5,
                                       tooltip="Gradient step weight of the first step (paper: 20)."),
                        io.Float.Input("sync_decay", default=0.95, min=0.0, max=1.0, step=0.01,
                                       tooltip="Weight decay per step (paper: 0.95)."),
                        io.Int.Input("sync_every", default=1, min=1, max=100,
                                     tooltip="Synchronise every this many steps (paper: 1)."),
                        io.Int.Input("sync_batch", default=1, min=1, max=64,
                                     tooltip="Windows whose gradient is taken in one backward pass through the "
                                             "UNet and the VAE decoder; memory grows fast with it."),
                    ]),
                ]),
                io.Autogrow.Input("regions", optional=True,
                                  # min 1 of an optional slot: a fresh node offers one empty slot to connect
                                  template=io.Autogrow.TemplatePrefix(RegionType.Input("region", optional=True),
                                                                      prefix="region_", min=1, max=16),
                                  tooltip="Region prompts (EditKit Region Prompt): each region is denoised with its "
                                          "own prompt inside its mask; the sampler's positive prompt is the "
                                          "background."),
                io.Float.Input("bootstrap", default=0.4, min=0.0, max=1.0, step=0.01,
                               tooltip="Regions: fraction of the steps during which each region sees a random "
                                       "plain colour outside its mask (paper: 20 of 50 steps)."),
                io.Vae.Input("vae", optional=True, tooltip="Regions with bootstrapping: encodes the plain colours; "
                                                           "SyncDiffusion: decodes the windows' predicted images."),
                io.Int.Input("seed", default=0, min=0, max=2 ** 31 - 1,
                             tooltip="Regions: the seed of the bootstrapping colour palette (which colour a region "
                                     "sees at each step follows the sampler's seed)."),
            ],
            outputs=[io.Model.Output(tooltip="The model that samples in windows: connect it to the sampler.")],
        )

    @classmethod
    def execute(cls, model, window, stride, window_batch, circular, mode=None, bootstrap=None, seed=None,
                regions=None, vae=None) -> io.NodeOutput:   # mode=None: see dynamic_choice
        mode_name = dynamic_choice(mode, "mode", MODES)
        ratio = model.model.latent_format.spacial_downscale_ratio
        for name, value in (("window", window), ("stride", stride)):
            if value % ratio:
                raise ValueError(f"{name}: {value} px is not a multiple of {ratio} (the model's latent pixel)")
        if stride > window:
            raise ValueError(f"stride: {stride} px between windows of window {window} px leaves the {stride - window} "
                             f"px between them uncovered (never denoised); set stride to at most window")
        chosen = tuple(r for _, r in sorted((regions or {}).items()) if r is not None)
        bootstrap_latents = None
        if chosen and bootstrap > 0:
            if vae is None:
                raise ValueError("vae: region prompts with bootstrapping need the VAE (to encode the plain colours); "
                                 "connect it, or set bootstrap to 0")
            bootstrap_latents = _colour_latents(vae, model, window, seed)
        sync, lpips = _sync_settings(mode_name, mode, chosen, vae)
        fuser = LatentFuser(window=window // ratio, stride=stride // ratio, window_batch=window_batch,
                            circular=circular, regions=chosen, bootstrap=bootstrap,
                            bootstrap_latents=bootstrap_latents, sync=sync, lpips=lpips,
                            vae=vae if sync is not None else None)
        return io.NodeOutput(attach_fuser(model, fuser))


def _sync_settings(name: str, mode: dict, regions, vae) -> tuple[SyncSettings | None, dict | None]:
    """SyncDiffusion's settings and LPIPS weights from the node's mode (`name`, its chosen option), or (None, None)
    for MultiDiffusion."""
    if name == "multidiffusion":
        return None, None
    if regions:
        raise ValueError("mode: syncdiffusion synchronises one prompt's windows; with region prompts use "
                         "multidiffusion (or remove the regions)")
    if vae is None:
        raise ValueError("vae: syncdiffusion decodes each window's predicted image; connect the checkpoint's VAE")
    file = mode.get("lpips")
    if not file or file == NO_LPIPS:
        raise ValueError("lpips: no LPIPS weights in models/lpips; make them once with tools/make_lpips_weights.py "
                         "(see the README, 'SyncDiffusion') and reload the node")
    import folder_paths
    _register_lpips_folder()
    path = folder_paths.get_full_path(LPIPS_FOLDER, file)
    if path is None:
        raise ValueError(f"lpips: '{file}' is not in models/lpips")
    settings = SyncSettings(weight=float(mode.get("sync_weight", 20.0)), decay=float(mode.get("sync_decay", 0.95)),
                            until=float(mode.get("sync_until", 0.2)), every=int(mode.get("sync_every", 1)),
                            batch=int(mode.get("sync_batch", 1)))
    if settings.every < 1 or settings.batch < 1:
        raise ValueError("sync_every and sync_batch: must be at least 1")
    return settings, load_lpips(path).state_dict()


def _start_noise(model_patcher, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The noise part of the sampler's starting latent as the model's input sees it: the official region code's
    x_T, with which it noises the bootstrapping colours. A KSAMPLER starts from unit noise in the input space when
    the schedule begins at sigma_max and from sigma times the noise below it (KSAMPLER.max_denoise; ddim_uniform
    starts below: 1 / 1.009 of unit at 8 steps), so the sampler's unit `noise` is not always x_T."""
    model_sampling = model_patcher.get_model_object("model_sampling")
    first = sigmas.flatten()[:1].to(noise.device, torch.float32)
    sigma, sigma_max = float(first), float(model_sampling.sigma_max)
    max_denoise = math.isclose(sigma_max, sigma, rel_tol=1e-05) or sigma > sigma_max   # as KSAMPLER.max_denoise
    scaled = model_sampling.noise_scaling(first, noise.float(), torch.zeros_like(noise, dtype=torch.float32),
                                          max_denoise)
    return model_sampling.calculate_input(first, scaled)


def _colour_latents(vae, model, window: int, seed: int) -> torch.Tensor:
    """Random plain colours at the window's size, encoded and in the model's latent space (as the official
    region code draws them)."""
    generator = torch.Generator().manual_seed(seed)
    colours = torch.rand(BOOTSTRAP_COLOURS, 1, 1, 3, generator=generator)
    images = colours.expand(BOOTSTRAP_COLOURS, window, window, 3).contiguous()
    latents = torch.cat([vae.encode(images[i:i + 1]) for i in range(BOOTSTRAP_COLOURS)])
    return model.model.latent_format.process_in(latents.float()).cpu()


NODES = [LatentFuserNode, RegionPrompt]
