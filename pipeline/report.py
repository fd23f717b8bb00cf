"""Tables and figures from the results files the stages and sweeps write.

The columns every table shares (`COLUMNS`): Winoground text score (overall, per collapsed tag, per
number of main predicates), image and group scores, ARO overall / relation / attribution / order,
zero-shot mean, the teacher's text score on a trained h_w(f(x)) ("h_w text",
`evaluate.evaluate_projection`; not in the paper) and the later benchmarks. The paper's Tables 1-3
are `pipeline.paper_tables`'.

A sweep's table has one row per trial of its results (the swept values, the trial's status, the
same metric columns); its figure has a panel per headline score that differs between the trials,
against the swept key, or per configuration when the sweep varied several keys or a non-numeric
one, each point with its 95% interval (`pipeline.figures`). Where the trials set one key besides the
seed (named variants, or one param), the configurations are also set side by side, each against the
first on the same cases (`compared_rows`). The library reads results files only,
so the report stage rebuilds from them alone; `main` (`python -m pipeline.report`) also finds a
hand-run sweep's results in the tracking store.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import sys
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.config import ConfigError
from pipeline.data.errors import (DataFormatError, MissingInput, field_value, load_json, require_list, require_record,
                                   str_field)
from pipeline.figures import (dot_figure, figure_title, group_scores, interval_note, line_figure, new_figure, panels,
                              plotted_trials, seeds_interval_note, style, varying_metrics, write_figure)
from pipeline.io import check_writable, temp_dir, write_text
from pipeline.metrics import decode_correct
from pipeline.comparison import (CaseMismatch, PairedDifference, outcome_parts, paired_difference, same_seeds,
                                 seed_task_interval)
from pipeline.sweep.spec import VARIANT, trial_index

if TYPE_CHECKING:
    import argparse

    from matplotlib.figure import Figure

COLUMNS = [
    ("Wino text", "winoground/text"), ("Object", "winoground/text/object"),
    ("Relation", "winoground/text/relation"), ("Both", "winoground/text/both"),
    ("1 Main Pred", "winoground/text/preds_1"), ("2 Main Preds", "winoground/text/preds_2"),
    ("Wino image", "winoground/image"), ("Wino group", "winoground/group"),
    ("ARO", "aro/overall"), ("ARO Rel", "aro/vg_relation"), ("ARO Attr", "aro/vg_attribution"),
    ("COCO-Order", "aro/coco_order"), ("Flickr-Order", "aro/flickr_order"), ("Zero-shot", "zeroshot/mean"),
    # Not in the paper: the teacher's text score on h_w(f(x)) (`evaluate.evaluate_projection`).
    ("h_w text", "projected/winoground/text"),
    # Benchmarks after the paper, and its appendix J's CLEVR (GDBench's tasks).
    ("SugarCrepe", "sugarcrepe/mean"), ("MMVP", "mmvp/mean"), ("CLEVR", "clevr/mean"),
]


@contextmanager
def building_for(folder: Path) -> Iterator[Path]:
    """A new hidden folder to make outputs in, removed at the end (a killed process's stays, hidden and
    ignored by git): outputs moved into `folder` (`move_into`) only once all are made leave it as it was
    when making one fails (bad results met on the way), not half new. It is made in `folder` where that
    exists (a mount point or a link to another disk: a rename into it stays on its file system), else in
    the nearest folder above that does (nothing created yet)."""
    parent = next(p for p in (folder, *folder.parents) if p.exists())
    building = temp_dir(parent, f".{folder.name}.", ".tmp")
    try:
        yield building
    finally:
        shutil.rmtree(building, ignore_errors=True)


def move_into(paths: list[Path], folder: Path) -> list[Path]:
    """Move the files made by `building_for` into `folder`; where they now are."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in paths:
        os.replace(path, folder / path.name)
    return [folder / path.name for path in paths]


@contextmanager
def notes_held() -> Iterator[None]:
    """What a report prints to stderr while it is made (the launch it read, what it left out and why),
    shown once the block ends: a refusal met on the way is then the one line the user sees."""
    held = io.StringIO()
    with redirect_stderr(held):
        yield
    sys.stderr.write(held.getvalue())


# ----------------------------------------------------------------------------- tables


TEACHER_TERMS = {"sds": "L_SDS", "unet_feature": "L_UNet-feature", "diffusion_feedback": "L_feedback",
                 "contrastive_feedback": "L_contrastive-feedback"}


def objective_label(objective) -> str:
    """A Table-1 row label for a fine-tuning objective (`config.ObjectiveConfig`), e.g.
    "FT with L_CLIP + 0.1 L_SDS", "FT with NegCLIP"."""
    contrastive = "NegCLIP" if objective.method == "negclip" else "L_CLIP"
    if objective.clip_weight != 1:
        contrastive = f"{objective.clip_weight:g} {contrastive}" if objective.clip_weight else ""
    if not objective.teacher_loss:
        return f"FT with {contrastive}"
    teacher = f"{objective.lambda_sds:g} {TEACHER_TERMS[objective.method]}"
    return f"FT with {contrastive} + {teacher}" if contrastive else f"FT with {teacher}"


def seed_sd(values: list[float]) -> float | None:
    """The standard deviation of a row's values over its seeds; None for one seed, which has no spread."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


def sd_cell(sd: float | None) -> str:
    """A seed spread as every table prints it: '-' where a row ran with one seed."""
    return "-" if sd is None else f"{sd:.3f}"


def metric_cells(metrics: dict[str, float]) -> list[str]:
    """The value of each `COLUMNS` metric to 3 decimals, '-' where the run lacks it."""
    return [f"{metrics[key]:.3f}" if key in metrics else "-" for _, key in COLUMNS]


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _is_number(cell: str) -> bool:
    return cell == "-" or _number(cell) is not None


def alignment(header: list[str], rows: list[list[str]]) -> str:
    """LaTeX column spec: numbers (and '-') right-aligned, anything else left-aligned."""
    return "".join("r" if all(_is_number(row[i]) for row in rows) else "l" for i in range(len(header)))


# A table's characters that LaTeX would read as something else, as it prints them: its specials (a
# variant's name may hold any), < and > (other glyphs in text mode), and the comparison tables' ±, Δ
# and p≤, which pdflatex rejects outside math mode.
LATEX_SYMBOLS = {"_": r"\_", "&": r"\&", "%": r"\%", "#": r"\#", "$": r"\$", "{": r"\{", "}": r"\}",
                 "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}",
                 "<": r"$<$", ">": r"$>$", "±": r"$\pm$", "Δ": r"$\Delta$", "≤": r"$\leq$"}


def latex(header: list[str], rows: list[list[str]]) -> str:
    escape = lambda s: "".join(LATEX_SYMBOLS.get(c, c) for c in s)
    out = [r"\begin{tabular}{" + alignment(header, rows) + "}", r"\toprule",
           " & ".join(escape(h) for h in header) + r" \\", r"\midrule"]
    out += [" & ".join(escape(c) for c in row) + r" \\" for row in rows]
    out += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(out) + "\n"


def csv_text(header: list[str], rows: list[list[str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def write_tables(out: Path, stem: str, header: list[str], csv_header: list[str],
                 rows: list[list[str]], notes: list[str] = ()) -> list[Path]:
    """`<stem>.md`, `.tex` (display header) and `.csv` (metric keys as header) under `out`; `notes` (e.g.
    where published rows are from) follow the Markdown table and precede the LaTeX one as comments."""
    paths = [Path(out) / f"{stem}.{suffix}" for suffix in ("md", "tex", "csv")]
    md = markdown(header, rows) + "".join(f"\n{note}\n" for note in notes)
    tex = "".join(f"% {note}\n" for note in notes) + latex(header, rows)
    for path, text in zip(paths, (md, tex, csv_text(csv_header, rows))):
        write_text(path, text)
    return paths


# ----------------------------------------------------------------------------- sweeps
#
# A sweep's trials as its results list them (`pipeline.sweep`'s payload: `results/sweeps/<name>.json`, a
# `--results` file, or the `summary.json` of the launch's MLflow parent run): each {"trial": label,
# "config": {swept key: value}, "status": ..., "metrics": {key: value}, "outcomes": {...}, ...}.

SEED = "train.seed"


def payload_trials(payload, source: Path | str) -> list[dict]:
    """The trials of a sweep's results payload, each checked for its label and status (what every row
    shows) and its stored outcomes (`check_outcomes`); `source` names where the payload came from in an error."""
    payload = require_record(payload, source, "")
    trials = require_list(field_value(payload, "trials", source, ""), source, "", "trials")
    for i, trial in enumerate(trials):
        for key in ("trial", "status"):
            str_field(require_record(trial, source, f"trial {i}"), key, source, f"trial {i}")
        check_outcomes(trial.get("outcomes") or {}, source, f"trial {i}")
    return trials


def check_outcomes(outcomes, source: Path | str, where: str) -> None:
    """A run's stored outcomes (`evaluate.Evaluation`): each with its per-case correctness and the
    digest of its cases, without which two rows cannot be paired case by case."""
    for name, outcome in require_record(outcomes, source, where).items():
        record = require_record(outcome, source, f"{where} outcome {name}")
        correct = str_field(record, "correct", source, f"{where} outcome {name}")
        try:
            cases = decode_correct(correct).size
        except ValueError:         # decode_correct's one refusal: not a '0' or '1' per case
            cases = 0
        if not cases:
            raise DataFormatError(source, f"{where} outcome {name}", "correct", "must be a '0' or '1' per case "
                                  "(whether the run got it right)")
        if "cases" not in record:
            raise DataFormatError(source, f"{where} outcome {name}", "cases", "is missing: written before outcomes "
                                  "said which cases they are of; run the stage or sweep that wrote it again")


@contextmanager
def about(rows: str) -> Iterator[None]:
    """A `CaseMismatch` raised within, its message led by the `rows` it is about (e.g. "NegCLIP against
    FT with L_CLIP"), which the outcomes' own message cannot name."""
    try:
        yield
    except CaseMismatch as err:
        raise CaseMismatch(f"{rows}: {err}") from None


@contextmanager
def results_of(sources: list[Path | str], where: str) -> Iterator[None]:
    """Runs of the results files `sources` that cannot be set together, not scored on the same cases
    (`CaseMismatch`), as bad input: one line naming the files and `where` (e.g. "sweep methods")."""
    try:
        yield
    except CaseMismatch as err:
        raise DataFormatError(", ".join(str(source) for source in sources), where, None, str(err)) from None


def read_trials(path: Path, what: str) -> list[dict]:
    """The trials of a sweep's results file (`what` it is, for the error when it is missing)."""
    return payload_trials(load_json(path, what), path)


def parse_payload(text: str, source: str):
    """A sweep's results payload kept as text (a run's `summary.json` artifact)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataFormatError(source, "", None, f"invalid JSON: {err}") from None


def table_trials(trials: list[dict]) -> list[dict]:
    """A results file's trials as a sweep table and figure read them: each swept value as the text a
    cell shows, only the finite metrics (a NaN or a missing value is no score), and the outcomes."""
    return [{"trial": trial["trial"], "status": trial["status"],
             "config": {key: str(value) for key, value in (trial.get("config") or {}).items()},
             "metrics": {key: value for key, value in (trial.get("metrics") or {}).items()
                         if isinstance(value, (int, float)) and math.isfinite(value)},
             "outcomes": trial.get("outcomes") or {}} for trial in trials]


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def swept_keys(trials: list[dict]) -> list[str]:
    """The config keys whose values differ across trials: a named variant first, the others by name.
    A key with one value is no axis of the table or the figure."""
    names = sorted({key for trial in trials for key in trial["config"]}, key=lambda key: (key != VARIANT, key))
    return [key for key in names if len({t["config"][key] for t in trials if key in t["config"]}) > 1]


def is_numeric(trials: list[dict], key: str) -> bool:
    return all(_number(trial["config"][key]) is not None for trial in trials if key in trial["config"])


def value_axis(trials: list[dict], keys: list[str]) -> str | None:
    """The swept key a sweep's figure puts along x: the one swept besides seeds, when it is numeric."""
    configs = [key for key in keys if key != SEED]
    return configs[0] if len(configs) == 1 and is_numeric(trials, configs[0]) else None


def _place(trial: dict) -> tuple[bool, int]:
    """A trial's place in its sweep: its index (`spec.trial_label`), a label it did not make last."""
    index = trial_index(trial["trial"])
    return index is None, index or 0


def sorted_trials(trials: list[dict], keys: list[str]) -> list[dict]:
    """Trials in their sweep's order, by trial index: a grid's follows the sweep file (its first variant,
    the reference, first), so a sweep's rows read in the same order in every table and figure of it.
    A sweep along a numeric key is read by its value (the figure's x axis), then by index."""
    ordered = sorted(trials, key=_place)
    if (axis := value_axis(trials, keys)) is None:
        return ordered
    return sorted(ordered, key=lambda trial: (axis not in trial["config"], _number(trial["config"].get(axis, "0"))))


def sweep_header(keys: list[str]) -> tuple[list[str], list[str]]:
    """Display and CSV headers of a sweep table."""
    lead = ["trial", *keys, "status"]
    return lead + [name for name, _ in COLUMNS], lead + [key for _, key in COLUMNS]


def sweep_rows(trials: list[dict], keys: list[str]) -> list[list[str]]:
    """[trial, swept values, status, value per `COLUMNS` metric], '-' for what a trial lacks."""
    return [[trial["trial"]] + [trial["config"].get(key, "-") for key in keys] + [trial["status"]] +
            metric_cells(trial["metrics"]) for trial in trials]


def write_sweep_report(name: str, trials: list[dict], out: Path, n_resamples: int = 1000, seed: int = 0) -> list[Path]:
    """`sweep-<name>.md/.tex/.csv`, and `.png` when a trial has a score to plot, from the trials of the
    sweep's results; the paths written. `n_resamples`, `seed`: the figure's bootstrap intervals."""
    trials = table_trials(trials)
    keys = swept_keys(trials)
    trials = sorted_trials(trials, keys)
    header, csv_header = sweep_header(keys)
    written = write_tables(out, f"sweep-{name}", header, csv_header, sweep_rows(trials, keys))
    figure = sweep_figure(name, trials, keys, n_resamples, seed)
    if figure is not None:
        written.append(write_figure(Path(out) / f"sweep-{name}.png", figure))
    return written


def resamples(cfg) -> int:
    """The report's bootstrap resamples: `eval.bootstrap`, or 1,000 where the evaluation draws none (0)."""
    return cfg.eval.bootstrap or 1000


def compared_key(trials: list[dict]) -> str | None:
    """The one key besides the seed that a sweep's trials set: a named variant, or one swept param
    (sweeps/lambda.yaml's objective.lambda_sds); None where they set several (sweeps/table1.yaml's
    students x variants, which Table 1's intervals compare) or none."""
    keys = {key for trial in trials for key in trial.get("config") or {}} - {SEED}
    return keys.pop() if len(keys) == 1 else None


def configuration(config: dict, key: str) -> str:
    """A configuration's row name in a comparison: a variant's name, else `key=value`."""
    return str(config[key]) if key == VARIANT else f"{key}={config[key]}"


def compared_rows(name: str, trials: list[dict], cfg, against: str | None = None) -> list[VariantRow]:
    """The sweep's configurations side by side (`compare_variants`) when its trials set one key besides
    the seed (`compared_key`), in the sweep table's order (a numeric key's by value), the first (or
    `against`, moved first) the reference; [] otherwise."""
    key = compared_key(trials)
    if key is None:
        if against is not None:
            raise ConfigError(f"--against: sweep {name} does not set exactly one key besides the seed, so its "
                              "configurations are not set side by side; allowed: a sweep of variants or of one param")
        return []
    order = [configuration(t["config"], key) for t in sorted_trials(table_trials(trials), [key]) if key in t["config"]]
    if against is not None:
        if against not in order:
            raise ConfigError(f"--against: {against!r} is not a configuration of sweep {name}; allowed: "
                              + ", ".join(dict.fromkeys(order)))
        order = [against] + [o for o in order if o != against]
    order = list(dict.fromkeys(order))
    rows = compare_variants(trials, order, resamples(cfg), cfg.eval.seed, key)
    if not rows:
        print(f"sweep {name}: no finished trial with outcomes; no {name} report", file=sys.stderr)
    elif against is not None and rows[0].name != against:     # the rows are those with finished trials
        raise ConfigError(f"--against: {against!r} has no finished trial with outcomes in sweep {name}, so nothing "
                          "can be set against it; allowed: " + ", ".join(row.name for row in rows))
    for dropped in [o for o in order if rows and o not in {row.name for row in rows}]:
        runs = [t for t in trials if key in (t.get("config") or {}) and configuration(t["config"], key) == dropped]
        note_dropped(name, dropped, runs, f"the {name} report")
    return rows


def finished_with_outcomes(trial: dict) -> bool:
    """A trial a table has a row's run of: finished, with its per-case outcomes."""
    return trial.get("status") == "finished" and bool(trial.get("outcomes"))


def note_dropped(sweep: str, configuration: str, runs: list[dict], where: str) -> None:
    """The note that a configuration of `sweep` has no row in `where`, none of its `runs` having finished."""
    print(f"sweep {sweep}: configuration {configuration} has no finished trial with outcomes ("
          + ", ".join(f"{t['trial']} {t['status']}" for t in runs) + f"); no row of it in {where}", file=sys.stderr)


def sweep_report(name: str, trials: list[dict], rows: list[VariantRow], cfg, out: Path) -> list[Path]:
    """Everything the report writes for one sweep from its trials: its table and figure, and the
    comparison of its configurations (`compared_rows`); the paths written."""
    if not trials:
        print(f"sweep {name}: no trials in its results", file=sys.stderr)
    written = write_sweep_report(name, trials, out, resamples(cfg), cfg.eval.seed)
    if rows:
        written += write_variant_report(name, rows, {}, out, resamples(cfg), caption=f"sweep {name}",
                                        row_header="" if compared_key(trials) == VARIANT else "configuration")
    return written


def by_value(trials: list[dict], key: str) -> list[tuple[float, list[dict]]]:
    """(value, trials) per value of numeric `key`, by value: repeated values (seeds, repeated draws)
    make one group."""
    groups: dict[float, list[dict]] = defaultdict(list)
    for trial in trials:
        if key in trial["config"]:
            groups[float(trial["config"][key])].append(trial)
    return sorted(groups.items())


def config_groups(trials: list[dict], keys: list[str]) -> list[tuple[str, list[dict]]]:
    """(caption, trials) per configuration of `keys`' values, in the trials' order: a configuration's
    seeds (and repeated draws) make one group, so a figure grows with the configurations, not the runs.
    A variant is captioned by its name alone, each other key on a line of its own."""
    groups: dict[tuple, list[dict]] = {}
    for trial in trials:
        groups.setdefault(tuple(trial["config"].get(key) for key in keys), []).append(trial)
    captions = []
    for values, members in groups.items():
        caption = "\n".join(value if key == VARIANT else f"{key}={value}"
                            for key, value in zip(keys, values) if value is not None) or "every trial"
        captions.append((caption + (f" ({len(members)} runs)" if len(members) > 1 else ""), members))
    return captions


def runs_named(members: list[dict], keys: list[str]) -> str:
    """A group of a sweep's trials, for an error about them: its configuration (the swept `keys` but the
    seed) and its trials, e.g. "train.lr=0.001 (trials t000, t001)"."""
    config = members[0]["config"]
    setting = ", ".join(configuration(config, key) for key in keys if key != SEED and key in config)
    return f"{setting or 'every trial'} (trials {', '.join(trial['trial'] for trial in members)})"


def sweep_figure(name: str, trials: list[dict], keys: list[str], n_resamples: int = 1000,
                 seed: int = 0) -> Figure | None:
    """A panel per headline score that differs between the trials (`figures.varying_metrics`; those the
    same in all are named in the title): against the swept param when one numeric param (besides seeds)
    was swept, else a row per configuration, its seeds pooled. Each point is the mean of its runs with
    its 95% interval over cases and seeds. None: nothing to plot."""
    shown = plotted_trials(trials)
    if not shown:
        return None
    metrics, constant = varying_metrics(shown)
    axis = value_axis(shown, keys)
    groups = by_value(shown, axis) if axis else config_groups(shown, [key for key in keys if key != SEED])
    scores = []
    for _, members in groups:
        with about(runs_named(members, keys)):
            scores.append(group_scores(members, [key for key, _ in metrics], n_resamples, seed))
    if axis:
        figure = line_figure(axis, [x for x, _ in groups], scores, metrics)
    else:
        figure = dot_figure([caption for caption, _ in groups], scores, metrics)
    notes = [interval_note(scores, n_resamples, seeds=any(len(members) > 1 for _, members in groups))]
    if constant:
        notes.append("not plotted, the same in every trial that has it: " + ", ".join(constant))
    plotted = {id(trial) for trial in shown}
    left_out = [trial for trial in trials if id(trial) not in plotted]
    if left_out:
        notes.append("not plotted (failed, or no final scores): " +
                     ", ".join(f"{trial['trial']} ({trial['status']})" for trial in left_out))
    figure_title(figure, f"sweep {name}", notes)
    return figure


# ----------------------------------------------------------------------------- variants side by side

# The headline metrics a comparison of variants reports (Winoground's three scores, ARO overall, the
# zero-shot mean, and the later benchmarks' means), each computed from the runs' stored per-case outcomes.
HEADLINE = [("Wino text", "winoground/text"), ("Wino image", "winoground/image"), ("Wino group", "winoground/group"),
            ("ARO", "aro/overall"), ("Zero-shot", "zeroshot/mean"), ("SugarCrepe", "sugarcrepe/mean"),
            ("MMVP", "mmvp/mean"), ("CLEVR", "clevr/mean")]
# What explains a variant's result, where its runs have it.
DIAGNOSTICS = [("h_w text", "projected/winoground/text"), ("feedback error ratio", "feedback/error_ratio"),
               ("final L_CLIP", "loss/clip"), ("trainable", "trainable_parameters"),
               ("train s", "time/train_seconds")]


@dataclass
class VariantRow:
    """One variant's finished seeds: per headline metric the mean, seed spread and interval, and the
    paired comparison with the reference variant (None for the reference itself)."""

    name: str
    seeds: list[int]
    scores: dict[str, tuple[float, float | None, float, float]]   # metric -> (mean, `seed_sd`, low, high)
    versus: dict[str, PairedDifference] | None
    diagnostics: dict[str, float]


def variant_trials(trials: list[dict], key: str = VARIANT) -> dict[str, list[dict]]:
    """Finished trials of a results file, by configuration of `key` (first-seen order; `configuration`
    names them), each list by seed."""
    groups: dict[str, list[dict]] = {}
    for trial in trials:
        config = trial.get("config") or {}
        if finished_with_outcomes(trial) and key in config:
            groups.setdefault(configuration(config, key), []).append(trial)
    return {name: sorted(runs, key=lambda t: t["config"].get(SEED, 0)) for name, runs in groups.items()}


def compare_variants(trials: list[dict], order: list[str], n_resamples: int = 1000, seed: int = 0,
                     key: str = VARIANT) -> list[VariantRow]:
    """A `VariantRow` per configuration of `key` (`variant_trials`) with finished seeds, in `order`; the
    first is the reference row. A row's seeds are None where its trials set none (the params' one)."""
    groups = variant_trials(trials, key)
    names = [name for name in order if name in groups]
    if not names:
        return []
    parts = {}
    for name in names:
        with about(f"{name} (trials {', '.join(t['trial'] for t in groups[name])})"):
            parts[name] = outcome_parts([t["outcomes"] for t in groups[name]])
    seeds = {name: [t["config"].get(SEED) for t in groups[name]] for name in names}
    rows = []
    for name in names:
        with about(f"{name} against {names[0]}"):
            # The variants of a sweep that ran the same seeds drew, seed by seed, the same data order and start.
            rows.append(variant_row(name, groups[name], parts[name], seeds[name],
                                    None if name == names[0] else parts[names[0]],
                                    same_seeds(seeds[name], seeds[names[0]]), n_resamples, seed))
    return rows


def variant_row(name: str, runs: list[dict], parts: dict, seeds: list, reference: dict | None, paired: bool,
                n_resamples: int, seed: int) -> VariantRow:
    """One row of `runs` (one per seed, each with its `metrics`) and their outcome `parts`: per headline
    metric its mean, seed spread and interval, and its paired difference to the `reference` row's parts
    (None: it is the reference; `paired`: the two rows' runs pair up seed by seed)."""
    scores = {}
    for _, key in HEADLINE:
        if key not in parts:
            continue
        values = [t["metrics"][key] for t in runs if key in t["metrics"]]
        mean, low, high = seed_task_interval(parts[key], n_resamples, seed=seed)
        scores[key] = (mean, seed_sd(values), low, high)
    versus = None if reference is None else {
        key: paired_difference(parts[key], reference[key], n_resamples, seed=seed, pair_seeds=paired)
        for _, key in HEADLINE if key in parts and key in reference}
    diagnostics = {key: float(np.mean([t["metrics"][key] for t in runs if key in t["metrics"]]))
                   for _, key in DIAGNOSTICS if any(key in t["metrics"] for t in runs)}
    return VariantRow(name, seeds, scores, versus, diagnostics)


def _signed(value: float) -> str:
    return f"{value:+.3f}"


def _p(d: PairedDifference) -> str:
    if d.p_bound:               # every bootstrap draw on one side of 0: the p is at most its floor
        return f"p≤{d.p_value:.3f}"
    return "p<0.001" if d.p_value < 0.001 else f"p={d.p_value:.3f}"


def difference_cell(d: PairedDifference) -> str:
    """'+0.031 [+0.010, +0.051] p=0.008': a paired difference as every comparison table prints it."""
    return f"{_signed(d.difference)} [{_signed(d.low)}, {_signed(d.high)}] {_p(d)}"


def variant_tables(rows: list[VariantRow], labels: dict[str, str],
                   row_header: str = "method") -> dict[str, tuple[list[str], list[list[str]]]]:
    """The three tables of a variant comparison: scores, differences to the reference, diagnostics."""
    shown = [(title, key) for title, key in HEADLINE if any(key in row.scores for row in rows)]
    scores = [[labels.get(r.name, r.name), str(len(r.seeds))] +
              [f"{r.scores[k][0]:.3f} ± {sd_cell(r.scores[k][1])} [{r.scores[k][2]:.3f}, {r.scores[k][3]:.3f}]"
               if k in r.scores else "-" for _, k in shown] for r in rows]
    diffs = [[labels.get(r.name, r.name)] +
             [difference_cell(d) if (d := r.versus.get(k)) else "-" for _, k in shown] for r in rows
             if r.versus is not None]
    kept = [(title, key) for title, key in DIAGNOSTICS if any(key in r.diagnostics for r in rows)]
    diagnostics = [[labels.get(r.name, r.name)] +
                   [(f"{r.diagnostics[k]:.0f}" if k in ("trainable_parameters", "time/train_seconds")
                     else f"{r.diagnostics[k]:.3f}") if k in r.diagnostics else "-" for _, k in kept] for r in rows]
    return {
        "scores": ([row_header, "seeds"] + [t for t, _ in shown], scores),
        "versus": ([row_header] + [f"Δ {t}" for t, _ in shown], diffs),
        "diagnostics": ([row_header] + [t for t, _ in kept], diagnostics),
    }


def variant_csv(rows: list[VariantRow], labels: dict[str, str], row_header: str = "variant") -> str:
    """One line per variant, every number in its own column (metric keys as headers); `<key>/p_bound`
    is 1 where the p is the bootstrap's floor, so at most the value given (`p≤` in the tables)."""
    header = [row_header, "label", "seeds"]
    for _, key in HEADLINE:
        header += [f"{key}/mean", f"{key}/sd", f"{key}/ci_low", f"{key}/ci_high",
                   f"{key}/diff", f"{key}/diff_ci_low", f"{key}/diff_ci_high", f"{key}/p", f"{key}/p_bound"]
    header += [key for _, key in DIAGNOSTICS]
    lines = []
    for r in rows:
        line = [r.name, labels.get(r.name, r.name), " ".join(str(s) for s in r.seeds if s is not None)]
        for _, key in HEADLINE:
            score = r.scores.get(key)
            line += ["" if v is None else f"{v:.6f}" for v in score] if score else [""] * 4
            d = (r.versus or {}).get(key)
            line += [f"{d.difference:.6f}", f"{d.low:.6f}", f"{d.high:.6f}", f"{d.p_value:.6g}",
                     str(int(d.p_bound))] if d else [""] * 5
        line += [f"{r.diagnostics[k]:.6g}" if k in r.diagnostics else "" for _, k in DIAGNOSTICS]
        lines.append(line)
    return csv_text(header, lines)


def interval_kinds(rows: list[VariantRow], n_resamples: int) -> str:
    """How the rows' intervals were made, for those the table has."""
    seeded = [len(r.seeds) > 1 for r in rows]
    kinds = [seeds_interval_note(n_resamples)] if any(seeded) else []
    if not all(seeded):
        kinds.append(f"95% bootstrap interval over cases, {n_resamples} resamples, for a row of one run")
    return "; ".join(kinds)


# What each kind of comparison (`PairedDifference.test`) is, as the table notes say it.
TEST_NOTES = {
    "t": "with seeds, Student's t of the case variance (cases resampled for both rows together) plus the seeds'",
    "McNemar": "one run a row, McNemar's test and Tango's score interval, which inverts it",
    "bootstrap": "one run a row on a macro-averaged or composite metric, the case bootstrap's percentile interval "
                 "and p",
}


def test_kinds(rows: list[VariantRow]) -> list[str]:
    """The notes of the kinds of comparison the rows hold, seed pairing said where there was some."""
    found = [d for r in rows for d in (r.versus or {}).values()]
    notes = []
    for test, note in TEST_NOTES.items():
        tests = [d for d in found if d.test == test]
        if not tests:
            continue
        paired = sum(d.seeds_paired for d in tests)          # only t comparisons pair seeds
        note += (" (of the per-seed differences: the rows ran the same seeds)" if paired == len(tests) else
                 " (of the per-seed differences where both rows ran the same seeds)" if paired else "")
        notes.append(note)
    return notes


def write_variant_report(name: str, rows: list[VariantRow], labels: dict[str, str], out: Path,
                         n_resamples: int, caption: str = "", against: str = "", row_header: str = "") -> list[Path]:
    """`<name>.md` / `.tex` (the three tables), `.csv` and, when the rows are set against the first
    one, `.png` (the differences with their intervals). `against`: what each row is compared with,
    where that is not the first row (e.g. "its student's FT with L_CLIP"); `row_header`: what a row
    is, where it is not a variant (a method in the tables, a variant in the CSV)."""
    tables = variant_tables(rows, labels, row_header or "method")
    reference = against or labels.get(rows[0].name, rows[0].name)
    notes = {
        "scores": f"Mean ± sd over seeds ('-': one seed) [{interval_kinds(rows, n_resamples)}].",
        "versus": f"Difference to {reference} on the same cases [paired 95% interval] and its two-sided p-value: "
                  + "; ".join(test_kinds(rows)) + ".",
        "diagnostics": "Means over seeds. h_w text: the teacher's text score on h_w(f(x)) (SDS); feedback error "
                       "ratio: the teacher's epsilon error with the student's projected tokens over that with the "
                       "empty caption (the feedback methods; 1 = the tokens tell the teacher nothing).",
    }
    md = [f"# {caption or name}", ""]
    tex = []
    for key, title in (("scores", "Scores"), ("versus", f"Against {reference}"), ("diagnostics", "Diagnostics")):
        header, body = tables[key]
        if not body:
            continue
        md += [f"## {title}", "", notes[key], "", markdown(header, body)]
        tex += [f"% {title}: {notes[key]}", latex(header, body)]
    paths = [Path(out) / f"{name}.{suffix}" for suffix in ("md", "tex", "csv")]
    for path, text in zip(paths, ("\n".join(md), "\n".join(tex), variant_csv(rows, labels, row_header or "variant"))):
        write_text(path, text)
    figure = None if against else variant_figure(rows, labels, caption or name)
    if figure is not None:
        paths.append(write_figure(Path(out) / f"{name}.png", figure))
    return paths


def variant_figure(rows: list[VariantRow], labels: dict[str, str], title: str) -> Figure | None:
    """One panel per headline metric: each variant's difference to the reference with its paired 95%
    interval (a dot and a bar), a line at 0; None when there is nothing to compare."""
    from matplotlib.ticker import MaxNLocator

    compared = [r for r in rows[1:] if r.versus]
    keys = [(t, k) for t, k in HEADLINE if any(k in r.versus for r in compared)]
    if not keys:
        return None
    columns = min(4, len(keys))
    lines = -(-len(keys) // columns)
    figure = new_figure(2.6 * columns + 1.5, (0.45 * len(compared) + 1.3) * lines + 0.6)
    axes = panels(figure, len(keys), columns, sharey=True)
    ys = list(range(len(compared)))
    reference = labels.get(rows[0].name, rows[0].name)
    for ax, (name, key) in zip(axes, keys):
        for y, row in zip(ys, compared):
            d = row.versus.get(key)
            if d is None:
                continue
            # Every headline metric is an accuracy: above the reference is better.
            colour = "tab:green" if d.low > 0 else "tab:red" if d.high < 0 else "tab:gray"
            ax.errorbar([d.difference], [y], xerr=[[d.difference - d.low], [d.high - d.difference]], fmt="o",
                        color=colour, capsize=3, markersize=4)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5))    # a 2.6-inch panel holds five signed ticks
        style(ax, name, grid="x")
    # One caption for every panel: under each, a long reference's name ran into the next panel's.
    figure.supxlabel(f"Δ accuracy vs {reference}", fontsize=9)
    axes[0].set_yticks(ys, [labels.get(row.name, row.name) for row in compared])
    axes[0].set_ylim(len(compared) - 0.5, -0.5)
    tests = {d.test for row in compared for d in row.versus.values()}
    over = ("seeds and cases" if tests == {"t"} else "cases" if "t" not in tests
            else "seeds and cases (cases alone where both rows are one run)")
    figure_title(figure, title, [f"paired 95% intervals over {over}; green: better than {reference}, red: worse, "
                                 "both with the interval excluding 0 (grey: including 0)"])
    return figure


# ----------------------------------------------------------------------------- python -m pipeline.report

COMMAND_DOC = """Write one sweep's report: its table (md, tex, csv), its figure and, for a sweep of named variants
or of one param, the comparison of its configurations; the same files the report stage writes for
the sweeps it ran.

    python -m pipeline.report lambda                     # the newest launch of sweep lambda, from MLflow
    python -m pipeline.report lambda --results FILE      # from a results file (pipeline.sweep --results)
    python -m pipeline.report methods --out /tmp/methods
    python -m pipeline.report methods --against NegCLIP --out /tmp/methods   # every row against NegCLIP

SWEEP is the sweep's name (`name` in its sweep file). Without --results the results are the
summary.json of the newest launch that finished writing one: the parent run in MLflow experiment
<tracking.experiment>/SWEEP of the params file's tracking store (a launch still running, or killed,
has none yet and is passed over).

Written under --out (default: reports/ next to the params file):
    sweep-<name>.md, .tex, .csv    a row per trial: its swept values, status and scores
    sweep-<name>.png               a panel per headline score that differs between the trials, against
                                   the swept key (or per configuration), with 95% intervals
    <name>.md, .tex, .csv, .png    for a sweep of named variants or of one param (and seeds): each
                                   configuration's scores over its seeds, its difference to the first
                                   (paired on the same cases), diagnostics
Every file is made before any reaches --out: results that cannot be set together (runs scored on
other cases) leave --out as it was.

`dvc repro` of the report stage removes the sweep-* files in reports/ of sweeps results/sweeps.json
does not list.
"""
SUMMARY = "summary.json"    # the results on a launch's parent run (`pipeline.sweep.driver.finish`)


def launch_trials(cfg, root: Path, name: str) -> list[dict]:
    """The trials of sweep `name`'s newest launch with results in the tracking store, whatever its end."""
    from pipeline.tracking import Tracker, redact     # the library itself reads results files only

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")   # it would print over the notes
    tracker = Tracker(cfg.tracking, root)
    experiment = f"{cfg.tracking.experiment}/{name}"
    tracker.check_moved(experiment)             # its summary.json would be read where the project was
    launches = tracker.find_runs(experiment, tags={"sweep_role": "parent"})
    if not launches:
        prefix = f"{cfg.tracking.experiment}/"
        known = [found[len(prefix):] for found in tracker.experiment_names(prefix)]
        raise MissingInput(f"sweep {name!r}: no launch in MLflow experiment {experiment!r} at {redact(tracker.uri)}; "
                           f"sweeps there: {', '.join(known) or 'none'}")
    for launch in launches:
        folder = launch["tags"].get("ray_path", launch["name"])      # the run's name repeats the sweep's
        text = tracker.artifact_text(launch["run_id"], SUMMARY)
        if text is not None:
            print(f"sweep {name}: launch {folder} ({launch['status']}, run {launch['run_id']})", file=sys.stderr)
            source = f"{experiment} run {launch['run_id']} {SUMMARY}"
            return payload_trials(parse_payload(text, source), source)
        print(f"note: launch {folder} ({launch['status']}) has no {SUMMARY} yet", file=sys.stderr)
    raise MissingInput(f"sweep {name!r}: none of the {len(launches)} launches in MLflow experiment {experiment!r} "
                       f"has written its results ({SUMMARY}) yet; wait for one to end, or pass --results FILE")


def results_trials(path: Path, name: str) -> list[dict]:
    """The trials of a results file, which must be sweep `name`'s."""
    payload = load_json(path, f"results of sweep {name} (--results)")
    if isinstance(payload, dict) and payload.get("sweep", name) != name:
        raise ConfigError(f"--results: {path} holds the results of sweep {payload['sweep']!r}, not {name!r}")
    return payload_trials(payload, path)


def command_body(args: argparse.Namespace, cfg, root: Path) -> None:
    out = args.out or root / "reports"
    check_writable(out, "--out", folder=True)
    with notes_held():
        trials = results_trials(args.results, args.sweep) if args.results else launch_trials(cfg, root, args.sweep)
        ran = sorted({str(t["params"]["profile"]) for t in trials if "profile" in t.get("params", {})} - {cfg.profile})
        if ran:    # the rows are the trials' own; the profile chosen here only names and labels them
            print(f"note: the trials of sweep {args.sweep} ran on profile {', '.join(ran)}; the report labels them "
                  f"with profile {cfg.profile}'s student and teacher names", file=sys.stderr)
        source = args.results or f"{cfg.tracking.experiment}/{args.sweep}'s newest {SUMMARY}"
        with building_for(out) as building, results_of([source], f"sweep {args.sweep}"):
            written = sweep_report(args.sweep, trials, compared_rows(args.sweep, trials, cfg, args.against), cfg,
                                   building)
            for path in move_into(written, out):
                print(path)


def command_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep", metavar="SWEEP", help="the sweep's name (`name` in its sweep file, e.g. lambda)")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="folder to write to (default: reports/ next to the params file, the report stage's "
                        "output, which its next run rewrites: give a folder of your own for a hand-run sweep)")
    p.add_argument("--against", metavar="CONFIGURATION",
                   help="set every configuration against this one (a variant's name, or key=value of a one-param "
                        "sweep, as its report names them) instead of the first")
    p.add_argument("--results", type=Path, metavar="FILE",
                   help="read the sweep's results from this file (`python -m pipeline.sweep ... --results FILE`) "
                        "instead of the tracking store")


def main(argv: list[str] | None = None) -> int:
    from pipeline import cli

    return cli.run(COMMAND_DOC, command_body, argv, command_arguments)


if __name__ == "__main__":
    sys.exit(main())
