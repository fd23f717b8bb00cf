"""Scorers x benchmarks -> metric dicts named as MLflow shows them.

Two scorers: the CLIP student's cosine similarity, and the teacher's diffusion score
(eq. 1-2: minus the mean prediction error over a fixed bank of (t, eps) pairs shared by
every image and caption). Both produce the same score arrays, which the pure functions
of `pipeline.metrics` turn into numbers. `score_benchmarks` also times the scorer on the
Winoground tasks (`time/winoground_pair_s`): the paper's Fig. 1 sets that time against the
text score.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline import fastpath, metrics, objectives
from pipeline.cache import Table
from pipeline.config import EvalConfig
from pipeline.data.aro import excluded_vg_relations
from pipeline.data.datasets import Benchmarks
from pipeline.data.keys import choice_pairs, image_key, mmvp_pairs, parse_image_key, winoground_pairs
from pipeline.data.mmvp import metric_name
from pipeline.data.records import load_image
from pipeline.models.student import Student, image_tokens
from pipeline.models.teacher import Teacher
from pipeline.fastpath import FastPath
from pipeline.objectives import FeedbackProjector, LatentProjection, check_fits_teacher, diffusion_errors

# A score function maps (image keys, captions) pairs to one score per pair.
PairScorer = Callable[[list[str], list[str]], np.ndarray]


@dataclass
class Evaluation:
    """Scores of one model on the benchmarks: `metrics` by their MLflow names, and `outcomes`,
    each case's correctness behind a metric, so two runs scored on the same cases can be compared
    case by case (`comparison.paired_difference`): name -> {"correct": "0110...", "groups": [...],
    "cases": digest}, `groups` only for a macro mean (the cases of groups the benchmark drops are
    left out), `cases` the digest of the cases' identities in their order (`metrics.cases_digest`),
    so outcomes of other cases, or of the same in another order, are never paired."""

    metrics: dict[str, float] = field(default_factory=dict)
    outcomes: dict[str, dict] = field(default_factory=dict)

    def add(self, name: str, correct: np.ndarray, cases: list[str], groups: list[str] | None = None) -> None:
        if len(cases) != len(correct):
            raise ValueError(f"{name}: {len(cases)} case identities for {len(correct)} outcomes")
        self.outcomes[name] = {"correct": metrics.encode_correct(correct), "groups": groups,
                               "cases": metrics.cases_digest(cases)}

    def update(self, other: "Evaluation", prefix: str = "") -> "Evaluation":
        self.metrics.update({prefix + k: v for k, v in other.metrics.items()})
        self.outcomes.update({prefix + k: v for k, v in other.outcomes.items()})
        return self


def _synchronize() -> None:
    """Wait for the queued CUDA work, so that a clock reading comes after the work and not after its launch."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def case_identities(images: list[str], captions: list[str], per_case: int) -> list[str]:
    """Each case's identity, from the pairs scored for it (`per_case` consecutive (image key,
    caption) pairs a case): its image keys, then its captions."""
    return [json.dumps([images[i:i + per_case], captions[i:i + per_case]]) for i in range(0, len(images), per_case)]


def timed_scores(score: PairScorer, images: list[str], captions: list[str]) -> tuple[np.ndarray, float]:
    """`score(images, captions)` and its wall seconds (`time.perf_counter`, CUDA synchronised at both ends)."""
    _synchronize()
    start = time.perf_counter()
    scores = score(images, captions)
    _synchronize()
    return scores, time.perf_counter() - start


def score_benchmarks(score: PairScorer, bench: Benchmarks, bootstrap: int = 0, seed: int = 0, *,
                     attribution_min_cases: int) -> Evaluation:
    """Winoground text/image/group with breakdowns, the ARO sets, and SugarCrepe, MMVP-VLM and CLEVR
    where the data has them, under one scorer.

    With `bootstrap` > 0, Winoground's scores also get 95% percentile-bootstrap intervals
    over tasks (`winoground/text/ci_low`, `.../ci_high`): with 400 tasks one task is 0.25
    points, so differences of a point or two are noise. VG-Attribution averages the attribute
    pairs with at least `attribution_min_cases` cases (`eval.vg_attribution_min_cases`).

    The Winoground scoring, the first call of `score`, is timed: `time/winoground_pair_s` is its
    wall seconds per image-caption pair and `time/winoground_pairs` the pairs it scored. It covers
    all the scorer's call does: a CLIP student decoding and preprocessing the images and running
    both encoders, the diffusion score reading its cached VAE latents and text conditionings
    and running the UNet (those caches are built by the cache stage, outside the clock), and
    first-call costs (CUDA kernel selection, torch.compile of the UNet when `compute.compile` is
    on). These are the only metrics that differ between two runs of the same scorer.
    """
    result = Evaluation()
    out = result.metrics
    images, captions = winoground_pairs(bench.winoground)
    wino, seconds = timed_scores(score, images, captions)
    if images:
        out[metrics.TIME_PER_PAIR], out[metrics.TIMED_PAIRS] = seconds / len(images), float(len(images))
    wino = wino.reshape(len(bench.winoground), 2, 2)
    scores = metrics.winoground(wino, [t.collapsed_tag for t in bench.winoground],
                                [t.num_main_preds for t in bench.winoground])
    out.update({f"winoground/{k}": v for k, v in scores.items()})
    tasks = case_identities(images, captions, 4)
    for name, correct in metrics.winoground_correct(wino).items():
        result.add(f"winoground/{name}", correct, tasks)
        if bootstrap:
            low, high = metrics.bootstrap_interval(correct, n_resamples=bootstrap, seed=seed)
            out[f"winoground/{name}/ci_low"], out[f"winoground/{name}/ci_high"] = low, high
    for name, cases in bench.aro.items():
        scores, identities = _choice_scores(score, cases)
        answers = [c.answer for c in cases]
        groups = [c.group for c in cases]
        if name == "vg_relation":
            out[f"aro/{name}"] = metrics.aro_vg_relation(scores, answers, groups, excluded_vg_relations())
            kept = metrics.macro_kept(groups, exclude=excluded_vg_relations())
        elif name == "vg_attribution":
            out[f"aro/{name}"] = metrics.aro_vg_attribution(scores, answers, groups, min_count=attribution_min_cases)
            kept = metrics.macro_kept(groups, min_count=attribution_min_cases)
        else:
            out[f"aro/{name}"] = metrics.aro_order(scores, ties="first")
            result.add(f"aro/{name}", metrics.choice_correct(scores, np.zeros(len(cases), dtype=np.int64), ties="first"),
                       identities)
            continue
        correct = metrics.choice_correct(scores, answers)
        result.add(f"aro/{name}", correct[kept], [c for c, keep in zip(identities, kept) if keep],
                   [g for g, keep in zip(groups, kept) if keep])
    if "aro/vg_relation" in out and "aro/vg_attribution" in out:
        out["aro/overall"] = (out["aro/vg_relation"] + out["aro/vg_attribution"]) / 2
    if bench.sugarcrepe:
        _score_sets(result, "sugarcrepe", score, bench.sugarcrepe, metrics.sugarcrepe_correct, metrics.sugarcrepe)
    if bench.mmvp:
        _score_mmvp(result, score, bench)
    if bench.clevr:
        _score_sets(result, "clevr", score, bench.clevr, metrics.clevr_correct, metrics.clevr)
    return result


def _choice_scores(score: PairScorer, cases) -> tuple[np.ndarray, list[str]]:
    """The scores [case, option] of multiple-choice cases, and the cases' identities."""
    images, captions = choice_pairs(cases)
    k = len(cases[0].options)
    return score(images, captions).reshape(len(cases), k), case_identities(images, captions, k)


def _score_sets(result: Evaluation, prefix: str, score: PairScorer, sets: dict, correct_of: Callable,
                aggregate: Callable) -> None:
    """A benchmark of two-option subsets (SugarCrepe, CLEVR): each subset's cases and the release's
    aggregates (`<prefix>/<subset>`, and the composites `comparison.outcome_parts` rebuilds from them)."""
    correct = {}
    for name, cases in sets.items():
        scores, identities = _choice_scores(score, cases)
        correct[name] = correct_of(scores)
        result.add(f"{prefix}/{name}", correct[name], identities)
    result.metrics.update({f"{prefix}/{name}": value for name, value in aggregate(correct).items()})


def _score_mmvp(result: Evaluation, score: PairScorer, bench: Benchmarks) -> None:
    """MMVP-VLM: pair accuracy per pattern (`mmvp/<pattern slug>`) and their mean (`mmvp/mean`)."""
    images, captions = mmvp_pairs(bench.mmvp)
    scores = score(images, captions).reshape(len(bench.mmvp), 2, 2)
    correct = metrics.mmvp_correct(scores, [(p.answer_1, p.answer_2) for p in bench.mmvp])
    patterns = [p.pattern for p in bench.mmvp]
    of_pair, identities = np.array(patterns), np.array(case_identities(images, captions, 4))
    for pattern in dict.fromkeys(patterns):
        mask = of_pair == pattern
        result.add(metric_name(pattern), correct[mask], identities[mask].tolist())
    values = metrics.mmvp(correct, patterns)
    result.metrics.update({metric_name(name): values[name] for name in dict.fromkeys(patterns)})
    result.metrics["mmvp/mean"] = values["mean"]


class ClipScorer:
    """Cosine similarity of the student's normalised image and text embeddings."""

    def __init__(self, student: Student, batch_size: int, device: str = "cpu"):
        self.student, self.batch_size, self.device = student, batch_size, device
        self._images: dict[str, torch.Tensor] = {}
        self._texts: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def _embed(self, store: dict[str, torch.Tensor], keys: list[str], encode: Callable, what: str) -> None:
        """Embed the keys not yet in `store`, in batches, L2-normalised, on the CPU; `what` they are: the
        progress bar's label, shown from 10,000 keys on (a paper benchmark's images take minutes; the toy's
        hundreds would fill a log with bars)."""
        todo = [k for k in dict.fromkeys(keys) if k not in store]
        self.student.model.eval()
        for i in tqdm(range(0, len(todo), self.batch_size), desc=f"embedding {what}", leave=False,
                      disable=len(todo) < 10_000):
            chunk = todo[i : i + self.batch_size]
            store.update(zip(chunk, F.normalize(encode(chunk).float(), dim=-1).cpu()))

    def _embed_images(self, keys: list[str]) -> None:
        pixels = lambda chunk: torch.stack([self.student.preprocess(load_image(*parse_image_key(k))) for k in chunk])
        self._embed(self._images, keys, lambda chunk: self.student.model.encode_image(pixels(chunk).to(self.device)),
                    "images")

    def _embed_texts(self, texts: list[str]) -> None:
        self._embed(self._texts, texts,
                    lambda chunk: self.student.model.encode_text(self.student.tokenizer(chunk).to(self.device)), "captions")

    def image_embeddings(self, keys: list[str]) -> torch.Tensor:
        """The normalised image embeddings of `keys` (on the CPU), each image embedded once."""
        self._embed_images(keys)
        return torch.stack([self._images[k] for k in keys])

    def __call__(self, images: list[str], captions: list[str]) -> np.ndarray:
        self._embed_texts(captions)
        txt = torch.stack([self._texts[c] for c in captions])
        return (self.image_embeddings(images) * txt).sum(-1).numpy()

    def zeroshot(self, shot) -> np.ndarray:
        """Per-image top-1 correctness with one classifier row per class: the mean of its templates' embeddings."""
        prompts = [template.format(name) for name in shot.classnames for template in shot.templates]
        self._embed_texts(prompts)
        rows = torch.stack([self._texts[p] for p in prompts]).view(len(shot.classnames), len(shot.templates), -1)
        classifier = F.normalize(rows.mean(1), dim=-1)
        logits = self.image_embeddings([image_key(p) for p in shot.images]) @ classifier.T
        return metrics.zeroshot_correct(logits.numpy(), np.asarray(shot.labels))


class ProjectedLatents:
    """Latent rows h_w(f(x)) * scale for image keys, in place of the images' VAE latents
    (`DiffusionScorer` reads either through `get`): the x_0 that L_SDS noises under
    `objective.noising: noise` (under `none` L_SDS feeds it to the UNet as it is, and the score
    still noises it as an x_0)."""

    def __init__(self, scorer: ClipScorer, projection: LatentProjection, scale: float):
        self.scorer, self.projection, self.scale = scorer, projection, scale

    @torch.no_grad()
    def get(self, keys: list[str]) -> torch.Tensor:
        weight = self.projection.linear.weight
        embeddings = self.scorer.image_embeddings(keys).to(device=weight.device, dtype=weight.dtype)
        return (self.projection(embeddings) * self.scale).float().cpu()


def noise_bank(cfg: EvalConfig, latent_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The diffusion score's fixed (t, eps) bank: `eval.diffusion_samples` steps on an even grid of
    [diffusion_t_min, diffusion_t_max] and one noise tensor each, drawn with `eval.seed`."""
    n = cfg.diffusion_samples
    timesteps = torch.linspace(cfg.diffusion_t_min, cfg.diffusion_t_max, n).round().long()
    return timesteps, torch.randn((n, *latent_shape), generator=torch.Generator().manual_seed(cfg.seed))


class DiffusionScorer:
    """Minus the teacher's mean epsilon error (`eval.error`: squared, or its norm) over a fixed bank
    of (t, eps) pairs; a v-prediction teacher's output is converted to its epsilon estimate first.

    The same timesteps and noises serve every image and caption (so caption choices for
    one image differ only by the caption), on a deterministic grid of timesteps. With
    `opts.batched_score` (the default) each distinct (image, caption) pair is scored once
    and all captions x samples of an image go through one UNet call, the noisy latents
    built once per image; otherwise one call per pair. Rows per UNet call: at most
    `max(cfg.batch_size, captions of one image x samples)`.
    """

    def __init__(self, teacher: Teacher, latents: Table | ProjectedLatents, conditioning: Table, cfg: EvalConfig,
                 device: torch.device | str = "cpu", opts: FastPath | None = None):
        self.teacher, self.latents, self.conditioning, self.cfg, self.device = teacher, latents, conditioning, cfg, device
        self.opts = opts or FastPath.default_for(device)
        check_fits_teacher(teacher.scheduler, "eval.diffusion_t_max", cfg.diffusion_t_max)
        self.timesteps, self.noise = noise_bank(cfg, teacher.latent_shape)

    def errors(self, images: list[str], captions: list[str]) -> np.ndarray:
        if self.opts.batched_score:
            return self._batched_errors(images, captions)
        n = len(self.timesteps)
        per_call = max(1, self.cfg.batch_size // n)
        out = np.zeros(len(images))
        unet = fastpath.unet_caller(self.teacher.unet, self.opts, torch.device(self.device))
        for i in tqdm(range(0, len(images), per_call), desc="diffusion score", leave=False):
            lat = self.latents.get(images[i : i + per_call])
            cond = self.conditioning.get(captions[i : i + per_call])
            b = len(lat)
            err = diffusion_errors(
                unet, self.teacher.scheduler,
                lat.repeat_interleave(n, 0).to(self.device), cond.repeat_interleave(n, 0).to(self.device),
                self.timesteps.repeat(b).to(self.device), self.noise.repeat(b, 1, 1, 1).to(self.device),
                self.cfg.error,
            )
            out[i : i + b] = err.view(b, n).mean(1).cpu().numpy()
        return out

    def _batched_errors(self, images: list[str], captions: list[str]) -> np.ndarray:
        n = len(self.timesteps)
        groups, index = fastpath.image_groups(images, captions)
        timesteps, noise = self.timesteps.to(self.device), self.noise.to(self.device)
        distinct: list[np.ndarray] = []
        calls = list(fastpath.pack_calls(groups, n, max(self.cfg.batch_size, n)))
        for call in tqdm(calls, desc="diffusion score", leave=False):
            lat = self.latents.get([image for image, _ in call]).to(self.device)
            cond = self.conditioning.get([c for _, caps in call for c in caps]).to(self.device)
            err = fastpath.batched_diffusion_errors(self.teacher.unet, self.teacher.scheduler, lat, cond,
                                                    [len(caps) for _, caps in call], timesteps, noise, self.opts,
                                                    self.cfg.error)
            distinct.append(err.cpu().numpy().astype(np.float64))
        flat = np.concatenate(distinct) if distinct else np.zeros(0)
        return flat[np.asarray(index, dtype=np.int64)] if index else np.zeros(0)

    def __call__(self, images: list[str], captions: list[str]) -> np.ndarray:
        errors = self.errors(images, captions)
        if self.cfg.subtract_unconditional:
            errors = errors - self.errors(images, [""] * len(images))
        return -errors


def evaluate_student(student: Student, bench: Benchmarks, cfg: EvalConfig,
                     device: torch.device | str = "cpu") -> Evaluation:
    student.model.to(device)
    scorer = ClipScorer(student, cfg.batch_size, device)
    result = score_benchmarks(scorer, bench, cfg.bootstrap, cfg.seed,
                              attribution_min_cases=cfg.vg_attribution_min_cases)
    for shot in bench.zeroshot:
        correct = scorer.zeroshot(shot)
        result.metrics[f"zeroshot/{shot.name}"] = float(np.mean(correct))
        result.add(f"zeroshot/{shot.name}", correct,
                   [json.dumps([image_key(p), shot.classnames[label]]) for p, label in zip(shot.images, shot.labels)])
    if bench.zeroshot:
        result.metrics["zeroshot/mean"] = float(np.mean([result.metrics[f"zeroshot/{s.name}"] for s in bench.zeroshot]))
    return result


def evaluate_projection(student: Student, projection: LatentProjection, scale: float, teacher: Teacher,
                        conditioning: Table, bench: Benchmarks, cfg: EvalConfig,
                        device: torch.device | str = "cpu", opts: FastPath | None = None) -> Evaluation:
    """The teacher's diffusion score of the Winoground-style tasks with each image's latent
    replaced by h_w(f(x)) (`ProjectedLatents`), as `projected/winoground/...`, on the first
    `eval.diagnostic_tasks` tasks.

    It asks whether the teacher, reading what the student's projected embedding puts before
    it, still prefers each image's own caption: it can reach the teacher's own score only
    if h_w(f(x)) carries the scene the way the VAE latent does, and it sits near 0 when the
    projection hardly depends on the image (then one caption wins for both images). Only
    the Winoground-style tasks are scored; the ARO sets would cost several times as much.
    The teacher's UNet is used as it is on `device` (a trial has frozen it and applied `opts`).
    """
    student.model.to(device)
    teacher.unet.to(device)
    scorer = DiffusionScorer(teacher, ProjectedLatents(ClipScorer(student, cfg.batch_size, device), projection, scale),
                             conditioning, cfg, device, opts)
    tasks = diagnostic_tasks(bench, cfg)
    scores = score_benchmarks(scorer, Benchmarks(tasks), cfg.bootstrap, cfg.seed,
                              attribution_min_cases=cfg.vg_attribution_min_cases)
    return Evaluation().update(scores, prefix="projected/")


def diagnostic_tasks(bench: Benchmarks, cfg: EvalConfig) -> list:
    """The Winoground-style tasks a trial's diagnostics score (`eval.diagnostic_tasks`, 0: all)."""
    return bench.winoground[:cfg.diagnostic_tasks] if cfg.diagnostic_tasks else bench.winoground


@torch.no_grad()
def evaluate_feedback(student: Student, projector: FeedbackProjector, teacher: Teacher, latents: Table,
                      empty: torch.Tensor, bench: Benchmarks, cfg: EvalConfig, feedback_tokens: int = 0,
                      device: torch.device | str = "cpu") -> Evaluation:
    """Diffusion feedback's diagnostic on the images of the first `eval.diagnostic_tasks`
    Winoground-style tasks: the teacher's mean epsilon
    error on each image's own latent over the score's (t, eps) bank (`noise_bank`), conditioned on
    the student's projected tokens (`feedback/error`) and on the empty caption alone
    (`feedback/error_empty`), and their ratio `feedback/error_ratio`: below 1 when what the student
    gives the teacher tells it about the image it denoises, 1 when it tells it nothing. Patch
    tokens, when the trial used some, are drawn once with `eval.seed`."""
    keys = list(dict.fromkeys(winoground_pairs(diagnostic_tasks(bench, cfg))[0]))
    timesteps, noise = noise_bank(cfg, teacher.latent_shape)
    n = len(timesteps)
    generator = torch.Generator().manual_seed(cfg.seed)
    student.model.to(device).eval()
    teacher.unet.to(device)
    errors = {"feedback/error": [], "feedback/error_empty": []}
    per_call = max(1, cfg.batch_size // n)
    for i in range(0, len(keys), per_call):
        chunk = keys[i:i + per_call]
        pixels = torch.stack([student.preprocess(load_image(*parse_image_key(k))) for k in chunk]).to(device)
        if feedback_tokens:
            pooled, patches = image_tokens(student.model, pixels)
        else:
            pooled, patches = student.model.encode_image(pixels), None
        tokens = objectives.feedback_tokens(pooled, patches, feedback_tokens, generator)
        conditions = {"feedback/error": projector(tokens, empty.to(device)),
                      "feedback/error_empty": empty.to(device).expand(len(chunk), -1, -1)}
        lat = latents.get(chunk).to(device).repeat_interleave(n, 0)
        for name, cond in conditions.items():
            err = diffusion_errors(teacher.unet, teacher.scheduler, lat, cond.repeat_interleave(n, 0),
                                   timesteps.repeat(len(chunk)).to(device), noise.repeat(len(chunk), 1, 1, 1).to(device),
                                   cfg.error)
            errors[name].append(err.view(len(chunk), n).mean(1).cpu())
    out = {name: float(torch.cat(values).mean()) for name, values in errors.items()}
    out["feedback/error_ratio"] = out["feedback/error"] / out["feedback/error_empty"]
    return Evaluation(out)


def evaluate_teacher(teacher: Teacher, latents: Table, conditioning: Table, bench: Benchmarks,
                     cfg: EvalConfig, device: torch.device | str = "cpu", opts: FastPath | None = None) -> Evaluation:
    """The diffusion score on `device` with the fast-path options (default: `FastPath.default_for(device)`)."""
    opts = opts or FastPath.default_for(device)
    teacher.unet.to(device)
    fastpath.prepare_teacher_unet(teacher.unet, opts)
    scorer = DiffusionScorer(teacher, latents, conditioning, cfg, device, opts)
    return score_benchmarks(scorer, bench, cfg.bootstrap, cfg.seed,
                            attribution_min_cases=cfg.vg_attribution_min_cases)
