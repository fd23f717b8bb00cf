"""The objectives against the paper's definitions, computed by hand on tiny real modules.

L_CLIP: symmetric InfoNCE with a learnable temperature. L_SDS: ||eps_theta(x_t, t, c) - eps||^2
for x_0 = h_w(f(x)), gradient through the frozen UNet into h_w and the image encoder (or
DreamFusion's w(t)(eps_hat - eps) in "sds" mode). UNet-feature loss: ||h_w(f(x)) - I(x, c)||^2
with I the UNet's mid-block features. Diffusion score: per-row epsilon error.
"""
from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch import nn

from pipeline import objectives
from pipeline.cache import open_table, write_table
from pipeline.config import ConfigError, EvalConfig, ObjectiveConfig, TrainConfig
from pipeline.data import toyworld as tw
from pipeline.data.records import ImageCaption
from pipeline.data.keys import image_key
from pipeline.evaluate import DiffusionScorer
from pipeline.models.student import build_toy_student
from pipeline.models.teacher import SD_SCHEDULE, build_toy_teacher, encode_text
from pipeline.train import loss_step, setup

from tiny import SIZE, STUDENT, TEACHER

N = 4  # batch


def hand_infonce(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    logits = scale * image @ text.T
    i2t = -torch.log_softmax(logits, dim=1).diagonal().mean()
    t2i = -torch.log_softmax(logits.T, dim=1).diagonal().mean()
    return (i2t + t2i) / 2


def abar_sd() -> torch.Tensor:
    """Stable Diffusion's alphas_cumprod: 'scaled_linear' betas 0.00085..0.012 over 1000 steps."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def hand_noised(x0, eps, t):
    abar = abar_sd()[t].view(-1, 1, 1, 1)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * eps


@pytest.fixture(scope="module")
def teacher():
    return build_toy_teacher(TEACHER, SIZE)


@pytest.fixture(scope="module")
def world(teacher, tmp_path_factory):
    """A batch of toy images and captions, their cached conditioning and (random) cached latents."""
    rng = random.Random(3)
    scenes = [tw.random_scene(rng) for _ in range(N)]
    captions = [tw.caption(s) for s in scenes]
    student = build_toy_student(STUDENT, SIZE)
    images = torch.stack([student.preprocess(tw.render_scene(s, SIZE)) for s in scenes])
    tokens = student.tokenizer(captions)
    pairs = [ImageCaption(Path(f"/toy/{i}.png"), c) for i, c in enumerate(captions)]
    root = tmp_path_factory.mktemp("cache")
    write_table(root, "train_text", captions, lambda texts: encode_text(teacher, texts), shard_size=3,
                batch_size=2, progress=False)
    latents = {image_key(p.image): torch.randn(teacher.latent_shape, generator=torch.Generator().manual_seed(i))
               for i, p in enumerate(pairs)}
    write_table(root, "train_images", list(latents), lambda keys: torch.stack([latents[k] for k in keys]),
                shard_size=3, batch_size=2, progress=False)
    return {"images": images, "tokens": tokens, "captions": captions, "pairs": pairs,
            "conditioning": open_table(root, "train_text"), "latents": open_table(root, "train_images"),
            "rows": torch.arange(N)}


def fresh_trial(teacher, world, scope="layernorm", lambda_sds=0.5, **objective):
    student = build_toy_student(STUDENT, SIZE)
    needs = lambda_sds > 0 or scope == "unet_feature"
    return setup(TrainConfig(scope=scope, batch_size=N, steps=4), ObjectiveConfig(**objective), student,
                 world["pairs"], lambda_sds, teacher if needs else None, world["conditioning"] if needs else None,
                 world["latents"] if scope == "unet_feature" else None)


def step(trial, world):
    return loss_step(trial, world["images"], world["tokens"], world["rows"], world["rows"])


def is_layernorm_param(model: nn.Module) -> set[int]:
    return {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters(recurse=False)}


# --------------------------------------------------------------------------- L_CLIP


def test_clip_loss_is_symmetric_infonce_2x2_by_hand():
    image = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8]]), dim=1)
    text = F.normalize(torch.tensor([[0.8, 0.6], [0.0, 1.0]]), dim=1)
    scale = torch.tensor(10.0)
    # logits = 10 * [[0.8, 0.0], [0.96, 0.8]]; rows = images, columns = texts.
    l = [[8.0, 0.0], [9.6, 8.0]]
    lse = lambda a, b: torch.logsumexp(torch.tensor([a, b]), 0)
    i2t = ((lse(l[0][0], l[0][1]) - l[0][0]) + (lse(l[1][0], l[1][1]) - l[1][1])) / 2
    t2i = ((lse(l[0][0], l[1][0]) - l[0][0]) + (lse(l[0][1], l[1][1]) - l[1][1])) / 2
    expected = (i2t + t2i) / 2
    assert torch.allclose(objectives.clip_loss(image, text, scale), expected, atol=1e-6)


def test_clip_loss_matches_hand_infonce_3x3():
    g = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(3, 5, generator=g), dim=1)
    text = F.normalize(torch.randn(3, 5, generator=g), dim=1)
    scale = torch.tensor(7.3)
    got = objectives.clip_loss(image, text, scale)
    assert torch.allclose(got, hand_infonce(image, text, scale), atol=1e-6)
    # Not symmetric in its arguments' roles by accident: swapping the pairing changes it.
    assert not torch.allclose(got, objectives.clip_loss(image, text.flip(0), scale))


def test_lambda_zero_is_the_plain_clip_step(teacher, world):
    trial = fresh_trial(teacher, world, scope="full", lambda_sds=0.0)
    assert trial.projection is None
    losses = step(trial, world)
    assert set(losses) == {"clip", "total"}
    losses["total"].backward()
    model = trial.student.model
    via_step = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    image_features, text_features, scale = model(world["images"], world["tokens"])[:3]  # open_clip's forward
    direct = hand_infonce(image_features, text_features, scale)
    assert torch.allclose(losses["total"], direct, atol=1e-6)
    direct.backward()
    assert via_step.keys() == {n for n, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        # Per tensor, relative to its norm: float32 rounding of sums taken in another order (elements
        # that cancel to ~0 cannot meet an elementwise relative bound); a missing or extra term is O(1).
        assert (via_step[name] - p.grad).norm() <= 1e-5 * p.grad.norm() + 1e-8, name
    assert via_step["logit_scale"].abs().item() > 0


# --------------------------------------------------------------------------- gradient paths


@pytest.mark.parametrize("gradient", ["backprop", "sds"])
def test_sds_gradient_reaches_h_w_and_layernorms_only(teacher, world, gradient):
    lam = 0.5
    trial = fresh_trial(teacher, world, lambda_sds=lam, gradient=gradient)
    model = trial.student.model
    losses = step(trial, world)
    assert set(losses) == {"clip", "sds", "total"}
    if gradient == "backprop":
        assert torch.allclose(losses["total"], losses["clip"] + lam * losses["sds"], atol=1e-6)
    losses["total"].backward()
    total_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    linear = trial.projection.linear
    assert linear.weight.grad is not None and linear.weight.grad.abs().sum() > 0
    assert linear.bias.grad is not None and linear.bias.grad.abs().sum() > 0
    for name, p in teacher.unet.named_parameters():
        assert not p.requires_grad and p.grad is None, name
    ln = is_layernorm_param(model)
    for name, p in model.named_parameters():
        if id(p) in ln:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None and not p.requires_grad, name

    # The SDS term reaches the image tower (through h_w) and never the text tower.
    model.zero_grad(set_to_none=True)
    step(trial, world)["clip"].backward()
    assert not torch.allclose(total_grads["visual.ln_post.weight"], model.visual.ln_post.weight.grad)
    assert not torch.allclose(total_grads["visual.ln_pre.weight"], model.visual.ln_pre.weight.grad)
    assert torch.allclose(total_grads["ln_final.weight"], model.ln_final.weight.grad, atol=1e-7)


@pytest.mark.parametrize("gradient", ["backprop", "sds"])
def test_loss_step_sds_term_is_h_w_output_scaled_noised_and_scored(teacher, world, gradient):
    """Rebuild loss_step's SDS value by hand from its generator: x0 = latent_scale * h_w(f(x)).
    The total is L_CLIP + lambda L_SDS in value whichever gradient the SDS term gives."""
    trial = fresh_trial(teacher, world, lambda_sds=0.5, latent_scale=0.3, t_min=100, t_max=900, gradient=gradient)
    g = torch.Generator()
    g.set_state(trial.generator.get_state())
    losses = step(trial, world)
    t = torch.randint(100, 901, (N,), generator=g)
    assert t.min() >= 100 and t.max() <= 900
    with torch.no_grad():
        image_features = trial.student.model.encode_image(world["images"], normalize=True)
        x0 = 0.3 * (image_features @ trial.projection.linear.weight.T + trial.projection.linear.bias).view(N, *teacher.latent_shape)
        eps = torch.randn(x0.shape, generator=g)
        cond = encode_text(teacher, world["captions"])
        pred = teacher.unet(hand_noised(x0, eps, t), t, encoder_hidden_states=cond).sample
    assert torch.allclose(losses["sds"], F.mse_loss(pred, eps), atol=1e-5)
    assert torch.allclose(losses["total"], losses["clip"] + 0.5 * losses["sds"], atol=1e-6)


# --------------------------------------------------------------------------- sds_loss


def batch(teacher, world, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, *teacher.latent_shape, generator=g)
    eps = torch.randn(n, *teacher.latent_shape, generator=g)
    t = torch.tensor([37, 811, 400, 999][:n])
    cond = encode_text(teacher, world["captions"][:n])
    return x0, eps, t, cond


def test_scheduler_is_stable_diffusions_ddpm(teacher):
    assert torch.allclose(teacher.scheduler.alphas_cumprod.float(), abar_sd(), atol=1e-6)
    assert teacher.scheduler.config.prediction_type == "epsilon"


def test_sds_backprop_equals_mse_of_unet_on_noised_latents(teacher, world):
    x0, eps, t, cond = batch(teacher, world)
    x0 = x0.requires_grad_(True)
    out = objectives.sds_loss(x0, cond, teacher.unet, teacher.scheduler, t, eps, "noise", "backprop")
    (g_lib,) = torch.autograd.grad(out.loss, x0)
    x0b = x0.detach().clone().requires_grad_(True)
    expected = F.mse_loss(teacher.unet(hand_noised(x0b, eps, t), t, encoder_hidden_states=cond).sample, eps)
    (g_hand,) = torch.autograd.grad(expected, x0b)
    assert torch.allclose(out.loss, expected, atol=1e-6)
    assert torch.allclose(out.mse, expected, atol=1e-6) and not out.mse.requires_grad
    assert torch.allclose(g_lib, g_hand, atol=1e-7, rtol=1e-4)
    # The timestep matters (the UNet is fed t, and the noising uses abar_t).
    other = objectives.sds_loss(x0, cond, teacher.unet, teacher.scheduler, t.flip(0), eps)
    assert not torch.allclose(other.loss, out.loss)


def test_sds_mode_gradient_is_dreamfusions_weighted_residual(teacher, world):
    x0, eps, t, cond = batch(teacher, world)
    x0 = x0.requires_grad_(True)
    teacher.unet.requires_grad_(True)
    try:
        out = objectives.sds_loss(x0, cond, teacher.unet, teacher.scheduler, t, eps, "noise", "sds")
        out.loss.backward()
        assert all(p.grad is None for p in teacher.unet.parameters()), "sds mode must not backprop the UNet"
    finally:
        teacher.unet.requires_grad_(False)
    with torch.no_grad():
        eps_hat = teacher.unet(hand_noised(x0, eps, t), t, encoder_hidden_states=cond).sample
    w = (1 - abar_sd()[t]).view(-1, 1, 1, 1)
    per_sample = x0[0].numel()
    expected = 2 * w * (eps_hat - eps) / per_sample / x0.shape[0]
    assert torch.allclose(x0.grad, expected, atol=1e-8, rtol=1e-4)
    assert torch.allclose(out.mse, F.mse_loss(eps_hat, eps), atol=1e-6)
    assert torch.equal(out.loss.detach(), out.mse), "the backpropagated term's value is the literal L_SDS"


def test_v_prediction_target_is_the_velocity(teacher, world):
    x0, eps, t, cond = batch(teacher, world)
    scheduler = DDPMScheduler(**SD_SCHEDULE, prediction_type="v_prediction")
    abar = abar_sd()[t].view(-1, 1, 1, 1)
    v = abar.sqrt() * eps - (1 - abar).sqrt() * x0
    target = objectives.diffusion_target(scheduler, x0, eps, t)
    assert torch.allclose(target, scheduler.get_velocity(x0, eps, t), atol=1e-6)
    assert torch.allclose(target, v, atol=1e-5)
    assert torch.equal(objectives.diffusion_target(teacher.scheduler, x0, eps, t), eps)
    out = objectives.sds_loss(x0, cond, teacher.unet, scheduler, t, eps, "noise", "backprop")
    with torch.no_grad():
        pred = teacher.unet(hand_noised(x0, eps, t), t, encoder_hidden_states=cond).sample
    assert torch.allclose(out.loss, F.mse_loss(pred, v), atol=1e-5)
    with pytest.raises(ValueError, match="epsilon"):
        objectives.sds_loss(x0, cond, teacher.unet, scheduler, t, eps, "none", "backprop")


def test_noising_none_feeds_x0_directly(teacher, world):
    x0, eps, t, cond = batch(teacher, world)
    out = objectives.sds_loss(x0, cond, teacher.unet, teacher.scheduler, t, eps, "none", "backprop")
    with torch.no_grad():
        expected = F.mse_loss(teacher.unet(x0, t, encoder_hidden_states=cond).sample, eps)
        noised = F.mse_loss(teacher.unet(hand_noised(x0, eps, t), t, encoder_hidden_states=cond).sample, eps)
    assert torch.allclose(out.loss, expected, atol=1e-6)
    assert not torch.allclose(out.loss, noised)


def test_sds_loss_rejects_unknown_modes(teacher, world):
    x0, eps, t, cond = batch(teacher, world)
    with pytest.raises(ValueError, match="noising"):
        objectives.sds_loss(x0, cond, teacher.unet, teacher.scheduler, t, eps, "blur", "backprop")
    with pytest.raises(ValueError, match="gradient"):
        objectives.sds_loss(x0, cond, teacher.unet, teacher.scheduler, t, eps, "noise", "adjoint")


def test_a_config_the_teacher_cannot_serve_is_a_config_error_before_any_step(world):
    """The config alone allows t up to SD's 999 and either noising; the loaded teacher may have a
    shorter schedule or predict v, and setup (or the scorer) says so in one line naming the key."""
    short = build_toy_teacher(TEACHER, SIZE)
    short.scheduler = DDPMScheduler(**{**SD_SCHEDULE, "num_train_timesteps": 500})
    with pytest.raises(ConfigError, match=r"^objective\.t_max: 980 is past the teacher's last DDPM step \(499\)$"):
        fresh_trial(short, world)
    assert fresh_trial(short, world, t_max=499).projection is not None
    with pytest.raises(ConfigError, match=r"^eval\.diffusion_t_max: 950 is past the teacher's last DDPM step \(499\)$"):
        DiffusionScorer(short, world["latents"], world["conditioning"], EvalConfig())

    v_teacher = build_toy_teacher(dataclasses.replace(TEACHER, prediction_type="v_prediction"), SIZE)
    with pytest.raises(ConfigError, match=r"^objective\.noising: 'none' needs an epsilon-prediction teacher; "
                                          r"this one predicts 'v_prediction'$"):
        fresh_trial(v_teacher, world, noising="none")
    assert fresh_trial(v_teacher, world, noising="noise").projection is not None
    # UNet-feature distillation always noises the cached latents: its noising key does not apply.
    assert fresh_trial(v_teacher, world, scope="unet_feature", noising="none").projection is not None


def test_sample_timesteps_covers_the_closed_range():
    t = objectives.sample_timesteps(4000, 20, 23, torch.Generator().manual_seed(0))
    assert set(t.tolist()) == {20, 21, 22, 23}


# --------------------------------------------------------------------------- UNet-feature distillation


def mid_block_output(unet, noisy, t, cond):
    seen = []
    handle = unet.mid_block.register_forward_hook(lambda _m, _i, out: seen.append(out.detach().clone()))
    try:
        with torch.no_grad():
            unet(noisy, t, encoder_hidden_states=cond)
    finally:
        handle.remove()
    assert len(seen) == 1
    return seen[0]


def test_unet_features_are_the_mid_block_output(teacher, world):
    x0, eps, t, cond = batch(teacher, world)
    noisy = hand_noised(x0, eps, t)
    features = objectives.unet_features(teacher.unet, noisy, t, cond)
    expected = mid_block_output(teacher.unet, noisy, t, cond)
    top = teacher.unet.config.block_out_channels[-1]
    assert expected.shape == (2, top, SIZE // 2 // 2, SIZE // 2 // 2)  # VAE /2, UNet /2
    assert torch.allclose(features, expected, atol=1e-6)
    assert not features.requires_grad
    assert len(teacher.unet.mid_block._forward_hooks) == 0, "the hook must be removed"
    predicted = torch.randn(features.shape, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(objectives.unet_feature_loss(predicted, features), ((predicted - expected) ** 2).mean(),
                          atol=1e-6)


def test_loss_step_unet_feature_regresses_h_w_onto_features_of_cached_latents(teacher, world):
    trial = fresh_trial(teacher, world, scope="unet_feature", lambda_sds=0.5, latent_scale=2.0)
    g = torch.Generator()
    g.set_state(trial.generator.get_state())
    rows = torch.tensor([2, 0, 3, 1])  # image rows deliberately not the identity
    losses = loss_step(trial, world["images"], world["tokens"], world["rows"], rows)
    assert set(losses) == {"clip", "unet_feature", "total"}
    t = torch.randint(trial.objective.t_min, trial.objective.t_max + 1, (N,), generator=g)
    x0 = world["latents"].get([image_key(world["pairs"][i].image) for i in rows.tolist()])
    eps = torch.randn(x0.shape, generator=g)
    features = mid_block_output(teacher.unet, hand_noised(x0, eps, t), t, encode_text(teacher, world["captions"]))
    with torch.no_grad():
        image_features = trial.student.model.encode_image(world["images"], normalize=True)
        predicted = 2.0 * trial.projection(image_features)
    assert predicted.shape == features.shape
    assert torch.allclose(losses["unet_feature"], F.mse_loss(predicted, features), atol=1e-5)
    assert torch.allclose(losses["total"], losses["clip"] + 0.5 * losses["unet_feature"], atol=1e-5)


# --------------------------------------------------------------------------- diffusion score


def test_diffusion_errors_equal_a_hand_loop_over_rows(teacher, world):
    x0, eps, t, cond = batch(teacher, world, n=4, seed=1)
    errors = objectives.diffusion_errors(teacher.unet, teacher.scheduler, x0, cond, t, eps)
    assert errors.shape == (4,)
    for i in range(4):
        ti = t[i : i + 1]
        with torch.no_grad():
            pred = teacher.unet(hand_noised(x0[i : i + 1], eps[i : i + 1], ti), ti,
                                encoder_hidden_states=cond[i : i + 1]).sample
        assert torch.allclose(errors[i], ((pred - eps[i : i + 1]) ** 2).mean(), atol=1e-5, rtol=1e-4), i


def test_min_snr_weights_of_the_teacher_loss():
    """min(SNR, gamma) / SNR for epsilon targets, min(SNR, gamma) / (SNR + 1) for v; SNR = a / (1 - a)."""
    from pipeline.teacher_training import snr_weights

    eps = DDPMScheduler(**SD_SCHEDULE)
    t = torch.tensor([0, 300, 999])
    a = eps.alphas_cumprod[t].double()
    snr = (a / (1 - a)).tolist()
    assert snr[0] > 5 > snr[2]  # the range covers both sides of gamma
    expected = [5 / snr[0], min(snr[1], 5) / snr[1], 1.0]
    assert snr_weights(eps, t, 5.0).tolist() == pytest.approx(expected, rel=1e-5)
    assert torch.equal(snr_weights(eps, t, 0.0), torch.ones(3))
    v = DDPMScheduler(**SD_SCHEDULE, prediction_type="v_prediction")
    assert snr_weights(v, t, 5.0).tolist() == pytest.approx([5 / (snr[0] + 1), min(snr[1], 5) / (snr[1] + 1),
                                                              snr[2] / (snr[2] + 1)], rel=1e-5)
