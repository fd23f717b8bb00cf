"""The models stage trains the same toy teacher and students whenever the config is the same.

The weights depend on the torch thread count (sums taken in another order round differently,
and thousands of steps amplify that), so each model's count comes from the config
(`teacher.threads`, `students.<name>.threads`), never from the machine: two runs give the same
bytes, and so do the forked (teacher and students side by side) and the sequential paths a
machine with fewer cores takes.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import load
from pipeline.data.build import build_data
from pipeline.models import build, student_dir

REPO = Path(__file__).resolve().parents[1]


def small_toy_config():
    cfg = load(REPO / "params.yaml", {"profile": "smoke"})
    teacher = cfg.teacher.__class__(**{**cfg.teacher.__dict__, "vae_steps": 6, "unet_steps": 12})
    students = {name: s.__class__(**{**s.__dict__, "pretrain_steps": 6}) for name, s in cfg.students.items()}
    return cfg.__class__(**{**cfg.__dict__, "teacher": teacher, "students": students})


def weights(models: Path) -> dict[str, bytes]:
    return {str(p.relative_to(models)): p.read_bytes() for p in sorted(models.rglob("*.safetensors"))}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    cfg = small_toy_config()
    root = tmp_path_factory.mktemp("determinism") / "data"
    build_data(cfg.data, root)
    return cfg, root


def test_the_toy_teacher_and_students_train_bit_for_bit_the_same_twice(data, tmp_path):
    cfg, root = data
    build.build_models(cfg, root, tmp_path / "a")
    build.build_models(cfg, root, tmp_path / "b")
    first, second = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert len(first) == 4   # UNet, VAE, text encoder, the student
    assert first == second


def test_neither_the_core_count_nor_the_process_thread_count_changes_the_weights(data, tmp_path, monkeypatch):
    """With two cores the models stage forks the students' pre-training beside the teacher; with one
    it trains them after the teacher in one process. Whatever thread count the process had, and
    either way, the configured counts make the weights equal (a 1-thread and a 2-thread teacher
    differ: the test below shows they would not be equal otherwise)."""
    cfg, root = data
    methods, get_context = [], build.multiprocessing.get_context
    monkeypatch.setattr(build.multiprocessing, "get_context",
                        lambda method: methods.append(method) or get_context(method))
    threads = torch.get_num_threads()
    try:
        monkeypatch.setattr(build.os, "cpu_count", lambda: 2)
        torch.set_num_threads(2)
        build.build_models(cfg, root, tmp_path / "forked")
        assert methods == ["fork"], "two cores: the students fork beside the teacher"
        monkeypatch.setattr(build.os, "cpu_count", lambda: 1)
        torch.set_num_threads(1)
        build.build_models(cfg, root, tmp_path / "sequential")
        assert methods == ["fork"], "one core: no process beside the teacher"
    finally:
        torch.set_num_threads(threads)
    assert weights(tmp_path / "forked") == weights(tmp_path / "sequential")


def test_students_on_two_threads_pretrain_in_a_spawned_process_and_train_the_same_weights(data, tmp_path,
                                                                                          monkeypatch):
    """A student on more than one thread would start OpenMP's pool in a forked child (see the test
    below), so beside the teacher it pre-trains in a spawned process; its weights are the
    sequential path's."""
    cfg, root = data
    students = {name: s.__class__(**{**s.__dict__, "threads": 2}) for name, s in cfg.students.items()}
    two = cfg.__class__(**{**cfg.__dict__, "students": students})
    methods, get_context = [], build.multiprocessing.get_context
    monkeypatch.setattr(build.multiprocessing, "get_context", lambda method: methods.append(method) or get_context(method))
    threads = torch.get_num_threads()
    try:
        monkeypatch.setattr(build.os, "cpu_count", lambda: 3)        # the teacher's thread and the student's two
        build.build_models(two, root, tmp_path / "spawned")
        monkeypatch.setattr(build.os, "cpu_count", lambda: 1)
        build.build_models(two, root, tmp_path / "sequential")
    finally:
        torch.set_num_threads(threads)
    assert methods == ["spawn"]
    assert weights(tmp_path / "spawned") == weights(tmp_path / "sequential")


def test_the_models_build_beside_a_process_that_ran_a_two_thread_op(data, tmp_path):
    """A library caller that ran a multi-threaded torch op has an OpenMP pool the forked students'
    process lacks; its first parallel region would wait for those threads for ever (it did, before
    the students' thread count was set before their first op). In a process of its own, with a
    timeout: the hang would otherwise stop the suite."""
    cfg, root = data
    script = f"""
import sys, torch
sys.path[:0] = [{str(REPO)!r}, {str(REPO / "tests")!r}]
from test_determinism import small_toy_config
from pipeline.models import build
torch.set_num_threads(2)
torch.randn(3000, 3000).triu_()       # a two-thread op: this process now has OpenMP's pool
build.os.cpu_count = lambda: 2        # the forked path, students beside the teacher
build.build_models(small_toy_config(), {str(root)!r}, {str(tmp_path / "models")!r})
"""
    # A session of its own: on a timeout the hung students' process goes with it.
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-2000:]
    built = {path.parent for path in (tmp_path / "models").rglob("*.safetensors")}
    assert {student_dir(tmp_path / "models", name) for name in cfg.students} <= built


def test_the_thread_count_changes_the_teacher(data, tmp_path):
    """Why the count is configured: one and two threads train different bytes."""
    cfg, root = data
    build.build_models(cfg, root, tmp_path / "one")
    two = cfg.__class__(**{**cfg.__dict__, "teacher": cfg.teacher.__class__(**{**cfg.teacher.__dict__, "threads": 2})})
    build.build_models(two, root, tmp_path / "two")
    assert weights(tmp_path / "one")["teacher/unet/diffusion_pytorch_model.safetensors"] != \
        weights(tmp_path / "two")["teacher/unet/diffusion_pytorch_model.safetensors"]


def test_the_thread_count_changes_the_fine_tuning(data):
    """Why `train.threads` is fixed too (1 on the toy profile): 20 steps of toy-vit's fine-tuning on
    one and on two threads end with other weights."""
    from pipeline.config import ObjectiveConfig, TrainConfig
    from pipeline.data.datasets import read_index, train_pairs
    from pipeline.models.student import build_toy_student
    from pipeline.train import fit, setup, trained_state

    cfg, root = data
    toy = load(REPO / "params.yaml")
    pairs = train_pairs(root, read_index(root))
    threads, trained = torch.get_num_threads(), []
    try:
        for count in (1, 2):
            student = build_toy_student(toy.students["toy-vit"], cfg.data.image_size)
            trial = setup(TrainConfig(steps=20, batch_size=32, lr=5e-4, scope="full", threads=count),
                          ObjectiveConfig(method="clip", lambda_sds=0.0), student, pairs)
            trained.append(trained_state(fit(trial, None, progress=False)))
    finally:
        torch.set_num_threads(threads)
    assert trained[0].keys() == trained[1].keys()
    assert not all(torch.equal(trained[0][k], trained[1][k]) for k in trained[0])
