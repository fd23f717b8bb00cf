"""Statistics across runs: a row's interval over its seeds and cases, and two rows compared on the same cases.

A metric is computed from per-case correctness. To compare two rows on the same cases, or to put
seeds together, the report keeps each run's per-case outcomes (`CaseOutcomes`): a 0/1 matrix
[seeds, cases] and, for a macro-averaged metric, the group of each case. A headline metric made of
several benchmarks (ARO overall = the mean of VG-Relation and VG-Attribution; the zero-shot mean
over sets) is a sequence of parts whose values are averaged; resampling is stratified: each part's
cases are resampled within that part.

A row's value is the mean over its seeds on the benchmark's fixed cases. Its error has two
sources that add: the cases (another benchmark of the same kind) and, for a fine-tuned row, the
seeds (other training runs):

- one run: the percentile bootstrap of its cases. A pretrained student or the teacher's score
  has no training seed; a fine-tuned row of one seed has a seed spread nothing measures, and its
  interval counts the cases only.
- seeds: estimate ± t sqrt(v_cases + sd² / S), where v_cases is the variance of the case
  bootstrap of the seed-averaged outcomes, sd the sample standard deviation (ddof 1) of the S
  per-seed values, and t Student's quantile with Welch-Satterthwaite's degrees of freedom (S - 1
  for the seed term; for the case term, cases - 1 of each micro-averaged part and groups - 1 of
  each macro-averaged one). The seed term's sd also holds the seeds'
  disagreement case by case, which v_cases counts once more: the interval errs wide, by that
  interaction's share. A bootstrap that resamples 3 seeds is not used: its interval can never
  be wider than the seeds' range and its variance is 2/3 of theirs; in the simulation of
  tests/test_comparison.py (3 seeds, 400 cases) its 95% interval held the true mean 88% of the
  time and its paired test called 17% of null differences significant at 0.05.
- two rows whose seeds pair up (each seed the same data order and starting weights in both):
  the seed term is the variance of the per-seed differences over S, at S - 1 degrees of freedom.

A t interval ends where the values end: an accuracy's at 0 and 1, a difference's at -1 and 1
(with few seeds, t's quantile can reach past them).
"""
from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats

from pipeline.metrics import SUGARCREPE_CATEGORIES, cases_digest, check_resampling, decode_correct


class CaseMismatch(ValueError):
    """Runs set together that were not scored on the same cases (other case identities or counts): in
    results files, runs that cannot be paired, which the report names as bad input."""


class CaseOutcomes:
    """Per-case correctness of S seeds (rows) on N cases (columns) of one benchmark part.

    `groups` (one key per case) makes the part's value the macro mean over groups, as ARO's
    VG sets are scored; cases of groups the benchmark drops (excluded relations, pairs under the
    minimum count) must be left out by the caller, so every group given counts. None: micro mean.
    `identity`: the digest of the cases' identities in their order (`metrics.cases_digest`), which
    two parts must share to be paired; None where the caller vouches for the order itself.
    """

    def __init__(self, correct, groups: Sequence[Hashable] | None = None, identity: str | None = None):
        self.identity = identity
        c = np.asarray(correct)
        if c.ndim == 1:
            c = c[None, :]
        if c.ndim != 2 or c.shape[0] < 1 or c.shape[1] < 1:
            raise ValueError(f"correct must have shape [seeds, cases] with both >= 1, got {c.shape}")
        if c.dtype != bool and not np.isin(c, (0, 1)).all():
            raise ValueError("correct must hold booleans or 0/1 values")
        self.correct = c.astype(np.float64)
        self.groups = None
        if groups is not None:
            keys = list(groups)
            if len(keys) != c.shape[1]:
                raise ValueError(f"groups has {len(keys)} entries for {c.shape[1]} cases")
            _, self.groups = np.unique(np.array(keys, dtype=object).astype(str), return_inverse=True)

    @property
    def seeds(self) -> int:
        return self.correct.shape[0]

    @property
    def cases(self) -> int:
        return self.correct.shape[1]

    def value(self, seeds: np.ndarray | None = None, cases: np.ndarray | None = None) -> float:
        """The metric averaged over `seeds` (row indices, repeats allowed) on `cases` (column indices)."""
        rows = self.correct if seeds is None else self.correct[seeds]
        per_case = rows.mean(axis=0)
        if cases is not None:
            per_case = per_case[cases]
        if self.groups is None:
            return float(per_case.mean())
        groups = self.groups if cases is None else self.groups[cases]
        counts = np.bincount(groups)
        hits = np.bincount(groups, weights=per_case, minlength=counts.size)
        present = counts > 0
        return float(np.mean(hits[present] / counts[present]))


def _parts(parts) -> list[CaseOutcomes]:
    parts = [parts] if isinstance(parts, CaseOutcomes) else list(parts)
    if not parts or not all(isinstance(p, CaseOutcomes) for p in parts):
        raise ValueError("expected one or more CaseOutcomes")
    if len({p.seeds for p in parts}) != 1:
        raise ValueError("the parts of a metric must come from the same runs (their seed counts differ)")
    return parts


def metric_value(parts) -> float:
    """A headline metric: the mean of its parts' values, each averaged over its seeds."""
    return float(np.mean([p.value() for p in _parts(parts)]))


def seed_values(parts) -> np.ndarray:
    """The metric of each seed (run) on its own."""
    parts = _parts(parts)
    return np.array([np.mean([p.value(np.array([k])) for p in parts]) for k in range(parts[0].seeds)])


def same_seeds(seeds_a: Sequence, seeds_b: Sequence) -> bool:
    """Whether two rows' runs pair up seed by seed (`paired_difference`'s `pair_seeds`): both ran the
    same two or more seeds, each known, in the same order."""
    return len(seeds_a) > 1 and None not in seeds_a and list(seeds_a) == list(seeds_b)


def _percentiles(values: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = 1.0 - float(confidence)
    lo, hi = np.quantile(values, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(lo), float(hi)


def _case_draws(rows: list[list[CaseOutcomes]], signs: Sequence[float], n_resamples: int, seed: int) -> np.ndarray:
    """Bootstrap draws of sum(sign * row's metric), every row's seeds averaged, each part's cases
    resampled within the part and the same resample used for every row (the pairing)."""
    rng = np.random.default_rng(seed)
    draws = np.empty(int(n_resamples))
    for r in range(int(n_resamples)):
        values = []
        for column in zip(*rows):
            cases = rng.integers(0, column[0].cases, column[0].cases)
            values.append(sum(sign * part.value(cases=cases) for sign, part in zip(signs, column)))
        draws[r] = np.mean(values)
    return draws


@dataclass(frozen=True)
class _Error:
    """The standard error of an estimate and its degrees of freedom (Welch-Satterthwaite)."""

    se: float
    df: float

    def half_width(self, confidence: float) -> float:
        return float(stats.t.ppf(0.5 + float(confidence) / 2.0, self.df) * self.se) if self.se > 0 else 0.0

    def p_value(self, estimate: float) -> float:
        if self.se == 0:
            return 1.0 if estimate == 0 else 0.0
        return float(min(1.0, 2.0 * stats.t.sf(abs(estimate) / self.se, self.df)))


def _error(rows: list[list[CaseOutcomes]], case_draws: np.ndarray, pair_seeds: bool = False) -> _Error:
    """Case variance (the draws') plus each row's seed variance over its seed count (rows of one run add
    none), or for two rows whose seeds pair up, the variance of their per-seed differences."""
    # A macro mean rests on its groups, however many cases each holds: a part's df is its groups' count - 1.
    df = sum((p.cases if p.groups is None else int(p.groups.max()) + 1) - 1 for p in rows[0])
    terms = [(float(np.var(case_draws, ddof=1)), max(df, 1))]
    if pair_seeds:
        a, b = rows
        terms.append((float(np.var(seed_values(a) - seed_values(b), ddof=1)) / a[0].seeds, a[0].seeds - 1))
    else:
        terms += [(float(np.var(seed_values(parts), ddof=1)) / parts[0].seeds, parts[0].seeds - 1)
                  for parts in rows if parts[0].seeds > 1]
    variance = sum(v for v, _ in terms)
    denominator = sum(v * v / dof for v, dof in terms)
    return _Error(variance ** 0.5, variance * variance / denominator if denominator > 0 else np.inf)


def seed_task_interval(parts, n_resamples: int = 1000, confidence: float = 0.95,
                       seed: int = 0) -> tuple[float, float, float]:
    """(mean over seeds, low, high): the case bootstrap's percentile interval for one run; with
    seeds, the t interval of the case and seed variances together (see the module docstring)."""
    parts = _parts(parts)
    # One draw has no spread: the case variance would be 0 and a one-run interval a point.
    check_resampling(n_resamples, confidence, at_least=2)
    mean = metric_value(parts)
    draws = _case_draws([parts], [1.0], n_resamples, seed)
    if parts[0].seeds == 1:
        return (mean, *_percentiles(draws, confidence))
    half = _error([parts], draws).half_width(confidence)
    # An accuracy lies in [0, 1], where a t interval of a few seeds need not: it ends there.
    return mean, max(mean - half, 0.0), min(mean + half, 1.0)


@dataclass(frozen=True)
class PairedDifference:
    """Row A minus row B on the same cases: the difference, its 95% interval and a two-sided
    p-value, by `test`: "McNemar" (one run a row, one micro-averaged part), "bootstrap"
    (one run a row, a macro-averaged or composite metric) or "t" (seeds in either row; `seeds_paired`:
    compared seed by seed)."""

    difference: float
    low: float
    high: float
    p_value: float
    test: str
    discordant: int  # cases (summed over pairs of runs) where exactly one of the two rows is right
    p_bound: bool = False  # the bootstrap's p is its resolution floor: the p is at most it
    seeds_paired: bool = False


def paired_difference(parts_a, parts_b, n_resamples: int = 1000, confidence: float = 0.95,
                      seed: int = 0, pair_seeds: bool = False) -> PairedDifference:
    """Compare two rows scored on the same cases (A minus B).

    One run a row on a micro-averaged metric of one part (its difference is the discordant cases'
    balance): McNemar's test and Tango's score interval, which inverts it (`tango_interval`).
    Every other interval resamples the cases once for both rows (the pairing: a hard case is hard
    for both). One run a row on a macro mean or a composite: the percentile interval of those draws
    and their two-sided p, 2 (1 + #{draws on the far side of 0}) / (1 + n_resamples), whose floor is
    `p_bound`; a draw of exactly 0 counts as on the far side, whichever side that is, so with a
    discrete metric, whose draws often tie at 0, the p errs high (conservative). McNemar's test on
    pooled cases would test the pooled difference, not a macro mean's or a composite's, and can
    point the other way. Seeds in either row: the t interval and t test
    of the case variance plus each row's seed variance (module docstring).

    `pair_seeds`: the rows ran the same seeds, and a seed drew the same data order and starting
    weights in both (the runs of a sweep's variants, Table 1's rows of one student): the seed term
    is then the variance of the per-seed differences, which keeps what the seeds share out of the
    comparison, as the cases' pairing does.
    """
    parts_a, parts_b = _parts(parts_a), _parts(parts_b)
    if len(parts_a) != len(parts_b) or any(a.cases != b.cases for a, b in zip(parts_a, parts_b)):
        raise CaseMismatch("the two rows must be scored on the same cases (parts and case counts differ)")
    if any(a.identity != b.identity for a, b in zip(parts_a, parts_b)):
        raise CaseMismatch("the two rows must be scored on the same cases in the same order (their case "
                           "identities differ)")
    check_resampling(n_resamples, confidence, at_least=2)
    if pair_seeds and not parts_a[0].seeds == parts_b[0].seeds > 1:
        raise ValueError(f"pair_seeds needs the same number of seeds (2 or more) in both rows, got "
                         f"{parts_a[0].seeds} and {parts_b[0].seeds}")
    difference = metric_value(parts_a) - metric_value(parts_b)
    discordant = sum(int((a.correct[:, None, :] != b.correct[None, :, :]).sum()) for a, b in zip(parts_a, parts_b))
    one_run = parts_a[0].seeds == parts_b[0].seeds == 1
    if one_run and len(parts_a) == 1 and parts_a[0].groups is None:
        a, b = parts_a[0].correct[0], parts_b[0].correct[0]
        return PairedDifference(difference, *tango_interval(a, b, confidence), mcnemar(a, b), "McNemar", discordant)
    draws = _case_draws([parts_a, parts_b], [1.0, -1.0], n_resamples, seed)
    if one_run:
        low, high = _percentiles(draws, confidence)
        far = min(int((draws <= 0).sum()), int((draws >= 0).sum()))
        return PairedDifference(difference, low, high, min(1.0, 2.0 * (1 + far) / (1 + len(draws))), "bootstrap",
                                discordant, p_bound=far == 0)
    error = _error([parts_a, parts_b], draws, pair_seeds)
    half = error.half_width(confidence)
    # A difference of two accuracies lies in [-1, 1] (as `seed_task_interval`'s interval in [0, 1]).
    return PairedDifference(difference, max(difference - half, -1.0), min(difference + half, 1.0),
                            error.p_value(difference), "t", discordant, seeds_paired=pair_seeds)


def discordant_counts(correct_a, correct_b) -> tuple[int, int]:
    """(cases only A gets right, cases only B gets right) of two 1-D correctness vectors."""
    a, b = (CaseOutcomes(c).correct for c in (correct_a, correct_b))
    if a.shape[0] != 1 or a.shape != b.shape:
        raise ValueError(f"correct_a and correct_b must be 1-D of the same length, got {a.shape} and {b.shape}")
    return int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())


def mcnemar(correct_a, correct_b) -> float:
    """Two-sided p of McNemar's test for two classifiers' correctness on the same cases: with b cases
    only A gets right and c only B, z = (b - c) / sqrt(b + c) against the standard normal (no
    continuity correction); no discordant case: p = 1. It is the score test `tango_interval`
    inverts, and keeps its level better than the exact conditional test, which is conservative
    (Fagerland, Lydersen & Laake 2013, BMC Med Res Methodol 13:91)."""
    only_a, only_b = discordant_counts(correct_a, correct_b)
    if only_a + only_b == 0:
        return 1.0
    return float(2.0 * stats.norm.sf(abs(only_a - only_b) / math.sqrt(only_a + only_b)))


def tango_interval(correct_a, correct_b, confidence: float = 0.95) -> tuple[float, float]:
    """Tango's score interval (Stat Med 1998, 17:891) of A's accuracy minus B's on the same N cases:
    the d whose score statistic (b - c - N d) / sqrt(N (2 q(d) + d (1 - d))), q(d) the most likely
    share of cases only B gets right given d, is within the normal quantile. At d = 0 the statistic
    is McNemar's z (`mcnemar`), so the interval leaves 0 out exactly where that test's p is below
    1 - confidence; it stays inside [-1, 1], and has width with no discordant case. (A percentile
    bootstrap interval inverts no test: with few discordant cases it can leave 0 out where McNemar's
    p is above 0.05.)"""
    only_a, only_b = discordant_counts(correct_a, correct_b)
    n = len(np.asarray(correct_a).reshape(-1))
    z = float(stats.norm.ppf(0.5 + float(confidence) / 2.0))
    if only_a + only_b == 0:        # the statistic is 0/0 at d = 0; the roots are closed-form
        return -z * z / (n + z * z), z * z / (n + z * z)

    def excess(d: float, side: float) -> float:
        """b - c - N d minus side * z times the statistic's denominator: 0 at a limit."""
        quad_b = -only_a - only_b + (2 * n - only_a + only_b) * d
        quad_c = -only_b * d * (1 - d)
        q = (math.sqrt(max(quad_b * quad_b - 8 * n * quad_c, 0.0)) - quad_b) / (4 * n)
        return only_a - only_b - n * d - side * z * math.sqrt(max(n * (2 * q + d * (1 - d)), 0.0))

    # The statistic is 0 at the estimate, where the limits' brackets meet; an estimate of -1 or 1 (every
    # case discordant one way) is also a root of its own side, so that side's bracket stops short of it.
    inner = min(max((only_a - only_b) / n, -1.0 + 1e-9), 1.0 - 1e-9)
    low = -1.0 if excess(-1.0, 1.0) <= 0 else optimize.brentq(excess, -1.0, inner, args=(1.0,), xtol=1e-12)
    high = 1.0 if excess(1.0, -1.0) >= 0 else optimize.brentq(excess, inner, 1.0, args=(-1.0,), xtol=1e-12)
    return float(low), float(high)


def outcome_parts(runs: Sequence[dict[str, dict]]) -> dict[str, list[CaseOutcomes]]:
    """The stored outcomes of one row's runs (one per seed; {name: {"correct": "0110...", "groups":
    [...] or None, "cases": digest}}, as results files keep them) as the parts `paired_difference`
    and `seed_task_interval` take, by metric name, plus the composites: aro/overall (VG-Relation and
    VG-Attribution) and zeroshot/mean (every set), their parts in the order of their names, so two
    rows' composites pair part by part. Only metrics every run has are kept."""
    runs = list(runs)
    if not runs:
        raise ValueError("outcome_parts needs at least one run")
    names = [name for name in runs[0] if all(name in run for run in runs[1:])]
    parts = {}
    for name in names:
        if any("cases" not in run[name] for run in runs):
            raise ValueError(f"{name}: the stored outcomes do not say which cases they are of (results "
                             "written before case identities were kept); run the stage or sweep again")
        groups, cases = runs[0][name].get("groups"), runs[0][name]["cases"]
        if any(run[name].get("groups") != groups or run[name]["cases"] != cases for run in runs[1:]):
            raise CaseMismatch(f"{name}: the runs were scored on different cases (their case identities differ)")
        rows = [decode_correct(run[name]["correct"]) for run in runs]
        if len({row.size for row in rows}) != 1:
            raise CaseMismatch(f"{name}: the runs were scored on different numbers of cases")
        parts[name] = [CaseOutcomes(np.stack(rows), groups, cases)]
    if "aro/vg_relation" in parts and "aro/vg_attribution" in parts:
        parts["aro/overall"] = parts["aro/vg_relation"] + parts["aro/vg_attribution"]
    sets = sorted(name for name in parts if name.startswith("zeroshot/") and name != "zeroshot/mean")
    if sets:
        parts["zeroshot/mean"] = [p for name in sets for p in parts[name]]
    categories = {category: [f"sugarcrepe/{n}" for n in names if f"sugarcrepe/{n}" in parts]
                  for category, names in SUGARCREPE_CATEGORIES.items()}
    for category, present in categories.items():
        if present:
            parts[f"sugarcrepe/{category}"] = [_pooled_part(parts, present)]
    every = [name for present in categories.values() for name in present]
    if every:
        parts["sugarcrepe/mean"] = [_pooled_part(parts, every)]
    patterns = sorted(name for name in parts if name.startswith("mmvp/") and name != "mmvp/mean")
    if patterns:
        parts["mmvp/mean"] = [p for name in patterns for p in parts[name]]
    subtasks = sorted(name for name in parts if name.startswith("clevr/") and name != "clevr/mean")
    if subtasks:
        parts["clevr/mean"] = [_pooled_part(parts, subtasks)]
    return parts


def _pooled_part(parts: dict[str, list[CaseOutcomes]], names: list[str]) -> CaseOutcomes:
    """One part holding the cases of several micro-averaged parts: their pooled (micro) mean."""
    pooled = [p for name in names for p in parts[name]]
    digests = [p.identity for p in pooled]
    return CaseOutcomes(np.concatenate([p.correct for p in pooled], axis=1),
                        identity=None if None in digests else cases_digest(digests))
