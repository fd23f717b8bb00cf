"""The paper profile's data: check the user's local copies first, then index or materialise them.

`check_paper_data` looks only at paths (no torch, torchvision, open_clip or diffusers
import), so `profile: paper` with nothing downloaded stops in well under a second with
one line: the first missing thing (config key, path, what it should hold), how many more
are missing, and "see README: Running the paper profile".

`build_paper` then writes `data/index.json` the later stages read through
`pipeline.data.datasets`, by the same readers the toy world goes through:
- COCO 2017 captions: the index points at the user's files (nothing copied).
- CC-3M: converted to the COCO captions layout (`pipeline.data.cc3m`).
- Winoground: a local copy in the hub repo's layout is linked into data/winoground
  (so the images.zip extraction cache lands in data/, not in the user's folder); a hub
  id is fetched with huggingface_hub (data/examples.jsonl + data/images.zip only). A copy
  or hub repo holding only the Parquet version (data/test-*.parquet) is written out in the
  release layout there (`winoground.release_from_parquet`).
- ARO: the index points at the user's JSON files and image folders; the order sets get
  each caption's part-of-speech tags, tagged in context by spaCy as ARO does
  (`tag_captions`, data/aro/<set>-tags.json), or a word lexicon from a JSON file.
- NegCLIP's hard negatives of every training caption (`aro.swap_negatives`, with the same
  tagger): data/train-negatives.json.
- Zero-shot: each torchvision set is materialised as an ImageFolder tree + zeroshot.json
  (`pipeline.data.torchvision_sets`).
- SugarCrepe, MMVP-VLM, CLEVR (GDBench's): the index points at the user's files, each read in
  its release's layout (`pipeline.data.sugarcrepe`, `.mmvp`, `.clevr`); an empty root leaves
  the benchmark out.
Every dataset is read back before the index is published, so a malformed record stops
the data stage, not a training run hours later.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipeline.config import DATA_DIR, ConfigError, DataConfig, load
from pipeline.data import clevr, mmvp, winoground
from pipeline.data.errors import DataFormatError, MissingInput, load_json, require_list, require_record, str_list_field
from pipeline.io import atomic_dir, write_json

README_HINT = "see README: Running the paper profile"
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
WINOGROUND_FILES = ("data/examples.jsonl", "data/images.zip")

# The files each ARO set is read from (the authors' release, and BLIP's Karpathy splits).
ARO_FILES = {
    "vg_relation": ("aro_root", "visual_genome_relation.json", "images"),
    "vg_attribution": ("aro_root", "visual_genome_attribution.json", "images"),
    "coco_order": ("coco_order_root", "coco_karpathy_test.json", "val2014"),
    "flickr_order": ("flickr_order_root", "flickr30k_test.json", "flickr30k-images"),
}
ARO_WHAT = {
    "vg_relation": "ARO VG-Relation",
    "vg_attribution": "ARO VG-Attribution",
    "coco_order": "COCO-Order (COCO 2014 val images + BLIP's Karpathy test split)",
    "flickr_order": "Flickr30k-Order (Flickr30k images + BLIP's Karpathy test split)",
}

# What torchvision reads for each zero-shot set's test split, relative to data.zeroshot_root.
# Alternatives are separated by "|" (ImageNet: the parsed folder or the archives).
ZEROSHOT_FILES = {
    "imagenet": ("imagenet/meta.bin|imagenet/ILSVRC2012_devkit_t12.tar.gz",
                 "imagenet/val|imagenet/ILSVRC2012_img_val.tar"),
    "cifar10": ("cifar-10-batches-py/test_batch", "cifar-10-batches-py/batches.meta"),
    "cifar100": ("cifar-100-python/test", "cifar-100-python/meta"),
    "mnist": ("MNIST/raw/t10k-images-idx3-ubyte", "MNIST/raw/t10k-labels-idx1-ubyte"),
    "stl10": ("stl10_binary/test_X.bin", "stl10_binary/test_y.bin"),
    "food101": ("food-101/meta/test.json", "food-101/images"),
    "pets": ("oxford-iiit-pet/annotations/test.txt", "oxford-iiit-pet/images"),
    "flowers102": ("flowers-102/setid.mat", "flowers-102/imagelabels.mat", "flowers-102/jpg"),
    "dtd": ("dtd/dtd/labels/test1.txt", "dtd/dtd/images"),
    "fgvc_aircraft": ("fgvc-aircraft-2013b/data/images_variant_test.txt", "fgvc-aircraft-2013b/data/images"),
}


class PaperDataMissing(MissingInput):
    """Something the paper profile needs is absent; the message is one line ending in the README hint."""


@dataclass(frozen=True)
class Problem:
    key: str      # the config key to fix, e.g. "data.coco_images"
    message: str  # "<path> not found (what it should be)"

    def line(self) -> str:
        return f"{self.key}: {self.message}"


def resolve_path(value: str, base: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else Path(base) / path


def is_hub_id(value: str, base: Path) -> bool:
    """owner/name that is not a local path (write ./owner/name for a relative local folder)."""
    return bool(HUB_ID.match(value)) and not value.startswith(".") and not resolve_path(value, base).exists()


def problems(cfg: DataConfig, base: Path) -> list[Problem]:
    """Every missing input of the paper profile, in the order the data stage needs them (paths only).

    A dataset inside `data/` counts as a problem too: the data stage replaces that folder.
    """
    found: list[Problem] = []
    out = (base / DATA_DIR).resolve()

    def need(key: str, value: str, relative: str, what: str, kind: str = "any") -> None:
        if not value:
            found.append(Problem(key, f"not set ({what})"))
            return
        root = resolve_path(value, base)
        if root.resolve().is_relative_to(out):
            found.append(Problem(key, f"{root} is inside {out}, which the data stage replaces; "
                                      "keep the datasets elsewhere"))
            return
        options = [root / r if r else root for r in relative.split("|")]
        checks = {"file": Path.is_file, "dir": Path.is_dir, "any": Path.exists}
        if not any(checks[kind](p) for p in options):
            names = " or ".join(str(p) for p in options)
            found.append(Problem(key, f"{names} not found ({what})"))

    if cfg.train_set == "coco":
        need("data.coco_annotations", cfg.coco_annotations, "", "COCO 2017 annotations/captions_train2017.json", "file")
        need("data.coco_images", cfg.coco_images, "", "COCO 2017 train2017/ image folder", "dir")
    else:
        need("data.cc3m", cfg.cc3m, "", "CC-3M: a TSV with filepath and title columns, or a folder of webdataset shards")

    if is_hub_id(cfg.winoground, base):
        if importlib.util.find_spec("huggingface_hub") is None:
            found.append(Problem("data.winoground", f"{cfg.winoground!r} is a hub id and the huggingface_hub package "
                                 "is not installed (pip install huggingface_hub, or give a local copy)"))
    elif cfg.winoground and winoground.parquet_files(resolve_path(cfg.winoground, base)):
        need("data.winoground", cfg.winoground, "", "Winoground: the hub repo's data/test-*.parquet", "dir")
    else:
        need("data.winoground", cfg.winoground, "data/examples.jsonl", "Winoground: the hub repo's data/examples.jsonl "
             "(or its Parquet version, data/test-*.parquet)", "file")
        need("data.winoground", cfg.winoground, "data/images.zip|data/images", "Winoground: data/images.zip")

    for name in cfg.aro_sets:
        key, annotations, images = ARO_FILES[name]
        value = getattr(cfg, key)
        need(f"data.{key}", value, annotations, f"{ARO_WHAT[name]}: {annotations}", "file")
        need(f"data.{key}", value, images, f"{ARO_WHAT[name]}: the {images}/ image folder", "dir")
    # The tagger of the order sets' shuffles, and of the training captions' hard negatives (NegCLIP).
    tagger = cfg.order_tagger
    if tagger.startswith("spacy:"):
        model = tagger.split(":", 1)[1]
        if importlib.util.find_spec("spacy") is None:
            found.append(Problem("data.order_tagger", f"{tagger!r} needs the spacy package (pip install spacy; "
                                 f"python -m spacy download {model}), or give a JSON lexicon file"))
        elif importlib.util.find_spec(model) is None:
            found.append(Problem("data.order_tagger", f"spaCy model {model!r} is not installed "
                                 f"(python -m spacy download {model})"))
    else:
        need("data.order_tagger", tagger, "", "part-of-speech lexicon JSON {word: UPOS tag}", "file")

    found += extra_problems(cfg, base, need)

    if cfg.zeroshot_sets:
        if not cfg.zeroshot_root or not resolve_path(cfg.zeroshot_root, base).is_dir():
            need("data.zeroshot_root", cfg.zeroshot_root, "", "torchvision dataset root", "dir")
        else:
            for name in cfg.zeroshot_sets:
                for relative in ZEROSHOT_FILES[name]:
                    need("data.zeroshot_root", cfg.zeroshot_root, relative, f"{name} test split in torchvision's layout")
    return found


def extra_problems(cfg: DataConfig, base: Path, need: Callable[..., None]) -> list[Problem]:
    """What SugarCrepe, MMVP-VLM and CLEVR need when their roots are set (through `need`, which
    records each missing path); problems `need` cannot see (MMVP's two folder spellings at once)."""
    found = []
    if cfg.sugarcrepe_root:
        for subset in cfg.sugarcrepe_subsets:
            need("data.sugarcrepe_root", cfg.sugarcrepe_root, f"{subset}.json",
                 f"SugarCrepe: the release's data/{subset}.json", "file")
        need("data.sugarcrepe_images", cfg.sugarcrepe_images, "", "COCO 2017 val2017/ image folder", "dir")
    if cfg.mmvp_root:
        need("data.mmvp_root", cfg.mmvp_root, mmvp.QUESTIONS, f"MMVP-VLM: {mmvp.QUESTIONS}", "file")
        need("data.mmvp_root", cfg.mmvp_root, "|".join(mmvp.IMAGE_DIRS), "MMVP-VLM: the image folder", "dir")
        root = resolve_path(cfg.mmvp_root, base)
        if all((root / name).is_dir() for name in mmvp.IMAGE_DIRS):
            found.append(Problem("data.mmvp_root", f"{root} holds both {' and '.join(repr(n) for n in mmvp.IMAGE_DIRS)}; "
                                                   "keep one"))
    if cfg.clevr_root:
        for subtask in cfg.clevr_subtasks:
            need("data.clevr_root", cfg.clevr_root, f"{clevr.CAPTIONS}/{subtask}.json",
                 f"CLEVR (GDBench): {clevr.CAPTIONS}/{subtask}.json", "file")
        need("data.clevr_root", cfg.clevr_root, clevr.IMAGES, f"CLEVR (GDBench): the {clevr.IMAGES}/ folder", "dir")
    return found


def check_paper_data(cfg: DataConfig, base: Path) -> None:
    """Raise PaperDataMissing (one line) unless every input of the paper profile is present."""
    found = problems(cfg, base)
    if found:
        more = f" [+{len(found) - 1} more missing]" if len(found) > 1 else ""
        raise PaperDataMissing(f"{found[0].line()}{more}; {README_HINT}")


def preflight(argv: list[str] | None = None) -> int | None:
    """The data stage's fast path: 2 (after one line on stderr) when the paper data is missing.

    None means "go on": the toy profile, every paper input present, or an argument or
    config error, which the full command line (`pipeline.cli.run`) then reports as usual.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        return None
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--params", default="params.yaml", type=Path)
    parser.add_argument("--profile")
    try:
        args, _ = parser.parse_known_args(argv)
        cfg = load(args.params, {"profile": args.profile} if args.profile else None)
    except (SystemExit, ConfigError):
        return None
    if cfg.data.source != "paper":
        return None
    try:
        check_paper_data(cfg.data, args.params.resolve().parent)
    except PaperDataMissing as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return None


# ---------------------------------------------------------------- building the index


def build_paper(cfg: DataConfig, out: Path, base: Path) -> dict:
    """Check, index and materialise the paper's datasets into `out` (replaced atomically); returns the index."""
    from pipeline.data.datasets import INDEX_NAME, benchmarks, train_pairs

    check_paper_data(cfg, base)
    tagging = Tagging(cfg, base)
    with atomic_dir(out) as root:
        index = {
            "source": "paper",
            "train": _train(cfg, base, root),
            "winoground": {"root": _winoground(cfg, base, root)},
            "aro": _aro(cfg, base, root, tagging),
            "zeroshot": _zeroshot(cfg, base, root),
            **_extra(cfg, base),
        }
        pairs = train_pairs(root, index, check_images=True)
        bench = benchmarks(root, index)
        index["train"]["negatives"] = _negatives(cfg, root, pairs, tagging)
        index["counts"] = {
            "train_pairs": len(pairs),
            "winoground": len(bench.winoground),
            **{f"aro/{name}": len(cases) for name, cases in bench.aro.items()},
            **{f"zeroshot/{shot.name}": len(shot.images) for shot in bench.zeroshot},
            **{f"sugarcrepe/{name}": len(cases) for name, cases in bench.sugarcrepe.items()},
            **({"mmvp": len(bench.mmvp)} if bench.mmvp else {}),
            **{f"clevr/{name}": len(cases) for name, cases in bench.clevr.items()},
        }
        write_json(root / INDEX_NAME, index)
    return index


def _train(cfg: DataConfig, base: Path, root: Path) -> dict:
    if cfg.train_set == "coco":
        return {"annotations": str(resolve_path(cfg.coco_annotations, base).resolve()),
                "images": str(resolve_path(cfg.coco_images, base).resolve()),
                "caption_choice": cfg.caption_choice, "seed": cfg.seed}
    from pipeline.data import cc3m

    annotations, images = cc3m.index_cc3m(resolve_path(cfg.cc3m, base).resolve(), root / "cc3m")
    return {"annotations": str(annotations.relative_to(root)),
            "images": str(images.relative_to(root)) if images.is_relative_to(root) else str(images),
            "caption_choice": cfg.caption_choice, "seed": cfg.seed}


def _winoground(cfg: DataConfig, base: Path, root: Path) -> str:
    """data/winoground in the hub repo's layout: links to a local copy, or the files fetched from the hub."""
    target = root / "winoground"
    if is_hub_id(cfg.winoground, base):
        fetch_winoground(cfg.winoground, target)
        return "winoground"
    source = resolve_path(cfg.winoground, base).resolve()
    (target / "data").mkdir(parents=True)
    if not (source / winoground.EXAMPLES).is_file():
        winoground.release_from_parquet(winoground.parquet_files(source), target)
        return "winoground"
    for name in ("data/examples.jsonl", "data/images.zip", "data/images"):
        if (source / name).exists():
            os.symlink(source / name, target / name)
    return "winoground"


def fetch_winoground(repo_id: str, target: Path) -> None:
    """The release files of a hub dataset repo (gated: needs `huggingface-cli login` or HF_TOKEN), else its
    Parquet version, written out in the release layout (the shards are deleted once read)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise PaperDataMissing(f"data.winoground: {repo_id!r} is a hub id and the huggingface_hub package is not "
                               f"installed; {README_HINT}") from None

    def fetch(patterns: list[str]) -> None:
        try:
            snapshot_download(repo_id=repo_id, repo_type="dataset", allow_patterns=patterns, local_dir=str(target))
        except Exception as err:  # offline, gated without a token, unknown repo: all one line for the user
            raise PaperDataMissing(f"data.winoground: cannot fetch {repo_id!r} from the Hugging Face hub "
                                   f"({type(err).__name__}: {first_line(err)}); {README_HINT}") from None

    fetch(list(WINOGROUND_FILES))
    missing = [name for name in WINOGROUND_FILES if not (target / name).is_file()]
    if not missing:
        return
    fetch([winoground.PARQUET])
    shards = winoground.parquet_files(target)
    if not shards:
        raise PaperDataMissing(f"data.winoground: the hub repo {repo_id!r} has no {missing[0]} and no "
                               f"{winoground.PARQUET}; {README_HINT}")
    winoground.release_from_parquet(shards, target)
    for shard in shards:
        shard.unlink()


def _aro(cfg: DataConfig, base: Path, out: Path, tagging: "Tagging") -> dict:
    sets = {}
    for name in cfg.aro_sets:
        key, annotations, images = ARO_FILES[name]
        root = resolve_path(getattr(cfg, key), base).resolve()
        if name.startswith("vg_"):
            sets[name] = {"annotations": str(root / annotations), "images": str(root / images)}
            continue
        path = root / annotations
        sets[name] = {"annotations": str(path), "images": str(root), "seed": cfg.seed}
        if tagging.in_context:
            tags = f"aro/{name}-tags.json"
            write_json(out / tags, tag_captions(karpathy_captions([path]), tagging.batch()))
            sets[name]["tags"] = tags
        else:
            sets[name]["lexicon"] = tagging.lexicon()
    return sets


def _negatives(cfg: DataConfig, root: Path, pairs: list, tagging: "Tagging") -> str:
    """NegCLIP's hard negatives of every training caption (`aro.swap_negatives`), drawn with a
    generator seeded by (data.seed, caption), as {caption: [negative, ...]} in data/."""
    from pipeline.data.aro import swap_negatives
    from pipeline.data.datasets import NEGATIVES

    captions = list(dict.fromkeys(pair.caption for pair in pairs))
    tagger = tagging.tagger(captions)
    table = {caption: swap_negatives(caption, tagger, random.Random(f"{cfg.seed}:{caption}")) for caption in captions}
    write_json(root / NEGATIVES, table)
    return NEGATIVES


def _extra(cfg: DataConfig, base: Path) -> dict:
    """Index entries of the benchmarks whose roots are set: the user's files, where they are."""
    where = lambda value: str(resolve_path(value, base).resolve())  # noqa: E731
    index = {}
    if cfg.sugarcrepe_root:
        index["sugarcrepe"] = {"annotations": where(cfg.sugarcrepe_root), "images": where(cfg.sugarcrepe_images),
                               "subsets": list(cfg.sugarcrepe_subsets)}
    if cfg.mmvp_root:
        index["mmvp"] = {"root": where(cfg.mmvp_root), "patterns": list(mmvp.PATTERNS)}
    if cfg.clevr_root:
        index["clevr"] = {"root": where(cfg.clevr_root), "subtasks": list(cfg.clevr_subtasks)}
    return index


def _zeroshot(cfg: DataConfig, base: Path, root: Path) -> list[dict]:
    if not cfg.zeroshot_sets:
        return []
    from pipeline.data import torchvision_sets

    source = resolve_path(cfg.zeroshot_root, base).resolve()
    specs = []
    for name in cfg.zeroshot_sets:
        torchvision_sets.materialise(name, source, root / "zeroshot" / name)
        specs.append({"root": f"zeroshot/{name}"})
    return specs


# ---------------------------------------------------------------- part-of-speech tags of the order sets

BatchTagger = Callable[[list[list[str]]], list[list[str]]]
"""Tags for a batch of token lists, each token tagged in the context of its caption."""

# ARO shuffles tokens whose Penn tag is NN, NNS, NNP, NNPS (nouns) or JJ, JJR, JJS (adjectives).
PENN_TO_UPOS = {"NN": "NOUN", "NNS": "NOUN", "NNP": "PROPN", "NNPS": "PROPN", "JJ": "ADJ", "JJR": "ADJ", "JJS": "ADJ"}


def token_tag(penn: str, upos: str) -> str:
    """A token's tag as the order sets and NegCLIP's swaps read it: UPOS for nouns and adjectives (what
    ARO shuffles) and for auxiliaries and copulas (Penn tags "is" VBZ like a verb; NegCLIP's verb-phrase
    pattern reads spaCy's POS, where it is AUX and no phrase of its own), Penn otherwise."""
    return "AUX" if upos == "AUX" else PENN_TO_UPOS.get(penn, penn or "X")


def order_lexicon(path: Path) -> dict[str, str]:
    """{lower-cased word: tag} from a JSON lexicon file (a closed vocabulary's tags, no context)."""
    document = require_record(load_json(path, "part-of-speech lexicon"), path, "")
    for word, tag in document.items():
        if not isinstance(tag, str):
            raise DataFormatError(path, "", word, f"must map to a tag string, got {tag!r}")
    return {word.lower(): tag for word, tag in document.items()}


def karpathy_captions(annotation_files: list[Path]) -> list[str]:
    """Every caption of the order sets' Karpathy split files, in file order."""
    captions = []
    for path in annotation_files:
        records = require_list(load_json(path, "Karpathy split file"), path, "", None)
        for index, record in enumerate(records):
            captions += str_list_field(require_record(record, path, f"record {index}"), "caption", path,
                                       f"record {index}")
    return captions


def tag_captions(captions: list[str], batch_tagger: BatchTagger) -> dict[str, list[str]]:
    """{aro.caption_key(tokens): their tags} for every caption.

    Each caption is tagged in its own context, as ARO tags it before shuffling ("orange" is
    an adjective in "an orange cat", a noun in "the orange is sweet");
    `pipeline.data.aro.caption_tagger` reads the table back.
    """
    from pipeline.data.aro import caption_key, tokenize

    tokens = [tokenize(caption) for caption in dict.fromkeys(captions)]
    table: dict[str, list[str]] = {}
    for start in range(0, len(tokens), 1024):
        batch = tokens[start:start + 1024]
        for words, tags in zip(batch, batch_tagger(batch)):
            if len(tags) != len(words):
                raise ValueError(f"the tagger gave {len(tags)} tags for the {len(words)} tokens of {' '.join(words)!r}")
            table[caption_key(words)] = list(tags)
    return table


class Tagging:
    """`data.order_tagger`, loaded once for the order sets and the training captions' negatives:
    spaCy tags each caption in its context; a JSON lexicon tags words alone."""

    def __init__(self, cfg: DataConfig, base: Path):
        self.spec, self.base = cfg.order_tagger, base
        self._batch: BatchTagger | None = None
        self._lexicon: dict[str, str] | None = None

    @property
    def in_context(self) -> bool:
        return self.spec.startswith("spacy:")

    def batch(self) -> BatchTagger:
        if self._batch is None:
            self._batch = spacy_tagger(self.spec.split(":", 1)[1])
        return self._batch

    def lexicon(self) -> dict[str, str]:
        if self._lexicon is None:
            self._lexicon = order_lexicon(resolve_path(self.spec, self.base))
        return self._lexicon

    def tagger(self, captions: list[str]):
        """An `aro.Tagger` for these captions."""
        from pipeline.data.aro import caption_tagger, lexicon_tagger

        if self.in_context:
            return caption_tagger(tag_captions(captions, self.batch()))
        return lexicon_tagger(self.lexicon())


def spacy_tagger(model: str) -> BatchTagger:
    """spaCy's tagger on pre-tokenised captions, each token's tag by `token_tag` (its attribute ruler,
    kept, sets the POS)."""
    import spacy
    from spacy.tokens import Doc

    nlp = spacy.load(model, exclude=["parser", "ner", "lemmatizer", "senter"])

    def tag(batch: list[list[str]]) -> list[list[str]]:
        docs = nlp.pipe(Doc(nlp.vocab, words=words) for words in batch)
        return [[token_tag(token.tag_, token.pos_) for token in doc] for doc in docs]

    return tag


def first_line(err: BaseException) -> str:
    """A library's error, for a one-line refusal: its first line, cut at 200 characters."""
    text = " ".join(str(err).strip().split("\n")[0].split())
    return text[:200] + ("..." if len(text) > 200 else "")
