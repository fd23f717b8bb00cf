"""In-memory records every dataset is read into, whatever its on-disk format.

Images are referenced by absolute path; pixels are loaded lazily (see `load_image`)
so a benchmark of thousands of cases costs nothing until it is scored.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image


@dataclass(frozen=True)
class ImageCaption:
    """One training pair (COCO captions, CC-3M, toy world)."""

    image: Path
    caption: str


@dataclass(frozen=True)
class WinogroundTask:
    """One Winoground task: two images, two captions with the same words.

    caption_c is the true caption of image_c.
    """

    id: int
    image_0: Path
    image_1: Path
    caption_0: str
    caption_1: str
    tag: str
    secondary_tag: str
    num_main_preds: int
    collapsed_tag: str  # "Object", "Relation" or "Both"


@dataclass(frozen=True)
class ChoiceCase:
    """One multiple-choice case (ARO VG-Relation, VG-Attribution, COCO/Flickr-Order).

    `options` are scored against the image (cropped to `bbox` = (x, y, w, h) when set);
    the case is right when the strict argmax of the scores is `answer`.
    `group` is the macro-averaging key (relation name, "a_b" attribute pair) or "".
    """

    image: Path
    options: tuple[str, ...]
    answer: int
    group: str = ""
    bbox: tuple[float, float, float, float] | None = None


@dataclass(frozen=True)
class ZeroShotSet:
    """A classification set: images with integer labels, class names and prompt templates.

    Each template holds one "{}" that a class name fills.
    """

    name: str
    images: tuple[Path, ...]
    labels: tuple[int, ...]
    classnames: tuple[str, ...]
    templates: tuple[str, ...]


def load_image(path: Path, bbox: tuple[float, float, float, float] | None = None) -> Image.Image:
    """RGB image from disk, cropped to bbox = (x, y, w, h) when given (ARO's convention)."""
    with Image.open(path) as im:
        image = im.convert("RGB")
    if bbox is not None:
        x, y, w, h = bbox
        image = image.crop((x, y, x + w, y + h))
    return image
