"""Nodes: P3S Train, Load P3S Adapter and P3S Conditioner (P3S-Diffusion, Hu et al., sec. III-B; the adapter and
the copy in nodes/p3s_adapter.py, the injection and the losses in core/p3s.py).

P3S Train fine-tunes an adapter on 3-5 reference photos of a subject, each already filled by a Point Mask (P3S
RNGR) node (what must go painted over), batched: the copy of the UNet, its zero projections and the RNGR encoder
learn; the checkpoint's UNet is never changed. The adapter is saved under models/p3s. P3S Conditioner puts a
trained adapter on a MODEL for any sampler.
"""
from __future__ import annotations

import os
import re

import torch
from comfy_api.latest import io

from ..core.p3s import ALPHA, BETA, GAMMA, LAMBDA, POWER
from .p3s_adapter import FOLDER, P3SAdapter, conditioned_model, loss_curve_image, register_folder, train

CATEGORY = "EditKit/P3S"
AdapterType = io.Custom("EDITKIT_P3S_ADAPTER")
NO_ADAPTER = "(no adapters in models/p3s)"


REFERENCES = (3, 5)   # the paper trains on 3-5 photos of the subject (sec. III-B)


def _file_name(name: str) -> str:
    """The adapter's file name: letters, digits, '-' and '_', with or without the .safetensors ending."""
    stem = name.strip().removesuffix(".safetensors")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", stem):
        raise ValueError(f"name: '{name}' is not an adapter name; use letters, digits, '-' and '_' (e.g. 'sks_dog')")
    return stem + ".safetensors"


def _encode_references(vae, clip_vision, images: torch.Tensor, model_patcher):
    """(latents in the model's latent space, CLIP last hidden states) of the filled references."""
    latents = model_patcher.model.process_latent_in(vae.encode(images[..., :3]))
    states = clip_vision.encode_image(images[..., :3], crop=False)["last_hidden_state"]
    return latents.float().cpu(), states.float().cpu()


class P3STrain(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitP3STrain",
            display_name="P3S Train",
            category=CATEGORY,
            description="Fine-tunes a P3S-Diffusion adapter on 3-5 photos of one subject (each filled by a Point Mask "
                        "node, then batched): a trainable copy of the UNet whose self-attention features enter the "
                        "frozen UNet through zero-initialised projections, with the denoising loss plus the "
                        "attention consistency loss. Saved under models/p3s; the checkpoint is not changed.",
            inputs=[
                io.Model.Input("model", tooltip="SD 1.x / 2.x model to train for (its UNet stays frozen)."),
                io.Clip.Input("clip", tooltip="The text encoder of the same checkpoint (encodes the identifier prompt)."),
                io.Vae.Input("vae", tooltip="The VAE of the same checkpoint (encodes the references)."),
                io.ClipVision.Input("clip_vision", tooltip="CLIP vision (the paper: ViT-L/14), as for the Point Mask."),
                io.Image.Input("images", tooltip="The filled references from Point Mask (P3S RNGR) nodes, batched "
                                                 "(3-5 images of one size)."),
                io.String.Input("prompt", default="a photo of sks dog",
                                tooltip="The identifier prompt the subject is learnt with; use it when generating."),
                io.String.Input("name", default="sks_dog", tooltip="File name of the adapter in models/p3s."),
                io.Int.Input("epochs", default=60, min=1, max=10000,
                             tooltip="Passes over the references, one step per image each (paper: 60)."),
                io.Float.Input("learning_rate", default=1e-5, min=1e-7, max=1e-1, step=1e-6,
                               tooltip="AdamW learning rate (paper: 1e-5)."),
                io.Float.Input("attention_loss", default=GAMMA, min=0.0, max=10.0, step=0.01,
                               tooltip="gamma: weight of the attention consistency loss (paper: 0.1)."),
                io.Float.Input("condition_dropout", default=0.1, min=0.0, max=1.0, step=0.01,
                               tooltip="Share of steps trained with the empty prompt, for CFG (paper: 10 %)."),
                io.Float.Input("lam", default=LAMBDA, min=0.0, max=2.0, step=0.01,
                               tooltip="lambda of eq. 7: how much of the copy's features joins the values (paper: 0.2)."),
                io.Int.Input("seed", default=0, min=0, max=2 ** 31 - 1,
                             tooltip="Seed of the initialisation, the timesteps, the noise and the order."),
                io.Boolean.Input("overwrite", default=False, optional=True,
                                 tooltip="Replace an adapter of the same name in models/p3s; off, that name is "
                                         "refused before training starts."),
            ],
            outputs=[
                AdapterType.Output(display_name="p3s_adapter", tooltip="The trained adapter, for P3S Conditioner."),
                io.Image.Output(display_name="loss_curve", tooltip="The training loss per step."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, clip, vae, clip_vision, images, prompt, name, epochs, learning_rate, attention_loss,
                condition_dropout, lam, seed, overwrite=False) -> io.NodeOutput:
        import comfy.model_management
        import comfy.utils
        import folder_paths
        from .host_helpers import require_sd_unet
        require_sd_unet(model)
        if images.ndim != 4 or images.shape[0] < 1:
            raise ValueError(f"images: expected a batch of reference images (B, H, W, 3), got {tuple(images.shape)}")
        if not REFERENCES[0] <= images.shape[0] <= REFERENCES[1]:
            raise ValueError(f"images: {images.shape[0]} reference image(s); P3S learns a subject from "
                             f"{REFERENCES[0]} to {REFERENCES[1]} photos of it (the paper's setting): batch that many")
        if images.shape[1] % 8 or images.shape[2] % 8:
            raise ValueError(f"images: {images.shape[2]}x{images.shape[1]} is not a multiple of 8 pixels; resize them")
        if not prompt.strip():
            raise ValueError("prompt: give the identifier prompt, e.g. 'a photo of sks dog'")
        register_folder()
        path = os.path.join(folder_paths.folder_names_and_paths[FOLDER][0][0], _file_name(name))
        if os.path.exists(path) and not overwrite:
            raise ValueError(f"name: models/p3s already holds '{os.path.basename(path)}'; choose another name, or "
                             f"switch overwrite on to replace it")
        latents, states = _encode_references(vae, clip_vision, images, model)
        encode = lambda text: clip.encode_from_tokens_scheduled(clip.tokenize(text))[0][0]   # noqa: E731
        adapter = P3SAdapter.fresh(model, latents, states, seed)
        adapter.metadata = {"prompt": prompt, "epochs": epochs, "learning_rate": learning_rate, "lam": lam,
                            "attention_loss": attention_loss, "condition_dropout": condition_dropout, "seed": seed,
                            "references": int(images.shape[0])}
        bar = comfy.utils.ProgressBar(epochs * images.shape[0])

        def on_step(step, steps, loss):
            comfy.model_management.throw_exception_if_processing_interrupted()   # nothing is saved then
            bar.update(1)

        losses = train(model, adapter, encode(prompt), encode(""), epochs, learning_rate, lam, attention_loss,
                       condition_dropout, seed, on_step)
        adapter.metadata["losses"] = [round(x, 6) for x in losses]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        adapter.save(path)
        return io.NodeOutput(adapter, loss_curve_image(losses))


def _adapter_files() -> list[str]:
    import folder_paths
    register_folder()
    return folder_paths.get_filename_list(FOLDER) or [NO_ADAPTER]


def _adapter_path(name: str) -> str | None:
    import folder_paths
    register_folder()
    return None if name == NO_ADAPTER else folder_paths.get_full_path(FOLDER, name)


class LoadP3SAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitLoadP3SAdapter",
            display_name="Load P3S Adapter",
            category=CATEGORY,
            description="Loads an adapter that P3S Train saved in models/p3s, checked against the MODEL's UNet.",
            inputs=[
                io.Model.Input("model", tooltip="The model the adapter is for (its layout is checked)."),
                io.Combo.Input("adapter", options=_adapter_files(),
                               tooltip="A file of models/p3s (refresh the page after training one to see it here)."),
            ],
            outputs=[AdapterType.Output(display_name="p3s_adapter", tooltip="For P3S Conditioner.")],
        )

    @classmethod
    def validate_inputs(cls, adapter):
        return True if _adapter_path(adapter) else (
            "adapter: models/p3s holds no adapter yet; train one with P3S Train, then refresh the page"
            if adapter == NO_ADAPTER else f"adapter: '{adapter}' is not in models/p3s")

    @classmethod
    def fingerprint_inputs(cls, model, adapter):
        path = _adapter_path(adapter)
        return os.path.getmtime(path) if path else adapter   # a retrained file is loaded again

    @classmethod
    def execute(cls, model, adapter) -> io.NodeOutput:
        path = _adapter_path(adapter)
        if path is None:
            raise ValueError(cls.validate_inputs(adapter))
        return io.NodeOutput(P3SAdapter.load(path, model))


class P3SConditioner(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitP3SConditioner",
            display_name="P3S Conditioner",
            category=CATEGORY,
            description="Generates the adapter's subject: at every model evaluation the trained copy runs on the "
                        "latent plus the reference's encoding, and its features enter the UNet's self-attention with "
                        "the timestep weight 1 - alpha (t/T)^k + beta. Use the adapter's identifier prompt.",
            inputs=[
                io.Model.Input("model", tooltip="The model the adapter was trained for. It is cloned."),
                AdapterType.Input("p3s_adapter", tooltip="From P3S Train or Load P3S Adapter."),
                io.Int.Input("reference", default=0, min=0, max=63,
                             tooltip="Which of the adapter's reference images conditions the generation (from 0)."),
                io.Float.Input("alpha", default=ALPHA, min=0.0, max=2.0, step=0.01,
                               tooltip="eq. 10's alpha: how much less is injected at the noisy steps (paper: 0.5)."),
                io.Float.Input("beta", default=BETA, min=-1.0, max=2.0, step=0.01,
                               tooltip="eq. 10's beta: a constant added to the weight (paper: 0.2)."),
                io.Float.Input("k", default=POWER, min=0.1, max=8.0, step=0.1,
                               tooltip="eq. 10's exponent k (paper: 2)."),
                io.Float.Input("lam", default=LAMBDA, min=0.0, max=2.0, step=0.01,
                               tooltip="lambda of eq. 7 (paper: 0.2)."),
            ],
            outputs=[io.Model.Output(tooltip="The model that generates the subject: connect it to the sampler.")],
        )

    @classmethod
    def execute(cls, model, p3s_adapter, reference, alpha, beta, k, lam) -> io.NodeOutput:
        patched, _, _ = conditioned_model(model, p3s_adapter, reference, lam, alpha, beta, k)
        return io.NodeOutput(patched)


NODES = [P3STrain, LoadP3SAdapter, P3SConditioner]
