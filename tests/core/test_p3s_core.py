"""Core tests of P3S-Diffusion's condition injection (core/p3s.py) against float64 write-outs of the paper's
equations: the timestep weight (eq. 10), the injected self-attention (eq. 7-8, decoupled), the attention consistency
loss (eq. 11-12), the RNGR encoding (eq. 4-5) and the zero projections (eq. 6)."""
import math

import pytest
import torch

from editkit.core.attention import SELF, AttentionCall, AttentionSite, BatchLayout, RunState, controlled_attention, sdpa_attention
from editkit.core.p3s import (P3SInjection, RNGREncoder, ZeroProjections, attention_consistency_loss,
                              injection_weight)
from editkit.core.schedule import sd_alphas_cumprod

SITE = AttentionSite(3, SELF, "input", 7)
HEADS, TOKENS, WIDTH = 2, 16, 8


def test_the_weight_schedule_is_eq_10_at_every_step():
    """eps_t = 1 - alpha (t / T)^k + beta at each timestep of a 50-step DDIM schedule, in float64."""
    timesteps = torch.linspace(999, 0, 50, dtype=torch.float64).round()
    for alpha, beta, k in ((0.5, 0.2, 2.0), (0.3, 0.0, 1.0), (1.0, -0.1, 3.0)):
        ours = injection_weight(timesteps, alpha, beta, k)
        assert ours.dtype == torch.float64
        for t, w in zip(timesteps.tolist(), ours.tolist()):
            assert w == pytest.approx(1.0 - alpha * (t / 1000.0) ** k + beta, abs=1e-15)
        assert injection_weight(int(timesteps[7]), alpha, beta, k) == pytest.approx(float(ours[7]), abs=1e-15)
    assert injection_weight(999) == pytest.approx(0.7, abs=1e-3) and injection_weight(0) == pytest.approx(1.2)
    assert len(sd_alphas_cumprod()) == 1000   # T: SD's training steps


def _projections(seed=0):
    g = torch.Generator().manual_seed(seed)
    wk = torch.randn(WIDTH, WIDTH, generator=g, dtype=torch.float64) / math.sqrt(WIDTH)
    wv = torch.randn(WIDTH, WIDTH, generator=g, dtype=torch.float64) / math.sqrt(WIDTH)
    return {SITE.name: lambda x: (x @ wk.T, x @ wv.T)}, wk, wv


def _call(controller):
    return AttentionCall(site=SITE, heads=HEADS, step=0, num_steps=1, grid=(4, 4),
                         layout=BatchLayout(("cond", "uncond"), 1), run=RunState([controller]))


def _softmax_attention(q, k, v):
    """Per head, softmax(q k^T / sqrt(d)) v written out."""
    d = WIDTH // HEADS
    out = []
    for h in range(HEADS):
        cols = slice(h * d, (h + 1) * d)
        weights = torch.softmax(q[..., cols] @ k[..., cols].transpose(-1, -2) / math.sqrt(d), dim=-1)
        out.append(weights @ v[..., cols])
    return torch.cat(out, dim=-1)


def test_the_injected_attention_is_eq_7_with_its_own_softmax():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, TOKENS, WIDTH, generator=g, dtype=torch.float64)     # the frozen layer's hidden state
    w = torch.randn(2, TOKENS, WIDTH, generator=g, dtype=torch.float64)     # eps_t * f
    wq = torch.randn(WIDTH, WIDTH, generator=g, dtype=torch.float64)
    projections, wk, wv = _projections()
    controller = P3SInjection(projections, lam=0.2)
    call = _call(controller)
    controller.set_features(call.run, {SITE.name: w})
    q, k, v = z @ wq.T, z @ wk.T, z @ wv.T
    assert controller.acts_on(call)
    out = controlled_attention(call, q, k, v, [controller], sdpa_attention)
    # eq. 7: K' = W^K [z, w], V' = W^V [z + lambda w, w]; the two parts each with its own softmax (see core/p3s.py)
    expected = _softmax_attention(q, z @ wk.T, (z + 0.2 * w) @ wv.T) + _softmax_attention(q, w @ wk.T, w @ wv.T)
    assert torch.allclose(out, expected, atol=1e-12)
    joint = _softmax_attention(q, torch.cat([z, w], 1) @ wk.T, torch.cat([z + 0.2 * w, w], 1) @ wv.T)
    assert not torch.allclose(out, joint, atol=1e-3)   # the reading matters


def test_zero_features_leave_the_attention_exactly_as_it_was():
    """A fresh adapter's features are zero: the layer's output is the plain attention's, bit for bit."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, TOKENS, WIDTH, generator=g) for _ in range(3))
    projections, _, _ = _projections()
    controller = P3SInjection({SITE.name: lambda x: tuple(t.float() for t in projections[SITE.name](x.double()))})
    call = _call(controller)
    controller.set_features(call.run, {SITE.name: torch.zeros(2, TOKENS, WIDTH)})
    out = controlled_attention(call, q, k, v, [controller], sdpa_attention)
    assert torch.equal(out, sdpa_attention(q, k, v, HEADS))
    controller.set_features(call.run, {})
    assert not controller.acts_on(call)   # no features this evaluation: the host's kernel runs


def test_the_attention_consistency_loss_is_eq_11_12():
    g = torch.Generator().manual_seed(3)
    m_c = torch.softmax(torch.randn(2, 2, 64, 77, generator=g, dtype=torch.float64), dim=-1)
    m_o = torch.softmax(torch.randn(2, 2, 64, 77, generator=g, dtype=torch.float64), dim=-1)
    average = (m_c.sum() + m_o.sum()) / 2
    expected = ((m_c - m_o) ** 2).sum() / m_c.numel() / average
    assert attention_consistency_loss(m_c, m_o).item() == pytest.approx(expected.item(), rel=1e-12)
    assert attention_consistency_loss(m_c, m_c).item() == 0.0


def test_the_rngr_encoding_is_eq_4_with_a_zero_convolution():
    g = torch.Generator().manual_seed(4)
    latent = torch.randn(2, 4, 8, 8, generator=g)
    states = torch.randn(2, 5, 12, generator=g)
    encoder = RNGREncoder(4, 12, width=16, seed=0)
    # Z(I') = 0: every position attends uniformly, I'' = I' + mean over the CLIP tokens of W^V c_s
    uniform = encoder.to_v(states).mean(dim=1)[:, :, None, None]
    assert torch.allclose(encoder(latent, states), latent + uniform, atol=1e-6)
    with torch.no_grad():
        encoder.zero.weight.copy_(torch.randn(encoder.zero.weight.shape, generator=g))
    z = encoder.zero(latent).flatten(2).transpose(1, 2).double()
    q, k, v = z @ encoder.to_q.weight.double().T, states.double() @ encoder.to_k.weight.double().T, \
        states.double() @ encoder.to_v.weight.double().T
    attended = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(16), dim=-1) @ v
    expected = latent.double() + attended.transpose(1, 2).reshape(2, 4, 8, 8)
    assert torch.allclose(encoder(latent, states).double(), expected, atol=1e-5)
    assert torch.equal(RNGREncoder(4, 12, width=16, seed=0).to_q.weight, RNGREncoder(4, 12, width=16, seed=0).to_q.weight)


def test_zero_projections_start_at_zero_per_site():
    zero = ZeroProjections({"input1.0.self": 8, "output11.0.self": 4})
    g = torch.Generator().manual_seed(5)
    out = zero({"input1.0.self": torch.randn(2, 3, 8, generator=g), "output11.0.self": torch.randn(2, 3, 4, generator=g),
                "middle0.0.self": torch.randn(2, 3, 4, generator=g)})
    assert set(out) == {"input1.0.self", "output11.0.self"}
    assert all(torch.equal(v, torch.zeros_like(v)) for v in out.values())
