"""Sweep files -> validated Sweep and trial lists; one-line errors for malformed files; the CLI's cheap paths."""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline.sweep import spec as sc
from pipeline.config import ARO_SETS, CLEVR_SUBTASKS, SUGARCREPE_SUBSETS, ConfigError, load, parse_yaml, read_yaml

# The other test modules' helpers are imported where used: benchmarks/fault_probes.py imports this module
# (its BAD) as tests.test_sweep_config, without tests/ on sys.path.
REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"
PYTHON = REPO / ".venv" / "bin" / "python"
SWEEPS = sorted((REPO / "sweeps").glob("*.yaml"))


def params() -> dict:
    return yaml.safe_load(PARAMS.read_text())


def parse(text: str, profile: str | None = None) -> sc.Sweep:
    return sc.parse(parse_yaml(text), params(), profile)


# --------------------------------------------------------------------------- the shipped sweep files


def test_the_five_sweep_files_are_shipped():
    assert {p.stem for p in SWEEPS} >= {"lambda", "lr", "scope", "table1", "optuna"}


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
@pytest.mark.parametrize("profile", [None, "paper"])
def test_shipped_sweep_validates_on_toy_and_one_override_from_paper(path, profile):
    sweep = sc.load(path, params(), profile)
    assert sweep.profile == (profile or "toy")
    specs = sc.trials(sweep)
    if sweep.search.type == "optuna":
        assert specs == [] and sweep.num_trials == sweep.search.num_samples
    else:
        assert len(specs) == sweep.num_trials > 0
        for spec in specs:
            cfg = sweep.config(spec.values)
            assert cfg.profile == sweep.profile


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_a_shipped_sweep_runs_on_the_profile_of_the_params_file(path):
    """As the sweep stage runs it: run by hand with `profile: paper` in params.yaml, a file that named
    the toy profile would train the toy models."""
    raw = params()
    raw["profile"] = "paper"
    assert sc.load(path, raw).profile == "paper"


def test_lambda_sweep_is_the_five_lambdas():
    sweep = sc.load(REPO / "sweeps" / "lambda.yaml", params())
    assert [t.values["objective.lambda_sds"] for t in sc.trials(sweep)] == [0.0, 1e-4, 1e-3, 1e-2, 1e-1]
    assert sweep.search.type == "grid" and sweep.scheduler.type == "fifo"


def test_scope_sweep_covers_the_three_scopes_each_at_its_own_rate_and_full_at_the_collapsing_one():
    sweep = sc.load(REPO / "sweeps" / "scope.yaml", params())
    configs = [sweep.config(t.values) for t in sc.trials(sweep)]
    assert [(c.train.scope, c.train.lr) for c in configs] == [("layernorm", 5e-3), ("full", 5e-4), ("lora", 5e-3),
                                                              ("full", 5e-3)]


def test_methods_sweep_runs_every_method_with_three_seeds_on_the_same_scope():
    sweep = sc.load(REPO / "sweeps" / "methods.yaml", params())
    specs = sc.trials(sweep)
    configs = [sweep.config(t.values) for t in specs]
    assert [t.values["variant"] for t in specs][::3] == ["FT with L_CLIP", "NegCLIP", "NegCLIP without negative images",
                                                           "SDS-CLIP", "UNet-feature distillation", "Diffusion feedback",
                                                           "Diffusion feedback alone", "Contrastive feedback (DCR)"]
    assert [c.objective.method for c in configs][::3] == ["clip", "negclip", "negclip", "sds", "unet_feature",
                                                          "diffusion_feedback", "diffusion_feedback",
                                                          "contrastive_feedback"]
    assert [c.objective.negclip_neighbours for c in configs][3:9:3] == [3, 0]           # NegCLIP's, and none
    assert [c.objective.clip_weight for c in configs][::3] == [1, 1, 1, 1, 1, 1, 0, 1]   # DIVA's and DCR's: feedback alone
    assert {(c.train.scope, c.train.lr, c.train.steps) for c in configs} == {("full", 5e-4, 200)}
    assert [c.train.seed for c in configs] == [0, 1, 2] * 8
    assert [c.objective.contrastive_negatives for c in configs][-1] == 3
    paper = sc.load(REPO / "sweeps" / "methods.yaml", params(), profile="paper")
    assert {paper.config(t.values).train.lr for t in sc.trials(paper)} == {1e-5}


def test_variants_are_bundles_of_values_and_their_names_label_the_trials():
    sweep = parse("name: x\nbase: {params: {train.warmup_steps: 0}}\n"
                  "space:\n  variant:\n    plain: {objective.method: clip, objective.lambda_sds: 0}\n"
                  "    hard negatives: {objective.method: negclip, objective.lambda_sds: 0, train.lr: 0.01}\n"
                  "  train.steps: [2, 4]\nseeds: [0, 1]\n")
    specs = sc.trials(sweep)
    assert len(specs) == sweep.num_trials == 8
    first = specs[0].values
    assert first == {"variant": "plain", "train.steps": 2, "train.seed": 0}
    config = sweep.config(specs[-1].values)
    assert (config.objective.method, config.train.lr, config.train.steps, config.train.seed) == ("negclip", 0.01, 4, 1)
    assert sweep.definition()["space"]["variant"] == {"grid": [{"plain": {"objective.method": "clip",
                                                                          "objective.lambda_sds": 0.0}},
                                                                {"hard negatives": {"objective.method": "negclip",
                                                                                    "objective.lambda_sds": 0.0,
                                                                                    "train.lr": 0.01}}]}


def test_base_profiles_apply_to_their_profile_only():
    text = ("name: x\nbase: {params: {train.steps: 7, train.warmup_steps: 0}, profiles: {paper: {train.lr: 1e-6}}}\n"
            "space: {train.seed: [0]}\n")
    assert parse(text).base_config.train.lr == load(PARAMS).train.lr
    paper = sc.parse(parse_yaml(text), params(), profile="paper")
    assert (paper.base_config.train.lr, paper.base_config.train.steps) == (1e-6, 7)


def test_table1_is_every_student_by_its_two_table_rows_by_seed():
    variants = {"FT with L_CLIP": "clip", "FT with L_CLIP + L_SDS": "sds"}      # the rows' names and objectives
    raw = params()
    raw["students"]["toy-vit-b"] = dict(raw["students"]["toy-vit"])
    sweep = sc.load(REPO / "sweeps" / "table1.yaml", raw)
    specs = sc.trials(sweep)
    combos = {(t.values["train.student"], t.values["variant"], t.values["train.seed"]) for t in specs}
    assert combos == {(s, v, seed) for s in raw["students"] for v in variants for seed in (0, 1, 2)}
    assert len(specs) == len(combos)
    by_variant = {t.values["variant"]: sweep.config(t.values).objective for t in specs}
    assert {v: o.method for v, o in by_variant.items()} == variants
    assert (by_variant["FT with L_CLIP"].method, by_variant["FT with L_CLIP"].lambda_sds) == ("clip", 0)
    # L_SDS at the profile's lambda: the paper's 0.001 on the paper profile.
    assert by_variant["FT with L_CLIP + L_SDS"].method == "sds"
    assert by_variant["FT with L_CLIP + L_SDS"].lambda_sds == raw["objective"]["lambda_sds"]
    paper = sc.load(REPO / "sweeps" / "table1.yaml", params(), "paper")
    assert {sweep_values["train.student"] for sweep_values in (t.values for t in sc.trials(paper))} == \
        {k for k, v in params()["profiles"]["paper"]["students"].items() if v is not None}
    assert paper.config(sc.trials(paper)[-1].values).objective.lambda_sds == 0.001


def test_optuna_sweep_is_tpe_over_log_lambda_and_log_lr_with_asha():
    sweep = sc.load(REPO / "sweeps" / "optuna.yaml", params())
    assert sweep.search.type == "optuna" and sweep.search.sampler == "tpe"
    assert {k: d.kind for k, d in sweep.space.items()} == {"objective.lambda_sds": "loguniform", "train.lr": "loguniform"}
    assert sweep.scheduler.type == "asha" and sweep.scheduler.grace_period < sweep.max_steps


# --------------------------------------------------------------------------- semantics


def test_yaml_reads_exponent_numbers_without_a_dot_as_floats():
    sweep = parse("name: x\nspace: {objective.lambda_sds: [1e-4, 2E-3, 1.5e2]}")
    assert sweep.space["objective.lambda_sds"].values == (1e-4, 2e-3, 150.0)


def test_grid_is_the_cross_product_in_file_order_with_seeds_innermost():
    sweep = parse("name: x\nspace: {train.scope: [layernorm, full], objective.lambda_sds: [0, 1e-3]}\nseeds: [3, 4]")
    got = [(t.label, t.values) for t in sc.trials(sweep)]
    assert got[0] == ("t000", {"train.scope": "layernorm", "objective.lambda_sds": 0.0, "train.seed": 3})
    assert got[1][1]["train.seed"] == 4 and got[2][1]["objective.lambda_sds"] == 1e-3
    assert [label for label, _ in got] == [f"t{i:03d}" for i in range(8)]


def test_base_overrides_and_profile_reach_every_trial():
    sweep = parse("name: x\nbase: {profile: smoke, params: {train.steps: 7, objective: {t_min: 5}}}\n"
                  "space: {train.lr: [0.1, 0.2]}")
    for spec in sc.trials(sweep):
        cfg = sweep.config(spec.values)
        assert (cfg.profile, cfg.train.steps, cfg.objective.t_min, cfg.train.lr) == ("smoke", 7, 5, spec.values["train.lr"])
        assert cfg.train.batch_size == params()["profiles"]["smoke"]["train"]["batch_size"]
    assert parse("name: x\nbase: {profile: smoke}\nspace: {train.lr: [0.1]}", profile="paper").profile == "paper"


def test_random_search_is_seeded_crosses_the_grid_and_respects_bounds():
    text = ("name: x\nsearch: {type: random, num_samples: 20, seed: 7}\nspace:\n"
            "  train.lr: {loguniform: [1e-5, 1e-2]}\n  train.batch_size: {randint: [2, 4]}\n"
            "  objective.noising: {choice: [noise, none]}\n  train.scope: [layernorm, full]\n")
    first, second = sc.trials(parse(text)), sc.trials(parse(text))
    assert [t.values for t in first] == [t.values for t in second] and len(first) == 40
    assert all(1e-5 <= t.values["train.lr"] <= 1e-2 for t in first)
    assert {t.values["train.batch_size"] for t in first} == {2, 3, 4}          # randint: both ends inclusive
    assert {t.values["objective.noising"] for t in first} == {"noise", "none"}
    assert [t.values["train.scope"] for t in first[:2]] == ["layernorm", "full"]
    assert first[0].values["train.lr"] == first[1].values["train.lr"]          # one draw, crossed with the grid
    other = sc.trials(parse(text.replace("seed: 7", "seed: 8")))
    assert [t.values for t in other] != [t.values for t in first]


def test_all_expands_finite_domains():
    sweep = parse("name: x\nspace: {train.scope: {all: true}, eval.subtract_unconditional: {all: true}}")
    assert sweep.space["train.scope"].values == ("layernorm", "full", "lora")
    assert sweep.space["eval.subtract_unconditional"].values == (False, True)
    assert sweep.num_trials == 6


def test_spec_hash_tracks_the_definition_and_params():
    a = parse("name: x\nspace: {train.lr: [0.1, 0.2]}")
    assert a.spec_hash() == parse("name: x\nspace: {train.lr: [0.1, 0.2]}").spec_hash()
    assert a.spec_hash() != parse("name: x\nspace: {train.lr: [0.1, 0.3]}").spec_hash()


# --------------------------------------------------------------------------- malformed files: one line each

# (sweep file text, fragments the one-line message must contain)
BAD = {
    "empty file": ("", ["empty", "name", "space"]),
    "top level a list": ("- 1\n- 2\n", ["top level", "mapping"]),
    "unknown top-level key": ("name: x\nspace: {train.lr: [1]}\nserach: grid\n", ["serach", "unknown key", "search"]),
    "missing name": ("space: {train.lr: [0.1]}\n", ["name", "missing"]),
    "bad name": ("name: 'my sweep!'\nspace: {train.lr: [0.1]}\n", ["name", "'my sweep!'", "letters"]),
    # A sweep of one key writes reports/<name>.*: the report would refuse it only after the sweep ran.
    "named like a figure of the report": ("name: zeroshot\nspace: {train.lr: [0.1]}\n",
                                          ["name", "'zeroshot'", "reports/zeroshot.*", "table1-intervals"]),
    "named like a sweep table of the report": ("name: sweep-lr\nspace: {train.lr: [0.1]}\n",
                                               ["name", "'sweep-lr'", "reports/sweep-lr.*", "sweep-*"]),
    "named like a table in another case": ("name: Table2\nspace: {train.lr: [0.1]}\n",
                                           ["name", "'Table2'", "reports/Table2.*", "in any case"]),
    "Table 1's name for one key": ("name: table1\nspace: {train.lr: [0.1]}\n",
                                   ["name", "'table1'", "one key", "reports/table1.*"]),
    "name not a string": ("name: 3\nspace: {train.lr: [0.1]}\n", ["name", "3", "a string"]),
    "missing space": ("name: x\n", ["space", "missing"]),
    "empty space": ("name: x\nspace: {}\n", ["space", "{}", "non-empty mapping"]),
    "unknown parameter": ("name: x\nspace: {train.lrr: [0.1]}\n", ["space.train.lrr", "unknown parameter", "train.lr"]),
    "section not a leaf": ("name: x\nspace: {train: [0.1]}\n", ["space.train", "unknown parameter", "train.lr"]),
    "not sweepable section": ("name: x\nspace: {teacher.unet_steps: [1, 2]}\n",
                              ["space.teacher.unet_steps", "not sweepable", "models stage", "params.yaml"]),
    "not sweepable data": ("name: x\nspace: {data.n_train: [1, 2]}\n",
                           ["space.data.n_train", "not sweepable", "params.yaml", "dvc repro"]),
    "profile in space": ("name: x\nspace: {profile: [smoke, toy]}\n", ["space.profile", "base.profile"]),
    "scalar instead of values": ("name: x\nspace: {train.lr: 0.1}\n", ["space.train.lr", "0.1", "a list of values",
                                                                      "base.params"]),
    "empty grid": ("name: x\nspace: {train.lr: []}\n", ["space.train.lr", "[]", "non-empty list"]),
    "grid value of wrong type": ("name: x\nspace: {train.steps: [10, ten]}\n",
                                 ["space.train.steps[1]", "'ten'", "an integer"]),
    "grid value out of range": ("name: x\nspace: {train.lr: [0.1, -1]}\n", ["space.train.lr[1]", "-1", "> 0"]),
    "bad literal in grid": ("name: x\nspace: {train.scope: [layernorm, everything]}\n",
                            ["space.train.scope[1]", "'everything'", "'layernorm'", "'lora'"]),
    "variant not a mapping": ("name: x\nspace: {variant: [a, b]}\n", ["space.variant", "a mapping of variant name"]),
    "variant bundle empty": ("name: x\nspace: {variant: {a: {}}}\n", ["space.variant.a", "non-empty mapping"]),
    "variant bad value": ("name: x\nspace: {variant: {a: {train.scope: wide}}}\n",
                          ["space.variant.a.train.scope", "'wide'", "'lora'"]),
    "variant unknown key": ("name: x\nspace: {variant: {a: {train.lrr: 1}}}\n", ["space.variant.a.train.lrr: unknown parameter"]),
    "variant key swept too": ("name: x\nspace: {variant: {a: {train.lr: 0.1}}, train.lr: [0.2]}\n",
                              ["space.variant.a.train.lr", "also swept by space.train.lr"]),
    "variant under optuna": ("name: x\nsearch: optuna\nspace: {variant: {a: {train.lr: 0.1}}}\n",
                             ["space.variant", "optuna"]),
    "variant trial refused": ("name: x\nspace: {variant: {a: {objective.method: negclip}}}\n",
                              ["trial t000", "objective.lambda_sds", "no teacher loss"]),
    "unknown base profile": ("name: x\nbase: {profiles: {huge: {}}}\nspace: {train.lr: [0.1]}\n",
                             ["base.profiles.huge", "unknown profile"]),
    "bad base profile value": ("name: x\nbase: {profiles: {paper: {train.lr: -1}}}\nspace: {train.seed: [0]}\n",
                               ["base.profiles.paper.train.lr", "-1", "> 0"]),
    "unknown student": ("name: x\nspace: {train.student: [toy-vit, vit-h]}\n",
                        ["space.train.student[1]", "'vit-h'", "toy-vit"]),
    "duplicate grid value": ("name: x\nspace: {train.lr: [0.1, 0.1]}\n", ["space.train.lr[1]", "0.1", "duplicate"]),
    "unknown distribution": ("name: x\nsearch: random\nspace: {train.lr: {normal: [0, 1]}}\n",
                             ["space.train.lr.normal", "unknown kind", "loguniform"]),
    "two distributions": ("name: x\nsearch: random\nspace: {train.lr: {uniform: [0.1, 1], choice: [0.1]}}\n",
                          ["space.train.lr", "exactly one of"]),
    "range not two numbers": ("name: x\nsearch: random\nspace: {train.lr: {uniform: [0.1]}}\n",
                              ["space.train.lr.uniform", "[0.1]", "[low, high]"]),
    "low not below high": ("name: x\nsearch: random\nspace: {train.lr: {uniform: [0.5, 0.1]}}\n",
                           ["space.train.lr.uniform", "[0.5, 0.1]", "low < high"]),
    "loguniform from zero": ("name: x\nsearch: random\nspace: {objective.lambda_sds: {loguniform: [0, 1]}}\n",
                             ["space.objective.lambda_sds.loguniform", "[0, 1]", "low > 0"]),
    "range endpoint out of range": ("name: x\nsearch: random\nspace: {objective.lambda_sds: {uniform: [-1, 1]}}\n",
                                    ["space.objective.lambda_sds.uniform[0]", "-1", ">= 0"]),
    "uniform on an integer": ("name: x\nsearch: random\nspace: {train.steps: {uniform: [1, 9]}}\n",
                              ["space.train.steps.uniform", "an integer", "randint"]),
    "randint on a float": ("name: x\nsearch: random\nspace: {train.lr: {randint: [1, 9]}}\n",
                           ["space.train.lr.randint", "a number", "loguniform"]),
    "randint with float bounds": ("name: x\nsearch: random\nspace: {train.steps: {randint: [1, 9.5]}}\n",
                                  ["space.train.steps.randint", "9.5", "integers"]),
    "all on an open range": ("name: x\nspace: {train.lr: {all: true}}\n", ["space.train.lr.all", "finite"]),
    "distribution under grid": ("name: x\nspace: {train.lr: {loguniform: [1e-5, 1e-2]}}\n",
                                ["space.train.lr", "loguniform", "search.type 'grid'", "random or optuna"]),
    "grid list under optuna": ("name: x\nsearch: optuna\nspace: {train.lr: [0.1, 0.2]}\n",
                               ["space.train.lr", "grid list", "optuna", "choice"]),
    "unknown search type": ("name: x\nsearch: {type: bayes}\nspace: {train.lr: [0.1]}\n",
                            ["search.type", "'bayes'", "'grid'", "'optuna'"]),
    "unknown search key": ("name: x\nsearch: {type: random, samples: 3}\nspace: {train.lr: {choice: [1]}}\n",
                           ["search.samples", "unknown key", "num_samples"]),
    "num_samples with grid": ("name: x\nsearch: {type: grid, num_samples: 4}\nspace: {train.lr: [0.1]}\n",
                              ["search.num_samples", "4", "grid", "seeds"]),
    "zero samples": ("name: x\nsearch: {type: random, num_samples: 0}\nspace: {train.lr: {choice: [0.1]}}\n",
                     ["search.num_samples", "0", "> 0"]),
    "unknown optuna sampler": ("name: x\nsearch: {type: optuna, sampler: cmaes}\n"
                               "space: {train.lr: {loguniform: [1e-5, 1e-2]}}\n",
                               ["search.sampler", "'cmaes'", "'tpe'"]),
    "sampler with random": ("name: x\nsearch: {type: random, sampler: tpe}\nspace: {train.lr: {choice: [1]}}\n",
                            ["search.sampler", "random", "optuna"]),
    "random with only lists": ("name: x\nsearch: random\nspace: {train.lr: [0.1, 0.2]}\n",
                               ["search.type", "'random'", "choice"]),
    "unknown scheduler": ("name: x\nscheduler: hyperband\nspace: {train.lr: [0.1]}\n",
                          ["scheduler.type", "'hyperband'", "'asha'"]),
    "asha with grid": ("name: x\nscheduler: asha\nspace: {train.lr: [0.1]}\n",
                       ["scheduler.type", "'asha'", "grid", "fifo"]),
    "asha on a final metric": ("name: x\nsearch: random\nscheduler: {type: asha, metric: winoground/text}\n"
                               "space: {train.lr: {choice: [0.1]}}\n",
                               ["scheduler.metric", "'winoground/text'", "loss/clip"]),
    "grace period past the end": ("name: x\nsearch: random\nscheduler: {type: asha, grace_period: 500}\n"
                                  "space: {train.lr: {choice: [0.1]}}\n",
                                  ["scheduler.grace_period", "500", "200", "< 200"]),
    "asha keys with fifo": ("name: x\nscheduler: {type: fifo, grace_period: 5}\nspace: {train.lr: [0.1]}\n",
                            ["scheduler.grace_period", "5", "fifo", "asha"]),
    "bad mode": ("name: x\nmode: maximise\nspace: {train.lr: [0.1]}\n", ["mode", "'maximise'", "'max'"]),
    "unknown metric": ("name: x\nmetric: winoground/txt\nspace: {train.lr: [0.1]}\n",
                       ["metric", "'winoground/txt'", "winoground/{text"]),
    "seeds not a list": ("name: x\nseeds: 3\nspace: {train.lr: [0.1]}\n", ["seeds", "3", "a list"]),
    "empty seeds": ("name: x\nseeds: []\nspace: {train.lr: [0.1]}\n", ["seeds", "[]", "non-empty"]),
    "duplicate seeds": ("name: x\nseeds: [1, 1]\nspace: {train.lr: [0.1]}\n", ["seeds", "[1, 1]", "distinct"]),
    "seeds and train.seed": ("name: x\nseeds: [1, 2]\nspace: {train.seed: [0, 1]}\n", ["space.train.seed", "seeds"]),
    "seeds and a variant's train.seed": ("name: x\nseeds: [0, 1]\nspace: {variant: {a: {train.seed: 5}, "
                                         "b: {train.lr: 0.1}}}\n",
                                         ["space.variant.a.train.seed", "seeds"]),
    "seeds with optuna and asha": ("name: x\nseeds: [0, 1]\nsearch: optuna\nscheduler: asha\n"
                                   "space: {train.lr: {loguniform: [1e-5, 1e-2]}}\n",
                                   ["seeds", "[0, 1]", "'asha'", "'optuna'", "one seed, or scheduler.type fifo"]),
    "negative cpu": ("name: x\nresources: {cpu: -1}\nspace: {train.lr: [0.1]}\n", ["resources.cpu", "-1", "> 0"]),
    "fractional cpu above one": ("name: x\nresources: {cpu: 1.5}\nspace: {train.lr: [0.1]}\n",
                                 ["resources.cpu", "1.5", "whole numbers"]),
    "unknown resource": ("name: x\nresources: {memory: 4}\nspace: {train.lr: [0.1]}\n",
                         ["resources.memory", "unknown key", "cpu", "gpu"]),
    "negative max_concurrent": ("name: x\nmax_concurrent: -2\nspace: {train.lr: [0.1]}\n",
                                ["max_concurrent", "-2", ">= 0"]),
    "base not a mapping": ("name: x\nbase: toy\nspace: {train.lr: [0.1]}\n", ["base", "'toy'", "a mapping"]),
    "bad base profile": ("name: x\nbase: {profile: huge}\nspace: {train.lr: [0.1]}\n",
                         ["base.profile", "'huge'", "smoke", "paper"]),
    "unknown base key": ("name: x\nbase: {parms: {}}\nspace: {train.lr: [0.1]}\n",
                         ["base.parms", "unknown key", "params"]),
    "unknown base param": ("name: x\nbase: {params: {train.lrr: 1}}\nspace: {train.lr: [0.1]}\n",
                           ["base.params.train.lrr", "unknown key", "lr"]),
    "bad base param value": ("name: x\nbase: {params: {train.steps: many}}\nspace: {train.lr: [0.1]}\n",
                             ["base.params.train.steps", "'many'", "an integer"]),
    "variant names alike as text": ("name: x\nspace: {variant: {1: {train.lr: 0.1}, '1': {train.lr: 0.2}}}\n",
                                    ["space.variant.1", "a second variant of this name"]),
    # The trials load models/: a value of the sections it is built from would be recorded, never run.
    "teacher in base params": ("name: x\nbase: {params: {teacher.name: other}}\nspace: {train.lr: [0.1]}\n",
                               ["base.params.teacher.name", "models stage", "params.yaml"]),
    "student in a profile's base": ("name: x\nbase: {profiles: {toy: {students: {toy-vit: {embed_dim: 8}}}}}\n"
                                    "space: {train.lr: [0.1]}\n",
                                    ["base.profiles.toy.students.toy-vit.embed_dim", "models stage"]),
    "profile inside base params": ("name: x\nbase: {params: {profile: smoke}}\nspace: {train.lr: [0.1]}\n",
                                   ["base.params.profile", "base.profile"]),
    "trial breaks a cross-key rule": ("name: x\nspace: {objective.t_min: [10, 990]}\n",
                                      ["trial t001", "objective.t_min=990", "must be below", "objective.t_max"]),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_malformed_sweep_is_one_line_naming_key_value_and_allowed(case):
    text, fragments = BAD[case]
    with pytest.raises(ConfigError) as info:
        sweep = parse(text)
        sc.trials(sweep)
    message = str(info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


@pytest.mark.parametrize("metric", [f"aro/{s}" for s in ARO_SETS] + [f"sugarcrepe/{s}" for s in SUGARCREPE_SUBSETS]
                         + [f"clevr/{s}" for s in CLEVR_SUBTASKS])
def test_every_benchmark_part_is_a_metric_a_sweep_may_name_and_the_error_lists_it(metric):
    """The metric names follow pipeline.config's lists of ARO sets, SugarCrepe subsets and CLEVR
    subtasks: a set added there can be optimised, and an unknown metric's error names it."""
    assert parse(f"name: x\nmetric: {metric}\nspace: {{train.lr: [0.1]}}\n").metric == metric
    with pytest.raises(ConfigError) as info:
        parse("name: x\nmetric: nope\nspace: {train.lr: [0.1]}\n")
    family, name = metric.split("/")
    listed = re.search(rf"\b{family}/\{{([^}}]*)\}}", str(info.value))
    assert listed and name in listed.group(1).split(","), str(info.value)


def test_there_are_at_least_fifteen_kinds_of_malformed_file():
    assert len(BAD) >= 15


def test_a_params_file_that_cannot_be_read_is_named_alone(tmp_path):
    """Not as if the sweep file were at fault: the line the stages print for it."""
    proc = _cli("sweeps/lambda.yaml", "--params", tmp_path / "nope.yaml", "--dry-run")
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {tmp_path / 'nope.yaml'}: file not found", proc.stderr


def test_file_level_problems_name_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"nope\.yaml: file not found$"):
        sc.load(missing, params())
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\nspace: {train.lr: [0.1\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: line 3 is not valid YAML: expected ',' or '\]', but got "
                                          r"'<stream end>' \(in a flow sequence from line 2\)$"):
        sc.load(broken, params())
    dup = tmp_path / "dup.yaml"
    dup.write_text("name: x\nspace: {train.lr: [0.1]}\nname: y\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml: line 3: duplicate key 'name'"):
        sc.load(dup, params())


# --------------------------------------------------------------------------- command line (no Ray, no MLflow)


def _cli(*args, cwd=REPO, ray_tmpdir=None):
    extra = {"RAY_TMPDIR": ray_tmpdir} if ray_tmpdir else {}
    return subprocess.run([str(PYTHON), "-m", "pipeline.sweep", *map(str, args)], cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(REPO), **extra}, capture_output=True, text=True,
                          timeout=120)


def test_help_explains_resume_address_dry_run_and_the_schema():
    proc = _cli("--help")
    assert proc.returncode == 0
    for word in ("--dry-run", "--resume", "--address", "RAY_ADDRESS", "--retry-failed", "--storage", "space",
                 "loguniform", "asha", "seeds", "resources", "max_concurrent", "storage_path", "exit status"):
        assert word in proc.stdout, word


def test_malformed_file_on_the_command_line_exits_2_with_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nspace: {train.lr: [0.1, -1]}\n")
    proc = _cli(path, "--dry-run")
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: space.train.lr[1]: -1"), proc.stderr


def test_dry_run_prints_the_trials_without_importing_ray_or_mlflow(tmp_path):
    probe = ("import sys, time; t = time.perf_counter(); from pipeline.sweep.cli import main; "
             "rc = main(['sweeps/table1.yaml', '--dry-run']); "
             "print('RC', rc, 'RAY', 'ray' in sys.modules, 'MLFLOW', 'mlflow' in sys.modules, "
             "'TORCH', 'torch' in sys.modules, 'SECONDS', round(time.perf_counter() - t, 2))")
    proc = subprocess.run([str(PYTHON), "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "RC 0 RAY False MLFLOW False TORCH False" in out, out
    assert "sweep table1" in out and "18 trials" in out and "t017" in out
    assert "train.student" in out and "variant" in out and "train.seed" in out


def test_dry_run_of_optuna_lists_the_distributions():
    proc = _cli("sweeps/optuna.yaml", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "objective.lambda_sds ~ loguniform(1e-05, 1)" in proc.stdout and "asha on loss/clip" in proc.stdout


def test_profile_override_is_one_flag():
    proc = _cli("sweeps/lambda.yaml", "--dry-run", "--profile", "paper")
    assert proc.returncode == 0 and "profile paper" in proc.stdout


@pytest.mark.parametrize("broken,said", [
    (lambda raw: "", "{path}: empty; a params file holds the sections"),
    (lambda raw: "- a list\n", "{path}: the top level must be a mapping"),
    (lambda raw: yaml.safe_dump({k: v for k, v in raw.items() if k != "train"}),
     "train: missing; {path} must hold every section the stages read"),
], ids=["empty", "a list", "no train section"])
def test_a_broken_params_file_is_named_by_the_path_given(tmp_path, capsys, broken, said):
    """As the stages name it: the file given to --params, not a params.yaml that may not be the one read."""
    from pipeline.sweep import cli as sweep_cli

    path = tmp_path / "elsewhere.yaml"
    path.write_text(broken(params()))
    (tmp_path / "s.yaml").write_text("name: s\nspace: {train.lr: [0.1]}\n")
    assert sweep_cli.main([str(tmp_path / "s.yaml"), "--params", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: " + said.format(path=path)) and err.count("\n") == 1, err


def test_sweep_stage_checks_every_listed_file_before_running_any(tmp_path, capsys):
    from stages import sweep as stage

    raw = params()
    raw["sweeps"] = ["good.yaml", "bad.yaml"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "good.yaml").write_text("name: good\nspace: {train.lr: [0.1]}\n")
    (tmp_path / "bad.yaml").write_text("name: bad\nspace: {train.lr: [0.1, -1]}\n")
    assert stage.main(["--params", str(tmp_path / "params.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.yaml: space.train.lr[1]: -1" in err[0]
    assert not (tmp_path / "results").exists() and not (tmp_path / "mlruns").exists()

    raw["sweeps"] = "good.yaml"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    assert stage.main(["--params", str(tmp_path / "params.yaml")]) == 2
    assert "sweeps: 'good.yaml' is not allowed; expected a list" in capsys.readouterr().err

    raw.pop("sweeps")  # no list: the stage runs no sweep and says so in its results
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    assert stage.main(["--params", str(tmp_path / "params.yaml")]) == 0
    assert json.loads((tmp_path / "results" / "sweeps.json").read_text()) == {}


def test_sweep_stage_checks_every_listed_files_storage_before_running_any(tmp_path, capsys):
    """A storage path that cannot hold a launch, in the second file, stops the stage before the first runs."""
    from stages import sweep as stage

    raw = params()
    raw["sweeps"] = ["good.yaml", "stored.yaml"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    (tmp_path / "good.yaml").write_text("name: good\nspace: {train.lr: [0.1]}\n")
    (tmp_path / "stored.yaml").write_text(f"name: stored\nspace: {{train.lr: [0.1]}}\n"
                                          f"storage_path: {blocker / 'ray'}\n")
    assert stage.main(["--params", str(tmp_path / "params.yaml")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {tmp_path / 'stored.yaml'}: storage_path: {blocker / 'ray'} cannot hold the launch's folder (Not a "
        "directory); give a writable folder"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "good.yaml", "params.yaml", "stored.yaml"]


def test_the_params_files_sweep_list_is_not_part_of_a_trials_config():
    raw = params()
    raw["sweeps"] = ["sweeps/lambda.yaml"]
    sweep = sc.parse({"name": "x", "space": {"train.lr": [0.1]}}, raw)
    assert sweep.config({"train.lr": 0.1}).train.lr == 0.1
    assert sweep.spec_hash() == sc.parse({"name": "x", "space": {"train.lr": [0.1]}}, params()).spec_hash()


def test_gpus_per_trial_overrides_the_files_resources_and_is_checked():
    # On a cluster (given by address, not reached by a dry run) the GPUs are the cluster's.
    proc = _cli("sweeps/lambda.yaml", "--dry-run", "--gpus-per-trial", "1", "--address", "10.0.0.1:6379")
    assert proc.returncode == 0 and "per trial: cpu 1, gpu 1;" in proc.stdout, proc.stdout
    # The option's values are named by the option, not by the file's resources.gpu.
    import torch

    gpus = torch.cuda.device_count() + 1
    for value, line in [(v, f"--gpus-per-trial: {v} is out of range; allowed: a finite number >= 0")
                        for v in ("-1", "inf", "nan")] + [
            ("1.5", "--gpus-per-trial: 1.5 is not allowed; fractions are allowed up to 1, larger quantities must be "
                    "whole numbers"),
            (str(gpus), f"--gpus-per-trial: {gpus} is more than this machine's {gpus - 1} GPUs, so no trial could "
                        "start; ask for fewer or run on a cluster (--address)")]:
        proc = _cli("sweeps/lambda.yaml", "--dry-run", "--gpus-per-trial", value)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"error: {line}"], proc.stderr


def test_a_trial_without_a_gpu_on_a_gpu_cluster_is_refused_unless_it_trains_on_the_cpu():
    """Ray empties CUDA_VISIBLE_DEVICES for a trial that asks for no GPU: with compute.device auto
    it would train on the CPU of a GPU machine without a word."""
    from pipeline.sweep.driver import check_fits_cluster

    none, one = sc.ResourcesSpec(cpu=1, gpu=0), sc.ResourcesSpec(cpu=1, gpu=1)
    with pytest.raises(ConfigError, match=r"^resources\.gpu: 0 per trial on a Ray cluster with 4 GPUs.*--gpus-per-trial 1"):
        check_fits_cluster(none, {"CPU": 16, "GPU": 4}, "auto")
    check_fits_cluster(none, {"CPU": 16, "GPU": 4}, "cpu")
    check_fits_cluster(one, {"CPU": 16, "GPU": 4}, "auto")
    check_fits_cluster(none, {"CPU": 2}, "auto")
    with pytest.raises(ConfigError, match=r"^resources\.gpu: 1 per trial, but the Ray cluster has 0 GPUs"):
        check_fits_cluster(one, {"CPU": 2}, "auto")


def test_the_sweep_stage_gives_a_gpu_to_trials_that_ask_for_none_where_the_stages_run_on_a_gpu():
    from stages.sweep import gpus_per_trial

    def unasked() -> str:
        raise AssertionError("this machine's device does not decide this case")

    assert gpus_per_trial(0, lambda: "cuda", None, cluster=False) == 1
    assert gpus_per_trial(0, lambda: "cpu", None, cluster=False) is None
    assert gpus_per_trial(0.5, unasked, None, cluster=False) is None     # the file's own fraction stays
    assert gpus_per_trial(0, unasked, None, cluster=True) is None        # a named cluster: the driver decides
    assert gpus_per_trial(0, unasked, 2, cluster=True) == 2


def _built_project(tmp_path: Path) -> Path:
    """A project folder whose stage outputs exist (empty): what the driver checks before Ray starts. Its
    sweep trains with L_CLIP alone, whose trials read no cache table (the stand-in cache has none)."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    for folder in ("data", "models", "cache"):
        (tmp_path / folder).mkdir()
    (tmp_path / "data" / "index.json").write_text("{}")
    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text("name: s\nbase: {params: {objective.method: clip, objective.lambda_sds: 0}}\n"
                          "space: {train.lr: [0.1, 0.2]}\n")
    return sweep_file


def test_a_sweep_whose_trials_read_a_table_the_cache_lacks_is_refused_before_ray_starts(tmp_path):
    """Each trial with a teacher loss would fail alone on it; the launch stops first, in one line."""
    sweep_file = _built_project(tmp_path)
    sweep_file.write_text("name: s\nspace: {objective.lambda_sds: [0.1]}\n")      # the profile's sds
    proc = _cli(sweep_file, "--params", tmp_path / "params.yaml", cwd=tmp_path)
    manifest = tmp_path / "cache" / "train_text" / "manifest.json"
    assert proc.returncode == 2 and proc.stderr.strip() == \
        f"error: cache table 'train_text': {manifest}: not found or not finished: run the cache stage", proc.stderr
    assert not (tmp_path / "ray_results").exists() and not (tmp_path / "mlruns").exists()


def test_a_tracking_server_where_nothing_answers_stops_the_sweep_before_ray_starts(tmp_path, monkeypatch):
    """MLflow would retry it for minutes after Ray started, then print a traceback."""
    from test_sweep import free_port
    from test_tracking import no_proxies

    no_proxies(monkeypatch)                              # the command's environment: a proxy would be MLflow's way
    sweep_file = _built_project(tmp_path)
    port = free_port()
    params = tmp_path / "params.yaml"
    params.write_text(params.read_text().replace("uri: sqlite:///mlruns/mlflow.db", f"uri: http://127.0.0.1:{port}"))
    proc = _cli(sweep_file, "--params", params, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        f"error: tracking.uri: nothing answers at http://127.0.0.1:{port} (Connection refused); start the tracking "
        "server (README, \"MLflow\") or set tracking.uri to one that runs"], proc.stderr[-2000:]
    assert not (tmp_path / "ray_results").exists()


def test_resume_continues_only_a_launch_of_the_same_definition(tmp_path):
    """`--resume` finds the launch by its folder, whose name carries the definition's hash: a launch of
    a changed sweep file or params is refused in one line, before Ray starts."""
    sweep_file = _built_project(tmp_path)
    args = (sweep_file, "--params", tmp_path / "params.yaml", "--resume")
    # A launch refused before Ray Tune wrote its settings (no tuner.pkl) is nothing to resume.
    same = sc.load(sweep_file, read_yaml(tmp_path / "params.yaml")).spec_hash()
    (tmp_path / "ray_results" / f"s-20261205-100000-0007-{same}").mkdir(parents=True)
    proc = _cli(*args, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: --resume: no launch of sweep 's' under " \
                                                           f"{tmp_path / 'ray_results'}", proc.stderr
    launch = tmp_path / "ray_results" / f"s-20261205-093000-0042-{'0' * 16}"
    launch.mkdir(parents=True)
    (launch / "tuner.pkl").write_bytes(b"")
    proc = _cli(*args, cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0] == (f"error: --resume: {sweep_file}, the params or --profile / --gpus-per-trial / --max-concurrent "
                        f"changed since launch {launch} (its spec hash differs); restore them, or start a new launch "
                        "without --resume")


def test_resume_of_a_launch_that_ran_to_its_end_is_refused_unless_it_retries_failed_trials(tmp_path):
    sweep_file = _built_project(tmp_path)
    same = sc.load(sweep_file, read_yaml(tmp_path / "params.yaml")).spec_hash()
    launch = tmp_path / "ray_results" / f"s-20261205-100000-0007-{same}"
    launch.mkdir(parents=True)
    (launch / "tuner.pkl").write_bytes(b"")
    (launch / "experiment_state-2026-12-05_10-00-00.json").write_text("{}")
    args = (sweep_file, "--params", tmp_path / "params.yaml", "--resume")
    for code, extra, error in ((0, (), "ran to its end with every trial finished; nothing to resume"),
                               (0, ("--retry-failed",), "ran to its end with every trial finished; nothing to resume"),
                               (1, (), "ran to its end with exit status 1 (failed trials, or a metric no trial logged: its "
                                      "summary says which); add --retry-failed to run failed trials again")):
        (launch / "ended.json").write_text(json.dumps({"exit": code}))
        proc = _cli(*args, *extra, cwd=tmp_path)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
            f"error: --resume: launch {launch} {error}"], proc.stderr
    # That --retry-failed runs the failed trials again, and only them: tests/test_sweep.py, on a launch of real trials.


@pytest.mark.parametrize("name, whole", [
    ("experiment_state-2026-12-05_10-00-00.json", json.dumps({"trial_data": [], "runner_data": {}}).encode()),
    ("searcher-state-2026-12-05_10-00-00.pkl", pickle.dumps({"searcher": list(range(100))})),
    ("callback-states-2026-12-05_10-00-00.pkl", pickle.dumps({"trials": {"t000": {"run_id": "0" * 32}}})),
], ids=["trials", "searcher", "recorder"])
def test_a_launch_whose_ray_state_a_kill_cut_short_is_refused_in_one_line(tmp_path, name, whole):
    """Ray Tune copies its state files into the launch folder in place: a driver killed mid-copy leaves
    one cut short, which Ray's restore would meet as a traceback. Only the newest of each kind counts
    (Ray restores from it): an older one cut short is no obstacle."""
    sweep_file = _built_project(tmp_path)
    same = sc.load(sweep_file, read_yaml(tmp_path / "params.yaml")).spec_hash()
    launch = _launch(tmp_path / "ray_results", "20261205-100000", same, "experiment_state-2026-12-05_09-00-00.json")
    (launch / name.replace("10-00-00", "09-00-00")).write_bytes(whole[:-3])     # older: not read
    (launch / name).write_bytes(whole[: len(whole) // 2])
    proc = _cli(sweep_file, "--params", tmp_path / "params.yaml", "--resume", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        f"error: --resume: launch {launch} cannot be continued ({name} cannot be read: cut short by a kill while "
        "Ray Tune wrote it, or written by another Ray Tune); start a new launch (without --resume)"], proc.stderr[-2000:]


def test_a_whole_state_file_of_a_class_this_ray_tune_lacks_is_unreadable_too(tmp_path):
    """Written by another version: it loads no better than one cut short, and stops a restore alike."""
    from pipeline.sweep.driver import unreadable_state

    name = "searcher-state-2026-12-05_10-00-00.pkl"
    (tmp_path / name).write_bytes(b"cabsent_module\nGone\n(tR.")     # a pickle of absent_module.Gone()
    assert unreadable_state(str(tmp_path), {name}) == (f"{name} cannot be read: cut short by a kill while Ray Tune "
                                                       "wrote it, or written by another Ray Tune")


def test_an_address_where_no_cluster_answers_is_refused_in_one_line(tmp_path):
    """Ray's own attempt retries for minutes and ignores SIGTERM meanwhile."""
    from test_sweep import free_port

    sweep_file = _built_project(tmp_path)
    port = free_port()
    proc = _cli(sweep_file, "--params", tmp_path / "params.yaml", "--address", f"127.0.0.1:{port}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == (f"error: --address: nothing answers at 127.0.0.1:{port} (Connection refused); "
                                   "start the cluster's head there first (`ray start --head`)"), proc.stderr
    assert not (tmp_path / "ray_results").exists()       # refused before the launch's folder is made
    # Ray Client would run Ray Tune, and the run recorder with it, in an actor on the cluster: the driver
    # then found no trial recorded, called all of them never run and exited 1.
    proc = _cli(sweep_file, "--params", tmp_path / "params.yaml", "--address", "ray://127.0.0.1:10001", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: --address: 'ray://127.0.0.1:10001' is not allowed; Ray Client (ray://) runs Ray Tune away from this "
        "driver; expected HOST:PORT of the head's GCS (6379 unless changed) or auto"), proc.stderr


def test_a_resume_of_an_asha_sweep_says_that_its_rungs_start_empty():
    """Ray Tune restores a launch without its scheduler's state (ray-project/ray#30838): a resumed ASHA
    sweep stops trials differently from an uninterrupted one, which the user is told."""
    note = "note: ASHA's rungs start empty on --resume (Ray Tune does not save its scheduler's state"
    assert note in _cli("sweeps/optuna.yaml", "--resume", "--dry-run").stderr
    assert note not in _cli("sweeps/optuna.yaml", "--dry-run").stderr
    assert note not in _cli("sweeps/lambda.yaml", "--resume", "--dry-run").stderr


def test_launch_lock_refuses_a_second_driver_on_the_same_launch(tmp_path):
    """The lock is the system's (flock): held by a live process, let go when it dies, even by SIGKILL."""
    from pipeline.sweep.driver import launch_lock

    launch = tmp_path / "s-20261205-093000-0001-0000000000000000"
    holder = subprocess.Popen([str(PYTHON), "-c", "import sys, time; from pipeline.sweep.driver import launch_lock\n"
                               f"with launch_lock({str(launch)!r}):\n    print('held', flush=True); time.sleep(60)"],
                              cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=rf"launch {launch} is being run by another driver \(pid {holder.pid} on "):
            with launch_lock(str(launch)):
                pass
    finally:
        holder.kill()
        holder.wait()
    with launch_lock(str(launch)):                 # the killed holder's lock is gone with it
        assert (launch / "driver.lock").read_text().startswith(f"pid {os.getpid()} ")


@pytest.mark.parametrize("body, refused", [
    ("space: {objective.lambda_sds: {choice: [0, 1e-3]}}\nscheduler: {type: asha, metric: loss/sds}\n", "lambda_sds 0,"),
    ("space: {objective.lambda_sds: {loguniform: [1e-4, 1e-1]}}\nscheduler: {type: asha, metric: loss/sds}\n", None),
    ("base: {params: {objective.projector_steps: 5, objective.lambda_sds: 1e-3}}\n"
     "space: {train.lr: {loguniform: [1e-5, 1e-3]}}\nscheduler: {type: asha, metric: loss/clip}\n", "projector_steps 5"),
    ("space: {objective.method: {choice: [sds, unet_feature]}, objective.lambda_sds: {uniform: [1e-3, 1e-1]}}\n"
     "scheduler: {type: asha, metric: loss/sds}\n", "'unet_feature'"),
    ("base: {params: {objective.lambda_sds: 1e-3}}\nspace: {objective.projector_steps: {randint: [0, 5]}}\n"
     "scheduler: {type: asha, metric: loss/clip, grace_period: 1}\n", "projector_steps 5"),
])
@pytest.mark.parametrize("search", ["random", "optuna"])
def test_an_asha_metric_some_trials_never_report_is_refused(body, refused, search):
    from pipeline.sweep.cli import check_scheduler_metric

    sweep = parse(f"name: x\nsearch: {{type: {search}, num_samples: 10}}\n{body}")
    if refused is None:
        check_scheduler_metric(sweep, sc.trials(sweep))
    else:
        with pytest.raises(ConfigError, match=r"^scheduler\.metric: '.*' is not reported at every step by trials"
                                              rf".*{refused}.*so ASHA could not compare them; allowed: loss/"):
            check_scheduler_metric(sweep, sc.trials(sweep))


def test_an_optuna_draw_the_config_refuses_does_not_refuse_asha():
    """Such a draw fails alone when the sweep runs (tests/test_sweep.py); with ASHA the same space is
    checked on the corners the config takes, not refused for the one it refuses."""
    from pipeline.sweep.cli import check_scheduler_metric

    sweep = parse("name: x\nsearch: {type: optuna, num_samples: 4}\nscheduler: {type: asha, metric: loss/total}\n"
                  "space: {objective.method: {choice: [clip, sds]}, objective.lambda_sds: {loguniform: [1e-4, 1e-2]}}")
    check_scheduler_metric(sweep, sc.trials(sweep))


def _launch(storage: Path, stamp: str, spec_hash: str, *names: str) -> Path:
    """A launch folder as Ray Tune leaves it (`tuner.pkl`: restorable) with these files too."""
    folder = storage / f"s-{stamp}-0001-{spec_hash}"
    folder.mkdir(parents=True)
    for name in ("tuner.pkl", *names):
        (folder / name).write_bytes(b"{}")
    return folder


def test_the_sweep_stage_resumes_only_the_newest_launch_of_a_definition(tmp_path):
    """A launch killed with the stage is continued when the stage runs again; one that a later launch of
    the same definition superseded (which ran to its end) is not brought back."""
    from pipeline.sweep.driver import unfinished_launch

    sweep_file = _built_project(tmp_path)
    sweep = sc.load(sweep_file, read_yaml(tmp_path / "params.yaml"))
    storage, state = tmp_path / "ray_results", "experiment_state-2026-12-05_10-00-00.json"
    killed = _launch(storage, "20261205-093000", sweep.spec_hash(), state)
    assert unfinished_launch(sweep, str(storage)) == str(killed)
    _launch(storage, "20261205-100000", sweep.spec_hash(), state, "ended.json")
    assert unfinished_launch(sweep, str(storage)) is None
    _launch(storage, "20261205-110000", "0" * 16, state)              # another definition's
    assert unfinished_launch(sweep, str(storage)) is None


def test_the_sweep_stage_finds_its_killed_launch_by_the_definition_it_ran_with_its_gpus(tmp_path, capsys):
    """On a GPU machine the stage gives each trial a GPU (--gpus-per-trial), which is part of the launch's
    definition: the launch killed with the stage is found under that definition, not the file's. (A
    cluster's address, where nothing answers, lets the GPUs pass the up-front checks on this machine and
    stops the resumed launch before Ray starts.)"""
    from stages import sweep as stage
    from test_sweep import free_port

    sweep_file = _built_project(tmp_path)
    sweep = sc.load(sweep_file, read_yaml(tmp_path / "params.yaml"))
    sweep.resources.gpu = 1.0
    killed = _launch(tmp_path / "ray_results", "20261205-093000", sweep.spec_hash(),
                     "experiment_state-2026-12-05_10-00-00.json")
    args = [str(sweep_file), "--params", str(tmp_path / "params.yaml"), "--address", f"127.0.0.1:{free_port()}"]
    assert stage.main([*args, "--gpus-per-trial", "1"]) == 2
    out, err = capsys.readouterr()
    assert f"sweep s: resuming launch {killed}" in out and "nothing answers at" in err, (out, err)
    # A value the command refuses is one line before any sweep runs.
    assert stage.main([*args, "--gpus-per-trial", "-1"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --gpus-per-trial: -1 is out of range; allowed: a finite number >= 0"]


def test_the_sweep_stages_gpus_beyond_this_machine_are_refused_before_its_outputs_are_touched(tmp_path, capsys):
    """The stage's --gpus-per-trial is checked with every sweep file, before the earlier results go."""
    import torch

    from stages import sweep as stage

    sweep_file = _built_project(tmp_path)
    results = tmp_path / "results"
    (results / "sweeps").mkdir(parents=True)
    (results / "sweeps.json").write_text("{}")
    (results / "sweeps" / "s.json").write_text("{}")
    gpus = torch.cuda.device_count() + 1
    for value in (str(gpus), "1.5"):
        assert stage.main([str(sweep_file), "--params", str(tmp_path / "params.yaml"), "--gpus-per-trial", value]) == 2
        line = (f"error: --gpus-per-trial: {gpus} is more than this machine's {gpus - 1} GPUs, so no trial could start; "
                "ask for fewer or run on a cluster (--address)" if value == str(gpus) else
                "error: --gpus-per-trial: 1.5 is not allowed; fractions are allowed up to 1, larger quantities must "
                "be whole numbers")
        assert capsys.readouterr().err.strip().splitlines() == [line]
        assert (results / "sweeps.json").read_text() == "{}" and (results / "sweeps" / "s.json").read_text() == "{}"


def test_a_tracking_uri_mlflow_cannot_open_is_refused_by_the_dry_run(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["tracking"]["uri"] = "foo://user:secret@bar"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = _cli("sweeps/lambda.yaml", "--params", tmp_path / "params.yaml", "--dry-run")
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout
    assert proc.stderr.strip().splitlines() == [
        "error: tracking.uri: 'foo://***@bar' is not allowed; expected sqlite:///PATH, http(s)://HOST[:PORT] "
        "or a database URI (sqlite, http, https, postgresql, mysql, mssql, databricks)"], proc.stderr


def test_a_local_sweep_asking_for_more_than_this_machine_has_is_refused_by_the_dry_run(tmp_path):
    import torch

    cpus, gpus = os.cpu_count(), torch.cuda.device_count()
    for resources, refused in ((f"{{cpu: {cpus + 1}, gpu: 0}}", f"resources.cpu: {cpus + 1} is more than this "
                                f"machine's {cpus} CPUs"),
                               (f"{{cpu: 1, gpu: {gpus + 1}}}", f"resources.gpu: {gpus + 1} is more than this "
                                f"machine's {gpus} GPUs")):
        path = tmp_path / "big.yaml"
        path.write_text(f"name: big\nspace: {{train.lr: [1e-3]}}\nresources: {resources}\n")
        proc = _cli(path, "--dry-run")
        assert proc.returncode == 2 and proc.stdout == "", proc.stdout
        assert proc.stderr.strip().splitlines() == [f"error: {path}: {refused}, so no trial could start; ask for "
                                                    "fewer or run on a cluster (--address)"], proc.stderr
    path.write_text(f"name: big\nspace: {{train.lr: [1e-3]}}\nresources: {{cpu: {cpus}, gpu: {gpus}}}\n")
    assert _cli(path, "--dry-run").returncode == 0            # all of the machine is allowed


def test_an_unwritable_tracking_store_or_an_empty_experiment_is_refused_by_the_dry_run(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for section, error in (({"uri": "sqlite:///a-file/mlruns/mlflow.db"},
                            f"tracking.uri: {blocker} is a file, so {blocker}/mlruns/mlflow.db cannot be created"),
                           ({"experiment": ""}, "tracking.experiment: '' is not allowed; expected an MLflow "
                                                "experiment name")):
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        params["tracking"].update(section)
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        proc = _cli("sweeps/lambda.yaml", "--params", tmp_path / "params.yaml", "--dry-run")
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"error: {error}"], proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "params.yaml"]      # the dry run made nothing


def test_a_storage_path_that_cannot_hold_a_launch_is_refused_before_ray_starts(tmp_path):
    sweep_file = _built_project(tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = _cli(sweep_file, "--params", tmp_path / "params.yaml", "--storage", blocker / "ray", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = f"error: --storage: {blocker / 'ray'} cannot hold the launch's folder (Not a directory); give a writable folder"
    assert proc.stderr.strip() == line, proc.stderr
    proc = _cli(sweep_file, "--params", tmp_path / "params.yaml", "--storage", blocker / "ray", "--dry-run", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip() == line, proc.stderr       # the dry run checks it too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "cache", "data", "models", "params.yaml", "s.yaml"]
    # Neither given: the project's ray_results, which the file did not set, and the line says so.
    (tmp_path / "ray_results").write_text("")
    proc = _cli(sweep_file, "--params", tmp_path / "params.yaml", "--dry-run", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"error: {sweep_file}: storage_path (unset: the project's ray_results): {tmp_path / 'ray_results'} cannot "
        "hold the launch's folder (Not a directory); give a writable folder"), proc.stderr


def test_a_storage_uri_ray_cannot_reach_is_refused_and_a_file_uri_is_a_folder(tmp_path):
    """Ray Tune would fail on an unknown scheme after Ray started and the launch's run opened; a file://
    URI is a local folder, checked (and its launches locked) as one."""
    sweep_file = _built_project(tmp_path)
    proc = _cli(sweep_file, "--params", tmp_path / "params.yaml", "--storage", "foo://bucket/ray", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: --storage: foo://bucket/ray names no file system Ray Tune can store to (scheme 'foo'); allowed: a "
        "folder, or a URI of s3, gs, gcs, abfs, abfss, hdfs, viewfs"), proc.stderr
    assert not (tmp_path / "mlruns").exists()
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = _cli(sweep_file, "--params", tmp_path / "params.yaml", "--storage", f"file://{blocker}/ray", "--dry-run")
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"error: --storage: {blocker}/ray cannot hold the launch's folder (Not a directory); give a writable folder")


def test_a_launch_folder_that_cannot_be_created_or_written_is_refused_in_one_line(tmp_path):
    """Past the up-front check, which checks the storage and not a launch in it: the folder changed since,
    the system refused the mkdir, or --resume names a launch whose lock file cannot be opened (a
    read-only folder; a folder where the file would be stands in for it, as root writes anywhere)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    from pipeline.sweep.driver import launch_lock

    unwritable = tmp_path / "launch"
    (unwritable / "driver.lock").mkdir(parents=True)
    for folder, why in ((blocker / "launch", "Not a directory"), (unwritable, "Is a directory")):
        with pytest.raises(ConfigError) as info:
            with launch_lock(str(folder)):
                pass
        assert str(info.value) == (f"{folder}: the launch's folder cannot be created or written ({why}); a launch "
                                   "needs a writable folder (storage_path or --storage)")


def test_a_results_file_that_cannot_be_written_is_refused_by_the_dry_run(tmp_path):
    """Written after the last trial: a path that cannot take it would cost the whole launch."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for results, error in ((blocker / "out.json", f"{blocker} is a file, so {blocker / 'out.json'} cannot be created"),
                           (tmp_path, f"{tmp_path} is a folder; expected a file there")):
        proc = _cli("sweeps/lambda.yaml", "--results", results, "--dry-run")
        assert proc.returncode == 2 and proc.stdout == "", proc.stdout
        assert proc.stderr.strip().splitlines() == [f"error: --results: {error}"], proc.stderr
    assert _cli("sweeps/lambda.yaml", "--results", tmp_path / "new" / "out.json", "--dry-run").returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]       # the dry run made nothing


def test_the_step_metrics_an_asha_sweep_may_name_are_the_losses_the_methods_report():
    """`scheduler.metric` is checked against STEP_METRICS before anything starts: a method's loss missing
    there would refuse a valid sweep, an extra name would let one through that no trial reports."""
    from pipeline.config import METHODS, TEACHER_METHODS, ObjectiveConfig

    reported = set()
    for method in METHODS:
        for steps in (0, 1):
            teacher = method in TEACHER_METHODS
            objective = ObjectiveConfig(method=method, lambda_sds=0.5 if teacher else 0,
                                        projector_steps=steps if teacher else 0)
            reported |= {f"loss/{name}" for name in objective.reported_losses}
    assert set(sc.STEP_METRICS) == reported


def test_the_summary_lists_trials_in_their_order_past_a_thousand():
    from types import SimpleNamespace

    from pipeline.sweep.driver import summary_rows

    labels = ["t1000", "t999", "t100", "t101"]
    recorder = SimpleNamespace(trials={f"id{i}": {"label": label, "run_id": "r", "values": {}, "params": {},
                                                  "status": "failed"} for i, label in enumerate(labels)})
    assert [row["trial"] for row in summary_rows(recorder, "winoground/text")] == ["t100", "t101", "t999", "t1000"]
