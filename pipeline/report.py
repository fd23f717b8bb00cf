"""Tables in the paper's Table-1 layout, from the MLflow runs the stages logged.

Rows: the pretrained student, FT with L_CLIP, FT with L_CLIP + lambda L_SDS, and the
teacher's diffusion score. Columns: Winoground text score (overall, per collapsed tag,
per number of main predicates), image and group scores, ARO overall / relation /
attribution / order, zero-shot mean, and the bootstrap interval of the text score.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

from pipeline.io import write_text

COLUMNS = [
    ("Wino text", "winoground/text"), ("Object", "winoground/text/object"),
    ("Relation", "winoground/text/relation"), ("Both", "winoground/text/both"),
    ("1 Main Pred", "winoground/text/preds_1"), ("2 Main Preds", "winoground/text/preds_2"),
    ("Wino image", "winoground/image"), ("Wino group", "winoground/group"),
    ("ARO", "aro/overall"), ("ARO Rel", "aro/vg_relation"), ("ARO Attr", "aro/vg_attribution"),
    ("COCO-Order", "aro/coco_order"), ("Zero-shot", "zeroshot/mean"),
]
INTERVAL = "Wino text 95% CI"


def table_rows(runs: list[tuple[str, dict[str, float]]]) -> list[list[str]]:
    """[row label, value per column, text-score 95% interval] with '-' where a run lacks a metric."""
    rows = []
    for label, metrics in runs:
        interval = "-"
        if "winoground/text/ci_low" in metrics:
            interval = f"[{metrics['winoground/text/ci_low']:.3f}, {metrics['winoground/text/ci_high']:.3f}]"
        rows.append([label] + [f"{metrics[key]:.3f}" if key in metrics else "-" for _, key in COLUMNS] + [interval])
    return rows


def markdown(rows: list[list[str]]) -> str:
    header = ["run"] + [name for name, _ in COLUMNS] + [INTERVAL]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def latex(rows: list[list[str]]) -> str:
    escape = lambda s: s.replace("_", r"\_").replace("&", r"\&").replace("%", r"\%")
    header = ["run"] + [name for name, _ in COLUMNS] + [INTERVAL]
    out = [r"\begin{tabular}{l" + "r" * len(COLUMNS) + "l}", r"\toprule",
           " & ".join(escape(h) for h in header) + r" \\", r"\midrule"]
    out += [" & ".join(escape(c) for c in row) + r" \\" for row in rows]
    out += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(out) + "\n"


def csv_text(rows: list[list[str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["run"] + [key for _, key in COLUMNS] + ["winoground/text/ci95"])
    writer.writerows(rows)
    return buffer.getvalue()


def write_table1(runs: list[tuple[str, dict[str, float]]], out: Path, stem: str = "table1") -> None:
    rows = table_rows(runs)
    write_text(Path(out) / f"{stem}.md", markdown(rows))
    write_text(Path(out) / f"{stem}.tex", latex(rows))
    write_text(Path(out) / f"{stem}.csv", csv_text(rows))
