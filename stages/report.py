"""DVC stage `report`: tables and figures from the stages' and the sweeps' results files, under reports/.

    reports/table1.md, .tex, .csv   the paper's Table 1: pretrained student, FT with L_CLIP,
                                    FT with L_CLIP + lambda L_SDS, the teacher's diffusion score,
                                    and each row's Winoground text score against FT with L_CLIP
                                    on the same tasks (paired interval, McNemar's exact p)
    reports/zeroshot.png            the paper's Fig. 2: accuracy per zero-shot set of the
                                    Table-1 runs that have one (not written when none has)
    reports/sweep-<name>.md, .tex, .csv
                                    per sweep in results/sweeps.json that ran (has a parent
                                    run), from its results/sweeps/<name>.json: a row per trial,
                                    its swept values, status and scores
    reports/sweep-<name>.png        that sweep's scores against the swept key (or per
                                    configuration when several or non-numeric keys were
                                    swept); not written when no trial has a score
    reports/<name>.md, .tex, .csv, .png
                                    per sweep that ran named variants (and nothing else but
                                    seeds), e.g. sweeps/methods.yaml: each variant's headline
                                    scores over its seeds with intervals, its difference to the
                                    first variant with a paired interval and p-value, diagnostics,
                                    and a figure of the differences (`pipeline.report`)

Only results files are read, never the tracking store (MLflow): after `dvc checkout` of another
commit, or with mlruns/ deleted, the report rebuilds the same. Without results/sweeps.json there
are no sweep outputs; a sweep it lists as ran whose results file is missing is an error, and a
file in results/sweeps/ of a sweep it does not list is not read. Outputs an earlier report wrote
and this one does not are removed (reports/.outputs.json lists the last report's), so none of
reports/ is stale; other files in reports/ stay.
"""
import json
import sys
from pathlib import Path

from pipeline import cli
from pipeline.data.errors import field_value, load_json, require_list, require_record, str_field
from pipeline.io import write_json
from pipeline.report import (compare_variants, objective_label, versus_reference, write_figure, write_sweep_report,
                             write_table1, write_variant_report, zeroshot_figure)


def table1_runs(cfg, results: Path) -> list[tuple[str, dict[str, float], dict]]:
    """(row label, metrics, per-case outcomes) of the Table-1 runs, in the table's order, from the
    stages' results files."""
    baselines = load_json(results / "baselines.json", "results of the baselines stage")
    ordered = [(f"pretrained {name}", baselines[f"pretrained/{name}"]) for name in cfg.students
               if name == cfg.train.student]
    for variant, label in (("clip", FT_CLIP), ("sds", objective_label(cfg.objective))):
        ordered.append((label, load_json(results / f"train-{variant}.json", f"results of the train_{variant} stage")))
    ordered.append((f"diffusion score ({cfg.teacher.name})", baselines["diffusion_score"]))
    return [(label, entry["metrics"], entry.get("outcomes", {})) for label, entry in ordered]


def ran_sweeps(results: Path) -> list[str]:
    """The sweeps results/sweeps.json lists as having opened a parent run: those that wrote a results file."""
    listed = results / "sweeps.json"
    sweeps = load_json(listed, "sweep list") if listed.is_file() else {}
    return [name for name, entry in sweeps.items() if entry.get("parent_run_id")]


FT_CLIP = "FT with L_CLIP"   # Table 1's reference row: every other row is compared with it
OUTPUTS = ".outputs.json"   # what the last report wrote, so what it no longer writes can go


def stale_outputs(reports: Path, written: list[Path]) -> list[Path]:
    """The report's own outputs present in `reports` that this report did not write: those the
    last report listed, every sweep-* file and the zero-shot figure; other files stay."""
    listed = reports / OUTPUTS
    previous = [reports / name for name in json.loads(listed.read_text())] if listed.is_file() else []
    candidates = [*previous, *reports.glob("sweep-*"), reports / "zeroshot.png"]
    return [path for path in dict.fromkeys(candidates) if path.is_file() and path not in written]


def sweep_file(results: Path, name: str) -> Path:
    """Sweep `name`'s results file (`pipeline.sweep`'s payload) in the sweep stage's output folder."""
    return results / "sweeps" / f"{name}.json"


def sweep_trials(results: Path, name: str) -> list[dict]:
    """The trials of the sweep's results file, each with its label and status."""
    path = sweep_file(results, name)
    listed = results / "sweeps.json"
    payload = require_record(load_json(path, f"results of sweep {name} (listed in {listed})"), path, "")
    trials = require_list(field_value(payload, "trials", path, ""), path, "", "trials")
    for i, trial in enumerate(trials):
        for key in ("trial", "status"):     # what every row shows
            str_field(require_record(trial, path, f"trial {i}"), key, path, f"trial {i}")
    return trials


def variant_report(name: str, trials: list[dict], cfg, reports: Path) -> list[Path]:
    """`reports/<name>.*` when the sweep's trials hold named variants and no other swept key."""
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
    rows = table1_runs(cfg, results)
    runs = [(label, metrics) for label, metrics, _ in rows]
    versus = versus_reference({label: outcomes for label, _, outcomes in rows}, FT_CLIP,
                              cfg.eval.bootstrap or 1000, cfg.eval.seed)
    written = write_table1(runs, reports, versus=versus, reference=FT_CLIP)
    figure = zeroshot_figure(runs)
    if figure is not None:
        written.append(write_figure(reports / "zeroshot.png", figure))
    for name in ran_sweeps(results):
        trials = sweep_trials(results, name)
        if not trials:
            print(f"sweep {name}: no trials in {sweep_file(results, name)}", file=sys.stderr)
        written += write_sweep_report(name, trials, reports)
        written += variant_report(name, trials, cfg, reports)
    for path in stale_outputs(reports, written):
        path.unlink()
    write_json(reports / OUTPUTS, sorted(path.name for path in written))


def main(argv=None) -> int:
    return cli.run(__doc__, body, argv)


if __name__ == "__main__":
    sys.exit(main())
