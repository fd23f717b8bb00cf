"""CLIP students through open_clip: a small config for the toy world, any open_clip tag for the paper.

A student is saved in open_clip's own hub layout (`open_clip_config.json` +
`open_clip_model.safetensors`) and loaded back with the `local-dir:` schema, so a trained
toy student and a downloaded OpenAI/LAION one go through the same loading code.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import open_clip
import torch
from safetensors.torch import save_file
from torch import nn
from torchvision.transforms import Normalize

from pipeline.data.errors import MissingInput
from pipeline.config import StudentConfig
from pipeline.io import atomic_dir, write_json

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"


@dataclass
class Student:
    model: nn.Module
    tokenizer: Callable[[list[str]], torch.Tensor]
    preprocess: Callable  # PIL image -> normalised tensor (open_clip's eval transform)
    model_cfg: dict


def toy_model_cfg(cfg: StudentConfig, image_size: int) -> dict:
    """open_clip model config of a small ViT student sized for the toy world."""
    return {
        "embed_dim": cfg.embed_dim,
        "vision_cfg": {"image_size": image_size, "layers": cfg.vision_layers, "width": cfg.vision_width,
                       "head_width": cfg.vision_width // cfg.vision_heads, "patch_size": cfg.patch_size},
        "text_cfg": {"context_length": cfg.context_length, "vocab_size": 49408, "width": cfg.text_width,
                     "heads": cfg.text_heads, "layers": cfg.text_layers},
    }


def build_toy_student(cfg: StudentConfig, image_size: int) -> Student:
    """A randomly initialised student from `toy_model_cfg` (seeded by cfg.seed)."""
    model_cfg = toy_model_cfg(cfg, image_size)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        model = open_clip.CLIP(**model_cfg)
    preprocess = open_clip.image_transform(image_size, is_train=False)
    tokenizer = open_clip.SimpleTokenizer(context_length=cfg.context_length)
    return Student(model, tokenizer, preprocess, model_cfg)


def save_student(student: Student, folder: Path, preprocess_cfg: dict | None = None) -> None:
    """Write the open_clip hub layout atomically (the folder appears only when complete).

    `preprocess_cfg` (open_clip's keys: size, mean, std, interpolation, resize_mode, ...)
    defaults to OpenAI's mean and std; pretrained students pass their weights' own.
    """
    with atomic_dir(folder) as tmp:
        state = {k: v.contiguous() for k, v in student.model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_NAME))
        if preprocess_cfg is None:
            preprocess_cfg = {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD)}
        write_json(tmp / CONFIG_NAME, {"model_cfg": student.model_cfg, "preprocess_cfg": preprocess_cfg})


def load_student(folder: Path) -> Student:
    """A student saved by `save_student` (or any open_clip hub folder)."""
    folder = Path(folder)
    if not (folder / CONFIG_NAME).is_file():
        raise MissingInput(f"{folder}: no {CONFIG_NAME}; run the models stage first")
    name = f"local-dir:{folder.resolve()}"
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    model_cfg = json.loads((folder / CONFIG_NAME).read_text())["model_cfg"]
    return Student(model, open_clip.get_tokenizer(name), preprocess, model_cfg)


# Parts of a student its contrastive embeddings never run: CoCa's captioning decoder. A LayerNorm
# there would count as trained (half of CoCa's) and never get a gradient.
NOT_CONTRASTIVE = ("text_decoder",)


def layernorm_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every LayerNorm weight and bias of both towers (the paper's fine-tuned set)."""
    skipped = {id(m) for name in NOT_CONTRASTIVE if isinstance(getattr(model, name, None), nn.Module)
               for m in getattr(model, name).modules()}
    return [p for m in model.modules() if isinstance(m, nn.LayerNorm) and id(m) not in skipped
            for p in m.parameters(recurse=False)]


def embed_dim(student: Student) -> int:
    return int(student.model_cfg["embed_dim"])


def normalization(student: Student) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean and std its preprocess normalises pixels with (what an augmentation of its inputs undoes)."""
    found = [t for t in getattr(student.preprocess, "transforms", []) if isinstance(t, Normalize)]
    if len(found) != 1:
        raise ValueError(f"the student's preprocess has {len(found)} Normalize transforms; expected one")
    return tuple(found[0].mean), tuple(found[0].std)


def has_patch_tokens(model: nn.Module) -> bool:
    """Whether the image tower is a ViT (patch tokens beside its CLS embedding)."""
    return isinstance(getattr(model, "visual", None), open_clip.transformer.VisionTransformer)


def image_tokens(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the pooled image embedding [B, E] as `encode_image` gives it before normalisation, the patch
    tokens [B, N, E]) of a ViT student: the patch tokens after the tower's final LayerNorm and
    through its output projection, as the CLS token goes (DIVA's construction)."""
    visual = model.visual
    before = visual.output_tokens
    visual.output_tokens = True
    try:
        pooled, tokens = visual(images)
    finally:
        visual.output_tokens = before
    if visual.proj is not None:
        tokens = tokens @ visual.proj
    return pooled, tokens
