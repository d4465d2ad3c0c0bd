"""The attention mechanism's pieces, host-free."""
import pytest
import torch
from support.controllers import PassThrough

from editkit.core.attention import (CROSS, SELF, AttentionCall, AttentionController, AttentionSite, BatchLayout,
                                    ControlSet, RunState, attention_probs, apply_probs, controlled_attention,
                                    sdpa_attention, sites_for_transformers, token_grid)


def _call(controllers=(), site=None, step=0, num_steps=10, grid=(4, 4), layout=None):
    site = site or AttentionSite(0, SELF, "input", 1, 0)
    return AttentionCall(site=site, heads=2, step=step, num_steps=num_steps, grid=grid,
                         layout=layout or BatchLayout(("cond", "uncond"), 2), run=RunState(controllers))


def _qkv(nk=16, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 16, 8, generator=g), torch.randn(batch, nk, 8, generator=g),
            torch.randn(batch, nk, 8, generator=g))


def test_batch_layout_rows():
    layout = BatchLayout(("cond", "uncond"), 3)
    assert layout.size == 6
    assert layout.rows("cond") == [0, 1, 2]
    assert layout.rows("uncond", item=1) == [4]
    assert layout.rows(item=2) == [2, 5]
    assert [layout.branch_of(r) for r in range(6)] == ["cond"] * 3 + ["uncond"] * 3
    assert BatchLayout.from_cond_or_uncond([1, 0], 4) == BatchLayout(("uncond", "cond"), 2)


def test_sites_are_in_execution_order_with_layers():
    sites = sites_for_transformers([("output", 3, 0), ("input", 1, 0), ("middle", 0, 0), ("input", 1, 1)])
    assert [(s.block, s.block_id, s.index, s.kind) for s in sites] == [
        ("input", 1, 0, SELF), ("input", 1, 0, CROSS), ("input", 1, 1, SELF), ("input", 1, 1, CROSS),
        ("middle", 0, 0, SELF), ("middle", 0, 0, CROSS), ("output", 3, 0, SELF), ("output", 3, 0, CROSS)]
    assert [s.layer for s in sites] == [0, 0, 1, 1, 2, 2, 3, 3]


def test_explicit_probabilities_match_fast_attention():
    q, k, v = _qkv()
    probs = attention_probs(q, k, heads=2)
    assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-6)
    assert torch.allclose(apply_probs(probs, v, heads=2), sdpa_attention(q, k, v, 2), atol=1e-5)


class _Recorder(PassThrough):
    """Records the shape of the probabilities it sees."""

    def new_run_state(self):
        return []

    def edit_probs(self, call, probs):
        call.state(self).append(probs.shape)
        return probs


def test_controlled_attention_uses_fast_path_unless_probs_are_needed():
    q, k, v = _qkv()
    calls = []

    def fast(q, k, v, heads):
        calls.append(heads)
        return sdpa_attention(q, k, v, heads)

    quiet = AttentionController()
    assert torch.equal(controlled_attention(_call([quiet]), q, k, v, [quiet], fast), sdpa_attention(q, k, v, 2))
    assert calls == [2]
    rec = _Recorder(probs=True)
    call = _call([rec])
    out = controlled_attention(call, q, k, v, [rec], fast)
    assert calls == [2]                     # fast kernel not used: probabilities were materialised
    assert call.state(rec) == [torch.Size([4, 2, 16, 16])]
    assert torch.allclose(out, sdpa_attention(q, k, v, 2), atol=1e-5)


class _Scale(AttentionController):
    def __init__(self, factor):
        self.factor = factor

    def acts_on(self, call):
        return True

    def edit_output(self, call, out):
        return out * self.factor


def test_controllers_compose_in_order_and_sets_are_immutable():
    q, k, v = _qkv()
    base = ControlSet()
    one = base.with_controller(_Scale(2.0))
    two = one.with_controller(_Scale(3.0))
    assert base.controllers == () and len(one.controllers) == 1 and len(two.controllers) == 2
    out = controlled_attention(_call(two.controllers), q, k, v, two.controllers, sdpa_attention)
    assert torch.allclose(out, 6.0 * sdpa_attention(q, k, v, 2), atol=1e-5)


def test_run_state_finishes_each_controller_once():
    finished = []

    class Closing(AttentionController):
        def new_run_state(self):
            return {"calls": 0}

        def end_run(self, state, success):
            finished.append((state["calls"], success))

    c = Closing()
    run = RunState([c])
    run.of(c)["calls"] += 1
    run.finish(True)
    assert finished == [(1, True)]


@pytest.mark.parametrize("tokens,latent,expected", [(64, (8, 8), (8, 8)), (16, (8, 8), (4, 4)), (1, (8, 8), (1, 1)),
                                                    (15, (5, 9), (3, 5)), (6, (12, 20), (2, 3))])
def test_token_grid(tokens, latent, expected):
    assert token_grid(tokens, latent) == expected


def test_token_grid_rejects_impossible_counts():
    with pytest.raises(ValueError):
        token_grid(7, (8, 8))


def test_step_windows_count_like_the_reference_code():
    """A fraction f of N steps covers steps 0 .. int(f * N) - 1 (Prompt-to-Prompt, Plug-and-Play)."""
    import torch
    from editkit.core.attention import AttentionCall, AttentionSite, BatchLayout, RunState
    def call(step, steps):
        return AttentionCall(AttentionSite(0, "self", "input", 1), 1, step, steps, (1, 1), BatchLayout(("cond",), 1),
                             RunState())
    assert [s for s in range(6) if call(s, 6).before(0.8)] == [0, 1, 2, 3]          # int(4.8) = 4
    assert [s for s in range(50) if call(s, 50).before(0.4)] == list(range(20))
    assert [s for s in range(100) if call(s, 100).before(0.29)] == list(range(28))  # int(28.999...) as the reference
    assert [s for s in range(7) if call(s, 7).within(0.2, 0.8, rows=8)] == [1, 2, 3, 4, 5]   # P2P's cross table


def test_a_layout_of_window_groups_pairs_rows_within_each_group():
    """cond/uncond chunks of 3 windows x (source, target): each window's rows are a group of the chunk."""
    from editkit.core.attention import BatchLayout
    layout = BatchLayout.from_cond_or_uncond([0, 1], 12, groups=3)
    assert (layout.items, layout.groups, layout.size) == (2, 3, 12)
    assert layout.rows("cond") == [0, 1, 2, 3, 4, 5] and layout.rows("uncond", item=1) == [7, 9, 11]
    assert layout.group_starts("uncond") == [6, 8, 10]
    assert [layout.branch_of(r) for r in (5, 6)] == ["cond", "uncond"] and layout.item_of(9) == 1
    assert BatchLayout.from_cond_or_uncond([0, 1], 12, groups=5).groups == 1   # not a whole number of windows
