"""benchmarks/scale.py on a tiny budget: the benchmark calls the pipeline's own entry points, so a
change of their signatures must fail here rather than when someone next measures."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "scale.py"


def test_bad_counts_are_one_line():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--rows", "100", "10"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr == "error: --rows: 100 10 must be increasing counts of at least 10\n"


def test_a_workdir_holding_something_else_is_one_line(tmp_path):
    (tmp_path / "params.yaml").write_text("profile: paper\n")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--workdir", str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True)
    assert proc.returncode == 2
    assert proc.stderr == f"error: --workdir: {tmp_path} is neither empty nor a reduced paper rehearsal's workspace\n"


@pytest.mark.slow
def test_the_smallest_scale_run_prints_both_curves(reduced_rehearsal):
    rehearsal, ws = reduced_rehearsal
    assert rehearsal.returncode == 0, rehearsal.stdout[-3000:] + rehearsal.stderr[-3000:]
    # In the rehearsal's workspace, so that the workspace is built once for both tests.
    proc = subprocess.run([sys.executable, str(SCRIPT), "--rows", "10", "--runs", "10", "--workdir", str(ws)],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    starts = proc.stdout.split("trial start against training rows", 1)[1].splitlines()
    assert starts[1].split()[:2] == ["rows", "start"] and starts[2].split()[0] == "10"
    assert float(starts[2].split()[1]) > 0
    runs = proc.stdout.split("report stage and sweep driver against trials", 1)[1].splitlines()
    assert runs[2].split()[0] == "10" and all(float(v) > 0 for v in runs[2].split()[1::2])
    # The reported sweep is a results file as the sweep stage's driver writes one (its 1-trial launch: the same keys).
    written = json.loads((ws / "results" / "sweeps" / "scale.json").read_text())
    driven = json.loads((ws / "driver-scale.json").read_text())
    assert list(written) == list(driven) and len(written["trials"]) == 10
    assert all(list(trial) == list(driven["trials"][0]) for trial in written["trials"])
    assert {t["status"] for t in written["trials"]} == {"finished"} and written["best"] is not None
