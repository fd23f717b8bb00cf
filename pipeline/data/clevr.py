"""CLEVR as the paper's appendix J scores it: GDBench's binary CLEVR tasks (Krojer et al., 2023,
"Are Diffusion Models Vision-And-Language Reasoners?", McGill-NLP/diffusion-itm), whose diffusion
score the paper builds on and whose description it repeats ("images of 3D shapes isolating
phenomena such as spatial reasoning or attribute binding").

    <root>/captions/<subtask>.json   {image filename: [[true caption, false caption], ...]}
                                     (one pair per object of the image; data/clevr/captions/ there)
    <root>/images/<image filename>   CLEVR renderings (zenodo record 8096756, images.zip)

Seven subtasks (`pipeline.config.CLEVR_SUBTASKS`), 574 images and 1,148 cases each. As the
release's `CLEVRDataset` and `utils.evaluate_retrieval` score them: the options are the two
captions in file order with the true one first, and a case is right when `np.argmax` of the two
scores is 0, so a tie counts as right (`pipeline.metrics.clevr_correct`).
"""
from __future__ import annotations

from pathlib import Path

from pipeline.config import CLEVR_SUBTASKS
from pipeline.io import write_json
from .errors import DataFormatError, existing_image, load_json, require_dir, require_list, require_record
from .records import ChoiceCase

CAPTIONS = "captions"
IMAGES = "images"


def subtask_file(root: Path, subtask: str) -> Path:
    return Path(root) / CAPTIONS / f"{subtask}.json"


def read_clevr(root: Path, subtasks: tuple[str, ...] | list[str] = CLEVR_SUBTASKS) -> dict[str, list[ChoiceCase]]:
    """{subtask: cases in file order}; options (true, false), answer 0."""
    images = require_dir(Path(root) / IMAGES, "CLEVR images folder")
    return {subtask: read_subtask(subtask_file(root, subtask), images) for subtask in subtasks}


def read_subtask(path: Path, image_dir: Path) -> list[ChoiceCase]:
    document = require_record(load_json(path, "CLEVR subtask file"), path, "")
    cases = []
    for filename, pairs in document.items():
        where = f"record {filename!r}"
        image = existing_image(image_dir, filename, path, where, "filename")
        cases += [ChoiceCase(image=image, options=tuple(pair), answer=0) for pair in _check_pairs(pairs, path, where)]
    if not cases:
        raise DataFormatError(path, "", None, "holds no case")
    return cases


def write_subtask(path: Path, records: dict[str, list[list[str]]]) -> None:
    """Write one subtask file {image filename: [[true, false], ...]}, checked like the reader checks it."""
    for filename, pairs in require_record(records, path, "").items():
        _check_pairs(pairs, path, f"record {filename!r}")
    write_json(path, {filename: [list(pair) for pair in pairs] for filename, pairs in records.items()})


def _check_pairs(pairs, path: Path, where: str) -> list[list[str]]:
    for index, pair in enumerate(require_list(pairs, path, where, None)):
        if not isinstance(pair, list) or len(pair) != 2 or not all(isinstance(c, str) for c in pair):
            raise DataFormatError(path, where, f"[{index}]", f"must be [true caption, false caption], got {pair!r}")
    return pairs
