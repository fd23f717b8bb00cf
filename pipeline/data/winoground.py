"""Winoground as published on the Hugging Face hub (`facebook/winoground`).

Layout of a local copy of the dataset repository (checked against its loading script
`winoground.py` and dataset card):
    <root>/data/examples.jsonl   one task per line: id (int), image_0, image_1 (image names
                                 without extension, e.g. "ex_0_img_0"), caption_0, caption_1,
                                 tag, secondary_tag (may be ""), num_main_preds (1 or 2),
                                 collapsed_tag ("Object", "Relation" or "Both")
    <root>/data/images.zip       members images/<name>.png
An extracted copy (<root>/data/images/<name>.png) is read as well and wins over the zip.
Records point at files, so images from the zip are extracted once into a cache folder
next to it (<root>/data/.images.zip.cache/<fingerprint>/images/), keyed on the zip's
member names, sizes and CRCs so a regenerated zip is never served stale.

The hub repo also holds the release as Parquet (`datasets`' layout: data/test-*.parquet, one
row a task, the nine fields with image_0 / image_1 as Image structs {bytes, path});
`release_from_parquet` writes it out in the layout above, so a copy holding only the
Parquet version reads the same.
"""
from __future__ import annotations

import hashlib
import shutil
import zipfile
from io import BytesIO
from pathlib import Path

from PIL import Image

from pipeline.io import temp_dir, write_bytes, write_jsonl
from .errors import (
    DataFormatError,
    MissingDataError,
    enum_field,
    field_value,
    int_field,
    load_jsonl,
    require_record,
    str_field,
)
from .records import WinogroundTask

EXAMPLES = Path("data/examples.jsonl")
PARQUET = "data/test-*.parquet"
IMAGES_ZIP = Path("data/images.zip")
IMAGES_DIR = Path("data/images")
IMAGE_EXTENSION = ".png"
COLLAPSED_TAGS = ("Object", "Relation", "Both")
NUM_MAIN_PREDS = (1, 2)
FIELDS = (
    "id", "image_0", "image_1", "caption_0", "caption_1",
    "tag", "secondary_tag", "num_main_preds", "collapsed_tag",
)
_CACHE = ".images.zip.cache"


def read_winoground(root: Path) -> list[WinogroundTask]:
    """All tasks of a local copy, in file order; every field and image is checked first."""
    examples = root / EXAMPLES
    rows = load_jsonl(examples, "Winoground examples file")
    images = _image_folder(root)
    tasks = [_task(require_record(row, examples, where), examples, where, images) for where, row in rows]
    _check_unique_ids([t.id for t in tasks], [where for where, _ in rows], examples)
    return tasks


def write_winoground(root: Path, tasks: list[dict], extracted: bool = False) -> None:
    """Write tasks in the published layout.

    Each dict holds the nine jsonl fields (image_0/image_1 are image names without
    extension) plus `image_0_pil` / `image_1_pil` (PIL images, stored as PNG).
    By default the images go into data/images.zip like the release; `extracted=True`
    writes the data/images/ folder instead. Writing a zip while data/images/ exists is
    refused, because the folder would shadow the new zip on reading.
    """
    examples = root / EXAMPLES
    lines = [f"line {index + 1}" for index in range(len(tasks))]
    rows = [_published_row(task, examples, where) for task, where in zip(tasks, lines)]
    _check_unique_ids([row["id"] for row in rows], lines, examples)
    pngs = _encoded_images(tasks, examples)
    if extracted:
        for name, data in pngs.items():
            write_bytes(root / IMAGES_DIR / f"{name}{IMAGE_EXTENSION}", data)
    else:
        if (root / IMAGES_DIR).exists():
            raise ValueError(f"{root / IMAGES_DIR} exists and would shadow {root / IMAGES_ZIP}; remove it first")
        write_bytes(root / IMAGES_ZIP, _zip_bytes(pngs))
    write_jsonl(examples, rows)


def parquet_files(root: Path) -> list[Path]:
    """The Parquet shards of a copy of the hub repo, in shard order ([] when it has none)."""
    return sorted(Path(root).glob(PARQUET))


def release_from_parquet(files: list[Path], root: Path) -> None:
    """Write the release layout (data/examples.jsonl + data/images/<name>.png) under `root` from the
    hub's Parquet shards, one row group at a time. An image keeps its file name (its struct's path,
    else ex_<id>_img_<k> as in the release) and its pixels: PNG bytes are written as stored, any
    other format re-encoded as PNG."""
    import pyarrow.parquet as pq

    if not files:
        raise MissingDataError(root / PARQUET, "Winoground's Parquet shards")
    rows, where_of, images = [], [], {}
    for path in files:
        shard = pq.ParquetFile(path)
        missing = [name for name in FIELDS if name not in shard.schema_arrow.names]
        if missing:
            raise DataFormatError(path, "", missing[0], "is missing from the Parquet schema")
        for batch in shard.iter_batches(batch_size=32, columns=list(FIELDS)):
            for record in batch.to_pylist():
                where = f"row {len(rows) + 1}"
                row = dict(record)
                for side in ("image_0", "image_1"):         # the struct becomes the written file's name
                    row[side] = _parquet_image(record, side, path, where, images, root)
                _check_row(row, path, where)
                rows.append(row)
                where_of.append(where)
    _check_unique_ids([row["id"] for row in rows], where_of, files[0])
    write_jsonl(root / EXAMPLES, rows)


def _parquet_image(record: dict, side: str, path: Path, where: str, written: dict[str, str], root: Path) -> str:
    """Write one row's image into data/images/ and return its name (without extension); `written`: the
    digest of each name's pixels so far."""
    image = record.get(side)
    if not isinstance(image, dict) or not isinstance(image.get("bytes"), bytes):
        raise DataFormatError(path, where, side, "holds no image bytes (expected a struct {bytes, path})")
    name = Path(image["path"]).stem if image.get("path") else f"ex_{record.get('id')}_img_{side[-1]}"
    data = image["bytes"]
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        try:                                       # the images are read as RGB (`load_image`)
            data = _png_bytes(Image.open(BytesIO(data)).convert("RGB"))
        except OSError as err:
            raise DataFormatError(path, where, side, f"is not an image PIL reads ({err})") from None
    digest = hashlib.sha256(data).hexdigest()
    if written.setdefault(name, digest) != digest:
        raise DataFormatError(path, where, side, f"reuses name {name!r} for other pixels")
    write_bytes(root / IMAGES_DIR / f"{name}{IMAGE_EXTENSION}", data)
    return name


def _task(row: dict, path: Path, where: str, images: tuple[Path, Path]) -> WinogroundTask:
    _check_row(row, path, where)
    return WinogroundTask(
        id=row["id"],
        image_0=_image(row["image_0"], images, path, where, "image_0"),
        image_1=_image(row["image_1"], images, path, where, "image_1"),
        caption_0=row["caption_0"],
        caption_1=row["caption_1"],
        tag=row["tag"],
        secondary_tag=row["secondary_tag"],
        num_main_preds=row["num_main_preds"],
        collapsed_tag=row["collapsed_tag"],
    )


def _published_row(task: dict, path: Path, where: str) -> dict:
    """The jsonl fields of a writer's task dict, checked like the reader checks them."""
    row = {field: field_value(task, field, path, where) for field in FIELDS}
    _check_row(row, path, where)
    return row


def _check_row(row: dict, path: Path, where: str) -> None:
    int_field(row, "id", path, where)
    for field in ("image_0", "image_1", "caption_0", "caption_1", "tag", "secondary_tag"):
        str_field(row, field, path, where)
    enum_field(row, "num_main_preds", NUM_MAIN_PREDS, path, where)
    enum_field(row, "collapsed_tag", COLLAPSED_TAGS, path, where)


def _check_unique_ids(ids: list[int], wheres: list[str], path: Path) -> None:
    """Scores are reported per task id, so a repeated id would silently merge two tasks."""
    seen: set[int] = set()
    for task_id, where in zip(ids, wheres):
        if task_id in seen:
            raise DataFormatError(path, where, "id", f"repeats task id {task_id}")
        seen.add(task_id)


def _encoded_images(tasks: list[dict], path: Path) -> dict[str, bytes]:
    """PNG bytes per image name; one name given two different images is an error."""
    pngs: dict[str, bytes] = {}
    for index, task in enumerate(tasks):
        for side in ("image_0", "image_1"):
            field = f"{side}_pil"
            image = task.get(field)
            if not isinstance(image, Image.Image):
                raise DataFormatError(path, f"line {index + 1}", field, f"must be a PIL image, got {image!r}")
            data = _png_bytes(image)
            name = task[side]
            if pngs.setdefault(name, data) != data:
                raise DataFormatError(path, f"line {index + 1}", side, f"reuses name {name!r} for other pixels")
    return pngs


def _png_bytes(image: Image.Image) -> bytes:
    buffer = BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _zip_bytes(pngs: dict[str, bytes]) -> bytes:
    """PNGs are already compressed, so they are stored, not deflated again."""
    buffer = BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name in sorted(pngs):
            info = zipfile.ZipInfo(f"images/{name}{IMAGE_EXTENSION}", date_time=(1980, 1, 1, 0, 0, 0))
            archive.writestr(info, pngs[name])
    return buffer.getvalue()


def _image_folder(root: Path) -> tuple[Path, Path]:
    """(folder the image files are read from, the release file they come from)."""
    folder, archive = root / IMAGES_DIR, root / IMAGES_ZIP
    if folder.is_dir():
        return folder, folder
    if archive.is_file():
        with zipfile.ZipFile(archive) as z:
            fingerprint = _fingerprint(z.infolist())
        return _extracted(archive, fingerprint) / "images", archive
    raise MissingDataError(archive, f"Winoground images (neither {IMAGES_ZIP} nor {IMAGES_DIR}/)")


def _image(name: str, images: tuple[Path, Path], examples: Path, where: str, field: str) -> Path:
    folder, source = images
    image = folder / f"{name}{IMAGE_EXTENSION}"
    if not image.is_file():
        raise DataFormatError(examples, where, field, f"names an image not in {source}: {image.name}")
    return image


def _fingerprint(infos: list[zipfile.ZipInfo]) -> str:
    """Names, sizes and CRCs from the zip's directory: changes with any member's bytes, yet
    costs no decompression (mtimes are too coarse on some filesystems to key on)."""
    listing = "".join(f"{i.filename}:{i.file_size}:{i.CRC}\n" for i in infos)
    return hashlib.sha256(listing.encode("utf-8")).hexdigest()[:16]


def _extracted(archive: Path, fingerprint: str) -> Path:
    """Folder holding the zip's contents, extracted once per zip content.

    Extraction goes to a temp folder renamed into place, so a crash or a concurrent
    reader never sees a half-extracted cache; other versions are removed afterwards.
    """
    cache = archive.parent / _CACHE
    target = cache / fingerprint
    if not target.is_dir():
        cache.mkdir(exist_ok=True)
        tmp = temp_dir(cache, ".extract-")
        try:
            with zipfile.ZipFile(archive) as z:
                z.extractall(tmp)
            tmp.rename(target)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not target.is_dir():
                raise
        for stale in cache.iterdir():
            if stale != target and not stale.name.startswith("."):
                shutil.rmtree(stale, ignore_errors=True)
    return target
