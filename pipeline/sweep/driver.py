"""One launch of a sweep, or the resumption of one: Ray up, Ray Tune's run with the run recorder, the summary.

A launch lives in Ray Tune's folder `<storage>/<name>-<launch time>-<pid>-<spec hash>`: Ray's
experiment state there is the record of its trials (and of the recorder's trial -> run map), so
`--resume` continues it from that folder alone; the hash in its name refuses a resumption under
a changed sweep file or params.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import math
import os
import pickle
import re
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.config import CODE_ROOT, ConfigError
from pipeline.net import check_listening
from pipeline.sweep.spec import ResourcesSpec, Sweep, TrialSpec, trial_index

EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


def storage_setting(sweep: Sweep, override: str | None) -> tuple[str, str]:
    """The Ray storage a launch uses as given, and the key that gave it (what a refusal names)."""
    if override:
        return override, "--storage"
    if sweep.storage_path:
        return sweep.storage_path, "storage_path"
    return "ray_results", "storage_path (unset: the project's ray_results)"


# The URI schemes of the file systems Ray Tune's storage reaches through pyarrow (others fail in Ray, past every check).
STORAGE_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs", "viewfs")


def storage_root(sweep: Sweep, root: Path, override: str | None) -> str:
    value = storage_setting(sweep, override)[0]
    if value.startswith("file://"):        # a local folder: checked and locked as one
        value = value.removeprefix("file://")
    if "://" in value:
        return value.rstrip("/")
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (root / path).resolve())


def experiment_name(sweep: Sweep) -> str:
    return f"{sweep.base_config.tracking.experiment}/{sweep.name}"


ASHA_RESUMED = ("note: ASHA's rungs start empty on --resume (Ray Tune does not save its scheduler's state, "
                "ray-project/ray#30838): the trials it runs now are stopped only against results reported from "
                "now on, and one it stopped after Ray's last snapshot runs again")
ENDED = "ended.json"      # in a launch folder: its driver ran it to the end (exit status 0 or 1)
SNAPSHOT = re.compile(r"experiment_state-.*\.json")   # Ray Tune's record of the launch's trials
# Ray Tune's state files in a launch folder: its trials, its searcher's and its callbacks' (the run
# recorder's); it restores from the newest of each by name.
STATES = (SNAPSHOT, re.compile(r"searcher-state-.*\.pkl"), re.compile(r"callback-states-.*\.pkl"))


def _folder(uri_or_path: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(uri_or_path if "://" in uri_or_path else str(Path(uri_or_path).resolve()))


def _entries(folder: str) -> list:
    import pyarrow.fs

    fs, base = _folder(folder)
    return fs.get_file_info(pyarrow.fs.FileSelector(base, allow_not_found=True))


def launch_folders(sweep: Sweep, storage: str) -> list[str]:
    """Every launch folder of this sweep under `storage`, oldest first, those Ray Tune cannot restore
    too: a launch refused, or its driver killed, before Ray Tune wrote its settings (`tuner.pkl`)."""
    import pyarrow.fs

    launch = re.compile(rf"{re.escape(sweep.name)}-\d{{8}}-\d{{6}}-\d{{4}}-[0-9a-f]{{16}}")
    names = sorted(f.base_name for f in _entries(storage)
                   if f.type == pyarrow.fs.FileType.Directory and launch.fullmatch(f.base_name))
    return [f"{storage}/{name}" for name in names]


def launches(sweep: Sweep, storage: str) -> list[str]:
    """The launch folders of this sweep under `storage` that Ray Tune can restore, oldest first."""
    from ray import tune

    return [folder for folder in launch_folders(sweep, storage) if tune.Tuner.can_restore(folder)]


def snapshotted(names: set[str]) -> bool:
    """Whether Ray Tune recorded the trials of the launch whose folder holds `names`: a driver killed
    between writing the launch's settings and its first snapshot leaves a folder that restoring would
    run as one empty trial."""
    return any(SNAPSHOT.fullmatch(name) for name in names)


def names_in(folder: str) -> set[str]:
    return {f.base_name for f in _entries(folder)}


def mark_ended(folder: str, code: int) -> None:
    fs, base = _folder(folder)
    with fs.open_output_stream(f"{base}/{ENDED}") as out:
        out.write(json.dumps({"exit": code}).encode())


def unfinished_launch(sweep: Sweep, storage: str) -> str | None:
    """The newest launch of this sweep under this definition (spec hash) that was stopped before its
    end with its trials recorded: the one to resume rather than start again."""
    for folder in reversed(launches(sweep, storage)):
        if folder.endswith(f"-{sweep.spec_hash()}"):     # the newest only: an older one was superseded
            names = names_in(folder)
            if not snapshotted(names) or ENDED in names:
                return None
            if (why := unreadable_state(folder, names)) is not None:    # a new launch takes its place
                print(f"note: launch {folder} cannot be continued ({why}); a new launch runs the sweep",
                      file=sys.stderr)
                return None
            return folder
    return None


def check_unended(folder: str, names: set[str], retry: bool) -> None:
    """A launch its driver ran to the end has nothing to continue: every trial finished, or the
    failed ones, which only --retry-failed runs again. (Restored, Ray Tune would start nothing
    and the launch's summary would be written again with the restore's time.)"""
    if ENDED not in names:
        return
    fs, base = _folder(folder)
    try:
        with fs.open_input_stream(f"{base}/{ENDED}") as f:
            failed = json.loads(f.read())["exit"] != 0
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"--resume: {folder}/{ENDED} cannot be read; remove it to resume the launch") from None
    if not failed:
        raise ConfigError(f"--resume: launch {folder} ran to its end with every trial finished; nothing to resume")
    if not retry:
        # Exit 1 also ends a launch whose trials all finished but none logged the metric: nothing to retry.
        raise ConfigError(f"--resume: launch {folder} ran to its end with exit status 1 (failed trials, or a metric "
                          "no trial logged: its summary says which); add --retry-failed to run failed trials again")


def unreadable_state(folder: str, names: set[str]) -> str | None:
    """Why the launch's newest state file of some kind does not load (Ray Tune restores from them),
    else None. Ray Tune copies them into the launch folder in place: a driver killed during a copy
    leaves one cut short, which a restore would meet as a traceback."""
    fs, base = _folder(folder)
    for pattern in STATES:
        found = sorted(name for name in names if pattern.fullmatch(name))
        if not found:
            continue
        with fs.open_input_stream(f"{base}/{found[-1]}") as f:
            data = f.read()
        try:
            json.loads(data) if found[-1].endswith(".json") else pickle.loads(data)
        except Exception:              # whatever stops it loading here stops Ray Tune's restore too
            return (f"{found[-1]} cannot be read: cut short by a kill while Ray Tune wrote it, or written by "
                    "another Ray Tune")
    return None


def check_readable(folder: str, names: set[str]) -> None:
    if (why := unreadable_state(folder, names)) is not None:
        raise ConfigError(f"--resume: launch {folder} cannot be continued ({why}); start a new launch (without "
                          "--resume)")


def find_launch(sweep: Sweep, storage: str, given: str) -> str:
    """The launch folder `--resume` continues: the one named, else the newest of this sweep."""
    from ray import tune

    if given != "latest":
        folder = given if "://" in given or Path(given).is_absolute() else f"{storage}/{given}"
    else:
        found = launches(sweep, storage)
        if not found:
            raise ConfigError(f"--resume: no launch of sweep {sweep.name!r} under {storage}")
        folder = found[-1]
    if not tune.Tuner.can_restore(folder):
        raise ConfigError(f"--resume: {folder} is not a launch Ray Tune can restore")
    if not folder.rstrip("/").endswith(f"-{sweep.spec_hash()}"):
        raise ConfigError(f"--resume: {sweep.source}, the params or --profile / --gpus-per-trial / --max-concurrent "
                          f"changed since launch {folder} (its spec hash differs); restore them, or start a new launch "
                          "without --resume")
    return folder


def check_fits_cluster(res: ResourcesSpec, have: dict[str, float], device: str) -> None:
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


# Trials draw no progress bars (tqdm's own, and Hugging Face's weight loading): Ray forwards every
# worker's output to the driver, where bars of trials side by side interleave into noise. A trial's
# progress is its run's logged steps and the driver's line per trial.
QUIET_WORKERS = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def ray_address(given: str | None) -> str | None:
    """The cluster a sweep runs on: --address, else $RAY_ADDRESS; None for a Ray on this machine."""
    address = given or os.environ.get("RAY_ADDRESS")
    return address if address and address != "local" else None


def start_ray(address: str | None) -> bool:
    """Ray on this machine, or the cluster at `address` (`check_reachable` first), unless this process
    runs one already; whether it started one. The variables set first are read by Ray when it is
    imported. A local Ray keeps its sessions under $RAY_TMPDIR/ray (Ray's own variable; by default
    under $TMPDIR or /tmp)."""
    if address and "RAY_AUTH_MODE" not in os.environ and (
            os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
            or (Path.home() / ".ray" / "auth_token").is_file()):
        # `ray start` turns token auth on, but a driver joining a cluster defaults to 'disabled' and is
        # refused: present the token when there is one (a cluster without auth accepts it too).
        os.environ["RAY_AUTH_MODE"] = "token"
    # TensorBoard's logger costs ~3 s of imports before the first trial; the metrics are in MLflow.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    # Results during training carry the losses, not the final metric the searcher optimises.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")     # Ray's console tables: the recorder prints a line per trial
    # Ray Tune hands the driver's AWS credentials to every trial in its runtime env, which the
    # runtime-env agent of a local Ray logs at INFO, in plain text: its processes log warnings only.
    os.environ.setdefault("RAY_LOGGER_LEVEL", "warning")
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    if address:
        pythonpath = os.pathsep.join(p for p in (str(CODE_ROOT), os.environ.get("PYTHONPATH", "")) if p)
        ray.init(address=address, runtime_env={"env_vars": {**QUIET_WORKERS, "PYTHONPATH": pythonpath}}, **kwargs)
    else:
        ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False,
                 runtime_env={"env_vars": QUIET_WORKERS}, **kwargs)
    return True


def host_port(address: str, source: str) -> tuple[str, str]:
    """The head's host and port in a cluster address: what the dry run checks, needing no network."""
    if address.startswith("ray://"):
        # Ray Client runs Ray Tune in an actor on the cluster, and the run recorder with it: the driver
        # would find no trial recorded and call every one of them never run.
        raise ConfigError(f"{source}: {address!r} is not allowed; Ray Client (ray://) runs Ray Tune away from "
                          "this driver; expected HOST:PORT of the head's GCS (6379 unless changed) or auto")
    host, _, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port.isdigit():
        raise ConfigError(f"{source}: {address!r} is not allowed; expected HOST:PORT or auto")
    return host, port


def check_reachable(address: str, source: str) -> None:
    """Ray's own connection attempt to an address where nothing listens retries for minutes and
    ignores SIGTERM meanwhile: refuse such an address first, in one line naming where it came from
    (`auto`, the cluster this machine joined, is Ray's to find)."""
    if address == "auto":
        return
    host, port = host_port(address, source)
    check_listening(host, int(port), source, address, "start the cluster's head there first (`ray start --head`)")


def check_storage(storage: str, key: str) -> None:
    """Refuse, creating nothing and before Ray starts, a local storage path that cannot hold a launch's
    folder (its nearest existing folder is a file or is not writable), and a URI of a file system Ray
    cannot reach. A URI's bucket is Ray's to reach. `key`: where the path was given."""
    if "://" in storage:
        scheme = storage.split("://", 1)[0]
        if scheme not in STORAGE_SCHEMES:
            raise ConfigError(f"{key}: {storage} names no file system Ray Tune can store to (scheme {scheme!r}); "
                              f"allowed: a folder, or a URI of {', '.join(STORAGE_SCHEMES)}")
        return
    path = Path(storage)
    existing = next(p for p in (path, *path.parents) if p.exists())
    code = errno.ENOTDIR if not existing.is_dir() else errno.EACCES if not os.access(existing, os.W_OK | os.X_OK) \
        else None
    if code is not None:
        raise ConfigError(f"{key}: {storage} cannot hold the launch's folder ({os.strerror(code)}); "
                          "give a writable folder")


def tuner(sweep: Sweep, specs: list[TrialSpec], root: Path, recorder, ray_path: str, resume: bool, retry: bool):
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from pipeline.sweep.recorder import dirname, label
    from pipeline.sweep.trial import run_trial

    resources = {"cpu": sweep.resources.cpu, **({"gpu": sweep.resources.gpu} if sweep.resources.gpu else {})}
    trainable = tune.with_resources(tune.with_parameters(run_trial, sweep=sweep, root=str(root),
                                                         launch=ray_path.rstrip("/").rsplit("/", 1)[-1]), resources)
    if resume:
        return tune.Tuner.restore(ray_path, trainable, resume_unfinished=True, resume_errored=retry)
    search_alg, num_samples = None, 1
    if sweep.search.type == "optuna":
        from pipeline.sweep.search import optuna_search

        search_alg = optuna_search(sweep)
        param_space = {d.key: d.domain() for d in sweep.space.values()}
        num_samples = sweep.search.num_samples * len(sweep.repeats)
    else:
        param_space = {"trial": tune.grid_search([{"index": t.index, "values": t.values} for t in specs])}
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
                                    trial_name_creator=label, trial_dirname_creator=dirname),
        run_config=tune.RunConfig(name=name, storage_path=storage, verbose=0,
                                  callbacks=[recorder, CSVLoggerCallback(), JsonLoggerCallback()],
                                  failure_config=tune.FailureConfig(max_failures=0)))


@contextmanager
def launch_lock(ray_path: str):
    """Held while a driver runs the launch, and let go by the system when it dies (even by SIGKILL):
    a second driver on the same launch (two --resume at once) is refused rather than training
    every unfinished trial twice."""
    if "://" in ray_path:
        print(f"note: {ray_path} is not on a file system, so a second driver on this launch cannot be refused",
              file=sys.stderr)
        yield
        return
    try:
        Path(ray_path).mkdir(parents=True, exist_ok=True)
        lock = open(Path(ray_path) / "driver.lock", "a+")
    except OSError as err:
        # Past check_storage, which checks the storage and not a launch in it: the folder changed
        # since, the system refused the mkdir (a full disk), or --resume names a read-only launch.
        raise ConfigError(f"{ray_path}: the launch's folder cannot be created or written "
                          f"({err.strerror or type(err).__name__}); a launch needs a writable folder "
                          "(storage_path or --storage)") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise ConfigError(f"--resume: launch {ray_path} is being run by another driver ({lock.read().strip()}); "
                              "wait for it to end, or stop it and resume again") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}")
        lock.flush()
        yield


UNRECORDED = "killed before Ray Tune recorded any trial"


def stranded(folder: str, names: set[str]) -> str | None:
    """Why nothing can continue a launch its driver did not run to the end (its runs' failure), else None."""
    if ENDED in names:
        return None
    if not snapshotted(names):
        return UNRECORDED
    return unreadable_state(folder, names)


def abandon_stranded(sweep: Sweep, root: Path, storage: str) -> None:
    """End the runs of this sweep's launches that nothing can continue (`--resume` refuses them), which
    left alone would stay RUNNING: a driver died before Ray Tune recorded a trial (before it wrote the
    launch's settings, too, when the launch's run was already open), or while it wrote a state file. A
    launch whose driver is still starting holds its lock and is left to it; one in a bucket is left too
    (no lock says whether its driver lives)."""
    from pipeline.sweep.recorder import abandon_launch

    for folder in launch_folders(sweep, storage) if "://" not in storage else []:
        if stranded(folder, names_in(folder)) is None:
            continue
        try:
            with launch_lock(folder):
                why = stranded(folder, names_in(folder))   # read again under the lock: its driver may have gone on
                if why is not None:
                    abandon_launch(sweep, root, experiment_name(sweep), folder, why)
        except ConfigError:                        # its driver holds it
            continue


def run(sweep: Sweep, specs: list[TrialSpec], root: Path, args) -> int:
    """Run a new launch, or resume the one `args.resume` names; the exit status."""
    storage = storage_root(sweep, root, args.storage)
    if (cluster := ray_address(args.address)) is not None:      # before anything is written
        check_reachable(cluster, "--address" if args.address else "RAY_ADDRESS")
    from pipeline.tracking import check_not_moved

    check_not_moved(sweep.base_config.tracking, root, experiment_name(sweep))   # before Ray starts
    if args.resume:
        ray_path = find_launch(sweep, storage, args.resume)
    else:
        stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid() % 10000:04d}"
        ray_path = f"{storage}/{sweep.name}-{stamp}-{sweep.spec_hash()}"
    with launch_lock(ray_path):
        # Read under the lock: a launch whose driver is still starting has no snapshot yet either.
        names = names_in(ray_path) if args.resume else set()
        if args.resume:
            check_unended(ray_path, names, args.retry_failed)
        if args.resume and not snapshotted(names):
            from pipeline.sweep.recorder import abandon_launch

            abandon_launch(sweep, root, experiment_name(sweep), ray_path, UNRECORDED)   # (one outside the storage too)
            raise ConfigError(f"--resume: launch {ray_path} was stopped before Ray Tune recorded any trial, so "
                              "there is nothing to continue; start a new launch (without --resume)")
        if args.resume:
            check_readable(ray_path, names)
        if args.resume and sweep.scheduler.type == "asha":
            print(ASHA_RESUMED, file=sys.stderr)
        if ENDED in names:                        # running again: until it ends, it is unfinished
            fs, base = _folder(ray_path)
            fs.delete_file(f"{base}/{ENDED}")
        abandon_stranded(sweep, root, storage)
        code = run_locked(sweep, specs, root, args, ray_path)
        if code != EXIT_INTERRUPTED:
            mark_ended(ray_path, code)
    return code


def run_locked(sweep: Sweep, specs: list[TrialSpec], root: Path, args, ray_path: str) -> int:
    from pipeline.sweep.recorder import RunRecorder
    from pipeline.tracking import resolve_uri

    t0 = time.perf_counter()
    started = start_ray(ray_address(args.address))
    import ray

    timing = {"ray_start_seconds": time.perf_counter() - t0}

    RunRecorder.active = recorder = None
    interrupted = False
    try:
        check_fits_cluster(sweep.resources, ray.cluster_resources(), sweep.base_config.compute.device)
        if not args.resume:                         # a resumed launch: Tuner.restore brings its recorder back
            recorder = RunRecorder(sweep, root, resolve_uri(sweep.base_config.tracking.uri, root),
                                   experiment_name(sweep))
            recorder.open_launch(ray_path)
        print(f"sweep {sweep.name}: {sweep.num_trials} trials; MLflow experiment {experiment_name(sweep)!r}; "
              f"Ray {ray_path}", flush=True)
        launch = tuner(sweep, specs, root, recorder, ray_path, bool(args.resume), args.retry_failed)
        timing["setup_seconds"] = time.perf_counter() - t0 - timing["ray_start_seconds"]
        launch.fit()
        timing["tune_seconds"] = time.perf_counter() - t0 - timing["ray_start_seconds"] - timing["setup_seconds"]
    except KeyboardInterrupt:
        interrupted = True
    except BaseException as err:
        if RunRecorder.active or recorder:
            (RunRecorder.active or recorder).fail_launch(err)
        raise
    finally:
        if started:
            ray.shutdown()
    recorder = RunRecorder.active or recorder
    if recorder is None:                            # interrupted while Ray Tune restored the launch
        print("interrupted; continue with --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    if interrupted:
        recorder.on_experiment_end(trials=[])
    return finish(sweep, recorder, summary_rows(recorder, sweep.metric), t0, timing, args.results, interrupted,
                  args.params)


def summary_rows(recorder, metric: str) -> list[dict]:
    """One entry per trial (the results file's `trials`), from the recorder's records."""
    rows = []
    for trial_id, rec in recorder.trials.items():
        metrics = rec.get("metrics", {})
        value = metrics.get(metric) if rec["status"] == "finished" else None
        rows.append({"trial": rec["label"], "trial_id": trial_id, "run_id": rec["run_id"], "config": rec["values"],
                     "params": rec["params"],
                     "status": rec["status"], "failure": rec.get("failure", ""),
                     "metric": float(value) if value is not None else None,
                     "trial_seconds": metrics.get("time/trial_seconds"),
                     "import_seconds": metrics.get("time/import_seconds"),
                     "report_seconds": metrics.get("time/report_seconds"), "metrics": metrics,
                     "outcomes": rec.get("outcomes", {})})
    return sorted(rows, key=lambda r: trial_index(r["trial"]))     # t1000 after t999, not after t100


def finish(sweep: Sweep, recorder, rows: list[dict], t0: float, timing: dict, results: Path | None,
           interrupted: bool = False, params: Path | None = None) -> int:
    """Print the summary, write the results file, end the launch's run; the exit status. `timing`:
    the driver's seconds in Ray's start, the set-up and Tune's run (`benchmarks/sweep_overhead.py`),
    like the wall seconds those of this driver's session alone (a resumed launch's earlier ones apart);
    `params`: the parameter file, for the report command the summary ends with."""
    from pipeline.io import write_json
    from pipeline.sweep.cli import summary_text
    from pipeline.tracking import redact

    interrupted = interrupted or recorder.interrupted       # by the user: Ctrl-C, or Ray's first SIGINT
    counts = {s: sum(r["status"] == s for r in rows) for s in ("finished", "early_stopped", "failed", "interrupted")}
    done = [r for r in rows if r["metric"] is not None and math.isfinite(r["metric"])]
    best = (max if sweep.mode == "max" else min)(done, key=lambda r: r["metric"]) if done else None
    wall = time.perf_counter() - t0
    text = summary_text(sweep, rows, counts, best, wall, params)
    print(text, flush=True)
    payload = {"sweep": sweep.name, "experiment": recorder.experiment, "tracking_uri": redact(recorder.uri),
               "parent_run_id": recorder.parent, "metric": sweep.metric, "mode": sweep.mode,
               "best": best["run_id"] if best else None, "counts": counts, "wall_seconds": wall, "timing": timing,
               "trials": rows}
    if results:
        write_json(results, payload)
    status = "interrupted" if counts["interrupted"] or interrupted else "failed" if counts["failed"] else "finished"
    if counts["finished"] and best is None and status != "interrupted":   # e.g. a benchmark the data lacks
        logged = sorted({k for r in rows for k in r["metrics"] if not k.startswith(("time/", "loss/"))})
        print(f"error: metric: {sweep.metric!r} was logged by none of the {counts['finished']} finished trials, so "
              f"nothing ranks them; they logged: {', '.join(logged)}", file=sys.stderr)
        status = "failed"
    if len(rows) < sweep.num_trials and status != "interrupted":       # a launch must run its whole list
        print(f"error: {sweep.num_trials - len(rows)} of the launch's {sweep.num_trials} trials never ran",
              file=sys.stderr)
        status = "failed"
    metrics = {**{f"trials/{k}": v for k, v in counts.items()}, "trials/total": len(rows), "time/sweep_seconds": wall,
               **({f"best/{sweep.metric}": best["metric"]} if best else {})}
    recorder.close_launch(status, metrics, {"summary.txt": text + "\n", "summary.json": json.dumps(payload, indent=2)})
    if status == "interrupted":
        print(f"interrupted: {sweep.num_trials - counts['finished'] - counts['early_stopped'] - counts['failed']} "
              "trials unfinished; continue with --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_FAILED if status == "failed" else 0
