"""Cache keys name images relative to the data root or the project, not by where the checkout lies:
two checkouts of one commit in different folders build byte-identical cache tables, so DVC hashes
them alike and a moved folder or another machine can read them."""
from __future__ import annotations

import pickle
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pipeline.config import DataConfig
from pipeline.data.build import build_data
from pipeline.data.keys import image_key, parse_image_key
from pipeline.latents import table_keys
from published import aro_release, paper_datasets
from worktree import copy_working_tree

ROOT = Path(__file__).resolve().parents[1]
BOX = (1234.5049, 0.1, 7, 2.0000001)
EXACT_BOX = "#bbox=1234.5049,0.1,7.0,2.0000001"


def test_a_key_names_its_image_under_the_data_root_or_the_project_else_by_its_absolute_path(tmp_path):
    project = tmp_path / "project"
    data = project / "data"
    data.mkdir(parents=True)
    (project / "params.yaml").write_text("profile: toy\n")
    (data / "index.json").write_text("{}")
    outside = tmp_path / "elsewhere" / "3.jpg"
    names = {data / "aro" / "images" / "1.jpg": "aro/images/1.jpg",
             project / "datasets" / "coco" / "2.jpg": "datasets/coco/2.jpg",
             outside: str(outside)}
    for file, name in names.items():
        assert image_key(file) == name and parse_image_key(image_key(file)) == (file, None)
        key = image_key(file, BOX)
        assert key == name + EXACT_BOX
        # As made, and as a trial's worker process receives it: the file and the box bit for bit.
        for read in (key, pickle.loads(pickle.dumps(key))):
            assert parse_image_key(read) == (file, tuple(float(v) for v in BOX))
    # What a table stores is the name alone: an absolute one is its own file, a relative one is not a file.
    assert parse_image_key(str(image_key(outside, BOX))) == (outside, tuple(float(v) for v in BOX))
    with pytest.raises(ValueError, match="'aro/images/1.jpg#bbox="):
        parse_image_key(str(image_key(data / "aro" / "images" / "1.jpg", BOX)))


def _paper_project(folder: Path, **spelling: str) -> Path:
    """A project at `folder` holding the paper profile's datasets, given by paths relative to it
    unless `spelling` says otherwise; its data stage run. Returns the data root."""
    folder.mkdir(parents=True)
    shutil.copy(ROOT / "params.yaml", folder / "params.yaml")
    cfg = DataConfig(source="paper", **{**paper_datasets(folder, zeroshot_sets=()), **spelling})
    build_data(cfg, folder / "data", base=folder)
    return folder / "data"


def test_the_paper_datasets_keys_do_not_name_the_project_folder_unless_given_by_an_absolute_path(tmp_path):
    shared = aro_release(tmp_path / "shared")["aro"]   # one copy both projects name by its absolute path
    keys = [table_keys(_paper_project(tmp_path / where, aro_root=str(shared)))
            for where in ("a/project", "b/deeper/project")]
    assert keys[0] == keys[1]
    images = keys[0]["train_images"] + keys[0]["bench_images"]
    assert "coco/train2017/000000000009.jpg" in images                 # a dataset inside the project
    assert any(k.startswith("winoground/data/") for k in images)       # unzipped by the data stage into the data root
    assert f"{shared}/images/2315375.jpg#bbox=2.0,3.0,20.0,15.0" in images
    assert [k for k in images if k.startswith(str(tmp_path)) and not k.startswith(str(shared))] == []


# ---------------------------------------------------------------- two checkouts, byte-identical cache/


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_two_checkouts_in_different_folders_build_byte_identical_caches(tmp_path):
    def build(where: str) -> dict[str, bytes]:
        checkout = copy_working_tree(tmp_path / where)
        for stage in ("data", "models", "cache"):
            # Run from the checkout, so its own code (this working tree's) is what runs.
            proc = subprocess.run([sys.executable, "-m", f"stages.{stage}", "--params", "params.yaml",
                                   "--profile", "smoke"], cwd=checkout, capture_output=True, text=True)
            assert proc.returncode == 0, f"{where}: stages.{stage}: {proc.stderr[-3000:]}"
        return _files(checkout / "cache")

    with ThreadPoolExecutor(2) as pool:         # the two checkouts side by side: nothing is shared
        caches = list(pool.map(build, ("a/x", "b/deeper/x")))
    assert "train_images/keys.json" in caches[0] and b"coco/train2017/" in caches[0]["train_images/keys.json"]
    assert sorted(caches[0]) == sorted(caches[1])
    assert [name for name in caches[0] if caches[0][name] != caches[1][name]] == []
