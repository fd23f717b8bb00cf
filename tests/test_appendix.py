"""The paper's appendix tables (pipeline.appendix): rows from the results, comparisons on the same cases,
the published numbers beside on the paper profile."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import appendix, paper_tables, published
from pipeline.config import ConfigError, flatten, load, to_dict
from pipeline.comparison import outcome_parts, paired_difference
from pipeline.report import difference_cell

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
SD21 = {"name": "stable-diffusion-v2-1", "pretrained": "stabilityai/stable-diffusion-2-1"}


def outcome(correct: str) -> dict:
    return {"correct": correct, "groups": None, "cases": "fixture"}


def run(text: str, relation: str = "1100", attribution: str = "10", clevr: str = "10") -> dict:
    """A run whose metrics are the shares of its per-case outcomes (ARO overall: the mean of its two
    sets' scores, as the evaluation reports it; the sets differ in size)."""
    share = lambda c: c.count("1") / len(c)  # noqa: E731
    metrics = {"winoground/text": share(text), "aro/vg_relation": share(relation),
               "aro/vg_attribution": share(attribution), "aro/overall": (share(relation) + share(attribution)) / 2,
               "clevr/mean": share(clevr), "clevr/spatial": share(clevr)}
    return {"metrics": metrics, "outcomes": {"winoground/text": outcome(text), "aro/vg_relation": outcome(relation),
                                             "aro/vg_attribution": outcome(attribution), "clevr/mean": outcome(clevr)}}


def trial(cfg, student: str, seed: int, text: str, status: str = "finished", **objective) -> dict:
    """A results-file trial on `cfg`'s study; `params`: its whole config, dotted."""
    return {"trial": f"t{seed}", "status": status, "config": {"train.seed": seed},
            "params": {**flatten(to_dict(cfg)), "train.student": student, "train.seed": seed,
                       **{f"objective.{k}": v for k, v in objective.items()}}, **run(text)}


def cells(path: Path) -> dict[str, list[str]]:
    rows = [line.strip("|").split("|") for line in path.read_text().splitlines()[2:] if line.startswith("|")]
    return {row[0].strip(): [c.strip() for c in row[1:]] for row in rows}


def header(path: Path) -> list[str]:
    return [c.strip() for c in path.read_text().splitlines()[0].strip("|").split("|")]


def table1(cfg) -> list[paper_tables.Row]:
    baselines = {f"pretrained/{s}": run("10000000") for s in cfg.students}
    baselines["diffusion_score"] = run("11110000", relation="1110", attribution="11", clevr="11")
    sds = [trial(cfg, s, seed, "11100000", method="sds") for s in cfg.students for seed in (0, 1)]
    clip = [trial(cfg, s, seed, "11000000", method="clip", lambda_sds=0.0) for s in cfg.students for seed in (0, 1)]
    return paper_tables.rows(cfg, baselines, {}, clip + sds)


def methods(cfg, student: str) -> list[dict]:
    """A methods sweep's trials: FT with L_CLIP, NegCLIP, SDS and UNet-feature distillation, two seeds."""
    return [trial(cfg, student, 0, "11000000", method="clip", lambda_sds=0.0),
            trial(cfg, student, 1, "11100000", method="clip", lambda_sds=0.0),
            trial(cfg, student, 0, "11111111", method="negclip", lambda_sds=0.0),
            trial(cfg, student, 0, "11110000", method="unet_feature"), trial(cfg, student, 1, "11111000", method="unet_feature"),
            trial(cfg, student, 0, "11100000", method="sds"), trial(cfg, student, 1, "11100000", method="sds")]


def measured_label(table: dict, row: published.PublishedRow) -> str:
    """The measured row a published one is printed under."""
    ending = {"pretrained": " pretrained", "ft_sds": " L_SDS", "ft_unet_feature": " L_UNet-feature"}
    return next(label for label in table if label.startswith(f"{row.student} " if row.student else "diffusion score")
                and (not row.student or label.removesuffix(" (sweep methods)").endswith(ending[row.run])))


def test_a2_is_the_students_rows_of_the_sweep_that_ran_unet_feature_against_its_ft_with_l_clip(tmp_path):
    cfg = load(PARAMS, {"profile": "toy"})
    student = cfg.train.student
    rows = table1(cfg)
    sweeps = {"scope": [trial(cfg, student, 0, "10000000", method="sds")], "methods": methods(cfg, student)}
    written = appendix.write(cfg, rows, sweeps, tmp_path, n_resamples=200, seed=1)
    assert {p.stem for p in written} == {"appendix-unet-feature", "appendix-diffusion-score", "appendix-clevr"}
    table = cells(tmp_path / "appendix-unet-feature.md")
    lam = f"{cfg.objective.lambda_sds:g}"
    assert list(table) == [f"{student} pretrained", f"{student} FT with L_CLIP (sweep methods)",
                           f"{student} FT with L_CLIP + {lam} L_SDS (sweep methods)",
                           f"{student} FT with L_CLIP + {lam} L_UNet-feature (sweep methods)"]   # NegCLIP left out
    unet = table[f"{student} FT with L_CLIP + {lam} L_UNet-feature (sweep methods)"]
    assert unet[0] == f"{(4 + 5) / 16:.3f}" and unet[-4] == "2"
    parts = lambda codes: outcome_parts([{"winoground/text": outcome(c)} for c in codes])["winoground/text"]  # noqa: E731
    versus = paired_difference(parts(["11110000", "11111000"]), parts(["11000000", "11100000"]), 200, seed=1,
                               pair_seeds=True)      # the variants of one sweep ran the same seeds
    assert versus.difference == pytest.approx(9 / 16 - 5 / 16) and unet[-1] == difference_cell(versus)
    assert table[f"{student} FT with L_CLIP (sweep methods)"][-1] == "-"          # the reference itself
    assert not any(label.endswith(published.PAPER) for label in table)


def test_the_diffusion_scores_aro_is_compared_with_each_pretrained_student_on_the_same_cases(tmp_path):
    cfg = load(PARAMS, {"profile": "toy"})
    appendix.write(cfg, table1(cfg), {}, tmp_path, n_resamples=200, seed=1)
    path = tmp_path / "appendix-diffusion-score.md"
    table = cells(path)
    assert header(path)[1:7] == ["Wino text", "ARO", "ARO Rel", "ARO Attr", "COCO-Order", "Flickr-Order"]
    assert header(path)[-1] == "ARO vs diffusion score"
    assert list(table) == [f"diffusion score ({cfg.teacher.name})", *(f"{s} pretrained" for s in cfg.students)]
    score, student = table[f"diffusion score ({cfg.teacher.name})"], table[f"{cfg.train.student} pretrained"]
    assert score[1:4] == ["0.875", "0.750", "1.000"] and score[5] == "-"          # no Flickr-Order in the results
    aro = lambda rel, attr: outcome_parts([{"aro/vg_relation": outcome(rel), "aro/vg_attribution": outcome(attr)}])  # noqa: E731
    versus = paired_difference(aro("1100", "10")["aro/overall"], aro("1110", "11")["aro/overall"], 200, seed=1)
    # The difference of the two sets' means (0.5 against 0.875), not of the pooled cases (3/6 against 5/6).
    assert versus.difference == pytest.approx(0.5 - 0.875) and student[-1] == difference_cell(versus)
    assert not (tmp_path / "appendix-unet-feature.md").exists()        # no sweep ran the UNet-feature loss
    # CLEVR sets the diffusion score against train.student's FT with L_CLIP, as Table 1 does, and says so.
    clevr = cells(tmp_path / "appendix-clevr.md")[f"diffusion score ({cfg.teacher.name})"]
    assert clevr[-1].startswith("+") and clevr[-1].endswith(f" (vs {cfg.train.student})")


def test_on_the_paper_profile_the_appendix_tables_print_the_published_numbers_under_the_measured(tmp_path, capsys):
    cfg = load(PARAMS, {"profile": "paper"})
    written = appendix.write(cfg, table1(cfg), {"methods": methods(cfg, "vit-b-16")}, tmp_path, n_resamples=50)
    # Appendices G and H need a study of their own: none written, and the line says how to run it, with
    # every setting it needs (SD v2-1's name without its weights would run v1-4's under that name).
    assert {p.stem for p in written} == {"appendix-unet-feature", "appendix-diffusion-score", "appendix-clevr"}
    err = capsys.readouterr().err
    assert ("e.g. dvc exp run -S profiles.paper.teacher.name=stable-diffusion-v2-1 "
            "-S profiles.paper.teacher.pretrained=stabilityai/stable-diffusion-2-1 (README") in err
    assert "e.g. dvc exp run -S profiles.paper.data.train_set=cc3m (README" in err
    for stem, table_id in (("appendix-unet-feature", "appendix_unet_feature"), ("appendix-clevr", "appendix_clevr"),
                           ("appendix-diffusion-score", "appendix_diffusion_score")):
        path = tmp_path / f"{stem}.md"
        table, names = cells(path), header(path)
        for row in published.table(table_id).rows:
            shown = table[measured_label(table, row) + published.PAPER]
            for key, value in row.metrics.items():
                assert shown[names.index(appendix._columns(key)[0][0]) - 1] == published.number(value), (stem, row, key)
    # The pretrained students of the ARO table carry their Table-1 numbers (ViT-B/16: ARO .57).
    table = cells(tmp_path / "appendix-diffusion-score.md")
    assert table["vit-b-16 pretrained (paper)"][1] == "0.57"


def test_appendix_g_is_the_ft_sds_rows_of_a_study_with_the_sd21_teacher_beside_the_published(tmp_path):
    cfg = load(PARAMS, {"profile": "paper", "teacher": SD21})
    written = appendix.write(cfg, table1(cfg), {}, tmp_path, n_resamples=50)
    assert "appendix-sd21" in {p.stem for p in written} and "appendix-cc3m" not in {p.stem for p in written}
    table = cells(tmp_path / "appendix-sd21.md")
    for row in published.table("appendix_sd21").rows:
        label = f"{row.student} FT with L_CLIP + 0.001 L_SDS"
        assert table[label][0] == "0.375" and table[label + published.PAPER][0] == published.number(row.metrics['winoground/text'])
    assert list(table) == [f"{row.student} FT with L_CLIP + 0.001 L_SDS{paper}" for row in
                           published.table("appendix_sd21").rows for paper in ("", published.PAPER)]
    # That study's Table 1, A.2 and diffusion score are another teacher's: no published number beside them.
    paper_tables.write(cfg, table1(cfg), tmp_path, 50)
    assert not any(label.endswith(published.PAPER) for label in cells(tmp_path / "table1.md"))
    assert not any(label.endswith(published.PAPER) for label in cells(tmp_path / "appendix-diffusion-score.md"))


def test_a2_needs_a_finished_unet_feature_trial_and_rows_of_other_settings_are_told_apart(tmp_path, capsys):
    cfg = load(PARAMS, {"profile": "toy"})
    student = cfg.train.student
    failed = [trial(cfg, student, 0, "11000000", method="clip", lambda_sds=0.0),
              trial(cfg, student, 0, "11110000", status="failed", method="unet_feature")]
    assert appendix.unet_feature_rows(cfg, table1(cfg), {"methods": failed}) == []
    appendix.write(cfg, table1(cfg), {"methods": failed}, tmp_path)
    assert not (tmp_path / "appendix-unet-feature.md").exists() and "no appendix-unet-feature table" in capsys.readouterr().err
    # Two learning rates of one objective: two rows, each labelled by the key that differs.
    rates = [{**t, "params": {**t["params"], "train.lr": lr}} for lr in (1e-4, 5e-4) for t in methods(cfg, student)]
    labels = [r.label for r in paper_tables.trial_rows(cfg, rates, "methods") if r.run == "ft_clip"]
    assert labels == [f"{student} FT with L_CLIP (train.lr=0.0001)", f"{student} FT with L_CLIP (train.lr=0.0005)"]


def test_a_results_file_without_the_trials_configs_is_one_line_naming_the_sweep():
    cfg = load(PARAMS, {"profile": "toy"})
    old = [{k: v for k, v in t.items() if k != "params"} for t in methods(cfg, cfg.train.student)]
    with pytest.raises(ConfigError, match=r"^results of sweep methods: trial t0 has no params .* run the sweep again$"):
        paper_tables.trial_rows(cfg, old, "methods")
