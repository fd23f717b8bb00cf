"""One trial: fine-tune a student with the configured method (`ObjectiveConfig`: L_CLIP, NegCLIP,
L_CLIP + lambda L_SDS, UNet-feature distillation, diffusion feedback or its contrastive form).

Recipe shape: `setup` builds everything from the config, `fit` runs the steps (resuming
from the trial folder's checkpoint when one exists), `save` writes only what was trained.
The contrastive pre-training of the toy student is the same loop with method "clip" and
scope "full", so there is one training loop in the project.

The student's towers are called through their own encoders (`encode_image`, `encode_text`),
not `forward`: CLIP's forward returns a tuple or a dict depending on `output_dict`, and CoCa's
runs its captioning decoder; only the contrastive part is fine-tuned here.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from tqdm import tqdm

from pipeline.cache import Table
from pipeline.config import (FEEDBACK_METHODS, TEACHER_LOSSES, ComputeConfig, ConfigError, ObjectiveConfig, TrainConfig,
                             flatten)
from pipeline.data.keys import image_key
from pipeline.data.records import ImageCaption, load_image
from pipeline.device import resolve_device
from pipeline.io import write_bytes
from pipeline.models.student import (Student, embed_dim, has_patch_tokens, image_tokens, layernorm_parameters,
                                     normalization)
from pipeline.models.teacher import Teacher
from pipeline import fastpath, objectives
from pipeline.fastpath import FastPath

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"
TRAINED = "trained.safetensors"


class NonFiniteLoss(FloatingPointError):
    """The loss became NaN or infinite: the trial is stopped, not silently continued."""


class StaleCheckpoint(ConfigError):
    """A resume point written under other settings: resuming it would mix two trials' optimiser
    states, and deleting it would throw away what may be the only copy of hours of training."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class PairDataset(Dataset):
    """Items of rows (preprocessed image, caption tokens, hard-negative tokens, caption row, image row).

    Indices are (pair, step) (see `StepSampler`): a pair's hard negative is drawn from its list
    by a generator seeded with (seed, step, pair), so a resumed trial and any number of loader
    workers draw the same negatives. Without negatives the negative tokens are the caption's own
    (never used). With `neighbours` (NegCLIP's hard-negative images: `nearest_images`) an item is
    two rows, the pair's and one of its neighbours' with a hard negative of that neighbour's
    caption, both drawn the same way; `collate_rows` puts the neighbours' rows after the batch's own.
    """

    def __init__(self, pairs: list[ImageCaption], student: Student, text_rows: list[int], image_rows: list[int],
                 negatives: list[list[str]] | None = None, seed: int = 0, neighbours: list[list[int]] | None = None):
        self.pairs, self.student, self.text_rows, self.image_rows = pairs, student, text_rows, image_rows
        self.negatives, self.seed, self.neighbours = negatives, seed, neighbours

    def __len__(self) -> int:
        return len(self.pairs)

    def negative(self, i: int, step: int) -> str:
        if self.negatives is None:
            return self.pairs[i].caption
        return random.Random(f"{self.seed}:{step}:{i}").choice(self.negatives[i])

    def neighbour(self, i: int, step: int) -> tuple[int, str]:
        """The neighbour of pair i that joins step `step`'s batch, and the hard negative of its caption."""
        rng = random.Random(f"{self.seed}:{step}:{i}:image")
        j = rng.choice(self.neighbours[i])
        return j, rng.choice(self.negatives[j])

    def row(self, i: int, negative: str) -> tuple:
        pair = self.pairs[i]
        tokens = self.student.tokenizer([pair.caption, negative])
        return (self.student.preprocess(load_image(pair.image)), tokens[0], tokens[1],
                self.text_rows[i], self.image_rows[i])

    def __getitem__(self, item: tuple[int, int]) -> list[tuple]:
        i, step = item
        rows = [self.row(i, self.negative(i, step))]
        if self.neighbours is not None:
            rows.append(self.row(*self.neighbour(i, step)))
        return rows


def collate_rows(items: list[list[tuple]]) -> list[torch.Tensor]:
    """A batch of `PairDataset` items: every item's own row, then the neighbours' rows in the same order."""
    return default_collate([rows[0] for rows in items] + [row for rows in items for row in rows[1:]])


class _Images(Dataset):
    """Preprocessed images, one per path (what `nearest_images` embeds)."""

    def __init__(self, paths: list[Path], preprocess: Callable):
        self.paths, self.preprocess = paths, preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.preprocess(load_image(self.paths[i]))


def nearest_rows(embeddings: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """Each row's k nearest other rows by dot product (cosine for unit rows), nearest first, a tie
    going to the lower index; in chunks of rows, so COCO's 118k images need no 118k x 118k matrix."""
    nearest = []
    for start in range(0, len(embeddings), chunk):
        sims = embeddings[start : start + chunk] @ embeddings.T
        own = torch.arange(len(sims), device=sims.device)
        sims[own, own + start] = -math.inf
        nearest.append(torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :k].cpu())
    return torch.cat(nearest)


def nearest_images(student: Student, pairs: list[ImageCaption], k: int, device: torch.device, opts: FastPath,
                   workers: int = 0, batch_size: int = 256) -> list[list[int]]:
    """NegCLIP's hard-negative images: for each pair, a pair of each of the k training images nearest
    its own (nearest first; of an image with several captions, its first pair), by the cosine of the
    student's image embeddings as the student is now: before the first step, the pretrained one's
    view (NegCLIP's neighbours come from CLIP's image embeddings, 3 per image)."""
    images = list(dict.fromkeys(p.image for p in pairs))
    if k >= len(images):
        raise ConfigError(f"objective.negclip_neighbours: {k} is not allowed for {len(images)} training images (an "
                          f"image's neighbours are other images); allowed: < {len(images)}")
    model = student.model
    training = model.training
    model.eval()                     # a ResNet's BatchNorm: its running statistics, as the evaluation embeds
    embedded = []
    # Its own generator: a loader draws its workers' base seed each time it is iterated, from the global
    # stream otherwise, which would leave that stream elsewhere than in a trial of another method.
    loader = DataLoader(_Images(images, student.preprocess), batch_size=batch_size, num_workers=workers,
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), (fastpath.autocast(device, opts) if opts.autocast_student else contextlib.nullcontext()):
        for pixels in tqdm(loader, desc="negclip neighbours", leave=False, disable=len(images) < 10_000):
            embedded.append(F.normalize(model.encode_image(pixels.to(device)).float(), dim=-1))
    model.train(training)
    nearest = nearest_rows(torch.cat(embedded), k).tolist()
    first: dict[Path, int] = {}
    for i, pair in enumerate(pairs):
        first.setdefault(pair.image, i)
    row = {image: r for r, image in enumerate(images)}
    return [[first[images[j]] for j in nearest[row[pair.image]]] for pair in pairs]


@dataclass
class Trial:
    """Everything a trial's steps need, built once by `setup`."""

    student: Student
    projector: nn.Module | None          # h_w (sds, unet_feature) or the feedback projector
    params: dict[str, nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    loader: DataLoader
    teacher: Teacher | None
    conditioning: Table | None
    latents: Table | None
    cfg: TrainConfig
    objective: ObjectiveConfig
    generator: torch.Generator
    step: int = 0
    history: list[dict] = field(default_factory=list)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    fast: FastPath = field(default_factory=lambda: FastPath.default_for("cpu"))
    scaler: torch.amp.GradScaler | None = None  # fp16 autocast only
    inputs: dict = field(default_factory=dict)  # what it trains from: data and model fingerprints
    empty: torch.Tensor | None = None           # the feedback methods: the empty caption's conditioning
    normalization: tuple | None = None          # contrastive feedback: the (mean, std) its augmentations undo

    @property
    def trainable_count(self) -> int:
        return sum(p.numel() for p in self.params.values())


# open_clip's attention (nn.MultiheadAttention: peft adapts its q/k/v and output projections) and
# MLP linears, in both towers; ResNet students' attention pools have a c_proj too.
LORA_TARGETS = ("attn", "c_fc", "c_proj")


def add_lora(model: nn.Module, rank: int, alpha: float) -> list[str]:
    """Inject peft LoRA adapters into the student in place; their parameter names."""
    from open_clip.modified_resnet import ModifiedResNet
    from peft import LoraConfig, inject_adapter_in_model

    if isinstance(getattr(model, "visual", None), ModifiedResNet):
        # Its attention pool passes its projections' raw weights to F.multi_head_attention_forward,
        # so an adapter on them never runs, and the rest of the tower is convolutions.
        raise ConfigError("train.scope: 'lora' is not allowed for a ResNet image tower (no adapter would "
                          "reach it); allowed: layernorm, full")
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(LORA_TARGETS)), model)
    return [name for name, _ in model.named_parameters() if "lora_" in name]


def lora_bases(model: nn.Module) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """The frozen weights that peft's LoRA for nn.MultiheadAttention merges its adapter into and back
    out of at every forward, with their values now (owner, attribute, value). W + BA - BA is not W in
    floating point: `fit` puts these values back after each step, so the student at the end of the
    training is the one its trained file rebuilds (the student's weights and the adapters). The
    evaluation's forwards drift them again, alike for a rebuilt student scored the same way."""
    from peft.tuners.lora.layer import MultiheadAttention

    bases = []
    for module in model.modules():
        if isinstance(module, MultiheadAttention):
            for owner, name in ((module.base_layer, "in_proj_weight"),
                                (module.base_layer.out_proj.get_base_layer(), "weight")):
                bases.append((owner, name, getattr(owner, name).detach().clone()))
    return bases


# open_clip's trainer clamps the temperature after every step (at ln 100, as CLIP did).
LOGIT_SCALE_MAX = math.log(100)


def is_decayed(name: str, param: nn.Parameter) -> bool:
    """Whether weight decay applies, as open_clip's training decides: not to gains, biases and other
    one-dimensional tensors, norms, nor the temperature (decay would pull logit_scale down)."""
    return param.ndim >= 2 and not any(part in name for part in ("bn", "ln", "bias", "logit_scale"))


def trainable_parameters(student: Student, projector: nn.Module | None, cfg: TrainConfig) -> dict[str, nn.Parameter]:
    """Named parameters a scope trains; everything else is frozen.

    layernorm: every LayerNorm of both towers; full: every student parameter (the temperature
    included); lora: the adapters `add_lora` injects (done here). Plus h_w / the projector. (`setup`
    keeps the image tower's part alone where objective.clip_weight is 0.)
    """
    model = student.model
    if cfg.scope == "full":
        chosen = dict(model.named_parameters())
    elif cfg.scope == "layernorm":
        ids = {id(p) for p in layernorm_parameters(model)}
        chosen = {n: p for n, p in model.named_parameters() if id(p) in ids}
    elif cfg.scope == "lora":
        names = set(add_lora(model, cfg.lora_rank, cfg.lora_alpha))
        chosen = {n: p for n, p in model.named_parameters() if n in names}
    else:
        raise ValueError(f"train.scope {cfg.scope!r} is not one of 'layernorm', 'full', 'lora'")
    if projector is not None:
        chosen.update({f"h_w.{n}": p for n, p in projector.named_parameters()})
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


def build_projector(objective: ObjectiveConfig, student: Student, teacher: Teacher, length: int = 0) -> nn.Module:
    """h_w into the teacher's latent (sds) or mid-block features (unet_feature), or diffusion
    feedback's projector into its conditioning of `length` tokens; checked against the teacher
    (one-line ConfigError)."""
    noising = objective.noising if objective.method == "sds" else "noise"
    objectives.check_fits_teacher(teacher.scheduler, "objective.t_max", objective.t_max, noising)
    if objective.method in FEEDBACK_METHODS:
        if objective.feedback_tokens + 1 > length:
            raise ConfigError(f"objective.feedback_tokens: {objective.feedback_tokens} with the CLS token does not fit "
                              f"the teacher's {length} conditioning tokens; allowed: <= {length - 1}")
        if objective.feedback_tokens and not has_patch_tokens(student.model):
            raise ConfigError(f"objective.feedback_tokens: {objective.feedback_tokens} needs a ViT student with patch "
                              "tokens; this student's image tower has none; allowed: 0")
        return objectives.FeedbackProjector(embed_dim(student), teacher.unet.config.cross_attention_dim,
                                            objective.projector)
    shape = _feature_shape(teacher) if objective.method == "unet_feature" else teacher.latent_shape
    return objectives.LatentProjection(embed_dim(student), shape)


def setup(cfg: TrainConfig, objective: ObjectiveConfig, student: Student, pairs: list[ImageCaption],
          teacher: Teacher | None = None, conditioning: Table | None = None, latents: Table | None = None,
          compute: ComputeConfig | None = None, inputs: dict | None = None,
          negatives: list[list[str]] | None = None) -> Trial:
    """Freeze, choose the trainable scope, build h_w / the projector, the optimiser and the data order.

    What the method reads: `teacher` and `conditioning` (the cached text conditioning; the feedback
    methods read its empty caption's row) with a teacher loss, `latents` (the cached VAE
    latents of the training images) for unet_feature and the feedback methods, `negatives` (one
    list per pair) for negclip, whose hard-negative images (`objective.negclip_neighbours`) are
    found here, by the student before its first step (`nearest_images`). `compute` (default: the
    CPU with its default options) says on which device the student, the projector and the
    teacher's UNet run and with which fast-path options (`pipeline.fastpath`). `inputs` names what
    the trial trains from (fingerprints of the data and the models): a checkpoint written from
    other inputs is not resumed.
    """
    compute = compute or ComputeConfig(device="cpu")
    device = resolve_device(compute.device)
    opts = FastPath.from_config(compute, device)
    seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    method = objective.method
    if objective.teacher_loss and (teacher is None or conditioning is None):
        raise ValueError(f"method {method!r} needs the teacher and the cached text conditioning")
    if objective.teacher_loss and method != "sds" and latents is None:
        raise ValueError(f"method {method!r} needs the cached VAE latents of the training images")
    if method == "negclip" and (negatives is None or len(negatives) != len(pairs)):
        raise ValueError("method 'negclip' needs a list of hard-negative captions for every training pair")
    if teacher is not None:
        for module in teacher.modules():   # the teacher is never trained, whatever built it
            module.requires_grad_(False)
    # The feedback methods condition the teacher on the empty caption plus the student's tokens.
    empty = conditioning.get([""])[0].to(device) if objective.teacher_loss and method in FEEDBACK_METHODS else None
    projector = build_projector(objective, student, teacher, 0 if empty is None else len(empty)) \
        if objective.teacher_loss else None
    student.model.requires_grad_(False)
    params = trainable_parameters(student, projector, cfg)
    if objective.clip_weight == 0:
        # The teacher's loss reaches the student through its image tower alone: the rest of the scope
        # would be counted as trained (and, with weight decay, decayed) while nothing trains it.
        params = {name: p for name, p in params.items() if name.startswith(("visual.", "h_w."))}
        if all(name.startswith("h_w.") for name in params):      # e.g. a ResNet image tower has no LayerNorm
            raise ConfigError(f"train.scope: {cfg.scope!r} with objective.clip_weight 0 trains nothing of the "
                              "student: the teacher's loss reaches its image tower alone, which has no parameter "
                              "of this scope; allowed: another scope, or objective.clip_weight > 0")
    student.model.to(device)
    fastpath.prepare_student(student.model, opts)
    if projector is not None:
        projector.to(device)
    for p in params.values():
        p.requires_grad_(True)
    # A fresh projector starts from random weights and may need another rate than the pretrained
    # student (`objective.projector_lr`); one schedule scales both groups.
    groups = []
    for projected, lr in ((False, cfg.lr), (True, objective.projector_lr or cfg.lr)):
        chosen = {name: p for name, p in params.items() if name.startswith("h_w.") == projected}
        for decayed in (True, False):
            group = [p for name, p in chosen.items() if is_decayed(name, p) == decayed]
            if group:
                groups.append({"params": group, "lr": lr, "weight_decay": cfg.weight_decay if decayed else 0.0})
    optimizer = fastpath.adamw(groups, cfg.lr, cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg.warmup_steps, cfg.steps))
    by_caption = projector is not None and method in ("sds", "unet_feature")
    text_rows = [conditioning.index(p.caption) for p in pairs] if by_caption else [0] * len(pairs)
    image_rows = [latents.index(image_key(p.image)) for p in pairs] if latents is not None else [0] * len(pairs)
    neighbours = nearest_images(student, pairs, objective.negclip_neighbours, device, opts, cfg.workers) \
        if method == "negclip" and objective.negclip_neighbours else None
    dataset = PairDataset(pairs, student, text_rows, image_rows, negatives if method == "negclip" else None, cfg.seed,
                          neighbours)
    # Its own generator for the workers' base seed, which would otherwise be drawn from the global
    # stream each time the loader is iterated: after a resume's restore, a draw the uninterrupted run
    # took elsewhere (nothing in a step reads the global stream today; a dropout would).
    loader = DataLoader(dataset, batch_sampler=StepSampler(len(pairs), cfg.batch_size, cfg.seed),
                        collate_fn=collate_rows, num_workers=cfg.workers, pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(stream_seed(cfg.seed, "loader")))
    if projector is not None:
        fastpath.prepare_teacher_unet(teacher.unet.to(device), opts)
    return Trial(student, projector, params, optimizer, scheduler, loader, teacher, conditioning, latents,
                 cfg, objective, torch.Generator().manual_seed(stream_seed(cfg.seed, "teacher")), device=device, fast=opts,
                 scaler=fastpath.grad_scaler(device, opts) if opts.autocast == "fp16" else None,
                 inputs=dict(inputs or {}), empty=empty,
                 normalization=normalization(student) if empty is not None and method == "contrastive_feedback"
                 else None)


def loss_step(trial: Trial, images, tokens, negatives, text_rows, image_rows) -> dict[str, torch.Tensor]:
    """The losses of one batch on the trial's device; `total` is what is backpropagated.

    During the first `objective.projector_steps` steps only the projector trains: the student's
    forward runs under no-grad and L_CLIP is not computed. With `objective.clip_weight` 0 L_CLIP is
    logged, not trained on: it and the text tower run under no-grad. t and eps come from `trial.generator`
    (a CPU generator, so a run draws the same numbers on any device) and are then moved to the
    device. Under autocast only the student's forward (unless `autocast_student` is off) and the
    UNet run in bf16/fp16; the projector, the noising and the losses run in fp32.
    """
    obj, device, opts = trial.objective, trial.device, trial.fast
    model = train_mode(trial.student.model, trial.cfg.scope)
    stage_one = trial.step < obj.projector_steps
    images = images.to(device, non_blocking=True)
    # Contrastive feedback's augmented views, drawn before the teacher loss's t and noise.
    views = (None if trial.normalization is None
             else objectives.augmented_views(images, *trial.normalization, trial.generator))
    with contextlib.ExitStack() as stack:
        if opts.autocast_student:
            stack.enter_context(fastpath.autocast(device, opts))
        if stage_one:
            stack.enter_context(torch.no_grad())
        if obj.method in FEEDBACK_METHODS and obj.feedback_tokens and trial.projector is not None:
            encode = lambda pixels: image_tokens(model, pixels)        # noqa: E731
        else:
            encode = lambda pixels: (model.encode_image(pixels), None)  # noqa: E731
        pooled, patches = encode(images)
        viewed = None if views is None else encode(views)
        if not stage_one and obj.clip_weight == 0:
            stack.enter_context(torch.no_grad())     # L_CLIP is then logged, not trained on
        if not stage_one:
            texts = tokens.to(device, non_blocking=True)
            if obj.method == "negclip":
                texts = torch.cat([texts, negatives.to(device, non_blocking=True)])
            text_features = model.encode_text(texts, normalize=True).float()
    image_features = F.normalize(pooled.float(), dim=-1)
    losses: dict[str, torch.Tensor] = {}
    total = torch.zeros((), device=device)
    if not stage_one:
        with torch.no_grad() if obj.clip_weight == 0 else contextlib.nullcontext():    # logged, not trained on
            scale = model.logit_scale.exp().float()
            if obj.method == "negclip":
                batch = len(images)
                losses["clip"] = objectives.negclip_loss(image_features, text_features[:batch], text_features[batch:],
                                                         scale)
            else:
                losses["clip"] = objectives.clip_loss(image_features, text_features, scale)
        total = obj.clip_weight * losses["clip"]
    if trial.projector is not None:
        loss = teacher_loss(trial, image_features, pooled, patches, text_rows, image_rows, viewed)
        losses[TEACHER_LOSSES[obj.method]] = loss
        total = total + obj.lambda_sds * loss
    losses["total"] = total
    return losses


def teacher_loss(trial: Trial, image_features: torch.Tensor, pooled: torch.Tensor, patches: torch.Tensor | None,
                 text_rows, image_rows, viewed: tuple | None = None) -> torch.Tensor:
    """The method's teacher term for one batch (see `loss_step`); `viewed`: the
    (pooled, patches) of contrastive feedback's augmented views."""
    obj, device, opts, teacher = trial.objective, trial.device, trial.fast, trial.teacher
    batch = len(image_features)
    unet = fastpath.unet_caller(teacher.unet, opts, device)
    # The config allows feedback_timesteps > 1 only for diffusion feedback: every other method draws one t per image.
    draws = obj.feedback_timesteps
    t = objectives.sample_timesteps(batch * draws, obj.t_min, obj.t_max, trial.generator)
    if obj.method == "diffusion_feedback":
        # Each image's latent and conditioning repeated for its timesteps, image by image (DIVA's layout).
        x0 = trial.latents.rows(image_rows).repeat_interleave(draws, 0)
        noise = torch.randn(x0.shape, generator=trial.generator)
        # The CLS embedding before its normalisation, and patch tokens drawn anew for every timestep, as
        # each of DIVA's draws its own; the CLS alone is the same at every timestep, so projected once.
        if patches is None or not obj.feedback_tokens:
            cond = trial.projector(objectives.feedback_tokens(pooled, None, 0, None), trial.empty)
            cond = cond.repeat_interleave(draws, 0)
        else:
            tokens = objectives.feedback_tokens(pooled.repeat_interleave(draws, 0), patches.repeat_interleave(draws, 0),
                                                obj.feedback_tokens, trial.generator)
            cond = trial.projector(tokens, trial.empty)
        return objectives.feedback_loss(x0.to(device), cond, unet, teacher.scheduler, t.to(device), noise.to(device),
                                        obj.reduction)
    if obj.method == "contrastive_feedback":
        x0 = trial.latents.rows(image_rows)
        noise = torch.randn(x0.shape, generator=trial.generator)
        partners = objectives.contrastive_partners(batch, obj.contrastive_negatives, trial.generator)
        own = objectives.feedback_tokens(pooled, patches, obj.feedback_tokens, trial.generator)
        augmented = objectives.feedback_tokens(*viewed, obj.feedback_tokens, trial.generator)
        return objectives.contrastive_feedback_loss(
            x0.to(device), trial.projector(own, trial.empty), trial.projector(augmented, trial.empty), partners, unet,
            teacher.scheduler, t.to(device), noise.to(device), obj.contrastive_temperature)
    cond = trial.conditioning.rows(text_rows).to(device, non_blocking=True)
    predicted = trial.projector(image_features) * obj.latent_scale
    if obj.method == "unet_feature":
        x0 = trial.latents.rows(image_rows)
        noise = torch.randn(x0.shape, generator=trial.generator)
        x0, noise, t = x0.to(device), noise.to(device), t.to(device)
        with fastpath.autocast(device, opts):
            target = objectives.unet_features(teacher.unet, teacher.scheduler.add_noise(x0, noise, t), t, cond)
        return objectives.unet_feature_loss(predicted, target.float(), obj.reduction)
    noise = torch.randn(predicted.shape, generator=trial.generator).to(device, non_blocking=True)
    sds = objectives.sds_loss(predicted, cond, unet, teacher.scheduler, t.to(device), noise, obj.noising,
                              obj.gradient, obj.reduction)
    return sds.loss


def stream_seed(seed: int, stream: int | str) -> int:
    """The generator seed of one random stream of a run (an epoch's order, the teacher losses' draws):
    a hash of (seed, stream), not seed + k, which would give seed s's stream the numbers of seed
    s + k's: neighbouring seeds would train on the same batches for all but their first epoch, or
    draw the t and noise of one seed from the stream that initialised the next one's h_w."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{stream}".encode(), digest_size=8).digest(), "little")


def check_batch(batch_size: int, pairs: int, key: str, source: Path) -> None:
    """Refuse in one line, naming `key`, a batch larger than the `pairs` of `source` it is drawn from:
    it cannot be drawn, and the run would record a size it never trained with. The stages check it
    before any work; `StepSampler` raises for a library caller that did not."""
    if batch_size > pairs:
        raise ConfigError(f"{key}: {batch_size} is more than the {pairs} training pairs of {source}; "
                          f"allowed: <= {pairs}")


class StepSampler(Sampler):
    """Batches as a pure function of (seed, step): epoch e is a permutation drawn from
    `stream_seed(seed, e)`; each item is (pair index, step), so what a dataset draws per item can
    depend on the step too.

    A resumed trial sets `start` to its step and sees exactly the batches an uninterrupted
    run would have seen, with no sampler state to checkpoint.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        if batch_size > n:   # the stages refuse it in one line first (`check_batch`)
            raise ValueError(f"a batch of {batch_size} cannot be drawn from {n} pairs; allowed: batch_size <= {n}")
        self.n, self.batch_size, self.seed, self.start = n, batch_size, seed, 0
        self.per_epoch = n // self.batch_size

    def __iter__(self):
        step = self.start
        while True:
            epoch, k = divmod(step, self.per_epoch)
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(stream_seed(self.seed, epoch)))
            yield [(i, step) for i in order[k * self.batch_size : (k + 1) * self.batch_size].tolist()]
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
    bases = lora_bases(trial.student.model) if cfg.scope == "lora" else []
    while trial.step < cfg.steps:
        losses = loss_step(trial, *next(batches))
        values = {k: float(v.detach()) for k, v in losses.items()}
        if not all(math.isfinite(v) for v in values.values()):
            raise NonFiniteLoss(f"step {trial.step}: non-finite loss {values}; lower train.lr or "
                                f"objective.lambda_sds (or objective.latent_scale)")
        trial.optimizer.zero_grad(set_to_none=True)
        if trial.scaler is None:
            losses["total"].backward()
            trial.optimizer.step()
        else:
            trial.scaler.scale(losses["total"]).backward()
            trial.scaler.step(trial.optimizer)
            trial.scaler.update()
        with torch.no_grad():
            for owner, name, value in bases:
                getattr(owner, name).copy_(value)
            if "logit_scale" in trial.params:
                trial.params["logit_scale"].clamp_(0, LOGIT_SCALE_MAX)
        lr = trial.scheduler.get_last_lr()[0]        # the rate this step used, before the schedule moves on
        trial.scheduler.step()
        trial.step += 1
        bar.update(1)
        if trial.step % cfg.log_every == 0 or trial.step == cfg.steps:
            values["lr"] = lr
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
# resumes across them (e.g. with loader workers added after a crash). `threads` is among them as
# configured (0: all cores); the count it resolves to on a CPU is a setting (`settings`).
RUN_ONLY_KEYS = ("threads", "workers", "log_every", "checkpoint_every")


# What a checkpoint resumes into beyond its settings: raised whenever the loop changes what the same
# settings train (2: epoch orders from a hash of (seed, epoch), open_clip's weight-decay groups;
# 3: LoRA's frozen attention weights put back after every step, the temperature clamped at ln 100;
# 4: diffusion feedback's CLS added at every position of the teacher's conditioning; 5: the teacher
# losses' draws from a stream of their own, hashed from the seed; 6: diffusion feedback's patch tokens drawn
# anew for each timestep).
TRAINER_VERSION = 6
# Fast-path options that change what a step computes (another device, precision, kernels); gradient
# checkpointing recomputes the same activations, and the batched score is the evaluation's.
NUMERIC_OPTIONS = ("autocast", "autocast_student", "channels_last", "compile", "sdpa")


def settings(trial: Trial) -> dict:
    """What a checkpoint must have been trained under, and from, to be resumed by this trial."""
    train = {k: v for k, v in dataclasses.asdict(trial.cfg).items() if k not in RUN_ONLY_KEYS}
    compute = {"device": trial.device.type, **{k: getattr(trial.fast, k) for k in NUMERIC_OPTIONS},
               # Sums over another number of CPU threads round differently, and the weights drift apart.
               "threads": torch.get_num_threads() if trial.device.type == "cpu" else None}
    objective = {key: getattr(trial.objective, key) for key in trial.objective.read_keys}   # another method's: unread
    return {"trainer": TRAINER_VERSION, "train": train, "objective": objective,
            "compute": compute, "trainable": sorted(trial.params), "inputs": trial.inputs}


_ABSENT = object()


def _shown(value) -> str:
    if value is _ABSENT:
        return "(absent)"
    if isinstance(value, list) and len(value) > 4:
        return f"{len(value)} names"  # the trainable parameters: their count says enough
    return repr(value)


def changed_settings(saved: dict, current: dict) -> list[str]:
    """'key: saved value -> current value' for each setting that differs, by dotted name."""
    saved, current = flatten(saved), flatten(current)
    return [f"{key}: {_shown(saved.get(key, _ABSENT))} -> {_shown(current.get(key, _ABSENT))}"
            for key in sorted(saved.keys() | current.keys()) if saved.get(key, _ABSENT) != current.get(key, _ABSENT)]


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
    # Tensors and plain containers only: a checkpoint may come from shared storage (Ray's).
    state = torch.load(path, weights_only=True, map_location=trial.device)
    saved, current = state.get("settings") or {}, settings(trial)
    if isinstance(saved.get("objective"), dict):    # a checkpoint that recorded every key: another method's unread
        saved = {**saved, "objective": {k: v for k, v in saved["objective"].items() if k in current["objective"]}}
    changed = changed_settings(saved, current)
    if changed:
        raise StaleCheckpoint(f"{path} was written under other settings ({'; '.join(changed)}): "
                              f"put them back to resume it, or remove it to train from step 0")
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


# The one metadata key of a trained file. safetensors writes its metadata map in a random order
# per call, so several keys would give identical trials different bytes (and DVC a change).
TRIAL_METADATA = "trial"


def save_trained(trial: Trial, folder: Path) -> Path:
    """Only what the scope trained (safetensors), with the scope, the trainable count and, for LoRA,
    the adapters' rank and alpha in the metadata (what `load_trained` needs to rebuild them)."""
    path = Path(folder) / TRAINED
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"scope": trial.cfg.scope, "trainable": trial.trainable_count}
    if trial.cfg.scope == "lora":
        metadata.update(lora_rank=trial.cfg.lora_rank, lora_alpha=trial.cfg.lora_alpha)
    write_bytes(path, save(trained_state(trial), metadata={TRIAL_METADATA: json.dumps(metadata, sort_keys=True)}))
    return path


def trained_metadata(path: Path) -> dict:
    """What `save_trained` recorded beside the tensors: scope, trainable count, LoRA rank and alpha."""
    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get(TRIAL_METADATA, "{}"))


def discard_checkpoint(folder: Path) -> None:
    """Drop the resume point once the trained file is saved and evaluated: until then a failed
    evaluation is re-run from the last checkpoint rather than from step 0. Half-written checkpoints a
    kill left (`write_bytes`' temp files, as large as the parameters and optimiser state) go too."""
    (Path(folder) / CHECKPOINT).unlink(missing_ok=True)
    for stray in Path(folder).glob(f".{CHECKPOINT}.*.tmp"):
        stray.unlink(missing_ok=True)


def load_trained(student: Student, path: Path) -> None:
    """Apply a trial's trained parameters (and buffers) onto a freshly loaded student, injecting
    its LoRA adapters first when it trained some (h_w entries are skipped)."""
    metadata = trained_metadata(path)
    if metadata.get("scope") == "lora":
        add_lora(student.model, metadata["lora_rank"], metadata["lora_alpha"])
    state = load_file(str(path))
    tensors = {**dict(student.model.named_parameters()), **dict(student.model.named_buffers())}
    with torch.no_grad():
        for name, value in state.items():
            if not name.startswith("h_w."):
                tensors[name].copy_(value)
