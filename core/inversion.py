"""Real-image inversion: DDIM inversion, null-text optimisation, negative-prompt inversion, direct inversion.

Everything runs in the sigma parameterisation of the host (x = x_0 + sigma eps, see schedule.py), on a
descending schedule sigmas[0] > ... > sigmas[N] (the last usually 0). Step i of sampling goes from
sigmas[i] to sigmas[i+1]; the inversion trajectory `latents[i]` is the latent at sigmas[i], so
latents[N] is the clean input and latents[0] the noised latent sampling starts from.

The model is a callable `eps_fn(x, sigma, contexts) -> eps` evaluating the noise prediction of a batch
`x` (one row per context) at noise level `sigma` (a float, or a 0-d tensor on x's device).

Methods:
- DDIM inversion (Song et al. 2021; as used by Mokady et al. 2023): each step reuses the noise predicted
  at the less noisy latent, evaluated at the higher timestep, guidance 1.
- Null-text inversion (Mokady et al. 2023, Alg. 1): per step, optimise the unconditional embedding so the
  guided step from the current latent lands on the inversion trajectory.
- Negative-prompt inversion (Miyake et al. 2023): the source prompt replaces the unconditional
  embedding; no optimisation.
- Direct inversion (Ju et al. 2023): keep the trajectory and pull the source branch back onto it at every
  step; reconstruction is exact by construction (see `direct_denoised`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .schedule import euler_sigma_step

EpsFn = Callable[[torch.Tensor, "float | torch.Tensor", torch.Tensor], torch.Tensor]
Progress = Callable[[int, int], None]

MODES = ("ddim", "null_text", "negative_prompt", "direct")


@dataclass
class NullTextSettings:
    """Reference values of Mokady et al. 2023 (their code: 10 inner Adam steps, lr 1e-2 * (1 - i / 100),
    stop once the loss is below 1e-5 + i * 2e-5 at step i)."""
    inner_steps: int = 10
    learning_rate: float = 1e-2
    lr_decay: float = 0.01
    early_stop: float = 1e-5
    early_stop_growth: float = 2e-5


@dataclass
class Inversion:
    """What editing nodes need to drive a source branch: schedule, trajectory, per-step null embeddings."""
    mode: str
    sigmas: torch.Tensor                          # (N + 1,) descending
    latents: torch.Tensor                         # (N + 1, C, H, W) latents[i] at sigmas[i]; (N + 1, F, C, H, W)
                                                  # for the F frames of a video
    guidance: float
    uncond_embeddings: torch.Tensor | None = None  # (N, T, D) null-text only: per sampling step
    source_context: torch.Tensor | None = None     # (1, T, D) the source prompt's encoding
    negative_context: torch.Tensor | None = None   # (1, T, D) the unconditional encoding inverted with
    metadata: dict = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return self.sigmas.shape[0] - 1

    @property
    def noised(self) -> torch.Tensor:
        return self.latents[0]

    @property
    def frames(self) -> int:
        """How many images were inverted together (the frames of a video); 1 for one image."""
        return trajectory_frames(self.latents)


def trajectory_frames(latents: torch.Tensor) -> int:
    """Frames of an inversion trajectory: (N + 1, C, H, W) is one image, (N + 1, F, C, H, W) F frames."""
    return latents.shape[1] if latents.ndim == 5 else 1


def inversion_model_input(x: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
    """Present a latent at noise `sigma_from` to the model as if at `sigma_to`, keeping the UNet's input.

    The host scales its input by 1 / sqrt(sigma^2 + 1); DDIM inversion (Mokady et al.) feeds the UNet the
    less noisy latent with the higher timestep, so the latent is rescaled to keep the UNet's input equal to
    the unscaled latent of the paper's parameterisation.
    """
    return x * (_sd_scale(sigma_from) / _sd_scale(sigma_to))


def _sd_scale(sigma: float) -> float:
    """Factor from sigma space to the sqrt(a) x_0 + sqrt(1-a) eps space, where the papers' losses live."""
    return 1.0 / (sigma * sigma + 1.0) ** 0.5


def cfg(eps_c: torch.Tensor, eps_u: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guidance of a conditional and an unconditional noise prediction."""
    return eps_u + guidance * (eps_c - eps_u)


@torch.no_grad()
def ddim_invert(eps_fn: EpsFn, x0: torch.Tensor, sigmas: torch.Tensor, context: torch.Tensor,
                progress: Progress | None = None) -> torch.Tensor:
    """DDIM inversion trajectory (guidance 1): tensor (N + 1, C, H, W), [N] = x0, [0] = the noised latent; x0 of
    F frames (F, C, H, W) are inverted in one batch into (N + 1, F, C, H, W)."""
    sig = [float(s) for s in sigmas]
    n = len(sig) - 1
    latents = [None] * (n + 1)
    latents[n] = x0
    x = x0
    batch = x0 if x0.ndim == 4 else x0[None]
    contexts = context.expand(batch.shape[0], *context.shape[1:])
    for k, i in enumerate(range(n - 1, -1, -1)):
        eps = eps_fn(inversion_model_input(x, sig[i + 1], sig[i]).reshape(batch.shape), sig[i], contexts)
        x = x + (sig[i] - sig[i + 1]) * eps.reshape(x.shape)
        latents[i] = x
        if progress:
            progress(k + 1, n)
    return torch.stack(latents)


def guided_eps(eps_fn: EpsFn, x: torch.Tensor, sigma: float, cond: torch.Tensor, uncond: torch.Tensor,
               guidance: float) -> torch.Tensor:
    """Classifier-free guidance with the conditional and unconditional passes batched into one call."""
    if guidance == 1.0:
        return eps_fn(x[None], sigma, cond)[0]
    eps_c, eps_u = eps_fn(torch.stack([x, x]), sigma, torch.cat([cond, uncond])).unbind(0)
    return cfg(eps_c, eps_u, guidance)


class _LossProbe:
    """A loss copied to pinned host memory as soon as it is computed, read later without a full sync."""

    def __init__(self, loss: torch.Tensor):
        self.loss = loss.detach().clone()    # the caller's buffer is overwritten by the next iteration
        self._event = None
        if self.loss.is_cuda:
            self._host = torch.empty((), dtype=self.loss.dtype, pin_memory=True)
            self._host.copy_(self.loss, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()

    def value(self) -> float:
        if self._event is None:
            return float(self.loss)
        self._event.synchronize()
        return float(self._host)


ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


@torch.no_grad()
def adam_step_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
               step: torch.Tensor, lr: torch.Tensor) -> None:
    """One in-place Adam update (Kingma & Ba 2015) with torch.optim.Adam's defaults.

    The step count and learning rate are tensors, so the update holds no Python number that changes
    between calls and can be replayed from a CUDA graph.
    """
    beta1, beta2 = ADAM_BETAS
    step.add_(1)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias1 = 1 - torch.pow(beta1, step)
    bias2_sqrt = (1 - torch.pow(beta2, step)).sqrt()
    param.sub_(exp_avg / (exp_avg_sq.sqrt() / bias2_sqrt + ADAM_EPS) * (lr / bias1))


class _InnerIteration:
    """One inner iteration of null-text optimisation, on buffers that stay put for the whole run.

    The step's inputs (latent, conditional prediction, target, sigmas, learning rate) are copied into the
    buffers by `start`; `run` does the unconditional forward, the backward to the embedding and the Adam
    update. Because nothing in it is a Python number that changes, on CUDA it can be captured once as a
    graph and replayed: a batch-1 UNet pass is bound by kernel launches on a large GPU, and a replay
    launches the whole forward and backward at once.
    """

    def __init__(self, eps_fn: EpsFn, x: torch.Tensor, embedding: torch.Tensor, guidance: float):
        self.eps_fn, self.guidance = eps_fn, guidance
        scalar = dict(device=x.device, dtype=torch.float32)
        self.x, self.eps_c, self.target = (torch.empty_like(x) for _ in range(3))
        self.sigma, self.sigma_next, self.scale, self.lr, self.step, self.loss = (
            torch.zeros((), **scalar) for _ in range(6))
        self.embedding = embedding.detach().clone().requires_grad_(True)
        self.before = torch.empty_like(self.embedding, requires_grad=False)
        self.exp_avg = torch.zeros_like(self.before)
        self.exp_avg_sq = torch.zeros_like(self.before)
        self.graph = None

    @torch.no_grad()
    def start(self, x, eps_c, target, sigma: float, sigma_next: float, lr: float) -> None:
        """Load one sampling step's inputs; a fresh Adam state, as the reference builds one per step."""
        for buffer, value in ((self.x, x), (self.eps_c, eps_c), (self.target, target)):
            buffer.copy_(value)
        self.sigma.fill_(sigma)
        self.sigma_next.fill_(sigma_next)
        self.scale.fill_(_sd_scale(sigma_next))
        self.lr.fill_(lr)
        for state in (self.step, self.exp_avg, self.exp_avg_sq):
            state.zero_()

    def _iterate(self) -> None:
        with torch.no_grad():
            self.before.copy_(self.embedding)
        with torch.enable_grad():
            eps_u = self.eps_fn(self.x[None], self.sigma, self.embedding)[0]
            pred = euler_sigma_step(self.x, cfg(self.eps_c, eps_u, self.guidance), self.sigma, self.sigma_next)
            # the loss in the papers' scale (sqrt(a) x_0 + sqrt(1 - a) eps), where the thresholds live
            loss = torch.nn.functional.mse_loss((pred * self.scale).float(), (self.target * self.scale).float())
            grad, = torch.autograd.grad(loss, self.embedding)
        adam_step_(self.embedding, grad, self.exp_avg, self.exp_avg_sq, self.step, self.lr)
        with torch.no_grad():
            self.loss.copy_(loss)

    def run(self) -> torch.Tensor:
        """One iteration; returns the loss buffer (the loss before this iteration's update)."""
        if self.graph is not None:
            self.graph.replay()
        else:
            self._iterate()
        return self.loss

    @torch.no_grad()
    def undo(self) -> None:
        """Take back the last iteration's update of the embedding."""
        self.embedding.copy_(self.before)

    def capture(self) -> None:
        """Record `run` as a CUDA graph (after `start`); the buffers are left as `start` set them.

        Raises whatever the capture raises: the caller falls back to running eagerly.
        """
        if not self.x.is_cuda:
            raise RuntimeError(f"CUDA graphs need the latents on a CUDA device, not {self.x.device}")
        state = [t.detach().clone() for t in (self.embedding, self.step, self.exp_avg, self.exp_avg_sq)]
        graph = torch.cuda.CUDAGraph()
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):      # warm-up (lazy initialisations) off the capturing stream
                for _ in range(3):
                    self._iterate()
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self._iterate()
        finally:
            with torch.no_grad():
                for buffer, value in zip((self.embedding, self.step, self.exp_avg, self.exp_avg_sq), state):
                    buffer.copy_(value)
        self.graph = graph


def null_text_optimise(eps_fn: EpsFn, latents: torch.Tensor, sigmas: torch.Tensor, cond: torch.Tensor,
                       uncond: torch.Tensor, guidance: float, settings: NullTextSettings = NullTextSettings(),
                       progress: Progress | None = None, cuda_graph: bool = False) -> tuple[torch.Tensor, dict]:
    """Per-step unconditional embeddings so guided DDIM from latents[0] follows the inversion trajectory.

    Returns (embeddings (N, T, D), stats). The conditional prediction of each step is computed once; each
    inner step costs one unconditional forward and backward (gradients flow to the embedding only).
    `eps_fn` gets the sigma of the inner steps as a 0-d tensor. `cuda_graph`: replay the inner step
    from a CUDA graph (latents on a CUDA device; the caller vouches that `eps_fn` holds no state that
    changes between calls); if the capture fails, the loop runs eagerly and stats["cuda_graph"] says why.
    """
    sig = [float(s) for s in sigmas]
    n = len(sig) - 1
    x = latents[0]
    inner = _InnerIteration(eps_fn, x, uncond, guidance)
    graph_status = "off"
    out, losses, inner_total = [], [], 0
    for i in range(n):
        target = latents[i + 1]
        with torch.no_grad():
            eps_c = eps_fn(x[None], sig[i], cond)[0]
        inner.start(x, eps_c, target, sig[i], sig[i + 1], settings.learning_rate * (1.0 - settings.lr_decay * i))
        if cuda_graph and graph_status == "off" and settings.inner_steps > 0:
            try:
                inner.capture()
                graph_status = "on"
            except RuntimeError as error:     # an operation that cannot be captured: run eagerly (an
                # interrupt from ComfyUI is not a RuntimeError and still stops the run)
                graph_status = f"failed: {error}".splitlines()[0][:200]
                inner.graph = None
        threshold = settings.early_stop + settings.early_stop_growth * i
        loss, previous = None, None
        for _ in range(settings.inner_steps):
            probe = _LossProbe(inner.run())
            inner_total += 1
            # The reference stops after the update whose loss was under the threshold. Reading a loss waits
            # for the GPU, so the test of iteration k-1 is read once iteration k is queued behind it (the GPU
            # never idles); if it passes, iteration k's update is undone, giving the reference's result.
            if previous is not None and previous.value() < threshold:
                inner.undo()
                inner_total -= 1
                loss = previous.loss
                break
            previous = probe
            loss = probe.loss
        embedding = inner.embedding.detach().clone()
        out.append(embedding[0])
        losses.append(loss.item() if loss is not None else float("nan"))
        with torch.no_grad():
            eps_u = eps_fn(x[None], sig[i], embedding)[0]
            x = euler_sigma_step(x, cfg(eps_c, eps_u, guidance), sig[i], sig[i + 1])
        if progress:
            progress(i + 1, n)
    return torch.stack(out), {"losses": losses, "inner_steps": inner_total, "cuda_graph": graph_status}


def direct_denoised(latents: torch.Tensor, sigmas: Sequence[float], step: int) -> torch.Tensor:
    """The denoised prediction that moves a first-order step from latents[step] exactly onto latents[step+1].

    Returning it for the source rows at step `step` makes Euler / DDIM land on the trajectory, and any
    sampler whose last step returns the denoised prediction end exactly on latents[N] (the input).
    """
    s, s_next = float(sigmas[step]), float(sigmas[step + 1])
    x, x_next = latents[step], latents[step + 1]
    if s_next == 0.0:
        return x_next
    # x_next = x + (s_next - s) (x - D) / s  =>  D = x - s (x_next - x) / (s_next - s)
    return x - s * (x_next - x) / (s_next - s)


def reconstruct(eps_fn: EpsFn, inversion: Inversion, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
    """Sample back from the noised latent with the source prompt, DDIM (Euler in sigma space).

    ddim: guidance as given with `uncond`; null_text: the optimised per-step embeddings; negative_prompt:
    the source prompt as the unconditional; direct: the trajectory itself.
    """
    sig = [float(s) for s in inversion.sigmas]
    x = inversion.noised
    for i in range(inversion.steps):
        if inversion.mode == "direct":
            d = direct_denoised(inversion.latents, sig, i)
            x = d if sig[i + 1] == 0 else x + (sig[i + 1] - sig[i]) * (x - d) / sig[i]
            continue
        null = unconditional_for_step(inversion, i, cond, uncond)
        with torch.no_grad():
            eps = guided_eps(eps_fn, x, sig[i], cond, null, inversion.guidance)
        x = euler_sigma_step(x, eps, sig[i], sig[i + 1])
    return x


def unconditional_for_step(inversion: Inversion, step: int, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
    """The unconditional embedding the inversion prescribes at sampling step `step`."""
    if inversion.mode == "null_text":
        return inversion.uncond_embeddings[step][None].to(cond.dtype)
    if inversion.mode == "negative_prompt":
        return cond
    return uncond


FORMAT_KEY = "editkit_inversion"
FORMAT_VERSION = 1
_TENSORS = ("sigmas", "latents", "uncond_embeddings", "source_context", "negative_context")


class NotAnInversionError(ValueError):
    pass


def save_inversion(inversion: Inversion, path) -> None:
    """safetensors file: the tensors, plus JSON metadata (mode, guidance, format version, free metadata)."""
    import json
    from safetensors.torch import save_file
    tensors = {name: getattr(inversion, name).contiguous().cpu() for name in _TENSORS
               if getattr(inversion, name) is not None}
    meta = {"mode": inversion.mode, "guidance": inversion.guidance, "version": FORMAT_VERSION,
            "metadata": inversion.metadata}
    save_file(tensors, str(path), metadata={FORMAT_KEY: json.dumps(meta)})


def load_inversion(path, input_name: str = "inversion") -> Inversion:
    import json
    from .files import read_safetensors
    metadata, tensors = read_safetensors(path, input_name, NotAnInversionError)
    header = metadata.get(FORMAT_KEY)
    if header is None:
        raise NotAnInversionError(f"{input_name}: '{path}' is a safetensors file but not a saved inversion "
                                  f"(no '{FORMAT_KEY}' metadata); save one with 'Save Inversion'")
    meta = json.loads(header)
    if meta.get("version") != FORMAT_VERSION or meta.get("mode") not in MODES or "latents" not in tensors:
        raise NotAnInversionError(f"{input_name}: '{path}' has an unknown inversion format: {meta}")
    return Inversion(mode=meta["mode"], guidance=float(meta["guidance"]), metadata=meta.get("metadata", {}),
                     **{name: tensors.get(name) for name in _TENSORS})
