"""benchmarks/paper_rehearsal.py: the paper profile's whole chain, `dvc repro` from data to report.

CI runs the reduced size (every published layout, 77-token conditioning, the VAE's 8x
downsampling, at toy widths and 64 px): about 1.5 minutes on 2 cores. The full size (SD v1-4
at 512 px) is run by hand: `.venv/bin/python benchmarks/paper_rehearsal.py`.
"""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "paper_rehearsal.py"
STAGES = ("data", "models", "cache", "baselines", "train_clip", "train_sds", "sweep", "report")


def rehearse(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True)


def test_help_and_a_bad_workdir_are_answered_in_one_line(tmp_path):
    proc = rehearse("--help")
    assert proc.returncode == 0 and "--size {full,reduced}" in proc.stdout and "peak PSS" in proc.stdout
    (tmp_path / "taken").write_text("x")
    proc = rehearse("--workdir", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr == f"error: --workdir: {tmp_path} is not empty (--rerun uses it as it is)\n"
    proc = rehearse("--rerun")
    assert proc.returncode == 2 and proc.stderr == "error: --rerun: needs --workdir naming the workspace of an earlier run\n"


@pytest.mark.slow
def test_the_reduced_rehearsal_runs_every_stage_and_fills_every_paper_column(reduced_rehearsal):
    proc, ws = reduced_rehearsal
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = proc.stdout.split("stage          wall s  peak RSS GiB  peak PSS GiB\n", 1)[1].splitlines()
    assert [line.split()[0] for line in table[:len(STAGES)]] == list(STAGES)
    assert all(float(line.split()[1]) > 0 for line in table[:len(STAGES)])
    assert "reports/table1.csv has every paper column" in proc.stdout
    assert (ws / "reports" / "table1.md").is_file()
