"""Inference time per image-caption pair (the paper's Fig. 1): measured where the scorers score the
Winoground tasks, recorded with every baseline, and plotted against the text score."""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import DataConfig, TrackingConfig, load
from pipeline.data.build import build_toy
from pipeline.data.datasets import benchmarks, read_index
from pipeline.data.keys import winoground_pairs
from pipeline.digest import fingerprint
from pipeline.evaluate import score_benchmarks
from pipeline.experiment import run_baselines
from pipeline.latents import build_cache
from pipeline.metrics import TIME_PER_PAIR, TIMED_PAIRS
from pipeline.models import student_dir, teacher_dir
from pipeline.models.student import build_toy_student, save_student
from pipeline.models.teacher import build_toy_teacher, save_teacher
from pipeline.figures import duration, inference_figure, write_figure
from pipeline.tracking import Tracker

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
EXPERIMENT = "inference-time-tests"


def test_only_the_winoground_scoring_is_timed_per_pair(tmp_path):
    """A scorer that sleeps 20 ms per Winoground pair and half a second per call on any other set:
    the time per pair is the Winoground call's alone, divided by its pairs (4 per task)."""
    build_toy(DataConfig(n_train=4, n_winoground=2, n_aro=2, n_zeroshot_per_class=1), tmp_path / "data")
    bench = benchmarks(tmp_path / "data", read_index(tmp_path / "data"))
    wino_pairs = winoground_pairs(bench.winoground)
    per_pair, other_call = 0.02, 0.5
    rng = np.random.default_rng(0)

    def slow(images: list[str], captions: list[str]) -> np.ndarray:
        time.sleep(per_pair * len(images) if (images, captions) == wino_pairs else other_call)
        return rng.standard_normal(len(images))

    metrics = score_benchmarks(slow, bench, attribution_min_cases=1).metrics
    assert metrics[TIMED_PAIRS] == 4 * len(bench.winoground) == 8
    assert per_pair <= metrics[TIME_PER_PAIR] < per_pair + 0.04


@pytest.fixture(scope="module")
def baselines(tmp_path_factory):
    """The baselines stage's runs on the smoke profile: toy students, a toy teacher saved and its
    cache written as the models and cache stages do, a real MLflow store."""
    root = tmp_path_factory.mktemp("baselines")
    cfg = load(PARAMS, {"profile": "smoke"})
    data, models, cache = root / "data", root / "models", root / "cache"
    build_toy(cfg.data, data)
    for name, student in cfg.students.items():
        save_student(build_toy_student(student, cfg.data.image_size), student_dir(models, name))
    teacher = build_toy_teacher(cfg.teacher, cfg.data.image_size)
    save_teacher(teacher, teacher_dir(models))
    build_cache(cfg, teacher, fingerprint(teacher_dir(models)), data, cache)
    tracker = Tracker(TrackingConfig(uri=f"sqlite:///{root}/mlflow.db", experiment=EXPERIMENT), root)
    return cfg, run_baselines(cfg, root, data, models, cache, tracker), tracker


def test_every_baseline_records_its_winoground_time_per_pair(baselines):
    cfg, results, tracker = baselines
    assert set(results) == {*(f"pretrained/{name}" for name in cfg.students), "diffusion_score"}
    for name, entry in results.items():
        metrics = entry["metrics"]
        assert math.isfinite(metrics[TIME_PER_PAIR]) and metrics[TIME_PER_PAIR] > 0, name
        assert metrics[TIMED_PAIRS] == 4 * cfg.data.n_winoground, name
        logged = tracker.runs([entry["run_id"]])[0]["metrics"]
        assert logged[TIME_PER_PAIR] == pytest.approx(metrics[TIME_PER_PAIR]), name
    diffusion = results["diffusion_score"]
    assert diffusion["diffusion_samples"] == cfg.eval.diffusion_samples
    # The Winoground scoring is a part of the whole evaluation the stage also times.
    metrics = diffusion["metrics"]
    assert metrics[TIME_PER_PAIR] * metrics[TIMED_PAIRS] < metrics["time/eval_seconds"]


POINTS = [("pretrained ViT-B-16", 0.002, 0.24, (0.20, 0.29)), ("pretrained RN50", 0.0019, 0.245, (0.21, 0.29)),
          ("diffusion score (50 samples)", 0.036, 0.34, None)]


def test_the_figure_plots_each_score_against_its_time_on_a_log_axis(tmp_path):
    """The paper's layout: the text score across with its interval as a bar, the time up on a log
    scale, one point per scorer labelled with its time (the axis names only its decades, in the same
    units); the title gives the slowest over the fastest."""
    figure = inference_figure(POINTS)
    [axes] = figure.axes
    assert axes.get_yscale() == "log" and axes.get_xscale() == "linear"
    assert axes.get_xlabel() == "Winoground text score"
    assert axes.get_ylabel() == "inference time per image-caption pair (log scale)"
    assert len(axes.containers) == len(POINTS)
    for container, (label, seconds, score, interval) in zip(axes.containers, POINTS):
        line, _, bars = container.lines
        assert line.get_xydata().tolist() == [[score, seconds]], label
        if interval is None:
            assert not container.has_xerr, label
        else:
            [segment] = bars[0].get_segments()
            assert segment.tolist() == [[interval[0], seconds], [interval[1], seconds]], label
    assert [text.get_text() for text in axes.texts] == [
        "pretrained ViT-B-16: 2.0\u00a0ms", "pretrained RN50: 1.9\u00a0ms", "diffusion score (50 samples): 36\u00a0ms"]
    figure.canvas.draw()
    ticks = {tick.get_text() for tick in axes.get_yticklabels()}
    assert {"1\u00a0ms", "10\u00a0ms"} <= ticks and not any("10^" in tick or "{" in tick for tick in ticks)
    title = " ".join(figure.get_suptitle().split())
    assert "18.9x" in title and "bars: the evaluation's 95% bootstrap interval over tasks" in title
    assert "bars" not in inference_figure([POINTS[2]]).get_suptitle()     # no interval, no bar to explain
    assert write_figure(tmp_path / "inference.png", figure).read_bytes().startswith(b"\x89PNG")


# Placed as they are, the first label would cover the second point's marker.
UNDER_A_LABEL = [POINTS[0], ("pretrained RN50", 0.0024, 0.25, (0.21, 0.29)), POINTS[2]]


# The toy study's students as its reference run measured them: placed as it is, the last label
# would run along its own interval bar (the third student's).
OVER_ITS_BAR = [("toy-vit pretrained", 5.2e-4, 0.537, (0.504, 0.571)),
                ("toy-vit-s pretrained", 2.05e-4, 0.510, (0.479, 0.540)),
                ("toy-vit-p8 pretrained", 1.77e-4, 0.454, (0.424, 0.484)),
                ("diffusion score (toy-ldm), 16 samples", 6.5e-3, 0.722, (0.690, 0.746))]


@pytest.mark.parametrize("points", [POINTS, UNDER_A_LABEL, OVER_ITS_BAR],
                         ids=["labels-collide", "label-over-a-point", "label-over-a-bar"])
def test_labels_of_scorers_that_score_and_run_alike_cover_no_label_point_or_bar(points):
    from matplotlib.transforms import Bbox

    figure = inference_figure(points)
    [axes] = figure.axes
    figure.canvas.draw()     # the layout the figure is saved with
    renderer = figure.canvas.get_renderer()
    boxes = [text.get_window_extent(renderer) for text in axes.texts]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    frame = axes.get_window_extent(renderer)
    for box, text in zip(boxes, axes.texts):     # inside the axes, also for a point near its right edge
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1, text
    radius = 3 * figure.dpi / 72   # half the marker's 6 points, and the bars' caps (capsize 3)
    for x, y in axes.transData.transform([(score, seconds) for _, seconds, score, _ in points]):
        marker = Bbox([[x - radius, y - radius], [x + radius, y + radius]])
        assert not any(box.overlaps(marker) for box in boxes), (x, y)
    for container in axes.containers:
        for bar in container.lines[2]:
            [[(x0, y), (x1, _)]] = [axes.transData.transform(segment) for segment in bar.get_segments()]
            span = Bbox([[x0, y - radius], [x1, y + radius]])
            assert not any(box.overlaps(span) for box in boxes), (x0, x1, y)


@pytest.mark.parametrize("seconds, digits, text", [
    (1.77e-4, 2, "0.18 ms"), (2.06e-4, 2, "0.21 ms"), (6.5e-3, 2, "6.5 ms"), (0.002, 2, "2.0 ms"), (2.0, 2, "2.0 s"),
    (5e-6, 2, "5.0 µs"), (150.0, 2, "150 s"), (1e-4, None, "0.1 ms"), (1e-3, None, "1 ms"), (0.01, None, "10 ms"),
])
def test_a_time_reads_in_the_unit_that_suits_it(seconds, digits, text):
    assert duration(seconds, digits) == text.replace(" ", "\u00a0")


@pytest.mark.parametrize("points, message", [
    ([], "no scorer to plot"),
    ([("ViT-B-16", 0.0, 0.24, None)], "ViT-B-16: seconds per pair 0.0 is not a positive number"),
    ([("ViT-B-16", math.nan, 0.24, None)], "ViT-B-16: seconds per pair nan is not a positive number"),
    ([("ViT-B-16", 0.002, 0.3, (0.1, 0.2))], r"ViT-B-16: text score 0.3 is outside its interval \(0.1, 0.2\)"),
])
def test_the_figure_refuses_points_it_cannot_plot(points, message):
    with pytest.raises(ValueError, match=message):
        inference_figure(points)
