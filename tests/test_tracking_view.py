"""How the project's runs show in MLflow's UI, on a real store: experiments of the "Model training"
kind, runs whose params are the keys a comparison reads, and the whole config beside them."""
from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from pipeline.config import TrackingConfig, flatten, from_dict, load, to_dict
from pipeline.data.build import build_toy
from pipeline.digest import fingerprint
from pipeline.experiment import run_baselines
from pipeline.latents import build_cache
from pipeline.models import student_dir, teacher_dir
from pipeline.models.student import build_toy_student, save_student
from pipeline.models.teacher import build_toy_teacher, load_teacher, save_teacher
from pipeline.tracking import COMPARED, CONFIG, EXPERIMENT_KIND, Tracker

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


@pytest.fixture
def tracker(tmp_path, monkeypatch) -> Tracker:
    monkeypatch.chdir(tmp_path)                         # the store keeps artifacts under the working folder
    return Tracker(TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="sds-clip"), tmp_path)


def kind_of(tracker: Tracker, name: str) -> str | None:
    return tracker.client.get_experiment_by_name(name).tags.get(EXPERIMENT_KIND[0])


def test_experiments_are_of_the_model_training_kind_unless_given_another(tracker):
    key, kind = EXPERIMENT_KIND
    tracker.start("run").finish()                                   # creates the project's experiment
    assert kind_of(tracker, "sds-clip") == kind
    before = tracker.client.create_experiment("sds-clip/methods")   # one made before the kind was recorded
    assert kind_of(tracker, "sds-clip/methods") is None
    assert tracker.experiment_id("sds-clip/methods") == before and kind_of(tracker, "sds-clip/methods") == kind
    chosen = tracker.client.create_experiment("sds-clip/chat", tags={key: "genai_development"})
    assert tracker.experiment_id("sds-clip/chat") == chosen and kind_of(tracker, "sds-clip/chat") == "genai_development"


def test_the_installed_mlflow_ui_knows_the_kind_and_the_url_that_opens_model_training():
    """The tag and value are MLflow's own (its UI's ExperimentKind), and the README's URL parameter
    `workflowType=machine_learning` is what the UI's view follows: a newer MLflow that renamed
    either fails here, not in a browser."""
    key, kind = EXPERIMENT_KIND
    bundle = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"
    (main,) = bundle.glob("main.*.js")
    ui = main.read_text()
    assert f'"{key}"' in ui and f'CUSTOM_MODEL_DEVELOPMENT="{kind}"' in ui
    assert 'MACHINE_LEARNING="machine_learning"' in ui and '.get("workflowType")' in ui


def test_a_run_has_the_compared_keys_as_params_and_its_whole_config_as_an_artifact(tracker):
    cfg = load(PARAMS)
    flat = flatten(to_dict(cfg))
    with tracker.start("FT with L_CLIP + lambda L_SDS", params=to_dict(cfg)) as run:
        pass
    (found,) = tracker.runs([run.run_id])
    # What a comparison reads: method, lambda, learning rate, scope, seed, student, and the profile and
    # step budget that set every other value.
    shown = ["objective.method", "objective.lambda_sds", "train.lr", "train.scope", "train.seed", "train.student",
             "profile", "train.steps"]
    assert found["params"] == {key: str(flat[key]) for key in shown} and len(flat) > 10 * len(shown)
    artifacts = tracker.client.get_run(run.run_id).info.artifact_uri
    assert from_dict(mlflow.artifacts.load_dict(f"{artifacts}/{CONFIG}")) == cfg


def test_a_sweep_trial_adds_what_it_varies_and_a_key_the_config_lacks_is_left_out(tracker):
    cfg = to_dict(load(PARAMS, {"objective": {"latent_scale": 0.5}}))
    trial = tracker.start("trial", params=cfg, compared=[*COMPARED, "objective.latent_scale", "train.lr"])
    parent = tracker.start("launch", params={"sweep": {"name": "grid4"}})     # none of COMPARED
    (trial_run, parent_run) = tracker.runs([trial.run_id, parent.run_id])
    assert set(trial_run["params"]) == {*COMPARED, "objective.latent_scale"}
    assert trial_run["params"]["objective.latent_scale"] == "0.5"
    assert parent_run["params"] == {}
    artifacts = tracker.client.get_run(parent.run_id).info.artifact_uri
    assert json.loads(mlflow.artifacts.load_text(f"{artifacts}/{CONFIG}")) == {"sweep": {"name": "grid4"}}


def test_the_baseline_runs_carry_no_fine_tuning_keys(tracker, tmp_path):
    """A pretrained student and the diffusion score train nothing: the config's method, lambda or
    student would describe another run in a comparison. The diffusion score's sample count sets it."""
    cfg = load(PARAMS, {"profile": "smoke"})
    data, models = tmp_path / "data", tmp_path / "models"
    build_toy(cfg.data, data)
    save_student(build_toy_student(cfg.students["toy-vit"], cfg.data.image_size), student_dir(models, "toy-vit"))
    save_teacher(build_toy_teacher(cfg.teacher, cfg.data.image_size), teacher_dir(models))
    build_cache(cfg, load_teacher(teacher_dir(models)), fingerprint(teacher_dir(models)), data, tmp_path / "cache")
    run_baselines(cfg, tmp_path, data, models, tmp_path / "cache", tracker)
    runs = {run["name"]: run for run in tracker.find_runs()}
    assert runs["pretrained toy-vit"]["status"] == "FINISHED" and runs["pretrained toy-vit"]["params"] == {
        "profile": "smoke"}
    assert runs[f"diffusion score {cfg.teacher.name}"]["params"] == {
        "profile": "smoke", "teacher.name": cfg.teacher.name, "eval.diffusion_samples": str(cfg.eval.diffusion_samples)}
