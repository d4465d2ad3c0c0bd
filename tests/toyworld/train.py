"""Train the toy-world checkpoint: the tiny SD1.5-layout VAE, text encoder and UNet of tests/support/tiny_models.py
(by hand, never in CI; see tests/toyworld/README.md for the commands and wall times).

The models trained are the very ComfyUI modules that ``make_comfy_clip`` / ``make_comfy_model`` build, and the
``AutoencoderKL`` of ``tiny_models.TOYWORLD_VAE_DDCONFIG`` (the tiny VAE layout at 64 channels: at 32, ComfyUI's
32-group norms are instance norms and the VAE cannot keep a flat background's colour); ComfyUI is booted with its
folders in a temp dir. The saved state dicts are in the layout ``tiny_models.toyworld_checkpoint()`` loads, key
for key:

* ``weights/toyworld_vae.safetensors``: ``AutoencoderKL.state_dict()`` (what ``comfy.sd.VAE(sd=...)`` takes)
* ``weights/toyworld_clip.safetensors``: ``CLIP.cond_stage_model.state_dict()`` (``clip_l.transformer...``)
* ``weights/toyworld_unet.safetensors``: ``model.diffusion_model.state_dict()`` (ldm keys)

Stages (each bounded by wall-clock minutes, checkpointing as it goes):

``vae``: reconstruction loss with object pixels weighted ``OBJECT_WEIGHT`` times (objects are 3-11 % of the
pixels), latent noise augmentation (a decoder tolerant to a sampler's imprecision); afterwards the latent is
re-parametrised exactly (quant_conv / post_quant_conv rescaled) so that ``SD15.latent_format`` (x 0.18215) sees
zero-mean, unit-variance latents, and the unused log-variance rows give a near-deterministic posterior.

``unet``: the UNet and the text encoder jointly; epsilon-prediction on SD's scaled-linear schedule (ComfyUI's own
``model_sampling`` of the SD15 model, 1000 steps), 10 % caption dropout to the empty caption (CFG), min-SNR-5
weighting, AdamW lr 1e-3 with warm-up and a time-based cosine decay, EMA 0.999 of both; latents of the jittered
training scenes are encoded once by the trained VAE. Options used for the committed weights, on resumed runs:
``--offset-noise`` (a per-image, per-channel constant in the noise: the background then follows the caption, not
x_T's mean), ``--attention-loss`` (the object words' cross-attention pushed onto the object and the background
word's off it, so the maps localise as SD's do; ``CrossAttentionProbe``, ``localisation_loss``) and
``--unsaid-colour`` (a fraction of the captions without their colour word, so the noise decides the colour and
consistency methods have something to keep).

``decoder``: the decoder (and post_quant_conv) alone, on the frozen encoder's latent space, so the UNet trained on
it stays valid: object-weighted reconstruction plus an edge (finite-difference) loss, latent noise augmentation.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nice -n 10 python tests/toyworld/train.py vae --minutes 14 --batch 8
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nice -n 10 python tests/toyworld/train.py unet --minutes 77 --batch 32 --renders 12
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nice -n 10 python tests/toyworld/train.py decoder --minutes 25 --batch 8
    (the resumed runs with the options above: tests/toyworld/README.md)
"""
from __future__ import annotations

import argparse
import copy
import math
import pathlib
import sys
import tempfile
import time

import numpy as np
import torch

HERE = pathlib.Path(__file__).resolve().parent
TESTS = HERE.parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from toyworld import world  # noqa: E402

WEIGHTS = HERE / "weights"
VAE_FILE = "toyworld_vae.safetensors"
CLIP_FILE = "toyworld_clip.safetensors"
UNET_FILE = "toyworld_unet.safetensors"
OBJECT_WEIGHT = 10.0
LATENT_SCALE = 0.18215          # comfy.latent_formats.SD15.scale_factor
CAPTION_DROPOUT = 0.1
MIN_SNR_GAMMA = 5.0
EMA_DECAY = 0.999


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def boot():
    torch.set_num_threads(1)
    from support import comfy_host
    comfy_host.boot_comfy(tempfile.mkdtemp(prefix="toyworld_comfy_"))
    _out_of_place_clip_layer()
    from support import tiny_models
    return tiny_models


def _out_of_place_clip_layer():
    """ComfyUI's CLIPLayer adds its residuals in place (``x += ...``), which autograd cannot differentiate; in this
    training process only (nothing is written to ComfyUI), its forward is replaced by the same sums out of place."""
    import comfy.clip_model

    def forward(self, x, mask=None, optimized_attention=None):
        x = x + self.self_attn(self.layer_norm1(x), mask, optimized_attention)
        x = x + self.mlp(self.layer_norm2(x))
        return x

    comfy.clip_model.CLIPLayer.forward = forward


def save(sd: dict, name: str):
    from safetensors.torch import save_file
    WEIGHTS.mkdir(parents=True, exist_ok=True)
    tmp = WEIGHTS / (name + ".tmp")
    save_file({k: v.detach().to(torch.float32).contiguous().clone() for k, v in sd.items()}, str(tmp))
    tmp.replace(WEIGHTS / name)


def load(name: str) -> dict:
    from safetensors.torch import load_file
    return load_file(str(WEIGHTS / name))


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) in [0, 1] -> (N, 3, H, W) in [-1, 1] (what comfy.sd.VAE feeds the encoder)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous() * 2.0 - 1.0


def sample_scenes(rng: np.random.Generator, n: int, scenes=None):
    scenes = world.TRAIN if scenes is None else scenes
    idx = rng.integers(0, len(scenes), size=n)
    seeds = rng.integers(0, 2**31 - 1, size=n)
    return [scenes[i] for i in idx], seeds


class EMA:
    def __init__(self, modules, decay=EMA_DECAY):
        self.decay = decay
        self.params = [p for m in modules for p in m.parameters() if p.requires_grad]
        self.shadow = [p.detach().clone() for p in self.params]
        self.steps = 0

    @torch.no_grad()
    def update(self):
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        torch._foreach_mul_(self.shadow, d)
        torch._foreach_add_(self.shadow, [p.detach() for p in self.params], alpha=1 - d)

    @torch.no_grad()
    def swap(self):
        """Exchange live and EMA weights (call twice to undo)."""
        for p, s in zip(self.params, self.shadow):
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)


def lr_at(frac: float, base: float, step: int, warmup: int = 200, floor: float = 0.05) -> float:
    w = min(1.0, (step + 1) / warmup)
    return base * w * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


# ----------------------------------------------------------------------------------------------------------------
# VAE
# ----------------------------------------------------------------------------------------------------------------

def vae_losses(ae, x, masks, noise_aug=0.0):
    z = ae.quant_conv(ae.encoder(x))[:, :ae.quant_conv.out_channels // 2]
    if noise_aug > 0:
        z = z + noise_aug * z.detach().std() * torch.randn_like(z)
    rec = ae.decoder(ae.post_quant_conv(z))
    w = 1.0 + (OBJECT_WEIGHT - 1.0) * masks[:, None]
    err = (rec - x)
    loss = (w * (err.abs() + err * err)).mean() / w.mean()
    return loss, rec, z


@torch.no_grad()
def reparametrise_latent(ae, n: int = 2048, seed: int = 1):
    """Rescale/shift the latent exactly so that LATENT_SCALE * z is zero-mean, unit-variance per channel."""
    rng = np.random.default_rng(seed)
    scenes, seeds = sample_scenes(rng, n, world.all_scenes())
    imgs, _ = world.render_batch(scenes, seeds)
    zs = []
    for i in range(0, n, 128):
        zs.append(ae.quant_conv(ae.encoder(to_pixels(imgs[i:i + 128])))[:, :4])
    z = torch.cat(zs)
    mean = z.mean(dim=(0, 2, 3))
    std = z.std(dim=(0, 2, 3))
    k = (1.0 / LATENT_SCALE) / std                        # z' = k (z - mean)
    qc, pqc = ae.quant_conv, ae.post_quant_conv
    c = qc.out_channels // 2
    qc.weight[:c] *= k[:, None, None, None]
    qc.bias[:c] = (qc.bias[:c] - mean) * k
    # the log-variance rows: a fixed tiny variance (the posterior's mode is what ComfyUI encodes anyway)
    qc.weight[c:] = 0.0
    qc.bias[c:] = -20.0
    # post_quant_conv(z) = W z + b = (W / k) z' + W mean + b
    W = pqc.weight[:, :, 0, 0]
    pqc.bias.copy_(pqc.bias + W @ mean)
    pqc.weight.copy_(pqc.weight / k[None, :, None, None])
    log(f"latent re-parametrised: mean {mean.tolist()} std {std.tolist()}")


def make_vae_module(tm, seed: int = 0):
    """The bare ``AutoencoderKL`` of ``tiny_models.TOYWORLD_VAE_DDCONFIG`` (what ``comfy.sd.VAE`` wraps as
    ``first_stage_model``), initialised like the tiny models."""
    from comfy.ldm.models.autoencoder import AutoencoderKL
    ae = AutoencoderKL(ddconfig=dict(tm.TOYWORLD_VAE_DDCONFIG), embed_dim=tm.LATENT_CHANNELS)
    g = torch.Generator().manual_seed(seed * 1000 + 2)
    return tm.init_weights_(ae, g).float()


def train_vae(args):
    tm = boot()
    ae = make_vae_module(tm, args.seed)
    ae.train().requires_grad_(True)
    params = list(ae.encoder.parameters()) + list(ae.quant_conv.parameters()) + \
        list(ae.post_quant_conv.parameters()) + list(ae.decoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    rng = np.random.default_rng(args.seed)
    t0 = time.time()
    budget = args.minutes * 60
    step = 0
    last_save = t0
    while True:
        el = time.time() - t0
        if el > budget or (args.steps and step >= args.steps):
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(el / budget, args.lr, step, warmup=100)
        scenes, seeds = sample_scenes(rng, args.batch, world.all_scenes())
        imgs, masks = world.render_batch(scenes, seeds)
        x = to_pixels(imgs)
        m = torch.from_numpy(masks.astype(np.float32))
        loss, rec, _ = vae_losses(ae, x, m, noise_aug=args.noise_aug)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:
            with torch.no_grad():
                mse = ((rec.clamp(-1, 1) - x) ** 2).mean() / 4
                psnr = -10 * math.log10(max(mse.item(), 1e-12))
            log(f"vae step {step} loss {loss.item():.4f} psnr {psnr:.2f} dB  {step / (time.time() - t0):.2f} it/s")
        if time.time() - last_save > 300:
            save(ae.state_dict(), VAE_FILE + ".raw")   # before re-parametrisation
            last_save = time.time()
    ae.eval()
    reparametrise_latent(ae)
    save(ae.state_dict(), VAE_FILE)
    raw = WEIGHTS / (VAE_FILE + ".raw")
    if raw.exists():
        raw.unlink()
    log(f"vae done: {step} steps in {(time.time() - t0) / 60:.1f} min")


# ----------------------------------------------------------------------------------------------------------------
# UNet + text encoder
# ----------------------------------------------------------------------------------------------------------------

def caption_token_ids(clip, captions) -> torch.Tensor:
    """(N, 77) token ids of captions with ComfyUI's SD1 tokenizer (the same ids CLIPTextEncode feeds)."""
    rows = []
    for c in captions:
        t = clip.tokenize(c)["l"]
        assert len(t) == 1, c
        rows.append([tok for tok, _w in t[0]])
    return torch.tensor(rows, dtype=torch.long)


def encode_text(clip_l, ids: torch.Tensor) -> torch.Tensor:
    z, _pooled = clip_l(ids.tolist())
    return z


@torch.no_grad()
def encode_dataset(ae, n_per_caption: int, scenes) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Latents (SD15-scaled), 8x8 object masks and scene indices of n_per_caption renders per scene."""
    items = [(i, k) for i in range(len(scenes)) for k in range(n_per_caption)]
    lat, msk = [], []
    for j in range(0, len(items), 256):
        chunk = items[j:j + 256]
        imgs, masks = world.render_batch([scenes[i] for i, _ in chunk], [1000 + k for _, k in chunk])
        z = ae.quant_conv(ae.encoder(to_pixels(imgs)))[:, :4] * LATENT_SCALE
        lat.append(z)
        m = torch.from_numpy(masks.astype(np.float32))[:, None]
        msk.append(torch.nn.functional.avg_pool2d(m, 8))
    idx = torch.tensor([i for i, _ in items])
    return torch.cat(lat), torch.cat(msk), idx


# caption token positions (every attribute word is one token; tested): BOS, a, size, colour, shape, three
# position words, ",", the background's colour, "background", EOS; without the colour word, one place earlier
OBJECT_TOKENS = {"said": (2, 3, 4), "unsaid": (2, 3)}
BACKGROUND_TOKENS = {"said": (9,), "unsaid": (8,)}


def unsaid_colour(caption: str) -> str:
    """The caption without its colour word ("a big circle on the left, grey background"): the noise decides the
    colour, as it decides what a prompt leaves unsaid in Stable Diffusion."""
    return caption.replace(f" {world.parse_caption(caption).colour} ", " ", 1)


def token_selection(unsaid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 77) selections of the object words and of the background word of each row's caption."""
    obj, bg = torch.zeros(len(unsaid), 77), torch.zeros(len(unsaid), 77)
    for row, u in enumerate(unsaid.tolist()):
        kind = "unsaid" if u else "said"
        obj[row, list(OBJECT_TOKENS[kind])] = 1.0
        bg[row, list(BACKGROUND_TOKENS[kind])] = 1.0
    return obj, bg


class CrossAttentionProbe:
    """In this training process only (nothing is written to ComfyUI): the UNet's cross-attention layers compute
    their probabilities explicitly (the same function as ComfyUI's attention) and, while ``recording``, keep the
    head-averaged maps (batch, tokens, 77) of the grids of at least ``min_tokens`` tokens, for
    ``localisation_loss``."""

    def __init__(self, unet, min_tokens: int = 4):
        import types
        from comfy.ldm.modules.attention import BasicTransformerBlock
        self.maps, self.recording, self.min_tokens = [], False, min_tokens
        for block in unet.modules():
            if isinstance(block, BasicTransformerBlock):
                block.attn2.forward = types.MethodType(self._forward(), block.attn2)

    def _forward(self):
        probe = self

        def forward(attn, x, context=None, value=None, mask=None, transformer_options={}):
            q, k, v = attn.to_q(x), attn.to_k(context), attn.to_v(context)
            b, n, inner = q.shape
            h = attn.heads
            q, k, v = (t.reshape(b, -1, h, inner // h).transpose(1, 2) for t in (q, k, v))
            p = torch.softmax(q @ k.transpose(-1, -2) * (inner // h) ** -0.5, dim=-1)
            if probe.recording and n >= probe.min_tokens:
                probe.maps.append(p.mean(1))
            return attn.to_out((p @ v).transpose(1, 2).reshape(b, n, inner))
        return forward


def localisation_loss(maps, object_mask: torch.Tensor, object_tokens: torch.Tensor, background_tokens: torch.Tensor,
                      captioned: torch.Tensor) -> torch.Tensor:
    """The fraction of the object words' cross-attention that falls outside the object, and of the background
    word's that falls on it, averaged over the recorded layers (rows with the empty caption excluded). Trained
    with it, the words' maps localise as Stable Diffusion's do (Hertz et al. 2022, fig. 4), which the
    attention-editing methods rely on; without it this one-object world needs no localisation and the maps are
    near uniform (measured: the colour word's mean weight 1.4x higher on the object than off it)."""
    keep = captioned.float()
    total = object_mask.new_zeros(())
    for p in maps:
        side = int(round(p.shape[1] ** 0.5))
        region = torch.nn.functional.adaptive_avg_pool2d(object_mask, side).flatten(1)    # (B, tokens)
        for tokens, where in ((object_tokens, region), (background_tokens, 1 - region)):
            w = (p * tokens[:, None, :]).sum(-1)
            inside = (w * where).sum(1) / w.sum(1).clamp_min(1e-8)
            total = total + ((1 - inside) * keep).sum() / keep.sum().clamp_min(1.0)
    return total / (2 * max(len(maps), 1))


def alphas_cumprod(model_patcher) -> torch.Tensor:
    sigmas = model_patcher.model.model_sampling.sigmas.double()
    return (1.0 / (1.0 + sigmas ** 2)).float()      # sigma^2 = (1 - abar) / abar


@torch.no_grad()
def ddim_sample(unet, clip_l, ids, abar, steps=30, cfg=6.0, seed=0, empty_ids=None):
    """A plain DDIM loop (eta 0) of the UNet with CFG; returns SD15-scaled latents (N, 4, 8, 8)."""
    n = ids.shape[0]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, 4, 8, 8), generator=g)
    cond = encode_text(clip_l, ids)
    unc = encode_text(clip_l, empty_ids.expand(n, -1))
    ts = torch.linspace(999, 0, steps).round().long()
    for i, t in enumerate(ts):
        a = abar[t]
        a_prev = abar[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
        eps_c, eps_u = unet(torch.cat([x, x]), torch.full((2 * n,), float(t)), torch.cat([cond, unc])).chunk(2)
        eps = eps_u + cfg * (eps_c - eps_u)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x


@torch.no_grad()
def quick_eval(unet, clip_l, ae, clip, abar, empty_ids, captions, steps=20, seed=0):
    from toyworld import evaluate
    ids = caption_token_ids(clip, captions)
    lat = ddim_sample(unet, clip_l, ids, abar, steps=steps, cfg=6.0, seed=seed, empty_ids=empty_ids)
    img = ((ae.decoder(ae.post_quant_conv(lat / LATENT_SCALE)).clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)
    return evaluate.score_batch(img, captions)


def train_unet(args):
    tm = boot()
    ae = make_vae_module(tm).eval()
    ae.load_state_dict(load(VAE_FILE))
    ae.requires_grad_(False)
    model = tm.make_comfy_model(seed=0)
    unet = model.model.diffusion_model
    clip = tm.make_comfy_clip(seed=0)
    clip_l = clip.cond_stage_model.clip_l
    if args.resume:
        unet.load_state_dict(load(UNET_FILE))
        clip.cond_stage_model.load_state_dict(load(CLIP_FILE))
    unet.train().requires_grad_(True)
    clip_l.train().requires_grad_(True)
    abar = alphas_cumprod(model)
    probe = CrossAttentionProbe(unet) if args.attention_loss else None

    t_enc = time.time()
    lat, msk, sidx = encode_dataset(ae, args.renders, world.TRAIN)
    log(f"encoded {lat.shape[0]} training latents in {time.time() - t_enc:.0f} s; "
        f"mean {lat.mean():.3f} std {lat.std():.3f}")
    ids_all = caption_token_ids(clip, world.TRAIN_CAPTIONS)
    ids_unsaid = caption_token_ids(clip, [unsaid_colour(c) for c in world.TRAIN_CAPTIONS])
    empty_ids = caption_token_ids(clip, [""])

    params = [p for p in unet.parameters()] + [p for p in clip_l.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    ema = EMA([unet, clip_l])
    rng = torch.Generator().manual_seed(args.seed)
    snr = abar / (1 - abar)
    mse_w = torch.clamp(snr, max=MIN_SNR_GAMMA) / snr       # min-SNR weight for epsilon prediction
    t0 = time.time()
    budget = args.minutes * 60
    step, last_save, last_eval, run, run_loc = 0, t0, t0, 0.0, 0.0
    eval_caps = list(world.HELD_OUT_CAPTIONS[::2])

    def checkpoint(tag):
        ema.swap()
        save(unet.state_dict(), UNET_FILE)
        save(clip.cond_stage_model.state_dict(), CLIP_FILE)
        ema.swap()
        log(f"saved EMA weights ({tag})")

    while True:
        el = time.time() - t0
        if el > budget or (args.steps and step >= args.steps):
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(el / budget, args.lr, step)
        j = torch.randint(0, lat.shape[0], (args.batch,), generator=rng)
        x0, m = lat[j], msk[j]
        ids = ids_all[sidx[j]].clone()
        drop = torch.rand(args.batch, generator=rng) < CAPTION_DROPOUT
        unsaid = (torch.rand(args.batch, generator=rng) < args.unsaid_colour) & ~drop
        ids[unsaid] = ids_unsaid[sidx[j]][unsaid]
        ids[drop] = empty_ids[0]
        t = torch.randint(0, 1000, (args.batch,), generator=rng)
        eps = torch.randn(x0.shape, generator=rng)
        if args.offset_noise:
            # offset noise: a per-image, per-channel constant in the noise, so that x_T's mean no longer tells
            # the background and the caption has to (sampling is unchanged)
            eps = eps + args.offset_noise * torch.randn(x0.shape[0], x0.shape[1], 1, 1, generator=rng)
        a = abar[t][:, None, None, None]
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        ctx = encode_text(clip_l, ids)
        if probe:
            probe.maps, probe.recording = [], True
        pred = unet(xt, t.float(), ctx)
        pix_w = 1.0 + args.object_weight * m
        per = ((pred - eps) ** 2 * pix_w).mean(dim=(1, 2, 3)) / pix_w.mean(dim=(1, 2, 3))
        loss = (per * mse_w[t]).mean()
        if probe:
            probe.recording = False
            located = localisation_loss(probe.maps, m, *token_selection(unsaid), ~drop)
            loss = loss + args.attention_loss * located
            run_loc = 0.98 * run_loc + 0.02 * located.item() if step else located.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update()
        step += 1
        run = 0.98 * run + 0.02 * loss.item() if step > 1 else loss.item()
        if step % 100 == 0:
            log(f"unet step {step} loss {run:.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"{step / (time.time() - t0):.2f} it/s" + (f" localisation {run_loc:.3f}" if probe else ""))
        if time.time() - last_save > args.save_every * 60:
            checkpoint(f"step {step}")
            last_save = time.time()
        if args.eval_every and time.time() - last_eval > args.eval_every * 60:
            unet.eval(); clip_l.eval(); ema.swap()
            scores = quick_eval(unet, clip_l, ae, clip, abar, empty_ids, eval_caps)
            ema.swap(); unet.train(); clip_l.train()
            log(f"eval step {step} (27 held-out captions, 20 DDIM steps, EMA): "
                + " ".join(f"{k} {v:.0%}" for k, v in scores.items()))
            last_eval = time.time()
    checkpoint(f"final, step {step}")
    log(f"unet done: {step} steps in {(time.time() - t0) / 60:.1f} min")


# ----------------------------------------------------------------------------------------------------------------
# decoder fine-tune
# ----------------------------------------------------------------------------------------------------------------

def edge_loss(rec, x, w):
    """Object-weighted L1 of the horizontal and vertical finite differences (sharp edges and corners)."""
    dx = (rec[..., :, 1:] - rec[..., :, :-1]) - (x[..., :, 1:] - x[..., :, :-1])
    dy = (rec[..., 1:, :] - rec[..., :-1, :]) - (x[..., 1:, :] - x[..., :-1, :])
    return ((w[..., :, 1:] * dx.abs()).mean() + (w[..., 1:, :] * dy.abs()).mean()) / w.mean()


def train_decoder(args):
    """The decoder (and post_quant_conv) alone, on the fixed latent space of the trained encoder: the UNet trained
    on that latent space stays valid. Reconstruction + edge loss, object-weighted, latent noise augmentation."""
    tm = boot()
    ae = make_vae_module(tm)
    ae.load_state_dict(load(VAE_FILE))
    ae.requires_grad_(False)
    ae.encoder.eval()
    params = list(ae.post_quant_conv.parameters()) + list(ae.decoder.parameters())
    for q in params:
        q.requires_grad_(True)
    ae.decoder.train()
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    rng = np.random.default_rng(args.seed + 7)
    t0, step, budget, last_save = time.time(), 0, args.minutes * 60, time.time()
    while time.time() - t0 < budget and not (args.steps and step >= args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at((time.time() - t0) / budget, args.lr, step, warmup=50)
        scenes, seeds = sample_scenes(rng, args.batch, world.all_scenes())
        imgs, masks = world.render_batch(scenes, seeds)
        x = to_pixels(imgs)
        with torch.no_grad():
            z = ae.quant_conv(ae.encoder(x))[:, :4]
            z = z + args.noise_aug * torch.randn_like(z) / LATENT_SCALE   # (z is in units of 1 / LATENT_SCALE)
        rec = ae.decoder(ae.post_quant_conv(z))
        w = 1.0 + (OBJECT_WEIGHT - 1.0) * torch.from_numpy(masks.astype(np.float32))[:, None]
        err = rec - x
        loss = (w * (err.abs() + err * err)).mean() / w.mean() + edge_loss(rec, x, w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:
            with torch.no_grad():
                psnr = -10 * math.log10(max((((rec.clamp(-1, 1) - x) ** 2).mean() / 4).item(), 1e-12))
            log(f"decoder step {step} loss {loss.item():.4f} psnr {psnr:.2f} dB "
                f"{step / (time.time() - t0):.2f} it/s")
        if time.time() - last_save > args.save_every * 60:
            save(ae.state_dict(), VAE_FILE)
            last_save = time.time()
    ae.eval()
    save(ae.state_dict(), VAE_FILE)
    log(f"decoder done: {step} steps in {(time.time() - t0) / 60:.1f} min")


def bench(args):
    tm = boot()
    model = tm.make_comfy_model(seed=0)
    unet = model.model.diffusion_model.train().requires_grad_(True)
    clip = tm.make_comfy_clip(seed=0)
    clip_l = clip.cond_stage_model.clip_l.train().requires_grad_(True)
    ids = caption_token_ids(clip, world.TRAIN_CAPTIONS[:args.batch])
    params = list(unet.parameters()) + list(clip_l.parameters())
    log("unet params", sum(p.numel() for p in unet.parameters()), "clip", sum(p.numel() for p in clip_l.parameters()))
    opt = torch.optim.AdamW(params, lr=1e-3)
    for i in range(12):
        if i == 2:
            t0 = time.time()
        x = torch.randn(args.batch, 4, 8, 8)
        out = unet(x, torch.randint(0, 1000, (args.batch,)).float(), encode_text(clip_l, ids))
        loss = out.pow(2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
    log(f"unet+clip batch {args.batch}: {(time.time() - t0) / 10 * 1000:.0f} ms/step")
    ae = make_vae_module(tm).train().requires_grad_(True)
    opt = torch.optim.AdamW(ae.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    for i in range(7):
        if i == 2:
            t0 = time.time()
        scenes, seeds = sample_scenes(rng, args.batch, world.all_scenes())
        imgs, masks = world.render_batch(scenes, seeds)
        loss, _, _ = vae_losses(ae, to_pixels(imgs), torch.from_numpy(masks.astype(np.float32)))
        opt.zero_grad(); loss.backward(); opt.step()
    log(f"vae batch {args.batch}: {(time.time() - t0) / 5 * 1000:.0f} ms/step")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["vae", "unet", "decoder", "bench"])
    p.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget of the stage")
    p.add_argument("--steps", type=int, default=0, help="stop after this many steps (0: budget only)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise-aug", type=float, default=0.05,
                   help="vae: latent noise in units of the latent's std; decoder: in SD15-scaled latent units")
    p.add_argument("--renders", type=int, default=24, help="unet: jittered renders per training caption")
    p.add_argument("--object-weight", type=float, default=3.0, help="unet: extra loss weight on object latents")
    p.add_argument("--save-every", type=float, default=5.0, help="minutes between checkpoints")
    p.add_argument("--eval-every", type=float, default=15.0, help="minutes between quick held-out evals (0: off)")
    p.add_argument("--resume", action="store_true", help="unet: start from the saved weights")
    p.add_argument("--unsaid-colour", type=float, default=0.0,
                   help="unet: fraction of the captions trained without their colour word")
    p.add_argument("--attention-loss", type=float, default=0.0,
                   help="unet: weight of the cross-attention localisation loss (0: off)")
    p.add_argument("--offset-noise", type=float, default=0.0,
                   help="unet: std of a per-image, per-channel constant added to the training noise")
    args = p.parse_args(argv)
    defaults = {"vae": (8, 1e-3), "unet": (32, 1e-3), "decoder": (8, 5e-4), "bench": (32, 1e-3)}[args.stage]
    args.batch = args.batch or defaults[0]
    args.lr = args.lr or defaults[1]
    torch.manual_seed(args.seed)
    {"vae": train_vae, "unet": train_unet, "decoder": train_decoder, "bench": bench}[args.stage](args)


if __name__ == "__main__":
    main()
