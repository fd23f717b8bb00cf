"""The paper's tables (pipeline.paper_tables): seeds aggregated, every student, the published numbers beside."""
from __future__ import annotations

from dataclasses import replace

from pathlib import Path

import numpy as np
import pytest

from pipeline import paper_tables, published
from pipeline.config import flatten, load, to_dict
from pipeline.comparison import outcome_parts, paired_difference, seed_task_interval
from pipeline.report import COLUMNS, difference_cell

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
TEXT = "winoground/text"
COLUMN = {key: i for i, (_, key) in enumerate(COLUMNS)}


def run(text: float, correct: str, **metrics) -> dict:
    return {"metrics": {TEXT: text, **metrics}, "outcomes": {TEXT: {"correct": correct, "groups": None, "cases": "fixture"}}}


# sweeps/table1.yaml's variants: the objective keys each sets (L_SDS at the profile's lambda).
VARIANTS = {"FT with L_CLIP": {"objective.method": "clip", "objective.lambda_sds": 0.0},
            "FT with L_CLIP + L_SDS": {"objective.method": "sds"}}


def trial(cfg, student: str, variant: str, seed: int, text: float, correct: str, status: str = "finished") -> dict:
    """A results-file trial of sweeps/table1.yaml on `cfg`'s study; `params`: its whole config, dotted."""
    return {"config": {"train.student": student, "variant": variant, "train.seed": seed}, "status": status,
            "params": {**flatten(to_dict(cfg)), "train.student": student, "train.seed": seed, **VARIANTS[variant]},
            **run(text, correct, **{"aro/overall": 0.5 + seed / 10})}


def cells(path: Path) -> dict[str, list[str]]:
    """A Markdown table's rows by their label."""
    rows = [line.strip("|").split("|") for line in path.read_text().splitlines()[2:] if line.startswith("|")]
    return {row[0].strip(): [c.strip() for c in row[1:]] for row in rows}


def header(path: Path) -> list[str]:
    return [c.strip() for c in path.read_text().splitlines()[0].strip("|").split("|")]


@pytest.fixture
def toy():
    cfg = load(PARAMS, {"profile": "toy"})
    students = list(cfg.students)[:2]
    baselines = {f"pretrained/{s}": run(0.25, "10000000") for s in cfg.students}
    baselines["diffusion_score"] = run(0.5, "11110000")
    trials = [trial(cfg, students[0], "FT with L_CLIP", 0, 0.250, "11000000"),
              trial(cfg, students[0], "FT with L_CLIP", 1, 0.375, "11100000"),
              trial(cfg, students[0], "FT with L_CLIP + L_SDS", 1, 0.750, "11111100"),
              trial(cfg, students[0], "FT with L_CLIP + L_SDS", 0, 0.500, "11110000"),
              trial(cfg, students[0], "FT with L_CLIP + L_SDS", 2, 0.9, "11111111", status="failed"),
              trial(cfg, students[1], "FT with L_CLIP", 0, 0.125, "10000000")]
    return cfg, students, baselines, trials


def test_rows_pool_each_students_seeds_in_the_tables_order(toy):
    cfg, (first, second), baselines, trials = toy
    rows = paper_tables.rows(cfg, baselines, {}, trials)
    labels = [r.label for r in rows]
    lam = f"{cfg.objective.lambda_sds:g}"
    assert labels[:4] == [f"{first} pretrained", f"{first} FT with L_CLIP", f"{first} FT with L_CLIP + {lam} L_SDS",
                          f"{second} pretrained"]
    assert labels[-1] == f"diffusion score ({cfg.teacher.name})"
    sds = rows[2]
    assert sds.run == "ft_sds" and len(sds.runs) == 2              # the failed seed is left out
    assert [r["metrics"]["aro/overall"] for r in sds.runs] == [0.5, 0.6]   # by seed
    assert sds.metrics[TEXT] == pytest.approx(0.625) and sds.metrics["aro/overall"] == pytest.approx(0.55)
    # A student with no finished FT-with-L_CLIP + L_SDS seed has no such row.
    assert [r.run for r in rows if r.student == second] == ["pretrained", "ft_clip"]


def test_the_table_carries_seed_count_spread_interval_and_the_paired_comparison(toy, tmp_path):
    cfg, (first, _), baselines, trials = toy
    rows = paper_tables.rows(cfg, baselines, {}, trials)
    written = paper_tables.write(cfg, rows, tmp_path, n_resamples=200, seed=3)
    assert sorted(p.name for p in written) == ["table1-intervals.csv", "table1-intervals.md", "table1-intervals.tex",
                                               "table1.csv", "table1.md", "table1.tex"]
    table, names = cells(tmp_path / "table1.md"), header(tmp_path / "table1.md")
    assert names[-4:] == ["seeds", "Wino text seed sd", "Wino text 95% CI", "Wino text vs FT with L_CLIP"]
    sds = table[f"{first} FT with L_CLIP + {cfg.objective.lambda_sds:g} L_SDS"]
    assert sds[COLUMN[TEXT]] == "0.625" and sds[-4] == "2"
    assert sds[-3] == f"{np.std([0.75, 0.5], ddof=1):.3f}" == "0.177"
    parts = {label: outcome_parts([{TEXT: {"correct": c, "groups": None, "cases": "fixture"}} for c in correct])[TEXT]
             for label, correct in (("sds", ["11110000", "11111100"]), ("clip", ["11000000", "11100000"]))}
    _, low, high = seed_task_interval(parts["sds"], 200, seed=3)
    assert sds[-2] == f"[{low:.3f}, {high:.3f}]"
    versus = paired_difference(parts["sds"], parts["clip"], 200, seed=3, pair_seeds=True)   # the same seeds
    assert versus.difference == pytest.approx(0.625 - 0.3125) and sds[-1] == difference_cell(versus)
    assert table[f"{first} FT with L_CLIP"][-1] == "-"             # the reference itself
    # One run: no seed spread; the diffusion score is compared with train.student's FT with L_CLIP.
    assert table[f"{first} pretrained"][-4:-2] == ["1", "-"]
    assert table[f"diffusion score ({cfg.teacher.name})"][-1].startswith("+0.188 [")
    assert table[f"diffusion score ({cfg.teacher.name})"][-1].endswith(f" (vs {cfg.train.student})")
    assert not any(label.endswith("(paper)") for label in table)    # the toy profile has no published numbers


def test_beside_the_table_every_headline_metric_has_its_interval_and_its_paired_comparison(toy, tmp_path):
    """Table 1 gives the text score's spread, interval and comparison only; `table1-intervals` gives
    them for every headline metric of every row, each row against its student's FT with L_CLIP."""
    cfg, (first, _), baselines, trials = toy
    for entry in [*baselines.values(), *trials]:          # a second headline metric: zero-shot, one set
        flipped = "".join("1" if c == "0" else "0" for c in entry["outcomes"][TEXT]["correct"])
        entry["outcomes"]["zeroshot/set"] = {"correct": flipped, "groups": None, "cases": "fixture"}
    rows = paper_tables.rows(cfg, baselines, {}, trials)
    paper_tables.write(cfg, rows, tmp_path, n_resamples=200, seed=3)
    text = (tmp_path / "table1-intervals.md").read_text()
    assert "## Against its student's FT with L_CLIP (the diffusion score: " in text
    scores, versus = [section.split("\n\n")[2] for section in text.split("## ")[1:3]]
    score_rows = {line.split("|")[1].strip(): line for line in scores.splitlines()[2:]}
    versus_rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
                   for line in versus.splitlines()[2:]}
    assert scores.splitlines()[0] == "| run | seeds | Wino text | Zero-shot |"
    sds, clip = f"{first} FT with L_CLIP + {cfg.objective.lambda_sds:g} L_SDS", f"{first} FT with L_CLIP"
    assert clip in score_rows and clip not in versus_rows                   # the reference itself
    assert score_rows[sds].split("|")[2].strip() == "2"
    # The text score's comparison is the table's; the zero-shot mean's is made alike, paired by seed.
    assert versus_rows[sds][1] == cells(tmp_path / "table1.md")[sds][-1]
    parts = {row.label: outcome_parts([r["outcomes"] for r in row.runs])["zeroshot/mean"]
             for row in rows if row.label in (sds, clip)}
    versus = paired_difference(parts[sds], parts[clip], 200, seed=3, pair_seeds=True)
    assert versus.difference == pytest.approx(0.3125 - 0.625) and versus_rows[sds][2] == difference_cell(versus)


def test_without_the_table1_sweep_the_stages_runs_of_train_student_fill_the_table(toy):
    cfg, _, baselines, _ = toy
    stage_runs = {"clip": run(0.3, "11100000"), "sds": run(0.4, "11110000")}
    rows = paper_tables.rows(cfg, baselines, stage_runs, None)
    student = cfg.train.student
    assert [(r.student, r.run) for r in rows if r.run != "pretrained"] == [
        (student, "ft_clip"), (student, "ft_sds"), (None, "diffusion_score")]
    assert rows[2].label == f"{student} FT with L_CLIP + {cfg.objective.lambda_sds:g} L_SDS"
    # params.yaml's objective without a teacher loss: the train_sds stage's run is L_CLIP's too, apart.
    alike = replace(cfg, objective=replace(cfg.objective, lambda_sds=0.0))
    labels = [r.label for r in paper_tables.rows(alike, baselines, stage_runs, None)]
    assert f"{student} FT with L_CLIP" in labels and f"{student} FT with L_CLIP (train_sds)" in labels
    assert len(set(labels)) == len(labels)


def test_on_the_paper_profile_each_student_goes_to_its_published_table_beside_the_papers_numbers(tmp_path):
    cfg = load(PARAMS, {"profile": "paper"})
    baselines = {f"pretrained/{s}": run(0.25, "10000000") for s in cfg.students}
    baselines["diffusion_score"] = run(0.5, "11110000")
    trials = [trial(cfg, s, v, seed, 0.3, "11100000") for s in cfg.students for v in VARIANTS
              for seed in (0, 1)]
    written = paper_tables.write(cfg, paper_tables.rows(cfg, baselines, {}, trials), tmp_path, 50)
    assert {p.stem for p in written} == {stem + kind for stem in ("table1", "table2", "table3", "table-coca")
                                         for kind in ("", "-intervals")}
    for table_id, stem in paper_tables.TABLES.items():
        table = cells(tmp_path / f"{stem}.md")
        for row in published.table(table_id).rows:
            label = {"pretrained": f"{row.student} pretrained", "ft_clip": f"{row.student} FT with L_CLIP",
                     "ft_sds": f"{row.student} FT with L_CLIP + 0.001 L_SDS"}[row.run]
            shown = table[label + published.PAPER]
            for key, value in row.metrics.items():           # the published number, under the measured row
                assert shown[COLUMN[key]] == published.number(value), (table_id, label, key)
            assert table[label][COLUMN[TEXT]] == ("0.300" if row.run.startswith("ft_") else "0.250")
    table1 = cells(tmp_path / "table1.md")
    assert table1["vit-b-16 FT with L_CLIP + 0.001 L_SDS (paper)"][COLUMN[TEXT]] == "0.31"
    assert table1["vit-b-16 FT with L_CLIP + 0.001 L_SDS (paper)"][COLUMN["aro/vg_relation"]] == "0.535"
    # Each table cites, under it (and atop the LaTeX as comments), the published tables its "(paper)" rows are from.
    for stem, cited in {"table1": ["table1", "appendix_diffusion_score"], "table2": ["table2"]}.items():
        notes = [line for line in (tmp_path / f"{stem}.md").read_text().splitlines() if line.startswith("(paper)")]
        assert notes == [published.Cited({}, table_id).note() for table_id in cited]
        assert (tmp_path / f"{stem}.tex").read_text().startswith("".join(f"% {note}\n" for note in notes))
    assert "vit-b-16-laion400m pretrained" in cells(tmp_path / "table2.md")
    assert not any(label.startswith("vit-b-16-laion") for label in table1)
    # The diffusion score's published row (the paper's Winoground and ARO of SD's score).
    assert f"diffusion score ({cfg.teacher.name}){published.PAPER}" in table1


def test_configurations_one_objective_label_leaves_alike_are_told_apart_each_row_with_its_own_cells(toy, tmp_path):
    """Two L_SDS configurations that differ only in objective.reduction, which the objective's label
    does not name: each row says its value, and each row's interval is of its own seeds."""
    cfg, (first, _), baselines, _ = toy
    trials = [trial(cfg, first, "FT with L_CLIP", 0, 0.25, "11000000")]
    for reduction, seeds in (("mean", ((0, "11000000"), (1, "11100000"))), ("sum", ((0, "11111100"), (1, "11111110")))):
        for seed, correct in seeds:
            trials.append(trial(cfg, first, "FT with L_CLIP + L_SDS", seed, correct.count("1") / 8, correct))
            trials[-1]["params"]["objective.reduction"] = reduction
    rows = paper_tables.rows(cfg, baselines, {}, trials)
    sds = f"{first} FT with L_CLIP + {cfg.objective.lambda_sds:g} L_SDS"
    assert [r.label for r in rows if r.student == first] == [
        f"{first} pretrained", f"{first} FT with L_CLIP",       # a label no other row has stays as it was
        f"{sds} (objective.reduction=mean)", f"{sds} (objective.reduction=sum)"]
    paper_tables.write(cfg, rows, tmp_path, n_resamples=200, seed=3)
    table = cells(tmp_path / "table1.md")
    for reduction, mean in (("mean", 2.5 / 8), ("sum", 6.5 / 8)):
        shown = table[f"{sds} (objective.reduction={reduction})"]
        low, high = map(float, shown[-2].strip("[]").split(", "))
        assert shown[COLUMN[TEXT]] == f"{mean:.3f}" and low <= mean <= high
    # Rows of one label would take each other's cells: refused.
    with pytest.raises(ValueError, match="^table1: rows share a label: "):
        paper_tables.write_table(tmp_path, "table1", [rows[0], rows[0]], [None, None], COLUMNS,
                                 paper_tables.TEXT_VS_FT_CLIP, lambda r: None)


def test_a_configuration_with_no_finished_trial_is_named_on_stderr(toy, capsys):
    cfg, (first, second), baselines, trials = toy
    failed = [{**trial(cfg, second, "FT with L_CLIP + L_SDS", seed, 0.0, "00000000", status="failed"),
               "trial": f"t00{seed + 6}"} for seed in (0, 1)]
    rows = paper_tables.rows(cfg, baselines, {}, trials + failed)
    assert [r.run for r in rows if r.student == second] == ["pretrained", "ft_clip"]
    assert capsys.readouterr().err.splitlines() == [
        f"sweep table1: configuration train.student={second}, variant=FT with L_CLIP + L_SDS has no finished "
        "trial with outcomes (t006 failed, t007 failed); no row of it in the tables"]
