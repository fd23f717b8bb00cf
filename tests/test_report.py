"""The Table-1 writer: values, missing metrics, intervals, and the three formats."""
import csv
import io

from pipeline.report import COLUMNS, csv_text, latex, markdown, table_rows, write_table1


RUNS = [
    ("pretrained", {"winoground/text": 0.24, "winoground/text/object": 0.28, "aro/overall": 0.5725,
                    "winoground/text/ci_low": 0.2, "winoground/text/ci_high": 0.285}),
    ("diffusion score", {"winoground/text": 0.3}),
]


def test_rows_hold_values_dashes_and_the_interval():
    rows = table_rows(RUNS)
    keys = [key for _, key in COLUMNS]
    assert rows[0][0] == "pretrained"
    assert rows[0][1 + keys.index("winoground/text")] == "0.240"
    assert rows[0][1 + keys.index("aro/overall")] == "0.573"  # 3 decimals, rounded
    assert rows[0][1 + keys.index("aro/vg_relation")] == "-"
    assert rows[0][-1] == "[0.200, 0.285]"
    assert rows[1][-1] == "-"


def test_formats_agree_and_latex_is_escaped(tmp_path):
    rows = table_rows(RUNS)
    md = markdown(rows).splitlines()
    assert len(md) == 2 + len(RUNS) and md[2].startswith("| pretrained | 0.240 |")
    tex = latex(rows)
    assert r"95\% CI" in tex and "95% CI" not in tex.replace(r"\%", "")
    assert tex.count(r"\\") == 1 + len(RUNS)
    parsed = list(csv.reader(io.StringIO(csv_text(rows))))
    assert parsed[0][1] == "winoground/text" and parsed[1][1] == "0.240"
    write_table1(RUNS, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table1.csv", "table1.md", "table1.tex"]
