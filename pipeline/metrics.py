"""Benchmark metrics: pure functions, numpy in, Python floats / dicts out.

No torch, no I/O. Every function validates its inputs and raises a one-line
ValueError on a bad shape, a length mismatch or a NaN score.

Conventions (from the benchmarks' own definitions and releases):

- Winoground (Thrush et al., 2022). ``scores[i, c, k]`` is the score of caption c
  with image k in task i, higher is better (callers negate errors / distances).
  Text correct:  s[0,0] > s[1,0] and s[1,1] > s[0,1]  (each image prefers its caption).
  Image correct: s[0,0] > s[0,1] and s[1,1] > s[1,0]  (each caption prefers its image).
  Group correct: both. Comparisons are strict, so a tie is wrong. Chance level with
  continuous i.i.d. scores: text 1/4, image 1/4, group 1/6.
- ARO (Yuksekgonul et al., 2023; release mertyg/vision-language-models-are-bows).
  VG-Relation / VG-Attribution options are ordered [false, true] and a case is right
  when ``np.argmax`` is 1; argmax returns the first maximum, so a tie is wrong, which
  is what the strict rule of `choice_correct` gives. VG-Relation is the MACRO mean of
  the per-relation accuracies after dropping the excluded relation names;
  VG-Attribution is the macro mean over "a_b" attribute pairs with >= 25 cases.
  COCO-/Flickr30k-Order: Precision@1, option 0 is the true caption, micro mean.
  NOTE: for Order the release's ``argmax == 0`` counts a tie between option 0 and a
  perturbation as RIGHT (the first maximum is option 0); a perturbation can equal
  the original caption, giving an exact tie. ``ties="first"`` reproduces that;
  the default ``"strict"`` counts it wrong.
- SugarCrepe (Hsieh et al., 2023; release RAIVNLab/sugar-crepe, ``main_eval.py``). A case is
  right when the caption's score is strictly above the negative caption's (a tie is wrong);
  the release reports the accuracy of each subset only. The category scores (add / replace /
  swap) and the mean pool their subsets' cases (micro means: each case weighs the same).
- MMVP-VLM (Tong et al., 2024; release tsb0601/MMVP, ``scripts/evaluate_vlm.py``). Each
  statement picks the first image when its score there is strictly above the second's (the
  script's softmax probability ``> 0.5``), else the second, so a tie picks the second image; a
  pair is right when both statements pick their own image. Per pattern the fraction of pairs
  right; the mean is the plain mean over patterns (DIVA's ``average_score``).
- CLEVR as GDBench scores it (Krojer et al., 2023; McGill-NLP/diffusion-itm, ``utils.py``
  ``evaluate_retrieval``): options [true, false], right when ``np.argmax`` is 0, so a tie is
  RIGHT; per subtask and over all cases pooled (the release's overall "Accuracy").
"""
from __future__ import annotations

import hashlib
import json
import numbers
from collections.abc import Collection, Hashable, Sequence

import numpy as np

__all__ = [
    "winoground",
    "winoground_correct",
    "choice_correct",
    "micro_accuracy",
    "macro_accuracy",
    "aro_vg_relation",
    "aro_vg_attribution",
    "aro_order",
    "zeroshot_correct",
    "zeroshot_accuracy",
    "macro_kept",
    "bootstrap_interval",
    "encode_correct",
    "decode_correct",
    "cases_digest",
    "WINOGROUND_TAGS",
    "WINOGROUND_NUM_MAIN_PREDS",
    "sugarcrepe_correct",
    "sugarcrepe",
    "SUGARCREPE_CATEGORIES",
    "mmvp_correct",
    "mmvp",
    "clevr_correct",
    "clevr",
]

# Inference time (the paper's Fig. 1): wall seconds of a scorer's Winoground scoring per image-caption
# pair, and how many pairs that call scored (4 per task); `evaluate.score_benchmarks` measures them.
TIME_PER_PAIR = "time/winoground_pair_s"
TIMED_PAIRS = "time/winoground_pairs"
# SugarCrepe's hard-negative types and their subsets (the paper's ADD / REPLACE / SWAP).
SUGARCREPE_CATEGORIES = {"add": ("add_obj", "add_att"), "replace": ("replace_obj", "replace_att", "replace_rel"),
                         "swap": ("swap_obj", "swap_att")}
WINOGROUND_TAGS = ("Object", "Relation", "Both")
WINOGROUND_NUM_MAIN_PREDS = (1, 2)
_TIE_RULES = ("strict", "first")


# --------------------------------------------------------------------------- helpers


def _float_array(x, name: str) -> np.ndarray:
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be numeric, could not convert: {exc}") from None
    return arr


def _first_nan_row(arr: np.ndarray) -> int | None:
    """Index along axis 0 of the first row holding a NaN, or None."""
    bad = np.isnan(arr.reshape(arr.shape[0], -1)).any(axis=1)
    idx = np.flatnonzero(bad)
    return int(idx[0]) if idx.size else None


def _int_array(x, name: str, n: int) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{name} must have shape [{n}], got {arr.shape}")
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        if n == 0:
            return arr.astype(np.int64)
        raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    return arr.astype(np.int64)


def _bool_array(x, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.dtype != bool:
        if arr.size and not np.isin(arr, (0, 1)).all():
            raise ValueError(f"{name} must hold booleans or 0/1 values")
        arr = arr.astype(bool)
    return arr


# --------------------------------------------------------------------------- Winoground


def winoground_correct(scores) -> dict[str, np.ndarray]:
    """Per-task correctness for Winoground: {"text", "image", "group"} -> bool [N].

    scores: [N, 2, 2], scores[i, c, k] = score of caption c with image k (higher is
    better). Strict comparisons (a tie is wrong); a NaN raises ValueError naming the task.
    """
    s = _float_array(scores, "scores")
    if s.ndim != 3 or s.shape[1:] != (2, 2):
        raise ValueError(f"scores must have shape [N, 2, 2] (task, caption, image), got {s.shape}")
    if s.shape[0]:
        bad = _first_nan_row(s)
        if bad is not None:
            raise ValueError(f"scores has a NaN at task index {bad}")
    c0_i0, c0_i1 = s[:, 0, 0], s[:, 0, 1]
    c1_i0, c1_i1 = s[:, 1, 0], s[:, 1, 1]
    text = (c0_i0 > c1_i0) & (c1_i1 > c0_i1)
    image = (c0_i0 > c0_i1) & (c1_i1 > c1_i0)
    return {"text": text, "image": image, "group": text & image}


def winoground(
    scores,
    collapsed_tags: Sequence[str] | None = None,
    num_main_preds: Sequence[int] | None = None,
) -> dict[str, float]:
    """Winoground text / image / group scores as fractions in [0, 1].

    With collapsed_tags ("Object" / "Relation" / "Both" per task) adds "text/object",
    "text/relation", "text/both" (likewise image/, group/); with num_main_preds (1 / 2
    per task) adds "text/preds_1", "text/preds_2", etc. A breakdown category with no
    task in the data is omitted.
    """
    correct = winoground_correct(scores)
    n = correct["text"].shape[0]
    if n == 0:
        raise ValueError("scores has no task")
    metrics = ("text", "image", "group")
    out: dict[str, float] = {m: float(np.mean(correct[m])) for m in metrics}

    if collapsed_tags is not None:
        tags = list(collapsed_tags)
        if len(tags) != n:
            raise ValueError(f"collapsed_tags has {len(tags)} entries for {n} tasks")
        unknown = sorted({str(t) for t in tags} - set(WINOGROUND_TAGS))
        if unknown:
            raise ValueError(f"collapsed_tags has unknown values {unknown}; expected {list(WINOGROUND_TAGS)}")
        tag_arr = np.array(tags, dtype=object)
        for m in metrics:
            for tag in WINOGROUND_TAGS:
                mask = tag_arr == tag
                if mask.any():
                    out[f"{m}/{tag.lower()}"] = float(np.mean(correct[m][mask]))

    if num_main_preds is not None:
        preds = list(num_main_preds)
        if len(preds) != n:
            raise ValueError(f"num_main_preds has {len(preds)} entries for {n} tasks")
        bad = [p for p in preds if isinstance(p, bool) or not isinstance(p, numbers.Integral)
               or int(p) not in WINOGROUND_NUM_MAIN_PREDS]
        if bad:
            raise ValueError(f"num_main_preds must be 1 or 2, got {bad[0]!r}")
        pred_arr = np.array([int(p) for p in preds])
        for m in metrics:
            for p in WINOGROUND_NUM_MAIN_PREDS:
                mask = pred_arr == p
                if mask.any():
                    out[f"{m}/preds_{p}"] = float(np.mean(correct[m][mask]))
    return out


# --------------------------------------------------------------------------- multiple choice


def choice_correct(scores, answers, *, ties: str = "strict") -> np.ndarray:
    """Per-case correctness of a multiple-choice benchmark: bool [N].

    scores: [N, K] (K >= 2), higher is better; answers: [N] ints in [0, K).
    ties="strict" (default): right iff the answer's score is strictly greater than every
    other option's, so any tie at the top is wrong. ties="first": right iff
    ``np.argmax`` (first maximum) is the answer, as the ARO release computes it.
    """
    if ties not in _TIE_RULES:
        raise ValueError(f"ties must be one of {_TIE_RULES}, got {ties!r}")
    s = _float_array(scores, "scores")
    if s.ndim != 2 or s.shape[1] < 2:
        raise ValueError(f"scores must have shape [N, K] with K >= 2, got {s.shape}")
    n, k = s.shape
    a = _int_array(answers, "answers", n)
    if n == 0:
        return np.zeros(0, dtype=bool)
    if a.min() < 0 or a.max() >= k:
        raise ValueError(f"answers must lie in [0, {k}), got values in [{a.min()}, {a.max()}]")
    bad = _first_nan_row(s)
    if bad is not None:
        raise ValueError(f"scores has a NaN at case index {bad}")
    rows = np.arange(n)
    if ties == "first":
        return np.argmax(s, axis=1) == a
    right = s[rows, a]
    others = s.copy()
    others[rows, a] = -np.inf
    return right > others.max(axis=1)


def micro_accuracy(correct) -> float:
    """Fraction of cases right (mean of a 1-D boolean / 0-1 array)."""
    c = _bool_array(correct, "correct")
    if c.size == 0:
        raise ValueError("correct is empty")
    return float(np.mean(c))


def macro_kept(groups: Sequence[Hashable], exclude: Collection[Hashable] = frozenset(),
               min_count: int = 1) -> np.ndarray:
    """bool [N]: the cases whose group a macro mean keeps (not in `exclude`, at least `min_count` cases)."""
    keys = list(groups)
    if isinstance(exclude, str):
        raise ValueError("exclude must be a collection of group names, not a single string")
    if isinstance(min_count, bool) or not isinstance(min_count, numbers.Integral) or min_count < 1:
        raise ValueError(f"min_count must be an integer >= 1, got {min_count!r}")
    excluded = set(exclude)
    counts: dict[Hashable, int] = {}
    for key in keys:
        counts[key] = counts.get(key, 0) + 1
    return np.array([key not in excluded and counts[key] >= min_count for key in keys], dtype=bool)


def macro_accuracy(
    correct,
    groups: Sequence[Hashable],
    exclude: Collection[Hashable] = frozenset(),
    min_count: int = 1,
) -> float:
    """Mean over groups of the per-group accuracy (each group weighs the same).

    Groups named in `exclude` and groups with fewer than `min_count` cases are dropped
    before averaging; raises ValueError when no group is left.
    """
    c = _bool_array(correct, "correct")
    keys = list(groups)
    if len(keys) != c.shape[0]:
        raise ValueError(f"groups has {len(keys)} entries for {c.shape[0]} cases")
    kept = macro_kept(keys, exclude, min_count)
    if not kept.any():
        raise ValueError(
            f"no group left to average ({len(set(keys))} groups, exclude={len(set(exclude))} names, "
            f"min_count={min_count})"
        )
    hits: dict[Hashable, list[int]] = {}
    for key, ok, keep in zip(keys, c.tolist(), kept.tolist()):
        if keep:
            hits.setdefault(key, []).append(int(ok))
    return float(np.mean([np.mean(v) for v in hits.values()]))


def aro_vg_relation(scores, answers, relation_names: Sequence[str], excluded: Collection[str]) -> float:
    """ARO VG-Relation: macro accuracy over relation names not in `excluded`."""
    if isinstance(excluded, str):
        raise ValueError("excluded must be a collection of relation names, not a single string")
    correct = choice_correct(scores, answers)
    return macro_accuracy(correct, relation_names, exclude=frozenset(excluded))


def aro_vg_attribution(scores, answers, attribute_pairs: Sequence, min_count: int = 25) -> float:
    """ARO VG-Attribution: macro accuracy over attribute pairs with >= min_count cases.

    attribute_pairs: one per case, either the key "a_b" or the pair (a, b), which is
    keyed "a_b" (order-sensitive, as in the release).
    """
    keys = [p if isinstance(p, str) else _pair_key(p) for p in attribute_pairs]
    correct = choice_correct(scores, answers)
    return macro_accuracy(correct, keys, min_count=min_count)


def _pair_key(pair) -> str:
    items = list(pair)
    if len(items) != 2:
        raise ValueError(f"an attribute pair must hold two attributes, got {pair!r}")
    return f"{items[0]}_{items[1]}"


def aro_order(scores, *, ties: str = "strict") -> float:
    """ARO COCO-/Flickr30k-Order Precision@1: option 0 is the true caption (micro mean).

    ties="first" reproduces the release's ``argmax == 0`` (a tie with option 0 is right).
    """
    s = _float_array(scores, "scores")
    if s.ndim != 2:
        raise ValueError(f"scores must have shape [N, K], got {s.shape}")
    answers = np.zeros(s.shape[0], dtype=np.int64)
    return micro_accuracy(choice_correct(s, answers, ties=ties))


# --------------------------------------------------------------------------- zero-shot


def zeroshot_correct(logits, labels, k: int = 1) -> np.ndarray:
    """Per-image top-k correctness: right when fewer than k other classes score >= the true class.

    Ties count against the true class, so for k=1 a tie at the top is wrong.
    logits: [N, C]; labels: [N] ints in [0, C); 1 <= k <= C.
    """
    s = _float_array(logits, "logits")
    if s.ndim != 2 or s.shape[1] < 1:
        raise ValueError(f"logits must have shape [N, C], got {s.shape}")
    n, num_classes = s.shape
    if n == 0:
        raise ValueError("logits has no case")
    y = _int_array(labels, "labels", n)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= num_classes:
        raise ValueError(f"k must be an integer in [1, {num_classes}], got {k!r}")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got values in [{y.min()}, {y.max()}]")
    bad = _first_nan_row(s)
    if bad is not None:
        raise ValueError(f"logits has a NaN at case index {bad}")
    rows = np.arange(n)
    right = s[rows, y]
    rivals = (s >= right[:, None]).sum(axis=1) - 1  # other classes scoring >= the true one
    return rivals < k


def zeroshot_accuracy(logits, labels, k: int = 1) -> float:
    """Top-k accuracy (the mean of `zeroshot_correct`)."""
    return float(np.mean(zeroshot_correct(logits, labels, k)))


# --------------------------------------------------------------------------- SugarCrepe, MMVP-VLM, CLEVR


def _two_options(scores) -> np.ndarray:
    s = _float_array(scores, "scores")
    if s.ndim != 2 or s.shape[1] != 2:
        raise ValueError(f"scores must have shape [N, 2], got {s.shape}")
    return s


def sugarcrepe_correct(scores) -> np.ndarray:
    """bool [N]: scores[i] = (caption, negative caption) of case i; right iff the caption scores
    strictly higher (a tie is wrong)."""
    s = _two_options(scores)
    return choice_correct(s, np.zeros(s.shape[0], dtype=np.int64))


def _pooled(correct: dict[str, np.ndarray], names) -> float:
    return micro_accuracy(np.concatenate([correct[n] for n in names]))


def _named_correct(correct: dict, allowed=None) -> dict[str, np.ndarray]:
    """{name: bool array}, each non-empty; names among `allowed` when given."""
    if not correct:
        raise ValueError("no subset given")
    unknown = sorted(set(correct) - set(allowed or correct))
    if unknown:
        raise ValueError(f"unknown subsets {unknown}; expected some of {list(allowed)}")
    checked = {name: _bool_array(c, f"correct[{name!r}]") for name, c in correct.items()}
    empty = [name for name, c in checked.items() if c.size == 0]
    if empty:
        raise ValueError(f"correct[{empty[0]!r}] is empty")
    return checked


def sugarcrepe(correct: dict) -> dict[str, float]:
    """SugarCrepe scores from each subset's per-case correctness {subset: bool [N]}: the accuracy of
    every subset given, of each category (add / replace / swap) with a subset given, and "mean"; a
    category and the mean pool their subsets' cases."""
    subsets = [s for names in SUGARCREPE_CATEGORIES.values() for s in names]
    checked = _named_correct(correct, subsets)
    out = {name: micro_accuracy(c) for name, c in checked.items()}
    for category, names in SUGARCREPE_CATEGORIES.items():
        present = [n for n in names if n in checked]
        if present:
            out[category] = _pooled(checked, present)
    out["mean"] = _pooled(checked, list(checked))
    return out


def mmvp_correct(scores, answers) -> np.ndarray:
    """bool [N]: pair i right iff both its statements pick their own image.

    scores[i, k, j]: statement k of pair i with image j, [N, 2, 2]; answers[i, k] in {0, 1}: the
    image statement k describes. A statement picks image 0 iff scores[i, k, 0] > scores[i, k, 1]
    strictly, else image 1 (the release's ``"img1" if prob > 0.5 else "img2"``).
    """
    s = _float_array(scores, "scores")
    if s.ndim != 3 or s.shape[1:] != (2, 2):
        raise ValueError(f"scores must have shape [N, 2, 2] (pair, statement, image), got {s.shape}")
    a = np.asarray(answers)
    if a.shape != (s.shape[0], 2) or (a.size and (a.dtype == bool or not np.issubdtype(a.dtype, np.integer))):
        raise ValueError(f"answers must hold integers with shape [{s.shape[0]}, 2], got {a.dtype} {a.shape}")
    if a.size and not np.isin(a, (0, 1)).all():
        raise ValueError("answers must be 0 or 1 (the first or the second image)")
    if s.shape[0]:
        bad = _first_nan_row(s)
        if bad is not None:
            raise ValueError(f"scores has a NaN at pair index {bad}")
    picks = np.where(s[:, :, 0] > s[:, :, 1], 0, 1)
    return (picks == a).all(axis=1)


def mmvp(correct, patterns: Sequence[str]) -> dict[str, float]:
    """MMVP-VLM scores: {pattern: fraction of its pairs right} for every pattern present, and "mean",
    the mean over patterns (each pattern weighs the same)."""
    c = _bool_array(correct, "correct")
    names = list(patterns)
    if len(names) != c.shape[0]:
        raise ValueError(f"patterns has {len(names)} entries for {c.shape[0]} pairs")
    if c.size == 0:
        raise ValueError("correct is empty")
    if "mean" in names:
        raise ValueError("'mean' cannot name a pattern")
    keys = np.array(names, dtype=object)
    out = {name: float(np.mean(c[keys == name])) for name in dict.fromkeys(names)}
    out["mean"] = float(np.mean(list(out.values())))
    return out


def clevr_correct(scores) -> np.ndarray:
    """bool [N]: scores[i] = (true, false caption) of case i; right iff ``np.argmax`` is 0, so a tie is right."""
    s = _two_options(scores)
    return choice_correct(s, np.zeros(s.shape[0], dtype=np.int64), ties="first")


def clevr(correct: dict) -> dict[str, float]:
    """CLEVR scores from {subtask: bool [N]}: each subtask's accuracy and "mean" over all cases pooled."""
    checked = _named_correct(correct)
    if "mean" in checked:
        raise ValueError("'mean' cannot name a subtask")
    return {**{name: micro_accuracy(c) for name, c in checked.items()}, "mean": _pooled(checked, list(checked))}


# --------------------------------------------------------------------------- bootstrap


def check_resampling(n_resamples: int, confidence: float, at_least: int = 1) -> None:
    """A bootstrap's settings: an integer count of draws (at least `at_least`) and a level in (0, 1)."""
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, numbers.Integral) or n_resamples < at_least:
        raise ValueError(f"n_resamples must be an integer >= {at_least}, got {n_resamples!r}")
    if not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")


def bootstrap_interval(
    values,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-item values (e.g. 0/1 correct).

    Resamples the items with replacement `n_resamples` times using
    ``np.random.default_rng(seed)``; the same inputs and seed give the same interval.
    """
    v = _float_array(values, "values")
    if v.ndim != 1:
        raise ValueError(f"values must be 1-D, got shape {v.shape}")
    n = v.shape[0]
    if n == 0:
        raise ValueError("values is empty")
    nan = np.flatnonzero(np.isnan(v))
    if nan.size:
        raise ValueError(f"values has a NaN at index {int(nan[0])}")
    check_resampling(n_resamples, confidence)
    rng = np.random.default_rng(seed)
    means = np.empty(int(n_resamples), dtype=np.float64)
    chunk = max(1, (1 << 22) // n)  # bounds memory to ~32 MiB of indices per draw
    for start in range(0, int(n_resamples), chunk):
        stop = min(int(n_resamples), start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = v[idx].mean(axis=1)
    alpha = 1.0 - float(confidence)
    lo, hi = np.quantile(means, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(lo), float(hi)


def encode_correct(correct) -> str:
    """Per-case correctness as a string of '0' and '1' (how results files keep outcomes)."""
    return "".join("1" if v else "0" for v in _bool_array(correct, "correct").tolist())


def decode_correct(text: str) -> np.ndarray:
    if not isinstance(text, str) or set(text) - {"0", "1"}:
        raise ValueError("per-case correctness must be a string of '0' and '1'")
    return np.frombuffer(text.encode(), dtype=np.uint8) == ord("1")


def cases_digest(cases: Sequence[str]) -> str:
    """What identifies the cases behind a stored outcome, in their order: 16 hex digits of the
    SHA-256 of their identities (e.g. a case's image keys and captions). Two rows' outcomes pair
    case by case only when their digests are equal; the digest of the empty list is that of [].
    """
    if isinstance(cases, str) or not all(isinstance(c, str) for c in cases):
        raise ValueError("cases must be a sequence of strings, one identity per case")
    return hashlib.sha256(json.dumps(list(cases)).encode()).hexdigest()[:16]
