"""What a pair sampler does around each model evaluation, whatever the host.

A pair run samples a source (latent item 0) and its edits (items 1..) as one batch. Around each evaluation
of the model at noise level sigma (step `step` of a descending schedule, in the host's sigma space), the
source row is driven by one of three schemes:
- `sampled`: the source is sampled like the targets (a generated image, or a photo's inversion whose
  unconditional embeddings reproduce it: null-text, negative-prompt, DDIM);
- `direct` (Ju et al. 2023, "Direct Inversion"): the source row's prediction is replaced by the one that
  moves it exactly onto the stored inversion latent of the next step; the targets evolve freely;
- `pinned` (Plug-and-Play, Tumanyan et al. 2023, as its code does): the source row's input is the stored
  inversion latent itself at each step, and its prediction follows the trajectory, so the source branch is
  the photo's inversion whatever the targets do.
With a `LocalBlend`, from its first step on, each target's prediction is solved so that the step lands on
the latent the reference blends after the step (`blend_denoised`).

A video is edited the same way, frame by frame in one batch: with `frames` F the batch holds F groups of
rows, group f holding frame f's source and targets (so pairing controllers pair within a frame), and the
trajectory holds the inversion of every frame.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import frame_groups
from .inversion import direct_denoised, trajectory_frames
from .prompt2prompt import LocalBlend, blend_denoised

SOURCE_MODES = ("sampled", "direct", "pinned")


@dataclass(frozen=True)
class PairSchedule:
    """The source scheme of a pair run. `trajectory`: the inversion latents (N + 1, C, H, W), latents[i] at
    schedule[i], or (N + 1, F, C, H, W) for F frames, needed by `direct` and `pinned`. The batch has one group
    of rows (source, targets) per frame."""
    schedule: tuple[float, ...]
    source: str = "sampled"
    trajectory: torch.Tensor | None = None
    frames: int = 1

    def __post_init__(self):
        if self.source not in SOURCE_MODES:
            raise ValueError(f"source scheme '{self.source}' is not one of {', '.join(SOURCE_MODES)}")
        if self.source != "sampled" and self.trajectory is None:
            raise ValueError(f"the '{self.source}' source scheme needs the inversion's latents")
        if self.trajectory is not None and trajectory_frames(self.trajectory) != self.frames:
            raise ValueError(f"the trajectory is of {trajectory_frames(self.trajectory)} frames, the batch of "
                             f"{self.frames}")

    @property
    def steps(self) -> int:
        return len(self.schedule) - 1

    def at_step_start(self, sigma: float, step: int) -> bool:
        """Whether an evaluation at `sigma` is the one at the start of `step` (not an intermediate one)."""
        start = self.schedule[step]
        return abs(sigma - start) <= 1e-4 * max(abs(start), 1e-8)

    def next_sigma(self, sigma: float, step: int) -> float | None:
        """The sigma this evaluation's first-order step goes to, or None for an intermediate evaluation."""
        return self.schedule[step + 1] if self.at_step_start(sigma, step) else None

    def _source_denoised(self, step: int, like: torch.Tensor) -> torch.Tensor:
        """(frames, C, H, W): the source rows' predictions that land them on the trajectory's next latents."""
        denoised = direct_denoised(self.trajectory, self.schedule, step).to(like.device, like.dtype)
        return denoised.reshape(self.frames, *like.shape[1:])

    def model_input(self, x: torch.Tensor, sigma: float, step: int) -> torch.Tensor:
        """The batch the model evaluates: with `pinned`, the source rows are the inversion's latents at sigma (the
        stored ones at a schedule step, on the straight path to the next ones in between)."""
        if self.source != "pinned":
            return x
        start = self.trajectory[step].to(x.device, x.dtype).reshape(self.frames, *x.shape[1:])
        pinned = start if self.at_step_start(sigma, step) else \
            start + (sigma - self.schedule[step]) / self.schedule[step] * (start - self._source_denoised(step, x))
        groups = frame_groups(x, self.frames).clone()
        groups[:, 0] = pinned
        return groups.reshape(x.shape)

    def denoised(self, x: torch.Tensor, out: torch.Tensor, sigma: float, step: int,
                 blend: LocalBlend | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The predictions given to the sampler: the source rows' set by their scheme, then the local blend
        (`mask` from `blend.update_mask`, None before the blend's first step or before any map)."""
        if self.source != "sampled":
            groups = frame_groups(out, self.frames).clone()
            groups[:, 0] = self._source_denoised(step, out)
            out = groups.reshape(out.shape)
        if blend is not None and mask is not None and step >= blend.first_step(self.steps):
            out = blend_denoised(x, out, mask, sigma, self.next_sigma(sigma, step), self.frames)
        return out
