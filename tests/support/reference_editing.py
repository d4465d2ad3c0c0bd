"""Plain reference implementations of the official training-free editing algorithms, for numerical tests.

Everything here is written from the papers and from reading the official repositories; no code of theirs is
copied. Each function's docstring names the official behaviour it reproduces and where it was read:

* Prompt-to-Prompt -- google/prompt-to-prompt: ``ptp_utils.py`` (register_attention_control, get_word_inds,
  update_alpha_time_word, get_time_words_attention_alpha, diffusion_step), ``seq_aligner.py`` (global_align,
  get_aligned_sequences, get_mapper, get_replacement_mapper_), ``prompt-to-prompt_stable.ipynb`` and
  ``null_text_w_ptp.ipynb`` (LocalBlend, AttentionControl, AttentionStore, AttentionControlEdit,
  AttentionReplace, AttentionRefine, AttentionReweight, get_equalizer). The null-text flavour was read in the
  copy that cure-lab/PnPInversion ships as ``models/p2p/attention_control.py``.
* MasaCtrl -- TencentARC/MasaCtrl: ``masactrl/masactrl_utils.py`` (AttentionBase,
  regiter_attention_editor_diffusers), ``masactrl/masactrl.py`` (MutualSelfAttentionControl,
  MutualSelfAttentionControlUnion, MutualSelfAttentionControlMask, MutualSelfAttentionControlMaskAuto),
  ``masactrl/diffuser_utils.py`` (MasaCtrlPipeline.__call__).
* Plug-and-Play -- MichalGeyer/pnp-diffusers: ``pnp.py`` (PNP.denoise_step, init_pnp, run_pnp),
  ``pnp_utils.py`` (register_time, register_attention_control_efficient, register_conv_control_efficient).
* Direct inversion -- cure-lab/PnPInversion: ``models/p2p/inversion.py`` (DirectInversion.offset_calculate,
  prev_step), ``models/p2p/p2p_guidance_forward.py`` (direct_inversion_p2p_guidance_diffusion_step,
  direct_inversion_p2p_guidance_forward), ``models/p2p_editor.py`` (edit_image_directinversion).

Conventions shared by every function:

* ``unet`` is a diffusers ``UNet2DConditionModel`` (SD1.5 block layout); it is called as
  ``unet(latents, int(t), encoder_hidden_states=context).sample`` and must have the dtype of the inputs.
  Its attention processors are replaced for the duration of a call and restored afterwards.
* Deterministic DDIM (eta 0) in the alpha parameterisation: ``alphas[i]`` is alpha-bar at ``timesteps[i]``
  and ``alphas[len(timesteps)]`` the value after the last step (1.0 for the clean latent).
* Classifier-free guidance with the official batch layout: ``torch.cat([latents] * 2)`` and contexts
  ``[uncond rows..., cond rows...]``.
* Attention layers are counted in UNet call order (SD1.5: 16 transformer blocks, 32 attention calls per UNet
  call: attn1 then attn2 of each block; down 0-5, mid 6, up 7-15 as ``cur_att_layer // 2``).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "MAX_TOKENS",
    "ddim_step",
    "cfg_eps",
    "ddim_loop",
    "ddim_cfg_reference",
    "register_attention_control",
    "attention_control",
    "word_token_indices",
    "refinement_token_map",
    "swap_token_map",
    "time_word_alpha",
    "self_replace_window",
    "equalizer_table",
    "P2PController",
    "LocalBlend",
    "p2p_reference",
    "MasaCtrlController",
    "masactrl_reference",
    "pnp_reference",
    "direct_inversion_offsets",
    "direct_p2p_reference",
]

MAX_TOKENS = 77
STORE_MAX_QUERIES = 32 ** 2      # official AttentionStore keeps maps of layers with at most 32x32 queries
BLEND_RES = 16                   # official LocalBlend reads 16x16 cross-attention maps
MASACTRL_MAP_QUERIES = 16 * 16   # MutualSelfAttentionControlMaskAuto collects 16x16 cross-attention maps
MASACTRL_TOTAL_LAYERS = 16       # MutualSelfAttentionControl.MODEL_TYPE["SD"]


# =============================================================================================================
# DDIM sampling
# =============================================================================================================

def ddim_step(x: torch.Tensor, eps: torch.Tensor, alpha: float, alpha_next: float) -> torch.Tensor:
    """One deterministic DDIM step (eta 0) from alpha-bar ``alpha`` to ``alpha_next``.

    Same arithmetic, in the same order, as the official schedulers: diffusers ``DDIMScheduler.step`` (used by
    prompt-to-prompt's ``ptp_utils.diffusion_step`` and pnp-diffusers' ``PNP.denoise_step``), MasaCtrl's
    ``MasaCtrlPipeline.step`` and PnPInversion's ``DirectInversion.prev_step``::

        x0 = (x - (1 - a) ** 0.5 * eps) / a ** 0.5
        x_next = a_next ** 0.5 * x0 + (1 - a_next) ** 0.5 * eps
    """
    a, a_next = float(alpha), float(alpha_next)
    x0 = (x - (1.0 - a) ** 0.5 * eps) / a ** 0.5
    return a_next ** 0.5 * x0 + (1.0 - a_next) ** 0.5 * eps


def cfg_eps(unet, x: torch.Tensor, t: int, uncond_rows: torch.Tensor, cond_rows: torch.Tensor,
            guidance: float) -> torch.Tensor:
    """Classifier-free guided noise prediction for the items ``x`` (items, C, H, W).

    Official layout (``ptp_utils.diffusion_step`` without low_resource, MasaCtrl ``MasaCtrlPipeline.__call__``,
    PnPInversion ``direct_inversion_p2p_guidance_diffusion_step``): one UNet call on ``torch.cat([x] * 2)``
    with contexts ``torch.cat([uncond rows, cond rows])``; ``eps = eps_u + g * (eps_c - eps_u)``.
    """
    model_in = torch.cat([x] * 2)
    context = torch.cat([uncond_rows, cond_rows])
    out = unet(model_in, int(t), encoder_hidden_states=context).sample
    eps_u, eps_c = out.chunk(2)
    return eps_u + guidance * (eps_c - eps_u)


def ddim_loop(x: torch.Tensor, timesteps: Sequence[int], alphas: Sequence[float],
              eps_fn: Callable[[int, int, torch.Tensor], torch.Tensor],
              after_step: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The one sampling loop every reference uses.

    For step ``i`` at ``timesteps[i]``: ``eps = eps_fn(i, t, x)``, a DDIM step from ``alphas[i]`` to
    ``alphas[i + 1]``, then ``after_step(i, x)`` (the official ``controller.step_callback`` position: after the
    scheduler step, on the new latents).
    """
    if len(alphas) != len(timesteps) + 1:
        raise ValueError("alphas must have len(timesteps) + 1 entries")
    for i, t in enumerate(timesteps):
        eps = eps_fn(i, int(t), x)
        x = ddim_step(x, eps, alphas[i], alphas[i + 1])
        if after_step is not None:
            x = after_step(i, x)
    return x


def _rows(context, n: int) -> torch.Tensor:
    """A (n, L, C) context from one (1, L, C) tensor (repeated) or a list of n such tensors."""
    if isinstance(context, torch.Tensor):
        if context.shape[0] == n:
            return context
        if context.shape[0] == 1:
            return context.expand(n, *context.shape[1:])
        raise ValueError(f"context has {context.shape[0]} rows, expected 1 or {n}")
    rows = torch.cat(list(context))
    if rows.shape[0] != n:
        raise ValueError(f"{rows.shape[0]} context rows for {n} items")
    return rows


def _items(x_T: torch.Tensor, n: int) -> torch.Tensor:
    if x_T.shape[0] == n:
        return x_T
    if x_T.shape[0] == 1:
        return x_T.expand(n, *x_T.shape[1:]).clone()
    raise ValueError(f"x_T has {x_T.shape[0]} rows, expected 1 or {n}")


@torch.no_grad()
def ddim_cfg_reference(unet, conds, uncond, x_T: torch.Tensor, timesteps, alphas, guidance: float) -> torch.Tensor:
    """Plain classifier-free-guided DDIM sampling of independent items (no attention control).

    ``conds``: list of (1, L, C) per item (or an (items, L, C) tensor); ``uncond``: (1, L, C) for every item or
    one per item. This is what every official pipeline does when its controller is empty
    (prompt-to-prompt ``EmptyControl``, MasaCtrl ``AttentionBase``, PnP with empty injection schedules).
    """
    n = x_T.shape[0]
    cond_rows, uncond_rows = _rows(conds, n), _rows(uncond, n)
    return ddim_loop(x_T, timesteps, alphas,
                     lambda i, t, x: cfg_eps(unet, x, t, uncond_rows, cond_rows, guidance))


# =============================================================================================================
# Attention hooks
# =============================================================================================================

def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v without materialising the probabilities (mathematically identical)."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _probs(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention probabilities softmax(q k^T * scale) over the last axis, as the official processors compute
    them (``sim = einsum(q, k) * scale; attn = sim.softmax(-1)``)."""
    return (torch.matmul(q, k.transpose(-1, -2)) * scale).softmax(dim=-1)


class _HookedProcessor:
    """Replacement attention processor: computes q, k, v like diffusers' ``AttnProcessor`` and lets a handler
    produce the attention output.

    The handler is called as ``handler.attend(module, q, k, v, is_cross, place_in_unet)`` with q, k, v of shape
    (batch, heads, tokens, head_dim) and returns (batch, heads, queries, head_dim). ``is_cross`` is "a context
    was passed" exactly as in the official ``ca_forward`` (``is_cross = context is not None``), and
    ``place_in_unet`` is "down" / "mid" / "up" from the module's place in the UNet.
    """

    def __init__(self, handler, place_in_unet: str, name: str):
        self.handler = handler
        self.place_in_unet = place_in_unet
        self.name = name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 **kwargs):
        if attention_mask is not None:
            raise NotImplementedError("attention masks are not used by SD1.5 and not supported here")
        if (attn.spatial_norm is not None or attn.group_norm is not None or attn.residual_connection
                or attn.rescale_output_factor != 1.0 or hidden_states.ndim != 3
                or getattr(attn, "norm_q", None) is not None or getattr(attn, "norm_k", None) is not None):
            raise NotImplementedError(f"{self.name}: not an SD1.5 transformer attention")
        is_cross = encoder_hidden_states is not None
        context = encoder_hidden_states if is_cross else hidden_states
        if is_cross and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        q = attn.to_q(hidden_states)
        k = attn.to_k(context)
        v = attn.to_v(context)
        b, n_q, inner = q.shape
        h = attn.heads
        d = inner // h
        q = q.view(b, -1, h, d).transpose(1, 2)
        k = k.view(b, -1, h, d).transpose(1, 2)
        v = v.view(b, -1, h, d).transpose(1, 2)
        out = self.handler.attend(attn, q, k, v, is_cross, self.place_in_unet)
        out = out.transpose(1, 2).reshape(b, n_q, h * d)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        return out


def _place(name: str) -> str:
    if name.startswith("down_blocks"):
        return "down"
    if name.startswith("mid_block"):
        return "mid"
    if name.startswith("up_blocks"):
        return "up"
    raise ValueError(f"attention module outside the down/mid/up blocks: {name}")


def register_attention_control(unet, handler, names: Sequence[str] | None = None) -> Callable[[], None]:
    """Replace the processor of every attention module (attn1 = self, attn2 = cross, of every transformer
    block) by a hooked processor that hands q, k, v to ``handler``; returns a function that restores the
    original processors.

    Official counterpart: prompt-to-prompt ``ptp_utils.register_attention_control`` and MasaCtrl
    ``regiter_attention_editor_diffusers``: every attention module of the down, mid and up blocks is hooked
    with its place ("down"/"mid"/"up"), and ``controller.num_att_layers`` is set to the number of hooked modules
    (32 for SD1.5). ``names`` limits the hooks to those modules (pnp-diffusers hooks only some attn1).
    """
    from diffusers.models.attention_processor import Attention

    originals = []
    count = 0
    for name, module in unet.named_modules():
        if not isinstance(module, Attention):
            continue
        if names is not None and name not in names:
            continue
        originals.append((module, module.processor))
        module.set_processor(_HookedProcessor(handler, _place(name), name))
        count += 1
    if names is not None and count != len(set(names)):
        for module, proc in originals:
            module.set_processor(proc)
        raise ValueError("some attention modules to hook were not found")
    if hasattr(handler, "num_att_layers"):
        handler.num_att_layers = count

    def restore():
        for module, proc in originals:
            module.set_processor(proc)

    return restore


@contextlib.contextmanager
def attention_control(unet, handler, names: Sequence[str] | None = None):
    """``register_attention_control`` for the duration of a ``with`` block."""
    restore = register_attention_control(unet, handler, names)
    try:
        yield handler
    finally:
        restore()


# =============================================================================================================
# Prompt-to-Prompt: token maps and schedules
# =============================================================================================================

def word_token_indices(text: str, word_place, tokenizer) -> list[int]:
    """Token positions (in the tokenized prompt, 1 = first token after the start token) of a word.

    Reproduces ``ptp_utils.get_word_inds`` (google/prompt-to-prompt): the text is split on single spaces;
    ``word_place`` is a word (every space-separated word equal to it counts) or a word position; each token of
    ``tokenizer.encode(text)`` except start/end is decoded on its own (``decode([id]).strip("#")``) and its
    character count is added to the current word's count; the token belongs to the current word, and the
    pointer moves to the next word once the count reaches the word's length.
    """
    words = text.split(" ")
    if isinstance(word_place, str):
        places = [i for i, w in enumerate(words) if w == word_place]
    elif isinstance(word_place, int):
        places = [word_place]
    else:
        places = list(word_place)
    out: list[int] = []
    if not places:
        return out
    pieces = [tokenizer.decode([tid]).strip("#") for tid in tokenizer.encode(text)][1:-1]
    chars, ptr = 0, 0
    for i, piece in enumerate(pieces):
        chars += len(piece)
        if ptr in places:
            out.append(i + 1)
        if chars >= len(words[ptr]):
            ptr += 1
            chars = 0
    return out


_LEFT, _UP, _DIAG, _STOP = 1, 2, 3, 4


def refinement_token_map(source: str, target: str, tokenizer, max_len: int = MAX_TOKENS):
    """Refinement (AttentionRefine) token map: for every target key j, the source key it reads, and its alpha.

    Reproduces ``seq_aligner.get_mapper`` / ``global_align`` / ``get_aligned_sequences``: global alignment of
    ``tokenizer.encode(source)`` and ``tokenizer.encode(target)`` (with start and end tokens, no padding) with
    gap 0, match 1, mismatch -1; the first row/column are gaps (trace "left" on row 0, "up" on column 0);
    at a tie the move preference is left (target token added), then up (source token dropped), then diagonal;
    traceback from the bottom-right corner: diagonal -> target j reads source i, left -> target j is new
    (source -1, alpha 0), up -> source token skipped. Keys after the target's end token (padding) read the
    source key with the same index, alpha 1.

    Returns ``(mapper, alphas)``: int64 (max_len,) with -1 for added tokens, float (max_len,).
    """
    x = tokenizer.encode(source)
    y = tokenizer.encode(target)
    nx, ny = len(x), len(y)
    score = [[0] * (ny + 1) for _ in range(nx + 1)]    # gap score 0: the borders stay 0
    move = [[0] * (ny + 1) for _ in range(nx + 1)]
    for j in range(1, ny + 1):
        move[0][j] = _LEFT
    for i in range(1, nx + 1):
        move[i][0] = _UP
    move[0][0] = _STOP
    for i in range(1, nx + 1):
        for j in range(1, ny + 1):
            left = score[i][j - 1]
            up = score[i - 1][j]
            diag = score[i - 1][j - 1] + (1 if x[i - 1] == y[j - 1] else -1)
            best = max(left, up, diag)
            score[i][j] = best
            move[i][j] = _LEFT if best == left else (_UP if best == up else _DIAG)
    source_of_target: list[int] = []
    i, j = nx, ny
    while i > 0 or j > 0:
        m = move[i][j]
        if m == _DIAG:
            i, j = i - 1, j - 1
            source_of_target.append(i)
        elif m == _LEFT:
            j -= 1
            source_of_target.append(-1)
        elif m == _UP:
            i -= 1
        else:
            break
    source_of_target.reverse()
    assert len(source_of_target) == ny
    mapper = torch.tensor(source_of_target + list(range(ny, max_len)), dtype=torch.int64)
    alphas = torch.tensor([0.0 if s < 0 else 1.0 for s in source_of_target] + [1.0] * (max_len - ny))
    return mapper[:max_len], alphas[:max_len]


def swap_token_map(source: str, target: str, tokenizer, max_len: int = MAX_TOKENS) -> torch.Tensor:
    """Word-swap (AttentionReplace) map, a (max_len, max_len) matrix ``M[source key, target key]``; the edited
    target map is ``einsum('hpw,bwn->bhpn', source_map, M)``.

    Reproduces ``seq_aligner.get_replacement_mapper_``: both prompts are split on spaces and must have the
    same number of words; the words that differ are the replaced words; walking source token i and target
    token j from the start: at the first token of a replaced source word, if both words have the same token
    count their tokens are paired one-to-one, otherwise every target token of the word gets every source
    token of the word with weight 1 / (number of target tokens); other tokens map i -> j one-to-one.

    DELIBERATE FIX of an official bug: after the last replaced word the official loop writes ``mapper[j, j]``
    instead of ``mapper[i, j]``, so when a replaced word changes the token count every later token (and the
    end token) reads the wrong source key. Here later content tokens and the end token map to their own
    source tokens (i -> j), and only the padding keys after the target's end token read the source key with
    the same index (j -> j), which is what the official code does for them when token counts agree (with a
    source longer than the target, the official loop also stops before the last padding keys, leaving them
    with no source key at all; here every padding key j reads source key j).
    """
    words_x = source.split(" ")
    words_y = target.split(" ")
    if len(words_x) != len(words_y):
        raise ValueError(f"attention replacement edit can only be applied on prompts with the same length"
                         f" but prompt A has {len(words_x)} words and prompt B has {len(words_y)} words.")
    replaced = [w for w in range(len(words_y)) if words_y[w] != words_x[w]]
    src_inds = [word_token_indices(source, w, tokenizer) for w in replaced]
    tgt_inds = [word_token_indices(target, w, tokenizer) for w in replaced]
    if any(len(s) == 0 or len(t) == 0 for s, t in zip(src_inds, tgt_inds)):
        raise ValueError("a replaced word has no tokens")      # the official code fails on it too (IndexError)
    target_len = len(tokenizer.encode(target))      # start + tokens + end
    mapper = torch.zeros(max_len, max_len)
    i = j = 0
    r = 0
    while j < min(target_len, max_len) and i < max_len:
        if r < len(src_inds) and src_inds[r][0] == i:
            s_idx, t_idx = src_inds[r], tgt_inds[r]
            if len(s_idx) == len(t_idx):
                for a, b in zip(s_idx, t_idx):
                    mapper[a, b] = 1.0
            else:
                ratio = 1.0 / len(t_idx)
                for b in t_idx:
                    for a in s_idx:
                        mapper[a, b] = ratio
            r += 1
            i += len(s_idx)
            j += len(t_idx)
        else:
            mapper[i, j] = 1.0
            i += 1
            j += 1
    for jj in range(target_len, max_len):       # padding keys
        mapper[jj, jj] = 1.0
    return mapper


def time_word_alpha(prompts: Sequence[str], num_steps: int, cross_replace_steps, tokenizer,
                    max_len: int = MAX_TOKENS) -> torch.Tensor:
    """Cross-attention replacement window per step, target and token: (num_steps + 1, targets, 1, 1, max_len).

    Reproduces ``ptp_utils.get_time_words_attention_alpha`` / ``update_alpha_time_word``: a non-dict value is
    ``{"default_": value}``; a dict without "default_" gets ``(0., 1.)``; a number b means (0, b); bounds
    (start, end) set rows ``int(start * (num_steps + 1)) .. int(end * (num_steps + 1)) - 1`` to 1 and every
    other row to 0; "default_" is applied to every token of every target first, then each word key (looked up
    in each target prompt with ``get_word_inds``) overwrites the rows of its tokens. Row ``cur_step`` is used.
    """
    spec = dict(cross_replace_steps) if isinstance(cross_replace_steps, dict) else {"default_": cross_replace_steps}
    if "default_" not in spec:
        spec["default_"] = (0.0, 1.0)
    rows = num_steps + 1
    table = torch.zeros(rows, len(prompts) - 1, max_len)

    def apply(bounds, target, token_inds=None):
        if isinstance(bounds, (int, float)):
            bounds = (0.0, bounds)
        start, end = int(bounds[0] * rows), int(bounds[1] * rows)
        cols = torch.arange(max_len) if token_inds is None else torch.as_tensor(token_inds, dtype=torch.long)
        table[:, target, cols] = 0.0
        table[start:end, target, cols] = 1.0

    for tgt in range(len(prompts) - 1):
        apply(spec["default_"], tgt)
    for key, bounds in spec.items():
        if key == "default_":
            continue
        for tgt in range(len(prompts) - 1):
            inds = word_token_indices(prompts[tgt + 1], key, tokenizer)
            if len(inds) > 0:
                apply(bounds, tgt, inds)
    return table.reshape(rows, len(prompts) - 1, 1, 1, max_len)


def self_replace_window(num_steps: int, self_replace_steps) -> tuple[int, int]:
    """Steps where self-attention is replaced: ``lo <= cur_step < hi``.

    Reproduces ``AttentionControlEdit.__init__``: a number s means (0, s); the window is
    ``(int(num_steps * start), int(num_steps * end))``.
    """
    if isinstance(self_replace_steps, (int, float)):
        self_replace_steps = (0.0, self_replace_steps)
    return int(num_steps * self_replace_steps[0]), int(num_steps * self_replace_steps[1])


def equalizer_table(target_prompts: Sequence[str], equalizer: dict, tokenizer,
                    max_len: int = MAX_TOKENS) -> torch.Tensor:
    """Attention re-weighting factors, (targets, max_len): 1 everywhere, ``factor`` on the tokens of each word.

    Reproduces the notebook's ``get_equalizer(text, word_select, values)`` (tokens found with
    ``get_word_inds`` in the target prompt, ``equalizer[:, inds] = value``) with one row per target prompt,
    each built from its own prompt (the notebook builds one (1, 77) row from ``prompts[1]``).
    """
    rows = []
    for text in target_prompts:
        row = torch.ones(max_len)
        for word, factor in equalizer.items():
            inds = word_token_indices(text, word, tokenizer)
            if len(inds) > 0:
                row[torch.as_tensor(inds, dtype=torch.long)] = float(factor)
        rows.append(row)
    return torch.stack(rows)


# =============================================================================================================
# Prompt-to-Prompt: controller and local blend
# =============================================================================================================

class LocalBlend:
    """Official ``LocalBlend`` (null-text flavour, which contains the generated-image one).

    Read in ``prompt-to-prompt_stable.ipynb`` (LocalBlend.__call__) and ``null_text_w_ptp.ipynb``
    (LocalBlend.get_mask / __call__, same text in PnPInversion ``models/p2p/attention_control.py``). Called after
    every scheduler step with the attention store summed over all steps so far:

    * ``counter += 1``; blend only when ``counter > start`` (``start = int(start_blend * num_steps)``; the
      generated-image notebook blends after every step, i.e. start 0);
    * maps: cross-attention maps ``store["down_cross"][2:4] + store["up_cross"][:3]`` (the 16x16 ones), each
      reshaped (items, heads, 1, 16, 16, 77), concatenated over layers;
    * mask per item: ``(maps * word_alpha).sum(-1).mean(1)`` (sum over the word tokens, mean over heads and
      layers), 3x3 max-pool stride 1 pad 1, nearest interpolation to the latent size, divided by its max,
      ``> th[0]``; ``mask = mask[:1] + mask`` (target mask OR source mask);
    * subtract words (null-text notebook): the same without pooling, ``> th[1]``, OR-ed with the source's,
      and removed: ``mask = mask * ~sub``;
    * ``x_t = x_t[:1] + mask * (x_t - x_t[:1])``.

    The generated-image notebook computes ``mask[:1] + mask[1:]`` (items - 1 rows), which only broadcasts for
    two prompts and then gives the same result as ``mask[:1] + mask``.
    """

    def __init__(self, prompts, words, tokenizer, num_steps: int, subtract_words=None, threshold=(0.3, 0.3),
                 start_blend=None):
        self.word_alpha = self._alpha(prompts, words, tokenizer)
        self.sub_alpha = None if subtract_words is None else self._alpha(prompts, subtract_words, tokenizer)
        self.start = 0 if start_blend is None else int(start_blend * num_steps)
        self.th = (float(threshold), float(threshold)) if isinstance(threshold, (int, float)) else tuple(threshold)
        self.counter = 0

    @staticmethod
    def _alpha(prompts, words, tokenizer) -> torch.Tensor:
        alpha = torch.zeros(len(prompts), 1, 1, 1, 1, MAX_TOKENS)
        for i, (prompt, words_i) in enumerate(zip(prompts, words)):
            if isinstance(words_i, str):
                words_i = [words_i]
            for word in words_i:
                inds = word_token_indices(prompt, word, tokenizer)
                if len(inds) > 0:
                    alpha[i, :, :, :, :, torch.as_tensor(inds, dtype=torch.long)] = 1.0
        return alpha

    def _mask(self, maps: torch.Tensor, alpha: torch.Tensor, use_pool: bool, size) -> torch.Tensor:
        m = (maps * alpha.to(maps)).sum(-1).mean(1)                   # (items, 1, 16, 16)
        if use_pool:
            m = F.max_pool2d(m, (3, 3), (1, 1), padding=(1, 1))
        m = F.interpolate(m, size=size)                                # nearest
        m = m / m.max(2, keepdim=True)[0].max(3, keepdim=True)[0]
        m = m.gt(self.th[0] if use_pool else self.th[1])
        return m[:1] + m                                               # bool add = OR with the source's mask

    def __call__(self, x_t: torch.Tensor, attention_store: dict) -> torch.Tensor:
        self.counter += 1
        if self.counter <= self.start:
            return x_t
        n = self.word_alpha.shape[0]
        layers = attention_store["down_cross"][2:4] + attention_store["up_cross"][:3]
        maps = torch.cat([a.reshape(n, -1, 1, BLEND_RES, BLEND_RES, MAX_TOKENS) for a in layers], dim=1)
        mask = self._mask(maps, self.word_alpha, True, x_t.shape[2:])
        if self.sub_alpha is not None:
            mask = mask * ~self._mask(maps, self.sub_alpha, False, x_t.shape[2:])
        mask = mask.to(x_t.dtype)
        return x_t[:1] + mask * (x_t - x_t[:1])


class P2PController:
    """Official Prompt-to-Prompt attention controller (AttentionControl + AttentionStore + AttentionControlEdit
    with AttentionReplace / AttentionRefine / AttentionReweight), read in ``prompt-to-prompt_stable.ipynb`` and
    ``null_text_w_ptp.ipynb``.

    * ``__call__(attn, is_cross, place_in_unet)`` is called once per attention call with the probabilities of
      the CONDITIONAL half, (items * heads, queries, keys) (``attn[h // 2:] = self.forward(attn[h // 2:])``,
      LOW_RESOURCE False); ``attn`` is None when the call needs no probabilities (the processor then uses
      SDPA), which only advances the counters. Counters as ``AttentionControl.__call__``: ``cur_att_layer``
      counts calls; at ``num_att_layers`` it resets, ``cur_step += 1`` and ``between_steps()`` runs.
    * store (``AttentionStore.forward`` / ``between_steps``): maps with at most 32x32 queries are appended to
      ``step_store``; between steps the first step's lists become ``attention_store`` and later steps are
      added in place. Only cross-attention maps are kept (the official also keeps self-attention maps, which
      nothing reads). The stored tensor is the very tensor the edit then writes into, so targets' stored maps
      are the edited ones, as in the official code.
    * edit (``AttentionControlEdit.forward``): view as (items, heads, q, k); base = item 0, replace = items 1..;
      cross-attention at every layer: ``new = replace_cross(base, rep) * alpha_words + (1 - alpha_words) * rep``
      with ``alpha_words = cross_alpha[cur_step]``; self-attention only for ``lo <= cur_step < hi`` and only at
      layers with at most ``self_max_tokens`` queries: targets take the source's probabilities.
    """

    def __init__(self, n_items: int, cross_alpha: torch.Tensor, self_window: tuple[int, int],
                 self_max_tokens: int, replace_cross: Callable, local_blend: LocalBlend | None = None):
        self.batch_size = n_items
        self.cross_alpha = cross_alpha
        self.self_window = self_window
        self.self_max_tokens = self_max_tokens
        self.replace_cross = replace_cross
        self.local_blend = local_blend
        self.cur_step = 0
        self.cur_att_layer = 0
        self.num_att_layers = -1
        self.step_store = self._empty_store()
        self.attention_store: dict = {}

    @staticmethod
    def _empty_store() -> dict:
        return {"down_cross": [], "mid_cross": [], "up_cross": []}

    # -- hook side --------------------------------------------------------------------------------------------
    def _self_active(self, n_queries: int) -> bool:
        lo, hi = self.self_window
        return n_queries <= self.self_max_tokens and lo <= self.cur_step < hi

    def attend(self, module, q, k, v, is_cross, place_in_unet):
        b2, h, n_q, d = q.shape
        half = b2 // 2
        if is_cross or self._self_active(n_q):
            out_u = _sdpa(q[:half], k[:half], v[:half], module.scale)
            probs = _probs(q[half:], k[half:], module.scale)                 # (items, heads, q, k)
            probs = self(probs.reshape(half * h, n_q, -1), is_cross, place_in_unet)
            out_c = torch.matmul(probs.reshape(half, h, n_q, -1), v[half:])
            return torch.cat([out_u, out_c])
        self(None, is_cross, place_in_unet)
        return _sdpa(q, k, v, module.scale)

    # -- official controller -------------------------------------------------------------------------------------
    def __call__(self, attn, is_cross: bool, place_in_unet: str):
        if attn is not None:
            attn = self.forward(attn, is_cross, place_in_unet)
        self.cur_att_layer += 1
        if self.cur_att_layer == self.num_att_layers:
            self.cur_att_layer = 0
            self.cur_step += 1
            self.between_steps()
        return attn

    def forward(self, attn: torch.Tensor, is_cross: bool, place_in_unet: str) -> torch.Tensor:
        if is_cross and attn.shape[1] <= STORE_MAX_QUERIES:
            self.step_store[f"{place_in_unet}_cross"].append(attn)         # the tensor itself (edited below)
        n_q = attn.shape[1]
        if is_cross or self._self_active(n_q):
            h = attn.shape[0] // self.batch_size
            a = attn.view(self.batch_size, h, *attn.shape[1:])
            base, rep = a[0], a[1:]
            if is_cross:
                alpha_words = self.cross_alpha[self.cur_step].to(attn)      # (targets, 1, 1, keys)
                new = self.replace_cross(base, rep) * alpha_words + (1 - alpha_words) * rep
                a[1:] = new
            else:
                a[1:] = base.unsqueeze(0).expand(rep.shape[0], *base.shape)
        return attn

    def between_steps(self):
        if len(self.attention_store) == 0:
            self.attention_store = self.step_store
        else:
            for key in self.attention_store:
                for i in range(len(self.attention_store[key])):
                    self.attention_store[key][i] += self.step_store[key][i]
        self.step_store = self._empty_store()

    def step_callback(self, x_t: torch.Tensor) -> torch.Tensor:
        if self.local_blend is not None:
            x_t = self.local_blend(x_t, self.attention_store)
        return x_t


def _replace_fn(kind: str, prompts, tokenizer, dtype, device):
    """The ``replace_cross_attention`` of AttentionReplace / AttentionRefine (official notebooks)."""
    if kind == "replace":
        mapper = torch.stack([swap_token_map(prompts[0], p, tokenizer) for p in prompts[1:]]).to(device, dtype)

        def replace(base, rep):
            return torch.einsum("hpw,bwn->bhpn", base, mapper)
        return replace
    if kind == "refine":
        maps = [refinement_token_map(prompts[0], p, tokenizer) for p in prompts[1:]]
        mapper = torch.stack([m for m, _ in maps]).to(device)                              # (targets, keys)
        alphas = torch.stack([a for _, a in maps]).to(device, dtype)[:, None, None, :]     # (targets, 1, 1, keys)

        def refine(base, rep):
            # base[:, :, mapper] -> (heads, q, targets, keys); an added token's -1 reads the last key and is
            # multiplied by alpha 0, exactly as the official indexing does
            mapped = base[:, :, mapper].permute(2, 0, 1, 3)
            return mapped * alphas + rep * (1 - alphas)
        return refine
    raise ValueError(f"unknown edit {kind!r}")


def _p2p_run(unet, tokenizer, prompts, conds, uncond, x_T, timesteps, alphas, guidance, *, edit,
             cross_replace_steps, self_replace_steps, equalizer=None, prev=None, local_blend=None,
             self_max_tokens=16 * 16, offsets=None, trace=None):
    n = len(prompts)
    if len(conds) != n:
        raise ValueError("one cond per prompt")
    x = _items(x_T, n)
    num_steps = len(timesteps)
    dtype, device = x.dtype, x.device
    if edit == "reweight":
        if equalizer is None:
            raise ValueError("reweight needs an equalizer")
        eq = equalizer_table(prompts[1:], equalizer, tokenizer).to(device, dtype)          # (targets, keys)
        prev_fn = None if prev is None else _replace_fn(prev, prompts, tokenizer, dtype, device)

        def replace_cross(base, rep):
            if prev_fn is not None:
                base = prev_fn(base, rep)                  # (targets, heads, q, keys)
            else:
                base = base[None]                          # (1, heads, q, keys)
            return base * eq[:, None, None, :]
    else:
        if equalizer is not None or prev is not None:
            raise ValueError("equalizer / prev only apply to edit='reweight'")
        replace_cross = _replace_fn(edit, prompts, tokenizer, dtype, device)
    blend = None
    if local_blend is not None:
        blend = LocalBlend(prompts, local_blend["words"], tokenizer, num_steps,
                           subtract_words=local_blend.get("subtract_words"),
                           threshold=local_blend.get("threshold", (0.3, 0.3)),
                           start_blend=local_blend.get("start_blend"))
    controller = P2PController(
        n_items=n,
        cross_alpha=time_word_alpha(prompts, num_steps, cross_replace_steps, tokenizer).to(device),
        self_window=self_replace_window(num_steps, self_replace_steps),
        self_max_tokens=self_max_tokens,
        replace_cross=replace_cross,
        local_blend=blend,
    )
    cond_rows = _rows(conds, n)
    uncond_rows = _rows(uncond, n)

    def after_step(i, x_new):
        if offsets is not None:                            # direct inversion: source row only, before blending
            x_new = torch.cat([x_new[:1] + offsets[i], x_new[1:]])
        x_new = controller.step_callback(x_new)
        if trace is not None:
            trace.append(x_new.clone())
        return x_new

    with attention_control(unet, controller):
        out = ddim_loop(x, timesteps, alphas,
                        lambda i, t, xx: cfg_eps(unet, xx, t, uncond_rows, cond_rows, guidance), after_step)
    if controller.cur_att_layer != 0 or controller.cur_step != num_steps:
        raise RuntimeError("attention layer count out of step with the UNet calls")
    return out


@torch.no_grad()
def p2p_reference(unet, tokenizer, prompts, conds, uncond, x_T, timesteps, alphas, guidance, *, edit,
                  cross_replace_steps, self_replace_steps, equalizer=None, local_blend=None,
                  self_max_tokens=16 * 16, prev=None, trace=None) -> torch.Tensor:
    """Prompt-to-Prompt editing of generated latents: returns the final latents of all items (items, 4, H, W).

    Official: ``prompt-to-prompt_stable.ipynb`` (``run_and_display`` -> ``ptp_utils.text2image_ldm_stable``
    with AttentionReplace / AttentionRefine / AttentionReweight and LocalBlend) and, for the real-image
    variant, ``null_text_w_ptp.ipynb`` (``self_max_tokens=32 ** 2``, ``local_blend["start_blend"]`` and
    ``subtract_words``). See ``P2PController`` and ``LocalBlend`` for the behaviour.

    * ``prompts``: [source, target1, ...]; ``conds``: one (1, 77, C) encoding per prompt; ``uncond``: (1, 77, C)
      used for every item (a fixed null text; the null-text notebook's per-step optimised ones are not
      modelled); ``x_T``: (items, 4, H, W) or (1, 4, H, W) (the official expands one latent).
    * ``edit``: "replace" (word swap, ``swap_token_map``), "refine" (``refinement_token_map``) or "reweight"
      (``equalizer={word: factor}``, ``equalizer_table``; ``prev`` = "replace" / "refine" / None is the
      controller whose maps are re-weighted, the notebook's ``controller=`` argument).
    * ``cross_replace_steps``: number, (start, end) or dict with "default_" and word -> number / (start, end)
      (``time_word_alpha``); ``self_replace_steps``: number or (start, end) (``self_replace_window``).
    * ``local_blend``: None or dict(words=[[...] per prompt], subtract_words=None | [[...] per prompt],
      threshold=(0.3, 0.3), start_blend=None | fraction).
    * ``trace``: optional list that receives the latents after every step (after the blend).
    """
    return _p2p_run(unet, tokenizer, prompts, conds, uncond, x_T, timesteps, alphas, guidance, edit=edit,
                    cross_replace_steps=cross_replace_steps, self_replace_steps=self_replace_steps,
                    equalizer=equalizer, prev=prev, local_blend=local_blend, self_max_tokens=self_max_tokens,
                    trace=trace)


# =============================================================================================================
# MasaCtrl
# =============================================================================================================

class MasaCtrlController:
    """Official MasaCtrl attention editors (``masactrl/masactrl.py``) with ``AttentionBase`` counters
    (``masactrl/masactrl_utils.py``).

    Counters: every attention call runs ``forward`` then ``cur_att_layer += 1``; at ``num_att_layers`` (32) it
    resets, ``cur_step += 1`` and ``after_step()`` runs. A self-attention call is edited when
    ``cur_step in step_idx`` and ``cur_att_layer // 2 in layer_idx`` (defaults ``range(start_step, steps)`` and
    ``range(start_layer, 16)``); everything else is ordinary attention. The batch is [uncond source, uncond
    target, cond source, cond target] (CFG chunks), each chunk edited on its own.

    * "plain" (MutualSelfAttentionControl): every item's queries attend to item 0's keys and values.
    * "union" (MutualSelfAttentionControlUnion): the source keeps its own self-attention; the target's queries
      attend to the concatenation [source; target] of keys and values.
    * "mask" (MutualSelfAttentionControlMask): source as plain; with ``mask_s`` the target's logits against the
      source keys get ``mask_s`` (nearest-resized to the layer) as bias: foreground ``sim + m`` where m != 0 and
      the dtype's min where m == 0, background ``sim + m`` where m != 1 and min where m == 1; with ``mask_t``
      (nearest-resized) the target output is ``fg * mask_t + bg * (1 - mask_t)``.
    * "mask_auto" (MutualSelfAttentionControlMaskAuto): cross-attention probabilities of the 16x16-query layers
      are collected during the current step (mean over heads, all four rows) and cleared after each step; at an
      edited layer, once the current step has such maps, the maps are averaged over layers, the
      ``ref_token_idx`` / ``cur_token_idx`` tokens summed, each map min-max normalised; the cond-source map
      (row -2), nearest-resized and binarised ``>= thres``, masks the source keys (fg: ``sim + 1`` on mask 1,
      min on mask 0; bg: ``sim + 0`` on mask 0, min on mask 1); the cond-target map (row -1), resized and
      binarised, combines ``fg * m + bg * (1 - m)``. Before the first map of a step the target attends to the
      source unmasked.
    """

    def __init__(self, num_steps: int, *, start_step=4, start_layer=10, layer_idx=None, step_idx=None,
                 mode="plain", ref_token_idx=None, cur_token_idx=None, thres=0.1, mask_s=None, mask_t=None):
        if mode not in ("plain", "mask_auto", "mask", "union"):
            raise ValueError(f"unknown MasaCtrl mode {mode!r}")
        if mode == "mask" and mask_s is not None and mask_t is None:
            raise ValueError("the official MutualSelfAttentionControlMask needs mask_t whenever mask_s is given")
        self.mode = mode
        self.layer_idx = list(layer_idx) if layer_idx is not None else list(range(start_layer, MASACTRL_TOTAL_LAYERS))
        self.step_idx = list(step_idx) if step_idx is not None else list(range(start_step, num_steps))
        self.ref_token_idx = [1] if ref_token_idx is None else ref_token_idx
        self.cur_token_idx = [1] if cur_token_idx is None else cur_token_idx
        self.thres = thres
        self.mask_s = mask_s
        self.mask_t = mask_t
        self.cross_attns: list[torch.Tensor] = []
        self.cur_step = 0
        self.cur_att_layer = 0
        self.num_att_layers = -1

    # -- counters (AttentionBase.__call__) -------------------------------------------------------------------------
    def attend(self, module, q, k, v, is_cross, place_in_unet):
        out = self.forward(module.scale, q, k, v, is_cross)
        self.cur_att_layer += 1
        if self.cur_att_layer == self.num_att_layers:
            self.cur_att_layer = 0
            self.cur_step += 1
            self.after_step()
        return out

    def after_step(self):
        if self.mode == "mask_auto":
            self.cross_attns = []

    # -- editing ------------------------------------------------------------------------------------------------
    def forward(self, scale, q, k, v, is_cross):
        if self.mode == "mask_auto" and is_cross and q.shape[2] == MASACTRL_MAP_QUERIES:
            probs = _probs(q, k, scale)                                    # (rows, heads, q, keys)
            self.cross_attns.append(probs.mean(1))
            return torch.matmul(probs, v)
        if is_cross or self.cur_step not in self.step_idx or self.cur_att_layer // 2 not in self.layer_idx:
            return _sdpa(q, k, v, scale)
        chunks = [self._edit_chunk(scale, qc, kc, vc) for qc, kc, vc in zip(q.chunk(2), k.chunk(2), v.chunk(2))]
        return torch.cat(chunks)

    def _edit_chunk(self, scale, q, k, v):
        """One CFG chunk: q, k, v of shape (items, heads, n, d)."""
        n_items = q.shape[0]
        if self.mode == "plain":
            ks = k[:1].expand_as(k)
            vs = v[:1].expand_as(v)
            return _sdpa(q, ks, vs, scale)
        if n_items != 2:
            raise ValueError(f"MasaCtrl mode {self.mode!r} takes exactly [source, target]")
        out_s = _sdpa(q[:1], k[:1], v[:1], scale)
        if self.mode == "union":
            out_t = _sdpa(q[1:], torch.cat([k[:1], k[1:]], dim=2), torch.cat([v[:1], v[1:]], dim=2), scale)
            return torch.cat([out_s, out_t])
        res = int(round(q.shape[2] ** 0.5))
        if self.mode == "mask":
            if self.mask_s is None:
                out_t = _sdpa(q[1:], k[:1], v[:1], scale)
            else:
                m_s = F.interpolate(self.mask_s[None, None].to(q), (res, res)).flatten()
                out_fg, out_bg = self._fg_bg(scale, q[1:], k[:1], v[:1], m_s)
                m_t = F.interpolate(self.mask_t[None, None].to(q), (res, res)).reshape(-1, 1)
                out_t = out_fg * m_t + out_bg * (1 - m_t)
            return torch.cat([out_s, out_t])
        # mask_auto
        if len(self.cross_attns) == 0:
            return torch.cat([out_s, _sdpa(q[1:], k[:1], v[:1], scale)])
        m_s = self._auto_map(self.ref_token_idx)[-2]
        m_s = F.interpolate(m_s[None, None], (res, res)).flatten()
        m_s = (m_s >= self.thres).to(q.dtype)
        out_fg, out_bg = self._fg_bg(scale, q[1:], k[:1], v[:1], m_s)
        m_t = self._auto_map(self.cur_token_idx)[-1]
        m_t = F.interpolate(m_t[None, None], (res, res)).reshape(-1, 1)
        m_t = (m_t >= self.thres).to(q.dtype)
        return torch.cat([out_s, out_fg * m_t + out_bg * (1 - m_t)])

    @staticmethod
    def _fg_bg(scale, q, k, v, mask):
        """Target queries against source keys with the official additive masks (``attn_batch`` of the Mask /
        MaskAuto editors): fg adds ``mask`` where mask != 0 and the dtype's min where mask == 0; bg adds
        ``mask`` where mask != 1 and min where mask == 1."""
        sim = torch.matmul(q, k.transpose(-1, -2)) * scale                 # (1, heads, n, n)
        low = torch.finfo(sim.dtype).min
        bias_fg = mask.masked_fill(mask == 0, low)
        bias_bg = mask.masked_fill(mask == 1, low)
        out_fg = torch.matmul((sim + bias_fg).softmax(-1), v)
        out_bg = torch.matmul((sim + bias_bg).softmax(-1), v)
        return out_fg, out_bg

    def _auto_map(self, idx):
        """``aggregate_cross_attn_map``: mean over the collected layers, tokens ``idx`` summed (a list) or taken
        (an int), min-max normalised per row; (rows, 16, 16)."""
        maps = torch.stack(self.cross_attns, dim=1).mean(1)                # (rows, q, keys)
        res = int(round(maps.shape[-2] ** 0.5))
        maps = maps.reshape(-1, res, res, maps.shape[-1])
        image = maps[..., idx]
        if isinstance(idx, list):
            image = image.sum(-1)
        lo = image.min(dim=1, keepdim=True)[0].min(dim=2, keepdim=True)[0]
        hi = image.max(dim=1, keepdim=True)[0].max(dim=2, keepdim=True)[0]
        return (image - lo) / (hi - lo)


@torch.no_grad()
def masactrl_reference(unet, conds, uncond, x_T, timesteps, alphas, guidance, *, start_step=4, start_layer=10,
                       layer_idx=None, step_idx=None, mode="plain", ref_token_idx=None, cur_token_idx=None,
                       thres=0.1, mask_s=None, mask_t=None) -> torch.Tensor:
    """MasaCtrl synthesis of [source, target] (``conds``: two (1, 77, C) tensors); returns both final latents.

    Official: ``MasaCtrlPipeline.__call__`` (``masactrl/diffuser_utils.py``: CFG with ``torch.cat([latents] * 2)``
    and ``[uncond, cond]`` contexts) with the editor registered by ``regiter_attention_editor_diffusers``;
    the editors' behaviour is described in ``MasaCtrlController``. ``total_steps`` is ``len(timesteps)``;
    ``ref_token_idx`` / ``cur_token_idx`` default to the official ``[1]``; ``mask_s`` / ``mask_t`` are (h, w).
    """
    n = len(conds)
    x = _items(x_T, n)
    controller = MasaCtrlController(len(timesteps), start_step=start_step, start_layer=start_layer,
                                    layer_idx=layer_idx, step_idx=step_idx, mode=mode, ref_token_idx=ref_token_idx,
                                    cur_token_idx=cur_token_idx, thres=thres, mask_s=mask_s, mask_t=mask_t)
    cond_rows, uncond_rows = _rows(conds, n), _rows(uncond, n)
    with attention_control(unet, controller):
        out = ddim_loop(x, timesteps, alphas, lambda i, t, xx: cfg_eps(unet, xx, t, uncond_rows, cond_rows, guidance))
    if controller.cur_att_layer != 0 or controller.cur_step != len(timesteps):
        raise RuntimeError("attention layer count out of step with the UNet calls")
    return out


# =============================================================================================================
# Plug-and-Play
# =============================================================================================================

PNP_QK_MODULES = tuple(
    f"up_blocks.{res}.attentions.{block}.transformer_blocks.0.attn1"
    for res, blocks in ((1, (1, 2)), (2, (0, 1, 2)), (3, (0, 1, 2))) for block in blocks
)
PNP_CONV_MODULE = "up_blocks.1.resnets.1"


class _PnPInjection:
    """Handler for the hooked attn1 modules: while active, the target rows' q and k are the source row's."""

    def __init__(self):
        self.active = False

    def attend(self, module, q, k, v, is_cross, place_in_unet):
        if self.active and not is_cross:
            s = q.shape[0] // 3
            q = torch.cat([q[:s]] * 3)
            k = torch.cat([k[:s]] * 3)
        return _sdpa(q, k, v, module.scale)


@torch.no_grad()
def pnp_reference(unet, source_latents, source_context, cond, negative, timesteps, alphas, guidance, *,
                  pnp_f_t=0.8, pnp_attn_t=0.5, x_T=None) -> torch.Tensor:
    """Plug-and-Play feature and self-attention injection; returns the target's final latent (1, 4, H, W).

    Official (pnp-diffusers ``pnp.py`` PNP.run_pnp / init_pnp / denoise_step, ``pnp_utils.py``):

    * each step runs the UNet once on ``[source_latents[i], x, x]`` with contexts
      ``[source_context, negative, cond]`` (``source_context``: the empty prompt's encoding, the official
      ``pnp_guidance_embeds``); CFG on the last two rows only, DDIM step on ``x``; the source row's output is
      not used;
    * conv injection (``register_conv_control_efficient``): in ``up_blocks[1].resnets[1]`` the output of
      ``conv2`` (before the skip connection is added) of rows 1 and 2 is replaced by row 0's;
    * q/k injection (``register_attention_control_efficient``): in the self-attention (attn1) of
      ``up_blocks[1].attentions[1, 2]``, ``up_blocks[2].attentions[0, 1, 2]``, ``up_blocks[3].attentions[0, 1, 2]``
      the queries and keys of rows 1 and 2 are replaced by row 0's (values untouched);
    * schedules: ``timesteps[:int(n * pnp_f_t)]`` (conv) and ``timesteps[:int(n * pnp_attn_t)]`` (q/k), tested
      by timestep value, and, as in the official ``self.t in self.injection_schedule or self.t == 1000``, also
      whenever the timestep is 1000.

    ``source_latents[i]``: the inverted latent at ``timesteps[i]`` (1, 4, H, W). ``x_T``: the starting latent;
    the official starts from the inverted noise, which is the default ``source_latents[0]``.
    """
    n = len(timesteps)
    ts = [int(t) for t in timesteps]
    conv_schedule = ts[:int(n * pnp_f_t)]
    qk_schedule = ts[:int(n * pnp_attn_t)]
    x = source_latents[0] if x_T is None else x_T
    context = torch.cat([source_context, negative, cond])
    injection = _PnPInjection()
    conv_state = {"active": False}

    def conv2_hook(_module, _inputs, output):
        if conv_state["active"]:
            s = output.shape[0] // 3
            return torch.cat([output[:s]] * 3)
        return output

    conv2 = unet.get_submodule(PNP_CONV_MODULE).conv2
    handle = conv2.register_forward_hook(conv2_hook)

    def eps_fn(i, t, xx):
        conv_state["active"] = t in conv_schedule or t == 1000
        injection.active = t in qk_schedule or t == 1000
        model_in = torch.cat([source_latents[i], xx, xx])
        out = unet(model_in, t, encoder_hidden_states=context).sample
        _, eps_u, eps_c = out.chunk(3)
        return eps_u + guidance * (eps_c - eps_u)

    try:
        with attention_control(unet, injection, names=PNP_QK_MODULES):
            x = ddim_loop(x, timesteps, alphas, eps_fn)
    finally:
        handle.remove()
    return x


# =============================================================================================================
# Direct inversion + Prompt-to-Prompt
# =============================================================================================================

@torch.no_grad()
def direct_inversion_offsets(unet, source_cond, uncond, inversion_latents, timesteps, alphas, guidance):
    """Per-step offsets of direct inversion (PnPInversion ``DirectInversion.offset_calculate``).

    From ``inversion_latents[0]`` (the noisiest), the source branch (source prompt with the unconditional
    context, CFG ``guidance``, ordinary attention: ``register_attention_control(model, None)``) takes one DDIM
    step; ``offset[i] = inversion_latents[i + 1] - result``; the next latent is ``result + offset[i]``.
    Returns the list of offsets, (1, 4, H, W) each.
    """
    x = inversion_latents[0]
    offsets = []
    for i, t in enumerate(timesteps):
        eps = cfg_eps(unet, x, int(t), uncond, source_cond, guidance)
        rec = ddim_step(x, eps, alphas[i], alphas[i + 1])
        offset = inversion_latents[i + 1] - rec
        offsets.append(offset)
        x = rec + offset
    return offsets


@torch.no_grad()
def direct_p2p_reference(unet, tokenizer, prompts, conds, uncond, inversion_latents, timesteps, alphas, guidance,
                         trace=None, **p2p_kwargs) -> torch.Tensor:
    """Direct inversion + Prompt-to-Prompt ("directinversion+p2p"); returns the final latents of all items.

    Official (PnPInversion ``models/p2p_editor.py`` edit_image_directinversion,
    ``models/p2p/p2p_guidance_forward.py`` direct_inversion_p2p_guidance_forward / _diffusion_step): the offsets
    of ``direct_inversion_offsets`` are computed first; the P2P edit (``p2p_reference`` keywords) then starts
    every item from ``inversion_latents[0]`` and after each scheduler step adds ``offset[i]`` to the SOURCE ROW
    only (``torch.concat((latents[:1] + noise_loss[:1], latents[1:]))``), before the controller's
    ``step_callback`` (local blend); targets evolve freely. ``trace`` receives the latents after every step.

    ``self_max_tokens`` defaults to 32 ** 2 here: PnPInversion's controller (``models/p2p/attention_control.py``,
    ``AttentionControlEdit.replace_self_attention``) is the null-text notebook's, which replaces self-attention
    up to 32x32 queries.
    """
    p2p_kwargs.setdefault("self_max_tokens", 32 ** 2)
    offsets = direct_inversion_offsets(unet, conds[0], uncond, inversion_latents, timesteps, alphas, guidance)
    return _p2p_run(unet, tokenizer, prompts, conds, uncond, inversion_latents[0], timesteps, alphas, guidance,
                    offsets=offsets, trace=trace, **p2p_kwargs)
