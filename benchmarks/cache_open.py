"""What opening a cache table costs as the table grows, against verifying its checksums.

    .venv/bin/python benchmarks/cache_open.py                          # 1k, 10k, 100k rows of 77 x 64 float32
    .venv/bin/python benchmarks/cache_open.py --row-shape 77,768       # SD v1-4's text conditioning (23.7 GB at 100k)

For each row count it writes a table of caption-like keys and random rows (the cache's
own `write_table`, shards of 256 rows as on the paper profile), then times:
- open: `open_table`, what every trial and stage does (the manifest and one stat per
  shard), the median of --repeat opens;
- keys: the first key lookup of an opened table, which reads keys.json (and checks its
  sha256): a trial that maps its captions to rows pays it, a reader of rows by index not;
- verify: `verify_tables`, the sha256 of every shard (what `python -m stages.cache --verify`
  does, and what opening a table did before it checked sizes only).
The shards were just written, so verify reads them from the page cache where they fit:
its figures are hashing speed, a floor for a cold disk. Times are this machine's; the
ratios to the first row count are the measure.
"""
from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline import cli  # noqa: E402


def caption(i: int) -> str:
    """A distinct caption of COCO's typical length (~55 characters)."""
    return f"a photo of {i} people standing next to a red bus on the street"


def measure(root: Path, rows: int, shape: tuple[int, ...], repeat: int) -> dict:
    import torch

    from pipeline.cache import open_table, verify_tables, write_table

    name = f"text-{rows}"
    generator = torch.Generator().manual_seed(0)
    folder = write_table(root, name, [caption(i) for i in range(rows)],
                         lambda keys: torch.randn(len(keys), *shape, generator=generator),
                         shard_size=256, batch_size=256, progress=False)
    opens, lookups = [], []
    for _ in range(repeat):
        start = time.perf_counter()
        table = open_table(root, name)
        opens.append(time.perf_counter() - start)
        table.index(caption(rows - 1))
        lookups.append(time.perf_counter() - start - opens[-1])
    start = time.perf_counter()
    verify_tables(root, [name], progress=False)
    verify = time.perf_counter() - start
    size = sum(p.stat().st_size for p in folder.iterdir())
    shutil.rmtree(folder)
    return {"rows": rows, "shards": len(table._shards), "gb": size / 1e9, "open": statistics.median(opens),
            "keys": statistics.median(lookups), "verify": verify}


def report(results: list[dict], shape: tuple[int, ...]) -> str:
    first = results[0]
    lines = [f"cache table of {'x'.join(map(str, shape))} float32 rows, shards of 256 (times on this machine)",
             f"{'rows':>8} {'shards':>6} {'GB':>7} {'open ms':>8} {'keys ms':>8} {'verify s':>9} {'x':>6}"]
    for r in results:
        lines.append(f"{r['rows']:8d} {r['shards']:6d} {r['gb']:7.2f} {1e3 * r['open']:8.2f} {1e3 * r['keys']:8.1f} "
                     f"{r['verify']:9.2f} {r['verify'] / first['verify']:6.1f}")
    return "\n".join(lines)


def row_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(v < 1 for v in shape):
        raise ValueError(f"--row-shape: {text!r} is not a comma-separated list of positive integers")
    return shape


def main(argv: list[str] | None = None) -> int:
    p = cli.doc_parser(__doc__, "benchmarks/cache_open.py")
    p.add_argument("--rows", type=int, nargs="+", default=[1000, 10000, 100000],
                   help="row counts (default: 1k 10k 100k)")
    p.add_argument("--row-shape", default="77,64", help="shape of one row, comma-separated (default: 77,64)")
    p.add_argument("--repeat", type=int, default=5, help="opens per table; the median is printed (default: 5)")
    args = p.parse_args(argv)
    try:
        shape = row_shape(args.row_shape)
        bad = [v for v in args.rows + [args.repeat] if v < 1]
        if bad:
            raise ValueError(f"--rows/--repeat: {bad[0]} is out of range; allowed: >= 1")
    except ValueError as err:
        p.error(str(err))
    root = Path(tempfile.mkdtemp(prefix="cache-open-"))
    try:
        results = []
        for rows in args.rows:
            results.append(measure(root, rows, shape, args.repeat))
            print(f"  {rows} rows measured", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(report(results, shape))
    return 0


if __name__ == "__main__":
    sys.exit(main())
