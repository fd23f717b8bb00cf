"""The fast path keeps the numbers: loss and gradients against the plain path, on the CPU at small size.

Models: benchmarks/throughput.py's reduced UNet (Stable Diffusion v1-4's block structure:
3 cross-attention down blocks + 1 plain, mid block, 1 plain + 3 cross-attention up blocks,
2 layers each, 8 heads; channels 32/64/64/64) at 8 x 8 latents with 77-token conditioning,
and the project's toy open_clip student, put together by `pipeline.train.setup` (LayerNorm
scope + h_w) over cached latents and conditioning written as real cache tables.
Lambda is 1 here (the paper's 1e-3 would hide the SDS term in the LayerNorm gradients).

Tolerances, and why:
- fp32 options (SDPA vs the classic attention, channels-last, gradient checkpointing,
  the batched diffusion score): the same arithmetic up to the order of float32 sums, so
  relative errors of 1e-5 (losses, scores) and 1e-4 (gradients, per tensor) — measured:
  <= 1e-7 on the losses, <= 3e-6 on any gradient tensor.
  Gradient checkpointing recomputes the very same kernels: gradients equal to 1e-6
  (measured: bit-identical).
- bf16 autocast (allowed on the CPU; slow there, fast on GPUs): bf16 keeps 8 mantissa bits,
  unit roundoff u = 2^-8 ~ 3.9e-3. The losses are reductions done in fp32 over bf16
  activations: relative error bound 1e-2 (~2.5u; measured 1.4e-3 for L_CLIP, 2.3e-4 for
  L_SDS). Gradients pass through every layer of the UNet's backward in bf16 and the
  CLIP gradient is a difference of nearly equal softmax terms, so errors compound:
  relative L2 error of all trainable gradients together and of h_w's gradient (which is
  L_SDS's alone) at most 0.1 (~25u; measured 2.5e-2 and 3.4e-2; the worst single
  LayerNorm tensor 4.7e-2), and cosine similarity at least 0.99 (measured 0.9997). The
  h_w bound still catches a wrong computation: the same step with another draw of
  (t, eps) moves h_w's gradient by ~100% (checked below).
  With `autocast_student=False` (UNet only in bf16) L_CLIP is exact and the trainable
  gradients together are within 1e-2 (measured 2.6e-3).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler

from pipeline import objectives, train
from pipeline.cache import open_table, write_table
from pipeline.config import ComputeConfig, ConfigError, EvalConfig, ObjectiveConfig, StudentConfig, TrainConfig
from pipeline.data.records import ImageCaption
from pipeline.device import resolve_device
from pipeline.data.keys import image_key
from pipeline.evaluate import DiffusionScorer
from pipeline.fastpath import (FastPath, batched_diffusion_errors, image_groups, pack_calls, prepare_student,
                               prepare_teacher_unet)
from pipeline.models.student import build_toy_student
from pipeline.models.teacher import SD_SCHEDULE, Teacher

from cache_tables import cache_table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import throughput  # noqa: E402

SIZE = 32
N = 4  # batch
STUDENT = StudentConfig(embed_dim=32, vision_width=64, vision_layers=2, vision_heads=2, text_width=32,
                        text_layers=1, text_heads=2)
REDUCED = throughput.sizes()["reduced"]  # 8 x 8 latents, 8 GroupNorm groups: see throughput.sizes
UNET = REDUCED.unet
TOKENS, WIDTH = REDUCED.text_tokens, UNET["cross_attention_dim"]

# The bounds of the module docstring.
FP32_LOSS_RTOL, FP32_GRAD_RTOL = 1e-5, 1e-4
BF16_LOSS_RTOL, BF16_GRAD_RTOL, BF16_MIN_COSINE = 1e-2, 0.1, 0.99


def make_teacher(prediction_type: str = "epsilon") -> Teacher:
    unet = throughput.build_unet(UNET, "cpu", seed=1)
    return Teacher(unet, None, None, None, DDPMScheduler(**SD_SCHEDULE, prediction_type=prediction_type))


@pytest.fixture(scope="module")
def teacher() -> Teacher:
    return make_teacher()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    g = torch.Generator().manual_seed(0)
    captions = [f"caption {i}" for i in range(N)]
    pairs = [ImageCaption(Path(f"/bench/{i}.png"), c) for i, c in enumerate(captions)]
    shape = (UNET["in_channels"], UNET["sample_size"], UNET["sample_size"])
    return {
        "captions": captions,
        "pairs": pairs,
        "latents": cache_table(root, "latents", [image_key(p.image) for p in pairs],
                               torch.randn(N, *shape, generator=g)),
        # Row 0 is the empty caption's (diffusion feedback's); the captions' rows follow.
        "conditioning": cache_table(root, "text", ["", *captions], torch.randn(N + 1, TOKENS, WIDTH, generator=g)),
        "images": torch.randn(N, 3, SIZE, SIZE, generator=g),
        "rows": torch.arange(N),
        "text_rows": torch.arange(1, N + 1),
    }


def run_step(teacher, world, opts: FastPath | None, seed: int = 0, scope: str = "layernorm", **objective):
    """One `train.loss_step` + backward from a fresh trial built by `train.setup`, under `opts`
    (None: the trainer's CPU default); returns (losses, gradients of the trainable params)."""
    student = build_toy_student(STUDENT, SIZE)
    trial = train.setup(TrainConfig(scope=scope, batch_size=N, steps=4), ObjectiveConfig(**{"lambda_sds": 1.0, **objective}),
                        student, world["pairs"], teacher, world["conditioning"], world["latents"])
    trial.generator.manual_seed(seed)
    if opts is not None:
        trial.fast = opts
        prepare_teacher_unet(teacher.unet, opts)
        prepare_student(student.model, opts)
    tokens = student.tokenizer(world["captions"])
    losses = train.loss_step(trial, world["images"], tokens, tokens, world["text_rows"], world["rows"])
    losses["total"].backward()
    grads = {name: p.grad.detach().clone() for name, p in trial.params.items()}
    prepare_teacher_unet(teacher.unet, FastPath.default_for("cpu"))  # back to the CPU default for the next test
    return {k: v.detach() for k, v in losses.items()}, grads


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.flatten() for _, g in sorted(grads.items())])


@pytest.fixture(scope="module")
def reference(teacher, world):
    """`pipeline.train.loss_step` as the trainer runs it on the CPU by default (fp32, eager)."""
    return run_step(teacher, world, None)


# --------------------------------------------------------------------------- options


def test_defaults_and_overrides():
    assert FastPath.default_for("cpu").autocast == "none" and not FastPath.default_for("cpu").compile
    cuda = FastPath.default_for("cuda")
    assert (cuda.autocast, cuda.sdpa, cuda.channels_last, cuda.batched_score) == ("bf16", True, True, True)
    assert cuda.compile_mode == "default" and not cuda.gradient_checkpointing
    assert FastPath.default_for("cpu", fast=True).autocast == "bf16"
    plain = FastPath.plain()
    assert (plain.autocast, plain.sdpa, plain.batched_score, plain.compile_mode) == ("none", False, False, None)
    opts = cuda.with_overrides("compile=off:ckpt=on:autocast=fp16")
    assert (opts.compile, opts.gradient_checkpointing, opts.autocast) == (False, True, "fp16")
    assert cuda.with_overrides("compile=max-autotune").compile_mode == "max-autotune"
    with pytest.raises(ValueError):
        FastPath(autocast="fp8")
    with pytest.raises(ValueError):
        cuda.with_overrides("turbo=on")
    with pytest.raises(ValueError):
        FastPath(compile="fastest")


# --------------------------------------------------------------------------- training step


def test_compute_config_picks_the_options_and_the_device():
    cpu = FastPath.from_config(ComputeConfig(), "cpu")
    assert cpu == FastPath.default_for("cpu")
    cuda = FastPath.from_config(ComputeConfig(), "cuda")
    assert cuda == FastPath.default_for("cuda")
    asked = FastPath.from_config(ComputeConfig(precision="fp32", compile="off", channels_last=False,
                                               gradient_checkpointing=True), "cuda")
    assert (asked.autocast, asked.compile, asked.channels_last, asked.gradient_checkpointing) == ("none", False, False, True)
    assert FastPath.from_config(ComputeConfig(precision="fp16", compile="max-autotune"), "cpu").compile_mode == "max-autotune"
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="compute.device: 'cuda:1' but no CUDA device"):
            resolve_device("cuda:1")


def test_setup_applies_the_compute_section(teacher, world):
    """`train.setup(..., compute)` puts the trial on the device with the section's options."""
    compute = ComputeConfig(device="cpu", precision="bf16", channels_last=True)
    trial = train.setup(TrainConfig(batch_size=N, steps=4), ObjectiveConfig(lambda_sds=1.0), build_toy_student(STUDENT, SIZE),
                        world["pairs"], teacher, world["conditioning"], compute=compute)
    try:
        assert trial.device == torch.device("cpu") and trial.scaler is None
        assert (trial.fast.autocast, trial.fast.channels_last) == ("bf16", True)
        conv = next(m for m in teacher.unet.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
        fp16 = train.setup(TrainConfig(batch_size=N, steps=4), ObjectiveConfig(lambda_sds=1.0),
                           build_toy_student(STUDENT, SIZE), world["pairs"], teacher, world["conditioning"],
                           compute=ComputeConfig(device="cpu", precision="fp16"))
        assert fp16.scaler is not None  # fp16 needs loss scaling, bf16 does not
    finally:
        prepare_teacher_unet(teacher.unet, FastPath.default_for("cpu"))


@pytest.mark.parametrize("scope, objective", [
    ("layernorm", {"gradient": "sds"}), ("layernorm", {"noising": "none", "latent_scale": 0.5}),
    ("layernorm", {"method": "unet_feature"}), ("full", {"method": "diffusion_feedback", "feedback_tokens": 3}),
], ids=["sds-gradient", "no-noising", "unet-feature", "diffusion-feedback"])
def test_fp32_options_keep_every_objective(teacher, world, scope, objective):
    ref_losses, ref_grads = run_step(teacher, world, None, scope=scope, **objective)
    losses, grads = run_step(teacher, world, FastPath.plain().replace(channels_last=True), scope=scope, **objective)
    assert set(losses) == set(ref_losses)
    for key in losses:
        assert math.isclose(losses[key], ref_losses[key], rel_tol=FP32_LOSS_RTOL), key
    for name in ref_grads:
        assert rel(grads[name], ref_grads[name]) <= FP32_GRAD_RTOL, name


@pytest.mark.parametrize("opts", [FastPath.plain(), FastPath.default_for("cpu").replace(channels_last=True)],
                         ids=["classic-attention", "channels-last"])
def test_fp32_options_keep_loss_and_gradients(teacher, world, reference, opts):
    losses, grads = run_step(teacher, world, opts)
    ref_losses, ref_grads = reference
    for key in ref_losses:
        assert math.isclose(losses[key], ref_losses[key], rel_tol=FP32_LOSS_RTOL), key
    for name in ref_grads:
        assert rel(grads[name], ref_grads[name]) <= FP32_GRAD_RTOL, name


def test_gradient_checkpointing_gives_the_same_gradients(teacher, world, reference):
    opts = FastPath.default_for("cpu").replace(gradient_checkpointing=True)
    losses, grads = run_step(teacher, world, opts)
    assert teacher.unet.is_gradient_checkpointing is False  # run_step restored the default
    ref_losses, ref_grads = reference
    for key in ref_losses:
        assert math.isclose(losses[key], ref_losses[key], rel_tol=1e-6), key
    for name in ref_grads:
        assert torch.allclose(grads[name], ref_grads[name], rtol=1e-6, atol=0), name


def test_bf16_autocast_within_tolerance(teacher, world, reference):
    ref_losses, ref_grads = reference
    opts = FastPath.default_for("cpu", fast=True).replace(channels_last=True)
    assert opts.autocast == "bf16"
    losses, grads = run_step(teacher, world, opts)
    for key in ref_losses:
        assert torch.isfinite(losses[key]) and losses[key].dtype == torch.float32, key
        assert math.isclose(losses[key], ref_losses[key], rel_tol=BF16_LOSS_RTOL), (key, losses[key], ref_losses[key])
    assert rel(flat(grads), flat(ref_grads)) <= BF16_GRAD_RTOL
    assert rel(grads["h_w.linear.weight"], ref_grads["h_w.linear.weight"]) <= BF16_GRAD_RTOL
    assert torch.cosine_similarity(flat(grads), flat(ref_grads), dim=0) >= BF16_MIN_COSINE
    # The bound is tight enough to notice a different computation: another (t, eps) draw.
    _, other = run_step(teacher, world, FastPath.default_for("cpu"), seed=1)
    assert rel(other["h_w.linear.weight"], ref_grads["h_w.linear.weight"]) > 5 * BF16_GRAD_RTOL


def test_bf16_unet_only_keeps_the_clip_loss_exact(teacher, world, reference):
    ref_losses, ref_grads = reference
    opts = FastPath.default_for("cpu", fast=True).replace(autocast_student=False)
    losses, grads = run_step(teacher, world, opts)
    assert torch.equal(losses["clip"], ref_losses["clip"])
    assert math.isclose(losses["sds"], ref_losses["sds"], rel_tol=BF16_LOSS_RTOL)
    assert rel(flat(grads), flat(ref_grads)) <= 1e-2
    assert rel(grads["h_w.linear.weight"], ref_grads["h_w.linear.weight"]) <= BF16_GRAD_RTOL


# --------------------------------------------------------------------------- diffusion score


def test_calls_pack_whole_images_and_split_only_oversized_ones():
    groups, index = image_groups(["a", "a", "b", "b", "a", "c"], ["x", "y", "x", "y", "x", "z"])
    assert list(groups.items()) == [("a", ["x", "y"]), ("b", ["x", "y"]), ("c", ["z"])]
    assert index == [0, 1, 2, 3, 0, 4]  # (a, x) twice: scored once
    assert list(pack_calls(groups, n=4, max_rows=8)) == [[("a", ["x", "y"])], [("b", ["x", "y"])], [("c", ["z"])]]
    assert list(pack_calls(groups, n=4, max_rows=20)) == [[("a", ["x", "y"]), ("b", ["x", "y"]), ("c", ["z"])]]
    assert list(pack_calls(groups, n=4, max_rows=4)) == [[("a", ["x"])], [("a", ["y"])], [("b", ["x"])],
                                                     [("b", ["y"])], [("c", ["z"])]]


@pytest.fixture(scope="module")
def score_tables(tmp_path_factory):
    """Cached latents of 4 images and conditioning of 5 captions (the empty one included) as real tables."""
    root = tmp_path_factory.mktemp("cache")
    g = torch.Generator().manual_seed(5)
    shape = (UNET["in_channels"], UNET["sample_size"], UNET["sample_size"])
    images = [f"/img/{i}.png" for i in range(4)]
    captions = ["", "a dog on a mat", "a mat on a dog", "red left of blue", "blue left of red"]
    lat = dict(zip(images, torch.randn(len(images), *shape, generator=g)))
    cond = dict(zip(captions, torch.randn(len(captions), TOKENS, WIDTH, generator=g)))
    write_table(root, "latents", images, lambda keys: torch.stack([lat[k] for k in keys]), 3, 2, progress=False)
    write_table(root, "text", captions, lambda keys: torch.stack([cond[k] for k in keys]), 3, 2, progress=False)
    # Winoground's order (task, caption, image) for two tasks, plus a repeated pair.
    pairs = [(images[2 * t + k], captions[1 + 2 * t + c]) for t in range(2) for c in range(2) for k in range(2)]
    pairs.append(pairs[1])
    return open_table(root, "latents"), open_table(root, "text"), [p[0] for p in pairs], [p[1] for p in pairs]


def test_batched_score_equals_the_per_pair_loop(teacher, score_tables):
    """The batched DiffusionScorer (one UNet call per image, or per several) = one call per pair."""
    latents, text, images, captions = score_tables
    n = 3
    per_pair = EvalConfig(diffusion_samples=n, batch_size=n, subtract_unconditional=True, seed=2)
    base = DiffusionScorer(teacher, latents, text, per_pair, opts=FastPath.plain().replace(sdpa=True))
    expected, empty = base.errors(images, captions), base.errors(images, [""] * len(images))
    assert len(set(expected.round(6))) >= 8  # the pairs differ: the comparison means something
    for rows in (n, 2 * n, 64):  # one caption per call / one image per call / every image in one call
        cfg = EvalConfig(diffusion_samples=n, batch_size=rows, subtract_unconditional=True, seed=2)
        fast = DiffusionScorer(teacher, latents, text, cfg, opts=FastPath.default_for("cpu"))
        assert fast.errors(images, captions) == pytest.approx(expected, rel=FP32_LOSS_RTOL), rows
        assert fast.errors(images, [""] * len(images)) == pytest.approx(empty, rel=FP32_LOSS_RTOL), rows
    # The score itself: minus (error - empty caption's error), a difference of near-equal numbers,
    # so its tolerance is relative to the errors' size.
    assert fast(images, captions) == pytest.approx(empty - expected, abs=FP32_LOSS_RTOL * float(expected.max()))
    # bf16 autocast in the per-pair loop: the UNet call alone runs in bf16.
    bf16 = DiffusionScorer(teacher, latents, text, per_pair, opts=FastPath.plain().replace(autocast="bf16"))
    assert bf16.errors(images, captions) == pytest.approx(expected, rel=BF16_LOSS_RTOL)


def test_batched_errors_for_a_v_prediction_teacher():
    """`batched_diffusion_errors` = `objectives.diffusion_errors` pair by pair, with a v-prediction target too."""
    teacher = make_teacher("v_prediction")
    g = torch.Generator().manual_seed(7)
    n = 3
    lat = torch.randn(2, UNET["in_channels"], UNET["sample_size"], UNET["sample_size"], generator=g)
    cond = torch.randn(3, TOKENS, WIDTH, generator=g)  # image 0: captions 0, 1; image 1: caption 2
    timesteps, noise = torch.tensor([50, 500, 950]), torch.randn(n, *lat.shape[1:], generator=g)
    got = batched_diffusion_errors(teacher.unet, teacher.scheduler, lat, cond, [2, 1], timesteps, noise,
                                   FastPath.default_for("cpu"))
    expected = [objectives.diffusion_errors(teacher.unet, teacher.scheduler, lat[i].expand(n, -1, -1, -1),
                                            cond[c].expand(n, -1, -1), timesteps, noise).mean()
                for i, c in ((0, 0), (0, 1), (1, 2))]
    assert got == pytest.approx(torch.stack(expected), rel=FP32_LOSS_RTOL)
