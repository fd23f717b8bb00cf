"""Tables and figures in the paper's layout, from the MLflow runs the stages logged.

Table 1 rows: the pretrained student, FT with L_CLIP, FT with L_CLIP + lambda L_SDS, and the
teacher's diffusion score. Columns: Winoground text score (overall, per collapsed tag,
per number of main predicates), image and group scores, ARO overall / relation /
attribution / order, zero-shot mean, the teacher's text score on a trained h_w(f(x)) ("h_w text",
`evaluate.evaluate_projection`; not in the paper) and the bootstrap interval of the text score.

A sweep's table has one row per trial (the swept params, the trial's status, the same
metric columns); its figure plots the headline scores against the swept param, or per
trial when the sweep varied several params or a non-numeric one. The zero-shot figure is
the paper's Fig. 2: accuracy per zero-shot set for each Table-1 run that has them.
"""
from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.io import write_bytes, write_text

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
# Status tags the sweep driver gives child runs that are not one of its trials.
NOT_TRIALS = {"duplicate", "orphaned"}
ZEROSHOT_PREFIX = "zeroshot/"
ZEROSHOT_MEAN = "zeroshot/mean"


# ----------------------------------------------------------------------------- tables


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


def write_table1(runs: list[tuple[str, dict[str, float]]], out: Path, stem: str = "table1") -> list[Path]:
    return write_tables(out, stem, TABLE1_HEADER, TABLE1_CSV_HEADER, table_rows(runs))


# ----------------------------------------------------------------------------- sweeps


def sweep_trials(children: list[dict]) -> list[dict]:
    """The child runs that are trials (run dicts as `Tracker.find_runs` gives them)."""
    return [run for run in children if run["tags"].get("status") not in NOT_TRIALS]


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _mirrors(trials: list[dict], key: str, other: str) -> bool:
    """Whether `key` holds `other`'s value in every trial that logged both."""
    both = [trial["params"] for trial in trials if key in trial["params"] and other in trial["params"]]
    return bool(both) and all(params[key] == params[other] for params in both)


def swept_keys(trials: list[dict]) -> list[str]:
    """The params whose logged values differ across trials, in name order.

    A trial logs its whole config, where `train.lambda_sds` repeats `objective.lambda_sds`:
    a key that holds an earlier key's value in every trial is the same sweep axis and is left
    out. Keys a trial lacks (one that failed before logging its config) are not differences.
    """
    names = sorted({key for trial in trials for key in trial["params"]})
    varying = [key for key in names if len({t["params"][key] for t in trials if key in t["params"]}) > 1]
    kept: list[str] = []
    for key in varying:
        if not any(_mirrors(trials, key, other) for other in kept):
            kept.append(key)
    return kept


def is_numeric(trials: list[dict], key: str) -> bool:
    return all(_number(trial["params"][key]) is not None for trial in trials if key in trial["params"])


def trial_label(trial: dict) -> str:
    return trial["tags"].get("trial") or trial["name"]


def sorted_trials(trials: list[dict], keys: list[str]) -> list[dict]:
    """Trials by their swept values (numbers by value, text by name, missing last), then label."""
    numeric = {key: is_numeric(trials, key) for key in keys}

    def order(trial: dict) -> tuple:
        parts = []
        for key in keys:
            value = trial["params"].get(key)
            parts.append((value is None, _number(value) if numeric[key] and value is not None else 0.0, value or ""))
        return tuple(parts), trial_label(trial)

    return sorted(trials, key=order)


def sweep_header(keys: list[str]) -> tuple[list[str], list[str]]:
    """Display and CSV headers of a sweep table."""
    lead = ["trial", *keys, "status"]
    return lead + [name for name, _ in COLUMNS], lead + [key for _, key in COLUMNS]


def sweep_rows(trials: list[dict], keys: list[str]) -> list[list[str]]:
    """[trial, swept values, status tag, value per `COLUMNS` metric], '-' for what a trial lacks."""
    return [[trial_label(trial)] + [trial["params"].get(key, "-") for key in keys] +
            [trial["tags"].get("status", "-")] + metric_cells(trial["metrics"]) for trial in trials]


def write_sweep_report(name: str, children: list[dict], out: Path) -> list[Path]:
    """`sweep-<name>.md/.tex/.csv`, and `.png` when a trial has a score to plot; the paths written."""
    trials = sweep_trials(children)
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
    return [trial for trial in trials if trial["tags"].get("status") != "failed"
            and any(key in trial["metrics"] for key, _ in FIGURE_METRICS)]


def sweep_figure(name: str, trials: list[dict], keys: list[str]) -> Figure | None:
    """Scores against the swept param when one numeric param was swept, else per trial; None: nothing to plot."""
    shown = plotted_trials(trials)
    if not shown:
        return None
    if len(keys) == 1 and is_numeric(trials, keys[0]):
        return line_figure(name, keys[0], shown)
    return bar_figure(name, keys, shown)


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
    with_key = [trial for trial in trials if key in trial["params"]]
    for metric, label in FIGURE_METRICS:
        points = [(float(t["params"][key]), t["metrics"][metric]) for t in with_key if metric in t["metrics"]]
        if not points:
            continue
        means = mean_by_x(points)
        (line,) = axes.plot([x for x, _ in means], [y for _, y in means], marker="o", label=label)
        axes.scatter([x for x, _ in points], [y for _, y in points], s=12, alpha=0.5, color=line.get_color())
    scale, options = x_scale([float(t["params"][key]) for t in with_key])
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


def trial_caption(trial: dict, keys: list[str]) -> str:
    values = ", ".join(f"{key}={trial['params'][key]}" for key in keys if key in trial["params"])
    return f"{trial_label(trial)}: {values}" if values else trial_label(trial)


def bar_figure(name: str, keys: list[str], trials: list[dict]) -> Figure:
    """Horizontal grouped bars: a group per trial (top to bottom in table order), a bar per score."""
    metrics = [(key, label) for key, label in FIGURE_METRICS if any(key in t["metrics"] for t in trials)]
    figure = new_figure(7, 1.2 + 0.25 * len(trials) * len(metrics))
    axes = figure.add_subplot()
    height = 0.8 / len(metrics)
    for i, (metric, label) in enumerate(metrics):
        offset = (i - (len(metrics) - 1) / 2) * height
        axes.barh([row + offset for row in range(len(trials))],
                  [t["metrics"].get(metric, math.nan) for t in trials], height, label=label)
    axes.set_yticks(range(len(trials)), [trial_caption(t, keys) for t in trials])
    axes.invert_yaxis()
    axes.set_xlabel("score")
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
