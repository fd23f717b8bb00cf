"""One trial, in a Ray worker: its config in; step events and the final result out to Ray Tune.

A trial records nothing itself: every result it reports reaches the driver, whose run recorder
(`pipeline.sweep.recorder`) writes MLflow. Its training state, trained file and final result stay
in its own folder (`trial_folder`), so a trial Ray restarts resumes from its last training
checkpoint, and one that had finished reports its result again instead of training again.
"""
from __future__ import annotations

import ctypes
import gc
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.config import CACHE_DIR, DATA_DIR, MODELS_DIR
from pipeline.sweep.spec import Sweep

STATE = "trial.json"     # in a trial's folder: {"step"} of its last training checkpoint
FINAL = "final.json"     # in a trial's folder: its final result, written before it is reported


def trial_values(config: dict, sweep: Sweep) -> dict:
    """The dotted-key values of a trial, from the config Ray gives it."""
    if "trial" in config:                              # grid / random: one entry of the fixed trial list
        return dict(config["trial"]["values"])
    values = {k: (v.item() if hasattr(v, "item") else v) for k, v in config.items() if k in sweep.space}
    seed = sweep.repeats[int(config["__trial_index__"]) % len(sweep.repeats)]   # Repeater's index
    return values if seed is None else {**values, "train.seed": seed}


def release_memory() -> None:
    """Give the previous trial's freed memory back to the system. Ray reuses a worker process for
    the next trial, and glibc keeps what a trial freed (a full-size teacher: 4-6 GB a trial, which
    piled up until Ray's memory monitor killed the worker on the third trial)."""
    gc.collect()
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def trial_folder(root: Path, launch: str, trial_id: str) -> Path:
    """Where a trial keeps its training state and, once done, its trained file and final result:
    under the project, which every node of a cluster sees, and apart from Ray Tune's checkpoints,
    which Ray deletes at its own pace (a snapshot taken before the deletion would point at one gone)."""
    return Path(root) / "runs" / "sweeps" / launch / trial_id


def run_trial(config: dict, sweep: Sweep, root: str, launch: str) -> None:
    """Fine-tune and evaluate one trial, resuming from the training state in its folder.

    Timings it reports: time/trial_seconds (entry to the final report, imports included),
    time/import_seconds (the imports: only a fresh worker pays them) and time/report_seconds
    (blocked in tune.report: Ray's share).
    """
    entered = time.perf_counter()
    release_memory()
    for name in ("ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import torch
    from ray import tune

    from pipeline import train as trainer
    from pipeline.experiment import loss_metrics, run_finetune
    from pipeline.io import write_json

    imported = time.perf_counter()
    waited = [0.0]

    def report(metrics: dict) -> None:
        start = time.perf_counter()
        try:
            tune.report(metrics)
        finally:
            waited[0] += time.perf_counter() - start

    folder = trial_folder(Path(root), launch, tune.get_context().get_trial_id())
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / FINAL).is_file():                 # finished before the driver recorded it
        report(json.loads((folder / FINAL).read_text()))
        return
    resumed_from = json.loads((folder / STATE).read_text())["step"] if (folder / STATE).is_file() else 0
    cfg = sweep.config(trial_values(config, sweep))
    torch.set_num_threads(cfg.train.threads or max(1, int(sweep.resources.cpu)))
    steps = cfg.train.steps
    latest: dict[str, Any] = {}

    def on_log(step: int, losses: dict) -> None:
        latest.clear()
        latest.update({**loss_metrics(losses), "step": step, "resumed_from": resumed_from})
        if resumed_from < step < steps:            # steps up to the resume point were reported before
            report(dict(latest))

    def on_checkpoint(step: int, train_folder: Path) -> None:
        write_json(folder / STATE, {"step": step})

    result = run_finetune(cfg, Path(root) / DATA_DIR, Path(root) / MODELS_DIR, Path(root) / CACHE_DIR, folder,
                          on_log=on_log, on_checkpoint=on_checkpoint, progress=False)
    final = {**latest, **result["metrics"], "step": steps, "final": 1, "outcomes": json.dumps(result["outcomes"]),
             "trained": str(result["trained"]), "time/import_seconds": imported - entered,
             "time/report_seconds": waited[0]}
    final["time/trial_seconds"] = time.perf_counter() - entered
    write_json(folder / FINAL, final)
    trainer.discard_checkpoint(folder)             # the trained file and the result are what is left
    report(final)
