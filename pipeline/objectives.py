"""Every training objective in one place: L_CLIP, L_SDS and the UNet-feature distillation loss.

Pure functions of tensors and frozen modules; the trainer decides what is trainable.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from open_clip.loss import ClipLoss
from torch import nn

from pipeline.config import ConfigError

_clip_loss = ClipLoss()


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE over a batch of L2-normalised features (open_clip's own)."""
    return _clip_loss(image_features, text_features, logit_scale)


class LatentProjection(nn.Module):
    """h_w: the image embedding (width d) -> a tensor of the teacher's latent (or feature) shape."""

    def __init__(self, embed_dim: int, shape: tuple[int, ...]):
        super().__init__()
        self.shape = tuple(shape)
        self.linear = nn.Linear(embed_dim, int(torch.tensor(self.shape).prod()))

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.linear(embedding).view(-1, *self.shape)


def sample_timesteps(batch: int, t_min: int, t_max: int, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniform integer DDPM steps in [t_min, t_max]."""
    return torch.randint(t_min, t_max + 1, (batch,), generator=generator).to(device)


def check_fits_teacher(scheduler: DDPMScheduler, t_key: str, t_max: int, noising: str = "noise") -> None:
    """What a config cannot check alone: its largest step against the teacher's schedule, and
    noising "none" against the teacher's prediction type (a one-line ConfigError)."""
    last = scheduler.config.num_train_timesteps - 1
    if t_max > last:
        raise ConfigError(f"{t_key}: {t_max} is past the teacher's last DDPM step ({last})")
    kind = scheduler.config.prediction_type
    if noising == "none" and kind != "epsilon":
        raise ConfigError(f"objective.noising: 'none' needs an epsilon-prediction teacher; this one predicts {kind!r}")


def diffusion_target(scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor,
                     timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet predicts under the scheduler's prediction type (SD 1.x: eps; SD 2.1: v)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"prediction_type {kind!r} is not supported; use 'epsilon' or 'v_prediction'")


@dataclass
class SdsOutput:
    loss: torch.Tensor  # what to backpropagate
    mse: torch.Tensor   # the literal L_SDS value, for logging (detached)


def sds_loss(latents: torch.Tensor, conditioning: torch.Tensor, unet: UNet2DConditionModel,
             scheduler: DDPMScheduler, timesteps: torch.Tensor, noise: torch.Tensor,
             noising: str = "noise", gradient: str = "backprop") -> SdsOutput:
    """L_SDS = || unet(x_t, t, c) - target ||^2 for x_0 = `latents` = h_w(f(x)).

    noising="noise": x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (DreamFusion's SDS).
    noising="none": x_t = x_0, the paper's equation read literally (epsilon models only).
    gradient="backprop": the mean squared error differentiated through the frozen UNet.
    gradient="sds": DreamFusion's gradient w(t) (eps_hat - target) on x_0 with w(t) = 1 - abar_t
    and the UNet under no-grad, scaled like the mean-reduced loss. `loss` always has the
    literal L_SDS as its value (so logged totals compare across modes); in this mode a
    zero-valued surrogate term carries that gradient.
    """
    if noising == "noise":
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = diffusion_target(scheduler, latents, noise, timesteps)
    elif noising == "none":
        if scheduler.config.prediction_type != "epsilon":
            raise ValueError("objective.noising 'none' needs an epsilon-prediction teacher")
        noisy, target = latents, noise
    else:
        raise ValueError(f"objective.noising {noising!r} is not one of 'noise', 'none'")
    if gradient == "backprop":
        pred = unet(noisy, timesteps, encoder_hidden_states=conditioning).sample
        mse = F.mse_loss(pred.float(), target.float())
        return SdsOutput(mse, mse.detach())
    if gradient != "sds":
        raise ValueError(f"objective.gradient {gradient!r} is not one of 'backprop', 'sds'")
    with torch.no_grad():
        pred = unet(noisy.detach(), timesteps, encoder_hidden_states=conditioning).sample.float()
        residual = pred - target.detach().float()
        abar = scheduler.alphas_cumprod.to(latents.device)[timesteps].float()
        weight = (1.0 - abar).view(-1, *([1] * (latents.dim() - 1)))
        grad = 2.0 * weight * residual / residual[0].numel() / latents.shape[0]
    surrogate = (grad * latents.float()).sum()
    mse = residual.pow(2).mean()
    return SdsOutput(mse + (surrogate - surrogate.detach()), mse)   # grouped: adds an exact 0


def unet_features(unet: UNet2DConditionModel, noisy: torch.Tensor, timesteps: torch.Tensor,
                  conditioning: torch.Tensor) -> torch.Tensor:
    """The UNet's mid-block output (its bottleneck features) for a noisy latent, under no-grad."""
    captured: list[torch.Tensor] = []
    handle = unet.mid_block.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        with torch.no_grad():
            unet(noisy, timesteps, encoder_hidden_states=conditioning)
    finally:
        handle.remove()
    return captured[0]


def unet_feature_loss(predicted: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Appendix A.2: || h_w(f(x)) - I(x, c) ||^2 (mean over elements)."""
    return F.mse_loss(predicted.float(), features.float())


def diffusion_errors(unet: UNet2DConditionModel, scheduler: DDPMScheduler, latents: torch.Tensor,
                     conditioning: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Per-row mean squared prediction error of the teacher (eq. 1-2's inner term), no grad."""
    with torch.no_grad():
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = diffusion_target(scheduler, latents, noise, timesteps)
        pred = unet(noisy, timesteps, encoder_hidden_states=conditioning).sample
        return (pred.float() - target.float()).pow(2).flatten(1).mean(1)
