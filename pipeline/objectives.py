"""Every training objective in one place: L_CLIP, NegCLIP, L_SDS, UNet-feature distillation,
diffusion feedback and its contrastive form (DCR's), and the teacher's epsilon error they and the
diffusion score share.

Pure functions of tensors and frozen modules; the trainer decides what is trainable and which
method runs (`pipeline.config.ObjectiveConfig`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from diffusers import DDPMScheduler, UNet2DConditionModel
from open_clip.loss import ClipLoss
from torch import nn

from pipeline.config import PROJECTORS, ConfigError

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
    random (with repeats) for every image, as DIVA draws them for OpenAI's ViT-L/14 (76 there, to fill
    the 77 positions; none without `patches`)."""
    tokens = pooled.float()[:, None]
    if patches is None or not count:
        return tokens
    picks = torch.randint(0, patches.shape[1], (len(pooled), count), generator=generator)
    rows = torch.arange(len(pooled), device=patches.device)[:, None]
    return torch.cat([tokens, patches.float()[rows, picks.to(patches.device)]], dim=1)


class FeedbackProjector(nn.Module):
    """Diffusion feedback's projector: the student's image tokens -> the teacher's conditioning.

    Each token (width d: the CLS embedding first, then any patch tokens) goes through one
    Linear(d, D) (`kind` "linear", DIVA's) or DCR's MLP (LayerNorm(d), Linear(d, D), GELU,
    Linear(D, D)) and is added to the empty caption's conditioning [L, D]. The CLS alone is added
    at every position, as DCR adds its projected CLS to all 77 (at the first alone it would sit on
    the start token's output, which a causal text encoder makes the same for every caption, so the
    teacher never learned to read anything there); k tokens go to the first k positions, the rest
    staying as they are (DIVA's construction, with k = L: the CLS and 76 patch tokens).
    """

    def __init__(self, embed_dim: int, width: int, kind: str = "linear"):
        super().__init__()
        if kind not in PROJECTORS:
            raise ValueError(f"kind {kind!r} is not a projector; use one of {', '.join(map(repr, PROJECTORS))}")
        # The MLP's layers before its last Linear; `linear` is the last (the only one of "linear").
        mlp = kind == "mlp"
        self.hidden = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, width), nn.GELU()) if mlp \
            else nn.Identity()
        self.linear = nn.Linear(width if mlp else embed_dim, width)

    def forward(self, tokens: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
        """tokens [B, k, d], empty [L, D] with k <= L -> conditioning [B, L, D]."""
        batch, k = tokens.shape[:2]
        projected = self.linear(self.hidden(tokens))
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


def contrastive_loss(anchor: torch.Tensor, augmented: torch.Tensor, negatives: torch.Tensor, target: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """DCR's InfoNCE on the teacher's outputs, compared by cosine: anchor [B, ...] (each image's noised
    latent under its own conditioning), augmented [B, ...] (under its augmented view's), negatives
    [B, K, ...] (under other images'), target [B, ...] (what the UNet is trained to output).

    With a, p, g, n_k the unit vectors of anchor, augmented, target and negatives, s = cos / temperature
    and D = exp(s(a, p)) + exp(s(a, g)) + sum_k exp(s(a, n_k)), image i's loss is the mean of
    -log(exp(s(a, p)) / D) and -log(exp(s(a, g)) / D) (boyuh/DCR's training step, in log-sum-exp
    form); the loss is its mean over the batch.
    """
    a = F.normalize(anchor.flatten(1).float(), dim=1)
    p = F.normalize(augmented.flatten(1).float(), dim=1)
    g = F.normalize(target.flatten(1).float(), dim=1)
    n = F.normalize(negatives.flatten(2).float(), dim=2)
    positive_view, positive_target = (a * p).sum(1) / temperature, (a * g).sum(1) / temperature
    negative = torch.einsum("bd,bkd->bk", a, n) / temperature
    log_d = torch.logsumexp(torch.cat([positive_view[:, None], positive_target[:, None], negative], dim=1), dim=1)
    return ((log_d - positive_view) + (log_d - positive_target)).mean() / 2


def contrastive_partners(batch: int, count: int, generator: torch.Generator | None) -> torch.Tensor:
    """[B, K] long: the other images of the batch whose conditionings give each image's negatives,
    `count` distinct ones drawn at random per image (0: every other image, in batch order)."""
    if not 0 <= count < batch:
        raise ValueError(f"{count} negatives of a batch of {batch}: allowed 0 <= count < batch")
    others = torch.arange(batch).repeat(batch, 1)[~torch.eye(batch, dtype=torch.bool)].view(batch, batch - 1)
    if not count:
        return others
    picks = torch.rand(batch, batch - 1, generator=generator).argsort(dim=1)[:, :count]
    return others.gather(1, picks)


def contrastive_feedback_loss(latents: torch.Tensor, conditioning: torch.Tensor, augmented: torch.Tensor,
                              partners: torch.Tensor, unet: UNet2DConditionModel, scheduler: DDPMScheduler,
                              timesteps: torch.Tensor, noise: torch.Tensor, temperature: float) -> torch.Tensor:
    """DCR: each image's cached VAE latent noised to its step, through the frozen UNet under its own
    conditioning, under its augmented view's (`augmented`) and under those of its `partners`
    (`contrastive_partners`), in one call of B (K + 2) rows; `contrastive_loss` of the outputs against
    the UNet's own target. The gradient reaches the student through the conditionings only."""
    batch, count = partners.shape
    noisy = scheduler.add_noise(latents, noise, timesteps)
    own = torch.arange(batch, device=partners.device)[:, None]
    rows = torch.cat([own, partners], dim=1).flatten().to(conditioning.device)     # image i's own first
    output = unet(torch.cat([noisy.repeat_interleave(count + 1, 0), noisy]),
                  torch.cat([timesteps.repeat_interleave(count + 1), timesteps]),
                  encoder_hidden_states=torch.cat([conditioning[rows], augmented])).sample
    grid = output[: batch * (count + 1)].view(batch, count + 1, *output.shape[1:])
    return contrastive_loss(grid[:, 0], output[batch * (count + 1):], grid[:, 1:],
                            diffusion_target(scheduler, latents, noise, timesteps), temperature)


def augmented_views(images: torch.Tensor, mean, std, generator: torch.Generator | None) -> torch.Tensor:
    """DCR's positive views of a batch of normalised images (`mean`, `std`: the student's
    normalisation): each image's pixels in [0, 1] jittered (brightness, contrast and saturation by
    a factor in [0.9, 1.1], hue by up to 0.05, in an order drawn per image, as ColorJitter), flipped
    left-right and upside down each with probability 1/2, cropped to 90-100% of its area at an aspect
    ratio in [0.9, 1.1] and resized back, then normalised again. Every draw comes from `generator`.

    DCR's code jitters the normalised tensor, which clamps its negative half to 0; here the jitter
    sees the image. A crop larger than the image on one side is cut to it (torchvision retries)."""
    shape = (1, -1, 1, 1)
    m = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(shape)
    s = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(shape)
    pixels = (images.float() * s + m).clamp(0, 1)
    height, width = pixels.shape[-2:]
    jitters = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    views = []
    for x in pixels:
        factors = (0.9 + 0.2 * torch.rand(3, generator=generator)).tolist()
        hue = (torch.rand((), generator=generator).item() - 0.5) * 0.1
        for op in torch.randperm(4, generator=generator).tolist():
            x = TF.adjust_hue(x, hue) if op == 3 else jitters[op](x, factors[op])
        flip_x, flip_y = (torch.rand(2, generator=generator) < 0.5).tolist()
        x = TF.horizontal_flip(x) if flip_x else x
        x = TF.vertical_flip(x) if flip_y else x
        scale, log_ratio, top, left = torch.rand(4, generator=generator).tolist()
        area = height * width * (0.9 + 0.1 * scale)
        ratio = math.exp(math.log(0.9) + (math.log(1.1) - math.log(0.9)) * log_ratio)
        w = min(width, max(1, round(math.sqrt(area * ratio))))
        h = min(height, max(1, round(math.sqrt(area / ratio))))
        x = TF.resized_crop(x, int(top * (height - h + 1)), int(left * (width - w + 1)), h, w, [height, width],
                            antialias=True)
        views.append(x)
    return ((torch.stack(views) - m) / s).to(images.dtype)


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
