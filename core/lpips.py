"""LPIPS, the learned perceptual image distance, with the VGG16 backbone.

Zhang, Isola, Efros, Shechtman, Wang, "The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric", CVPR 2018. This module reproduces what the `lpips` package (github.com/richzhang/PerceptualSimilarity,
`lpips/lpips.py` and `lpips/pretrained_networks.py`) computes for `lpips.LPIPS(net='vgg')`, i.e. version 0.1
with its learned linear layers, in eval mode and without the `spatial` option:

1. Scale the [-1, 1] images channel-wise, x' = (x - shift) / scale, with the official ScalingLayer's constants
   shift = (-0.030, -0.088, -0.188), scale = (0.458, 0.448, 0.450): ImageNet's mean and std carried to [-1, 1].
2. Run torchvision's VGG16 `features` (3x3 convs with padding 1, ReLU, 2x2 max pools) and tap the outputs of
   relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 (torchvision `features` indices 3, 8, 15, 22, 29).
3. Normalise every tap to unit length over its channels at each pixel: f / (||f||_2 + 1e-10).
4. Square the difference of the two images' normalised taps, weight the channels with the layer's learned
   1x1 convolution (one output channel, no bias; the official dropout in front of it is inactive in eval mode,
   which is how the package builds it), and average over the pixels.
5. Sum the five layers.

The result is one distance per image pair, shape (batch,) (the package returns (batch, 1, 1, 1)).

Weights are never downloaded here: `tools/make_lpips_weights.py` builds the pack's file once, on the user's
machine, from torchvision's ImageNet VGG16 and the `lpips` package's `weights/v0.1/vgg.pth`.

Key layout of the pack's state dict (and of `models/lpips/vgg_lpips.safetensors`), 31 tensors:

    vgg.<i>.weight  (C_out, C_in, 3, 3)  and  vgg.<i>.bias (C_out,)
        for i in 0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28: the 13 convolutions, numbered as in
        torchvision's `vgg16().features` (its keys `features.<i>.weight` / `features.<i>.bias`);
    lin.<k>.weight  (1, C_k, 1, 1)  for k = 0..4, C_k = 64, 128, 256, 512, 512: the learned weights of
        tap k (the package's `lin<k>.model.1.weight`).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

# The official ScalingLayer (lpips/lpips.py): (x - shift) / scale per RGB channel.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
# The official normalize_tensor's epsilon (lpips/__init__.py), added to the channel norm.
NORM_EPS = 1e-10

# torchvision VGG16 ("D" configuration) convolutions: (features index, in channels, out channels).
VGG16_CONVS = (
    (0, 3, 64), (2, 64, 64),
    (5, 64, 128), (7, 128, 128),
    (10, 128, 256), (12, 256, 256), (14, 256, 256),
    (17, 256, 512), (19, 512, 512), (21, 512, 512),
    (24, 512, 512), (26, 512, 512), (28, 512, 512),
)
# The five tapped stages (official slices features[0:4], [4:9], [9:16], [16:23], [23:30]): every stage but the
# first starts with a 2x2 max pool, then runs its convolutions, each followed by a ReLU; the tap is the last ReLU.
STAGES = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))
TAP_CHANNELS = (64, 128, 256, 512, 512)
# Four pools come before relu5_3, so smaller images leave that tap empty.
MIN_SIZE = 16


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Every key of the pack's layout with its shape."""
    shapes = {}
    for index, c_in, c_out in VGG16_CONVS:
        shapes[f"vgg.{index}.weight"] = (c_out, c_in, 3, 3)
        shapes[f"vgg.{index}.bias"] = (c_out,)
    for k, channels in enumerate(TAP_CHANNELS):
        shapes[f"lin.{k}.weight"] = (1, channels, 1, 1)
    return shapes


def _summarise(keys, limit: int = 6) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def state_problems(state: dict) -> list[str]:
    """What keeps `state` from being a VGG LPIPS state dict in the pack's layout (empty when nothing)."""
    expected = expected_shapes()
    problems = []
    missing = expected.keys() - state.keys()
    unexpected = state.keys() - expected.keys()
    if missing:
        problems.append(f"missing keys {_summarise(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_summarise(unexpected)}")
    for key in sorted(expected.keys() & state.keys()):
        value = state[key]
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            problems.append(f"{key} is not a floating-point tensor")
        elif tuple(value.shape) != expected[key]:
            problems.append(f"{key} has shape {tuple(value.shape)}, expected {expected[key]}")
    return problems


def _unit_normalise(features: torch.Tensor) -> torch.Tensor:
    """The official normalize_tensor: divide each pixel's channel vector by its L2 norm plus 1e-10.

    Done in at least float32: in float16 the sum of squares over 512 channels overflows once activations
    reach ~11, and 1e-10 rounds to 0, which would turn an all-zero pixel into 0/0.
    """
    features = features.to(torch.promote_types(features.dtype, torch.float32))
    norm = features.pow(2).sum(dim=1, keepdim=True).sqrt()
    return features / (norm + NORM_EPS)


class LPIPS(nn.Module):
    """LPIPS distance with the VGG16 backbone (version 0.1, learned linear layers); see the module docstring.

    `forward(a, b)` takes two batches of RGB images in [-1, 1], shape (batch, 3, H, W) with H, W >= 16, and
    returns their distances, shape (batch,), in the module's dtype. The images are cast to the module's dtype
    and device, so a float32 module accepts half-precision images and a `.half()` / `.to(torch.bfloat16)`
    module runs the network in that precision. The weights are frozen (a metric, as the package's trunk is)
    but the distance is differentiable w.r.t. both images.

    A fresh `LPIPS()` has PyTorch's default random initialisation; use `from_state_dict`, `load_lpips` or
    `random_lpips` to get defined weights.
    """

    def __init__(self):
        super().__init__()
        # ModuleDict keyed by the torchvision index, so the state dict reads vgg.<index>.weight / .bias
        self.vgg = nn.ModuleDict({str(index): nn.Conv2d(c_in, c_out, kernel_size=3, padding=1)
                                  for index, c_in, c_out in VGG16_CONVS})
        self.lin = nn.ModuleList(nn.Conv2d(channels, 1, kernel_size=1, bias=False) for channels in TAP_CHANNELS)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_state_dict(cls, state: dict) -> "LPIPS":
        """An LPIPS holding `state` (pack's layout, see the module docstring); float32 on the CPU."""
        problems = state_problems(state)
        if problems:
            raise ValueError("not a VGG LPIPS state dict in this pack's layout: " + "; ".join(problems))
        # Built on the meta device so the default initialisation (about 15M weights) is not computed for nothing
        with torch.device("meta"):
            model = cls()
        model.to_empty(device="cpu")
        model.load_state_dict(state)
        return model

    def _scale(self, images: torch.Tensor) -> torch.Tensor:
        reference = self.lin[0].weight
        images = images.to(device=reference.device, dtype=reference.dtype)
        shift = torch.tensor(SHIFT, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        scale = torch.tensor(SCALE, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        return (images - shift) / scale

    def vgg_taps(self, scaled: torch.Tensor) -> list[torch.Tensor]:
        """relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of VGG16 for already scaled images."""
        taps = []
        x = scaled
        for stage, conv_indices in enumerate(STAGES):
            if stage > 0:
                x = F.max_pool2d(x, kernel_size=2, stride=2)
            for index in conv_indices:
                x = F.relu(self.vgg[str(index)](x))
            taps.append(x)
        return taps

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape != b.shape:
            raise ValueError(f"LPIPS compares images of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
        if a.dim() != 4 or a.shape[1] != 3:
            raise ValueError(f"LPIPS expects RGB images shaped (batch, 3, H, W), got {tuple(a.shape)}")
        if min(a.shape[2:]) < MIN_SIZE:
            raise ValueError(f"LPIPS (VGG) needs images of at least {MIN_SIZE}x{MIN_SIZE}, got {tuple(a.shape[2:])}")
        batch = a.shape[0]
        # Both images go through VGG as one batch: the same result, half the calls
        taps = self.vgg_taps(self._scale(torch.cat([a, b])))
        distance = 0
        for lin, tap in zip(self.lin, taps):
            normalised = _unit_normalise(tap)
            squared_difference = (normalised[:batch] - normalised[batch:]) ** 2
            weighted = F.conv2d(squared_difference, lin.weight.to(squared_difference.dtype))
            distance = distance + weighted.mean(dim=(1, 2, 3))
        return distance.to(self.lin[0].weight.dtype)


def convert_official(vgg_features_state: dict, lin_state: dict) -> dict:
    """The pack's state dict from the official weights.

    vgg_features_state: torchvision's VGG16 state dict (keys `features.<i>.weight` / `.bias`, as in
        `vgg16-397923af.pth` or `torchvision.models.vgg16(weights=...).state_dict()`; its `classifier.*`
        keys are ignored);
    lin_state: the `lpips` package's `weights/v0.1/vgg.pth` (keys `lin0.model.1.weight` ... `lin4.model.1.weight`).
    Raises ValueError naming what is missing or mis-shaped.
    """
    sources = {}
    for index, _, _ in VGG16_CONVS:
        for kind in ("weight", "bias"):
            sources[f"vgg.{index}.{kind}"] = (vgg_features_state, f"features.{index}.{kind}")
    for k in range(len(TAP_CHANNELS)):
        sources[f"lin.{k}.weight"] = (lin_state, f"lin{k}.model.1.weight")

    missing_vgg = [name for source, name in sources.values() if source is vgg_features_state and name not in source]
    missing_lin = [name for source, name in sources.values() if source is lin_state and name not in source]
    if missing_vgg or missing_lin:
        parts = []
        if missing_vgg:
            parts.append(f"torchvision VGG16 state dict lacks {_summarise(missing_vgg)}")
        if missing_lin:
            parts.append(f"lpips v0.1 vgg.pth state dict lacks {_summarise(missing_lin)}")
        raise ValueError("cannot convert the official LPIPS weights: " + "; ".join(parts))

    state = {key: source[name].detach().clone() for key, (source, name) in sources.items()}
    problems = state_problems(state)
    if problems:
        raise ValueError("the official weights do not have VGG16 LPIPS shapes: " + "; ".join(problems))
    return state


def load_lpips(path) -> LPIPS:
    """Load the pack's `.safetensors` LPIPS file (see tools/make_lpips_weights.py for how to make it)."""
    from .files import read_safetensors

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no LPIPS weights at {path}; create them with tools/make_lpips_weights.py")
    _, state = read_safetensors(path, "lpips")
    problems = state_problems(state)
    if problems:
        raise ValueError(f"{path} is not a VGG LPIPS weights file in this pack's layout (expected the 31 tensors "
                         f"vgg.<i>.weight/bias and lin.0-4.weight written by tools/make_lpips_weights.py): "
                         + "; ".join(problems))
    return LPIPS.from_state_dict(state)


def random_lpips(seed: int) -> LPIPS:
    """A deterministic random-weight LPIPS for tests: every tensor drawn from a torch.Generator seeded `seed`.

    Convolutions get He-normal weights (activations keep their scale through the 13 layers) and small biases;
    the linear weights are drawn from [0, 1), non-negative like the official ones, so distances are >= 0.
    """
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in expected_shapes().items():
        if key.startswith("lin."):
            state[key] = torch.rand(shape, generator=generator)
        elif key.endswith(".weight"):
            fan_in = shape[1] * shape[2] * shape[3]
            state[key] = torch.randn(shape, generator=generator) * (2.0 / fan_in) ** 0.5
        else:
            state[key] = torch.randn(shape, generator=generator) * 0.01
    return LPIPS.from_state_dict(state)
