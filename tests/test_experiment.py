"""The runs the stages log (pipeline.experiment), on the smoke profile with a real MLflow store.

A run whose evaluation fails ends FAILED with the error in its `failure` tag, and a fine-tuning
run keeps its resume point until its evaluation is logged, so a re-run does not train from step 0.
"""
from __future__ import annotations

import logging
import math
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import UnidentifiedImageError

from pipeline.cache import CacheError
from pipeline.config import TrackingConfig, load
from pipeline.data.build import build_toy
from pipeline.data.errors import MissingInput
from pipeline.digest import fingerprint
from pipeline.experiment import record_finetune, run_baselines
from pipeline.latents import build_cache
from pipeline.models import student_dir, teacher_dir
from pipeline.models.student import build_toy_student, save_student
from pipeline.models.teacher import build_toy_teacher, load_teacher, save_teacher
from pipeline.tracking import Tracker
from pipeline.train import CHECKPOINT, TRAINED

from stale_cache import replace_the_teacher

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
EXPERIMENT = "experiment-tests"


@pytest.fixture
def project(tmp_path):
    cfg = load(PARAMS, {"profile": "smoke", "train": {"steps": 4, "checkpoint_every": 2},
                        "objective": {"method": "clip", "lambda_sds": 0}})
    data, models = tmp_path / "data", tmp_path / "models"
    build_toy(cfg.data, data)
    save_student(build_toy_student(cfg.students["toy-vit"], cfg.data.image_size), student_dir(models, "toy-vit"))
    tracker = Tracker(TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment=EXPERIMENT), tmp_path)
    return cfg, data, models, tracker, tmp_path


@pytest.fixture
def with_teacher(project):
    """The project with the smoke teacher in models/ and its cache tables: what the baselines read."""
    cfg, data, models, tracker, root = project
    save_teacher(build_toy_teacher(cfg.teacher, cfg.data.image_size), teacher_dir(models))
    build_cache(cfg, load_teacher(teacher_dir(models)), fingerprint(teacher_dir(models)), data, root / "cache")
    return project


def break_a_benchmark_image(data: Path) -> tuple[Path, bytes]:
    """Overwrite one Winoground image with bytes no decoder reads (found when it is scored)."""
    image = sorted(p for p in (data / "winoground").rglob("*") if p.suffix in (".png", ".jpg"))[0]
    blob = image.read_bytes()
    image.write_bytes(b"not an image")
    return image, blob


def test_a_failed_evaluation_keeps_the_resume_point_and_the_rerun_finishes_from_it(project, caplog):
    cfg, data, models, tracker, root = project
    folder = root / "runs" / "clip"
    image, blob = break_a_benchmark_image(data)
    with pytest.raises(UnidentifiedImageError):
        record_finetune(cfg, data, models, root / "cache", folder, tracker, "clip", progress=False)
    [failed] = tracker.find_runs(EXPERIMENT)
    assert failed["status"] == "FAILED"
    assert failed["tags"]["failure"].startswith("UnidentifiedImageError") and image.name in failed["tags"]["failure"]
    assert (folder / TRAINED).is_file() and (folder / CHECKPOINT).is_file()

    image.write_bytes(blob)
    with caplog.at_level(logging.INFO, logger="pipeline.train"):
        result = record_finetune(cfg, data, models, root / "cache", folder, tracker, "clip", progress=False)
    assert f"resumed {folder} at step 2" in caplog.text
    finished = tracker.runs([result["run_id"]])[0]
    assert finished["status"] == "FINISHED" and "winoground/text" in finished["metrics"]
    assert (folder / CHECKPOINT).exists()      # until the caller has written its results (stages/train.py)
    # Resumed at the step-2 checkpoint, the new run still holds the whole curve, each step once.
    history = tracker.metric_history(result["run_id"], "loss/total")
    assert [step for step, _ in history] == [1, 2, 3, 4]
    assert history[:2] == tracker.metric_history(failed["run_id"], "loss/total")[:2]


def test_a_failed_baseline_ends_its_run_failed(with_teacher):
    cfg, data, models, tracker, root = with_teacher
    image, _ = break_a_benchmark_image(data)
    with pytest.raises(UnidentifiedImageError):
        run_baselines(cfg, root, data, models, root / "cache", tracker)
    [failed] = tracker.find_runs(EXPERIMENT)
    assert failed["name"] == "pretrained toy-vit" and failed["status"] == "FAILED"
    assert image.name in failed["tags"]["failure"]


@pytest.mark.parametrize("missing", ["cache", "teacher"])
def test_the_baselines_check_the_teacher_and_its_cache_before_recording_any_run(with_teacher, missing):
    """A missing cache or teacher was found after every student's run had been recorded FINISHED
    (eight full evaluations on the paper profile, again at every retry): now before the first."""
    cfg, data, models, tracker, root = with_teacher
    shutil.rmtree(root / "cache" if missing == "cache" else teacher_dir(models))
    with pytest.raises(CacheError if missing == "cache" else MissingInput):
        run_baselines(cfg, root, data, models, root / "cache", tracker)
    assert tracker.find_runs(EXPERIMENT) == []


def test_the_baselines_refuse_a_cache_other_teacher_weights_encoded_before_recording_any_run(with_teacher):
    cfg, data, models, tracker, root = with_teacher
    old, new = replace_the_teacher(cfg.teacher, cfg.data.image_size, models)
    assert old != new
    with pytest.raises(CacheError, match=rf"^cache table 'bench_images': {re.escape(str(root))}/cache/bench_images: "
                                         rf"encoded by teacher {old}, but {re.escape(str(teacher_dir(models)))} "
                                         rf"holds teacher {new}; re-run the cache stage \(dvc repro cache, or "
                                         r"python -m stages.cache\)$"):
        run_baselines(cfg, root, data, models, root / "cache", tracker)
    assert tracker.find_runs(EXPERIMENT) == []
    # The cache stage encodes the tables again with the teacher models/ holds: the baselines then run.
    build_cache(cfg, load_teacher(teacher_dir(models)), new, data, root / "cache")
    run_baselines(cfg, root, data, models, root / "cache", tracker)
    assert {run["status"] for run in tracker.find_runs(EXPERIMENT)} == {"FINISHED"}


def test_a_teacher_loss_refuses_a_cache_other_teacher_weights_encoded_before_it_trains(with_teacher):
    cfg, data, models, tracker, root = with_teacher
    sds = load(PARAMS, {"profile": "smoke", "train": {"steps": 4, "checkpoint_every": 2},
                        "objective": {"method": "sds", "lambda_sds": 0.1}})
    old, new = replace_the_teacher(cfg.teacher, cfg.data.image_size, models)
    folder = root / "runs" / "sds"
    with pytest.raises(CacheError, match=rf"^cache table 'train_text': .*: encoded by teacher {old}, but "
                                         rf".* holds teacher {new}; "):
        record_finetune(sds, data, models, root / "cache", folder, tracker, "sds", progress=False)
    assert tracker.find_runs(EXPERIMENT) == []          # refused before the stage's run was opened
    assert not (folder / CHECKPOINT).exists() and not (folder / TRAINED).exists()
    # L_CLIP alone reads no table: the same cache does not stop it.
    record_finetune(cfg, data, models, root / "cache", root / "runs" / "clip", tracker, "clip", progress=False)


def test_non_finite_metrics_are_left_out_and_named_in_a_warning(tmp_path, caplog):
    tracker = Tracker(TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment=EXPERIMENT), tmp_path)
    with tracker.start("metrics") as run, caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
        run.log_metrics({"a": 1.0, "b": math.nan, "c": math.inf})
    assert "not logging non-finite b, c" in caplog.text
    assert tracker.runs([run.run_id])[0]["metrics"] == {"a": 1.0}


def test_a_stage_run_left_running_by_a_kill_is_ended_by_the_next_run_of_that_stage(project):
    """A killed stage cannot end its own run; the next run of the same stage row does, with the reason."""
    cfg, data, models, tracker, root = project
    left = tracker.start("FT with L_CLIP", tags={"stage": "train", "row": "ft_clip"})
    other = tracker.start("FT with the configured objective", tags={"stage": "train", "row": "ft_sds"})
    result = record_finetune(cfg, data, models, root / "cache", root / "runs" / "clip", tracker, "FT with L_CLIP",
                             tags={"row": "ft_clip"}, progress=False)
    ended, untouched, new = tracker.runs([left.run_id, other.run_id, result["run_id"]])
    assert ended["status"] == "KILLED" and ended["tags"]["status"] == "interrupted"
    assert ended["tags"]["failure"] == "killed; continued by a later 'FT with L_CLIP' run"
    assert untouched["status"] == "RUNNING" and new["status"] == "FINISHED"


def test_a_checkpoint_of_other_settings_is_refused_before_a_run_is_opened(project):
    """The trial's setup and its checkpoint are checked before the stage's run opens: a refusal left a
    FAILED run behind, and ended the run a kill had left, which the refused stage never continued."""
    import dataclasses

    from pipeline.train import StaleCheckpoint

    cfg, data, models, tracker, root = project
    folder = root / "runs" / "clip"
    record_finetune(cfg, data, models, root / "cache", root / "runs" / "done", tracker, "FT with L_CLIP",
                    progress=False)
    (root / "runs" / "done" / CHECKPOINT).rename(folder.mkdir(parents=True) or folder / CHECKPOINT)
    left = tracker.start("FT with L_CLIP", tags={"stage": "train", "row": "ft_clip"})     # as a kill leaves it
    other = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=cfg.train.lr / 2))
    runs = tracker.find_runs(EXPERIMENT)
    with pytest.raises(StaleCheckpoint):
        record_finetune(other, data, models, root / "cache", folder, tracker, "FT with L_CLIP",
                        tags={"row": "ft_clip"}, progress=False)
    assert tracker.find_runs(EXPERIMENT) == runs and tracker.runs([left.run_id])[0]["status"] == "RUNNING"


def test_a_batch_larger_than_the_training_pairs_is_refused_before_a_run_is_opened(project):
    import dataclasses

    from pipeline.config import ConfigError

    cfg, data, models, tracker, root = project
    big = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=100_000))
    with pytest.raises(ConfigError, match=r"^train\.batch_size: 100000 is more than the 96 training pairs of .*; "
                                          r"allowed: <= 96$"):
        record_finetune(big, data, models, root / "cache", root / "runs" / "big", tracker, "big", progress=False)
    assert tracker.find_runs(EXPERIMENT) == [] and not (root / "runs" / "big").exists()


def test_a_checkpoints_inputs_name_no_checkout_path(tmp_path):
    """Two checkouts of one project (or one moved) train from the same pairs: a trial resumes in either."""
    from pipeline.data.datasets import read_index, train_pairs
    from pipeline.experiment import trial_inputs

    cfg = load(PARAMS, {"profile": "smoke"})
    student = tmp_path / "student"
    save_student(build_toy_student(cfg.students["toy-vit"], cfg.data.image_size), student)
    inputs = []
    for checkout in ("a", "b"):
        build_toy(cfg.data, tmp_path / checkout / "data")
        inputs.append(trial_inputs(train_pairs(tmp_path / checkout / "data", read_index(tmp_path / checkout / "data")),
                                   student))
    assert inputs[0] == inputs[1] and inputs[0]["conditioning"] is None and inputs[0]["latents"] is None
    other = tmp_path / "c" / "data"
    build_toy(load(PARAMS, {"profile": "smoke", "data": {"seed": 1}}).data, other)
    pairs = train_pairs(other, read_index(other))
    assert trial_inputs(pairs, student)["pairs"] != inputs[0]["pairs"]
    # Tables the cache stage rebuilt under the same teacher (other encoding code, another device) are other inputs.
    table = lambda **meta: SimpleNamespace(meta={"teacher": "t", "device": "cpu", "encoding": 1, **meta})  # noqa: E731
    assert trial_inputs(pairs, student, table()) != trial_inputs(pairs, student, table(encoding=2))
    assert trial_inputs(pairs, student, table(), table(images="a")) != trial_inputs(pairs, student, table(),
                                                                                    table(images="b"))
