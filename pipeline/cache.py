"""Tensor cache: tables of one tensor row per string key (VAE latents, teacher text conditioning).

A table is computed once by the cache stage and then read by every training trial and
evaluation, so a silently wrong row would poison every result downstream. Hence:

- Layout: ``root/name/shard-00000.safetensors, ...`` (one tensor ``"rows"`` of up to
  ``shard_size`` rows each), ``root/name/keys.json`` (the keys in row order) and
  ``root/name/manifest.json`` holding the keys' count and sha256, the row shape, the dtype
  and each shard's row count, byte size and sha256. The keys live apart from the manifest
  so that opening a table reads a few kilobytes whatever its row count; they are read
  (and checked against the manifest) when a key is first looked up.
- Every file is written atomically (temp file in the same folder + ``os.replace``) and the
  manifest is written LAST: a folder without a manifest is an unfinished table, never a
  short one. A table written in an earlier format is rebuilt by the next `write_table`.
- Resumable: after each shard ``partial.json`` records the shards done; an interrupted build
  re-run with the same keys and settings verifies and keeps them and computes only the rest.
- Opening a table checks the manifest and every shard's byte size: one stat per shard and
  no read of a shard or of the keys (milliseconds for 100k rows, however large the rows;
  `benchmarks/cache_open.py`). A missing, truncated or extended shard fails with one line
  naming the table, the shard file and how to rebuild.
- Checksums (sha256 of each shard) are verified where reading every byte is paid once: a
  shard is read back and checked right after it is written, `write_table` checks a finished
  table's shards before it reuses them (so the cache stage rebuilds a corrupt table), and
  `python -m stages.cache --verify` checks every table of the cache stage on demand. A
  flipped byte that leaves a shard's size unchanged is found there, not when a trial
  opens the table.

"Settings" are the keys (by hash), dtype, shard size, description and ``meta``; a change to
any of them rebuilds the table, so put everything that determines the rows (model id,
resolution, scaling factor, ...) into ``meta``. The row shape is only known once ``compute``
has run: a resumed build whose rows change shape discards the kept shards, but a finished
table is not re-checked against it (that would mean calling ``compute``).

Memory behaviour of reads: a shard is opened with ``safe_open`` on first use and its
``"rows"`` tensor kept for the table's lifetime. With safetensors 0.8 on CPU that tensor is
backed by a memory map of the file, not a copy (measured: 1 ms and ~4 MB resident to open
an 80 MB shard), and it stays valid after the handle is closed. ``rows()`` gathers with one
``index_select`` per shard touched, so only the pages holding the requested rows are read;
resident memory grows with the pages touched, as clean file-backed pages the OS can drop
under pressure, not as private copies (were a future safetensors to copy instead, each
touched shard would be loaded once and kept). ``all()`` copies the whole table into one
new tensor. Returned tensors are always new: writing to them never reaches the files.

One writer per table at a time: concurrent builds of the same table are not supported.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from tqdm import tqdm

from pipeline.data.errors import PicklesWhole, one_line
from pipeline.io import write_bytes, write_json

__all__ = ["CacheError", "Table", "open_table", "verify_tables", "write_table"]

log = logging.getLogger(__name__)

FORMAT = 2
MANIFEST = "manifest.json"
KEYS = "keys.json"
PARTIAL = "partial.json"
TENSOR = "rows"
_SHARD_RE = re.compile(r"shard-\d{5,}\.safetensors")


class CacheError(PicklesWhole, RuntimeError):
    """A cache table is missing, unfinished, corrupt or inconsistent; one line naming table and file."""

    def __init__(self, table: str, path: Path | str, problem: str) -> None:
        self.arguments = (table, path, problem)
        self.path = Path(path)
        super().__init__(f"cache table {table!r}: {path}: {problem}")


# --------------------------------------------------------------------------- writing


def write_table(
    root: Path,
    name: str,
    keys: Sequence[str],
    compute: Callable[[list[str]], torch.Tensor],
    shard_size: int,
    batch_size: int,
    dtype: torch.dtype = torch.float32,
    description: str = "",
    meta: dict | None = None,
    progress: bool = True,
) -> Path:
    """Build table ``root/name`` from ``compute(batch_keys)`` unless an identical finished one exists.

    Returns the table folder. Idempotent: a finished table with the same settings whose
    shards all verify is left untouched (``compute`` is not called). An interrupted build
    with the same settings is resumed after its last verified shard.
    """
    keys = _checked_keys(keys)
    _check_positive(shard_size=shard_size, batch_size=batch_size)
    folder = Path(root) / _checked_name(name)
    settings = _settings(keys, shard_size, dtype, description, meta)
    if _is_finished(folder, name, settings):
        _remove_strays(folder, len(keys), shard_size)
        return folder
    # Drop a stale manifest before touching any shard, so a crash mid-rebuild can never
    # leave an old manifest describing new shard files.
    (folder / MANIFEST).unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    kept, row_shape, batches = _resume(folder, name, keys, settings, compute, batch_size, dtype)
    writer = _ShardWriter(folder, name, settings, kept, row_shape)
    with tqdm(total=len(keys), initial=writer.rows_written, unit="row", desc=f"cache {name}",
              disable=not progress) as bar:
        for rows in batches:
            writer.add(rows)
            bar.update(len(rows))
    writer.finish()
    _write_manifest(folder, name, keys, settings, writer.shards, writer.row_shape)
    _remove_strays(folder, len(keys), shard_size)
    log.info("cache table %r: wrote %d rows in %d shards to %s", name, len(keys), len(writer.shards), folder)
    return folder


def _checked_keys(keys: Sequence[str]) -> list[str]:
    """Keys as a list; non-empty, all strings, unique (a duplicate would make `index` ambiguous)."""
    if isinstance(keys, str):
        raise TypeError("keys must be a sequence of strings, got a single string")
    keys = list(keys)
    if not keys:
        raise ValueError("keys must not be empty (a table needs at least one row to know its row shape)")
    seen: set[str] = set()
    for key in keys:
        if not isinstance(key, str):
            raise TypeError(f"keys must be strings, got {key!r}")
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen.add(key)
    return keys


def _check_positive(**values: int) -> None:
    """Reject zero, negative, bool or non-int sizes before any file is touched."""
    for label, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{label} must be a positive integer, got {value!r}")


def _checked_name(name: str) -> str:
    """A plain folder name, so a table can never be written outside ``root``."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ValueError(f"table name must be a plain folder name, got {name!r}")
    return name


def _settings(keys: list[str], shard_size: int, dtype: torch.dtype, description: str, meta: dict | None) -> dict:
    """Everything (besides row shape) that must match for existing shards to be reused."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
    if not isinstance(description, str):
        raise TypeError(f"description must be a string, got {description!r}")
    if meta is not None and not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict, got {meta!r}")
    try:  # normalise through JSON (tuples -> lists) so it compares equal to what is read back
        meta_json = json.loads(json.dumps(meta or {}, sort_keys=True))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"meta must be JSON-serialisable: {exc}") from None
    return {
        "keys_sha256": _keys_sha256(keys),
        "num_rows": len(keys),
        "shard_size": shard_size,
        "dtype": _dtype_name(dtype),
        "description": description,
        "meta": meta_json,
    }


def _is_finished(folder: Path, name: str, settings: dict) -> bool:
    """True when a manifest exists for exactly these settings and every shard verifies."""
    if not (folder / MANIFEST).exists():
        return False
    try:
        manifest = _load_manifest(folder, name, verify=True)
    except CacheError as exc:
        log.warning("%s -- rebuilding", exc)
        return False
    changed = [field for field, value in settings.items() if manifest.get(field) != value]
    if changed:
        log.info("cache table %r: %s changed since the last build; rebuilding", name, ", ".join(changed))
        return False
    log.info("cache table %r is up to date (%d rows); nothing to do", name, settings["num_rows"])
    return True


def _resume(
    folder: Path, name: str, keys: list[str], settings: dict,
    compute: Callable[[list[str]], torch.Tensor], batch_size: int, dtype: torch.dtype,
) -> tuple[list[dict], tuple[int, ...] | None, Iterator[torch.Tensor]]:
    """(shards kept from an interrupted build, their row shape, batches still to compute).

    The first remaining batch is computed here when shards are kept, because only then is
    the row shape known; if it differs from the kept shards', they are discarded.
    """
    kept, row_shape = _kept_shards(folder, name, settings)
    start = sum(s["rows"] for s in kept)
    batches = _computed_batches(name, keys, start, batch_size, compute, dtype)
    if not kept or start == len(keys):
        return kept, row_shape, batches
    first = next(batches)
    if tuple(first.shape[1:]) == row_shape:
        return kept, row_shape, itertools.chain([first], batches)
    log.info("cache table %r: discarding %d shards of an interrupted build: row shape changed from %s to %s",
             name, len(kept), list(row_shape or ()), list(first.shape[1:]))
    (folder / PARTIAL).unlink(missing_ok=True)
    return [], None, _computed_batches(name, keys, 0, batch_size, compute, dtype)


def _kept_shards(folder: Path, name: str, settings: dict) -> tuple[list[dict], tuple[int, ...] | None]:
    """Verified shards recorded by an interrupted build with the same settings (longest good prefix)."""
    path = folder / PARTIAL
    if not path.exists():
        return [], None
    try:
        partial = json.loads(path.read_text(encoding="utf-8"))
        recorded, shards, row_shape = partial["settings"], partial["shards"], partial["row_shape"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("cache table %r: ignoring unreadable %s (%s)", name, path, one_line(exc))
        path.unlink(missing_ok=True)
        return [], None
    problem = _entries_problem(shards, settings["shard_size"], settings["num_rows"], complete=False)
    if recorded != settings or problem or not _is_row_shape(row_shape):
        log.info("cache table %r: discarding %d shards of an interrupted build: keys or settings changed",
                 name, len(shards) if isinstance(shards, list) else 0)
        path.unlink(missing_ok=True)
        return [], None
    kept = list(itertools.takewhile(lambda s: _shard_problem(folder / s["file"], s, verify=True) is None, shards))
    if len(kept) < len(shards):
        log.warning("cache table %r: shard %s of an interrupted build does not verify; recomputing from there",
                    name, shards[len(kept)]["file"])
    log.info("cache table %r: resuming after %d verified shards", name, len(kept))
    return kept, (tuple(row_shape) if kept else None)


def _computed_batches(
    name: str, keys: list[str], start: int, batch_size: int,
    compute: Callable[[list[str]], torch.Tensor], dtype: torch.dtype,
) -> Iterator[torch.Tensor]:
    """Rows for keys[start:], one checked batch at a time (lazily, so a crash loses at most one shard)."""
    for lo in range(start, len(keys), batch_size):
        yield _computed_rows(name, keys[lo:lo + batch_size], compute, dtype)


def _computed_rows(
    name: str, batch: list[str], compute: Callable[[list[str]], torch.Tensor], dtype: torch.dtype,
) -> torch.Tensor:
    """compute(batch) as contiguous CPU `dtype` rows, rejecting wrong counts and non-finite values.

    Non-finite values are checked after the cast, because e.g. float16 overflows to inf.
    """
    out = compute(list(batch))
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"cache table {name!r}: compute must return a torch.Tensor, got {type(out).__name__}")
    if out.ndim < 1 or out.shape[0] != len(batch):
        raise ValueError(f"cache table {name!r}: compute returned shape {list(out.shape)} "
                         f"for a batch of {len(batch)} keys starting at {batch[0]!r}")
    rows = out.detach().to(device="cpu", dtype=dtype).contiguous()
    finite = torch.isfinite(rows).reshape(len(batch), -1).all(dim=1)
    if not bool(finite.all()):
        bad = batch[int(torch.nonzero(~finite)[0, 0])]
        raise ValueError(f"cache table {name!r}: compute returned non-finite values (as {dtype}) for key {bad!r}")
    return rows


class _ShardWriter:
    """Buffers computed rows and writes each shard once full, recording progress after each.

    Memory: at most one shard plus one batch of rows is held at a time.
    """

    def __init__(self, folder: Path, name: str, settings: dict, kept: list[dict],
                 row_shape: tuple[int, ...] | None) -> None:
        self.folder = folder
        self.name = name
        self.settings = settings
        self.shards = list(kept)
        self.row_shape = row_shape
        self.rows_written = sum(s["rows"] for s in kept)
        self._pending: list[torch.Tensor] = []
        self._pending_rows = 0

    def add(self, rows: torch.Tensor) -> None:
        """Queue a batch; write every shard it completes."""
        shape = tuple(rows.shape[1:])
        if self.row_shape is None:
            self.row_shape = shape
        elif shape != self.row_shape:
            raise ValueError(f"cache table {self.name!r}: compute returned rows of shape {list(shape)} "
                             f"after rows of shape {list(self.row_shape)}")
        self._pending.append(rows)
        self._pending_rows += len(rows)
        while self._pending_rows >= self.settings["shard_size"]:
            self._flush(self.settings["shard_size"])

    def finish(self) -> None:
        """Write the last, possibly short, shard."""
        if self._pending_rows:
            self._flush(self._pending_rows)

    def _flush(self, count: int) -> None:
        buffered = torch.cat(self._pending) if len(self._pending) > 1 else self._pending[0]
        rows, rest = buffered[:count].contiguous(), buffered[count:]
        self._pending = [rest] if len(rest) else []
        self._pending_rows = len(rest)
        self.shards.append(_write_shard(self.folder, len(self.shards), self.rows_written, rows))
        self.rows_written += count
        write_json(self.folder / PARTIAL, {
            "format": FORMAT, "name": self.name, "settings": self.settings,
            "row_shape": list(self.row_shape or ()), "shards": self.shards,
        })


def _write_shard(folder: Path, index: int, first_key_index: int, rows: torch.Tensor) -> dict:
    """Write one shard atomically and read it back; its manifest entry (checksum of the exact bytes written)."""
    data = save({TENSOR: rows})
    file = _shard_file(index)
    write_bytes(folder / file, data)
    entry = {"file": file, "rows": len(rows), "sha256": hashlib.sha256(data).hexdigest(),
             "bytes": len(data), "first_key_index": first_key_index}
    problem = _shard_problem(folder / file, entry, verify=True)
    if problem:
        raise CacheError(folder.name, folder / file, f"{problem} right after it was written (disk or filesystem error?)")
    return entry


def _write_manifest(folder: Path, name: str, keys: list[str], settings: dict, shards: list[dict],
                    row_shape: tuple[int, ...] | None) -> None:
    """The keys, then the manifest, written last: its presence is what marks the table finished."""
    write_bytes(folder / KEYS, _keys_bytes(keys))
    write_json(folder / MANIFEST, {
        "format": FORMAT,
        "name": name,
        "description": settings["description"],
        "meta": settings["meta"],
        "row_shape": list(row_shape or ()),
        "dtype": settings["dtype"],
        "num_rows": len(keys),
        "shard_size": settings["shard_size"],
        "shards": shards,
        "keys_sha256": settings["keys_sha256"],
    })


def _remove_strays(folder: Path, num_rows: int, shard_size: int) -> None:
    """Delete the progress file, temp files of killed writes and shards beyond the finished table's.

    Only files matching the cache's own name patterns are touched.
    """
    (folder / PARTIAL).unlink(missing_ok=True)
    keep = {_shard_file(i) for i in range(math.ceil(num_rows / shard_size))}
    for path in folder.iterdir():
        temp = path.name.startswith(".") and path.name.endswith(".tmp")
        stale_shard = _SHARD_RE.fullmatch(path.name) is not None and path.name not in keep
        if path.is_file() and (temp or stale_shard):
            log.info("cache table %r: removing leftover %s", folder.name, path)
            path.unlink()


# --------------------------------------------------------------------------- reading


class Table:
    """A finished, checked cache table; rows are read from memory-mapped shards on demand.

    Pickling drops the mapped shards (they are re-mapped on first use), so DataLoader
    workers started with "spawn" map the files themselves instead of receiving a copy.
    """

    def __init__(self, name: str, folder: Path, manifest: dict) -> None:
        self.name: str = name
        self.row_shape: tuple[int, ...] = tuple(manifest["row_shape"])
        self.dtype: torch.dtype = _dtype_from_name(manifest["dtype"])
        self.meta: dict = manifest["meta"]
        self.description: str = manifest["description"]
        self.folder: Path = folder          # the table's own folder (root/name)
        self._num_rows: int = manifest["num_rows"]
        self._keys_sha256: str = manifest["keys_sha256"]
        self._shards: list[dict] = manifest["shards"]
        self._starts = torch.tensor([s["first_key_index"] for s in self._shards], dtype=torch.int64)
        self._keys: list[str] = []
        self._index: dict[str, int] | None = None  # keys and index are loaded together, on first use
        self._views: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self._num_rows

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_views"], state["_keys"], state["_index"] = {}, [], None
        return state

    @property
    def keys(self) -> list[str]:
        """Every key in row order (read from keys.json and checked on first use)."""
        self._load_keys()
        return self._keys

    def index(self, key: str) -> int:
        """Row index of `key`."""
        self._load_keys()
        try:
            return self._index[key]
        except KeyError:
            # Not a bug here: the data stage ran again after the cache stage (by hand), so a training
            # caption or benchmark image is one the tables were not encoded for.
            raise CacheError(self.name, self.folder, f"has no row for {key!r}: the data changed since the cache "
                             "stage encoded it; re-run the cache stage (dvc repro cache, or python -m stages.cache)") \
                from None

    def _load_keys(self) -> None:
        if self._index is None:
            self._keys = _read_keys(self.folder, self.name, self._keys_sha256, self._num_rows)
            self._index = {key: i for i, key in enumerate(self._keys)}

    def rows(self, indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Rows at `indices` (any order, repeats allowed), as a new [len(indices), *row_shape] tensor.

        Indices are sorted once, so each shard touched costs one slice and one `index_select`
        (reading its rows in file order), and one `index_copy_` puts rows back in the
        requested order: no per-row Python work.
        """
        idx = self._checked_indices(indices)
        if not len(idx):
            return torch.empty((0, *self.row_shape), dtype=self.dtype)
        order = torch.argsort(idx)
        ordered = idx[order]
        shards, counts = torch.unique_consecutive(
            torch.searchsorted(self._starts, ordered, right=True) - 1, return_counts=True)
        parts, lo = [], 0
        for shard, count in zip(shards.tolist(), counts.tolist()):
            local = ordered[lo:lo + count] - self._shards[shard]["first_key_index"]
            parts.append(self._view(shard).index_select(0, local))
            lo += count
        gathered = torch.cat(parts) if len(parts) > 1 else parts[0]
        return torch.empty_like(gathered).index_copy_(0, order, gathered)

    def get(self, keys: Sequence[str]) -> torch.Tensor:
        """Rows of `keys`, in that order."""
        if isinstance(keys, str):
            raise TypeError(f"cache table {self.name!r}: get takes a sequence of keys, got a single string")
        return self.rows(torch.tensor([self.index(key) for key in keys], dtype=torch.int64))

    def all(self) -> torch.Tensor:
        """Every row in key order, copied into one tensor (memory: the whole table)."""
        return torch.cat([self._view(shard) for shard in range(len(self._shards))])

    def _checked_indices(self, indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
        idx = torch.as_tensor(indices, device="cpu")
        if idx.ndim != 1:
            raise ValueError(f"cache table {self.name!r}: indices must be 1-D, got shape {list(idx.shape)}")
        if idx.numel() == 0:
            return idx.to(torch.int64)
        if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
            raise TypeError(f"cache table {self.name!r}: indices must be integers, got {idx.dtype}")
        idx = idx.to(torch.int64)
        low, high = int(idx.min()), int(idx.max())
        if low < 0 or high >= len(self):
            bad = low if low < 0 else high
            raise IndexError(f"cache table {self.name!r}: row index {bad} out of range for {len(self)} rows")
        return idx

    def _view(self, shard: int) -> torch.Tensor:
        """The memory-mapped rows of `shard`, mapped on first use and kept."""
        view = self._views.get(shard)
        if view is None:
            view = self._views[shard] = self._map(shard)
        return view

    def _map(self, shard: int) -> torch.Tensor:
        entry = self._shards[shard]
        path = self.folder / entry["file"]
        try:
            with safe_open(path, framework="pt") as f:
                view = f.get_tensor(TENSOR)
        except (SafetensorError, OSError) as exc:
            raise CacheError(self.name, path, f"unreadable shard ({one_line(exc)}); {_rebuild_hint(self.folder)}") from None
        expected = (entry["rows"], *self.row_shape)
        if tuple(view.shape) != expected or view.dtype != self.dtype:
            raise CacheError(self.name, path, f"holds {view.dtype} {list(view.shape)}, manifest says "
                             f"{self.dtype} {list(expected)}; {_rebuild_hint(self.folder)}")
        return view


def open_table(root: Path, name: str, verify: bool = False) -> Table:
    """The finished table ``root/name``, checked against its manifest.

    Checks the manifest's consistency and every shard's byte size (a stat each: the cost
    does not grow with the table's bytes); with `verify` also each shard's sha256, which
    reads the whole table (`verify_tables`).
    """
    folder = Path(root) / _checked_name(name)
    return Table(name, folder, _load_manifest(folder, name, verify))


def verify_tables(root: Path, names: Sequence[str], progress: bool = True) -> list[Table]:
    """Open each table ``root/name`` and check every shard's sha256 (reads every byte once).

    Raises CacheError naming the first table and shard that does not match its manifest.
    """
    folders = [Path(root) / _checked_name(name) for name in names]
    total = sum(_manifest_bytes(folder) for folder in folders)
    with tqdm(total=total, unit="B", unit_scale=True, desc="verify cache", disable=not progress) as bar:
        tables = []
        for name, folder in zip(names, folders):
            manifest = _load_manifest(folder, name, verify=False)
            _read_keys(folder, name, manifest["keys_sha256"], manifest["num_rows"])
            for entry in manifest["shards"]:
                problem = _shard_problem(folder / entry["file"], entry, verify=True)
                if problem:
                    raise CacheError(name, folder / entry["file"], f"{problem}; {_rebuild_hint(folder)}")
                bar.update(entry["bytes"])
            tables.append(Table(name, folder, manifest))
    return tables


def _manifest_bytes(folder: Path) -> int:
    """The bytes a table's manifest lists (0 when it cannot be read: opening it reports why)."""
    try:
        return sum(s["bytes"] for s in json.loads((folder / MANIFEST).read_text(encoding="utf-8"))["shards"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _load_manifest(folder: Path, name: str, verify: bool) -> dict:
    """The parsed manifest after checking its consistency and every shard file (CacheError otherwise)."""
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CacheError(name, path, "not found or not finished: run the cache stage") from None
    except (OSError, ValueError) as exc:
        raise CacheError(name, path, f"unreadable manifest ({one_line(exc)}); {_rebuild_hint(folder)}") from None
    problem = _manifest_problem(manifest)
    if problem:
        raise CacheError(name, path, f"inconsistent manifest: {problem}; {_rebuild_hint(folder)}")
    for entry in manifest["shards"]:
        shard_path = folder / entry["file"]
        problem = _shard_problem(shard_path, entry, verify)
        if problem:
            raise CacheError(name, shard_path, f"{problem}; {_rebuild_hint(folder)}")
    if verify:
        _read_keys(folder, name, manifest["keys_sha256"], manifest["num_rows"])
    return manifest


def _read_keys(folder: Path, name: str, sha256: str, num_rows: int) -> list[str]:
    """The keys of a table, checked against its manifest (CacheError otherwise)."""
    path = folder / KEYS
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CacheError(name, path, f"unreadable keys ({one_line(exc)}); {_rebuild_hint(folder)}") from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise CacheError(name, path, f"keys do not match the manifest's keys_sha256; {_rebuild_hint(folder)}")
    keys = json.loads(data)
    if len(keys) != num_rows or len(set(keys)) != num_rows:
        raise CacheError(name, path, f"{len(keys)} keys, {len(set(keys))} distinct, for {num_rows} rows; "
                                     f"{_rebuild_hint(folder)}")
    return keys


def _manifest_problem(manifest: Any) -> str | None:
    """The first inconsistency in a parsed manifest, or None; a hand-edited or foreign file is not trusted."""
    if not isinstance(manifest, dict):
        return "not a JSON object"
    if manifest.get("format") != FORMAT:
        return f"format is {manifest.get('format')!r}, expected {FORMAT}"
    num_rows = manifest.get("num_rows")
    if not isinstance(num_rows, int) or isinstance(num_rows, bool) or num_rows < 1:
        return f"bad num_rows {num_rows!r}"
    if not isinstance(manifest.get("keys_sha256"), str):
        return "'keys_sha256' must be a string"
    if not isinstance(manifest.get("dtype"), str) or _dtype_from_name(manifest["dtype"]) is None:
        return f"unknown dtype {manifest.get('dtype')!r}"
    if not _is_row_shape(manifest.get("row_shape")):
        return f"bad row_shape {manifest.get('row_shape')!r}"
    if not isinstance(manifest.get("meta"), dict) or not isinstance(manifest.get("description"), str):
        return "'meta' must be an object and 'description' a string"
    shard_size = manifest.get("shard_size")
    if not isinstance(shard_size, int) or isinstance(shard_size, bool) or shard_size < 1:
        return f"bad shard_size {shard_size!r}"
    return _entries_problem(manifest.get("shards"), shard_size, num_rows, complete=True)


def _entries_problem(shards: Any, shard_size: int, num_rows: int, complete: bool) -> str | None:
    """Whether shard entries tile rows 0.. in order with the fixed file names (all rows when `complete`)."""
    if not isinstance(shards, list):
        return "'shards' must be a list"
    for i, entry in enumerate(shards):
        first = i * shard_size
        expected = {"file": _shard_file(i), "first_key_index": first, "rows": min(shard_size, num_rows - first)}
        if (not isinstance(entry, dict) or any(entry.get(f) != v for f, v in expected.items())
                or expected["rows"] < 1 or not isinstance(entry.get("sha256"), str)
                or not isinstance(entry.get("bytes"), int)):
            return f"shard entry {i} does not match the expected layout {expected}"
    if complete and len(shards) != math.ceil(num_rows / shard_size):
        return f"{len(shards)} shards listed for {num_rows} rows of {shard_size} per shard"
    return None


def _shard_problem(path: Path, entry: dict, verify: bool) -> str | None:
    """Why the shard file does not match its entry, or None. Size first: free and catches truncation."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "shard file is missing"
    if size != entry["bytes"]:
        return f"shard is corrupt or truncated: {size} bytes, manifest says {entry['bytes']}"
    if verify and _file_sha256(path) != entry["sha256"]:
        return "shard is corrupt or truncated: sha256 does not match the manifest"
    return None


# --------------------------------------------------------------------------- helpers


def _shard_file(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def _keys_bytes(keys: list[str]) -> bytes:
    """The keys as keys.json holds them; JSON keeps keys containing separators unambiguous."""
    return json.dumps(keys, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _keys_sha256(keys: list[str]) -> str:
    """Hash of the keys in order: the sha256 of keys.json."""
    return hashlib.sha256(_keys_bytes(keys)).hexdigest()


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str) -> torch.dtype | None:
    dtype = getattr(torch, name, None)
    return dtype if isinstance(dtype, torch.dtype) else None


def _is_row_shape(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value)


def _rebuild_hint(folder: Path) -> str:
    # The stage rebuilds a table it finds broken (`_is_finished`): nothing to delete by hand.
    return f"re-run the cache stage, which rebuilds {folder}"


