"""Errors raised on malformed datasets, and the checked JSON I/O that raises them.

Every reader validates each record before building it, so a broken download or a
buggy generator fails at load time with one line that says where to look
(file, record, field) rather than deep inside scoring with a KeyError.
Writers share the same atomic-write helpers so a crash never leaves a half-written
annotation file that a later run would read as a (truncated) dataset.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class PicklesWhole:
    """Mixed into the project's errors whose constructor takes several arguments.

    An exception pickles as its type called with `args`, which hold the message alone here:
    one raised in a Ray trial could not be rebuilt and reached the driver as a TypeError.
    These keep their constructor's arguments in `arguments` and pickle with them.
    """

    arguments: tuple

    def __reduce__(self):
        return type(self), self.arguments


class DataFormatError(PicklesWhole, ValueError):
    """A record (or the whole file) does not follow its published format: one line naming the file,
    `where` (which record: "record 3", "line 4", "annotation 17", or "" for the file as a whole),
    `field` (the offending field, or None) and the problem.
    """

    def __init__(self, path: Path | str, where: str, field: str | None, problem: str) -> None:
        self.arguments = (path, where, field, problem)
        self.path = Path(path)
        parts = [str(path)]
        if where:
            parts.append(where)
        parts.append(f"field {field!r} {problem}" if field is not None else problem)
        super().__init__(": ".join(parts))


class MissingInput(FileNotFoundError):
    """An input the project needs is absent: reported in one line (exit 2). Any other
    FileNotFoundError is a bug and keeps its traceback."""


class MissingDataError(PicklesWhole, MissingInput):
    """A file or folder a dataset needs is absent (a FileNotFoundError, so callers can
    treat "not downloaded yet" apart from "downloaded but broken")."""

    def __init__(self, path: Path | str, what: str) -> None:
        self.arguments = (path, what)
        self.path = Path(path)
        super().__init__(f"{path}: missing {what}")


def require_file(path: Path, what: str) -> Path:
    """`path` if it is a file, else MissingDataError naming it."""
    if not path.is_file():
        raise MissingDataError(path, what)
    return path


def require_dir(path: Path, what: str) -> Path:
    """`path` if it is a folder, else MissingDataError naming it."""
    if not path.is_dir():
        raise MissingDataError(path, what)
    return path


def load_json(path: Path, what: str) -> Any:
    """Parsed JSON document; a syntax error becomes a DataFormatError naming the file."""
    require_file(path, what)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataFormatError(path, "", None, f"invalid JSON: {one_line(exc)}") from exc


@contextmanager
def utf8_text(path: Path) -> Iterator[None]:
    """Reading `path` as UTF-8 text: a byte that is not UTF-8 becomes a DataFormatError naming the file."""
    try:
        yield
    except UnicodeDecodeError as exc:
        raise DataFormatError(path, "", None, f"is not UTF-8 text: {one_line(exc)}") from exc


def load_jsonl(path: Path, what: str) -> list[tuple[str, Any]]:
    """(where, value) per non-blank line, `where` = "line N" (1-based, as editors count)."""
    require_file(path, what)
    rows = []
    with utf8_text(path), open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"line {number}"
            try:
                rows.append((where, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataFormatError(path, where, None, f"invalid JSON: {one_line(exc)}") from exc
    return rows


def require_list(value: Any, path: Path, where: str, field: str | None) -> list:
    """`value` if it is a JSON array."""
    if not isinstance(value, list):
        raise DataFormatError(path, where, field, f"must be a list, got {_type_name(value)}")
    return value


def require_record(value: Any, path: Path, where: str) -> dict:
    """`value` if it is a JSON object (a record), so field look-ups can follow."""
    if not isinstance(value, dict):
        raise DataFormatError(path, where, None, f"record must be an object, got {_type_name(value)}")
    return value


def field_value(record: dict, field: str, path: Path, where: str) -> Any:
    """record[field], or a DataFormatError saying the field is missing."""
    if field not in record:
        raise DataFormatError(path, where, field, "is missing")
    return record[field]


def str_field(record: dict, field: str, path: Path, where: str) -> str:
    """A string field."""
    value = field_value(record, field, path, where)
    if not isinstance(value, str):
        raise DataFormatError(path, where, field, f"must be a string, got {value!r}")
    return value


def int_field(record: dict, field: str, path: Path, where: str) -> int:
    """An integer field (JSON booleans are rejected although Python counts them as ints)."""
    value = field_value(record, field, path, where)
    if not isinstance(value, int) or isinstance(value, bool):
        raise DataFormatError(path, where, field, f"must be an integer, got {value!r}")
    return value


def number_field(record: dict, field: str, path: Path, where: str) -> float:
    """A finite numeric field (int or float, not bool)."""
    value = field_value(record, field, path, where)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataFormatError(path, where, field, f"must be a finite number, got {value!r}")
    return float(value)


def enum_field(record: dict, field: str, allowed: tuple, path: Path, where: str) -> Any:
    """A field whose value must be one of `allowed` (compared with ==, type included)."""
    value = field_value(record, field, path, where)
    if isinstance(value, bool) or not any(value == a and type(value) is type(a) for a in allowed):
        choices = " or ".join(repr(a) for a in allowed)
        raise DataFormatError(path, where, field, f"must be {choices}, got {value!r}")
    return value


def str_list_field(record: dict, field: str, path: Path, where: str, length: int | None = None) -> list[str]:
    """A list-of-strings field, optionally of an exact length."""
    value = require_list(field_value(record, field, path, where), path, where, field)
    if not all(isinstance(v, str) for v in value):
        raise DataFormatError(path, where, field, f"must hold only strings, got {value!r}")
    if length is not None and len(value) != length:
        raise DataFormatError(path, where, field, f"must hold {length} strings, got {len(value)}")
    return value


def existing_image(image_dir: Path, relative: str, path: Path, where: str, field: str) -> Path:
    """image_dir / relative, checked to exist so a missing image fails at load, not mid-scoring."""
    image = image_dir / relative
    if not image.is_file():
        raise DataFormatError(path, where, field, f"names an image that does not exist: {image}")
    return image


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (a library's may span several)."""
    return " ".join(str(exc).split())
