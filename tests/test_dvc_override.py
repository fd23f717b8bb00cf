"""DVC's own parameter override, `dvc exp run -S key=value`, on the smoke profile in a temporary
clone of the working tree (real DVC, MLflow): the value reaches the run, a bad one stops in one line."""
import json
import subprocess
import sys

import pytest

from pipeline.config import deep_merge, load, read_yaml
from pipeline.tracking import Tracker
from test_dvc_repro import _ran, _run, clone  # noqa: F401 (clone is the fixture)

pytestmark = pytest.mark.slow
DVC = [sys.executable, "-m", "dvc"]


def test_exp_run_set_param_reruns_the_stage_with_the_value_and_a_bad_value_stops_in_one_line(clone):
    dest, env = clone
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
    (run,) = Tracker(cfg.tracking, dest).runs([clip["run_id"]])
    assert float(run["params"]["train.lr"]) == 5e-5

    bad = subprocess.run(DVC + ["exp", "run", "-S", "train.lr=abc", "train_clip"], cwd=dest, env=env,
                         capture_output=True, text=True)
    output = bad.stdout + bad.stderr
    assert bad.returncode != 0 and "exited with 2" in output, output[-3000:]
    assert "error: train.lr: 'abc' is not allowed; expected a number" in output.splitlines(), output[-3000:]
    assert "Traceback" not in output
