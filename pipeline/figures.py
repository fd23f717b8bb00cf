"""The report's figures, all drawn in one style (`style`): a sweep's scores against what it swept, one
panel per score that differs between its trials, each point with its 95% interval
(`pipeline.report.sweep_figure` picks the layout); the paper's Fig. 1, each scorer's Winoground text
score against its inference time; and its Fig. 2, zero-shot accuracy per set with each bar's interval.

Intervals come from the runs' per-case outcomes (`comparison.seed_task_interval`): over the cases for one
run, over seeds and cases where a configuration ran with several seeds. A point without outcomes is
drawn without an interval, and the figure says so.
"""
from __future__ import annotations

import io
import math
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.io import write_bytes
from pipeline.comparison import outcome_parts, seed_task_interval
from pipeline.sweep.spec import fmt

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# The scores a sweep figure may plot, with their panel titles: each benchmark's headline score and the
# teacher's score on h_w(f(x)); their breakdowns stay in the table. Only those that differ between
# the trials get a panel.
FIGURE_METRICS = [("winoground/text", "Winoground text"), ("winoground/image", "Winoground image"),
                  ("winoground/group", "Winoground group"), ("aro/overall", "ARO overall"),
                  ("zeroshot/mean", "zero-shot mean"), ("projected/winoground/text", "h_w text"),
                  ("sugarcrepe/mean", "SugarCrepe"), ("mmvp/mean", "MMVP"), ("clevr/mean", "CLEVR")]
ZEROSHOT_PREFIX = "zeroshot/"
ZEROSHOT_MEAN = "zeroshot/mean"
COLOUR = "tab:blue"
PANEL = (3.4, 2.5)                      # inches per panel of a small-multiples figure
MIN_WIDTH = 6.4                         # inches: room for the title's notes above a single panel
LABEL_OFFSET = (6, 7)                   # points right of and above its point: where a point's label goes first
VALUE_TICKS = 8                         # up to this many swept values, each is a labelled x tick
NO_INTERVAL = "its runs' results hold no per-case outcomes"
NBSP = "\u00a0"
# What a wrapped note keeps on one line: a short parenthesised group ("(1000 resamples)") and a value
# with its unit ("16 samples", "0.5 ms").
UNBROKEN = re.compile(r"\([^()]{1,24}\)|\b\d+(?:\.\d+)?(?:e[+-]?\d+)?%? [a-zµ]+\b")


# ----------------------------------------------------------------------------- the style


def new_figure(width: float, height: float) -> Figure:
    """A figure on the Agg canvas (no pyplot state, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def style(ax: Axes, title: str = "", xlabel: str = "", ylabel: str = "", grid: str = "both") -> None:
    """Every panel of every report figure: its labels, font sizes, a light grid behind the data, no box."""
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(True, axis=grid, alpha=0.3, linewidth=0.6)
    ax.set_axisbelow(True)
    ax.spines[["top", "right"]].set_visible(False)


def unbroken(text: str) -> str:
    """`text` with no-break spaces inside each `UNBROKEN` group, so that wrapping keeps it whole."""
    return UNBROKEN.sub(lambda match: match.group().replace(" ", NBSP), text)


def figure_title(figure: Figure, title: str, notes: list[str]) -> None:
    """The figure's title, and below it the notes a reader needs (what the bars are, what is not shown),
    wrapped at spaces only: never inside a hyphenated word ("zero-shot") or an `unbroken` group."""
    width = max(40, int(figure.get_figwidth() * 12))   # characters of 10 pt text a line holds
    lines = [line for note in notes for line in textwrap.wrap(unbroken(note), width, break_on_hyphens=False,
                                                                 break_long_words=False)]
    figure.suptitle("\n".join([title, *lines]), fontsize=10)


def png_bytes(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=150)
    return buffer.getvalue()


def write_figure(path: Path, figure: Figure) -> Path:
    write_bytes(path, png_bytes(figure))
    return path


def add_legend(figure: Figure, ax: Axes) -> None:
    """`ax`'s legend below the axes, where it covers no data."""
    handles, labels = ax.get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 3), fontsize=8, frameon=False)


def panels(figure: Figure, count: int, columns: int, **share) -> list[Axes]:
    """`count` panels in rows of `columns`; the grid's unused cells hidden, and the x tick labels shown
    on each column's last panel (a shared x hides them on all but the bottom row)."""
    grid = figure.subplots(-(-count // columns), columns, squeeze=False, **share)
    axes = [ax for row in grid for ax in row]
    for ax in axes[count:]:
        ax.set_visible(False)
    for i, ax in enumerate(axes[:count]):
        if i + columns >= count:
            ax.xaxis.set_tick_params(labelbottom=True)
    return axes[:count]


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


def x_caption(key: str, scale: str, options: dict) -> str:
    if scale == "log":
        return f"{key} (log scale)"
    if scale == "symlog":
        return f"{key} (log scale; linear from 0 to {options['linthresh']:g})"
    return key


# ----------------------------------------------------------------------------- scores and intervals


@dataclass
class Score:
    """One score of a group of runs (a configuration's seeds, or one run): each run's value, their mean
    and the 95% interval (None without the runs' per-case outcomes)."""

    values: list[float]
    mean: float
    low: float | None = None
    high: float | None = None

    def error(self) -> tuple[float, float]:
        """Below and above the mean, for an error bar (NaN: none)."""
        if self.low is None:
            return math.nan, math.nan
        return max(0.0, self.mean - self.low), max(0.0, self.high - self.mean)


def group_scores(members: list[dict], keys: list[str], n_resamples: int, seed: int) -> dict[str, Score]:
    """The `keys` scores of a group of runs; a score's interval when every run with it kept its outcomes."""
    runs = [trial["outcomes"] for trial in members if trial.get("outcomes")]
    parts = outcome_parts(runs) if runs else {}
    scores = {}
    for key in keys:
        values = [trial["metrics"][key] for trial in members if key in trial["metrics"]]
        if not values:
            continue
        score = Score(values, float(np.mean(values)))
        if key in parts and parts[key][0].seeds == len(values):
            _, score.low, score.high = seed_task_interval(parts[key], n_resamples, seed=seed)
        scores[key] = score
    return scores


def plotted_trials(trials: list[dict]) -> list[dict]:
    """Trials with a score to plot: failed ones are left out even if they logged some."""
    return [trial for trial in trials if trial["status"] != "failed"
            and any(key in trial["metrics"] for key, _ in FIGURE_METRICS)]


def varying_metrics(trials: list[dict]) -> tuple[list[tuple[str, str]], list[str]]:
    """(key, title) of each `FIGURE_METRICS` score that differs between the trials, and a note per
    score that is the same in all that have it ("ARO overall 0.577", "h_w text 0.020 (1 of 3 trials)").
    When none differs, every score present is plotted, so a one-trial sweep still shows its scores and
    their intervals."""
    varying, constant = [], []
    for key, title in FIGURE_METRICS:
        values = [trial["metrics"][key] for trial in trials if key in trial["metrics"]]
        if not values:
            continue
        if max(values) - min(values) > 1e-9:
            varying.append((key, title))
        else:
            # No-break spaces: a wrapped title keeps each score with its value.
            share = f"\u00a0({len(values)} of {len(trials)} trials)" if len(values) < len(trials) else ""
            constant.append(((key, title), f"{title}\u00a0{values[0]:.3f}{share}"))
    if not varying:
        return [metric for metric, _ in constant], []
    return varying, [note for _, note in constant]


def seeds_interval_note(n_resamples: int) -> str:
    """How a row with seeds gets its interval (`comparison.seed_task_interval`)."""
    return (f"95% interval over seeds and cases: t of the seeds' variance plus a {n_resamples}-resample case "
            "bootstrap's (one run: the bootstrap's percentiles)")


def interval_note(scores: list[dict[str, Score]], n_resamples: int, seeds: bool) -> str:
    note = "points: mean; bars: " + (seeds_interval_note(n_resamples) + "; grey dots: each run" if seeds else
                                     f"95% bootstrap interval over cases ({n_resamples} resamples)")
    if any(score.low is None for group in scores for score in group.values()):
        note += f"; a point without a bar: {NO_INTERVAL}"
    return note


# ----------------------------------------------------------------------------- sweep figures


def _runs(ax: Axes, positions: list[float], values: list[list[float]], vertical: bool) -> None:
    """Each run's value as a faint dot beside its group's mean, when a group has several."""
    if all(len(v) < 2 for v in values):
        return
    at = [p for p, v in zip(positions, values) for _ in v]
    flat = [x for v in values for x in v]
    ax.scatter(*((at, flat) if vertical else (flat, at)), s=9, color="gray", alpha=0.5, zorder=3, label="a run")


def _points(ax: Axes, positions: list[float], scores: list[Score], vertical: bool) -> None:
    """Means with their intervals (a line through them when `vertical`: along a numeric x), each run
    as a dot where a group has several."""
    means = [score.mean for score in scores]
    errors = np.array([score.error() for score in scores]).reshape(-1, 2).T
    xy, bars = ((positions, means), {"yerr": errors}) if vertical else ((means, positions), {"xerr": errors})
    ax.errorbar(*xy, **bars, fmt="o-" if vertical else "o", color=COLOUR, ecolor=COLOUR, elinewidth=1.2,
                capsize=3, markersize=4, label="mean, 95% interval")
    _runs(ax, positions, [score.values for score in scores], vertical)


def line_figure(key: str, xs: list[float], scores: list[dict[str, Score]], metrics: list[tuple[str, str]]) -> Figure:
    """A panel per score against numeric `key` (x shared, on a log scale where the values span over 10x)."""
    columns = min(3, len(metrics))
    figure = new_figure(max(MIN_WIDTH, PANEL[0] * columns), PANEL[1] * -(-len(metrics) // columns) + 0.9)
    scale, options = x_scale(xs)
    for i, (ax, (metric, title)) in enumerate(zip(panels(figure, len(metrics), columns, sharex=True), metrics)):
        at = [(x, s[metric]) for x, s in zip(xs, scores) if metric in s]
        _points(ax, [x for x, _ in at], [score for _, score in at], vertical=True)
        ax.set_xscale(scale, **options)
        style(ax, title, ylabel="accuracy" if i % columns == 0 else "")
    if scale == "symlog":
        figure.axes[0].set_xlim(left=-0.3 * options["linthresh"])
    values = sorted(set(xs))
    if len(values) <= VALUE_TICKS:
        # A log axis labels only its decades (5e-05 and 5e-03 would be bare ticks): name each swept
        # value as the sweep's table prints it. The panels share x, so one axis sets them all.
        from matplotlib.ticker import NullLocator

        figure.axes[0].set_xticks(values, [fmt(v) for v in values])
        figure.axes[0].xaxis.set_minor_locator(NullLocator())
    figure.supxlabel(x_caption(key, scale, options), fontsize=9)     # one caption for the shared x
    return figure


def dot_figure(captions: list[str], scores: list[dict[str, Score]], metrics: list[tuple[str, str]]) -> Figure:
    """A panel per score, a row per configuration (rows shared, top to bottom in table order)."""
    columns = min(3, len(metrics))
    lines = -(-len(metrics) // columns)
    caption_lines = max(caption.count("\n") + 1 for caption in captions)
    figure = new_figure(max(MIN_WIDTH, PANEL[0] * columns + 0.4 + 0.5 * caption_lines),
                        (0.3 * len(captions) * (1 + 0.4 * (caption_lines - 1)) + 1.1) * lines + 0.9)
    ys = list(range(len(captions)))
    for ax, (metric, title) in zip(panels(figure, len(metrics), columns, sharey=True), metrics):
        at = [(y, s[metric]) for y, s in zip(ys, scores) if metric in s]
        _points(ax, [y for y, _ in at], [score for _, score in at], vertical=False)
        style(ax, title, "accuracy", grid="x")
        ax.margins(x=0.15)
    figure.axes[0].set_yticks(ys, captions)
    figure.axes[0].set_ylim(len(captions) - 0.5, -0.5)        # the first configuration on top
    return figure


# ----------------------------------------------------------------------------- the paper's Fig. 2


def zeroshot_sets(runs: list[tuple[str, dict[str, float]]]) -> list[str]:
    """The zero-shot sets any run has an accuracy for (`zeroshot/<set>`, the mean excluded), by name."""
    return sorted({key[len(ZEROSHOT_PREFIX):] for _, metrics in runs for key in metrics
                   if key.startswith(ZEROSHOT_PREFIX) and key != ZEROSHOT_MEAN})


def zeroshot_figure(groups: list[tuple[str, list[dict]]], n_resamples: int = 1000, seed: int = 0) -> Figure | None:
    """Fig. 2: grouped bars of accuracy per zero-shot set, a bar per row that has any: the mean over the
    row's runs (its seeds, each {"metrics", "outcomes"}) with the 95% interval over seeds and the set's
    cases from their outcomes (`group_scores`); None: no row has a set."""
    sets = zeroshot_sets([(label, run["metrics"]) for label, runs in groups for run in runs])
    shown = [(label, runs) for label, runs in groups
             if any(ZEROSHOT_PREFIX + s in run["metrics"] for s in sets for run in runs)]
    if not shown:
        return None
    keys = [ZEROSHOT_PREFIX + s for s in sets]
    figure = new_figure(max(6.0, 1.1 * len(sets) * max(1, len(shown) / 3) + 2), 4.2)
    ax = figure.add_subplot()
    width = 0.8 / len(shown)
    lacking = []
    for i, (label, runs) in enumerate(shown):
        scores = group_scores(runs, keys, n_resamples, seed)
        if any(score.low is None for score in scores.values()):
            lacking.append(label)
        errors = np.array([scores[k].error() if k in scores else (math.nan, math.nan) for k in keys]).T
        offset = (i - (len(shown) - 1) / 2) * width
        ax.bar([x + offset for x in range(len(sets))], [scores[k].mean if k in scores else math.nan for k in keys],
               width, yerr=errors, capsize=3, error_kw={"elinewidth": 1, "ecolor": "black"}, label=label)
    crowded = len(sets) > 4
    ax.set_xticks(range(len(sets)), sets, rotation=30 if crowded else 0, ha="right" if crowded else "center")
    ax.set_ylim(0, 1.05)
    style(ax, "", "zero-shot set", "top-1 accuracy", grid="y")
    notes = ["error bars: " + seeds_interval_note(n_resamples)]
    if lacking:
        notes.append(f"no interval for {', '.join(lacking)}: no per-case outcomes in the results")
    figure_title(figure, "Zero-shot accuracy per set, pretrained and fine-tuned", notes)
    add_legend(figure, ax)
    return figure


# ----------------------------------------------------------------------------- inference time (Fig. 1)


def duration(seconds: float, digits: int | None = None) -> str:
    """A time in the largest of s, ms and µs it is at least a tenth of ("0.18 ms", "6.5 ms", "1 s"),
    to `digits` significant digits (None: as short as the value allows, for round tick values)."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= 0.1 * scale:
            break
    value = seconds / scale
    text = f"{value:g}" if digits is None else f"{value:.0f}" if value >= 10 ** digits - 0.5 \
        else f"{value:#.{digits}g}".rstrip(".")
    return f"{text}{NBSP}{unit}"


def inference_figure(points: list[tuple[str, float, float, tuple[float, float] | None]]) -> Figure:
    """Fig. 1: each scorer's Winoground text score against its inference time per image-caption pair.

    `points`: (label, seconds per pair, text score, its 95% interval (low, high) or None). Laid out
    as the paper's figure: the score across (with the interval as a bar), the time up on a log
    scale, each point labelled with its time (the log axis names only its decades); the title gives
    the slowest scorer's time over the fastest's.
    """
    if not points:
        raise ValueError("inference figure: no scorer to plot")
    for label, seconds, score, interval in points:
        if not (math.isfinite(seconds) and seconds > 0):
            raise ValueError(f"inference figure: {label}: seconds per pair {seconds!r} is not a positive number")
        if interval is not None and not interval[0] <= score <= interval[1]:
            raise ValueError(f"inference figure: {label}: text score {score!r} is outside its interval {interval!r}")
    from matplotlib.ticker import NullFormatter

    figure = new_figure(6.4, 4.4)
    axes = figure.add_subplot()
    labels = []
    for i, (label, seconds, score, interval) in enumerate(points):
        xerr = None if interval is None else [[score - interval[0]], [interval[1] - score]]
        axes.errorbar([score], [seconds], xerr=xerr, fmt="o", color=f"C{i % 10}", capsize=3)
        labels.append(axes.annotate(f"{label}: {duration(seconds, 2)}", (score, seconds), xytext=LABEL_OFFSET,
                                    textcoords="offset points", fontsize=8, color=f"C{i % 10}"))
    axes.set_yscale("log")
    axes.yaxis.set_major_formatter(lambda seconds, _: duration(seconds))
    axes.yaxis.set_minor_formatter(NullFormatter())   # a short span's minor ticks would read in bare seconds
    # Room above the highest point and right of the rightmost for their labels.
    axes.margins(x=0.25, y=0.3)
    times = [seconds for _, seconds, _, _ in points]
    style(axes, "", "Winoground text score", "inference time per image-caption pair (log scale)")
    figure_title(figure, f"Winoground text score against inference time (slowest / fastest: "
                         f"{max(times) / min(times):.1f}x)",
                 ["bars: the evaluation's 95% bootstrap interval over tasks"] if any(p[3] for p in points) else [])
    bars = [(interval, seconds) for _, seconds, _, interval in points if interval is not None]
    _separate_labels(figure, labels, bars)
    return figure


def _separate_labels(figure: Figure, labels: list, bars: list[tuple[tuple[float, float], float]]) -> None:
    """Place each point label inside the axes where it overlaps no point, no interval bar (`bars`:
    ((low, high), y) in data units) and no label placed before it: right of its point, else left of
    it (a long label near the right edge), moved down, then up, a line at a time until such a place
    is found. Students of one size score and run alike, so their labels would print over each other
    and over each other's bars."""
    from matplotlib.transforms import Bbox

    for label in labels:
        label.set_in_layout(False)   # kept inside the axes: the layout need not make room, nor change once placed
    figure.canvas.draw()   # lays the figure out, so that the labels have their final extents
    renderer = figure.canvas.get_renderer()
    frame = labels[0].axes.get_window_extent(renderer)
    radius = 4 * figure.dpi / 72   # a marker's half width (6 points) and a little; a bar's caps are 3 points
    to_window = labels[0].axes.transData.transform
    points = [to_window(label.xy) for label in labels]
    placed = [Bbox([[x - radius, y - radius], [x + radius, y + radius]]) for x, y in points]
    for (low, high), y in bars:
        (x0, y0), (x1, _) = to_window([(low, y), (high, y)])
        placed.append(Bbox([[x0 - radius, y0 - radius], [x1 + radius, y0 + radius]]))

    def place(label, side: int, lines: int, free: bool) -> bool:
        """Put `label` on `side` (1: right, -1: left) of its point, `lines` lines up; whether it lies
        inside the axes and, if `free`, overlaps nothing placed."""
        label.set_horizontalalignment("left" if side > 0 else "right")
        line = label.get_window_extent(renderer).height * 72 / figure.dpi + 1
        label.xyann = (side * LABEL_OFFSET[0], LABEL_OFFSET[1] + lines * line)
        box = label.get_window_extent(renderer)
        inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
        return inside and not (free and any(box.overlaps(other) for other in placed))

    steps = 2 * (len(placed) + len(labels))     # a move clears one line: enough to pass every box placed
    places = [(side, lines) for lines in [*range(0, -steps, -1), *range(1, steps)] for side in (1, -1)]
    for label in sorted(labels, key=lambda a: -a.get_window_extent(renderer).y0):
        # A crowded axes may leave no free place: then the first inside it; failing that, the first place.
        if not any(place(label, *where, free=True) for where in places) and \
                not any(place(label, *where, free=False) for where in places):
            place(label, 1, 0, free=False)
        placed.append(label.get_window_extent(renderer))
