"""benchmarks/fault_probes.py: what counts as a refusal, and its bad-input part on a fresh smoke project."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PYTHON = REPO / ".venv" / "bin" / "python"
sys.path.insert(0, str(REPO))

from benchmarks import fault_probes  # noqa: E402
from tests.test_config import BAD as BAD_PARAMS  # noqa: E402
from tests.test_sweep_config import BAD as BAD_SWEEPS  # noqa: E402

NOTE = ("2026/12/05 12:00:00 INFO mlflow.store.db.utils: Creating initial MLflow database tables...")


@pytest.mark.parametrize("code, stderr, writes, refused", [
    (2, "error: x: bad", False, True),
    (2, f"{NOTE}\\nerror: x: bad", False, True),             # MLflow's note on its tables is not the command's
    (2, "error: x: bad", True, False),                        # it wrote a file
    (2, "error: x: bad\\nsecond line", False, False),
    (1, "error: x: bad", False, False),
    (2, "", False, False),
])
def test_a_case_is_refused_only_with_exit_2_one_stderr_line_and_nothing_written(tmp_path, code, stderr, writes,
                                                                                  refused):
    (tmp_path / "old").write_text("")
    body = (f"import sys\nif {writes}: open('results.json', 'w').write('{{}}')\n"
            f"print('{stderr}', file=sys.stderr, end='')\nsys.exit({code})\n")
    verdict = fault_probes.judge("case", [sys.executable, "-c", body], tmp_path, 60)
    assert verdict.refused is refused, verdict
    assert verdict.written == (["results.json"] if writes else [])
    assert verdict.notes == (1 if NOTE in stderr else 0)


@pytest.mark.slow
def test_the_bad_input_part_counts_every_case_and_names_each_one_not_refused():
    proc = subprocess.run([str(PYTHON), "benchmarks/fault_probes.py", "--only", "inputs"], cwd=REPO,
                          capture_output=True, text=True, timeout=1800)
    out = proc.stdout
    counted = re.search(r"^bad inputs refused: (\d+)/(\d+) \((\d+) stderr lines of MLflow's notes", out, re.M)
    assert counted, out[-3000:] + proc.stderr[-3000:]
    refused, total = int(counted.group(1)), int(counted.group(2))

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    gpus = fault_probes.cuda_devices()
    names = set(fault_probes.params_cases(params, 3, "a-file", gpus)) | set(fault_probes.sweep_cases(gpus))
    assert total == len(names) >= len(BAD_PARAMS) + len(BAD_SWEEPS) + 15
    listing = out[counted.end():].splitlines()
    listed = {name for line in listing for name in names if line.startswith(f"  not refused: {name}: ")}
    assert len(listed) == total - refused == sum(line.startswith("  not refused: ") for line in listing), out
    # Every malformed file the unit tests refuse in-process is refused by the commands too.
    assert not listed & ({f"params: {n}" for n in BAD_PARAMS} | {f"sweep: {n}" for n in BAD_SWEEPS}), listed
    assert proc.returncode == (0 if refused == total else 1), proc.stderr[-3000:]
    assert "kills survived" not in out and "secrets found" not in out
