"""`python -m pipeline.report SWEEP`: a hand-run sweep's report, from the results its launch left in a real
MLflow store (the driver's `finish` ends each launch here, as after a run of `python -m pipeline.sweep`),
or from a results file, writing what the report stage writes for the sweeps it ran."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import time
from pathlib import Path

import pytest

from pipeline import report
from pipeline.config import TrackingConfig, load, read_yaml
from pipeline.sweep import driver, spec
from pipeline.tracking import Tracker, resolve_uri
from stages import report as stage
from test_report import (PNG_MAGIC, VARIANT_TRIALS, result_trial, write_params, write_sweep,
                         write_table1_results)

REPO = Path(__file__).resolve().parents[1]
PYTHON = REPO / ".venv" / "bin" / "python"
LAMBDAS = [0, 1e-4, 1e-3, 1e-2, 1e-1]       # sweeps/lambda.yaml's grid


def lambda_rows(failed: int | None = None) -> list[dict]:
    """A launch's trials (`driver.summary_rows`) of sweeps/lambda.yaml: the student's scores flat, h_w text
    rising with lambda (none at 0), with their per-case outcomes; trial `failed` failed."""
    rows = []
    for i, lam in enumerate(LAMBDAS):
        text = [1, 0] * 4
        hw = [1] * (i + 1) + [0] * (7 - i)
        outcomes = {"winoground/text": {"correct": "".join(map(str, text)), "groups": None, "cases": "fixture"}}
        metrics = {"winoground/text": 0.5, "aro/overall": 0.6}
        if lam:
            outcomes["projected/winoground/text"] = {"correct": "".join(map(str, hw)), "groups": None, "cases": "fixture"}
            metrics["projected/winoground/text"] = sum(hw) / 8
        status = "failed" if i == failed else "finished"
        rows.append(result_trial(f"t{i:03d}", {"objective.lambda_sds": lam}, status, metrics,
                                 outcomes if status == "finished" else None))
    return rows


def end_launch(root: Path, rows: list[dict] | None, capsys) -> str:
    """A launch of sweeps/lambda.yaml in the project's store: its parent run opened by the run recorder
    and, given its trials, ended by the driver's `finish` (summary printed, summary.json logged); None
    leaves it running. The summary printed."""
    from pipeline.sweep.recorder import RunRecorder   # imports Ray Tune: only the tests that launch

    params = root / "params.yaml"
    sweep = spec.load(REPO / "sweeps" / "lambda.yaml", read_yaml(params))
    recorder = RunRecorder(sweep, root, resolve_uri(sweep.base_config.tracking.uri, root), driver.experiment_name(sweep))
    recorder.open_launch(str(root / "ray_results" / f"lambda-{time.time_ns()}"))
    time.sleep(0.01)            # the launches' start times order them
    if rows is not None:
        driver.finish(sweep, recorder, rows, time.perf_counter(), {}, None, params=params)
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("report-cli")
    write_params(root)
    return root


@pytest.fixture()
def in_project(project, monkeypatch):
    monkeypatch.chdir(project)      # a SQLite store keeps its artifacts under the working folder
    return project


def test_a_hand_run_sweep_prints_the_command_that_writes_its_report_from_the_newest_launch(in_project, capsys):
    root = in_project
    end_launch(root, lambda_rows(), capsys)                     # an older launch, finished
    summary = end_launch(root, lambda_rows(failed=4), capsys)   # the newest with results: a trial failed
    end_launch(root, None, capsys)                              # the newest of all, still running
    [line] = [line for line in summary.splitlines() if "python -m pipeline.report" in line]
    command = shlex.split(line.split(": ", 1)[1])
    reports = root / "runs" / "reports" / "lambda"       # not reports/, the report stage's output
    assert command == ["python", "-m", "pipeline.report", "lambda", "--params", str(root / "params.yaml"),
                       "--out", str(reports)]

    done = subprocess.run([str(PYTHON), *command[1:]], cwd=root, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(reports / f"{stem}.{suffix}") for stem in ("sweep-lambda", "lambda")
                                   for suffix in ("md", "tex", "csv", "png")]
    # Each launch named by its Ray folder (what --resume takes), the newest first.
    folder = re.escape(str(root / "ray_results" / "lambda-"))
    assert re.search(rf"note: launch {folder}\d+ \(RUNNING\) has no summary.json yet\n"
                     rf"sweep lambda: launch {folder}\d+ \(FAILED, run \w+\)", done.stderr), done.stderr
    # Refused after the launch is found: the refusal alone, not the lines naming the launch read.
    refused = subprocess.run([str(PYTHON), *command[1:], "--against", "lambda=1"], cwd=root, capture_output=True,
                             text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert refused.returncode == 2 and refused.stderr.splitlines() == [
        "error: --against: 'lambda=1' is not a configuration of sweep lambda; allowed: "
        "objective.lambda_sds=0, objective.lambda_sds=0.0001, objective.lambda_sds=0.001, objective.lambda_sds=0.01, "
        "objective.lambda_sds=0.1"]
    rows = (reports / "sweep-lambda.csv").read_text().splitlines()
    assert [row.split(",")[:3] for row in rows[1:]] == [
        ["t000", "0", "finished"], ["t001", "0.0001", "finished"], ["t002", "0.001", "finished"],
        ["t003", "0.01", "finished"], ["t004", "0.1", "failed"]]
    assert (reports / "sweep-lambda.png").read_bytes().startswith(PNG_MAGIC)
    compared = (reports / "lambda.csv").read_text().splitlines()    # the finished trials, each against lambda 0
    assert [row.split(",")[0] for row in compared[1:]] == [f"objective.lambda_sds={v}" for v in (0, 0.0001, 0.001, 0.01)]


def test_the_command_draws_what_moved_with_intervals_and_names_what_did_not(in_project, capsys):
    """The figure the command writes, from the launch's results in the store (as read back by it)."""
    end_launch(in_project, lambda_rows(), capsys)
    trials = report.table_trials(report.launch_trials(load(in_project / "params.yaml"), in_project, "lambda"))
    keys = report.swept_keys(trials)
    figure = report.sweep_figure("lambda", report.sorted_trials(trials, keys), keys, n_resamples=100)
    titles = [ax.get_title() for ax in figure.axes if ax.get_visible()]
    assert titles == ["h_w text"]
    title = " ".join(figure.get_suptitle().split())
    assert "Winoground text 0.500" in title and "ARO overall 0.600" in title
    [ax] = figure.axes
    assert ax.get_ylabel() == "accuracy" and figure.get_supxlabel().startswith("objective.lambda_sds (log scale")
    [bars] = ax.containers
    assert len(bars.lines[2][0].get_segments()) == 4           # an interval per trial that has h_w text
    assert all(abs(seg[1][1] - seg[0][1]) > 0.1 for seg in bars.lines[2][0].get_segments())   # 8 cases: wide


def test_an_unknown_sweep_is_one_line_naming_the_experiment_and_the_sweeps_there(in_project, capsys):
    end_launch(in_project, lambda_rows(), capsys)
    code = report.main(["nope", "--params", str(in_project / "params.yaml")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: sweep 'nope': no launch in MLflow experiment 'sds-clip/nope' at sqlite:///")
    assert err.rstrip().endswith("sweeps there: lambda")


def test_a_sweep_whose_launches_have_no_results_yet_is_one_line(in_project, capsys):
    tracker = Tracker(TrackingConfig(uri="sqlite:///mlruns/mlflow.db", experiment="sds-clip"), in_project)
    tracker.start("scope launch", tags={"sweep_role": "parent"}, experiment="sds-clip/scope")   # still running
    capsys.readouterr()                   # the store's creation notes, the test's own
    code = report.main(["scope", "--params", str(in_project / "params.yaml")])
    [err] = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == (
        "error: sweep 'scope': none of the 1 launches in MLflow experiment 'sds-clip/scope' has written its results "
        "(summary.json) yet; wait for one to end, or pass --results FILE")
    assert not (in_project / "reports" / "sweep-scope.md").exists()


def test_a_store_moved_with_its_project_is_refused_in_one_line(in_project, capsys):
    """Its launches' summary.json would be read where the project was."""
    tracker = Tracker(TrackingConfig(uri="sqlite:///mlruns/mlflow.db", experiment="sds-clip"), in_project)
    # A sweep of its own: the project's store is shared with the other tests.
    tracker.client.create_experiment("sds-clip/relocated", artifact_location="/elsewhere/mlruns/mlflow-artifacts")
    capsys.readouterr()
    assert report.main(["relocated", "--params", str(in_project / "params.yaml")]) == 2
    [err] = capsys.readouterr().err.strip().splitlines()
    assert err.startswith(f"error: tracking.uri: {in_project}/mlruns/mlflow.db was made in another folder")


def test_from_a_results_file_it_writes_what_the_stage_writes(tmp_path, capsys):
    """A variant sweep: its table and figure and the variants' comparison, byte for byte the stage's."""
    params = write_params(tmp_path)
    results = tmp_path / "results"
    write_table1_results(results)
    labelled = [{**trial, "trial": f"t{i:03d}"} for i, trial in enumerate(VARIANT_TRIALS)]
    (results / "sweeps.json").write_text(json.dumps({"methods": write_sweep(results, "methods", labelled)}))
    assert stage.main(["--params", str(params)]) == 0
    out = tmp_path / "by-hand"
    assert report.main(["methods", "--params", str(params), "--out", str(out),
                        "--results", str(results / "sweeps" / "methods.json")]) == 0
    written = sorted(path.name for path in out.iterdir())
    assert written == sorted(f"{stem}.{suffix}" for stem in ("sweep-methods", "methods")
                             for suffix in ("md", "tex", "csv", "png"))
    for name in written:
        assert (out / name).read_bytes() == (tmp_path / "reports" / name).read_bytes(), name
    assert not (tmp_path / "mlruns").exists()           # a results file needs no tracking store

    assert report.main(["lambda", "--params", str(params), "--results", str(results / "sweeps" / "methods.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    given = results / "sweeps" / "methods.json"
    assert err[-1] == f"error: --results: {given} holds the results of sweep 'methods', not 'lambda'"

    # Every configuration against another one than the first: the same tables with that one as reference.
    against = tmp_path / "against-hard"
    assert report.main(["methods", "--params", str(params), "--against", "hard", "--out", str(against),
                        "--results", str(given)]) == 0
    shown = (against / "methods.md").read_text()
    assert "## Against hard" in shown and "## Against plain" in (out / "methods.md").read_text()
    versus = shown.split("## Against hard", 1)[1].split("## Diagnostics", 1)[0]
    assert "| plain |" in versus and "| hard |" not in versus

    def refused(sweep: str, trials: list[dict], against: str) -> str:
        """The one line `--against` prints for a sweep of these trials, which it refuses."""
        write_sweep(results, sweep, trials)
        assert report.main([sweep, "--params", str(params), "--against", against,
                            "--results", str(results / "sweeps" / f"{sweep}.json")]) == 2
        [line] = capsys.readouterr().err.strip().splitlines()
        return line

    assert refused("methods", labelled, "soft") == \
        "error: --against: 'soft' is not a configuration of sweep methods; allowed: plain, hard"
    grid = [result_trial(f"t00{i}", {"train.lr": lr, "objective.lambda_sds": lam}, "finished", {"winoground/text": 0.5})
            for i, (lr, lam) in enumerate([(1e-3, 0.0), (1e-4, 0.1)])]
    assert refused("grid", grid, "train.lr=0.001") == (
        "error: --against: sweep grid does not set exactly one key besides the seed, so its configurations are not "
        "set side by side; allowed: a sweep of variants or of one param")
    # A configuration whose every trial failed is named, not replaced by the next one.
    failed = [{**trial, "status": "failed", "metric": None} if trial["config"]["variant"] == "hard" else trial
              for trial in labelled]
    assert refused("failing", failed, "hard") == (
        "error: --against: 'hard' has no finished trial with outcomes in sweep failing, so nothing can be set "
        "against it; allowed: plain")

    # Another profile than the trials': the same rows, and a note that says so.
    assert report.main(["methods", "--params", str(params), "--profile", "smoke", "--out", str(tmp_path / "smoke"),
                        "--results", str(given)]) == 0
    assert "note: the trials of sweep methods ran on profile toy; the report labels them with profile smoke's" \
        in capsys.readouterr().err
    assert report.main(["methods", "--params", str(params), "--out", str(tmp_path / "toy"), "--results", str(given)]) == 0
    assert "note:" not in capsys.readouterr().err

    for where, error in ((params, f"{params} is a file; expected a folder there"),
                         (params / "reports", f"{params} is a file, so {params / 'reports'} cannot be created")):
        assert report.main(["methods", "--params", str(params), "--out", str(where), "--results", str(given)]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [f"error: --out: {error}"]


def test_runs_scored_on_other_cases_leave_the_out_folder_as_it_was(tmp_path, capsys):
    """A sweep of two keys: its table is made before its figure, whose intervals over a configuration's
    seeds meet the mismatch. Neither reaches --out, whose earlier files stay byte for byte, and nothing
    is left beside it."""
    params = write_params(tmp_path)
    outcome = lambda cases: {"winoground/text": {"correct": "1100", "groups": None, "cases": cases}}  # noqa: E731
    trials = [result_trial(f"t00{seed}", {"train.lr": 1e-3, "objective.lambda_sds": 0.1, "train.seed": seed},
                           "finished", {"winoground/text": 0.5 + seed / 10}, outcome(cases))
              for seed, cases in ((0, "fixture"), (1, "other"))]
    trials.append(result_trial("t002", {"train.lr": 1e-4, "objective.lambda_sds": 0.0, "train.seed": 0}, "finished",
                               {"winoground/text": 0.5}, outcome("fixture")))
    write_sweep(tmp_path / "results", "methods", trials)
    out = tmp_path / "by-hand"
    out.mkdir()
    (out / "sweep-methods.md").write_text("an earlier report's\n")
    given = tmp_path / "results" / "sweeps" / "methods.json"
    assert report.main(["methods", "--params", str(params), "--out", str(out), "--results", str(given)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {given}: sweep methods: objective.lambda_sds=0.1, train.lr=0.001 (trials t000, t001): "
        "winoground/text: the runs were scored on different cases (their case identities differ)")
    assert {path.name: path.read_text() for path in out.iterdir()} == {"sweep-methods.md": "an earlier report's\n"}
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []
    # Into a folder that does not exist yet: none is made.
    assert report.main(["methods", "--params", str(params), "--out", str(tmp_path / "new" / "dir"),
                        "--results", str(given)]) == 2
    assert not (tmp_path / "new").exists()


def test_help_names_the_command_and_its_sources(capsys):
    with pytest.raises(SystemExit) as exit_:
        report.main(["--help"])
    text = capsys.readouterr().out
    assert exit_.value.code == 0 and text.startswith("usage: python -m pipeline.report ")
    assert "<tracking.experiment>/SWEEP" in text and "--results FILE" in text


def test_the_summary_names_the_params_file_only_when_it_is_not_the_default():
    from pipeline.sweep.cli import summary_text

    sweep = spec.load(REPO / "sweeps" / "lambda.yaml", read_yaml(REPO / "params.yaml"))
    counts = {"finished": 0, "early_stopped": 0, "failed": 0, "interrupted": 0}
    last = lambda params: summary_text(sweep, [], counts, None, 1.0, params).splitlines()[-1]  # noqa: E731
    assert last(None) == "report (table and figure): python -m pipeline.report lambda --out runs/reports/lambda"
    assert last(Path("params.yaml")) == last(None)
    assert last(Path("my params.yaml")).endswith(
        "python -m pipeline.report lambda --params 'my params.yaml' --out runs/reports/lambda")
    assert last(Path("/p/x.yaml")).endswith("--params /p/x.yaml --out /p/runs/reports/lambda")
    # A profile other than the params file's is passed on: the report names the rows by its students.
    smoke = spec.load(REPO / "sweeps" / "lambda.yaml", read_yaml(REPO / "params.yaml"), "smoke")
    assert summary_text(smoke, [], counts, None, 1.0, None).splitlines()[-1] == (
        "report (table and figure): python -m pipeline.report lambda --profile smoke --out runs/reports/lambda")
