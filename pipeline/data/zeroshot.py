"""Zero-shot classification sets stored as a torchvision `ImageFolder` tree plus prompts.

    <root>/<class folder>/<image>.png    any depth below the class folder, ImageFolder's extensions
    <root>/zeroshot.json                 {"name": str,
                                          "classnames": {<class folder>: <prompt name>, ...},
                                          "templates": ["a photo of a {}.", ...]}
Labels follow ImageFolder: the index of the class folder in sorted order, and images
within a class in sorted walk order, so `torchvision.datasets.ImageFolder(root)` sees
the same (image, label) list as `read_image_folder_set(root)`.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from PIL import Image

from pipeline.io import temp_dir, write_json
from .errors import (
    DataFormatError,
    field_value,
    load_json,
    require_dir,
    require_record,
    str_field,
    str_list_field,
)
from .records import ZeroShotSet

META_FILE = "zeroshot.json"
# torchvision.datasets.folder.IMG_EXTENSIONS, compared case-insensitively as there
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def read_image_folder_set(root: Path) -> ZeroShotSet:
    """The set under `root`; class folders and zeroshot.json's classnames must match one to one."""
    require_dir(root, "zero-shot image folder")
    meta_path = root / META_FILE
    meta = require_record(load_json(meta_path, "zero-shot metadata file"), meta_path, "")
    name = str_field(meta, "name", meta_path, "")
    prompt_names = _classnames(meta, meta_path)
    templates = _templates(meta, meta_path)
    folders = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if sorted(prompt_names) != folders:
        missing = sorted(set(folders) - set(prompt_names))
        extra = sorted(set(prompt_names) - set(folders))
        raise DataFormatError(
            meta_path, "", "classnames",
            f"must name exactly the class folders: no entry for {missing}, no folder for {extra}",
        )
    images, labels = [], []
    for label, folder in enumerate(folders):
        files = _class_images(root / folder)
        if not files:
            raise DataFormatError(meta_path, "", "classnames", f"class folder {folder!r} holds no image")
        images.extend(files)
        labels.extend([label] * len(files))
    return ZeroShotSet(
        name=name,
        images=tuple(images),
        labels=tuple(labels),
        classnames=tuple(prompt_names[folder] for folder in folders),
        templates=tuple(templates),
    )


def write_image_folder_set(
    root: Path,
    name: str,
    classnames: list[str],
    templates: list[str],
    images: list[tuple[int, Image.Image]],
) -> None:
    """Write (label, image) pairs as PNGs; label indexes `classnames` (the prompt names).

    Class folders are named "<zero-padded label>_<slug>" so ImageFolder's sorted order
    equals the given label order. The whole tree is built in a temp folder and swapped
    in, so no stale class or image survives a rewrite; an existing `root` is replaced
    only when it holds a zeroshot.json (i.e. was written here), never a foreign folder.
    """
    _check_write_arguments(root, classnames, templates, images)
    width = len(str(len(classnames) - 1))
    folders = [f"{label:0{width}d}_{_slug(classname)}" for label, classname in enumerate(classnames)]
    image_width = len(str(len(images) - 1))
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = temp_dir(root.parent, f".{root.name}.tmp-")
    try:
        for folder in folders:
            (staging / folder).mkdir()
        for index, (label, image) in enumerate(images):
            image.save(staging / folders[label] / f"{index:0{image_width}d}.png", format="PNG")
        write_json(
            staging / META_FILE,
            {"name": name, "classnames": dict(zip(folders, classnames)), "templates": list(templates)},
        )
        _swap_in(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _classnames(meta: dict, path: Path) -> dict[str, str]:
    value = field_value(meta, "classnames", path, "")
    if not isinstance(value, dict) or not value:
        raise DataFormatError(path, "", "classnames", f"must be a non-empty object folder -> name, got {value!r}")
    for folder, prompt_name in value.items():
        if not isinstance(prompt_name, str):
            raise DataFormatError(path, "", "classnames", f"entry {folder!r} must be a string, got {prompt_name!r}")
    return value


def _templates(meta: dict, path: Path) -> list[str]:
    templates = str_list_field(meta, "templates", path, "")
    if not templates:
        raise DataFormatError(path, "", "templates", "must not be empty")
    for index, template in enumerate(templates):
        if template.count("{}") != 1:
            raise DataFormatError(path, "", "templates", f"entry {index} must hold one '{{}}', got {template!r}")
    return templates


def _class_images(folder: Path) -> list[Path]:
    """Image files below a class folder in ImageFolder's order (sorted walk, sorted names)."""
    return [
        Path(directory) / file_name
        for directory, _, file_names in sorted(os.walk(folder, followlinks=True))
        for file_name in sorted(file_names)
        if file_name.lower().endswith(IMAGE_EXTENSIONS)
    ]


def _check_write_arguments(
    root: Path, classnames: list[str], templates: list[str], images: list[tuple[int, Image.Image]]
) -> None:
    if not classnames or len(set(classnames)) != len(classnames):
        raise ValueError(f"classnames must be non-empty and distinct, got {classnames!r}")
    if not templates or any(t.count("{}") != 1 for t in templates):
        raise ValueError(f"templates must be non-empty, each with one '{{}}', got {templates!r}")
    labels = {label for label, _ in images}
    if any(not 0 <= label < len(classnames) for label in labels):
        raise ValueError(f"labels must lie in [0, {len(classnames)}), got {sorted(labels)}")
    empty = [c for label, c in enumerate(classnames) if label not in labels]
    if empty:
        raise ValueError(f"every class needs an image (ImageFolder rejects empty classes): none for {empty}")
    if root.exists() and not (root / META_FILE).is_file():
        raise ValueError(f"{root} exists and holds no {META_FILE}; refusing to replace a folder not written here")


def _slug(classname: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", classname.lower()).strip("_") or "class"


def _swap_in(staging: Path, root: Path) -> None:
    """Replace `root` by `staging` with renames, so no reader ever sees a mix of old and new files."""
    if not root.exists():
        staging.rename(root)
        return
    retired = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.old-"))
    root.rename(retired / root.name)
    staging.rename(root)
    shutil.rmtree(retired, ignore_errors=True)
