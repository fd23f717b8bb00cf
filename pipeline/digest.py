"""Content digests that key derived outputs (cache tables, checkpoints) to what they were computed from."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

# Keys of diffusers / transformers config files that name the library or where a model came
# from, not what it computes: a library upgrade must not invalidate every cache.
PROVENANCE_KEYS = {"_diffusers_version", "transformers_version", "_name_or_path", "_commit_hash"}

# fingerprint()'s results in this process, keyed by the folder and each file's name, size and
# modification and change times: the sweep stage checks every sweep file's cache tables against the
# same teacher, and Stable Diffusion's 4.3 GB take seconds to hash. A file written again changes its
# change time (nanoseconds, and no call sets it back), so it is hashed again.
_FINGERPRINTS: dict[tuple, str] = {}


def _update(digest, path: Path) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)


def fingerprint(folder: Path) -> str:
    """sha256 over a model folder's weight and config files (names and contents).

    Configs count: a VAE's `scaling_factor`, for one, lives in its config.json.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.suffix in (".safetensors", ".json") and p.is_file())
    seen = (str(folder.resolve()),
            *((str(p), st.st_size, st.st_mtime_ns, st.st_ctime_ns) for p in files for st in [p.stat()]))
    if seen not in _FINGERPRINTS:
        _FINGERPRINTS[seen] = _digest(folder, files)
    return _FINGERPRINTS[seen]


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
