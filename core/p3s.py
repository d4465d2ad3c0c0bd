"""P3S-Diffusion's subject-driven generation (Hu et al., "P3S-Diffusion: A Selective Subject-driven Generation
Framework via Point Supervision", sec. III-A eq. 4-5 and sec. III-B eq. 6-12): the parts that do not depend on the
host. The trainable copy of the UNet is the host's own module (nodes/p3s_adapter.py); this module holds what
surrounds it.

- `RNGREncoder` (eq. 4-5): the filled reference's latent I' attends to the CLIP image encoder's last hidden state
  c_s; I'' = I' + softmax(Q_i K_c^T / sqrt(d)) V_c, with Q_i = W^Q Z(I') and Z a zero-initialised 1x1 convolution.
  I'' is added to the copy's input (the paper's "latent bias towards the subject").
- `ZeroProjections` (eq. 6): f_i = Z_i(F_i), one zero-initialised 1x1 convolution (a linear map of the channels of
  each token) per self-attention layer, on the hidden state the copy's layer i attends with.
- `P3SInjection` (eq. 7-9), a controller of the pack's attention mechanism: at the frozen UNet's self-attention
  layer i, with w = eps_t * f_i,
      V = W^V (z_i + lambda w),  out = Attn(q, W^K z_i, V) + Attn(q, W^K w, W^V w).
  Reading of eq. 7-8: the paper attends the concatenation [z_i, f_i] in one softmax. With f_i = 0 (a fresh adapter,
  zero convolutions) that softmax would still give the appended zero keys exp(0) each and dilute the layer's own
  attention, so the zero convolutions would not leave the model as it was, which is what zero initialisation is
  for (and what the issue asks); here the appended tokens are attended in their own softmax and added
  (IP-Adapter's decoupled form), which is exactly the frozen UNet when f_i = 0. lambda = 0.2 as the paper.
- `injection_weight` (eq. 10): eps_t = 1 - alpha (t / T)^k + beta (alpha 0.5, beta 0.2, k 2), t the UNet's timestep
  (0..T-1, T = 1000 training steps): 0.7 at the first (noisiest) steps, 1.2 at the last.
- `attention_consistency_loss` (eq. 11-12): MSE(M_c, M_o) / avg, avg = (Sum M_c + Sum M_o) / 2, on the last
  cross-attention layer of the copy (M_c) and of the frozen UNet (M_o).
- The "cross-attention enhancement" of the paper's Fig. 3 has no equation and is not implemented.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from .attention import CROSS, SELF, AttentionCall, AttentionController, AttentionSite, split_heads, merge_heads

LAMBDA = 0.2
ALPHA, BETA, POWER = 0.5, 0.2, 2.0
GAMMA = 0.1
TRAIN_STEPS = 1000

# site name -> (to_k, to_v) of the frozen UNet's attention there: x (rows, tokens, C) -> keys / values
Projections = Mapping[str, Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]]


def injection_weight(timestep, alpha: float = ALPHA, beta: float = BETA, power: float = POWER,
                     train_steps: int = TRAIN_STEPS):
    """eq. 10: eps_t = 1 - alpha (t / T)^k + beta, for a timestep or a tensor of them."""
    if torch.is_tensor(timestep):
        return 1.0 - alpha * (timestep / train_steps) ** power + beta
    return 1.0 - alpha * (float(timestep) / train_steps) ** power + beta


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class RNGREncoder(torch.nn.Module):
    """eq. 4-5: I'' = I' + softmax(W^Q Z(I') (W^K c_s)^T / sqrt(d)) W^V c_s, per latent position."""

    def __init__(self, latent_channels: int, clip_width: int, width: int = 64, seed: int = 0):
        super().__init__()
        self.zero = torch.nn.Conv2d(latent_channels, latent_channels, 1)
        self.to_q = torch.nn.Linear(latent_channels, width, bias=False)
        self.to_k = torch.nn.Linear(clip_width, width, bias=False)
        self.to_v = torch.nn.Linear(clip_width, latent_channels, bias=False)
        g = _generator(seed)
        with torch.no_grad():
            self.zero.weight.zero_()
            self.zero.bias.zero_()
            for linear in (self.to_q, self.to_k, self.to_v):   # Xavier-uniform, seeded
                bound = math.sqrt(6.0 / sum(linear.weight.shape))
                linear.weight.copy_(torch.rand(linear.weight.shape, generator=g) * 2 * bound - bound)

    def forward(self, latent: torch.Tensor, clip_states: torch.Tensor) -> torch.Tensor:
        """latent (B, C, h, w), clip_states (B, N, D) -> (B, C, h, w)."""
        b, c, h, w = latent.shape
        q = self.to_q(self.zero(latent).flatten(2).transpose(1, 2))             # (B, h*w, d)
        k, v = self.to_k(clip_states), self.to_v(clip_states)                  # (B, N, d), (B, N, C)
        attended = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1) @ v
        return latent + attended.transpose(1, 2).reshape(b, c, h, w)


def _key(name: str) -> str:
    return name.replace(".", "_")   # ModuleDict keys may not hold dots


class ZeroProjections(torch.nn.Module):
    """eq. 6's Z_i: a zero-initialised linear map of each token's channels, per self-attention site."""

    def __init__(self, channels: Mapping[str, int]):
        super().__init__()
        self.names = tuple(channels)
        self.maps = torch.nn.ModuleDict({_key(n): torch.nn.Linear(c, c) for n, c in channels.items()})
        with torch.no_grad():
            for linear in self.maps.values():
                linear.weight.zero_()
                linear.bias.zero_()

    def forward(self, hidden: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: self.maps[_key(name)](h) for name, h in hidden.items() if _key(name) in self.maps}


def attention_consistency_loss(copy_probs: torch.Tensor, frozen_probs: torch.Tensor) -> torch.Tensor:
    """eq. 11-12: Mean((M_c - M_o)^2) / avg with avg = (Sum(M_c) + Sum(M_o)) / 2."""
    average = (copy_probs.sum() + frozen_probs.sum()) / 2
    return ((copy_probs - frozen_probs) ** 2).mean() / average


@dataclass
class _InjectionState:
    features: dict = field(default_factory=dict)   # site name -> w = eps_t * f (rows, tokens, C) of this evaluation
    pending: tuple | None = None                   # (q, W^K w, W^V w) of the call in progress


@dataclass(frozen=True, eq=False)
class P3SInjection(AttentionController):
    """Injects the copy's features into the frozen UNet's self-attention (eq. 7-9, decoupled; see the module).
    The host puts each evaluation's weighted features w into the run state (`set_features`) before the UNet runs,
    and `projections` are the frozen layers' own W^K, W^V (bias-free in every SD UNet)."""
    projections: Projections
    lam: float = LAMBDA

    def wants_site(self, site: AttentionSite) -> bool:
        return site.kind == SELF and site.name in self.projections

    def acts_on(self, call: AttentionCall) -> bool:
        return self.wants_site(call.site) and call.site.name in call.state(self).features

    def new_run_state(self):
        return _InjectionState()

    def set_features(self, run, features: Mapping[str, torch.Tensor]) -> None:
        run.of(self).features = dict(features)

    def edit_qkv(self, call: AttentionCall, q, k, v):
        state = call.state(self)
        w = state.features[call.site.name].to(q.dtype)
        if w.shape[0] != q.shape[0]:   # one reference for every row
            w = w.expand(q.shape[0], -1, -1)
        wk, wv = self.projections[call.site.name](w)
        state.pending = (q, wk, wv)
        return q, k, v + self.lam * wv

    def edit_output(self, call: AttentionCall, out: torch.Tensor) -> torch.Tensor:
        state = call.state(self)
        q, wk, wv = state.pending
        state.pending = None
        injected = F.scaled_dot_product_attention(split_heads(q, call.heads), split_heads(wk, call.heads),
                                                  split_heads(wv, call.heads))
        return out + merge_heads(injected).to(out.dtype)


@dataclass
class _ProbsState:
    probs: torch.Tensor | None = None


@dataclass(frozen=True, eq=False)
class LastCrossProbs(AttentionController):
    """Keeps the conditional probabilities of one cross-attention site of the evaluation (with their autograd
    graph): M_o of the attention consistency loss."""
    site_name: str

    def wants_site(self, site: AttentionSite) -> bool:
        return site.kind == CROSS and site.name == self.site_name

    def acts_on(self, call: AttentionCall) -> bool:
        return self.wants_site(call.site)

    def needs_probs(self, call: AttentionCall) -> bool:
        return True

    def new_run_state(self):
        return _ProbsState()

    def edit_probs(self, call: AttentionCall, probs: torch.Tensor) -> torch.Tensor:
        call.state(self).probs = probs
        return probs
