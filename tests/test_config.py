"""params.yaml -> Config: profiles, deep merge, and one-line ConfigErrors naming key, value and what is allowed."""
from __future__ import annotations

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
    assert not (tmp_path / params["data"]["root"]).exists()
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
