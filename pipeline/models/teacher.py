"""The text-to-image latent diffusion teacher, in Stable Diffusion's diffusers layout.

A teacher folder holds `unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/` and
`model_index.json`, exactly like a Stable Diffusion repo, so the toy teacher trained here
and CompVis/stable-diffusion-v1-4 load through the same `load_teacher`.
"""
from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from pipeline.data.errors import MissingInput
from pipeline.config import TeacherConfig, norm_groups
from pipeline.io import atomic_dir, write_json

# Stable Diffusion's noise schedule; diffusers' DDPMScheduler defaults differ.
SD_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
               "beta_schedule": "scaled_linear", "clip_sample": False}


@dataclass
class Teacher:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDPMScheduler

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        return (self.unet.config.in_channels, size, size)

    @property
    def resolution(self) -> int:
        """The image side the UNet denoises at: its latent side times the VAE's downsampling, as diffusers'
        pipelines take it (a VAE's own `sample_size` can disagree: SD 2-1-base's says 768, its UNet's 512)."""
        return self.unet.config.sample_size * 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    def modules(self) -> list[nn.Module]:
        """The networks present (a benchmark or a test may build a teacher of its UNet alone)."""
        return [m for m in (self.unet, self.vae, self.text_encoder) if m is not None]

    def to(self, device: torch.device | str) -> "Teacher":
        """Move the networks (not the scheduler's tables, which follow their inputs) to `device`."""
        for module in self.modules():
            module.to(device)
        return self


def clip_bpe_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's BPE vocabulary and merges, from the file open_clip ships (no download).

    OpenAI CLIP, open_clip and Stable Diffusion's tokenizer share this vocabulary; only
    the special-token spelling differs, and SD's spelling is used here.
    """
    bpe = Path(open_clip.__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.open(bpe).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines]
    byte_symbols = list(open_clip.tokenizer.bytes_to_unicode().values())
    symbols = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m) for m in merges]
    symbols += ["<|startoftext|>", "<|endoftext|>"]
    return {s: i for i, s in enumerate(symbols)}, merges


def clip_bpe_tokenizer(max_length: int) -> CLIPTokenizer:
    """CLIP's BPE tokenizer (`clip_bpe_vocab`) padding and truncating to `max_length` tokens."""
    vocab, merges = clip_bpe_vocab()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def build_toy_teacher(cfg: TeacherConfig, image_size: int) -> Teacher:
    """Randomly initialised small components with SD's architecture families."""
    down = len(cfg.vae_channels) - 1
    latent_size = image_size // 2**down
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=cfg.latent_channels,
            down_block_types=("DownEncoderBlock2D",) * len(cfg.vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(cfg.vae_channels),
            block_out_channels=tuple(cfg.vae_channels), layers_per_block=1,
            norm_num_groups=norm_groups(cfg.vae_channels), sample_size=image_size,
            # Set after training from the latents' spread, as SD's 0.18215 was.
            scaling_factor=1.0,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=cfg.text_width, intermediate_size=4 * cfg.text_width,
            num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
            max_position_embeddings=cfg.max_length, projection_dim=cfg.text_width,
            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        ))
        n = len(cfg.unet_channels)
        unet = UNet2DConditionModel(
            sample_size=latent_size, in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
            down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
            block_out_channels=tuple(cfg.unet_channels), layers_per_block=1,
            cross_attention_dim=cfg.text_width, attention_head_dim=cfg.unet_heads,
            norm_num_groups=norm_groups(cfg.unet_channels),
        )
    scheduler = DDPMScheduler(**SD_SCHEDULE, prediction_type=cfg.prediction_type)
    return Teacher(unet, vae, text_encoder, clip_bpe_tokenizer(cfg.max_length), scheduler)


def save_teacher(teacher: Teacher, folder: Path) -> None:
    """Write the Stable Diffusion folder layout atomically."""
    with atomic_dir(folder) as tmp:
        for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            getattr(teacher, name).save_pretrained(tmp / name)
        write_json(tmp / "model_index.json", {
            "_class_name": "StableDiffusionPipeline",
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", "DDPMScheduler"],
            "safety_checker": [None, None], "feature_extractor": [None, None],
            "requires_safety_checker": False,
        })


def load_teacher(source: str | Path, dtype: torch.dtype = torch.float32) -> Teacher:
    """A teacher from a diffusers repo id (a str) or a local folder in the Stable Diffusion layout
    (a str, or a Path: the models stage's folder, never looked up on the hub when it is missing).

    The scheduler is always DDPM with the folder's own betas and prediction type
    (SD repos ship a PNDM config; training and scoring need the DDPM forward process).
    """
    if isinstance(source, Path) and not source.is_dir():
        raise MissingInput(f"{source}: not a folder; run the models stage first")
    src = str(source)
    if Path(src).exists() and not (Path(src) / "model_index.json").is_file():
        raise MissingInput(f"{src}: not a diffusers folder (no model_index.json)")
    unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet", torch_dtype=dtype)
    vae = AutoencoderKL.from_pretrained(src, subfolder="vae", torch_dtype=dtype)
    text_encoder = CLIPTextModel.from_pretrained(src, subfolder="text_encoder", torch_dtype=dtype)
    tokenizer = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer")
    scheduler = DDPMScheduler.from_pretrained(src, subfolder="scheduler")
    teacher = Teacher(unet, vae, text_encoder, tokenizer, scheduler)
    for module in teacher.modules():
        module.requires_grad_(False).eval()
    return teacher


def encode_text(teacher: Teacher, captions: list[str], grad: bool = False) -> torch.Tensor:
    """The UNet's cross-attention conditioning: last hidden states, padded to max length
    (differentiable with `grad`: the toy teacher's text encoder trains along with its UNet)."""
    tokens = teacher.tokenizer(captions, padding="max_length", truncation=True,
                               max_length=teacher.tokenizer.model_max_length, return_tensors="pt")
    with torch.set_grad_enabled(grad):
        return teacher.text_encoder(tokens.input_ids.to(teacher.text_encoder.device))[0]


@torch.no_grad()
def encode_images(teacher: Teacher, pixels: torch.Tensor) -> torch.Tensor:
    """Scaled latent means of images in [-1, 1] (what SD's training and scoring use).

    The pixels are moved to the VAE's device and dtype (a GPU or float16 teacher takes CPU
    float32 batches); the latents come back in float32 on that device.
    """
    pixels = pixels.to(device=teacher.vae.device, dtype=teacher.vae.dtype)
    return teacher.vae.encode(pixels).latent_dist.mean.float() * teacher.scaling_factor
