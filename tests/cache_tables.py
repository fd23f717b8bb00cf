"""Cache tables of given rows, written and opened through `pipeline.cache` as the cache stage does,
so that the trainer and the scorers read them through the real `Table` (memory-mapped shards)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from pipeline.cache import Table, open_table, write_table


def cache_table(root: Path, name: str, keys: Sequence[str], rows: torch.Tensor) -> Table:
    """`rows[i]` under `keys[i]` as the new table `root/name` (one shard, in the rows' dtype)."""
    if (Path(root) / name).exists():  # write_table would keep a finished table of the same keys, whatever its rows
        raise FileExistsError(f"cache table {Path(root) / name} exists already")
    index = {key: i for i, key in enumerate(keys)}
    write_table(root, name, keys, lambda batch: rows[torch.tensor([index[k] for k in batch])],
                shard_size=len(keys), batch_size=len(keys), dtype=rows.dtype, progress=False)
    return open_table(root, name)
