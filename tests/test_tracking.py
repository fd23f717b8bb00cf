"""What reaches MLflow: a credential in a URI never does (params, text artifacts), on a real store."""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from pipeline.config import ConfigError, TrackingConfig
from pipeline.tracking import (CONFIG, Tracker, check_not_moved, check_reachable, check_store, check_uri, git_tags,
                               redact, resolve_uri)

from test_sweep import free_port

SECRET = "s3cr3t-pa55"


@pytest.mark.parametrize("text, shown", [
    (f"http://alice:{SECRET}@mlflow.example:5000", "http://***@mlflow.example:5000"),
    (f"https://{SECRET}@host/path and s3://key:{SECRET}@bucket/x", "https://***@host/path and s3://***@bucket/x"),
    ("sqlite:///mlruns/mlflow.db", "sqlite:///mlruns/mlflow.db"),
    ("file:///data/a@b.txt", "file:///data/a@b.txt"),                  # an @ in a path is no credential
])
def test_redact_hides_the_user_and_password_of_every_uri(text, shown):
    assert redact(text) == shown


def test_a_local_stores_runs_keep_their_files_beside_it_wherever_the_command_runs(tmp_path, monkeypatch):
    """MLflow's default put them in ./mlruns of the working folder: a stage run from elsewhere with
    --params (or a test run from the checkout) wrote its runs' files into another project."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    project = tmp_path / "project"
    tracker = Tracker(TrackingConfig(uri="sqlite:///mlruns/mlflow.db", experiment="where"), project)
    with tracker.start("run") as run:
        run.log_text("kept\n", "summary.txt")
    assert (project / "mlruns" / "mlflow-artifacts" / run.run_id / "artifacts" / "summary.txt").read_text() == "kept\n"
    assert list(elsewhere.iterdir()) == []


def test_a_credential_in_the_config_reaches_neither_params_nor_artifacts(tmp_path):
    tracker = Tracker(TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="secrets"), tmp_path)
    uri = f"http://alice:{SECRET}@mlflow.example:5000"
    with tracker.start("run", params={"tracking": {"uri": uri}, "train": {"lr": 0.1}},
                       compared=("tracking.uri", "train.lr")) as run:
        run.log_text(f"tracking_uri: {uri}\n", "summary.txt")
    [found] = tracker.find_runs()
    assert found["params"]["tracking.uri"] == "http://***@mlflow.example:5000"
    import mlflow

    artifacts = tracker.client.get_run(found["run_id"]).info.artifact_uri
    assert mlflow.artifacts.load_text(f"{artifacts}/summary.txt") == "tracking_uri: http://***@mlflow.example:5000\n"
    assert mlflow.artifacts.load_dict(f"{artifacts}/{CONFIG}")["tracking"]["uri"] == "http://***@mlflow.example:5000"
    stored = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert len(stored) >= 3 and not [path for path in stored if SECRET.encode() in path.read_bytes()]


@pytest.mark.parametrize("uri", ["foo://bar", "", "s3://bucket/path"])
def test_a_tracking_uri_mlflow_cannot_open_is_one_line(uri):
    with pytest.raises(ConfigError, match=r"^tracking\.uri: .* is not allowed; expected sqlite:///PATH"):
        check_uri(uri)


@pytest.mark.parametrize("uri", ["mlruns", "/abs/mlruns", "file:///abs/mlruns"])
def test_a_folder_for_a_store_is_refused_in_one_line_as_the_pinned_mlflow_refuses_it(uri, tmp_path):
    """MLflow 3's client refuses a file store (a traceback at the first run); the check says so first."""
    with pytest.raises(ConfigError, match=r"^tracking\.uri: .* is not allowed; a folder \(a file store\) MLflow 3 "
                                          r"no longer opens; expected sqlite:///PATH"):
        check_uri(uri)
    check_uri("databricks")                         # MLflow's own bare URI, not a folder
    import mlflow

    with pytest.raises(mlflow.exceptions.MlflowException, match="filesystem tracking backend"):
        mlflow.MlflowClient(tracking_uri=str(tmp_path / "mlruns")).search_experiments()


def test_a_local_store_that_cannot_be_written_is_one_line_naming_the_key_and_nothing_is_created(tmp_path):
    (tmp_path / "a-file").write_text("")
    for uri in ("sqlite:///a-file/mlflow.db", "sqlite:///a-file/deeper/mlflow.db"):
        with pytest.raises(ConfigError, match=rf"^tracking\.uri: {tmp_path}/a-file is a file, so .* cannot be created$"):
            check_store(uri, tmp_path)
    check_store("sqlite:///new/folder/mlflow.db", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]          # checking creates nothing
    assert resolve_uri("sqlite:///new/folder/mlflow.db", tmp_path) == f"sqlite:///{tmp_path}/new/folder/mlflow.db"
    assert (tmp_path / "new" / "folder").is_dir()
    check_store("http://tracking.example:5000", tmp_path)                    # a server's store is its own


@pytest.mark.parametrize("uri", [f"http://alice:{SECRET}@mlflow.example:5000",
                                 f"postgresql://mlflow:{SECRET}@db.example:5432/mlflow"])
def test_a_password_in_the_tracking_uri_is_refused_in_one_line_without_showing_it(uri):
    with pytest.raises(ConfigError) as info:
        check_uri(uri)
    text = str(info.value)
    assert text.startswith("tracking.uri: ") and "holds a password" in text and "MLFLOW_TRACKING_PASSWORD" in text
    assert SECRET not in text and "\n" not in text
    check_uri("postgresql://mlflow@db.example:5432/mlflow")          # a user name alone is no secret


def test_a_store_moved_with_its_project_is_refused_in_one_line_not_written_where_the_project_was(tmp_path):
    """MLflow records an experiment's artifact folder as an absolute path: runs of a moved project's store
    wrote their files into the old folder (made again if gone), outside the project."""
    old, new = tmp_path / "old", tmp_path / "new"
    cfg = TrackingConfig(uri="sqlite:///mlruns/mlflow.db", experiment="moved")
    with Tracker(cfg, old).start("a run") as run:
        run.log_text("x", "x.txt")
    old.rename(new)
    with pytest.raises(ConfigError) as info:
        Tracker(cfg, new).start("another run")
    assert str(info.value) == (f"tracking.uri: {new}/mlruns/mlflow.db was made in another folder: experiment 'moved' "
                               f"keeps its runs' files in {old}/mlruns/mlflow-artifacts, not beside the store; move "
                               f"the project back, or move {new}/mlruns aside to start a new store (the report stage "
                               "reads results/, not the store)")
    assert not old.exists()


def test_a_run_says_whether_its_code_was_its_commits(tmp_path):
    """`git_dirty` is true where pipeline/ or stages/ differ from the commit `git_commit` names (an edit, a file
    git does not track, whatever git's own setting for showing those), false where only what `dvc repro`
    rewrites (dvc.lock, reports/) changed; every run carries the tags of the checkout its code runs from,
    wherever its project folder is."""
    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                              capture_output=True, text=True).stdout.strip()

    assert git_tags(tmp_path) == {"git_commit": "unknown", "git_dirty": "unknown"}
    for path in ("pipeline/metrics.py", "stages/train.py", "reports/table1.md", "dvc.lock"):
        (tmp_path / path).parent.mkdir(exist_ok=True)
        (tmp_path / path).write_text("a\n")
    git("init", "-q")
    git("config", "status.showUntrackedFiles", "no")
    git("add", ".")
    git("commit", "-q", "-m", "study")
    head = git("rev-parse", "HEAD")
    assert git_tags(tmp_path) == {"git_commit": head, "git_dirty": "false"}
    (tmp_path / "reports" / "table1.md").write_text("b\n")
    (tmp_path / "dvc.lock").write_text("b\n")
    assert git_tags(tmp_path) == {"git_commit": head, "git_dirty": "false"}
    (tmp_path / "pipeline" / "metrics.py").write_text("b\n")
    assert git_tags(tmp_path) == {"git_commit": head, "git_dirty": "true"}
    git("checkout", "--", "pipeline")
    (tmp_path / "stages" / "new.py").write_text("c\n")
    assert git_tags(tmp_path) == {"git_commit": head, "git_dirty": "true"}

    project = tmp_path / "elsewhere"
    tracker = Tracker(TrackingConfig(uri="sqlite:///mlruns/mlflow.db", experiment="git"), project)
    tracker.start("a run").finish()
    [run] = tracker.find_runs()
    code = git_tags()                                   # this checkout's: the code that ran
    assert code["git_dirty"] in ("true", "false")
    assert {key: run["tags"][key] for key in code} == code


def no_proxies(monkeypatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


def test_a_tracking_server_where_nothing_answers_is_refused_in_one_line_at_the_first_request(tmp_path, monkeypatch):
    """MLflow's client retries a server where nothing listens 7 times over about four minutes, then ends in a
    traceback: the first request of a sweep (before Ray) or a stage (ending a killed run's) says it in one
    line. MLflow's retries are cut to none here, so without the check its own error comes at once."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    no_proxies(monkeypatch)
    port = free_port()
    cfg = TrackingConfig(uri=f"http://alice@127.0.0.1:{port}/mlflow", experiment="sds-clip")
    refusal = (f"tracking.uri: nothing answers at http://***@127.0.0.1:{port}/mlflow (Connection refused); start the "
               "tracking server (README, \"MLflow\") or set tracking.uri to one that runs")
    with pytest.raises(ConfigError) as err:
        check_not_moved(cfg, tmp_path, "sds-clip")
    assert str(err.value) == refusal
    with pytest.raises(ConfigError) as err:
        Tracker(cfg, tmp_path).end_abandoned({"stage": "train"}, "killed")
    assert str(err.value) == refusal
    for uri, message in (("http://127.0.0.1:99999", "has no valid port (Port out of range 0-65535)"),
                         ("http://:5000", "names no host; expected http(s)://HOST[:PORT]")):
        with pytest.raises(ConfigError) as err:
            check_reachable(uri)
        assert str(err.value) == f"tracking.uri: {uri!r} {message}"
    assert not (tmp_path / "mlruns").exists()


def test_a_tracking_server_reached_through_a_proxy_is_left_to_mlflow(monkeypatch):
    """Only the proxy reaches such a server: this machine's own connection says nothing of it. A proxy for
    the other scheme is not MLflow's way there."""
    no_proxies(monkeypatch)
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ConfigError, match="nothing answers"):
        check_reachable(uri)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")
    check_reachable(uri)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")                  # not through the proxy: checked
    with pytest.raises(ConfigError, match="nothing answers"):
        check_reachable(uri)


@pytest.mark.slow
def test_a_server_asking_for_a_password_records_the_runs_of_its_user_and_refuses_others_in_one_line(tmp_path,
                                                                                                    monkeypatch):
    """The README's server with a password (`mlflow server --app-name basic-auth`), started here on
    127.0.0.1: a run through it with MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD keeps its
    params, metrics and files; without them, or with a wrong password, the first request is refused in
    one line (before a stage's work or a sweep's Ray), not as MLflow's traceback."""
    port = free_port()
    password = secrets.token_hex(8)                      # the server asks for 12 characters or more
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--backend-store-uri",
         f"sqlite:///{tmp_path / 'mlflow.db'}", "--artifacts-destination", str(tmp_path / "artifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], cwd=tmp_path, stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_AUTH_ADMIN_PASSWORD": password,
             "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)})
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
                time.sleep(0.5)
        cfg = TrackingConfig(uri=f"http://127.0.0.1:{port}", experiment="sds-clip")
        monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
        monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
        refusal = (f"tracking.uri: http://127.0.0.1:{port} refused the request (UNAUTHENTICATED, HTTP 401) with {{}} "
                   "credentials of MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD; set them to a user of the "
                   "server with access to experiment 'sds-clip'")
        with pytest.raises(ConfigError) as err:
            check_not_moved(cfg, tmp_path / "project", "sds-clip")
        assert str(err.value) == refusal.format("no")
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password + "x")
        with pytest.raises(ConfigError) as err:           # a stage's first request: ending a killed run's
            Tracker(cfg, tmp_path / "project").end_abandoned({"stage": "train"}, "killed")
        assert str(err.value) == refusal.format("the")

        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        check_not_moved(cfg, tmp_path / "project", "sds-clip")
        tracker = Tracker(cfg, tmp_path / "project")
        with tracker.start("through the server", params={"train": {"lr": 0.1}}, compared=("train.lr",)) as run:
            run.log_metrics({"loss/clip": 0.5}, 1)
            run.log_text("kept\n", "summary.txt")
        [found] = tracker.find_runs()
        assert found["status"] == "FINISHED" and found["params"] == {"train.lr": "0.1"}
        assert found["metrics"]["loss/clip"] == 0.5
        import mlflow

        artifacts = tracker.client.get_run(found["run_id"]).info.artifact_uri
        assert mlflow.artifacts.load_text(f"{artifacts}/summary.txt") == "kept\n"
        assert mlflow.artifacts.load_dict(f"{artifacts}/{CONFIG}") == {"train": {"lr": 0.1}}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
        log.close()
