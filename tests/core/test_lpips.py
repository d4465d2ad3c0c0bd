"""LPIPS (VGG16) against a plain float64 reference of the formula, on random weights: nothing is downloaded."""
import pytest
import torch
import torch.nn.functional as F

from editkit.core.lpips import LPIPS, convert_official, load_lpips, random_lpips

# torchvision's VGG16 "D" configuration, walked layer by layer below to find the features indices
VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
TAPPED_RELUS = {3, 8, 15, 22, 29}   # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in vgg16().features


def reference_lpips(state, a, b):
    """LPIPS v0.1 (VGG) written out from the paper and the official package, in float64."""
    state = {key: value.double() for key, value in state.items()}
    shift = torch.tensor([-0.030, -0.088, -0.188], dtype=torch.float64).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450], dtype=torch.float64).view(1, 3, 1, 1)

    def taps(x):
        out, index = [], 0
        for layer in VGG16_CFG[:-1]:   # the last pool comes after relu5_3, so nothing uses it
            if layer == "M":
                x = F.max_pool2d(x, kernel_size=2, stride=2)
                index += 1
                continue
            x = F.conv2d(x, state[f"vgg.{index}.weight"], state[f"vgg.{index}.bias"], padding=1)
            x = F.relu(x)
            if index + 1 in TAPPED_RELUS:
                out.append(x)
            index += 2
        return out

    total = torch.zeros(a.shape[0], dtype=torch.float64)
    for k, (fa, fb) in enumerate(zip(taps((a - shift) / scale), taps((b - shift) / scale))):
        na = fa / (fa.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
        nb = fb / (fb.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
        w = state[f"lin.{k}.weight"].view(1, -1, 1, 1)
        total += ((na - nb) ** 2 * w).sum(dim=1).mean(dim=(1, 2))
    return total


def images(seed, batch=2, size=(16, 24), dtype=torch.float64):
    # small: four pools take 16x24 down to a 1x1 relu5_3, and float64 convolutions are slow on a CPU
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, *size, generator=g, dtype=dtype) * 2 - 1


@pytest.fixture(scope="module")
def state():
    """random_lpips(0)'s weights, drawn once (a fresh module per test is cheap to build from them)."""
    return random_lpips(0).state_dict()


def official_keyed(state):
    """The same tensors under torchvision's and the lpips package's key names (plus keys to be ignored)."""
    torchvision_state = {key.replace("vgg.", "features."): value for key, value in state.items()
                         if key.startswith("vgg.")}
    torchvision_state["classifier.0.weight"] = torch.zeros(4, 4)
    lin_state = {f"lin{key.split('.')[1]}.model.1.weight": value for key, value in state.items()
                 if key.startswith("lin.")}
    return torchvision_state, lin_state


def test_matches_float64_reference(state):
    model = LPIPS.from_state_dict(state).double()
    a, b = images(1), images(2)
    expected = reference_lpips(model.state_dict(), a, b)
    got = model(a, b)
    assert got.shape == (2,)
    assert got.dtype == torch.float64
    assert (expected > 0.1).all()   # a real, non-degenerate distance
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def test_random_lpips_is_deterministic_per_seed(state):
    again, other = random_lpips(0).state_dict(), random_lpips(1).state_dict()
    assert len(state) == 31
    assert all(torch.equal(state[key], again[key]) for key in state)
    assert not torch.equal(state["vgg.0.weight"], other["vgg.0.weight"])


def test_identity_symmetry_and_batch_independence(state):
    model = LPIPS.from_state_dict(state).double()
    a, b = images(5, batch=3), images(6, batch=3)
    assert torch.equal(model(a, a), torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(model(a, b), model(b, a), rtol=0, atol=1e-12)
    torch.testing.assert_close(model(a[1:2], b[1:2]), model(a, b)[1:2], rtol=0, atol=1e-12)


def test_gradients_reach_both_inputs_and_match_reference(state):
    model = LPIPS.from_state_dict(state).double()
    a, b = images(7).requires_grad_(), images(8).requires_grad_()
    grad_a, grad_b = torch.autograd.grad(model(a, b).sum(), (a, b))
    expected_a, expected_b = torch.autograd.grad(reference_lpips(state, a, b).sum(), (a, b))
    assert grad_a.abs().sum() > 0 and grad_b.abs().sum() > 0
    torch.testing.assert_close(grad_a, expected_a, rtol=0, atol=1e-10)
    torch.testing.assert_close(grad_b, expected_b, rtol=0, atol=1e-10)
    assert all(not p.requires_grad for p in model.parameters())   # a fixed metric: only the images get gradients


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(state, dtype):
    model = LPIPS.from_state_dict(state)
    a = images(9, batch=1, size=(16, 16), dtype=torch.float32)
    b = images(10, batch=1, size=(16, 16), dtype=torch.float32)
    full = model(a, b)
    # half-precision images into a float32 module are computed in float32
    mixed = model(a.to(dtype), b.to(dtype))
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, model(a.to(dtype).float(), b.to(dtype).float()))
    # a half-precision module computes (and answers) in its dtype, close to float32
    half = model.to(dtype)(a, b)
    assert half.dtype == dtype and torch.isfinite(half).all()
    torch.testing.assert_close(half.float(), full, rtol=3e-2, atol=0)


def test_rejects_bad_images(state):
    model = LPIPS.from_state_dict(state)
    with pytest.raises(ValueError, match="same shape"):
        model(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 16))
    with pytest.raises(ValueError, match="RGB"):
        model(torch.zeros(1, 4, 32, 32), torch.zeros(1, 4, 32, 32))
    with pytest.raises(ValueError, match="at least 16"):
        model(torch.zeros(1, 3, 8, 32), torch.zeros(1, 3, 8, 32))


def test_convert_official_maps_keys_and_distances(state):
    source = LPIPS.from_state_dict(state)
    torchvision_state, lin_state = official_keyed(state)
    converted = convert_official(torchvision_state, lin_state)
    assert converted.keys() == state.keys()
    assert all(torch.equal(converted[key], state[key]) for key in state)
    a, b = images(12, dtype=torch.float32), images(13, dtype=torch.float32)
    assert torch.equal(LPIPS.from_state_dict(converted)(a, b), source(a, b))


def test_convert_official_names_missing_keys(state):
    torchvision_state, lin_state = official_keyed(state)
    del torchvision_state["features.14.bias"]
    with pytest.raises(ValueError, match=r"features\.14\.bias"):
        convert_official(torchvision_state, lin_state)
    torchvision_state, lin_state = official_keyed(state)
    del lin_state["lin3.model.1.weight"]
    with pytest.raises(ValueError, match=r"lin3\.model\.1\.weight"):
        convert_official(torchvision_state, lin_state)
    # an AlexNet-shaped first layer is not VGG16
    torchvision_state, lin_state = official_keyed(state)
    torchvision_state["features.0.weight"] = torch.zeros(64, 3, 11, 11)
    with pytest.raises(ValueError, match=r"vgg\.0\.weight has shape"):
        convert_official(torchvision_state, lin_state)


def test_load_lpips_round_trip(state, tmp_path):
    from safetensors.torch import save_file

    source = LPIPS.from_state_dict(state)
    path = tmp_path / "vgg_lpips.safetensors"
    save_file(source.state_dict(), str(path))
    loaded = load_lpips(path)
    assert isinstance(loaded, LPIPS) and not loaded.training
    a, b = images(22, dtype=torch.float32), images(23, dtype=torch.float32)
    assert torch.equal(loaded(a, b), source(a, b))


def test_load_lpips_refuses_other_files(state, tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    other = tmp_path / "some_vae.safetensors"
    save_file({"encoder.conv_in.weight": torch.randn(8, 3, 3, 3, generator=g),
               "decoder.conv_out.bias": torch.randn(3, generator=g)}, str(other))
    with pytest.raises(ValueError, match=r"some_vae\.safetensors.*missing keys.*unexpected keys"):
        load_lpips(other)

    wrong_shape = tmp_path / "alex_like.safetensors"
    save_file({**state, "lin.4.weight": torch.zeros(1, 256, 1, 1)}, str(wrong_shape))
    with pytest.raises(ValueError, match=r"alex_like\.safetensors.*lin\.4\.weight has shape \(1, 256, 1, 1\)"):
        load_lpips(wrong_shape)

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match=r"garbage\.safetensors"):
        load_lpips(garbage)

    with pytest.raises(FileNotFoundError, match="make_lpips_weights"):
        load_lpips(tmp_path / "absent.safetensors")


def test_matches_installed_lpips_package():
    """Against the official implementation when it is installed (its VGG trunk random, so nothing downloads)."""
    lpips = pytest.importorskip("lpips")
    torch.manual_seed(0)
    official = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
    torchvision_state = {f"features.{name.split('.', 1)[1]}": value
                         for name, value in official.net.state_dict().items()}   # slice<n>.<index>.<kind>
    lin_state = {name: value for name, value in official.state_dict().items() if name.startswith("lin")}
    ours = LPIPS.from_state_dict(convert_official(torchvision_state, lin_state))
    a, b = images(31, dtype=torch.float32), images(32, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(ours(a, b), official(a, b).flatten(), rtol=1e-5, atol=1e-7)
