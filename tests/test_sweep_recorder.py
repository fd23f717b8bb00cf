"""What the run recorder and the Optuna search decide at a trial's end, on Ray Tune's own trial objects
(stubs: no trainable runs), a real MLflow store and Optuna's own study; no Ray cluster."""
from __future__ import annotations

import math
import pickle
import shutil
from pathlib import Path

import optuna
import pytest
from ray.tune.experiment import Trial

from pipeline.config import read_yaml
from pipeline.sweep import spec
from pipeline.sweep.recorder import RunRecorder, label, recorded_params
from pipeline.sweep.search import optuna_search
from pipeline.tracking import git_tags, resolve_uri

REPO = Path(__file__).resolve().parents[1]


def load(tmp_path: Path, text: str) -> spec.Sweep:
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return spec.load(path, read_yaml(tmp_path / "params.yaml"))


def trial(status: str = Trial.PENDING, tag: str = "1", config: dict | None = None) -> Trial:
    made = Trial("run_trial", config=config or {}, stub=True, experiment_tag=tag)
    made.set_status(status)
    return made


def recorder(tmp_path: Path) -> RunRecorder:
    sweep = load(tmp_path, "name: s\nspace: {train.lr: [0.1, 0.2]}\n")
    made = RunRecorder(sweep, tmp_path, resolve_uri("sqlite:///mlruns/mlflow.db", tmp_path), "sds-clip/s")
    made.open_launch(str(tmp_path / "ray_results" / "s-launch"))
    return made


def test_a_trial_is_labelled_by_its_index_in_the_list_or_the_searchers_count():
    assert label(trial(config={"trial": {"index": 4, "values": {}}})) == "t004"
    # Optuna's trials: the searcher's count leads Ray's experiment tag, 1 for the first.
    assert [label(trial(tag=f"{n}_train.lr=0.001")) for n in (1, 2, 12)] == ["t000", "t001", "t011"]


def test_a_run_ended_with_trials_ray_never_ended_is_an_interrupted_launch(tmp_path):
    """Ray's first Ctrl-C ends the run as if it were done: with no trial running at that moment, the
    trials it never started tell an interrupted launch (exit 130, --resume) from failed trials."""
    rec = recorder(tmp_path)                                # a sweep of two trials
    rec.on_experiment_end(trials=[trial(Trial.TERMINATED), trial(Trial.ERROR)])
    assert not rec.interrupted
    rec.on_experiment_end(trials=[trial(Trial.TERMINATED), trial(Trial.PENDING)])
    assert rec.interrupted
    rec.on_experiment_end(trials=[trial(Trial.TERMINATED)])    # Optuna had not drawn the second yet
    assert rec.interrupted


def test_a_launch_interrupted_before_its_trials_ran_exits_130_and_is_not_ended(tmp_path, capsys):
    """Its summary says interrupted (continue with --resume), not "trials never ran" and exit 1."""
    from pipeline.sweep.driver import EXIT_INTERRUPTED, finish

    rec = recorder(tmp_path)
    rec.on_experiment_end(trials=[trial(Trial.PENDING), trial(Trial.PENDING)])
    assert finish(rec.sweep, rec, [], 0.0, {}, None) == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "never ran" not in err and "interrupted: 2 trials unfinished; continue with --resume" in err
    (parent,) = rec.tracker.runs([rec.parent])
    assert parent["tags"]["status"] == "interrupted"


def test_a_resumed_launch_records_the_commit_of_the_code_resuming_it(tmp_path):
    """Every run is tagged with the git state of the code that opens it (`Tracker.start`): a resumed launch's
    new runs with the code resuming it, also where an older recorder, which kept a commit of its own, is
    restored."""
    rec = recorder(tmp_path)
    now = git_tags()
    (parent,) = rec.tracker.runs([rec.parent])
    assert set(now) == {"git_commit", "git_dirty"} and {k: parent["tags"][k] for k in now} == now
    rec.commit = "the commit that started the launch"        # what an older recorder pickled
    restored = pickle.loads(pickle.dumps(rec))             # as Tuner.restore brings the callback back
    restored.setup()
    opened = restored.open(trial(config={"trial": {"index": 0, "values": {"train.lr": 0.1}}}))
    (run,) = restored.tracker.runs([opened["run_id"]])
    assert {k: run["tags"][k] for k in now} == now


def optuna_trials(tmp_path: Path, seeds: str, completions: list[tuple[dict | None, bool]]) -> list:
    """Optuna's study after the trials of one config (one per seed) ended with these (result, error)."""
    sweep = load(tmp_path, f"name: s\n{seeds}search: {{type: optuna, num_samples: 1}}\n"
                           "space: {train.lr: {loguniform: [1e-5, 1e-2]}}\n")
    search = optuna_search(sweep)
    search.set_search_properties(None, None, {d.key: d.domain() for d in sweep.space.values()})
    ids = [f"trial-{i}" for i in range(len(completions))]
    assert [search.suggest(i)["__trial_index__"] for i in ids] == list(range(len(ids)))
    for trial_id, (result, error) in zip(ids, completions):
        search.on_trial_complete(trial_id, result=result, error=error)
    return search.searcher._ot_study.trials        # Ray keeps Optuna's study to itself


@pytest.mark.parametrize("seeds, completions, state, value", [
    ("", [({"winoground/text": 0.5}, False)], "COMPLETE", 0.5),
    ("", [({"loss/clip": 1.0}, False)], "PRUNED", None),                         # ASHA stopped it
    ("", [(None, True)], "FAIL", None),
    ("seeds: [0, 1]\n", [({"winoground/text": 0.5}, False), (None, True)], "COMPLETE", 0.5),
    ("seeds: [0, 1]\n", [({"loss/clip": 1.0}, False), (None, True)], "FAIL", None),
])
def test_optuna_is_told_each_config_as_it_ended(tmp_path, seeds, completions, state, value):
    """A config none of whose seeds reached the metric is pruned or failed in Optuna's study, never
    left running there (Ray's Repeater tells Optuna a NaN mean, which Optuna refuses)."""
    [found] = optuna_trials(tmp_path, seeds, completions)
    assert found.state == getattr(optuna.trial.TrialState, state)
    assert found.value == value or (value is not None and math.isclose(found.value, value))


def test_a_trials_record_keeps_no_user_of_the_tracking_uri(tmp_path):
    """The record reaches the results file and Ray Tune's saved callback state, which travel with the study."""
    rec = recorder(tmp_path)
    rec.sweep.params["tracking"]["uri"] = "http://analyst@mlflow.example:5000"     # the trials' config's
    record = rec.open(trial(config={"trial": {"index": 0, "values": {"train.lr": 0.1}}}))
    assert record["params"]["tracking.uri"] == "http://***@mlflow.example:5000" and record["params"]["train.lr"] == 0.1
    assert "analyst" not in pickle.dumps(rec.get_state()).decode("latin-1")
    assert recorded_params({"a": {"b": "sqlite:///x.db", "c": 1}}) == {"a.b": "sqlite:///x.db", "a.c": 1}
