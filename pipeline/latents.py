"""The cache stage: teacher latents of every image and teacher conditioning of every text.

Tables (see `pipeline.cache`): `train_images` / `bench_images` hold scaled VAE latent
means keyed by `image_key` (a path relative to the data root or the project), `train_text` /
`bench_text` hold the text encoder's last hidden states keyed by the caption itself ("" included,
for the unconditional term). Nothing a table holds names the folder the project lies in, so
checkouts in different folders build byte-identical tables.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torchvision.transforms as T

from pipeline.cache import write_table
from pipeline.config import Config
from pipeline.data.datasets import benchmarks, read_index, train_pairs
from pipeline.data.records import load_image
from pipeline.digest import files_digest
from pipeline.data.keys import choice_pairs, image_key, mmvp_pairs, parse_image_key, winoground_pairs
from pipeline.models.teacher import Teacher, encode_images, encode_text


# Raised whenever the code that makes a kind of table's rows changes: a table of the same teacher
# and inputs that other code wrote is then rebuilt, not kept, and the other kind's are not.
# Image tables (`vae_transform`, `encode_images`' scaling); 2: benchmark images squashed whole, not
# centre-cropped, at the UNet's resolution.
IMAGE_ENCODING = 2
TEXT_ENCODING = 1         # text tables (`encode_text`'s padding and hidden state)


def vae_transform(size: int, crop: bool = True) -> T.Compose:
    """SD's input at the teacher's resolution, scaled to [-1, 1]: the shorter side resized and the
    centre cropped, as SD trained (`crop`), or the whole image resized to a square, as the diffusion
    score's reference (Krojer et al.'s diffusion-itm) resizes a benchmark image: a crop would drop what
    lies at the edges of a wide image (CLEVR's 480 x 320 scenes lose a sixth on each side)."""
    resize = [T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size)] if crop else \
        [T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC)]
    return T.Compose([*resize, T.ToTensor(), T.Normalize([0.5], [0.5])])


def image_latents(teacher: Teacher, size: int, crop: bool = True):
    transform = vae_transform(size, crop)

    def compute(keys: list[str]) -> torch.Tensor:
        pixels = torch.stack([transform(load_image(*parse_image_key(k))) for k in keys])
        return encode_images(teacher, pixels)
    return compute


def text_conditioning(teacher: Teacher):
    return lambda texts: encode_text(teacher, texts)


def table_keys(data_root: Path) -> dict[str, list[str]]:
    """Each table's keys, in row order: the distinct image keys and captions of the training
    pairs and of the benchmarks the diffusion score reads ("" included, for the unconditional term)."""
    index = read_index(data_root)
    pairs = train_pairs(data_root, index)
    bench = benchmarks(data_root, index)
    bench_images, bench_texts = winoground_pairs(bench.winoground)
    for images, texts in [choice_pairs(cases) for cases in (*bench.aro.values(), *bench.sugarcrepe.values(),
                                                             *bench.clevr.values())] + [mmvp_pairs(bench.mmvp)]:
        bench_images += images
        bench_texts += texts
    return {"train_images": list(dict.fromkeys(image_key(p.image) for p in pairs)),
            "bench_images": list(dict.fromkeys(bench_images)),
            # "" (the empty caption): diffusion feedback's conditioning, to which the student's tokens are added.
            "train_text": list(dict.fromkeys(["", *(p.caption for p in pairs)])),
            "bench_text": list(dict.fromkeys(["", *bench_texts]))}


def build_cache(cfg: Config, teacher: Teacher, teacher_id: str, data_root: Path, out: Path) -> None:
    """Every table, rebuilt when what determines its rows changed (see `pipeline.cache`).

    Each table's meta holds `teacher_id` (a fingerprint of the teacher's files), the device type it
    was encoded on (a GPU's convolutions round otherwise) and its kind's encoding version
    (`IMAGE_ENCODING`, `TEXT_ENCODING`).
    An image table's meta also holds a digest of its image files: rows are keyed by name, and
    the data stage writes the same names for other images (the toy world under another seed
    or size). A text table's keys are its captions.
    """
    size = teacher.resolution
    c = cfg.cache
    made = {"teacher": teacher_id, "device": teacher.vae.device.type}
    for name, keys in table_keys(data_root).items():
        if name.endswith("_images"):
            compute = image_latents(teacher, size, crop=name == "train_images")
            meta = {**made, "encoding": IMAGE_ENCODING, "images": _images_digest(keys)}
        else:
            compute, meta = text_conditioning(teacher), {**made, "encoding": TEXT_ENCODING}
        write_table(out, name, keys, compute, shard_size=c.shard_size, batch_size=c.batch_size, description=name,
                    meta=meta)


def _images_digest(keys: list[str]) -> str:
    """A digest of the image files' bytes in key order. Their names are the keys, which the table's
    settings hold already; an absolute path here would differ between checkouts."""
    files = dict.fromkeys(parse_image_key(key)[0] for key in keys)   # crops share their image file
    return files_digest(files)
