"""Tensor cache tests: round trip, idempotence, resume, rebuilds, corruption detection and the verify command."""
from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.cache import CacheError, open_table, verify_tables, write_table
from pipeline.config import load
from pipeline.data.build import build_toy
from pipeline.data.keys import image_key
from pipeline.digest import fingerprint
from pipeline.latents import build_cache, image_latents
from pipeline.models.teacher import build_toy_teacher, save_teacher
from stages import cache as stages_cache

from tiny import SIZE, TEACHER

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"

ROW_SHAPE = (4, 2, 3)
KEYS = [f"img-{i:03d}.png|crop=0,0,64,64" for i in range(11)]  # 11 rows: shards 4+4+3


def row_for(key: str, shape: tuple[int, ...] = ROW_SHAPE) -> torch.Tensor:
    """A deterministic, key-specific row, so a row stored under the wrong key is caught."""
    seed = int(key.split("-")[1][:3])
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 100


class Compute:
    """A `compute` that records every batch it is given and can crash after some batches."""

    def __init__(self, fail_after: int | None = None, shape: tuple[int, ...] = ROW_SHAPE) -> None:
        self.batches: list[list[str]] = []
        self.fail_after = fail_after
        self.shape = shape

    def __call__(self, batch: list[str]) -> torch.Tensor:
        if self.fail_after is not None and len(self.batches) == self.fail_after:
            raise RuntimeError("simulated crash")
        self.batches.append(list(batch))
        return torch.stack([row_for(k, self.shape) for k in batch])

    @property
    def keys(self) -> list[str]:
        return [k for batch in self.batches for k in batch]


def build(root: Path, keys=KEYS, compute=None, **kwargs) -> Path:
    args = {"shard_size": 4, "batch_size": 3, "progress": False} | kwargs
    return write_table(root, "latents", keys, compute or Compute(), **args)


def expected(keys=KEYS, dtype=torch.float32) -> torch.Tensor:
    return torch.stack([row_for(k) for k in keys]).to(dtype)


def shard(root: Path, index: int) -> Path:
    return root / "latents" / f"shard-{index:05d}.safetensors"


# --------------------------------------------------------------------------- round trip


def test_round_trip_across_shards_and_random_gathers(tmp_path):
    compute = Compute()
    folder = build(tmp_path, compute=compute, meta={"vae": "sd-vae", "size": (64, 64)}, description="toy")
    assert [len(b) for b in compute.batches] == [3, 3, 3, 2]
    assert sorted(p.name for p in folder.iterdir()) == [
        "keys.json", "manifest.json", "shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]

    table = open_table(tmp_path, "latents")
    assert (len(table), table.keys, table.row_shape, table.dtype) == (11, KEYS, ROW_SHAPE, torch.float32)
    assert table.meta == {"size": [64, 64], "vae": "sd-vae"}
    assert table.description == "toy"
    assert torch.equal(table.all(), expected())

    order = torch.randperm(11, generator=torch.Generator().manual_seed(0))
    for indices in (order, order[:5].tolist(), [10, 0, 5, 5, 3], [9, 8], [7], []):
        idx = torch.as_tensor(indices, dtype=torch.int64)
        assert torch.equal(table.rows(indices), expected()[idx])
    assert torch.equal(table.rows(torch.tensor([3, 4], dtype=torch.int32)), expected()[3:5])
    keys = [KEYS[9], KEYS[2], KEYS[4]]
    assert torch.equal(table.get(keys), expected(keys))
    assert table.index(KEYS[6]) == 6


def test_float16_storage(tmp_path):
    build(tmp_path, dtype=torch.float16)
    table = open_table(tmp_path, "latents")
    assert table.dtype == torch.float16
    rows = table.rows([0, 10, 4])
    assert rows.dtype == torch.float16
    assert torch.equal(rows, expected(dtype=torch.float16)[[0, 10, 4]])
    assert json.loads((tmp_path / "latents" / "manifest.json").read_text())["dtype"] == "float16"


def test_gathered_rows_do_not_alias_the_files(tmp_path):
    build(tmp_path)
    table = open_table(tmp_path, "latents")
    table.rows([1, 2]).zero_()
    table.rows([1, 6]).zero_()  # cross-shard path
    assert torch.equal(table.rows([1, 2, 6]), expected()[[1, 2, 6]])


def test_pickled_table_reads_the_same_rows(tmp_path):
    build(tmp_path)
    table = open_table(tmp_path, "latents")
    table.rows([0, 5, 9])  # map every shard first
    clone = pickle.loads(pickle.dumps(table))
    assert clone._views == {}
    assert torch.equal(clone.rows([9, 0, 5]), expected()[[9, 0, 5]])


# --------------------------------------------------------------------------- idempotence and rebuilds


def test_second_write_is_a_no_op(tmp_path):
    build(tmp_path)
    manifest = tmp_path / "latents" / "manifest.json"
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "latents").iterdir()}
    again = Compute()
    build(tmp_path, compute=again)
    assert again.batches == []
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "latents").iterdir()} == before
    assert manifest.exists()


@pytest.mark.parametrize("change", [
    {"keys": KEYS[:7] + ["img-099.png|crop=0,0,64,64"]},
    {"keys": list(reversed(KEYS))},
    {"dtype": torch.float16},
    {"shard_size": 5},
    {"meta": {"vae": "other"}},
])
def test_changed_keys_or_settings_rebuild(tmp_path, change):
    build(tmp_path)
    compute = Compute()
    build(tmp_path, compute=compute, **change)
    keys = change.get("keys", KEYS)
    assert compute.keys == keys
    table = open_table(tmp_path, "latents")
    assert table.keys == keys
    assert torch.equal(table.all(), expected(keys, change.get("dtype", torch.float32)))


def test_crash_during_a_rebuild_leaves_no_finished_table(tmp_path):
    build(tmp_path)
    crash(tmp_path, fail_after=3, meta={"vae": "other"})
    with pytest.raises(CacheError, match="not found or not finished"):
        open_table(tmp_path, "latents")


def test_shrunk_rebuild_removes_stale_shards(tmp_path):
    build(tmp_path)
    folder = build(tmp_path, keys=KEYS[:3])
    assert sorted(p.name for p in folder.iterdir()) == ["keys.json", "manifest.json", "shard-00000.safetensors"]
    assert torch.equal(open_table(tmp_path, "latents").all(), expected(KEYS[:3]))


def test_corrupt_shard_is_rebuilt_by_the_next_write(tmp_path):
    build(tmp_path)
    data = bytearray(shard(tmp_path, 1).read_bytes())
    data[-1] ^= 0xFF
    shard(tmp_path, 1).write_bytes(bytes(data))
    compute = Compute()
    build(tmp_path, compute=compute)
    assert compute.keys == KEYS
    assert torch.equal(open_table(tmp_path, "latents").all(), expected())


# --------------------------------------------------------------------------- resume


def crash(root: Path, fail_after: int | None, **kwargs) -> None:
    with pytest.raises(RuntimeError, match="simulated crash"):
        build(root, compute=Compute(fail_after=fail_after), **kwargs)


def test_resume_computes_only_the_rest_and_equals_a_clean_build(tmp_path):
    # Batches of 3 rows, shards of 4: after 3 batches (9 rows) shards 0-1 (rows 0-7) are on disk.
    crash(tmp_path / "a", fail_after=3)
    folder = tmp_path / "a" / "latents"
    assert not (folder / "manifest.json").exists()
    with pytest.raises(CacheError, match="not found or not finished"):
        open_table(tmp_path / "a", "latents")
    partial = json.loads((folder / "partial.json").read_text())
    assert [s["file"] for s in partial["shards"]] == ["shard-00000.safetensors", "shard-00001.safetensors"]

    (folder / ".shard-00002.safetensors.k1ll3d.tmp").write_bytes(b"half a shard")  # as a SIGKILL leaves it

    resumed = Compute()
    build(tmp_path / "a", compute=resumed)
    assert resumed.keys == KEYS[8:]
    assert sorted(p.name for p in folder.iterdir()) == [
        "keys.json", "manifest.json", "shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]

    build(tmp_path / "b")
    clean = tmp_path / "b" / "latents"
    assert (folder / "manifest.json").read_bytes() == (clean / "manifest.json").read_bytes()
    assert torch.equal(open_table(tmp_path / "a", "latents").all(), open_table(tmp_path / "b", "latents").all())


def test_crash_before_the_manifest_resumes_without_computing(tmp_path, monkeypatch):
    def no_manifest(*args, **kwargs):
        raise RuntimeError("simulated crash")

    with monkeypatch.context() as patch:
        patch.setattr("pipeline.cache._write_manifest", no_manifest)
        crash(tmp_path, fail_after=None)
    compute = Compute()
    folder = build(tmp_path, compute=compute)
    assert compute.batches == []
    assert sorted(p.name for p in folder.iterdir()) == [
        "keys.json", "manifest.json", "shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    assert torch.equal(open_table(tmp_path, "latents").all(), expected())


def test_resume_with_changed_keys_discards_the_shards(tmp_path, caplog):
    crash(tmp_path, fail_after=3)
    keys = KEYS[:6] + ["img-050.png|crop=0,0,64,64"] + KEYS[7:]
    compute = Compute()
    with caplog.at_level("INFO", logger="pipeline.cache"):
        build(tmp_path, keys=keys, compute=compute)
    assert compute.keys == keys
    assert "discarding 2 shards" in caplog.text
    assert torch.equal(open_table(tmp_path, "latents").all(), expected(keys))


def test_resume_with_changed_row_shape_discards_the_shards(tmp_path):
    crash(tmp_path, fail_after=3)
    compute = Compute(shape=(2, 5))
    build(tmp_path, compute=compute)
    assert compute.keys == KEYS[8:11] + KEYS  # one batch probed the new shape, then all again
    table = open_table(tmp_path, "latents")
    assert table.row_shape == (2, 5)
    assert torch.equal(table.all(), torch.stack([row_for(k, (2, 5)) for k in KEYS]))


def test_resume_recomputes_from_a_corrupt_kept_shard(tmp_path):
    crash(tmp_path, fail_after=3)
    data = bytearray(shard(tmp_path, 1).read_bytes())
    data[-2] ^= 0x01
    shard(tmp_path, 1).write_bytes(bytes(data))
    compute = Compute()
    build(tmp_path, compute=compute)
    assert compute.keys == KEYS[4:]
    assert torch.equal(open_table(tmp_path, "latents").all(), expected())


# --------------------------------------------------------------------------- detection on open


def flip_a_byte(path: Path) -> None:
    """Corrupt a shard without changing its size: only a checksum can tell."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_opening_a_table_reads_no_shard_bytes(tmp_path, monkeypatch):
    """Every way the cache module reads a file (Python's open, which a Path's reads go through, and
    safetensors) is watched: opening the table reads its manifest and no shard; reading its rows then
    maps the shards (so the watch sees such reads)."""
    import builtins
    import io

    import pipeline.cache as cache

    build(tmp_path)
    touched: list[str] = []

    def watched(read):
        def call(path, *args, **kwargs):
            touched.append(Path(path).name)
            return read(path, *args, **kwargs)
        return call

    monkeypatch.setattr(builtins, "open", watched(builtins.open))
    monkeypatch.setattr(io, "open", watched(io.open))
    monkeypatch.setattr(cache, "safe_open", watched(cache.safe_open))
    table = open_table(tmp_path, "latents")
    assert "manifest.json" in touched and not [name for name in touched if name.endswith(".safetensors")], touched
    assert torch.equal(table.all(), expected())
    assert any(name.endswith(".safetensors") for name in touched)


def test_flipped_byte_of_unchanged_size_is_found_by_verify_not_on_open(tmp_path):
    build(tmp_path)
    flip_a_byte(shard(tmp_path, 2))
    assert len(open_table(tmp_path, "latents")) == 11  # sizes match: opening does not read the bytes
    for check in (lambda: open_table(tmp_path, "latents", verify=True),
                  lambda: verify_tables(tmp_path, ["latents"], progress=False)):
        with pytest.raises(CacheError) as info:
            check()
        message = str(info.value)
        assert "\n" not in message
        assert "'latents'" in message and "shard-00002.safetensors" in message
        assert "corrupt or truncated" in message and "re-run the cache stage" in message


def test_the_verify_command_names_a_corrupted_shard_of_unchanged_size(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    shutil.copy(PARAMS, params)
    cache = tmp_path / "cache"
    build(cache)
    write_table(cache, "text", KEYS[:5], Compute(), shard_size=4, batch_size=4, progress=False)
    assert stages_cache.main(["--params", str(params), "--verify"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["latents: 11 rows of [4, 2, 3] torch.float32: checksums match",
                   "text: 5 rows of [4, 2, 3] torch.float32: checksums match"]
    flip_a_byte(shard(cache, 1))
    assert stages_cache.main(["--params", str(params), "--verify"]) == 2
    [line] = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # the rest: a progress bar
    assert line.startswith("error: cache table 'latents': ") and "shard-00001.safetensors" in line
    assert "sha256 does not match" in line


def test_a_shard_corrupted_on_its_way_to_disk_fails_the_write(tmp_path, monkeypatch):
    from pipeline import cache

    def garbled(path, data):
        real_write_bytes(path, data[:-1] + bytes([data[-1] ^ 1]))

    real_write_bytes = cache.write_bytes
    monkeypatch.setattr(cache, "write_bytes", garbled)
    with pytest.raises(CacheError, match=r"shard-00000\.safetensors: .*sha256 does not match.*right after it was written"):
        build(tmp_path)


@pytest.mark.parametrize("verify", [True, False])
def test_truncated_shard_is_detected(tmp_path, verify):
    build(tmp_path)
    data = shard(tmp_path, 0).read_bytes()
    shard(tmp_path, 0).write_bytes(data[:-7])
    with pytest.raises(CacheError, match=r"shard-00000\.safetensors.*corrupt or truncated"):
        open_table(tmp_path, "latents", verify=verify)


def test_missing_shard_is_detected(tmp_path):
    build(tmp_path)
    shard(tmp_path, 1).unlink()
    with pytest.raises(CacheError, match=r"shard-00001\.safetensors: shard file is missing"):
        open_table(tmp_path, "latents")


def test_missing_manifest(tmp_path):
    build(tmp_path)
    (tmp_path / "latents" / "manifest.json").unlink()
    with pytest.raises(CacheError, match=r"'latents'.*manifest\.json: not found or not finished: run the cache stage"):
        open_table(tmp_path, "latents")


def test_edited_keys_are_detected_on_first_lookup_and_by_verify(tmp_path):
    build(tmp_path)
    path = tmp_path / "latents" / "keys.json"
    keys = json.loads(path.read_text())
    keys[0], keys[1] = keys[1], keys[0]
    path.write_text(json.dumps(keys))
    table = open_table(tmp_path, "latents")  # the keys are not read to open a table
    assert len(table) == 11
    for check in (lambda: table.index(KEYS[0]), lambda: table.keys, lambda: table.get(KEYS[:1]),
                  lambda: open_table(tmp_path, "latents", verify=True),
                  lambda: verify_tables(tmp_path, ["latents"], progress=False)):
        with pytest.raises(CacheError, match=r"keys\.json: keys do not match the manifest's keys_sha256"):
            check()


def test_opening_a_table_does_not_read_its_keys(tmp_path):
    build(tmp_path)
    (tmp_path / "latents" / "keys.json").unlink()
    table = open_table(tmp_path, "latents")
    assert torch.equal(table.rows([10, 0]), expected()[[10, 0]])
    with pytest.raises(CacheError, match=r"keys\.json: unreadable keys"):
        table.index(KEYS[0])


def test_a_table_of_the_earlier_format_is_rebuilt(tmp_path):
    build(tmp_path)
    path = tmp_path / "latents" / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "format": 1, "keys": KEYS}))  # format 1 held the keys inline
    with pytest.raises(CacheError, match="format is 1, expected 2"):
        open_table(tmp_path, "latents")
    compute = Compute()
    build(tmp_path, compute=compute)
    assert compute.keys == KEYS and open_table(tmp_path, "latents").keys == KEYS


# --------------------------------------------------------------------------- bad input


def test_duplicate_keys(tmp_path):
    compute = Compute()
    with pytest.raises(ValueError, match=r"duplicate key 'img-002\.png"):
        build(tmp_path, keys=KEYS[:3] + [KEYS[2]], compute=compute)
    assert compute.batches == []


def test_non_finite_rows_are_rejected_after_the_cast(tmp_path):
    def compute(batch):
        rows = torch.zeros(len(batch), 2)
        if KEYS[4] in batch:
            rows[batch.index(KEYS[4]), 1] = 1e6  # fine in float32, inf in float16
        return rows

    build(tmp_path, compute=compute)
    with pytest.raises(ValueError, match=r"non-finite.*img-004"):
        build(tmp_path / "half", compute=compute, dtype=torch.float16)


def test_wrong_row_count_from_compute(tmp_path):
    with pytest.raises(ValueError, match=r"compute returned shape \[2, 3\] for a batch of 3 keys"):
        build(tmp_path, compute=lambda batch: torch.zeros(2, 3))


def test_unknown_key_and_bad_index(tmp_path):
    build(tmp_path)
    table = open_table(tmp_path, "latents")
    with pytest.raises(CacheError, match=r"^cache table 'latents': .*: has no row for 'nope': the data changed since "
                                         r"the cache stage encoded it; re-run the cache stage"):
        table.get(["nope"])
    with pytest.raises(IndexError, match="row index 11 out of range for 11 rows"):
        table.rows([0, 11])
    with pytest.raises(IndexError, match="row index -1 out of range"):
        table.rows([-1])


def _cached_smoke_project(tmp_path: Path):
    """The smoke profile's data, a tiny teacher saved beside it, and the cache stage's tables of both."""
    cfg = load(PARAMS, {"profile": "smoke"})
    teacher = build_toy_teacher(TEACHER, SIZE)
    data, cache, saved = tmp_path / "data", tmp_path / "cache", tmp_path / "teacher"
    build_toy(cfg.data, data)
    save_teacher(teacher, saved)
    build_cache(cfg, teacher, fingerprint(saved), data, cache)
    return cfg, teacher, data, cache, saved


def test_the_cache_stage_rebuilds_image_latents_for_regenerated_data_and_for_another_vae_scale(tmp_path):
    """Image rows are keyed by file path, and regenerated toy data reuses the names: a digest of
    the image files is part of an image table's meta. The VAE's scaling factor lives in its
    config.json, which the teacher's fingerprint covers (but not the library version there)."""
    cfg, teacher, data, cache, saved = _cached_smoke_project(tmp_path)
    key = open_table(cache, "train_images").keys[0]
    first = open_table(cache, "train_images").get([key])

    reseeded = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seed=cfg.data.seed + 1))
    shutil.rmtree(data)
    build_toy(reseeded.data, data)
    build_cache(reseeded, teacher, fingerprint(saved), data, cache)
    table = open_table(cache, "train_images")
    assert key in table.keys
    assert not torch.equal(table.get([key]), first)
    compute = image_latents(teacher, teacher.resolution)
    assert torch.allclose(table.get([key]), compute([image_key(data / key)]), atol=1e-5)  # keys are under the data root

    teacher.vae.register_to_config(scaling_factor=2 * teacher.scaling_factor)
    save_teacher(teacher, tmp_path / "rescaled")
    assert fingerprint(tmp_path / "rescaled") != fingerprint(saved)
    config = saved / "vae" / "config.json"
    config.write_text(config.read_text().replace('"_diffusers_version": "', '"_diffusers_version": "0.0.0+'))
    assert "0.0.0+" in config.read_text()
    assert fingerprint(saved) == table.meta["teacher"]


def test_a_benchmark_image_reaches_the_vae_whole_and_a_training_image_centre_cropped():
    """The diffusion score's reference resizes a benchmark image to a square whole; a centre crop drops
    a wide scene's edges, where what a caption names may stand."""
    from PIL import Image

    from pipeline.latents import vae_transform

    image = Image.new("RGB", (48, 32), (0, 0, 0))
    image.paste((255, 0, 0), (0, 0, 4, 32))                  # a red bar at the left edge
    red = lambda pixels: int(((pixels[0] > 0.5) & (pixels[1] < -0.5)).sum())   # noqa: E731
    assert red(vae_transform(32, crop=False)(image)) > 0
    assert red(vae_transform(32)(image)) == 0


def test_the_cache_crops_the_training_images_and_squashes_the_benchmarks(tmp_path, monkeypatch):
    """Which table gets which: the toy's square images encode alike under both, so only this tells."""
    from pipeline import latents

    cfg, teacher, data, cache, saved = _cached_smoke_project(tmp_path)
    made, real = [], latents.image_latents
    monkeypatch.setattr(latents, "image_latents", lambda t, size, crop=True: made.append(crop) or real(t, size, crop))
    build_cache(cfg, teacher, fingerprint(saved), data, tmp_path / "again")
    assert made == [True, False] and list(latents.table_keys(data))[:2] == ["train_images", "bench_images"]


def test_the_images_are_encoded_at_the_unets_resolution_whatever_the_vaes_config_says(tmp_path):
    """SD 2-1-base's VAE config says 768 px, its UNet denoises 64 x 64 latents (512 px): latents of the
    VAE's size would not match the noise the diffusion score adds."""
    cfg, teacher, data, cache, saved = _cached_smoke_project(tmp_path)
    teacher.vae.register_to_config(sample_size=3 * teacher.resolution)
    build_cache(cfg, teacher, fingerprint(saved), data, tmp_path / "again")
    for name in ("train_images", "bench_images"):
        table = open_table(tmp_path / "again", name)
        assert tuple(table.get(table.keys[:1]).shape[1:]) == tuple(teacher.latent_shape), name


def test_tables_encoded_by_other_code_are_rebuilt_and_name_the_device_that_encoded_them(tmp_path, monkeypatch):
    """The cache stage re-runs when its encoding code changes (dvc.yaml lists it): the same teacher
    and images must then not keep the rows the old code made, nor rows a GPU's convolutions rounded."""
    from pipeline import latents

    cfg, teacher, data, cache, saved = _cached_smoke_project(tmp_path)
    made = {"teacher": fingerprint(saved), "device": "cpu"}
    assert open_table(cache, "train_text").meta == {**made, "encoding": latents.TEXT_ENCODING}
    assert open_table(cache, "train_images").meta.keys() == {*made, "encoding", "images"}

    encoded, images = [], []
    real, real_images = latents.encode_text, latents.encode_images
    monkeypatch.setattr(latents, "encode_text", lambda t, texts: (encoded.append(len(texts)), real(t, texts))[1])
    monkeypatch.setattr(latents, "encode_images", lambda t, px: (images.append(len(px)), real_images(t, px))[1])
    build_cache(cfg, teacher, fingerprint(saved), data, cache)
    assert encoded == images == []                         # the same code: every table kept
    monkeypatch.setattr(latents, "IMAGE_ENCODING", latents.IMAGE_ENCODING + 1)
    build_cache(cfg, teacher, fingerprint(saved), data, cache)
    assert images and encoded == []                        # new image code: the text tables kept
    assert open_table(cache, "train_images").meta["encoding"] == latents.IMAGE_ENCODING
    monkeypatch.setattr(latents, "TEXT_ENCODING", latents.TEXT_ENCODING + 1)
    build_cache(cfg, teacher, fingerprint(saved), data, cache)
    assert encoded and open_table(cache, "train_text").meta["encoding"] == latents.TEXT_ENCODING
