"""The zero-shot suite of the paper's Fig. 2 through torchvision's dataset classes.

Each set's test split (ImageNet: the ILSVRC2012 validation set) is read with torchvision
from the user's root, in torchvision's own layout and checks (md5 where torchvision checks
one; download stays off), and materialised in the ImageFolder + zeroshot.json layout of
`pipeline.data.zeroshot`, so the later stages score it like every other zero-shot set:
file-backed sets (ImageNet, Food101, Pets, Flowers102, DTD, FGVC Aircraft) as symbolic
links to the user's files, array-backed ones (CIFAR-10/100, MNIST, STL-10) as PNGs.

Class names and prompt templates follow LAION's CLIP_benchmark (the de-facto reference
for these numbers): ImageNet's are OpenAI's 1000 names and 80 templates from open_clip;
Flowers102 and MNIST names and every other set's templates are CLIP_benchmark's
(`zeroshot_prompts.json`); the rest use torchvision's own class names (Food101 with "_"
read as a space). Labels are torchvision's.
"""
from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path

from tqdm import tqdm

from pipeline.config import ZEROSHOT_SETS
from pipeline.io import write_json
from .errors import DataFormatError
from .zeroshot import IMAGE_EXTENSIONS, META_FILE, _slug

PROMPTS_FILE = Path(__file__).with_name("zeroshot_prompts.json")


def open_test_split(name: str, root: Path):
    """The torchvision dataset object of `name`'s test split under `root` (never downloads)."""
    from torchvision import datasets as tv

    root = str(root)
    builders = {
        "imagenet": lambda: tv.ImageNet(os.path.join(root, "imagenet"), split="val"),
        "cifar10": lambda: tv.CIFAR10(root, train=False, download=False),
        "cifar100": lambda: tv.CIFAR100(root, train=False, download=False),
        "mnist": lambda: tv.MNIST(root, train=False, download=False),
        "stl10": lambda: tv.STL10(root, split="test", download=False),
        "food101": lambda: tv.Food101(root, split="test", download=False),
        "pets": lambda: tv.OxfordIIITPet(root, split="test", target_types="category", download=False),
        "flowers102": lambda: tv.Flowers102(root, split="test", download=False),
        "dtd": lambda: tv.DTD(root, split="test", partition=1, download=False),
        "fgvc_aircraft": lambda: tv.FGVCAircraft(root, split="test", annotation_level="variant", download=False),
    }
    if name not in builders:
        raise ValueError(f"unknown zero-shot set {name!r}; known: {', '.join(ZEROSHOT_SETS)}")
    try:
        return builders[name]()
    except (RuntimeError, OSError, ValueError, KeyError) as err:
        message = " ".join(str(err).split())[:200]
        raise DataFormatError(Path(root), "", None, f"torchvision cannot read the {name} test split "
                              f"({type(err).__name__}: {message}); see README: Running the paper profile") from None


@cache
def _prompts() -> dict:
    return json.loads(PROMPTS_FILE.read_text(encoding="utf-8"))


def templates(name: str) -> list[str]:
    """Prompt templates with one "{}" for the class name."""
    if name == "imagenet":
        from open_clip import OPENAI_IMAGENET_TEMPLATES

        return [template("{}") for template in OPENAI_IMAGENET_TEMPLATES]
    return list(_prompts()["templates"][name])


def classnames(name: str, dataset) -> list[str]:
    """Prompt names in label order."""
    if name == "imagenet":
        from open_clip import IMAGENET_CLASSNAMES

        return list(IMAGENET_CLASSNAMES)
    if name in _prompts()["classnames"]:
        return list(_prompts()["classnames"][name])
    if name == "food101":
        return [c.replace("_", " ") for c in dataset.classes]
    return list(dataset.classes)


def samples(dataset) -> list[tuple[Path | None, int]]:
    """(image file or None when the pixels are in memory, label) per test image, in dataset order."""
    if hasattr(dataset, "samples"):  # ImageFolder-based (ImageNet)
        return [(Path(path), int(label)) for path, label in dataset.samples]
    files = getattr(dataset, "_image_files", None)
    if files is None:
        files = getattr(dataset, "_images", None)
    labels = getattr(dataset, "_labels", None)
    if files is not None and labels is not None and len(files) == len(labels) == len(dataset):
        return [(Path(path), int(label)) for path, label in zip(files, labels)]
    labels = getattr(dataset, "targets", None)
    if labels is None:
        labels = getattr(dataset, "labels", None)
    if labels is None:
        return [(None, int(dataset[i][1])) for i in range(len(dataset))]
    return [(None, int(label)) for label in labels]


def materialise(name: str, root: Path, out: Path) -> int:
    """Write `name`'s test split under `out` as ImageFolder + zeroshot.json; returns the image count."""
    dataset = open_test_split(name, root)
    names = classnames(name, dataset)
    items = samples(dataset)
    where = Path(root)
    if name == "imagenet" and len(dataset.classes) != len(names):
        raise DataFormatError(where / "imagenet", "", None, f"has {len(dataset.classes)} classes; OpenAI's "
                              f"ImageNet class names need the {len(names)} of ILSVRC2012")
    present = {label for _, label in items}
    outside = sorted(label for label in present if not 0 <= label < len(names))
    if outside:
        raise DataFormatError(where, "", None, f"{name}: label {outside[0]} has no class name ({len(names)} names)")
    empty = [names[label] for label in range(len(names)) if label not in present]
    if empty:
        raise DataFormatError(where, "", None, f"{name}: class {empty[0]!r} has no test image")
    width = len(str(len(names) - 1))
    folders = [f"{label:0{width}d}_{_slug(classname)}" for label, classname in enumerate(names)]
    for folder in folders:
        (out / folder).mkdir(parents=True)
    image_width = len(str(len(items) - 1))
    for i, (path, label) in enumerate(tqdm(items, desc=f"zero-shot {name}", leave=False)):
        stem = out / folders[label] / f"{i:0{image_width}d}"
        if path is not None:
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                raise DataFormatError(path, "", None, f"{name}: not an image file ImageFolder reads")
            os.symlink(path.resolve(), stem.with_suffix(path.suffix))
        else:
            image = dataset[i][0]
            image.save(stem.with_suffix(".png"), format="PNG")
    write_json(out / META_FILE, {"name": name, "classnames": dict(zip(folders, names)), "templates": templates(name)})
    return len(items)
