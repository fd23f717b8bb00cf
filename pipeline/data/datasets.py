"""The data index: which file in which published format holds each dataset.

The data stage writes `index.json`; every later stage finds its data through it, so the
toy world and the paper's datasets are read by the same readers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import ARO_SETS
from pipeline.data import aro, clevr, coco, mmvp, sugarcrepe, winoground, zeroshot
from pipeline.data.errors import DataFormatError, MissingInput, load_json, require_record, str_list_field
from pipeline.data.mmvp import MMVPPair
from pipeline.data.records import ChoiceCase, ImageCaption, WinogroundTask, ZeroShotSet

INDEX_NAME = "index.json"
# NegCLIP's hard negatives of the training captions, {caption: [negative, ...]}, written by the data stage.
NEGATIVES = "train-negatives.json"

@dataclass
class Benchmarks:
    winoground: list[WinogroundTask]
    aro: dict[str, list[ChoiceCase]] = field(default_factory=dict)
    zeroshot: list[ZeroShotSet] = field(default_factory=list)
    sugarcrepe: dict[str, list[ChoiceCase]] = field(default_factory=dict)
    mmvp: list[MMVPPair] = field(default_factory=list)
    clevr: dict[str, list[ChoiceCase]] = field(default_factory=dict)


def read_index(root: Path) -> dict:
    path = Path(root) / INDEX_NAME
    if not path.is_file():
        raise MissingInput(f"{path}: not found; run the data stage first")
    return load_json(path, "the data stage's index")


def _path(root: Path, value: str) -> Path:
    return (Path(root) / value).resolve()


def train_pairs(root: Path, index: dict, check_images: bool = False) -> list[ImageCaption]:
    """The training pairs the index names.

    The data stage checks that every image exists before it publishes the index
    (`check_images`); the later readers (the models and cache stages, every trial's start)
    do not stat each image again: for COCO's 118k images that costs seconds, and minutes on
    a cluster's shared filesystem. An image deleted since fails where it is loaded.
    """
    spec = index["train"]
    return coco.read_coco_captions(_path(root, spec["annotations"]), _path(root, spec["images"]),
                                   caption_choice=spec.get("caption_choice", "first"), seed=spec.get("seed", 0),
                                   check_images=check_images)


def train_negatives(root: Path, index: dict, pairs: list[ImageCaption]) -> list[list[str]]:
    """The hard-negative captions of each training pair (NegCLIP), from the data stage's table."""
    path = _path(root, index["train"]["negatives"])
    table = require_record(load_json(path, "hard-negative captions"), path, "")
    negatives = []
    for pair in pairs:
        options = str_list_field(table, pair.caption, path, "")
        if not options:
            raise DataFormatError(path, "", pair.caption, "has no hard negative")
        negatives.append(options)
    return negatives


def order_tagger(root: Path, name: str, spec: dict) -> aro.Tagger:
    """An order set's part-of-speech tagger: each caption's own tags (a file under `root`) or a word lexicon."""
    if "tags" in spec:
        path = _path(root, spec["tags"])
        return aro.caption_tagger(load_json(path, f"part-of-speech tags of {name}"), str(path))
    if "lexicon" in spec:
        return aro.lexicon_tagger(spec["lexicon"])
    raise ValueError(f"{INDEX_NAME}: aro.{name}: part-of-speech 'tags' or a 'lexicon' is required")


def benchmarks(root: Path, index: dict) -> Benchmarks:
    tasks = winoground.read_winoground(_path(root, index["winoground"]["root"]))
    sets: dict[str, list[ChoiceCase]] = {}
    for name, spec in index.get("aro", {}).items():
        annotations, images = _path(root, spec["annotations"]), _path(root, spec["images"])
        if name == "vg_relation":
            sets[name] = aro.read_vg_relation(annotations, images)
        elif name == "vg_attribution":
            sets[name] = aro.read_vg_attribution(annotations, images)
        elif name in ("coco_order", "flickr_order"):
            sets[name] = aro.read_order_set(annotations, images, order_tagger(root, name, spec),
                                            seed=spec.get("seed", 0))
        else:
            raise ValueError(f"{INDEX_NAME}: aro.{name}: unknown set; allowed: {', '.join(ARO_SETS)}")
    shots = [zeroshot.read_image_folder_set(_path(root, spec["root"])) for spec in index.get("zeroshot", [])]
    return Benchmarks(tasks, sets, shots, **extra_benchmarks(root, index))


def extra_benchmarks(root: Path, index: dict) -> dict:
    """SugarCrepe, MMVP-VLM and CLEVR, each read when the index has it (absent: not scored).

    Index entries: "sugarcrepe": {"annotations": the subset files' folder, "images", "subsets"},
    "mmvp": {"root", "patterns" (in the file's order)}, "clevr": {"root", "subtasks"}.
    """
    found: dict = {}
    if "sugarcrepe" in index:
        spec = index["sugarcrepe"]
        found["sugarcrepe"] = sugarcrepe.read_sugarcrepe(_path(root, spec["annotations"]), _path(root, spec["images"]),
                                                         spec["subsets"])
    if "mmvp" in index:
        found["mmvp"] = mmvp.read_mmvp(_path(root, index["mmvp"]["root"]), index["mmvp"]["patterns"])
    if "clevr" in index:
        found["clevr"] = clevr.read_clevr(_path(root, index["clevr"]["root"]), index["clevr"]["subtasks"])
    return found
