"""Tables and figures in the paper's layout, from the results files the stages and sweeps write.

Table 1 rows: the pretrained student, FT with L_CLIP, FT with L_CLIP + lambda L_SDS, and the
teacher's diffusion score. Columns: Winoground text score (overall, per collapsed tag,
per number of main predicates), image and group scores, ARO overall / relation /
attribution / order, zero-shot mean, the teacher's text score on a trained h_w(f(x)) ("h_w text",
`evaluate.evaluate_projection`; not in the paper) and the bootstrap interval of the text score.

A sweep's table has one row per trial of its results file (the swept values, the trial's status,
the same metric columns); its figure plots the headline scores against the swept key, or per
configuration when the sweep varied several keys or a non-numeric one. The zero-shot figure is
the paper's Fig. 2: accuracy per zero-shot set for each Table-1 run that has them. Nothing here
reads the tracking store, so the report rebuilds from the results files alone.
"""
from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.io import write_bytes, write_text
from pipeline.metrics import PairedDifference, outcome_parts, paired_difference, seed_task_interval
from pipeline.sweep.spec import VARIANT

if TYPE_CHECKING:
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
INTERVAL = "Wino text 95% CI"
TABLE1_HEADER = ["run"] + [name for name, _ in COLUMNS] + [INTERVAL]
TABLE1_CSV_HEADER = ["run"] + [key for _, key in COLUMNS] + ["winoground/text/ci95"]

# The scores a sweep figure plots, with their legend labels.
FIGURE_METRICS = [("winoground/text", "Winoground text"), ("aro/overall", "ARO overall"),
                  ("zeroshot/mean", "zero-shot mean")]
ZEROSHOT_PREFIX = "zeroshot/"
ZEROSHOT_MEAN = "zeroshot/mean"


# ----------------------------------------------------------------------------- tables


TEACHER_TERMS = {"sds": "L_SDS", "unet_feature": "L_UNet-feature", "diffusion_feedback": "L_feedback"}


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


def metric_cells(metrics: dict[str, float]) -> list[str]:
    """The value of each `COLUMNS` metric to 3 decimals, '-' where the run lacks it."""
    return [f"{metrics[key]:.3f}" if key in metrics else "-" for _, key in COLUMNS]


def table_rows(runs: list[tuple[str, dict[str, float]]]) -> list[list[str]]:
    """[row label, value per column, text-score 95% interval] with '-' where a run lacks a metric."""
    rows = []
    for label, metrics in runs:
        interval = "-"
        if "winoground/text/ci_low" in metrics:
            interval = f"[{metrics['winoground/text/ci_low']:.3f}, {metrics['winoground/text/ci_high']:.3f}]"
        rows.append([label] + metric_cells(metrics) + [interval])
    return rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return cell == "-"
    return True


def alignment(header: list[str], rows: list[list[str]]) -> str:
    """LaTeX column spec: numbers (and '-') right-aligned, anything else left-aligned."""
    return "".join("r" if all(_is_number(row[i]) for row in rows) else "l" for i in range(len(header)))


def latex(header: list[str], rows: list[list[str]]) -> str:
    escape = lambda s: s.replace("_", r"\_").replace("&", r"\&").replace("%", r"\%")
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
                 rows: list[list[str]]) -> list[Path]:
    """`<stem>.md`, `.tex` (display header) and `.csv` (metric keys as header) under `out`."""
    paths = [Path(out) / f"{stem}.{suffix}" for suffix in ("md", "tex", "csv")]
    for path, text in zip(paths, (markdown(header, rows), latex(header, rows), csv_text(csv_header, rows))):
        write_text(path, text)
    return paths


VERSUS_METRIC = "winoground/text"


def versus_reference(outcomes: dict[str, dict], reference: str, n_resamples: int = 1000,
                     seed: int = 0) -> dict[str, PairedDifference]:
    """Each row's Winoground text score minus the `reference` row's, on the same tasks: the
    paired interval and McNemar's exact p (one run a row), from the rows' stored outcomes
    ({label: outcomes}); rows without the metric's outcomes are left out."""
    scored = {label: o for label, o in outcomes.items() if VERSUS_METRIC in o}
    if reference not in scored:
        return {}
    base = outcome_parts([scored[reference]])[VERSUS_METRIC]
    return {label: paired_difference(outcome_parts([o])[VERSUS_METRIC], base, n_resamples, seed=seed)
            for label, o in scored.items() if label != reference}


def write_table1(runs: list[tuple[str, dict[str, float]]], out: Path, stem: str = "table1",
                 versus: dict[str, PairedDifference] | None = None, reference: str = "") -> list[Path]:
    """Table 1; with `versus` (`versus_reference`), a last column comparing each row with `reference`."""
    rows = table_rows(runs)
    header, csv_header = list(TABLE1_HEADER), list(TABLE1_CSV_HEADER)
    if versus is not None:
        header.append(f"Wino text vs {reference}")
        csv_header.append("winoground/text/vs_reference")
        for row, (label, _) in zip(rows, runs):
            d = versus.get(label)
            row.append(_difference_cell(d) if d else "-")
    return write_tables(out, stem, header, csv_header, rows)


# ----------------------------------------------------------------------------- sweeps
#
# A sweep's trials as its results file (`results/sweeps/<name>.json`, `pipeline.sweep`) lists them: each
# {"trial": label, "config": {swept key: value}, "status": ..., "metrics": {key: value}, ...}.


def table_trials(trials: list[dict]) -> list[dict]:
    """A results file's trials as a sweep table and figure read them: each swept value as the text a
    cell shows, and only the finite metrics (a NaN or a missing value is no score)."""
    return [{"trial": trial["trial"], "status": trial["status"],
             "config": {key: str(value) for key, value in (trial.get("config") or {}).items()},
             "metrics": {key: value for key, value in (trial.get("metrics") or {}).items()
                         if isinstance(value, (int, float)) and math.isfinite(value)}} for trial in trials]


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


def sorted_trials(trials: list[dict], keys: list[str]) -> list[dict]:
    """Trials by their swept values (numbers by value, text by name, missing last), then label."""
    numeric = {key: is_numeric(trials, key) for key in keys}

    def order(trial: dict) -> tuple:
        parts = []
        for key in keys:
            value = trial["config"].get(key)
            parts.append((value is None, _number(value) if numeric[key] and value is not None else 0.0, value or ""))
        return tuple(parts), trial["trial"]

    return sorted(trials, key=order)


def sweep_header(keys: list[str]) -> tuple[list[str], list[str]]:
    """Display and CSV headers of a sweep table."""
    lead = ["trial", *keys, "status"]
    return lead + [name for name, _ in COLUMNS], lead + [key for _, key in COLUMNS]


def sweep_rows(trials: list[dict], keys: list[str]) -> list[list[str]]:
    """[trial, swept values, status, value per `COLUMNS` metric], '-' for what a trial lacks."""
    return [[trial["trial"]] + [trial["config"].get(key, "-") for key in keys] + [trial["status"]] +
            metric_cells(trial["metrics"]) for trial in trials]


def write_sweep_report(name: str, trials: list[dict], out: Path) -> list[Path]:
    """`sweep-<name>.md/.tex/.csv`, and `.png` when a trial has a score to plot, from the trials of the
    sweep's results file; the paths written."""
    trials = table_trials(trials)
    keys = swept_keys(trials)
    trials = sorted_trials(trials, keys)
    header, csv_header = sweep_header(keys)
    written = write_tables(out, f"sweep-{name}", header, csv_header, sweep_rows(trials, keys))
    figure = sweep_figure(name, trials, keys)
    if figure is not None:
        written.append(write_figure(Path(out) / f"sweep-{name}.png", figure))
    return written


# ----------------------------------------------------------------------------- figures


def new_figure(width: float, height: float) -> Figure:
    """A figure on the Agg canvas (no pyplot state, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def png_bytes(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=150)
    return buffer.getvalue()


def write_figure(path: Path, figure: Figure) -> Path:
    write_bytes(path, png_bytes(figure))
    return path


def add_legend(figure: Figure) -> None:
    """The legend below the axes, where it covers no data."""
    handles, labels = figure.axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 3))


def x_scale(values: list[float]) -> tuple[str, dict]:
    """Matplotlib x scale for swept values: log when positive and spanning over 10x.

    With a 0 among such values (lambda = 0: no SDS) the axis is symlog, linear from 0 up to
    the smallest positive value and logarithmic above it, so 0 sits at its true place.
    """
    positive = [v for v in values if v > 0]
    if not positive or min(values) < 0 or max(positive) <= 10 * min(positive):
        return "linear", {}
    if len(positive) == len(values):
        return "log", {}
    return "symlog", {"linthresh": min(positive), "linscale": 0.5}


def plotted_trials(trials: list[dict]) -> list[dict]:
    """Trials with a score to plot: failed ones are left out even if they logged some."""
    return [trial for trial in trials if trial["status"] != "failed"
            and any(key in trial["metrics"] for key, _ in FIGURE_METRICS)]


SEED = "train.seed"


def sweep_figure(name: str, trials: list[dict], keys: list[str]) -> Figure | None:
    """Scores against the swept param when one numeric param (besides seeds) was swept, else per
    configuration, its seeds pooled; None: nothing to plot."""
    shown = plotted_trials(trials)
    if not shown:
        return None
    configs = [key for key in keys if key != SEED]
    if len(configs) == 1 and is_numeric(trials, configs[0]):
        return line_figure(name, configs[0], shown)
    return bar_figure(name, configs, shown)


def mean_by_x(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(x, mean of y at x), by x: repeated values (seeds, repeated draws) make one point."""
    groups: dict[float, list[float]] = defaultdict(list)
    for x, y in points:
        groups[x].append(y)
    return sorted((x, sum(ys) / len(ys)) for x, ys in groups.items())


def line_figure(name: str, key: str, trials: list[dict]) -> Figure:
    """Each `FIGURE_METRICS` score against `key`: a line through the means, a dot per trial."""
    figure = new_figure(6, 4)
    axes = figure.add_subplot()
    with_key = [trial for trial in trials if key in trial["config"]]
    for metric, label in FIGURE_METRICS:
        points = [(float(t["config"][key]), t["metrics"][metric]) for t in with_key if metric in t["metrics"]]
        if not points:
            continue
        means = mean_by_x(points)
        (line,) = axes.plot([x for x, _ in means], [y for _, y in means], marker="o", label=label)
        axes.scatter([x for x, _ in points], [y for _, y in points], s=12, alpha=0.5, color=line.get_color())
    scale, options = x_scale([float(t["config"][key]) for t in with_key])
    axes.set_xscale(scale, **options)
    caption = key
    if scale == "symlog":
        caption += f" (linear from 0 to {options['linthresh']:g}, log above)"
        axes.set_xlim(left=-0.2 * options["linthresh"])
    axes.set_xlabel(caption)
    axes.set_ylabel("score")
    axes.set_title(f"sweep {name}")
    axes.grid(True, alpha=0.3)
    add_legend(figure)
    return figure


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


def bar_figure(name: str, keys: list[str], trials: list[dict]) -> Figure:
    """Horizontal grouped bars: a group per configuration (top to bottom in table order), a bar per
    score at the mean of its runs, with their spread (sd) as an error bar when there are several."""
    metrics = [(key, label) for key, label in FIGURE_METRICS if any(key in t["metrics"] for t in trials)]
    groups = config_groups(trials, keys)
    figure = new_figure(7, 1.2 + 0.25 * len(groups) * len(metrics))
    axes = figure.add_subplot()
    height = 0.8 / len(metrics)
    for i, (metric, label) in enumerate(metrics):
        offset = (i - (len(metrics) - 1) / 2) * height
        values = [[t["metrics"][metric] for t in members if metric in t["metrics"]] for _, members in groups]
        means = [float(np.mean(v)) if v else math.nan for v in values]
        spread = [float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for v in values]
        axes.barh([row + offset for row in range(len(groups))], means, height, xerr=spread, capsize=2, label=label)
    axes.set_yticks(range(len(groups)), [caption for caption, _ in groups])
    axes.invert_yaxis()
    axes.set_xlabel("score (mean over runs; bars: sd)")
    axes.set_title(f"sweep {name}")
    axes.grid(True, axis="x", alpha=0.3)
    add_legend(figure)
    return figure


def zeroshot_sets(runs: list[tuple[str, dict[str, float]]]) -> list[str]:
    """The zero-shot sets any run has an accuracy for (`zeroshot/<set>`, the mean excluded), by name."""
    return sorted({key[len(ZEROSHOT_PREFIX):] for _, metrics in runs for key in metrics
                   if key.startswith(ZEROSHOT_PREFIX) and key != ZEROSHOT_MEAN})


def zeroshot_figure(runs: list[tuple[str, dict[str, float]]]) -> Figure | None:
    """Fig. 2: grouped bars of accuracy per zero-shot set, a bar per run that has any; None: no run has one."""
    sets = zeroshot_sets(runs)
    shown = [(label, metrics) for label, metrics in runs if any(ZEROSHOT_PREFIX + s in metrics for s in sets)]
    if not shown:
        return None
    figure = new_figure(max(6.0, 0.9 * len(sets) + 2), 4)
    axes = figure.add_subplot()
    width = 0.8 / len(shown)
    for i, (label, metrics) in enumerate(shown):
        offset = (i - (len(shown) - 1) / 2) * width
        axes.bar([x + offset for x in range(len(sets))],
                 [metrics.get(ZEROSHOT_PREFIX + s, math.nan) for s in sets], width, label=label)
    axes.set_xticks(range(len(sets)), sets, rotation=30, ha="right")
    axes.set_ylabel("zero-shot accuracy")
    axes.set_title("Zero-shot accuracy per dataset")
    axes.grid(True, axis="y", alpha=0.3)
    add_legend(figure)
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
    scores: dict[str, tuple[float, float, float, float]]       # metric -> (mean, sd over seeds, low, high)
    versus: dict[str, PairedDifference] | None
    diagnostics: dict[str, float]


def variant_trials(trials: list[dict]) -> dict[str, list[dict]]:
    """Finished trials of a results file, by variant name (first-seen order), each list by seed."""
    groups: dict[str, list[dict]] = {}
    for trial in trials:
        config = trial.get("config") or {}
        if trial.get("status") == "finished" and VARIANT in config and trial.get("outcomes"):
            groups.setdefault(config[VARIANT], []).append(trial)
    return {name: sorted(runs, key=lambda t: t["config"].get("train.seed", 0)) for name, runs in groups.items()}


def compare_variants(trials: list[dict], order: list[str], n_resamples: int = 1000, seed: int = 0) -> list[VariantRow]:
    """A `VariantRow` per variant with finished seeds, in `order`; the first is the reference row."""
    groups = variant_trials(trials)
    names = [name for name in order if name in groups]
    if not names:
        return []
    parts = {name: outcome_parts([t["outcomes"] for t in groups[name]]) for name in names}
    rows = []
    for name in names:
        runs = groups[name]
        scores = {}
        for _, key in HEADLINE:
            if key not in parts[name]:
                continue
            values = [t["metrics"][key] for t in runs if key in t["metrics"]]
            mean, low, high = seed_task_interval(parts[name][key], n_resamples, seed=seed)
            scores[key] = (mean, float(np.std(values, ddof=1)) if len(values) > 1 else 0.0, low, high)
        versus = None
        if name != names[0]:
            versus = {key: paired_difference(parts[name][key], parts[names[0]][key], n_resamples, seed=seed)
                      for _, key in HEADLINE if key in parts[name] and key in parts[names[0]]}
        diagnostics = {key: float(np.mean([t["metrics"][key] for t in runs if key in t["metrics"]]))
                       for _, key in DIAGNOSTICS if any(key in t["metrics"] for t in runs)}
        rows.append(VariantRow(name, [t["config"].get("train.seed", 0) for t in runs], scores, versus, diagnostics))
    return rows


def _signed(value: float) -> str:
    return f"{value:+.3f}"


def _p(value: float) -> str:
    return "p<0.001" if value < 0.001 else f"p={value:.3f}"


def _difference_cell(d: PairedDifference) -> str:
    """'+0.031 [+0.010, +0.051] p=0.008': a paired difference as every comparison table prints it."""
    return f"{_signed(d.difference)} [{_signed(d.low)}, {_signed(d.high)}] {_p(d.p_value)}"


def variant_tables(rows: list[VariantRow], labels: dict[str, str]) -> dict[str, tuple[list[str], list[list[str]]]]:
    """The three tables of a variant comparison: scores, differences to the reference, diagnostics."""
    shown = [(title, key) for title, key in HEADLINE if any(key in row.scores for row in rows)]
    scores = [[labels.get(r.name, r.name), str(len(r.seeds))] +
              [f"{r.scores[k][0]:.3f} ± {r.scores[k][1]:.3f} [{r.scores[k][2]:.3f}, {r.scores[k][3]:.3f}]"
               if k in r.scores else "-" for _, k in shown] for r in rows]
    diffs = [[labels.get(r.name, r.name)] +
             [_difference_cell(d) if (d := (r.versus or {}).get(k)) else "-" for _, k in shown] for r in rows[1:]]
    kept = [(title, key) for title, key in DIAGNOSTICS if any(key in r.diagnostics for r in rows)]
    diagnostics = [[labels.get(r.name, r.name)] +
                   [(f"{r.diagnostics[k]:.0f}" if k in ("trainable_parameters", "time/train_seconds")
                     else f"{r.diagnostics[k]:.3f}") if k in r.diagnostics else "-" for _, k in kept] for r in rows]
    return {
        "scores": (["method", "seeds"] + [t for t, _ in shown], scores),
        "versus": (["method"] + [f"Δ {t}" for t, _ in shown], diffs),
        "diagnostics": (["method"] + [t for t, _ in kept], diagnostics),
    }


def variant_csv(rows: list[VariantRow], labels: dict[str, str]) -> str:
    """One line per variant, every number in its own column (metric keys as headers)."""
    header = ["variant", "label", "seeds"]
    for _, key in HEADLINE:
        header += [f"{key}/mean", f"{key}/sd", f"{key}/ci_low", f"{key}/ci_high",
                   f"{key}/diff", f"{key}/diff_ci_low", f"{key}/diff_ci_high", f"{key}/p"]
    header += [key for _, key in DIAGNOSTICS]
    lines = []
    for r in rows:
        line = [r.name, labels.get(r.name, r.name), " ".join(map(str, r.seeds))]
        for _, key in HEADLINE:
            score = r.scores.get(key)
            line += [f"{v:.6f}" for v in score] if score else [""] * 4
            d = (r.versus or {}).get(key)
            line += [f"{d.difference:.6f}", f"{d.low:.6f}", f"{d.high:.6f}", f"{d.p_value:.6g}"] if d else [""] * 4
        line += [f"{r.diagnostics[k]:.6g}" if k in r.diagnostics else "" for _, k in DIAGNOSTICS]
        lines.append(line)
    return csv_text(header, lines)


def write_variant_report(name: str, rows: list[VariantRow], labels: dict[str, str], out: Path,
                         n_resamples: int, caption: str = "") -> list[Path]:
    """`<name>.md` / `.tex` (the three tables), `.csv` and `.png` (the differences with their intervals)."""
    tables = variant_tables(rows, labels)
    reference = labels.get(rows[0].name, rows[0].name)
    notes = {
        "scores": f"Mean ± sd over seeds [95% interval over seeds and cases, {n_resamples} resamples].",
        "versus": f"Difference to {reference} on the same cases [paired 95% interval] and its two-sided "
                  "p-value: McNemar's exact test when each row has one run, else the same bootstrap's "
                  "(cases resampled for both rows together, each row's seeds on their own).",
        "diagnostics": "Means over seeds. h_w text: the teacher's text score on h_w(f(x)) (SDS); feedback error "
                       "ratio: the teacher's epsilon error with the student's projected tokens over that with the "
                       "empty caption (diffusion feedback; 1 = the tokens tell the teacher nothing).",
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
    for path, text in zip(paths, ("\n".join(md), "\n".join(tex), variant_csv(rows, labels))):
        write_text(path, text)
    figure = variant_figure(rows, labels, caption or name)
    if figure is not None:
        paths.append(write_figure(Path(out) / f"{name}.png", figure))
    return paths


def variant_figure(rows: list[VariantRow], labels: dict[str, str], title: str) -> Figure | None:
    """One panel per headline metric: each variant's difference to the reference with its paired 95%
    interval (a dot and a bar), a line at 0; None when there is nothing to compare."""
    compared = [r for r in rows[1:] if r.versus]
    keys = [(t, k) for t, k in HEADLINE if any(k in r.versus for r in compared)]
    if not keys:
        return None
    columns = min(4, len(keys))
    lines = -(-len(keys) // columns)
    figure = new_figure(2.6 * columns + 1.5, (0.45 * len(compared) + 1.3) * lines + 0.4)
    grid = figure.subplots(lines, columns, sharey=True, squeeze=False)
    axes = [ax for line in grid for ax in line]
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    ys = list(range(len(compared)))
    for ax, (name, key) in zip(axes, keys):
        for y, row in zip(ys, compared):
            d = row.versus.get(key)
            if d is None:
                continue
            colour = "tab:green" if d.low > 0 else "tab:red" if d.high < 0 else "tab:gray"
            ax.errorbar([d.difference], [y], xerr=[[d.difference - d.low], [d.high - d.difference]], fmt="o",
                        color=colour, capsize=3)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(f"Δ vs {labels.get(rows[0].name, rows[0].name)}", fontsize=8)
        ax.grid(True, axis="x", alpha=0.3)
    for line in grid:
        line[0].set_yticks(ys, [labels.get(row.name, row.name) for row in compared])
    axes[0].invert_yaxis()
    figure.suptitle(f"{title}: paired 95% intervals over seeds and cases (green/red: excludes 0)", fontsize=9)
    return figure
