"""Cache keys of benchmark and training images, and the (image, caption) pairs each benchmark scores.

The cache stage stores one teacher latent per key and every scorer reads them back by key, so the
pairs a benchmark scores are spelled out once, here, for both.

A key names its image relative to the folder the image belongs to, so that checkouts of the
project in different folders (or on different machines) write byte-identical cache tables and
each can read the other's:
- an image under a data root (the folder the data stage writes, holding index.json) is named
  relative to it: "winoground/data/images/ex_0_img_0.png";
- an image under no data root but inside the project (the folder holding params.yaml): the
  paper profile's datasets given by a relative path such as `datasets/coco/train2017`, is named
  relative to the project: "datasets/coco/train2017/000000000009.jpg";
- any other image keeps its absolute path: a dataset given by an absolute path outside the
  project, one given by a relative path that leaves the project ("../coco"), one reached through
  a symbolic link (the data stage indexes where the link leads).
A crop adds "#bbox=x,y,w,h".
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

from pipeline.data.datasets import INDEX_NAME
from pipeline.data.mmvp import MMVPPair, prompt
from pipeline.data.records import ChoiceCase, WinogroundTask

PROJECT_FILE = "params.yaml"
BBOX = "#bbox="
Box = tuple[float, float, float, float]


class ImageKey(str):
    """An image's cache key: the string a table stores and is looked up by, holding also the file
    and crop box it was made from, so that what loads the pixels of a key (the cache stage, the
    scorers) needs no data root."""

    file: Path
    bbox: Box | None

    def __new__(cls, name: str, file: Path, bbox: Box | None = None) -> "ImageKey":
        key = super().__new__(cls, name)
        key.file, key.bbox = file, bbox
        return key

    def __reduce__(self):
        return ImageKey, (str(self), self.file, self.bbox)


def image_key(path, bbox=None) -> ImageKey:
    """The cache key of an image (and crop): one latent per distinct crop, named as the module
    says. The box is written exactly (`repr` round-trips a float)."""
    file = os.fspath(path)
    if not os.path.isabs(file):
        path = file = os.path.abspath(file)
    base = _key_base(file.rpartition("/")[0])
    name = file[len(base):].lstrip("/") if base else file
    if bbox is not None:
        bbox = tuple(float(v) for v in bbox)
        name += BBOX + ",".join(repr(v) for v in bbox)
    return ImageKey(name, path if isinstance(path, Path) else Path(file), bbox)


def parse_image_key(key: str) -> tuple[Path, Box | None]:
    """The file and crop box of a key made by `image_key`. A key read back from a table is only its
    name: an absolute one is its own file; make a relative one a key again with
    `image_key(<the data root or project it is relative to> / name)`."""
    if isinstance(key, ImageKey):
        return key.file, key.bbox
    name, _, box = key.partition(BBOX)
    if not Path(name).is_absolute():
        raise ValueError(f"image key {key!r} is relative to the data root or the project it was made under; "
                         "make it with image_key(<that folder> / key)")
    return Path(name), (tuple(float(v) for v in box.split(",")) if box else None)


@functools.lru_cache(maxsize=4096)
def _key_base(folder: str) -> str | None:
    """The nearest folder at or above `folder` holding a data root's index or the project's params
    file (None: neither). Looked up once per folder: the images of a folder share it, and COCO's
    118k images are one folder (a stat per image would cost minutes on a cluster's filesystem)."""
    for candidate in (folder, *map(str, Path(folder).parents)):
        if any(os.path.isfile(os.path.join(candidate, name)) for name in (INDEX_NAME, PROJECT_FILE)):
            return candidate
    return None


def winoground_pairs(tasks: list[WinogroundTask]) -> tuple[list[str], list[str]]:
    """Image keys and captions for scores[i, c, k], flattened in (i, c, k) order."""
    images, captions = [], []
    for task in tasks:
        for caption in (task.caption_0, task.caption_1):
            for image in (task.image_0, task.image_1):
                images.append(image_key(image))
                captions.append(caption)
    return images, captions


def choice_pairs(cases: list[ChoiceCase]) -> tuple[list[str], list[str]]:
    images, captions = [], []
    for case in cases:
        for option in case.options:
            images.append(image_key(case.image, case.bbox))
            captions.append(option)
    return images, captions


def mmvp_pairs(pairs: list[MMVPPair]) -> tuple[list[str], list[str]]:
    """Image keys and prompts for scores[i, k, j] (statement k of pair i with its image j), flattened in
    (i, k, j) order; each statement is scored in the release's prompt, "a photo of <statement>"."""
    images, captions = [], []
    for pair in pairs:
        for statement in (pair.statement_1, pair.statement_2):
            for image in (pair.image_1, pair.image_2):
                images.append(image_key(image))
                captions.append(prompt(statement))
    return images, captions
