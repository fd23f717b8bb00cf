"""Atomic file and folder writes: a reader never sees a half-written output."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


def check_writable(path: Path, key: str, folder: bool = False) -> None:
    """Refuse, before any work, an output `path` (a file, or a `folder`) that could not be written: a
    file in the way, the wrong kind of entry there, a folder it cannot be created or renamed into. Found
    at the end, it would cost the run it was to record. Creates nothing; `key` names the option or setting.
    """
    from pipeline.config import ConfigError

    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        raise ConfigError(f"{key}: {path} is a {'file' if folder else 'folder'}; expected a "
                          f"{'folder' if folder else 'file'} there")
    # A file is written as a temp file renamed over it (`write_bytes`): its folder must take new entries.
    target = path if folder else path.parent
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"{key}: {existing} is a file, so {path} cannot be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: {existing} is not writable, so {path} cannot be written")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# The process's umask, read once (there is no call that reads it without setting it). mkstemp and
# mkdtemp make owner-only entries (0600, 0700); what is renamed into place gets the permissions an
# ordinary write would have given it, so a study's outputs are as readable as the umask allows.
UMASK = _umask()


def temp_dir(parent: Path, prefix: str, suffix: str = "") -> Path:
    """A new folder in `parent` to fill and rename into place, with the permissions mkdir would give it."""
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=prefix, suffix=suffix))
    tmp.chmod(0o777 & ~UMASK)
    return tmp


def _take_lock(folder: Path) -> int | None:
    """An open descriptor of `folder` holding its exclusive flock (released when closed, or when its
    process dies, however); None where another process holds it, or where its file system has no
    such locks (some network ones): the folder is then somebody's."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _fsync(path: Path) -> None:
    """Hand `path`'s written data (a file's, or a folder's entries) to the disk (fsync(2); on macOS the
    drive may still cache it, which only F_FULLFSYNC would flush)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        # Some network and FUSE file systems refuse fsync on a folder: the entries are theirs to keep.
        if not (err.errno == errno.EINVAL and os.path.isdir(path)):
            raise
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """Flush every file and folder under `folder`: renamed into place after a crash that lost their
    contents, they would look finished. Links are left alone: what they point at was not written here
    (the data stage links a user's own copies of datasets)."""
    for parent, _, files in os.walk(folder):
        for name in files:
            if not os.path.islink(Path(parent, name)):
                _fsync(Path(parent, name))
        _fsync(Path(parent))


def write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync(path.parent)            # the rename itself
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> None:
    """Insertion order and no timestamps: rewriting equal data gives equal bytes (DVC and cache keys stay valid)."""
    write_text(path, json.dumps(obj, ensure_ascii=False, indent=1) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


@contextlib.contextmanager
def atomic_dir(folder: Path) -> Iterator[Path]:
    """Yield a temp folder beside `folder`; on success it replaces `folder` in one rename. The temp
    folder is flock'd while it is built, so a build killed with SIGKILL (which runs no clean-up) is
    told from one that runs: the next build removes the former's (on the paper profile a data folder
    holds CC-3M's images again)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    for left in folder.parent.glob(glob.escape(f".{folder.name}.") + "*.tmp"):
        if left.is_dir() and not left.is_symlink() and (fd := _take_lock(left)) is not None:
            shutil.rmtree(left, ignore_errors=True)
            os.close(fd)
    tmp = temp_dir(folder.parent, f".{folder.name}.", ".tmp")
    held = _take_lock(tmp)
    try:
        yield tmp
        _fsync_tree(tmp)
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
        _fsync(folder.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if held is not None:
            os.close(held)
