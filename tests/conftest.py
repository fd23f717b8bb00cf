import subprocess
import sys
from pathlib import Path

import pytest
import torch
from xdist.scheduler import LoadScopeScheduling

# The tests build tiny models; on 2 shared cores extra intra-op threads cost more than they save.
torch.set_num_threads(1)


# Test files that must share a pytest-xdist worker (`--dist=loadfile` keeps each file whole in one): the
# ones that start Ray clusters, since two clusters on one machine are not isolated (a driver connecting to
# the head its test started has been answered by another cluster's server), and the ones that share
# `reduced_rehearsal`, a session fixture each worker would otherwise build.
SHARED_WORKER = {"test_sweep.py": "ray clusters", "test_dvc_repro.py": "ray clusters",
                 "test_scale.py": "reduced_rehearsal", "test_paper_rehearsal.py": "reduced_rehearsal"}
# These groups are handed out first, in the order above, the longest first (~10 and ~3 minutes on 2
# cores): the Ray files hold one worker from the start while the other works through every other file.
# pytest.ini turns off xdist's own order (by number of tests), which left the Ray files until one worker
# had run a few others.
FIRST = tuple(dict.fromkeys(SHARED_WORKER.values()))


def group_of(nodeid: str) -> str:
    """A test's group: its file, or the group SHARED_WORKER puts its file in."""
    path = nodeid.split("::", 1)[0]
    return SHARED_WORKER.get(Path(path).name, path)


def pytest_collection_modifyitems(items):
    first = {group: rank for rank, group in enumerate(FIRST)}
    items.sort(key=lambda item: first.get(group_of(item.nodeid), len(FIRST)))    # stable: files keep their order


class FileGroups(LoadScopeScheduling):
    """`--dist=loadfile` with the files of SHARED_WORKER grouped (pytest-xdist's loadgroup marks cannot
    do it under pytest 9: they rename the test ids through an attribute pytest 9 no longer reads)."""

    def _split_scope(self, nodeid: str) -> str:
        return group_of(nodeid)


def pytest_xdist_make_scheduler(config, log):
    return FileGroups(config, log) if config.getvalue("dist") == "loadfile" else None


@pytest.fixture(scope="session")
def reduced_rehearsal(tmp_path_factory):
    """`benchmarks/paper_rehearsal.py --size reduced` run once (a minute of `dvc repro`): its process and its
    workspace, which tests/test_scale.py's benchmark then measures in."""
    repo = Path(__file__).resolve().parents[1]
    ws = tmp_path_factory.mktemp("rehearsal") / "ws"
    proc = subprocess.run([sys.executable, str(repo / "benchmarks" / "paper_rehearsal.py"), "--size", "reduced",
                           "--workdir", str(ws)], cwd=repo, capture_output=True, text=True)
    return proc, ws
