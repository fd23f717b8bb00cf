"""params.yaml -> Config: profiles, deep merge, and one-line ConfigErrors naming key, value and what is allowed."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline.config import PROFILES, ConfigError, load

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"
PYTHON = REPO / ".venv" / "bin" / "python"


def raw_params() -> dict:
    return yaml.safe_load(PARAMS.read_text())


def write_params(folder: Path, params: dict, name: str = "params.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


# --------------------------------------------------------------------------- loading and merging


@pytest.mark.parametrize("profile", ["toy", "smoke", "paper"])
def test_params_yaml_loads_for_every_profile(profile):
    cfg = load(PARAMS, {"profile": profile})
    assert cfg.profile == profile
    assert cfg.train.student in cfg.students
    assert cfg.objective.t_min < cfg.objective.t_max


def test_profile_named_in_the_file_is_applied(tmp_path):
    params = raw_params()
    params["profile"] = "smoke"
    cfg = load(write_params(tmp_path, params))
    assert cfg.profile == "smoke"
    assert cfg.train.steps == params["profiles"]["smoke"]["train"]["steps"]


def test_toy_profile_uses_the_sections_as_they_are():
    raw = raw_params()
    cfg = load(PARAMS, {"profile": "toy"})
    assert cfg.train.steps == raw["train"]["steps"]
    assert cfg.data.n_train == raw["data"]["n_train"]
    assert cfg.teacher.vae_channels == raw["teacher"]["vae_channels"]


def test_smoke_preset_merges_over_the_sections():
    raw = raw_params()
    smoke = raw["profiles"]["smoke"]
    cfg = load(PARAMS, {"profile": "smoke"})
    # Values from the preset ...
    assert cfg.train.steps == smoke["train"]["steps"] != raw["train"]["steps"]
    assert cfg.data.n_train == smoke["data"]["n_train"] != raw["data"]["n_train"]
    assert cfg.teacher.vae_channels == smoke["teacher"]["vae_channels"]  # lists are replaced whole
    assert cfg.students["toy-vit"].embed_dim == smoke["students"]["toy-vit"]["embed_dim"]
    # ... and values the preset leaves alone come from the base sections (deep merge, not replace).
    assert "lr" not in smoke["train"] and "patch_size" not in smoke["students"]["toy-vit"]
    assert cfg.train.lr == raw["train"]["lr"]
    assert cfg.train.scope == raw["train"]["scope"]
    assert cfg.students["toy-vit"].patch_size == raw["students"]["toy-vit"]["patch_size"]
    assert cfg.teacher.prediction_type == raw["teacher"]["prediction_type"]


def test_paper_preset_merges_over_the_sections():
    raw = raw_params()
    paper = raw["profiles"]["paper"]
    cfg = load(PARAMS, {"profile": "paper"})
    assert cfg.objective.lambda_sds == paper["objective"]["lambda_sds"]
    assert cfg.train.lr == paper["train"]["lr"]
    assert cfg.teacher.source == "pretrained"
    assert cfg.train.steps == paper["train"]["steps"] != raw["train"]["steps"]
    assert "scope" not in paper["train"] and cfg.train.scope == raw["train"]["scope"]  # kept from the sections
    assert cfg.objective.t_max == raw["objective"]["t_max"]


def test_override_beats_the_files_profile(tmp_path):
    params = raw_params()
    params["profile"] = "smoke"
    cfg = load(write_params(tmp_path, params), {"profile": "toy"})
    assert cfg.profile == "toy" and cfg.train.steps == params["train"]["steps"]


# --------------------------------------------------------------------------- errors


def _set(params: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = params
    for part in parents:
        node = node[part]
    node[leaf] = value


# (dotted key to set in params.yaml, value, fragments the one-line message must contain)
BAD = {
    "unknown top-level key": ("trian", {"lr": 1}, ["trian", "unknown key", "train", "objective"]),
    "unknown nested key": ("train.lrr", 0.1, ["train.lrr", "unknown key", "lr", "steps"]),
    "unknown student key": ("students.toy-vit.widht", 3, ["students.toy-vit.widht", "unknown key", "vision_width"]),
    "string for int": ("train.steps", "ten", ["train.steps", "'ten'", "an integer"]),
    "bool for int": ("train.steps", True, ["train.steps", "True", "an integer"]),
    "float for int": ("data.n_train", 2.5, ["data.n_train", "2.5", "an integer"]),
    "string for list": ("teacher.vae_channels", "8,16", ["teacher.vae_channels", "'8,16'", "a list"]),
    "string in list": ("teacher.unet_channels", [16, "x"], ["teacher.unet_channels[1]", "'x'", "an integer"]),
    "string for bool": ("eval.subtract_unconditional", "yes", ["eval.subtract_unconditional", "'yes'", "true or false"]),
    "string for number": ("train.lr", "fast", ["train.lr", "'fast'", "a number"]),
    "infinite number": ("objective.lambda_sds", float("inf"), ["objective.lambda_sds", "inf", "a finite number"]),
    "nan": ("train.lr", float("nan"), ["train.lr", "nan", "a finite number"]),
    "integer past a float": ("train.lr", 10**400, ["train.lr", "1000000", "a finite number"]),
    "negative lr": ("train.lr", -1, ["train.lr", "-1", "out of range", "> 0"]),
    "zero steps": ("train.steps", 0, ["train.steps", "0", "out of range", "> 0"]),
    "negative lambda": ("objective.lambda_sds", -0.5, ["objective.lambda_sds", "-0.5", ">= 0"]),
    "image too small": ("data.image_size", 8, ["data.image_size", "8", ">= 16"]),
    "bad literal": ("train.scope", "everything", ["train.scope", "'everything'", "'layernorm'", "'full'", "'lora'"]),
    "bad method": ("objective.method", "dpo", ["objective.method", "'dpo'", "'clip'", "'negclip'", "'diffusion_feedback'"]),
    "lambda without a teacher loss": ("objective.method", "negclip",
                                      ["objective.lambda_sds", "0.1", "'negclip'", "no teacher loss", "allowed: 0"]),
    "projector steps past training": ("objective.projector_steps", 200, ["objective.projector_steps", "200",
                                                                         "train.steps", "< 200"]),
    "bad reduction": ("objective.reduction", "max", ["objective.reduction", "'max'", "'mean'", "'sum'"]),
    "zero lora rank": ("train.lora_rank", 0, ["train.lora_rank", "0", "> 0"]),
    "bad error": ("eval.error", "l1", ["eval.error", "'l1'", "'squared'", "'norm'"]),
    "one bootstrap resample": ("eval.bootstrap", 1, ["eval.bootstrap", "1", "0 (no intervals) or at least 2"]),
    "bad noising": ("objective.noising", "some", ["objective.noising", "'some'", "'noise'", "'none'"]),
    "bad profile": ("profile", "huge", ["profile", "'huge'", "smoke", "toy", "paper"]),
    "unknown profile preset": ("profiles.huge", {"train": {"steps": 1}}, ["profiles.huge", "unknown profile", "smoke"]),
    "student not defined": ("train.student", "vit-h", ["train.student", "'vit-h'", "toy-vit"]),
    "t_min == t_max": ("objective.t_max", 20, ["objective.t_min", "20", "objective.t_max"]),
    "t_min > t_max": ("objective.t_min", 990, ["objective.t_min", "990", "objective.t_max", "980"]),
    "t_max past the schedule": ("objective.t_max", 1000, ["objective.t_max", "1000", "out of range", "<= 999"]),
    "scoring t past the schedule": ("eval.diffusion_t_max", 5000, ["eval.diffusion_t_max", "5000", "<= 999"]),
    "section not a mapping": ("train", 3, ["train", "3", "a mapping"]),
    "no students": ("students", {}, ["students", "non-empty mapping"]),
    "sweeps not a list": ("sweeps", "sweeps/lambda.yaml", ["sweeps", "'sweeps/lambda.yaml'", "a list"]),
    "sweep not a yaml file": ("sweeps", ["sweeps/lambda.txt"], ["sweeps[0]", "'sweeps/lambda.txt'", ".yaml"]),
    "bad device": ("compute.device", "gpu0", ["compute.device", "'gpu0'", "auto", "cpu", "cuda:N"]),
    "device index torch refuses": ("compute.device", "cuda:01", ["compute.device", "'cuda:01'", "cuda:N"]),
    "device index torch wraps": ("compute.device", "cuda:255", ["compute.device", "'cuda:255'", "cuda:N"]),
    "image size the teacher halves unevenly": ("data.image_size", 36, ["data.image_size", "36", "multiple of 8"]),
    "toy order set of no case": ("data.n_aro", 1, ["data.n_aro", "1", ">= 2"]),
    "bad precision": ("compute.precision", "fp8", ["compute.precision", "'fp8'", "'bf16'", "'fp32'"]),
    "bad compile mode": ("compute.compile", "fastest", ["compute.compile", "'fastest'", "'off'", "'max-autotune'"]),
    "channels_last word": ("compute.channels_last", "on", ["compute.channels_last", "'on'", "True", "False"]),
    "heads not dividing channels": ("teacher.unet_heads", 3, ["teacher.unet_heads", "3", "teacher.unet_channels", "[32, 64]"]),
    "zero heads": ("teacher.unet_heads", 0, ["teacher.unet_heads", "0", "out of range", "> 0"]),
    "channels off GroupNorm": ("teacher.unet_channels", [32, 48], ["teacher.unet_channels", "[32, 48]", "multiple of 32"]),
    "empty channels": ("teacher.vae_channels", [], ["teacher.vae_channels", "[]", "non-empty"]),
    "text heads": ("teacher.text_heads", 3, ["teacher.text_heads", "3", "teacher.text_width", "64"]),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_value_raises_one_line_naming_key_value_and_allowed(tmp_path, case):
    key, value, fragments = BAD[case]
    params = raw_params()
    _set(params, key, value)
    path = write_params(tmp_path, params)
    with pytest.raises(ConfigError) as info:
        load(path)
    message = str(info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_of_several_problems_the_first_in_the_file_is_reported_unknown_keys_first(tmp_path):
    """The message does not depend on the order of the fields in pipeline/config.py: `steps` is
    written before `lr` here (the dataclass declares lr first), and an unknown key goes first."""
    params = raw_params()
    params["train"] = {"steps": "many", **{k: v for k, v in params["train"].items() if k != "steps"}, "lr": -1}
    with pytest.raises(ConfigError, match=r"^train\.steps: 'many' is not allowed; expected an integer$"):
        load(write_params(tmp_path, params))
    params["train"]["zz"] = 1
    with pytest.raises(ConfigError, match=r"^train\.zz: unknown key; allowed keys: batch_size, "):
        load(write_params(tmp_path, params))
    params["data"]["n_train"] = 0               # data comes before train in the file
    with pytest.raises(ConfigError, match=r"^data\.n_train: 0 is out of range; allowed: > 0$"):
        load(write_params(tmp_path, params))


def test_error_in_the_selected_preset_is_named_by_its_section_key(tmp_path):
    params = raw_params()
    params["profile"] = "smoke"
    params["profiles"]["smoke"]["train"]["steps"] = "many"
    with pytest.raises(ConfigError, match=r"^profiles\.smoke\.train\.steps: 'many' is not allowed; expected an integer$"):
        load(write_params(tmp_path, params))


def test_bad_profile_override_is_rejected():
    with pytest.raises(ConfigError, match="profile: 'huge'"):
        load(PARAMS, {"profile": "huge"})
    assert set(PROFILES) == {"toy", "smoke", "paper"}


def test_invalid_yaml_is_one_line_naming_file_and_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("profile: toy\ntrain:\n  steps: [1, 2\n  lr: 0.1\n")
    with pytest.raises(ConfigError) as info:
        load(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "not valid YAML" in message and "line" in message


def test_numbers_read_as_yaml_1_2_and_a_key_given_twice_is_an_error(tmp_path):
    """`1e-3` is a number (YAML 1.1 would read a string), as DVC and the sweep files read it; a
    key written twice is refused rather than the last one silently winning."""
    text = PARAMS.read_text()
    path = tmp_path / "params.yaml"
    path.write_text(text.replace("  lambda_sds: 0.1\n", "  lambda_sds: 1e-3\n", 1))
    assert load(path).objective.lambda_sds == 0.001
    path.write_text(text.replace("  lambda_sds: 0.1\n", "  lambda_sds: 0.1\n  lambda_sds: 0.2\n", 1))
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value).startswith(f"{path}: line ") and "duplicate key 'lambda_sds'" in str(info.value)


# Scalars YAML 1.1 and 1.2 read differently, and the edges of numbers.
SCALARS = ["010", "08", "00", "0", "-0", "+7", "-3", "0o17", "+0o7", "0x1F", "-0x1F", "+0x1F", "0X1f", "0b101", "-0b1",
           "0B1", "1_000", "0_1", "_1", "1:30", "yes", "no", "off", "On", "y", "TRUE", "True", "tRue", "false", "1e3",
           "1e-4", "1e+3", "1.5", ".5", "-.5", "1.", "1_0.5", ".inf", "-.inf", ".nan", "12e", "0xG", "~", "null", "",
           "2001-12-14"]


def test_every_scalar_reads_as_dvcs_yaml_reader_reads_it():
    """DVC reads params.yaml with ruamel (YAML 1.2): a value must mean the same to both, or `dvc exp run -S`
    and `dvc params diff` would speak of another value than the stages run with."""
    import io
    import math

    from ruamel.yaml import YAML

    from pipeline.config import parse_yaml

    ruamel = YAML(typ="safe")
    for text in SCALARS:
        ours, dvcs = parse_yaml(f"a: {text}")["a"], ruamel.load(io.StringIO(f"a: {text}"))["a"]
        same = (isinstance(ours, float) and math.isnan(ours) and math.isnan(dvcs)) or (ours == dvcs and
                                                                                     type(ours) is type(dvcs))
        assert same, (text, ours, dvcs)


def test_scalars_read_as_yaml_1_2s_core_schema_as_dvc_reads_them(tmp_path):
    """YAML 1.1 read `off` as false (refusing the documented `compile: off` with a message that lists
    off), `yes` as true and `010` as octal 8: a seed other than the one written."""
    from pipeline.config import parse_yaml

    assert parse_yaml("a: off\nb: yes\nc: 010\nd: 1:30\ne: true\nf: FALSE\ng: 0x1F\nh: 0o17\ni: -3\nj: 1e-4") == {
        "a": "off", "b": "yes", "c": 10, "d": "1:30", "e": True, "f": False, "g": 31, "h": 15, "i": -3, "j": 1e-4}
    text = PARAMS.read_text()
    path = tmp_path / "params.yaml"
    path.write_text(text.replace("  compile: auto", "  compile: off", 1).replace("  seed: 0\n", "  seed: 010\n", 1))
    cfg = load(path)
    assert (cfg.compute.compile, cfg.data.seed) == ("off", 10)
    path.write_text(text.replace("  subtract_unconditional: false", "  subtract_unconditional: yes", 1))
    with pytest.raises(ConfigError, match="eval.subtract_unconditional: 'yes'"):
        load(path)


def test_missing_file_is_one_line(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value) == f"{path}: file not found"


def test_top_level_not_a_mapping(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load(path)


# --------------------------------------------------------------------------- command line


def test_stage_cli_bad_params_exits_2_with_one_error_line_and_writes_nothing(tmp_path):
    params = raw_params()
    params["train"]["lrr"] = 0.1
    path = write_params(tmp_path, params)
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = subprocess.run([str(PYTHON), "-m", "stages.data", "--params", str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:") and "train.lrr" in lines[0] and "unknown key" in lines[0]
    assert proc.stdout == ""
    assert not (tmp_path / "data").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# --------------------------------------------------------------------------- presets


def test_typo_in_an_unselected_preset_is_reported(tmp_path):
    params = raw_params()
    params["profile"] = "toy"
    params["profiles"]["paper"]["train"]["lrr"] = 0.1
    try:
        load(write_params(tmp_path, params))
    except ConfigError as err:
        assert "profiles.paper.train.lrr" in str(err)
    else:
        raise AssertionError("profiles.paper.train.lrr was accepted silently under profile: toy")


def test_preset_that_is_not_a_mapping_is_a_config_error(tmp_path):
    params = raw_params()
    params["profile"] = "smoke"
    params["profiles"]["smoke"] = 3
    with pytest.raises(ConfigError, match="profiles.smoke"):
        load(write_params(tmp_path, params))


def test_feedback_timesteps_other_than_one_need_diffusion_feedback_with_a_teacher_loss(tmp_path):
    """Otherwise no timestep is drawn for the feedback, and the run would log a count it never ran."""
    params = raw_params()
    params["objective"].update(method="sds", lambda_sds=0.1, feedback_timesteps=2)
    with pytest.raises(ConfigError, match=r"^objective\.feedback_timesteps: 2 with objective\.method 'sds' and "
                                          r"objective\.lambda_sds 0\.1, which run no diffusion feedback; allowed: 1, or "
                                          r"more with objective\.lambda_sds > 0 and method diffusion_feedback$"):
        load(write_params(tmp_path, params))
    params["objective"].update(method="diffusion_feedback", lambda_sds=0)
    with pytest.raises(ConfigError, match=r"^objective\.feedback_timesteps: 2 with objective\.method "
                                          r"'diffusion_feedback' and objective\.lambda_sds 0, which run no "):
        load(write_params(tmp_path, params))
    params["objective"].update(lambda_sds=1)
    assert load(write_params(tmp_path, params)).objective.feedback_timesteps == 2
    params["objective"].update(feedback_timesteps=0)
    with pytest.raises(ConfigError, match=r"^objective\.feedback_timesteps: "):
        load(write_params(tmp_path, params))


def test_contrastive_feedback_needs_its_negatives_among_the_batchs_other_images(tmp_path):
    params = raw_params()
    params["objective"].update(method="contrastive_feedback", lambda_sds=1, contrastive_negatives=32)
    params["train"].update(batch_size=32)
    with pytest.raises(ConfigError, match=r"^objective\.contrastive_negatives: 32 is not allowed with train\.batch_size "
                                          r"32 \(an image's negatives are the batch's other images\); allowed: < 32$"):
        load(write_params(tmp_path, params))
    params["objective"].update(contrastive_negatives=0)
    params["train"].update(batch_size=1)
    with pytest.raises(ConfigError, match=r"^train\.batch_size: 1 leaves objective\.method 'contrastive_feedback' no "
                                          r"negatives"):
        load(write_params(tmp_path, params))
    params["train"].update(batch_size=2)
    assert load(write_params(tmp_path, params)).objective.contrastive_negatives == 0
    # Another method ignores the key, as it ignores every key of a method it is not.
    params["objective"].update(method="sds", contrastive_negatives=5)
    assert load(write_params(tmp_path, params)).train.batch_size == 2
    params["objective"].update(contrastive_temperature=0)
    with pytest.raises(ConfigError, match=r"^objective\.contrastive_temperature: "):
        load(write_params(tmp_path, params))


def test_projector_steps_need_a_teacher_loss_and_clip_weight_zero_needs_one_too(tmp_path):
    params = raw_params()
    params["objective"].update(lambda_sds=0, projector_steps=10)
    with pytest.raises(ConfigError, match=r"^objective\.projector_steps: 10 needs a teacher loss"):
        load(write_params(tmp_path, params))
    params["objective"].update(projector_steps=0, clip_weight=0)
    with pytest.raises(ConfigError, match=r"^objective\.clip_weight: 0 leaves no loss"):
        load(write_params(tmp_path, params))
    params["objective"].update(lambda_sds=0.1)
    assert load(write_params(tmp_path, params)).objective.clip_weight == 0


def test_the_mlp_projector_is_only_a_feedback_projector(tmp_path):
    params = raw_params()
    params["objective"].update(method="sds", lambda_sds=0.1, projector="mlp")
    line = ("objective.projector: 'mlp' with objective.method 'sds' and objective.lambda_sds 0.1, which train no "
            "feedback projector; allowed: 'linear', or 'mlp' with objective.lambda_sds > 0 and a method among "
            "diffusion_feedback, contrastive_feedback")
    with pytest.raises(ConfigError) as info:
        load(write_params(tmp_path, params))
    assert str(info.value) == line
    params["objective"].update(method="diffusion_feedback", lambda_sds=0)
    with pytest.raises(ConfigError, match=r"^objective\.projector: 'mlp' with objective\.method 'diffusion_feedback' "
                                          r"and objective\.lambda_sds 0, "):
        load(write_params(tmp_path, params))
    params["objective"].update(method="contrastive_feedback", lambda_sds=1)
    assert load(write_params(tmp_path, params)).objective.projector == "mlp"
    params["objective"].update(projector="MLP")
    with pytest.raises(ConfigError,
                       match=r"^objective\.projector: 'MLP' is not allowed; expected one of 'linear', 'mlp'$"):
        load(write_params(tmp_path, params))


# --------------------------------------------------------------------------- what a params file must hold

ALL_SECTIONS = "data, teacher, students, cache, objective, train, eval, tracking, compute"


@pytest.mark.parametrize("text", ["", "# only a comment\n", "{}\n"], ids=["empty", "comment only", "empty mapping"])
def test_a_params_file_with_no_sections_is_refused(tmp_path, text):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value) == (f"{path}: empty; a params file holds the sections {ALL_SECTIONS} "
                               "(and a preset under `profiles` for each profile but toy)")


@pytest.mark.parametrize("text", ["[]\n", "false\n", "0\n"])
def test_a_params_file_whose_top_level_is_a_falsy_scalar_or_list_is_not_read_as_empty(tmp_path, text):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value) == f"{path}: the top level must be a mapping"


@pytest.mark.parametrize("section", ALL_SECTIONS.split(", "))
def test_a_missing_section_is_refused_by_name(tmp_path, section):
    """Left out, `train` would train at the dataclass's lr (5e-5) instead of the file's."""
    params = raw_params()
    del params[section]
    path = write_params(tmp_path, params)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value) == f"{section}: missing; {path} must hold every section the stages read: {ALL_SECTIONS}"


def test_a_misspelt_section_is_named_as_unknown_and_a_key_left_out_of_a_section_takes_its_default(tmp_path):
    params = raw_params()
    params["trian"] = params.pop("train")
    with pytest.raises(ConfigError, match=r"^trian: unknown key; allowed keys: cache, compute, data, "):
        load(write_params(tmp_path, params))
    params["train"] = params.pop("trian")
    del params["train"]["weight_decay"]
    assert load(write_params(tmp_path, params)).train.weight_decay == 0.0


@pytest.mark.parametrize("profile", ["smoke", "paper"])
def test_a_profile_without_its_preset_is_refused(tmp_path, profile):
    params = raw_params()
    del params["profiles"][profile]
    path = write_params(tmp_path, params)
    message = (f"profiles.{profile}: missing; profile {profile!r} merges its preset over the sections "
               f"(only toy runs them alone); add it under `profiles` in {path}")
    with pytest.raises(ConfigError) as info:
        load(path, {"profile": profile})
    assert str(info.value) == message
    params["profile"] = profile
    for presets in ("absent", None):                  # no `profiles:` at all, or `profiles:` left blank
        if presets == "absent":
            del params["profiles"]
        else:
            params["profiles"] = None
        with pytest.raises(ConfigError) as info:
            load(write_params(tmp_path, params))
        assert str(info.value) == message
    params["profile"] = "toy"                          # the toy world needs no preset
    assert load(write_params(tmp_path, params)).profile == "toy"


@pytest.mark.parametrize("key, value", [("profile", "paper"), ("sweeps", ["sweeps/lambda.yaml"]),
                                        ("compute", {"precision": "fp16"}), ("profiles", {})])
def test_a_preset_may_set_only_what_dvc_tracks_per_profile(tmp_path, key, value):
    """A preset's `profile` relabelled the smoke run "paper" with the smoke values; its `sweeps` and
    `compute` ran without DVC seeing them (dvc.yaml reads them at the top level alone)."""
    params = raw_params()
    params["profiles"]["smoke"][key] = value
    with pytest.raises(ConfigError) as info:
        load(write_params(tmp_path, params))
    assert str(info.value).startswith(f"profiles.smoke.{key}: a preset cannot set it (dvc.yaml tracks it at the "
                                      "top level only)")


def test_the_sections_a_preset_may_set_are_those_dvc_reads_from_the_active_preset():
    from pipeline.config import PRESET_SECTIONS

    tracked = set(re.findall(r"profiles\.\$\{profile\}\.(\w+)", (REPO / "dvc.yaml").read_text()))
    assert tracked | {"tracking"} == set(PRESET_SECTIONS)


def test_a_preset_may_not_null_a_whole_section(tmp_path):
    params = raw_params()
    params["profiles"]["smoke"]["tracking"] = None
    with pytest.raises(ConfigError) as info:
        load(write_params(tmp_path, params))
    assert str(info.value) == ("profiles.smoke.tracking: null would remove the whole section; "
                               "allowed: a mapping of the keys the preset changes ({} for none)")


# (dotted key, value refused, the exact message, the largest value allowed)
BOUNDS = {
    "warm-up longer than training": ("train.warmup_steps", 201, "train.warmup_steps: 201 is longer than train.steps "
                                     "(200), so train.lr is never reached; allowed: <= 200", 200),
    "training steps": ("train.steps", 10**12, "train.steps: 1000000000000 is out of range; allowed: <= 1e+09", 10**9),
    "teacher steps": ("teacher.unet_steps", 10**9 + 1, "teacher.unet_steps: 1000000001 is out of range; "
                      "allowed: <= 1e+09", 10**9),
    "VAE steps": ("teacher.vae_steps", 10**12, "teacher.vae_steps: 1000000000000 is out of range; allowed: <= 1e+09",
                  10**9),
    "pre-training steps": ("students.toy-vit.pretrain_steps", 10**12, "students.toy-vit.pretrain_steps: "
                           "1000000000000 is out of range; allowed: <= 1e+09", 10**9),
    "lambda": ("objective.lambda_sds", 1e30, "objective.lambda_sds: 1e+30 is out of range; allowed: <= 1e+06", 1e6),
    "clip weight": ("objective.clip_weight", 1e7, "objective.clip_weight: 10000000.0 is out of range; "
                    "allowed: <= 1e+06", 1e6),
    "train threads": ("train.threads", 1025, "train.threads: 1025 is out of range; allowed: <= 1024", 1024),
    "teacher threads": ("teacher.threads", 10**9, "teacher.threads: 1000000000 is out of range; allowed: <= 1024",
                        1024),
    "student threads": ("students.toy-vit.threads", 1025, "students.toy-vit.threads: 1025 is out of range; "
                        "allowed: <= 1024", 1024),
    "workers": ("train.workers", 1025, "train.workers: 1025 is out of range; allowed: <= 1024", 1024),
    # numpy's global seeding takes 32 bits: 2^70 overflowed once the teacher had trained.
    "train seed": ("train.seed", 2**70, "train.seed: 1180591620717411303424 is out of range; allowed: <= 4294967295",
                   2**32 - 1),
    "teacher seed": ("teacher.seed", 2**32, "teacher.seed: 4294967296 is out of range; allowed: <= 4294967295",
                     2**32 - 1),
}


@pytest.mark.parametrize("key, value, message", [
    ("data.seed", -1, "data.seed: -1 is out of range; allowed: >= 0"),
    ("students.toy-vit.vision_heads", 5, "students.toy-vit.vision_heads: 5 does not divide "
                                         "students.toy-vit.vision_width (96)"),
    ("students.toy-vit.text_heads", 3, "students.toy-vit.text_heads: 3 does not divide students.toy-vit.text_width (64)"),
    ("students.toy-vit-s.patch_size", 64, "students.toy-vit-s.patch_size: 64 is not allowed; it must divide "
                                          "data.image_size (32), so that every pixel is in a patch"),
    ("students.toy-vit.patch_size", 5, "students.toy-vit.patch_size: 5 is not allowed; it must divide "
                                       "data.image_size (32), so that every pixel is in a patch"),
])
def test_a_toy_students_shape_and_a_seed_are_checked_before_anything_is_built(tmp_path, key, value, message):
    """open_clip refused the shapes only when the students were built, after the teacher had trained
    (an AssertionError or a RuntimeError, exit 1); a patch that does not divide the image would drop
    pixels; a seed past 2^32 failed in numpy."""
    params = raw_params()
    _set(params, key, value)
    with pytest.raises(ConfigError) as info:
        load(write_params(tmp_path, params))
    assert str(info.value) == message


@pytest.mark.parametrize("case", list(BOUNDS), ids=list(BOUNDS))
def test_a_value_that_cannot_mean_anything_is_refused_and_the_bound_itself_is_allowed(tmp_path, case):
    key, value, message, largest = BOUNDS[case]
    params = raw_params()
    _set(params, key, value)
    with pytest.raises(ConfigError) as info:
        load(write_params(tmp_path, params))
    assert str(info.value) == message
    _set(params, key, largest)
    cfg = load(write_params(tmp_path, params))
    node = cfg
    for part in key.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    assert node == largest


def test_a_preset_that_shortens_training_below_the_sections_warm_up_is_refused(tmp_path):
    """The smoke preset sets its own warm-up: a preset (or a sweep) that shortens train.steps must."""
    params = raw_params()
    del params["profiles"]["smoke"]["train"]["warmup_steps"]
    with pytest.raises(ConfigError) as info:
        load(write_params(tmp_path, params))
    assert str(info.value) == ("profiles.smoke.train.warmup_steps: 10 is longer than train.steps (3), so train.lr is "
                               "never reached; allowed: <= 3")


def test_fp16_on_the_cpu_is_allowed_because_torch_runs_it():
    """Not refused: torch's CPU autocast computes in float16 (older releases fell back to fp32 with
    a warning, and a config refusing fp16 there would then have been right)."""
    import torch

    with torch.autocast("cpu", dtype=torch.float16):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float16
    cfg = load(PARAMS, {"compute": {"device": "cpu", "precision": "fp16"}})
    assert (cfg.compute.device, cfg.compute.precision) == ("cpu", "fp16")


@pytest.mark.parametrize("command", [["-m", "stages.data"],
                                     ["-m", "pipeline.sweep", "sweeps/lambda.yaml", "--dry-run"]],
                         ids=["data stage", "sweep dry run"])
def test_a_params_file_missing_its_sections_stops_a_command_with_one_line_and_exit_2(tmp_path, command):
    empty = tmp_path / "params.yaml"
    empty.write_text("# every section forgotten\n")
    no_train = raw_params()
    del no_train["train"]
    for path in (empty, write_params(tmp_path, no_train, "no-train.yaml")):
        proc = subprocess.run([str(PYTHON), *command, "--params", str(path)], cwd=REPO, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 2 and proc.stdout == "", proc.stdout + proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
        if path != empty:
            assert lines[0].startswith("error: train: missing; "), lines[0]
        elif command[1] == "stages.data":      # the sweep command checks the top level before config does
            assert lines[0] == (f"error: {path}: empty; a params file holds the sections {ALL_SECTIONS} "
                                "(and a preset under `profiles` for each profile but toy)")
    assert not (tmp_path / "data").exists()


def test_the_stage_folders_are_the_outs_dvc_yaml_names_and_no_key_moves_them(tmp_path):
    """data/, models/ and cache/ are fixed: a `data.root` or `cache.root` key (an earlier version's)
    moved a stage's output away from what dvc.yaml tracks, and `dvc repro` failed ("output 'data' does
    not exist"). Such a key is refused in one line."""
    from pipeline.config import CACHE_DIR, DATA_DIR, MODELS_DIR
    from stages import data as stage

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    outs = {name: [next(iter(out)) if isinstance(out, dict) else out for out in stages[name]["outs"]]
            for name in ("data", "models", "cache")}
    assert outs == {"data": [DATA_DIR], "models": [MODELS_DIR], "cache": [CACHE_DIR]}
    for section, folder in (("data", "data/built"), ("cache", "cache/built")):
        params = raw_params()
        params[section]["root"] = folder
        path = write_params(tmp_path, params)
        with pytest.raises(ConfigError, match=rf"^{section}\.root: unknown key"):
            load(path)
        assert stage.main(["--params", str(path), "--profile", "smoke"]) == 2
        assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_the_data_stage_replaces_only_a_data_folder_it_built(tmp_path, kind, capsys):
    """The data stage replaces data/ whole: a data/ of the user's own (datasets unpacked there) or a
    file of that name is refused, untouched; an empty folder or an earlier build is replaced."""
    from stages import data as stage

    if kind == "folder":
        (tmp_path / "data" / "coco").mkdir(parents=True)
        (tmp_path / "data" / "coco" / "captions.json").write_text("kept")
    else:
        (tmp_path / "data").write_text("kept")
    path = write_params(tmp_path, raw_params())
    capsys.readouterr()
    assert stage.main(["--params", str(path), "--profile", "smoke"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line == (f"error: {tmp_path / 'data'}: not a folder the data stage built (no index.json), and the stage "
                    "would replace it whole; move it away (keep datasets elsewhere, e.g. datasets/), or empty it")
    kept = tmp_path / "data" / "coco" / "captions.json" if kind == "folder" else tmp_path / "data"
    assert kept.read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "params.yaml"]

    kept.unlink()
    if kind == "folder":
        kept.parent.rmdir()              # data/ is left empty
    for _ in range(2):                   # an empty folder (or none), then the build it now holds
        assert stage.main(["--params", str(path), "--profile", "smoke"]) == 0
        assert (tmp_path / "data" / "index.json").is_file()
