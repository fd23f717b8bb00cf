"""Every training objective in one place: L_CLIP, NegCLIP, L_SDS, UNet-feature distillation and
diffusion feedback, and the teacher's epsilon error they and the diffusion score share.

Pure functions of tensors and frozen modules; the trainer decides what is trainable and which
method runs (`pipeline.config.ObjectiveConfig`).
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


def negclip_loss(image_features: torch.Tensor, text_features: torch.Tensor, negative_features: torch.Tensor,
                 logit_scale: torch.Tensor) -> torch.Tensor:
    """NegCLIP's loss: L_CLIP with the hard-negative captions appended to the text side.

    Image i's softmax runs over the B captions and the B negatives (its own caption is the
    answer); caption i's softmax runs over the B images only, since a negative describes no
    image of the batch (as vinid/neg_clip computes it: `logits_per_text[:B]`). With no
    negatives it is `clip_loss`.
    """
    labels = torch.arange(len(image_features), device=image_features.device)
    texts = torch.cat([text_features, negative_features])
    per_image = logit_scale * image_features @ texts.T
    per_text = logit_scale * text_features @ image_features.T
    return (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2


class LatentProjection(nn.Module):
    """h_w: the image embedding (width d) -> a tensor of the teacher's latent (or feature) shape."""

    def __init__(self, embed_dim: int, shape: tuple[int, ...]):
        super().__init__()
        self.shape = tuple(shape)
        self.linear = nn.Linear(embed_dim, int(torch.tensor(self.shape).prod()))

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.linear(embedding).view(-1, *self.shape)


def feedback_tokens(pooled: torch.Tensor, patches: torch.Tensor | None, count: int,
                    generator: torch.Generator | None) -> torch.Tensor:
    """[B, 1 + count, D] float: the student's CLS embedding, then `count` of its patch tokens drawn at
    random (with repeats) for every image, as DIVA draws them (none without `patches`)."""
    tokens = pooled.float()[:, None]
    if patches is None or not count:
        return tokens
    picks = torch.randint(0, patches.shape[1], (len(pooled), count), generator=generator)
    rows = torch.arange(len(pooled), device=patches.device)[:, None]
    return torch.cat([tokens, patches.float()[rows, picks.to(patches.device)]], dim=1)


class FeedbackProjector(nn.Module):
    """Diffusion feedback's projector: the student's image tokens -> the teacher's conditioning.

    Each token (width d: the CLS embedding first, then any patch tokens) goes through one
    Linear(d, D) and is added to the empty caption's conditioning [L, D]. The CLS alone is added
    at every position, as DCR adds its projected CLS to all 77 (at the first alone it would sit on
    the start token's output, which a causal text encoder makes the same for every caption, so the
    teacher never learned to read anything there); k tokens go to the first k positions, the rest
    staying as they are (DIVA's construction, with k = L: the CLS and 76 patch tokens).
    """

    def __init__(self, embed_dim: int, width: int):
        super().__init__()
        self.linear = nn.Linear(embed_dim, width)

    def forward(self, tokens: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
        """tokens [B, k, d], empty [L, D] with k <= L -> conditioning [B, L, D]."""
        batch, k = tokens.shape[:2]
        projected = self.linear(tokens)
        if k == 1:
            return empty + projected
        return torch.cat([empty[:k] + projected, empty[k:].expand(batch, -1, -1)], dim=1)


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
    """What the UNet is trained to output under the scheduler's prediction type (SD 1.x: eps;
    SD 2.1: v): the toy teacher's own training target."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"prediction_type {kind!r} is not supported; use 'epsilon' or 'v_prediction'")


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.device).float().view(-1, *([1] * (like.dim() - 1)))


def predicted_noise(scheduler: DDPMScheduler, output: torch.Tensor, noisy: torch.Tensor,
                    timesteps: torch.Tensor) -> torch.Tensor:
    """The UNet's estimate of the noise in `noisy` (x_t at `timesteps`), whatever it predicts.

    An epsilon model's output is that estimate. A v-prediction model's v_hat converts through
    x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps and v = sqrt(abar) eps - sqrt(1 - abar) x_0:
    eps_hat = sqrt(abar) v_hat + sqrt(1 - abar) x_t, so eps_hat - eps = sqrt(abar) (v_hat - v).
    Comparing v_hat with v instead would weight step t by 1/abar_t against the paper's epsilon
    error (x121 at t = 950 on SD's schedule).
    """
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return output
    if kind != "v_prediction":
        raise ValueError(f"prediction_type {kind!r} is not supported; use 'epsilon' or 'v_prediction'")
    abar = _per_sample(scheduler.alphas_cumprod.to(timesteps.device)[timesteps], output)
    return abar.sqrt() * output.float() + (1 - abar).sqrt() * noisy.float()


def squared_error(pred: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """||pred - target||^2 of a batch: "mean" over every element (as F.mse_loss), or "sum" over
    each sample's elements and then the mean over the batch; the two differ by the per-sample
    element count."""
    error = (pred.float() - target.float()).pow(2)
    if reduction == "mean":
        return error.mean()
    if reduction == "sum":
        return error.flatten(1).sum(1).mean()
    raise ValueError(f"reduction {reduction!r} is not one of 'mean', 'sum'")


def _reduction_scale(latents: torch.Tensor, reduction: str) -> float:
    """d squared_error / d pred = 2 (pred - target) times this."""
    per_sample = latents[0].numel()
    return 1.0 / latents.shape[0] / (per_sample if reduction == "mean" else 1)


@dataclass
class SdsOutput:
    loss: torch.Tensor  # what to backpropagate
    mse: torch.Tensor   # the literal L_SDS value, for logging (detached)


def sds_loss(latents: torch.Tensor, conditioning: torch.Tensor, unet: UNet2DConditionModel,
             scheduler: DDPMScheduler, timesteps: torch.Tensor, noise: torch.Tensor,
             noising: str = "noise", gradient: str = "backprop", reduction: str = "mean") -> SdsOutput:
    """L_SDS = || eps_hat(x_t, t, c) - eps ||^2 for x_0 = `latents` = h_w(f(x)) (`predicted_noise`).

    noising="noise": x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (DreamFusion's SDS).
    noising="none": x_t = x_0, the paper's equation read literally (epsilon models only).
    gradient="backprop": the squared error differentiated through the frozen UNet.
    gradient="sds": DreamFusion's gradient w(t) (eps_hat - eps) on x_0 with w(t) = 1 - abar_t
    and the UNet under no-grad, scaled as `reduction` scales the loss. `loss` always has the
    literal L_SDS as its value (so logged totals compare across modes); in this mode a
    zero-valued surrogate term carries that gradient.
    """
    if noising == "noise":
        noisy = scheduler.add_noise(latents, noise, timesteps)
    elif noising == "none":
        if scheduler.config.prediction_type != "epsilon":
            raise ValueError("objective.noising 'none' needs an epsilon-prediction teacher")
        noisy = latents
    else:
        raise ValueError(f"objective.noising {noising!r} is not one of 'noise', 'none'")
    if gradient == "backprop":
        pred = predicted_noise(scheduler, unet(noisy, timesteps, encoder_hidden_states=conditioning).sample,
                               noisy, timesteps)
        loss = squared_error(pred, noise, reduction)
        return SdsOutput(loss, loss.detach())
    if gradient != "sds":
        raise ValueError(f"objective.gradient {gradient!r} is not one of 'backprop', 'sds'")
    with torch.no_grad():
        pred = predicted_noise(scheduler, unet(noisy.detach(), timesteps, encoder_hidden_states=conditioning).sample,
                               noisy.detach(), timesteps)
        residual = pred.float() - noise.float()
        weight = 1.0 - _per_sample(scheduler.alphas_cumprod.to(timesteps.device)[timesteps], latents)
        grad = 2.0 * weight * residual * _reduction_scale(latents, reduction)
        value = squared_error(pred, noise, reduction)
    surrogate = (grad * latents.float()).sum()
    return SdsOutput(value + (surrogate - surrogate.detach()), value)   # grouped: adds an exact 0


def feedback_loss(latents: torch.Tensor, conditioning: torch.Tensor, unet: UNet2DConditionModel,
                  scheduler: DDPMScheduler, timesteps: torch.Tensor, noise: torch.Tensor,
                  reduction: str = "mean") -> torch.Tensor:
    """Diffusion feedback: the frozen UNet's epsilon error on the image's own (VAE) latent noised to
    `timesteps`, conditioned on what the student's projected tokens give (`FeedbackProjector`);
    its gradient reaches the student only through the conditioning."""
    noisy = scheduler.add_noise(latents, noise, timesteps)
    pred = predicted_noise(scheduler, unet(noisy, timesteps, encoder_hidden_states=conditioning).sample,
                           noisy, timesteps)
    return squared_error(pred, noise, reduction)


def unet_features(unet: UNet2DConditionModel, noisy: torch.Tensor, timesteps: torch.Tensor,
                  conditioning: torch.Tensor) -> torch.Tensor:
    """The UNet's mid-block output (its bottleneck features) for a noisy latent, under no-grad."""
    captured: list[torch.Tensor] = []
    handle = unet.mid_block.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        with torch.no_grad():
            # Eager `forward`, not the call: a UNet compiled in place (`fastpath`) reuses a graph traced
            # without this hook, which then never fires.
            unet.forward(noisy, timesteps, encoder_hidden_states=conditioning)
    finally:
        handle.remove()
    return captured[0]


def unet_feature_loss(predicted: torch.Tensor, features: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Appendix A.2: || h_w(f(x)) - I(x, c) ||^2."""
    return squared_error(predicted, features, reduction)


ERRORS = ("squared", "norm")


def diffusion_errors(unet: UNet2DConditionModel, scheduler: DDPMScheduler, latents: torch.Tensor,
                     conditioning: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor,
                     error: str = "squared") -> torch.Tensor:
    """Per-row prediction error of the teacher (eq. 1-2's inner term), no grad: the mean squared
    epsilon error ("squared", the paper's), or the L2 norm of the epsilon error ("norm", what
    diffusion-itm averages over its timesteps)."""
    with torch.no_grad():
        noisy = scheduler.add_noise(latents, noise, timesteps)
        pred = unet(noisy, timesteps, encoder_hidden_states=conditioning).sample
        return epsilon_errors(predicted_noise(scheduler, pred, noisy, timesteps), noise, error)


def epsilon_errors(pred: torch.Tensor, noise: torch.Tensor, error: str = "squared") -> torch.Tensor:
    """One error per row of an epsilon estimate: its mean squared error, or the error's L2 norm."""
    diff = (pred.float() - noise.float()).flatten(1)
    if error == "squared":
        return diff.pow(2).mean(1)
    if error == "norm":
        return diff.norm(dim=1)
    raise ValueError(f"error {error!r} is not one of {', '.join(ERRORS)}")
