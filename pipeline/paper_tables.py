"""The paper's Tables 1-3 (and appendix L's CoCa) from the results files, seeds aggregated, and the
rows' points of its Fig. 1.

Rows: every student of the profile pretrained (the baselines stage), fine-tuned with L_CLIP and with
L_CLIP + lambda L_SDS (each seed of sweeps/table1.yaml, or the train_clip / train_sds stages' one
run of `train.student` when that sweep did not run), and the teacher's diffusion score. A row's
metrics are the means over its seeds; its Winoground text interval resamples seeds and cases
(`metrics.seed_task_interval`), its seed spread is the standard deviation over seeds, and it is
compared with its student's FT-with-L_CLIP row on the same tasks (`metrics.paired_difference`).

A student goes to the table the paper reports it in (`published.yaml`: the LAION students to
Tables 2 and 3, CoCa to appendix L), any other to Table 1. On the paper profile every row is
followed by the paper's numbers (`published.beside`).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from pipeline import published
from pipeline.metrics import TIME_PER_PAIR, outcome_parts, paired_difference, seed_task_interval
from pipeline.report import COLUMNS, VARIANT, difference_cell, objective_label, write_tables

# sweeps/table1.yaml's variants, by the objective.method each sets (at the profile's lambda for L_SDS).
TABLE1_VARIANTS = {"FT with L_CLIP": "clip", "FT with L_CLIP + L_SDS": "sds"}
STUDENT = "train.student"
TEXT = "winoground/text"
# The published tables of students, by the file stem the report writes each to; the first holds
# every student the paper reports nowhere.
TABLES = {"table1": "table1", "table2": "table2", "table3": "table3", "appendix_coca": "table-coca"}


@dataclass
class Row:
    """One row: a student's run (None for the teacher's diffusion score) over its seeds."""

    student: str | None
    run: str                  # published.yaml's run names: pretrained | ft_<method> | diffusion_score
    label: str
    runs: list[dict]          # per seed: {"metrics": {...}, "outcomes": {...}}

    @property
    def metrics(self) -> dict[str, float]:
        """The mean over seeds of each metric every seed has."""
        keys = [k for k in self.runs[0]["metrics"] if all(k in r["metrics"] for r in self.runs[1:])]
        return {k: float(np.mean([r["metrics"][k] for r in self.runs])) for k in keys}


def ft_run(objective) -> str:
    """The published run name of a fine-tuning objective (`config.ObjectiveConfig`)."""
    return f"ft_{objective.method}"


def rows(cfg, baselines: dict, stage_runs: dict[str, dict], table1_trials: list[dict] | None) -> list[Row]:
    """Every row, students in the profile's order: pretrained, FT with L_CLIP, FT with the objective;
    then the diffusion score. `stage_runs`: the train_clip / train_sds results ({"clip": ..., "sds":
    ...}), read when `table1_trials` (sweeps/table1.yaml's results) is None."""
    out = []
    for student in cfg.students:
        out.append(Row(student, "pretrained", f"{student} pretrained", [baselines[f"pretrained/{student}"]]))
        if table1_trials is None:
            if student == cfg.train.student:
                out.append(Row(student, "ft_clip", f"{student} FT with L_CLIP", [stage_runs["clip"]]))
                out.append(Row(student, ft_run(cfg.objective), f"{student} {objective_label(cfg.objective)}",
                               [stage_runs["sds"]]))
            continue
        for variant, method in TABLE1_VARIANTS.items():
            seeds = sorted((t for t in table1_trials if t.get("status") == "finished" and t.get("outcomes")
                            and t["config"].get(STUDENT) == student and t["config"].get(VARIANT) == variant),
                           key=lambda t: t["config"].get("train.seed", 0))
            objective = replace(cfg.objective, method=method, **({"lambda_sds": 0.0} if method == "clip" else {}))
            if seeds:
                out.append(Row(student, ft_run(objective), f"{student} {objective_label(objective)}", seeds))
    out.append(Row(None, published.DIFFUSION_SCORE, f"diffusion score ({cfg.teacher.name})",
                   [baselines[published.DIFFUSION_SCORE]]))
    return out


def table_of(student: str | None, profile: str) -> str:
    """The published table a student's rows go to (the diffusion score's: Table 1)."""
    if profile == "paper" and student is not None:
        for table_id in TABLES:
            if any(r.student == student for r in published.table(table_id).rows):
                return table_id
    return "table1"


def _text_interval(row: Row, n_resamples: int, seed: int) -> str:
    runs = [r["outcomes"] for r in row.runs if TEXT in r.get("outcomes", {})]
    if len(runs) != len(row.runs) or not runs:
        return "-"
    _, low, high = seed_task_interval(outcome_parts(runs)[TEXT], n_resamples, seed=seed)
    return f"[{low:.3f}, {high:.3f}]"


def _seed_sd(row: Row) -> str:
    values = [r["metrics"][TEXT] for r in row.runs if TEXT in r["metrics"]]
    return f"{np.std(values, ddof=1):.3f}" if len(values) > 1 else "-"


def _versus(row: Row, reference: Row | None, n_resamples: int, seed: int) -> str:
    if reference is None or row is reference:
        return "-"
    a = [r.get("outcomes", {}) for r in row.runs]
    b = [r.get("outcomes", {}) for r in reference.runs]
    if not all(TEXT in o for o in a + b):
        return "-"
    return difference_cell(paired_difference(outcome_parts(a)[TEXT], outcome_parts(b)[TEXT], n_resamples, seed=seed))


def write(cfg, table_rows: list[Row], out: Path, n_resamples: int = 1000, seed: int = 0) -> list[Path]:
    """Each table that has rows, as `<stem>.md/.tex/.csv` under `out` (the paper's numbers under the
    measured ones on the paper profile)."""
    references = {r.student: r for r in table_rows if r.run == "ft_clip"}
    references[None] = references.get(cfg.train.student)
    keys = [key for _, key in COLUMNS]
    extra = ["seeds", "Wino text seed sd", "Wino text 95% CI", "Wino text vs FT with L_CLIP"]
    extra_keys = ["seeds", "winoground/text/seed_sd", "winoground/text/ci95", "winoground/text/vs_ft_clip"]
    written = []
    for table_id, stem in TABLES.items():
        chosen = [r for r in table_rows if table_of(r.student, cfg.profile) == table_id]
        if not chosen:
            continue
        paper = [published.lookup(table_id if r.student else "appendix_diffusion_score", r.student, r.run)
                 if cfg.profile == "paper" else None for r in chosen]
        header, cells = published.beside(["run"] + [name for name, _ in COLUMNS], keys,
                                         [(r.label, r.metrics) for r in chosen], paper)
        by_label = {r.label: [str(len(r.runs)), _seed_sd(r), _text_interval(r, n_resamples, seed),
                              _versus(r, references.get(r.student), n_resamples, seed)] for r in chosen}
        cells = [row + by_label.get(row[0], ["-"] * len(extra)) for row in cells]
        written += write_tables(out, stem, header + extra, ["run"] + keys + extra_keys, cells)
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
