"""DVC stage `report`: tables and figures from the runs in MLflow, under reports/.

    reports/table1.md, .tex, .csv   the paper's Table 1: pretrained student, FT with L_CLIP,
                                    FT with L_CLIP + lambda L_SDS, the teacher's diffusion score
    reports/zeroshot.png            the paper's Fig. 2: accuracy per zero-shot set of the
                                    Table-1 runs that have one (not written when none has)
    reports/sweep-<name>.md, .tex, .csv
                                    per sweep in results/sweeps.json that ran (has a parent
                                    run): a row per trial, its swept params, status and scores
    reports/sweep-<name>.png        that sweep's scores against the swept param (or per trial
                                    when several or non-numeric params were swept); not
                                    written when no trial has a score

Without results/sweeps.json there are no sweep outputs. Sweep outputs and a zero-shot figure
that an earlier report wrote and this one does not are removed, so none of reports/ is stale.
"""
import json
import sys
from pathlib import Path

from pipeline import cli
from pipeline.report import write_figure, write_sweep_report, write_table1, zeroshot_figure
from pipeline.tracking import Tracker


def table1_runs(cfg, results: Path, tracker: Tracker) -> list[tuple[str, dict[str, float]]]:
    """(row label, metrics) of the Table-1 runs, in the table's order."""
    baselines = json.loads((results / "baselines.json").read_text())
    ordered = [(f"pretrained {name}", baselines[f"pretrained/{name}"]["run_id"]) for name in cfg.students
               if name == cfg.train.student]
    for variant, label in (("clip", "FT with L_CLIP"), ("sds", f"FT with L_CLIP + {cfg.objective.lambda_sds:g} L_SDS")):
        ordered.append((label, json.loads((results / f"train-{variant}.json").read_text())["run_id"]))
    ordered.append((f"diffusion score ({cfg.teacher.name})", baselines["diffusion_score"]["run_id"]))
    runs = tracker.runs(run_id for _, run_id in ordered)
    return [(label, run["metrics"]) for (label, _), run in zip(ordered, runs)]


def ran_sweeps(results: Path) -> dict[str, dict]:
    """Sweep name -> its results/sweeps.json entry, for the sweeps that opened a parent run."""
    listed = results / "sweeps.json"
    sweeps = json.loads(listed.read_text()) if listed.is_file() else {}
    return {name: entry for name, entry in sweeps.items() if entry.get("parent_run_id")}


def stale_outputs(reports: Path, written: list[Path]) -> list[Path]:
    """Sweep outputs and the zero-shot figure present in `reports` that this report did not write."""
    candidates = [*reports.glob("sweep-*"), reports / "zeroshot.png"]
    return [path for path in candidates if path.is_file() and path not in written]


def body(args, cfg, root):
    results, reports = root / "results", root / "reports"
    tracker = Tracker(cfg.tracking, root)
    runs = table1_runs(cfg, results, tracker)
    written = write_table1(runs, reports)
    figure = zeroshot_figure(runs)
    if figure is not None:
        written.append(write_figure(reports / "zeroshot.png", figure))
    for name, entry in ran_sweeps(results).items():
        children = tracker.find_runs(entry["experiment"], parent=entry["parent_run_id"])
        if not children:
            print(f"sweep {name}: no trial runs under parent run {entry['parent_run_id']} in "
                  f"{tracker.uri}", file=sys.stderr)
        written += write_sweep_report(name, children, reports)
    for path in stale_outputs(reports, written):
        path.unlink()


def main(argv=None) -> int:
    return cli.run(__doc__, body, argv)


if __name__ == "__main__":
    sys.exit(main())
