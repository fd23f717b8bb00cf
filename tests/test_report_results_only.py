"""The report rebuilds from results files alone: with no tracking store (mlruns/ deleted, or results
checked out from a commit whose runs the store never held) the sweep tables and figures are written."""
import csv
import io
import json

from stages import report as stage
from test_report import PNG_MAGIC, result_trial, write_params, write_sweep, write_table1_results

# A launch of sweeps/lambda.yaml as its results file lists it: three finished trials, one that ASHA
# stopped early (its last losses, no final scores) and one that failed.
FINAL = {"winoground/text/object": 0.52, "winoground/image": 0.31, "winoground/group": 0.22,
         "aro/vg_relation": 0.59, "aro/vg_attribution": 0.63, "zeroshot/shape": 0.71, "loss/sds": 0.012}
LAMBDA = [
    ("t000", {"objective.lambda_sds": 0}, "finished",
     {**FINAL, "winoground/text": 0.516, "aro/overall": 0.61, "zeroshot/mean": 0.71}),
    ("t001", {"objective.lambda_sds": 1e-4}, "finished",
     {**FINAL, "winoground/text": 0.531, "aro/overall": 0.6, "zeroshot/mean": 0.69}),
    ("t002", {"objective.lambda_sds": 1e-3}, "finished",
     {**FINAL, "winoground/text": 0.547, "aro/overall": 0.62, "zeroshot/mean": 0.7}),
    ("t003", {"objective.lambda_sds": 1e-2}, "early_stopped", {"loss/sds": 0.02}),
    ("t004", {"objective.lambda_sds": 1e-1}, "failed", {}),
]


def test_the_sweep_table_and_figure_come_from_the_results_file_with_no_tracking_store(tmp_path):
    params = write_params(tmp_path)      # the default store: sqlite under mlruns/
    results = tmp_path / "results"
    write_table1_results(results)
    outcomes = {"winoground/text": {"correct": "10110100", "groups": None, "cases": "fixture"}}
    trials = [result_trial(*trial, outcomes=outcomes if trial[2] == "finished" else None) for trial in LAMBDA]
    (results / "sweeps.json").write_text(json.dumps({"lambda": write_sweep(results, "lambda", trials)}))

    assert stage.main(["--params", str(params)]) == 0

    reports = tmp_path / "reports"
    header, *rows = list(csv.reader(io.StringIO((reports / "sweep-lambda.csv").read_text())))
    column = {name: i for i, name in enumerate(header)}
    assert header[:3] == ["trial", "objective.lambda_sds", "status"]
    assert [row[:3] for row in rows] == [["t000", "0", "finished"], ["t001", "0.0001", "finished"],
                                        ["t002", "0.001", "finished"], ["t003", "0.01", "early_stopped"],
                                        ["t004", "0.1", "failed"]]
    assert [row[column["winoground/text"]] for row in rows] == ["0.516", "0.531", "0.547", "-", "-"]
    assert [row[column["aro/vg_relation"]] for row in rows] == ["0.590"] * 3 + ["-"] * 2
    assert len((reports / "sweep-lambda.md").read_text().splitlines()) == 2 + len(LAMBDA)
    assert (reports / "sweep-lambda.png").read_bytes().startswith(PNG_MAGIC)
    assert json.loads((reports / ".outputs.json").read_text()) == [
        "appendix-diffusion-score.csv", "appendix-diffusion-score.md", "appendix-diffusion-score.tex", "inference.png",
        "lambda.csv", "lambda.md", "lambda.png", "lambda.tex",
        "sweep-lambda.csv", "sweep-lambda.md", "sweep-lambda.png", "sweep-lambda.tex",
        "table1-intervals.csv", "table1-intervals.md", "table1-intervals.tex", "table1.csv", "table1.md", "table1.tex",
        "zeroshot.png"]
    # Its finished trials side by side, each against lambda 0; a metrics file is a Table-1 row's or a
    # named variant's, not a swept value's.
    compared = list(csv.DictReader(io.StringIO((reports / "lambda.csv").read_text())))
    assert [r["configuration"] for r in compared] == [f"objective.lambda_sds={v}" for v in ("0", "0.0001", "0.001")]
    assert sorted(p.name for p in (tmp_path / "metrics").iterdir()) == sorted(
        f"{stem}.json" for stem in ("pretrained", "ft-clip", "ft-sds", "diffusion-score"))
    assert not (tmp_path / "mlruns").exists()          # nothing opened a tracking store
