"""Every student and teacher of the paper at full size with random weights (no download).

On the meta device: parameter counts, h_w's shape (the image embedding's width -> the
teacher's latent, 4 x 64 x 64 for SD v1-4 at 512 px), the LayerNorm scope's trainable
count, the preprocessing open_clip sets for each tag. On the CPU: one SDS loss evaluation
per student (the full student at its full image size, h_w to a reduced 4 x 8 x 8 latent,
a small UNet) and per teacher (the real UNet channels at sample size 8), with the gradient
checked to reach h_w and the LayerNorms. Then the models stage's paper branch on local
copies (a Stable Diffusion folder, an open_clip hub folder, a checkpoint file).
"""
from __future__ import annotations

import dataclasses
import gc
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from diffusers import DDPMScheduler, UNet2DConditionModel

from pipeline.cache import open_table, write_table
from pipeline.config import ConfigError, EvalConfig, StudentConfig, TeacherConfig, from_dict, load, resolve
from pipeline.data.errors import MissingInput
from pipeline.evaluate import DiffusionScorer
from pipeline.models import paper
from pipeline.models.build import build_models, student_dir, teacher_dir
from pipeline.models.student import build_toy_student, layernorm_parameters, load_student, save_student
from pipeline.models.teacher import (SD_SCHEDULE, Teacher, build_toy_teacher, clip_bpe_tokenizer, load_teacher,
                                     save_teacher)
from pipeline.objectives import LatentProjection, sds_loss

import tiny
from cache_tables import cache_table
from published import offline_hub_env, sd_hub_folder

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def two_threads():
    """Full-size models here: both cores pay off (conftest.py sets one for the tiny ones)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)

# The paper profile's students (params.yaml) with what open_clip builds for them:
# (model, tag, total parameters, LayerNorm parameters, embedding width, image size).
STUDENTS = {
    "vit-b-16": ("ViT-B-16-quickgelu", "openai", 149_620_737, 65_536, 512, 224),
    "vit-b-32": ("ViT-B-32-quickgelu", "openai", 151_277_313, 65_536, 512, 224),
    "vit-l-14": ("ViT-L-14-quickgelu", "openai", 427_616_513, 140_800, 768, 224),
    "vit-l-14-336": ("ViT-L-14-336-quickgelu", "openai", 427_944_193, 140_800, 768, 336),
    "rn50": ("RN50-quickgelu", "openai", 102_007_137, 25_600, 1024, 224),
    "vit-b-16-laion400m": ("ViT-B-16", "laion400m_e32", 149_620_737, 65_536, 512, 224),
    "vit-b-16-laion2b": ("ViT-B-16", "laion2b_s34b_b88k", 149_620_737, 65_536, 512, 224),
    "coca-vit-b-32": ("coca_ViT-B-32", "laion2b_s13b_b90k", 253_560_065, 67_584, 512, 224),
}
# SD v1-4: UNet 859.5M, VAE 83.7M, CLIP ViT-L/14 text 123.1M; SD 2.1: UNet 865.9M, OpenCLIP ViT-H text (23 layers) 340.4M.
TEACHERS = {
    paper.SD_V1_4: (859_520_964, 83_653_863, 123_060_480, (4, 64, 64), 512, "epsilon"),
    paper.SD_V2_1: (865_910_724, 83_653_863, 340_387_840, (4, 96, 96), 768, "v_prediction"),
}
SLOW_STUDENTS = {"vit-l-14", "vit-l-14-336", "vit-b-16-laion400m", "vit-b-16-laion2b"}


def numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_the_paper_profile_names_these_students():
    cfg = load(REPO / "params.yaml", {"profile": "paper"})
    assert {name: (s.model, s.pretrained) for name, s in cfg.students.items()} == \
        {name: spec[:2] for name, spec in STUDENTS.items()}
    assert all(s.source == "pretrained" for s in cfg.students.values())
    assert cfg.train.student == "vit-b-16" and cfg.teacher.pretrained == paper.SD_V1_4


# ---------------------------------------------------------------- full size on the meta device


@pytest.mark.parametrize("name", list(STUDENTS))
def test_student_at_full_size(name):
    model_name, tag, total, layernorms, width, image_size = STUDENTS[name]
    student = paper.random_student(model_name, tag, device="meta")
    assert numel(student.model) == total
    assert sum(p.numel() for p in layernorm_parameters(student.model)) == layernorms
    assert student.model_cfg["embed_dim"] == width and student.model_cfg.get("quick_gelu", False) == (tag == "openai")
    latent = TEACHERS[paper.SD_V1_4][3]
    h_w = paper._empty(lambda: LatentProjection(width, latent))  # parameters on the meta device
    assert h_w(torch.empty(2, width, device="meta")).shape == (2, *latent)
    assert h_w.linear.weight.shape == (math.prod(latent), width)
    scope = paper.layernorm_scope_count(student.model, width, latent)
    assert scope == layernorms + numel(h_w) == layernorms + width * 16384 + 16384
    sizes = [t.size for t in student.preprocess.transforms if type(t).__name__ == "CenterCrop"]
    assert sizes == [(image_size, image_size)]
    normalise = student.preprocess.transforms[-1]
    assert tuple(normalise.mean) == (0.48145466, 0.4578275, 0.40821073)


@pytest.mark.parametrize("repo", list(TEACHERS))
def test_teacher_at_full_size(repo):
    unet, vae, text, latent, pixels, prediction = TEACHERS[repo]
    teacher = paper.random_teacher(repo, device="meta")
    assert (numel(teacher.unet), numel(teacher.vae), numel(teacher.text_encoder)) == (unet, vae, text)
    assert teacher.latent_shape == latent and teacher.resolution == pixels == teacher.vae.config.sample_size
    assert teacher.scaling_factor == pytest.approx(0.18215)
    assert teacher.unet.config.cross_attention_dim == teacher.text_encoder.config.hidden_size
    assert teacher.scheduler.config.prediction_type == prediction
    assert teacher.scheduler.config.beta_schedule == "scaled_linear"
    assert all(not p.requires_grad for m in teacher.modules() for p in m.parameters())


def test_fill_random_gives_meta_parameters_storage_and_keeps_buffers():
    student = paper.random_student("ViT-B-32-quickgelu", "openai", device="cpu")
    assert not any(p.is_meta for p in student.model.parameters())
    mask = student.model.attn_mask
    assert not mask.is_meta and torch.isinf(mask[0, 1]) and mask[1, 0] == 0  # causal mask built in __init__
    ln = student.model.visual.ln_post
    assert torch.all(ln.weight == 1) and torch.all(ln.bias == 0)
    weight = student.model.visual.conv1.weight
    assert 0.01 < float(weight.std()) < 0.03 and len(torch.unique(weight[:2])) > 1000


# ---------------------------------------------------------------- one SDS evaluation per student


def small_sd_unet(cross_attention_dim: int) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=32,
    ).requires_grad_(False).eval()


def sds_through(student, unet, scheduler, conditioning, latent=(4, 8, 8), seed=0):
    """h_w(f(x)) -> L_SDS for one image at the student's full size; returns (output, h_w, pixels)."""
    model = student.model
    model.requires_grad_(False)
    for p in layernorm_parameters(model):
        p.requires_grad_(True)
    generator = torch.Generator().manual_seed(seed)
    size = student.preprocess.transforms[1].size[0]
    pixels = torch.randn(1, 3, size, size, generator=generator)
    embedding = F.normalize(model.encode_image(pixels), dim=-1)
    h_w = LatentProjection(embedding.shape[-1], latent)
    noise = torch.randn(1, *latent, generator=generator)
    t = torch.tensor([500])
    out = sds_loss(h_w(embedding), conditioning, unet, scheduler, t, noise)
    out.loss.backward()
    return out, h_w, (embedding, noise, t)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_STUDENTS else n
                                  for n in STUDENTS])
def test_sds_loss_through_each_student(name):
    model_name, tag, *_ = STUDENTS[name]
    student = paper.random_student(model_name, tag, device="cpu", seed=1)
    scheduler = DDPMScheduler(**SD_SCHEDULE)
    out, h_w, _ = sds_through(student, small_sd_unet(768), scheduler, torch.randn(1, 77, 768))
    assert torch.isfinite(out.loss) and out.mse > 0
    assert h_w.linear.weight.grad is not None and h_w.linear.weight.grad.abs().sum() > 0
    image_tower = {id(p) for p in layernorm_parameters(student.model.visual)}
    reached = {id(p) for p in layernorm_parameters(student.model) if p.grad is not None and p.grad.abs().sum() > 0}
    # L_SDS reaches exactly the image tower's LayerNorms. RN50's image tower has none (BatchNorm
    # and an attention pool), so with the LayerNorm scope its SDS gradient stops at h_w.
    assert reached == image_tower and (name == "rn50") == (not image_tower)
    assert all(p.grad is None for p in student.model.parameters() if not p.requires_grad)


def test_trainer_step_through_coca_uses_its_contrastive_part(tmp_path):
    """CoCa's forward returns a dict with captioning logits; the trainer's step takes its contrastive
    embeddings (the same as CLIP's encode_image / encode_text) and L_SDS reaches the image tower."""
    import open_clip
    from PIL import Image

    from pipeline import train
    from pipeline.config import ObjectiveConfig, TrainConfig
    from pipeline.data.records import ImageCaption
    from pipeline.models.student import Student
    from pipeline.objectives import clip_loss

    torch.manual_seed(0)
    # coca_ViT-B-32.json's structure (attentional pool, output tokens, CLS embedding) at toy widths.
    text = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
    model = open_clip.CoCa(
        embed_dim=32, multimodal_cfg={**text, "attn_pooler_heads": 2},
        text_cfg={**text, "embed_cls": True, "output_tokens": True},
        vision_cfg={"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8,
                    "attentional_pool": True, "attn_pooler_heads": 2, "output_tokens": True})
    student = Student(model, open_clip.SimpleTokenizer(context_length=16),
                      open_clip.image_transform(32, is_train=False), {"embed_dim": 32})
    captions = ["a red circle", "a blue square", "a green triangle", "a red square"]
    Image.new("RGB", (32, 32), (120, 80, 40)).save(tmp_path / "image.png")
    pairs = [ImageCaption(tmp_path / "image.png", c) for c in captions]
    unet = small_sd_unet(24)
    teacher = Teacher(unet, None, None, None, DDPMScheduler(**SD_SCHEDULE))
    conditioning = cache_table(tmp_path, "text", captions, torch.randn(4, 77, 24))
    trial = train.setup(TrainConfig(batch_size=4, steps=2), ObjectiveConfig(lambda_sds=1.0), student, pairs, teacher,
                        conditioning)
    images, tokens = torch.randn(4, 3, 32, 32), student.tokenizer(captions)
    out = model(images, tokens)
    assert isinstance(out, dict) and "logits" in out  # what `model(...)[:3]` would have mangled
    image_features, text_features = model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True)
    assert torch.allclose(image_features, out["image_features"]) and torch.allclose(text_features, out["text_features"])
    losses = train.loss_step(trial, images, tokens, tokens, torch.arange(4), torch.arange(4))
    assert torch.allclose(losses["clip"], clip_loss(image_features, text_features, model.logit_scale.exp()))
    losses["total"].backward()
    image_tower = {id(p) for p in layernorm_parameters(model.visual)}
    reached = {id(p) for p in trial.params.values() if p.grad is not None and p.grad.abs().sum() > 0}
    assert image_tower <= reached and trial.params["h_w.linear.weight"].grad.abs().sum() > 0
    # Every parameter the scope trains is reached: none of the captioning decoder's LayerNorms is among them.
    assert [name for name, p in trial.params.items() if p.grad is None] == []


# ---------------------------------------------------------------- one SDS evaluation per teacher (real channels)


@pytest.mark.slow
@pytest.mark.parametrize("repo", list(TEACHERS))
def test_sds_loss_and_diffusion_score_through_each_teacher_at_reduced_resolution(repo, tmp_path):
    teacher = paper.random_teacher(repo, device="cpu", sample_size=8, parts=("unet",), seed=2)
    assert numel(teacher.unet) == TEACHERS[repo][0] and teacher.latent_shape == (4, 8, 8)
    student = paper.random_student("ViT-B-32-quickgelu", "openai", device="cpu", seed=3)
    width = teacher.unet.config.cross_attention_dim
    conditioning = torch.randn(1, 77, width, generator=torch.Generator().manual_seed(4))
    seen = []
    hook = teacher.unet.register_forward_hook(lambda _m, _i, output: seen.append(output.sample.detach()))
    out, h_w, (embedding, noise, t) = sds_through(student, teacher.unet, teacher.scheduler, conditioning)
    hook.remove()
    # The loss is the epsilon error: of the UNet's output (v1-4), or of the epsilon estimate of its
    # velocity, sqrt(abar) v_hat + sqrt(1 - abar) x_t (v2-1).
    with torch.no_grad():
        x0 = h_w(embedding)
        abar = teacher.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    [pred] = seen
    eps_hat = pred if TEACHERS[repo][5] == "epsilon" else abar.sqrt() * pred + (1 - abar).sqrt() * x_t
    assert float(out.mse) == pytest.approx(float(F.mse_loss(eps_hat, noise)), rel=1e-4)
    assert h_w.linear.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in layernorm_parameters(student.model))
    assert all(p.grad is None for p in teacher.unet.parameters())  # frozen: the gradient only flows through
    del student, out
    gc.collect()

    # The diffusion-score baseline over cached latents / conditioning: 1 image x 2 captions x 2 (t, eps),
    # one batched UNet call of 4 rows.
    write_table(tmp_path, "bench_images", ["a"], lambda keys: torch.randn(len(keys), 4, 8, 8),
                shard_size=4, batch_size=4, progress=False)
    write_table(tmp_path, "bench_text", ["x", "y"], lambda keys: torch.randn(len(keys), 77, width),
                shard_size=4, batch_size=4, progress=False)
    scorer = DiffusionScorer(teacher, open_table(tmp_path, "bench_images"), open_table(tmp_path, "bench_text"),
                             EvalConfig(diffusion_samples=2, batch_size=4))
    scores = scorer(["a", "a"], ["x", "y"])
    assert scores.shape == (2,) and all(math.isfinite(s) for s in scores) and scores[0] != scores[1]


# ---------------------------------------------------------------- configuration


def test_openai_weights_need_the_quickgelu_model_name():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["profiles"]["paper"]["students"]["vit-b-16"]["model"] = "ViT-B-16"
    with pytest.raises(ConfigError) as err:
        from_dict(resolve(params, {"profile": "paper"}))
    message = str(err.value)
    assert "students.vit-b-16.model" in message and "'ViT-B-16-quickgelu'" in message and "\n" not in message


def test_pretrained_sources_must_name_their_weights():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["profiles"]["paper"]["teacher"]["pretrained"] = ""
    with pytest.raises(ConfigError, match="teacher.pretrained: empty"):
        from_dict(resolve(params, {"profile": "paper"}))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["profiles"]["paper"]["students"]["rn50"]["pretrained"] = ""
    with pytest.raises(ConfigError, match="students.rn50.pretrained: empty"):
        from_dict(resolve(params, {"profile": "paper"}))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["profiles"]["paper"]["teacher"]["dtype"] = "float8"
    with pytest.raises(ConfigError, match="teacher.dtype: 'float8'"):
        from_dict(resolve(params, {"profile": "paper"}))


# ---------------------------------------------------------------- the models stage's paper branch


def paper_config(teacher: str, students: dict, dtype: str = "float32"):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["profiles"]["paper"]["teacher"].update(pretrained=teacher, dtype=dtype)
    params["profiles"]["paper"]["students"] = {**dict.fromkeys(params["students"]), **students}   # no toy student
    params["profiles"]["paper"]["train"]["student"] = next(iter(students))
    return from_dict(resolve(params, {"profile": "paper"}))


def test_toy_teacher_attention_heads_follow_the_config_through_save_and_load(tmp_path):
    cfg = dataclasses.replace(tiny.TEACHER, unet_heads=4)
    save_teacher(build_toy_teacher(cfg, tiny.SIZE), tmp_path / "t")
    loaded = load_teacher(tmp_path / "t")
    attentions = [m for m in loaded.unet.modules() if type(m).__name__ == "Attention"]
    assert attentions and {m.heads for m in attentions} == {4}
    # Each block's heads split its width: 16 channels -> 4 per head, 32 -> 8.
    assert {m.inner_dim // m.heads for m in attentions} == {c // 4 for c in tiny.TEACHER.unet_channels}


def test_models_stage_saves_local_copies_into_models(tmp_path):
    import open_clip

    teacher = build_toy_teacher(tiny.TEACHER, tiny.SIZE)
    save_teacher(teacher, tmp_path / "sd-local")  # a local folder in Stable Diffusion's diffusers layout
    hub_folder = tmp_path / "clip-hub"
    toy = build_toy_student(tiny.STUDENT, tiny.SIZE)
    save_student(toy, hub_folder, preprocess_cfg={"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                                                  "interpolation": "bilinear", "resize_mode": "squash"})
    # A checkpoint file for a named model: register the toy architecture under a name, save its weights.
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "tiny-test-vit.json").write_text(json.dumps(toy.model_cfg))
    open_clip.add_model_config(tmp_path / "cfgs")
    torch.save({"state_dict": toy.model.state_dict()}, tmp_path / "tiny.pt")

    cfg = paper_config("sd-local", {
        "hub-folder": {"source": "pretrained", "model": "anything", "pretrained": "clip-hub"},
        "checkpoint": {"source": "pretrained", "model": "tiny-test-vit", "pretrained": "tiny.pt"},
    }, dtype="float16")
    build_models(cfg, tmp_path / "data", tmp_path / "models")

    loaded = load_teacher(teacher_dir(tmp_path / "models"))
    assert loaded.unet.dtype == torch.float32  # later stages compute in float32 ...
    stored = load_teacher(teacher_dir(tmp_path / "models"), torch.float16)
    assert torch.equal(stored.unet.conv_in.weight, teacher.unet.conv_in.weight.half())  # ... of weights stored in float16
    summary = json.loads((tmp_path / "models" / "summary.json").read_text())
    assert summary["teacher"]["prediction_type"] == "epsilon" and summary["teacher"]["dtype"] == "float16"
    assert summary["teacher"]["latent_shape"] == list(teacher.latent_shape)
    for name in ("hub-folder", "checkpoint"):
        student = load_student(student_dir(tmp_path / "models", name))
        for key, value in toy.model.state_dict().items():
            assert torch.equal(student.model.state_dict()[key], value), key
        assert summary[name]["layernorm_scope"] == paper.layernorm_scope_count(toy.model, 32, teacher.latent_shape)
    config = json.loads((student_dir(tmp_path / "models", "hub-folder") / "open_clip_config.json").read_text())
    assert config["preprocess_cfg"]["mean"] == [0.5, 0.5, 0.5] and config["preprocess_cfg"]["resize_mode"] == "squash"


def test_models_stage_reads_the_stable_diffusion_repo_layout(tmp_path):
    """The repo ships a PNDM scheduler config and its tokenizer as vocab.json + merges.txt: the copy in
    models/ is DDPM with SD's betas and tokenizes as SD's 77-token tokenizer."""
    teacher = build_toy_teacher(dataclasses.replace(tiny.TEACHER, max_length=77), tiny.SIZE)
    sd_hub_folder(tmp_path / "sd", teacher)
    assert json.loads((tmp_path / "sd" / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == \
        "PNDMScheduler"
    paper.import_teacher(TeacherConfig(source="pretrained", pretrained="sd"), teacher_dir(tmp_path / "models"),
                         tmp_path)
    loaded = load_teacher(teacher_dir(tmp_path / "models"))
    assert isinstance(loaded.scheduler, DDPMScheduler)
    assert torch.equal(loaded.scheduler.alphas_cumprod, DDPMScheduler(**SD_SCHEDULE).alphas_cumprod)
    captions = ["A giraffe eating food from the top of the tree.", "", "caf\u00e9 at night " * 30]
    ids = lambda tokenizer: tokenizer(captions, padding="max_length", max_length=77, truncation=True).input_ids  # noqa: E731
    assert loaded.tokenizer.model_max_length == 77 and ids(loaded.tokenizer) == ids(clip_bpe_tokenizer(77))
    assert torch.equal(loaded.unet.conv_in.weight, teacher.unet.conv_in.weight)


def test_unknown_tag_or_missing_folder_is_one_line_and_never_downloads(tmp_path):
    with pytest.raises(paper.PaperModelMissing) as err:
        paper.import_student("b16", StudentConfig(source="pretrained", model="ViT-B-16-quickgelu",
                                                  pretrained="openia"), tmp_path / "s", tmp_path)
    message = str(err.value)
    assert message.startswith("students.b16.pretrained: 'openia' is neither a pretrained tag of ViT-B-16-quickgelu")
    assert "openai" in message and message.endswith("see README: Running the paper profile") and "\n" not in message
    with pytest.raises(paper.PaperModelMissing, match=r"teacher.pretrained: './sd' not found"):
        paper.import_teacher(TeacherConfig(source="pretrained", pretrained="./sd"), tmp_path / "t", tmp_path)
    (tmp_path / "not-sd").mkdir()
    with pytest.raises(paper.PaperModelMissing, match=r"cannot load 'not-sd' \(MissingInput: .*no model_index.json"):
        paper.import_teacher(TeacherConfig(source="pretrained", pretrained="not-sd"), tmp_path / "t", tmp_path)


def test_the_models_stages_teacher_missing_is_one_line_and_never_a_hub_lookup(tmp_path, monkeypatch):
    """The later stages load models/teacher (a Path): missing, it is the models stage not run yet,
    said at once; it was passed on to diffusers as a repo id (a traceback after a network wait)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingInput, match=r"models/teacher: not a folder; run the models stage first$"):
        load_teacher(teacher_dir(tmp_path / "models"))


def test_hub_failure_of_the_teacher_is_one_line(tmp_path):
    """diffusers' own failure, offline and with an empty hub cache (a fresh process: the hub library
    reads HF_HUB_OFFLINE when imported), said in one line."""
    script = ("import sys; from pathlib import Path; from pipeline.config import TeacherConfig; "
              "from pipeline.models import paper\n"
              "try:\n"
              "    paper.import_teacher(TeacherConfig(source='pretrained', pretrained=paper.SD_V1_4, "
              "dtype='bfloat16'), Path(sys.argv[1]) / 't', Path(sys.argv[1]))\n"
              "except paper.PaperModelMissing as err:\n"
              "    print(err)")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          env=offline_hub_env(tmp_path / "hf"), timeout=300)
    assert proc.returncode == 0, proc.stderr
    [message] = proc.stdout.splitlines()
    assert message.startswith("teacher.pretrained: cannot load 'CompVis/stable-diffusion-v1-4' (OSError: ")
    assert message.endswith("see README: Running the paper profile")
    assert not (tmp_path / "t").exists()


# ---------------------------------------------------------------- one real SDS step at full size (GPU only)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("repo", list(TEACHERS))
def test_one_full_size_sds_step_on_gpu(repo, tmp_path):
    """ViT-B/16 at 224 px, batch 32, h_w -> the full latent, the full UNet, L_CLIP + lambda L_SDS, one AdamW
    step over the LayerNorm scope (random weights), through the trainer's own `setup` / `loss_step` with the
    default compute section (the fast path on CUDA). Prints the step time and peak memory:
    `pytest -m gpu tests/test_paper_models.py -s`."""
    import time

    from PIL import Image

    from pipeline import train
    from pipeline.config import ComputeConfig, ObjectiveConfig, TrainConfig
    from pipeline.data.records import ImageCaption

    device = torch.device("cuda")
    teacher = paper.random_teacher(repo, device="cpu", parts=("unet", "text_encoder"))  # the VAE stays on meta
    student = paper.random_student("ViT-B-16-quickgelu", "openai", device="cpu")
    batch = 32
    captions = [f"a photo of thing number {i}" for i in range(batch)]
    Image.new("RGB", (224, 224), (120, 80, 40)).save(tmp_path / "image.png")
    pairs = [ImageCaption(tmp_path / "image.png", c) for c in captions]
    with torch.no_grad():
        ids = teacher.tokenizer(captions, padding="max_length", max_length=77, truncation=True,
                                return_tensors="pt").input_ids
        conditioning = cache_table(tmp_path, "text", captions, teacher.text_encoder(ids)[0])
    trial = train.setup(TrainConfig(batch_size=batch, steps=10, lr=5e-5), ObjectiveConfig(lambda_sds=1e-3), student,
                        pairs, teacher, conditioning, compute=ComputeConfig(device="cuda"))
    tokens, rows = student.tokenizer(captions), torch.arange(batch)
    teacher.scheduler.alphas_cumprod = teacher.scheduler.alphas_cumprod.to(device)

    def step():
        images = torch.randn(batch, 3, 224, 224)
        losses = train.loss_step(trial, images, tokens, tokens, rows, rows)
        trial.optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        trial.optimizer.step()
        return float(losses["total"])

    step()  # warm-up (compilation, kernels, allocator)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    losses = [step() for _ in range(3)]
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / 3
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"\n{repo}: SDS step, ViT-B/16, batch {batch}, latent {teacher.latent_shape}, {trial.fast.describe()}: "
          f"{seconds:.3f} s/step, peak {peak:.1f} GiB on {torch.cuda.get_device_name()}")
    assert all(math.isfinite(v) for v in losses)
