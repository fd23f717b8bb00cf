"""Exact trainable-parameter counts per scope and method, computed independently by walking the real modules.

Paper: LayerNorm-only tuning of both towers plus h_w (the map from the image embedding to
the UNet's latent), ~8M parameters for ViT-B/16, mostly h_w. "full" tunes every student
parameter; "lora" low-rank adapters on every attention and MLP linear. Method "unet_feature"
sizes h_w to the UNet's mid-block features (appendix A.2); "diffusion_feedback" trains a
projector from the image embedding into the teacher's conditioning width.
"""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import open_clip
import pytest
import torch
from torch import nn

from pipeline.cache import open_table, write_table
from pipeline.config import ConfigError, ObjectiveConfig, TrainConfig
from pipeline.data.records import ImageCaption
from pipeline.data.keys import image_key
from pipeline.models.student import Student, build_toy_student
from pipeline.models.teacher import build_toy_teacher, encode_text
from pipeline.objectives import LatentProjection, clip_loss
from pipeline.train import (load_checkpoint, load_trained, loss_step, save_checkpoint, save_trained, setup,
                            trainable_parameters)

from tiny import SIZE, STUDENT, TEACHER

CAPTIONS = ["a red circle left of a blue square", "a green square above a yellow triangle"]
CLIP_ONLY = ObjectiveConfig(method="clip", lambda_sds=0.0)


@pytest.fixture(scope="module")
def teacher():
    return build_toy_teacher(TEACHER, SIZE)


@pytest.fixture(scope="module")
def tables(teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    pairs = [ImageCaption(Path(f"/toy/{i}.png"), c) for i, c in enumerate(CAPTIONS)]
    write_table(root, "train_text", ["", *CAPTIONS], lambda texts: encode_text(teacher, texts), shard_size=4,
                batch_size=4, progress=False)
    write_table(root, "train_images", [image_key(p.image) for p in pairs],
                lambda keys: torch.zeros(len(keys), *teacher.latent_shape), shard_size=4, batch_size=4, progress=False)
    return pairs, open_table(root, "train_text"), open_table(root, "train_images")


def layernorm_count(model: nn.Module) -> int:
    return sum(m.weight.numel() + m.bias.numel() for m in model.modules() if isinstance(m, nn.LayerNorm))


def mid_block_numel(teacher) -> int:
    seen = []
    handle = teacher.unet.mid_block.register_forward_hook(lambda _m, _i, out: seen.append(out.shape))
    try:
        with torch.no_grad():
            teacher.unet(torch.zeros(1, *teacher.latent_shape), torch.tensor([10]),
                         encoder_hidden_states=encode_text(teacher, [""]))
    finally:
        handle.remove()
    return math.prod(seen[0][1:])


def h_w_count(embed_dim: int, out_numel: int) -> int:
    return embed_dim * out_numel + out_numel


def test_layernorm_walk_matches_the_architecture():
    """ViT: ln_pre, ln_post and 2 per block; text: 2 per block and ln_final (weight + bias each)."""
    model = build_toy_student(STUDENT, SIZE).model
    by_architecture = (2 * STUDENT.vision_width * (2 + 2 * STUDENT.vision_layers)
                       + 2 * STUDENT.text_width * (1 + 2 * STUDENT.text_layers))
    assert layernorm_count(model) == by_architecture == 448


def lora_count(model: nn.Module, rank: int) -> int:
    """Adapters A (rank x in) and B (out x rank) on each attention's q/k/v (in E, out 3E) and output
    (E -> E) projections and on each MLP linear (c_fc, c_proj)."""
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            total += rank * (module.embed_dim + 3 * module.embed_dim) + rank * 2 * module.embed_dim
        elif isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in ("c_fc", "c_proj"):
            total += rank * (module.in_features + module.out_features)
    return total


def expected_count(scope: str, method: str, lambda_sds: float, student, teacher) -> tuple[int, int]:
    """(student parameters trained, h_w / projector parameters)."""
    model = student.model
    if scope == "full":
        student_part = sum(p.numel() for p in model.parameters())
    elif scope == "lora":
        student_part = lora_count(model, 4)
    else:
        student_part = layernorm_count(model)
    if lambda_sds == 0 or method in ("clip", "negclip"):
        return student_part, 0
    if method == "unet_feature":
        return student_part, h_w_count(STUDENT.embed_dim, mid_block_numel(teacher))
    if method == "diffusion_feedback":
        return student_part, h_w_count(STUDENT.embed_dim, TEACHER.text_width)
    return student_part, h_w_count(STUDENT.embed_dim, math.prod(teacher.latent_shape))


CASES = [(scope, method, lam) for scope in ("layernorm", "full", "lora")
         for method, lam in (("sds", 0.1), ("sds", 0.0), ("clip", 0.0), ("unet_feature", 0.1),
                             ("diffusion_feedback", 0.1))]


@pytest.mark.parametrize("scope,method,lambda_sds", CASES)
def test_trainable_count_per_scope(teacher, tables, scope, method, lambda_sds):
    pairs, conditioning, latents = tables
    student = build_toy_student(STUDENT, SIZE)
    train_cfg = TrainConfig(scope=scope, batch_size=2, steps=2, lora_rank=4)
    fresh = build_toy_student(STUDENT, SIZE)        # counted before any adapter is injected
    trial = setup(train_cfg, ObjectiveConfig(method=method, lambda_sds=lambda_sds), student, pairs,
                  teacher, conditioning, latents)
    student_part, h_w = expected_count(scope, method, lambda_sds, fresh, teacher)
    assert trial.trainable_count == student_part + h_w
    assert (trial.projector is None) == (h_w == 0)

    names = set(trial.params)
    assert sum(p.numel() for n, p in trial.params.items() if n.startswith("h_w.")) == h_w
    if h_w:
        assert names >= {"h_w.linear.weight", "h_w.linear.bias"}
    if scope == "full":
        assert "logit_scale" in names
    elif scope == "lora":
        assert names - {n for n in names if n.startswith("h_w.")} == {n for n in names if ".lora_" in n}
    else:
        assert "logit_scale" not in names and "visual.ln_post.weight" in names and "ln_final.bias" in names
    # Exactly those are trainable: in the student, in the optimiser, and nothing in the UNet.
    requires = sum(p.numel() for p in student.model.parameters() if p.requires_grad)
    assert requires == student_part
    optimised = sum(p.numel() for group in trial.optimizer.param_groups for p in group["params"])
    assert optimised == student_part + h_w
    assert not any(p.requires_grad for p in teacher.unet.parameters())


def test_lora_counts_by_hand():
    """The tiny student (width 32, one block per tower, MLP ratio 4) at rank 4: per block,
    q/k/v 4 (32 + 96) + output 4 (32 + 32) + c_fc 4 (32 + 128) + c_proj 4 (128 + 32) = 16 * 4 * 32."""
    student = build_toy_student(STUDENT, SIZE)
    params = trainable_parameters(student, None, TrainConfig(scope="lora", lora_rank=4))
    assert sum(p.numel() for p in params.values()) == 2 * 16 * 4 * 32 == 4096
    assert all(".lora_" in name for name in params)


def test_lora_starts_as_the_pretrained_model_and_its_gradient_reaches_the_adapters(teacher):
    """peft's B matrices start at zero, so the adapted student scores as before; one backward
    reaches every adapter of the attention (patched nn.MultiheadAttention) and the MLPs."""
    student = build_toy_student(STUDENT, SIZE)
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    tokens = student.tokenizer(CAPTIONS)
    with torch.no_grad():
        before = student.model.encode_image(images), student.model.encode_text(tokens)
    params = trainable_parameters(student, None, TrainConfig(scope="lora", lora_rank=4))
    after = student.model.encode_image(images), student.model.encode_text(tokens)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(before, after))
    (after[0].sum() + after[1].sum()).backward()
    assert all(p.grad is not None for name, p in params.items() if "lora_B" in name)


def test_trainable_parameters_direct(teacher):
    student = build_toy_student(STUDENT, SIZE)
    projection = LatentProjection(STUDENT.embed_dim, teacher.latent_shape)
    ln = trainable_parameters(student, None, TrainConfig(scope="layernorm"))
    assert sum(p.numel() for p in ln.values()) == layernorm_count(student.model)
    assert all(".ln_" in f".{n}" or n.startswith("ln_") for n in ln)
    full = trainable_parameters(student, projection, TrainConfig(scope="full"))
    assert len(full) == len(list(student.model.parameters())) + 2
    assert sum(p.numel() for p in full.values()) == (sum(p.numel() for p in student.model.parameters())
                                                     + h_w_count(32, 1024))
    with pytest.raises(ValueError, match="scope"):
        trainable_parameters(student, projection, SimpleNamespace(scope="everything"))


def tiny_resnet_student() -> Student:
    """An open_clip ModifiedResNet (RN50's architecture at toy widths): the students with BatchNorm."""
    model_cfg = {"embed_dim": 32, "vision_cfg": {"image_size": SIZE, "layers": [1, 1, 1, 1], "width": 8, "head_width": 16},
                 "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    torch.manual_seed(0)
    return Student(open_clip.CLIP(**model_cfg), open_clip.SimpleTokenizer(context_length=16),
                   open_clip.image_transform(SIZE, is_train=False), model_cfg)


def test_peft_adds_the_attention_output_adapters_update_twice():
    """peft 0.21.2's nn.MultiheadAttention adapter merges the out_proj update into the weight and then
    merges it again through out_proj itself (huggingface/peft#3774): the forward computes with
    W_out + 2 dW. README ("Scopes") says so; when a peft release fixes it, this fails: update both."""
    student = build_toy_student(STUDENT, SIZE)
    trainable_parameters(student, None, TrainConfig(scope="lora", lora_rank=4))
    block = student.model.visual.transformer.resblocks[0]
    mha = block.attn
    out_proj = mha.base_layer.out_proj
    with torch.no_grad():
        for name, p in out_proj.named_parameters():
            if "lora_B" in name:
                p.normal_(generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 5, mha.base_layer.embed_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        adapted = mha(x, x, x, need_weights=False)[0]
        plain = nn.MultiheadAttention(mha.base_layer.embed_dim, mha.base_layer.num_heads, batch_first=True)
        plain.in_proj_weight.copy_(mha.base_layer.in_proj_weight)
        plain.in_proj_bias.copy_(mha.base_layer.in_proj_bias)
        plain.out_proj.bias.copy_(out_proj.get_base_layer().bias)
        delta = out_proj.get_delta_weight("default")
        outputs = {}
        for times in (1, 2):
            plain.out_proj.weight.copy_(out_proj.get_base_layer().weight + times * delta)
            outputs[times] = plain(x, x, x, need_weights=False)[0]
    assert torch.allclose(adapted, outputs[2], atol=1e-5) and not torch.allclose(adapted, outputs[1], atol=1e-3)


def test_lora_is_refused_for_a_resnet_image_tower():
    """open_clip's ModifiedResNet runs its attention pool from the projections' raw weights
    (F.multi_head_attention_forward), so an adapter there never runs: refused in one line."""
    with pytest.raises(ConfigError, match=r"^train.scope: 'lora' is not allowed for a ResNet image tower"):
        trainable_parameters(tiny_resnet_student(), None, TrainConfig(scope="lora", lora_rank=4))


def test_the_teacher_loss_alone_is_refused_where_it_reaches_nothing_of_the_scope(tables, teacher):
    """With clip_weight 0 only the image tower trains, and a ResNet's has no LayerNorm: the run would
    report a fine-tuned student that nothing trained."""
    pairs, conditioning, latents = tables
    objective = ObjectiveConfig(method="sds", lambda_sds=1.0, clip_weight=0.0)
    with pytest.raises(ConfigError, match=r"^train\.scope: 'layernorm' with objective\.clip_weight 0 trains nothing "
                                          r"of the student: .*; allowed: another scope, or objective\.clip_weight > 0$"):
        setup(TrainConfig(scope="layernorm", batch_size=2, steps=2), objective, tiny_resnet_student(), pairs, teacher,
              conditioning, latents)
    trial = setup(TrainConfig(scope="full", batch_size=2, steps=2), objective, tiny_resnet_student(), pairs, teacher,
                  conditioning, latents)
    assert any(name.startswith("visual.") for name in trial.params)


def batchnorm_statistics(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var"))}


@pytest.mark.parametrize("scope,moves", [("layernorm", False), ("full", True)])
def test_batchnorm_statistics_stay_frozen_outside_the_full_scope(scope, moves):
    """Under a frozen-weights scope the ResNet's BatchNorm normalises with its running statistics
    (as in evaluation) and leaves them as they are; only "full" fine-tuning updates them."""
    student = tiny_resnet_student()
    pairs = [ImageCaption(Path(f"/toy/{i}.png"), c) for i, c in enumerate(CAPTIONS)]
    trial = setup(TrainConfig(scope=scope, batch_size=2, steps=2), CLIP_ONLY, student, pairs)
    before = batchnorm_statistics(student.model)
    assert before
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)) * 3 + 1
    tokens = student.tokenizer(CAPTIONS)
    losses = loss_step(trial, images, tokens, tokens, [0, 1], [0, 1])
    after = batchnorm_statistics(student.model)
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert bool(changed) == moves, changed
    if not moves:
        with torch.no_grad():
            model = student.model.eval()
            expected = (model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True),
                        model.logit_scale.exp())
            assert torch.allclose(losses["clip"], clip_loss(*expected))


def test_full_scope_saves_the_batchnorm_statistics_it_moved(tmp_path):
    """The trained file and the checkpoint hold the running statistics with the parameters, so a
    reloaded (or resumed) ResNet is the model that was trained and evaluated."""
    student = tiny_resnet_student()
    pairs = [ImageCaption(Path(f"/toy/{i}.png"), c) for i, c in enumerate(CAPTIONS)]
    trial = setup(TrainConfig(scope="full", batch_size=2, steps=2), CLIP_ONLY, student, pairs)
    tokens = student.tokenizer(CAPTIONS)
    loss_step(trial, torch.randn(2, 3, SIZE, SIZE) * 3 + 1, tokens, tokens, [0, 1], [0, 1])
    trained = batchnorm_statistics(student.model)
    assert any(not torch.equal(trained[n], b) for n, b in batchnorm_statistics(tiny_resnet_student().model).items())

    fresh = tiny_resnet_student()
    load_trained(fresh, save_trained(trial, tmp_path))
    assert all(torch.equal(trained[n], b) for n, b in batchnorm_statistics(fresh.model).items())

    save_checkpoint(trial, tmp_path)
    resumed = setup(TrainConfig(scope="full", batch_size=2, steps=2), CLIP_ONLY, tiny_resnet_student(), pairs)
    assert load_checkpoint(resumed, tmp_path)
    assert all(torch.equal(trained[n], b) for n, b in batchnorm_statistics(resumed.student.model).items())
