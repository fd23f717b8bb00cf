"""Every stage answers `--help` and rejects a bad parameter file before importing torch & co.

A stage imports its heavy modules (seconds of imports) inside its body, so what does not
need them is answered at once. A sweep the sweep stage cannot run still leaves its outputs whole.
"""
import ast
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import cli
from pipeline.cache import CacheError
from pipeline.data.errors import DataFormatError, MissingDataError, MissingInput

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "diffusers", "open_clip", "mlflow", "ray")
STAGES = {"data": [], "models": [], "cache": [], "baselines": [], "train": ["clip"], "report": [], "sweep": []}

PROBE = """
import json, sys
from stages import {stage} as stage
try:
    code = stage.main({argv!r})
except SystemExit as exit:
    code = exit.code
print(json.dumps({{"code": code, "heavy": [m for m in {heavy!r} if m in sys.modules]}}))
"""


def probe(stage: str, argv: list[str]) -> tuple[dict, subprocess.CompletedProcess]:
    proc = subprocess.run([sys.executable, "-c", PROBE.format(stage=stage, argv=argv, heavy=HEAVY)], cwd=REPO,
                          capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_help_is_answered_without_heavy_imports(stage):
    result, proc = probe(stage, ["--help"])
    assert result == {"code": 0, "heavy": []}, proc.stderr
    assert "usage:" in proc.stdout and "--params" in proc.stdout


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_bad_params_file_is_one_line_and_exit_2_without_heavy_imports(stage, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text().replace("  lambda_sds: 0.1", "  lambda_sds: -1", 1))
    result, proc = probe(stage, [*STAGES[stage], "--params", str(params)])
    assert result == {"code": 2, "heavy": []}, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "objective.lambda_sds" in lines[0] and "-1" in lines[0]
    assert not (tmp_path / "results").exists() and not (tmp_path / "data").exists()


@pytest.mark.parametrize("stage", ["models", "cache", "baselines", "train"])
def test_a_cuda_device_this_machine_lacks_is_one_line_before_any_run_or_model(stage, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text().replace("  device: auto", "  device: cuda:0", 1))
    result, proc = probe(stage, [*STAGES[stage], "--params", str(params)])
    assert result == {"code": 2, "heavy": ["torch"]}, proc.stderr    # torch only to ask for the device
    assert proc.stderr.strip().splitlines() == [
        "error: compute.device: 'cuda:0' but no CUDA device is available here; use auto or cpu"], proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]     # no store, no run, no output


BENCHMARKS = sorted(p.name for p in (REPO / "benchmarks").glob("*.py") if not p.name.startswith("_"))


@pytest.mark.parametrize("command", [f"python -m stages.{s}" for s in sorted(STAGES)]
                         + ["python -m pipeline.sweep"] + [f"benchmarks/{name}" for name in BENCHMARKS])
def test_a_bad_option_is_one_line_and_exit_2_and_usage_names_the_command(command):
    argv = [sys.executable, *command.removeprefix("python ").split()]  # the usage line's command, as run
    proc = subprocess.run([*argv, "--no-such-option"], cwd=REPO, capture_output=True, text=True)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    usage = subprocess.run([*argv, "--help"], cwd=REPO, capture_output=True, text=True)
    assert usage.stdout.startswith(f"usage: {command} "), usage.stdout[:80]


@pytest.mark.parametrize("name", [name for name in BENCHMARKS if name != "throughput.py"])   # its own text
def test_a_benchmarks_help_is_its_whole_docstring(name):
    """What it measures, how to run it and what it prints: the examples and notes below the options too."""
    doc = ast.get_docstring(ast.parse((REPO / "benchmarks" / name).read_text()))
    shown = subprocess.run([sys.executable, f"benchmarks/{name}", "--help"], cwd=REPO, capture_output=True,
                           text=True).stdout
    lines = [line.strip() for line in doc.splitlines() if line.strip()]
    assert lines[0] in shown and lines[-1] in shown, shown


@pytest.mark.parametrize("error, one_line", [
    (MissingInput("models/students/x: no open_clip_config.json; run the models stage first"), True),
    (MissingDataError("datasets/aro", "visual_genome_relation.json"), True),
    (FileNotFoundError(2, "No such file or directory", "/tmp/scratch"), False),   # a bug, not bad input
    (NotImplementedError("an operator a library lacks"), False),
])
def test_only_the_projects_own_input_errors_become_one_line(error, one_line, tmp_path, capsys):
    """A bad input the project recognises is one line with exit 2; a FileNotFoundError or
    NotImplementedError from anywhere else keeps its traceback (it would hide a bug's origin)."""
    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text())

    def body(args, cfg, root):
        raise error

    if not one_line:
        with pytest.raises(type(error)):
            cli.run("doc", body, ["--params", str(params)])
        return
    assert cli.run("doc", body, ["--params", str(params)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and str(error) in err


def sweep_stage_project(tmp_path: Path) -> Path:
    """A project whose params list one sweep file, with results of an earlier launch (of a sweep
    no longer listed, `gone`, and of this one). The sweep trains with L_CLIP alone: its trials read
    no cache table."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["sweeps"] = ["one.yaml"]
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    (tmp_path / "one.yaml").write_text("name: one\nbase: {params: {objective.method: clip, objective.lambda_sds: 0}}\n"
                                       "space: {train.lr: [0.1]}\n")
    results = tmp_path / "results"
    (results / "sweeps").mkdir(parents=True)
    for name in ("gone", "one"):
        (results / "sweeps" / f"{name}.json").write_text('{"trials": []}\n')
    (results / "sweeps.json").write_text('{"gone": {"file": "gone.yaml", "exit": 0, "parent_run_id": "a1"}}\n')
    return params


def results_of(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted((root / "results").rglob("*")) if p.is_file()}


def test_a_sweep_stage_whose_inputs_are_not_built_leaves_the_earlier_results_untouched(tmp_path, capsys):
    """No data built: one line and exit 2 before anything is removed; the earlier launch's results stay."""
    from stages import sweep as stage

    params = sweep_stage_project(tmp_path)
    before = results_of(tmp_path)
    assert stage.main(["--params", str(params)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data/index.json: not found; build it first" in err
    assert results_of(tmp_path) == before


def test_the_sweep_stage_rewrites_its_results_folder_and_lists_each_sweep(tmp_path, capsys):
    """results/sweeps/ holds this launch's files only: an earlier launch's, of a sweep no longer
    listed, is gone. (The built inputs are stand-ins whose data index cannot be read: the trial fails.)"""
    from stages import sweep as stage

    params = sweep_stage_project(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "index.json").write_text("not json")
    (tmp_path / "models").mkdir()
    (tmp_path / "cache").mkdir()
    results = tmp_path / "results"

    assert stage.main(["--params", str(params)]) == 1
    said = capsys.readouterr()
    assert "index.json: invalid JSON" in said.out + said.err
    assert sorted(p.name for p in results.iterdir()) == ["sweeps", "sweeps.json"]   # no folder left half-built
    assert sorted(p.name for p in (results / "sweeps").iterdir()) == ["one.json"]
    listed = json.loads((results / "sweeps.json").read_text())
    assert list(listed) == ["one"] and listed["one"]["exit"] == 1 and listed["one"]["counts"].get("failed") == 1


def test_the_train_stage_refuses_a_results_file_it_could_not_write_before_training(tmp_path, capsys):
    """Found after the training, the run was recorded, its checkpoint discarded and the stage's
    result lost: a rerun trained from step 0. Now one line before anything runs."""
    from stages import train as stage

    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text())
    (tmp_path / "results").write_text("a file where the results folder goes")
    assert stage.main(["clip", "--params", str(params)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: results: ") and "is a file" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml", "results"]


def test_the_baselines_stage_refuses_a_results_file_it_could_not_write_before_evaluating(tmp_path, capsys):
    """Found after the evaluation, its runs were recorded FINISHED and the results lost."""
    from stages import baselines as stage

    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text())
    (tmp_path / "results" / "baselines.json").mkdir(parents=True)
    assert stage.main(["--params", str(params)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: results: ") and "is a folder" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml", "results"]


@pytest.mark.parametrize("error", [
    DataFormatError(Path("data/index.json"), "line 3", "caption", "is empty"),
    MissingDataError(Path("datasets/aro"), "visual_genome_relation.json"),
    CacheError("bench_text", Path("cache/bench_text/manifest.json"), "not found"),
], ids=["DataFormatError", "MissingDataError", "CacheError"])
def test_the_projects_input_errors_cross_a_process_boundary_whole(error):
    """A sweep trial's error reaches the driver pickled: unpickling called __init__ with the message
    alone, so a broken data index arrived as "TypeError: __init__() missing 3 required positional
    arguments" instead of the line naming the file."""
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error) and str(back) == str(error) and back.path == error.path


def test_the_models_stage_refuses_a_students_batch_larger_than_the_training_pairs(tmp_path, capsys):
    """Pretraining cut the batch to the training set silently; the student's own key is named, before
    the teacher trains."""
    from pipeline.data.datasets import read_index, train_pairs
    from stages import data, models

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["profiles"]["smoke"]["students"]["toy-vit"]["batch_size"] = 1000
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    assert data.main(["--params", str(params), "--profile", "smoke"]) == 0
    pairs = len(train_pairs(tmp_path / "data", read_index(tmp_path / "data")))
    capsys.readouterr()
    assert models.main(["--params", str(params), "--profile", "smoke"]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: students.toy-vit.batch_size: 1000 is more than the {pairs} training pairs of "
                   f"{tmp_path / 'data'}; allowed: <= {pairs}\n")
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize("objective", [
    {"method": "diffusion_feedback", "lambda_sds": 1.0, "feedback_timesteps": 2, "projector_steps": 10},   # DIVA's
    {"method": "contrastive_feedback", "lambda_sds": 1.0, "projector": "mlp", "clip_weight": 0.0},       # DCR's
    {"method": "negclip", "lambda_sds": 0.0, "negclip_neighbours": 0},
])
def test_the_clip_stage_runs_l_clip_alone_whatever_objective_the_params_set(objective):
    """train_clip's objective is L_CLIP's, valid for every valid params file: no key of another method
    (DIVA's timesteps, DCR's MLP, a warm-up, the feedback loss alone) can contradict it, and none of
    them is one it reads (what its checkpoint must match)."""
    import dataclasses

    from pipeline.config import OBJECTIVE_KEYS, load
    from stages.train import clip_only

    cfg = load(REPO / "params.yaml")
    cfg = dataclasses.replace(cfg, objective=dataclasses.replace(cfg.objective, **objective))
    clip = clip_only(cfg).objective
    assert (clip.method, clip.lambda_sds, clip.clip_weight) == ("clip", 0.0, 1.0)
    assert clip.read_keys == OBJECTIVE_KEYS
