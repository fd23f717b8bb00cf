"""The paper's published numbers (pipeline/published.yaml): cells checked by hand against the paper,
every key known to the project, the numbers beside measured ones, and one-line errors for a bad file."""
import re
from pathlib import Path

import pytest

from pipeline import config
from pipeline.config import ConfigError
from pipeline.published import Cited, beside, beside_measured, load, number, row_of, table
from pipeline.report import COLUMNS, markdown, metric_cells

REPO = Path(__file__).resolve().parents[1]
KEYS = [key for _, key in COLUMNS]
PAPER_PROFILE = config.resolve(config.read_yaml(REPO / "params.yaml"), {"profile": "paper"})

# (table, student, run, metric, value) as the paper prints them (Tables 1-3 and the appendix text).
HAND_CHECKED = [
    ("table1", "vit-b-16", "ft_sds", "winoground/text", 0.31),
    ("table1", "vit-b-16", "ft_sds", "aro/vg_relation", 0.535),
    ("table1", "vit-b-16", "pretrained", "winoground/text/relation", 0.18),
    ("table1", "vit-b-32", "pretrained", "winoground/text/both", 0.80),
    ("table1", "vit-b-32", "ft_sds", "aro/overall", 0.575),
    ("table1", "vit-l-14", "ft_sds", "winoground/text", 0.295),
    ("table1", "vit-l-14", "ft_clip", "winoground/text/preds_2", 0.23),
    ("table1", "vit-l-14-336", "ft_clip", "winoground/text/preds_1", 0.26),
    ("table1", "rn50", "pretrained", "winoground/text/both", 0.50),
    ("table1", "rn50", "ft_sds", "aro/vg_attribution", 0.66),
    ("table2", "vit-b-16-laion400m", "ft_clip", "winoground/text/relation", 0.21),
    ("table2", "vit-b-16-laion400m", "ft_sds", "winoground/text/preds_2", 0.14),
    ("table3", "vit-b-16-laion2b", "pretrained", "winoground/text/both", 0.61),
    ("table3", "vit-b-16-laion2b", "ft_sds", "winoground/text/preds_1", 0.36),
    ("appendix_sd21", "vit-b-16", "ft_sds", "winoground/text", 0.35),
    ("appendix_sd21", "rn50", "ft_sds", "winoground/text", 0.28),
    ("appendix_cc3m", "vit-l-14-336", "ft_sds", "winoground/text", 0.28),
    ("appendix_unet_feature", "vit-b-16", "ft_unet_feature", "winoground/text", 0.23),
    ("appendix_coca", "coca-vit-b-32", "pretrained", "winoground/text", 0.30),
    ("appendix_coca", "coca-vit-b-32", "ft_sds", "winoground/text", 0.33),
    ("appendix_clevr", None, "diffusion_score", "clevr/mean", 0.67),
    ("appendix_clevr", "vit-l-14", "ft_sds", "clevr/mean", 0.65),
    ("appendix_diffusion_score", None, "diffusion_score", "aro/overall", 0.63),
    ("appendix_diffusion_score", None, "diffusion_score", "aro/coco_order", 0.24),
    ("appendix_diffusion_score", None, "diffusion_score", "aro/flickr_order", 0.34),
]

# Rows and numbers per table, counted in the paper: a row or a number lost from the file shows here.
COUNTS = {"table1": (15, 135), "table2": (3, 18), "table3": (2, 12), "appendix_sd21": (5, 5),
          "appendix_cc3m": (5, 5), "appendix_unet_feature": (2, 2), "appendix_coca": (2, 2),
          "appendix_clevr": (3, 3), "appendix_diffusion_score": (1, 4)}


@pytest.mark.parametrize("table_id, student, run, key, value", HAND_CHECKED)
def test_hand_checked_cells_match_the_paper(table_id, student, run, key, value):
    assert row_of(table_id, student, run).metrics[key] == value


def test_every_table_and_number_of_the_paper_is_there():
    tables = load()
    assert {tid: (len(t.rows), sum(len(r.metrics) for r in t.rows)) for tid, t in tables.items()} == COUNTS
    assert all(t.source.startswith("arXiv 2307.09233 v3, ") for t in tables.values())


def test_table1_aro_overall_is_the_mean_of_relation_and_attribution():
    # The paper's definition, to its rounding (2 decimals, half a point): a slip in any ARO cell shows.
    for row in table("table1").rows:
        m = row.metrics
        assert abs(m["aro/overall"] - (m["aro/vg_relation"] + m["aro/vg_attribution"]) / 2) <= 0.0051, row


def test_a_row_the_paper_lacks_is_none_and_an_unknown_table_an_error():
    assert row_of("table3", "vit-b-16-laion2b", "ft_clip") is None     # Table 3 has no L_CLIP row
    assert row_of("table1", "vit-b-16", "diffusion_score") is None
    with pytest.raises(ConfigError, match=r"^.*published\.yaml: no table 'table9'; tables: table1, table2, "):
        table("table9")


def test_every_key_and_student_is_the_projects():
    zeroshot = {f"zeroshot/{name}" for name in config.ZEROSHOT_SETS}
    flat = config.flatten(PAPER_PROFILE)
    for table_id, entry in load().items():
        assert table(table_id) is entry
        for row in entry.rows:
            assert set(row.metrics) <= set(KEYS) | zeroshot, (table_id, row)
            assert row.student in PAPER_PROFILE["students"] or (row.run == "diffusion_score" and not row.student)
            for key, value in row.values.items():       # a setting that differs from the paper profile
                assert key in flat and str(flat[key]) != value, (table_id, key)
        if entry.study:          # a study's table: its rows share the settings its hint names with `study`
            assert all(row.values == entry.rows[0].values for row in entry.rows), table_id
        for key, value in entry.study.items():   # what that study sets beyond them
            assert key in flat and str(flat[key]) != value and all(key not in row.values for row in entry.rows), \
                (table_id, key)


def test_published_values_sit_under_the_measured_ones_of_the_same_run():
    for table_id, entry in load().items():
        runs = [(f"{row.student} {row.run}", {key: 0.5 for key in KEYS}) for row in entry.rows]
        published = [Cited(dict(row.metrics), table_id) for row in entry.rows]
        header, cells, notes = beside(["run"] + [name for name, _ in COLUMNS], KEYS, runs, published)
        assert header == ["run"] + [name for name, _ in COLUMNS]
        assert len(cells) == 2 * len(runs)
        for i, (row, (label, measured)) in enumerate(zip(entry.rows, runs)):
            assert cells[2 * i] == [label] + metric_cells(measured)
            # The paper's row in the same columns, '-' where it has no number, each with the paper's digits.
            assert cells[2 * i + 1] == [f"{label} (paper)"] + [number(row.metrics[key]) if key in row.metrics
                                                               else "-" for key in KEYS]
        assert notes == [f"(paper) rows: {entry.source}. {entry.caption}"]      # cited once, however many rows


def test_beside_by_hand():
    keys = ["winoground/text", "aro/vg_relation", "aro/coco_order"]
    runs = [("pretrained", {"winoground/text": 0.2425}), ("FT with L_CLIP + 0.001 L_SDS", {"winoground/text": 0.3})]
    header, cells, notes = beside(["run", "Wino text", "ARO Rel", "COCO-Order"], keys, runs,
                                  [None, Cited(dict(row_of("table1", "vit-b-16", "ft_sds").metrics), "table1")])
    # Measured values to 3 decimals; the paper's as it printed them (.31, .535), not as 0.310.
    assert cells == [["pretrained", "0.242", "-", "-"],
                     ["FT with L_CLIP + 0.001 L_SDS", "0.300", "-", "-"],
                     ["FT with L_CLIP + 0.001 L_SDS (paper)", "0.31", "0.535", "-"]]
    assert "| FT with L_CLIP + 0.001 L_SDS (paper) | 0.31 | 0.535 | - |" in markdown(header, cells)
    assert len(notes) == 1 and notes[0].startswith("(paper) rows: arXiv 2307.09233 v3, Table 1. Winoground text")
    # Nothing published in these columns: no row of dashes, and nothing to cite.
    _, cells, notes = beside(["run", "COCO-Order"], ["aro/coco_order"], runs[1:],
                             [Cited({"winoground/text": 0.31}, "table1")])
    assert cells == [["FT with L_CLIP + 0.001 L_SDS", "-"]] and notes == []
    assert [number(v) for v in (0.535, 0.24, 0.3, 0.5, 0.6325)] == ["0.535", "0.24", "0.30", "0.50", "0.6325"]


def test_a_published_row_stands_only_beside_a_run_of_its_setting():
    # The paper profile's own config is the paper's setting (appendix F): every row finds its numbers.
    flat = {k: v for k, v in config.flatten(PAPER_PROFILE).items() if not k.startswith("profiles.")}
    sds = {**flat, "objective.method": "sds"}
    assert beside_measured("table1", "vit-b-16", "ft_sds", sds) == Cited(dict(row_of("table1", "vit-b-16", "ft_sds").metrics),
                                                                  "table1")
    assert beside_measured("table1", "vit-b-16", "pretrained", flat).metrics["winoground/text"] == 0.24
    # Another teacher, corpus, scope, rate, batch or lambda than the paper's: nothing printed under it.
    for key, value in {"teacher.name": "stable-diffusion-v2-1", "data.train_set": "cc3m", "train.scope": "full",
                       "train.lr": 1e-05, "train.batch_size": 64, "objective.lambda_sds": 0.1}.items():
        assert beside_measured("table1", "vit-b-16", "ft_sds", {**sds, key: value}) is None, key
    # A row's own values replace the paper's: appendix G's teacher.
    assert beside_measured("appendix_sd21", "vit-b-16", "ft_sds", {**sds, "teacher.name": "stable-diffusion-v2-1"}) \
        == Cited({"winoground/text": 0.35}, "appendix_sd21")
    # L_CLIP alone has no lambda to match (its runs log 0); a pretrained row no training setting.
    assert beside_measured("table1", "vit-b-16", "ft_clip", {**flat, "objective.lambda_sds": 0}).metrics \
        ["winoground/text"] == 0.23
    assert beside_measured("table1", "vit-b-16", "pretrained", {**flat, "train.scope": "full"}) is not None


def test_beside_refuses_mismatched_lengths():
    with pytest.raises(ValueError):
        beside(["run"], ["winoground/text"], [("a", {})], [None])
    with pytest.raises(ValueError):
        beside(["run", "Wino"], ["winoground/text"], [("a", {})], [])


ROW = "{student: vit-b-16, run: ft_sds, metrics: {winoground/text: .31}}"
BAD = {
    "not a number": ("t: {source: s, caption: c, rows: [{student: a, run: ft_sds, metrics: {winoground/text: x}}]}",
                     r"t\.rows\[0\]\.metrics\.winoground/text: 'x' is not allowed; expected a number"),
    "a percentage": ("t: {source: s, caption: c, rows: [{student: a, run: ft_sds, metrics: {winoground/text: 31}}]}",
                     r"t\.rows\[0\]\.metrics\.winoground/text: 31\.0 is out of range; allowed: <= 1"),
    "unknown run": ("t: {source: s, caption: c, rows: [{student: a, run: sds, metrics: {winoground/text: .3}}]}",
                    r"t\.rows\[0\]\.run: 'sds' is not allowed; expected one of 'pretrained', "),
    "misspelt key": ("t: {source: s, caption: c, rows: [{student: a, run: ft_sds, metric: {winoground/text: .3}}]}",
                     r"t\.rows\[0\]\.metric: unknown key; allowed keys: metrics, run, student, values"),
    "no source": (f"t: {{caption: c, rows: [{ROW}]}}", r"t\.source: missing; required keys: source, caption, rows"),
    "no rows": ("t: {source: s, caption: c, rows: []}", r"t\.rows: empty; list at least one row"),
    "no student": ("t: {source: s, caption: c, rows: [{run: ft_sds, metrics: {winoground/text: .3}}]}",
                   r"t\.rows\[0\]\.student: missing; run ft_sds needs the paper profile's student"),
    "student on the diffusion score": (
        "t: {source: s, caption: c, rows: [{student: a, run: diffusion_score, metrics: {aro/overall: .63}}]}",
        r"t\.rows\[0\]\.student: 'a' with run diffusion_score, which has no student"),
    "repeated run": (f"t: {{source: s, caption: c, rows: [{ROW}, {ROW}]}}",
                     r"t\.rows\[1\]: student 'vit-b-16', run ft_sds repeats rows\[0\]"),
    "repeated table": (f"t: {{source: s, caption: c, rows: [{ROW}]}}\nt: {{}}\n", r"line 2: duplicate key 't'"),
    "a list": ("- t\n", r"expected a mapping of table id to its source, caption and rows"),
    "not YAML": ("t: [\n", r"line 2 is not valid YAML"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_a_malformed_file_is_one_line_naming_the_file_and_the_entry(tmp_path, case):
    text, message = BAD[case]
    path = tmp_path / "published.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert "\n" not in str(info.value)
    assert str(info.value).startswith(f"{path}: ")
    assert re.search(message, str(info.value)), str(info.value)
