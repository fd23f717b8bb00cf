"""Atomic writes leave outputs with the permissions an ordinary write would give them."""
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
