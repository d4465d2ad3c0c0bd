"""Node: Keyframe Attention, cross-frame self-attention over the latents of a batch (core/keyframe.py).

MODEL -> MODEL: the batch's latents are frames (of a video, or images that should share a look); any sampler
node samples them. The controller is one more attention controller of the pack (nodes/comfy_attention.py), so it
composes with the Attention Controller, the Feature Injector and the Latent Fuser on the same model.
"""
from __future__ import annotations

from dataclasses import dataclass

import comfy.patcher_extension
import torch
from comfy_api.latest import io

from ..core.attention import FrameWindow
from ..core.keyframe import MODES, KeyframeAttention, frame_windows, previous_frame_pull
from ..core.schedule import step_index
from .comfy_attention import FRAME_WINDOW_KEY, FRAMES_KEY, attach_controller, chosen_self_layers, with_transformer_option
from .host_helpers import dynamic_choice, dynamic_combo, map_cond_tensors
from .pair_guider import clips_first

CATEGORY = "EditKit/video"
METHOD_OF_MODE = {"first": "Text2Video-Zero", "first_and_previous": "Pix2Video", "middle": "FateZero",
                  "all": "shared attention", "indices": "your keyframes"}


def _indices(text: str) -> tuple[int, ...]:
    values = []
    for part in text.replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            values.append(int(part))
        except ValueError:
            raise ValueError(f"indices: cannot read '{part}'; write frame numbers from 0, e.g. '0, 8'") from None
    return tuple(values)


WINDOWS_KEY = "editkit_frame_windows"
CHECK_KEY = "editkit_keyframe_batch"


def _refuse_one_frame(executor, *args, **kwargs):
    """OUTER_SAMPLE wrapper: a latent of one image has no other frame to read, so the node would change nothing."""
    latent = args[1] if len(args) > 1 else kwargs.get("latent_image")
    if latent is not None and latent.shape[0] < 2:
        raise ValueError("latent: one image; Keyframe Attention shares keys and values across the frames of a batch, "
                         "so it changes nothing here: sample a batch of 2 or more (Empty Latent Image's batch_size, "
                         "or a video's frames), or bypass the node")
    return executor(*args, **kwargs)


@dataclass(frozen=True, eq=False)
class FrameWindows:
    """CALC_COND_BATCH wrapper: a long batch of frames evaluated in windows of frames (core frame_windows),
    each holding the keyframes its frames read; the outputs of those borrowed keyframes are dropped."""
    controller: KeyframeAttention
    size: int

    def __call__(self, executor, model, conds, x_in, timestep, model_options):
        rows = x_in.shape[0]
        paired = model_options.get("transformer_options", {}).get(FRAMES_KEY)
        frames = rows if paired is None else paired
        items = rows // frames   # a pair run (an edit) has one group of rows per frame
        windows = frame_windows(self.controller.mode, frames, self.size, self.controller.indices)
        if len(windows) == 1:
            return executor(model, conds, x_in, timestep, model_options)
        for entries in conds:
            if any(c.get("control") is not None for c in entries or []):
                raise ValueError("frame_window: a ControlNet does not combine with frame windows yet; set "
                                 "frame_window to 0")
        outputs = None
        group = torch.arange(items, device=x_in.device)
        for ids, kept in windows:
            index = (torch.tensor(ids, device=x_in.device)[:, None] * items + group).flatten()
            options = with_transformer_option(model_options, FRAME_WINDOW_KEY, FrameWindow(tuple(ids), frames))
            if paired is not None:
                options = with_transformer_option(options, FRAMES_KEY, len(ids))
            times = timestep[index] if timestep.ndim and timestep.shape[0] == rows else timestep
            window_conds = [None if c is None else [_frames_of(entry, index, rows) for entry in c] for c in conds]
            out = executor(model, window_conds, x_in[index], times, options)
            if outputs is None:
                outputs = [torch.zeros_like(x_in) for _ in out]
            for full, part in zip(outputs, out):
                full[index[kept * items:]] = part[kept * items:]
        return outputs


@dataclass(frozen=True, eq=False)
class PreviousFramePull:
    """Post-CFG function: Pix2Video's pull of each frame's predicted image towards the previous frame's, on the
    steps 0 to int(until * N) of N (core previous_frame_pull). The official code zeroes the weight once its step
    index passes 25 of 50, so it pulls on 26 steps: `until` 0.5 is its setting."""
    weight: float
    until: float

    def __call__(self, args: dict) -> torch.Tensor:
        denoised = args["denoised"]
        schedule = args["model_options"].get("transformer_options", {}).get("sample_sigmas")
        if schedule is None or denoised.shape[0] < 2:
            return denoised
        sigmas = [float(s) for s in schedule.flatten().tolist()]
        sigma = float(args["sigma"].flatten()[0])
        step = step_index(sigma, sigmas)
        if step > int(self.until * (len(sigmas) - 1)) or step + 1 >= len(sigmas):
            return denoised
        frames = args["model_options"].get("transformer_options", {}).get(FRAMES_KEY)
        if frames is None:
            change = previous_frame_pull(denoised.float(), self.weight, sigma, sigmas[step + 1])
        else:   # a pair run: one group of rows per frame; each clip pulled along its own frames
            clips = clips_first(denoised.float(), frames).reshape(-1, frames, *denoised.shape[1:])
            change = torch.stack([previous_frame_pull(c, self.weight, sigma, sigmas[step + 1]) for c in clips])
            change = clips_first(change.flatten(0, 1), change.shape[0])   # back to groups per frame
        return denoised + change.to(denoised.dtype)


def _frames_of(cond: dict, index: torch.Tensor, total: int) -> dict:
    """A cond for some frames of the batch: per-frame tensors (a batch of prompts, masks) indexed."""
    def pick(tensor, name):
        if tensor.shape[0] == total and (name == "mask" or total > 1):
            return tensor[index.to(tensor.device)]
        return tensor
    return map_cond_tensors(cond, pick)


class KeyframeAttentionNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitKeyframeAttention",
            display_name="Keyframe Attention (cross-frame)",
            category=CATEGORY,
            description="Makes the latents of a batch share their look: each frame's self-attention reads the keys "
                        "and values of keyframes (Text2Video-Zero: the first frame; Pix2Video: the first and the "
                        "previous; FateZero: the middle one; or every frame of the batch). Connect the MODEL to "
                        "any sampler and sample a batch.",
            inputs=[
                io.Model.Input("model", tooltip="SD 1.x / 2.x model. It is cloned; the input is not changed."),
                dynamic_combo("mode", tooltip="Which frames each frame reads its keys and values from.",
                              options=[
                    io.DynamicCombo.Option("first", []),
                    io.DynamicCombo.Option("first_and_previous", []),
                    io.DynamicCombo.Option("middle", []),
                    io.DynamicCombo.Option("all", []),
                    io.DynamicCombo.Option("indices", [
                        io.String.Input("indices", default="0",
                                        tooltip="Keyframes, frame numbers from 0 in the batch: '0' or '0, 8'."),
                    ]),
                ]),
                io.String.Input("layers", default="",
                                tooltip="Self-attention layers (transformer layers in UNet order, SD1.5: 0-15) as "
                                        "'4-11' or '10, 12'. Empty: the method's own (Pix2Video: the decoder's; the "
                                        "others: every layer)."),
                io.Float.Input("start_at", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the steps before keyframe attention starts."),
                io.Float.Input("end_at", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the steps after which each frame attends to itself again."),
                io.Int.Input("frame_window", default=0, min=0, max=4096,
                             tooltip="Long videos: frames per model call (plus the keyframes they read, e.g. "
                                     "frame 0), so memory is bounded by the window, not the video; every frame "
                                     "reads the same keyframes as in one batch. 0: all frames in one call."),
                io.Float.Input("previous_frame_pull", default=0.0, min=0.0, max=1000.0, step=1.0,
                               tooltip="Pix2Video's latent guidance: each frame's predicted image pulled towards "
                                       "the previous frame's (paper: 100, first half of the steps). 0: off. "
                                       "Exact for euler / ddim."),
                io.Float.Input("pull_until", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the steps with the previous-frame pull: steps 0 to until x N (paper's "
                                       "code: 0.5, steps 0-25 of 50)."),
            ],
            outputs=[io.Model.Output(tooltip="The model whose batch shares attention: connect it to the sampler.")],
        )

    @classmethod
    def execute(cls, model, mode=None, layers=None, start_at=None, end_at=None, frame_window=None,
                previous_frame_pull=0.0, pull_until=0.5) -> io.NodeOutput:   # mode=None: see dynamic_choice
        name = dynamic_choice(mode, "mode", MODES)
        if start_at >= end_at:
            raise ValueError(f"start_at: {start_at} must be smaller than end_at ({end_at})")
        indices = _indices(mode.get("indices", "")) if name == "indices" else ()
        if name == "indices" and not indices:
            raise ValueError("indices: name at least one keyframe (frame numbers from 0, e.g. '0' or '0, 8')")
        chosen = chosen_self_layers(model, layers, decoder=name == "first_and_previous")
        controller = KeyframeAttention(mode=name, indices=indices, layers=chosen,
                                       start=start_at, end=end_at)
        if frame_window == 1:
            raise ValueError("frame_window: 1 frame per call leaves nothing to share; use 2 or more, or 0 for all")
        if frame_window and name == "all":
            raise ValueError("frame_window: mode all reads every frame, so it cannot run in windows; use first, "
                             "first_and_previous, middle or indices, or set frame_window to 0")
        patched = attach_controller(model, controller)
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, CHECK_KEY, _refuse_one_frame)
        if previous_frame_pull > 0 and pull_until > 0:
            patched.set_model_sampler_post_cfg_function(PreviousFramePull(previous_frame_pull, pull_until))
        if frame_window:
            if patched.get_wrappers(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, WINDOWS_KEY):
                raise ValueError("model: it already samples frames in windows; apply one Keyframe Attention with "
                                 "a frame_window")
            patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, WINDOWS_KEY,
                                         FrameWindows(controller, frame_window))
        return io.NodeOutput(patched)


NODES = [KeyframeAttentionNode]
