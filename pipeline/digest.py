"""Content digests that key derived outputs (cache tables, checkpoints) to what they were computed from."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Iterable

# Keys of diffusers / transformers config files that name the library or where a model came
# from, not what it computes: a library upgrade must not invalidate every cache.
PROVENANCE_KEYS = {"_diffusers_version", "transformers_version", "_name_or_path", "_commit_hash"}

# fingerprint()'s results in this process, keyed by the folder and each file's name, size and
# modification and change times: the sweep stage checks every sweep file's cache tables against the
# same teacher, and Stable Diffusion's 4.3 GB take seconds to hash. A file written again gets a new
# change time (no call sets it back), so it is hashed again; but a clock that ticks coarsely can give
# two writes within one tick the same times, so a folder with a file changed in the last
# SETTLE_SECONDS is not remembered (git's "racily clean" rule).
_FINGERPRINTS: dict[tuple, str] = {}
SETTLE_SECONDS = 2.0
_now_ns = time.time_ns


def _update(digest, path: Path) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)


def fingerprint(folder: Path) -> str:
    """sha256 over a model folder's files (names and contents), hidden ones aside.

    Every file counts: weights in whatever format, configs (a VAE's `scaling_factor`, for one, lives in
    its config.json) and a tokenizer's merges.txt, which decides the token ids of every cached caption.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    stats = [path.stat() for path in files]
    seen = (str(folder.resolve()),
            *((str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns) for path, st in zip(files, stats)))
    if seen in _FINGERPRINTS:
        return _FINGERPRINTS[seen]
    value = _digest(folder, files)
    if all(_now_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > SETTLE_SECONDS * 1e9 for st in stats):
        _FINGERPRINTS[seen] = value
    return value


def _digest(folder: Path, files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        if path.suffix == ".json":
            config = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(config, dict):
                config = {k: v for k, v in config.items() if k not in PROVENANCE_KEYS}
            digest.update(json.dumps(config, sort_keys=True).encode())
        else:
            _update(digest, path)
    return digest.hexdigest()[:16]


def files_digest(paths: Iterable[Path | str]) -> str:
    """sha256 over files' bytes, in the given order (e.g. the images a table encodes). Not over their
    paths, which name the folder the project lies in: the caller hashes the names it keys them by."""
    digest = hashlib.sha256()
    for path in paths:
        one = hashlib.sha256()       # each file's own digest: file boundaries count
        _update(one, Path(path))
        digest.update(one.digest())
    return digest.hexdigest()[:16]


def text_digest(lines: Iterable[str]) -> str:
    """sha256 over lines of text, in order (e.g. a trial's image-caption pairs)."""
    digest = hashlib.sha256()
    for line in lines:
        digest.update(line.encode() + b"\n")
    return digest.hexdigest()[:16]
