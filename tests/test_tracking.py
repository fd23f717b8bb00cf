"""What reaches MLflow: a credential in a URI never does (params, text artifacts), on a real store."""
from __future__ import annotations

import pytest

from pipeline.config import ConfigError, TrackingConfig
from pipeline.tracking import CONFIG, Tracker, check_store, check_uri, redact, resolve_uri

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
