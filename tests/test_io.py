"""Atomic writes leave outputs with the permissions an ordinary write would give them, and on disk
before they are renamed into place."""
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

WRITE = """
import os, sys
os.umask(int(sys.argv[2], 8))
from pathlib import Path
from pipeline.io import atomic_dir, write_json
out = Path(sys.argv[1])
write_json(out / "result.json", {"a": 1})
with atomic_dir(out / "folder") as tmp:
    (tmp / "inside.txt").write_text("x")
"""


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask, file_mode, dir_mode", [("022", 0o644, 0o755), ("077", 0o600, 0o700)])
def test_atomic_writes_follow_the_umask(tmp_path, umask, file_mode, dir_mode):
    """A temp file or folder is created owner-only (0600 / 0700); renamed into place it must get what
    the umask allows, or reports and metrics are unreadable to everyone but their writer."""
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", WRITE, str(tmp_path), umask], cwd=root, check=True)
    assert mode(tmp_path / "result.json") == file_mode
    assert mode(tmp_path / "folder") == dir_mode


def test_what_is_renamed_into_place_is_on_disk_first_and_the_rename_after(tmp_path, monkeypatch):
    """A crash after the rename but before the page cache was written would leave a finished-looking
    output with empty files: every file and folder is flushed before its rename, their parent after."""
    from pipeline import io

    events = []
    real_fsync, real_replace = io._fsync, os.replace
    monkeypatch.setattr(io, "_fsync", lambda path: (events.append(("fsync", str(path))), real_fsync(path))[1])
    monkeypatch.setattr(io.os, "replace", lambda src, dst: (events.append(("replace", str(dst))),
                                                            real_replace(src, dst))[1])
    with io.atomic_dir(tmp_path / "out") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.bin").write_bytes(b"a")
        (tmp / "b.txt").write_text("b")
    flushed = {path.replace(str(tmp), "TMP") for kind, path in events[:events.index(("replace", str(tmp_path / "out")))]
               if kind == "fsync"}
    assert flushed == {"TMP", "TMP/sub", "TMP/sub/a.bin", "TMP/b.txt"}, events
    assert events[-1] == ("fsync", str(tmp_path)), events

    events.clear()
    io.write_text(tmp_path / "r.txt", "r")         # the file itself is flushed through its open descriptor
    assert events == [("replace", str(tmp_path / "r.txt")), ("fsync", str(tmp_path))]
    # A link in the folder is left alone: what it points at (a user's dataset) was not written here.
    with io.atomic_dir(tmp_path / "linked") as tmp:
        (tmp / "dangling").symlink_to(tmp_path / "nowhere")
    assert (tmp_path / "linked" / "dangling").is_symlink()


BUILD = """
import os, signal, sys, time
from pathlib import Path
from pipeline.io import atomic_dir
with atomic_dir(Path(sys.argv[1])) as tmp:
    (tmp / "half.bin").write_bytes(b"x" * 1000)
    print(tmp, flush=True)
    if sys.argv[2] == "killed":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)
"""


def test_a_build_killed_leaves_its_temp_folder_to_the_next_build_which_removes_it(tmp_path):
    """SIGKILL runs no clean-up: each killed build of a folder (a data folder holds CC-3M's images again)
    left its temp folder beside it for good. The next build removes those no build holds (a killed one's,
    one left by an older version), and leaves a build that still runs alone, by its flock: a pid says
    nothing across containers that share a host name."""
    from pipeline import io

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "data"

    def build(how):
        return subprocess.Popen([sys.executable, "-c", BUILD, str(out), how], cwd=root, stdout=subprocess.PIPE,
                                text=True)

    killed = build("killed")
    left = Path(killed.stdout.readline().strip())
    assert killed.wait(timeout=60) == -9 and (left / "half.bin").is_file()
    older = tmp_path / ".data.k1ll3d.tmp"
    (older / "images").mkdir(parents=True)
    running = build("running")
    try:
        kept = Path(running.stdout.readline().strip())
        with io.atomic_dir(out) as tmp:
            (tmp / "index.json").write_text("{}")
        assert not left.exists() and not older.exists() and (kept / "half.bin").is_file()
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([kept.name, "data"])
        assert sorted(p.name for p in out.iterdir()) == ["index.json"]
    finally:
        running.kill()
        running.wait()
