"""Readers and writers of the published dataset formats.

Fixtures are written by hand in each release's exact layout (not with our writers),
so the readers are tested against the real formats; the writers are then checked by
round-tripping through the readers.
"""
from __future__ import annotations

import json
import random
import zipfile
from io import BytesIO
from pathlib import Path

import pytest
from PIL import Image

from pipeline.data import aro, coco, winoground, zeroshot
from pipeline.data.errors import DataFormatError, MissingDataError
from pipeline.data.records import ChoiceCase, ImageCaption, load_image


def png(path: Path, color: tuple[int, int, int] = (255, 0, 0), size: tuple[int, int] = (8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def png_bytes(color: tuple[int, int, int]) -> bytes:
    buffer = BytesIO()
    Image.new("RGB", (4, 4), color).save(buffer, format="PNG")
    return buffer.getvalue()


def dump(path: Path, value: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value), encoding="utf-8")
    return path


def assert_names(error: pytest.ExceptionInfo, file_name: str, field: str | None) -> str:
    message = str(error.value)
    assert "\n" not in message
    assert file_name in message
    if field is not None:
        assert f"'{field}'" in message
    return message


# ---------------------------------------------------------------- COCO captions


def coco_fixture(tmp_path: Path) -> tuple[Path, Path]:
    images = tmp_path / "train2017"
    for name in ("000000000009.jpg", "000000000025.jpg", "000000000030.jpg"):
        png(images / name)
    annotations = dump(
        tmp_path / "annotations" / "captions_train2017.json",
        {
            "info": {"description": "COCO 2017 Dataset", "version": "1.0", "year": 2017},
            "licenses": [{"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 1, "name": "x"}],
            "images": [
                {"license": 1, "file_name": "000000000025.jpg", "coco_url": "u", "height": 6, "width": 8,
                 "date_captured": "2013-11-14 16:28:13", "flickr_url": "f", "id": 25},
                {"license": 1, "file_name": "000000000009.jpg", "coco_url": "u", "height": 6, "width": 8,
                 "date_captured": "2013-11-14 16:28:13", "flickr_url": "f", "id": 9},
                {"license": 1, "file_name": "000000000030.jpg", "coco_url": "u", "height": 6, "width": 8,
                 "date_captured": "2013-11-14 16:28:13", "flickr_url": "f", "id": 30},
            ],
            "annotations": [
                {"image_id": 25, "id": 580, "caption": "A giraffe eating food from the top of the tree."},
                {"image_id": 9, "id": 661, "caption": "A plate of food.\n"},
                {"image_id": 25, "id": 122, "caption": "A giraffe standing up nearby a tree "},
                {"image_id": 9, "id": 664, "caption": "A meal in a bento box."},
                {"image_id": 25, "id": 411, "caption": "A tall giraffe."},
            ],
        },
    )
    return annotations, images


def test_coco_reads_published_layout(tmp_path: Path) -> None:
    annotations, images = coco_fixture(tmp_path)
    first = coco.read_coco_captions(annotations, images)
    assert first == [
        ImageCaption(images / "000000000009.jpg", "A plate of food."),
        ImageCaption(images / "000000000025.jpg", "A giraffe standing up nearby a tree"),
    ]  # image 30 has no caption
    every = coco.read_coco_captions(annotations, images, caption_choice="all")
    assert [p.caption for p in every] == [
        "A plate of food.", "A meal in a bento box.",
        "A giraffe standing up nearby a tree", "A tall giraffe.", "A giraffe eating food from the top of the tree.",
    ]
    draws = [coco.read_coco_captions(annotations, images, caption_choice="random", seed=s) for s in range(8)]
    assert all([p.image.name for p in d] == ["000000000009.jpg", "000000000025.jpg"] for d in draws)
    assert all(set(p.caption for p in d) <= set(p.caption for p in every) for d in draws)
    assert coco.read_coco_captions(annotations, images, caption_choice="random", seed=3) == draws[3]
    assert len({tuple(d) for d in draws}) > 1


def test_coco_round_trip(tmp_path: Path) -> None:
    images = tmp_path / "images"
    png(images / "b.png")
    png(images / "a.png")
    path = tmp_path / "captions.json"
    coco.write_coco_captions(path, [(7, "b.png", ["seven one", "seven two"]), (3, "a.png", ["three"])])
    document = json.loads(path.read_text())
    assert {"info", "licenses", "images", "annotations"} <= set(document)
    assert coco.read_coco_captions(path, images) == [
        ImageCaption(images / "a.png", "three"), ImageCaption(images / "b.png", "seven one"),
    ]
    assert len(coco.read_coco_captions(path, images, caption_choice="all")) == 3


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda d: d["annotations"][0].pop("caption"), "caption"),
        (lambda d: d["annotations"][1].update(image_id="9"), "image_id"),
        (lambda d: d["annotations"][1].update(image_id=12345), "image_id"),
        (lambda d: d["images"][0].update(id=None), "id"),
        (lambda d: d["images"][0].update(file_name="gone.jpg"), "file_name"),
        (lambda d: d.pop("annotations"), "annotations"),
    ],
)
def test_coco_malformed_records(tmp_path: Path, change, field: str) -> None:
    annotations, images = coco_fixture(tmp_path)
    document = json.loads(annotations.read_text())
    change(document)
    dump(annotations, document)
    with pytest.raises(DataFormatError) as error:
        coco.read_coco_captions(annotations, images)
    assert_names(error, "captions_train2017.json", field)


def test_coco_bad_json_and_missing_paths(tmp_path: Path) -> None:
    annotations, images = coco_fixture(tmp_path)
    annotations.write_text('{"images": [', encoding="utf-8")
    with pytest.raises(DataFormatError) as error:
        coco.read_coco_captions(annotations, images)
    assert "invalid JSON" in assert_names(error, "captions_train2017.json", None)
    with pytest.raises(MissingDataError, match="nope.json"):
        coco.read_coco_captions(tmp_path / "nope.json", images)
    with pytest.raises(MissingDataError, match="no_images"):
        coco.read_coco_captions(annotations, tmp_path / "no_images")


# ---------------------------------------------------------------- Winoground

WINO_ROWS = [
    {"id": 0, "image_0": "ex_0_img_0", "image_1": "ex_0_img_1",
     "caption_0": "an old person kisses a young person", "caption_1": "a young person kisses an old person",
     "tag": "Noun", "secondary_tag": "", "num_main_preds": 1, "collapsed_tag": "Object"},
    {"id": 1, "image_0": "ex_1_img_0", "image_1": "ex_1_img_1",
     "caption_0": "the dog is on the mat", "caption_1": "the mat is on the dog",
     "tag": "Relation", "secondary_tag": "Symbolic", "num_main_preds": 2, "collapsed_tag": "Relation"},
]
WINO_COLORS = {"ex_0_img_0": (255, 0, 0), "ex_0_img_1": (0, 255, 0), "ex_1_img_0": (0, 0, 255), "ex_1_img_1": (9, 9, 9)}


def winoground_fixture(root: Path, rows: list[dict] = WINO_ROWS, zipped: bool = True) -> Path:
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "examples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    if zipped:
        with zipfile.ZipFile(data / "images.zip", "w") as archive:
            for name, color in WINO_COLORS.items():
                archive.writestr(f"images/{name}.png", png_bytes(color))
    else:
        for name, color in WINO_COLORS.items():
            png(data / "images" / f"{name}.png", color)
    return root


@pytest.mark.parametrize("zipped", [True, False])
def test_winoground_reads_published_layout(tmp_path: Path, zipped: bool) -> None:
    tasks = winoground.read_winoground(winoground_fixture(tmp_path, zipped=zipped))
    assert [t.id for t in tasks] == [0, 1]
    first, second = tasks
    assert first.caption_0 == "an old person kisses a young person"
    assert (first.tag, first.secondary_tag, first.num_main_preds, first.collapsed_tag) == ("Noun", "", 1, "Object")
    assert (second.num_main_preds, second.collapsed_tag) == (2, "Relation")
    assert first.image_0.name == "ex_0_img_0.png"
    assert load_image(second.image_1).getpixel((0, 0)) == (9, 9, 9)


def test_winoground_zip_cache_follows_the_zip(tmp_path: Path) -> None:
    root = winoground_fixture(tmp_path)
    assert load_image(winoground.read_winoground(root)[0].image_0).getpixel((0, 0)) == (255, 0, 0)
    assert winoground.read_winoground(root)[0].image_0.is_file()  # cached: no second extraction needed
    with zipfile.ZipFile(root / "data" / "images.zip", "w") as archive:
        for name in WINO_COLORS:
            archive.writestr(f"images/{name}.png", png_bytes((1, 2, 3)))
    assert load_image(winoground.read_winoground(root)[0].image_0).getpixel((0, 0)) == (1, 2, 3)
    assert len(list((root / "data" / ".images.zip.cache").iterdir())) == 1


@pytest.mark.parametrize("extracted", [False, True])
def test_winoground_round_trip(tmp_path: Path, extracted: bool) -> None:
    tasks = [
        dict(row, image_0_pil=Image.new("RGB", (5, 5), WINO_COLORS[row["image_0"]]),
             image_1_pil=Image.new("RGB", (5, 5), WINO_COLORS[row["image_1"]]))
        for row in WINO_ROWS
    ]
    winoground.write_winoground(tmp_path, tasks, extracted=extracted)
    assert (tmp_path / "data" / ("images" if extracted else "images.zip")).exists()
    lines = (tmp_path / "data" / "examples.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == WINO_ROWS
    read = winoground.read_winoground(tmp_path)
    assert [t.caption_1 for t in read] == [r["caption_1"] for r in WINO_ROWS]
    assert load_image(read[1].image_0).getpixel((2, 2)) == (0, 0, 255)


def test_winoground_writer_rejects_bad_tasks(tmp_path: Path) -> None:
    task = dict(WINO_ROWS[0], image_0_pil=Image.new("RGB", (2, 2)), image_1_pil=Image.new("RGB", (2, 2)))
    with pytest.raises(DataFormatError) as error:
        winoground.write_winoground(tmp_path, [dict(task, collapsed_tag="Verb")])
    assert_names(error, "examples.jsonl", "collapsed_tag")
    with pytest.raises(DataFormatError) as error:
        winoground.write_winoground(tmp_path, [dict(task, image_1_pil=None)])
    assert_names(error, "examples.jsonl", "image_1_pil")
    with pytest.raises(DataFormatError) as error:
        winoground.write_winoground(tmp_path, [task, dict(task, image_0="other", image_1="other2")])
    assert "line 2" in assert_names(error, "examples.jsonl", "id")
    assert not (tmp_path / "data" / "examples.jsonl").exists()


@pytest.mark.parametrize(
    ("change", "field", "expected"),
    [
        (lambda r: r.pop("caption_1"), "caption_1", "is missing"),
        (lambda r: r.update(id="1"), "id", "must be an integer"),
        (lambda r: r.update(num_main_preds="x"), "num_main_preds", "must be 1 or 2, got 'x'"),
        (lambda r: r.update(num_main_preds=3), "num_main_preds", "must be 1 or 2, got 3"),
        (lambda r: r.update(collapsed_tag="object"), "collapsed_tag", "must be 'Object' or 'Relation' or 'Both'"),
        (lambda r: r.update(image_1="ex_9_img_1"), "image_1", "ex_9_img_1.png"),
        (lambda r: r.update(id=0), "id", "repeats task id 0"),
    ],
)
@pytest.mark.parametrize("zipped", [True, False])
def test_winoground_malformed_records(tmp_path: Path, change, field: str, expected: str, zipped: bool) -> None:
    rows = [dict(r) for r in WINO_ROWS]
    change(rows[1])
    with pytest.raises(DataFormatError) as error:
        winoground.read_winoground(winoground_fixture(tmp_path, rows, zipped))
    message = assert_names(error, "examples.jsonl", field)
    assert "line 2" in message and expected in message


def test_winoground_bad_json_line_and_missing_images(tmp_path: Path) -> None:
    root = winoground_fixture(tmp_path)
    examples = root / "data" / "examples.jsonl"
    examples.write_text(examples.read_text() + '{"id": 2, "image_0": \n', encoding="utf-8")
    with pytest.raises(DataFormatError) as error:
        winoground.read_winoground(root)
    assert "line 3: invalid JSON" in assert_names(error, "examples.jsonl", None)
    winoground_fixture(root)
    (root / "data" / "images.zip").unlink()
    with pytest.raises(MissingDataError, match="images.zip"):
        winoground.read_winoground(root)


# ---------------------------------------------------------------- ARO: VG-Relation / VG-Attribution

VG_RELATION = [
    {"image_id": "2315375", "relation_name": "on", "bbox_x": 1, "bbox_y": 2, "bbox_w": 5, "bbox_h": 3,
     "true_caption": "the cup is on the table", "false_caption": "the table is on the cup",
     "image_path": "2315375.jpg"},
    {"image_id": 2368554, "relation_name": "wearing", "bbox_x": 0.5, "bbox_y": 0, "bbox_w": 7, "bbox_h": 6.5,
     "true_caption": "the man is wearing the hat", "false_caption": "the hat is wearing the man",
     "image_path": "2368554.jpg"},
]
VG_ATTRIBUTION = [
    {"image_id": "2315375", "attributes": ["white", "wooden"], "bbox_x": 0, "bbox_y": 0, "bbox_w": 8, "bbox_h": 6,
     "true_caption": "the white cup and the wooden table", "false_caption": "the wooden cup and the white table",
     "image_path": "2315375.jpg"},
]


def vg_fixture(tmp_path: Path) -> tuple[Path, Path]:
    for name in ("2315375.jpg", "2368554.jpg"):
        png(tmp_path / "images" / name)
    return dump(tmp_path / "visual_genome_relation.json", VG_RELATION), dump(
        tmp_path / "visual_genome_attribution.json", VG_ATTRIBUTION
    )


def test_vg_reads_published_layout(tmp_path: Path) -> None:
    relation, attribution = vg_fixture(tmp_path)
    cases = aro.read_vg_relation(relation)
    assert cases[0] == ChoiceCase(
        image=tmp_path / "images" / "2315375.jpg",
        options=("the table is on the cup", "the cup is on the table"),
        answer=1, group="on", bbox=(1.0, 2.0, 5.0, 3.0),
    )
    assert (cases[1].group, cases[1].bbox) == ("wearing", (0.5, 0.0, 7.0, 6.5))
    assert load_image(cases[0].image, cases[0].bbox).size == (5, 3)
    (case,) = aro.read_vg_attribution(attribution)
    assert (case.group, case.answer, case.options[1]) == ("white_wooden", 1, "the white cup and the wooden table")


def test_vg_round_trip(tmp_path: Path) -> None:
    relation, attribution = vg_fixture(tmp_path)
    aro.write_vg_relation(tmp_path / "r.json", [dict(r, extra=1) for r in VG_RELATION])
    aro.write_vg_attribution(tmp_path / "a.json", VG_ATTRIBUTION)
    assert json.loads((tmp_path / "r.json").read_text()) == VG_RELATION
    assert aro.read_vg_relation(tmp_path / "r.json", tmp_path / "images") == aro.read_vg_relation(relation)
    assert aro.read_vg_attribution(tmp_path / "a.json", tmp_path / "images") == aro.read_vg_attribution(attribution)


@pytest.mark.parametrize(
    ("file_name", "change", "field"),
    [
        ("visual_genome_relation.json", lambda r: r.pop("true_caption"), "true_caption"),
        ("visual_genome_relation.json", lambda r: r.pop("relation_name"), "relation_name"),
        ("visual_genome_relation.json", lambda r: r.update(bbox_w="5"), "bbox_w"),
        ("visual_genome_relation.json", lambda r: r.update(image_id=None), "image_id"),
        ("visual_genome_relation.json", lambda r: r.update(image_path="404.jpg"), "image_path"),
        ("visual_genome_attribution.json", lambda r: r.update(attributes=["a", "b", "c"]), "attributes"),
        ("visual_genome_attribution.json", lambda r: r.update(attributes="white_wooden"), "attributes"),
    ],
)
def test_vg_malformed_records(tmp_path: Path, file_name: str, change, field: str) -> None:
    vg_fixture(tmp_path)
    path = tmp_path / file_name
    records = json.loads(path.read_text())
    change(records[-1])
    dump(path, records)
    read = aro.read_vg_relation if "relation" in file_name else aro.read_vg_attribution
    with pytest.raises(DataFormatError) as error:
        read(path)
    assert f"record {len(records) - 1}" in assert_names(error, file_name, field)


def test_vg_bad_json(tmp_path: Path) -> None:
    relation, _ = vg_fixture(tmp_path)
    relation.write_text("[{]", encoding="utf-8")
    with pytest.raises(DataFormatError) as error:
        aro.read_vg_relation(relation)
    assert "invalid JSON" in assert_names(error, "visual_genome_relation.json", None)


@pytest.mark.parametrize("file_name", ["visual_genome_relation.json", "visual_genome_attribution.json",
                                       "coco_karpathy_test.json"])
def test_an_aro_file_with_no_case_is_refused_by_the_data_stage(tmp_path: Path, file_name: str) -> None:
    """Passed on, an empty set stopped the evaluation with an IndexError, after the models and cache stages."""
    path = tmp_path / file_name
    path.write_text("[]", encoding="utf-8")
    read = {"visual_genome_relation.json": aro.read_vg_relation, "visual_genome_attribution.json":
            aro.read_vg_attribution}.get(file_name, lambda p: aro.read_order_set(p, tmp_path, aro.lexicon_tagger(LEXICON)))
    with pytest.raises(DataFormatError) as error:
        read(path)
    assert "holds no case" in assert_names(error, file_name, None)


def test_excluded_relations() -> None:
    excluded = aro.excluded_vg_relations()
    assert len(excluded) == 157
    assert {"by", "of", "near", "with", "wrapped in"} <= excluded
    assert not {"on", "wearing", "holding"} & excluded


# ---------------------------------------------------------------- ARO: COCO-Order / Flickr30k-Order

LEXICON = {
    "a": "DET", "the": "DET", "small": "ADJ", "big": "ADJ", "red": "ADJ", "dog": "NOUN", "ball": "NOUN",
    "chases": "VERB", "man": "NOUN", "rides": "VERB", "bike": "NOUN", "on": "ADP", "street": "NOUN",
    "wet": "ADJ", "his": "PRON", "old": "ADJ", "down": "ADP",
}
CAPTION = "A small dog chases a big red ball."


class ReversingRng:
    """Stand-in for random.Random whose shuffle reverses, so every perturbation is predictable."""

    def shuffle(self, values: list) -> None:
        values.reverse()


def test_pre_caption_matches_aro() -> None:
    assert aro.pre_caption('A "Man" (on) a #1 bike: ~fast!  ') == "a man on a 1 bike fast"
    assert aro.pre_caption("Two dogs, one cat; and a bird's nest.") == "two dogs, one cat and a bird's nest"
    long = " ".join(f"w{i}" for i in range(35))
    assert aro.pre_caption(long).split(" ") == [f"w{i}" for i in range(30)]


def test_tokenize_splits_punctuation_and_clitics() -> None:
    assert aro.tokenize(CAPTION) == ["A", "small", "dog", "chases", "a", "big", "red", "ball", "."]
    assert aro.tokenize("A man's bike, (red).") == ["A", "man", "'s", "bike", ",", "(", "red", ")", "."]


def test_order_perturbations_hand_checked() -> None:
    # tokens: A small dog chases a big red ball .   nouns: dog ball   adjectives: small big red
    options = aro.order_options(CAPTION, aro.lexicon_tagger(LEXICON), ReversingRng())
    assert options == (
        "a small dog chases a big red ball",
        "a red ball chases a big small dog",  # nouns swapped, adjectives reversed in place
        "small dog a chases big red ball a",  # only A, chases, a and "." moved
        "dog small a big a chases ball red",  # each trigram reversed
        "red ball chases a big a small dog",  # trigram order reversed
    )


def test_order_perturbations_move_only_their_words() -> None:
    tagger = aro.lexicon_tagger(LEXICON)
    tokens = aro.tokenize(CAPTION)
    tags = tagger(tokens)
    fixed_by_nouns_adj = {i for i, t in enumerate(tags) if t not in {"NOUN", "ADJ"}}
    for seed in range(20):
        rng = random.Random(seed)
        shuffled = aro.shuffle_nouns_and_adjectives(tokens, tags, rng)
        assert all(shuffled[i] == tokens[i] for i in fixed_by_nouns_adj)
        assert all(tagger([shuffled[i]]) == [tags[i]] for i in range(len(tokens)))
        shuffled = aro.shuffle_all_but_nouns_and_adjectives(tokens, tags, rng)
        assert all(shuffled[i] == tokens[i] for i in range(len(tokens)) if i not in fixed_by_nouns_adj)
        shuffled = aro.shuffle_within_trigrams(tokens, rng)
        assert all(sorted(shuffled[i:i + 3]) == sorted(tokens[i:i + 3]) for i in range(0, len(tokens), 3))
        shuffled = aro.shuffle_trigrams(tokens, rng)
        trigrams = [tokens[i:i + 3] for i in range(0, len(tokens), 3)]
        assert sorted(shuffled[i:i + 3] for i in range(0, len(tokens), 3)) == sorted(trigrams)
        options = aro.order_options(CAPTION, tagger, random.Random(seed))
        assert all(sorted(o.split()) == sorted(options[0].split()) for o in options)


def order_fixture(tmp_path: Path) -> Path:
    png(tmp_path / "val2014" / "COCO_val2014_000000391895.jpg")
    png(tmp_path / "val2014" / "COCO_val2014_000000522418.jpg")
    return dump(
        tmp_path / "coco_karpathy_test.json",
        [
            {"image": "val2014/COCO_val2014_000000391895.jpg",
             "caption": ["A man rides a red bike down the wet street.", CAPTION]},
            {"image": "val2014/COCO_val2014_000000522418.jpg", "caption": ["The old man rides his bike."]},
        ],
    )


def test_order_set_reads_published_layout(tmp_path: Path) -> None:
    annotations = order_fixture(tmp_path)
    tagger = aro.lexicon_tagger(LEXICON)
    cases = aro.read_order_set(annotations, tmp_path, tagger, seed=0)
    assert len(cases) == 3
    assert [c.image.name for c in cases] == ["COCO_val2014_000000391895.jpg"] * 2 + ["COCO_val2014_000000522418.jpg"]
    assert all(c.answer == 0 and c.bbox is None and len(c.options) == 5 for c in cases)
    assert cases[0].options[0] == "a man rides a red bike down the wet street"
    for case in cases:
        assert all(sorted(o.split()) == sorted(case.options[0].split()) for o in case.options)
    assert aro.read_order_set(annotations, tmp_path, tagger, seed=0) == cases
    other_seeds = [aro.read_order_set(annotations, tmp_path, tagger, seed=s) for s in range(1, 6)]
    assert any(c != cases for c in other_seeds)


def test_order_set_cases_do_not_depend_on_other_records(tmp_path: Path) -> None:
    annotations = order_fixture(tmp_path)
    tagger = aro.lexicon_tagger(LEXICON)
    full = aro.read_order_set(annotations, tmp_path, tagger, seed=4)
    records = json.loads(annotations.read_text())
    dump(annotations, records[::-1])
    assert set(aro.read_order_set(annotations, tmp_path, tagger, seed=4)) == set(full)


def test_order_set_round_trip(tmp_path: Path) -> None:
    annotations = order_fixture(tmp_path)
    records = json.loads(annotations.read_text())
    aro.write_order_set(tmp_path / "flickr30k_test.json", records)
    assert json.loads((tmp_path / "flickr30k_test.json").read_text()) == records
    tagger = aro.lexicon_tagger(LEXICON)
    assert aro.read_order_set(tmp_path / "flickr30k_test.json", tmp_path, tagger, 2) == aro.read_order_set(
        annotations, tmp_path, tagger, 2
    )


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda r: r.pop("caption"), "caption"),
        (lambda r: r.update(caption="A man."), "caption"),
        (lambda r: r.update(caption=["ok", 3]), "caption"),
        (lambda r: r.update(image=7), "image"),
        (lambda r: r.update(image="val2014/missing.jpg"), "image"),
    ],
)
def test_order_set_malformed_records(tmp_path: Path, change, field: str) -> None:
    annotations = order_fixture(tmp_path)
    records = json.loads(annotations.read_text())
    change(records[1])
    dump(annotations, records)
    with pytest.raises(DataFormatError) as error:
        aro.read_order_set(annotations, tmp_path, aro.lexicon_tagger(LEXICON))
    assert "record 1" in assert_names(error, "coco_karpathy_test.json", field)


def test_order_set_bad_json(tmp_path: Path) -> None:
    annotations = order_fixture(tmp_path)
    annotations.write_text("[{\"image\": 1,}]", encoding="utf-8")
    with pytest.raises(DataFormatError) as error:
        aro.read_order_set(annotations, tmp_path, aro.lexicon_tagger(LEXICON))
    assert "invalid JSON" in assert_names(error, "coco_karpathy_test.json", None)


# ---------------------------------------------------------------- zero-shot ImageFolder sets


def zeroshot_fixture(root: Path) -> Path:
    png(root / "n02" / "z.png", (0, 0, 2))
    png(root / "n02" / "a.png", (0, 0, 1))
    png(root / "n01" / "sub" / "x.PNG", (0, 0, 3))
    (root / "n01" / "notes.txt").write_text("not an image")
    return dump(
        root / "zeroshot.json",
        {"name": "toy", "classnames": {"n02": "dog", "n01": "cat"}, "templates": ["a photo of a {}.", "a {}"]},
    ).parent


def test_zeroshot_reads_image_folder_layout(tmp_path: Path) -> None:
    root = zeroshot_fixture(tmp_path / "set")
    dataset = zeroshot.read_image_folder_set(root)
    assert dataset.name == "toy"
    assert dataset.classnames == ("cat", "dog")
    assert dataset.templates == ("a photo of a {}.", "a {}")
    assert [p.relative_to(root).as_posix() for p in dataset.images] == ["n01/sub/x.PNG", "n02/a.png", "n02/z.png"]
    assert dataset.labels == (0, 1, 1)


def test_zeroshot_matches_torchvision_image_folder(tmp_path: Path) -> None:
    folder = pytest.importorskip("torchvision.datasets")
    root = zeroshot_fixture(tmp_path / "set")
    dataset = zeroshot.read_image_folder_set(root)
    assert [(Path(p), label) for p, label in folder.ImageFolder(str(root)).samples] == list(
        zip(dataset.images, dataset.labels)
    )


def test_zeroshot_round_trip_and_rewrite(tmp_path: Path) -> None:
    root = tmp_path / "set"
    images = [(2, Image.new("RGB", (3, 3), (2, 0, 0))), (0, Image.new("RGB", (3, 3), (0, 0, 0))),
              (1, Image.new("RGB", (3, 3), (1, 0, 0))), (0, Image.new("RGB", (3, 3), (3, 0, 0)))]
    classnames = ["red cube", "blue ball", "Green/Cone"]
    zeroshot.write_image_folder_set(root, "toy", classnames, ["a photo of a {}."], images)
    dataset = zeroshot.read_image_folder_set(root)
    assert dataset.classnames == tuple(classnames)
    assert dataset.labels == (0, 0, 1, 2)
    assert [load_image(p).getpixel((0, 0))[0] for p in dataset.images] == [0, 3, 1, 2]
    zeroshot.write_image_folder_set(root, "toy2", ["x", "y"], ["{}"], [(0, images[0][1]), (1, images[1][1])])
    rewritten = zeroshot.read_image_folder_set(root)
    assert (rewritten.name, rewritten.classnames, rewritten.labels) == ("toy2", ("x", "y"), (0, 1))
    assert [p.name for p in tmp_path.iterdir()] == ["set"]


def test_zeroshot_writer_refuses_bad_arguments(tmp_path: Path) -> None:
    image = Image.new("RGB", (2, 2))
    with pytest.raises(ValueError, match="every class needs an image"):
        zeroshot.write_image_folder_set(tmp_path / "a", "n", ["x", "y"], ["{}"], [(0, image)])
    with pytest.raises(ValueError, match="one"):
        zeroshot.write_image_folder_set(tmp_path / "a", "n", ["x"], ["no slot"], [(0, image)])
    (tmp_path / "foreign").mkdir()
    with pytest.raises(ValueError, match="refusing"):
        zeroshot.write_image_folder_set(tmp_path / "foreign", "n", ["x"], ["{}"], [(0, image)])


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda m, root: m.pop("templates"), "templates"),
        (lambda m, root: m.update(name=3), "name"),
        (lambda m, root: m.update(templates=["a photo"]), "templates"),
        (lambda m, root: m.update(classnames={"n01": "cat"}), "classnames"),
        (lambda m, root: m.update(classnames=["cat", "dog"]), "classnames"),
        (lambda m, root: (root / "n03").mkdir() or m["classnames"].update(n03="cow"), "classnames"),
    ],
)
def test_zeroshot_malformed(tmp_path: Path, change, field: str) -> None:
    root = zeroshot_fixture(tmp_path / "set")
    meta = json.loads((root / "zeroshot.json").read_text())
    change(meta, root)
    dump(root / "zeroshot.json", meta)
    with pytest.raises(DataFormatError) as error:
        zeroshot.read_image_folder_set(root)
    assert_names(error, "zeroshot.json", field)


def test_zeroshot_bad_json_and_missing(tmp_path: Path) -> None:
    root = zeroshot_fixture(tmp_path / "set")
    (root / "zeroshot.json").write_text("{", encoding="utf-8")
    with pytest.raises(DataFormatError) as error:
        zeroshot.read_image_folder_set(root)
    assert "invalid JSON" in assert_names(error, "zeroshot.json", None)
    (root / "zeroshot.json").unlink()
    with pytest.raises(MissingDataError, match="zeroshot.json"):
        zeroshot.read_image_folder_set(root)


def test_a_byte_that_is_not_utf8_is_one_line_naming_the_file(tmp_path: Path) -> None:
    """A Latin-1 byte in Winoground's JSONL, MMVP-VLM's CSV or a CC-3M TSV: one line naming the
    file (it was a bare UnicodeDecodeError naming neither file nor line)."""
    from pipeline.data import cc3m, mmvp
    from pipeline.data.errors import load_jsonl

    bad = "café".encode("latin-1")
    jsonl = tmp_path / "examples.jsonl"
    jsonl.write_bytes(b'{"caption_0": "' + bad + b'"}\n')
    (tmp_path / "mmvp" / mmvp.IMAGE_DIRS[0]).mkdir(parents=True)
    questions = tmp_path / "mmvp" / "Questions.csv"
    questions.write_bytes(b"Question ID,Type,Statement\n1,Color," + bad + b"\n2,Color,a cup\n")
    tsv = tmp_path / "train.tsv"
    tsv.write_bytes(b"filepath\ttitle\n0.jpg\t" + bad + b"\n")
    for path, read in ((jsonl, lambda p: load_jsonl(p, "examples")), (questions, lambda p: mmvp.read_mmvp(p.parent)),
                       (tsv, cc3m.read_tsv)):
        with pytest.raises(DataFormatError, match="is not UTF-8 text") as error:
            read(path)
        assert str(error.value).startswith(str(path)) and "\n" not in str(error.value)


def test_an_unreadable_data_index_is_one_line(tmp_path: Path) -> None:
    from pipeline.data.datasets import read_index

    (tmp_path / "index.json").write_text("not json")
    with pytest.raises(DataFormatError, match="index.json: invalid JSON"):
        read_index(tmp_path)
