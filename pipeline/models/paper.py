"""The paper's students and teachers: open_clip tags and diffusers repos, resolved into `models/`.

The models stage (`pipeline.models.build`) calls `import_teacher` and `import_student` for
`source: pretrained`: each resolves a hub id or tag (downloading through diffusers /
open_clip into their usual caches) or a local folder/file, and writes the result into
`models/` in the layout the toy models use, so every later stage loads from `models/`
only, through the same loaders:
- teacher -> models/teacher/: Stable Diffusion's diffusers layout (unet, vae,
  text_encoder, tokenizer, scheduler as DDPM with the repo's betas and prediction type),
  stored in `teacher.dtype`. A full copy: ~4.3 GB for v1-4 in float32 (~2.2 GB in
  float16), ~5.2 GB for v2-1; the safety checker and the EMA/ckpt files are not copied.
- student -> models/students/<name>/: open_clip's hub layout (open_clip_config.json with
  the model config and the weights' own preprocessing, open_clip_model.safetensors),
  loaded back with open_clip's `local-dir:` schema. 0.4 GB (RN50) to 1.7 GB (ViT-L/14).

`random_teacher` / `random_student` build the same architectures at full size with random
weights and no download (on the meta device, or on the CPU with parameters filled from a
seeded random bank), for the tests and for dry runs. The SD configs below restate the
repos' `*/config.json` (the fields that shape the networks).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import torch
from torch import nn

from pipeline.data.errors import MissingInput
from pipeline.data.paper import HUB_ID, README_HINT, first_line, resolve_path
from pipeline.config import StudentConfig, TeacherConfig
from pipeline.models.student import CONFIG_NAME, Student, layernorm_parameters, load_student, save_student
from pipeline.models.teacher import SD_SCHEDULE, Teacher, clip_bpe_tokenizer, load_teacher, save_teacher

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

SD_V1_4 = "CompVis/stable-diffusion-v1-4"
SD_V2_1 = "stabilityai/stable-diffusion-2-1"
_SD_UNET = {
    "act_fn": "silu", "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
_SD_VAE = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
TEACHER_CONFIGS = {
    SD_V1_4: {  # 512 px, epsilon prediction, CLIP ViT-L/14 text encoder
        "unet": {**_SD_UNET, "attention_head_dim": 8, "cross_attention_dim": 768, "sample_size": 64},
        "vae": {**_SD_VAE, "sample_size": 512},
        "text_encoder": {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                         "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                         "projection_dim": 768},
        "prediction_type": "epsilon",
    },
    SD_V2_1: {  # 768 px, v-prediction, OpenCLIP ViT-H/14 text encoder (its penultimate layer: 23 layers)
        "unet": {**_SD_UNET, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024, "sample_size": 96,
                 "use_linear_projection": True, "upcast_attention": True},
        "vae": {**_SD_VAE, "sample_size": 768},
        "text_encoder": {"vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
                         "num_attention_heads": 16, "max_position_embeddings": 77, "hidden_act": "gelu",
                         "projection_dim": 512},
        "prediction_type": "v_prediction",
    },
}


class PaperModelMissing(MissingInput):
    """A model the paper profile names cannot be found or fetched; one line ending in the README hint."""


# ---------------------------------------------------------------- the models stage


def import_teacher(cfg: TeacherConfig, folder: Path, base: Path) -> dict:
    """Load `teacher.pretrained` (repo id or local folder) in `teacher.dtype`; save it to `folder`."""
    source = _source(cfg.pretrained, base, "teacher.pretrained", "a diffusers repo id or a Stable Diffusion folder")
    try:
        teacher = load_teacher(source, DTYPES[cfg.dtype])
    except OSError as err:  # not found, offline, gated, incomplete download: one line for the user
        raise PaperModelMissing(f"teacher.pretrained: cannot load {cfg.pretrained!r} ({type(err).__name__}: "
                                f"{first_line(err)}); {README_HINT}") from None
    save_teacher(teacher, folder)
    return {
        "source": cfg.pretrained,
        "dtype": cfg.dtype,
        "prediction_type": teacher.scheduler.config.prediction_type,
        "latent_shape": list(teacher.latent_shape),
        "resolution": teacher.resolution,
        "scaling_factor": teacher.scaling_factor,
        "unet_parameters": sum(p.numel() for p in teacher.unet.parameters()),
    }


def import_student(name: str, cfg: StudentConfig, folder: Path, base: Path,
                   latent_shape: tuple[int, ...] | None = None) -> dict:
    """Load an open_clip model + pretrained tag, checkpoint file or hub folder; save it to `folder`."""
    import open_clip

    key = f"students.{name}"
    local = _local(cfg.pretrained, base)
    if local is not None and local.is_dir():
        if not (local / CONFIG_NAME).is_file():
            raise PaperModelMissing(f"{key}.pretrained: {local} holds no {CONFIG_NAME} (open_clip's hub layout); "
                                    f"{README_HINT}")
        student = load_student(local)
    else:
        if cfg.model not in open_clip.list_models():
            raise PaperModelMissing(f"{key}.model: {cfg.model!r} is not an open_clip model name; {README_HINT}")
        tags = open_clip.list_pretrained_tags_by_model(cfg.model)
        if local is None and cfg.pretrained not in tags:
            raise PaperModelMissing(f"{key}.pretrained: {cfg.pretrained!r} is neither a pretrained tag of "
                                    f"{cfg.model} ({', '.join(tags) or 'none'}) nor a file or folder; {README_HINT}")
        try:
            student = _load_tagged(cfg.model, str(local) if local is not None else cfg.pretrained)
        except RuntimeError as err:
            if local is not None or "download" not in str(err).lower():
                raise
            raise PaperModelMissing(f"{key}.pretrained: cannot fetch {cfg.model} / {cfg.pretrained} "
                                    f"({first_line(err)}); {README_HINT}") from None
    save_student(student, folder, preprocess_cfg=_preprocess_cfg(student.model))
    saved = load_student(folder)  # open_clip loads strictly: every tensor found again
    summary = {
        "model": cfg.model, "pretrained": cfg.pretrained,
        "parameters": sum(p.numel() for p in saved.model.parameters()),
        "embed_dim": int(saved.model_cfg["embed_dim"]),
        "image_size": _preprocess_cfg(saved.model)["size"],
        "layernorm_parameters": sum(p.numel() for p in layernorm_parameters(saved.model)),
    }
    if latent_shape is not None:
        summary["layernorm_scope"] = layernorm_scope_count(saved.model, summary["embed_dim"], latent_shape)
    return summary


def _load_tagged(model_name: str, pretrained: str) -> Student:
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
    return Student(model, open_clip.get_tokenizer(model_name), preprocess,
                   copy.deepcopy(open_clip.get_model_config(model_name)))


def _preprocess_cfg(model: nn.Module) -> dict:
    """The weights' own image preprocessing as open_clip settled it (size, mean, std, interpolation, resize)."""
    cfg = dict(getattr(model.visual, "preprocess_cfg", None) or {})
    return json.loads(json.dumps(cfg))  # tuples -> lists, as the config file holds them


def _local(value: str, base: Path) -> Path | None:
    path = resolve_path(value, base)
    return path if path.exists() else None


def _source(value: str, base: Path, key: str, what: str) -> str:
    """A local path (resolved) when one exists, else the value as a hub id; else PaperModelMissing."""
    local = _local(value, base)
    if local is not None:
        return str(local.resolve())
    if HUB_ID.match(value) and not value.startswith("."):
        return value
    raise PaperModelMissing(f"{key}: {value!r} not found ({what}); {README_HINT}")


def layernorm_scope_count(model: nn.Module, embed_dim: int, latent_shape: tuple[int, ...]) -> int:
    """Trainable parameters of the paper's setting: every LayerNorm of the student plus h_w."""
    outputs = math.prod(latent_shape)
    return sum(p.numel() for p in layernorm_parameters(model)) + embed_dim * outputs + outputs


# ---------------------------------------------------------------- full-size architectures, random weights


def fill_random_(module: nn.Module, seed: int = 0, std: float = 0.02) -> nn.Module:
    """Give every parameter still on the meta device CPU storage with seeded random values.

    Norm layers get weight 1 and bias 0, other biases 0, everything else values from a
    1M-entry normal bank (times `std`) copied with a per-tensor offset: full-size networks
    fill in about a second where a real initialisation takes tens. Buffers are untouched
    (build with `accelerate.init_empty_weights(include_buffers=False)` so they are real).
    """
    generator = torch.Generator().manual_seed(seed)
    size = 1 << 20
    bank = torch.randn(size, generator=generator) * std
    bank = torch.cat([bank, bank])  # any window of `size` values starting below `size`
    done: dict[int, nn.Parameter] = {}
    norms = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
    for count, module_ in enumerate(module.modules()):
        for name, param in list(module_._parameters.items()):
            if param is None or not param.is_meta:
                continue
            if id(param) in done:
                module_._parameters[name] = done[id(param)]
                continue
            data = torch.empty(param.shape, dtype=param.dtype)
            if isinstance(module_, norms) or getattr(module_, "_is_norm", False):
                data.fill_(1.0 if name == "weight" else 0.0)
            elif name == "bias":
                data.zero_()
            else:
                flat = data.view(-1)
                offset = (count * 7919 + len(done) * 104729) % size
                for start in range(0, flat.numel(), size):
                    chunk = flat[start:start + size]
                    chunk.copy_(bank[offset:offset + chunk.numel()])
            new = nn.Parameter(data, requires_grad=param.requires_grad)
            module_._parameters[name] = new
            done[id(param)] = new
    return module


def _empty(factory):
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return factory()


def text_encoder_config(fields: dict):
    """transformers' CLIPTextConfig of a `TEACHER_CONFIGS[repo]["text_encoder"]` entry, or of one derived
    from it, with the special tokens of CLIP's BPE vocabulary (start, end; the end token also pads)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(**fields, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)


def random_teacher(repo: str = SD_V1_4, device: str = "meta", sample_size: int | None = None, seed: int = 0,
                   parts: tuple[str, ...] = ("unet", "vae", "text_encoder")) -> Teacher:
    """A full-size SD teacher with random weights (no download).

    `sample_size` overrides the UNet's latent size (e.g. 8 for a cheap forward with the real
    channels); on `device="cpu"` only `parts` get storage, the others stay on meta.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    spec = TEACHER_CONFIGS[repo]
    unet_cfg = {**spec["unet"], **({"sample_size": sample_size} if sample_size else {})}
    unet = _empty(lambda: UNet2DConditionModel(**unet_cfg))
    vae = _empty(lambda: AutoencoderKL(**spec["vae"]))
    text = _empty(lambda: CLIPTextModel(text_encoder_config(spec["text_encoder"])))
    modules = {"unet": unet, "vae": vae, "text_encoder": text}
    if device != "meta":
        for k, part in enumerate(parts):
            fill_random_(modules[part], seed + k)
    for module in modules.values():
        module.requires_grad_(False).eval()
    scheduler = DDPMScheduler(**SD_SCHEDULE, prediction_type=spec["prediction_type"])
    return Teacher(unet, vae, text, clip_bpe_tokenizer(spec["text_encoder"]["max_position_embeddings"]), scheduler)


def random_student(model_name: str, pretrained: str = "", device: str = "meta", seed: int = 0) -> Student:
    """A full-size open_clip student with random weights; preprocessing as open_clip sets it for the tag."""
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

    model_cfg = copy.deepcopy(open_clip.get_model_config(model_name))
    if model_cfg is None:
        raise ValueError(f"{model_name!r} is not an open_clip model name")
    build_cfg = copy.deepcopy(model_cfg)
    custom_text = build_cfg.pop("custom_text", False)
    cls = open_clip.CoCa if "multimodal_cfg" in build_cfg else open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    model = _empty(lambda: cls(**build_cfg))
    if device != "meta":
        fill_random_(model, seed)
    preprocess_cfg = dataclasses.asdict(PreprocessCfg())
    if pretrained:
        preprocess_cfg = merge_preprocess_dict(preprocess_cfg, open_clip.get_pretrained_cfg(model_name, pretrained))
    preprocess_cfg["size"] = model.visual.image_size
    preprocess = image_transform_v2(PreprocessCfg(**preprocess_cfg), is_train=False)
    return Student(model, open_clip.get_tokenizer(model_name), preprocess, model_cfg)
