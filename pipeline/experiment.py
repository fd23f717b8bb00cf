"""The baselines and one fine-tuning trial + its evaluation.

`run_finetune` is what the train stages and a sweep's trials run, and records nothing;
`record_finetune` and `run_baselines` record the stages' runs in MLflow and return what the
stages write to their results files (run id, metrics, per-case outcomes).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipeline import train as trainer
from pipeline.cache import open_table
from pipeline.config import Config, to_dict
from pipeline.data.datasets import benchmarks, read_index, train_negatives, train_pairs
from pipeline.data.keys import image_key
from pipeline.device import resolve_device
from pipeline.digest import fingerprint, text_digest
from pipeline.evaluate import evaluate_feedback, evaluate_projection, evaluate_student, evaluate_teacher
from pipeline.fastpath import FastPath
from pipeline.inputs import check_encoded_by, teacher_tables
from pipeline.models import student_dir, teacher_dir
from pipeline.models.student import load_student
from pipeline.models.teacher import load_teacher
from pipeline.tracking import OUTCOMES, Tracker


def run_baselines(cfg: Config, root: Path, data_root: Path, models: Path, cache: Path, tracker: Tracker) -> dict:
    """Every pretrained student and the teacher's diffusion score on every benchmark, each entry with
    the Winoground scoring's time per pair (`metrics.TIME_PER_PAIR`), the diffusion score's with
    its sample count (`diffusion_samples`)."""
    bench = benchmarks(data_root, read_index(data_root))
    device = resolve_device(cfg.compute.device)
    # The teacher and its cached tables, checked before any student's run is recorded.
    teacher = load_teacher(teacher_dir(models))
    images, texts = open_table(cache, "bench_images"), open_table(cache, "bench_text")
    check_encoded_by(teacher_dir(models), images, texts)
    tags = {"profile": cfg.profile, "stage": "baselines"}
    tracker.end_abandoned({"stage": "baselines"}, "killed; the baselines stage ran again")
    results = {}
    for name in cfg.students:
        # Nothing trains it: the config's fine-tuning keys would describe another run (its student is a tag).
        with tracker.start(f"pretrained {name}", params=to_dict(cfg), compared=("profile",),
                           tags={**tags, "row": "pretrained", "student": name}) as run:
            result = evaluate_student(load_student(student_dir(models, name)), bench, cfg.eval, device)
            run.log_metrics(result.metrics)
            run.log_dict(result.outcomes, OUTCOMES)
        results[f"pretrained/{name}"] = {"run_id": run.run_id, "metrics": result.metrics, "outcomes": result.outcomes}
    with tracker.start(f"diffusion score {cfg.teacher.name}", params=to_dict(cfg),
                       compared=("profile", "teacher.name", "eval.diffusion_samples"),
                       tags={**tags, "row": "diffusion_score"}) as run:
        start = time.perf_counter()
        result = evaluate_teacher(teacher, images, texts, bench, cfg.eval, device, FastPath.from_config(cfg.compute, device))
        result.metrics["time/eval_seconds"] = time.perf_counter() - start
        run.log_metrics(result.metrics)
        run.log_dict(result.outcomes, OUTCOMES)
    # The sample count sets the score's cost (Fig. 1 labels the point with it); MLflow has it among the params.
    results["diffusion_score"] = {"run_id": run.run_id, "diffusion_samples": cfg.eval.diffusion_samples,
                                  "metrics": result.metrics, "outcomes": result.outcomes}
    return results


@dataclass
class Finetune:
    """A fine-tuning trial set up from its config, every input checked and its checkpoint loaded: what
    `train_and_evaluate` runs."""

    cfg: Config
    data_root: Path
    index: dict
    trial: trainer.Trial
    tables: dict                  # the cache tables it reads, by name (`inputs.teacher_tables`)
    folder: Path


def prepare_finetune(cfg: Config, data_root: Path, models: Path, cache: Path, folder: Path) -> Finetune:
    """Everything before the first step that can refuse the config or its inputs (the batch against
    the pairs, the cache tables against the teacher, the trial's setup, a checkpoint of other settings):
    done before a recorder opens a run, so a refusal leaves none."""
    index = read_index(data_root)
    pairs = checked_pairs(cfg, data_root, index)
    student = load_student(student_dir(models, cfg.train.student))
    objective = cfg.objective
    teacher = load_teacher(teacher_dir(models)) if objective.teacher_loss else None
    # The tables the evaluation reads too are opened (checked) now, not found broken after the training.
    tables = {name: open_table(cache, name) for name in teacher_tables(cfg)}
    check_encoded_by(teacher_dir(models), *tables.values())
    conditioning, latents = tables.get("train_text"), tables.get("train_images")
    negatives = train_negatives(data_root, index, pairs) if objective.method == "negclip" else None
    inputs = trial_inputs(pairs, student_dir(models, cfg.train.student), conditioning, latents)
    trial = trainer.setup(cfg.train, objective, student, pairs, teacher, conditioning, latents, cfg.compute, inputs,
                          negatives)
    trainer.load_checkpoint(trial, folder)
    return Finetune(cfg, data_root, index, trial, tables, folder)


def train_and_evaluate(run: Finetune, on_log: Callable[[int, dict], None] | None = None,
                       on_checkpoint: Callable[[int, Path], None] | None = None, progress: bool = True) -> dict:
    """Train a prepared trial and evaluate it: events and results out (see `run_finetune`)."""
    cfg, trial, objective = run.cfg, run.trial, run.cfg.objective
    log = on_log or (lambda step, values: None)
    for entry in trial.history:
        log(entry["step"], {k: v for k, v in entry.items() if k != "step"})
    start = time.perf_counter()
    trainer.fit(trial, run.folder, on_log=log, progress=progress, on_checkpoint=on_checkpoint)
    train_seconds = time.perf_counter() - start
    trained = trainer.save_trained(trial, run.folder)
    bench = benchmarks(run.data_root, run.index)
    result = evaluate_student(trial.student, bench, cfg.eval, trial.device)
    if (bench_text := run.tables.get("bench_text")) is not None:
        start = time.perf_counter()
        result.update(evaluate_projection(trial.student, trial.projector, objective.latent_scale, trial.teacher,
                                          bench_text, bench, cfg.eval, trial.device, trial.fast))
        result.metrics["time/projected_seconds"] = time.perf_counter() - start
    if (bench_images := run.tables.get("bench_images")) is not None:
        result.update(evaluate_feedback(trial.student, trial.projector, trial.teacher, bench_images, trial.empty, bench,
                                        cfg.eval, objective.feedback_tokens, trial.device))
    result.metrics.update({"trainable_parameters": trial.trainable_count, "time/train_seconds": train_seconds})
    return {"metrics": result.metrics, "outcomes": result.outcomes, "trained": trained}


def run_finetune(cfg: Config, data_root: Path, models: Path, cache: Path, folder: Path,
                 on_log: Callable[[int, dict], None] | None = None,
                 on_checkpoint: Callable[[int, Path], None] | None = None, progress: bool = True) -> dict:
    """Fine-tune `cfg.train.student` with `cfg.objective` and evaluate it: config in, events and results out.

    `on_log(step, losses)` sees every logged step, those replayed from a checkpoint `folder` held
    first (so a new record of a resumed trial still starts at step 1); `on_checkpoint(step, folder)`
    sees every checkpoint (`train.fit`). Returns the final `metrics`, the per-case `outcomes` and the
    `trained` file. Nothing here records anything: the caller's recorder does (`record_finetune` for the stages, the sweep's run recorder for trials).
    """
    return train_and_evaluate(prepare_finetune(cfg, data_root, models, cache, folder), on_log, on_checkpoint, progress)


def trial_inputs(pairs: list, student: Path, conditioning=None, latents=None) -> dict:
    """What a checkpoint must have been trained from to be resumed: the pairs (by image key, which
    holds no checkout path: a moved project resumes), the student's weights, and the cache tables it
    reads as their meta records them: the teacher (no second hash of a multi-GB UNet), the device and
    code that encoded them, and the image files of the latents."""
    return {"pairs": text_digest(f"{image_key(p.image)}\t{p.caption}" for p in pairs),
            "student": fingerprint(student),
            "conditioning": conditioning.meta if conditioning is not None else None,
            "latents": latents.meta if latents is not None else None}


def checked_pairs(cfg: Config, data_root: Path, index: dict | None = None) -> list:
    """The training pairs, refused in one line when `train.batch_size` exceeds them (`train.check_batch`)."""
    pairs = train_pairs(data_root, index if index is not None else read_index(data_root))
    trainer.check_batch(cfg.train.batch_size, len(pairs), "train.batch_size", data_root)
    return pairs


def loss_metrics(losses: dict) -> dict:
    """A logged step's losses under their metric names (`loss/<name>`; the learning rate as `lr`)."""
    return {f"loss/{k}" if k != "lr" else "lr": v for k, v in losses.items()}


def record_finetune(cfg: Config, data_root: Path, models: Path, cache: Path, folder: Path, tracker: Tracker,
                    run_name: str, tags: dict | None = None, progress: bool = True) -> dict:
    """`run_finetune` recorded as one MLflow run (the stages' recorder): params, every step's losses,
    the final metrics, the outcomes and the trained file. The checkpoint in `folder` is kept: the
    caller discards it (`train.discard_checkpoint`) once it has written what it keeps of the result,
    so a stage that failed in its evaluation, or in writing its results file, resumes from there."""
    run_tags = {"profile": cfg.profile, "stage": "train", "student": cfg.train.student, "method": cfg.objective.method,
                **(tags or {})}
    prepared = prepare_finetune(cfg, data_root, models, cache, folder)   # a refused config or input leaves no run
    tracker.end_abandoned({k: run_tags[k] for k in ("stage", "row") if k in run_tags},
                          f"killed; continued by a later {run_name!r} run")
    with tracker.start(run_name, params=to_dict(cfg), tags=run_tags) as run:
        result = train_and_evaluate(prepared, progress=progress,
                                    on_log=lambda step, losses: run.log_metrics(loss_metrics(losses), step))
        run.log_metrics(result["metrics"])
        run.log_dict(result["outcomes"], OUTCOMES)
        run.log_artifact(result["trained"])
    return {"run_id": run.run_id, "metrics": result["metrics"], "outcomes": result["outcomes"],
            "trainable_parameters": result["metrics"]["trainable_parameters"]}
