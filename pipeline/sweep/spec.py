"""Sweep files (`sweeps/*.yaml`): typed, validated before anything starts, expanded into trials.

A sweep file names a search over the parameters of `params.yaml`:

```yaml
name: lambda                      # MLflow experiment "<tracking.experiment>/<name>"
base:                             # what every trial starts from
  profile: paper                  # pins one: smoke | toy | paper (omitted, as in the shipped files: params.yaml's)
  params:                         # overrides of params.yaml: dotted keys or nested mappings
    train.steps: 200
  profiles:                       # more overrides for one profile (after params)
    paper: {train.lr: 1e-5}
space:                            # one entry per swept parameter (objective.*, train.*, eval.*)
  objective.lambda_sds: [0, 1e-4, 1e-3]         # a grid list
  variant:                                      # named bundles of values, a grid over the names
    clip: {objective.method: clip, objective.lambda_sds: 0}
    negclip: {objective.method: negclip, objective.lambda_sds: 0}
  train.scope: {all: true}                      # grid over every allowed value (literals, true/false, train.student)
  train.lr: {loguniform: [1e-5, 1e-2]}          # random / optuna only: choice, uniform, loguniform,
  train.batch_size: {randint: [8, 32]}          #   randint (both bounds inclusive)
  objective.noising: {choice: [noise, none]}
search: {type: grid}              # grid | random | optuna (+ num_samples, sampler: tpe|random, seed)
scheduler: {type: fifo}           # fifo | asha (+ metric, mode, grace_period, reduction_factor)
seeds: [0, 1]                     # every config runs once per seed (sets train.seed)
resources: {cpu: 1, gpu: 0}       # per trial; fractions allowed (quantities above 1 whole)
max_concurrent: 0                 # 0: as many trials at once as the resources allow
metric: winoground/text           # what the sweep optimises and its summary ranks by
mode: max
storage_path: ""                  # Ray Tune's storage: "" = <project>/ray_results; a path or URI
```

Semantics: `grid` runs the cross product of the lists (x seeds), a `variant` counting as one list
of its names (each name sets its bundle's values; a bundle may not set a key another entry of
`space` sweeps); `random` draws
`num_samples` values of the sampled parameters (seeded by `search.seed`) and crosses
each draw with the lists (x seeds), so both are a fixed trial list known before the
sweep starts (`--dry-run` prints it); `optuna` lets Optuna's sampler draw `num_samples`
configs as the sweep runs (only sampled parameters; every config is repeated per seed, and
Optuna told the mean over its seeds). `asha` stops trials early on a per-step metric (a
`loss/...`), so it is refused for a grid, whose every cell must fill a table, and for Optuna
with several seeds, whose mean would count only the seeds ASHA let finish.

Every problem is a `pipeline.config.ConfigError` whose one line names the key, the value
and what is allowed; the checks reuse `pipeline.config`'s own machinery (`validate` with
the fields' own types, `resolve`, `deep_merge`) so a parameter is valid in a sweep
exactly when it is valid in params.yaml.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from annotated_types import Ge
from pydantic import StrictInt, StrictStr

from pipeline.config import (ARO_SETS, CLEVR_SUBTASKS, DEFAULT_PROFILE, PROFILES, SUGARCREPE_SUBSETS, TEACHER_LOSSES, Config,
                             ConfigError, NonNegFloat, NonNegInt, PosFloat, PosInt, Seed, deep_merge, flatten,
                             from_dict, read_yaml, resolve, type_name, validate, validated)
from pipeline.report_names import SWEEP_PREFIX, TABLE1_SWEEP, fixed_stems

SWEEPABLE_SECTIONS = ("objective", "train", "eval")
DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint")
SPEC_KINDS = ("all", "grid") + DISTRIBUTIONS
SEARCHES = ("grid", "random", "optuna")
TOP_KEYS = ("name", "base", "space", "search", "scheduler", "seeds", "resources", "max_concurrent", "metric",
            "mode", "storage_path")
STEP_METRICS = ("loss/clip", "loss/total") + tuple(f"loss/{name}" for name in TEACHER_LOSSES.values())
# The metric names the trials log, by benchmark, from the lists pipeline.config reads the benchmarks by
# (SugarCrepe's groups are its subsets' prefixes); <...> stands for a name the benchmark's data has.
_METRIC_NAMES = {
    "aro": ("overall",) + ARO_SETS,
    "zeroshot": ("mean", "<set>"),
    "sugarcrepe": ("mean",) + tuple(dict.fromkeys(s.split("_")[0] for s in SUGARCREPE_SUBSETS)) + SUGARCREPE_SUBSETS,
    "mmvp": ("mean", "<pattern>"),
    "clevr": ("mean",) + CLEVR_SUBTASKS,
    "loss": tuple(m.removeprefix("loss/") for m in STEP_METRICS),
}
_METRIC_PATTERNS = (
    r"winoground/(text|image|group)(/(object|relation|both|preds_\d+))?(/ci_(low|high))?",
    r"time/train_seconds", r"trainable_parameters",
    *(family + "/(" + "|".join(r"[A-Za-z0-9_.-]+" if n[0] == "<" else n for n in names) + ")"
      for family, names in _METRIC_NAMES.items()),
)
METRICS_ALLOWED = ", ".join(["winoground/{text,image,group}[/{object,relation,both,preds_1,preds_2}]"]
                            + [f"{family}/{{{','.join(names)}}}" for family, names in _METRIC_NAMES.items()])
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_VARIANT_NAME = re.compile(r"[^\x00-\x1f\x7f ](?:[^\x00-\x1f\x7f]{0,62}[^\x00-\x1f\x7f ])?")
# Keys of params.yaml no trial depends on (the `sweep` stage's list of sweep files): left out of trial configs.
NOT_CONFIG_KEYS = ("sweeps",)
# What the models stage builds models/ from: a trial loads models/, so a value set for it would be recorded, not run.
MODELS_SECTIONS = ("teacher", "students")
MODELS_SECTION_REASON = ("the models stage builds models/ from it, which every trial loads; change it in params.yaml "
                         "and rebuild (dvc repro)")


class ParamsError(ConfigError):
    """A problem of the params file itself, found while reading a sweep file against it."""


# --------------------------------------------------------------------------- the typed file


@dataclass
class BaseSpec:
    """What every trial starts from: a profile of params.yaml plus overrides (`params`, then those
    of the active profile in `profiles`, e.g. a learning rate the toy world and the paper's models
    each need)."""

    profile: Literal[("",) + PROFILES] = ""
    params: dict = field(default_factory=dict)
    profiles: dict = field(default_factory=dict)


@validated
class SearchSpec:
    """How configs are chosen. num_samples: random draws (random) or Optuna trials (optuna)."""

    type: Literal[SEARCHES] = "grid"
    num_samples: PosInt = 1
    sampler: Literal["tpe", "random"] = "tpe"
    seed: Seed = 0


@validated
class SchedulerSpec:
    """fifo runs every trial to the end; asha stops the weaker ones at rungs of `step`s."""

    type: Literal["fifo", "asha"] = "fifo"
    metric: StrictStr = "loss/clip"
    mode: Literal["min", "max"] = "min"
    grace_period: PosInt = 1                       # training steps before a trial can be stopped
    reduction_factor: Annotated[StrictInt, Ge(2)] = 2


@validated
class ResourcesSpec:
    """Ray resources of one trial; torch uses `train.threads`, or where that is 0 floor(cpu) threads (at least 1)."""

    cpu: PosFloat = 1.0
    gpu: NonNegFloat = 0.0


@validated
class _Options:
    """The plain top-level keys, validated by pipeline.config's `validate`."""

    name: StrictStr = ""
    search: SearchSpec = field(default_factory=SearchSpec)
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    seeds: list[Seed] = field(default_factory=list)
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    max_concurrent: NonNegInt = 0                  # 0: as many as the resources allow
    metric: StrictStr = "winoground/text"
    mode: Literal["min", "max"] = "max"
    storage_path: StrictStr = ""


@dataclass(frozen=True)
class Dimension:
    """One swept parameter: a grid (`values`), a choice (`values`) or a range (`values` = (low, high))."""

    key: str
    kind: str
    values: tuple

    @property
    def sampled(self) -> bool:
        return self.kind in DISTRIBUTIONS

    def describe(self) -> str:
        if self.key == VARIANT:
            return "[" + ", ".join(name for name, _ in self.values) + "]"
        if self.kind == "grid":
            return "[" + ", ".join(fmt(v) for v in self.values) + "]"
        if self.kind == "choice":
            return "choice(" + ", ".join(fmt(v) for v in self.values) + ")"
        return f"{self.kind}({fmt(self.values[0])}, {fmt(self.values[1])})"

    def domain(self):
        """Ray Tune's search domain of a sampled parameter (Optuna draws from it)."""
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.values))
        low, high = self.values
        if self.kind == "uniform":
            return tune.uniform(low, high)
        if self.kind == "loguniform":
            return tune.loguniform(low, high)
        return tune.randint(low, high + 1)                  # Ray's upper bound is exclusive


@dataclass
class Sweep:
    """A validated sweep file, with the params it resolves against."""

    name: str
    base: BaseSpec
    space: dict[str, Dimension]
    search: SearchSpec
    scheduler: SchedulerSpec
    seeds: list[int]
    resources: ResourcesSpec
    max_concurrent: int
    metric: str
    mode: str
    storage_path: str
    source: str = ""
    params: dict = field(default_factory=dict, repr=False)      # params.yaml as read
    overrides: dict = field(default_factory=dict, repr=False)   # nested overrides of every trial (profile included)
    base_config: Config | None = field(default=None, repr=False)

    @property
    def profile(self) -> str:
        return self.overrides["profile"]

    @property
    def variants(self) -> dict[str, dict]:
        """The `variant` entry's bundles by name ({} when the sweep has none)."""
        dim = self.space.get(VARIANT)
        return dict(dim.values) if dim is not None else {}

    @property
    def grid(self) -> list[Dimension]:
        return [d for d in self.space.values() if not d.sampled]

    @property
    def sampled(self) -> list[Dimension]:
        return [d for d in self.space.values() if d.sampled]

    @property
    def repeats(self) -> list[int | None]:
        """The seeds every config runs with ([None]: the base config's train.seed, once)."""
        return list(self.seeds) or [None]

    @property
    def num_trials(self) -> int:
        per_config = len(self.repeats)
        grid = math.prod(len(d.values) for d in self.grid)
        if self.search.type == "optuna":
            return self.search.num_samples * per_config
        if self.search.type == "random":
            return self.search.num_samples * grid * per_config
        return grid * per_config

    @property
    def max_steps(self) -> int:
        dim = self.space.get("train.steps")
        steps = [self.base_config.train.steps] if dim is None else list(dim.values)
        steps += [bundle["train.steps"] for bundle in self.variants.values() if "train.steps" in bundle]
        return int(max(steps))

    def config(self, values: dict[str, Any]) -> Config:
        """The validated Config of a trial with these dotted-key values (a `variant` name among them)."""
        return from_dict(resolve(self.params, deep_merge(self.overrides, unflatten(expand(values, self.variants)))))

    def definition(self) -> dict:
        """The sweep's definition as plain data (what a launch records and its resume checks)."""
        return {
            "name": self.name, "profile": self.profile, "base": self.base.params, "base_profiles": self.base.profiles,
            "space": {k: {d.kind: [dict([v]) if k == VARIANT else v for v in d.values]} for k, d in self.space.items()},
            "search": dataclasses.asdict(self.search), "scheduler": dataclasses.asdict(self.scheduler),
            "seeds": list(self.seeds), "resources": dataclasses.asdict(self.resources),
            "max_concurrent": self.max_concurrent, "metric": self.metric, "mode": self.mode,
        }

    def spec_hash(self) -> str:
        """Identifies the sweep definition and params a launch ran with (checked on --resume)."""
        payload = {"sweep": self.definition(), "params": self.params}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class TrialSpec:
    """One trial of a grid or random sweep: its index, label, dotted-key values (seed included) and the
    validated config they make."""

    index: int
    values: dict
    config: Config = field(compare=False, repr=False)

    @property
    def label(self) -> str:
        return trial_label(self.index)


# --------------------------------------------------------------------------- helpers


VARIANT = "variant"


def trial_label(index: int) -> str:
    """A trial's short name in tables, MLflow and Ray's folders: t000, t001, ..."""
    return f"t{index:03d}"


def trial_index(label: str) -> int | None:
    """The index `trial_label` made `label` from (None for a label it did not make)."""
    return int(label[1:]) if re.fullmatch(r"t\d{3,}", label) else None


def expand(values: dict[str, Any], variants: dict[str, dict]) -> dict[str, Any]:
    """A trial's dotted-key values with its `variant` name replaced by that bundle's values."""
    out = {k: v for k, v in values.items() if k != VARIANT}
    if VARIANT in values:
        out.update(variants[values[VARIANT]])
    return out


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def unflatten(values: dict[str, Any]) -> dict:
    """{"train.lr": 1, "objective": {"lambda_sds": 0}} -> nested mapping (nested values are merged)."""
    out: dict = {}
    for key, value in values.items():
        *parents, leaf = str(key).split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: conflicts with another entry that sets {part!r} to a value")
        if isinstance(value, dict) and isinstance(node.get(leaf), dict):
            node[leaf] = deep_merge(node[leaf], value)
        else:
            node[leaf] = copy.deepcopy(value)
    return out


def _field_types() -> dict[str, tuple[Any, Any]]:
    """Sweepable dotted key -> (type, the type with its constraints: what `validate` checks)."""
    out = {}
    sections = typing.get_type_hints(Config)
    for section in SWEEPABLE_SECTIONS:
        cls = sections[section]
        bare, full = typing.get_type_hints(cls), typing.get_type_hints(cls, include_extras=True)
        out.update({f"{section}.{f.name}": (bare[f.name], full[f.name]) for f in dataclasses.fields(cls)})
    return out


FIELDS = _field_types()


def _mapping(value: Any, key: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: {value!r} is not allowed; expected a mapping")
    return value


# --------------------------------------------------------------------------- loading


def load(path: str | Path, params: dict, profile: str | None = None, params_source: str = "params.yaml") -> Sweep:
    """Read and validate a sweep file against `params` (the params file `params_source` as read);
    `profile` overrides base.profile."""
    raw = read_yaml(Path(path))
    return parse(raw, params, profile, source=str(path), params_source=params_source)


def parse(raw: Any, params: dict, profile: str | None = None, source: str = "",
          params_source: str = "params.yaml") -> Sweep:
    if isinstance(params, dict):
        params = {k: v for k, v in params.items() if k not in NOT_CONFIG_KEYS}
    if raw is None:
        raise ConfigError("the sweep file is empty; it needs at least `name` and `space`")
    if not isinstance(raw, dict):
        raise ConfigError(f"the top level must be a mapping of {', '.join(TOP_KEYS)}; got {type(raw).__name__}")
    unknown = sorted(str(k) for k in raw if k not in TOP_KEYS)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown key; allowed keys: {', '.join(TOP_KEYS)}")
    options = dict(raw)
    base_raw, space_raw = options.pop("base", None), options.pop("space", None)
    for key in ("search", "scheduler"):
        if isinstance(options.get(key), str):
            options[key] = {"type": options[key]}
    for key in ("search", "scheduler", "resources"):
        if key in options and options[key] is None:
            options[key] = {}
    opts: _Options = validate(_Options, options)

    if "name" not in raw:
        raise ConfigError("name: missing; a sweep needs a name (it names the MLflow experiment and Ray's folder)")
    if not _NAME.fullmatch(opts.name):
        raise ConfigError(f"name: {opts.name!r} is not allowed; expected 1-64 letters, digits, '_', '-' or '.', "
                          "starting with a letter or digit")
    # Refused now, not by the report stage once the sweep has run: a sweep of one key writes reports/<name>.*
    # (named apart from the report's own files on a file system that ignores case, too).
    reserved = [stem for stem in fixed_stems() if stem != TABLE1_SWEEP]          # table1: Table 1's own sweep
    folded = opts.name.casefold()
    if folded in {stem.casefold() for stem in reserved} or folded.startswith(SWEEP_PREFIX) or \
            (folded == TABLE1_SWEEP and opts.name != TABLE1_SWEEP):
        raise ConfigError(f"name: {opts.name!r} is not allowed; the report writes reports/{opts.name}.* itself; "
                          f"not allowed: {SWEEP_PREFIX}*, {', '.join(reserved)} (in any case)")
    base = _base(base_raw, profile)
    overrides, base_config = _base_config(base, params, params_source)

    search_raw = raw.get("search") if isinstance(raw.get("search"), dict) else {}
    sched_raw = raw.get("scheduler") if isinstance(raw.get("scheduler"), dict) else {}
    _check_search(opts.search, search_raw)
    _check_scheduler(opts, sched_raw)
    _check_resources(opts.resources)
    _check_metric(opts.metric, "metric")
    if len(set(opts.seeds)) != len(opts.seeds):
        dup = next(s for s in opts.seeds if opts.seeds.count(s) > 1)
        raise ConfigError(f"seeds: {opts.seeds!r} repeats {dup}; allowed: distinct integers")
    if "seeds" in raw and not opts.seeds:
        raise ConfigError("seeds: [] is not allowed; expected a non-empty list of integers (or leave seeds out)")

    space = _space(space_raw, opts.search.type, base_config)
    if opts.name == TABLE1_SWEEP and len(space) == 1:
        raise ConfigError(f"name: {TABLE1_SWEEP!r} is not allowed for a sweep of one key: the report would write its "
                          f"configurations side by side to reports/{TABLE1_SWEEP}.*, Table 1's own file (Table 1's "
                          "sweep sweeps train.student and variant)")
    if opts.seeds and "train.seed" in space:
        raise ConfigError("space.train.seed: cannot be swept together with `seeds`; use one or the other")
    for name, bundle in (space[VARIANT].values if opts.seeds and VARIANT in space else ()):
        if "train.seed" in bundle:     # it would stand in for every seed's: the repeats would train alike
            raise ConfigError(f"space.{VARIANT}.{name}.train.seed: cannot be set together with `seeds`; "
                              "use one or the other")
    sweep = Sweep(name=opts.name, base=base, space=space, search=opts.search, scheduler=opts.scheduler,
                  seeds=list(opts.seeds), resources=opts.resources, max_concurrent=opts.max_concurrent,
                  metric=opts.metric, mode=opts.mode, storage_path=opts.storage_path, source=source,
                  params=params, overrides=overrides, base_config=base_config)
    _check_combination(sweep)
    return sweep


def _base(raw: Any, profile: str | None) -> BaseSpec:
    raw = {} if raw is None else _mapping(raw, "base")
    unknown = sorted(str(k) for k in raw if k not in ("profile", "params", "profiles"))
    if unknown:
        raise ConfigError(f"base.{unknown[0]}: unknown key; allowed keys: params, profile, profiles")
    value = raw.get("profile", "")
    value = "" if value is None else value
    if value not in ("",) + PROFILES:
        raise ConfigError(f"base.profile: {value!r} is not allowed; expected one of {', '.join(PROFILES)}")
    params = raw.get("params") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"base.params: {params!r} is not allowed; expected a mapping of params.yaml keys "
                          "(dotted like train.steps, or nested)")
    if "profile" in params or "profiles" in params:
        key = "profile" if "profile" in params else "profiles"
        raise ConfigError(f"base.params.{key}: not allowed here; set the profile with base.profile")
    presets = raw.get("profiles") or {}
    if not isinstance(presets, dict):
        raise ConfigError(f"base.profiles: {presets!r} is not allowed; expected a mapping of profile name to params")
    for name, preset in presets.items():
        if name not in PROFILES:
            raise ConfigError(f"base.profiles.{name}: unknown profile; allowed: {', '.join(PROFILES)}")
        if not isinstance(preset, dict):
            raise ConfigError(f"base.profiles.{name}: {preset!r} is not allowed; expected a mapping of params.yaml keys")
    return BaseSpec(profile=profile or value, params=params, profiles={k: v or {} for k, v in presets.items()})


def _base_config(base: BaseSpec, params: dict, source: str) -> tuple[dict, Config]:
    profile = base.profile or (params.get("profile", DEFAULT_PROFILE) if isinstance(params, dict) else DEFAULT_PROFILE)
    try:
        from_dict(resolve(params, {"profile": profile}, source))
    except ConfigError as err:                                  # as the stages say them
        raise ParamsError(str(err)) from None
    common = _base_overrides(base.params, {}, "base.params", params, profile)[0]
    for name, preset in base.profiles.items():    # every preset checked, not only the active one
        _base_overrides(preset, common, f"base.profiles.{name}", params, name)
    return _base_overrides(base.profiles.get(profile, {}), common, f"base.profiles.{profile}", params, profile)


def _base_overrides(values: dict, under: dict, where: str, params: dict, profile: str) -> tuple[dict, Config]:
    """`values` (dotted or nested) merged over `under` and the profile, checked; (overrides, Config)."""
    for key in flatten(unflatten(values)):
        if key.split(".")[0] in MODELS_SECTIONS:
            raise ConfigError(f"{where}.{key}: {MODELS_SECTION_REASON}")
    try:
        overrides = deep_merge(deep_merge(under, unflatten(values)), {"profile": profile})
        return overrides, from_dict(resolve(params, overrides))
    except ConfigError as err:
        raise ConfigError(f"{where}.{err}") from None


def _check_search(search: SearchSpec, raw: dict) -> None:
    if search.type == "grid":
        for key in ("num_samples", "sampler", "seed"):
            if key in raw:
                hint = "; use seeds to repeat configs" if key == "num_samples" else ""
                raise ConfigError(f"search.{key}: {raw[key]!r} is not allowed with search.type 'grid' "
                                  f"(a grid runs each cell once{hint}); allowed with: random, optuna")
    if search.type == "random" and "sampler" in raw:
        raise ConfigError(f"search.sampler: {raw['sampler']!r} is not allowed with search.type 'random'; "
                          "allowed with: optuna")


def _check_scheduler(opts: _Options, raw: dict) -> None:
    sched = opts.scheduler
    if sched.type == "fifo":
        extra = sorted(k for k in raw if k != "type")
        if extra:
            raise ConfigError(f"scheduler.{extra[0]}: {raw[extra[0]]!r} is not allowed with scheduler.type 'fifo'; "
                              "allowed with: asha")
        return
    if opts.search.type == "grid":
        raise ConfigError("scheduler.type: 'asha' is not allowed with search.type 'grid' (early stopping leaves "
                          "cells of the grid empty); allowed: fifo, or search.type random/optuna")
    if sched.metric not in STEP_METRICS:
        raise ConfigError(f"scheduler.metric: {sched.metric!r} is not allowed; ASHA compares trials during training, "
                          f"so it needs a metric reported at every log step; allowed: {', '.join(STEP_METRICS)}")


def _check_resources(res: ResourcesSpec) -> None:
    for name in ("cpu", "gpu"):
        check_quantity(f"resources.{name}", getattr(res, name))


def check_quantity(key: str, value: float) -> None:
    """A Ray resource per trial: a fraction of one, or whole ones."""
    if value > 1 and value != int(value):
        raise ConfigError(f"{key}: {value!r} is not allowed; fractions are allowed up to 1, larger quantities must be "
                          "whole numbers")


def _check_metric(metric: str, key: str) -> None:
    if not any(re.fullmatch(p, metric) for p in _METRIC_PATTERNS):
        raise ConfigError(f"{key}: {metric!r} is not a metric the trials log; allowed: {METRICS_ALLOWED}")


# --------------------------------------------------------------------------- the space


def _space(raw: Any, search: str, base: Config) -> dict[str, Dimension]:
    if raw is None:
        raise ConfigError("space: missing; a sweep needs at least one parameter to sweep, e.g. "
                          "space: {objective.lambda_sds: [0, 1e-3]}")
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"space: {raw!r} is not allowed; expected a non-empty mapping of parameter to values")
    space = {}
    for key, spec in raw.items():
        if str(key) == VARIANT:
            space[VARIANT] = _variants(spec, search, base, [str(k) for k in raw if str(k) != VARIANT])
        else:
            space[str(key)] = _dimension(str(key), spec, search, base)
    return space


def _sweepable(key: str, where: str = "") -> tuple[Any, dict]:
    """The key's (type, type with constraints); `where` names it in an error (default: space.<key>)."""
    if key in FIELDS:
        return FIELDS[key]
    section = key.split(".")[0]
    if key == "profile":
        reason = "not sweepable; set base.profile (or --profile)"
    elif section in MODELS_SECTIONS:
        reason = f"not sweepable: {MODELS_SECTION_REASON}"
    elif section in ("data", "cache"):
        reason = (f"not sweepable: {section} belongs to the stages that run before a sweep, whose outputs every "
                  "trial reads; change it in params.yaml and rebuild (dvc repro)")
    elif section == "tracking":
        reason = "not sweepable; set it in base.params"
    else:
        reason = "unknown parameter"
    allowed = ", ".join(sorted(FIELDS))
    raise ConfigError(f"{where or 'space.' + key}: {reason}; allowed: {allowed}")


def _finite_domain(key: str, tp: Any, base: Config) -> list | None:
    if key == "train.student":
        return list(base.students)
    if typing.get_origin(tp) is Literal:
        return list(typing.get_args(tp))
    if tp is bool:
        return [False, True]
    return None


def _value(key: str, value: Any, where: str, base: Config) -> Any:
    converted = validate(FIELDS[key][1], value, where)
    if key == "train.student" and converted not in base.students:
        raise ConfigError(f"{where}: {converted!r} is not a student; allowed: {', '.join(base.students)}")
    return converted


def _variants(spec: Any, search: str, base: Config, others: list[str]) -> Dimension:
    """`space.variant`: {name: {dotted key: value}}; every value checked as its key's own would be."""
    where = f"space.{VARIANT}"
    if search == "optuna":
        raise ConfigError(f"{where}: not allowed with search.type 'optuna' (Optuna draws every value); "
                          "allowed with: grid, random")
    if not isinstance(spec, dict) or not spec:
        raise ConfigError(f"{where}: {spec!r} is not allowed; expected a mapping of variant name to a mapping of "
                          "params (e.g. negclip: {objective.method: negclip, objective.lambda_sds: 0})")
    bundles = []
    for name, bundle in spec.items():
        if str(name) in (named for named, _ in bundles):     # YAML's 1 and "1": one name, one bundle would go
            raise ConfigError(f"{where}.{name}: a second variant of this name; each variant needs its own name")
        name = str(name)
        if not _VARIANT_NAME.fullmatch(name):
            raise ConfigError(f"{where}.{name!r}: not allowed as a name; expected 1-64 printable characters, "
                              "not starting or ending with a space (the name labels the variant's row in reports)")
        if not isinstance(bundle, dict) or not bundle:
            raise ConfigError(f"{where}.{name}: {bundle!r} is not allowed; expected a non-empty mapping of params "
                              "(dotted keys) to values")
        values = {}
        for key, value in bundle.items():
            key = str(key)
            _sweepable(key, f"{where}.{name}.{key}")
            if key in others:
                raise ConfigError(f"{where}.{name}.{key}: also swept by space.{key}; a variant may set only keys "
                                  "no other entry of space sweeps")
            values[key] = _value(key, value, f"{where}.{name}.{key}", base)
        bundles.append((name, values))
    return Dimension(VARIANT, "grid", tuple(bundles))


def _dimension(key: str, spec: Any, search: str, base: Config) -> Dimension:
    tp = _sweepable(key)[0]
    where = f"space.{key}"
    forms = "a list of values, {all: true}, {choice: [...]}, {uniform: [low, high]}, " \
            "{loguniform: [low, high]} or {randint: [low, high]}"
    if isinstance(spec, list):
        kind, body = "grid", spec
    elif isinstance(spec, dict):
        kinds = [k for k in spec if k in SPEC_KINDS]
        unknown = [str(k) for k in spec if k not in SPEC_KINDS]
        if unknown:
            raise ConfigError(f"{where}.{unknown[0]}: unknown kind of values; allowed: {', '.join(SPEC_KINDS)}")
        if len(kinds) != 1:
            raise ConfigError(f"{where}: {spec!r} is not allowed; expected exactly one of {', '.join(SPEC_KINDS)}")
        kind, body = kinds[0], spec[kinds[0]]
        where = f"{where}.{kind}"
    else:
        raise ConfigError(f"{where}: {spec!r} is not allowed; expected {forms} "
                          "(a single fixed value belongs in base.params)")

    if kind == "all":
        if body is not True:
            raise ConfigError(f"{where}: {body!r} is not allowed; expected true")
        domain = _finite_domain(key, tp, base)
        if domain is None:
            raise ConfigError(f"{where}: {key} has no finite set of values; {{all: true}} is allowed for "
                              "train.student, true/false keys and keys with named choices (e.g. train.scope)")
        kind, body = "grid", domain

    if kind in ("grid", "choice"):
        if not isinstance(body, list) or not body:
            raise ConfigError(f"{where}: {body!r} is not allowed; expected a non-empty list of values")
        values = [_value(key, v, f"{where}[{i}]", base) for i, v in enumerate(body)]
        for i, v in enumerate(values):
            if any(v == w and type(v) is type(w) for w in values[:i]):
                raise ConfigError(f"{where}[{i}]: {v!r} is a duplicate; each value may appear once")
        dim = Dimension(key, kind, tuple(values))
    else:
        if not (isinstance(body, list) and len(body) == 2
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in body)):
            raise ConfigError(f"{where}: {body!r} is not allowed; expected [low, high] (two numbers)")
        drawn = int if kind == "randint" else float
        if tp is not drawn:
            allowed = {int: "randint, choice", float: "uniform, loguniform, choice"}.get(tp, "choice or a list")
            raise ConfigError(f"{where}: {kind} draws {'integers' if drawn is int else 'real numbers'} but {key} "
                              f"expects {type_name(tp)}; allowed for {key}: {allowed}")
        low, high = body
        if kind == "randint" and not all(isinstance(v, int) for v in body):
            raise ConfigError(f"{where}: {body!r} is not allowed; randint bounds must be integers")
        if not low < high:
            raise ConfigError(f"{where}: {body!r} is not allowed; expected low < high")
        if kind == "loguniform" and low <= 0:
            raise ConfigError(f"{where}: {body!r} is not allowed; loguniform needs low > 0")
        values = [_value(key, v, f"{where}[{i}]", base) for i, v in enumerate(body)]
        dim = Dimension(key, kind, tuple(values))

    if search == "grid" and dim.sampled:
        raise ConfigError(f"space.{key}: {kind} is not allowed with search.type 'grid'; allowed: a list of values "
                          "or {all: true} (use search.type random or optuna to draw values)")
    if search == "optuna" and not dim.sampled:
        raise ConfigError(f"space.{key}: a grid list is not allowed with search.type 'optuna' (Optuna draws every "
                          "value); allowed: choice, uniform, loguniform, randint")
    return dim


def _check_combination(sweep: Sweep) -> None:
    if sweep.search.type == "random" and not sweep.sampled:
        raise ConfigError("search.type: 'random' needs at least one choice/uniform/loguniform/randint entry in "
                          "space; allowed for lists only: grid")
    if sweep.scheduler.type == "asha":
        steps = sweep.max_steps
        if sweep.scheduler.grace_period >= steps:
            raise ConfigError(f"scheduler.grace_period: {sweep.scheduler.grace_period} is not allowed; ASHA could "
                              f"never stop a trial of {steps} steps (train.steps); allowed: < {steps}")
        if sweep.search.type == "optuna" and len(sweep.seeds) > 1:
            raise ConfigError(f"seeds: {sweep.seeds!r} are not allowed with scheduler.type 'asha' and search.type "
                              "'optuna': ASHA stops a config's seeds apart, and Optuna would be told the mean of "
                              "those it let finish; allowed: one seed, or scheduler.type fifo")


# --------------------------------------------------------------------------- trials


def trials(sweep: Sweep) -> list[TrialSpec]:
    """The fixed trial list of a grid or random sweep, each config validated (empty for optuna)."""
    if sweep.search.type == "optuna":
        return []
    import numpy as np

    rng = np.random.default_rng(sweep.search.seed)
    draws: list[dict] = [{}]
    if sweep.search.type == "random":
        draws = [{d.key: sample(d, rng) for d in sweep.sampled} for _ in range(sweep.search.num_samples)]
    grid = [[(d.key, v[0] if d.key == VARIANT else v) for v in d.values] for d in sweep.grid]
    out = []
    for draw in draws:
        for cell in itertools.product(*grid):
            for seed in sweep.repeats:
                values = {**draw, **dict(cell)}
                values = {key: values[key] for key in sweep.space}
                if seed is not None:
                    values["train.seed"] = seed
                try:
                    config = sweep.config(values)
                except ConfigError as err:
                    raise ConfigError(f"space: trial {trial_label(len(out))} ({describe(values)}): {err}") from None
                out.append(TrialSpec(len(out), values, config))
    return out


def sample(dim: Dimension, rng) -> Any:
    """One draw of a sampled dimension (randint: both bounds inclusive)."""
    if dim.kind == "choice":
        return dim.values[int(rng.integers(len(dim.values)))]
    low, high = dim.values
    if dim.kind == "uniform":
        return float(rng.uniform(low, high))
    if dim.kind == "loguniform":
        return float(math.exp(rng.uniform(math.log(low), math.log(high))))
    return int(rng.integers(low, high + 1))      # randint, the last of DISTRIBUTIONS


def describe(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={fmt(v)}" for k, v in values.items())
