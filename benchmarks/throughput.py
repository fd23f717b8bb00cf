"""Throughput of the SDS-CLIP training step and of the diffusion score: plain path vs fast path.

    .venv/bin/python benchmarks/throughput.py --help
    .venv/bin/python benchmarks/throughput.py --size reduced --steps 2 --warmup 1   # what a CPU can run

Builds the real architectures with random weights and no download (Stable Diffusion v1-4's
UNet and text encoder as `pipeline.models.paper` configures them, at 64 x 64 latents with
77-token text conditioning; an open_clip student by name, ViT-B-16 by default), writes the
cached latents and conditioning the trainer and the scorer read as real cache tables
(`pipeline.cache`, in a temporary folder), and measures, after warm-up, for each implementation:

- training step: L_CLIP + lambda L_SDS, LayerNorm scope + h_w, through
  `pipeline.train.loss_step` (the trainer's step, on the trial's device with its options),
  backward, AdamW step (plain: the per-tensor AdamW; otherwise the trainer's fused one);
- diffusion score: Winoground-shaped tasks (2 images x 2 captions x N noise samples), through
  `pipeline.evaluate.DiffusionScorer` (plain: one UNet call per pair; fast: one call over all
  captions and samples of an image);

and prints samples/s, peak GPU memory, FLOPs per sample counted with
`torch.utils.flop_counter.FlopCounterMode` (eagerly, before any torch.compile), achieved
FLOP/s, MFU against the device's dense bf16 peak, and each implementation's speed relative
to the first one.

Implementations (`--impl`, comma-separated, each optionally followed by ':key=value'
overrides of `FastPath`, e.g. `fast:compile=off`, `fast:ckpt=on`, `fast:autocast=bf16`):
  plain    the naive reference: fp32, eager, classic attention, and everything recomputed:
           the UNet's weight gradients are computed (its parameters require grad, as when
           only the optimiser leaves them out), the teacher's text conditioning is recomputed
           by its text encoder at every step and for every scored pair, one UNet call per pair.
  project  what the trainer and scorer did before the fast path: fp32, eager, diffusers'
           default SDPA attention, frozen UNet, cached conditioning, pairs chunked by
           eval.batch_size.
  fast     `FastPath.default_for(device)`: on CUDA bf16 autocast, SDPA, channels-last,
           torch.compile, batched score; on the CPU fp32 numerics with SDPA and the batched score.

`--size full` is the paper's scale (GPU figures); `--size reduced` (the default on a CPU,
what CI runs) keeps SD v1-4's block structure with channels (32, 64, 64, 64), 8 x 8
latents and a small open_clip ViT. `--device meta` counts FLOPs only (no timing), e.g. to
get full-size FLOPs per sample on a machine without a GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from torch import nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
for folder in (REPO, REPO / "tests"):
    sys.path.insert(0, str(folder))

from cache_tables import cache_table  # noqa: E402
from pipeline import cli  # noqa: E402
from pipeline.io import write_text  # noqa: E402

if TYPE_CHECKING:
    from pipeline.cache import Table
    from pipeline.fastpath import FastPath
    from pipeline.models.teacher import Teacher

# pipeline.fastpath and pipeline.models (diffusers, open_clip, the evaluation layer) are
# imported where they are used, so that `--help` and argument errors answer after importing
# torch only.

# --------------------------------------------------------------------------- architectures

REDUCED_STUDENT = "reduced-vit"
REDUCED_STUDENT_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from the vendors' data sheets.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4, "H200": 989.4, "GH200": 989.4,
                    "A100": 312.0}
WINOGROUND_TASKS = 400


@dataclass
class Size:
    name: str
    unet: dict
    text: dict
    student: str
    batch: int
    samples: int
    tasks: int
    steps: int
    warmup: int
    score_rows: int

    @property
    def text_tokens(self) -> int:
        """Tokens per caption of the teacher's text conditioning (77 for SD)."""
        return self.text["max_position_embeddings"]


SIZE_NAMES = ("full", "reduced")


@functools.cache
def sizes() -> dict[str, Size]:
    """full: SD v1-4's UNet (860M parameters) and text encoder (CLIP ViT-L/14's text tower, 123M;
    only the plain path runs it, per step); reduced: the same block structure (3 cross-attention
    down blocks + 1 plain, mid block, 1 plain + 3 cross-attention up blocks, 2 layers per block,
    8 heads), narrow and at 8 x 8 (--latent-size 16 for 16 x 16)."""
    from pipeline.models.paper import SD_V1_4, TEACHER_CONFIGS

    unet, text = TEACHER_CONFIGS[SD_V1_4]["unet"], TEACHER_CONFIGS[SD_V1_4]["text_encoder"]
    # 8 GroupNorm groups instead of 32: SD normalises groups of 10-40 channels x 8x8 or more
    # positions; 32 groups of 1-2 channels at the 1x1 or 2x2 bottom would normalise 2-8 numbers,
    # which makes the network's gradients ill-conditioned (rounding differences blow up ~1000x).
    reduced_unet = {**unet, "sample_size": 8, "block_out_channels": [32, 64, 64, 64], "cross_attention_dim": 64,
                    "norm_num_groups": 8}
    reduced_text = {**text, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "projection_dim": 64}
    return {
        "full": Size("full", unet, text, "ViT-B-16", batch=32, samples=50, tasks=2, steps=10, warmup=3,
                     score_rows=200),
        "reduced": Size("reduced", reduced_unet, reduced_text, REDUCED_STUDENT, batch=8, samples=4, tasks=1, steps=3,
                        warmup=1, score_rows=16),
    }


def build_unet(cfg: dict, device, seed: int) -> nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    with _init_device(device):
        return UNet2DConditionModel(**cfg)


def build_text_encoder(cfg: dict, device, seed: int) -> nn.Module:
    from transformers import CLIPTextModel

    from pipeline.models.paper import text_encoder_config

    torch.manual_seed(seed)
    with _init_device(device):
        model = CLIPTextModel(text_encoder_config(cfg))
    return model.requires_grad_(False).eval()


def build_teacher(unet: nn.Module, text_encoder: nn.Module | None) -> Teacher:
    """SD v1-4's noise schedule and prediction type around `unet` (no VAE: the latents are cached)."""
    from diffusers import DDPMScheduler

    from pipeline.models.paper import SD_V1_4, TEACHER_CONFIGS
    from pipeline.models.teacher import SD_SCHEDULE, Teacher

    scheduler = DDPMScheduler(**SD_SCHEDULE, prediction_type=TEACHER_CONFIGS[SD_V1_4]["prediction_type"])
    return Teacher(unet, None, text_encoder, None, scheduler)


def build_student(name: str, device, seed: int):
    """A `Student` with random weights: the reduced ViT or any open_clip model name (no download)."""
    import open_clip

    from pipeline.models.student import Student

    torch.manual_seed(seed)
    if name == REDUCED_STUDENT:
        cfg = json.loads(json.dumps(REDUCED_STUDENT_CFG))
        with _init_device(device):
            model = open_clip.CLIP(**cfg)
    else:
        cfg = open_clip.get_model_config(name)
        if cfg is None:
            raise SystemExit(f"--student {name!r} is not an open_clip model name (open_clip.list_models())")
        with _init_device(device):
            model = open_clip.create_model(name, pretrained=None, device=device)
    return Student(model, None, None, cfg)


def _init_device(device) -> contextlib.AbstractContextManager:
    """Create parameters directly on the device (fast random init on a GPU; shapes only on meta)."""
    return torch.device(device)


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------- cached inputs


def tables_folder(args) -> Path:
    """A new folder for one build's cache tables (a rebuild after out-of-memory writes other keys)."""
    return Path(tempfile.mkdtemp(dir=args.tables))


class RecomputedConditioning:
    """The plain path's conditioning: the read interface of `pipeline.cache.Table` over a table of the
    captions' token ids, running the teacher's text encoder on them at every read."""

    def __init__(self, tokens: Table, text_encoder: nn.Module):
        self.tokens, self.text_encoder = tokens, text_encoder

    def __len__(self) -> int:
        return len(self.tokens)

    def index(self, key: str) -> int:
        return self.tokens.index(key)

    def get(self, keys: Sequence[str]) -> torch.Tensor:
        return self.rows([self.index(k) for k in keys])

    def rows(self, indices) -> torch.Tensor:
        ids = self.tokens.rows(indices).to(next(self.text_encoder.parameters()).device)
        with torch.no_grad():
            return self.text_encoder(ids)[0]


def conditioning_table(args, size: Size, impl: Impl, keys: list[str], generator: torch.Generator):
    """Random conditioning rows for `keys` (plain: token ids, encoded at every read, and the text encoder)."""
    root = tables_folder(args)
    if impl.naive:
        text_encoder = build_text_encoder(size.text, args.device, args.seed + 3)
        ids = torch.randint(1, 49000, (len(keys), size.text_tokens), generator=generator)
        return RecomputedConditioning(cache_table(root, "tokens", keys, ids), text_encoder), text_encoder
    width = size.unet["cross_attention_dim"]
    rows = torch.randn(len(keys), size.text_tokens, width, generator=generator)
    return cache_table(root, "text", keys, rows), None


# --------------------------------------------------------------------------- implementations


@dataclass
class Impl:
    name: str
    opts: FastPath
    naive: bool  # plain: UNet weight gradients computed, conditioning recomputed, one UNet call per pair

    @classmethod
    def parse(cls, spec: str, device) -> "Impl":
        from pipeline.fastpath import FastPath

        name, _, overrides = spec.partition(":")
        name = name.strip()
        if name == "plain":
            opts, naive = FastPath.plain(), True
        elif name == "project":
            opts, naive = FastPath.default_for("cpu", fast=False).replace(batched_score=False), False
        elif name == "fast":
            opts, naive = FastPath.default_for(device), False
        else:
            raise SystemExit(f"--impl {spec!r}: the name must be plain, project or fast (then :key=value overrides)")
        return cls(spec.strip(), opts.with_overrides(overrides) if overrides else opts, naive)


@dataclass
class Result:
    impl: str
    options: str
    batch: int = 0
    samples_per_s: float = float("nan")
    peak_gb: float = float("nan")
    flops_per_sample: float = float("nan")
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def achieved_tflops(self) -> float:
        return self.samples_per_s * self.flops_per_sample / 1e12


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device) -> float:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return float("nan")


def _free(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def _cpu_flash_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def _cpu_flash_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


# The CPU's fused SDPA kernels are missing from torch's FLOP registry (the CUDA ones are in it).
_EXTRA_FLOP_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward_flops,
}


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of `fn` (matmuls, convolutions, attention; forward and backward)."""
    with FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS) as counter:
        fn()
    return counter.get_total_flops()


def _timed(fn: Callable[[], object], steps: int, warmup: int, device) -> float:
    """Seconds per call of `fn` after `warmup` calls, synchronising the device around the timed calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    _reset_peak(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / max(1, steps)


# --------------------------------------------------------------------------- training step


class TrainingBench:
    """One implementation's models and batch for the training step."""

    def __init__(self, args, size: Size, impl: Impl, batch: int):
        from pipeline import objectives, train
        from pipeline.config import ObjectiveConfig, TrainConfig
        from pipeline.fastpath import adamw, prepare_student, prepare_teacher_unet

        device, opts = args.device, impl.opts
        self.device, self.impl, self.batch = device, impl, batch
        student = build_student(args.student, device, args.seed)
        unet = build_unet(size.unet, device, args.seed + 1)
        prepare_teacher_unet(unet, opts, compile=False)
        prepare_student(student.model, opts)
        g = torch.Generator().manual_seed(args.seed + 2)
        context = int(student.model_cfg["text_cfg"].get("context_length", 77))
        image_size = student.model.visual.image_size
        image_size = image_size if isinstance(image_size, int) else image_size[0]
        self.images = torch.randn(batch, 3, image_size, image_size, generator=g).to(device)
        self.tokens = torch.randint(1, 49000, (batch, context), generator=g).to(device)
        self.rows = torch.arange(batch)
        conditioning, text_encoder = conditioning_table(args, size, impl, [f"caption {i}" for i in range(batch)], g)
        teacher = build_teacher(unet, text_encoder)
        latent_shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        torch.manual_seed(args.seed + 5)
        projection = objectives.LatentProjection(int(student.model_cfg["embed_dim"]), latent_shape).to(device)
        student.model.requires_grad_(False)
        cfg = TrainConfig(scope="layernorm", batch_size=batch)
        params = train.trainable_parameters(student, projection, cfg)
        for p in params.values():
            p.requires_grad_(True)
        if impl.naive:  # the plain path forgets to freeze the UNet: its weight gradients are computed
            unet.requires_grad_(True)
        optimizer = (torch.optim.AdamW if impl.naive else adamw)(list(params.values()), lr=cfg.lr,
                                                                 weight_decay=cfg.weight_decay)
        self.trial = train.Trial(student, projection, params, optimizer, None, None, teacher, conditioning, None,
                                 cfg, ObjectiveConfig(lambda_sds=args.lambda_sds), torch.Generator().manual_seed(args.seed),
                                 device=torch.device(device), fast=opts)
        self.scaler = torch.amp.GradScaler(torch.device(device).type, enabled=opts.autocast == "fp16")
        self.unet = unet
        self.counts = {"student": parameter_count(student.model), "unet": parameter_count(unet),
                       "trainable": sum(p.numel() for p in params.values())}

    def losses(self):
        from pipeline.train import loss_step

        return loss_step(self.trial, self.images, self.tokens, self.tokens, self.rows, self.rows)

    def forward_backward(self) -> None:
        self.scaler.scale(self.losses()["total"]).backward()

    def step(self) -> None:
        trial = self.trial
        trial.optimizer.zero_grad(set_to_none=True)
        if self.impl.naive:
            self.unet.zero_grad(set_to_none=True)
        self.forward_backward()
        self.scaler.step(trial.optimizer)
        self.scaler.update()

    def compile(self) -> None:
        from pipeline.fastpath import compile_module

        compile_module(self.unet, self.impl.opts)


@dataclass
class Prepared:
    """An implementation built, FLOP-counted, compiled and warmed up: `run` is one timed unit of work."""

    result: Result
    run: Callable[[], object] | None = None  # None: nothing to time (meta device, out of memory)
    samples: int = 0  # samples (training) or UNet rows (score) per call of `run`
    bench: object = None


def prepare_training(args, size: Size, impl: Impl) -> Prepared:
    """Build at `--batch`, halving it on out-of-memory; count FLOPs eagerly; compile; warm up."""
    result = Result(impl.name, impl.opts.describe() + (",naive" if impl.naive else ""))
    batch = args.batch
    while True:
        bench = None
        try:
            bench = TrainingBench(args, size, impl, batch)
            result.batch, result.extra = batch, dict(bench.counts)
            result.flops_per_sample = count_flops(bench.forward_backward) / batch
            if args.device == "meta":
                return Prepared(result)
            bench.compile()
            for _ in range(args.warmup):
                bench.step()
            if batch != args.batch:
                result.note = f"out of memory at batch {args.batch}; measured at batch {batch}"
            return Prepared(result, bench.step, batch, bench)
        except RuntimeError as err:
            if not _is_oom(err):
                raise
            bench = None
            _free(args.device)
            if batch == 1:
                result.note = "out of memory even at batch 1"
                return Prepared(result)
            batch //= 2


# --------------------------------------------------------------------------- diffusion score


class ScoreBench:
    """Winoground-shaped scoring: `tasks` tasks of 2 images x 2 captions, N noise samples each."""

    def __init__(self, args, size: Size, impl: Impl, rows_per_call: int):
        from pipeline.config import EvalConfig
        from pipeline.evaluate import DiffusionScorer
        from pipeline.fastpath import prepare_teacher_unet

        device, opts = args.device, impl.opts
        self.device = device
        unet = build_unet(size.unet, device, args.seed + 1)
        prepare_teacher_unet(unet, opts, compile=False)
        self.unet, self.impl = unet, impl
        g = torch.Generator().manual_seed(args.seed + 4)
        latent_shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        image_keys = [f"task{t}/image_{k}" for t in range(args.tasks) for k in range(2)]
        captions = [f"task{t} caption_{c}" for t in range(args.tasks) for c in range(2)]
        latents = cache_table(tables_folder(args), "latents", image_keys,
                              torch.randn(len(image_keys), *latent_shape, generator=g))
        conditioning, text_encoder = conditioning_table(args, size, impl, captions, g)
        teacher = build_teacher(unet, text_encoder)
        # The pairs in `winoground_pairs` order: (task, caption, image).
        self.images = [f"task{t}/image_{k}" for t in range(args.tasks) for _c in range(2) for k in range(2)]
        self.captions = [f"task{t} caption_{c}" for t in range(args.tasks) for c in range(2) for _k in range(2)]
        cfg = EvalConfig(diffusion_samples=args.samples, batch_size=rows_per_call, seed=args.seed)
        if impl.naive:  # one UNet call per (image, caption) pair
            cfg = dataclasses.replace(cfg, batch_size=args.samples)
        self.scorer = DiffusionScorer(teacher, latents, conditioning, cfg, device, opts)
        self.rows = len(self.images) * args.samples
        self.text_encoder, self.latent_shape = text_encoder, latent_shape
        self.text_shape = (size.text_tokens, size.unet["cross_attention_dim"])

    def count_meta(self) -> int:
        """FLOPs of one pass counted on the meta device (the scorers read results back, which meta cannot):
        rows x one UNet row, plus one text-encoder caption per pair for the plain path."""
        sample = torch.zeros(1, *self.latent_shape, device=self.device)
        cond = torch.zeros(1, *self.text_shape, device=self.device)
        one = lambda: self.unet(sample, torch.tensor([500], device=self.device), encoder_hidden_states=cond)
        with torch.no_grad():
            flops = self.rows * count_flops(one)
            if self.text_encoder is not None:
                ids = torch.zeros(1, self.text_shape[0], dtype=torch.int64, device=self.device)
                flops += len(self.images) * count_flops(lambda: self.text_encoder(ids))
        return flops

    def score(self):
        return self.scorer(self.images, self.captions)

    def compile(self) -> None:
        from pipeline.fastpath import compile_module

        compile_module(self.unet, self.impl.opts)


def prepare_score(args, size: Size, impl: Impl) -> Prepared:
    """Build with `--score-rows` rows per call, halving them on out-of-memory; count FLOPs; compile; warm up."""
    result = Result(impl.name, impl.opts.describe() + (",naive" if impl.naive else ""))
    rows_per_call = args.samples if impl.naive else args.score_rows
    while True:
        bench = None
        try:
            bench = ScoreBench(args, size, impl, rows_per_call)
            result.batch = rows_per_call
            flops = bench.count_meta() if args.device == "meta" else count_flops(bench.score)
            result.flops_per_sample = flops / bench.rows
            if args.device == "meta":
                return Prepared(result)
            bench.compile()
            for _ in range(args.warmup):
                bench.score()
            if rows_per_call != args.score_rows and not impl.naive:
                result.note = f"out of memory at {args.score_rows} rows per call; measured at {rows_per_call}"
            return Prepared(result, bench.score, bench.rows, bench)
        except RuntimeError as err:
            if not _is_oom(err):
                raise
            bench = None
            _free(args.device)
            if impl.naive or rows_per_call <= args.samples:
                result.note = f"out of memory at {rows_per_call} UNet rows per call"
                return Prepared(result)
            rows_per_call //= 2


def measure(args, size: Size, impls: list[Impl], prepare: Callable[..., Prepared]) -> list[Result]:
    """Seconds per unit of work for each implementation.

    One round (the default on a GPU): each implementation is built, timed and freed in turn,
    so its peak memory is its own. Several rounds (the default on a CPU, whose timings drift
    with the load of other jobs): all are built first, then timed in interleaved rounds of
    `--steps` each, and each keeps its median round; peak memory is then not reported.
    """
    results: list[Result] = []
    if args.rounds == 1:
        for impl in impls:
            prepared = prepare(args, size, impl)
            if prepared.run is not None:
                seconds = _timed(prepared.run, args.steps, 0, args.device)
                _record(prepared, seconds, args)
                prepared.result.peak_gb = _peak_gb(args.device)
            results.append(prepared.result)
            prepared = None
            _free(args.device)
        return results
    everything = [prepare(args, size, impl) for impl in impls]
    rounds: list[list[float]] = [[] for _ in everything]
    for _ in range(args.rounds):
        for k, prepared in enumerate(everything):
            if prepared.run is not None:
                rounds[k].append(_timed(prepared.run, args.steps, 0, args.device))
    for prepared, times in zip(everything, rounds):
        if times:
            _record(prepared, statistics.median(times), args)
            prepared.result.extra["rounds_seconds"] = times
        results.append(prepared.result)
    everything = None
    _free(args.device)
    return results


def _record(prepared: Prepared, seconds: float, args) -> None:
    result = prepared.result
    result.samples_per_s = prepared.samples / seconds
    result.extra["seconds_per_call"] = seconds
    if isinstance(prepared.bench, ScoreBench):
        per_task = seconds / args.tasks
        result.extra.update({"seconds_per_task": per_task, "rows_per_call": result.batch,
                             "winoground_minutes": per_task * WINOGROUND_TASKS / 60})


# --------------------------------------------------------------------------- report


def device_peak_tflops(device, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, f"--peak-tflops {override:g}"
    if torch.device(device).type != "cuda":
        return None, "no peak known for this device (pass --peak-tflops)"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS.items():  # most specific names first
        if key in name:
            return value, f"{name}: dense bf16 peak {value:g} TFLOP/s"
    return None, f"{name}: peak unknown (pass --peak-tflops)"


def _fmt(value: float, spec: str, missing: str = "n/a") -> str:
    return missing if value is None or not math.isfinite(value) else format(value, spec)


def table(results: list[Result], peak: float | None, unit: str, extra: Callable[[Result], str] | None = None,
          extra_head: str = "") -> str:
    base = results[0].samples_per_s if results else float("nan")
    head = ["impl", "options", "batch", f"{unit}/s", "peak mem GB", "GFLOP/" + unit, "TFLOP/s", "MFU",
            f"vs {results[0].impl}" if results else "ratio"]
    if extra:
        head.append(extra_head)
    rows = []
    for r in results:
        mfu = r.achieved_tflops / peak if peak else float("nan")
        ratio = r.samples_per_s / base if base and math.isfinite(base) else float("nan")
        row = [r.impl, r.options, str(r.batch), _fmt(r.samples_per_s, ".3g"), _fmt(r.peak_gb, ".1f"),
               _fmt(r.flops_per_sample / 1e9, ".4g"), _fmt(r.achieved_tflops, ".3g"),
               _fmt(mfu * 100, ".1f") + ("%" if math.isfinite(mfu) else ""),
               _fmt(ratio, ".2f") + ("x" if math.isfinite(ratio) else "")]
        if extra:
            row.append(extra(r))
        rows.append(row)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines += [f"  note ({r.impl}): {r.note}" for r in results if r.note]
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser = cli.ArgumentParser(
        prog="benchmarks/throughput.py",
        description="Benchmark the SDS-CLIP training step and the diffusion score: plain vs fast path "
                    "(random weights, no download).",
        epilog="Implementations: plain (fp32, eager, classic attention, UNet weight gradients computed, "
               "text conditioning recomputed, one UNet call per scored pair), project (the trainer before the "
               "fast path: fp32, SDPA, frozen UNet, cached conditioning), fast (FastPath.default_for(device)). "
               "Append ':key=value' to override FastPath fields, e.g. fast:compile=off, fast:ckpt=on, "
               "fast:autocast=bf16, fast:compile=max-autotune-no-cudagraphs.")
    parser.add_argument("--size", choices=SIZE_NAMES, default=None,
                        help="full: SD v1-4 UNet at 64x64 latents + the open_clip student; reduced: SD's block "
                             "structure at channels (32,64,64,64), 8x8 latents, a small ViT (default: full on "
                             "CUDA, reduced otherwise)")
    parser.add_argument("--student", default=None,
                        help=f"open_clip model name (default: ViT-B-16 at full size, {REDUCED_STUDENT} at reduced)")
    parser.add_argument("--device", default=default_device, help=f"torch device, or meta to count FLOPs only "
                                                                  f"(default: {default_device})")
    parser.add_argument("--impl", default="plain,fast",
                        help="comma-separated implementations, the first is the ratio's reference "
                             "(default: plain,fast)")
    parser.add_argument("--workload", default="train,score", help="train, score or both (default: train,score)")
    parser.add_argument("--latent-size", type=int, default=None,
                        help="latent side of the UNet input (default: 64 full, 8 reduced)")
    parser.add_argument("--batch", type=int, default=None, help="training batch (default: 32 full, 8 reduced)")
    parser.add_argument("--samples", type=int, default=None,
                        help="noise samples N per image-caption pair of the diffusion score "
                             "(default: 50 full, 4 reduced)")
    parser.add_argument("--tasks", type=int, default=None, help="Winoground-shaped tasks per timed scoring pass "
                                                                "(default: 2 full, 1 reduced)")
    parser.add_argument("--score-rows", type=int, default=None,
                        help="fast scorer: UNet rows per call (eval.batch_size; default: 200 full = one task's "
                             "4 pairs x 50 samples, 16 reduced)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps/passes (default: 10 full, 3 reduced)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps/passes, compile included "
                                                                 "(default: 3 full, 1 reduced)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved timing rounds, median kept (default: 1 on CUDA, each implementation "
                             "timed alone with its own peak memory; 3 elsewhere, against drifting CPU load)")
    parser.add_argument("--lambda-sds", type=float, default=1e-3, help="lambda of L_SDS (default: the paper's 1e-3)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="device peak for MFU in TFLOP/s (default: dense bf16 peak of a known GPU: "
                             + ", ".join(f"{k} {v:g}" for k, v in PEAK_BF16_TFLOPS.items()) + ")")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    _check(parser, args)
    size = sizes()[args.size or ("full" if torch.device(args.device).type == "cuda" else "reduced")]
    args.size = size.name
    if args.latent_size is not None:
        size = dataclasses.replace(size, unet={**size.unet, "sample_size": args.latent_size})
    args.spec = size
    for key in ("student", "batch", "samples", "tasks", "steps", "warmup", "score_rows"):
        if getattr(args, key) is None:
            setattr(args, key, getattr(size, key))
    if args.rounds is None:
        args.rounds = 1 if torch.device(args.device).type == "cuda" else 3
    return args


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject bad values before the sizes import the models' configs (seconds); the defaults are valid."""
    if args.latent_size is not None and (args.latent_size < 8 or args.latent_size % 8):
        parser.error("--latent-size must be a multiple of 8 (the UNet downsamples 3 times)")
    for key in ("batch", "samples", "tasks", "steps", "score_rows", "rounds"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be at least 1")
    if args.warmup is not None and args.warmup < 0:
        parser.error("--warmup must be at least 0")
    args.workloads = [w.strip() for w in args.workload.split(",") if w.strip()]
    if not args.workloads or set(args.workloads) - {"train", "score"}:
        parser.error("--workload: train, score or train,score")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="throughput-tables-") as tables:
        args.tables = tables
        out = run(args)
    if args.json:
        write_text(Path(args.json), json.dumps(out, indent=2, default=str) + "\n")
    return 0


def run(args: argparse.Namespace) -> dict:
    """Measure, print the tables; the results as JSON-ready data."""
    size = args.spec
    impls = [Impl.parse(spec, args.device) for spec in args.impl.split(",") if spec.strip()]
    peak, peak_note = device_peak_tflops(args.device, args.peak_tflops)
    device_name = (torch.cuda.get_device_name(args.device) if torch.device(args.device).type == "cuda"
                   else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"SDS-CLIP bench: size={args.size} device={args.device} ({device_name}), torch {torch.__version__}")
    print(f"  UNet: SD v1-4 block structure, channels {tuple(size.unet['block_out_channels'])}, "
          f"{size.unet['sample_size']}x{size.unet['sample_size']} latents, {size.text_tokens}-token conditioning "
          f"(width {size.unet['cross_attention_dim']}); student: {args.student}; MFU: {peak_note}")
    out: dict = {"size": args.size, "device": args.device, "device_name": device_name, "torch": torch.__version__,
                 "student": args.student, "peak_tflops": peak}
    if args.device == "meta":
        print("  device meta: FLOPs are counted, nothing is timed")
    rounds = f", median of {args.rounds} interleaved rounds" if args.rounds > 1 and args.device != "meta" else ""
    if "train" in args.workloads:
        results = measure(args, size, impls, prepare_training)
        counts = results[0].extra if results else {}
        print(f"\ntraining step: L_CLIP + {args.lambda_sds:g} L_SDS, LayerNorm scope + h_w, batch {args.batch}, "
              f"{args.steps} timed steps after {args.warmup} warm-up{rounds}"
              + (f"; UNet {counts.get('unet', 0) / 1e6:.1f}M, student {counts.get('student', 0) / 1e6:.1f}M, "
                 f"trainable {counts.get('trainable', 0) / 1e6:.2f}M parameters" if counts else ""))
        print(table(results, peak, "sample"))
        out["train"] = [r.__dict__ for r in results]
    if "score" in args.workloads:
        results = measure(args, size, impls, prepare_score)
        print(f"\ndiffusion score: Winoground-shaped, {args.tasks} tasks x 2 images x 2 captions x {args.samples} "
              f"noise samples ({args.tasks * 4 * args.samples} UNet rows per pass), {args.steps} timed passes after "
              f"{args.warmup} warm-up{rounds}; batch = UNet rows per call")
        winoground = lambda r: (_fmt(WINOGROUND_TASKS * 4 * args.samples / r.samples_per_s / 60, ".3g")
                                if math.isfinite(r.samples_per_s) else "n/a")
        print(table(results, peak, "row", winoground, f"min for {WINOGROUND_TASKS} tasks"))
        out["score"] = [r.__dict__ for r in results]
    return out


if __name__ == "__main__":
    sys.exit(main())
