"""The fast path of the training step and the diffusion score, as options that keep the numbers.

The paper's bottleneck is the backward pass through the frozen 860M-parameter UNet at every
step. `FastPath` names what makes it fast; the helpers below apply it to the teacher's UNet,
the student and the step, and none of them changes the objective:

- `autocast`: bf16 (or fp16) autocast around the student's (unless `autocast_student` is
  off) and the UNet's forward passes.
  Weights stay fp32 ("master weights": the optimiser updates fp32 LayerNorms and h_w); h_w,
  the noising and both losses run in fp32 outside autocast.
- `sdpa`: the UNet's attention through `F.scaled_dot_product_attention` (diffusers'
  `AttnProcessor2_0`, flash / memory-efficient kernels on a GPU) instead of the classic
  processor that materialises the attention matrix. open_clip's towers use SDPA already.
- `channels_last`: the UNet's convolutions in NHWC (what cuDNN's bf16 kernels want).
- `compile`: `torch.compile` of the UNet in place (`True` = mode "default", or a mode name).
- `gradient_checkpointing`: recompute the UNet's and the student's block activations in the
  backward pass (less memory, ~1/3 more UNet compute): an option for small GPUs.
- `batched_score`: the diffusion score as one UNet call over all captions and noise
  samples of an image (noisy latents built once per image from the shared noise bank)
  instead of one call per (image, caption) pair.

Always on, not options: the UNet is frozen (`requires_grad_(False)`, so autograd computes
no weight gradients, only the gradient w.r.t. its input), the teacher's text conditioning
is read from the cache, and the optimiser is AdamW's fused kernel (`adamw`).

`FastPath.default_for(device)`: the fast options on CUDA; on the CPU the plain numerics
(fp32, eager, no checkpointing) unless `fast=True` is asked for. The attention kernel on
the CPU stays diffusers' default (SDPA). `FastPath.from_config(compute, device)`: what
params.yaml's `compute` section asks for, its `auto` values resolved by `default_for`;
`pipeline.train.setup` and `pipeline.evaluate.evaluate_teacher` use it, so the trainer and
the scorer run the fast path by default on a GPU.

Tolerances (tests/test_fastpath.py): fp32 options (sdpa, channels_last, checkpointing,
batched score) agree with the plain path to float rounding; bf16 autocast agrees within
bf16's precision (unit roundoff 2^-8), see the test for the bounds and why.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Iterator, Literal, Sequence

import torch
from torch import nn

from pipeline import objectives
from pipeline.config import ComputeConfig

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_BOOL_WORDS = {"1": True, "true": True, "on": True, "yes": True, "0": False, "false": False, "off": False, "no": False}


@dataclass(frozen=True)
class FastPath:
    """Speed options of the training step and the diffusion score; the plain path is `FastPath.plain()`."""

    autocast: Literal["bf16", "fp16", "none"] = "none"
    channels_last: bool = False
    compile: bool | str = False
    gradient_checkpointing: bool = False
    sdpa: bool = True
    batched_score: bool = True
    autocast_student: bool = True

    def __post_init__(self) -> None:
        if self.autocast not in ("bf16", "fp16", "none"):
            raise ValueError(f"FastPath.autocast: {self.autocast!r} is not one of 'bf16', 'fp16', 'none'")
        if not isinstance(self.compile, bool) and self.compile not in COMPILE_MODES:
            raise ValueError(f"FastPath.compile: {self.compile!r} is not a bool or one of {', '.join(COMPILE_MODES)}")
        for name in ("channels_last", "gradient_checkpointing", "sdpa", "batched_score", "autocast_student"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"FastPath.{name}: {getattr(self, name)!r} is not a bool")

    # ------------------------------------------------------------------ presets

    @classmethod
    def plain(cls) -> "FastPath":
        """fp32, eager, classic attention, one UNet call per scored pair: the reference numbers."""
        return cls(autocast="none", channels_last=False, compile=False, gradient_checkpointing=False,
                   sdpa=False, batched_score=False)

    @classmethod
    def fast(cls, device: torch.device | str) -> "FastPath":
        """The fast options for a device type (asked for explicitly; see `default_for`)."""
        if torch.device(device).type == "cuda":
            return cls(autocast="bf16", channels_last=True, compile=True, gradient_checkpointing=False,
                       sdpa=True, batched_score=True)
        # CPU: bf16 only pays on CPUs with AMX/AVX512-BF16; inductor's compile time rarely pays back.
        return cls(autocast="bf16", channels_last=False, compile=False, gradient_checkpointing=False,
                   sdpa=True, batched_score=True)

    @classmethod
    def default_for(cls, device: torch.device | str, fast: bool | None = None) -> "FastPath":
        """What the trainer and the scorer use by default: fast on CUDA, plain numerics on the CPU.

        `fast=True` asks for the fast options on any device, `fast=False` for the CPU default.
        """
        if fast is None:
            fast = torch.device(device).type == "cuda"
        return cls.fast(device) if fast else cls(autocast="none", channels_last=False, compile=False,
                                                 gradient_checkpointing=False, sdpa=True, batched_score=True)

    @classmethod
    def from_config(cls, compute: ComputeConfig, device: torch.device | str) -> "FastPath":
        """The options `compute` names, each `auto` resolved by `default_for(device)`."""
        base = cls.default_for(device)
        changes: dict = {"gradient_checkpointing": compute.gradient_checkpointing}
        if compute.precision != "auto":
            changes["autocast"] = "none" if compute.precision == "fp32" else compute.precision
        if compute.compile != "auto":
            changes["compile"] = False if compute.compile == "off" else compute.compile
        if compute.channels_last != "auto":
            changes["channels_last"] = compute.channels_last
        return base.replace(**changes)

    def replace(self, **changes) -> "FastPath":
        return dataclasses.replace(self, **changes)

    def with_overrides(self, spec: str) -> "FastPath":
        """Apply `key=value` overrides separated by ':' (e.g. "compile=off:autocast=none").

        Keys are the field names; `ckpt` is short for gradient_checkpointing, `cl` for
        channels_last. Booleans: on/off, true/false, 1/0; compile also takes a mode name.
        """
        aliases = {"ckpt": "gradient_checkpointing", "cl": "channels_last", "student_autocast": "autocast_student"}
        names = {f.name for f in dataclasses.fields(self)}
        changes: dict = {}
        for item in filter(None, spec.split(":")):
            key, sep, value = item.partition("=")
            key = aliases.get(key.strip(), key.strip())
            if not sep or key not in names:
                allowed = sorted(names | set(aliases))
                raise ValueError(f"fast-path override {item!r}: expected key=value with key in {allowed}")
            value = value.strip()
            if key == "autocast":
                changes[key] = value
            elif key == "compile" and value.lower() not in _BOOL_WORDS:
                changes[key] = value
            elif value.lower() in _BOOL_WORDS:
                changes[key] = _BOOL_WORDS[value.lower()]
            else:
                raise ValueError(f"fast-path override {item!r}: {value!r} is not a boolean")
        return self.replace(**changes)

    # ------------------------------------------------------------------ derived

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast compute dtype, None for fp32."""
        return AUTOCAST_DTYPES.get(self.autocast)

    @property
    def compile_mode(self) -> str | None:
        """The torch.compile mode, None when not compiling."""
        if self.compile is False:
            return None
        return "default" if self.compile is True else str(self.compile)

    def describe(self) -> str:
        parts = [self.autocast + ("" if self.autocast_student else "-unet-only") if self.autocast != "none" else "fp32",
                 "sdpa" if self.sdpa else "classic-attn"]
        if self.channels_last:
            parts.append("channels-last")
        if self.compile_mode:
            parts.append(f"compile={self.compile_mode}")
        if self.gradient_checkpointing:
            parts.append("ckpt")
        parts.append("batched-score" if self.batched_score else "per-pair-score")
        return ",".join(parts)


# ---------------------------------------------------------------------- applying the options


def adamw(params: Iterable[torch.Tensor], lr: float, weight_decay: float = 1e-2) -> torch.optim.AdamW:
    """AdamW with the fused kernel: one pass over every parameter instead of a dozen elementwise
    ops per tensor. For the toy teacher (4M parameters, most in the token embedding) the foreach
    step took ~14% of a training step on a 2-core CPU, the fused one ~3%."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


def _device_type(device: torch.device | str) -> str:
    return torch.device(device).type


def autocast(device: torch.device | str, opts: FastPath) -> contextlib.AbstractContextManager:
    """`torch.autocast` in the options' dtype on `device`, or a no-op for fp32."""
    if opts.dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(_device_type(device), dtype=opts.dtype)


def grad_scaler(device: torch.device | str, opts: FastPath) -> torch.amp.GradScaler:
    """A loss scaler, enabled only for fp16 autocast (bf16 has fp32's exponent range and needs none)."""
    return torch.amp.GradScaler(_device_type(device), enabled=opts.autocast == "fp16")


def set_unet_attention(unet: nn.Module, sdpa: bool) -> None:
    """Every attention of the UNet through SDPA (`AttnProcessor2_0`) or the classic explicit softmax."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0() if sdpa else AttnProcessor())


def _set_compiled(module: nn.Module, mode: str | None) -> nn.Module:
    """Compile `module` in place (the object stays the same, so attribute access is unchanged)."""
    if mode is None:
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None  # back to eager
        return module
    module.compile(mode=mode)
    return module


def prepare_teacher_unet(unet: nn.Module, opts: FastPath, compile: bool = True) -> nn.Module:
    """Freeze the UNet and apply the options; returns the same module.

    Frozen: `requires_grad_(False)` and eval mode, so a backward pass through it computes
    only the gradient w.r.t. its input. `compile=False` leaves out torch.compile (e.g. to
    count FLOPs eagerly first); call `compile_module(unet, opts)` afterwards.
    """
    unet.requires_grad_(False).eval()
    set_unet_attention(unet, opts.sdpa)
    unet.to(memory_format=torch.channels_last if opts.channels_last else torch.contiguous_format)
    if opts.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    elif getattr(unet, "is_gradient_checkpointing", False):
        unet.disable_gradient_checkpointing()
    if compile:
        compile_module(unet, opts)
    return unet


def prepare_student(model: nn.Module, opts: FastPath) -> nn.Module:
    """Apply gradient checkpointing to an open_clip model's towers; returns the same module.

    The towers already attend through SDPA (nn.MultiheadAttention with need_weights=False);
    autocast is applied around the call by `loss_step`, not to the weights, which stay fp32.
    The student is not compiled: at the paper's sizes the step's time is the UNet's.
    """
    if hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(opts.gradient_checkpointing)
    return model


def compile_module(module: nn.Module, opts: FastPath) -> nn.Module:
    """torch.compile `module` in place in the options' mode (or undo it when compile is off)."""
    return _set_compiled(module, opts.compile_mode)


# ---------------------------------------------------------------------- the training step


class AutocastUNet:
    """Calls the UNet under autocast with the noisy latent in the options' memory format.

    Only the UNet's call runs in bf16/fp16: the noising before it and the loss after it stay
    fp32, so the SDS target and the MSE keep fp32 precision.
    """

    def __init__(self, unet: nn.Module, opts: FastPath, device: torch.device):
        self.unet, self.opts, self.device = unet, opts, device

    def __call__(self, sample, timesteps, encoder_hidden_states):
        if self.opts.channels_last:
            sample = sample.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.opts):
            return self.unet(sample, timesteps, encoder_hidden_states=encoder_hidden_states)


def unet_caller(unet: nn.Module, opts: FastPath, device: torch.device):
    """The UNet itself for fp32 contiguous options, else wrapped in `AutocastUNet`."""
    return unet if opts.dtype is None and not opts.channels_last else AutocastUNet(unet, opts, device)


# ---------------------------------------------------------------------- the diffusion score


def image_groups(images: Sequence[str], captions: Sequence[str]) -> tuple["OrderedDict[str, list[str]]", list[int]]:
    """Distinct (image, caption) pairs grouped by image, and each input pair's position among them.

    Returns ({image: [caption, ...]} in first-seen order, index) where `index[i]` is the
    row of pair i in the flattened (image, caption) order of the groups.
    """
    groups: OrderedDict[str, dict[str, None]] = OrderedDict()
    for image, caption in zip(images, captions):
        groups.setdefault(image, {})[caption] = None
    position, k = {}, 0
    for image, caps in groups.items():
        for caption in caps:
            position[(image, caption)] = k
            k += 1
    return OrderedDict((i, list(c)) for i, c in groups.items()), [position[p] for p in zip(images, captions)]


def pack_calls(groups: "OrderedDict[str, list[str]]", n: int, max_rows: int) -> Iterator[list[tuple[str, list[str]]]]:
    """Pack whole images (all their captions x n samples) into UNet calls of at most max_rows rows.

    An image whose captions alone exceed max_rows is split into chunks of captions (at least one).
    """
    per_image = max(1, max_rows // n)
    call: list[tuple[str, list[str]]] = []
    rows = 0
    for image, caps in groups.items():
        for start in range(0, len(caps), per_image):
            chunk = caps[start:start + per_image]
            if call and rows + len(chunk) * n > max_rows:
                yield call
                call, rows = [], 0
            call.append((image, chunk))
            rows += len(chunk) * n
    if call:
        yield call


def batched_diffusion_errors(unet: nn.Module, scheduler, latents: torch.Tensor, conditioning: torch.Tensor,
                             captions_per_image: Sequence[int], timesteps: torch.Tensor, noise: torch.Tensor,
                             opts: FastPath | None = None, error: str = "squared") -> torch.Tensor:
    """Mean prediction error of each (image, caption) pair in ONE UNet call, no grad.

    latents: [I, *latent] (one per image); conditioning: [P, L, D] (one per pair, pairs of
    image 0 first, then image 1, ...; `captions_per_image[i]` of them for image i);
    timesteps [n] and noise [n, *latent]: the shared bank. Image i's noisy latents are
    built once from the bank and reused by all its captions; the UNet sees P * n rows.
    Returns [P] errors (float32), the mean over the n samples of `objectives.diffusion_errors`
    (`error`: "squared" or "norm").
    """
    opts = opts or FastPath.default_for(latents.device)
    n = len(timesteps)
    counts = torch.as_tensor(list(captions_per_image), device=latents.device)
    with torch.no_grad():
        lat = latents.unsqueeze(1).expand(-1, n, *latents.shape[1:]).reshape(-1, *latents.shape[1:])
        t_rows = timesteps.repeat(len(latents))
        eps = noise.repeat(len(latents), *([1] * (noise.dim() - 1)))
        noisy = scheduler.add_noise(lat, eps, t_rows).view(len(latents), n, *latents.shape[1:])
        sample = noisy.repeat_interleave(counts, 0).flatten(0, 1)  # [P * n, ...], pair-major
        target = eps.view(len(latents), n, *latents.shape[1:]).repeat_interleave(counts, 0).flatten(0, 1)
        cond = conditioning.repeat_interleave(n, 0)
        t_all = timesteps.repeat(len(conditioning))
        if opts.channels_last:
            sample = sample.contiguous(memory_format=torch.channels_last)
        with autocast(latents.device, opts):
            pred = unet(sample, t_all, encoder_hidden_states=cond).sample
        err = objectives.epsilon_errors(objectives.predicted_noise(scheduler, pred, sample, t_all), target, error)
        return err.view(len(conditioning), n).mean(1)
