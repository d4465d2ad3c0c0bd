"""core/syncdiffusion.py without a host: the schedule of synchronised steps, the gradient step against the
official loop's (tests/support/reference_fusion.py, same UNet, decoder and distance), and the correction that
lets a first-order sampler step from the shared latent land where each window's own step lands."""
import pytest
import torch

from editkit.core.syncdiffusion import SyncSettings, anchor_index, shift_correction, sync_shifts
from support import reference_fusion as ref
from support.reference_editing import cfg_eps
from support.tiny_models import make_diffusers_unet

GUIDANCE = 5.0


def test_paper_settings_synchronise_the_first_10_of_50_steps_with_a_decaying_weight():
    paper = SyncSettings()
    assert [s for s in range(50) if paper.active(s, 50)] == list(range(10))
    assert paper.weight_at(0) == 20.0 and paper.weight_at(3) == pytest.approx(20.0 * 0.95 ** 3)
    every_other = SyncSettings(every=2, until=0.5)
    assert [s for s in range(10) if every_other.active(s, 10)] == [1, 3]
    assert not any(SyncSettings(weight=0.0).active(s, 50) for s in range(50))
    assert anchor_index(range(4)) == 2 and anchor_index(range(5)) == 2


@pytest.mark.parametrize("sigma, sigma_next", [(14.6, 9.7), (2.0, 1.1), (0.5, 0.0)])
def test_the_correction_makes_a_shared_euler_step_land_on_the_windows_own_step(sigma, sigma_next):
    g = torch.Generator().manual_seed(0)
    x, denoised, shift = (torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))

    def euler(latent, prediction):
        return latent + (sigma_next - sigma) / sigma * (latent - prediction)
    own = euler(x - shift, denoised)
    shared = euler(x, denoised + shift_correction(sigma, sigma_next) * shift)
    torch.testing.assert_close(shared, own, rtol=1e-12, atol=1e-12)


class _Decoder(torch.nn.Module):
    """A fixed differentiable stand-in for the VAE decoder: 3x3 conv to RGB, 2x upsampling, sigmoid."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 3, 3, padding=1).double()
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=torch.Generator().manual_seed(7)) * 0.3)
            self.conv.bias.zero_()
        self.requires_grad_(False)

    def forward(self, z):
        return torch.sigmoid(torch.nn.functional.interpolate(self.conv(z), scale_factor=2.0, mode="nearest"))


def _distance(a, b):
    return ((a - b) ** 2).mean(dim=(1, 2, 3))


@pytest.mark.parametrize("batch", [1, 3])
def test_shifts_are_the_official_gradient_step_in_the_samplers_space(batch):
    """Step 0 of the official loop moves view v from x_t to x_t - w grad_{x_t} L; in the sampler's space
    x = x_t / sqrt(alpha) that is a shift of (x_t - x_t') / sqrt(alpha). Windows batched or one by one alike."""
    unet = make_diffusers_unet(seed=0, heads=2).double()
    g = torch.Generator().manual_seed(1)
    cond, uncond = (torch.randn(1, 77, 32, generator=g, dtype=torch.float64) for _ in range(2))
    x_t = torch.randn(1, 4, 16, 40, generator=g, dtype=torch.float64)
    timestep, alpha = 999, 0.0047
    decode = _Decoder()
    trace = []
    ref.syncdiffusion_reference(unet, decode, _distance, cond, uncond, x_t, [timestep], [alpha, 1.0], GUIDANCE,
                                window=16, stride=8, sync_weight=3.0, trace=trace)
    step, = trace
    sigma = ((1 - alpha) / alpha) ** 0.5

    def guided(indices, x):   # the guided x0 of windows stacked in x, from the sampler's x
        crops = x * alpha ** 0.5
        return ref.pred_x0(crops, cfg_eps(unet, crops, timestep, uncond.expand(len(indices), -1, -1),
                                          cond.expand(len(indices), -1, -1), GUIDANCE), alpha)

    crops = [before / alpha ** 0.5 for before in step["before"]]
    shifts = sync_shifts(guided, decode, _distance, crops, step["anchor"], 3.0, sigma, batch)
    assert shifts[step["anchor"]] is None
    for v, shift in enumerate(shifts):
        if shift is not None:
            expected = (step["before"][v] - step["after"][v]) / alpha ** 0.5
            torch.testing.assert_close(shift, expected, rtol=1e-9, atol=1e-9 * expected.abs().max().item())
