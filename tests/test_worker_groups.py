"""The suite's pytest-xdist groups (tests/conftest.py): a file's tests stay together, and the files that
must share a worker do."""
from conftest import FileGroups


def group(nodeid: str) -> str:
    return FileGroups._split_scope(None, nodeid)


def test_each_file_is_one_group_and_the_ray_and_rehearsal_files_share_theirs():
    assert group("tests/test_cache.py::test_a") == group("tests/test_cache.py::test_b[x-y]")
    assert group("tests/test_cache.py::test_a") != group("tests/test_train.py::test_a")
    # Two Ray clusters on one machine are not isolated: the files that start them run one after another.
    assert group("tests/test_sweep.py::test_a") == group("tests/test_dvc_repro.py::test_b")
    # One build of the session fixture `reduced_rehearsal` for both files that use it.
    assert group("tests/test_scale.py::test_a") == group("tests/test_paper_rehearsal.py::test_b")
    assert group("tests/test_sweep.py::test_a") != group("tests/test_scale.py::test_a")
