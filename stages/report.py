"""DVC stage `report`: tables and figures from the stages' results files and the sweeps' runs in MLflow, under reports/.

    reports/table1.md, .tex, .csv   the paper's Table 1: pretrained student, FT with L_CLIP,
                                    FT with L_CLIP + lambda L_SDS, the teacher's diffusion score,
                                    and each row's Winoground text score against FT with L_CLIP
                                    on the same tasks (paired interval, McNemar's exact p)
    reports/zeroshot.png            the paper's Fig. 2: accuracy per zero-shot set of the
                                    Table-1 runs that have one (not written when none has)
    reports/sweep-<name>.md, .tex, .csv
                                    per sweep in results/sweeps.json that ran (has a parent
                                    run): a row per trial, its swept params, status and scores
    reports/sweep-<name>.png        that sweep's scores against the swept param (or per trial
                                    when several or non-numeric params were swept); not
                                    written when no trial has a score
    reports/<name>.md, .tex, .csv, .png
                                    per sweep that ran named variants (and nothing else but
                                    seeds), e.g. sweeps/methods.yaml: each variant's headline
                                    scores over its seeds with intervals, its difference to the
                                    first variant with a paired interval and p-value, diagnostics,
                                    and a figure of the differences (`pipeline.report`)

Without results/sweeps.json there are no sweep outputs. Outputs an earlier report wrote and this
one does not are removed (reports/.outputs.json lists the last report's), so none of reports/ is
stale; other files in reports/ stay.
"""
import json
import sys
from pathlib import Path

from pipeline import cli
from pipeline.io import write_json
from pipeline.report import (compare_variants, objective_label, versus_reference, write_figure, write_sweep_report, write_table1, write_variant_report,
                             zeroshot_figure)
from pipeline.tracking import Tracker


def table1_runs(cfg, results: Path) -> list[tuple[str, dict[str, float], dict]]:
    """(row label, metrics, per-case outcomes) of the Table-1 runs, in the table's order, from the
    stages' results files."""
    baselines = json.loads((results / "baselines.json").read_text())
    ordered = [(f"pretrained {name}", baselines[f"pretrained/{name}"]) for name in cfg.students
               if name == cfg.train.student]
    for variant, label in (("clip", FT_CLIP), ("sds", objective_label(cfg.objective))):
        ordered.append((label, json.loads((results / f"train-{variant}.json").read_text())))
    ordered.append((f"diffusion score ({cfg.teacher.name})", baselines["diffusion_score"]))
    return [(label, entry["metrics"], entry.get("outcomes", {})) for label, entry in ordered]


def ran_sweeps(results: Path) -> dict[str, dict]:
    """Sweep name -> its results/sweeps.json entry, for the sweeps that opened a parent run."""
    listed = results / "sweeps.json"
    sweeps = json.loads(listed.read_text()) if listed.is_file() else {}
    return {name: entry for name, entry in sweeps.items() if entry.get("parent_run_id")}


FT_CLIP = "FT with L_CLIP"   # Table 1's reference row: every other row is compared with it
OUTPUTS = ".outputs.json"   # what the last report wrote, so what it no longer writes can go


def stale_outputs(reports: Path, written: list[Path]) -> list[Path]:
    """The report's own outputs present in `reports` that this report did not write: those the
    last report listed, every sweep-* file and the zero-shot figure; other files stay."""
    listed = reports / OUTPUTS
    previous = [reports / name for name in json.loads(listed.read_text())] if listed.is_file() else []
    candidates = [*previous, *reports.glob("sweep-*"), reports / "zeroshot.png"]
    return [path for path in dict.fromkeys(candidates) if path.is_file() and path not in written]


def variant_report(name: str, results: Path, cfg, reports: Path) -> list[Path]:
    """`reports/<name>.*` when the sweep's results hold named variants and no other swept key."""
    path = results / f"sweep-{name}.json"
    if not path.is_file():
        return []
    trials = json.loads(path.read_text())["trials"]
    configs = [trial.get("config") or {} for trial in trials]
    if not any("variant" in c for c in configs) or any(set(c) - {"variant", "train.seed"} for c in configs):
        return []
    order = list(dict.fromkeys(c["variant"] for c in configs if "variant" in c))
    rows = compare_variants(trials, order, cfg.eval.bootstrap or 1000, cfg.eval.seed)
    if not rows:
        print(f"sweep {name}: no finished trial with outcomes; no {name} report", file=sys.stderr)
        return []
    return write_variant_report(name, rows, {}, reports, cfg.eval.bootstrap or 1000, caption=f"sweep {name}")


def body(args, cfg, root):
    results, reports = root / "results", root / "reports"
    tracker = Tracker(cfg.tracking, root)
    rows = table1_runs(cfg, results)
    runs = [(label, metrics) for label, metrics, _ in rows]
    versus = versus_reference({label: outcomes for label, _, outcomes in rows}, FT_CLIP,
                              cfg.eval.bootstrap or 1000, cfg.eval.seed)
    written = write_table1(runs, reports, versus=versus, reference=FT_CLIP)
    figure = zeroshot_figure(runs)
    if figure is not None:
        written.append(write_figure(reports / "zeroshot.png", figure))
    for name, entry in ran_sweeps(results).items():
        children = tracker.find_runs(entry["experiment"], parent=entry["parent_run_id"])
        if not children:
            print(f"sweep {name}: no trial runs under parent run {entry['parent_run_id']} in "
                  f"{tracker.uri}", file=sys.stderr)
        written += write_sweep_report(name, children, reports)
        written += variant_report(name, results, cfg, reports)
    for path in stale_outputs(reports, written):
        path.unlink()
    write_json(reports / OUTPUTS, sorted(path.name for path in written))


def main(argv=None) -> int:
    return cli.run(__doc__, body, argv)


if __name__ == "__main__":
    sys.exit(main())
