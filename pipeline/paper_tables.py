"""The paper's Tables 1-3 (and appendix L's CoCa) from the results files, seeds aggregated, and the
rows' points of its Fig. 1.

Rows: every student of the profile pretrained (the baselines stage), fine-tuned with L_CLIP and with
L_CLIP + lambda L_SDS (each seed of sweeps/table1.yaml, or the train_clip / train_sds stages' one
run of `train.student` when that sweep did not run), and the teacher's diffusion score. A row's
metrics are the means over its seeds; its Winoground text interval counts the seeds and the cases
(`comparison.seed_task_interval`), its seed spread is the standard deviation over seeds, and it is
compared with its student's FT-with-L_CLIP row on the same tasks (`comparison.paired_difference`).

A student goes to the table the paper reports it in (`published.yaml`: the LAION students to
Tables 2 and 3, CoCa to appendix L), any other to Table 1. A row is followed by the paper's numbers
when its config has the published row's setting (`published.beside_measured`: the paper profile,
SD v1-4, MS-COCO and, fine-tuned, appendix F's rate, batch, scope and lambda), so only on the paper
profile, and not in a study of another teacher or corpus.
`write_table` is the layout every such table shares, `pipeline.appendix`'s included.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import numpy as np

from pipeline import published
from pipeline.config import ConfigError, flatten, to_dict
from pipeline.comparison import outcome_parts, paired_difference, same_seeds, seed_task_interval
from pipeline.metrics import TIME_PER_PAIR
from pipeline.report import (COLUMNS, SEED, VariantRow, about, difference_cell, finished_with_outcomes, note_dropped,
                             objective_label, sd_cell, seed_sd, variant_row, write_tables, write_variant_report)
from pipeline.report_names import INTERVALS, TABLES
from pipeline.sweep.spec import fmt

STUDENT = "train.student"
TEXT = "winoground/text"


@dataclass
class Row:
    """One row: a student's run (None for the teacher's diffusion score) over its seeds."""

    student: str | None
    run: str                  # published.yaml's run names: pretrained | ft_<method> | diffusion_score
    label: str
    runs: list[dict]          # per seed: {"metrics": {...}, "outcomes": {...}}
    config: dict              # the run's whole config, dotted: which published row it stands beside

    @cached_property
    def outcomes(self) -> dict:
        """The per-case outcomes over its seeds, by metric (`comparison.outcome_parts`), decoded once:
        a table's columns, its intervals table and the rows set against it all read them."""
        with about(self.label):
            return outcome_parts([r.get("outcomes") or {} for r in self.runs])

    @property
    def metrics(self) -> dict[str, float]:
        """The mean over seeds of each metric every seed has."""
        keys = [k for k in self.runs[0]["metrics"] if all(k in r["metrics"] for r in self.runs[1:])]
        return {k: float(np.mean([r["metrics"][k] for r in self.runs])) for k in keys}


def ft_run(objective) -> str:
    """The published run name of a fine-tuning objective (`config.ObjectiveConfig`)."""
    return f"ft_{objective.method}"


def _configuration(params: dict) -> tuple:
    """A trial's whole config but the seed: what its row's other seeds share."""
    return tuple(sorted((k, repr(v)) for k, v in params.items() if k != SEED))


def trial_rows(cfg, trials: list[dict], sweep: str) -> list[Row]:
    """A row per configuration of sweep `sweep`'s finished trials with outcomes (their whole config, as
    the results file's `params` hold it, but the seed), in first-seen order, its runs by seed; labelled
    by student and objective, e.g. "toy-vit FT with L_CLIP + 0.1 L_SDS", and by any other key in which
    the configurations differ, e.g. "(train.lr=0.0001)"; configurations these leave one label, by the
    keys in which those differ too, e.g. "(objective.reduction=sum)"."""
    groups: dict[tuple, list[dict]] = {}
    for trial in trials:
        if finished_with_outcomes(trial):
            if not isinstance(trial.get("params"), dict):
                raise ConfigError(f"results of sweep {sweep}: trial {trial.get('trial')} has no params (its whole "
                                  "config, which the tables group and label rows by); run the sweep again")
            groups.setdefault(_configuration(trial["params"]), []).append(trial)
    configs = [runs[0]["params"] for runs in groups.values()]
    named = (SEED, STUDENT)
    differ = sorted({k for c in configs for k in c if not k.startswith("objective.") and k not in named
                     and any(o.get(k) != c[k] for o in configs)})
    out = []
    for runs in groups.values():
        runs.sort(key=lambda t: t["params"][SEED])
        params = runs[0]["params"]
        objective = replace(cfg.objective, **{key.removeprefix("objective."): value for key, value in params.items()
                                              if key.startswith("objective.")})
        label = f"{params[STUDENT]} {objective_label(objective)}"
        if differ:
            label += " (" + ", ".join(f"{key}={fmt(params.get(key))}" for key in differ) + ")"
        out.append(Row(params[STUDENT], ft_run(objective), label, runs, params))
    # The objective's label names its method and weights only: configurations it leaves one label
    # (another objective.reduction, say) are told apart by the keys in which they differ, as grouped.
    for label in dict.fromkeys(row.label for row in out):
        alike = [row for row in out if row.label == label]
        if len(alike) == 1:
            continue
        keys = sorted({k for a in alike for k in a.config if k not in (SEED, *differ)
                       and any(repr(b.config.get(k)) != repr(a.config[k]) for b in alike)})
        for row in alike:
            row.label += " (" + ", ".join(f"{key}={fmt(row.config.get(key))}" for key in keys) + ")"
    return out


def note_unfinished(trials: list[dict], sweep: str) -> None:
    """A note on stderr per configuration of sweep `sweep` none of whose trials finished with outcomes,
    so which has no row in the tables (`trial_rows`), naming its trials."""
    kept = {_configuration(t["params"]) for t in trials if finished_with_outcomes(t) and isinstance(t.get("params"), dict)}
    dropped: dict[tuple, list[dict]] = {}
    for trial in trials:
        if isinstance(trial.get("params"), dict) and _configuration(trial["params"]) not in kept:
            dropped.setdefault(_configuration(trial["params"]), []).append(trial)
    for runs in dropped.values():
        swept = ", ".join(f"{key}={value}" for key, value in (runs[0].get("config") or {}).items() if key != SEED)
        note_dropped(sweep, swept, runs, "the tables")


def rows(cfg, baselines: dict, stage_runs: dict[str, dict], table1_trials: list[dict] | None) -> list[Row]:
    """Every row, students in the profile's order: pretrained, then its fine-tuned rows (sweeps/table1.yaml's,
    or FT with L_CLIP and with the objective from the train_clip / train_sds results `stage_runs`
    ({"clip": ..., "sds": ...}) when `table1_trials` is None); then the diffusion score."""
    fine_tuned = []
    if table1_trials is not None:
        fine_tuned = trial_rows(cfg, table1_trials, "table1")
        note_unfinished(table1_trials, "table1")
    study = flatten(to_dict(cfg))
    out = []
    for student in cfg.students:
        out.append(Row(student, "pretrained", f"{student} pretrained", [baselines[f"pretrained/{student}"]], study))
        if table1_trials is None and student == cfg.train.student:
            # stages/train.py's L_CLIP-only run: objective.method clip, lambda 0.
            clip = {**study, "objective.method": "clip", "objective.lambda_sds": 0.0}
            out.append(Row(student, "ft_clip", f"{student} FT with L_CLIP", [stage_runs["clip"]], clip))
            label = f"{student} {objective_label(cfg.objective)}"
            if label == out[-1].label:     # params.yaml's objective is L_CLIP's too (lambda_sds 0): its own run
                label += " (train_sds)"
            out.append(Row(student, ft_run(cfg.objective), label, [stage_runs["sds"]], study))
        out += [row for row in fine_tuned if row.student == student]
    out.append(Row(None, published.DIFFUSION_SCORE, f"diffusion score ({cfg.teacher.name})",
                   [baselines[published.DIFFUSION_SCORE]], study))
    return out


def ft_clip_references(cfg, table_rows: list[Row]) -> dict[str | None, Row]:
    """Each student's first FT-with-L_CLIP row: what its other rows are compared with; the diffusion
    score's (student None): train.student's."""
    references: dict[str | None, Row] = {}
    for row in table_rows:
        if row.run == "ft_clip":
            references.setdefault(row.student, row)
    if cfg.train.student in references:
        references[None] = references[cfg.train.student]
    return references


def paper_numbers(table_id: str, row: Row) -> published.Cited | None:
    """The published numbers printed under `row` from `table_id` (`published.beside_measured`)."""
    return published.beside_measured(table_id, row.student, row.run, row.config)


def table_of(student: str | None, profile: str) -> str:
    """The published table a student's rows go to (the diffusion score's: Table 1)."""
    if profile == "paper" and student is not None:
        for table_id in TABLES:
            if any(r.student == student for r in published.table(table_id).rows):
                return table_id
    return "table1"


def own_numbers(row: Row, profile: str) -> published.Cited | None:
    """The published numbers of a Table-1 kind of row: from its student's table, or the diffusion
    score's appendix for the teacher's."""
    return paper_numbers(table_of(row.student, profile) if row.student else "appendix_diffusion_score", row)


def _parts(row: Row, key: str):
    """`key`'s per-case outcomes over the row's seeds (None when a seed lacks them)."""
    return row.outcomes.get(key)


def _interval(row: Row, key: str, n_resamples: int, seed: int) -> str:
    if (parts := _parts(row, key)) is None:
        return "-"
    _, low, high = seed_task_interval(parts, n_resamples, seed=seed)
    return f"[{low:.3f}, {high:.3f}]"


def _seed_sd(row: Row, key: str) -> str:
    values = [r["metrics"][key] for r in row.runs if key in r["metrics"]]
    return sd_cell(seed_sd(values))


def _seeds(row: Row) -> list:
    return [run.get("params", {}).get(SEED) for run in row.runs]


def _versus(row: Row, reference: Row | None, key: str, n_resamples: int, seed: int) -> str:
    if reference is None or row is reference:
        return "-"
    a, b = _parts(row, key), _parts(reference, key)
    if a is None or b is None:
        return "-"
    # Fine-tuned rows of one student that ran the same seeds drew, seed by seed, the same data order and start.
    paired = same_seeds(_seeds(row), _seeds(reference))
    with about(f"{row.label} against {reference.label}"):
        cell = difference_cell(paired_difference(a, b, n_resamples, seed=seed, pair_seeds=paired))
    # A row with no student of its own (the diffusion score) says whose reference row it is set against.
    return cell if row.student or not reference.student else f"{cell} (vs {reference.student})"


@dataclass(frozen=True)
class Comparison:
    """The metric a table's last columns are about: seed spread, 95% interval and the paired difference
    to each row's reference row (named `against`, e.g. "FT with L_CLIP"), on the same cases."""

    name: str                 # as the table shows the metric, e.g. "Wino text"
    key: str                  # its metric key
    against: str
    against_key: str          # the reference in the CSV header, e.g. "ft_clip"


TEXT_VS_FT_CLIP = Comparison("Wino text", TEXT, "FT with L_CLIP", "ft_clip")


def write_table(out: Path, stem: str, table_rows: list[Row], paper: list[published.Cited | None],
                columns: list[tuple[str, str]], comparison: Comparison, reference: Callable[[Row], Row | None],
                n_resamples: int = 1000, seed: int = 0) -> list[Path]:
    """`<stem>.md/.tex/.csv`: a row per measured row (`columns`' metrics, its seed count and the
    comparison's columns), each followed by its published row from `paper` (one entry per row, None
    where the paper has none); a note under the table cites each published table those rows are from."""
    keys = [key for _, key in columns]
    c = comparison
    extra = ["seeds", f"{c.name} seed sd", f"{c.name} 95% CI", f"{c.name} vs {c.against}"]
    extra_keys = ["seeds", f"{c.key}/seed_sd", f"{c.key}/ci95", f"{c.key}/vs_{c.against_key}"]
    labels = [r.label for r in table_rows]
    if len(set(labels)) < len(labels):      # a row's last cells are found by its label
        shared = sorted({label for label in labels if labels.count(label) > 1})
        raise ValueError(f"{stem}: rows share a label: {', '.join(shared)}; each row needs its own")
    header, cells, notes = published.beside(["run"] + [name for name, _ in columns], keys,
                                            [(r.label, r.metrics) for r in table_rows], paper)
    by_label = {r.label: [str(len(r.runs)), _seed_sd(r, c.key), _interval(r, c.key, n_resamples, seed),
                          _versus(r, reference(r), c.key, n_resamples, seed)] for r in table_rows}
    cells = [row + by_label.get(row[0], ["-"] * len(extra)) for row in cells]
    return write_tables(out, stem, header + extra, ["run"] + keys + extra_keys, cells, notes)


def interval_rows(table_rows: list[Row], reference: Callable[[Row], Row | None], n_resamples: int = 1000,
                  seed: int = 0) -> list[VariantRow]:
    """Each row's every headline metric with its seed spread and interval, and its paired difference to
    its `reference` row (None, or itself: no difference), as a sweep's variants are compared."""
    out = []
    for row in table_rows:
        against = reference(row)
        compared = against is not None and against is not row
        parts, against_parts = row.outcomes, against.outcomes if compared else None
        with about(f"{row.label} against {against.label}") if compared else nullcontext():
            out.append(variant_row(row.label, row.runs, parts, _seeds(row), against_parts,
                                   compared and same_seeds(_seeds(row), _seeds(against)), n_resamples, seed))
    return out


def write(cfg, table_rows: list[Row], out: Path, n_resamples: int = 1000, seed: int = 0) -> list[Path]:
    """Each table that has rows, as `<stem>.md/.tex/.csv` under `out` (the paper's numbers under the
    measured ones on the paper profile), each row against its student's FT with L_CLIP; and beside it
    `<stem>-intervals.*`: every headline metric of each row with its interval and that comparison."""
    references = ft_clip_references(cfg, table_rows)
    written = []
    for table_id, stem in TABLES.items():
        chosen = [r for r in table_rows if table_of(r.student, cfg.profile) == table_id]
        if not chosen:
            continue
        paper = [own_numbers(r, cfg.profile) for r in chosen]
        reference = lambda r: references.get(r.student)    # noqa: E731
        written += write_table(out, stem, chosen, paper, COLUMNS, TEXT_VS_FT_CLIP, reference, n_resamples, seed)
        against = f"its student's {TEXT_VS_FT_CLIP.against}"
        if any(r.student is None and reference(r) is not None for r in chosen):      # Table 1's diffusion score
            against += f" (the diffusion score: {cfg.train.student}'s)"
        written += write_variant_report(stem + INTERVALS, interval_rows(chosen, reference, n_resamples, seed),
                                        {}, out, n_resamples, caption=f"{stem}: every headline metric",
                                        against=against, row_header="run")
    return written


def headline_rows(cfg, table_rows: list[Row]) -> list[tuple[str, dict[str, float]]]:
    """train.student's pretrained, FT with L_CLIP and FT with the teacher's loss rows and the diffusion
    score, in that order, for `pipeline.headline`; a row without finished runs has no metrics."""
    def find(match) -> tuple[str, dict[str, float]]:
        row = next((r for r in table_rows if match(r)), None)
        return (row.label, row.metrics) if row else ("", {})

    student = lambda r: r.student == cfg.train.student  # noqa: E731
    return [find(lambda r: student(r) and r.run == "pretrained"), find(lambda r: student(r) and r.run == "ft_clip"),
            find(lambda r: student(r) and r.run.startswith("ft_") and r.run != "ft_clip"),
            find(lambda r: r.run == published.DIFFUSION_SCORE)]


def inference_points(table_rows: list[Row]) -> list[tuple[str, float, float, tuple[float, float] | None]]:
    """Fig. 1's points (`figures.inference_figure`): each pretrained student and the diffusion score
    with a Winoground text score, its interval and its time per image-caption pair."""
    points = []
    for row in table_rows:
        metrics = row.runs[0]["metrics"]
        if row.run in ("pretrained", published.DIFFUSION_SCORE) and TIME_PER_PAIR in metrics and TEXT in metrics:
            samples = row.runs[0].get("diffusion_samples")
            label = row.label if samples is None else f"{row.label}, {samples} samples"
            low, high = metrics.get(f"{TEXT}/ci_low"), metrics.get(f"{TEXT}/ci_high")
            points.append((label, metrics[TIME_PER_PAIR], metrics[TEXT], (low, high) if low is not None else None))
    return points
