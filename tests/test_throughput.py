"""benchmarks/throughput.py: its models are the paper's SD v1-4, its options answer at once, and a
tiny-budget run goes end to end through the trainer's step and the diffusion scorer, so a change of
their signatures fails here rather than when someone next measures."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.models import paper

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "throughput.py"
sys.path.insert(0, str(SCRIPT.parent))
import throughput  # noqa: E402


def test_help_names_the_options_without_importing_the_models():
    proc = subprocess.run([sys.executable, "-X", "importtime", str(SCRIPT), "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for flag in ("--student", "--batch", "--samples", "--size", "--device", "--steps", "--warmup", "--impl",
                 "--peak-tflops"):
        assert flag in proc.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" in imported and not imported & {"diffusers", "open_clip", "transformers", "pipeline.models.paper"}


def test_the_sizes_are_sd_v1_4_as_the_models_stage_builds_it():
    sd = paper.TEACHER_CONFIGS[paper.SD_V1_4]
    full, reduced = throughput.sizes()["full"], throughput.sizes()["reduced"]
    assert full.unet is sd["unet"] and full.text is sd["text_encoder"] and full.text_tokens == 77
    for key in ("down_block_types", "up_block_types", "layers_per_block", "attention_head_dim"):
        assert reduced.unet[key] == full.unet[key], key
    assert reduced.text_tokens == 77
    # Shapes only (meta device): SD v1-4's UNet and text encoder, counted as in test_paper_models.py.
    assert throughput.parameter_count(throughput.build_unet(full.unet, "meta", seed=0)) == 859_520_964
    assert throughput.parameter_count(throughput.build_text_encoder(full.text, "meta", seed=0)) == 123_060_480


@pytest.mark.slow
def test_the_smallest_run_prints_both_workloads_and_writes_json(tmp_path):
    out = tmp_path / "throughput.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--size", "reduced", "--device", "cpu", "--impl",
                           "plain,project,fast", "--batch", "2", "--samples", "2", "--steps", "1", "--warmup", "0",
                           "--rounds", "1", "--threads", "1", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    for workload, ratio_column in (("training step", -1), ("diffusion score", -2)):
        lines = text.split(workload, 1)[1].splitlines()
        assert "vs plain" in lines[1], lines
        rows = {line.split()[0]: line.split() for line in lines[2:5]}
        assert set(rows) == {"plain", "project", "fast"}, lines
        assert rows["plain"][ratio_column] == "1.00x"
        for impl in ("project", "fast"):
            assert rows[impl][ratio_column].endswith("x") and float(rows[impl][ratio_column][:-1]) > 0
    results = json.loads(out.read_text())
    for workload in ("train", "score"):
        assert [r["impl"] for r in results[workload]] == ["plain", "project", "fast"]
        for r in results[workload]:
            assert r["samples_per_s"] > 0 and r["flops_per_sample"] > 0, r
    # The plain path also runs the teacher's text encoder and the UNet's weight gradients: more FLOPs.
    train = {r["impl"]: r["flops_per_sample"] for r in results["train"]}
    assert train["plain"] > train["project"] == train["fast"]
