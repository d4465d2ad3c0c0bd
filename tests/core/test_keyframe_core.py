"""core/keyframe.py without a host: which frames each frame reads, and the gathered keys and values per CFG
chunk and window."""
import pytest
import torch

from editkit.core.attention import SELF, AttentionCall, AttentionSite, BatchLayout, RunState
from editkit.core.keyframe import KeyframeAttention, keyframes


def test_keyframes_of_each_method():
    assert keyframes("first", 3) == [[0], [0], [0]]
    assert keyframes("first_and_previous", 4) == [[0, 0], [0, 0], [0, 1], [0, 2]]
    assert keyframes("middle", 5) == [[2]] * 5
    assert keyframes("all", 2) == [[0, 1], [0, 1]]
    assert keyframes("indices", 6, (0, 4)) == [[0, 4]] * 6


def test_bad_keyframes_are_named():
    with pytest.raises(ValueError, match="indices: keyframe 6 is outside the batch of 6 frames"):
        keyframes("indices", 6, (0, 6))
    with pytest.raises(ValueError, match="first_and_previous .* needs a batch of at least 2 frames"):
        keyframes("first_and_previous", 1)
    with pytest.raises(ValueError, match="mode: 'last' is not one of"):
        KeyframeAttention(mode="last")


def _call(layout, step=0, layer=3):
    return AttentionCall(site=AttentionSite(layer, SELF, "output", 3, 0), heads=2, step=step, num_steps=10,
                         grid=(2, 2), layout=layout, run=RunState([]))


@pytest.mark.parametrize("mode", ["first", "first_and_previous", "middle", "all"])
def test_each_row_reads_its_keyframes_of_its_own_chunk_and_window(mode):
    layout = BatchLayout(("cond", "uncond"), items=3, groups=2)     # 2 windows x 3 frames per CFG chunk
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(layout.size, 4, 8, generator=g) for _ in range(3))
    controller = KeyframeAttention(mode=mode)
    assert controller.acts_on(_call(layout))
    q2, k2, v2 = controller.edit_qkv(_call(layout), q, k, v)
    assert torch.equal(q2, q)
    table = keyframes(mode, 3)
    for row in range(layout.size):
        first = row - layout.item_of(row)                            # the row's group start
        expected = [first + f for f in table[layout.item_of(row)]]
        assert torch.equal(k2[row], torch.cat([k[r] for r in expected]))
        assert torch.equal(v2[row], torch.cat([v[r] for r in expected]))


def test_layers_steps_and_a_single_frame_leave_attention_alone():
    layout = BatchLayout(("cond",), items=3)
    controller = KeyframeAttention(mode="first", layers=(3,), start=0.2, end=0.5)
    assert not controller.acts_on(_call(layout, step=1))             # before int(0.2 * 10)
    assert controller.acts_on(_call(layout, step=2)) and controller.acts_on(_call(layout, step=4))
    assert not controller.acts_on(_call(layout, step=5))
    assert not controller.acts_on(_call(layout, step=3, layer=4))
    assert not controller.wants_site(AttentionSite(3, "cross", "output", 3, 0))
    assert not KeyframeAttention(mode="all").acts_on(_call(BatchLayout(("cond", "uncond"), items=1)))


def test_frame_windows_hold_the_keyframes_their_frames_read():
    from editkit.core.keyframe import frame_windows
    assert frame_windows("first", 7, 3) == [([0, 1, 2], 0), ([0, 3, 4, 5], 1), ([0, 6], 1)]
    assert frame_windows("first_and_previous", 6, 2) == [([0, 1], 0), ([0, 1, 2, 3], 2), ([0, 3, 4, 5], 2)]
    assert frame_windows("middle", 6, 4) == [([0, 1, 2, 3], 0), ([3, 4, 5], 1)]
    assert frame_windows("indices", 5, 2, (4,)) == [([4, 0, 1], 1), ([4, 2, 3], 1), ([4], 0)]
    assert frame_windows("first", 4, 0) == frame_windows("first", 4, 9) == [([0, 1, 2, 3], 0)]
    with pytest.raises(ValueError, match="frame_window: mode all reads every frame"):
        frame_windows("all", 4, 2)


def test_in_a_frame_window_items_read_the_keyframes_of_the_whole_batch():
    from editkit.core.attention import FrameWindow
    controller = KeyframeAttention(mode="first_and_previous")
    layout = BatchLayout(("cond",), items=4)
    call = _call(layout)
    call.frames = FrameWindow((0, 3, 4, 5), total=6)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(4, 4, 8, generator=g) for _ in range(3))
    _, k2, _ = controller.edit_qkv(call, q, k, v)
    # frame 4 (item 2) reads frames 0 and 3 (items 0 and 1); frame 5 (item 3) frames 0 and 4 (items 0 and 2);
    # the borrowed frame 3 would read frame 2, which the window lacks: it reads itself there
    assert torch.equal(k2[2], torch.cat([k[0], k[1]])) and torch.equal(k2[3], torch.cat([k[0], k[2]]))
    assert torch.equal(k2[1], torch.cat([k[0], k[1]]))


@pytest.mark.parametrize("sigma, sigma_next", [(14.6, 9.7), (1.2, 0.8)])
def test_the_previous_frame_pull_moves_the_next_latents_as_pix2video_does(sigma, sigma_next):
    """An Euler step with the changed predictions lands on the official update in alpha space:
    x_{t-1} - weight * grad_{x0} MSE(x0_prev, x0), frame 0 untouched."""
    from editkit.core.keyframe import previous_frame_pull
    g = torch.Generator().manual_seed(2)
    x, denoised = (torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))

    def euler(d):
        return x + (sigma_next - sigma) / sigma * (x - d)
    moved = euler(denoised + previous_frame_pull(denoised, 100.0, sigma, sigma_next))
    sqrt_a_next = (1.0 + sigma_next ** 2) ** -0.5
    expected = euler(denoised) * sqrt_a_next                                  # the plain next latent, alpha space
    for i in (1, 2):
        x0 = denoised[i].clone().requires_grad_(True)
        loss = 100.0 * torch.nn.functional.mse_loss(x0, denoised[i - 1])
        expected[i] = expected[i] - torch.autograd.grad(loss, x0)[0]
    torch.testing.assert_close(moved * sqrt_a_next, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(previous_frame_pull(denoised, 100.0, sigma, 0.0), torch.zeros_like(denoised))
