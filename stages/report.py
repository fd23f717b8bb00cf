"""DVC stage `report`: tables and figures from the stages' and the sweeps' results files, under reports/.

    reports/table1.md, .tex, .csv   the paper's Table 1 (`pipeline.paper_tables`): every student
                                    pretrained, FT with L_CLIP and FT with L_CLIP + lambda L_SDS
                                    (sweeps/table1.yaml's seeds when it ran, else the train_clip /
                                    train_sds runs of train.student), the teacher's diffusion score;
                                    means over seeds, seed spread, 95% interval, and each row's
                                    Winoground text score against its student's FT with L_CLIP on
                                    the same tasks (paired interval, p-value); on the paper profile
                                    each row followed by the published one ("(paper)")
    reports/table2.*, table3.*, table-coca.*
                                    the same for the students the paper reports in its Tables 2
                                    and 3 (LAION ViT-B/16) and appendix L (CoCa), paper profile
    reports/appendix-*.md, .tex, .csv
                                    the paper's appendix tables (`pipeline.appendix`): UNet-feature
                                    distillation (A.2, from the sweep that ran it), the diffusion
                                    score on ARO and the order sets, CLEVR (J), and on the paper
                                    profile SD v2-1 (G) and CC-3M (H) when the study ran them;
                                    appendix F's lambda and learning-rate ablations are the
                                    sweep-lambda and sweep-lr outputs below
    reports/zeroshot.png            the paper's Fig. 2: accuracy per zero-shot set of
                                    train.student's rows, with 95% intervals over seeds and the
                                    set's cases (not written when none has a set)
    reports/inference.png           the paper's Fig. 1: each pretrained student's and the
                                    diffusion score's Winoground text score against its time
                                    per image-caption pair (log scale), as the baselines measured
    reports/sweep-<name>.md, .tex, .csv
                                    per sweep in results/sweeps.json that ran (has a parent
                                    run), from its results/sweeps/<name>.json: a row per trial,
                                    its swept values, status and scores
    reports/sweep-<name>.png        a panel per headline score that differs between that
                                    sweep's trials, against the swept key (or per configuration
                                    when several or non-numeric keys were swept), with 95%
                                    intervals; not written when no trial has a score
    reports/<name>.md, .tex, .csv, .png
                                    per sweep whose trials set one key besides the seed: named
                                    variants (sweeps/methods.yaml) or one param (sweeps/lambda.yaml):
                                    each configuration's headline scores over its seeds with
                                    intervals, its difference to the first (the table's first row)
                                    with a paired interval and p-value, diagnostics, and a figure
                                    of the differences (`pipeline.report`)

    metrics/*.json                  the headline scores of train.student's Table-1 rows and of each
                                    variant of a variant sweep, one file each with the same keys
                                    (`pipeline.headline`): the study's DVC metrics

The sweep outputs are those `python -m pipeline.report SWEEP` writes for a sweep run by hand.

Only results files are read, never the tracking store (MLflow): after `dvc checkout` of another
commit, or with mlruns/ deleted, the report rebuilds the same. Without results/sweeps.json there
are no sweep outputs; a sweep it lists as ran whose results file is missing is an error, and a
file in results/sweeps/ of a sweep it does not list is not read. Outputs an earlier report wrote
and this one does not are removed (reports/.outputs.json lists the last report's), so none of
reports/ is stale; other files in reports/ stay. Every output is made before any reaches reports/
or metrics/: run by hand, bad results (runs set together that were scored on other cases) leave both
as they were (`dvc repro` removes both before it runs the stage).
"""
import json
import sys
from pathlib import Path

from pipeline import appendix, cli, paper_tables
from pipeline.config import ConfigError
from pipeline.data.errors import load_json
from pipeline.io import write_json
from pipeline.report_names import FIGURES, SWEEP_PREFIX, TABLE1_SWEEP, fixed_stems
from pipeline.figures import inference_figure, write_figure, zeroshot_figure
from pipeline.headline import FOLDER, headline_files, write_headline
from pipeline.report import (VARIANT, building_for, check_outcomes, compared_key, compared_rows, move_into, notes_held,
                             read_trials, resamples, results_of, sweep_report)



def table_files(results: Path, table1_ran: bool) -> dict[str, Path]:
    """The results files of the paper tables' rows: the baselines', and the train_clip / train_sds
    stages' unless sweeps/table1.yaml ran (`sweep_file`), by what they hold."""
    files = {"baselines": results / "baselines.json"}
    if table1_ran:
        return {**files, TABLE1_SWEEP: sweep_file(results, TABLE1_SWEEP)}
    return {**files, **{variant: results / f"train-{variant}.json" for variant in ("clip", "sds")}}


def table_rows(cfg, results: Path, trials: list[dict] | None) -> list[paper_tables.Row]:
    """The paper tables' rows from the stages' results files, with sweeps/table1.yaml's trials when it ran."""
    files = table_files(results, trials is not None)
    baselines = load_json(files["baselines"], "results of the baselines stage")
    for row, entry in baselines.items():
        check_outcomes(entry.get("outcomes") or {}, files["baselines"], row)
    stage_runs = None if trials is not None else {
        variant: load_json(files[variant], f"results of the train_{variant} stage") for variant in ("clip", "sds")}
    for variant, run in (stage_runs or {}).items():
        check_outcomes(run.get("outcomes") or {}, files[variant], "run")
    return paper_tables.rows(cfg, baselines, stage_runs, trials)


def ran_sweeps(results: Path) -> list[str]:
    """The sweeps results/sweeps.json lists as having opened a parent run: those that wrote a results file."""
    listed = results / "sweeps.json"
    sweeps = load_json(listed, "sweep list") if listed.is_file() else {}
    return [name for name, entry in sweeps.items() if entry.get("parent_run_id")]


OUTPUTS = ".outputs.json"   # what the last report wrote, so what it no longer writes can go


def stale_outputs(reports: Path, written: list[Path]) -> list[Path]:
    """The report's own outputs present in `reports` that this report did not write: those the
    last report listed, every sweep-* file and every fixed one (`report_names`); other files stay."""
    listed = reports / OUTPUTS
    previous = [reports / name for name in json.loads(listed.read_text())] if listed.is_file() else []
    candidates = [*previous, *reports.glob(f"{SWEEP_PREFIX}*"), *(reports / f"{stem}.png" for stem in FIGURES),
                  *(reports / f"{stem}.{suffix}" for stem in fixed_stems() if stem not in FIGURES
                    for suffix in ("md", "tex", "csv"))]
    return [path for path in dict.fromkeys(candidates) if path.is_file() and path not in written]


def sweep_file(results: Path, name: str) -> Path:
    """Sweep `name`'s results file (`pipeline.sweep`'s payload) in the sweep stage's output folder."""
    return results / "sweeps" / f"{name}.json"


def write_outputs(cfg, results: Path, sweeps: dict[str, list[dict]], rows: list[paper_tables.Row],
                  out: Path) -> tuple[list[Path], dict[str, list]]:
    """Every output of the report under `out`, and the variant rows of each sweep of named variants
    (`pipeline.headline`'s metrics files)."""
    n_resamples = resamples(cfg)
    tables = list(table_files(results, TABLE1_SWEEP in sweeps).values())
    with results_of(tables, "the paper's tables"):
        written = paper_tables.write(cfg, rows, out, n_resamples, cfg.eval.seed)
        main_student = [(r.label, r.runs) for r in rows if r.student == cfg.train.student]
        points = paper_tables.inference_points(rows)
        zeroshot, inference = (out / f"{stem}.png" for stem in FIGURES)
        for path, figure in ((zeroshot, zeroshot_figure(main_student, n_resamples, cfg.eval.seed)),
                             (inference, inference_figure(points) if points else None)):
            if figure is not None:
                written.append(write_figure(path, figure))
    appendix_inputs = tables + [sweep_file(results, name) for name in sweeps if name != TABLE1_SWEEP]
    with results_of(appendix_inputs, "the appendix tables"):
        written += appendix.write(cfg, rows, sweeps, out, n_resamples, cfg.eval.seed)
    variants = {}
    for name, trials in sweeps.items():
        with results_of([sweep_file(results, name)], f"sweep {name}"):
            compared = compared_rows(name, trials, cfg)
            written += sweep_report(name, trials, compared, cfg, out)
        if compared_key(trials) == VARIANT:    # a metrics file per named variant, not per swept value
            variants[name] = compared
    return written, variants


def body(args, cfg, root):
    results, reports = root / "results", root / "reports"
    sweeps = {name: read_trials(sweep_file(results, name), f"results of sweep {name} (listed in "
                                                             f"{results / 'sweeps.json'})")
              for name in ran_sweeps(results)}
    # The metrics files too are made before any output moves in: bad results met on the way leave
    # reports/ and metrics/ as the last report left them, and their error is the one line shown.
    with notes_held(), building_for(reports) as building:
        rows = table_rows(cfg, results, sweeps.get(TABLE1_SWEEP))
        written, variants = write_outputs(cfg, results, sweeps, rows, building)
        names = [path.name for path in written]
        if len(set(names)) < len(names):
            twice = sorted({name for name in names if names.count(name) > 1})
            raise ConfigError(f"sweeps: the report would write {', '.join(twice)} twice (a sweep named like another "
                              "of its outputs); give that sweep another `name`")
        headline = headline_files(paper_tables.headline_rows(cfg, rows), variants)
        placed = move_into(written, reports)
    for path in stale_outputs(reports, placed):
        path.unlink()
    write_json(reports / OUTPUTS, sorted(path.name for path in placed))
    write_headline(headline, root / FOLDER)


def main(argv=None) -> int:
    return cli.run(__doc__, body, argv)


if __name__ == "__main__":
    sys.exit(main())
