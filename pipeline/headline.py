"""The headline scores as one small metrics file per row under metrics/, every file with the same
keys: what `dvc metrics show` lists one row per run, and `dvc metrics diff` compares with a
committed run (the folder is git-tracked, not cached).

    pretrained.json                the pretrained student        } Table 1's rows, each named by its
    ft-clip.json                   FT with L_CLIP                } place in the table, not by its label,
    ft-sds.json                    FT with L_SDS (table1 sweep), } so a file keeps its name when a param
                                   else the params' objective    }
    diffusion-score.json           the teacher's diffusion score } (lambda, the teacher) changes the label
    <sweep>.<variant>.json         per variant of a sweep of named variants (e.g. sweeps/methods.yaml):
                                   the mean over its finished seeds, as its report shows it

A score a row has none of (the diffusion score has no zero-shot accuracy) is null, which DVC
shows as "-". The big results files stay where the stages write them; these only repeat the
headline of each.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config import ConfigError
from pipeline.io import atomic_dir, write_json

if TYPE_CHECKING:
    from pipeline.report import VariantRow

# Short keys: DVC makes a column of each, and the table stays narrow with them.
KEYS = {"wino_text": "winoground/text", "wino_image": "winoground/image", "wino_group": "winoground/group",
        "aro": "aro/overall", "zeroshot": "zeroshot/mean"}
TABLE1_FILES = ("pretrained", "ft-clip", "ft-sds", "diffusion-score")   # in Table 1's row order
SUFFIX = ".json"
FOLDER = "metrics"   # under the project folder: the report stage's git-tracked metrics output (dvc.yaml)


def headline(scores: dict[str, float]) -> dict[str, float | None]:
    """Every `KEYS` score of one row; null for what it lacks or has as NaN (strict JSON has no NaN)."""
    values = {short: scores.get(key) for short, key in KEYS.items()}
    return {short: float(v) if v is not None and math.isfinite(v) else None for short, v in values.items()}


def variant_stem(sweep: str, variant: str) -> str:
    """`<sweep>.<variant>` with the variant name (any printable text) in lower-case words joined by
    '-': "methods", "FT with L_CLIP" -> "methods.ft-with-l-clip". The slug has no '.', so no two
    (sweep, variant) pairs of different sweeps meet, nor meet a Table-1 file."""
    slug = re.sub(r"[\W_]+", "-", variant.casefold()).strip("-")
    if not slug:
        raise ConfigError(f"sweep {sweep}: variant {variant!r} has no letter or digit to name its metrics file")
    return f"{sweep}.{slug}"


def headline_files(table1: list[tuple[str, dict[str, float]]],
                   variants: dict[str, list[VariantRow]]) -> dict[str, dict[str, float | None]]:
    """{file name: headline} of the four Table-1 rows ((label, metrics), in the table's order) and of
    each variant row (`pipeline.report.compare_variants`) of each sweep ({sweep name: rows})."""
    if len(table1) != len(TABLE1_FILES):
        raise ValueError(f"Table 1 has {len(TABLE1_FILES)} rows ({', '.join(TABLE1_FILES)}), got {len(table1)}")
    files = {name + SUFFIX: headline(metrics) for name, (_, metrics) in zip(TABLE1_FILES, table1)}
    for sweep, rows in variants.items():
        named: dict[str, str] = {}
        for row in rows:
            stem = variant_stem(sweep, row.name)
            if stem in named:
                raise ConfigError(f"sweep {sweep}: variants {named[stem]!r} and {row.name!r} both make the metrics "
                                  f"file {stem}{SUFFIX}; rename one")
            named[stem] = row.name
            files[stem + SUFFIX] = headline({key: score[0] for key, score in row.scores.items()})
    return files


def write_headline(files: dict[str, dict], folder: Path) -> None:
    """`files` ({name: headline}) as the whole of `folder`, replaced in one rename: a reader never
    sees half of them, and the files of an earlier run's rows (a variant since dropped) are gone."""
    with atomic_dir(folder) as building:
        for name, values in files.items():
            write_json(building / name, values)
