"""The paper's published numbers (`published.yaml`, cited per table) beside the measured ones.

`table(id)`, `row_of(id, student, run)` and `beside_measured(id, student, run, config)` read the
file, validated once (a bad entry is a one-line `ConfigError` naming the file and the entry);
`beside_measured` gives a published row only to a measured run of its setting. `beside` lays measured and published values out as
one table: under each measured run's row, a "<run> (paper)" row with the published values in the
same columns. A row under a row, not a paper column after each measured one: Table 1 already has
some twenty columns, and doubling them makes a Markdown table wrap; in one column the eye compares
the two numbers by reading down, the header stays the metric names (and the CSV header the metric
keys), and a run the paper has nothing on adds no row of dashes.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Annotated, Literal

from annotated_types import Ge, Le, MinLen
from pydantic import AllowInfNan, StrictFloat, StrictStr

from pipeline.config import ConfigError, read_yaml, validate, validated

PUBLISHED = Path(__file__).with_name("published.yaml")

# ft_<x>: fine-tuned with objective.method x; the diffusion score is the teacher's and has no student.
Run = Literal["pretrained", "ft_clip", "ft_sds", "ft_unet_feature", "diffusion_score"]
DIFFUSION_SCORE = "diffusion_score"
Text = Annotated[StrictStr, MinLen(1)]
Score = Annotated[StrictFloat, AllowInfNan(False), Ge(0), Le(1)]

# The paper's setting of every published row but where the row's `values` differ: its profile here,
# Stable Diffusion v1-4 as the teacher (by name: a local copy of the weights is the same teacher) and
# MS-COCO as the training corpus (appendix F).
SETTING = {"profile": "paper", "teacher.name": "stable-diffusion-v1-4", "data.train_set": "coco"}
# A fine-tuned row's too (appendix F): LayerNorms (+ h_w) at 5e-5, batch 32, and for L_SDS lambda 0.001.
# The paper gives no lambda for the UNet-feature loss (A.2): that row's is not checked.
FINE_TUNED = {"train.scope": "layernorm", "train.lr": "5e-05", "train.batch_size": "32"}
SDS_LAMBDA = {"objective.lambda_sds": "0.001"}
MISSING = "-"            # as report.metric_cells marks a metric a run lacks (and LaTeX right-aligns it)
PAPER = " (paper)"       # appended to a run's label on its published row


@validated
class PublishedRow:
    """One run of a published table. `values`: the config keys (dotted) whose setting differs from
    the paper profile, as text as a sweep table shows them (e.g. {"data.train_set": "cc3m"})."""

    run: Run
    metrics: Annotated[dict[Text, Score], MinLen(1)]
    student: Text = ""   # absent only for the diffusion score
    values: dict[Text, Text] = dataclasses.field(default_factory=dict)


@validated
class PublishedTable:
    source: Text         # paper version and table / section, e.g. "arXiv 2307.09233 v3, Table 1"
    caption: Text
    rows: list[PublishedRow]
    # Where the table's setting is a whole study's (appendices G and H): the config keys (dotted, under
    # the paper profile) and values that study sets beyond its rows' `values`, e.g. a teacher's weights.
    study: dict[Text, Text] = dataclasses.field(default_factory=dict)


def _check_keys(tp: type, data: object, where: str) -> None:
    """An unknown or missing key of a `tp` mapping, named as config errors name keys (pydantic's
    message for a missing key would print the whole mapping, and a misspelt key would read as missing)."""
    if not isinstance(data, dict):
        return
    fields = dataclasses.fields(tp)
    unknown = [key for key in data if key not in {f.name for f in fields}]
    if unknown:
        allowed = ", ".join(sorted(f.name for f in fields))
        raise ConfigError(f"{where}.{unknown[0]}: unknown key; allowed keys: {allowed}")
    required = [f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in data]
    if missing:
        raise ConfigError(f"{where}.{missing[0]}: missing; required keys: {', '.join(required)}")


def _check_shape(data: dict) -> None:
    for table_id, entry in data.items():
        _check_keys(PublishedTable, entry, str(table_id))
        rows = entry.get("rows") if isinstance(entry, dict) else None
        for i, row in enumerate(rows if isinstance(rows, list) else []):
            _check_keys(PublishedRow, row, f"{table_id}.rows[{i}]")


def _check_rows(table_id: str, rows: list[PublishedRow]) -> None:
    """What the types cannot say: a row at least, a student on every run but the diffusion score, one
    row per (student, run)."""
    if not rows:
        raise ConfigError(f"{table_id}.rows: empty; list at least one row")
    seen: dict[tuple[str, str], int] = {}
    for i, row in enumerate(rows):
        where = f"{table_id}.rows[{i}]"
        if row.run == DIFFUSION_SCORE and row.student:
            raise ConfigError(f"{where}.student: {row.student!r} with run {DIFFUSION_SCORE}, which has no student; "
                              "leave it out")
        if row.run != DIFFUSION_SCORE and not row.student:
            raise ConfigError(f"{where}.student: missing; run {row.run} needs the paper profile's student")
        first = seen.setdefault((row.student, row.run), i)
        if first != i:
            raise ConfigError(f"{where}: student {row.student!r}, run {row.run} repeats rows[{first}]; "
                              "one row per student and run")


def load(path: Path | str = PUBLISHED) -> dict[str, PublishedTable]:
    """Every table of the file by id, validated once per file."""
    return _load(Path(path))


@functools.cache
def _load(path: Path) -> dict[str, PublishedTable]:
    data = read_yaml(path)
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{path}: expected a mapping of table id to its source, caption and rows")
    try:
        _check_shape(data)
        tables = validate(dict[Text, PublishedTable], data)
        for table_id, entry in tables.items():
            _check_rows(table_id, entry.rows)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    return tables


def table(table_id: str, path: Path | str = PUBLISHED) -> PublishedTable:
    tables = load(path)
    if table_id not in tables:
        raise ConfigError(f"{path}: no table {table_id!r}; tables: {', '.join(tables)}")
    return tables[table_id]


def row_of(table_id: str, student: str | None, run: str, path: Path | str = PUBLISHED) -> PublishedRow | None:
    """`student`'s `run` in the table (student None for the diffusion score); None when it has no such row."""
    return next((row for row in table(table_id, path).rows if row.student == (student or "") and row.run == run), None)


def setting(row: PublishedRow) -> dict[str, str]:
    """The config keys (dotted, values as `str` gives them) a measured row must have to stand beside `row`:
    the paper's, a fine-tuned row's training setting too, with the row's own `values` over them."""
    trained = {**FINE_TUNED, **(SDS_LAMBDA if row.run == "ft_sds" else {})} if row.run.startswith("ft_") else {}
    return {**SETTING, **trained, **row.values}


@dataclasses.dataclass(frozen=True)
class Cited:
    """A published row's metrics and the id of the table they are from, which the printed table cites."""

    metrics: dict[str, float]
    table_id: str

    def note(self) -> str:
        """The line a printed table gives its "(paper)" rows from this table: its source, then its caption."""
        entry = table(self.table_id)
        return f"(paper) rows: {entry.source}. {entry.caption}"


def beside_measured(table_id: str, student: str | None, run: str, config: dict) -> Cited | None:
    """The published metrics to print under a measured run of `student` whose whole config (dotted keys)
    is `config`: the table's row of that student and run when the config has its `setting`, else None
    (another profile, teacher, corpus or fine-tuning setting than the row's)."""
    row = row_of(table_id, student, run)
    if row is None or any(str(config.get(key)) != value for key, value in setting(row).items()):
        return None
    return Cited(dict(row.metrics), table_id)


def number(value: float) -> str:
    """A published value with the paper's own digits (.24 as 0.24, .535 as 0.535): to 3 decimals, as the
    measured values print, it would claim a precision the paper never gave. At least 2 (YAML reads .30 as 0.3)."""
    decimals = max(2, len(repr(float(value)).partition(".")[2]))
    return f"{value:.{decimals}f}"


def beside(header: list[str], keys: list[str], rows: list[tuple[str, dict[str, float]]],
           published: list[Cited | None]) -> tuple[list[str], list[list[str]], list[str]]:
    """(header, cells, notes): each measured row (label, then each of `keys` to 3 decimals as
    `report.metric_cells` prints them, MISSING where absent), followed by its "<label> (paper)" row from
    `published` (one entry per row, e.g. `beside_measured`'s; `number` of each value) when the paper has
    any of `keys` for it; `notes` cite the tables those rows are from, once each. `header` is the label
    column's name and one name per key."""
    if len(header) != len(keys) + 1:
        raise ValueError(f"header has {len(header)} names for {len(keys)} keys; expected the label's and one per key")
    cells, notes = [], []
    for (label, measured), paper in zip(rows, published, strict=True):
        cells.append([label] + [f"{measured[key]:.3f}" if key in measured else MISSING for key in keys])
        if paper and any(key in paper.metrics for key in keys):
            cells.append([label + PAPER] + [number(paper.metrics[key]) if key in paper.metrics else MISSING
                                            for key in keys])
            notes.append(paper.note())
    return list(header), cells, list(dict.fromkeys(notes))
