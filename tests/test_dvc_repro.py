"""`dvc repro` of the smoke profile in a temporary clone of the working tree (real DVC, MLflow), and DVC's own
parameter override there, `dvc exp run -S key=value`: the value reaches the run, a bad one stops in one line.
The tests share the clone (built once): the repro test leaves it as its first repro left it, which the
override test then finds up to date (run alone, it builds what it needs)."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import deep_merge, load, read_yaml
from pipeline.tracking import Tracker
from pipeline.train import TRAINED
from worktree import copy_working_tree

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
DVC = [sys.executable, "-m", "dvc"]


def _run(cmd, cwd, env):
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """A git repo holding the working tree's tracked and untracked-not-ignored files, profile smoke."""
    dest = copy_working_tree(tmp_path_factory.mktemp("clone"))
    params = dest / "params.yaml"
    # The methods and Table 1's sweeps: appendix F's ablations (the other sweeps the toy study lists)
    # would add ten trials to each of the test's three sweep stages, and run through the same code.
    text = re.sub(r"\nsweeps: \[.*\]\n", "\nsweeps: [sweeps/methods.yaml, sweeps/table1.yaml]\n", params.read_text())
    assert "sweeps/lambda.yaml, sweeps/lr.yaml]" in params.read_text() and text != params.read_text()
    params.write_text(text.replace("profile: toy", "profile: smoke", 1))
    # Every method on one seed, which cuts two of each variant's three trials from each sweep stage's run;
    # Table 1's sweep keeps its three, for the seed columns.
    methods = dest / "sweeps" / "methods.yaml"
    assert "\nseeds: [0, 1, 2]\n" in methods.read_text()
    methods.write_text(methods.read_text().replace("\nseeds: [0, 1, 2]\n", "\nseeds: [0]\n"))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@localhost"}
    _run(["git", "init", "-q"], dest, env)
    _run(["git", "add", "-A"], dest, env)
    _run(["git", "commit", "-qm", "clone"], dest, env)
    return dest, env


SWEEP_REPORTS = ("reports/sweep-methods.md", "reports/methods.md")   # what the report builds from the sweep
EXP_SHOW_DROP = "results/|.*:(wino_image|wino_group|aro|zeroshot)$"    # the README's `dvc exp show --drop`


def _ran(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


def _stale(dest: Path, env: dict) -> set[str]:
    """The stages `dvc status` finds out of date (those whose own deps changed, not those after them)."""
    return set(json.loads(_run([sys.executable, "-m", "dvc", "status", "--json"], dest, env)))


def test_repro_writes_the_reports_then_is_up_to_date_then_reruns_only_lambda_dependents_then_checks_out(clone):
    dest, env = clone
    first = _run(DVC + ["repro"], dest, env)
    assert _ran(first) == {"data", "models", "cache", "baselines", "train_clip", "train_sds", "sweep", "report"}
    table = (dest / "reports" / "table1.md").read_text().splitlines()
    labels = [row.split("|")[1].strip() for row in table[2:]]
    # The fine-tuned rows are sweeps/table1.yaml's (params.yaml's `sweeps` lists it), over its seeds.
    assert labels == ["toy-vit pretrained", "toy-vit FT with L_CLIP", "toy-vit FT with L_CLIP + 0.1 L_SDS",
                      "diffusion score (toy-ldm)"]
    assert {row.split("|")[-5].strip() for row in table[2:4]} == {"1", "3"}     # seeds: pretrained 1, FT 3
    metrics = _run(DVC + ["metrics", "show"], dest, env)
    assert max(len(line) for line in metrics.splitlines()) < 200, metrics
    assert "metrics/ft-sds.json" in metrics and "wino_text" in metrics
    for suffix in ("tex", "csv"):
        assert (dest / "reports" / f"table1.{suffix}").is_file()
    # A finished train stage keeps its trained file, and no resume point once its results are written.
    assert sorted(p.name for p in (dest / "runs" / "sds").iterdir()) == [TRAINED]
    # Appendix A.2 from the methods sweep; the diffusion score's ARO and CLEVR from the baselines.
    for stem in ("appendix-unet-feature", "appendix-diffusion-score", "appendix-clevr"):
        assert (dest / "reports" / f"{stem}.md").is_file(), stem

    _check_mlflow(dest)
    _check_sweep(dest)
    first = {name: (dest / name).read_text() for name in ("dvc.lock", "params.yaml", *SWEEP_REPORTS)}
    first_launch = json.loads((dest / "results" / "sweeps.json").read_text())["methods"]["parent_run_id"]
    _run(["git", "add", "-A"], dest, env)             # the reference run, as the repo commits its own
    _run(["git", "commit", "-qm", "reference run"], dest, env)

    assert _ran(_run(DVC + ["repro"], dest, env)) == set()

    # The stages track the active profile's preset alone: an edit of the paper's (its data paths)
    # leaves the smoke study up to date, one of the smoke preset's training keys does not.
    original = (dest / "params.yaml").read_text()
    paper_edit = original.replace("coco_images: datasets/coco/train2017", "coco_images: /elsewhere/train2017", 1)
    smoke_edit = original.replace("    train: {steps: 3,", "    train: {steps: 4,", 1)
    assert original != paper_edit and original != smoke_edit
    (dest / "params.yaml").write_text(paper_edit)
    assert _stale(dest, env) == set()
    (dest / "params.yaml").write_text(smoke_edit)
    assert _stale(dest, env) == {"train_clip", "train_sds", "sweep", "report"}
    (dest / "params.yaml").write_text(original)

    # Which stages each edit makes stale (`dvc status`), then one repro of both edits: every stage a
    # change reaches re-runs, and no other.
    lambda_sds = yaml.safe_load(original)["objective"]["lambda_sds"]
    lambda_edit = original.replace(f"lambda_sds: {lambda_sds}", "lambda_sds: 0.05", 1)
    # Only the runs that train an h_w read eval.projected_score.
    projected_edit = original.replace("  projected_score: true", "  projected_score: false", 1)
    assert original != lambda_edit and original != projected_edit
    (dest / "params.yaml").write_text(projected_edit)
    assert _stale(dest, env) == {"train_sds", "sweep"}
    # The sweep stage depends on the whole objective section: a sweep file may leave lambda at its base value.
    (dest / "params.yaml").write_text(lambda_edit)
    assert _stale(dest, env) == {"train_sds", "sweep", "report"}
    (dest / "params.yaml").write_text(lambda_edit.replace("  projected_score: true", "  projected_score: false", 1))
    assert _ran(_run(DVC + ["repro"], dest, env)) == {"train_sds", "sweep", "report"}
    assert "0.05 L_SDS" in (dest / "reports" / "table1.md").read_text()
    # The workspace against the reference commit in a terminal's width: the params that differ and the
    # text scores that moved (the README's command; `--only-changed` alone keeps every changed results
    # file's hash and every changed headline score).
    shown = _run(DVC + ["exp", "show", "--only-changed", "--no-pager", "--drop", EXP_SHOW_DROP], dest,
                 {**env, "COLUMNS": "400"})
    header = shown.splitlines()[1]
    assert "objective.lambda_sds" in header and "eval.projected_score" in header and "results/" not in header
    assert max(len(line.rstrip()) for line in shown.splitlines()) < 200, shown
    assert f"dvc exp show --only-changed --drop '{EXP_SHOW_DROP}'" in " ".join((ROOT / "README.md").read_text().split())
    sds = json.loads((dest / "results" / "train-sds.json").read_text())
    assert "winoground/text" in sds["metrics"] and "projected/winoground/text" not in sds["metrics"]

    # Back at the first repro's lock and params (as `git checkout` of its commit leaves them), with the
    # sweep's results and the tracking store gone: `dvc checkout` restores that launch's results
    # files and the report rebuilds its sweep tables from them alone.
    for name in ("dvc.lock", "params.yaml"):
        (dest / name).write_text(first[name])
    shutil.rmtree(dest / "mlruns")
    shutil.rmtree(dest / "results" / "sweeps")
    (dest / "results" / "sweeps.json").unlink()
    for name in SWEEP_REPORTS:
        (dest / name).unlink()
    _run(DVC + ["checkout"], dest, env)
    assert json.loads((dest / "results" / "sweeps.json").read_text())["methods"]["parent_run_id"] == first_launch
    _run([sys.executable, "-m", "stages.report"], dest, env)
    assert {name: (dest / name).read_text() for name in SWEEP_REPORTS} == {name: first[name] for name in SWEEP_REPORTS}
    assert not (dest / "mlruns").exists()


def test_exp_run_set_param_reruns_the_stage_with_the_value_and_a_bad_value_stops_in_one_line(clone):
    dest, env = clone
    # Up to date after the test above (its last state is its first repro's); the whole chain if run alone.
    _run(DVC + ["repro", "train_clip"], dest, env)
    before = read_yaml(dest / "params.yaml")

    # DVC writes 5e-5 back as `5e-05`, which a YAML 1.1 reader would take for a string.
    ran = _ran(_run(DVC + ["exp", "run", "-S", "train.lr=5e-5", "train_clip"], dest, env))
    assert ran == {"train_clip"}
    # DVC re-lays the file out as it writes the value; nothing else may change.
    assert read_yaml(dest / "params.yaml") == deep_merge(before, {"train": {"lr": 5e-5}})
    cfg = load(dest / "params.yaml")
    assert cfg.train.lr == 5e-5
    clip = json.loads((dest / "results" / "train-clip.json").read_text())
    # Read in a process of its own: this one's MLflow keeps its connection to the store file the test
    # above deleted, and would not see the new one.
    store = {**env, "MLFLOW_TRACKING_URI": Tracker(cfg.tracking, dest).uri}
    described = subprocess.run([str(Path(sys.executable).with_name("mlflow")), "runs", "describe", "--run-id",
                                clip["run_id"]], cwd=dest, env=store, capture_output=True, text=True, check=True)
    assert float(json.loads(described.stdout)["data"]["params"]["train.lr"]) == 5e-5

    bad = subprocess.run(DVC + ["exp", "run", "-S", "train.lr=abc", "train_clip"], cwd=dest, env=env,
                         capture_output=True, text=True)
    output = bad.stdout + bad.stderr
    assert bad.returncode != 0 and "exited with 2" in output, output[-3000:]
    assert "error: train.lr: 'abc' is not allowed; expected a number" in output.splitlines(), output[-3000:]
    assert "Traceback" not in output


def _check_mlflow(dest: Path) -> None:
    """The runs the report read: params as dotted names, per-step losses, slash-named metrics."""
    cfg = load(dest / "params.yaml")
    tracker = Tracker(cfg.tracking, dest)
    assert tracker.uri == f"sqlite:///{dest / 'mlruns' / 'mlflow.db'}"
    sds = json.loads((dest / "results" / "train-sds.json").read_text())
    (run,) = tracker.runs([sds["run_id"]])
    assert run["status"] == "FINISHED"
    assert float(run["params"]["objective.lambda_sds"]) == cfg.objective.lambda_sds
    assert run["params"]["objective.method"] == "sds" and run["params"]["train.scope"] == "layernorm"
    for key in ("winoground/text", "winoground/text/object", "winoground/image", "aro/vg_relation",
                "aro/coco_order", "zeroshot/shape", "trainable_parameters", "projected/winoground/text"):
        assert key in run["metrics"], key
    # Only a trial that trains h_w has a projected score.
    clip = json.loads((dest / "results" / "train-clip.json").read_text())
    assert "winoground/text" in clip["metrics"] and "projected/winoground/text" not in clip["metrics"]
    # One source for lambda: the L_CLIP-only run is logged with the objective it ran.
    (clip_run,) = tracker.runs([clip["run_id"]])
    assert clip_run["params"]["objective.method"] == "clip" and float(clip_run["params"]["objective.lambda_sds"]) == 0
    assert run["metrics"]["trainable_parameters"] == sds["trainable_parameters"]
    steps = [step for step, _ in tracker.metric_history(sds["run_id"], "loss/sds")]
    assert steps == list(range(1, cfg.train.steps + 1))
    baselines = json.loads((dest / "results" / "baselines.json").read_text())
    (diffusion,) = tracker.runs([baselines["diffusion_score"]["run_id"]])
    assert "winoground/text" in diffusion["metrics"] and "zeroshot/shape" not in diffusion["metrics"]


def _check_sweep(dest: Path) -> None:
    """The params file's sweep (the methods side by side) ran on the smoke profile, its trials in
    MLflow; the report wrote its trial table and its comparison of methods from its results file."""
    cfg = load(dest / "params.yaml")
    summary = json.loads((dest / "results" / "sweeps.json").read_text())
    assert cfg.sweeps == ["sweeps/methods.yaml", "sweeps/table1.yaml"] and set(summary) == {"methods", "table1"}
    assert summary["table1"]["exit"] == 0 and summary["table1"]["counts"]["finished"] == 6   # 2 rows x 3 seeds
    entry = summary["methods"]
    methods = read_yaml(dest / "sweeps" / "methods.yaml")
    variants, seeds = list(methods["space"]["variant"]), methods["seeds"]
    trials = len(seeds) * len(variants)                          # every variant x its seeds
    assert entry["exit"] == 0 and entry["counts"]["finished"] == trials
    children = Tracker(cfg.tracking, dest).find_runs(entry["experiment"], parent=entry["parent_run_id"])
    assert len(children) == trials and all(run["tags"]["profile"] == "smoke" for run in children)
    assert {run["params"]["objective.method"] for run in children} == {"clip", "negclip", "sds", "unet_feature",
                                                                       "diffusion_feedback", "contrastive_feedback"}
    table = (dest / "reports" / "sweep-methods.md").read_text().splitlines()
    assert len(table) == 2 + trials and "variant" in table[0]
    report = (dest / "reports" / "methods.md").read_text()
    assert "NegCLIP without negative images" in variants
    for name in variants:
        assert f"| {name} | {len(seeds)} |" in report, name
    assert "Against FT with L_CLIP" in report and "p=" in report
    for suffix in ("tex", "csv", "png"):
        assert (dest / "reports" / f"methods.{suffix}").is_file()
