"""The report: Table 1, sweep tables and figures, the zero-shot figure, and the stage, from results files."""
import csv
import io
import json
import math
from pathlib import Path

import pytest
import yaml

from pipeline.figures import x_scale, zeroshot_figure, zeroshot_sets
from pipeline.comparison import outcome_parts, seed_task_interval
from pipeline.metrics import encode_correct
from pipeline.report import (COLUMNS, by_value, sorted_trials, sweep_figure, swept_keys, table_trials,
                             write_sweep_report)
from pipeline import paper_tables
from pipeline.config import flatten, load, to_dict
from stages import report as stage
from stages.sweep import listing

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# The config of the study `write_params` writes (lambda 1e-3), dotted, as a trial's results hold it.
STUDY = flatten(to_dict(load(Path(__file__).resolve().parents[1] / "params.yaml", {"objective": {"lambda_sds": 0.001}})))
KEYS = [key for _, key in COLUMNS]

RUNS = [
    ("pretrained", {"winoground/text": 0.24, "winoground/text/object": 0.28, "aro/overall": 0.5725,
                    "winoground/text/ci_low": 0.2, "winoground/text/ci_high": 0.285}),
    ("diffusion score", {"winoground/text": 0.3}),
]

# Trials of a lambda sweep, listed out of order: t003 failed yet reported a score the figure must not
# show; t001's image score is NaN, which is no score.
LAMBDA_TRIALS = [
    ("t003", {"objective.lambda_sds": 0.1}, "failed", {"winoground/text": 0.05}),
    ("t001", {"objective.lambda_sds": 1e-5}, "finished",
     {"winoground/text": 0.3, "winoground/image": math.nan, "aro/overall": 0.55}),
    ("t000", {"objective.lambda_sds": 0}, "finished",
     {"winoground/text": 0.25, "winoground/text/object": 0.12345, "aro/overall": 0.5, "zeroshot/mean": 0.3}),
    ("t002", {"objective.lambda_sds": 0.01}, "finished",
     {"winoground/text": 0.2876, "aro/overall": 0.61, "zeroshot/mean": 0.4}),
]
SCOPE_TRIALS = [
    ("t000", {"train.scope": "layernorm"}, "finished", {"winoground/text": 0.2}),
    ("t001", {"train.scope": "full"}, "finished", {"winoground/text": 0.3}),
    ("t002", {"train.scope": "unet_feature"}, "finished", {"winoground/text": 0.1}),
]
ZEROSHOT = {
    "pretrained toy-vit": {"zeroshot/pets": 0.4, "zeroshot/cifar10": 0.5, "zeroshot/mean": 0.45, "winoground/text": 0.125},
    "FT with L_CLIP": {"zeroshot/cifar10": 0.6, "zeroshot/mean": 0.6},
    "FT with L_CLIP + 0.001 L_SDS": {"zeroshot/pets": 0.42, "zeroshot/cifar10": 0.7, "zeroshot/mean": 0.56},
    "diffusion score (toy-ldm)": {"winoground/text": 0.3},
}


# Each Table-1 row's Winoground text correctness on the same 8 tasks (the reference is FT with L_CLIP).
TEXT_OUTCOMES = {"pretrained toy-vit": "10000000", "FT with L_CLIP": "11000000",
                 "FT with L_CLIP + 0.001 L_SDS": "11110000", "diffusion score (toy-ldm)": "11111111"}


def result_trial(label: str, config: dict, status: str, metrics: dict, outcomes: dict | None = None,
                 params: dict | None = None) -> dict:
    """A trial as a sweep's results file lists it (`pipeline.sweep`'s payload); `params`: its whole config,
    dotted (default: the toy study's with its swept values, the variant's name aside, over it)."""
    index = int(label[1:]) if label[1:].isdigit() else 0
    return {"trial": label, "trial_id": f"5e1f0_{index:05d}", "run_id": f"{index:032x}", "config": config,
            "params": params if params is not None else {**STUDY, **{k: v for k, v in config.items() if k != "variant"}},
            "status": status, "failure": "RuntimeError: loss is NaN" if status == "failed" else "",
            "metric": metrics.get("winoground/text") if status == "finished" else None,
            "trial_seconds": 41.5, "import_seconds": 2.1, "report_seconds": 0.4,
            "metrics": {"loss/clip": 0.61, "loss/total": 0.62, "time/trial_seconds": 41.5, **metrics},
            "outcomes": outcomes or {}}


def sweep_results(name: str, trials: list[dict]) -> dict:
    """The results file a launch of sweep `name` writes (results/sweeps/<name>.json)."""
    counts = {s: sum(t["status"] == s for t in trials) for s in ("finished", "early_stopped", "failed", "interrupted")}
    scored = [t for t in trials if t["metric"] is not None]
    return {"sweep": name, "experiment": f"sds-clip/{name}", "tracking_uri": "sqlite:///gone/mlruns/mlflow.db",
            "parent_run_id": f"{len(name):032x}", "metric": "winoground/text", "mode": "max",
            "best": max(scored, key=lambda t: t["metric"])["run_id"] if scored else None, "counts": counts,
            "wall_seconds": 90.0, "timing": {"ray_start_seconds": 3.0}, "trials": trials}


def write_sweep(results: Path, name: str, trials: list[dict]) -> dict:
    """`results/sweeps/<name>.json` and the sweep's results/sweeps.json entry, as stages.sweep writes them."""
    payload = sweep_results(name, trials)
    (results / "sweeps").mkdir(parents=True, exist_ok=True)
    (results / "sweeps" / f"{name}.json").write_text(json.dumps(payload, indent=1))
    return listing(f"sweeps/{name}.yaml", int(payload["counts"]["failed"] > 0), payload)


def write_table1_results(results: Path) -> None:
    """The baselines' and the two fine-tunings' results files of the `ZEROSHOT` runs."""
    results.mkdir(parents=True, exist_ok=True)
    entry = lambda label: {"run_id": f"{len(label):032x}", "metrics": ZEROSHOT[label],  # noqa: E731
                           "outcomes": {"winoground/text": {"correct": TEXT_OUTCOMES[label], "groups": None, "cases": "fixture"}}}
    timed = lambda label, seconds: {**entry(label), "metrics": {**ZEROSHOT[label],  # noqa: E731
                                                                 "time/winoground_pair_s": seconds}}
    (results / "baselines.json").write_text(json.dumps({
        "pretrained/toy-vit": timed("pretrained toy-vit", 0.001),
        "diffusion_score": {**timed("diffusion score (toy-ldm)", 0.05), "diffusion_samples": 16}}))
    (results / "train-clip.json").write_text(json.dumps(entry("FT with L_CLIP")))
    (results / "train-sds.json").write_text(json.dumps(entry("FT with L_CLIP + 0.001 L_SDS")))


def write_params(root: Path) -> Path:
    """The project's params.yaml with lambda 1e-3 (the Table-1 labels above) and only the toy-vit
    student (the results above hold its baselines), in `root`: its default tracking store is sqlite
    under root/mlruns/."""
    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params["objective"]["lambda_sds"] = 0.001
    params["students"] = {"toy-vit": params["students"]["toy-vit"]}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root / "params.yaml"


def trials_of(listed) -> list[dict]:
    """Results-file trials, through JSON as the report reads them (NaN included)."""
    return json.loads(json.dumps([result_trial(*trial) for trial in listed]))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A project folder: params.yaml and results/ with the Table-1 runs and two sweeps; no tracking store."""
    root = tmp_path_factory.mktemp("project")
    params = write_params(root)
    results = root / "results"
    write_table1_results(results)
    sweeps = {"lambda": write_sweep(results, "lambda", trials_of(LAMBDA_TRIALS)),
              "scope": write_sweep(results, "scope", trials_of(SCOPE_TRIALS))}
    write_sweep(results, "old", trials_of(SCOPE_TRIALS))   # a file results/sweeps.json does not list: never reported
    return {"root": root, "params": params, "sweeps": sweeps}


# ----------------------------------------------------------------------------- sweeps


def test_swept_keys_are_those_that_differ_a_variant_first():
    assert swept_keys(table_trials(trials_of(LAMBDA_TRIALS))) == ["objective.lambda_sds"]
    assert swept_keys(table_trials(trials_of(SCOPE_TRIALS))) == ["train.scope"]
    crossed = table_trials(trials_of([("t000", {"variant": "b", "train.lr": 0.1, "train.seed": 0}, "finished", {}),
                                      ("t001", {"variant": "a", "train.lr": 0.1, "train.seed": 1}, "finished", {})]))
    assert swept_keys(crossed) == ["variant", "train.seed"]   # one value of train.lr: no axis


def ordered(listed) -> list[dict]:
    trials = table_trials(trials_of(listed))
    return sorted_trials(trials, swept_keys(trials))


def test_trials_keep_their_sweeps_order_by_trial_index():
    """The sweep file's (grid) order everywhere: the reference variant first, not the alphabet's."""
    assert [t["config"]["train.scope"] for t in ordered(SCOPE_TRIALS)] == ["layernorm", "full", "unet_feature"]
    labels = ["t010", "late", "t002", "t000", "t1000", "t001"]    # "late": no index, after every indexed trial
    assert [t["trial"] for t in ordered([(label, {}, "finished", {}) for label in labels])] == \
        ["t000", "t001", "t002", "t010", "t1000", "late"]


def test_a_sweep_along_a_numeric_key_reads_by_value_as_its_figures_x_axis():
    lrs = [("t000", {"train.lr": 5e-3}, "finished", {}), ("t001", {"train.lr": 5e-5}, "finished", {}),
           ("t002", {"train.lr": 5e-3, "train.seed": 1}, "finished", {})]
    assert [t["trial"] for t in ordered(lrs)] == ["t001", "t000", "t002"]
    assert [t["config"]["objective.lambda_sds"] for t in ordered(LAMBDA_TRIALS)] == ["0", "1e-05", "0.01", "0.1"]


def test_a_student_by_variant_grid_keeps_each_students_rows_together_in_table_and_figure(tmp_path):
    """sweeps/table1.yaml's grid, students x variants x seeds, listed out of order: the table and the
    figure follow the trial index, so each student's rows stay together, its reference variant first."""
    grid = [(student, variant, seed) for student in ("vit", "rn50") for variant in ("FT with L_CLIP", "NegCLIP")
            for seed in (0, 1)]
    listed = [(f"t{i:03d}", {"train.student": s, "variant": v, "train.seed": seed}, "finished",
               {"winoground/text": 0.1 * (i + 1)}) for i, (s, v, seed) in enumerate(grid)]
    write_sweep_report("table1", trials_of(listed[::-1]), tmp_path)
    _, *rows = list(csv.reader(io.StringIO((tmp_path / "sweep-table1.csv").read_text())))
    assert [(r[1], r[3]) for r in rows] == [(v, s) for s, v, _ in grid]
    trials = table_trials(trials_of(listed[::-1]))
    keys = swept_keys(trials)
    figure = sweep_figure("table1", sorted_trials(trials, keys), keys)
    assert [t.get_text() for t in figure.axes[0].get_yticklabels()] == [
        f"{v}\ntrain.student={s} (2 runs)" for s, v in dict.fromkeys((s, v) for s, v, _ in grid)]


def test_sweep_table_rows_statuses_values_and_dashes(tmp_path):
    written = write_sweep_report("lambda", trials_of(LAMBDA_TRIALS), tmp_path)
    assert [p.name for p in written] == ["sweep-lambda.md", "sweep-lambda.tex", "sweep-lambda.csv", "sweep-lambda.png"]
    header, *rows = list(csv.reader(io.StringIO((tmp_path / "sweep-lambda.csv").read_text())))
    assert header == ["trial", "objective.lambda_sds", "status"] + KEYS
    column = {name: i for i, name in enumerate(header)}
    assert [(r[0], r[1], r[2]) for r in rows] == [("t000", "0", "finished"), ("t001", "1e-05", "finished"),
                                                   ("t002", "0.01", "finished"), ("t003", "0.1", "failed")]
    assert [r[column["winoground/text"]] for r in rows] == ["0.250", "0.300", "0.288", "0.050"]
    assert rows[0][column["winoground/text/object"]] == "0.123"
    assert [r[column["zeroshot/mean"]] for r in rows] == ["0.300", "-", "0.400", "-"]
    assert rows[1][column["winoground/image"]] == "-"     # NaN
    assert set(rows[3][3:]) == {"0.050", "-"}
    md = (tmp_path / "sweep-lambda.md").read_text().splitlines()
    assert md[0].startswith("| trial | objective.lambda_sds | status | Wino text |") and len(md) == 2 + 4
    tex = (tmp_path / "sweep-lambda.tex").read_text()
    assert r"objective.lambda\_sds" in tex and tex.startswith(r"\begin{tabular}{lrl" + "r" * len(COLUMNS) + "}")
    assert (tmp_path / "sweep-lambda.png").read_bytes().startswith(PNG_MAGIC)


def title_of(figure) -> str:
    """The figure's title and notes, unwrapped."""
    return " ".join(figure.get_suptitle().split())


def panel_titles(figure) -> list[str]:
    return [ax.get_title() for ax in figure.axes if ax.get_visible()]


def panel(figure, title: str):
    [ax] = [ax for ax in figure.axes if ax.get_visible() and ax.get_title() == title]
    return ax


def error_bars(ax):
    """The (means, [(low, high)] intervals) of the panel's error bar, along x or y as the panel draws it;
    a point without an interval has no bar."""
    from matplotlib.container import ErrorbarContainer

    [bars] = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    line, _, (segments, *_) = bars.lines
    along_y = bars.has_yerr
    means = list(line.get_ydata() if along_y else line.get_xdata())
    ends = [(seg[0][1], seg[1][1]) if along_y else (seg[0][0], seg[1][0]) for seg in segments.get_segments()
            if len(seg)]
    return means, [tuple(sorted(end)) for end in ends]


def x_ticks(figure) -> list[str]:
    """The labels of the shared x axis's ticks, the same on every panel, with no unlabelled minor ticks
    (a log axis's default labels only its decades)."""
    figure.canvas.draw()
    labels = {tuple(t.get_text() for t in ax.get_xticklabels()) for ax in figure.axes}
    assert len(labels) == 1 and not any(ax.get_xticks(minor=True).size for ax in figure.axes)
    return list(labels.pop())


def test_lambda_figure_has_a_panel_per_score_that_varies_on_a_shared_symlog_axis():
    trials = table_trials(trials_of(LAMBDA_TRIALS))
    keys = swept_keys(trials)
    figure = sweep_figure("lambda", sorted_trials(trials, keys), keys)
    assert panel_titles(figure) == ["Winoground text", "ARO overall", "zero-shot mean"]
    assert {ax.get_xscale() for ax in figure.axes} == {"symlog"}  # 0 and positive values spanning 1000x
    assert figure.get_supxlabel() == "objective.lambda_sds (log scale; linear from 0 to 1e-05)"
    assert x_ticks(figure) == ["0", "1e-05", "0.01"]     # the plotted values, as the table prints them
    assert panel(figure, "Winoground text").get_ylabel() == "accuracy"
    line = panel(figure, "Winoground text").containers[0].lines[0]
    assert list(line.get_xdata()) == [0, 1e-5, 0.01]  # failed t003 (0.1) left out
    assert list(line.get_ydata()) == [0.25, 0.3, 0.2876]
    assert list(panel(figure, "zero-shot mean").containers[0].lines[0].get_xdata()) == [0, 0.01]
    title = title_of(figure)
    assert "t003 (failed)" in title and "a point without a bar: its runs' results hold no per-case outcomes" in title


def varied(index: int, text: list[int], hw: list[int]) -> dict:
    """A lambda trial with real outcomes: Winoground text and h_w text vary, ARO is the same in every trial."""
    outcomes = {"winoground/text": {"correct": encode_correct(text), "groups": None, "cases": "fixture"},
                "projected/winoground/text": {"correct": encode_correct(hw), "groups": None, "cases": "fixture"},
                "aro/vg_relation": {"correct": "1100", "groups": ["on", "on", "under", "under"], "cases": "fixture"},
                "aro/vg_attribution": {"correct": "1010", "groups": None, "cases": "fixture"}}
    metrics = {"winoground/text": sum(text) / len(text), "projected/winoground/text": sum(hw) / len(hw),
               "aro/overall": 0.5}
    return result_trial(f"t{index:03d}", {"objective.lambda_sds": [1e-4, 1e-3, 1e-2][index]}, "finished", metrics,
                        outcomes)


def test_a_score_that_varies_is_plotted_with_its_interval_and_a_constant_one_is_named_instead():
    """What moved across a lambda sweep (here h_w text) gets a panel with each trial's bootstrap interval
    over its cases; a score the same in every trial (ARO) gets none, and the title says its value."""
    listed = [varied(0, [1, 0, 1, 0, 1, 0, 1, 0], [0] * 6 + [1, 1]),
              varied(1, [1, 1, 0, 0, 1, 0, 1, 0], [0, 0] + [1] * 6),
              varied(2, [1, 0, 1, 1, 1, 0, 1, 0], [1] * 8)]
    trials = table_trials(json.loads(json.dumps(listed)))
    keys = swept_keys(trials)
    figure = sweep_figure("lambda", sorted_trials(trials, keys), keys, n_resamples=200, seed=3)
    assert panel_titles(figure) == ["Winoground text", "h_w text"]
    assert "ARO overall 0.500" in title_of(figure) and "ARO overall" not in panel_titles(figure)
    assert {ax.get_xscale() for ax in figure.axes} == {"log"}
    assert figure.get_supxlabel() == "objective.lambda_sds (log scale)"
    assert x_ticks(figure) == ["0.0001", "0.001", "0.01"]
    assert [ax.get_ylabel() for ax in figure.axes] == ["accuracy", ""]     # the first column's
    means, intervals = error_bars(panel(figure, "h_w text"))
    assert means == [0.25, 0.75, 1.0] and len(intervals) == 3
    for trial, (low, high) in zip(listed, intervals):
        parts = outcome_parts([trial["outcomes"]])["projected/winoground/text"]
        assert (low, high) == pytest.approx(seed_task_interval(parts, 200, seed=3)[1:])
    assert intervals[0][1] - intervals[0][0] > 0.2    # 8 cases: a wide interval, drawn
    assert "bars: 95% bootstrap interval over cases (200 resamples)" in title_of(figure)


def test_a_non_numeric_sweep_gets_a_row_per_configuration(tmp_path):
    trials = table_trials(trials_of(SCOPE_TRIALS))
    keys = swept_keys(trials)
    figure = sweep_figure("scope", sorted_trials(trials, keys), keys)
    assert panel_titles(figure) == ["Winoground text"]
    ax = figure.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == [
        "train.scope=layernorm", "train.scope=full", "train.scope=unet_feature"]
    assert error_bars(ax)[0] == [0.2, 0.3, 0.1]
    assert ax.get_xlabel() == "accuracy"
    written = write_sweep_report("scope", trials_of(SCOPE_TRIALS), tmp_path)
    assert written[-1].read_bytes().startswith(PNG_MAGIC)


def test_two_swept_keys_get_rows_and_nothing_to_plot_gets_no_figure():
    def trial(label, lr, lam, status="finished", metrics=None):
        return (label, {"train.lr": lr, "objective.lambda_sds": lam}, status, metrics or {})

    trials = table_trials(trials_of([trial("t000", 1e-5, 0.1, metrics={"aro/overall": 0.5}),
                                     trial("t001", 1e-3, 0.01)]))
    keys = swept_keys(trials)
    assert keys == ["objective.lambda_sds", "train.lr"]
    figure = sweep_figure("optuna", trials, keys)
    # One trial has a score: nothing varies, so what it has is plotted, a row for its configuration.
    assert panel_titles(figure) == ["ARO overall"]
    assert [t.get_text() for t in figure.axes[0].get_yticklabels()] == ["objective.lambda_sds=0.1\ntrain.lr=1e-05"]
    failed = table_trials(trials_of([trial("t000", 1e-5, 0.1, "failed", {"aro/overall": 0.5})]))
    assert sweep_figure("optuna", failed, keys) is None


def test_seeds_of_a_configuration_make_one_point_at_their_mean_with_their_seed_and_case_interval():
    """A sweep of students x seeds: a row per student, not per run, so the figure does not grow with
    the seeds (500 runs drew a 376-inch figure before); the interval is the seeds-and-cases bootstrap."""
    def trials(listed, outcomes=True):
        rows = []
        for i, (student, seed, correct) in enumerate(listed):
            kept = {"winoground/text": {"correct": correct, "groups": None, "cases": "fixture"}} if outcomes else None
            rows.append((f"t{i:03d}", {"train.student": student, "train.seed": seed}, "finished",
                         {"winoground/text": correct.count("1") / len(correct)}, kept))
        return table_trials(json.loads(json.dumps([result_trial(*row) for row in rows])))

    runs = [("a", 0, "1100000000"), ("a", 1, "1111000000"), ("a", 2, "1110000000"),
            ("b", 0, "1111100000"), ("b", 1, "0000011111")]
    few = trials(runs)
    keys = swept_keys(few)
    figure = sweep_figure("students", sorted_trials(few, keys), keys, n_resamples=300)
    ax = figure.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["train.student=a (3 runs)", "train.student=b (2 runs)"]
    means, intervals = error_bars(ax)
    assert means == pytest.approx([0.3, 0.5]) and len(intervals) == 2
    for student, (low, high) in zip("ab", intervals):
        correct = [{"winoground/text": {"correct": c, "groups": None, "cases": "fixture"}} for s, _, c in runs if s == student]
        assert (low, high) == pytest.approx(seed_task_interval(outcome_parts(correct)["winoground/text"], 300)[1:])
    [dots] = ax.collections[-1:]
    assert sorted(dots.get_offsets()[:, 0]) == pytest.approx([0.2, 0.3, 0.4, 0.5, 0.5])   # each run
    assert "over seeds and cases" in title_of(figure)
    many = trials([("ab"[i % 2], i, "10") for i in range(200)], outcomes=False)
    assert sweep_figure("students", many, swept_keys(many)).get_size_inches()[1] == figure.get_size_inches()[1]


def test_a_variant_captions_its_row_by_its_name_and_other_keys_on_lines_of_their_own():
    def trials(listed):
        return table_trials(trials_of([(f"t{i:03d}", config, "finished", {"winoground/text": 0.5 + i / 10})
                                       for i, config in enumerate(listed)]))

    seeds = trials([{"variant": "FT with L_CLIP", "train.seed": 0}, {"variant": "FT with L_CLIP", "train.seed": 1},
                    {"variant": "NegCLIP", "train.seed": 0}])
    keys = swept_keys(seeds)
    axes = sweep_figure("methods", sorted_trials(seeds, keys), keys).axes[0]
    assert [t.get_text() for t in axes.get_yticklabels()] == ["FT with L_CLIP (2 runs)", "NegCLIP"]
    crossed = trials([{"variant": v, "train.lr": lr, "train.seed": s} for v, lr, s in
                      [("NegCLIP", 0.2, 0), ("FT with L_CLIP", 0.1, 0), ("FT with L_CLIP", 0.1, 1),
                       ("NegCLIP", 0.1, 0)]])
    keys = swept_keys(crossed)
    axes = sweep_figure("methods", sorted_trials(crossed, keys), keys).axes[0]
    assert [t.get_text() for t in axes.get_yticklabels()] == [
        "NegCLIP\ntrain.lr=0.2", "FT with L_CLIP\ntrain.lr=0.1 (2 runs)", "NegCLIP\ntrain.lr=0.1"]


def test_repeated_values_make_one_group():
    trials = table_trials(trials_of([("t000", {"x": 1.0}, "finished", {}), ("t001", {"x": 0}, "finished", {}),
                                     ("t002", {"x": 1}, "finished", {})]))
    assert [(x, [t["trial"] for t in members]) for x, members in by_value(trials, "x")] == [
        (0.0, ["t001"]), (1.0, ["t000", "t002"])]


@pytest.mark.parametrize("values, scale", [
    ([1e-5, 1e-4, 1e-3], ("log", {})),
    ([0, 1e-4, 1e-1], ("symlog", {"linthresh": 1e-4, "linscale": 0.5})),
    ([1, 2, 10], ("linear", {})),          # spans only 10x
    ([-1, 1, 100], ("linear", {})),
    ([0, 1], ("linear", {})),
])
def test_x_scale(values, scale):
    assert x_scale(values) == scale


def test_notes_wrap_at_spaces_keeping_hyphenated_words_short_groups_and_values_with_units_whole():
    from pipeline.figures import figure_title, new_figure, unbroken

    figure = new_figure(3.4, 2.0)       # 40 characters a line: "zero-" and "(1000" would end one
    notes = ["same in every trial that has it: zero-shot mean 0.690, ARO overall 0.577, MMVP 0.650",
             "points: mean; bars: 95% bootstrap interval over seeds and cases (1000 resamples)"]
    figure_title(figure, "sweep lambda", notes)
    lines = [" ".join(line.split()) for line in figure.get_suptitle().splitlines()]
    assert len(lines) > 3 and " ".join(lines) == " ".join(["sweep lambda", *notes])
    assert not any(line.endswith("-") for line in lines) and any("zero-shot mean" in line for line in lines)
    assert any("(1000 resamples)" in line for line in lines)
    assert unbroken("took 16 samples, 6.5 ms (slowest / fastest)") == \
        "took 16\u00a0samples, 6.5\u00a0ms (slowest\u00a0/\u00a0fastest)"


# ----------------------------------------------------------------------------- zero-shot figure


def test_zeroshot_figure_has_a_group_per_set_and_a_bar_per_run_with_sets():
    runs = list(ZEROSHOT.items())
    assert zeroshot_sets(runs) == ["cifar10", "pets"]
    figure = zeroshot_figure([(label, [{"metrics": metrics}]) for label, metrics in runs])
    axes = figure.axes[0]
    assert [t.get_text() for t in axes.get_xticklabels()] == ["cifar10", "pets"]
    assert [t.get_text() for t in figure.legends[0].get_texts()] == list(ZEROSHOT)[:3]  # no diffusion score
    heights = [[bar.get_height() for bar in bars] for bars in bar_containers(axes)]
    assert heights[0] == [0.5, 0.4] and heights[2] == [0.7, 0.42]
    assert heights[1][0] == 0.6 and math.isnan(heights[1][1])  # FT L_CLIP has no pets accuracy
    assert axes.get_ylabel() == "top-1 accuracy"
    assert zeroshot_figure([("diffusion score", [{"metrics": {"winoground/text": 0.3}}])]) is None


def bar_containers(axes):
    from matplotlib.container import BarContainer

    return [c for c in axes.containers if isinstance(c, BarContainer)]


def test_zeroshot_bars_carry_the_bootstrap_interval_over_the_sets_cases():
    """Each bar's error bar is the 95% bootstrap interval over that set's cases, from the run's outcomes;
    a run whose results hold none gets no bar, and the title says which."""
    cases = {"pretrained toy-vit": {"pets": "1100", "cifar10": "10101010"},
             "FT with L_CLIP + 0.001 L_SDS": {"pets": "1110", "cifar10": "11101110"}}
    outcomes = {label: {f"zeroshot/{name}": {"correct": c, "groups": None, "cases": "fixture"} for name, c in sets.items()}
                for label, sets in cases.items()}
    groups = [(label, [{"metrics": metrics, "outcomes": outcomes.get(label, {})}]) for label, metrics in ZEROSHOT.items()]
    figure = zeroshot_figure(groups, n_resamples=200, seed=1)
    axes = figure.axes[0]
    for bars, label in zip(bar_containers(axes), ZEROSHOT):
        segments = bars.errorbar.lines[2][0].get_segments()
        for segment, name in zip(segments, ["cifar10", "pets"]):
            if label not in cases:
                assert all(math.isnan(y) for _, y in segment)       # no outcomes: no interval
                continue
            parts = outcome_parts([outcomes[label]])[f"zeroshot/{name}"]
            assert (segment[0][1], segment[1][1]) == pytest.approx(seed_task_interval(parts, 200, seed=1)[1:])
    assert segments and "no interval for FT with L_CLIP: no per-case outcomes in the results" in title_of(figure)


# ----------------------------------------------------------------------------- the stage


def test_stage_writes_tables_figures_and_removes_stale_sweep_outputs(store):
    root = store["root"]
    sweeps = {**store["sweeps"], "broken": {"file": "sweeps/broken.yaml", "exit": 2}}
    (root / "results" / "sweeps.json").write_text(json.dumps(sweeps))
    reports = root / "reports"
    reports.mkdir(exist_ok=True)
    (reports / "sweep-old.md").write_text("an earlier sweep\n")
    (reports / "notes.txt").write_text("not the report's\n")
    (reports / "appendix-unet-feature.md").write_text("from a study whose sweeps ran the UNet-feature loss\n")
    (reports / "table2-intervals.md").write_text("from a study on the paper profile\n")
    assert stage.main(["--params", str(store["params"])]) == 0
    names = sorted(p.name for p in reports.iterdir())
    assert names == sorted([".outputs.json", "notes.txt", "inference.png", "table1.csv", "table1.md", "table1.tex",
                            "table1-intervals.csv", "table1-intervals.md", "table1-intervals.tex", "zeroshot.png"] + [f"sweep-{n}.{s}" for n in ("lambda", "scope") for s in ("csv", "md", "png", "tex")]
                           + [f"appendix-diffusion-score.{s}" for s in ("csv", "md", "tex")])
    assert (reports / "zeroshot.png").read_bytes().startswith(PNG_MAGIC)
    assert (reports / "inference.png").read_bytes().startswith(PNG_MAGIC)
    points = paper_tables.inference_points(stage.table_rows(load(store["params"]), root / "results", None))
    assert [(label, seconds) for label, seconds, _, _ in points] == [
        ("toy-vit pretrained", 0.001), ("diffusion score (toy-ldm), 16 samples", 0.05)]
    table = (reports / "table1.md").read_text().splitlines()
    assert [row.split("|")[1].strip() for row in table[2:]] == [
        "toy-vit pretrained", "toy-vit FT with L_CLIP", "toy-vit FT with L_CLIP + 0.001 L_SDS", "diffusion score (toy-ldm)"]
    # The last column: each row against FT with L_CLIP on the same tasks, McNemar's p (discordant 1 and 0:
    # z = 1, p = 0.317; 2 and 0: z = sqrt(2), p = 0.157; 6 and 0: z = sqrt(6), p = 0.014).
    assert table[0].rstrip(" |").endswith("Wino text vs FT with L_CLIP")
    versus = [row.split("|")[-2].strip() for row in table[2:]]
    assert versus[1] == "-"
    assert versus[0].startswith("-0.125 [") and versus[0].endswith("p=0.317")
    assert versus[2].startswith("+0.250 [") and versus[2].endswith("p=0.157")
    assert versus[3].startswith("+0.750 [") and versus[3].endswith("p=0.014 (vs toy-vit)")

    # The headline scores for `dvc metrics show`: a file per Table-1 row, each with the same keys.
    headline = {p.name: json.loads(p.read_text()) for p in (root / "metrics").iterdir()}
    assert sorted(headline) == ["diffusion-score.json", "ft-clip.json", "ft-sds.json", "pretrained.json"]
    assert {tuple(h) for h in headline.values()} == {("wino_text", "wino_image", "wino_group", "aro", "zeroshot")}
    assert headline["ft-sds.json"]["zeroshot"] == 0.56 and headline["diffusion-score.json"]["zeroshot"] is None

    (root / "results" / "sweeps.json").unlink()
    assert stage.main(["--params", str(store["params"])]) == 0
    assert not list(reports.glob("sweep-*"))
    assert (reports / "table1.md").is_file() and (reports / "zeroshot.png").is_file()


def test_stage_fills_table1_from_the_table1_sweeps_seeds_when_it_ran(store):
    results, reports = store["root"] / "results", store["root"] / "reports"
    correct = {("FT with L_CLIP", 0): "11000000", ("FT with L_CLIP", 1): "11100000",
               ("FT with L_CLIP + L_SDS", 0): "11110000", ("FT with L_CLIP + L_SDS", 1): "11111100"}
    objectives = {"FT with L_CLIP": {"objective.method": "clip", "objective.lambda_sds": 0.0},
                  "FT with L_CLIP + L_SDS": {"objective.method": "sds"}}
    trials = [result_trial(f"t{i:03d}", {"train.student": "toy-vit", "variant": v, "train.seed": seed}, "finished",
                           {"winoground/text": c.count("1") / 8},
                           {"winoground/text": {"correct": c, "groups": None, "cases": "fixture"}},
                           {**STUDY, "train.student": "toy-vit", "train.seed": seed, **objectives[v]})
              for i, ((v, seed), c) in enumerate(correct.items())]
    (results / "sweeps.json").write_text(json.dumps({"table1": write_sweep(results, "table1", trials)}))
    try:
        assert stage.main(["--params", str(store["params"])]) == 0
        table = {row.split("|")[1].strip(): [c.strip() for c in row.split("|")[2:-1]]
                 for row in (reports / "table1.md").read_text().splitlines()[2:]}
        sds = "toy-vit FT with L_CLIP + 0.001 L_SDS"     # the profile's lambda (write_params)
        assert list(table) == ["toy-vit pretrained", "toy-vit FT with L_CLIP", sds, "diffusion score (toy-ldm)"]
        assert table[sds][0] == "0.625" and table["toy-vit FT with L_CLIP"][0] == "0.312"
        assert table[sds][-4] == "2"            # seeds
        ft_sds = json.loads((store["root"] / "metrics" / "ft-sds.json").read_text())
        assert ft_sds["wino_text"] == 0.625
    finally:
        (results / "sweeps.json").unlink()


def test_stage_writes_a_variant_sweeps_comparison_and_removes_it_when_the_sweep_is_gone(store):
    results, reports = store["root"] / "results", store["root"] / "reports"
    # The scope sweep's results file holds named variants and seeds only: its comparison is written.
    labelled = [{**trial, "trial": f"t{i:03d}"} for i, trial in enumerate(VARIANT_TRIALS)]
    sweeps = {**store["sweeps"], "scope": write_sweep(results, "scope", labelled)}
    (results / "sweeps.json").write_text(json.dumps(sweeps))
    try:
        assert stage.main(["--params", str(store["params"])]) == 0
        assert {p.name for p in reports.glob("scope.*")} == {"scope.md", "scope.tex", "scope.csv", "scope.png"}
        assert "| hard | 2 |" in (reports / "scope.md").read_text()
        # A variant sweep that also swept another key is pooled into no comparison.
        mixed = [{**t, "config": {**t["config"], "train.lr": 0.1 * (i % 2 + 1)}} for i, t in enumerate(labelled)]
        write_sweep(results, "scope", mixed)
        assert stage.main(["--params", str(store["params"])]) == 0
        assert not list(reports.glob("scope.*"))
    finally:
        write_sweep(results, "scope", trials_of(SCOPE_TRIALS))
        (results / "sweeps.json").unlink()


def test_a_listed_sweep_without_its_results_file_is_a_one_line_error(store, capsys):
    results = store["root"] / "results"
    (results / "sweeps.json").write_text(json.dumps({**store["sweeps"], "gone": {**store["sweeps"]["scope"]}}))
    try:
        assert stage.main(["--params", str(store["params"])]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "sweeps/gone.json: missing results of sweep gone" in err
        assert len(err.splitlines()) == 1
        # A results file whose trial lacks its status: the file, the trial and the field are named.
        broken = trials_of(SCOPE_TRIALS)
        del broken[1]["status"]
        (results / "sweeps" / "gone.json").write_text(json.dumps({**sweep_results("gone", trials_of(SCOPE_TRIALS)),
                                                                 "trials": broken}))
        assert stage.main(["--params", str(store["params"])]) == 2
        assert capsys.readouterr().err.strip().endswith("sweeps/gone.json: trial 1: field 'status' is missing")
    finally:
        (results / "sweeps.json").unlink()
        (results / "sweeps" / "gone.json").unlink(missing_ok=True)


def test_results_written_before_outcomes_named_their_cases_are_a_one_line_error(store, capsys):
    """Outcomes without the digest of their cases cannot be paired case by case: the report names
    the file, the row and the outcome in one line."""
    path = store["root"] / "results" / "baselines.json"
    kept = path.read_text()
    baselines = json.loads(kept)
    row = next(iter(baselines))
    name = next(iter(baselines[row]["outcomes"]))
    del baselines[row]["outcomes"][name]["cases"]
    path.write_text(json.dumps(baselines))
    try:
        assert stage.main(["--params", str(store["params"])]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1
        assert err.startswith(f"error: {path}: {row} outcome {name}: field 'cases' is missing: written before")
    finally:
        path.write_text(kept)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_runs_scored_on_other_cases_are_a_one_line_error_and_nothing_of_the_report_is_written(store, capsys):
    """Two seeds of one variant whose outcomes are of other cases cannot be put together: one line naming
    the sweep's results file, the variant and its trials, and the report's earlier outputs and metrics
    files stay byte for byte, those it would write before the sweep too."""
    root = store["root"]
    listed = root / "results" / "sweeps.json"
    assert stage.main(["--params", str(store["params"])]) == 0
    (root / "reports" / "table1.md").write_text("an earlier report's\n")
    (root / "metrics" / "ft-clip.json").write_text("{}\n")
    before = {folder: snapshot(root / folder) for folder in ("reports", "metrics")}
    outcome = lambda cases: {"winoground/text": {"correct": "1100", "groups": None, "cases": cases}}  # noqa: E731
    trials = [result_trial(f"t00{seed}", {"variant": "a", "train.seed": seed}, "finished", {"winoground/text": 0.5},
                           outcome(cases)) for seed, cases in ((0, "fixture"), (1, "other"))]
    listed.write_text(json.dumps({**store["sweeps"], "methods": write_sweep(root / "results", "methods", trials)}))
    capsys.readouterr()
    try:
        assert stage.main(["--params", str(store["params"])]) == 2
    finally:
        listed.unlink()
        (root / "results" / "sweeps" / "methods.json").unlink()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0] == (f"error: {root / 'results' / 'sweeps' / 'methods.json'}: sweep methods: a (trials t000, t001): "
                   "winoground/text: the runs were scored on different cases (their case identities differ)")
    assert {folder: snapshot(root / folder) for folder in ("reports", "metrics")} == before
    assert [p.name for p in root.iterdir() if p.name.startswith(".reports.")] == []     # nothing left beside


def test_a_sweep_named_like_another_output_is_refused_before_any_is_written(store, capsys):
    """Its files would take the place of the other's: one line, and reports/ and metrics/ as they were."""
    root = store["root"]
    listed = root / "results" / "sweeps.json"
    assert stage.main(["--params", str(store["params"])]) == 0
    before = {folder: snapshot(root / folder) for folder in ("reports", "metrics")}
    outcome = {"winoground/text": {"correct": "1100", "groups": None, "cases": "fixture"}}
    trials = [result_trial(f"t00{seed}", {"variant": variant, "train.seed": seed}, "finished",
                           {"winoground/text": 0.5}, outcome) for variant in ("a", "b") for seed in (0, 1)]
    name = "table1-intervals"
    listed.write_text(json.dumps({**store["sweeps"], name: write_sweep(root / "results", name, trials)}))
    try:
        assert stage.main(["--params", str(store["params"])]) == 2
    finally:
        listed.unlink()
        (root / "results" / "sweeps" / f"{name}.json").unlink()
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: sweeps: the report would write {name}.csv, {name}.md, {name}.tex twice (a sweep named like another "
        "of its outputs); give that sweep another `name`")
    assert {folder: snapshot(root / folder) for folder in ("reports", "metrics")} == before
    assert [p.name for p in root.iterdir() if p.name.startswith(".reports.")] == []


def test_a_malformed_outcome_is_a_one_line_error_naming_the_file_and_the_row(store, capsys):
    path = store["root"] / "results" / "baselines.json"
    kept = path.read_text()
    baselines = json.loads(kept)
    outcome = baselines["diffusion_score"]["outcomes"]["winoground/text"]
    try:
        for correct in ("11x0", ""):
            outcome["correct"] = correct
            path.write_text(json.dumps(baselines))
            assert stage.main(["--params", str(store["params"])]) == 2
            assert capsys.readouterr().err.strip() == (
                f"error: {path}: diffusion_score outcome winoground/text: field 'correct' must be a '0' or '1' per "
                "case (whether the run got it right)")
        del outcome["correct"]                   # named as missing, not as malformed
        path.write_text(json.dumps(baselines))
        assert stage.main(["--params", str(store["params"])]) == 2
        assert capsys.readouterr().err.strip() == (f"error: {path}: diffusion_score outcome winoground/text: field "
                                                   "'correct' is missing")
    finally:
        path.write_text(kept)


def test_stage_with_no_sweeps_listed_writes_no_sweep_outputs(store, tmp_path):
    root = store["root"]
    (root / "results" / "sweeps.json").write_text("{}\n")
    try:
        assert stage.main(["--params", str(store["params"])]) == 0
    finally:
        (root / "results" / "sweeps.json").unlink()
    assert not list((root / "reports").glob("sweep-*"))
    assert Path(root / "reports" / "table1.csv").is_file()


# ----------------------------------------------------------------------------- variants side by side

from pipeline.comparison import paired_difference  # noqa: E402
from pipeline.report import (compare_variants, objective_label, variant_figure, variant_tables,  # noqa: E402
                             write_variant_report)


def variant_trial(name: str, seed: int, text: list[int], rel: list[int], status: str = "finished") -> dict:
    """A results-file trial: its config, metrics and per-case outcomes (Winoground text; VG-Relation
    with two groups; VG-Attribution constant)."""
    outcomes = {"winoground/text": {"correct": encode_correct(text), "groups": None, "cases": "fixture"},
                "aro/vg_relation": {"correct": encode_correct(rel), "groups": ["on", "on", "under", "under"], "cases": "fixture"},
                "aro/vg_attribution": {"correct": "1010", "groups": None, "cases": "fixture"}}
    rel_macro = (sum(rel[:2]) / 2 + sum(rel[2:]) / 2) / 2
    metrics = {"winoground/text": sum(text) / len(text), "aro/overall": (rel_macro + 0.5) / 2,
               "loss/clip": 0.5 + seed, "time/train_seconds": 10.0}
    return result_trial(f"t{seed:03d}", {"variant": name, "train.seed": seed}, status, metrics, outcomes)


TEXT_A = [1, 0, 1, 0, 1, 0, 1, 0]
VARIANT_TRIALS = [
    variant_trial("plain", 0, TEXT_A, [1, 0, 1, 0]),
    variant_trial("plain", 1, [1, 1, 1, 0, 0, 0, 1, 0], [1, 1, 0, 0]),
    variant_trial("hard", 1, [1, 1, 1, 1, 1, 0, 1, 0], [1, 1, 1, 0]),
    variant_trial("hard", 0, [1, 1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1]),
    variant_trial("hard", 2, [0] * 8, [0] * 4, status="failed"),
]


def test_variant_rows_aggregate_seeds_and_compare_each_with_the_first():
    rows = compare_variants(VARIANT_TRIALS, ["plain", "hard"], n_resamples=200)
    assert [r.name for r in rows] == ["plain", "hard"] and [r.seeds for r in rows] == [[0, 1], [0, 1]]
    plain, hard = rows
    mean, sd, low, high = plain.scores["winoground/text"]
    assert mean == pytest.approx((0.5 + 0.5) / 2) and sd == 0.0 and low <= mean <= high
    assert hard.scores["winoground/text"][0] == pytest.approx((6 / 8 + 7 / 8) / 2)
    assert hard.scores["winoground/text"][1] == pytest.approx(math.sqrt(((0.75 - 0.8125) ** 2 + (0.875 - 0.8125) ** 2)))
    assert plain.versus is None
    expected = paired_difference(outcome_parts([t["outcomes"] for t in VARIANT_TRIALS[2:4][::-1]])["winoground/text"],
                                 outcome_parts([t["outcomes"] for t in VARIANT_TRIALS[:2]])["winoground/text"], 200,
                                 pair_seeds=True)                # both ran seeds 0 and 1
    assert hard.versus["winoground/text"] == expected
    assert hard.versus["aro/overall"].difference == pytest.approx(hard.scores["aro/overall"][0] -
                                                                 plain.scores["aro/overall"][0])
    assert hard.diagnostics["loss/clip"] == pytest.approx(1.0)   # the mean over its two finished seeds


def test_variants_that_ran_the_same_seeds_are_compared_seed_by_seed():
    """Seed 0 and seed 1 move both variants alike (per seed 0.25 / 0.75 and 0.5 / 1.0): paired by seed,
    the seed term is the spread of the differences (none), not each row's own."""
    trials = [variant_trial(name, seed, text, [1, 0, 1, 0]) for name, seed, text in
              (("plain", 0, [1, 1, 0, 0, 0, 0, 0, 0]), ("plain", 1, [1, 1, 1, 1, 1, 1, 0, 0]),
               ("better", 0, [1, 1, 1, 1, 0, 0, 0, 0]), ("better", 1, [1, 1, 1, 1, 1, 1, 1, 1]))]
    parts = {name: outcome_parts([t["outcomes"] for t in trials if t["config"]["variant"] == name])["winoground/text"]
             for name in ("plain", "better")}
    _, better = compare_variants(trials, ["plain", "better"], n_resamples=200)
    paired = paired_difference(parts["better"], parts["plain"], 200, pair_seeds=True)
    assert better.versus["winoground/text"] == paired
    unpaired = paired_difference(parts["better"], parts["plain"], 200)
    assert paired.high - paired.low < (unpaired.high - unpaired.low) / 2
    # Seeds 0 and 2 against 0 and 1: as many, not the same ones, so row against row.
    other = variant_trial("better", 2, [1] * 8, [1, 0, 1, 0])            # seed 1's outcomes, as seed 2
    _, unmatched = compare_variants(trials[:3] + [other], ["plain", "better"], n_resamples=200)
    assert unmatched.seeds == [0, 2] and not unmatched.versus["winoground/text"].seeds_paired
    assert unmatched.versus["winoground/text"] == unpaired
    # A variant missing one of the reference's seeds is compared row against row.
    _, short = compare_variants(trials[:3], ["plain", "better"], n_resamples=200)
    one = outcome_parts([trials[2]["outcomes"]])["winoground/text"]
    assert short.versus["winoground/text"] == paired_difference(one, parts["plain"], 200)


def test_variant_notes_say_how_the_rows_intervals_and_tests_were_made(tmp_path):
    """Seeds paired: t with the per-seed differences; one run a variant (a sweep without seeds): the
    case bootstrap for its own interval, McNemar's test and Tango's interval for the difference, and
    no word of seeds."""
    rows = compare_variants(VARIANT_TRIALS, ["plain", "hard"], n_resamples=200)
    write_variant_report("seeded", rows, {}, tmp_path, 200)
    seeded = (tmp_path / "seeded.md").read_text()
    assert "Student's t" in seeded and "(of the per-seed differences: the rows ran the same seeds)" in seeded
    assert "for a row of one run" not in seeded
    one = [t for t in VARIANT_TRIALS if t["config"]["train.seed"] == 0]
    write_variant_report("single", compare_variants(one, ["plain", "hard"], n_resamples=200), {}, tmp_path, 200)
    single = (tmp_path / "single.md").read_text()
    assert "95% bootstrap interval over cases, 200 resamples, for a row of one run" in single
    assert "McNemar's test and Tango's score interval" in single and "Student's t" not in single
    assert "t of the seeds'" not in single
    # The figure's note says the same: over cases alone for one run a row, over seeds and cases with seeds.
    assert "paired 95% intervals over cases;" in title_of(variant_figure(
        compare_variants(one, ["plain", "hard"], n_resamples=200), {}, "single"))
    assert "paired 95% intervals over seeds and cases;" in title_of(variant_figure(rows, {}, "seeded"))


def test_variant_report_files_hold_the_three_tables_the_csv_and_the_figure(tmp_path):
    rows = compare_variants(VARIANT_TRIALS, ["plain", "hard"], n_resamples=200)
    paths = write_variant_report("methods", rows, {}, tmp_path, 200, caption="methods")
    assert sorted(p.name for p in paths) == ["methods.csv", "methods.md", "methods.png", "methods.tex"]
    md = (tmp_path / "methods.md").read_text()
    assert "## Scores" in md and "## Against plain" in md and "## Diagnostics" in md
    assert "| hard | 2 | 0.812 ± 0.088 [" in md
    assert "| hard | +0.312 [" in md and "p=" in md
    assert (tmp_path / "methods.png").read_bytes().startswith(PNG_MAGIC)
    table = list(csv.DictReader(io.StringIO((tmp_path / "methods.csv").read_text())))
    assert [r["variant"] for r in table] == ["plain", "hard"]
    assert float(table[1]["winoground/text/diff"]) == pytest.approx(0.3125)
    assert table[0]["winoground/text/diff"] == "" and table[1]["winoground/text/p_bound"] == "0"


def test_a_sweep_of_one_param_sets_its_values_side_by_side_each_against_the_first(tmp_path):
    """sweeps/lambda.yaml's shape (one key, no seeds), its trial indices out of value order: a row per
    value in the sweep table's order (by value), each against lambda 0 on the same cases; one run a
    row, so McNemar's test: lambda 0.1 right on 3 cases lambda 0 missed and on none the other way,
    z = sqrt(3), p = 0.083. Table 1's students x variants set two keys besides the seed: no such comparison."""
    from pipeline.config import load
    from pipeline.report import compared_key, compared_rows, sweep_report

    text = {0.1: [1, 1, 1, 1, 1, 1, 1, 0], 0: [1, 0, 1, 0, 1, 0, 1, 0], 1e-4: [1, 1, 1, 0, 1, 0, 1, 0]}
    trials = [result_trial(f"t{i:03d}", {"objective.lambda_sds": lam}, "finished", {"winoground/text": sum(c) / 8},
                           {"winoground/text": {"correct": encode_correct(c), "groups": None, "cases": "fixture"}})
              for i, (lam, c) in enumerate(text.items())]
    trials.append(result_trial("t003", {"objective.lambda_sds": 1.0}, "failed", {}))
    cfg = load(write_params(tmp_path))
    assert compared_key(trials) == "objective.lambda_sds"
    rows = compared_rows("lambda", trials, cfg)
    assert [r.name for r in rows] == [f"objective.lambda_sds={v}" for v in ("0", "0.0001", "0.1")]
    assert [r.seeds for r in rows] == [[None]] * 3 and rows[0].versus is None
    d = rows[2].versus["winoground/text"]
    assert (d.test, d.discordant) == ("McNemar", 3)
    assert d.difference == pytest.approx(3 / 8) and d.p_value == pytest.approx(0.0832645, rel=1e-5)
    assert rows[1].versus["winoground/text"].difference == pytest.approx(1 / 8)

    written = sweep_report("lambda", trials, rows, cfg, tmp_path)
    assert sorted(p.name for p in written) == sorted(f"{stem}.{suffix}" for stem in ("sweep-lambda", "lambda")
                                                     for suffix in ("md", "tex", "csv", "png"))
    md = (tmp_path / "lambda.md").read_text()
    assert "| configuration | seeds | Wino text |" in md and "## Against objective.lambda_sds=0" in md
    assert "| objective.lambda_sds=0.1 | +0.375 [" in md and "p=0.083" in md
    table = list(csv.DictReader(io.StringIO((tmp_path / "lambda.csv").read_text())))
    assert [r["configuration"] for r in table] == [r.name for r in rows] and {r["seeds"] for r in table} == {""}
    assert variant_figure(rows, {}, "sweep lambda").get_supxlabel() == "Δ accuracy vs objective.lambda_sds=0"

    grid = [result_trial(f"t{i:03d}", {"train.student": s, "variant": v, "train.seed": 0}, "finished", {})
            for i, (s, v) in enumerate((("vit", "a"), ("vit", "b"), ("rn50", "a")))]
    assert compared_key(grid) is None and compared_rows("table1", grid, cfg) == []


def test_the_csv_says_where_a_p_is_the_bootstraps_floor():
    """`p≤0.002` in the tables; in the CSV the number alone would read as an exact p."""
    from pipeline.comparison import PairedDifference
    from pipeline.report import VariantRow, variant_csv

    floor = PairedDifference(0.1, 0.05, 0.15, 2 / 1001, "bootstrap", 12, p_bound=True)
    rows = [VariantRow("a", [0], {}, None, {}), VariantRow("b", [0], {}, {"aro/overall": floor}, {})]
    table = list(csv.DictReader(io.StringIO(variant_csv(rows, {}))))
    assert table[1]["aro/overall/p"] == "0.001998" and table[1]["aro/overall/p_bound"] == "1"
    assert table[0]["aro/overall/p_bound"] == ""


def test_a_variant_table_leaves_out_what_no_row_has():
    rows = compare_variants([variant_trial("only", 0, TEXT_A, [1, 0, 1, 0])], ["only"], n_resamples=50)
    tables = variant_tables(rows, {})
    assert tables["versus"][1] == []
    assert "h_w text" not in tables["diagnostics"][0] and "final L_CLIP" in tables["diagnostics"][0]


def test_a_variant_with_one_seed_has_no_seed_spread_as_table1_prints_it(tmp_path):
    """One seed has no spread: '-' as Table 1's seed sd column prints it, not a spread of 0.000; the CSV
    leaves it empty."""
    one = [variant_trial("plain", 0, TEXT_A, [1, 0, 1, 0]), variant_trial("hard", 0, [1] * 8, [1, 1, 1, 0])]
    rows = compare_variants(one, ["plain", "hard"], n_resamples=50)
    assert rows[1].scores["winoground/text"][1] is None
    assert [cells[2].split(" [")[0] for cells in variant_tables(rows, {})["scores"][1]] == ["0.500 ± -", "1.000 ± -"]
    two = compare_variants(VARIANT_TRIALS, ["plain", "hard"], n_resamples=50)
    assert variant_tables(two, {})["scores"][1][0][2].startswith("0.500 ± 0.000 [")    # two seeds that agree
    write_variant_report("scope", rows, {}, tmp_path, 50)
    table = list(csv.DictReader(io.StringIO((tmp_path / "scope.csv").read_text())))
    assert [r["winoground/text/sd"] for r in table] == ["", ""] and table[0]["winoground/text/mean"] == "0.500000"
    table1 = paper_tables.Row("toy-vit", "ft_clip", "one seed", [one[0]], {})
    assert paper_tables._seed_sd(table1, "winoground/text") == "-"


def test_the_differences_figure_says_which_colour_is_better():
    """green: above the reference (every headline metric is an accuracy), red: below, each with its
    interval excluding 0."""
    from matplotlib.colors import to_hex

    # Seeds that agree: with two seeds a row's seed term counts at t's one degree of freedom.
    better = [variant_trial("better", seed, [1] * 7 + [0], [1, 1, 1, 1]) for seed in (0, 1)]
    worse = [variant_trial("worse", seed, [0] * 8, [0, 0, 0, 0]) for seed in (0, 1)]
    rows = compare_variants(VARIANT_TRIALS + better + worse, ["plain", "better", "worse"], n_resamples=200)
    figure = variant_figure(rows, {"plain": "FT with L_CLIP"}, "sweep methods")
    assert "green: better than FT with L_CLIP, red: worse, both with the interval excluding 0" in title_of(figure)
    [text] = [ax for ax in figure.axes if ax.get_title() == "Wino text"]
    hard, worse_row = [c.lines[0].get_color() for c in text.containers]
    assert rows[1].versus["winoground/text"].low > 0 and rows[2].versus["winoground/text"].high < 0
    assert (to_hex(hard), to_hex(worse_row)) == (to_hex("tab:green"), to_hex("tab:red"))


def test_objective_labels_name_the_method_and_its_weights():
    from pipeline.config import ObjectiveConfig

    assert objective_label(ObjectiveConfig(lambda_sds=0.1)) == "FT with L_CLIP + 0.1 L_SDS"
    assert objective_label(ObjectiveConfig(method="negclip", lambda_sds=0)) == "FT with NegCLIP"
    assert objective_label(ObjectiveConfig(method="diffusion_feedback", lambda_sds=1, clip_weight=0)) == \
        "FT with 1 L_feedback"


def test_latex_writes_the_tables_symbols_as_pdflatex_reads_them():
    from pipeline.report import latex

    tex = latex(["method", "Δ Wino text"], [["a_b", "+0.031 [+0.010, +0.051] p≤0.002"], ["c", "0.515 ± 0.013"],
                                           ["#1 {x}^2 ~$5 \\ y", "-0.1 [-0.2, -0.0] p<0.001"]])
    assert tex.isascii()
    assert r"$\Delta$ Wino text" in tex and r"p$\leq$0.002" in tex and r"0.515 $\pm$ 0.013" in tex
    assert r"a\_b" in tex and r"p$<$0.001" in tex
    assert r"\#1 \{x\}\textasciicircum{}2 \textasciitilde{}\$5 \textbackslash{} y" in tex


def test_a_configuration_with_no_finished_trial_is_named_on_stderr(tmp_path, capsys):
    from pipeline.report import compared_rows

    outcomes = {"winoground/text": {"correct": "1100", "groups": None, "cases": "fixture"}}
    trials = [result_trial("t000", {"variant": "plain", "train.seed": 0}, "finished", {"winoground/text": 0.5}, outcomes),
              result_trial("t001", {"variant": "hard", "train.seed": 0}, "failed", {}),
              result_trial("t002", {"variant": "hard", "train.seed": 1}, "early_stopped", {})]
    rows = compared_rows("methods", trials, load(write_params(tmp_path)))
    assert [r.name for r in rows] == ["plain"]
    assert capsys.readouterr().err.splitlines() == [
        "sweep methods: configuration hard has no finished trial with outcomes (t001 failed, t002 early_stopped); "
        "no row of it in the methods report"]
