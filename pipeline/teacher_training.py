"""Training the toy teacher: first its VAE, then its UNet and text encoder together.

This is what Stable Diffusion's authors did at scale (an autoencoder, then a latent
diffusion model conditioned on text); here it runs in minutes on a CPU. Captions are
dropped 10% of the time, as in SD, so the unconditional prediction exists too.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.config import TeacherConfig
from pipeline.fastpath import adamw
from pipeline.models.teacher import Teacher, encode_text
from pipeline.objectives import diffusion_target, sample_timesteps

log = logging.getLogger(__name__)
CAPTION_DROPOUT = 0.1
KL_WEIGHT = 1e-4


def train_vae(teacher: Teacher, pixels: torch.Tensor, cfg: TeacherConfig, generator: torch.Generator) -> None:
    """Reconstruction + small KL; then set scaling_factor so latents have unit spread (as SD's 0.18215)."""
    vae = teacher.vae.train().requires_grad_(True)
    opt = adamw(vae.parameters(), cfg.lr)
    for _ in tqdm(range(cfg.vae_steps), desc="teacher VAE", leave=False):
        batch = pixels[torch.randint(len(pixels), (cfg.vae_batch_size,), generator=generator)].to(vae.device)
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(generator=generator)).sample
        loss = F.mse_loss(recon, batch) + KL_WEIGHT * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    vae.eval().requires_grad_(False)
    latents = _latent_means(vae, pixels)
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))


@torch.no_grad()
def _latent_means(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Posterior means of all images, computed in chunks on the VAE's device."""
    return torch.cat([vae.encode(pixels[i : i + 256].to(vae.device)).latent_dist.mean for i in range(0, len(pixels), 256)])


def snr_weights(scheduler, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample loss weights min(SNR(t), gamma) / SNR(t) (epsilon targets); ones when gamma is 0.

    SNR(t) = alpha_bar_t / (1 - alpha_bar_t). A v-prediction loss already carries a factor
    SNR + 1 relative to epsilon's, so its weight is min(SNR, gamma) / (SNR + 1).
    """
    if not gamma:
        return torch.ones(len(t), device=t.device)
    alpha_bar = scheduler.alphas_cumprod.to(t.device)[t]
    snr = alpha_bar / (1 - alpha_bar)
    extra = 1 if scheduler.config.prediction_type == "v_prediction" else 0
    return torch.clamp(snr, max=gamma) / (snr + extra)


def train_unet(teacher: Teacher, pixels: torch.Tensor, captions: list[str], cfg: TeacherConfig,
               generator: torch.Generator) -> list[float]:
    """Denoising loss on scaled VAE latents; the text encoder learns along with the UNet."""
    latents = _latent_means(teacher.vae, pixels) * teacher.scaling_factor
    device = latents.device
    modules = [teacher.unet, teacher.text_encoder]
    params = [p for m in modules for p in m.parameters()]
    for m in modules:
        m.train().requires_grad_(True)
    opt = adamw(params, cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(cfg.unet_steps, 1), pct_start=0.05)
    losses = []
    bar = tqdm(range(cfg.unet_steps), desc="teacher UNet", leave=False)
    for _ in bar:
        idx = torch.randint(len(latents), (cfg.batch_size,), generator=generator)
        x0 = latents[idx.to(device)]
        texts = ["" if torch.rand((), generator=generator) < CAPTION_DROPOUT else captions[i] for i in idx.tolist()]
        cond = encode_text(teacher, texts, grad=True)
        noise = torch.randn(x0.shape, generator=generator).to(device)
        t = sample_timesteps(len(x0), 0, teacher.scheduler.config.num_train_timesteps - 1, generator).to(device)
        pred = teacher.unet(teacher.scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=cond).sample
        loss = (snr_weights(teacher.scheduler, t, cfg.min_snr_gamma) *
                (pred - diffusion_target(teacher.scheduler, x0, noise, t)).pow(2).flatten(1).mean(1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}")
    for m in modules:
        m.eval().requires_grad_(False)
    return losses
