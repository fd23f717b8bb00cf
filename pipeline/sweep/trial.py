"""One trial, in a Ray worker: its config in; step events, checkpoints and the final result out to Ray Tune.

A trial records nothing itself: every result it reports reaches the driver, whose run recorder
(`pipeline.sweep.recorder`) writes MLflow. A checkpoint holds the training state (and the step it
was taken at); the last one also holds the trained file and the final result, so a trial that Ray
restarts after it finished reports that result again instead of training again.
"""
from __future__ import annotations

import ctypes
import gc
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.sweep.spec import Sweep

STATE = "trial.json"     # in a checkpoint: {"step"} of a training checkpoint, {"final": result} of the last one


def trial_values(config: dict, sweep: Sweep) -> dict:
    """The dotted-key values of a trial, from the config Ray gives it."""
    if "trial" in config:                              # grid / random: one entry of the fixed trial list
        return dict(config["trial"]["values"])
    values = {k: (v.item() if hasattr(v, "item") else v) for k, v in config.items() if k in sweep.space}
    seed = sweep.repeats[int(config.get("__trial_index__", 0)) % len(sweep.repeats)]   # Repeater's index
    return values if seed is None else {**values, "train.seed": seed}


def release_memory() -> None:
    """Give the previous trial's freed memory back to the system. Ray reuses a worker process for
    the next trial, and glibc keeps what a trial freed (a full-size teacher: 4-6 GB a trial, which
    piled up until Ray's memory monitor killed the worker on the third trial)."""
    gc.collect()
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextmanager
def _staged(files: dict[str, Path], state: dict):
    """A folder holding `files` (hard links where possible) and the trial state, for a Tune checkpoint."""
    from ray import tune

    stage = Path(tempfile.mkdtemp(prefix="ckpt-", dir=os.getcwd()))
    try:
        for name, source in files.items():
            try:
                os.link(source, stage / name)
            except OSError:
                shutil.copy2(source, stage / name)
        (stage / STATE).write_text(json.dumps(state))
        yield tune.Checkpoint.from_directory(str(stage))
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def run_trial(config: dict, sweep: Sweep, root: str) -> None:
    """Fine-tune and evaluate one trial, resuming from Ray's checkpoint.

    Timings it reports: time/trial_seconds (entry to the final report, imports included),
    time/import_seconds (the imports: only a fresh worker pays them) and time/report_seconds
    (blocked in tune.report: Ray's share, checkpoint uploads included).
    """
    entered = time.perf_counter()
    release_memory()
    for name in ("ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import torch
    from ray import tune

    from pipeline import train as trainer
    from pipeline.experiment import loss_metrics, run_finetune

    imported = time.perf_counter()
    waited = [0.0]

    def report(metrics: dict, checkpoint=None) -> None:
        start = time.perf_counter()
        try:
            tune.report(metrics, checkpoint=checkpoint)
        finally:
            waited[0] += time.perf_counter() - start

    folder = Path(tempfile.mkdtemp(prefix="train-", dir=os.getcwd()))
    try:
        resumed_from, saved = 0, tune.get_checkpoint()
        if saved is not None:
            with saved.as_directory() as where:
                state = json.loads((Path(where) / STATE).read_text())
                if "final" in state:                 # finished before the driver recorded it
                    with _staged({trainer.TRAINED: Path(where) / trainer.TRAINED}, state) as checkpoint:
                        report(state["final"], checkpoint)
                    return
                shutil.copy2(Path(where) / trainer.CHECKPOINT, folder / trainer.CHECKPOINT)
                resumed_from = state["step"]
        cfg = sweep.config(trial_values(config, sweep))
        torch.set_num_threads(cfg.train.threads or max(1, int(sweep.resources.cpu)))
        steps, every = cfg.train.steps, cfg.train.checkpoint_every
        latest: dict[str, Any] = {}

        def on_log(step: int, losses: dict) -> None:
            latest.clear()
            latest.update({**loss_metrics(losses), "step": step, "resumed_from": resumed_from})
            # Steps up to the checkpoint were reported before; checkpoint steps report with their
            # checkpoint, the last step with the final result.
            if resumed_from < step < steps and step % every:
                report(dict(latest))

        def on_checkpoint(step: int, train_folder: Path) -> None:
            metrics = dict(latest) if latest.get("step") == step else {"step": step, "resumed_from": resumed_from}
            with _staged({trainer.CHECKPOINT: Path(train_folder) / trainer.CHECKPOINT}, {"step": step}) as checkpoint:
                report(metrics, checkpoint)

        project = Path(root)
        result = run_finetune(cfg, project / cfg.data.root, project / "models", project / cfg.cache.root, folder,
                              on_log=on_log, on_checkpoint=on_checkpoint, progress=False)
        final = {**latest, **result["metrics"], "step": steps, "final": 1, "outcomes": json.dumps(result["outcomes"]),
                 "time/import_seconds": imported - entered, "time/report_seconds": waited[0]}
        final["time/trial_seconds"] = time.perf_counter() - entered
        with _staged({trainer.TRAINED: result["trained"]}, {"final": final}) as checkpoint:
            report(final, checkpoint)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
