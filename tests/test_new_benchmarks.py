"""SugarCrepe, MMVP-VLM and CLEVR (GDBench's): readers, writers and metrics against each release.

Fixtures are written by hand in each release's own layout (RAIVNLab/sugar-crepe `data/<subset>.json`
over COCO val2017; MMVP-VLM's `Questions.csv` + image folder; McGill-NLP/diffusion-itm's
`data/clevr/captions/<subtask>.json` + `images/`), never with this project's writers; the writers
are checked by round trips. Each metric is compared with the release's own rule, written out here
from the release's code (file and line cited), not from `pipeline.metrics`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import comparison, metrics
from pipeline.config import CLEVR_SUBTASKS, SUGARCREPE_SUBSETS
from pipeline.data import clevr, mmvp, sugarcrepe
from pipeline.data.errors import DataFormatError, MissingDataError
from pipeline.data.records import ChoiceCase


def image(path: Path, colour=(200, 30, 30), fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), colour).save(path, format=fmt)
    return path


def one_line(error: pytest.ExceptionInfo, *needles: str) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


# ================================================================== SugarCrepe
#
# The release's data/swap_obj.json, abridged: 4-space indent, ids as strings, and no "108"
# (the release removed that case), so ids are not contiguous.
SWAP_OBJ = """{
    "0": {
        "filename": "000000222235.jpg",
        "caption": "A cat sits on its hind legs, and swats at the plant.",
        "negative_caption": "A cat sits on the plant, and swats at its hind legs."
    },
    "107": {
        "filename": "000000480021.jpg",
        "caption": "A man on a motorcycle is waving at two men.",
        "negative_caption": "Two men on a motorcycle are waving at a man."
    },
    "109": {
        "filename": "000000222235.jpg",
        "caption": "A cat swats at the plant.",
        "negative_caption": "A plant swats at the cat."
    }
}
"""
ADD_ATT = """{
    "0": {
        "filename": "000000085329.jpg",
        "caption": "A drawing of a young woman with many facial piercings.",
        "negative_caption": "A drawing of a tattooed young woman with many facial piercings."
    }
}
"""


@pytest.fixture
def sugarcrepe_release(tmp_path):
    data, images = tmp_path / "sugar-crepe" / "data", tmp_path / "coco" / "val2017"
    data.mkdir(parents=True)
    (data / "swap_obj.json").write_text(SWAP_OBJ, encoding="utf-8")
    (data / "add_att.json").write_text(ADD_ATT, encoding="utf-8")
    for name in ("000000222235.jpg", "000000480021.jpg", "000000085329.jpg"):
        image(images / name, fmt="JPEG")
    return data, images


def test_sugarcrepe_reads_published_layout(sugarcrepe_release):
    data, images = sugarcrepe_release
    sets = sugarcrepe.read_sugarcrepe(data, images, ["swap_obj", "add_att"])
    assert list(sets) == ["swap_obj", "add_att"]
    assert sets["swap_obj"] == [
        ChoiceCase(images / "000000222235.jpg", ("A cat sits on its hind legs, and swats at the plant.",
                                                 "A cat sits on the plant, and swats at its hind legs."), 0),
        ChoiceCase(images / "000000480021.jpg", ("A man on a motorcycle is waving at two men.",
                                                 "Two men on a motorcycle are waving at a man."), 0),
        ChoiceCase(images / "000000222235.jpg", ("A cat swats at the plant.", "A plant swats at the cat."), 0),
    ]
    assert len(sets["add_att"]) == 1


def test_sugarcrepe_subsets_and_published_sizes():
    """The release's seven files (main_eval.py `data_dict`) and their sizes (7,511 cases)."""
    assert tuple(sugarcrepe.SUBSET_SIZES) == SUGARCREPE_SUBSETS
    assert sum(sugarcrepe.SUBSET_SIZES.values()) == 7511 and sugarcrepe.SUBSET_SIZES["swap_obj"] == 245
    assert sorted(s for names in metrics.SUGARCREPE_CATEGORIES.values() for s in names) == sorted(SUGARCREPE_SUBSETS)


def test_sugarcrepe_round_trip(sugarcrepe_release, tmp_path):
    _, images = sugarcrepe_release
    records = [{"filename": "000000480021.jpg", "caption": "a b", "negative_caption": "b a", "other": 1},
               {"filename": "000000085329.jpg", "caption": "c", "negative_caption": "d"}]
    path = sugarcrepe.subset_file(tmp_path / "out", "add_obj")
    sugarcrepe.write_subset(path, records)
    assert json.loads(path.read_text()) == {"0": {"filename": "000000480021.jpg", "caption": "a b",
                                                  "negative_caption": "b a"},
                                            "1": {"filename": "000000085329.jpg", "caption": "c",
                                                  "negative_caption": "d"}}
    assert [c.options for c in sugarcrepe.read_subset(path, images)] == [("a b", "b a"), ("c", "d")]
    with pytest.raises(DataFormatError) as error:
        sugarcrepe.write_subset(path, [{"filename": "x.jpg", "caption": "c"}])
    one_line(error, "add_obj.json", "record '0'", "'negative_caption' is missing")


@pytest.mark.parametrize(("change", "where", "field"), [
    (lambda d: d["107"].pop("negative_caption"), "record '107'", "negative_caption"),
    (lambda d: d["109"].update(caption=None), "record '109'", "caption"),
    (lambda d: d["0"].update(filename="000000999999.jpg"), "record '0'", "filename"),
    (lambda d: d.update({"110": ["a", "b"]}), "record '110'", None),
])
def test_sugarcrepe_malformed_records(sugarcrepe_release, change, where, field):
    data, images = sugarcrepe_release
    document = json.loads(SWAP_OBJ)
    change(document)
    (data / "swap_obj.json").write_text(json.dumps(document))
    with pytest.raises(DataFormatError) as error:
        sugarcrepe.read_sugarcrepe(data, images, ["swap_obj"])
    one_line(error, "swap_obj.json", where, *([f"'{field}'"] if field else []))


def test_sugarcrepe_bad_file_and_missing_file(sugarcrepe_release):
    data, images = sugarcrepe_release
    (data / "swap_obj.json").write_text("[]")
    with pytest.raises(DataFormatError) as error:
        sugarcrepe.read_sugarcrepe(data, images, ["swap_obj"])
    one_line(error, "swap_obj.json", "must be an object")
    with pytest.raises(MissingDataError, match="replace_rel.json: missing SugarCrepe subset file"):
        sugarcrepe.read_sugarcrepe(data, images, ["replace_rel"])


@pytest.mark.parametrize(("benchmark", "write", "message"), [
    ("sugarcrepe", lambda root: (root / "swap_obj.json").write_text("{}"), "swap_obj.json: holds no case"),
    ("clevr", lambda root: (root / "captions" / "spatial.json").write_text("{}"), "spatial.json: holds no case"),
    ("mmvp", lambda root: (root / "Questions.csv").write_text("Question ID,Type,Statement\n"),
     "Questions.csv: holds no pair"),
])
def test_an_empty_file_is_refused(tmp_path, benchmark, write, message):
    """An empty subset would leave a benchmark without cases, scored as nothing at all."""
    root = tmp_path / benchmark
    (root / "captions").mkdir(parents=True)
    (root / "images").mkdir()
    (root / "MLLM_VLM Images").mkdir()
    write(root)
    read = {"sugarcrepe": lambda: sugarcrepe.read_sugarcrepe(root, root, ["swap_obj"]),
            "clevr": lambda: clevr.read_clevr(root, ["spatial"]),
            "mmvp": lambda: mmvp.read_mmvp(root)}[benchmark]
    with pytest.raises(DataFormatError) as error:
        read()
    one_line(error, message)


def release_text_retrieval(pos_score: float, neg_score: float) -> int:
    """RAIVNLab/sugar-crepe main_eval.py:54 (commit 0047054): `return 1 if pos_score.item() > neg_score.item() else 0`."""
    return 1 if pos_score > neg_score else 0


def test_sugarcrepe_metric_is_the_release_rule_ties_wrong():
    scores = {"add_obj": [[0.3, 0.2], [0.2, 0.2], [0.1, 0.4]],   # right, tie, wrong
              "add_att": [[0.5, 0.1]],
              "replace_rel": [[0.2, 0.2000001], [0.9, 0.1]],
              "swap_att": [[0.3, 0.3], [0.1, 0.0], [0.4, 0.5], [0.6, 0.2]]}
    correct = {name: metrics.sugarcrepe_correct(s) for name, s in scores.items()}
    for name, s in scores.items():
        # main_eval.py:67 `metrics[c] = correct_cnt / count`
        reference = sum(release_text_retrieval(p, n) for p, n in s) / len(s)
        assert correct[name].tolist() == [bool(release_text_retrieval(p, n)) for p, n in s]
        assert metrics.sugarcrepe(correct)[name] == pytest.approx(reference)
    out = metrics.sugarcrepe(correct)
    # Hand count: add 2 of 4 cases, replace 1 of 2, swap 2 of 4; mean pools all 10 cases (5 right),
    # not the mean of the four subsets' accuracies (1/3, 1, 1/2, 1/2).
    assert out["add"] == pytest.approx(2 / 4) and out["replace"] == pytest.approx(1 / 2)
    assert out["swap"] == pytest.approx(2 / 4) and out["mean"] == pytest.approx(5 / 10)
    assert set(out) == {"add_obj", "add_att", "replace_rel", "swap_att", "add", "replace", "swap", "mean"}
    assert set(metrics.sugarcrepe({"swap_obj": [True]})) == {"swap_obj", "swap", "mean"}


@pytest.mark.parametrize(("call", "match"), [
    (lambda: metrics.sugarcrepe_correct([[1.0, 2.0, 3.0]]), r"shape \[N, 2\]"),
    (lambda: metrics.sugarcrepe_correct([[np.nan, 2.0]]), "NaN at case index 0"),
    (lambda: metrics.sugarcrepe({}), "no subset"),
    (lambda: metrics.sugarcrepe({"add_colour": [True]}), "unknown subsets"),
    (lambda: metrics.sugarcrepe({"add_obj": []}), "is empty"),
])
def test_sugarcrepe_metric_rejects_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ================================================================== MMVP-VLM

TYPES = ("Orientation", "Presence", "State", "Quantity", "Spatial", "Color", "Structural Character", "Text",
         "Camera Perspective")


def questions_csv(types=TYPES, per_type: int = 15) -> str:
    """Questions.csv as the hub dataset MMVP/MMVP_VLM has it: a header, then two rows per pair, ids
    counting from 1 (odd: the pair's first image), types in blocks; statements may be quoted."""
    lines, qid = ["Question ID,Type,Statement"], 0
    for kind in types:
        for _ in range(per_type):
            lines.append(f'{qid + 1},{kind},"The dog\'s head is up, facing the camera"')
            lines.append(f"{qid + 2},{kind},The dog's head is down")
            qid += 2
    return "\n".join(lines) + "\n"


@pytest.fixture(params=mmvp.IMAGE_DIRS)
def mmvp_release(request, tmp_path):
    root = tmp_path / "MMVP_VLM"
    root.mkdir()
    (root / "Questions.csv").write_text(questions_csv(), encoding="utf-8")
    for k, kind in enumerate(TYPES):
        for qid in range(30 * k + 1, 30 * k + 31):
            image(root / request.param / kind / f"{qid}.jpg", (qid % 256, 0, 0), fmt="JPEG")
    return root


def test_mmvp_reads_published_layout_under_either_folder_spelling(mmvp_release):
    pairs = mmvp.read_mmvp(mmvp_release)
    assert len(pairs) == 135
    first = pairs[0]
    assert first.statement_1 == "The dog's head is up, facing the camera" and first.statement_2 == "The dog's head is down"
    assert (first.answer_1, first.answer_2, first.qids) == (0, 1, (1, 2))
    assert first.image_1.name == "1.jpg" and first.image_2.name == "2.jpg"
    assert first.image_1.parent.name == "Orientation" and first.image_1.parent.parent.name in mmvp.IMAGE_DIRS
    # evaluate_vlm.py:82 `current_category = categories[num_pairs // 15]`
    assert [p.pattern for p in pairs[::15]] == list(mmvp.PATTERNS)
    assert pairs[134].pattern == "Viewpoint and Perspective" and pairs[134].image_2.parent.name == "Camera Perspective"
    assert mmvp.prompt(first.statement_2) == "a photo of The dog's head is down"  # evaluate_vlm.py:52-53
    assert [mmvp.metric_name(p) for p in mmvp.PATTERNS][:2] == ["mmvp/orientation_and_direction",
                                                               "mmvp/presence_of_specific_features"]


def test_mmvp_answers_follow_the_question_id_parity(tmp_path):
    """evaluate_vlm.py:76-77 `gt = "img1" if qid % 2 == 1 else "img2"`; both images come from the first
    row's Type folder (evaluate_vlm.py:49-50), and patterns come by position."""
    root = tmp_path / "m"
    (root).mkdir()
    (root / "Questions.csv").write_text("Question ID,Type,Statement\n4,Color,red\n7,Color,blue\n"
                                        "9,Size,big\n10,Size,small\n")
    for kind, qid in (("Color", 4), ("Color", 7), ("Size", 9), ("Size", 10)):
        image(root / "MLLM_VLM_Images" / kind / f"{qid}.jpg", fmt="JPEG")
    pairs = mmvp.read_mmvp(root, ["Color and Appearance", "Size"])
    assert [(p.answer_1, p.answer_2) for p in pairs] == [(1, 0), (0, 1)]
    assert [p.pattern for p in pairs] == ["Color and Appearance", "Size"]


def test_mmvp_both_folder_spellings_or_none(mmvp_release):
    (mmvp_release / "MLLM_VLM Images").mkdir(exist_ok=True)
    (mmvp_release / "MLLM_VLM_Images").mkdir(exist_ok=True)
    with pytest.raises(DataFormatError) as error:
        mmvp.read_mmvp(mmvp_release)
    one_line(error, "MLLM_VLM Images", "MLLM_VLM_Images", "keep one")
    for name in mmvp.IMAGE_DIRS:
        (mmvp_release / name).rename(mmvp_release / f"old-{name}")
    with pytest.raises(MissingDataError, match="MMVP-VLM image folder"):
        mmvp.read_mmvp(mmvp_release)


@pytest.mark.parametrize(("text", "where", "field"), [
    ("Question ID,Type,Statement\n1,Color,red\n", "line 2", None),                        # no second row
    ("Question ID,Type,Statement\n1,Color,red\nx,Color,blue\n", "line 3", "Question ID"),
    ("Question ID,Type,Statement\n1,Color,red\n2,Color\n", "line 3", None),
    ("Question ID,Type,Statement\n1,Color,red\n2,Color, \n", "line 3", "Statement"),
    ("Question ID,Type,Statement\n1,Color,red\n2,Size,blue\n", "line 3", "Type"),
    ("Question ID,Type,Statement\n1,Color,red\n3,Color,blue\n", "line 3", "Question ID"),  # 3.jpg missing
    ("1,Color,red\n2,Color,blue\n", "line 1", None),                                       # no header
])
def test_mmvp_malformed_rows(tmp_path, text, where, field):
    root = tmp_path / "m"
    root.mkdir()
    (root / "Questions.csv").write_text(text)
    for qid in (1, 2):
        image(root / "MLLM_VLM Images" / "Color" / f"{qid}.jpg", fmt="JPEG")
    with pytest.raises(DataFormatError) as error:
        mmvp.read_mmvp(root, ["Color and Appearance"])
    one_line(error, "Questions.csv", f": {where}: ", *([f"'{field}'"] if field else []))


def test_mmvp_pairs_must_split_evenly_into_patterns(mmvp_release):
    with pytest.raises(DataFormatError) as error:
        mmvp.read_mmvp(mmvp_release, ["a", "b"])
    one_line(error, "Questions.csv", "135 pairs, not a multiple of its 2 patterns")


def test_mmvp_round_trip(tmp_path):
    rows = [{"Question ID": 1, "Type": "Color", "Statement": "a red, round ball"},
            {"Question ID": 2, "Type": "Color", "Statement": 'a "blue" ball'}]
    mmvp.write_mmvp(tmp_path, rows)
    for qid in (1, 2):
        image(tmp_path / "MLLM_VLM Images" / "Color" / f"{qid}.jpg", fmt="JPEG")
    [pair] = mmvp.read_mmvp(tmp_path, ["Color and Appearance"])
    assert (pair.statement_1, pair.statement_2, pair.answer_1, pair.answer_2) == ("a red, round ball", 'a "blue" ball', 0, 1)
    with pytest.raises(DataFormatError) as error:
        mmvp.write_mmvp(tmp_path, rows + [{"Question ID": 3, "Type": "Color", "Statement": "x"}])
    one_line(error, "Questions.csv", "line 4", "no second row")


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def release_mmvp(similarity: np.ndarray, qids: list[tuple[int, int]], categories: list[str], per_category: int):
    """tsb0601/MMVP scripts/evaluate_vlm.py (commit 7635005), lines 60-91, on cosine similarities
    similarity[i, k, j] (statement k, image j of pair i): CLIP's logits (100 x cosine) softmaxed over
    the two images, `pred = "img1" if img1_score > 0.5 else "img2"`, `gt = "img1" if qid % 2 == 1
    else "img2"`, a pair right when both match, the category `categories[num_pairs // 15]` (15 =
    `per_category`), each category's count over `num_pairs // len(categories)`; DIVA's average_score
    (run_DIVA_with_OpenAICLIP.py:273) is the plain mean of the categories."""
    pair_accuracies = {category: 0 for category in categories}
    for num_pairs, ((qid1, qid2), sims) in enumerate(zip(qids, similarity)):
        probs1, probs2 = softmax(100.0 * sims[0]), softmax(100.0 * sims[1])
        pred1 = "img1" if probs1[0] > 0.5 else "img2"
        pred2 = "img1" if probs2[0] > 0.5 else "img2"
        gt1 = "img1" if qid1 % 2 == 1 else "img2"
        gt2 = "img1" if qid2 % 2 == 1 else "img2"
        if pred1 == gt1 and pred2 == gt2:
            pair_accuracies[categories[num_pairs // per_category]] += 1
    scores = {c: n / (len(qids) // len(categories)) for c, n in pair_accuracies.items()}
    return scores, sum(scores.values()) / len(scores)


def test_mmvp_metric_by_hand_with_ties():
    # statement 1 wants image 1 (qid odd), statement 2 image 2: a tie picks image 2, so it is
    # wrong for statement 1 and right for statement 2.
    sims = np.array([
        [[0.3, 0.1], [0.1, 0.3]],   # both right
        [[0.2, 0.2], [0.1, 0.3]],   # statement 1 tied: picks image 2, wrong
        [[0.3, 0.1], [0.2, 0.2]],   # statement 2 tied: picks image 2, right
        [[0.3, 0.1], [0.3, 0.1]],   # statement 2 picks image 1, wrong
    ])
    qids = [(1, 2), (3, 4), (5, 6), (7, 8)]
    answers = [(0 if a % 2 else 1, 0 if b % 2 else 1) for a, b in qids]
    correct = metrics.mmvp_correct(sims, answers)
    assert correct.tolist() == [True, False, True, False]
    out = metrics.mmvp(correct, ["A", "A", "B", "B"])
    assert out == {"A": 0.5, "B": 0.5, "mean": 0.5}
    reference, mean = release_mmvp(sims, qids, ["A", "B"], 2)
    assert reference == {"A": out["A"], "B": out["B"]} and mean == out["mean"]


def test_mmvp_metric_matches_the_release_on_random_pairs():
    rng = np.random.default_rng(0)
    sims = rng.uniform(-0.2, 0.4, size=(135, 2, 2))
    sims[::7, 0, 1] = sims[::7, 0, 0]  # exact ties, which the release sends to image 2
    qids = [(2 * k + 1, 2 * k + 2) if k % 5 else (2 * k + 2, 2 * k + 1) for k in range(135)]
    answers = [(0 if a % 2 else 1, 0 if b % 2 else 1) for a, b in qids]
    patterns = [mmvp.PATTERNS[k // 15] for k in range(135)]
    out = metrics.mmvp(metrics.mmvp_correct(sims, answers), patterns)
    reference, mean = release_mmvp(sims, qids, list(mmvp.PATTERNS), 15)
    assert {p: out[p] for p in mmvp.PATTERNS} == pytest.approx(reference)
    assert out["mean"] == pytest.approx(mean)


def test_mmvp_mean_weighs_each_pattern_the_same():
    out = metrics.mmvp([True, True, True, False], ["a", "b", "b", "b"])
    assert out["mean"] == pytest.approx((1 + 2 / 3) / 2)


@pytest.mark.parametrize(("call", "match"), [
    (lambda: metrics.mmvp_correct(np.zeros((2, 2)), [[0, 1]]), r"shape \[N, 2, 2\]"),
    (lambda: metrics.mmvp_correct(np.zeros((1, 2, 2)), [[0, 2]]), "0 or 1"),
    (lambda: metrics.mmvp_correct(np.zeros((1, 2, 2)), [0, 1]), r"\[1, 2\]"),
    (lambda: metrics.mmvp_correct(np.full((1, 2, 2), np.nan), [[0, 1]]), "NaN at pair index 0"),
    (lambda: metrics.mmvp([True], ["a", "b"]), "2 entries for 1 pairs"),
    (lambda: metrics.mmvp([True], ["mean"]), "cannot name a pattern"),
])
def test_mmvp_metric_rejects_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ================================================================== CLEVR (GDBench)

# McGill-NLP/diffusion-itm data/clevr/captions/, the first image of each file (true caption first).
GDBENCH = {
    "pair_binding_size": [["A small cylinder and a large sphere.", "A large cylinder and a small sphere."],
                          ["A large sphere and a small cylinder.", "A small sphere and a large cylinder."]],
    "recognition_color": [["A gray object.", "A blue object."], ["A purple object.", "A blue object."]],
    "spatial": [["On the right is a gray cylinder.", "On the left is a gray cylinder."],
                ["On the left is a purple sphere.", "On the right is a purple sphere."]],
}


@pytest.fixture
def clevr_release(tmp_path):
    root = tmp_path / "clevr"
    (root / "captions").mkdir(parents=True)
    for subtask, cases in GDBENCH.items():
        (root / "captions" / f"{subtask}.json").write_text(
            json.dumps({"CLEVR_val2_000138.png": cases, "CLEVR_new_000048.png": cases[:1]}))
    for name in ("CLEVR_val2_000138.png", "CLEVR_new_000048.png"):
        image(root / "images" / name, fmt="PNG")
    return root


def test_clevr_reads_published_layout(clevr_release):
    sets = clevr.read_clevr(clevr_release, list(GDBENCH))
    assert list(sets) == list(GDBENCH)
    spatial = sets["spatial"]
    assert [c.options for c in spatial] == [tuple(GDBENCH["spatial"][0]), tuple(GDBENCH["spatial"][1]),
                                           tuple(GDBENCH["spatial"][0])]
    assert all(c.answer == 0 for c in spatial)
    assert [c.image.name for c in spatial] == ["CLEVR_val2_000138.png"] * 2 + ["CLEVR_new_000048.png"]
    # datasets_loading.py:732, the release's subtasks in its order
    assert CLEVR_SUBTASKS == ("pair_binding_size", "pair_binding_color", "recognition_color", "recognition_shape",
                              "spatial", "binding_color_shape", "binding_shape_color")


def test_clevr_round_trip(clevr_release):
    path = clevr.subtask_file(clevr_release, "recognition_shape")
    clevr.write_subtask(path, {"CLEVR_new_000048.png": [["A cube.", "A sphere."]]})
    [case] = clevr.read_clevr(clevr_release, ["recognition_shape"])["recognition_shape"]
    assert case.options == ("A cube.", "A sphere.") and case.answer == 0
    with pytest.raises(DataFormatError) as error:
        clevr.write_subtask(path, {"CLEVR_new_000048.png": [["A cube."]]})
    one_line(error, "recognition_shape.json", "record 'CLEVR_new_000048.png'", "'[0]'")


@pytest.mark.parametrize(("change", "where", "field"), [
    (lambda d: d.update({"CLEVR_val9_000001.png": [["a", "b"]]}), "record 'CLEVR_val9_000001.png'", "filename"),
    (lambda d: d["CLEVR_new_000048.png"].append(["a", "b", "c"]), "record 'CLEVR_new_000048.png'", "[1]"),
    (lambda d: d["CLEVR_new_000048.png"].append(["a", 3]), "record 'CLEVR_new_000048.png'", "[1]"),
    (lambda d: d.update({"CLEVR_new_000048.png": "a"}), "record 'CLEVR_new_000048.png'", None),
])
def test_clevr_malformed_records(clevr_release, change, where, field):
    path = clevr.subtask_file(clevr_release, "spatial")
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))
    with pytest.raises(DataFormatError) as error:
        clevr.read_clevr(clevr_release, ["spatial"])
    one_line(error, "spatial.json", where, *([f"'{field}'"] if field else []))


def test_clevr_missing_images_folder(clevr_release):
    (clevr_release / "images").rename(clevr_release / "elsewhere")
    with pytest.raises(MissingDataError, match="missing CLEVR images folder"):
        clevr.read_clevr(clevr_release, ["spatial"])


def release_clevr(scores: dict[str, list[list[float]]]) -> tuple[dict[str, float], float]:
    """McGill-NLP/diffusion-itm (commit 7d5a9c0): each case's label is 0, the true caption first
    (datasets_loading.py:741, CLEVRDataset); utils.py:35 `if img_idx[i] == np.argmax(scores[i])`;
    diffusion_itm.py:124 `acc = sum(metrics) / len(metrics)` over every case, and per subtask the
    same over its cases (diffusion_itm.py:133-140)."""
    per = {name: [1 if np.argmax(s) == 0 else 0 for s in cases] for name, cases in scores.items()}
    every = [v for values in per.values() for v in values]
    return {name: sum(v) / len(v) for name, v in per.items()}, sum(every) / len(every)


def test_clevr_metric_is_the_release_rule_ties_right():
    scores = {"spatial": [[0.3, 0.2], [0.2, 0.2], [0.1, 0.4]],   # right, tie (right), wrong
              "recognition_color": [[-1.0, -2.0], [-3.0, -2.0]]}
    correct = {name: metrics.clevr_correct(s) for name, s in scores.items()}
    assert correct["spatial"].tolist() == [True, True, False]
    out = metrics.clevr(correct)
    reference, mean = release_clevr(scores)
    assert {k: out[k] for k in reference} == pytest.approx(reference) and out["mean"] == pytest.approx(mean)
    assert out["mean"] == pytest.approx(3 / 5)  # pooled: 3 of 5 cases, not the mean of 2/3 and 1/2


@pytest.mark.parametrize(("call", "match"), [
    (lambda: metrics.clevr_correct([[1.0]]), r"shape \[N, 2\]"),
    (lambda: metrics.clevr({}), "no subset"),
    (lambda: metrics.clevr({"mean": [True]}), "cannot name a subtask"),
    (lambda: metrics.clevr({"spatial": [2]}), "booleans or 0/1"),
])
def test_clevr_metric_rejects_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ================================================================== composites for paired comparisons


def test_outcome_parts_rebuild_the_composites_from_their_parts():
    """What `pipeline.evaluate` stores (each subset's / pattern's cases) gives back the composite
    values: SugarCrepe's and CLEVR's pooled means, MMVP's mean over patterns; over two seeds too."""
    rng = np.random.default_rng(1)
    sizes = {"add_obj": 5, "add_att": 3, "replace_rel": 4, "swap_obj": 2}
    runs = []
    for _ in range(2):
        run = {f"sugarcrepe/{s}": rng.random(n) < 0.5 for s, n in sizes.items()}
        run.update({"mmvp/a": rng.random(3) < 0.5, "mmvp/b": rng.random(6) < 0.5,
                    "clevr/spatial": rng.random(4) < 0.5, "clevr/recognition_color": rng.random(2) < 0.5})
        runs.append(run)
    stored = [{name: {"correct": metrics.encode_correct(c), "groups": None, "cases": "fixture"} for name, c in run.items()} for run in runs]
    parts = comparison.outcome_parts(stored)
    for seed, run in enumerate(runs):
        one = comparison.outcome_parts([stored[seed]])
        expected = metrics.sugarcrepe({n[len("sugarcrepe/"):]: c for n, c in run.items() if n.startswith("sugarcrepe/")})
        for key in ("add", "replace", "swap", "mean"):
            assert comparison.metric_value(one[f"sugarcrepe/{key}"]) == pytest.approx(expected[key]), key
        mm = metrics.mmvp(np.concatenate([run["mmvp/a"], run["mmvp/b"]]), ["a"] * 3 + ["b"] * 6)
        assert comparison.metric_value(one["mmvp/mean"]) == pytest.approx(mm["mean"])
        cl = metrics.clevr({"spatial": run["clevr/spatial"], "recognition_color": run["clevr/recognition_color"]})
        assert comparison.metric_value(one["clevr/mean"]) == pytest.approx(cl["mean"])
    pooled = np.concatenate([np.concatenate([run[f"sugarcrepe/{s}"] for s in sizes]) for run in runs]).mean()
    assert comparison.metric_value(parts["sugarcrepe/mean"]) == pytest.approx(pooled)
    assert "sugarcrepe/swap" in parts and parts["sugarcrepe/swap"][0].cases == 2


# ================================================================== scored by the student and by the teacher


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """The toy world's new sets scored by a tiny student and by a tiny teacher's diffusion score,
    the teacher reading the latents and text conditioning the cache stage writes."""
    from pipeline.cache import open_table
    from pipeline.config import Config, DataConfig, EvalConfig
    from pipeline.data.build import build_toy
    from pipeline.data.datasets import benchmarks, read_index
    from pipeline.evaluate import evaluate_student, evaluate_teacher
    from pipeline.latents import build_cache
    from pipeline.models.student import build_toy_student
    from pipeline.models.teacher import build_toy_teacher
    from tiny import SIZE, STUDENT, TEACHER

    root = tmp_path_factory.mktemp("scored")
    build_toy(DataConfig(n_train=4, n_winoground=2, n_aro=2, n_zeroshot_per_class=1, n_sugarcrepe=3, n_mmvp=2,
                         n_clevr=2, sugarcrepe_subsets=["swap_att", "add_obj", "replace_rel"]), root / "data")
    bench = benchmarks(root / "data", read_index(root / "data"))
    teacher = build_toy_teacher(TEACHER, SIZE)
    build_cache(Config(), teacher, "tiny", root / "data", root / "cache")
    cfg = EvalConfig(diffusion_samples=2, batch_size=16, bootstrap=0, vg_attribution_min_cases=1)
    student = evaluate_student(build_toy_student(STUDENT, SIZE), bench, cfg)
    diffusion = evaluate_teacher(teacher, open_table(root / "cache", "bench_images"),
                                 open_table(root / "cache", "bench_text"), bench, cfg)
    return bench, student, diffusion


NAMES = (["sugarcrepe/swap_att", "sugarcrepe/add_obj", "sugarcrepe/replace_rel", "sugarcrepe/add",
          "sugarcrepe/replace", "sugarcrepe/swap", "sugarcrepe/mean", "mmvp/quantity_and_count",
          "mmvp/positional_and_relational_context", "mmvp/color_and_appearance", "mmvp/size", "mmvp/mean"]
         + [f"clevr/{s}" for s in CLEVR_SUBTASKS] + ["clevr/mean"])


@pytest.mark.parametrize("row", ["student", "diffusion"])
def test_every_row_reports_the_new_sets_and_their_outcomes_give_them_back(scored, row):
    bench, student, diffusion = scored
    result = {"student": student, "diffusion": diffusion}[row]
    assert set(NAMES) <= set(result.metrics)
    assert not {n for n in result.metrics if n.startswith(("sugarcrepe/", "mmvp/", "clevr/"))} - set(NAMES)
    parts = comparison.outcome_parts([result.outcomes])
    for name in NAMES:
        assert comparison.metric_value(parts[name]) == pytest.approx(result.metrics[name]), name
    assert len(result.outcomes["sugarcrepe/add_obj"]["correct"]) == 3
    assert len(result.outcomes["mmvp/size"]["correct"]) == 2 and len(result.outcomes["clevr/spatial"]["correct"]) == 4
    composites = {"sugarcrepe/add", "sugarcrepe/replace", "sugarcrepe/swap", "sugarcrepe/mean", "mmvp/mean", "clevr/mean"}
    assert not composites & set(result.outcomes)  # rebuilt from their parts, never stored twice


def test_mmvp_is_scored_in_the_release_prompt(scored):
    from pipeline.data.keys import mmvp_pairs

    bench, _, _ = scored
    images, captions = mmvp_pairs(bench.mmvp[:1])
    pair = bench.mmvp[0]
    assert captions == [f"a photo of {pair.statement_1}"] * 2 + [f"a photo of {pair.statement_2}"] * 2
    assert [Path(k).name for k in images] == [pair.image_1.name, pair.image_2.name] * 2
