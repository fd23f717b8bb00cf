"""The objectives against their definitions, computed by hand on tiny real modules.

L_CLIP: symmetric InfoNCE with a learnable temperature. NegCLIP: the hard negatives join the
image-to-text softmax only. L_SDS: ||eps_theta(x_t, t, c) - eps||^2 for x_0 = h_w(f(x)),
gradient through the frozen UNet into h_w and the image encoder (or DreamFusion's
w(t)(eps_hat - eps) in "sds" mode). UNet-feature loss: ||h_w(f(x)) - I(x, c)||^2 with I the
UNet's mid-block features. Diffusion feedback: the epsilon error of the image's own latent
under the empty caption's conditioning plus the projected image tokens. Diffusion score:
per-row epsilon error. A v-prediction teacher's output is turned into its epsilon estimate.
"""
from __future__ import annotations

import dataclasses
import math
import random
from types import SimpleNamespace

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
from pipeline.models.student import build_toy_student, normalization
from pipeline.models.teacher import SD_SCHEDULE, build_toy_teacher, encode_text
from pipeline.train import loss_step, nearest_rows, setup

from tiny import SIZE, STUDENT, TEACHER

N = 4  # batch
# The name each teacher loss reports under (`loss_step`'s keys).
TERM = {"sds": "sds", "unet_feature": "unet_feature", "diffusion_feedback": "feedback",
        "contrastive_feedback": "contrastive"}


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
    root = tmp_path_factory.mktemp("cache")
    pairs = [ImageCaption(root / f"{i}.png", c) for i, c in enumerate(captions)]
    for scene, pair in zip(scenes, pairs):
        tw.render_scene(scene, SIZE).save(pair.image)
    write_table(root, "train_text", ["", *captions], lambda texts: encode_text(teacher, texts), shard_size=3,
                batch_size=2, progress=False)
    latents = {image_key(p.image): torch.randn(teacher.latent_shape, generator=torch.Generator().manual_seed(i))
               for i, p in enumerate(pairs)}
    write_table(root, "train_images", list(latents), lambda keys: torch.stack([latents[k] for k in keys]),
                shard_size=3, batch_size=2, progress=False)
    negatives = [tw.hard_negatives(c) for c in captions]
    return {"images": images, "tokens": tokens, "captions": captions, "pairs": pairs,
            "conditioning": open_table(root, "train_text"), "latents": open_table(root, "train_images"),
            "rows": torch.arange(N), "negatives": negatives,
            "negative_tokens": student.tokenizer([options[0] for options in negatives])}


def fresh_trial(teacher, world, scope="layernorm", method="sds", lambda_sds=0.5, steps=4, **objective):
    student = build_toy_student(STUDENT, SIZE)
    return setup(TrainConfig(scope=scope, batch_size=N, steps=steps), ObjectiveConfig(method, lambda_sds, **objective),
                 student, world["pairs"], teacher, world["conditioning"], world["latents"], negatives=world["negatives"])


def step(trial, world, image_rows=None):
    text_rows = torch.tensor([world["conditioning"].index(c) for c in world["captions"]])
    return loss_step(trial, world["images"], world["tokens"], world["negative_tokens"], text_rows,
                     world["rows"] if image_rows is None else image_rows)


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
    assert trial.projector is None
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

    linear = trial.projector.linear
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
        x0 = 0.3 * (image_features @ trial.projector.linear.weight.T + trial.projector.linear.bias).view(N, *teacher.latent_shape)
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


def small_v_scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=4, beta_start=0.1, beta_end=0.4, beta_schedule="linear",
                         prediction_type="v_prediction", clip_sample=False)


def test_v_prediction_output_becomes_its_epsilon_estimate_by_hand():
    """On a 4-step schedule, betas 0.1, 0.2, 0.3, 0.4: abar at t = 2 is 0.9 * 0.8 * 0.7 = 0.504.
    With x0 = 1, eps = 2: x_t = sqrt(.504) + 2 sqrt(.496), v = 2 sqrt(.504) - sqrt(.496); a v_hat of
    1.5 gives eps_hat = sqrt(.504) 1.5 + sqrt(.496) x_t, and eps_hat - eps = sqrt(.504) (v_hat - v)."""
    scheduler = small_v_scheduler()
    t = torch.tensor([2])
    a, b = 0.504 ** 0.5, 0.496 ** 0.5
    x0, eps = torch.full((1, 1, 1, 1), 1.0), torch.full((1, 1, 1, 1), 2.0)
    x_t = scheduler.add_noise(x0, eps, t)
    assert x_t.item() == pytest.approx(a + 2 * b, rel=1e-6)
    assert objectives.diffusion_target(scheduler, x0, eps, t).item() == pytest.approx(2 * a - b, rel=1e-6)
    eps_hat = objectives.predicted_noise(scheduler, torch.full((1, 1, 1, 1), 1.5), x_t, t)
    assert eps_hat.item() == pytest.approx(a * 1.5 + b * (a + 2 * b), rel=1e-6)
    assert (eps_hat - eps).item() == pytest.approx(a * (1.5 - (2 * a - b)), rel=1e-5)
    # An epsilon teacher's output is its estimate as it is.
    eps_scheduler = DDPMScheduler(num_train_timesteps=4, beta_start=0.1, beta_end=0.4, beta_schedule="linear")
    assert objectives.predicted_noise(eps_scheduler, torch.full((1, 1, 1, 1), 1.5), x_t, t).item() == 1.5


class ConstantUNet(nn.Module):
    """A stand-in denoiser whose output is a fixed tensor (what the conversion acts on)."""

    def __init__(self, output):
        super().__init__()
        self.output = output

    def forward(self, sample, timestep, encoder_hidden_states):
        return SimpleNamespace(sample=self.output.expand_as(sample))


def test_v_prediction_teachers_sds_loss_and_diffusion_errors_are_epsilon_errors():
    """L_SDS and the diffusion score of a v-prediction teacher compare eps_hat with eps (not v_hat
    with v, which would weight step t by 1 / abar_t), by the hand formula of the test above."""
    scheduler = small_v_scheduler()
    g = torch.Generator().manual_seed(0)
    x0, eps, v_hat = (torch.randn(3, 2, 2, 2, generator=g) for _ in range(3))
    t = torch.tensor([0, 2, 3])
    abar = torch.tensor([0.9, 0.504, 0.504 * 0.6]).view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    eps_hat = abar.sqrt() * v_hat + (1 - abar).sqrt() * x_t
    unet = ConstantUNet(v_hat)
    out = objectives.sds_loss(x0, None, unet, scheduler, t, eps)
    assert out.loss.item() == pytest.approx(((eps_hat - eps) ** 2).mean().item(), rel=1e-5)
    errors = objectives.diffusion_errors(unet, scheduler, x0, None, t, eps)
    assert errors.tolist() == pytest.approx(((eps_hat - eps) ** 2).flatten(1).mean(1).tolist(), rel=1e-5)
    norms = objectives.diffusion_errors(unet, scheduler, x0, None, t, eps, error="norm")
    assert norms.tolist() == pytest.approx((eps_hat - eps).flatten(1).norm(dim=1).tolist(), rel=1e-5)
    v = abar.sqrt() * eps - (1 - abar).sqrt() * x0
    assert not errors.tolist() == pytest.approx(((v_hat - v) ** 2).flatten(1).mean(1).tolist(), rel=1e-2)
    with pytest.raises(ValueError, match="epsilon"):
        objectives.sds_loss(x0, None, unet, scheduler, t, eps, "none", "backprop")


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
    assert fresh_trial(short, world, t_max=499).projector is not None
    with pytest.raises(ConfigError, match=r"^eval\.diffusion_t_max: 950 is past the teacher's last DDPM step \(499\)$"):
        DiffusionScorer(short, world["latents"], world["conditioning"], EvalConfig())

    v_teacher = build_toy_teacher(dataclasses.replace(TEACHER, prediction_type="v_prediction"), SIZE)
    with pytest.raises(ConfigError, match=r"^objective\.noising: 'none' needs an epsilon-prediction teacher; "
                                          r"this one predicts 'v_prediction'$"):
        fresh_trial(v_teacher, world, noising="none")
    assert fresh_trial(v_teacher, world, noising="noise").projector is not None
    # UNet-feature distillation always noises the cached latents: its noising key does not apply.
    assert fresh_trial(v_teacher, world, method="unet_feature", noising="none").projector is not None


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


def test_unet_features_of_a_compiled_unet_are_its_mid_block_output(teacher, world):
    """A UNet compiled in place (CUDA's default) and called once without the hook: its traced graph
    would be reused and the hook would never fire."""
    import copy

    x0, eps, t, cond = batch(teacher, world)
    noisy = hand_noised(x0, eps, t)
    expected = mid_block_output(teacher.unet, noisy, t, cond)
    unet = copy.deepcopy(teacher.unet)
    unet.compile(backend="eager")
    try:
        with torch.no_grad():
            unet(noisy, t, encoder_hidden_states=cond)
        assert torch.allclose(objectives.unet_features(unet, noisy, t, cond), expected, atol=1e-6)
    finally:
        torch._dynamo.reset()


def test_loss_step_unet_feature_regresses_h_w_onto_features_of_cached_latents(teacher, world):
    trial = fresh_trial(teacher, world, method="unet_feature", lambda_sds=0.5, latent_scale=2.0)
    g = torch.Generator()
    g.set_state(trial.generator.get_state())
    rows = torch.tensor([2, 0, 3, 1])  # image rows deliberately not the identity
    losses = step(trial, world, image_rows=rows)
    assert set(losses) == {"clip", "unet_feature", "total"}
    t = torch.randint(trial.objective.t_min, trial.objective.t_max + 1, (N,), generator=g)
    x0 = world["latents"].get([image_key(world["pairs"][i].image) for i in rows.tolist()])
    eps = torch.randn(x0.shape, generator=g)
    features = mid_block_output(teacher.unet, hand_noised(x0, eps, t), t, encode_text(teacher, world["captions"]))
    with torch.no_grad():
        image_features = trial.student.model.encode_image(world["images"], normalize=True)
        predicted = 2.0 * trial.projector(image_features)
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


# --------------------------------------------------------------------------- NegCLIP


def test_negclip_loss_two_images_one_hard_negative_each_by_hand():
    """Images i0 = (1, 0), i1 = (0, 1); captions c0 = (1, 0), c1 = (0.6, 0.8); negatives
    n0 = (0.8, 0.6), n1 = (0, 1); scale 10. Image rows over [c0, c1, n0, n1]:
    i0 -> [10, 6, 8, 0] (answer c0), i1 -> [0, 8, 6, 10] (answer c1, beaten by its negative).
    Caption rows over the images only: c0 -> [10, 0] (i0), c1 -> [6, 8] (i1)."""
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    negative = torch.tensor([[0.8, 0.6], [0.0, 1.0]])
    lse = lambda *v: torch.logsumexp(torch.tensor(v), 0).item()
    i2t = ((lse(10, 6, 8, 0) - 10) + (lse(0, 8, 6, 10) - 8)) / 2
    t2i = ((lse(10, 0) - 10) + (lse(6, 8) - 8)) / 2
    got = objectives.negclip_loss(image, text, negative, torch.tensor(10.0))
    assert got.item() == pytest.approx((i2t + t2i) / 2, rel=1e-6)
    # Without negatives it is L_CLIP; a negative only ever raises the image-to-text term.
    assert objectives.negclip_loss(image, text, negative[:0], torch.tensor(10.0)).item() == pytest.approx(
        objectives.clip_loss(image, text, torch.tensor(10.0)).item(), rel=1e-6)
    assert got.item() > objectives.clip_loss(image, text, torch.tensor(10.0)).item()


def test_loss_step_negclip_scores_each_image_against_the_captions_and_their_negatives(teacher, world):
    trial = fresh_trial(teacher, world, scope="full", method="negclip", lambda_sds=0.0)
    assert trial.projector is None
    losses = step(trial, world)
    assert set(losses) == {"clip", "total"}
    model = trial.student.model
    with torch.no_grad():
        image = model.encode_image(world["images"], normalize=True)
        text = model.encode_text(world["tokens"], normalize=True)
        negative = model.encode_text(world["negative_tokens"], normalize=True)
        expected = objectives.negclip_loss(image, text, negative, model.logit_scale.exp())
    assert losses["total"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert losses["total"].item() != pytest.approx(objectives.clip_loss(image, text, model.logit_scale.exp()).item())


def test_the_dataset_draws_each_pairs_negative_from_its_list_by_seed_step_and_pair(teacher, world):
    trial = fresh_trial(teacher, world, scope="full", method="negclip", lambda_sds=0.0)
    dataset = trial.loader.dataset
    tokenizer = trial.student.tokenizer
    drawn = {step: [dataset.negative(i, step) for i in range(N)] for step in range(8)}
    for negatives in drawn.values():
        assert all(n in world["negatives"][i] for i, n in enumerate(negatives))
    assert len({drawn[step][0] for step in drawn}) > 1, "draws vary with the step"
    assert drawn[3] == [dataset.negative(i, 3) for i in range(N)]
    own, _neighbour = dataset[(1, 3)]
    assert torch.equal(own[2], tokenizer([drawn[3][1]])[0]) and torch.equal(own[1], tokenizer([world["captions"][1]])[0])


def test_nearest_rows_by_hand_with_a_tie_going_to_the_lower_index():
    """Unit rows e0 = (1, 0), e1 = (0.8, 0.6), e2 = (0, 1), e3 = (0.6, 0.8), e4 = e0. Cosines from e1:
    e0 0.8, e2 0.6, e3 0.96, e4 0.8 -> e3, then e0 before its copy e4. An image is never its own neighbour,
    its copy is the nearest of all."""
    e = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [0.6, 0.8], [1.0, 0.0]])
    expected = [[4, 1], [3, 0], [3, 1], [1, 2], [0, 1]]
    assert nearest_rows(e, 2).tolist() == expected
    assert nearest_rows(e, 2, chunk=2).tolist() == expected           # rows in chunks: the same neighbours
    assert nearest_rows(e, 4)[0].tolist() == [4, 1, 3, 2]


def test_negclip_batches_a_nearest_image_of_each_pair_with_its_caption_and_a_hard_negative(teacher, world):
    """NegCLIP's hard-negative images (vinid/neg_clip): each item brings one of its k nearest training
    images (the pretrained student's cosine), that image's caption and a hard negative of it; a batch of
    B pairs is 2B images against 2B captions and 2B negatives."""
    trial = fresh_trial(teacher, world, scope="full", method="negclip", lambda_sds=0.0, negclip_neighbours=2)
    dataset, model = trial.loader.dataset, trial.student.model
    with torch.no_grad():
        embedded = model.encode_image(world["images"], normalize=True)
    assert dataset.neighbours == nearest_rows(embedded, 2).tolist()
    tokenizer = trial.student.tokenizer
    drawn = {step: dataset.neighbour(1, step) for step in range(12)}
    assert all(j in dataset.neighbours[1] and negative in world["negatives"][j] for j, negative in drawn.values())
    assert len({j for j, _ in drawn.values()}) == 2, "both neighbours are drawn over the steps"
    own, (image, caption, negative, _text_row, image_row) = dataset[(1, 3)]
    j, hard = drawn[3]
    assert torch.equal(image, world["images"][j]) and image_row == j
    assert torch.equal(caption, tokenizer([world["captions"][j]])[0]) and torch.equal(negative, tokenizer([hard])[0])
    assert torch.equal(own[0], world["images"][1])

    images, tokens, negatives, _text_rows, image_rows = next(iter(trial.loader))
    assert len(images) == len(tokens) == len(negatives) == 2 * N
    first = image_rows[:N].tolist()
    assert image_rows[N:].tolist() == [dataset.neighbour(i, 0)[0] for i in first]   # each pair's, in its order
    losses = loss_step(trial, images, tokens, negatives, _text_rows, image_rows)
    with torch.no_grad():
        expected = objectives.negclip_loss(model.encode_image(images, normalize=True),
                                           model.encode_text(tokens, normalize=True),
                                           model.encode_text(negatives, normalize=True), model.logit_scale.exp())
    assert losses["clip"].item() == pytest.approx(expected.item(), rel=1e-5)

    captions_only = fresh_trial(teacher, world, scope="full", method="negclip", lambda_sds=0.0, negclip_neighbours=0)
    assert captions_only.loader.dataset.neighbours is None and len(next(iter(captions_only.loader))[0]) == N
    # Finding the neighbours leaves the global random stream where a trial without them leaves it.
    states = [(fresh_trial(teacher, world, scope="full", method="negclip", lambda_sds=0.0, negclip_neighbours=k),
               torch.get_rng_state())[1] for k in (0, 2)]
    assert torch.equal(*states)
    with pytest.raises(ConfigError, match=rf"^objective.negclip_neighbours: {N} is not allowed for {N} training "
                                          rf"images .*; allowed: < {N}$"):
        fresh_trial(teacher, world, scope="full", method="negclip", lambda_sds=0.0, negclip_neighbours=N)


# --------------------------------------------------------------------------- reductions


def test_sum_and_mean_reductions_differ_by_exactly_the_element_count(teacher, world):
    x0, eps, t, cond = batch(teacher, world)
    elements = x0[0].numel()
    assert elements == 4 * 16 * 16
    for gradient in ("backprop", "sds"):
        grads, values = {}, {}
        for reduction in ("mean", "sum"):
            x = x0.clone().requires_grad_(True)
            out = objectives.sds_loss(x, cond, teacher.unet, teacher.scheduler, t, eps, "noise", gradient, reduction)
            out.loss.backward()
            values[reduction], grads[reduction] = out.mse, x.grad
        assert values["sum"].item() == pytest.approx(elements * values["mean"].item(), rel=1e-5), gradient
        assert torch.allclose(grads["sum"], elements * grads["mean"], rtol=1e-4, atol=1e-9), gradient
    a, b = torch.randn(3, 2, 5), torch.randn(3, 2, 5)
    assert objectives.squared_error(a, b, "sum").item() == pytest.approx(10 * objectives.squared_error(a, b).item(),
                                                                         rel=1e-6)
    assert objectives.squared_error(a, b, "sum").item() == pytest.approx(((a - b) ** 2).sum().item() / 3, rel=1e-6)


# --------------------------------------------------------------------------- diffusion feedback


def teacher_modules(teacher):
    return {"unet": teacher.unet, "vae": teacher.vae, "text_encoder": teacher.text_encoder}


@pytest.mark.parametrize("method,scope,clip_weight", [
    ("diffusion_feedback", "layernorm", 1.0), ("diffusion_feedback", "layernorm", 0.0),
    ("diffusion_feedback", "lora", 1.0), ("contrastive_feedback", "layernorm", 0.0),
    ("contrastive_feedback", "lora", 1.0)])
def test_feedback_gradient_reaches_the_projector_and_the_scope_and_no_teacher_weight(
        teacher, world, method, scope, clip_weight):
    trial = fresh_trial(teacher, world, scope=scope, method=method, lambda_sds=0.5,
                        clip_weight=clip_weight, feedback_tokens=3)
    losses = step(trial, world)
    assert set(losses) == {"clip", TERM[method], "total"}
    losses["total"].backward()
    assert trial.projector.linear.weight.grad.abs().sum() > 0
    scope_grads = {name: p.grad for name, p in trial.params.items() if not name.startswith("h_w.")}
    image_side = [g for name, g in scope_grads.items() if name.startswith("visual.")]
    text_side = [g for name, g in scope_grads.items() if not name.startswith("visual.")]
    assert image_side and all(g is not None for g in image_side)
    assert any(g.abs().sum() > 0 for g in image_side)
    if clip_weight == 0:   # the feedback reaches the image tower only
        assert all(g is None or g.abs().sum() == 0 for g in text_side)
    for part, module in teacher_modules(teacher).items():
        for name, p in module.named_parameters():
            assert not p.requires_grad and p.grad is None, f"{part}.{name}"


def feedback_step(teacher, world, **objective):
    """A feedback method's trial, its losses on a batch of shuffled latent rows, a generator at the state
    the step drew from, and the rows; the projection made large enough that where it goes changes the
    loss clearly."""
    trial = fresh_trial(teacher, world, lambda_sds=0.5, t_min=100, t_max=900, **objective)
    with torch.no_grad():
        trial.projector.linear.weight.mul_(30)
    g = torch.Generator()
    g.set_state(trial.generator.get_state())
    rows = torch.tensor([2, 0, 3, 1])
    return trial, step(trial, world, image_rows=rows), g, rows


def test_loss_step_feedback_is_the_epsilon_error_of_the_cached_latent_under_the_projected_cls(teacher, world):
    trial, losses, g, rows = feedback_step(teacher, world, method="diffusion_feedback")
    t = torch.randint(100, 901, (N,), generator=g)
    x0 = world["latents"].get([image_key(world["pairs"][i].image) for i in rows.tolist()])
    eps = torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        cls = trial.student.model.encode_image(world["images"])         # before normalisation
        empty = encode_text(teacher, [""])[0]
        # The projected CLS at every position of the empty caption's conditioning (DCR's construction).
        projected = cls @ trial.projector.linear.weight.T + trial.projector.linear.bias
        pred = teacher.unet(hand_noised(x0, eps, t), t, encoder_hidden_states=empty + projected[:, None]).sample
        first_only = empty.expand(N, -1, -1).clone()      # the start token's position alone, as it once was
        first_only[:, 0] += projected
        other = teacher.unet(hand_noised(x0, eps, t), t, encoder_hidden_states=first_only).sample
    assert losses["feedback"].item() == pytest.approx(F.mse_loss(pred, eps).item(), rel=1e-4)
    assert losses["feedback"].item() != pytest.approx(F.mse_loss(other, eps).item(), rel=1e-3)
    assert losses["total"].item() == pytest.approx(losses["clip"].item() + 0.5 * losses["feedback"].item(), rel=1e-5)


def test_feedback_tokens_are_the_cls_then_patch_tokens_through_the_towers_projection(teacher, world):
    from pipeline.models.student import image_tokens

    model = build_toy_student(STUDENT, SIZE).model
    with torch.no_grad():
        pooled, patches = image_tokens(model, world["images"])
        assert torch.allclose(pooled, model.encode_image(world["images"]), atol=1e-6)
        grid = (SIZE // STUDENT.patch_size) ** 2
        assert patches.shape == (N, grid, STUDENT.embed_dim)
        x = model.visual.transformer(model.visual._embeds(world["images"]))
        expected = model.visual.ln_post(x)[:, 1:] @ model.visual.proj
        assert torch.allclose(patches, expected, atol=1e-5)
    assert model.visual.output_tokens is False
    projector = objectives.FeedbackProjector(STUDENT.embed_dim, TEACHER.text_width)
    empty = torch.randn(TEACHER.max_length, TEACHER.text_width)
    with torch.no_grad():
        cond = projector(torch.cat([pooled[:, None], patches[:, :2]], dim=1), empty)
        assert cond.shape == (N, TEACHER.max_length, TEACHER.text_width)
        assert torch.equal(cond[:, 3:], empty[3:].expand(N, -1, -1))        # k tokens: the first k positions
        assert torch.allclose(cond[:, 1], empty[1] + projector.linear(patches[:, 0]), atol=1e-6)
        # The CLS alone is added at every position: at the first alone it sat on the start token's output,
        # the same for every caption, where the teacher had never learned to read anything.
        alone = projector(pooled[:, None], empty)
        assert torch.allclose(alone, empty + projector.linear(pooled)[:, None], atol=1e-6)


def test_dcrs_mlp_projector_by_hand():
    """objective.projector "mlp": LayerNorm(d), Linear(d, D), GELU (erf), Linear(D, D), added to the empty
    caption's conditioning; computed here from the definitions on one token."""
    projector = objectives.FeedbackProjector(2, 2, "mlp")
    with torch.no_grad():
        projector.hidden[1].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        projector.hidden[1].bias.copy_(torch.tensor([0.0, -1.0]))
        projector.linear.weight.copy_(torch.tensor([[1.0, 1.0], [0.0, -1.0]]))
        projector.linear.bias.copy_(torch.tensor([0.5, 0.0]))
        empty = torch.tensor([[0.25, -0.25], [1.0, 2.0]])
        cond = projector(torch.tensor([[[1.0, 3.0]]]), empty)
    # LayerNorm of (1, 3): mean 2, variance 1 (eps 1e-5), then its default affine (1, 0).
    normed = [-1 / math.sqrt(1 + 1e-5), 1 / math.sqrt(1 + 1e-5)]
    gelu = lambda x: x * (1 + math.erf(x / math.sqrt(2))) / 2       # noqa: E731
    h = [gelu(normed[0]), gelu(2 * normed[1] - 1)]
    out = [h[0] + h[1] + 0.5, -h[1]]
    expected = torch.tensor([[[0.25 + out[0], -0.25 + out[1]], [1.0 + out[0], 2.0 + out[1]]]])
    assert torch.allclose(cond, expected, atol=1e-6), (cond, expected)
    assert {n for n, _ in projector.named_parameters()} == {
        "hidden.0.weight", "hidden.0.bias", "hidden.1.weight", "hidden.1.bias", "linear.weight", "linear.bias"}
    # "linear" is the one Linear(d, D) it always was: the same parameters from the same draws of the seed.
    torch.manual_seed(7)
    linear, next_draw = objectives.FeedbackProjector(3, 5), torch.rand(1)
    torch.manual_seed(7)
    alone, alone_next_draw = nn.Linear(3, 5), torch.rand(1)
    assert {n: p.shape for n, p in linear.named_parameters()} == {"linear.weight": (5, 3), "linear.bias": (5,)}
    assert torch.equal(linear.linear.weight, alone.weight) and torch.equal(linear.linear.bias, alone.bias)
    assert torch.equal(next_draw, alone_next_draw)          # and it draws nothing more
    with pytest.raises(ValueError, match=r"^kind 'MLP' is not a projector; use one of 'linear', 'mlp'$"):
        objectives.FeedbackProjector(3, 5, "MLP")           # a library caller's typo builds no Linear silently


@pytest.mark.parametrize("method", ["diffusion_feedback", "contrastive_feedback"])
def test_the_mlp_projector_trains_with_the_feedback_methods(teacher, world, method):
    trial = fresh_trial(teacher, world, method=method, lambda_sds=0.5, projector="mlp")
    hidden = {n for n in trial.params if n.startswith("h_w.hidden.")}
    assert hidden == {"h_w.hidden.0.weight", "h_w.hidden.0.bias", "h_w.hidden.1.weight", "h_w.hidden.1.bias"}
    step(trial, world)["total"].backward()
    assert all(trial.params[n].grad.abs().sum() > 0 for n in hidden)
    assert trial.projector.linear.weight.shape == (TEACHER.text_width, TEACHER.text_width)


def test_too_many_feedback_tokens_for_the_teachers_conditioning_is_a_config_error(teacher, world):
    with pytest.raises(ConfigError, match=r"^objective\.feedback_tokens: 16 with the CLS token does not fit the "
                                          r"teacher's 16 conditioning tokens; allowed: <= 15$"):
        fresh_trial(teacher, world, method="diffusion_feedback", feedback_tokens=16)


# --------------------------------------------------------------------------- contrastive feedback (DCR)


def test_contrastive_loss_is_dcrs_infonce_with_two_positives_by_hand():
    """Image 0: anchor (1, 0), augmented view's output (1, 0), target (0, 1), one negative (-1, 0); at
    temperature 1 the cosines are 1, 0, -1, D = e + 1 + 1/e and its loss ((log D - 1) + (log D - 0)) / 2.
    Image 1: anchor (0, 2), view (0, 1), target (0, 3), negative (0, 1) (cosines ignore the lengths):
    every cosine 1, D = 3e, loss log 3. At temperature 1/2 image 0's scores double."""
    anchor = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    view = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    target = torch.tensor([[0.0, 1.0], [0.0, 3.0]])
    negatives = torch.tensor([[[-1.0, 0.0]], [[0.0, 1.0]]])
    e = math.e
    want = ((math.log(e + 1 + 1 / e) - 0.5) + math.log(3)) / 2
    assert objectives.contrastive_loss(anchor, view, negatives, target, 1.0).item() == pytest.approx(want, rel=1e-6)
    want = ((math.log(e ** 2 + 1 + e ** -2) - 1) + math.log(3)) / 2
    assert objectives.contrastive_loss(anchor, view, negatives, target, 0.5).item() == pytest.approx(want, rel=1e-6)


def test_contrastive_partners_are_distinct_other_images_of_the_batch():
    assert objectives.contrastive_partners(4, 0, None).tolist() == [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]]
    drawn = objectives.contrastive_partners(5, 2, torch.Generator().manual_seed(0))
    assert drawn.shape == (5, 2)
    assert all(i not in row and len(set(row)) == 2 for i, row in enumerate(drawn.tolist()))
    assert torch.equal(drawn, objectives.contrastive_partners(5, 2, torch.Generator().manual_seed(0)))
    many = objectives.contrastive_partners(5, 2, torch.Generator().manual_seed(1))
    assert not torch.equal(drawn, many)
    with pytest.raises(ValueError, match="3 negatives of a batch of 3"):
        objectives.contrastive_partners(3, 3, None)


def _normalised(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    return (pixels - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


def test_augmented_views_jitter_flip_and_crop_the_image_not_its_normalised_tensor(world):
    mean, std = normalization(build_toy_student(STUDENT, SIZE))
    # A black image stays black under every jitter, flip and crop; jittering its normalised tensor, as
    # DCR's code does, would clamp the tensor's negative values to 0, a grey image.
    black = _normalised(torch.zeros(3, 3, SIZE, SIZE), mean, std)
    assert torch.allclose(objectives.augmented_views(black, mean, std, torch.Generator().manual_seed(0)), black,
                          atol=1e-5)
    images = world["images"]
    one = objectives.augmented_views(images, mean, std, torch.Generator().manual_seed(1))
    assert torch.equal(one, objectives.augmented_views(images, mean, std, torch.Generator().manual_seed(1)))
    assert one.shape == images.shape and one.dtype == images.dtype
    assert not torch.allclose(one, images, atol=1e-2)
    low, high = _normalised(torch.zeros(1, 3, 1, 1), mean, std), _normalised(torch.ones(1, 3, 1, 1), mean, std)
    assert (one >= low - 1e-5).all() and (one <= high + 1e-5).all()
    # Left white, right black: each view keeps its bright half on one side, the left for some, the right
    # for others (a horizontal flip with probability 1/2).
    half = torch.zeros(16, 3, SIZE, SIZE)
    half[..., : SIZE // 2] = 1
    views = objectives.augmented_views(_normalised(half, mean, std), mean, std, torch.Generator().manual_seed(2))
    left = views[..., : SIZE // 2].mean(dim=(1, 2, 3)) > views[..., SIZE // 2 :].mean(dim=(1, 2, 3))
    assert 0 < int(left.sum()) < 16


def test_loss_step_contrastive_feedback_is_dcrs_infonce_of_the_unet_outputs_by_hand(teacher, world):
    """Image i's latent, noised, through the UNet under its own projected CLS (the anchor), under its
    augmented view's and under its partners'; DCR's loss of those outputs against eps, unit by unit."""
    trial, losses, g, rows = feedback_step(teacher, world, method="contrastive_feedback", contrastive_negatives=2)
    views = objectives.augmented_views(world["images"], *normalization(trial.student), g)
    t = torch.randint(100, 901, (N,), generator=g)
    x0 = world["latents"].get([image_key(world["pairs"][i].image) for i in rows.tolist()])
    eps = torch.randn(x0.shape, generator=g)
    partners = objectives.contrastive_partners(N, 2, g)
    with torch.no_grad():
        empty = encode_text(teacher, [""])[0]
        weight, bias = trial.projector.linear.weight, trial.projector.linear.bias
        own = empty + (trial.student.model.encode_image(world["images"]) @ weight.T + bias)[:, None]
        viewed = empty + (trial.student.model.encode_image(views) @ weight.T + bias)[:, None]
        noised = hand_noised(x0, eps, t)

        def unit(i: int, cond: torch.Tensor) -> torch.Tensor:
            out = teacher.unet(noised[i : i + 1], t[i : i + 1], encoder_hidden_states=cond[None]).sample
            return F.normalize(out.flatten(), dim=0)

        total = 0.0
        for i in range(N):
            a, p, target = unit(i, own[i]), unit(i, viewed[i]), F.normalize(eps[i].flatten(), dim=0)
            scores = [float(a @ p) / 0.1, float(a @ target) / 0.1] + \
                     [float(a @ unit(i, own[j])) / 0.1 for j in partners[i].tolist()]
            denominator = sum(math.exp(s) for s in scores)
            total += (-math.log(math.exp(scores[0]) / denominator) - math.log(math.exp(scores[1]) / denominator)) / 2
    assert losses["contrastive"].item() == pytest.approx(total / N, rel=1e-4)
    assert losses["total"].item() == pytest.approx(losses["clip"].item() + 0.5 * losses["contrastive"].item(),
                                                   rel=1e-5)


# --------------------------------------------------------------------------- two stages


def test_feedback_timesteps_give_each_image_its_own_draws_and_the_loss_is_their_mean(teacher, world):
    """DIVA's two timesteps per image: image i's latent under its projected CLS at draws 2i and 2i+1
    (each its own timestep and noise); L_teacher is the mean error over both, i.e. the mean of
    the two halves' losses."""
    trial, losses, g, rows = feedback_step(teacher, world, method="diffusion_feedback", feedback_timesteps=2)
    t = torch.randint(100, 901, (2 * N,), generator=g)
    x0 = world["latents"].get([image_key(world["pairs"][i].image) for i in rows.tolist()])
    eps = torch.randn((2 * N, *x0.shape[1:]), generator=g)
    with torch.no_grad():
        cls = trial.student.model.encode_image(world["images"])
        cond = encode_text(teacher, [""])[0] + (cls @ trial.projector.linear.weight.T
                                                 + trial.projector.linear.bias)[:, None]
        halves = []
        for draw in (0, 1):                  # image i's first draw is row 2i, its second 2i + 1
            noised = hand_noised(x0, eps[draw::2], t[draw::2])
            pred = teacher.unet(noised, t[draw::2], encoder_hidden_states=cond).sample
            halves.append(F.mse_loss(pred, eps[draw::2]).item())
    assert losses["feedback"].item() == pytest.approx(sum(halves) / 2, rel=1e-4)
    assert halves[0] != pytest.approx(halves[1], rel=1e-3)          # two draws, not one counted twice


def test_each_timestep_draws_its_own_patch_tokens_as_each_of_divas_steps_does(teacher, world):
    """With patch tokens and two timesteps, image i's rows 2i and 2i + 1 are conditioned on two draws of its
    patches, not on one draw repeated: DIVA draws them anew at each of its two steps."""
    from pipeline.models.student import image_tokens

    trial, losses, g, rows = feedback_step(teacher, world, method="diffusion_feedback", feedback_timesteps=2,
                                           feedback_tokens=3)
    t = torch.randint(100, 901, (2 * N,), generator=g)
    x0 = world["latents"].get([image_key(world["pairs"][i].image) for i in rows.tolist()]).repeat_interleave(2, 0)
    eps = torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        pooled, patches = image_tokens(trial.student.model, world["images"])
        picks = torch.randint(0, patches.shape[1], (2 * N, 3), generator=g)
        image = torch.arange(2 * N) // 2                  # rows 2i and 2i + 1: image i
        tokens = torch.cat([pooled[image][:, None], patches[image[:, None], picks]], dim=1)
        cond = trial.projector(tokens, encode_text(teacher, [""])[0])
        pred = teacher.unet(hand_noised(x0, eps, t), t, encoder_hidden_states=cond).sample
    assert losses["feedback"].item() == pytest.approx(F.mse_loss(pred, eps).item(), rel=1e-4)
    assert not torch.equal(picks[0::2], picks[1::2])


@pytest.mark.parametrize("method", ["sds", "diffusion_feedback", "contrastive_feedback"])
def test_stage_one_trains_the_projector_alone_and_stage_two_the_student_too(teacher, world, method):
    """The first objective.projector_steps steps leave every student parameter as it was (no
    L_CLIP, no gradient through the student); after them the scope trains."""
    from pipeline.train import fit, trained_state

    trial = fresh_trial(teacher, world, method=method, lambda_sds=0.5, projector_steps=2, steps=3)
    initial = trained_state(trial)
    first = step(trial, world)
    assert "clip" not in first and set(first) == {TERM[method], "total"}
    fit(trial, None, progress=False)
    assert trial.step == 3
    after = trained_state(trial)
    trial2 = fresh_trial(teacher, world, method=method, lambda_sds=0.5, projector_steps=2, steps=3)
    trial2.cfg = dataclasses.replace(trial2.cfg, steps=2)
    fit(trial2, None, progress=False)
    two = trained_state(trial2)
    student_names = [n for n in initial if not n.startswith("h_w.")]
    assert all(torch.equal(initial[n], two[n]) for n in student_names), "stage one moved the student"
    assert not torch.equal(initial["h_w.linear.weight"], two["h_w.linear.weight"])
    assert any(not torch.equal(two[n], after[n]) for n in student_names), "stage two must train the student"


@pytest.mark.parametrize("method, lambda_sds, projector_steps", [
    ("clip", 0.0, 0), ("negclip", 0.0, 0), ("sds", 0.5, 0), ("sds", 0.0, 0), ("unet_feature", 0.5, 0),
    ("diffusion_feedback", 0.5, 0), ("contrastive_feedback", 0.5, 0), ("sds", 0.5, 2)])
def test_reported_losses_are_the_keys_every_step_of_loss_step_reports(teacher, world, method, lambda_sds,
                                                                       projector_steps):
    """What a sweep's ASHA scheduler may compare trials on is checked against `reported_losses`."""
    trial = fresh_trial(teacher, world, method=method, lambda_sds=lambda_sds, projector_steps=projector_steps)
    every_step = None
    for at in range(3):                              # stage one (projector alone), then both terms
        trial.step = at
        keys = set(step(trial, world))
        every_step = keys if every_step is None else every_step & keys
    assert every_step == trial.objective.reported_losses
