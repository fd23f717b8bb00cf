"""Run a sweep file's trials through Ray Tune and record every trial in MLflow.

    python -m pipeline.sweep sweeps/lambda.yaml                  # on this machine
    python -m pipeline.sweep sweeps/lambda.yaml --address HOST:PORT   # on a running Ray cluster
    python -m pipeline.sweep sweeps/lambda.yaml --dry-run        # print the trials, run nothing
    python -m pipeline.sweep sweeps/lambda.yaml --resume         # finish an interrupted launch

A trial is the params.yaml config (the profile `base` names, else the file's own; then
`base.params`, then the trial's values) fine-tuned and evaluated by `pipeline.experiment.run_finetune`; it reads the `data/`,
`models/` and `cache/` the DVC stages built next to the params file. A trial keeps a training
checkpoint every `train.checkpoint_every` steps in `runs/sweeps/<launch>/<trial id>/` (with its
trained file once done), so `--resume` restarts it from there.
"""
from __future__ import annotations

import argparse
import itertools
import logging
import math
import os
import shlex
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path

from pipeline import cli
from pipeline.config import CACHE_DIR, DATA_DIR, DEFAULT_PROFILE, MODELS_DIR, PROFILES, ConfigError, flatten, read_yaml
from pipeline.data.errors import MissingInput
from pipeline.io import check_writable
from pipeline.sweep import driver, spec
from pipeline.tracking import check_store, redact

EPILOG = f"""\
sweep file (every key is checked before anything starts):
{spec.__doc__.split("```yaml")[1].split("```")[0].rstrip()}

where things go:
  MLflow   experiment <tracking.experiment>/<name>: a parent run per launch, a child run per trial
           (params: the compared and swept keys, the whole config as config.json; metrics: per-step
           losses, final scores; tags: trial, trial_id, variant, status, failure, attempts, git_commit,
           git_dirty, profile)
  Ray      <storage_path or project/ray_results>/<name>-<launch time>-<pid>-<spec hash>/

resume: after the driver dies (even SIGKILL), `--resume` continues the newest launch of the sweep
(or the launch folder given): finished trials are not run again, the others restart from their
last checkpoint, and each trial keeps its one MLflow run. A launch that ran to its end has nothing
to resume, unless some of its trials failed: --retry-failed runs those again. ASHA starts again
from empty rungs (Ray Tune does not save its scheduler): the note a resume prints says what that changes.

cluster: start Ray on the nodes (`ray start --head`, `ray start --address HEAD:6379`), put the
project (code, data/, models/, cache/) on a path every node sees and storage_path on shared
storage, then pass --address or set RAY_ADDRESS. Only the driver writes to MLflow.

exit status: 0 all trials finished or were stopped early by ASHA; 1 a trial failed, no finished
trial logged the sweep's metric, or trials of the launch never ran; 2 bad sweep file or option (one
line on stderr); 130 interrupted (continue with --resume).
"""


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m pipeline.sweep", description=__doc__.split("\n\n")[0],
                           epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", type=Path, help="sweep file (e.g. sweeps/lambda.yaml)")
    p.add_argument("--params", type=Path, default=Path("params.yaml"),
                   help="parameter file; data/, models/, cache/ are read next to it (default: params.yaml)")
    p.add_argument("--profile", choices=PROFILES,
                   help="the profile to run (default: the sweep's base.profile, else the params file's `profile`)")
    p.add_argument("--dry-run", action="store_true", help="validate and print the trials; run nothing")
    p.add_argument("--resume", nargs="?", const="latest", metavar="LAUNCH",
                   help="continue the newest launch of this sweep (or this launch folder, under the storage or a path)")
    p.add_argument("--retry-failed", action="store_true",
                   help="with --resume: run failed trials again from their last checkpoint")
    p.add_argument("--address", metavar="HOST:PORT",
                   help="run on this Ray cluster (default: $RAY_ADDRESS, else a local Ray with every CPU)")
    p.add_argument("--storage", metavar="PATH_OR_URI", help="override the sweep's storage_path")
    p.add_argument("--max-concurrent", type=int, metavar="N", help="override the sweep's max_concurrent")
    p.add_argument("--gpus-per-trial", type=float, metavar="N",
                   help="override the sweep's resources.gpu (the shipped files ask for 0: give 1 on a GPU cluster)")
    p.add_argument("--results", type=Path, metavar="FILE",
                   help="also write the summary (run ids, statuses, metrics, outcomes) to this JSON file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=os.environ.get("LOGLEVEL", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    try:
        sweep, root = prepare(args)
        specs = checked_trials(sweep, root, args.address, args.storage, args.gpus_per_trial is not None)
        if args.dry_run:
            if args.resume and sweep.scheduler.type == "asha":
                print(driver.ASHA_RESUMED, file=sys.stderr)
            print(dry_run_text(sweep, specs, root, args))
            return 0
        preflight(sweep, specs, root)
        return driver.run(sweep, specs, root, args)
    except (ConfigError, MissingInput) as err:
        print(f"error: {err}", file=sys.stderr)
        return driver.EXIT_USAGE
    except KeyboardInterrupt:                       # before Ray Tune's run, which handles its own
        print("interrupted; continue with --resume", file=sys.stderr)
        return driver.EXIT_INTERRUPTED


def prepare(args: argparse.Namespace) -> tuple[spec.Sweep, Path]:
    if args.retry_failed and not args.resume:
        raise ConfigError("--retry-failed: only with --resume")
    if args.max_concurrent is not None and args.max_concurrent < 0:
        raise ConfigError(f"--max-concurrent: {args.max_concurrent} is out of range; allowed: >= 0")
    if args.results is not None:
        check_writable(args.results, "--results")
    params_path = args.params.resolve()
    params = read_yaml(params_path)          # its own errors name it, not the sweep file
    with naming(args.sweep):
        sweep = spec.load(args.sweep, params, args.profile, str(args.params))
    if args.max_concurrent is not None:
        sweep.max_concurrent = args.max_concurrent
    if args.gpus_per_trial is not None:
        if not (math.isfinite(args.gpus_per_trial) and args.gpus_per_trial >= 0):
            raise ConfigError(f"--gpus-per-trial: {args.gpus_per_trial:g} is out of range; allowed: a finite number >= 0")
        spec.check_quantity("--gpus-per-trial", args.gpus_per_trial)
        sweep.resources.gpu = args.gpus_per_trial
    return sweep, params_path.parent


@contextmanager
def naming(path: Path | str):
    """An error in a sweep file's content names the file (the params file's own are said as the stages say them)."""
    try:
        yield
    except spec.ParamsError:
        raise
    except ConfigError as err:
        text = str(err)
        raise ConfigError(text if text.startswith(f"{path}: ") else f"{path}: {text}") from None


def checked_trials(sweep: spec.Sweep, root: Path, address: str | None, storage: str | None = None,
                   gpus_option: bool = False) -> list[spec.TrialSpec]:
    """The sweep's fixed trial list (empty for Optuna), after every check that needs no Ray: what the
    dry run and the sweep stage run before anything starts. `address`: --address (a local Ray, whose
    resources are this machine's, when neither it nor $RAY_ADDRESS names a cluster); `storage`: --storage;
    `gpus_option`: whether --gpus-per-trial set the trials' GPUs (what a refusal of them names)."""
    check_store(sweep.base_config.tracking.uri, root)
    key = driver.storage_setting(sweep, storage)[1]
    with nullcontext() if storage else naming(sweep.source):     # a key of the file is named with its file
        driver.check_storage(driver.storage_root(sweep, root, storage), key)
    if (cluster := driver.ray_address(address)) not in (None, "auto"):
        driver.host_port(cluster, "--address" if address else "RAY_ADDRESS")
    with naming(sweep.source):
        specs = spec.trials(sweep)
        check_scheduler_metric(sweep, specs)
    if driver.ray_address(address) is None:     # a local Ray has this machine's CPUs and GPUs
        cpus = os.cpu_count() or 1
        with naming(sweep.source):
            check_fits_here("resources.cpu", sweep.resources.cpu, cpus, "CPUs")
        if sweep.resources.gpu > 0:
            import torch     # only here: a CPU sweep's check stays free of it

            with nullcontext() if gpus_option else naming(sweep.source):
                check_fits_here("--gpus-per-trial" if gpus_option else "resources.gpu", sweep.resources.gpu,
                                torch.cuda.device_count(), "GPUs")
    return specs


def check_fits_here(key: str, want: float, have: int, what: str) -> None:
    """A trial asking for more than a local Ray has would wait for ever."""
    if want > have:
        raise ConfigError(f"{key}: {want:g} is more than this machine's {have} {what}, so no trial could start; "
                          "ask for fewer or run on a cluster (--address)")


def trial_configs(sweep: spec.Sweep, specs: list[spec.TrialSpec]) -> list:
    """The trials' configs; Optuna's, drawn as the sweep runs, stood for by each choice and both ends
    of every range (a `loguniform` lambda never reaches 0; a `randint` projector_steps may)."""
    if specs:
        return [t.config for t in specs]
    dims = [[(d.key, v) for v in d.values] for d in sweep.space.values()]    # each choice, both bounds
    configs = []
    for values in itertools.product(*dims):
        try:
            configs.append(sweep.config(dict(values)))
        except ConfigError:        # a draw the config refuses fails alone, in its trial
            pass
    return configs


def check_scheduler_metric(sweep: spec.Sweep, specs: list[spec.TrialSpec]) -> None:
    """ASHA compares trials on a loss each of them reports at every logged step; one some trials
    never report would stop nothing."""
    if sweep.scheduler.type != "asha":
        return
    metric = sweep.scheduler.metric
    for cfg in trial_configs(sweep, specs):
        if metric.removeprefix("loss/") not in cfg.objective.reported_losses:
            reported = ", ".join(sorted(f"loss/{n}" for n in cfg.objective.reported_losses))
            raise ConfigError(f"scheduler.metric: {metric!r} is not reported at every step by trials with "
                              f"objective.method {cfg.objective.method!r}, lambda_sds {cfg.objective.lambda_sds:g}, "
                              f"projector_steps {cfg.objective.projector_steps}, so ASHA could not compare them; "
                              f"allowed: {reported}")


def preflight(sweep: spec.Sweep, specs: list[spec.TrialSpec], root: Path) -> None:
    """The built inputs every trial reads: fail once, here, rather than in every trial. That includes
    the cache tables the trials read beside the teacher, which `models/teacher` must have encoded
    (`inputs.check_encoded_by`); torch is imported for them only when a trial reads one."""
    from pipeline.data.datasets import INDEX_NAME
    from pipeline.inputs import check_encoded_by, teacher_tables
    from pipeline.models import teacher_dir

    for path, stage in ((root / DATA_DIR / INDEX_NAME, "data"), (root / MODELS_DIR, "models"),
                        (root / CACHE_DIR, "cache")):
        if not path.exists():
            raise MissingInput(f"{path}: not found; build it first (`dvc repro {stage}` or "
                               f"`python -m stages.{stage} --params {root / 'params.yaml'}`)")
    names = list(dict.fromkeys(name for config in trial_configs(sweep, specs) for name in teacher_tables(config)))
    if names:
        from pipeline.cache import CacheError, open_table

        try:
            check_encoded_by(teacher_dir(root / MODELS_DIR), *(open_table(root / CACHE_DIR, name) for name in names))
        except CacheError as err:             # what the stages say in one line (exit 2)
            raise MissingInput(str(err)) from None


def columns(sweep: spec.Sweep) -> list[str]:
    return list(sweep.space) + (["train.seed"] if sweep.seeds else [])


def table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def dry_run_text(sweep: spec.Sweep, specs: list[spec.TrialSpec], root: Path, args: argparse.Namespace) -> str:
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
        f"  MLflow experiment {driver.experiment_name(s)!r} at {redact(s.base_config.tracking.uri)}; "
        f"Ray storage {driver.storage_root(s, root, args.storage)}",
    ]
    base = {k: v for k, v in flatten(s.overrides).items() if k != "profile"}
    if base:
        lines.append(f"  base params ({s.profile}): {spec.describe(base)}")
    lines.append("")
    if specs:
        keys = columns(s)
        lines += table([["trial"] + keys] + [[t.label] + [spec.fmt(t.values[k]) for k in keys] for t in specs])
    else:
        lines.append(f"Optuna draws each config as the sweep runs ({s.search.num_samples} configs"
                     + (f" x {len(s.seeds)} seeds" if len(s.seeds) > 1 else "") + ") from:")
        lines += [f"  {d.key} ~ {d.describe()}" for d in s.space.values()]
    return "\n".join(lines)


def summary_text(sweep: spec.Sweep, rows: list[dict], counts: dict, best: dict | None, wall: float,
                 params: Path | None = None) -> str:
    """The launch's summary, ending with the command that writes its report (table and figure) from
    the tracking store; `params`: the parameter file the sweep ran with."""
    keys = columns(sweep)
    cells = [["trial"] + keys + ["status", sweep.metric, "seconds", "failure"]]
    for r in rows:
        cells.append([r["trial"]] + [spec.fmt(r["config"].get(k, "")) for k in keys] +
                     [r["status"], f"{r['metric']:.4f}" if r["metric"] is not None else "-",
                      f"{r['trial_seconds']:.1f}" if r["trial_seconds"] is not None else "-", r["failure"][:100]])
    head = (f"sweep {sweep.name}: {len(rows)} trials, {counts['finished']} finished, {counts['early_stopped']} "
            f"stopped early, {counts['failed']} failed" + (f", {counts['interrupted']} interrupted"
                                                             if counts["interrupted"] else "") + f" ({wall:.1f} s)")
    lines = ["", head] + ["  " + line for line in table(cells)]
    if best is not None:
        lines.append(f"best: {best['trial']} {sweep.metric}={best['metric']:.4f} ({spec.describe(best['config'])}), "
                     f"run {best['run_id']}")
    own = params is not None and params != Path("params.yaml")
    given = f" --params {shlex.quote(str(params))}" if own else ""
    # The report names rows by its own profile: the sweep's, where the params file selects another.
    if sweep.profile != sweep.params.get("profile", DEFAULT_PROFILE):
        given += f" --profile {sweep.profile}"
    # Not reports/, the report stage's output, which DVC would then see as changed: a folder git ignores.
    out = (params.parent if own else Path()) / "runs" / "reports" / sweep.name
    lines.append(f"report (table and figure): python -m pipeline.report {shlex.quote(sweep.name)}{given} "
                 f"--out {shlex.quote(str(out))}")
    return "\n".join(lines)
