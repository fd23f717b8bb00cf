"""benchmarks/repro_time.py: the README command it runs and how it reads DVC's and Python's output."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("repro_time", ROOT / "benchmarks" / "repro_time.py")
repro_time = importlib.util.module_from_spec(spec)
spec.loader.exec_module(repro_time)


def test_the_command_run_with_install_is_the_readmes_first_one():
    command = repro_time.readme_command(ROOT / "README.md")
    assert command == ("python3 -m venv .venv && . .venv/bin/activate && pip install -r requirements.txt "
                       "&& dvc repro")
    assert "pip install -q -r requirements.txt" in (ROOT / ".ci" / "run").read_text()


def test_a_readme_whose_first_command_is_not_dvc_repro_is_refused(tmp_path):
    (tmp_path / "README.md").write_text("# x\n\n```bash\npip install -r requirements.txt\n```\n")
    with pytest.raises(ValueError, match="does not end with `dvc repro`"):
        repro_time.readme_command(tmp_path / "README.md")


def test_set_profile_rewrites_the_top_level_key_only(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("profile: toy\nprofiles:\n  smoke:\n    profile: x\n")
    repro_time.set_profile(params, "smoke")
    assert params.read_text() == "profile: smoke\nprofiles:\n  smoke:\n    profile: x\n"
    params.write_text("data: {}\n")
    with pytest.raises(ValueError, match="no top-level `profile:` line"):
        repro_time.set_profile(params, "smoke")


def test_stage_times_split_the_output_at_each_stage_and_add_top_level_imports_only():
    lines = [
        (0.5, "import time:      100 |     200000 | dvc"),  # DVC's own, before any stage
        (1.0, "Running stage 'data':"),
        (1.1, "import time:      100 |    1500000 | torch"),
        (1.2, "import time:      100 |     700000 |   torch.nn"),  # nested: inside torch's 1.5 s
        (1.3, "import time:       50 |     250000 | yaml"),
        (4.0, "Running stage 'sweep':"),
        (4.5, "import time:      100 |    2000000 | ray"),
        (5.0, "\x1b[36m(run_trial pid=42)\x1b[0m import time:    10 |   3000000 | pipeline"),
        (5.1, "\x1b[36m(run_trial pid=42)\x1b[0m import time:    10 |   1000000 |   torch"),
        (5.2, "\x1b[36m(pid=43)\x1b[0m import time:    10 |    400000 | ray.dag"),
        (5.3, "(run_trial pid=43) import time:    10 |    600000 | pipeline.sweep"),
        (9.0, "Updating lock file 'dvc.lock'"),
        (9.5, ""),
    ]
    before, stages = repro_time.stage_times(lines)
    assert before == 1.0
    assert list(stages) == ["data", "sweep"]
    assert stages["data"]["wall"] == pytest.approx(3.0)
    assert stages["data"]["imports"] == pytest.approx(1.75)
    assert stages["sweep"]["wall"] == pytest.approx(5.5)
    assert stages["sweep"]["imports"] == pytest.approx(2.0)
    assert stages["sweep"]["workers"] == {"42": pytest.approx(3.0), "43": pytest.approx(1.0)}
    text = repro_time.report("smoke", before, stages, install=False)
    assert "stages              8.5        3.8" in text
    assert "total               9.5" in text
