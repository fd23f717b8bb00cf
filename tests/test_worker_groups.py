"""The suite's pytest-xdist groups (tests/conftest.py): a file's tests stay together, the files that
must share a worker do, and the longest groups are handed out first."""
from types import SimpleNamespace

from conftest import group_of, pytest_collection_modifyitems


def test_each_file_is_one_group_and_the_ray_and_rehearsal_files_share_theirs():
    assert group_of("tests/test_cache.py::test_a") == group_of("tests/test_cache.py::test_b[x-y]")
    assert group_of("tests/test_cache.py::test_a") != group_of("tests/test_train.py::test_a")
    # Two Ray clusters on one machine are not isolated: the files that start them run one after another.
    assert group_of("tests/test_sweep.py::test_a") == group_of("tests/test_dvc_repro.py::test_b")
    # One build of the session fixture `reduced_rehearsal` for both files that use it.
    assert group_of("tests/test_scale.py::test_a") == group_of("tests/test_paper_rehearsal.py::test_b")
    assert group_of("tests/test_sweep.py::test_a") != group_of("tests/test_scale.py::test_a")


def test_the_ray_files_come_first_then_the_rehearsal_files_then_the_others_in_their_order(pytestconfig):
    # xdist's own order (by number of tests in a group) would override the collection's.
    assert pytestconfig.getoption("loadscopereorder") is False
    collected = ["tests/test_appendix.py::a", "tests/test_dvc_repro.py::a", "tests/test_dvc_repro.py::b",
                 "tests/test_paper_rehearsal.py::a", "tests/test_scale.py::a", "tests/test_sweep.py::a",
                 "tests/test_sweep.py::b", "tests/test_train.py::a", "tests/test_cache.py::a"]
    items = [SimpleNamespace(nodeid=nodeid) for nodeid in collected]
    pytest_collection_modifyitems(items)
    assert [item.nodeid for item in items] == [
        "tests/test_dvc_repro.py::a", "tests/test_dvc_repro.py::b", "tests/test_sweep.py::a", "tests/test_sweep.py::b",
        "tests/test_paper_rehearsal.py::a", "tests/test_scale.py::a",
        "tests/test_appendix.py::a", "tests/test_train.py::a", "tests/test_cache.py::a"]
