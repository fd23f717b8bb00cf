"""MS-COCO captions (`annotations/captions_train2017.json` + `train2017/`), the training set.

Layout of the annotation file (COCO 2017 release):
    {"info": {...}, "licenses": [...],
     "images": [{"id": int, "file_name": str, ...}, ...],
     "annotations": [{"id": int, "image_id": int, "caption": str}, ...]}
`file_name` is relative to the image folder. Each image has ~5 captions; the paper
does not say which one pairs with an image, hence `caption_choice`.
"""
from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path

from pipeline.io import write_json
from .errors import (
    DataFormatError,
    existing_image,
    int_field,
    load_json,
    require_dir,
    require_list,
    require_record,
    str_field,
)
from .records import ImageCaption

CAPTION_CHOICES = ("first", "random", "all")


def read_coco_captions(
    annotations: Path, image_dir: Path, caption_choice: str = "first", seed: int = 0, check_images: bool = True
) -> list[ImageCaption]:
    """Training pairs, images ordered by id.

    caption_choice: "first" = the caption with the lowest annotation id (stable across
    releases), "random" = one caption per image drawn with `seed`, "all" = one pair per
    caption (ordered by image id, then annotation id). Images without captions are skipped.
    Captions are whitespace-stripped: the release has stray trailing spaces and newlines.
    check_images: that each image file exists (one stat per image).
    """
    if caption_choice not in CAPTION_CHOICES:
        raise ValueError(f"caption_choice must be one of {CAPTION_CHOICES}, got {caption_choice!r}")
    require_dir(image_dir, "COCO image folder")
    document = load_json(annotations, "COCO captions file")
    file_names = _image_file_names(document, annotations)
    captions = _captions_by_image(document, annotations, set(file_names))
    rng = random.Random(seed)
    pairs = []
    for image_id in sorted(captions):
        image = (existing_image(image_dir, file_names[image_id], annotations, f"image id {image_id}", "file_name")
                 if check_images else image_dir / file_names[image_id])
        chosen = _choose(captions[image_id], caption_choice, rng)
        pairs.extend(ImageCaption(image=image, caption=caption) for caption in chosen)
    return pairs


def write_coco_captions(path: Path, images: list[tuple[int, str, list[str]]]) -> None:
    """Write (image id, file name relative to the image folder, captions) in the COCO layout.

    Annotation ids are assigned 1, 2, ... in the given order, so "first" reads back the
    first caption listed for each image.
    """
    image_entries, annotation_entries = [], []
    for image_id, file_name, captions in images:
        image_entries.append({"id": image_id, "file_name": file_name})
        for caption in captions:
            annotation_entries.append(
                {"id": len(annotation_entries) + 1, "image_id": image_id, "caption": caption}
            )
    document = {
        "info": {"description": "COCO-format captions written by pipeline.data.coco", "version": "1.0"},
        "licenses": [],
        "images": image_entries,
        "annotations": annotation_entries,
    }
    _check_document(document, path)
    write_json(path, document)


def _check_document(document: dict, path: Path) -> None:
    """Validate with the reader's own checks so a writer cannot emit what the reader rejects."""
    _captions_by_image(document, path, set(_image_file_names(document, path)))


def _image_file_names(document: object, path: Path) -> dict[int, str]:
    entries = _top_level_list(document, "images", path)
    names: dict[int, str] = {}
    for index, entry in enumerate(entries):
        where = f"images[{index}]"
        entry = require_record(entry, path, where)
        image_id = int_field(entry, "id", path, where)
        if image_id in names:
            raise DataFormatError(path, where, "id", f"repeats image id {image_id}")
        names[image_id] = str_field(entry, "file_name", path, where)
    return names


def _captions_by_image(document: object, path: Path, image_ids: set[int]) -> dict[int, list[str]]:
    """Captions per image id, each list in annotation-id order."""
    entries = _top_level_list(document, "annotations", path)
    by_image: dict[int, list[tuple[int, str]]] = defaultdict(list)
    seen: set[int] = set()
    for index, entry in enumerate(entries):
        where = f"annotations[{index}]"
        entry = require_record(entry, path, where)
        annotation_id = int_field(entry, "id", path, where)
        if annotation_id in seen:
            raise DataFormatError(path, where, "id", f"repeats annotation id {annotation_id}")
        seen.add(annotation_id)
        image_id = int_field(entry, "image_id", path, where)
        if image_id not in image_ids:
            raise DataFormatError(path, where, "image_id", f"names no image in 'images', got {image_id}")
        by_image[image_id].append((annotation_id, str_field(entry, "caption", path, where).strip()))
    return {image_id: [c for _, c in sorted(pairs)] for image_id, pairs in by_image.items()}


def _top_level_list(document: object, key: str, path: Path) -> list:
    if not isinstance(document, dict):
        raise DataFormatError(path, "", None, "must be a JSON object with 'images' and 'annotations'")
    if key not in document:
        raise DataFormatError(path, "", key, "is missing")
    return require_list(document[key], path, "", key)


def _choose(captions: list[str], caption_choice: str, rng: random.Random) -> list[str]:
    if caption_choice == "first":
        return captions[:1]
    if caption_choice == "random":
        return [rng.choice(captions)]
    return captions
