"""One trial: fine-tune a student with L_CLIP + lambda * L_SDS (or the UNet-feature loss), then evaluate.

Recipe shape: `setup` builds everything from the config, `fit` runs the steps (resuming
from the trial folder's checkpoint when one exists), `save` writes only what was trained.
The contrastive pre-training of the toy student is the same loop with scope "full" and
lambda 0, so there is one training loop in the project.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from pipeline.cache import Table
from pipeline.config import ComputeConfig, ObjectiveConfig, TrainConfig
from pipeline.data.records import ImageCaption, load_image
from pipeline.device import resolve_device
from pipeline.data.keys import image_key
from pipeline.io import write_bytes
from pipeline.models.student import Student, contrastive_outputs, embed_dim, layernorm_parameters
from pipeline.models.teacher import Teacher
from pipeline import fastpath, objectives
from pipeline.fastpath import FastPath

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"
TRAINED = "trained.safetensors"


class NonFiniteLoss(FloatingPointError):
    """The loss became NaN or infinite: the trial is stopped, not silently continued."""


class TrialStopped(Exception):
    """The trial was stopped from outside (e.g. a sweep scheduler's early stop): not a failure."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class PairDataset(Dataset):
    """(preprocessed image, caption tokens, caption row in the cache, image row in the cache)."""

    def __init__(self, pairs: list[ImageCaption], student: Student, text_rows: list[int], image_rows: list[int]):
        self.pairs, self.student, self.text_rows, self.image_rows = pairs, student, text_rows, image_rows

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        pair = self.pairs[i]
        return (self.student.preprocess(load_image(pair.image)), self.student.tokenizer([pair.caption])[0],
                self.text_rows[i], self.image_rows[i])


@dataclass
class Trial:
    """Everything a trial's steps need, built once by `setup`."""

    student: Student
    projection: nn.Module | None
    params: dict[str, nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    loader: DataLoader
    teacher: Teacher | None
    conditioning: Table | None
    latents: Table | None
    cfg: TrainConfig
    objective: ObjectiveConfig
    lambda_sds: float
    generator: torch.Generator
    step: int = 0
    history: list[dict] = field(default_factory=list)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    fast: FastPath = field(default_factory=lambda: FastPath.default_for("cpu"))
    scaler: torch.amp.GradScaler | None = None  # fp16 autocast only
    inputs: dict = field(default_factory=dict)  # what it trains from: data and model fingerprints

    @property
    def trainable_count(self) -> int:
        return sum(p.numel() for p in self.params.values())


def trainable_parameters(student: Student, projection: nn.Module | None, scope: str) -> dict[str, nn.Parameter]:
    """Named parameters a scope trains; everything else is frozen.

    layernorm / unet_feature: every LayerNorm of both towers plus h_w (the paper's setting).
    full: every student parameter (the temperature included) plus h_w.
    """
    model = student.model
    if scope == "full":
        chosen = dict(model.named_parameters())
    elif scope in ("layernorm", "unet_feature"):
        ids = {id(p) for p in layernorm_parameters(model)}
        chosen = {n: p for n, p in model.named_parameters() if id(p) in ids}
    else:
        raise ValueError(f"train.scope {scope!r} is not one of 'layernorm', 'full', 'unet_feature'")
    if projection is not None:
        chosen.update({f"h_w.{n}": p for n, p in projection.named_parameters()})
    return chosen


def _batchnorms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def train_mode(model: nn.Module, scope: str) -> nn.Module:
    """Train mode, except that outside the "full" scope every BatchNorm (open_clip's ResNets) stays
    in eval mode: train mode would normalise with batch statistics and move the running averages,
    which are buffers, so a frozen-weights scope would change the model beyond what it trains."""
    model.train()
    if scope != "full":
        for module in _batchnorms(model):
            module.eval()
    return model


def trained_buffers(model: nn.Module, scope: str) -> dict[str, torch.Tensor]:
    """The buffers a scope changes along with its parameters: under "full", BatchNorm's running
    statistics (saved with the parameters, so a resumed or reloaded ResNet is the trained one)."""
    if scope != "full":
        return {}
    return {f"{name}.{key}": buffer for name, module in model.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm) for key, buffer in module.named_buffers(recurse=False)}


def _lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def _feature_shape(teacher: Teacher) -> tuple[int, ...]:
    channels = teacher.unet.config.block_out_channels[-1]
    size = teacher.unet.config.sample_size // 2 ** (len(teacher.unet.config.block_out_channels) - 1)
    return (channels, size, size)


def setup(cfg: TrainConfig, objective: ObjectiveConfig, student: Student, pairs: list[ImageCaption],
          lambda_sds: float, teacher: Teacher | None = None, conditioning: Table | None = None,
          latents: Table | None = None, compute: ComputeConfig | None = None, inputs: dict | None = None) -> Trial:
    """Freeze, choose the trainable scope, build h_w, the optimiser and the data order.

    `compute` (default: the CPU with its default options) says on which device the student,
    h_w and the teacher's UNet run and with which fast-path options (`pipeline.fastpath`).
    `inputs` names what the trial trains from (fingerprints of the data and the models): a
    checkpoint written from other inputs is not resumed.
    """
    compute = compute or ComputeConfig(device="cpu")
    device = resolve_device(compute.device)
    opts = FastPath.from_config(compute, device)
    seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    needs_teacher = lambda_sds > 0 or cfg.scope == "unet_feature"
    if needs_teacher and (teacher is None or conditioning is None):
        raise ValueError("this trial needs the teacher and the cached text conditioning")
    if cfg.scope == "unet_feature" and latents is None:
        raise ValueError("scope 'unet_feature' needs the cached VAE latents of the training images")
    projection = None
    if needs_teacher:
        noising = "noise" if cfg.scope == "unet_feature" else objective.noising   # features of noised latents
        objectives.check_fits_teacher(teacher.scheduler, "objective.t_max", objective.t_max, noising)
        shape = _feature_shape(teacher) if cfg.scope == "unet_feature" else teacher.latent_shape
        projection = objectives.LatentProjection(embed_dim(student), shape)
    student.model.requires_grad_(False).to(device)
    fastpath.prepare_student(student.model, opts)
    if projection is not None:
        projection.to(device)
    params = trainable_parameters(student, projection, cfg.scope)
    for p in params.values():
        p.requires_grad_(True)
    optimizer = fastpath.adamw(list(params.values()), cfg.lr, cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg.warmup_steps, cfg.steps))
    text_rows = [conditioning.index(p.caption) for p in pairs] if conditioning is not None else [0] * len(pairs)
    image_rows = [latents.index(image_key(p.image)) for p in pairs] if latents is not None else [0] * len(pairs)
    dataset = PairDataset(pairs, student, text_rows, image_rows)
    loader = DataLoader(dataset, batch_sampler=StepSampler(len(pairs), cfg.batch_size, cfg.seed),
                        num_workers=cfg.workers, pin_memory=device.type == "cuda")
    if teacher is not None:
        fastpath.prepare_teacher_unet(teacher.unet.to(device), opts)
    return Trial(student, projection, params, optimizer, scheduler, loader, teacher, conditioning, latents,
                 cfg, objective, lambda_sds, torch.Generator().manual_seed(cfg.seed + 1), device=device, fast=opts,
                 scaler=fastpath.grad_scaler(device, opts) if opts.autocast == "fp16" else None, inputs=dict(inputs or {}))


def loss_step(trial: Trial, images, tokens, text_rows, image_rows) -> dict[str, torch.Tensor]:
    """The losses of one batch on the trial's device; `total` is what is backpropagated.

    t and eps come from `trial.generator` (a CPU generator, so a run draws the same numbers
    on any device) and are then moved to the device. Under autocast only the student's
    forward (unless `autocast_student` is off) and the UNet run in bf16/fp16; h_w, the
    noising and the losses run in fp32.
    """
    model, device, opts = train_mode(trial.student.model, trial.cfg.scope), trial.device, trial.fast
    images, tokens = images.to(device, non_blocking=True), tokens.to(device, non_blocking=True)
    with fastpath.autocast(device, opts) if opts.autocast_student else contextlib.nullcontext():
        image_features, text_features, logit_scale = contrastive_outputs(model, images, tokens)
    image_features, text_features = image_features.float(), text_features.float()
    losses = {"clip": objectives.clip_loss(image_features, text_features, logit_scale.float())}
    total = losses["clip"]
    if trial.projection is not None:
        obj, teacher = trial.objective, trial.teacher
        cond = trial.conditioning.rows(text_rows).to(device, non_blocking=True)
        t = objectives.sample_timesteps(len(images), obj.t_min, obj.t_max, trial.generator)
        predicted = trial.projection(image_features) * obj.latent_scale
        if trial.cfg.scope == "unet_feature":
            x0 = trial.latents.rows(image_rows)
            noise = torch.randn(x0.shape, generator=trial.generator)
            x0, noise, t = x0.to(device), noise.to(device), t.to(device)
            with fastpath.autocast(device, opts):
                target = objectives.unet_features(teacher.unet, teacher.scheduler.add_noise(x0, noise, t), t, cond)
            losses["unet_feature"] = objectives.unet_feature_loss(predicted, target.float())
            total = total + trial.lambda_sds * losses["unet_feature"]
        else:
            noise = torch.randn(predicted.shape, generator=trial.generator).to(device, non_blocking=True)
            unet = fastpath.unet_caller(teacher.unet, opts, device)
            sds = objectives.sds_loss(predicted, cond, unet, teacher.scheduler, t.to(device), noise,
                                      obj.noising, obj.gradient)
            losses["sds"] = sds.mse
            total = total + trial.lambda_sds * sds.loss
    losses["total"] = total
    return losses


class StepSampler(Sampler):
    """Batch indices as a pure function of (seed, step): epoch e is randperm(seed + e).

    A resumed trial sets `start` to its step and sees exactly the batches an uninterrupted
    run would have seen, with no sampler state to checkpoint.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed, self.start = n, min(batch_size, n), seed, 0
        self.per_epoch = n // self.batch_size

    def __iter__(self):
        step = self.start
        while True:
            epoch, k = divmod(step, self.per_epoch)
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
            yield order[k * self.batch_size : (k + 1) * self.batch_size].tolist()
            step += 1


def fit(trial: Trial, folder: Path | None, on_log: Callable[[int, dict[str, float]], None] | None = None,
        progress: bool = True, on_checkpoint: Callable[[int, Path], None] | None = None) -> Trial:
    """Run the remaining steps, checkpointing to `folder` so an interrupted trial resumes
    (no `folder`: no checkpoints, for a trial that is part of a longer job that cannot resume).
    A trial at step 0 first resumes from `folder`'s checkpoint, if any; one its caller already
    resumed (`load_checkpoint`) goes on from where it is.

    `on_log(step, values)` runs at every log step; `on_checkpoint(step, folder)` right after
    each checkpoint is written (a sweep trial hands the file to Ray Tune there).
    """
    if folder is not None:
        folder = Path(folder)
        if trial.step == 0:
            load_checkpoint(trial, folder)
    cfg = trial.cfg
    trial.loader.batch_sampler.start = trial.step
    batches = iter(trial.loader)
    bar = tqdm(total=cfg.steps, initial=trial.step, desc="train", disable=not progress, leave=False)
    while trial.step < cfg.steps:
        images, tokens, text_rows, image_rows = next(batches)
        losses = loss_step(trial, images, tokens, text_rows, image_rows)
        values = {k: float(v.detach()) for k, v in losses.items()}
        if not all(math.isfinite(v) for v in values.values()):
            raise NonFiniteLoss(f"step {trial.step}: non-finite loss {values}")
        trial.optimizer.zero_grad(set_to_none=True)
        if trial.scaler is None:
            losses["total"].backward()
            trial.optimizer.step()
        else:
            trial.scaler.scale(losses["total"]).backward()
            trial.scaler.step(trial.optimizer)
            trial.scaler.update()
        trial.scheduler.step()
        trial.step += 1
        bar.update(1)
        if trial.step % cfg.log_every == 0 or trial.step == cfg.steps:
            values["lr"] = trial.scheduler.get_last_lr()[0]
            trial.history.append({"step": trial.step, **values})
            bar.set_postfix(loss=f"{values['total']:.4f}")
            if on_log:
                on_log(trial.step, values)
        if folder is not None and trial.step % cfg.checkpoint_every == 0 and trial.step < cfg.steps:
            save_checkpoint(trial, folder)
            if on_checkpoint:
                on_checkpoint(trial.step, folder)
    bar.close()
    return trial


def trained_tensors(trial: Trial) -> dict[str, torch.Tensor]:
    """What the trial changes, by name: its trainable parameters and `trained_buffers`."""
    return {**trial.params, **trained_buffers(trial.student.model, trial.cfg.scope)}


def trained_state(trial: Trial) -> dict[str, torch.Tensor]:
    return {name: t.detach().cpu().contiguous().clone() for name, t in trained_tensors(trial).items()}


# Train keys that change how a trial runs and reports, not what it computes: a checkpoint
# resumes across them (e.g. with loader workers added after a crash).
RUN_ONLY_KEYS = ("threads", "workers", "log_every", "checkpoint_every")


def settings(trial: Trial) -> dict:
    """What a checkpoint must have been trained under, and from, to be resumed by this trial."""
    train = {k: v for k, v in dataclasses.asdict(trial.cfg).items() if k not in RUN_ONLY_KEYS}
    return {"train": train, "objective": dataclasses.asdict(trial.objective), "lambda_sds": trial.lambda_sds,
            "trainable": sorted(trial.params), "inputs": trial.inputs}


def save_checkpoint(trial: Trial, folder: Path) -> None:
    """Trained parameters, optimiser, scheduler, step and RNG states, written atomically."""
    state = {
        "settings": settings(trial), "step": trial.step, "params": trained_state(trial), "optimizer": trial.optimizer.state_dict(),
        "scheduler": trial.scheduler.state_dict(), "history": trial.history,
        "rng": {"torch": torch.get_rng_state(), "trial": trial.generator.get_state()},
        "scaler": trial.scaler.state_dict() if trial.scaler is not None else None,
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes(Path(folder) / CHECKPOINT, buffer.getvalue())


def load_checkpoint(trial: Trial, folder: Path) -> bool:
    path = Path(folder) / CHECKPOINT
    if not path.is_file():
        return False
    state = torch.load(path, weights_only=False, map_location=trial.device)
    if state.get("settings") != settings(trial):
        # Another configuration's optimiser state would silently mix two trials.
        log.warning("%s was written under other settings; starting this trial from step 0", path)
        path.unlink()
        return False
    tensors = trained_tensors(trial)
    with torch.no_grad():
        for name, value in state["params"].items():
            tensors[name].copy_(value)
    trial.optimizer.load_state_dict(state["optimizer"])
    trial.scheduler.load_state_dict(state["scheduler"])
    if trial.scaler is not None and state.get("scaler"):
        trial.scaler.load_state_dict(state["scaler"])
    trial.step, trial.history = state["step"], state["history"]
    torch.set_rng_state(state["rng"]["torch"].cpu())
    trial.generator.set_state(state["rng"]["trial"].cpu())
    log.info("resumed %s at step %d", folder, trial.step)
    return True


def save_trained(trial: Trial, folder: Path) -> Path:
    """Only what the scope trained (safetensors), with the trainable count in the metadata."""
    path = Path(folder) / TRAINED
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = save(trained_state(trial), metadata={"scope": trial.cfg.scope, "trainable": str(trial.trainable_count)})
    write_bytes(path, blob)
    return path


def discard_checkpoint(folder: Path) -> None:
    """Drop the resume point once the trained file is saved and evaluated: until then a failed
    evaluation is re-run from the last checkpoint rather than from step 0."""
    (Path(folder) / CHECKPOINT).unlink(missing_ok=True)


def load_trained(student: Student, path: Path) -> None:
    """Apply a trial's trained parameters (and buffers) onto a freshly loaded student (h_w entries are skipped)."""
    state = load_file(str(path))
    tensors = {**dict(student.model.named_parameters()), **dict(student.model.named_buffers())}
    with torch.no_grad():
        for name, value in state.items():
            if not name.startswith("h_w."):
                tensors[name].copy_(value)
