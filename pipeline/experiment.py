"""Runs that end up in MLflow: the baselines, and one fine-tuning trial + its evaluation.

These are what the DVC stages and the sweep call; each returns the metrics it logged and
writes a small JSON result (run id + metrics) for DVC to track.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from pipeline import train as trainer
from pipeline.cache import open_table
from pipeline.config import Config, to_dict
from pipeline.data.datasets import benchmarks, read_index, train_negatives, train_pairs
from pipeline.device import resolve_device
from pipeline.digest import fingerprint, text_digest
from pipeline.evaluate import evaluate_feedback, evaluate_projection, evaluate_student, evaluate_teacher
from pipeline.fastpath import FastPath
from pipeline.models.build import student_dir, teacher_dir
from pipeline.models.student import load_student
from pipeline.models.teacher import load_teacher
from pipeline.tracking import Tracker

# The MLflow artifact holding a run's per-case correctness (`evaluate.Evaluation.outcomes`).
OUTCOMES = "outcomes.json"


def run_baselines(cfg: Config, root: Path, data_root: Path, models: Path, cache: Path, tracker: Tracker) -> dict:
    """Every pretrained student and the teacher's diffusion score on every benchmark."""
    bench = benchmarks(data_root, read_index(data_root))
    device = resolve_device(cfg.compute.device)
    tags = {"profile": cfg.profile, "stage": "baselines"}
    results = {}
    for name in cfg.students:
        with tracker.start(f"pretrained {name}", params=to_dict(cfg),
                           tags={**tags, "row": "pretrained", "student": name}) as run:
            result = evaluate_student(load_student(student_dir(models, name)), bench, cfg.eval, device)
            run.log_metrics(result.metrics)
            run.log_dict(result.outcomes, OUTCOMES)
        results[f"pretrained/{name}"] = {"run_id": run.run_id, "metrics": result.metrics, "outcomes": result.outcomes}
    with tracker.start(f"diffusion score {cfg.teacher.name}", params=to_dict(cfg),
                       tags={**tags, "row": "diffusion_score"}) as run:
        start = time.perf_counter()
        result = evaluate_teacher(load_teacher(teacher_dir(models)), open_table(cache, "bench_images"),
                                  open_table(cache, "bench_text"), bench, cfg.eval, device,
                                  FastPath.from_config(cfg.compute, device))
        result.metrics["time/eval_seconds"] = time.perf_counter() - start
        run.log_metrics(result.metrics)
        run.log_dict(result.outcomes, OUTCOMES)
    results["diffusion_score"] = {"run_id": run.run_id, "metrics": result.metrics, "outcomes": result.outcomes}
    return results


def run_finetune(cfg: Config, data_root: Path, models: Path, cache: Path, folder: Path, tracker: Tracker,
                 run_name: str, tags: dict | None = None, parent: str | None = None,
                 run_id: str | None = None, on_log: Callable[[int, dict], None] | None = None,
                 on_checkpoint: Callable[[int, Path], None] | None = None, progress: bool = True) -> dict:
    """Fine-tune `cfg.train.student` with `cfg.objective`, evaluate it, log it all to one run.

    `run_id` continues an existing run (a resumed sweep trial) instead of starting one;
    `on_log` / `on_checkpoint` are passed on to `train.fit` (after the losses are logged).
    A `train.TrialStopped` raised by them ends the run as KILLED rather than FAILED.
    """
    student = load_student(student_dir(models, cfg.train.student))
    index = read_index(data_root)
    pairs = train_pairs(data_root, index)
    objective = cfg.objective
    teacher = load_teacher(teacher_dir(models)) if objective.teacher_loss else None
    conditioning = open_table(cache, "train_text") if objective.teacher_loss else None
    reads_latents = objective.teacher_loss and objective.method in ("unet_feature", "diffusion_feedback")
    latents = open_table(cache, "train_images") if reads_latents else None
    negatives = train_negatives(data_root, index, pairs) if objective.method == "negclip" else None
    params = to_dict(cfg)
    run_tags = {"profile": cfg.profile, "stage": "train", "student": cfg.train.student, "method": objective.method,
                **(tags or {})}
    if run_id:
        run = tracker.resume(run_id)
        run.log_params(params)
        run.set_tags(run_tags)
    else:
        run = tracker.start(run_name, params=params, parent=parent, tags=run_tags)

    # A resumed run re-runs the steps after its last checkpoint; they were logged before the
    # interruption (with the same values: the steps are deterministic), so they are not logged twice.
    logged_until = max((step for step, _ in tracker.metric_history(run_id, "loss/total")), default=0) if run_id else 0

    def loss_metrics(values: dict) -> dict:
        return {f"loss/{k}" if k != "lr" else "lr": v for k, v in values.items() if k != "step"}

    def log(step: int, values: dict) -> None:
        if step > logged_until:
            run.log_metrics(loss_metrics(values), step)
        if on_log:
            on_log(step, values)

    try:
        # What a checkpoint must have been trained from to be resumed: the pairs, the student's
        # weights, and the teacher as the cache recorded it (no second hash of a multi-GB UNet).
        inputs = {"pairs": text_digest(f"{p.image}\t{p.caption}" for p in pairs),
                  "student": fingerprint(student_dir(models, cfg.train.student)),
                  "teacher": conditioning.meta.get("teacher") if conditioning is not None else None}
        trial = trainer.setup(cfg.train, objective, student, pairs, teacher, conditioning, latents, cfg.compute, inputs,
                              negatives)
        run.log_metrics({"trainable_parameters": trial.trainable_count})
        if trainer.load_checkpoint(trial, folder) and not run_id:
            # A new run that continues an interrupted trial (e.g. after a failed evaluation):
            # its loss curve still starts at step 1.
            for entry in trial.history:
                run.log_metrics(loss_metrics(entry), entry["step"])
        start = time.perf_counter()
        trainer.fit(trial, folder, on_log=log, progress=progress, on_checkpoint=on_checkpoint)
        train_seconds = time.perf_counter() - start
        checkpoint = trainer.save_trained(trial, folder)
        run.log_artifact(checkpoint)
        bench = benchmarks(data_root, index)
        result = evaluate_student(student, bench, cfg.eval, trial.device)
        if cfg.eval.projected_score and trial.projector is not None and objective.method == "sds":
            start = time.perf_counter()
            result.update(evaluate_projection(student, trial.projector, objective.latent_scale, teacher,
                                              open_table(cache, "bench_text"), bench, cfg.eval, trial.device,
                                              trial.fast))
            result.metrics["time/projected_seconds"] = time.perf_counter() - start
        if trial.projector is not None and objective.method == "diffusion_feedback":
            result.update(evaluate_feedback(student, trial.projector, teacher, open_table(cache, "bench_images"),
                                            trial.empty, bench, cfg.eval, objective.feedback_tokens, trial.device))
        metrics = result.metrics
        metrics.update({"trainable_parameters": trial.trainable_count, "time/train_seconds": train_seconds})
        run.log_metrics(metrics)
        run.log_dict(result.outcomes, OUTCOMES)
    except trainer.TrialStopped:
        run.finish("KILLED")
        raise
    except BaseException as err:
        run.fail(err)
        raise
    trainer.discard_checkpoint(folder)
    run.finish()
    return {"run_id": run.run_id, "metrics": metrics, "outcomes": result.outcomes,
            "trainable_parameters": trial.trainable_count}
