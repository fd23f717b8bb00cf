import subprocess
import sys
from pathlib import Path

import pytest
import torch

# The tests build tiny models; on 2 shared cores extra intra-op threads cost more than they save.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """pytest-xdist's groups (`--dist=loadgroup`): a file's tests run in one worker, so its module and
    session fixtures are built once; the files that share `reduced_rehearsal` share a group, and so do
    the files that start Ray clusters, since two clusters on one machine are not isolated (a driver
    connecting to the head its test started has been answered by another cluster's server)."""
    for item in items:
        if item.get_closest_marker("ray_cluster"):
            group = "ray_cluster"
        elif "reduced_rehearsal" in item.fixturenames:
            group = "reduced_rehearsal"
        else:
            group = item.module.__name__
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session")
def reduced_rehearsal(tmp_path_factory):
    """`benchmarks/paper_rehearsal.py --size reduced` run once (a minute of `dvc repro`): its process and its
    workspace, which tests/test_scale.py's benchmark then measures in."""
    repo = Path(__file__).resolve().parents[1]
    ws = tmp_path_factory.mktemp("rehearsal") / "ws"
    proc = subprocess.run([sys.executable, str(repo / "benchmarks" / "paper_rehearsal.py"), "--size", "reduced",
                           "--workdir", str(ws)], cwd=repo, capture_output=True, text=True)
    return proc, ws
