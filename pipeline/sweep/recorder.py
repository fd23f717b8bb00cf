"""The run recorder: the only code that creates, updates and ends a sweep's MLflow runs.

It is a Ray Tune callback on the driver. Ray Tune's experiment state is the record of which
trials exist and how they ended; the recorder's own state (trial -> run, saved and restored with
it by `Tuner.restore`) is what lets a resumed launch keep one run per trial. MLflow layout: one
parent run per launch, one child run per trial (params: `tracking.COMPARED` and the keys the sweep
varies; metrics: every step's losses, the final scores and timings; artifacts: config.json (the
trial's whole config), outcomes.json, trained.safetensors; tags below). Trials never see MLflow:
they report results, which end up here.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import ray.cloudpickle
from ray.tune import Callback

from pipeline.config import ConfigError, TrackingConfig, flatten, to_dict
from pipeline.sweep.spec import Sweep, describe, expand, trial_label
from pipeline.sweep.trial import trial_values
from pipeline.tracking import COMPARED, OUTCOMES, Tracker, failure_text, redact

# A run's `status` tag: running, finished, early_stopped (by ASHA), failed, interrupted (by the
# user; --resume continues it). The MLflow status says the same in MLflow's words.
ENDS = {"finished": "FINISHED", "early_stopped": "KILLED", "failed": "FAILED", "interrupted": "KILLED"}


def abandon_launch(sweep: Sweep, root: Path, experiment: str, ray_path: str, reason: str) -> None:
    """End the parent run of a launch nothing can continue, and its trials' runs, `reason` their failure
    (no recorder state restores them: the parent is found by the launch folder it names)."""
    tracker = Tracker(sweep.base_config.tracking, root)
    parent = {"sweep_role": "parent", "ray_path": ray_path}
    for run in tracker.find_runs(experiment, tags={**parent, "project": tracker.project}):
        tracker.end_abandoned({}, reason, experiment, parent=run["run_id"])
    tracker.end_abandoned(parent, reason, experiment)


def final_metrics(result: dict) -> dict:
    """The scores, losses and timings of a trial's final result (its numbers under a metric name)."""
    return {k: v for k, v in result.items() if isinstance(v, (int, float)) and ("/" in k or k == "trainable_parameters")}


def label(trial) -> str:
    """A trial's short name: t000, t001, ... (its index in a fixed list, else the searcher's count of
    the trials it made, 1 for the first, which leads Ray's `experiment_tag`)."""
    spec = trial.config.get("trial")
    if isinstance(spec, dict):
        return trial_label(spec["index"])
    return trial_label(int(trial.experiment_tag.split("_", 1)[0]) - 1)


def recorded_params(config: dict) -> dict:
    """A trial's whole config as its record keeps it (the results file; Ray Tune's saved callback state):
    flattened, and no URI's user or password in it (`tracking.uri` may name a server's user)."""
    return {key: redact(value) if isinstance(value, str) else value for key, value in flatten(config).items()}


def dirname(trial) -> str:
    return f"{label(trial)}-{trial.trial_id}"


class RunRecorder(Callback):
    """Records one launch of a sweep in MLflow (see the module docstring)."""

    # The recorder of the Tune run in this process: `Tuner.restore` unpickles its own copy of the
    # callback, which the driver reaches here once the run has set it up.
    active: ClassVar["RunRecorder | None"] = None
    # Whether the run ended with trials Ray never started or ended (on_experiment_end); a class default,
    # so that a recorder unpickled from a launch recorded before it existed has it too.
    interrupted = False

    def __init__(self, sweep: Sweep, root: Path, uri: str, experiment: str):
        self.sweep, self.root, self.uri, self.experiment = sweep, str(root), uri, experiment
        self.parent = ""
        self.trials: dict[str, dict] = {}
        self.restored = False                                 # by Tuner.restore (set_state)
        self._tracker: Tracker | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tracker": None}           # the MLflow client stays in its process

    @property
    def tracker(self) -> Tracker:
        if self._tracker is None:
            self._tracker = Tracker(TrackingConfig(uri=self.uri, experiment=self.experiment), Path(self.root))
        return self._tracker

    def tags(self, **extra) -> dict:
        # The git tags come from `Tracker.start`: a resumed launch's new runs get those of the code resuming it.
        return {"sweep": self.sweep.name, "profile": self.sweep.profile, "stage": "sweep", **extra}

    # ----------------------------------------------------------------- the launch (parent run)

    def open_launch(self, ray_path: str) -> None:
        sweep = self.sweep
        run = self.tracker.start(f"{sweep.name} {Path(ray_path).name}", params={"sweep": sweep.definition()},
                                 tags=self.tags(sweep_role="parent", ray_path=ray_path, status="running",
                                                sweep_file=sweep.source, trials=sweep.num_trials))
        run.log_text(Path(sweep.source).read_text(), "sweep.yaml")
        self.parent = run.run_id

    def fail_launch(self, err: BaseException) -> None:
        if not self.parent:            # refused before its run opened (`open_launch`): nothing to end
            return
        run = self.tracker.run(self.parent)
        run.set_tags({"status": "failed"})
        run.fail(err)

    def close_launch(self, status: str, metrics: dict, files: dict[str, str]) -> None:
        run = self.tracker.run(self.parent)
        run.log_metrics(metrics)
        for name, text in files.items():
            run.log_text(text, name)
        run.set_tags({"status": status})
        run.finish(ENDS[status])

    # ----------------------------------------------------------------- Tune's callbacks

    def get_state(self) -> dict:
        return {"trials": self.trials}

    def set_state(self, state: dict) -> None:
        self.trials, self.restored = state["trials"], True

    def setup(self, **info) -> None:
        RunRecorder.active = self
        self.tracker.resume(self.parent).set_tags({"status": "running"})

    def configured(self, values: dict) -> tuple[dict, dict]:
        """A trial's whole config (flattened, what the results file holds and a report groups and labels
        rows by) and the tags naming its student and method."""
        try:
            cfg = self.sweep.config(values)
        except ConfigError:       # an Optuna draw the config refuses: the trial fails alone, in its worker
            return values, {}
        return to_dict(cfg), {"student": cfg.train.student, "method": cfg.objective.method}

    def open(self, trial) -> dict:
        """The trial's record, with its run: found, or opened for a trial seen for the first time."""
        if trial.trial_id in self.trials:
            return self.trials[trial.trial_id]
        values = trial_values(trial.config, self.sweep)
        config, about = self.configured(values)
        # Opened after Ray's last snapshot before the driver died: the same trial's run, kept.
        found = self.restored and self.tracker.find_runs(self.experiment, tags={"trial_id": trial.trial_id},
                                                         parent=self.parent)
        if found:
            run_id, attempts = found[-1]["run_id"], int(found[-1]["tags"].get("attempts", "0"))
        else:
            attempts = 0
            run_id = self.tracker.start(
                f"{self.sweep.name} {label(trial)}: {describe(values)}", params=config,
                compared=[*COMPARED, *expand(values, self.sweep.variants)],   # + what it sweeps
                parent=self.parent, tags=self.tags(
                    sweep_role="trial", trial=label(trial), trial_id=trial.trial_id, status="running", attempts=0,
                    **about, **({"variant": values["variant"]} if "variant" in values else {}))).run_id
        rec = self.trials[trial.trial_id] = {
            "run_id": run_id, "label": label(trial), "values": values, "params": recorded_params(config),
            "status": "running", "attempts": attempts, "final": False, "logged_until": 0}
        return rec

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        rec = self.open(trial)
        status = self.tracker.runs([rec["run_id"]])[0]["status"] if self.restored else "RUNNING"
        if status == "FINISHED":
            # It finished after Ray's last snapshot before the driver died: it reports its result
            # again (from its folder), and its run stays as it ended.
            rec["status"] = "finished"
            return
        # Run again: by --retry-failed, or (its run FAILED, its record not) it failed after Ray's last
        # snapshot, which Ray restores as unfinished; its failure is cleared either way.
        retried = {"failure": ""} if rec.pop("failure", "") or status == "FAILED" else {}
        rec.update(attempts=rec["attempts"] + 1, status="running", resumed_from=None)
        history = self.tracker.metric_history(rec["run_id"], "loss/total")
        rec["logged_until"] = max((step for step, _ in history), default=0)
        self.tracker.resume(rec["run_id"]).set_tags({"status": "running", "attempts": rec["attempts"], **retried})
        print(f"  {rec['label']} started", flush=True)

    def on_trial_result(self, iteration, trials, trial, result: dict, **info) -> None:
        rec = self.open(trial)
        if rec["status"] == "finished":                   # ended before: only its result is kept
            if result.get("final"):
                rec.update(final=True, metrics=final_metrics(result), outcomes=json.loads(result["outcomes"]))
            return
        run = self.tracker.run(rec["run_id"])
        if "resumed_from" in result and result["resumed_from"] != rec.get("resumed_from"):    # once an attempt
            rec["resumed_from"] = result["resumed_from"]
            run.set_tags({"resumed_from_step": rec["resumed_from"]})
        step = int(result.get("step", 0))
        if step > rec["logged_until"]:
            run.log_metrics({k: v for k, v in result.items() if k.startswith("loss/") or k == "lr"}, step)
            rec["logged_until"] = step
        if result.get("final") and not rec["final"]:
            metrics = final_metrics(result)
            run.log_metrics({k: v for k, v in metrics.items() if not k.startswith("loss/")})
            outcomes = json.loads(result["outcomes"])
            run.log_dict(outcomes, OUTCOMES)
            run.log_artifact(Path(result["trained"]))      # in the trial's folder, which the driver sees too
            rec.update(final=True, metrics=metrics, outcomes=outcomes)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        rec = self.open(trial)
        if rec["status"] == "finished":
            return
        self.end(rec, "finished" if rec["final"] else "early_stopped")
        last = trial.last_result or {}
        metric = self.sweep.metric
        shown = f"{metric}={last[metric]:.4f}" if isinstance(last.get(metric), (int, float)) else "done"
        print(f"  {rec['label']} finished: {shown}" if rec["final"] else
              f"  {rec['label']} stopped at step {last.get('step', '?')}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        rec = self.open(trial)
        # Ray has just written the error beside the trial's results here; its storage copy comes later.
        pickled = Path(trial.pickled_error_file or "")
        try:
            error = ray.cloudpickle.loads(pickled.read_bytes())
        except Exception:         # none written, or an error class that cannot be rebuilt here
            error = None
        rec["failure"] = failure_text(error) if error is not None else f"failed (see {trial.error_file})"
        self.end(rec, "failed")
        print(f"  {rec['label']} failed: {rec['failure'][:200]}", flush=True)

    def on_experiment_end(self, trials, **info) -> None:
        # Ray's first Ctrl-C ends the run as if it were done: a trial it never started or never ended, or
        # one Optuna never drew, means an interrupted launch, which --resume continues, not failed trials.
        self.interrupted = (len(trials) < self.sweep.num_trials
                            or any(t.status not in (t.TERMINATED, t.ERROR) for t in trials))
        for rec in self.trials.values():
            if rec["status"] == "running":           # the launch was interrupted
                self.end(rec, "interrupted")
        # Runs of trials Ray never restored (opened after its last snapshot before the driver died).
        self.tracker.end_abandoned({}, "killed with the driver before Ray Tune saved its trial", self.experiment,
                                   parent=self.parent, keep={rec["run_id"] for rec in self.trials.values()})

    def end(self, rec: dict, status: str) -> None:
        rec["status"] = status
        run = self.tracker.run(rec["run_id"])
        run.set_tags({"status": status, **({"failure": rec["failure"]} if status == "failed" else {})})
        run.finish(ENDS[status])
