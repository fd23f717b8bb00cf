"""The only module that talks to MLflow.

Runs are driven through `MlflowClient` with explicit run ids (no global active run), so the
stages' recorder (`experiment.record_finetune`, `run_baselines`) and the sweep's run recorder
address runs the same way. mlflow is imported lazily: it costs seconds and most commands never
need it. Anything written to a run passes `redact` first: no credential of a URI reaches it.
A run's params are the few keys runs are compared by; its whole config is its CONFIG artifact.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import socket
import subprocess
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from pipeline.config import CODE_ROOT, ConfigError, TrackingConfig, flatten
from pipeline.io import check_writable
from pipeline.net import check_listening

MAX_PARAM_LENGTH = 500
# The artifact holding a run's per-case correctness (`evaluate.Evaluation.outcomes`).
OUTCOMES = "outcomes.json"
# The artifact holding a run's whole config (what `config.from_dict` reads back).
CONFIG = "config.json"
# A training run's params: what a comparison of runs reads. MLflow's Compare page and run table list
# every param, so the whole config (~100 keys) would bury these; the rest of it is in CONFIG.
COMPARED = ("profile", "objective.method", "objective.lambda_sds", "train.lr", "train.scope", "train.seed",
            "train.student", "train.steps")
# MLflow's record of an experiment's kind: "custom_model_development" is its "Model training" kind
# (GenAI's is "genai_development"), the value its UI gives the experiments it creates in that view.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
log = logging.getLogger(__name__)


# The stores MLflow's client opens: an SQL database, a tracking server. Not a folder (a file store):
# MLflow 3 refuses one unless MLFLOW_ALLOW_FILE_STORE is set, and then only as deprecated.
URI_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks")


def check_uri(uri: str) -> None:
    """A tracking URI MLflow can open, refused in one line otherwise (MLflow's own error is a
    traceback at the first run, after the work it was to record)."""
    # "databricks" alone is MLflow's URI of the default Databricks profile.
    scheme = uri.split("://", 1)[0].split("+", 1)[0] if "://" in uri else "databricks" if uri == "databricks" else ""
    if not uri or scheme not in URI_SCHEMES:
        folder = "; a folder (a file store) MLflow 3 no longer opens" if scheme in ("", "file") and uri else ""
        raise ConfigError(f"tracking.uri: {redact(uri)!r} is not allowed{folder}; expected sqlite:///PATH, "
                          f"http(s)://HOST[:PORT] or a database URI ({', '.join(URI_SCHEMES)})")
    if _PASSWORD.search(uri):
        # params.yaml is versioned with the study, and the config travels to Ray Tune's saved state.
        raise ConfigError(f"tracking.uri: {redact(uri)!r} holds a password, which would be written wherever the "
                          "params go; give it in MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (a tracking "
                          "server) or the database's own password file (e.g. ~/.pgpass)")


def local_store(uri: str, root: Path) -> Path | None:
    """The file a local SQLite store lives in; None for a server or a database elsewhere. A relative
    path is under `root`."""
    if uri.startswith("sqlite:///"):
        return (Path(root) / uri[len("sqlite:///"):]).resolve()
    return None


def check_reachable(uri: str) -> None:
    """A tracking server's URI whose host accepts a connection, refused in one line otherwise: MLflow's
    client retries an unreachable server 7 times over about four minutes, then ends in a traceback. A
    server that MLflow's requests reach through a proxy (HTTP_PROXY / HTTPS_PROXY / ALL_PROXY for its
    scheme, NO_PROXY not naming it) is left to MLflow: only the proxy reaches it."""
    import requests.utils     # mlflow's HTTP library, so its proxy rules

    parts = urllib.parse.urlsplit(uri)
    proxied = requests.utils.select_proxy(uri, requests.utils.get_environ_proxies(uri))
    if parts.scheme not in ("http", "https") or proxied:
        return
    try:
        port = parts.port
    except ValueError as err:                          # urlsplit's check: not a number, or out of range
        raise ConfigError(f"tracking.uri: {redact(uri)!r} has no valid port ({err})") from None
    if not parts.hostname:
        raise ConfigError(f"tracking.uri: {redact(uri)!r} names no host; expected http(s)://HOST[:PORT]")
    check_listening(parts.hostname, (443 if parts.scheme == "https" else 80) if port is None else port,
                    "tracking.uri", redact(uri),
                    "start the tracking server (README, \"MLflow\") or set tracking.uri to one that runs")


def check_store(uri: str, root: Path) -> None:
    """`check_uri`, and that a local store can be created and written where it goes (MLflow's error
    is a traceback at the first run, after the work it was to record). Creates nothing."""
    check_uri(uri)
    store = local_store(uri, root)
    if store is None:
        return
    check_writable(store, "tracking.uri")
    if store.is_file() and not os.access(store, os.W_OK):     # SQLite writes the file itself, in place
        raise ConfigError(f"tracking.uri: {store} is not writable, so the store cannot be written")


def resolve_uri(uri: str, root: Path) -> str:
    """The URI checked (`check_store`), with a relative SQLite path made absolute under `root` (MLflow
    needs absolute paths) and its folder created."""
    check_store(uri, root)
    if uri.startswith("sqlite:///"):
        path = local_store(uri, root)
        path.parent.mkdir(parents=True, exist_ok=True)
        return "sqlite:///" + str(path)
    return uri


_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]+@")
_PASSWORD = re.compile(r"://[^/@\s:]*:[^/@\s]*@")


def redact(text: str) -> str:
    """`text` with the user and password of every URI in it replaced by *** (a tracking server's
    `http://user:pass@host` must not reach params, artifacts, stdout or logs)."""
    return _CREDENTIALS.sub("***@", text)


# The code a run executes, in its checkout. Other tracked files change with every `dvc repro` (dvc.lock,
# metrics/, reports/), and a run records its params itself.
CODE_FOLDERS = ("pipeline", "stages")


def git_tags(root: Path = CODE_ROOT) -> dict[str, str]:
    """A run's `git_commit`, the HEAD of the checkout at `root` (by default the one this code runs from),
    and `git_dirty`: "true" where its code (CODE_FOLDERS) is not that commit's (a change not committed, a
    file not tracked); both "unknown" outside a checkout."""
    def git(*args: str) -> str:
        # No optional locks: a run's status read must not hold the index lock against the user's git.
        return subprocess.run(["git", "--no-optional-locks", *args], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()

    try:
        changed = git("status", "--porcelain", "--untracked-files=normal", "--", *CODE_FOLDERS)
        return {"git_commit": git("rev-parse", "HEAD"), "git_dirty": "true" if changed else "false"}
    except (OSError, subprocess.CalledProcessError):
        return {"git_commit": "unknown", "git_dirty": "unknown"}


def _client(uri: str):
    # MLflow prints each ended run's link to stdout, with the server URI as given (a user name in it
    # included): the stages print their own summary, so no link.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(uri)
    return MlflowClient(uri)


@dataclass
class Run:
    """A handle on one MLflow run."""

    client: Any
    run_id: str

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None and math.isfinite(float(v))]
        dropped = sorted(k for k, v in metrics.items() if v is not None and not math.isfinite(float(v)))
        if dropped:
            # MLflow stores no NaN/inf; a missing metric must not pass unnoticed either.
            log.warning("run %s: not logging non-finite %s", self.run_id, ", ".join(dropped))
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, redact(str(v))[:MAX_PARAM_LENGTH]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_config(self, config: dict, compared: Iterable[str]) -> None:
        """`config` (nested) whole as the CONFIG artifact, and those of its dotted keys in `compared`
        as the run's params: each value is read from `config`, so the two cannot disagree."""
        flat = flatten(config)
        self.log_params({key: flat[key] for key in dict.fromkeys(compared) if key in flat})
        self.log_text(json.dumps(config, indent=2, default=str) + "\n", CONFIG)

    def set_tags(self, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, redact(str(value)))

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    def log_dict(self, value: dict, name: str) -> None:
        """A JSON artifact under `name`."""
        self.client.log_dict(self.run_id, value, name)

    def log_text(self, text: str, name: str) -> None:
        """A small text artifact (a summary, the sweep file) under `name`."""
        self.client.log_text(self.run_id, redact(text), name)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)

    def fail(self, err: BaseException) -> None:
        """End the run as FAILED, the error's first line in its `failure` tag (what the report shows)."""
        self.set_tags({"failure": failure_text(err)})
        self.finish("FAILED")

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, kind, err, traceback) -> None:
        """`with tracker.start(...) as run:` ends the run FINISHED, or FAILED when the block raised."""
        if err is None:
            self.finish()
        else:
            self.fail(err)


def failure_text(err: BaseException) -> str:
    """One line naming an error (the cause Ray wraps, when there is one), at most 500 characters."""
    err = getattr(err, "cause", None) or err
    text = f"{type(err).__name__}: {err}".strip().splitlines()
    return (text[0] if text else type(err).__name__)[:500]


def check_not_moved(cfg: TrackingConfig, root: Path, experiment: str) -> None:
    """`Tracker.check_moved` where a local store exists already, creating nothing where none does (a
    refusal before anything runs leaves no store behind), and for a tracking server, whose refusal of
    the credentials it says too."""
    store = local_store(cfg.uri, root)
    if (store is not None and store.is_file()) or cfg.uri.startswith(("http://", "https://")):
        Tracker(cfg, root).check_moved(experiment)


class Tracker:
    def __init__(self, cfg: TrackingConfig, root: Path):
        self.uri = resolve_uri(cfg.uri, root)
        self.experiment = cfg.experiment
        self.root = Path(root)
        # Which checkout a run belongs to (this machine, this folder), so one never ends another's.
        self.project = f"{socket.gethostname()}:{self.root.resolve()}"
        self._client = None

    @property
    def client(self):
        if self._client is None:
            check_reachable(self.uri)
            self._client = _client(self.uri)
        return self._client

    @property
    def artifacts(self) -> str | None:
        """Where a local SQLite store's runs keep their files: beside it (mlruns/mlflow-artifacts/<run id>/
        artifacts); MLflow's default, ./mlruns, is under whatever folder the command ran from."""
        store = local_store(self.uri, self.root)
        return str(store.with_name(f"{store.stem}-artifacts")) if store else None

    def experiment_named(self, name: str):
        """The experiment `name`, None if the store has none by that name: the first request of every use
        of the store, so a server refusing the credentials is said here, in one line."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_experiment_by_name(name)
        except MlflowException as err:
            if err.error_code not in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
                raise
            given = "MLFLOW_TRACKING_USERNAME" in os.environ or "MLFLOW_TRACKING_TOKEN" in os.environ
            raise ConfigError(f"tracking.uri: {redact(self.uri)} refused the request ({err.error_code}, HTTP "
                              f"{err.get_http_status_code()}) with {'the' if given else 'no'} credentials of "
                              "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD; set them to a user of the server "
                              f"with access to experiment {name!r}") from None

    def check_moved(self, name: str):
        """The experiment `name` (None if the store has none by that name), refused in one line where
        this code made it in a local store that has since moved: the store records its runs' folder as an
        absolute path, so they would write their files where the project was, and the UI read them from
        there. (One made otherwise, by the UI say, keeps MLflow's own place, and is left alone.)"""
        found = self.experiment_named(name)
        artifacts = self.artifacts
        location = found.artifact_location.removeprefix("file://") if found else None
        if artifacts and location and location != artifacts and Path(location).name == Path(artifacts).name:
            store = local_store(self.uri, self.root)
            raise ConfigError(f"tracking.uri: {store} was made in another folder: experiment {name!r} keeps its runs' "
                              f"files in {found.artifact_location}, not beside the store; move the project back, or "
                              f"move {store.parent} aside to start a new store (the report stage reads results/, "
                              "not the store)")
        return found

    def experiment_id(self, name: str | None = None) -> str:
        """The experiment's id, created with its kind (EXPERIMENT_KIND) if new; one made before the
        kind was recorded gets it, one given another kind (in MLflow's UI) keeps that."""
        name = name or self.experiment
        key, kind = EXPERIMENT_KIND
        found = self.check_moved(name)
        if found is None:
            return self.client.create_experiment(name, artifact_location=self.artifacts, tags={key: kind})
        if key not in found.tags:
            self.client.set_experiment_tag(found.experiment_id, key, kind)
        return found.experiment_id

    def start(self, name: str, params: dict | None = None, tags: dict | None = None,
              parent: str | None = None, experiment: str | None = None, compared: Iterable[str] = COMPARED) -> Run:
        """A new run. `params` is the run's whole config (nested): its `compared` keys become the
        run's params, all of it the CONFIG artifact (`Run.log_config`)."""
        all_tags = {**git_tags(), "project": self.project, "mlflow.runName": name, **(tags or {})}
        if parent:
            all_tags["mlflow.parentRunId"] = parent
        created = self.client.create_run(self.experiment_id(experiment), run_name=name,
                                         tags={k: str(v) for k, v in all_tags.items()})
        run = Run(self.client, created.info.run_id)
        if params:
            run.log_config(params, compared)
        return run

    def resume(self, run_id: str) -> Run:
        self.client.update_run(run_id, status="RUNNING")
        return Run(self.client, run_id)

    def run(self, run_id: str) -> Run:
        """A handle on an existing run that leaves its status alone (tags, metrics, finish)."""
        return Run(self.client, run_id)

    def runs(self, run_ids: Iterable[str]) -> list[dict]:
        """Params, metrics and tags of the given runs, as plain dicts."""
        return [_run_dict(self.client.get_run(run_id)) for run_id in run_ids]

    def find_runs(self, experiment: str | None = None, tags: dict | None = None,
                  parent: str | None = None) -> list[dict]:
        """Runs of an experiment whose tags have these values (and this parent run), newest first."""
        found = self.experiment_named(experiment or self.experiment)
        if found is None:
            return []
        wanted = dict(tags or {})
        if parent:
            wanted["mlflow.parentRunId"] = parent
        quote = lambda v: str(v).replace("\\", "\\\\").replace("'", "\\'")
        query = " and ".join(f"tags.`{k}` = '{quote(v)}'" for k, v in wanted.items())
        out, token = [], None
        while True:
            page = self.client.search_runs([found.experiment_id], query, max_results=1000,
                                           order_by=["attributes.start_time DESC"], page_token=token)
            out += [_run_dict(run) for run in page]
            token = page.token
            if not token:
                return out

    def end_abandoned(self, tags: dict, reason: str, experiment: str | None = None, parent: str | None = None,
                      keep: set[str] = frozenset()) -> None:
        """End as KILLED, with `reason`, the RUNNING runs with these tags (and parent) but those in
        `keep`: what a killed process left, found by whoever takes its place (DVC runs one stage of a
        project at a time; a sweep launch has one driver). Only this checkout's runs count."""
        for found in self.find_runs(experiment, tags={**tags, "project": self.project}, parent=parent):
            if found["status"] == "RUNNING" and found["run_id"] not in keep:
                self.run(found["run_id"]).set_tags({"status": "interrupted", "failure": reason})
                self.run(found["run_id"]).finish("KILLED")

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in self.client.get_metric_history(run_id, key)]

    def experiment_names(self, prefix: str = "") -> list[str]:
        """The names of the store's experiments that start with `prefix`, sorted (e.g. a project's sweeps)."""
        names, token = [], None
        while True:
            page = self.client.search_experiments(max_results=1000, page_token=token)
            names += [found.name for found in page if found.name.startswith(prefix)]
            token = page.token
            if not token:
                return sorted(names)

    def artifact_text(self, run_id: str, name: str) -> str | None:
        """A run's text artifact at the top of its artifacts (e.g. a sweep launch's summary.json); None when
        the run has none by that name."""
        import tempfile

        if name not in {found.path for found in self.client.list_artifacts(run_id)}:
            return None
        with tempfile.TemporaryDirectory() as folder:
            return Path(self.client.download_artifacts(run_id, name, folder)).read_text(encoding="utf-8")


def _run_dict(run) -> dict:
    return {"run_id": run.info.run_id, "name": run.info.run_name, "status": run.info.status,
            "start_time": run.info.start_time, "end_time": run.info.end_time,
            "params": dict(run.data.params), "metrics": dict(run.data.metrics), "tags": dict(run.data.tags)}
