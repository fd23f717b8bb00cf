"""Conceptual Captions 3M (Sharma et al., 2018), the paper's appendix-H training set.

CC-3M is published as URLs; once the images are downloaded (e.g. with img2dataset) it
comes in one of two usual layouts, both read here:
- TSV, open_clip's `CsvDataset` columns: a tab-separated file whose header row names a
  `filepath` and a `title` column (other columns are ignored); `filepath` is relative to
  the TSV's folder or absolute (open_clip opens a relative path from where it was started).
- webdataset: a folder of `*.tar` shards whose members come in pairs `<key>.jpg` (or
  .jpeg, .png, .webp) + `<key>.txt` (the caption), as img2dataset writes them; other
  members (`<key>.json`, ...) are ignored.
`index_cc3m` converts either into the COCO captions layout (`pipeline.data.coco`), so the
later stages read CC-3M with the same reader as COCO. Shards are extracted (records point
at image files): budget the dataset's size again on disk for that layout.
"""
from __future__ import annotations

import csv
import tarfile
from pathlib import Path

from tqdm import tqdm

from .coco import write_coco_captions
from .errors import DataFormatError, MissingDataError, existing_image, utf8_text

TSV_IMAGE, TSV_CAPTION = "filepath", "title"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
CAPTIONS_FILE = "captions_train.json"


def index_cc3m(source: Path, out: Path) -> tuple[Path, Path]:
    """(captions file in the COCO layout under `out`, image folder its file names are relative to)."""
    source = Path(source)
    if source.is_file():
        records, images = read_tsv(source), source.parent
    elif source.is_dir():
        images = out / "images"
        records = extract_webdataset(source, images)
    else:
        raise MissingDataError(source, "CC-3M (a TSV file or a folder of webdataset shards)")
    annotations = out / CAPTIONS_FILE
    write_coco_captions(annotations, records)
    return annotations, images


def read_tsv(path: Path) -> list[tuple[int, str, list[str]]]:
    """(image id, file path as written, captions) per distinct image, in file order."""
    by_image: dict[str, list[str]] = {}
    with utf8_text(path), open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, None)
        if header is None:
            raise DataFormatError(path, "", None, "is empty; expected a header row with 'filepath' and 'title'")
        for column in (TSV_IMAGE, TSV_CAPTION):
            if column not in header:
                raise DataFormatError(path, "line 1", column, f"is missing from the header {header!r}")
        image_col, caption_col = header.index(TSV_IMAGE), header.index(TSV_CAPTION)
        for row in reader:
            where = f"line {reader.line_num}"
            if not row:
                continue
            if len(row) != len(header):
                raise DataFormatError(path, where, None, f"has {len(row)} fields, the header {len(header)}")
            file_path, caption = row[image_col], row[caption_col].strip()
            if not file_path:
                raise DataFormatError(path, where, TSV_IMAGE, "is empty")
            if not caption:
                raise DataFormatError(path, where, TSV_CAPTION, "is empty")
            existing_image(path.parent, file_path, path, where, TSV_IMAGE)
            by_image.setdefault(file_path, []).append(caption)
    if not by_image:
        raise DataFormatError(path, "", None, "holds no records")
    return [(i, name, captions) for i, (name, captions) in enumerate(by_image.items())]


def extract_webdataset(folder: Path, images: Path) -> list[tuple[int, str, list[str]]]:
    """Extract every shard's images to `images/<shard>/` and pair them with their captions."""
    shards = sorted(folder.glob("*.tar"))
    if not shards:
        raise MissingDataError(folder / "*.tar", "CC-3M webdataset shards")
    records = []
    for shard in tqdm(shards, desc="CC-3M shards", leave=False):
        for key, (name, data, caption) in _samples(shard).items():
            target = images / shard.stem / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            records.append((len(records), f"{shard.stem}/{name}", [caption]))
    return records


def _samples(shard: Path) -> dict[str, tuple[str, bytes, str]]:
    """{key: (image file name, image bytes, caption)} of one shard, in member order."""
    images: dict[str, tuple[str, bytes]] = {}
    captions: dict[str, str] = {}
    try:
        archive = tarfile.open(shard)
    except tarfile.TarError as err:
        raise DataFormatError(shard, "", None, f"is not a tar archive ({err})") from None
    with archive:
        for member in archive:
            if not member.isfile():
                continue
            if member.name.startswith("/") or ".." in Path(member.name).parts:
                raise DataFormatError(shard, f"member {member.name!r}", None, "points outside the shard's folder")
            directory, _, base = member.name.rpartition("/")
            stem, dot, extension = base.partition(".")
            key = f"{directory}/{stem}" if directory else stem
            extension = f"{dot}{extension}".lower()
            if extension in IMAGE_EXTENSIONS:
                if key in images:
                    raise DataFormatError(shard, f"sample {key!r}", None, "has two images")
                images[key] = (f"{key}{extension}", archive.extractfile(member).read())
            elif extension == ".txt":
                try:
                    captions[key] = archive.extractfile(member).read().decode("utf-8").strip()
                except UnicodeDecodeError:
                    raise DataFormatError(shard, f"sample {key!r}", "txt", "is not UTF-8 text") from None
    samples = {}
    for key, (name, data) in images.items():
        if key not in captions:
            raise DataFormatError(shard, f"sample {key!r}", "txt", "is missing (no caption for the image)")
        if not captions[key]:
            raise DataFormatError(shard, f"sample {key!r}", "txt", "is empty")
        samples[key] = (name, data, captions[key])
    orphans = sorted(set(captions) - set(images))
    if orphans:
        raise DataFormatError(shard, f"sample {orphans[0]!r}", None,
                              f"has a caption but no image ({', '.join(IMAGE_EXTENSIONS)})")
    return samples
