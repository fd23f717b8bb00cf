"""DVC stage `cache`: VAE latents and text conditioning of the teacher, in checksummed shards.

    python -m stages.cache            # build every table (finished ones are checked and kept)
    python -m stages.cache --verify   # check every table under cache/ against its checksums

A trial opening a table checks only the manifest and the shards' sizes, so its start does
not read the tables (28 GB of text conditioning on the paper profile). `--verify` reads
every byte and compares each shard's sha256 with its manifest: the check for a flipped
byte that left a shard's size unchanged. It builds nothing; a corrupt table is named
(exit 2) and rebuilt by the next run of this stage.
"""
import sys
from pathlib import Path

from pipeline import cli
from pipeline.config import CACHE_DIR, DATA_DIR, MODELS_DIR
from pipeline.data.errors import MissingInput


def body(args, cfg, root):
    if args.verify:
        verify(root / CACHE_DIR)
        return
    from pipeline.digest import fingerprint
    from pipeline.device import resolve_device
    from pipeline.latents import build_cache
    from pipeline.models import teacher_dir
    from pipeline.models.teacher import load_teacher

    folder = teacher_dir(root / MODELS_DIR)
    teacher = load_teacher(folder).to(resolve_device(cfg.compute.device))
    build_cache(cfg, teacher, fingerprint(folder), root / DATA_DIR, root / CACHE_DIR)


def verify(folder: Path) -> None:
    from pipeline.cache import verify_tables

    names = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    if not names:
        raise MissingInput(f"{folder}: no cache tables; run the cache stage first")
    for table in verify_tables(folder, names):
        print(f"{table.name}: {len(table)} rows of {list(table.row_shape)} {table.dtype}: checksums match")


def main(argv=None) -> int:
    return cli.run(__doc__, body, argv, extend=lambda p: p.add_argument(
        "--verify", action="store_true", help="check every table's sha256 against its manifest instead of building"))


if __name__ == "__main__":
    sys.exit(main())
