"""The models stage: put the teacher and every student into `models/`.

Toy: train the teacher (VAE, then UNet + text encoder) and contrastively pre-train each
student from random init with the trial loop itself (scope "full", lambda 0). Paper
(`source: pretrained`): resolve the diffusers repo / open_clip tag or local copy and save
it (`pipeline.models.paper`). Later stages load only from `models/`, through the loaders
real weights use.
"""
from __future__ import annotations

import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import torchvision.transforms.functional as TF

from pipeline.config import Config, ObjectiveConfig, TrainConfig
from pipeline.data.datasets import read_index, train_pairs
from pipeline.data.records import load_image
from pipeline.device import resolve_device
from pipeline.io import write_json
from pipeline.models import student_dir, teacher_dir
from pipeline.models.student import build_toy_student, save_student
from pipeline.models.teacher import build_toy_teacher, save_teacher
from pipeline.teacher_training import train_unet, train_vae
from pipeline import train as trainer


def build_teacher(cfg: Config, data_root: Path, models: Path) -> dict:
    tcfg = cfg.teacher
    if tcfg.source == "pretrained":
        from pipeline.models.paper import import_teacher

        return import_teacher(tcfg, teacher_dir(models), base=Path(models).parent)
    pairs = train_pairs(data_root, read_index(data_root))
    pixels = torch.stack([TF.to_tensor(load_image(p.image)) for p in pairs]) * 2 - 1
    torch.set_num_threads(tcfg.threads)
    teacher = build_toy_teacher(tcfg, cfg.data.image_size).to(resolve_device(cfg.compute.device))
    generator = torch.Generator().manual_seed(tcfg.seed)
    train_vae(teacher, pixels, tcfg, generator)
    losses = train_unet(teacher, pixels, [p.caption for p in pairs], tcfg, generator)
    save_teacher(teacher, teacher_dir(models))
    tail = losses[-50:] or [float("nan")]
    return {"unet_final_loss": sum(tail) / len(tail), "scaling_factor": teacher.scaling_factor}


def build_student(cfg: Config, name: str, data_root: Path, models: Path,
                  latent_shape: tuple[int, ...] | None = None) -> dict:
    scfg = cfg.students[name]
    if scfg.source == "pretrained":
        from pipeline.models.paper import import_student

        return import_student(name, scfg, student_dir(models, name), Path(models).parent, latent_shape)
    # Before the first op: in the models stage's forked process, it keeps torch out of OpenMP (see `build_models`).
    torch.set_num_threads(scfg.threads)
    student = build_toy_student(scfg, cfg.data.image_size)
    pairs = train_pairs(data_root, read_index(data_root))
    pretrain = TrainConfig(student=name, scope="full", lr=scfg.lr, weight_decay=0.1, warmup_steps=min(50, scfg.pretrain_steps // 10),
                           batch_size=scfg.batch_size, steps=max(scfg.pretrain_steps, 1), seed=scfg.seed,
                           threads=scfg.threads)
    if scfg.pretrain_steps:
        trial = trainer.setup(pretrain, ObjectiveConfig(method="clip", lambda_sds=0.0), student, pairs,
                              compute=cfg.compute)
        # No checkpoints: DVC removes the models stage's output before re-running it, and the
        # teacher beside it has no resume point either; the stage runs in minutes.
        trainer.fit(trial, None)
        loss = trial.history[-1]["clip"] if trial.history else float("nan")
    else:
        loss = float("nan")
    student.model.to("cpu")
    save_student(student, student_dir(models, name))
    return {"pretrain_final_loss": loss}


def _pretrain_students(cfg: Config, names: list[str], data_root: Path, models: Path) -> dict:
    return {name: build_student(cfg, name, data_root, models) for name in names}


def build_models(cfg: Config, data_root: Path, models: Path) -> None:
    """The teacher, then every student. On a CPU with cores enough for both, the toy students
    pre-train in a second process while the toy teacher trains (neither depends on the other).
    Each trains with its own configured thread count, so the weights are the same either way."""
    toy = [name for name, s in cfg.students.items() if s.source == "toy"]
    pairs = len(train_pairs(data_root, read_index(data_root))) if toy else 0
    for name in toy:        # the trainer would refuse it too, after the teacher had trained
        if cfg.students[name].pretrain_steps:
            trainer.check_batch(cfg.students[name].batch_size, pairs, f"students.{name}.batch_size", data_root)
    aside = None
    threads = [cfg.students[name].threads for name in toy]
    if (toy and cfg.teacher.source == "toy" and (os.cpu_count() or 1) >= cfg.teacher.threads + max(threads)
            and resolve_device(cfg.compute.device).type == "cpu"):
        # Forked, the child starts with this process's imports (~6 s of torch, diffusers and
        # open_clip that a spawned one repeats). A forked child lacks the threads of an OpenMP
        # pool its parent started (a caller's earlier multi-threaded torch op), and its first
        # parallel region would wait for them for ever: fork only when the students train on
        # one thread each, which `build_student` sets before any op, so the child never starts
        # a parallel region. Off Linux, or with more threads, spawn.
        method = "fork" if sys.platform.startswith("linux") and max(threads) == 1 else "spawn"
        pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context(method))
        aside = pool.submit(_pretrain_students, cfg, toy, data_root, models)
    try:
        summary = {"teacher": build_teacher(cfg, data_root, models)}
        if aside is not None:
            summary.update(aside.result())
    finally:
        if aside is not None:
            pool.shutdown(cancel_futures=True)
    latent_shape = summary["teacher"].get("latent_shape")  # pretrained teachers report it
    for name in cfg.students:
        if name not in summary:
            summary[name] = build_student(cfg, name, data_root, models, latent_shape)
    write_json(Path(models) / "summary.json", {name: summary[name] for name in ["teacher", *cfg.students]})
