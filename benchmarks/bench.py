"""GPU benchmark: each method's time and peak memory against the floor of plain sampling, in one process.

Full-size SD1.5 UNet layout through ComfyUI (random weights: speed and memory do not depend on them),
fp16, 512x512, 50 steps, CFG (batch 2). The floor of a row is the number of UNet evaluations the method
cannot avoid times the time of one plain UNet evaluation at the same batch, measured in the same run.

    bash benchmarks/run_on_device.sh python3 benchmarks/bench.py --budget 540     # the lent GPU machine
    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/bench.py [--rows inversion]  # any GPU, no time limit
    python benchmarks/bench.py --tiny --budget 120                               # CPU rehearsal of the script

ComfyUI and the models are built once; the row groups (GROUPS, in order of importance) run in that order.
Each row runs at least twice and as often as the budget allows (at most MAX_REPEATS, extra repeats limited
to EXTRA_SHARE of the budget) and reports its fastest run; a row whose two runs do not fit in what is left
of the budget (judged by its floor before it starts, by its first run after) is skipped. Rows marked as
comparisons (replicas of the official code, the eager fallback of a CUDA graph) run after every group's own
rows. A row that raises is reported with its error and the run goes on. The table is printed as it goes
and rewritten after every row to $OUT/bench.json and $OUT/bench.md (OUT defaults to ./bench_out), so a run
killed by a time limit keeps what it measured.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

MIN_REPEATS = 2
MAX_REPEATS = 5
EXTRA_SHARE = 0.015      # repeats beyond the second only while the row's runs stay within this share of the budget

SD15_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "use_temporal_attention": False,
    "use_temporal_resblock": False,
}


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Every size the rows use: the papers' settings at full size; --tiny shrinks them (a check of the script)."""
    side: int = 512            # image side in pixels
    steps: int = 50
    inner_steps: int = 10      # null-text inner iterations per step
    pano_width: int = 9        # MultiDiffusion panorama: width in windows of the image side,
    pano_stride: int = 8       # a window every 1/pano_stride of a window
    sync_width: int = 6        # SyncDiffusion panorama, the same way
    sync_stride: int = 4
    frames: int = 16           # keyframe attention and video editing
    epochs: int = 60           # P3S training epochs (of 4 references)
    masactrl_start: int = 4    # MasaCtrl's first step
    eval_repeats: int = 20     # evaluations in the median of one UNet evaluation


TINY = Sizes(side=64, steps=10, inner_steps=2, pano_width=3, pano_stride=2, sync_width=3, sync_stride=2, frames=4,
             epochs=1, masactrl_start=1, eval_repeats=5)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_sd15(device, dtype, config=SD15_UNET_CONFIG, seed=0):
    """A ModelPatcher with the SD1.5 UNet layout and seeded random weights (ComfyUI does not initialise)."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    model_config = comfy.supported_models.SD15(dict(config))
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({}, "", device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.diffusion_model.named_parameters():
            if "norm" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif p.ndim >= 2:
                p.normal_(0, 1.0 / p[0].numel() ** 0.5, generator=g)
            else:
                p.normal_(0, 0.02, generator=g)
    model.diffusion_model.to(dtype)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=torch.device("cpu"))


# ------------------------------------------------------------------------------------------------------------
# the table: rows, their statuses, the files
# ------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Row:
    """One line of the table. status: "ok", "check failed" (a check row), "error: ...", "skipped: <why>",
    "pending" (a comparison row waiting for the second pass) or "running" (in the files while it runs)."""
    group: str
    name: str
    kind: str = "measured"           # measured | derived (from other rows) | floor (one UNet evaluation)
    compare: bool = False
    status: str = "pending"
    seconds: float | None = None     # the fastest run (or a derived figure)
    first_s: float | None = None     # the first run (cold: allocator, kernels, graph capture)
    repeats: int = 0
    floor: float | None = None
    evals: int | None = None
    peak: int | None = None          # bytes, torch.cuda.max_memory_allocated over the runs
    note: str = ""
    trace: str = ""                  # the end of the traceback of an error
    out: Any = dataclasses.field(default=None, repr=False)   # the first run's result, for the rows after it

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def settled(self) -> bool:
        return self.status not in ("pending", "running")

    def as_json(self) -> dict:
        gib = None if self.peak is None else round(self.peak / 2**30, 3)
        x = self.seconds / self.floor if self.seconds is not None and self.floor else None
        return {"group": self.group, "row": self.name, "kind": self.kind, "compare": self.compare,
                "status": self.status, "seconds": self.seconds, "first_s": self.first_s, "repeats": self.repeats,
                "floor_s": self.floor,
                "x_floor": None if x is None else round(x, 3), "unet_evals": self.evals, "peak_gib": gib,
                "note": self.note, "trace": self.trace}


MD_HEADER = ("| row | time s | floor s | x floor | UNet evals | peak GiB | runs | status |\n"
             "|-----|--------|---------|---------|------------|----------|------|--------|")


def md_line(row: dict) -> str:
    """One Markdown table line of a row of the JSON (the printed table and bench.md use it)."""
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)
    status = row["status"] + (f"; {row['note']}" if row["note"] else "")
    return (f"| {row['row']} | {num(row['seconds'], '.3f')} | {num(row['floor_s'], '.3f')} "
            f"| {num(row['x_floor'], '.2f')} | {num(row['unet_evals'], 'd')} | {num(row['peak_gib'], '.2f')} "
            f"| {row['repeats'] or '-'} | {status.replace('|', '/')} |")


def markdown(report: dict) -> str:
    """bench.md: the run's description, then one table per row group."""
    meta = report["meta"]
    budget = "no budget" if meta["budget_s"] is None else f"budget {meta['budget_s']:g} s"
    lines = [f"{meta['device']}: {meta['label']}; {meta['size']}; torch {meta['torch']}, ComfyUI {meta['comfyui']}, "
             f"{meta['date']}; {budget}, {report['elapsed_s']:.0f} s used"
             f"{'' if report['finished'] else ' (unfinished: the run stopped during the rows marked running)'}"]
    group = None
    for row in report["rows"]:
        if row["group"] != group:
            group = row["group"]
            lines += ["", f"### {group}", "", MD_HEADER]
        lines.append(md_line(row))
    return "\n".join(lines) + "\n"


class Table:
    """The rows of a run in group order, printed as they settle; bench.json and bench.md rewritten on each change."""

    def __init__(self, out_dir: pathlib.Path, meta: dict, started: float):
        self.out_dir, self.meta, self.started = pathlib.Path(out_dir), meta, started
        self.rows: dict[tuple[str, str], Row] = {}
        self.finished = False
        self._printed_group = None

    def report(self) -> dict:
        return {"meta": self.meta, "finished": self.finished, "elapsed_s": round(time.monotonic() - self.started, 1),
                "rows": [r.as_json() for r in self.rows.values()]}

    def write(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        report = self.report()
        for name, text in (("bench.json", json.dumps(report, indent=1)), ("bench.md", markdown(report))):
            tmp = self.out_dir / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, self.out_dir / name)

    def settle(self, row: Row) -> None:
        """Print a row that got its final status and rewrite the files."""
        if row.group != self._printed_group:
            self._printed_group = row.group
            print(f"# {row.group}", flush=True)
        print(md_line(row.as_json()), flush=True)
        if row.trace:
            print(row.trace, file=sys.stderr, flush=True)
        self.write()


@dataclasses.dataclass
class Measured:
    """What a row's function returns when it times itself (part of its work is not the row's figure)."""
    seconds: float
    value: Any = None


def once(make: Callable[[], Any]) -> Callable[[], Any]:
    """make(), called on first use and remembered (setup that needs an earlier row's result)."""
    box = []

    def get():
        if not box:
            box.append(make())
        return box[0]
    return get


# ------------------------------------------------------------------------------------------------------------
# the bench: the model, the floors, the budgeted measurement of one row
# ------------------------------------------------------------------------------------------------------------

class Bench:
    def __init__(self, model, device, sizes: Sizes, context_dim: int, tiny: bool, table: Table,
                 deadline: float = math.inf, max_repeats: int = MAX_REPEATS, fail_rows=()):
        self.model, self.device, self.sizes, self.tiny, self.table = model, device, sizes, tiny, table
        self.latent_hw = (sizes.side // 8, sizes.side // 8)
        self.steps = sizes.steps
        self.deadline, self.budget = deadline, deadline - time.monotonic()
        self.max_repeats, self.fail_rows = max(max_repeats, MIN_REPEATS), set(fail_rows)
        self.group, self.second_pass = "", False
        self._evals: dict[int, float] = {}
        g = torch.Generator().manual_seed(0)
        self.positive = [[torch.randn(1, 77, context_dim, generator=g), {}]]
        self.negative = [[torch.randn(1, 77, context_dim, generator=g), {}]]
        self.clip = once(lambda: build_clip(tiny))          # on the CPU, shared by the groups that encode prompts
        self.lpips = once(lambda: add_random_lpips())       # a weights file

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def fresh_model(self, dtype):
        """Another model of the bench's layout (the tiny one is float32 whatever `dtype`)."""
        if self.tiny:
            from support.tiny_models import make_comfy_model
            return make_comfy_model(seed=0)
        return build_sd15(self.device, dtype)

    # --- floors ---------------------------------------------------------------------------------------------
    def unet_eval(self, batch):
        """Median seconds of one UNet evaluation at `batch`, measured once per run and batch."""
        repeats = self.sizes.eval_repeats
        if batch in self._evals:
            return self._evals[batch]
        import comfy.model_management
        comfy.model_management.load_models_gpu([self.model])
        inner = self.model.model
        dtype = self.model.model_dtype()
        x = torch.randn(batch, 4, *self.latent_hw, device=self.device, dtype=dtype)
        sigma = torch.full((batch,), 5.0, device=self.device)
        ctx = torch.randn(batch, 77, self.positive[0][0].shape[-1], device=self.device, dtype=dtype)
        times = []
        with torch.no_grad():
            for i in range(repeats + 3):
                sync(self.device)
                t = time.perf_counter()
                inner.apply_model(x, sigma, c_crossattn=ctx)
                sync(self.device)
                if i >= 3:
                    times.append(time.perf_counter() - t)
        self._evals[batch] = statistics.median(times)
        return self._evals[batch]

    def eval_row(self, batch, label="") -> float:
        """The row "one UNet evaluation, batch B" (a median of Sizes.eval_repeats); returns the seconds."""
        row = self._row(f"one UNet evaluation, batch {batch}{label}", "floor", False)
        if not row.settled:
            row.seconds = row.floor = self.unet_eval(batch)
            row.evals, row.repeats, row.status = 1, self.sizes.eval_repeats, "ok"
            self.table.settle(row)
        return row.seconds

    # --- rows -----------------------------------------------------------------------------------------------
    def _row(self, name, kind, compare) -> Row:
        key = (self.group, name)
        row = self.table.rows.get(key)
        if row is None:
            row = self.table.rows[key] = Row(self.group, name, kind, compare)
        return row

    def _due(self, row: Row, needs) -> bool:
        """Whether `row` is to be worked out now; if one of the rows it needs failed, it is settled as skipped."""
        if row.settled or row.compare != self.second_pass:
            return False
        missing = next((r for r in needs if not r.ok), None)
        if missing is not None:
            row.status = f"skipped: needs '{missing.name.strip()}' ({missing.status.split(';')[0]})"
            self.table.settle(row)
            return False
        return True

    def skip(self, name, reason, compare=False) -> Row:
        """A row that cannot run here (e.g. a CUDA graph on the CPU)."""
        row = self._row(name, "measured", compare)
        if not row.settled and row.compare == self.second_pass:
            row.status = f"skipped: {reason}"
            self.table.settle(row)
        return row

    def row(self, name: str, fn: Callable[[], Any], floor: float, evals: int, needs=(), compare=False,
            note: Callable[[Row], str] | None = None) -> Row:
        """Measure `fn` (one run of the row) as often as the budget allows, at least twice; `row.seconds` is the
        fastest run, `row.out` the first run's result (or Measured.value), `note(row)` the row's remark (what a
        check found). A row that does not fit twice in what is left, or that raises, is reported and skipped.
        compare=True: a comparison row, run in the second pass (after every group's own rows)."""
        row = self._row(name, "measured", compare)
        if not row.settled:
            row.floor, row.evals = floor, evals
        if not self._due(row, needs):
            return row
        left = self.left()
        if MIN_REPEATS * floor > left:
            row.status = (f"skipped: budget ({MIN_REPEATS} runs of at least the floor {floor:.3g} s do not fit in "
                          f"{max(left, 0):.0f} s left)")
            self.table.settle(row)
            return row
        if name in self.fail_rows:
            fn = _injected_failure
        row.status = "running"
        self.table.write()
        times, cost = [], 0.0
        try:
            while True:
                if self.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(self.device)
                sync(self.device)
                start = time.perf_counter()
                out = fn()
                sync(self.device)
                wall = time.perf_counter() - start
                cost += wall
                if self.device.type == "cuda":
                    row.peak = max(row.peak or 0, torch.cuda.max_memory_allocated(self.device))
                seconds, out = (out.seconds, out.value) if isinstance(out, Measured) else (wall, out)
                if not times:
                    row.out, row.first_s = out, seconds
                times.append(seconds)
                row.seconds, row.repeats = min(times), len(times)
                more = wall <= self.left() and (len(times) < MIN_REPEATS or (
                    len(times) < self.max_repeats and cost + wall <= EXTRA_SHARE * self.budget))
                if not more:
                    break
            if len(times) < MIN_REPEATS:      # its one run is in first_s, not a figure of the table
                row.status = (f"skipped: budget (its first run took {wall:.3g} s, {max(self.left(), 0):.0f} s "
                              f"left)")
                row.seconds = None
            else:
                row.status = "ok"
        except Exception as error:  # reported in the table; the run goes on
            row.status = f"error: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
            row.trace = "".join(traceback.format_exception(error)[-6:]).rstrip()[-1500:]
            row.out = None
        if note is not None and row.ok:
            try:
                row.note = note(row)
            except Exception as error:
                row.note = f"(its note failed: {type(error).__name__}: {error})"[:300]
        self.table.settle(row)
        return row

    def derived(self, name: str, compute: Callable[[], tuple], floor: float, evals: int, needs=(),
                compare=False) -> Row:
        """A row worked out from other rows: compute() -> (seconds, peak bytes or None)."""
        row = self._row(name, "derived", compare)
        if not row.settled:
            row.floor, row.evals = floor, evals
        if self._due(row, needs):
            try:
                row.seconds, row.peak = compute()
                row.status = "ok"
            except Exception as error:
                row.status = f"error: {type(error).__name__}: {error}"[:300]
            self.table.settle(row)
        return row

    def check(self, name: str, verdict: Callable[[], tuple[bool, str]], needs=()) -> Row:
        """A row that states a check's result from other rows: verdict() -> (passed, what was compared)."""
        row = self._row(name, "derived", False)
        if self._due(row, needs):
            try:
                passed, row.note = verdict()
                row.status = "ok" if passed else "check failed"
            except Exception as error:
                row.status = f"error: {type(error).__name__}: {error}"[:300]
            self.table.settle(row)
        return row

    # --- runs the rows time -----------------------------------------------------------------------------------
    def sampling(self, model=None, sampler="euler", cfg=7.5, batch=1, scheduler="normal", positive=None):
        """One full ComfyUI sampling run (the KSampler path), as a row's function."""
        import comfy.sample
        model = model or self.model
        latent = torch.zeros(batch, 4, *self.latent_hw)
        noise = comfy.sample.prepare_noise(latent, 0)
        return lambda: comfy.sample.sample(model, noise, self.steps, cfg, sampler, scheduler, positive or self.positive,
                                           self.negative, latent, seed=0, disable_pbar=True)

    def guided(self, guider, sampler="euler"):
        """SamplerCustomAdvanced's path with `guider` on a one-image latent, as a row's function."""
        import comfy.sample
        import comfy.samplers
        latent = torch.zeros(1, 4, *self.latent_hw)
        noise = comfy.sample.prepare_noise(latent, 0)
        sigmas = comfy.samplers.calculate_sigmas(self.model.get_model_object("model_sampling"), "normal", self.steps)
        return lambda: guider.sample(noise, latent, comfy.samplers.sampler_object(sampler), sigmas, disable_pbar=True,
                                    seed=0)

    def clock(self, fn) -> float:
        """Seconds of fn() (device synchronised), for a row that times part of its work itself."""
        sync(self.device)
        start = time.perf_counter()
        fn()
        sync(self.device)
        return time.perf_counter() - start


def _injected_failure():
    raise RuntimeError("injected failure (test hook)")


def peak_of(*rows: Row):
    peaks = [r.peak for r in rows if r.peak is not None]
    return max(peaks) if peaks else None


# ------------------------------------------------------------------------------------------------------------
# the row groups, in order of importance
# ------------------------------------------------------------------------------------------------------------

def host_kernel_patch(model, sites):
    """attn1/attn2 replace patches that only call ComfyUI's own kernel: the cost of ComfyUI's patch path."""
    import comfy.ldm.modules.attention as attention

    def patch(q, k, v, extra_options):
        return attention.optimized_attention(q, k, v, extra_options["n_heads"],
                                             attn_precision=extra_options.get("attn_precision"),
                                             transformer_options=extra_options)
    patched = model.clone()
    for site in sites:
        setter = patched.set_model_attn1_replace if site.kind == "self" else patched.set_model_attn2_replace
        setter(patch, site.block, site.block_id, site.index)
    return patched


def rows_foundation(b: Bench):
    """Plain sampling, the mechanism with a controller that does nothing, and attention-map capture."""
    from editkit.core.attention import AttentionController
    from editkit.core.capture import AttentionMapCapture
    from editkit.nodes.comfy_attention import attach_controller as attach, attention_sites
    floor = b.steps * b.eval_row(2)
    kernel_patched = host_kernel_patch(b.model, attention_sites(b.model))
    for name, model in (("plain sampling, euler, CFG", b.model),
                        ("replace patches calling the host kernel", kernel_patched),
                        ("mechanism installed, no-op controller", attach(b.model, AttentionController())),
                        ("attention-map capture (cross, <=32x32)", attach(b.model, AttentionMapCapture()))):
        b.row(name, b.sampling(model), floor, b.steps)


def reference_null_text(eps_fn, latents, sigmas, cond, uncond, guidance, inner_steps):
    """Cost replica of the reference implementation (Mokady et al.'s code on a diffusers pipeline): float32
    weights that require grad (so every backward also computes weight gradients), and a batch-2 pass at
    the end of each step recomputing the conditional prediction."""
    from editkit.core.inversion import cfg, guided_eps
    from editkit.core.schedule import euler_sigma_step
    sig = [float(s) for s in sigmas]
    embedding, x = uncond.clone(), latents[0]
    for i in range(len(sig) - 1):
        with torch.no_grad():
            eps_c = eps_fn(x[None], sig[i], cond)[0]
        embedding = embedding.detach().requires_grad_(True)
        opt = torch.optim.Adam([embedding], lr=1e-2 * (1 - i / 100))
        for _ in range(inner_steps):
            eps_u = eps_fn(x[None], sig[i], embedding)[0]
            loss = torch.nn.functional.mse_loss(euler_sigma_step(x, cfg(eps_c, eps_u, guidance), sig[i], sig[i + 1]),
                                                latents[i + 1])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            x = euler_sigma_step(x, guided_eps(eps_fn, x, sig[i], cond, embedding.detach(), guidance), sig[i], sig[i + 1])


def rows_inversion(b: Bench):
    """Each inversion mode through the node's code path (floors in UNet evaluations at batch 1), and the check that
    null-text's inner step replayed from a CUDA graph does what the eager step does (check_null_text_graph.py).
    On the CPU the CUDA-graph rows are skipped and the eager ones are the main rows."""
    import comfy.samplers
    import check_null_text_graph as check
    from editkit.core.inversion import NullTextSettings, ddim_invert, null_text_optimise
    from editkit.nodes.inversion import ComfyEps, graph_replayable
    inner_steps, n = b.sizes.inner_steps, b.steps
    eps = ComfyEps(b.model)
    graph = graph_replayable(b.model)
    no_graph = f"CUDA graph not replayable on this device ({b.device.type})"
    t_eval1 = b.eval_row(1)
    sigmas = comfy.samplers.calculate_sigmas(b.model.get_model_object("model_sampling"), "ddim_uniform", n).float()
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, *b.latent_hw, generator=g).to(b.device)
    cond = b.positive[0][0].to(b.device)
    uncond = b.negative[0][0].to(b.device)
    ddim = b.row("inversion: ddim / direct / negative_prompt", lambda: ddim_invert(eps, x0, sigmas, cond),
                 n * t_eval1, n)
    settings = NullTextSettings(inner_steps=inner_steps, early_stop=0.0, early_stop_growth=0.0)
    # per step: conditional pass, `inner_steps` unconditional passes with their backward (~2 passes), final pass
    evals = n + n * (2 + 3 * inner_steps)

    def null_text(cuda_graph):
        def run():
            latents = ddim_invert(eps, x0, sigmas, cond)
            with torch.enable_grad():
                return null_text_optimise(eps, latents, sigmas, cond, uncond, 7.5, settings, cuda_graph=cuda_graph)[1]
        return run
    graph_note = lambda row: f"cuda_graph {row.out['cuda_graph']}"   # noqa: E731
    name = f"inversion: null_text ({inner_steps} inner, CUDA graph)"
    if graph:
        b.row(name, null_text(True), evals * t_eval1, evals, note=graph_note)
    else:
        b.skip(name, no_graph)
    b.row(f"inversion: null_text ({inner_steps} inner, eager)", null_text(False), evals * t_eval1, evals,
          compare=graph, note=graph_note)

    # the CUDA-graph check: ten inner iterations of the first step, eagerly and replayed, from the same start
    iterations = 10
    inner = {}
    for how in ("eager", "CUDA graph"):
        name = f"null-text check: {iterations} inner iterations, {how}"
        if how == "CUDA graph" and not graph:
            b.skip(name, no_graph)
            continue
        inner[how] = b.row(name, lambda how=how: Measured(*check.inner_iterations(
            eps, ddim.out, sigmas, cond, uncond, how == "CUDA graph", iterations)), 3 * iterations * t_eval1,
            3 * iterations, needs=[ddim], note=lambda row: f"{1000 * row.seconds / iterations:.1f} ms per iteration")
    # the node under inference mode, as ComfyUI's executor runs it: time, whether the graph was used, each one's
    # reconstruction error (plain DDIM inversion's for comparison)
    node = {}
    for how, mode, floor_evals in (("CUDA graph", "null_text", evals), ("eager", "null_text", evals),
                                   ("ddim", "ddim", n)):
        name = f"null-text check: Invert Image node, {how}"
        if how == "CUDA graph" and not graph:
            b.skip(name, no_graph)
            continue
        node[how] = b.row(name, check.node_run(b.model, cond, uncond, x0, mode, how == "CUDA graph", n, inner_steps),
                          floor_evals * t_eval1, floor_evals, compare=graph and how == "eager",
                          note=lambda row: check.node_note(b.model, row.out, cond, uncond, x0))
    if graph:
        b.check("null-text check: graph agrees with eager, node uses it",
                lambda: check.verdict(inner["eager"].out, inner["CUDA graph"].out, uncond, node["CUDA graph"].out),
                needs=[inner["eager"], inner["CUDA graph"], node["CUDA graph"]])
    else:
        b.skip("null-text check: graph agrees with eager, node uses it", no_graph)

    def reference():
        model = reference_model()
        model.model.diffusion_model.requires_grad_(True)
        ref_eps = ComfyEps(model)
        latents = ddim_invert(eps, x0, sigmas, cond)
        with torch.enable_grad():
            reference_null_text(ref_eps, latents, sigmas, cond, uncond, 7.5, inner_steps)
    reference_model = once(lambda: b.fresh_model(torch.float32))
    b.row("  reference null-text cost (fp32, weight grads)", reference, evals * t_eval1, evals, compare=True)


def rows_attention_control(b: Bench):
    """Prompt-to-Prompt and MasaCtrl pairs (source + target, CFG: batch 4 per evaluation) against the floor of
    one batch-4 evaluation per step, and plain two-image sampling for the memory comparison."""
    from editkit.core.prompt2prompt import LocalBlend, MutualSelfAttention, PromptKeys, PromptToPrompt, TargetEdit
    from editkit.core.tokens import TokenMap
    from editkit.nodes.comfy_attention import attach_controller as attach
    from editkit.nodes.pair_guider import PairCFGGuider
    floor = b.steps * b.eval_row(4)
    b.row("plain sampling of two images, euler, CFG", b.sampling(batch=2), floor, b.steps)
    g = torch.Generator().manual_seed(2)
    width = b.positive[0][0].shape[-1]
    contexts = [torch.randn(1, 77, width, generator=g) for _ in range(2)]
    negative = b.negative[0][0]
    identity = TokenMap.one_to_one(tuple(range(77)), (True,) * 77, 77)
    windows = [(0.0, 0.8)] * 77
    windows[5] = (0.0, 0.4)
    swap = PromptToPrompt(targets=(TargetEdit(identity, tuple(windows)),), self_window=(0.0, 0.4))
    capped = PromptToPrompt(targets=(TargetEdit(identity, tuple(windows)),), self_window=(0.0, 0.4),
                            max_tokens=32 * 32)
    blend = LocalBlend(keys=(PromptKeys(77, (5,)), PromptKeys(77, (5,))))
    layers, start = frozenset(range(10, 16)), b.sizes.masactrl_start
    masa = MutualSelfAttention(start_step=start, layers=layers)
    masked = MutualSelfAttention(start_step=start, layers=layers,
                                 mask_keys=(PromptKeys(77, (2,)), PromptKeys(77, (2,))))
    cases = [("pair guider, no edit", [], None),
             ("P2P word swap (cross 0.8 at every layer, self 0.4)", [swap], None),
             ("P2P word swap, cross capped at 32x32", [capped], None),
             ("P2P word swap + local blend", [swap, blend], blend),
             (f"MasaCtrl (step {start}, layers 10-15)", [masa], None),
             ("MasaCtrl with a word mask (every layer)", [masked], None)]
    for name, controllers, local_blend in cases:
        model = b.model
        for c in controllers:
            model = attach(model, c)
        b.row(name, b.guided(PairCFGGuider(model, contexts, negative, 7.5, local_blend=local_blend)), floor, b.steps)


def rows_feature_injection(b: Bench):
    """Plug-and-Play translation of a photo: our direct inversion (n steps) plus the batched source + target
    translation (batch 4 per step), against the reference pipeline's cost: an inversion of 20x the steps
    (1000 for 50) at batch 1, then source + target with CFG at batch 3 per step."""
    import comfy.samplers
    from editkit.core.inversion import Inversion, ddim_invert
    from editkit.core.plug_and_play import PlugAndPlay
    from editkit.nodes.comfy_attention import attach_controller
    from editkit.nodes.inversion import ComfyEps
    from editkit.nodes.pair_guider import PairCFGGuider
    t_eval1, t_eval3 = b.unet_eval(1), b.unet_eval(3)
    t_eval4 = b.eval_row(4)
    model_sampling = b.model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(model_sampling, "ddim_uniform", b.steps).float().cpu()
    n = sigmas.shape[0] - 1
    eps = ComfyEps(b.model)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(4, *b.latent_hw, generator=g).to(b.device)
    empty = b.negative[0][0]
    inverted = b.row(f"direct inversion ({n} steps, empty prompt)",
                     lambda: ddim_invert(eps, x0, sigmas, empty.to(b.device)), n * t_eval1, n)
    model = attach_controller(b.model, PlugAndPlay())

    def make_guider():
        inversion = Inversion(mode="direct", sigmas=sigmas, latents=inverted.out.cpu(), guidance=7.5,
                              source_context=empty, negative_context=empty)
        guider = PairCFGGuider(model, [empty, b.positive[0][0]], None, 7.5, inversion=inversion,
                               target_negative=b.negative[0][0], pin_source=True)
        return guider, inversion.noised[None]
    guider = once(make_guider)

    def translate():
        pair, noised = guider()
        return pair.sample(torch.zeros_like(noised), noised, comfy.samplers.sampler_object("ddim"), sigmas,
                           disable_pbar=True, seed=0)
    pnp = b.row("PnP translation, source + target batched", translate, n * t_eval4, n, needs=[inverted])
    b.derived("  our total: inversion + translation", lambda: (inverted.seconds + pnp.seconds, peak_of(inverted, pnp)),
              n * (t_eval1 + t_eval4), 2 * n, needs=[inverted, pnp])
    long_sigmas = comfy.samplers.calculate_sigmas(model_sampling, "ddim_uniform", 20 * n).float().cpu()
    long_n = long_sigmas.shape[0] - 1
    b.row(f"  reference: {long_n}-step inversion + {n} steps",
          lambda: Measured(b.clock(lambda: ddim_invert(eps, x0, long_sigmas, empty.to(b.device))) + n * t_eval3),
          n * (t_eval1 + t_eval4), long_n + n, compare=True)


SD_VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                   "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def build_vae(device, dtype, tiny: bool):
    """The SD VAE layout with seeded random weights (the tiny test VAE with --tiny)."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from support.tiny_models import _generator, init_weights_, make_comfy_vae
    if tiny:
        return make_comfy_vae(seed=0)
    ae = AutoencoderKL(ddconfig=dict(SD_VAE_DDCONFIG), embed_dim=4)
    init_weights_(ae, _generator(0, "vae"))
    return comfy.sd.VAE(sd=ae.state_dict(), device=device, dtype=dtype,
                        config={"params": {"ddconfig": dict(SD_VAE_DDCONFIG), "embed_dim": 4}})


def add_random_lpips():
    """Random LPIPS weights in a temporary folder ComfyUI looks in; their file name (SyncDiffusion's input)."""
    from support.comfy_host import add_random_lpips as add
    return add(tempfile.mkdtemp(prefix="editkit-lpips-"))


def rows_latent_fuser(b: Bench):
    """MultiDiffusion panorama of 9x the square size (512x4608 at full size), windows of the square size every
    1/8 of it (the paper's 64 and 8 latents), ddim, against its floor (window batches x steps UNet evaluations
    at the batch they run at) and against the official loop (one window per UNet call); then SyncDiffusion's
    extra cost per synchronised step on a 6x panorama with stride 1/4 (its paper's 512x3072, stride 16)."""
    import comfy.sample
    from editkit.nodes.latent_fuser import LatentFuserNode
    s = b.sizes
    side = b.latent_hw[0]
    window_px, n = side * 8, b.steps

    def panorama(model, width_factor):
        latent = torch.zeros(1, 4, side, side * width_factor)
        noise = comfy.sample.prepare_noise(latent, 0)
        return lambda: comfy.sample.sample(model, noise, n, 7.5, "ddim", "ddim_uniform", b.positive, b.negative, latent,
                                           seed=0, disable_pbar=True)

    def fuser(window_batch, stride_px, mode=None, vae=None):
        return LatentFuserNode.execute(b.model, window_px, stride_px, window_batch, False,
                                       mode or {"mode": "multidiffusion"}, 0.0, 0, vae=vae).result[0]

    vae = once(lambda: build_vae(b.device, torch.float16, b.tiny))
    stride = side // s.pano_stride
    windows = (s.pano_width * side - side) // stride + 1
    t_eval2 = b.eval_row(2, " (a window)")
    for window_batch in (4, 8, 16):            # the default, 8, is the main row; the others compare with it
        calls = math.ceil(windows / window_batch)
        floor = calls * n * b.unet_eval(2 * window_batch)
        b.row(f"panorama 1x{s.pano_width}, {windows} windows, batch {window_batch}",
              panorama(fuser(window_batch, window_px // s.pano_stride), s.pano_width), floor, calls * n,
              compare=window_batch != 8)

    def official_loop():
        """The official panorama loop's cost: a CFG UNet call per window, its step, value / count."""
        import comfy.model_management
        import comfy.samplers
        comfy.model_management.load_models_gpu([b.model])
        inner, dtype = b.model.model, b.model.model_dtype()
        sigmas = comfy.samplers.calculate_sigmas(b.model.get_model_object("model_sampling"), "ddim_uniform", n)
        context = torch.cat([b.negative[0][0], b.positive[0][0]]).to(b.device, dtype)
        x = torch.randn(1, 4, side, s.pano_width * side, device=b.device) * float(sigmas[0])
        with torch.no_grad():
            for i in range(n):
                sigma, following = float(sigmas[i]), float(sigmas[i + 1])
                value, count = torch.zeros_like(x), torch.zeros_like(x)
                for left in range(0, (s.pano_width - 1) * side + 1, stride):
                    view = x[..., left:left + side]
                    out = inner.apply_model(torch.cat([view] * 2).to(dtype), torch.full((2,), sigma, device=b.device),
                                            c_crossattn=context).float()
                    denoised = out[0:1] + 7.5 * (out[1:2] - out[0:1])
                    value[..., left:left + side] += view + (following - sigma) / sigma * (view - denoised)
                    count[..., left:left + side] += 1
                x = value / count
    b.row("official loop: one window per call", official_loop, windows * n * t_eval2, windows * n, compare=True)

    sync_windows = (s.sync_width * side - side) // (side // s.sync_stride) + 1
    sync_steps = max(1, int(0.2 * n))          # the paper's 10 of 50 (at least one in a short --tiny run)
    sync_calls = math.ceil(sync_windows / 8)
    plain = b.row(f"panorama 1x{s.sync_width}, {sync_windows} windows, batch 8",
                  panorama(fuser(8, window_px // s.sync_stride), s.sync_width), sync_calls * n * b.unet_eval(16),
                  sync_calls * n)
    for sync_batch in (1, 4):
        def synced(sync_batch=sync_batch):
            mode = {"mode": "syncdiffusion", "lpips": b.lpips(), "sync_until": (sync_steps + 0.5) / n,
                    "sync_weight": 20.0, "sync_decay": 0.95, "sync_every": 1, "sync_batch": sync_batch}
            return panorama(fuser(8, window_px // s.sync_stride, mode, vae()), s.sync_width)
        run = once(synced)
        # floor: plain fused sampling; of the extra, a forward and a backward (about 2 evaluations) per moved
        # window (VAE not counted)
        floor = plain.seconds if plain.ok else sync_calls * n * b.unet_eval(16)
        synced_row = b.row(f"  + sync, {sync_steps} steps, sync_batch {sync_batch}", lambda: run()(), floor,
                           sync_calls * n)
        b.derived(f"    extra per sync step, sync_batch {sync_batch}",
                  lambda synced_row=synced_row: ((synced_row.seconds - plain.seconds) / sync_steps, None),
                  (sync_windows - 1) * 2 * t_eval2, 2 * (sync_windows - 1), needs=[plain, synced_row])


def rows_keyframe(b: Bench):
    """Keyframe attention alone on 16 frames (a batch of 16 latents, CFG: batch 32 per evaluation) against plain
    batched sampling of the same frames; the floor is the steps' evaluations at batch 32."""
    from editkit.nodes.keyframe_attention import KeyframeAttentionNode
    frames, n = b.sizes.frames, b.steps
    floor = n * b.eval_row(2 * frames)
    b.row(f"plain sampling, {frames} frames batched", b.sampling(batch=frames), floor, n)
    for mode in ("first", "first_and_previous", "all"):
        model = KeyframeAttentionNode.execute(b.model, {"mode": mode}, "", 0.0, 1.0, 0).result[0]
        b.row(f"keyframe attention {mode}, {frames} frames", b.sampling(model, batch=frames), floor, n)


def build_clip(tiny: bool):
    """A CLIP-L-layout text encoder with seeded random weights on the CPU (the tiny test CLIP with --tiny): the
    Attention Controller tokenises its prompts (word swap, fusion words) and encodes them."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base
    from support.tiny_models import _generator, init_weights_, make_comfy_clip
    if tiny:
        return make_comfy_clip(seed=0)
    cpu = torch.device("cpu")
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    clip = comfy.sd.CLIP(target=target, model_options={"dtype": torch.float32, "load_device": cpu,
                                                       "offload_device": cpu, "initial_device": cpu})
    init_weights_(clip.cond_stage_model, _generator(0, "clip"))
    return clip


def rows_video_edit(b: Bench):
    """Zero-shot editing of an inverted video (issue 13): 16 frames inverted in one batch (direct: 16 rows per
    evaluation, no CFG), then edited by the Attention Controller's pair guider (ddim; source and edited clips
    with CFG: batch 64 per evaluation): word swap, + FateZero's attention fusion, + keyframe attention
    first_and_previous (the full video edit). Floors: the steps' evaluations at batch 16 and 64. Goal: peak
    <= 12 GB, within 1.3x of the floor."""
    import comfy.samplers
    from editkit.nodes.attention_control import AttentionControllerNode, AttentionFusionNode
    from editkit.nodes.inversion import NullTextInvert
    from editkit.nodes.keyframe_attention import KeyframeAttentionNode
    from support.comfy_host import encode
    from support.node_calls import edit_settings
    frames, source, target = b.sizes.frames, "a cat riding a bicycle", "a dog riding a bicycle"
    t_inv, t_edit = b.eval_row(frames), b.eval_row(4 * frames)
    clip = b.clip()
    positive, negative = encode(clip, source), encode(clip, "")
    g = torch.Generator().manual_seed(4)
    video = {"samples": torch.randn(frames, 4, *b.latent_hw, generator=g)}
    n = b.steps
    inverted = b.row(f"inversion of {frames} frames (direct, batched)", lambda: NullTextInvert.execute(
        b.model, positive, negative, video, "direct", n, "ddim_uniform", 7.5, 10, 0.01, 1e-5).result, n * t_inv, n)

    def edit(model, fusion):
        def make():
            _, inversion, sigmas = inverted.out
            guider = AttentionControllerNode.execute(
                model=model, clip=clip, source_prompt=source, target_prompt=target, negative_prompt="",
                edit=edit_settings("word_swap", self_max_resolution=32), cfg=7.5, inversion=inversion,
                fusion=fusion).result[0]
            return guider, sigmas
        guider = once(make)

        def run():
            pair, sigmas = guider()
            x = inverted.out[0]["samples"]
            return pair.sample(torch.zeros_like(x), x, comfy.samplers.sampler_object("ddim"), sigmas,
                               disable_pbar=True, seed=0)
        return run
    fusion = AttentionFusionNode.execute("cat", 0.3).result[0]
    keyframes = KeyframeAttentionNode.execute(b.model, {"mode": "first_and_previous"}, "", 0.0, 1.0, 0, 0.0,
                                              0.5).result[0]
    full = None
    for name, model, fused in ((f"edit {frames} frames: word swap", b.model, None),
                               ("  + attention fusion (cat, 0.3)", b.model, fusion),
                               ("  + keyframe attn first_and_previous (full)", keyframes, fusion)):
        full = b.row(name, edit(model, fused), n * t_edit, n, needs=[inverted])
    b.derived("  total: inversion + full edit", lambda: (inverted.seconds + full.seconds, peak_of(inverted, full)),
              n * (t_inv + t_edit), 2 * n, needs=[inverted, full])


def rows_consistory(b: Bench):
    """Consistent Subject (issue 14) on 4 prompts (a batch of 4 latents, CFG: batch 8 per evaluation) against plain
    batched sampling of the same 4 prompts; the floor is the steps' evaluations at batch 8. Goal: within 1.3x of
    plain sampling in time and memory."""
    from editkit.nodes.consistory import ConsistentSubjectNode
    images, n = 4, b.steps
    prompts = "\n".join(["a watercolor of a fox reading", "a fox in the snow", "a fox on a boat",
                         "a fox in a kitchen"])
    model, positive, _ = ConsistentSubjectNode.execute(b.model, b.clip(), prompts, "fox", 0.5, 1.0, 0, "", 0.0, 1.0,
                                                       0).result
    floor = n * b.eval_row(2 * images)
    b.row(f"plain sampling, {images} prompts batched", b.sampling(batch=images, positive=positive), floor, n)
    b.row(f"consistent subject, {images} prompts", b.sampling(model, batch=images, positive=positive), floor, n)


def rows_p3s(b: Bench):
    """P3S-Diffusion (issue 15): training an adapter on 4 references for 60 epochs (one step per image: 240 steps of
    the copy and the frozen UNet, forward and backward, batch 1), and sampling with it against plain sampling. Floors:
    the training steps at 3 batch-1 evaluations each (forward of both UNets, backward about twice a forward, not
    counted for the frozen weights), and the sampling steps at 2 evaluations (the copy and the UNet, CFG batched).
    Goals: training <= 3 minutes and a peak that fits a 24 GB card; sampling within 1.3x of plain sampling."""
    from editkit.nodes.p3s_adapter import P3SAdapter, conditioned_model, train
    references, epochs, n = 4, b.sizes.epochs, b.steps
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(references, 4, *b.latent_hw, generator=g)
    states = torch.randn(references, 257, 32 if b.tiny else 1024, generator=g)
    t_eval = b.eval_row(1)
    adapter = P3SAdapter.fresh(b.model, latents, states)
    context = b.positive[0][0]
    steps = epochs * references
    b.row(f"P3S training, {references} images x {epochs} epochs",
          lambda: train(b.model, adapter, context, context * 0, epochs, 1e-5), 3 * steps * t_eval, 3 * steps)
    t_eval2 = b.unet_eval(2)
    b.row("plain sampling, ddim, CFG", b.sampling(sampler="ddim", scheduler="ddim_uniform"), n * t_eval2, n)
    b.row("P3S conditioned sampling", b.sampling(conditioned_model(b.model, adapter)[0], sampler="ddim",
                                                 scheduler="ddim_uniform"), 2 * n * t_eval2, 2 * n)


GROUPS = [rows_foundation, rows_inversion, rows_attention_control, rows_feature_injection, rows_latent_fuser,
          rows_keyframe, rows_video_edit, rows_consistory, rows_p3s]


def group_name(group) -> str:
    return group.__name__.replace("rows_", "")


def run_groups(bench: Bench, groups) -> None:
    """Every group's own rows in order, then (second pass) the comparison rows of the groups that have them. A
    group's setup that raises is reported as its row "(group setup)"; a group reached with no budget left is
    reported as one skipped row "(all rows)"."""
    table = bench.table
    failed = set()
    for second_pass in (False, True):
        bench.second_pass = second_pass
        for group in groups:
            bench.group = name = group_name(group)
            rows = [r for r in table.rows.values() if r.group == name]
            if second_pass and (name in failed or bench.left() <= 0
                                or not any(r.compare and not r.settled for r in rows)):
                continue
            if bench.left() <= 0 and not second_pass:
                bench.skip("(all rows)", "budget (none left when the group was reached)")
                continue
            try:
                group(bench)
            except Exception as error:
                failed.add(name)
                row = bench._row("(group setup)", "derived", second_pass)
                row.status = f"error: {type(error).__name__}: {error}"[:300]
                row.trace = "".join(traceback.format_exception(error)[-6:]).rstrip()[-1500:]
                table.settle(row)
            gc.collect()      # the group's models go before the next group's peak memory is measured
    for row in table.rows.values():            # comparison rows the second pass did not reach
        if not row.settled:
            row.status = "skipped: budget (none left for the comparison rows)" if bench.left() <= 0 else \
                "skipped: its group's setup failed"
            table.settle(row)


# ------------------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------------------

def boot(cpu: bool):
    from support import comfy_host
    comfy_host.boot(pathlib.Path(tempfile.mkdtemp(prefix="editkit-bench-")), cpu=cpu)
    from support.pack import import_pack
    return import_pack()


def describe(device, label, sizes: Sizes, budget: float) -> dict:
    """What the JSON records of the run: the card, the versions, the date, the settings."""
    try:
        import comfyui_version
        comfyui = comfyui_version.__version__
    except ImportError:
        comfyui = "unknown"
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"label": label, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
            f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
            "torch": torch.__version__, "cuda": torch.version.cuda, "comfyui": comfyui,
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "commit": commit,
            "budget_s": None if math.isinf(budget) else budget, "argv": sys.argv[1:],
            "size": f"{sizes.side}x{sizes.side}, {sizes.steps} steps", "sizes": dataclasses.asdict(sizes)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=math.inf,
                        help="seconds for the whole run from its start (default: no limit)")
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU (checks the script, not speed)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--size", type=int, default=None, help="image side in pixels")
    parser.add_argument("--rows", default=None, help="comma-separated row groups to run (default all: "
                        + ", ".join(group_name(g) for g in GROUPS) + ")")
    parser.add_argument("--max-repeats", type=int, default=MAX_REPEATS,
                        help=f"most runs of a row (default {MAX_REPEATS}; at least {MIN_REPEATS})")
    parser.add_argument("--out", default=os.environ.get("OUT") or "bench_out",
                        help="folder for bench.json and bench.md (default $OUT, else ./bench_out)")
    args = parser.parse_args(argv)
    known = {group_name(g) for g in GROUPS}
    unknown = set(args.rows.split(",")) - known if args.rows else set()
    if unknown:
        parser.error(f"--rows: unknown groups {sorted(unknown)}; known: {', '.join(sorted(known))}")
    return args


def main(argv=None, fail_rows=()) -> dict:
    """Run the benchmark; returns the report (also in OUT/bench.json). `fail_rows`: names of rows made to raise
    (a test hook)."""
    started = time.monotonic()
    args = parse_args(argv)
    cpu = args.tiny or not torch.cuda.is_available()
    boot(cpu)
    import comfy.model_management
    device = comfy.model_management.get_torch_device()
    sizes = TINY if args.tiny else Sizes()
    sizes = dataclasses.replace(sizes, side=args.size or sizes.side, steps=args.steps or sizes.steps)
    if args.tiny:
        from support.tiny_models import CONTEXT_DIM, make_comfy_model
        model, context_dim = make_comfy_model(seed=0), CONTEXT_DIM
        label = "tiny SD1.5-layout UNet, CPU, float32 (script check only: not a speed figure)"
    else:
        model, context_dim = build_sd15(device, torch.float16), 768
        label = "SD1.5 UNet layout, random weights, fp16"
    threads = torch.get_num_threads()
    if args.tiny:   # the tiny model's small ops gain nothing from threads, which stall when others share the CPU
        torch.set_num_threads(1)
    table = Table(pathlib.Path(args.out), describe(device, label, sizes, args.budget), started)
    bench = Bench(model, device, sizes, context_dim, args.tiny, table, started + args.budget, args.max_repeats,
                  fail_rows)
    meta = table.meta
    budget = "none" if math.isinf(args.budget) else f"{args.budget:g} s"
    print(f"# {label}; {meta['device']}; {meta['size']}; torch {meta['torch']}, ComfyUI {meta['comfyui']}; "
          f"budget {budget}; writing {table.out_dir / 'bench.json'} and bench.md", flush=True)
    print(MD_HEADER, flush=True)
    groups = [g for g in GROUPS if args.rows is None or group_name(g) in args.rows.split(",")]
    table.write()
    try:
        run_groups(bench, groups)
    finally:
        torch.set_num_threads(threads)
    table.finished = True
    table.write()
    report = table.report()
    counts = {}
    for row in report["rows"]:
        key = row["status"].split(":")[0].split(";")[0]
        counts[key] = counts.get(key, 0) + 1
    print(f"# done in {report['elapsed_s']:.0f} s: " + ", ".join(f"{v} {k}" for k, v in counts.items()), flush=True)
    return report


if __name__ == "__main__":
    failed = [r for r in main()["rows"] if r["status"].startswith(("error", "check failed"))]
    sys.exit(1 if failed else 0)
