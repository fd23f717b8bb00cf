"""MMVP-VLM (Tong et al., 2024) in its published layout (hub dataset MMVP/MMVP_VLM), read as the
release's script `scripts/evaluate_vlm.py` (tsb0601/MMVP) reads it.

    <root>/Questions.csv            a header row, then rows "Question ID,Type,Statement"; rows
                                    1-2 are one pair, rows 3-4 the next, ... (135 pairs)
    <root>/MLLM_VLM Images/<Type>/<Question ID>.jpg

The image folder is spelled "MLLM_VLM Images" in the release's script and "MLLM_VLM_Images" in
DIVA's copy of it (baaivision/DIVA, run_DIVA_with_*.py); either is read, both at once is refused.
As in the script: both images of a pair come from the folder of the pair's first row's Type; a
statement's own image is the first of the pair when its Question ID is odd, else the second; it is
scored as "a photo of <statement>"; and the pattern of the k-th pair is decided by position,
`patterns[k // (pairs // len(patterns))]` (the script's `categories[num_pairs // 15]`).
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from io import StringIO
from pathlib import Path

from pipeline.io import write_text
from .errors import DataFormatError, MissingDataError, require_file, utf8_text

QUESTIONS = "Questions.csv"
IMAGE_DIRS = ("MLLM_VLM Images", "MLLM_VLM_Images")
HEADER = ("Question ID", "Type", "Statement")
PROMPT = "a photo of {}"
# The script's `categories`, in the order its pairs come in the file (15 pairs each).
PATTERNS = ("Orientation and Direction", "Presence of Specific Features", "State and Condition",
            "Quantity and Count", "Positional and Relational Context", "Color and Appearance",
            "Structural Characteristics", "Texts", "Viewpoint and Perspective")


@dataclass(frozen=True)
class MMVPPair:
    """Two images and two statements; `answer_k` is the image (0 or 1) statement k describes."""

    image_1: Path
    image_2: Path
    statement_1: str
    statement_2: str
    answer_1: int
    answer_2: int
    pattern: str
    qids: tuple[int, int]


def prompt(statement: str) -> str:
    """The text the release's script scores for a statement."""
    return PROMPT.format(statement)


def metric_name(pattern: str) -> str:
    """mmvp/<pattern slug>, e.g. mmvp/orientation_and_direction."""
    return "mmvp/" + re.sub(r"[^a-z0-9]+", "_", pattern.lower()).strip("_")


def image_dir(root: Path) -> Path:
    """The image folder of a copy, under either spelling."""
    found = [Path(root) / name for name in IMAGE_DIRS if (Path(root) / name).is_dir()]
    if not found:
        raise MissingDataError(Path(root) / IMAGE_DIRS[0], f"MMVP-VLM image folder ({' or '.join(IMAGE_DIRS)})")
    if len(found) > 1:
        raise DataFormatError(root, "", None, f"holds both {IMAGE_DIRS[0]!r} and {IMAGE_DIRS[1]!r}; keep one")
    return found[0]


def read_mmvp(root: Path, patterns: tuple[str, ...] | list[str] = PATTERNS) -> list[MMVPPair]:
    """Every pair of a copy, in file order, with the pattern its position gives it."""
    path = require_file(Path(root) / QUESTIONS, "MMVP-VLM questions file")
    images = image_dir(root)
    rows = _rows(path)
    if len(rows) % 2:
        raise DataFormatError(path, rows[-1][0], None, "has no second row to pair with (rows come in pairs)")
    pairs = len(rows) // 2
    if not pairs:
        raise DataFormatError(path, "", None, "holds no pair")
    if pairs % len(patterns):
        raise DataFormatError(path, "", None, f"holds {pairs} pairs, not a multiple of its {len(patterns)} patterns")
    per_pattern = pairs // len(patterns)
    return [_pair(rows[2 * k], rows[2 * k + 1], patterns[k // per_pattern], images, path) for k in range(pairs)]


def write_mmvp(root: Path, rows: list[dict]) -> None:
    """Write Questions.csv: rows in file order, dicts with the three columns, checked like the reader
    checks them (the images are written by the caller, as <image folder>/<Type>/<Question ID>.jpg)."""
    path = Path(root) / QUESTIONS
    lines = [_check_row([str(row.get(column, "")) for column in HEADER], path, f"line {i + 2}")
             for i, row in enumerate(rows)]
    if len(lines) % 2:
        raise DataFormatError(path, lines[-1][0], None, "has no second row to pair with (rows come in pairs)")
    for first, second in zip(lines[::2], lines[1::2]):
        _check_pair(first, second, path)
    buffer = StringIO()
    csv.writer(buffer, lineterminator="\n").writerows([HEADER] + [[str(qid), kind, text] for _, qid, kind, text in lines])
    write_text(path, buffer.getvalue())


def _rows(path: Path) -> list[tuple[str, int, str, str]]:
    """(where, Question ID, Type, Statement) per data row; the header is checked for its shape only."""
    with utf8_text(path), open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or len(header) != len(HEADER) or header[0].strip().isdigit():
            raise DataFormatError(path, "line 1", None, f"must be the header {','.join(HEADER)}, got {header!r}")
        return [_check_row(row, path, f"line {reader.line_num}") for row in reader if row]


def _check_row(row: list[str], path: Path, where: str) -> tuple[str, int, str, str]:
    if len(row) != len(HEADER):
        raise DataFormatError(path, where, None, f"has {len(row)} fields, expected {len(HEADER)} ({','.join(HEADER)})")
    qid, kind, statement = row  # kept as written: the script scores the statement and opens the folder verbatim
    if not qid.strip().isdigit():
        raise DataFormatError(path, where, HEADER[0], f"must be an integer, got {qid!r}")
    for field, value in zip(HEADER[1:], (kind, statement)):
        if not value.strip():
            raise DataFormatError(path, where, field, "is empty")
    return where, int(qid), kind, statement


def _check_pair(first: tuple, second: tuple, path: Path) -> None:
    if first[2] != second[2]:
        raise DataFormatError(path, second[0], HEADER[1], f"is {second[2]!r}, its pair's first row {first[2]!r}")


def _pair(first: tuple, second: tuple, pattern: str, images: Path, path: Path) -> MMVPPair:
    _check_pair(first, second, path)
    files = []
    for where, qid, _, _ in (first, second):
        image = images / first[2] / f"{qid}.jpg"  # the script reads both from the first row's Type
        if not image.is_file():
            raise DataFormatError(path, where, HEADER[0], f"names an image that does not exist: {image}")
        files.append(image)
    return MMVPPair(image_1=files[0], image_2=files[1], statement_1=first[3], statement_2=second[3],
                    answer_1=0 if first[1] % 2 == 1 else 1, answer_2=0 if second[1] % 2 == 1 else 1,
                    pattern=pattern, qids=(first[1], second[1]))
