import subprocess
import sys
from pathlib import Path

import pytest
import torch

# The tests build tiny models; on 2 shared cores extra intra-op threads cost more than they save.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def reduced_rehearsal(tmp_path_factory):
    """`benchmarks/paper_rehearsal.py --size reduced` run once (a minute of `dvc repro`): its process and its
    workspace, which tests/test_scale.py's benchmark then measures in."""
    repo = Path(__file__).resolve().parents[1]
    ws = tmp_path_factory.mktemp("rehearsal") / "ws"
    proc = subprocess.run([sys.executable, str(repo / "benchmarks" / "paper_rehearsal.py"), "--size", "reduced",
                           "--workdir", str(ws)], cwd=repo, capture_output=True, text=True)
    return proc, ws
