"""SugarCrepe (Hsieh et al., 2023) in the files its authors release (RAIVNLab/sugar-crepe).

One JSON object per subset, `data/<subset>.json`, keyed by case id (a decimal string; ids need
not be contiguous: swap_obj has no "108" since the release removed that case):
    {"0": {"filename": "000000085329.jpg", "caption": "...", "negative_caption": "..."}, ...}
with `filename` an image of COCO 2017 val (the `val2017/` folder). The release's `main_eval.py`
scores each case as right when the caption's score is strictly above the negative's, and reports
the accuracy of each subset (`pipeline.metrics.sugarcrepe_correct`, `pipeline.metrics.sugarcrepe`).
Published sizes: `SUBSET_SIZES` (7,511 cases).
"""
from __future__ import annotations

from pathlib import Path

from pipeline.config import SUGARCREPE_SUBSETS
from pipeline.io import write_json
from .errors import DataFormatError, existing_image, load_json, require_record, str_field
from .records import ChoiceCase

SUBSET_SIZES = {"add_obj": 2062, "add_att": 692, "replace_obj": 1652, "replace_att": 788, "replace_rel": 1406,
                "swap_obj": 245, "swap_att": 666}
FIELDS = ("filename", "caption", "negative_caption")


def subset_file(data_dir: Path, subset: str) -> Path:
    return Path(data_dir) / f"{subset}.json"


def read_sugarcrepe(data_dir: Path, image_dir: Path,
                    subsets: tuple[str, ...] | list[str] = SUGARCREPE_SUBSETS) -> dict[str, list[ChoiceCase]]:
    """{subset: cases in file order}; each case's options are (caption, negative_caption), answer 0."""
    return {subset: read_subset(subset_file(data_dir, subset), Path(image_dir)) for subset in subsets}


def read_subset(path: Path, image_dir: Path) -> list[ChoiceCase]:
    document = require_record(load_json(path, "SugarCrepe subset file"), path, "")
    cases = []
    for key, record in document.items():
        where = f"record {key!r}"
        filename, caption, negative = _check_record(require_record(record, path, where), path, where)
        image = existing_image(image_dir, filename, path, where, "filename")
        cases.append(ChoiceCase(image=image, options=(caption, negative), answer=0))
    if not cases:
        raise DataFormatError(path, "", None, "holds no case")
    return cases


def write_subset(path: Path, records: list[dict]) -> None:
    """Write one subset file: records (dicts with the published fields) keyed "0", "1", ... in order."""
    for index, record in enumerate(records):
        where = f"record {str(index)!r}"
        _check_record(require_record(record, path, where), path, where)
    write_json(path, {str(index): {field: record[field] for field in FIELDS} for index, record in enumerate(records)})


def _check_record(record: dict, path: Path, where: str) -> tuple[str, str, str]:
    return tuple(str_field(record, field, path, where) for field in FIELDS)
