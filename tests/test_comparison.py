"""Statistics across runs (`pipeline.comparison`): hand-computed cases, and calibration in simulation
(an interval holds the true value about as often as it says; a test keeps its level under the null)."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.comparison import (CaseMismatch, CaseOutcomes, PairedDifference, mcnemar, metric_value, outcome_parts,
                                 paired_difference, seed_task_interval, seed_values, tango_interval)
from pipeline.metrics import cases_digest, decode_correct, encode_correct
from pipeline.report import difference_cell


def two_by_two(both: int, only_a: int, only_b: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    a = np.array([1] * both + [1] * only_a + [0] * only_b + [0] * neither, dtype=bool)
    b = np.array([1] * both + [0] * only_a + [1] * only_b + [0] * neither, dtype=bool)
    return a, b


def test_mcnemar_on_a_known_table():
    """Discordant cells 10 and 2: z = 8 / sqrt(12) = 2.309, p = 2 (1 - Phi(2.309)) = 0.02092."""
    a, b = two_by_two(both=50, only_a=10, only_b=2, neither=30)
    assert mcnemar(a, b) == pytest.approx(0.020921335, rel=1e-6)
    assert mcnemar(b, a) == mcnemar(a, b)
    # Balanced discordance: p = 1; no discordant case: p = 1.
    assert mcnemar(*two_by_two(5, 3, 3, 5)) == 1.0
    assert mcnemar(*two_by_two(5, 0, 0, 5)) == 1.0
    # Concordant cells do not matter.
    assert mcnemar(*two_by_two(0, 10, 2, 0)) == mcnemar(a, b)


def test_one_run_a_row_gets_mcnemars_p_and_seeds_the_t_test():
    a, b = two_by_two(both=50, only_a=10, only_b=2, neither=30)
    single = paired_difference(CaseOutcomes(a), CaseOutcomes(b), n_resamples=300)
    assert (single.test, single.p_value, single.discordant) == ("McNemar", mcnemar(a, b), 12)
    assert single.difference == pytest.approx(8 / 92)
    assert (single.low, single.high) == tango_interval(a, b)
    # A composite of parts is its parts' mean, which McNemar's test on the pooled cases does not test.
    parts = paired_difference([CaseOutcomes(a[:40]), CaseOutcomes(a[40:])], [CaseOutcomes(b[:40]), CaseOutcomes(b[40:])],
                              n_resamples=300)
    assert parts.test == "bootstrap"
    seeds = paired_difference(CaseOutcomes(np.stack([a, a])), CaseOutcomes(np.stack([b, b])), n_resamples=300)
    assert seeds.test == "t" and seeds.low > 0 and seeds.p_value < 0.05


def tango_quartic_limits(cases: int, only_a: int, only_b: int, confidence: float = 0.95) -> tuple[float, float]:
    """Tango's limits as Yang, Sun & Hardin (Stat Med 2013) derive them in closed form: the outermost
    real roots in [-1, 1] of their quartic in d (its coefficients m0..m4, g the squared quantile)."""
    from scipy import stats

    n, b, c, g = cases, only_a, only_b, stats.norm.ppf(0.5 + confidence / 2) ** 2
    m = [n ** 2 * (n / g + 1) ** 2,
         -n * (b - c) * (n / g + 1) * (4 * n / g + 1),
         2 * n * (b - c) ** 2 * (3 * n / g + 2) / g - n ** 2 * ((b + c) / g + 1),
         n * (b - c) * (2 * (b + c) / g + 1) - (b - c) ** 3 * (4 * n / g + 1) / g,
         (b - c) ** 2 * ((b - c) ** 2 / g - (b + c)) / g]
    roots = [r.real for r in np.roots(m) if abs(r.imag) < 1e-7 and -1 - 1e-9 <= r.real <= 1 + 1e-9]
    return max(min(roots), -1.0), min(max(roots), 1.0)


def test_tangos_interval_is_the_published_closed_forms_and_inverts_mcnemars_test():
    """Every split of up to 14 discordant cases (and the extremes: every case discordant one way, none
    discordant): the limits are the closed form's to 1e-9, hold the difference, and leave 0 out
    exactly where McNemar's p < 0.05. 4 to 0 on 100 cases: z = 2, p = 0.0455, [+0.0015, +0.0984]."""
    a, b = two_by_two(both=50, only_a=4, only_b=0, neither=46)
    d = paired_difference(CaseOutcomes(a), CaseOutcomes(b), n_resamples=1000)
    assert (d.test, d.difference) == ("McNemar", pytest.approx(0.04))
    assert d.p_value == pytest.approx(0.0455003, rel=1e-5)
    assert (d.low, d.high) == pytest.approx((0.0015268, 0.0983707), abs=1e-7)
    splits = [(10, x, y, 10) for x in range(15) for y in range(15 - x)] + [(0, 3, 0, 0), (0, 0, 3, 0), (0, 0, 0, 4)]
    for split in splits:
        x, y = two_by_two(*split)
        low, high = tango_interval(x, y)
        assert (low, high) == pytest.approx(tango_quartic_limits(x.size, split[1], split[2]), abs=1e-9), split
        assert low <= (split[1] - split[2]) / x.size <= high
        assert (low > 0 or high < 0) == (mcnemar(x, y) < 0.05), split
    # No discordant case: the roots +-z^2 / (N + z^2), not a point.
    assert tango_interval(*two_by_two(10, 0, 0, 10)) == pytest.approx((-0.16112516, 0.16112516))


def test_mcnemars_test_keeps_its_level_under_the_null_with_few_discordant_cases():
    """Two runs of one process on 100 cases, each re-drawing 10% of its answers: about 8 discordant
    cases a pair and no difference in truth. At 0.05 the test rejects 5.0% of 2,000 pairs (the exact
    conditional test, and the continuity-corrected one, 2.05%: below this test's floor)."""
    rng = np.random.default_rng(0)
    rejected = 0
    for _ in range(2000):
        p = rng.uniform(0.2, 0.8, 100)
        base = rng.uniform(size=100) < p
        a, b = (np.where(rng.uniform(size=100) < 0.1, rng.uniform(size=100) < p, base) for _ in range(2))
        rejected += paired_difference(CaseOutcomes(a), CaseOutcomes(b), n_resamples=2).p_value < 0.05
    assert 0.03 <= rejected / 2000 <= 0.06


def test_a_macro_mean_of_one_run_is_tested_as_the_macro_mean_not_as_pooled_cases():
    """VG-Relation-like: relation x has 2 cases, y 100. A gets x 2/2 and y 50/100, B x 0/2 and y 70/100.
    The macro difference is (1 - 0) / 2 + (0.5 - 0.7) / 2 = +0.4, carried by x's 2 cases alone, so it is
    uncertain; the pooled cases (52/102 against 70/102, McNemar p = 1.2e-4) favour B instead."""
    groups = ["x"] * 2 + ["y"] * 100
    a = np.array([1, 1] + [1] * 50 + [0] * 50, dtype=bool)
    b = np.array([0, 0] + [1] * 50 + [1] * 20 + [0] * 30, dtype=bool)
    result = paired_difference(CaseOutcomes(a, groups), CaseOutcomes(b, groups), n_resamples=1000)
    assert result.difference == pytest.approx(0.4)
    assert mcnemar(a, b) < 0.001
    assert result.test == "bootstrap" and result.low < 0 < result.high and result.p_value > 0.05


def test_a_bootstrap_p_at_its_floor_is_printed_as_a_bound():
    """One run a row on a composite, every draw above 0: p = 2 / (1 + 1000), which is the resolution of
    1,000 resamples, not the p: the cell says p≤0.002."""
    a, b = two_by_two(both=0, only_a=300, only_b=0, neither=100)
    result = paired_difference([CaseOutcomes(a[:200]), CaseOutcomes(a[200:])],
                               [CaseOutcomes(b[:200]), CaseOutcomes(b[200:])], n_resamples=1000)
    assert result.p_bound and result.p_value == pytest.approx(2 / 1001)
    assert difference_cell(result).endswith("p≤0.002")
    assert difference_cell(PairedDifference(0.1, 0.05, 0.15, 0.002, "t", 10)).endswith("p=0.002")
    assert difference_cell(PairedDifference(0.1, 0.05, 0.15, 2e-5, "McNemar", 10)).endswith("p<0.001")


def test_the_t_interval_adds_the_seed_variance_to_the_case_variance():
    """Hand-computed: 3 seeds, the case variance from the bootstrap's draws, the seed term sd^2 / 3,
    Welch-Satterthwaite's degrees of freedom."""
    from scipy import stats

    from pipeline.comparison import _case_draws

    rng = np.random.default_rng(7)
    correct = np.stack([rng.uniform(size=200) < p for p in (0.4, 0.5, 0.6)])
    part = CaseOutcomes(correct)
    per_seed = correct.mean(axis=1)
    assert seed_values(part) == pytest.approx(per_seed)
    v_case = np.var(_case_draws([[part]], [1.0], 500, 0), ddof=1)
    v_seed = np.var(per_seed, ddof=1) / 3
    df = (v_case + v_seed) ** 2 / (v_case ** 2 / 199 + v_seed ** 2 / 2)
    half = stats.t.ppf(0.975, df) * np.sqrt(v_case + v_seed)
    mean, low, high = seed_task_interval(part, n_resamples=500)
    assert mean == pytest.approx(per_seed.mean())
    assert (low, high) == pytest.approx((mean - half, mean + half))


def _seeded_rows(rng, tasks: int, seeds: int, seed_sd: float, rows: int) -> list[CaseOutcomes]:
    """Rows from one process: each task's chance of being right p_i ~ U(0.3, 0.7) and its draw u_i
    shared by every run (a hard task is hard for all), each run shifting every task by its own
    N(0, seed_sd). The expected value over tasks and seeds is 0.5 for every row."""
    p, u = rng.uniform(0.3, 0.7, tasks), rng.uniform(size=tasks)
    return [CaseOutcomes(np.stack([u < p + rng.normal(0, seed_sd) for _ in range(seeds)])) for _ in range(rows)]


def test_a_three_seed_interval_holds_the_mean_at_its_level_in_simulation():
    """Seeds moving a run by sd 0.05 on 400 tasks: the 95% interval holds the expected value 0.5 in at
    least 90% of 300 simulated studies (resampling the 3 seeds held it in 88%)."""
    rng = np.random.default_rng(0)
    sims = 300
    covered = 0
    for sim in range(sims):
        (row,) = _seeded_rows(rng, 400, 3, 0.05, 1)
        _, low, high = seed_task_interval(row, n_resamples=200, seed=sim)
        covered += low <= 0.5 <= high
    assert 0.90 <= covered / sims <= 0.995


def test_a_three_seed_paired_test_keeps_its_level_under_the_null():
    """Two rows of the same process on the same tasks, 3 seeds each: p < 0.05 in at most 8% of 300
    simulated comparisons (resampling the seeds gave 17%), and the interval holds 0 as often."""
    rng = np.random.default_rng(1)
    sims = 300
    rejected = covered = 0
    for sim in range(sims):
        a, b = _seeded_rows(rng, 400, 3, 0.05, 2)
        result = paired_difference(a, b, n_resamples=200, seed=sim)
        assert result.test == "t"
        rejected += result.p_value < 0.05
        covered += result.low <= 0 <= result.high
    assert rejected / sims <= 0.08
    assert covered / sims >= 0.92


def test_a_t_p_agrees_with_the_interval_where_runs_move_with_their_seed():
    """Three runs a row, each run shifting every task together: the tasks alone would make a small
    run-level difference look certain; the t test counts the runs, as the interval does."""
    rng = np.random.default_rng(3)
    p = rng.uniform(0.3, 0.7, 300)
    rows = []
    for shift in ((0.00, 0.10, -0.10), (0.02, 0.12, -0.08)):
        rows.append(CaseOutcomes(np.stack([rng.uniform(size=300) < np.clip(p + s, 0, 1) for s in shift])))
    result = paired_difference(rows[1], rows[0], n_resamples=600)
    assert result.test == "t"
    assert (result.p_value < 0.05) == (result.low > 0 or result.high < 0)


def test_case_outcomes_give_micro_and_macro_means_over_seeds():
    correct = np.array([[1, 0, 1, 1], [0, 0, 1, 1]])
    assert CaseOutcomes(correct).value() == pytest.approx(np.mean([0.5, 0, 1, 1]))
    # Groups a = cases 0, 1 and b = cases 2, 3: macro = mean(0.25, 1.0).
    assert CaseOutcomes(correct, ["a", "a", "b", "b"]).value() == pytest.approx(0.625)
    assert metric_value([CaseOutcomes(correct[:1]), CaseOutcomes(correct[1:])]) == pytest.approx((0.75 + 0.5) / 2)
    assert decode_correct(encode_correct([True, False, True])).tolist() == [True, False, True]


def test_paired_interval_covers_a_known_difference_in_simulation():
    """Row A is right on each case with probability p + 0.08, row B with p (p varies across cases,
    and both rows share each case's difficulty). Over 200 simulated benchmarks of 300 cases, the
    paired 95% interval holds the true difference 0.08 in about 95% of them, and a p-value below
    0.05 comes with an interval excluding 0."""
    rng = np.random.default_rng(0)
    covered, agree = 0, 0
    sims = 200
    for sim in range(sims):
        p = rng.uniform(0.2, 0.8, 300)
        u = rng.uniform(size=300)          # shared difficulty: the pairing the interval exploits
        a, b = u < p + 0.08, u < p
        noise = rng.uniform(size=300) < 0.1
        a = np.where(noise, rng.uniform(size=300) < p + 0.08, a)
        result = paired_difference(CaseOutcomes(a), CaseOutcomes(b), n_resamples=400, seed=sim)
        covered += result.low <= 0.08 <= result.high
        agree += (result.p_value < 0.05) == (result.low > 0 or result.high < 0)
    assert 0.90 <= covered / sims <= 0.99
    assert agree / sims >= 0.9    # McNemar's p (one run a row) and the bootstrap interval mostly agree


def test_seed_task_interval_widens_with_the_seed_spread():
    """Three seeds that agree give the case bootstrap's width; three that disagree by 0.2 widen it."""
    rng = np.random.default_rng(1)
    base = rng.uniform(size=400) < 0.6
    same = CaseOutcomes(np.stack([base, base, base]))
    shifted = np.stack([base, base | (rng.uniform(size=400) < 0.3), base & (rng.uniform(size=400) < 0.7)])
    spread = CaseOutcomes(shifted)
    m0, lo0, hi0 = seed_task_interval(same, n_resamples=500)
    m1, lo1, hi1 = seed_task_interval(spread, n_resamples=500)
    assert lo0 <= m0 <= hi0 and lo1 <= m1 <= hi1
    assert (hi1 - lo1) > 1.5 * (hi0 - lo0)


def test_outcome_parts_stacks_seeds_and_builds_the_composites():
    run = lambda text, rel, attr: {"winoground/text": {"correct": text, "groups": None, "cases": "fixture"},
                                   "aro/vg_relation": {"correct": rel, "groups": ["on", "on", "under"], "cases": "fixture"},
                                   "aro/vg_attribution": {"correct": attr, "groups": None, "cases": "fixture"}}
    parts = outcome_parts([run("10", "110", "01"), run("11", "011", "11")])
    assert parts["winoground/text"][0].correct.tolist() == [[1, 0], [1, 1]]
    assert metric_value(parts["aro/overall"]) == pytest.approx((np.mean([0.75, 0.5]) + 0.75) / 2)
    with pytest.raises(CaseMismatch, match="different numbers of cases"):
        outcome_parts([run("10", "110", "01"), run("101", "011", "11")])
    with pytest.raises(CaseMismatch, match="same cases"):
        paired_difference(parts["winoground/text"], parts["aro/overall"])


def test_two_rows_pair_only_on_the_same_cases_in_the_same_order():
    """The same model with its tasks stored in the reverse order is the same row: paired by position
    it would have 8 discordant cases and a wide interval. Outcomes say which cases they are of
    (the digest of the cases' identities), and rows of other cases or orders are refused (`CaseMismatch`,
    a ValueError the report names as bad results)."""
    forward = {"winoground/text": {"correct": "11110000", "groups": None, "cases": cases_digest(list("abcdefgh"))}}
    backward = {"winoground/text": {"correct": "00001111", "groups": None, "cases": cases_digest(list("hgfedcba"))}}
    a, b = outcome_parts([forward])["winoground/text"], outcome_parts([backward])["winoground/text"]
    with pytest.raises(CaseMismatch, match="same cases in the same order"):
        paired_difference(a, b)
    same = paired_difference(a, outcome_parts([forward])["winoground/text"])
    assert (same.difference, same.discordant, same.p_value) == (0.0, 0, 1.0)
    assert -same.low == same.high == pytest.approx(1.96 ** 2 / (8 + 1.96 ** 2), rel=1e-3)  # no discordance
    with pytest.raises(CaseMismatch, match="runs were scored on different cases"):        # seeds of one row
        outcome_parts([forward, {"winoground/text": {**forward["winoground/text"], "cases": cases_digest(["x"])}}])
    with pytest.raises(ValueError, match="do not say which cases"):
        outcome_parts([{"winoground/text": {"correct": "1100", "groups": None}}])
    assert issubclass(CaseMismatch, ValueError)         # what library callers caught before


def test_a_composites_parts_pair_by_name_whatever_order_a_row_stored_them_in():
    """MMVP's mean over patterns: row B holds row A's outcomes with its two patterns in the other key
    order. Paired part by part in each row's own order, A's `texts` pairs were resampled with B's
    `color` pairs: 6 discordant cases and an interval around 0 for two identical rows."""
    texts, color = {"correct": "111111", "groups": None, "cases": "t"}, {"correct": "000111", "groups": None, "cases": "c"}
    a = outcome_parts([{"mmvp/texts": texts, "mmvp/color": color}])["mmvp/mean"]
    b = outcome_parts([{"mmvp/color": color, "mmvp/texts": texts}])["mmvp/mean"]
    result = paired_difference(a, b, n_resamples=200)
    assert (result.difference, result.low, result.high, result.discordant) == (0.0, 0.0, 0.0, 0)


def _seed_paired_rows(rng, tasks: int, seeds: int, seed_sd: float, shared: bool) -> list[CaseOutcomes]:
    """Two rows of one process on the same tasks; with `shared`, seed k shifts both rows alike (the
    same data order and start), else each row's runs shift on their own."""
    p, u = rng.uniform(0.3, 0.7, tasks), rng.uniform(size=tasks)
    shifts = rng.normal(0, seed_sd, seeds)
    rows = []
    for _ in range(2):
        own = shifts if shared else rng.normal(0, seed_sd, seeds)
        rows.append(CaseOutcomes(np.stack([u < p + s + rng.normal(0, 0.01) for s in own])))
    return rows


@pytest.mark.parametrize("shared", [True, False])
def test_seed_pairing_keeps_its_level_and_narrows_what_the_seeds_share(shared):
    """Paired by seed, the test keeps its level whether or not the seeds really move both rows alike;
    where they do, its interval is narrower than the unpaired one (which counts the shared moves twice)."""
    rng = np.random.default_rng(2)
    sims, rejected, narrower = 200, 0, 0
    for sim in range(sims):
        a, b = _seed_paired_rows(rng, 400, 3, 0.05, shared)
        paired = paired_difference(a, b, n_resamples=200, seed=sim, pair_seeds=True)
        unpaired = paired_difference(a, b, n_resamples=200, seed=sim)
        rejected += paired.p_value < 0.05
        narrower += paired.high - paired.low < unpaired.high - unpaired.low
    assert rejected / sims <= 0.08
    if shared:
        assert narrower / sims >= 0.95


def test_seed_pairing_takes_the_variance_of_per_seed_differences():
    """Hand-computed: seeds whose differences are (0.1, 0.1, 0.1) add no seed variance at all, however
    far apart the seeds themselves are."""
    base = np.zeros((3, 100), dtype=bool)
    base[0, :20], base[1, :50], base[2, :80] = True, True, True       # per seed 0.2, 0.5, 0.8
    better = base.copy()
    better[:, 90:] = True                                            # every seed +0.1 on the same cases
    result = paired_difference(CaseOutcomes(better), CaseOutcomes(base), n_resamples=300, pair_seeds=True)
    assert result.difference == pytest.approx(0.1)
    unpaired = paired_difference(CaseOutcomes(better), CaseOutcomes(base), n_resamples=300)
    assert result.high - result.low < (unpaired.high - unpaired.low) / 4
    with pytest.raises(ValueError, match="same number of seeds"):
        paired_difference(CaseOutcomes(better[:2]), CaseOutcomes(base), pair_seeds=True)


def test_a_seed_paired_interval_by_hand():
    """Per-seed differences 0.1, 0.2, 0.3 on 100 cases: seed term var(0.1, 0.2, 0.3) / 3 at 2 degrees of
    freedom, the case term the bootstrap's variance at 99, Welch-Satterthwaite between them."""
    from scipy import stats

    from pipeline.comparison import _case_draws

    rng = np.random.default_rng(3)
    base = rng.uniform(size=(3, 100)) < 0.5
    better = base.copy()
    for k, extra in enumerate((10, 20, 30)):        # seed k right on `extra` more cases
        wrong = np.flatnonzero(~base[k])[:extra]
        better[k, wrong] = True
    a, b = CaseOutcomes(better), CaseOutcomes(base)
    v_case = np.var(_case_draws([[a], [b]], [1.0, -1.0], 400, 0), ddof=1)
    v_seed = np.var([0.1, 0.2, 0.3], ddof=1) / 3
    df = (v_case + v_seed) ** 2 / (v_case ** 2 / 99 + v_seed ** 2 / 2)
    half = stats.t.ppf(0.975, df) * np.sqrt(v_case + v_seed)
    result = paired_difference(a, b, n_resamples=400, pair_seeds=True)
    assert result.difference == pytest.approx(0.2) and result.seeds_paired
    assert (result.low, result.high) == pytest.approx((0.2 - half, 0.2 + half))
    assert result.p_value == pytest.approx(2 * stats.t.sf(0.2 / np.sqrt(v_case + v_seed), df))


def test_a_t_interval_ends_where_an_accuracy_or_a_difference_ends():
    """Two seeds right on 4 and 3 of 4 cases: mean 0.875, and t at one degree of freedom (12.7) times
    a seed term of sd 0.177 / sqrt(2) alone passes 1; the interval ends at 1. The same runs against
    two seeds right on none: a difference of 0.875 whose interval would pass 1 too."""
    top = CaseOutcomes(np.array([[1, 1, 1, 1], [1, 1, 1, 0]]))
    mean, low, high = seed_task_interval(top, n_resamples=200)
    assert mean == pytest.approx(0.875) and high == 1.0 and 0.0 <= low < 0.875
    bottom = CaseOutcomes(np.zeros((2, 4), dtype=int))
    assert seed_task_interval(bottom, n_resamples=200)[1:] == (0.0, 0.0)      # no spread: the point itself
    spread = CaseOutcomes(np.array([[1, 0, 0, 0], [0, 0, 0, 0]]))
    assert seed_task_interval(spread, n_resamples=200)[1] == 0.0
    d = paired_difference(top, bottom, n_resamples=200, pair_seeds=True)
    assert d.difference == pytest.approx(0.875) and d.high == 1.0 and -1.0 <= d.low < 0.875
    assert paired_difference(bottom, top, n_resamples=200, pair_seeds=True).low == -1.0


def test_a_macro_mean_counts_its_groups_as_the_case_terms_degrees_of_freedom():
    """Two groups of 50 cases: the case term has 1 degree of freedom, not 99."""
    from pipeline.comparison import _case_draws, _error

    rng = np.random.default_rng(4)
    part = CaseOutcomes(rng.uniform(size=(3, 100)) < 0.5, ["x"] * 50 + ["y"] * 50)
    error = _error([[part]], _case_draws([[part]], [1.0], 200, 0))
    v_case = np.var(_case_draws([[part]], [1.0], 200, 0), ddof=1)
    v_seed = np.var(seed_values(part), ddof=1) / 3
    assert error.df == pytest.approx((v_case + v_seed) ** 2 / (v_case ** 2 / 1 + v_seed ** 2 / 2))


def test_one_resample_is_refused():
    """One draw has no spread: every interval would be a point."""
    with pytest.raises(ValueError, match="n_resamples must be an integer >= 2"):
        seed_task_interval(CaseOutcomes([1, 0, 1]), n_resamples=1)
