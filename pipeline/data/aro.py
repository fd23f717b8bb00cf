"""ARO (Yuksekgonul et al.), in the files its authors release (mertyg/vision-language-models-are-bows).

VG-Relation / VG-Attribution: a JSON array per set,
    visual_genome_relation.json     {"image_id", "relation_name", "bbox_x", "bbox_y", "bbox_w",
                                     "bbox_h", "true_caption", "false_caption", "image_path"}
    visual_genome_attribution.json  the same with "attributes": [a, b] instead of "relation_name"
with image_path relative to the image folder (`images/` next to the JSON in the release).
The authors score the options [false_caption, true_caption] on the image cropped to the box;
VG-Relation drops the relations in `excluded_vg_relations()` before its macro mean.

COCO-Order / Flickr30k-Order: the Karpathy test splits as BLIP publishes them,
    coco_karpathy_test.json  [{"image": "val2014/COCO_val2014_....jpg", "caption": [str, ...]}, ...]
    flickr30k_test.json      [{"image": "flickr30k-images/....jpg", "caption": [str, ...]}, ...]
with "image" relative to the dataset root. One case per (image, caption): the caption,
then four word-order perturbations of it (`order_options`).
"""
from __future__ import annotations

import random
import re
from functools import cache
from pathlib import Path
from typing import Callable

from pipeline.io import write_json
from .errors import (
    DataFormatError,
    existing_image,
    field_value,
    load_json,
    number_field,
    require_list,
    require_record,
    str_field,
    str_list_field,
)
from .records import ChoiceCase

VG_RELATION_FILE = "visual_genome_relation.json"
VG_ATTRIBUTION_FILE = "visual_genome_attribution.json"
VG_IMAGE_DIR = "images"
COCO_ORDER_FILE = "coco_karpathy_test.json"
FLICKR_ORDER_FILE = "flickr30k_test.json"
MAX_WORDS = 30

_VG_COMMON = ("image_id", "bbox_x", "bbox_y", "bbox_w", "bbox_h", "true_caption", "false_caption", "image_path")
_EXCLUDED_FILE = Path(__file__).with_name("aro_vg_relation_excluded.json")

Tagger = Callable[[list[str]], list[str]]
"""Universal POS tag ("NOUN", "PROPN", "ADJ", "VERB", ...) for each token of a caption."""
Tokenizer = Callable[[str], list[str]]

NOUN_TAGS = frozenset({"NOUN", "PROPN"})  # Penn NN, NNS, NNP, NNPS: what ARO shuffles as nouns
ADJECTIVE_TAGS = frozenset({"ADJ"})  # Penn JJ, JJR, JJS


# ---------------------------------------------------------------- VG-Relation / VG-Attribution


def read_vg_relation(annotations: Path, image_dir: Path | None = None) -> list[ChoiceCase]:
    """VG-Relation cases: options (false, true), answer 1, the box, group = relation_name."""
    return _read_vg(annotations, image_dir, _relation_group)


def read_vg_attribution(annotations: Path, image_dir: Path | None = None) -> list[ChoiceCase]:
    """VG-Attribution cases: options (false, true), answer 1, the box, group = "a_b"."""
    return _read_vg(annotations, image_dir, _attribute_group)


def write_vg_relation(path: Path, records: list[dict]) -> None:
    """Write VG-Relation records (dicts with the published fields; others are dropped)."""
    _write_vg(path, records, ("relation_name",), _relation_group)


def write_vg_attribution(path: Path, records: list[dict]) -> None:
    """Write VG-Attribution records (dicts with the published fields; others are dropped)."""
    _write_vg(path, records, ("attributes",), _attribute_group)


@cache
def excluded_vg_relations() -> frozenset[str]:
    """Relations the ARO authors drop before VG-Relation's macro accuracy (157 names,
    from their notebook "Replicate ARO! VG-Relation, VG-Attribution")."""
    document = load_json(_EXCLUDED_FILE, "excluded VG relations")
    return frozenset(str_list_field(require_record(document, _EXCLUDED_FILE, ""), "relations", _EXCLUDED_FILE, ""))


def _read_vg(annotations: Path, image_dir: Path | None, group_of: Callable[[dict, Path, str], str]) -> list[ChoiceCase]:
    image_dir = annotations.parent / VG_IMAGE_DIR if image_dir is None else image_dir
    records = require_list(load_json(annotations, "ARO annotation file"), annotations, "", None)
    cases = []
    for index, record in enumerate(records):
        where = f"record {index}"
        record = require_record(record, annotations, where)
        group = group_of(record, annotations, where)
        bbox, true_caption, false_caption = _check_vg_common(record, annotations, where)
        image = existing_image(image_dir, record["image_path"], annotations, where, "image_path")
        cases.append(ChoiceCase(image=image, options=(false_caption, true_caption), answer=1, group=group, bbox=bbox))
    if not cases:       # an empty set passed here would fail the evaluation, after the models and cache stages
        raise DataFormatError(annotations, "", None, "holds no case")
    return cases


def _check_vg_common(
    record: dict, path: Path, where: str
) -> tuple[tuple[float, float, float, float], str, str]:
    image_id = field_value(record, "image_id", path, where)
    if isinstance(image_id, bool) or not isinstance(image_id, (int, str)):
        raise DataFormatError(path, where, "image_id", f"must be an integer or a string, got {image_id!r}")
    str_field(record, "image_path", path, where)
    bbox = tuple(number_field(record, f"bbox_{k}", path, where) for k in "xywh")
    return bbox, str_field(record, "true_caption", path, where), str_field(record, "false_caption", path, where)


def _relation_group(record: dict, path: Path, where: str) -> str:
    return str_field(record, "relation_name", path, where)


def _attribute_group(record: dict, path: Path, where: str) -> str:
    first, second = str_list_field(record, "attributes", path, where, length=2)
    return f"{first}_{second}"


def _write_vg(
    path: Path, records: list[dict], own: tuple[str, ...], group_of: Callable[[dict, Path, str], str]
) -> None:
    for index, record in enumerate(records):
        where = f"record {index}"
        group_of(require_record(record, path, where), path, where)
        _check_vg_common(record, path, where)
    fields = ("image_id",) + own + _VG_COMMON[1:]
    write_json(path, [{field: record[field] for field in fields} for record in records])


# ---------------------------------------------------------------- COCO-Order / Flickr30k-Order


def read_order_set(
    annotations: Path,
    image_dir: Path,
    tagger: Tagger,
    seed: int = 0,
    tokenizer: Tokenizer | None = None,
    max_words: int = MAX_WORDS,
) -> list[ChoiceCase]:
    """One case per (image, caption) of a Karpathy-split file: options = `order_options`, answer 0.

    Each case draws its shuffles from its own generator seeded by (seed, image, caption
    index), so a case's options do not depend on which other records are in the file.
    """
    tokenizer = tokenize if tokenizer is None else tokenizer
    records = require_list(load_json(annotations, "Karpathy split file"), annotations, "", None)
    cases = []
    for index, record in enumerate(records):
        where = f"record {index}"
        relative, captions = _check_order_record(require_record(record, annotations, where), annotations, where)
        image = existing_image(image_dir, relative, annotations, where, "image")
        for k, caption in enumerate(captions):
            rng = random.Random(f"{seed}:{relative}:{k}")
            options = order_options(caption, tagger, rng, tokenizer, max_words)
            cases.append(ChoiceCase(image=image, options=options, answer=0))
    if not cases:
        raise DataFormatError(annotations, "", None, "holds no case")
    return cases


def write_order_set(path: Path, records: list[dict]) -> None:
    """Write Karpathy-split records {"image": relative path, "caption": [captions]}."""
    for index, record in enumerate(records):
        where = f"record {index}"
        _check_order_record(require_record(record, path, where), path, where)
    write_json(path, [{"image": r["image"], "caption": list(r["caption"])} for r in records])


def _check_order_record(record: dict, path: Path, where: str) -> tuple[str, list[str]]:
    return str_field(record, "image", path, where), str_list_field(record, "caption", path, where)


def order_options(
    caption: str, tagger: Tagger, rng: random.Random, tokenizer: Tokenizer | None = None, max_words: int = MAX_WORDS
) -> tuple[str, str, str, str, str]:
    """[caption, nouns+adjectives shuffled, all but nouns+adjectives shuffled,
    shuffled within trigrams, trigrams shuffled], ARO's four shuffles.

    Like ARO, the shuffles act on the tokens of the raw caption and `pre_caption` runs
    on each result afterwards (so a caption over `max_words` words is cut after shuffling).
    Unlike ARO, whose noun/adjective shuffles move spaCy's tokens and whose trigram shuffles
    move NLTK's, all four move one tokenization (`tokenize` by default): a word spaCy splits
    at an inner hyphen (t-shirt) is one unit here.
    """
    tokens = (tokenize if tokenizer is None else tokenizer)(caption)
    tags = tagger(tokens)
    if len(tags) != len(tokens):
        raise ValueError(f"tagger gave {len(tags)} tags for {len(tokens)} tokens of {caption!r}")
    perturbed = (
        shuffle_nouns_and_adjectives(tokens, tags, rng),
        shuffle_all_but_nouns_and_adjectives(tokens, tags, rng),
        shuffle_within_trigrams(tokens, rng),
        shuffle_trigrams(tokens, rng),
    )
    return (pre_caption(caption, max_words),) + tuple(pre_caption(" ".join(p), max_words) for p in perturbed)


def pre_caption(caption: str, max_words: int = MAX_WORDS) -> str:
    """ARO's (BLIP's) caption cleaning: lower-case, .!"()*#:;~ to spaces, runs of 2+
    whitespace to one space, strip, keep the first `max_words` space-separated words.

    Kept character-for-character (a lone tab or newline inside survives, as there)
    because the order-set numbers depend on the exact strings.
    """
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else caption


def shuffle_nouns_and_adjectives(tokens: list[str], tags: list[str], rng: random.Random) -> list[str]:
    """Nouns permuted among the noun positions, then adjectives among the adjective positions."""
    shuffled = _permute_positions(tokens, [i for i, t in enumerate(tags) if t in NOUN_TAGS], rng)
    return _permute_positions(shuffled, [i for i, t in enumerate(tags) if t in ADJECTIVE_TAGS], rng)


def shuffle_all_but_nouns_and_adjectives(tokens: list[str], tags: list[str], rng: random.Random) -> list[str]:
    """Every token that is neither noun nor adjective (punctuation included) permuted among those positions."""
    keep = NOUN_TAGS | ADJECTIVE_TAGS
    return _permute_positions(tokens, [i for i, t in enumerate(tags) if t not in keep], rng)


def shuffle_within_trigrams(tokens: list[str], rng: random.Random) -> list[str]:
    """Each consecutive trigram (the last may be shorter) shuffled in place."""
    shuffled = []
    for trigram in _trigrams(tokens):
        rng.shuffle(trigram)
        shuffled.extend(trigram)
    return shuffled


def shuffle_trigrams(tokens: list[str], rng: random.Random) -> list[str]:
    """The consecutive trigrams (the last may be shorter) put in a random order, each kept intact."""
    trigrams = _trigrams(tokens)
    rng.shuffle(trigrams)
    return [token for trigram in trigrams for token in trigram]


def _trigrams(tokens: list[str]) -> list[list[str]]:
    return [list(tokens[i:i + 3]) for i in range(0, len(tokens), 3)]


def _permute_positions(tokens: list[str], positions: list[int], rng: random.Random) -> list[str]:
    values = [tokens[i] for i in positions]
    rng.shuffle(values)
    permuted = list(tokens)
    for i, value in zip(positions, values):
        permuted[i] = value
    return permuted


# NegCLIP's swaps (ARO paper, section 5; its released generator): two noun phrases, two verb phrases,
# or two words of one class trade places. Tags come from the order sets' tagger: spaCy's (UPOS for
# nouns and adjectives, Penn otherwise) or a UPOS lexicon, so each class names both tag sets.
SWAP_CLASSES = {
    "nouns": NOUN_TAGS,
    "adjectives": ADJECTIVE_TAGS,
    "adverbs": frozenset({"ADV", "RB", "RBR", "RBS"}),
}
# Phrases are found on one letter per token: D determiner or number, M adjective, N noun, P the
# possessive 's, R adverb, A auxiliary or copula (spaCy's tagger gives them as AUX:
# `paper.token_tag`), V verb, x anything else.
_PHRASE_LETTERS = {
    **{tag: "D" for tag in ("DT", "PDT", "PRP$", "CD", "DET", "NUM")},
    **{tag: "M" for tag in ADJECTIVE_TAGS}, **{tag: "N" for tag in NOUN_TAGS}, "POS": "P",
    **{tag: "R" for tag in SWAP_CLASSES["adverbs"]}, "AUX": "A", "MD": "A",
    **{tag: "V" for tag in ("VERB", "VB", "VBD", "VBG", "VBN", "VBP", "VBZ")},
}
# A base noun phrase (determiners, adjectives with their adverbs, nouns, ending in a noun; a
# possessor's 's inside), as the parser's noun chunks are; NegCLIP swaps only those of three words
# or more. A verb phrase is its generator's pattern: VERB? ADV* AUX* VERB+.
NOUN_PHRASE = re.compile(r"D*(?:(?:R*M|N)*NP)?(?:R*M|N)*N")
MIN_NOUN_PHRASE = 3
VERB_PHRASE = re.compile(r"V?R*A*V+")


def phrase_spans(tags: list[str], pattern: re.Pattern, min_length: int = 1) -> list[tuple[int, int]]:
    """(start, end) token spans of the longest non-overlapping matches of `pattern`, left to right."""
    letters = "".join(_PHRASE_LETTERS.get(tag, "x") for tag in tags)
    return [m.span() for m in pattern.finditer(letters) if m.end() - m.start() >= min_length]


def swap_negatives(caption: str, tagger: Tagger, rng: random.Random, tokenizer: Tokenizer | None = None) -> list[str]:
    """Hard negatives of a caption in NegCLIP's manner: one negative with a random pair of noun
    phrases (three words or more) swapped, one with a pair of verb phrases, and one for each word
    class (nouns, adjectives, adverbs) with a pair of words swapped, wherever the caption has two
    different ones. NegCLIP's generator swaps singular and plural nouns apart (NN, NNS); the tags
    here (UPOS NOUN) do not tell them apart. A caption with none of these gets its tokens shuffled
    within trigrams instead (ARO's order perturbation; NegCLIP drops such a caption), drawn again
    until the order changes, or nothing when no shuffle can change it (one word)."""
    tokens = (tokenize if tokenizer is None else tokenizer)(caption)
    tags = tagger(tokens)
    if len(tags) != len(tokens):
        raise ValueError(f"tagger gave {len(tags)} tags for {len(tokens)} tokens of {caption!r}")
    spans = [phrase_spans(tags, NOUN_PHRASE, MIN_NOUN_PHRASE), phrase_spans(tags, VERB_PHRASE)]
    spans += [[(i, i + 1) for i, tag in enumerate(tags) if tag in wanted] for wanted in SWAP_CLASSES.values()]
    negatives = []
    for kind in spans:
        text = [" ".join(tokens[a:b]).lower() for a, b in kind]
        pairs = [(i, j) for i in range(len(kind)) for j in range(i + 1, len(kind)) if text[i] != text[j]]
        if pairs:
            (a, b), (c, d) = (kind[i] for i in rng.choice(pairs))
            negatives.append(" ".join(tokens[:a] + tokens[c:d] + tokens[b:c] + tokens[a:b] + tokens[d:]))
    if not negatives and any(len(set(trigram)) > 1 for trigram in _trigrams(tokens)):
        # A short caption's shuffle often keeps its order ("A man surfing." one time in six); a caption
        # without a negative stops a NegCLIP run, so draw until the order changes (it can).
        while not negatives:
            shuffled = " ".join(shuffle_within_trigrams(tokens, rng))
            negatives = [shuffled] if shuffled != " ".join(tokens) else []
    return negatives


_EDGE_PUNCTUATION = frozenset(".,!?;:\"'`()[]{}*#~")
_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$", re.IGNORECASE)


def tokenize(caption: str) -> list[str]:
    """Treebank-style tokens (punctuation and clitics such as 's, n't split off), close
    to what ARO's NLTK tokenizer gives; spaCy's, which ARO's noun/adjective shuffles use, also
    splits a hyphen inside a word, which this keeps (README, "Datasets: where to get them")."""
    tokens: list[str] = []
    for chunk in caption.split():
        start, end = 0, len(chunk)
        while start < end and chunk[start] in _EDGE_PUNCTUATION:
            start += 1
        while end > start and chunk[end - 1] in _EDGE_PUNCTUATION:
            end -= 1
        word = chunk[start:end]
        clitic = _CLITIC.match(word)
        tokens.extend(chunk[:start])
        tokens.extend(clitic.groups() if clitic else [word] if word else [])
        tokens.extend(chunk[end:])
    return tokens


def caption_key(tokens: list[str]) -> str:
    """A caption's key in a table of per-caption tags: its tokens joined by spaces."""
    return " ".join(tokens)


def caption_tagger(table: dict[str, list[str]], source: str = "the tag table") -> Tagger:
    """Tagger reading each caption's own tags (tagged in context) from {caption_key(tokens): tags}."""

    def tag(tokens: list[str]) -> list[str]:
        key = caption_key(tokens)
        if key not in table:
            raise ValueError(f"{source}: no tags for the caption {key!r}; rebuild the data stage")
        return table[key]

    return tag


def lexicon_tagger(lexicon: dict[str, str], default: str = "X") -> Tagger:
    """Tagger for a closed vocabulary (the toy world's grammar knows each word's POS);
    look-up ignores case, unknown tokens (punctuation included) get `default`."""
    table = {word.lower(): tag for word, tag in lexicon.items()}

    def tag(tokens: list[str]) -> list[str]:
        return [table.get(token.lower(), default) for token in tokens]

    return tag
