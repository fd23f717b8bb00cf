"""The search of an `optuna` sweep: Optuna's sampler through Ray Tune, each config once per seed."""
from __future__ import annotations

import math
import warnings

import optuna
from ray.tune.search import Repeater
from ray.tune.search.optuna import OptunaSearch

from pipeline.sweep.spec import Sweep


class _OptunaSearch(OptunaSearch):
    """Ray Tune's Optuna searcher, told no value for a config none of whose seeds reached the metric.
    The Repeater tells it their mean, NaN, which Optuna refuses: the config would stay running in the
    study, and TPE would never learn from it. Told none, Optuna records it as pruned (ASHA stopped
    it) or, when its last seed raised, as failed."""

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        value = (result or {}).get(self.metric)
        reached = value is not None and not math.isnan(value)
        super().on_trial_complete(trial_id, result if reached else None, error)


def optuna_search(sweep: Sweep) -> Repeater:
    """Optuna's sampler (`search.sampler`, seeded), each of its configs run once per seed (the trial's
    `__trial_index__` picks the seed), Optuna told the mean over the seeds that reached the metric."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # The Repeater averages the seeds' values before `_OptunaSearch` sees them: a config none reached
    # is NumPy's mean of nothing, which it warns of in every driver's output.
    warnings.filterwarnings("ignore", "Mean of empty slice", RuntimeWarning, module="ray.tune.search.repeater")
    sampler = optuna.samplers.TPESampler if sweep.search.sampler == "tpe" else optuna.samplers.RandomSampler
    searcher = _OptunaSearch(metric=sweep.metric, mode=sweep.mode, sampler=sampler(seed=sweep.search.seed))
    return Repeater(searcher, repeat=len(sweep.repeats), set_index=True)
