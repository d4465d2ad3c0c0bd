"""P3S training and conditioning inside ComfyUI on the tiny model: a fresh adapter is the identity, training lowers
the loss and touches only the adapter, a saved adapter loads back to the same outputs, and bad files are refused."""
import json
import os
import re

import pytest
import torch

from support.comfy_host import encode

STEPS = 3
SIZE = 128  # references and samples of 128 px: 16x16 latents (the lowest level 2x2, which GroupNorm needs under autograd)


def _references(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.full((n, SIZE, SIZE, 3), 0.5)
    for i in range(n):   # a bright square at its own place on each
        y, x = (int(v) for v in torch.randint(0, SIZE - 40, (2,), generator=g))
        images[i, y:y + 40, x:x + 40] = torch.rand(3, generator=g)
    return images


@pytest.fixture(scope="module", autouse=True)
def p3s_folder(host, tmp_path_factory):
    """models/p3s in a temporary folder: the tests never write into the ComfyUI tree."""
    import folder_paths
    from editkit.nodes.p3s_adapter import FOLDER, register_folder
    register_folder()
    saved = folder_paths.folder_names_and_paths[FOLDER]
    folder = tmp_path_factory.mktemp("p3s")
    folder_paths.folder_names_and_paths[FOLDER] = ([str(folder)], {".safetensors"})
    yield folder
    folder_paths.folder_names_and_paths[FOLDER] = saved


@pytest.fixture(scope="module")
def clip_vision(host):
    from support.tiny_models import make_comfy_clip_vision
    return make_comfy_clip_vision(seed=0)


def _fresh(model, vae, clip_vision, seed=0):
    from editkit.nodes.p3s_adapter import P3SAdapter
    from editkit.nodes.p3s_nodes import _encode_references
    latents, states = _encode_references(vae, clip_vision, _references(), model)
    return P3SAdapter.fresh(model, latents, states, seed)


def _sample(model, clip, seed=0, prompt="a photo of sks dog"):
    import comfy.sample
    noise = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(seed))
    return comfy.sample.sample(model, noise, STEPS, 5.0, "euler", "normal", encode(clip, prompt), encode(clip, ""),
                               torch.zeros_like(noise), disable_pbar=True, seed=seed)


def _condition(model, adapter, reference=0, **settings):
    from editkit.nodes.p3s_nodes import P3SConditioner
    values = {"alpha": 0.5, "beta": 0.2, "k": 2.0, "lam": 0.2, **settings}
    return P3SConditioner.execute(model, adapter, reference, values["alpha"], values["beta"], values["k"],
                                  values["lam"]).result[0]


def _perturb(adapter, seed=1, scale=0.05):
    """Non-zero zero projections and RNGR convolution, as training would leave them."""
    g = torch.Generator().manual_seed(seed)
    with torch.inference_mode(False), torch.no_grad():
        for p in list(adapter.zero.parameters()) + list(adapter.rngr.zero.parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def test_a_fresh_adapter_is_the_identity(tiny, clip_vision):
    model, clip, vae = tiny
    adapter = _fresh(model, vae, clip_vision)
    assert torch.equal(_sample(_condition(model, adapter), clip), _sample(model, clip))


def test_a_trained_adapter_changes_the_samples_by_its_reference_and_weights(tiny, clip_vision):
    model, clip, vae = tiny
    adapter = _fresh(model, vae, clip_vision)
    _perturb(adapter)
    plain = _sample(model, clip)
    first = _sample(_condition(model, adapter, 0), clip)
    assert torch.isfinite(first).all() and not torch.allclose(first, plain, atol=1e-4)
    assert not torch.allclose(_sample(_condition(model, adapter, 1), clip), first, atol=1e-5)
    assert not torch.allclose(_sample(_condition(model, adapter, 0, beta=1.0), clip), first, atol=1e-5)


def _train(model, clip, adapter, steps_per_image=4, lr=1e-3, gamma=0.1, seed=0):
    from editkit.nodes.p3s_adapter import train
    return train(model, adapter, encode(clip, "a photo of sks dog")[0][0], encode(clip, "")[0][0],
                 steps_per_image, lr, 0.2, gamma, 0.1, seed)


def _fixed_loss(model, clip, adapter, seed=5):
    """The denoising loss of the conditioned model on fixed timesteps and noise (no dropout)."""
    from editkit.nodes.p3s_adapter import conditioned_model, evaluation_options
    from editkit.nodes.comfy_attention import CONTROLS_KEY
    from editkit.core.attention import RunState
    patched, wrapper, _ = conditioned_model(model, adapter)
    options = patched.model_options["transformer_options"]
    inner = model.model
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    context = encode(clip, "a photo of sks dog")[0][0]
    with torch.no_grad():
        for ref in range(adapter.references):
            wrapper.reference = ref
            x0 = adapter.latents[ref:ref + 1]
            for t in (200, 500, 800):
                noise = torch.randn(x0.shape, generator=g)
                sigma = inner.model_sampling.sigma(torch.tensor([float(t)]))
                x = inner.model_sampling.noise_scaling(sigma, noise, x0)
                run = RunState(options[CONTROLS_KEY].controllers)
                denoised = inner.apply_model(x, sigma, c_crossattn=context,
                                             transformer_options=evaluation_options(patched, run))
                total += float(((x - denoised) / sigma - noise).pow(2).mean())
    return total


def test_training_lowers_the_loss_and_touches_only_the_adapter(tiny, clip_vision):
    model, clip, vae = tiny
    frozen = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    adapter = _fresh(model, vae, clip_vision)
    before = _fixed_loss(model, clip, adapter)
    initial = {k: v.clone() for k, v in adapter.state_dict().items()}
    losses = _train(model, clip, adapter, steps_per_image=8)
    assert len(losses) == 8 * adapter.references and all(torch.isfinite(torch.tensor(losses)))
    after = _fixed_loss(model, clip, adapter)
    assert after < before, f"the loss on fixed noise went from {before:.4f} to {after:.4f}"
    for k, v in model.model.diffusion_model.state_dict().items():
        assert torch.equal(v, frozen[k]), f"the frozen UNet's {k} changed"
    trained = adapter.state_dict()
    moved = {k.split(".")[0] for k in trained if not torch.equal(trained[k], initial[k])}
    assert moved == {"copy", "zero", "rngr"}
    assert torch.equal(trained["reference.latents"], initial["reference.latents"])


def test_only_the_adapter_receives_gradients(tiny, clip_vision):
    model, clip, vae = tiny
    adapter = _fresh(model, vae, clip_vision)
    _perturb(adapter)
    seen = {}

    def spy(step, steps, loss):
        seen["copy"] = [p.grad is not None for p in adapter.copy.parameters()]
        seen["zero"] = [p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.zero.parameters()]
        seen["frozen"] = [p.grad is not None for p in model.model.diffusion_model.parameters()]

    from editkit.nodes.p3s_adapter import train
    train(model, adapter, encode(clip, "a photo of sks dog")[0][0], encode(clip, "")[0][0], 1, 1e-4, 0.2, 0.1, 0.0,
          0, spy)
    assert any(seen["copy"]) and all(seen["zero"]) and not any(seen["frozen"])


def test_a_saved_adapter_loads_back_to_the_same_outputs(tiny, clip_vision, tmp_path):
    from editkit.nodes.p3s_adapter import P3SAdapter
    model, clip, vae = tiny
    adapter = _fresh(model, vae, clip_vision)
    _train(model, clip, adapter, steps_per_image=2, lr=1e-3)
    path = str(tmp_path / "subject.safetensors")
    adapter.save(path)
    assert os.listdir(tmp_path) == ["subject.safetensors"]
    loaded = P3SAdapter.load(path, model)
    assert torch.equal(_sample(_condition(model, loaded, 1), clip), _sample(_condition(model, adapter, 1), clip))


def test_bad_files_are_refused(tiny, clip_vision, tmp_path):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    from editkit.nodes.p3s_adapter import P3SAdapter
    model, clip, vae = tiny
    other = str(tmp_path / "other.safetensors")
    save_file({"weight": torch.zeros(2)}, other, metadata={"format": "something"})
    with pytest.raises(ValueError, match="'other.safetensors' is not a P3S adapter"):
        P3SAdapter.load(other, model)
    adapter = _fresh(model, vae, clip_vision)
    path = str(tmp_path / "subject.safetensors")
    adapter.save(path)
    with safe_open(path, framework="pt") as f:
        meta = dict(f.metadata())
    layout = json.loads(meta["layout"])
    layout["context_dim"] = 768
    meta["layout"] = json.dumps(layout)
    moved = str(tmp_path / "sd15.safetensors")
    save_file(load_file(path), moved, metadata=meta)
    with pytest.raises(ValueError, match="trained for another UNet layout"):
        P3SAdapter.load(moved, model)
    with pytest.raises(ValueError, match="reference: 3 is not one of the adapter's 3"):
        _condition(model, adapter, 3)
    saved = open(path, "rb").read()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(saved[:len(saved) // 2])
    with pytest.raises(ValueError, match="p3s_adapter: 'cut.safetensors' is damaged or not a .safetensors file"):
        P3SAdapter.load(str(cut), model)


def test_a_second_conditioner_on_the_same_model_is_refused(tiny, clip_vision):
    from editkit.nodes.p3s_nodes import P3SConditioner
    model, clip, vae = tiny
    adapter = _fresh(model, vae, clip_vision)
    once = P3SConditioner.execute(model, adapter, 0, 0.5, 0.2, 2.0, 0.2).result[0]
    with pytest.raises(ValueError, match="model: a P3S adapter is already on this model"):
        P3SConditioner.execute(once, adapter, 0, 0.5, 0.2, 2.0, 0.2)


def test_the_train_node_saves_its_adapter_and_draws_the_loss(tiny, clip_vision, host, p3s_folder):
    import folder_paths
    from editkit.nodes.p3s_nodes import LoadP3SAdapter, P3STrain
    model, clip, vae = tiny
    out = P3STrain.execute(model, clip, vae, clip_vision, _references(), "a photo of sks dog", "tiny_subject", 2,
                           1e-4, 0.1, 0.1, 0.2, 0).result
    adapter, curve = out
    assert curve.shape[0] == 1 and curve.shape[-1] == 3
    assert len(adapter.metadata["losses"]) == 6
    assert "tiny_subject.safetensors" in folder_paths.get_filename_list("p3s")
    assert (p3s_folder / "tiny_subject.safetensors").is_file()
    loaded = LoadP3SAdapter.execute(model, "tiny_subject.safetensors").result[0]
    assert torch.equal(loaded.state_dict()["zero.maps.output11_0_self.weight"],
                       adapter.state_dict()["zero.maps.output11_0_self.weight"])
    train = lambda images, name, **kw: P3STrain.execute(model, clip, vae, clip_vision, images,   # noqa: E731
                                                        "a photo of sks dog", name, 1, 1e-4, 0.1, 0.1, 0.2, 0, **kw)
    for bad in ("../x", "my subject.safetensors", "sks.dog"):
        with pytest.raises(ValueError, match=f"name: '{re.escape(bad)}' is not an adapter name; use letters"):
            train(_references(), bad)
    before = (p3s_folder / "tiny_subject.safetensors").read_bytes()
    with pytest.raises(ValueError, match="name: models/p3s already holds 'tiny_subject.safetensors'.*overwrite"):
        train(_references(), "tiny_subject.safetensors")
    assert (p3s_folder / "tiny_subject.safetensors").read_bytes() == before
    train(_references(), "tiny_subject", overwrite=True)
    assert (p3s_folder / "tiny_subject.safetensors").read_bytes() != before
    for count in (1, 2, 6):
        with pytest.raises(ValueError, match=f"images: {count} reference image.*from 3 to 5 photos"):
            train(_references(count), "counted")
    assert not (p3s_folder / "counted.safetensors").exists()


# ---- the shipped workflows ----------------------------------------------------------------------------------

TRAIN = "P3S, train a subject adapter.json"
GENERATE = "P3S, generate the subject.json"


def _write_photos():
    from PIL import Image
    from support import comfy_host
    for i, photo in enumerate(_references(3, seed=4)):
        Image.fromarray((photo.numpy() * 255).astype("uint8")).save(comfy_host.host_dirs()["input"] / f"dog_{i + 1}.png")


def test_shipped_settings(host):
    from support import comfy_host
    prompt = comfy_host.ui_to_api(comfy_host.load_workflow(comfy_host.REPO_ROOT / "workflows" / TRAIN))
    trainer = prompt[comfy_host.node_of(prompt, "EditKitP3STrain")]["inputs"]
    assert (trainer["epochs"], trainer["learning_rate"], trainer["attention_loss"], trainer["condition_dropout"],
            trainer["lam"]) == (60, 1e-5, 0.1, 0.1, 0.2)
    assert len([n for n in prompt.values() if n["class_type"] == "EditKitPointMaskRNGR"]) == 3
    prompt = comfy_host.ui_to_api(comfy_host.load_workflow(comfy_host.REPO_ROOT / "workflows" / GENERATE))
    conditioner = prompt[comfy_host.node_of(prompt, "EditKitP3SConditioner")]["inputs"]
    assert (conditioner["alpha"], conditioner["beta"], conditioner["k"], conditioner["lam"]) == (0.5, 0.2, 2.0, 0.2)
    sampler = prompt[comfy_host.node_of(prompt, "KSampler")]["inputs"]
    assert (sampler["steps"], sampler["cfg"], sampler["sampler_name"]) == (50, 7.5, "ddim")


def test_the_workflows_train_then_generate(host):
    """Training (one epoch on three 128 px photos) saves an adapter that the generation workflow loads and uses."""
    import folder_paths
    from support import comfy_host
    _write_photos()
    prompt = comfy_host.swap_clip_vision_loader(comfy_host.swap_checkpoint_loader(comfy_host.ui_to_api(
        comfy_host.load_workflow(comfy_host.REPO_ROOT / "workflows" / TRAIN))))
    for node in prompt.values():
        if node["class_type"] == "EditKitPointMaskRNGR":
            node["inputs"].update(positive_points="60,60", negative_points="")
        elif node["class_type"] == "ImageScale":
            node["inputs"].update(width=SIZE, height=SIZE)
        elif node["class_type"] == "EditKitP3STrain":
            node["inputs"].update(epochs=1, name="tiny_workflow_subject")
    trained = comfy_host.run_prompt(prompt)
    curve = trained.outputs[comfy_host.node_of(prompt, "EditKitP3STrain")][1]
    assert curve.shape[0] == 1 and trained.ui[comfy_host.node_of(prompt, "PreviewImage")]["images"]
    assert "tiny_workflow_subject.safetensors" in folder_paths.get_filename_list("p3s")
    generate = comfy_host.tiny_prompt(comfy_host.load_workflow(comfy_host.REPO_ROOT / "workflows" / GENERATE), steps=3)
    generate[comfy_host.node_of(generate, "EditKitLoadP3SAdapter")]["inputs"]["adapter"] = \
        "tiny_workflow_subject.safetensors"
    result = comfy_host.run_prompt(generate)
    samples = result.outputs[comfy_host.node_of(generate, "KSampler")][0]["samples"]
    assert samples.shape == (1, 4, 8, 8) and torch.isfinite(samples).all()
    assert result.ui[comfy_host.node_of(generate, "SaveImage")]["images"]


def test_an_interrupted_training_writes_no_file(tiny, clip_vision, host, p3s_folder):
    import comfy.model_management
    import folder_paths
    from editkit.nodes.p3s_nodes import P3STrain
    model, clip, vae = tiny
    comfy.model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            P3STrain.execute(model, clip, vae, clip_vision, _references(), "a photo of sks dog", "interrupted", 3,
                             1e-4, 0.1, 0.1, 0.2, 0)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert not any(f.startswith("interrupted") for f in os.listdir(p3s_folder))
