"""Run a sweep file's trials through Ray Tune and log every trial to MLflow.

    python -m pipeline.sweep sweeps/lambda.yaml                  # on this machine
    python -m pipeline.sweep sweeps/lambda.yaml --address HOST:PORT   # on a running Ray cluster
    python -m pipeline.sweep sweeps/lambda.yaml --dry-run        # print the trials, run nothing
    python -m pipeline.sweep sweeps/lambda.yaml --resume         # finish an interrupted launch

A trial is the params.yaml config (profile of `base`, then `base.params`, then the trial's
values) fine-tuned and evaluated by `pipeline.experiment.run_finetune`; it reads the
`data/`, `models/` and `cache/` the DVC stages built next to the params file.

MLflow (`tracking.uri` of the config): experiment `<tracking.experiment>/<sweep name>`, one
parent run per launch, one child run per trial (params: the flattened config; metrics:
per-step `loss/*`, final `winoground/*`, `aro/*`, `zeroshot/*`; tags: `trial_id`, `trial`,
`status`, `failure`, `git_commit`, `profile`). Ray Tune keeps its state under `storage_path`
(default `<project>/ray_results/<name>-<launch time>`); a trial reports a checkpoint every
`train.checkpoint_every` steps, so ASHA can stop it and `--resume` restarts it from there.

Exit status: 0 when every trial finished (or was stopped early by ASHA), 1 when a trial
failed (the summary table says which and why), 2 for a bad sweep file or option (one line
on stderr), 130 when the sweep was interrupted (continue it with --resume).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import cli, sweep_config
from pipeline.config import PROFILES, ConfigError, TrackingConfig, deep_merge, flatten, from_dict, read_yaml, resolve
from pipeline.data.errors import MissingInput
from pipeline.tracking import failure_text

log = logging.getLogger(__name__)
CODE_ROOT = Path(__file__).resolve().parents[1]
TRIAL_STATE = "trial.json"
EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130

EPILOG = """\
sweep file (sweeps/*.yaml; every key is checked before anything starts):
  name            the sweep's name: MLflow experiment <tracking.experiment>/<name>
  base            profile: smoke|toy|paper, params: {dotted.key: value} overrides of params.yaml
  space           per parameter (objective.*, train.*, eval.*): a grid list, {all: true},
                  {choice: [...]}, {uniform: [lo, hi]}, {loguniform: [lo, hi]}, {randint: [lo, hi]}
  search          type: grid | random (num_samples, seed) | optuna (num_samples, sampler: tpe|random, seed)
  scheduler       type: fifo | asha (metric: loss/clip, mode: min, grace_period: steps, reduction_factor)
  seeds           [0, 1, ...]: every config runs once per seed (train.seed)
  resources       per trial: {cpu: 1, gpu: 0}; fractions allowed
  max_concurrent  trials at once (0: as many as the resources allow)
  metric, mode    what the sweep optimises (default winoground/text, max)
  storage_path    Ray Tune's state: a path shared by every node, or a bucket URI

where things go:
  MLflow          experiment <tracking.experiment>/<name>: a parent run per launch, a child
                  run per trial (params = flattened config, per-step losses, final metrics,
                  tags trial_id / status / failure / git_commit / profile)
  Ray             <storage_path or project/ray_results>/<name>-<launch time>/

resume: after the driver dies (even SIGKILL), `--resume` continues the newest launch of the
sweep (or the one whose parent run id is given): finished trials are not run again, the
others restart from their last checkpoint, and each trial keeps its one MLflow child run.

cluster: start Ray on the nodes (`ray start --head`, `ray start --address HEAD:6379`), put the
project (code, data/, models/, cache/) on a path every node sees, point tracking.uri at an
MLflow server and storage_path at shared storage, then pass --address or set RAY_ADDRESS.

exit status: 0 all trials finished or were stopped early by ASHA; 1 a trial failed;
2 bad sweep file or option; 130 interrupted (continue with --resume).
"""


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m pipeline.sweep", description=__doc__.split("\n\n")[0],
                           epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", type=Path, help="sweep file (e.g. sweeps/lambda.yaml)")
    p.add_argument("--params", type=Path, default=Path("params.yaml"),
                   help="parameter file; data/, models/, cache/ are read next to it (default: params.yaml)")
    p.add_argument("--profile", choices=PROFILES, help="override the sweep's base.profile")
    p.add_argument("--dry-run", action="store_true", help="validate and print the trials; run nothing")
    p.add_argument("--resume", nargs="?", const="latest", metavar="PARENT_RUN_ID",
                   help="continue the newest launch of this sweep (or the launch with this MLflow parent run id)")
    p.add_argument("--retry-failed", action="store_true",
                   help="with --resume: run failed trials again from their last checkpoint")
    p.add_argument("--address", metavar="HOST:PORT",
                   help="run on this Ray cluster (default: $RAY_ADDRESS, else a local Ray with every CPU)")
    p.add_argument("--storage", metavar="PATH_OR_URI", help="override the sweep's storage_path")
    p.add_argument("--max-concurrent", type=int, metavar="N", help="override the sweep's max_concurrent")
    p.add_argument("--gpus-per-trial", type=float, metavar="N",
                   help="override the sweep's resources.gpu (the shipped files ask for 0: give 1 on a GPU cluster)")
    p.add_argument("--results", type=Path, metavar="FILE",
                   help="also write the summary (run ids, statuses, metrics) to this JSON file")
    p.add_argument("--ray-temp-dir", type=Path, metavar="DIR",
                   help="temp/session folder of a local Ray (default: Ray's, /tmp/ray)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=os.environ.get("LOGLEVEL", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    try:
        sweep, root = prepare(args)
        specs = sweep_config.trials(sweep)
        if args.dry_run:
            print(dry_run_text(sweep, specs, root, args))
            return 0
        preflight(sweep, root)
        return Driver(sweep, specs, root, args).run()
    except (ConfigError, MissingInput) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE


def prepare(args: argparse.Namespace) -> tuple[sweep_config.Sweep, Path]:
    if args.retry_failed and not args.resume:
        raise ConfigError("--retry-failed: only with --resume")
    if args.max_concurrent is not None and args.max_concurrent < 0:
        raise ConfigError(f"--max-concurrent: {args.max_concurrent} is out of range; allowed: >= 0")
    params_path = args.params.resolve()
    params = read_yaml(params_path)
    sweep = sweep_config.load(args.sweep, params, args.profile)
    if args.max_concurrent is not None:
        sweep.max_concurrent = args.max_concurrent
    if args.gpus_per_trial is not None:
        if args.gpus_per_trial < 0:
            raise ConfigError(f"--gpus-per-trial: {args.gpus_per_trial:g} is out of range; allowed: >= 0")
        sweep.resources.gpu = args.gpus_per_trial
        sweep_config.check_resources(sweep.resources)
    return sweep, params_path.parent


def preflight(sweep: sweep_config.Sweep, root: Path) -> None:
    """The built inputs every trial reads: fail once, here, rather than in every trial."""
    cfg = sweep.base_config
    needed = [(root / cfg.data.root / "index.json", "data"), (root / "models", "models"),
              (root / cfg.cache.root, "cache")]
    for path, stage in needed:
        if not path.exists():
            raise MissingInput(f"{path}: not found; build it first (`dvc repro {stage}` or "
                               f"`python -m stages.{stage} --params {root / 'params.yaml'}`)")


def check_fits_cluster(res: sweep_config.ResourcesSpec, have: dict[str, float], device: str) -> None:
    """What Ray does not say: a trial asking for more than the cluster has waits forever, and one
    asking for no GPU on a cluster with GPUs sees none (Ray empties CUDA_VISIBLE_DEVICES for
    it): `compute.device` auto would quietly train on the CPU, cuda would fail in every trial."""
    for name, key in (("cpu", "CPU"), ("gpu", "GPU")):
        want = getattr(res, name)
        if want > 0 and have.get(key, 0) < want:
            raise ConfigError(f"resources.{name}: {want:g} per trial, but the Ray cluster has {have.get(key, 0):g} "
                              f"{key}s; a trial asking for more would wait forever")
    gpus = have.get("GPU", 0)
    if res.gpu == 0 and gpus > 0 and device != "cpu":
        raise ConfigError(f"resources.gpu: 0 per trial on a Ray cluster with {gpus:g} GPUs: Ray hides them from such "
                          f"a trial, so with compute.device {device!r} it would not train on one; ask for GPUs "
                          f"(--gpus-per-trial 1, or resources.gpu in the sweep file) or set compute.device: cpu")


def storage_root(sweep: sweep_config.Sweep, root: Path, override: str | None) -> str:
    value = override or sweep.storage_path or "ray_results"
    if "://" in value:
        return value.rstrip("/")
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (root / path).resolve())


def experiment_name(sweep: sweep_config.Sweep) -> str:
    return f"{sweep.base_config.tracking.experiment}/{sweep.name}"


def columns(sweep: sweep_config.Sweep) -> list[str]:
    keys = list(sweep.space)
    if sweep.seeds:
        keys.append("train.seed")
    return keys


def dry_run_text(sweep: sweep_config.Sweep, specs: list[sweep_config.TrialSpec], root: Path,
                 args: argparse.Namespace) -> str:
    s = sweep
    search = s.search.type
    if search == "random":
        search += f" ({s.search.num_samples} draws, seed {s.search.seed})"
    elif search == "optuna":
        search += f" ({s.search.sampler}, seed {s.search.seed}, {s.search.num_samples} configs)"
    sched = s.scheduler.type
    if sched == "asha":
        sched += (f" on {s.scheduler.metric} ({s.scheduler.mode}), grace period {s.scheduler.grace_period} steps, "
                  f"reduction factor {s.scheduler.reduction_factor}, max {s.max_steps} steps")
    lines = [
        f"sweep {s.name} ({s.source}): {s.num_trials} trials, profile {s.profile}, search {search}",
        f"  scheduler {sched}; optimises {s.metric} ({s.mode})",
        f"  per trial: cpu {s.resources.cpu:g}, gpu {s.resources.gpu:g}; at most "
        f"{s.max_concurrent or 'as many as fit'} at once; seeds {s.seeds or [s.base_config.train.seed]}",
        f"  MLflow experiment {experiment_name(s)!r} at {s.base_config.tracking.uri}; "
        f"Ray storage {storage_root(s, root, args.storage)}",
    ]
    base = {k: v for k, v in flatten(s.overrides).items() if k != "profile"}
    if base:
        lines.append(f"  base params ({s.profile}): {sweep_config.describe(base)}")
    if specs:
        keys = columns(s)
        rows = [["trial"] + keys] + [[t.label] + [sweep_config._fmt(t.values[k]) for k in keys] for t in specs]
        lines.append("")
        lines += _table(rows)
    else:
        lines.append("")
        lines.append(f"Optuna draws each config as the sweep runs ({s.search.num_samples} configs"
                     + (f" x {len(s.seeds)} seeds" if len(s.seeds) > 1 else "") + ") from:")
        lines += [f"  {d.key} ~ {d.describe()}" for d in s.space.values()]
    return "\n".join(lines)


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


# --------------------------------------------------------------------------- the trial (runs in a Ray worker)


def trial_values(config: dict, context: dict) -> tuple[dict, str]:
    """The dotted-key values of a trial and its label, from the config Ray gives it."""
    if "trial" in config:                              # grid / random: a fixed trial list
        spec = config["trial"]
        return dict(spec["values"]), f"t{spec['index']:03d}"
    values = {k: _plain(v) for k, v in config.items() if k in context["space"]}
    repeats = context["repeats"]
    seed = repeats[int(config.get("__trial_index__", 0)) % len(repeats)]
    if seed is not None:
        values["train.seed"] = seed
    return values, ""


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def _trial_label(trial_id: str) -> str:
    tail = trial_id.rsplit("_", 1)[-1]
    return f"t{int(tail):03d}" if tail.isdigit() else trial_id


def trial_name(trial) -> str:
    """Ray's name for a trial: its label (t000, t001, ...)."""
    spec = trial.config.get("trial")
    return f"t{spec['index']:03d}" if isinstance(spec, dict) else _trial_label(trial.trial_id)


def trial_dirname(trial) -> str:
    name = trial_name(trial)
    return trial.trial_id if name == trial.trial_id else f"{name}-{trial.trial_id}"


def release_memory() -> None:
    """Give the previous trial's freed memory back to the system. Ray reuses a worker process for
    the next trial, and glibc keeps what a trial freed (a full-size teacher: 4-6 GB a trial, which
    piled up until Ray's memory monitor killed the worker on the third trial)."""
    gc.collect()
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def run_trial(config: dict, context: dict) -> None:
    """One trial: find or create its MLflow child run, fine-tune (resuming from Ray's checkpoint), evaluate.

    Timings it logs: time/trial_seconds (entry to the final report, imports included),
    time/import_seconds (the imports: only a fresh worker pays them) and time/report_seconds
    (blocked in tune.report: Ray's share, checkpoint uploads included).
    """
    entered = time.perf_counter()
    release_memory()
    os.environ.setdefault("TQDM_DISABLE", "1")                  # progress bars of libraries a trial imports
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import torch
    from ray import tune

    from pipeline import train as trainer
    from pipeline.experiment import OUTCOMES, run_finetune
    from pipeline.tracking import Tracker

    imported = time.perf_counter()
    waited = [0.0]
    ray_context = tune.get_context()
    trial_id = ray_context.get_trial_id()
    values, label = trial_values(config, context)
    label = label or _trial_label(trial_id)
    root = Path(context["root"])
    tracker = Tracker(TrackingConfig(uri=context["tracking_uri"], experiment=context["experiment"]), root)

    folder = Path(tempfile.mkdtemp(prefix="train-", dir=os.getcwd()))
    state: dict = {}
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as saved:
            saved = Path(saved)
            state = json.loads((saved / TRIAL_STATE).read_text())
            if (saved / trainer.CHECKPOINT).is_file():
                shutil.copy2(saved / trainer.CHECKPOINT, folder / trainer.CHECKPOINT)

    found = None
    if state.get("run_id"):
        try:
            found = tracker.runs([state["run_id"]])[0]
        except Exception:                                 # deleted from MLflow meanwhile: look it up by tag
            found = None
        if found is not None and found["tags"].get("trial_id") != trial_id:
            found = None
    if found is None:
        matches = tracker.find_runs(context["experiment"], tags={"trial_id": trial_id}, parent=context["parent_run_id"])
        found = matches[-1] if matches else None              # the oldest, should there ever be two
    if found is not None and found["status"] == "FINISHED":
        # Finished before the driver died: report what it logged, do not train again.
        steps = int(float(found["params"].get("train.steps", 0) or 0))
        outcomes = tracker.run(found["run_id"]).load_dict(OUTCOMES)
        tune.report({**found["metrics"], "step": steps, "final": 1, "run_id": found["run_id"], "already_finished": 1,
                     "outcomes": json.dumps(outcomes)})
        shutil.rmtree(folder, ignore_errors=True)
        return

    name = f"{context['sweep']} {label}: {sweep_config.describe(values)}"
    tags = {"sweep": context["sweep"], "sweep_role": "trial", "trial_id": trial_id, "trial": label,
            "profile": context["profile"], "stage": "sweep", "git_commit": context["git_commit"],
            "spec_hash": context["spec_hash"], **({"variant": values["variant"]} if "variant" in values else {})}
    if found is None:
        run = tracker.start(name, params=values, tags={**tags, "status": "running", "attempts": 0},
                            parent=context["parent_run_id"], experiment=context["experiment"])
        run_id, attempts = run.run_id, 0
    else:
        run_id, attempts = found["run_id"], int(found["tags"].get("attempts", "0") or 0)
    handle = tracker.run(run_id)
    handle.set_tags({"status": "running", "attempts": attempts + 1,
                     "resumed_from_step": int(state.get("step", 0))})

    latest: dict[str, float] = {}
    try:
        dotted = sweep_config.expand(values, context["variants"])
        cfg = from_dict(resolve(context["params"], deep_merge(context["overrides"], sweep_config.unflatten(dotted))))
        torch.set_num_threads(cfg.train.threads or context["threads"])
        steps, every = cfg.train.steps, cfg.train.checkpoint_every

        def report(metrics: dict, checkpoint=None) -> None:
            start = time.perf_counter()
            try:
                tune.report(metrics, checkpoint=checkpoint)
            except SystemExit:
                raise trainer.TrialStopped(f"stopped by Ray Tune at step {metrics.get('step')}") from None
            finally:
                waited[0] += time.perf_counter() - start

        def on_log(step: int, values_: dict) -> None:
            latest.clear()
            latest.update({f"loss/{k}" if k != "lr" else "lr": v for k, v in values_.items()})
            latest["step"] = step
            if step < steps and step % every != 0:       # checkpoint steps report with on_checkpoint,
                report({**latest, "run_id": run_id})     # the last step with the final metrics

        def on_checkpoint(step: int, train_folder: Path) -> None:
            stage = Path(tempfile.mkdtemp(prefix=f"ckpt-{step}-", dir=os.getcwd()))
            try:
                source = Path(train_folder) / trainer.CHECKPOINT
                try:
                    os.link(source, stage / trainer.CHECKPOINT)
                except OSError:
                    shutil.copy2(source, stage / trainer.CHECKPOINT)
                (stage / TRIAL_STATE).write_text(json.dumps({"run_id": run_id, "step": step, "steps": steps}))
                metrics = dict(latest) if latest.get("step") == step else {"step": step}
                report({**metrics, "run_id": run_id}, tune.Checkpoint.from_directory(str(stage)))
            finally:
                shutil.rmtree(stage, ignore_errors=True)

        result = run_finetune(cfg, root / cfg.data.root, root / "models", root / cfg.cache.root, folder, tracker,
                              name, tags=tags, parent=context["parent_run_id"],
                              run_id=run_id, on_log=on_log, on_checkpoint=on_checkpoint, progress=False)
    except trainer.TrialStopped:
        handle.set_tags({"status": "stopped"})
        shutil.rmtree(folder, ignore_errors=True)
        raise SystemExit(0) from None                   # what Ray expects of a stopped trial
    except BaseException as err:
        handle.set_tags({"status": "failed"})
        handle.fail(err)
        shutil.rmtree(folder, ignore_errors=True)
        raise
    timing = {"time/trial_seconds": time.perf_counter() - entered, "time/import_seconds": imported - entered,
              "time/report_seconds": waited[0]}
    handle.log_metrics(timing)
    handle.set_tags({"status": "finished"})
    shutil.rmtree(folder, ignore_errors=True)
    tune.report({**latest, **result["metrics"], "step": steps, "final": 1, "run_id": run_id,
                 "outcomes": json.dumps(result["outcomes"]), **timing})


# --------------------------------------------------------------------------- the driver


@dataclass
class Row:
    label: str
    trial_id: str
    values: dict
    status: str                       # finished | early_stopped | failed | interrupted
    metric: float | None = None
    failure: str = ""
    run_id: str = ""
    metrics: dict = field(default_factory=dict)
    outcomes: dict = field(default_factory=dict)
    seconds: float | None = None


class Driver:
    """One launch (or resumed launch) of a sweep."""

    def __init__(self, sweep: sweep_config.Sweep, specs: list[sweep_config.TrialSpec], root: Path,
                 args: argparse.Namespace):
        from pipeline.tracking import Tracker, git_commit, resolve_uri

        self.sweep, self.specs, self.root, self.args = sweep, specs, root, args
        self.experiment = experiment_name(sweep)
        tracking = sweep.base_config.tracking
        self.tracker = Tracker(TrackingConfig(uri=tracking.uri, experiment=self.experiment), root)
        self.uri = resolve_uri(tracking.uri, root)
        commit = git_commit(CODE_ROOT)
        self.commit = commit if commit != "unknown" else git_commit(root)
        self.started_ray = False
        self.timing: dict[str, float] = {}

    # ----------------------------------------------------------------- launch / resume

    def launch_to_resume(self) -> dict | None:
        """With --resume: the parent run of the launch to continue (checked before anything starts)."""
        sweep = self.sweep
        if not self.args.resume:
            return None
        if self.args.resume == "latest":
            found = self.tracker.find_runs(self.experiment, tags={"sweep_role": "parent"})
            if not found:
                raise ConfigError(f"--resume: no earlier launch of sweep {sweep.name!r} in MLflow experiment "
                                  f"{self.experiment!r} at {self.uri}")
            info = found[0]
        else:
            try:
                info = self.tracker.runs([self.args.resume])[0]
            except Exception:
                raise ConfigError(f"--resume: {self.args.resume!r} is not a run in {self.uri}") from None
            if info["tags"].get("sweep_role") != "parent" or info["tags"].get("sweep") != sweep.name:
                raise ConfigError(f"--resume: run {self.args.resume} is not a launch of sweep {sweep.name!r}")
        if info["tags"].get("spec_hash") != sweep.spec_hash():
            raise ConfigError(f"--resume: {sweep.source}, the params or --gpus-per-trial / --max-concurrent changed "
                              f"since launch {info['run_id']} (spec_hash differs); restore them, or start a new "
                              "launch without --resume")
        return info

    def open_parent(self, resumed: dict | None):
        """The parent run and Ray path of this launch: the resumed one's, or a new one."""
        sweep = self.sweep
        if resumed is not None:
            run = self.tracker.resume(resumed["run_id"])
            run.set_tags({"status": "running", "resumes": int(resumed["tags"].get("resumes", "0")) + 1})
            return run, resumed["tags"]["ray_path"]
        unfinished = [r for r in self.tracker.find_runs(self.experiment, tags={"sweep_role": "parent"})
                      if r["status"] == "RUNNING"]
        if unfinished:
            print(f"note: launch {unfinished[0]['run_id']} of sweep {sweep.name!r} is still RUNNING in MLflow "
                  "(another driver, or one that died: `--resume` continues it); starting a new launch",
                  file=sys.stderr)
        stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid() % 10000:04d}"
        launch = f"{sweep.name}-{stamp}"
        ray_path = f"{storage_root(sweep, self.root, self.args.storage)}/{launch}"
        run = self.tracker.start(f"{sweep.name} {stamp}", params={"sweep": sweep_config.to_dict(sweep)},
                                 experiment=self.experiment, tags={
            "sweep": sweep.name, "sweep_role": "parent", "profile": sweep.profile, "stage": "sweep",
            "git_commit": self.commit, "ray_path": ray_path, "spec_hash": sweep.spec_hash(), "status": "running",
            "sweep_file": str(sweep.source), "trials": sweep.num_trials})
        try:
            run.log_text(Path(sweep.source).read_text(), "sweep.yaml")
        except OSError:
            pass
        return run, ray_path

    @property
    def address(self) -> str | None:
        address = self.args.address or os.environ.get("RAY_ADDRESS")
        return address if address and address != "local" else None

    def ray_environment(self) -> None:
        """Environment Ray reads when it is imported: call before anything imports ray."""
        if self.address and "RAY_AUTH_MODE" not in os.environ and "ray" not in sys.modules:
            # `ray start` turns token auth on, but a driver joining a cluster defaults to RAY_AUTH_MODE
            # 'disabled' and is refused: present the token when there is one (a cluster without auth
            # accepts it too).
            if (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
                    or (Path.home() / ".ray" / "auth_token").is_file()):
                os.environ["RAY_AUTH_MODE"] = "token"
        # Tune's default loggers include TensorBoard's, whose imports cost ~3 s of the driver's start
        # before the first trial; the per-step metrics are in MLflow. CSV and JSON results stay (tuner()).
        os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
        # Intermediate results carry the per-step losses, not the final metric the searcher optimises.
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
        # Ray's own console tables: off (verbose=0 below); this driver prints one line per trial.
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        # A checkpoint per trial kept (num_to_keep) forces an experiment snapshot: wanted, for --resume.
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")

    def init_ray(self) -> None:
        address = self.address
        cluster = address is not None
        import ray

        if ray.is_initialized():
            return
        kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
        if cluster:
            pythonpath = os.pathsep.join(p for p in (str(CODE_ROOT), os.environ.get("PYTHONPATH", "")) if p)
            ray.init(address=address, runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **kwargs)
        else:
            ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False,
                     _temp_dir=str(self.args.ray_temp_dir.resolve()) if self.args.ray_temp_dir else None, **kwargs)
        self.started_ray = True

    def warm_up(self) -> None:
        """Load what the driver needs once Ray is up while Ray starts (MLflow, Ray Tune: seconds of imports)."""
        try:
            self.tracker.client
            from ray import tune  # noqa: F401

            if self.sweep.search.type == "optuna":
                from ray.tune.search.optuna import OptunaSearch  # noqa: F401
            if self.sweep.scheduler.type == "asha":
                from ray.tune.schedulers import ASHAScheduler  # noqa: F401
        except Exception:                   # whatever failed fails again, visibly, where it is used
            log.debug("warm-up failed", exc_info=True)

    def stop_ray(self) -> None:
        if self.started_ray:
            import ray

            ray.shutdown()
            self.started_ray = False

    def check_cluster(self) -> None:
        import ray

        check_fits_cluster(self.sweep.resources, ray.cluster_resources(), self.sweep.base_config.compute.device)

    def trainable(self, parent_id: str):
        from ray import tune

        sweep = self.sweep
        context = {
            "root": str(self.root), "params": sweep.params, "overrides": sweep.overrides,
            "experiment": self.experiment, "tracking_uri": self.uri, "parent_run_id": parent_id,
            "sweep": sweep.name, "profile": sweep.profile, "git_commit": self.commit, "spec_hash": sweep.spec_hash(),
            "threads": max(1, int(sweep.resources.cpu)), "space": list(sweep.space), "repeats": sweep.repeats,
            "variants": sweep.variants,
        }
        fn = tune.with_parameters(run_trial, context=context)
        resources = {"cpu": sweep.resources.cpu}
        if sweep.resources.gpu:
            resources["gpu"] = sweep.resources.gpu
        return tune.with_resources(fn, resources)

    def tuner(self, trainable, ray_path: str):
        from ray import tune
        from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

        sweep = self.sweep
        if self.args.resume and tune.Tuner.can_restore(ray_path):
            return tune.Tuner.restore(ray_path, trainable, resume_unfinished=True,
                                      resume_errored=self.args.retry_failed, restart_errored=False)
        search_alg, num_samples = None, 1
        if sweep.search.type == "optuna":
            import optuna
            from ray.tune.search import Repeater
            from ray.tune.search.optuna import OptunaSearch

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            sampler_cls = optuna.samplers.TPESampler if sweep.search.sampler == "tpe" else optuna.samplers.RandomSampler
            searcher = OptunaSearch(metric=sweep.metric, mode=sweep.mode, sampler=sampler_cls(seed=sweep.search.seed))
            search_alg = repeater_class(Repeater)(searcher, repeat=len(sweep.repeats), set_index=True)
            param_space = {d.key: domain(d) for d in sweep.space.values()}
            num_samples = sweep.search.num_samples * len(sweep.repeats)
        else:
            param_space = {"trial": tune.grid_search([{"index": t.index, "values": t.values} for t in self.specs])}
        scheduler = None
        if sweep.scheduler.type == "asha":
            from ray.tune.schedulers import ASHAScheduler

            s = sweep.scheduler
            scheduler = ASHAScheduler(time_attr="step", metric=s.metric, mode=s.mode, max_t=sweep.max_steps,
                                      grace_period=s.grace_period, reduction_factor=s.reduction_factor)
        storage, name = ray_path.rsplit("/", 1)
        return tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(search_alg=search_alg, scheduler=scheduler, num_samples=num_samples,
                                        max_concurrent_trials=sweep.max_concurrent or None, reuse_actors=True,
                                        trial_name_creator=trial_name, trial_dirname_creator=trial_dirname),
            run_config=tune.RunConfig(name=name, storage_path=storage, verbose=0,
                                      callbacks=[progress_callback(self.sweep), CSVLoggerCallback(),
                                                 JsonLoggerCallback()],
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )

    def run(self) -> int:
        self.ray_environment()
        t0 = time.perf_counter()
        resumed = self.launch_to_resume()
        warm = threading.Thread(target=self.warm_up, name="sweep-warm-up", daemon=True)
        warm.start()
        try:
            self.init_ray()
            warm.join()
            self.check_cluster()
        except BaseException:
            self.stop_ray()
            raise
        self.timing["ray_start_seconds"] = time.perf_counter() - t0
        parent, ray_path = self.open_parent(resumed)
        try:
            tuner = self.tuner(self.trainable(parent.run_id), ray_path)
            print(f"sweep {self.sweep.name}: {self.sweep.num_trials} trials; MLflow experiment {self.experiment!r} "
                  f"run {parent.run_id}; Ray {ray_path}", flush=True)
            t1 = time.perf_counter()
            self.timing["setup_seconds"] = t1 - t0 - self.timing["ray_start_seconds"]
            grid = tuner.fit()
            t2 = time.perf_counter()
            self.timing["tune_seconds"] = t2 - t1
            rows = self.reconcile(grid, parent.run_id)
            self.timing["reconcile_seconds"] = time.perf_counter() - t2
        except KeyboardInterrupt:
            parent.set_tags({"status": "interrupted"})
            parent.finish("KILLED")
            print("interrupted; continue with --resume", file=sys.stderr)
            return EXIT_INTERRUPTED
        except BaseException as err:
            parent.set_tags({"status": "failed"})
            parent.fail(err)
            raise
        finally:
            self.stop_ray()
        wall = time.perf_counter() - t0
        return self.finish(parent, rows, wall)

    # ----------------------------------------------------------------- after the trials

    def reconcile(self, grid, parent_id: str) -> list[Row]:
        """Ray's verdict per trial -> exactly one terminated MLflow child run per trial, with matching tags."""
        analysis = getattr(grid, "_experiment_analysis", None)
        trials = list(getattr(analysis, "trials", None) or [])
        results = {str(Path(r.path).name): r for r in grid}
        children: dict[str, list[dict]] = {}
        for run in self.tracker.find_runs(self.experiment, parent=parent_id):
            children.setdefault(run["tags"].get("trial_id", ""), []).append(run)
        by_index = {t.index: t for t in self.specs}
        rows = []
        for trial in trials:
            last = dict(trial.last_result or {})
            dirname = trial_dirname(trial)
            result = results.get(dirname)
            error = getattr(result, "error", None) if result is not None else None
            if trial.status == "ERROR" or error is not None:
                status = "failed"
            elif trial.status == "TERMINATED":
                status = "finished" if last.get("final") else "early_stopped"
            else:
                status = "interrupted"
            spec = trial.config.get("trial")
            if isinstance(spec, dict):
                values = dict(by_index[spec["index"]].values) if spec["index"] in by_index else dict(spec["values"])
            else:
                values = trial_values(trial.config, {"space": list(self.sweep.space), "repeats": self.sweep.repeats})[0]
            row = Row(trial_name(trial), trial.trial_id, values, status)
            runs = sorted(children.pop(trial.trial_id, []), key=lambda r: r["start_time"] or 0)
            if runs:
                run = runs[0]
                for extra in runs[1:]:             # never expected; keep the MLflow view one-run-per-trial
                    self.tracker.run(extra["run_id"]).set_tags({"status": "duplicate"})
                    if extra["status"] == "RUNNING":
                        self.tracker.run(extra["run_id"]).finish("KILLED")
            else:
                run = None
            if status == "failed":
                row.failure = (run or {}).get("tags", {}).get("failure") or (failure_text(error) if error else
                                                                             "failed (see Ray's error.txt)")
            if run is None and status != "interrupted":
                # The trial died before it could open its run (e.g. a bad config): give it one anyway.
                handle = self.tracker.start(
                    f"{self.sweep.name} {row.label}: {sweep_config.describe(values)}", params=values,
                    parent=parent_id, experiment=self.experiment,
                    tags={"sweep": self.sweep.name, "sweep_role": "trial", "trial_id": trial.trial_id,
                          "trial": row.label, "profile": self.sweep.profile, "stage": "sweep",
                          "git_commit": self.commit, "spec_hash": self.sweep.spec_hash(), "attempts": 0})
                run = {"run_id": handle.run_id, "status": "RUNNING", "tags": {}, "metrics": {}}
            if run is not None:
                row.run_id = run["run_id"]
                handle = self.tracker.run(run["run_id"])
                tags = {"status": status}
                if row.failure or run["tags"].get("failure"):     # (a retried trial that now finished: cleared)
                    tags["failure"] = row.failure
                if any(run["tags"].get(k) != str(v) for k, v in tags.items()):
                    handle.set_tags(tags)
                terminal = {"finished": "FINISHED", "failed": "FAILED", "early_stopped": "KILLED",
                            "interrupted": "KILLED"}[status]
                if run["status"] != terminal:
                    handle.finish(terminal)
                row.metrics = dict(run.get("metrics") or {})
            row.metrics.update({k: v for k, v in last.items() if isinstance(v, (int, float)) and "/" in k})
            if status == "finished" and last.get("outcomes"):
                row.outcomes = json.loads(last["outcomes"])
            value = row.metrics.get(self.sweep.metric)
            row.metric = float(value) if value is not None and status == "finished" else None
            seconds = row.metrics.get("time/trial_seconds")
            row.seconds = float(seconds) if seconds is not None else None
            rows.append(row)
        for leftover in children.values():        # runs of no trial of this launch: close them
            for run in leftover:
                if run["status"] == "RUNNING":
                    self.tracker.run(run["run_id"]).set_tags({"status": "orphaned"})
                    self.tracker.run(run["run_id"]).finish("KILLED")
        if self.specs:                            # a fixed trial list: its order; optuna: creation order
            rows.sort(key=lambda r: r.label)
        return rows

    def finish(self, parent, rows: list[Row], wall: float) -> int:
        sweep = self.sweep
        counts = {s: sum(r.status == s for r in rows) for s in ("finished", "early_stopped", "failed", "interrupted")}
        done = [r for r in rows if r.metric is not None and math.isfinite(r.metric)]
        best = (max if sweep.mode == "max" else min)(done, key=lambda r: r.metric) if done else None
        text = summary_text(sweep, rows, counts, best, wall)
        print(text, flush=True)
        metrics = {f"trials/{k}": v for k, v in counts.items()}
        metrics.update({"trials/total": len(rows), "time/sweep_seconds": wall})
        if best is not None:
            metrics[f"best/{sweep.metric}"] = best.metric
        parent.log_metrics(metrics)
        parent.log_text(text + "\n", "summary.txt")
        payload = {
            "sweep": sweep.name, "experiment": self.experiment, "tracking_uri": self.uri,
            "parent_run_id": parent.run_id, "metric": sweep.metric, "mode": sweep.mode,
            "best": best.run_id if best else None, "counts": counts, "wall_seconds": wall, "timing": self.timing,
            "trials": [{"trial": r.label, "trial_id": r.trial_id, "run_id": r.run_id, "config": r.values,
                        "status": r.status, "failure": r.failure, "metric": r.metric,
                        "trial_seconds": r.seconds, "import_seconds": r.metrics.get("time/import_seconds"),
                        "report_seconds": r.metrics.get("time/report_seconds"), "metrics": r.metrics,
                        "outcomes": r.outcomes} for r in rows],
        }
        parent.log_text(json.dumps(payload, indent=2) + "\n", "summary.json")
        if self.args.results:
            from pipeline.io import write_json

            write_json(self.args.results, payload)
        if counts["interrupted"]:
            parent.set_tags({"status": "interrupted"})
            parent.finish("KILLED")
            print(f"interrupted: {counts['interrupted']} trials unfinished; continue with --resume", file=sys.stderr)
            return EXIT_INTERRUPTED
        failed = counts["failed"] > 0
        parent.set_tags({"status": "failed" if failed else "finished"})
        parent.finish("FAILED" if failed else "FINISHED")
        return EXIT_FAILED if failed else 0


def repeater_class(base: type) -> type:
    """Ray's Repeater (every config once per seed), telling Optuna only final results.

    Repeater keeps intermediate results (per-step losses, without the final metric) away from
    the searcher and reports the mean over a config's seeds when all have ended; here a config
    none of whose seeds reached the final metric (stopped early by ASHA) is told as pruned
    rather than as NaN.
    """

    class FinalResults(base):
        def on_trial_complete(self, trial_id: str, result: dict | None = None, **kwargs):
            group = self._trial_id_to_group.get(trial_id)
            if group is None:
                return
            metric = self.searcher.metric
            value = (result or {}).get(metric)
            ok = isinstance(value, (int, float)) and math.isfinite(value)
            group.report(trial_id, float(value) if ok else float("nan"))
            if group.finished_reporting():
                scores = [v for v in group.scores() if isinstance(v, float) and math.isfinite(v)]
                final = {metric: sum(scores) / len(scores)} if scores else None
                self.searcher.on_trial_complete(group.primary_trial_id, result=final, **kwargs)

    return FinalResults


def domain(dim: sweep_config.Dimension):
    from ray import tune

    if dim.kind == "choice":
        return tune.choice(list(dim.values))
    low, high = dim.values
    if dim.kind == "uniform":
        return tune.uniform(low, high)
    if dim.kind == "loguniform":
        return tune.loguniform(low, high)
    return tune.randint(low, high + 1)                  # Ray's upper bound is exclusive


def summary_text(sweep: sweep_config.Sweep, rows: list[Row], counts: dict, best: Row | None, wall: float) -> str:
    keys = columns(sweep)
    table = [["trial"] + keys + ["status", sweep.metric, "seconds", "failure"]]
    for r in rows:
        table.append([r.label] + [sweep_config._fmt(r.values.get(k, "")) for k in keys] +
                     [r.status, f"{r.metric:.4f}" if r.metric is not None else "-",
                      f"{r.seconds:.1f}" if r.seconds is not None else "-", r.failure[:100]])
    head = (f"sweep {sweep.name}: {len(rows)} trials, {counts['finished']} finished, {counts['early_stopped']} "
            f"stopped early, {counts['failed']} failed" + (f", {counts['interrupted']} interrupted"
                                                             if counts["interrupted"] else "") + f" ({wall:.1f} s)")
    lines = ["", head] + ["  " + line for line in _table(table)]
    if best is not None:
        lines.append(f"best: {best.label} {sweep.metric}={best.metric:.4f} ({sweep_config.describe(best.values)}), "
                     f"run {best.run_id}")
    return "\n".join(lines)


def progress_callback(sweep: sweep_config.Sweep):
    """A Tune callback printing one line per trial start / end (driver side)."""
    from ray.tune import Callback

    metric = sweep.metric

    class Progress(Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            print(f"  {trial_name(trial)} started", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            last = trial.last_result or {}
            if last.get("final"):
                value = last.get(metric)
                shown = f"{metric}={value:.4f}" if isinstance(value, (int, float)) else "done"
                print(f"  {trial_name(trial)} finished: {shown}", flush=True)
            else:
                print(f"  {trial_name(trial)} stopped at step {last.get('step', '?')}", flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            print(f"  {trial_name(trial)} failed", flush=True)

    return Progress()


def _exit(code: int) -> None:
    """Exit without the interpreter's teardown of Ray's and MLflow's modules (3-4 s here).

    Everything is written by then: MLflow calls are synchronous, Ray is shut down, results
    files are closed; only the standard streams and logging need flushing.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    _exit(main())
