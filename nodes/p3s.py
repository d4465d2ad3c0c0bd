"""Node: Point Mask (P3S RNGR), P3S-Diffusion's subject mask from clicked points (core/pointmask.py; Hu et al.,
"P3S-Diffusion", sec. III-A, eq. 1-3).

IMAGE + CLIP_VISION (the stock Load CLIP Vision; the paper uses CLIP ViT-L/14) + points -> the subject MASK,
the reference IMAGE with what must go filled, and a preview. The encoder runs through ComfyUI's own
`ClipVisionModel.encode_image`, on the whole image (coarse) or on overlapping tiles (finer grid).

Which features: the paper compares "the hidden state feature from CLIP image encoder" without naming a layer
(its eq. 4 later uses the last layer's output for cross-attention). The default is `penultimate_hidden_states`,
the patch tokens before the last block: dense-prediction work on CLIP (MaskCLIP, Zhou et al. 2022; SCLIP) finds
that the last block's attention mixes global content into every patch token, so its similarity maps localise
worse; `last` (`last_hidden_state`, before ComfyUI's post-layernorm) is the other choice. The class token is
dropped. Inputs: the node resizes the image (or its tiles) to the encoder's own square size itself and calls
`encode_image(crop=False)`, so ComfyUI's centre crop never cuts the image's sides off the grid.
"""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..core.pointmask import (FILL_COLOURS, FILL_REGIONS, NEGATIVE, POSITIVE, encode_grid, fill_image, parse_points,
                              patch_grid, preview, subject_mask, tile_layout)
from ..core.pointmask import fill_region as region_to_fill
from .host_helpers import dynamic_choice, dynamic_combo

CATEGORY = "EditKit/P3S"
HIDDEN_STATES = {"penultimate": "penultimate_hidden_states", "last": "last_hidden_state"}
ENCODER_TYPES = ("clip_vision_model", "siglip_vision_model")
POINTS_HELP = ("x,y pairs in image pixels from the top-left corner, separated by ';' or new lines "
               "('120,80; 300,200'), or the JSON list [{\"x\": 120, \"y\": 80}, ...] of a points editor node "
               "(e.g. KJNodes' Points Editor, its canvas set to the image's size).")


def encoder_geometry(clip_vision) -> tuple[int, int]:
    """(grid, patch): patch cells on a side of one encoder input and their size in pixels (ViT-L/14: 16, 14)."""
    config = getattr(clip_vision, "config", {}) or {}
    model_type = getattr(clip_vision, "model_type", config.get("model_type"))
    size, patch = getattr(clip_vision, "image_size", 0) or 0, config.get("patch_size")
    if size <= 0:
        raise ValueError(f"clip_vision: this {model_type} has no fixed input size (a NaFlex encoder such as SigLIP 2), "
                         f"so its patches have no fixed grid; load a CLIP vision model (the paper: CLIP ViT-L/14, "
                         f"clip-vit-large-patch14)")
    if model_type not in ENCODER_TYPES:
        raise ValueError(f"clip_vision: a {model_type} encoder is not supported; the Point Mask reads the patch tokens "
                         f"of CLIP or SigLIP vision models ({', '.join(ENCODER_TYPES)}): load one (the paper: CLIP "
                         f"ViT-L/14, clip-vit-large-patch14)")
    if not patch or size % patch:
        raise ValueError(f"clip_vision: its {size} px inputs are not a whole number of its {patch} px patches, so "
                         f"its patches have no grid to place points on; load another CLIP vision model")
    return size // patch, patch


def patch_features(clip_vision, images: torch.Tensor, hidden_state: str, layout) -> torch.Tensor:
    """(B, h, w, C) patch features of `images` on the layout's grid, from the chosen hidden state of the stock
    encoder (class token dropped). Tiles are the encoder's own size, so its preprocessing does not resize."""
    key = HIDDEN_STATES[hidden_state]

    def encode(tiles):
        return patch_grid(clip_vision.encode_image(tiles, crop=False)[key].float(), layout.grid)

    with torch.no_grad():   # (a direct call outside the executor would otherwise build an autograd graph)
        return encode_grid(encode, images, layout)


class PointMaskRNGR(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitPointMaskRNGR",
            display_name="Point Mask (P3S RNGR)",
            category=CATEGORY,
            description="P3S-Diffusion's RNGR mask (Hu et al., eq. 1-3): click the subject (positive points) and "
                        "what looks like it but must not be learnt (negative points, e.g. a second dog). The "
                        "cosine similarity of CLIP patch features, M_P · (1 − M_N), Gaussian smoothing, an Otsu "
                        "threshold and the component holding the positive points give the MASK; the IMAGE comes "
                        "back with what must go painted over. For an inpainted fill, feed the MASK to a stock "
                        "inpainting graph instead.",
            inputs=[
                io.Image.Input("image", tooltip="The reference photo(s). A batch: every image takes the same "
                                                "points (in its own pixels; all images are one size)."),
                io.ClipVision.Input("clip_vision",
                                    tooltip="From 'Load CLIP Vision'. The paper uses CLIP ViT-L/14 "
                                            "(clip-vit-large-patch14: 16x16 patches of a 224 px input)."),
                io.String.Input("positive_points", multiline=True, default="",
                                tooltip="Points on the subject to keep (at least one): " + POINTS_HELP),
                io.String.Input("negative_points", multiline=True, default="",
                                tooltip="Points on things that resemble the subject but must go (may be empty): "
                                        + POINTS_HELP),
                dynamic_combo("resolution", tooltip="coarse: the whole image in one encoder input, a "
                              "16x16 grid for ViT-L/14 (the paper). tiled: overlapping tiles, half a tile "
                              "apart, each one encoder input, their features averaged into a finer grid.",
                              options=[
                    io.DynamicCombo.Option("tiled", [
                        io.Int.Input("tiles", default=3, min=2, max=8,
                                     tooltip="Tiles along the longer side (ViT-L/14: 2 -> 24x24 cells, 3 -> "
                                             "32x32, 4 -> 40x40; the encoder runs tiles² times)."),
                    ]),
                    io.DynamicCombo.Option("coarse", []),
                ]),
                io.Combo.Input("hidden_state", options=list(HIDDEN_STATES), default="penultimate",
                               tooltip="Which encoder layer's patch tokens are compared. penultimate: the second "
                                       "to last layer (its patches keep more of their own place); last: the "
                                       "final layer's."),
                io.Float.Input("smoothing", default=0.5, min=0.0, max=4.0, step=0.1,
                               tooltip="Sigma of the Gaussian filter of eq. 2, in cells of the patch grid (0: "
                                       "none). More removes speckles but rounds and widens the mask."),
                io.Combo.Input("fill_region", options=list(FILL_REGIONS), default="outside_subject",
                               tooltip="What the IMAGE output paints over: everything outside the subject, or only "
                                       "the negative points' subjects (their own mask, eq. 2 with the roles "
                                       "swapped), keeping the background."),
                io.Combo.Input("fill", options=list(FILL_COLOURS), default="grey",
                               tooltip="The plain colour painted over what must go (mean: the mean colour of the "
                                       "pixels it replaces)."),
            ],
            outputs=[
                io.Mask.Output(display_name="mask", tooltip="The subject: 1 inside, 0 outside, at image size."),
                io.Image.Output(display_name="filled_image",
                                tooltip="The image with what must go painted over (eq. 3's I'), for P3S "
                                        "training."),
                io.Image.Output(display_name="preview",
                                tooltip="The subject in its colours with a yellow outline, the rest dimmed; "
                                        "positive points green, negative points red."),
            ],
        )

    @classmethod
    def execute(cls, image, clip_vision, positive_points, negative_points, resolution=None, hidden_state=None,
                smoothing=None, fill_region=None, fill=None) -> io.NodeOutput:   # resolution=None: see dynamic_choice
        mode = dynamic_choice(resolution, "resolution", ("tiled", "coarse"))
        if hidden_state not in HIDDEN_STATES:
            raise ValueError(f"hidden_state: '{hidden_state}' is not one of {', '.join(HIDDEN_STATES)}")
        if fill_region not in FILL_REGIONS:
            raise ValueError(f"fill_region: '{fill_region}' is not one of {', '.join(FILL_REGIONS)}")
        if fill not in FILL_COLOURS:
            raise ValueError(f"fill: '{fill}' is not one of {', '.join(FILL_COLOURS)}")
        if image.ndim != 4 or image.shape[0] < 1 or image.shape[-1] < 3:
            raise ValueError(f"image: expected a batch of RGB images (B, H, W, 3), got shape {tuple(image.shape)}")
        height, width = image.shape[1:3]
        positive = parse_points(positive_points, POSITIVE, height, width)
        negative = parse_points(negative_points, NEGATIVE, height, width)
        if not positive:
            raise ValueError(f"{POSITIVE}: give at least one point on the subject: " + POINTS_HELP)
        if fill_region == "negative_subjects" and not negative:
            raise ValueError("negative_points: fill_region negative_subjects paints over the negative points' "
                             "subjects; give at least one negative point, or fill outside_subject")
        grid, patch = encoder_geometry(clip_vision)
        tiles = 1 if mode == "coarse" else int(resolution.get("tiles", 3) if isinstance(resolution, dict) else 3)
        layout = tile_layout(height, width, grid, patch, tiles)
        features = patch_features(clip_vision, image, hidden_state, layout)
        results = []
        for b in range(features.shape[0]):
            try:
                results.append(subject_mask(features[b], positive, negative, (height, width), smoothing))
            except ValueError as e:
                if features.shape[0] == 1:
                    raise
                head, _, rest = str(e).partition(": ")
                raise ValueError(f"{head}: in image {b} of the batch, {rest}") from None
        masks = torch.stack([r.mask for r in results])
        regions = torch.stack([region_to_fill(r, fill_region) for r in results])
        filled = fill_image(image, regions.to(image.device), fill)
        return io.NodeOutput(masks.float(), filled, preview(image, masks, positive, negative))


NODES = [PointMaskRNGR]
