"""Metric tests: hand-computed cases from the benchmarks' published definitions."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.metrics import (
    aro_order,
    aro_vg_attribution,
    aro_vg_relation,
    bootstrap_interval,
    choice_correct,
    macro_accuracy,
    micro_accuracy,
    winoground,
    winoground_correct,
    zeroshot_accuracy,
)


def task(c0_i0, c0_i1, c1_i0, c1_i1):
    """One Winoground task as scores[c, k] (caption c, image k)."""
    return [[c0_i0, c0_i1], [c1_i0, c1_i1]]


# Worked on paper (T = text right, I = image right):
#  0: text: .9 > .5 and 1.0 > .95 -> T;  image: .9 > .95 fails       -> text only
#  1: text: .9 > .2 and .8 > .1 -> T;    image: .9 > .1 and .8 > .2   -> group
#  2: text: .5 > .5 is a TIE -> wrong;   image: .5 > .1 and .9 > .5   -> image only
#  3: text: .1 > .9 fails;               image: .1 > .9 fails         -> nothing
#  4: text: .6 > .7 fails;               image: .6 > .2 and .8 > .7   -> image only
SCORES = np.array([
    task(0.9, 0.95, 0.5, 1.0),
    task(0.9, 0.1, 0.2, 0.8),
    task(0.5, 0.1, 0.5, 0.9),
    task(0.1, 0.9, 0.9, 0.1),
    task(0.6, 0.2, 0.7, 0.8),
])
TAGS = ["Object", "Relation", "Relation", "Relation", "Object"]
PREDS = [1, 2, 1, 1, 2]


def test_winoground_correct_per_task():
    c = winoground_correct(SCORES)
    assert set(c) == {"text", "image", "group"}
    assert c["text"].dtype == bool and c["text"].shape == (5,)
    assert c["text"].tolist() == [True, True, False, False, False]
    assert c["image"].tolist() == [False, True, True, False, True]
    assert c["group"].tolist() == [False, True, False, False, False]


def test_winoground_overall_and_types():
    out = winoground(SCORES)
    assert out == pytest.approx({"text": 0.4, "image": 0.6, "group": 0.2})
    assert set(out) == {"text", "image", "group"}
    assert all(type(v) is float for v in out.values())


def test_winoground_axes_are_caption_then_image():
    # Swapping the caption and image axes swaps the text and image scores.
    out = winoground(SCORES.transpose(0, 2, 1))
    assert out == pytest.approx({"text": 0.6, "image": 0.4, "group": 0.2})


def test_winoground_breakdowns_by_tag_and_preds():
    out = winoground(SCORES, collapsed_tags=TAGS, num_main_preds=PREDS)
    expected = {
        "text": 0.4, "image": 0.6, "group": 0.2,
        # Object = tasks {0, 4}; Relation = tasks {1, 2, 3}; no "Both" task.
        "text/object": 1 / 2, "image/object": 1 / 2, "group/object": 0.0,
        "text/relation": 1 / 3, "image/relation": 2 / 3, "group/relation": 1 / 3,
        # 1 main predicate = tasks {0, 2, 3}; 2 = tasks {1, 4}.
        "text/preds_1": 1 / 3, "image/preds_1": 1 / 3, "group/preds_1": 0.0,
        "text/preds_2": 1 / 2, "image/preds_2": 1.0, "group/preds_2": 1 / 2,
    }
    assert set(out) == set(expected)  # the absent "Both" tag is omitted, not 0 or NaN
    assert out == pytest.approx(expected)


def test_winoground_both_tag_and_numpy_preds():
    tags = ["Both", "Object", "Both", "Relation", "Object"]
    out = winoground(SCORES, collapsed_tags=tags, num_main_preds=np.array(PREDS, dtype=np.int32))
    # Both = tasks {0, 2}: text [T, F], image [F, T], group [F, F].
    assert out["text/both"] == pytest.approx(0.5)
    assert out["image/both"] == pytest.approx(0.5)
    assert out["group/both"] == 0.0
    assert out["text/relation"] == 0.0 and out["image/relation"] == 0.0  # task 3 only
    assert out["text/preds_2"] == pytest.approx(0.5)


def test_winoground_only_one_preds_value_present():
    out = winoground(SCORES[:1], num_main_preds=[1])
    assert "text/preds_1" in out and "text/preds_2" not in out


def test_winoground_all_ties_are_wrong():
    out = winoground(np.full((3, 2, 2), 0.3))
    assert out == {"text": 0.0, "image": 0.0, "group": 0.0}


def test_winoground_negated_errors():
    # Diffusion-score style: lower error is better, callers pass minus the error.
    errors = np.array([task(0.1, 0.5, 0.4, 0.2)])
    assert winoground(-errors) == {"text": 1.0, "image": 1.0, "group": 1.0}
    assert winoground(errors) == {"text": 0.0, "image": 0.0, "group": 0.0}


def test_winoground_random_scores_match_chance():
    # i.i.d. continuous scores: text 1/4, image 1/4, group = P({c0_i0, c1_i1} are the top two) = 1/6.
    rng = np.random.default_rng(1234)
    out = winoground(rng.standard_normal((200_000, 2, 2)))
    assert out["text"] == pytest.approx(1 / 4, abs=0.005)   # ~5 standard errors
    assert out["image"] == pytest.approx(1 / 4, abs=0.005)
    assert out["group"] == pytest.approx(1 / 6, abs=0.005)


@pytest.mark.parametrize("shape", [(4, 2, 3), (4, 3, 2), (2, 2), (4, 4)])
def test_winoground_rejects_bad_shapes(shape):
    with pytest.raises(ValueError, match=r"shape \[N, 2, 2\]"):
        winoground(np.zeros(shape))


def test_winoground_rejects_nan_naming_task():
    s = SCORES.copy()
    s[3, 1, 0] = np.nan
    with pytest.raises(ValueError, match=r"NaN at task index 3"):
        winoground(s)
    with pytest.raises(ValueError, match=r"NaN at task index 3"):
        winoground_correct(s)


def test_winoground_rejects_bad_breakdowns():
    with pytest.raises(ValueError, match="collapsed_tags has 4 entries for 5 tasks"):
        winoground(SCORES, collapsed_tags=TAGS[:4])
    with pytest.raises(ValueError, match="unknown values"):
        winoground(SCORES, collapsed_tags=["object"] + TAGS[1:])
    with pytest.raises(ValueError, match="num_main_preds has 6 entries for 5 tasks"):
        winoground(SCORES, num_main_preds=PREDS + [1])
    with pytest.raises(ValueError, match="num_main_preds must be 1 or 2"):
        winoground(SCORES, num_main_preds=[1, 2, 3, 1, 1])
    with pytest.raises(ValueError, match="no task"):
        winoground(np.zeros((0, 2, 2)))


# --------------------------------------------------------------------------- choice


def test_choice_correct_strict_and_aro_tie_convention():
    scores = np.array([
        [0.2, 0.7],   # true (index 1) wins
        [0.7, 0.2],   # false wins
        [0.5, 0.5],   # tie: ARO's argmax picks index 0 (the false caption) -> wrong
    ])
    answers = [1, 1, 1]
    assert choice_correct(scores, answers).tolist() == [True, False, False]
    # With [false, true] ordering the release's argmax rule gives the same answer.
    assert choice_correct(scores, answers, ties="first").tolist() == [True, False, False]
    assert (np.argmax(scores, axis=1) == 1).tolist() == [True, False, False]


def test_choice_correct_many_options():
    scores = np.array([
        [0.9, 0.1, 0.9, 0.3, 0.2],  # answer 0 tied with option 2 at the top
        [0.1, 0.2, 0.3, 0.4, 0.5],  # answer 4 strictly best
        [0.5, 0.5, 0.1, 0.1, 0.9],  # answer 0 tied with option 1 but 4 is best
    ])
    assert choice_correct(scores, [0, 4, 0]).tolist() == [False, True, False]
    # First-maximum rule: a tie goes to the lower index.
    assert choice_correct(scores, [0, 4, 0], ties="first").tolist() == [True, True, False]
    assert choice_correct(scores, [2, 4, 1], ties="first").tolist() == [False, True, False]


def test_choice_correct_errors():
    with pytest.raises(ValueError, match=r"shape \[N, K\] with K >= 2"):
        choice_correct(np.zeros((3, 1)), [0, 0, 0])
    with pytest.raises(ValueError, match=r"shape \[N, K\]"):
        choice_correct(np.zeros(3), [0, 0, 0])
    with pytest.raises(ValueError, match=r"answers must have shape \[2\]"):
        choice_correct(np.zeros((2, 2)), [0, 1, 1])
    with pytest.raises(ValueError, match=r"answers must lie in \[0, 2\)"):
        choice_correct(np.zeros((2, 2)), [0, 2])
    with pytest.raises(ValueError, match="answers must hold integers"):
        choice_correct(np.zeros((2, 2)), [0.0, 1.0])
    with pytest.raises(ValueError, match="NaN at case index 1"):
        choice_correct(np.array([[0.0, 1.0], [np.nan, 1.0]]), [1, 1])
    with pytest.raises(ValueError, match="ties must be one of"):
        choice_correct(np.zeros((2, 2)), [0, 1], ties="random")


# --------------------------------------------------------------------------- micro / macro

# Worked by hand: group a = [1, 1, 0, 1] (4 cases, 3/4), b = [0] (1 case, 0),
# c = [1, 0] (2 cases, 1/2); interleaved so grouping must follow the labels.
GROUPS = ["a", "c", "a", "b", "a", "c", "a"]
CORRECT = [1, 1, 1, 0, 0, 0, 1]


def test_micro_accuracy():
    assert micro_accuracy(CORRECT) == pytest.approx(4 / 7)
    assert micro_accuracy(np.array([True, False])) == 0.5
    assert type(micro_accuracy([True])) is float


def test_macro_vs_micro_uneven_groups():
    assert macro_accuracy(CORRECT, GROUPS) == pytest.approx((3 / 4 + 0 + 1 / 2) / 3)  # 0.41667
    assert micro_accuracy(CORRECT) == pytest.approx(4 / 7)                              # 0.57143


def test_macro_exclude_and_min_count():
    assert macro_accuracy(CORRECT, GROUPS, exclude={"b"}) == pytest.approx((3 / 4 + 1 / 2) / 2)
    assert macro_accuracy(CORRECT, GROUPS, exclude={"b", "not-present"}) == pytest.approx(0.625)
    assert macro_accuracy(CORRECT, GROUPS, min_count=2) == pytest.approx(0.625)   # drops b
    assert macro_accuracy(CORRECT, GROUPS, min_count=3) == pytest.approx(0.75)    # only a
    assert macro_accuracy(CORRECT, GROUPS, exclude={"a"}, min_count=2) == pytest.approx(0.5)


def test_macro_errors():
    with pytest.raises(ValueError, match="no group left"):
        macro_accuracy(CORRECT, GROUPS, min_count=5)
    with pytest.raises(ValueError, match="no group left"):
        macro_accuracy(CORRECT, GROUPS, exclude={"a", "b", "c"})
    with pytest.raises(ValueError, match="groups has 6 entries for 7 cases"):
        macro_accuracy(CORRECT, GROUPS[:-1])
    with pytest.raises(ValueError, match="not a single string"):
        macro_accuracy(CORRECT, GROUPS, exclude="a")
    with pytest.raises(ValueError, match="min_count"):
        macro_accuracy(CORRECT, GROUPS, min_count=0)
    with pytest.raises(ValueError, match="booleans or 0/1"):
        macro_accuracy([0.5, 1.0], ["a", "a"])
    with pytest.raises(ValueError, match="empty"):
        micro_accuracy([])


# --------------------------------------------------------------------------- ARO


def _binary_cases(n_right, n_wrong):
    """[false, true] option scores: n_right cases won by the true caption, then n_wrong ties."""
    right = [[0.1, 0.9]] * n_right
    wrong = [[0.5, 0.5]] * n_wrong   # a tie is wrong
    return right + wrong


def test_aro_vg_relation_macro_with_exclusion():
    # "on": 3 cases 2 right (2/3); "holding": 1 case right (1); "near": excluded, 4 wrong.
    scores = np.array([[0.1, 0.9], [0.1, 0.9], [0.9, 0.1], [0.2, 0.3],
                       [0.9, 0.1], [0.9, 0.1], [0.9, 0.1], [0.9, 0.1]])
    names = ["on", "on", "on", "holding", "near", "near", "near", "near"]
    answers = [1] * 8
    assert aro_vg_relation(scores, answers, names, excluded=["near", "by"]) == pytest.approx((2 / 3 + 1) / 2)
    assert aro_vg_relation(scores, answers, names, excluded=[]) == pytest.approx((2 / 3 + 1 + 0) / 3)
    with pytest.raises(ValueError, match="not a single string"):
        aro_vg_relation(scores, answers, names, excluded="near")


def test_aro_vg_attribution_min_count_25():
    # red_blue: 25 cases (kept: >= 25), 20 right -> 0.8
    # big_small: 24 cases (dropped: < 25), all wrong
    # wet_dry: 30 cases, 15 right -> 0.5
    scores = np.array(_binary_cases(20, 5) + _binary_cases(0, 24) + _binary_cases(15, 15))
    pairs = ["red_blue"] * 25 + [("big", "small")] * 24 + [("wet", "dry")] * 30
    answers = [1] * len(pairs)
    assert aro_vg_attribution(scores, answers, pairs) == pytest.approx((0.8 + 0.5) / 2)
    # Lowering the threshold brings big_small back in.
    assert aro_vg_attribution(scores, answers, pairs, min_count=24) == pytest.approx((0.8 + 0 + 0.5) / 3)
    # Pair keys are order-sensitive ("wet_dry" != "dry_wet"), as in the release.
    flipped = pairs[:49] + [("dry", "wet")] * 15 + [("wet", "dry")] * 15
    with pytest.raises(ValueError, match="no group left"):
        aro_vg_attribution(scores, answers, flipped, min_count=26)


def test_aro_order_precision_at_1():
    scores = np.array([
        [0.9, 0.1, 0.2, 0.3, 0.4],  # true caption best
        [0.1, 0.9, 0.2, 0.3, 0.4],  # a perturbation wins
        [0.5, 0.5, 0.1, 0.1, 0.1],  # tie between true and a perturbation (identical text)
        [0.8, 0.1, 0.2, 0.3, 0.7],  # true caption best
    ])
    assert aro_order(scores) == pytest.approx(2 / 4)
    # The release's `argmax == 0` counts the tie as right.
    assert aro_order(scores, ties="first") == pytest.approx(3 / 4)


# --------------------------------------------------------------------------- zero-shot


def test_zeroshot_top1_and_topk_ties():
    logits = np.array([
        [1.0, 2.0, 3.0],  # label 2: top-1 right
        [3.0, 2.0, 1.0],  # label 0: top-1 right
        [2.0, 2.0, 1.0],  # label 0: tied at the top -> top-1 wrong, top-2 right
        [0.0, 5.0, 5.0],  # label 1: tied at the top -> top-1 wrong, top-2 right
        [3.0, 2.0, 1.0],  # label 2: last -> wrong at top-1 and top-2, right at top-3
    ])
    labels = [2, 0, 0, 1, 2]
    assert zeroshot_accuracy(logits, labels) == pytest.approx(2 / 5)
    assert zeroshot_accuracy(logits, labels, k=2) == pytest.approx(4 / 5)
    assert zeroshot_accuracy(logits, labels, k=3) == 1.0


def test_zeroshot_topk_with_tie_at_kth_place():
    # label 0 scores 2; classes 1, 2 and 3 score >= 2 -> three rivals -> right only for k >= 4.
    logits = np.array([[2.0, 5.0, 2.0, 3.0, 1.0]])
    assert [zeroshot_accuracy(logits, [0], k=k) for k in (1, 2, 3, 4, 5)] == [0.0, 0.0, 0.0, 1.0, 1.0]


def test_zeroshot_errors():
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 3\]"):
        zeroshot_accuracy(np.zeros((2, 3)), [0, 1], k=4)
    with pytest.raises(ValueError, match=r"k must be an integer"):
        zeroshot_accuracy(np.zeros((2, 3)), [0, 1], k=0)
    with pytest.raises(ValueError, match=r"labels must have shape \[2\]"):
        zeroshot_accuracy(np.zeros((2, 3)), [0])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        zeroshot_accuracy(np.zeros((2, 3)), [0, 3])
    with pytest.raises(ValueError, match="NaN at case index 0"):
        zeroshot_accuracy(np.array([[np.nan, 1.0], [0.0, 1.0]]), [0, 1])
    with pytest.raises(ValueError, match=r"shape \[N, C\]"):
        zeroshot_accuracy(np.zeros(3), [0, 1, 2])


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_deterministic_and_contains_mean():
    values = np.array([1] * 120 + [0] * 280)  # 400 Winoground-sized items, mean 0.3
    lo, hi = bootstrap_interval(values)
    assert (lo, hi) == bootstrap_interval(values, seed=0)
    assert type(lo) is float and type(hi) is float
    assert lo < 0.3 < hi
    # Width close to the normal approximation 2 * 1.96 * sqrt(0.3 * 0.7 / 400) = 0.0898.
    assert 0.07 < hi - lo < 0.11


def test_bootstrap_seed_confidence_and_degenerate():
    rng = np.random.default_rng(7)
    values = rng.standard_normal(300)
    a = bootstrap_interval(values, seed=1)
    assert a == bootstrap_interval(values, seed=1)
    assert a != bootstrap_interval(values, seed=2)
    narrow = bootstrap_interval(values, confidence=0.5, seed=1)
    assert a[0] < narrow[0] < narrow[1] < a[1]
    assert bootstrap_interval([1.0] * 50) == (1.0, 1.0)


def test_bootstrap_large_n_is_chunked_consistently():
    # More items than one memory chunk holds: still deterministic and centred.
    values = (np.arange(30_000) % 4 == 0).astype(float)  # mean 0.25
    lo, hi = bootstrap_interval(values, n_resamples=300, seed=3)
    assert (lo, hi) == bootstrap_interval(values, n_resamples=300, seed=3)
    assert lo < 0.25 < hi and hi - lo < 0.02


def test_bootstrap_errors():
    with pytest.raises(ValueError, match="empty"):
        bootstrap_interval([])
    with pytest.raises(ValueError, match="NaN at index 2"):
        bootstrap_interval([1.0, 0.0, np.nan])
    with pytest.raises(ValueError, match="1-D"):
        bootstrap_interval(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_interval([1.0, 0.0], confidence=1.0)
    with pytest.raises(ValueError, match="n_resamples"):
        bootstrap_interval([1.0, 0.0], n_resamples=0)
