"""A model folder's fingerprint: what it covers, and when a folder is hashed again."""
import json
import os
import time

import pytest

from pipeline import digest
from pipeline.digest import fingerprint


def _model(folder):
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(bytes(range(256)) * 4)
    (folder / "unet" / "config.json").write_text(json.dumps({"sample_size": 8, "_diffusers_version": "0.1"}))
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "merges.txt").write_text("#version: 0.2\ni n\n")    # decides every token id
    (folder / ".cache").mkdir()
    (folder / ".cache" / "download.metadata").write_text("a hub download's etag and time")
    return folder


@pytest.fixture
def hashed(monkeypatch):
    """The folders `digest._digest` read, in order (so a result given from memory shows as no read)."""
    reads = []
    real = digest._digest
    monkeypatch.setattr(digest, "_digest", lambda folder, files: reads.append(folder) or real(folder, files))
    return reads


@pytest.fixture
def settled(monkeypatch):
    """A clock a minute ahead: every file looks settled (written longer than SETTLE_SECONDS ago)."""
    monkeypatch.setattr(digest, "_now_ns", lambda: time.time_ns() + 60 * 10**9)


def test_every_file_counts_but_hidden_ones_and_the_library_version(tmp_path, hashed, settled):
    model = _model(tmp_path / "m")
    first = fingerprint(model)
    assert fingerprint(model) == first and hashed == [model]          # read once while nothing changed

    (model / ".cache" / "download.metadata").write_text("downloaded again")
    assert fingerprint(model) == first and len(hashed) == 1
    merges = model / "tokenizer" / "merges.txt"
    merges.write_text("#version: 0.2\ni n\nt h\n")
    assert fingerprint(model) != first and len(hashed) == 2
    merges.write_text("#version: 0.2\ni n\n")
    assert fingerprint(model) == first and len(hashed) == 3
    config = model / "unet" / "config.json"
    config.write_text(json.dumps({"sample_size": 8, "_diffusers_version": "9.9.9"}))
    assert fingerprint(model) == first and len(hashed) == 4            # written: read again, same content
    config.write_text(json.dumps({"sample_size": 16, "_diffusers_version": "9.9.9"}))
    assert fingerprint(model) != first


def test_weights_rewritten_in_place_with_the_same_size_and_mtime_are_hashed_again(tmp_path, hashed, settled):
    model = _model(tmp_path / "m")
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    first = fingerprint(model)
    stat = weights.stat()
    time.sleep(0.05)               # past a coarse clock's tick (1-10 ms), so the rewrite's ctime differs
    flipped = bytearray(weights.read_bytes())
    flipped[0] ^= 1
    weights.write_bytes(bytes(flipped))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))        # the same size and mtime as before
    assert weights.stat().st_size == stat.st_size and weights.stat().st_mtime_ns == stat.st_mtime_ns
    assert fingerprint(model) != first and len(hashed) == 2


def test_a_folder_written_within_the_settle_time_is_hashed_on_every_call(tmp_path, hashed):
    """Two writes within one tick of a coarse clock can leave a file the same size and times; so a
    folder changed in the last SETTLE_SECONDS is never answered from memory."""
    model = _model(tmp_path / "m")
    assert fingerprint(model) == fingerprint(model) and hashed == [model, model]
