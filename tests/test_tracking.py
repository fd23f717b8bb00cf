"""What reaches MLflow: a credential in a URI never does (params, text artifacts), on a real store."""
from __future__ import annotations

import pytest

from pipeline.config import ConfigError, TrackingConfig
from pipeline.tracking import Tracker, check_uri, redact

SECRET = "s3cr3t-pa55"


@pytest.mark.parametrize("text, shown", [
    (f"http://alice:{SECRET}@mlflow.example:5000", "http://***@mlflow.example:5000"),
    (f"https://{SECRET}@host/path and s3://key:{SECRET}@bucket/x", "https://***@host/path and s3://***@bucket/x"),
    ("sqlite:///mlruns/mlflow.db", "sqlite:///mlruns/mlflow.db"),
    ("file:///data/a@b.txt", "file:///data/a@b.txt"),                  # an @ in a path is no credential
])
def test_redact_hides_the_user_and_password_of_every_uri(text, shown):
    assert redact(text) == shown


def test_a_credential_in_the_config_reaches_neither_params_nor_artifacts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                         # the store keeps artifacts under the working folder
    tracker = Tracker(TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="secrets"), tmp_path)
    uri = f"http://alice:{SECRET}@mlflow.example:5000"
    with tracker.start("run", params={"tracking": {"uri": uri}, "train": {"lr": 0.1}}) as run:
        run.log_text(f"tracking_uri: {uri}\n", "summary.txt")
    [found] = tracker.find_runs()
    assert found["params"]["tracking.uri"] == "http://***@mlflow.example:5000"
    import mlflow

    stored = mlflow.artifacts.load_text(f"{tracker.client.get_run(found['run_id']).info.artifact_uri}/summary.txt")
    assert stored == "tracking_uri: http://***@mlflow.example:5000\n"
    assert SECRET.encode() not in (tmp_path / "mlflow.db").read_bytes()


@pytest.mark.parametrize("uri", ["foo://bar", "", "s3://bucket/path"])
def test_a_tracking_uri_mlflow_cannot_open_is_one_line(uri):
    with pytest.raises(ConfigError, match=r"^tracking\.uri: .* is not allowed; expected sqlite:///PATH"):
        check_uri(uri)
