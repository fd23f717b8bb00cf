"""The paper profile's data: fast failure, and every loader on a fixture in its published format.

The fixtures are written by hand in each release's own layout (COCO 2017 captions,
Winoground's hub repo and its Parquet version, the ARO authors' JSON files and BLIP's Karpathy splits, CC-3M as
TSV and webdataset, torchvision's on-disk layout of each zero-shot set), never with this
project's writers. Where torchvision checks an md5 of the real release (CIFAR, STL-10,
Flowers102), the tests replace only that checksum with an existence check.
"""
from __future__ import annotations

import io
import json
import os
import random
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from pipeline.config import CLEVR_SUBTASKS, SUGARCREPE_SUBSETS, ZEROSHOT_SETS, DataConfig, load
from pipeline.data import aro, cc3m, datasets, paper, torchvision_sets
from pipeline.data.build import build_data
from pipeline.data.datasets import benchmarks, read_index, train_pairs
from pipeline.data.errors import DataFormatError, MissingDataError
from pipeline.data.records import load_image
from published import (COLOURS, WINOGROUND_ROWS, clevr_release, coco_2017, dump, image_bytes, mmvp_release,
                       offline_hub_env, paper_datasets, put, sugarcrepe_release, tar_shard, winoground_parquet,
                       winoground_repo)

REPO = Path(__file__).resolve().parents[1]
PYTHON = REPO / ".venv" / "bin" / "python"


@pytest.fixture
def md5_as_existence(monkeypatch):
    """torchvision checks the real releases' md5s for these three; the fixtures only need to exist."""
    import torchvision.datasets.cifar
    import torchvision.datasets.flowers102
    import torchvision.datasets.stl10

    exists = lambda path, md5=None: os.path.isfile(path)  # noqa: E731
    for module in (torchvision.datasets.cifar, torchvision.datasets.stl10, torchvision.datasets.flowers102):
        monkeypatch.setattr(module, "check_integrity", exists)


def word_lexicon(folder: Path) -> Path:
    """A JSON part-of-speech lexicon for the training captions' hard negatives (no spaCy here)."""
    return dump(folder / "words.json", {"dog": "NOUN", "beach": "NOUN", "cat": "NOUN", "sofa": "NOUN",
                                        "brown": "ADJ", "red": "ADJ", "sleeps": "VERB", "runs": "VERB"})


def paper_data_config(tmp_path: Path, **changes) -> DataConfig:
    """The paper profile's data section with every root pointing at the fixtures (relative to tmp_path)."""
    return DataConfig(**{"source": "paper", **paper_datasets(tmp_path), **changes})


# ---------------------------------------------------------------- fast, one-line failure


def paper_params(folder: Path, data: dict | None = None) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["profile"] = "paper"
    params["profiles"]["paper"]["data"].update(data or {})
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def test_paper_profile_without_data_stops_before_the_heavy_imports_with_one_line(tmp_path):
    """What keeps the stop well under a second: none of torch, diffusers, open_clip, mlflow is imported
    (a check of what ran, not of a time, which the machine's load would decide)."""
    params = paper_params(tmp_path)
    script = ("import sys; from stages import data; code = data.main(['--params', sys.argv[1]]); "
              "print(*[m for m in ('torch', 'diffusers', 'open_clip', 'mlflow', 'ray') if m in sys.modules]); "
              "sys.exit(code)")
    proc = subprocess.run([str(PYTHON), "-c", script, str(params)], cwd=REPO, capture_output=True, text=True)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and proc.stdout == "\n", proc.stdout
    assert lines[0].startswith("error: data.coco_annotations: ")
    assert "captions_train2017.json" in lines[0] and "more missing" in lines[0]
    assert lines[0].endswith("see README: Running the paper profile")
    assert not (tmp_path / "data").exists()


def test_the_readme_section_the_message_points_at_exists():
    readme = (REPO / "README.md").read_text()
    assert "\n## Running the paper profile\n" in readme
    section = readme.split("\n## Running the paper profile\n", 1)[1].split("\n## ", 1)[0]
    for needle in ("captions_train2017.json", "facebook/winoground", "visual_genome_relation.json",
                   "coco_karpathy_test.json", "flickr30k_test.json", "CompVis/stable-diffusion-v1-4",
                   "stabilityai/stable-diffusion-2-1", "ViT-B-16-quickgelu", "laion2b_s34b_b88k", "coca_ViT-B-32",
                   "en_core_web_sm", *ZEROSHOT_SETS):
        assert needle in section, needle


def test_problems_name_every_missing_input(tmp_path):
    cfg = DataConfig(source="paper", coco_annotations="", coco_images="nowhere", winoground="./wino",
                     aro_root="aro", coco_order_root="", flickr_order_root="f", order_tagger="missing.json",
                     zeroshot_root="tv")
    keys = [p.key for p in paper.problems(cfg, tmp_path)]
    for key in ("data.coco_annotations", "data.coco_images", "data.winoground", "data.aro_root",
                "data.coco_order_root", "data.flickr_order_root", "data.order_tagger", "data.zeroshot_root"):
        assert key in keys
    with pytest.raises(paper.PaperDataMissing) as err:
        paper.check_paper_data(cfg, tmp_path)
    message = str(err.value)
    assert "\n" not in message and message.startswith("data.coco_annotations: not set")
    assert message.endswith("; see README: Running the paper profile")


def test_missing_zero_shot_set_and_cc3m_are_named(tmp_path):
    (tmp_path / "tv" / "cifar-10-batches-py").mkdir(parents=True)
    cfg = DataConfig(source="paper", train_set="cc3m", cc3m="cc3m.tsv", aro_sets=[], zeroshot_root="tv",
                     zeroshot_sets=["cifar10"], winoground="./w")
    lines = [p.line() for p in paper.problems(cfg, tmp_path)]
    assert lines[0].startswith("data.cc3m: ") and "cc3m.tsv not found" in lines[0]
    assert any("cifar-10-batches-py/test_batch" in line and "cifar10" in line for line in lines)


def test_spacy_tagger_missing_is_named(tmp_path, monkeypatch):
    real = paper.importlib.util.find_spec
    monkeypatch.setattr(paper.importlib.util, "find_spec", lambda name: None if name == "spacy" else real(name))
    cfg = DataConfig(source="paper", aro_sets=["coco_order"], order_tagger="spacy:en_core_web_sm")
    [problem] = [p for p in paper.problems(cfg, tmp_path) if p.key == "data.order_tagger"]
    assert "pip install spacy" in problem.message and "en_core_web_sm" in problem.message


def test_a_dataset_inside_data_is_refused(tmp_path):
    (tmp_path / "data" / "coco" / "train2017").mkdir(parents=True)
    cfg = DataConfig(source="paper", coco_images="data/coco/train2017", aro_sets=[], zeroshot_sets=[])
    [problem] = [p for p in paper.problems(cfg, tmp_path) if p.key == "data.coco_images"]
    assert f"is inside {(tmp_path / 'data').resolve()}, which the data stage replaces" in problem.message


def test_help_is_not_taken_for_a_run(tmp_path):
    params = paper_params(tmp_path)
    assert paper.preflight(["--params", str(params), "--help"]) is None
    assert paper.preflight(["--params", str(params)]) == 2
    assert paper.preflight(["--params", str(params), "--profile", "toy"]) is None
    assert paper.preflight(["--params", str(tmp_path / "absent.yaml")]) is None  # the full command reports it


def test_hub_id_or_local_folder(tmp_path):
    assert paper.is_hub_id("facebook/winoground", tmp_path)
    assert not paper.is_hub_id("./facebook/winoground", tmp_path)
    (tmp_path / "facebook" / "winoground").mkdir(parents=True)
    assert not paper.is_hub_id("facebook/winoground", tmp_path)
    assert not paper.is_hub_id("/abs/path", tmp_path) and not paper.is_hub_id("a/b/c", tmp_path)


# ---------------------------------------------------------------- the whole data stage on fixtures


@pytest.mark.slow
def test_data_stage_indexes_every_paper_dataset(tmp_path, md5_as_existence):
    cfg = paper_data_config(tmp_path, caption_choice="all")
    build_data(cfg, tmp_path / "data", base=tmp_path)
    root = tmp_path / "data"
    index = read_index(root)
    assert index["source"] == "paper"
    pairs = train_pairs(root, index)
    assert [p.caption for p in pairs] == [
        "Closeup of bins of food that include broccoli and bread.", "A bowl of broccoli and carrots.",
        "A giraffe eating food from the top of the tree.", "A flower vase is sitting on a porch stand."]
    assert pairs[0].image == (tmp_path / "coco" / "train2017" / "000000000009.jpg").resolve()
    negatives = datasets.train_negatives(root, index, pairs)
    assert index["train"]["negatives"] == "train-negatives.json" and len(negatives) == len(pairs)
    assert all(options and pair.caption not in options for pair, options in zip(pairs, negatives))

    bench = benchmarks(root, index)
    assert [t.caption_1 for t in bench.winoground] == [r["caption_1"] for r in WINOGROUND_ROWS]
    assert bench.winoground[1].collapsed_tag == "Object" and bench.winoground[1].num_main_preds == 2
    assert load_image(bench.winoground[0].image_1).size == (8, 6)
    assert str(bench.winoground[0].image_0).startswith(str(root))  # the zip is extracted under data/, not the user's copy
    assert not (tmp_path / "winoground" / "data" / ".images.zip.cache").exists()

    relation = bench.aro["vg_relation"]
    assert [c.options for c in relation][0] == ("the shirt is wearing the man", "the man is wearing the shirt")
    assert relation[0].answer == 1 and relation[0].group == "wearing" and relation[0].bbox == (2, 3, 20, 15)
    assert load_image(relation[0].image, relation[0].bbox).size == (20, 15)
    assert bench.aro["vg_attribution"][0].group == "white_black"
    coco_order = bench.aro["coco_order"]
    assert len(coco_order) == 2 and coco_order[0].answer == 0 and len(coco_order[0].options) == 5
    assert coco_order[0].options[0] == "a man with a red helmet on a small moped on a dirt road"
    assert sorted(coco_order[0].options[1].split()) == sorted(coco_order[0].options[0].split())
    assert len(bench.aro["flickr_order"]) == 1

    shots = {shot.name: shot for shot in bench.zeroshot}
    assert list(shots) == list(ZEROSHOT_SETS)
    assert index["counts"]["zeroshot/imagenet"] == 1000 and shots["imagenet"].classnames[0] == "tench"
    assert len(shots["imagenet"].templates) == 80 and shots["imagenet"].templates[0] == "a bad photo of a {}."
    assert shots["cifar10"].classnames == ("airplane", "automobile") and shots["cifar10"].labels == (0, 1, 1)
    assert len(shots["cifar10"].templates) == 18
    assert shots["cifar100"].labels == (0, 1)  # ImageFolder order: label 0's image first
    assert shots["mnist"].classnames == tuple("0123456789") and shots["mnist"].templates == ('a photo of the number: "{}".',)
    assert shots["stl10"].classnames == ("airplane", "bird") and shots["stl10"].labels == (0, 1)
    assert shots["food101"].classnames == ("apple pie", "baby back ribs")
    assert shots["pets"].classnames == ("Abyssinian", "American Bulldog")
    assert shots["flowers102"].classnames[:2] == ("pink primrose", "hard-leaved pocket orchid")
    assert len(shots["flowers102"].images) == 102
    assert shots["dtd"].classnames == ("banded", "zigzagged")
    assert shots["fgvc_aircraft"].classnames == ("707-320", "A300B4") and shots["fgvc_aircraft"].labels == (0, 1)
    for shot in shots.values():
        assert load_image(shot.images[0]).mode == "RGB"
    assert index["counts"] == {"train_pairs": 4, "winoground": len(WINOGROUND_ROWS), "aro/vg_relation": 2,
                               "aro/vg_attribution": 1, "aro/coco_order": 2, "aro/flickr_order": 1,
                               **{f"zeroshot/{k}": len(v.images) for k, v in shots.items()},
                               **{f"sugarcrepe/{k}": 2 for k in SUGARCREPE_SUBSETS}, "mmvp": 9,
                               **{f"clevr/{k}": 2 for k in CLEVR_SUBTASKS}}


def test_images_are_checked_by_the_data_stage_not_by_every_reader_of_the_index(tmp_path):
    """A trial reads the training pairs at its start: one stat per image there would cost seconds to
    minutes for COCO's 118k images on a shared filesystem, and the data stage has checked them."""
    cfg = paper_data_config(tmp_path, aro_sets=[], zeroshot_sets=[])
    build_data(cfg, tmp_path / "data", base=tmp_path)
    index = read_index(tmp_path / "data")
    (tmp_path / "coco" / "train2017" / "000000000025.jpg").unlink()
    assert len(train_pairs(tmp_path / "data", index)) == 3
    with pytest.raises(DataFormatError, match=r"image id 25: field 'file_name' names an image that does not exist"):
        train_pairs(tmp_path / "data", index, check_images=True)
    with pytest.raises(DataFormatError, match=r"000000000025\.jpg"):
        build_data(cfg, tmp_path / "data", base=tmp_path)


def test_data_stage_command_reports_a_malformed_record_in_one_line(tmp_path):
    coco_2017(tmp_path / "coco")
    winoground_repo(tmp_path / "winoground", rows=[{**WINOGROUND_ROWS[0], "collapsed_tag": "Adjective"}])
    params = paper_params(tmp_path, {"coco_annotations": "coco/annotations/captions_train2017.json",
                                     "coco_images": "coco/train2017", "winoground": "./winoground",
                                     "aro_sets": [], "zeroshot_sets": [], "sugarcrepe_root": "", "mmvp_root": "",
                                     "clevr_root": "", "order_tagger": str(word_lexicon(tmp_path))})
    proc = subprocess.run([str(PYTHON), "-m", "stages.data", "--params", str(params)], cwd=REPO,
                          capture_output=True, text=True)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "examples.jsonl: line 1: field 'collapsed_tag' must be" in lines[0] and "'Adjective'" in lines[0]
    assert not (tmp_path / "data").exists()


def test_malformed_coco_and_aro_records_name_file_record_and_field(tmp_path):
    cfg = paper_data_config(tmp_path, aro_sets=["vg_relation"], zeroshot_sets=[])
    annotations = tmp_path / "coco" / "annotations" / "captions_train2017.json"
    document = json.loads(annotations.read_text())
    document["annotations"][1]["image_id"] = 77
    annotations.write_text(json.dumps(document))
    with pytest.raises(DataFormatError, match=r"captions_train2017.json: annotations\[1\]: field 'image_id' names no image"):
        build_data(cfg, tmp_path / "data", base=tmp_path)
    coco_2017(tmp_path / "coco")
    relation = tmp_path / "aro" / "visual_genome_relation.json"
    records = json.loads(relation.read_text())
    del records[1]["false_caption"]
    relation.write_text(json.dumps(records))
    with pytest.raises(DataFormatError, match=r"visual_genome_relation.json: record 1: field 'false_caption' is missing"):
        build_data(cfg, tmp_path / "data", base=tmp_path)
    assert not (tmp_path / "data").exists()


# ---------------------------------------------------------------- Winoground from the hub


def winoground_only_config(tmp_path: Path, winoground: str) -> DataConfig:
    """COCO captions and Winoground (`winoground`: a hub id or a folder under tmp_path), no other benchmark."""
    coco_2017(tmp_path / "coco")
    return DataConfig(source="paper", coco_annotations="coco/annotations/captions_train2017.json",
                      coco_images="coco/train2017", winoground=winoground, aro_sets=[], zeroshot_sets=[],
                      order_tagger=str(word_lexicon(tmp_path)))


def test_winoground_hub_id_fetches_the_release_files(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, repo_type, allow_patterns, local_dir):
        calls.append((repo_id, repo_type, tuple(allow_patterns)))
        winoground_repo(Path(local_dir))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    build_data(winoground_only_config(tmp_path, "facebook/winoground"), tmp_path / "data", base=tmp_path)
    assert calls == [("facebook/winoground", "dataset", paper.WINOGROUND_FILES)]
    bench = benchmarks(tmp_path / "data", read_index(tmp_path / "data"))
    assert len(bench.winoground) == len(WINOGROUND_ROWS) and bench.aro == {} and bench.zeroshot == []


def test_winoground_hub_failure_is_one_line(tmp_path):
    """The hub library's own failure, offline and with an empty hub cache (a fresh process: it reads
    HF_HUB_OFFLINE when imported), said in one line."""
    script = ("import sys; from pathlib import Path; from pipeline.data import paper\n"
              "try:\n"
              "    paper.fetch_winoground('facebook/winoground', Path(sys.argv[1]) / 'w')\n"
              "except paper.PaperDataMissing as err:\n"
              "    print(err)")
    proc = subprocess.run([str(PYTHON), "-c", script, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          env=offline_hub_env(tmp_path / "hf"), timeout=300)
    assert proc.returncode == 0, proc.stderr
    [message] = proc.stdout.splitlines()
    assert message.startswith("data.winoground: cannot fetch 'facebook/winoground'")
    assert message.endswith("see README: Running the paper profile")


def assert_reads_the_rows(data: Path, fmt: str) -> None:
    """The tasks read from data/ are WINOGROUND_ROWS, each image the pixels the fixture encoded."""
    tasks = benchmarks(data, read_index(data)).winoground
    fields = ("id", "caption_0", "caption_1", "tag", "secondary_tag", "num_main_preds", "collapsed_tag")
    assert [{f: getattr(t, f) for f in fields} for t in tasks] == [{f: r[f] for f in fields} for r in WINOGROUND_ROWS]
    for k, (task, row) in enumerate(zip(tasks, WINOGROUND_ROWS)):
        for side in (0, 1):
            image = getattr(task, f"image_{side}")
            assert image.name == f"{row[f'image_{side}']}.png"
            encoded = Image.open(io.BytesIO(image_bytes(COLOURS[(k + side) % 5], fmt=fmt))).convert("RGB")
            assert load_image(image).tobytes() == encoded.tobytes()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_winoground_local_copy_of_only_the_parquet_version_reads_as_the_release(tmp_path, fmt):
    winoground_parquet(tmp_path / "winoground", fmt=fmt)
    cfg = winoground_only_config(tmp_path, "./winoground")
    assert [p for p in paper.problems(cfg, tmp_path) if p.key == "data.winoground"] == []
    build_data(cfg, tmp_path / "data", base=tmp_path)
    assert_reads_the_rows(tmp_path / "data", fmt)
    if fmt == "PNG":                       # PNG bytes are kept as stored
        shard = tmp_path / "winoground" / "data" / "test-00000-of-00001.parquet"
        stored = pq.read_table(shard).column("image_1")[2].as_py()["bytes"]
        assert (tmp_path / "data" / "winoground" / "data" / "images" / "ex_2_img_1.png").read_bytes() == stored


def test_winoground_hub_repo_with_only_the_parquet_version_is_fetched_and_written_out(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def parquet_only_hub(repo_id, repo_type, allow_patterns, local_dir):
        calls.append(tuple(allow_patterns))
        if allow_patterns == [paper.winoground.PARQUET]:
            winoground_parquet(Path(local_dir))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", parquet_only_hub)
    build_data(winoground_only_config(tmp_path, "facebook/winoground"), tmp_path / "data", base=tmp_path)
    assert calls == [paper.WINOGROUND_FILES, ("data/test-*.parquet",)]
    assert_reads_the_rows(tmp_path / "data", "PNG")
    assert not list((tmp_path / "data" / "winoground").rglob("*.parquet"))        # read, then deleted

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **_: None)    # a repo with neither
    with pytest.raises(paper.PaperDataMissing, match=r"has no data/examples.jsonl and no data/test-\*\.parquet"):
        paper.fetch_winoground("facebook/winoground", tmp_path / "w")


@pytest.mark.parametrize("change, match", [
    (lambda table: table.drop_columns(["collapsed_tag"]),
     r"test-00000-of-00001.parquet: field 'collapsed_tag' is missing from the Parquet schema"),
    (lambda table: table.set_column(table.column_names.index("image_0"), "image_0",
                                    pa.array([{"bytes": None, "path": "x.png"}] * 3, table.schema.field("image_0").type)),
     r"test-00000-of-00001.parquet: row 1: field 'image_0' holds no image bytes"),
    (lambda table: table.set_column(table.column_names.index("num_main_preds"), "num_main_preds",
                                    pa.array([1, 3, 2], pa.int32())),
     r"test-00000-of-00001.parquet: row 2: field 'num_main_preds' must be"),
])
def test_a_malformed_parquet_version_stops_the_data_stage_in_one_line_naming_the_row(tmp_path, change, match):
    shard = winoground_parquet(tmp_path / "winoground") / "data" / "test-00000-of-00001.parquet"
    pq.write_table(change(pq.read_table(shard)), shard)
    with pytest.raises(DataFormatError, match=match):
        build_data(winoground_only_config(tmp_path, "./winoground"), tmp_path / "data", base=tmp_path)
    assert not (tmp_path / "data").exists()


def test_a_local_copy_with_neither_version_names_both(tmp_path):
    (tmp_path / "winoground").mkdir()
    (problem,) = [p for p in paper.problems(winoground_only_config(tmp_path, "./winoground"), tmp_path)
                  if p.key == "data.winoground"][:1]
    assert "data/examples.jsonl not found" in problem.message and "data/test-*.parquet" in problem.message


# ---------------------------------------------------------------- ARO order sets: the part-of-speech lexicon


def contextual_tagger(batch):
    """Stands in for spaCy (whose models are not installable here): "orange" is an adjective
    before a noun and a noun elsewhere, as a tagger reading the whole caption decides."""
    return [["ADJ" if w == "orange" and i + 1 < len(ws) and ws[i + 1] in ("cat", "hat") else
             "NOUN" if w in ("orange", "cat", "hat") else "X" for i, w in enumerate(ws)] for ws in batch]


def test_order_tags_tag_each_caption_in_its_own_context(tmp_path):
    karpathy = dump(tmp_path / "k.json", [{"image": "a.jpg", "caption": ["An orange cat.", "The orange is sweet.",
                                                                          "The orange is on the cat."]}])
    table = paper.tag_captions(paper.karpathy_captions([karpathy]), contextual_tagger)
    dump(tmp_path / "data" / "aro" / "coco_order-tags.json", table)
    tagger = datasets.order_tagger(tmp_path / "data", "coco_order", {"tags": "aro/coco_order-tags.json"})
    assert tagger(aro.tokenize("An orange cat.")) == ["X", "ADJ", "NOUN", "X"]
    assert tagger(aro.tokenize("The orange is sweet.")) == ["X", "NOUN", "X", "X", "X"]  # a word lexicon says ADJ
    with pytest.raises(ValueError, match=r"coco_order-tags.json: no tags for the caption 'A red hat \.'; rebuild"):
        tagger(aro.tokenize("A red hat."))
    # nouns are permuted among noun positions: the noun "orange" trades places with "cat"
    shuffled = {aro.order_options("The orange is on the cat.", tagger, random.Random(seed))[1] for seed in range(10)}
    assert shuffled == {"the orange is on the cat", "the cat is on the orange"}


def test_the_data_stage_stores_the_order_sets_caption_tags(tmp_path, monkeypatch):
    cfg = paper_data_config(tmp_path, order_tagger="spacy:en_core_web_sm", aro_sets=["coco_order", "flickr_order"])
    monkeypatch.setattr(paper, "spacy_tagger", lambda model: contextual_tagger)
    out = tmp_path / "data"
    sets = paper._aro(cfg, tmp_path, out, paper.Tagging(cfg, tmp_path))
    for name in ("coco_order", "flickr_order"):
        assert sets[name]["tags"] == f"aro/{name}-tags.json" and "lexicon" not in sets[name]
        cases = aro.read_order_set(Path(sets[name]["annotations"]), Path(sets[name]["images"]),
                                   datasets.order_tagger(out, name, sets[name]))
        assert cases and all(len(case.options) == 5 for case in cases)
    flickr = json.loads((out / "aro" / "flickr_order-tags.json").read_text())
    caption = aro.tokenize("The man with pierced ears is wearing glasses and an orange hat.")
    assert flickr[aro.caption_key(caption)][caption.index("orange")] == "ADJ"


def test_order_tags_reject_a_tagger_that_drops_tokens(tmp_path):
    karpathy = dump(tmp_path / "k.json", [{"image": "a.jpg", "caption": ["An orange cat."]}])
    with pytest.raises(ValueError, match=r"gave 3 tags for the 4 tokens of 'An orange cat \.'"):
        paper.tag_captions(paper.karpathy_captions([karpathy]), lambda batch: [ws[:-1] for ws in contextual_tagger(batch)])


def test_order_lexicon_file_must_map_words_to_tags(tmp_path):
    dump(tmp_path / "lex.json", {"man": "NOUN", "red": ["ADJ"]})
    with pytest.raises(DataFormatError, match=r"lex.json: field 'red' must map to a tag string"):
        paper.order_lexicon(tmp_path / "lex.json")
    assert datasets.order_tagger(tmp_path, "flickr_order", {"lexicon": {"Man": "NOUN"}})(["a", "man"]) == ["X", "NOUN"]
    with pytest.raises(ValueError, match=r"aro.flickr_order: part-of-speech 'tags' or a 'lexicon' is required"):
        datasets.order_tagger(tmp_path, "flickr_order", {})


# ---------------------------------------------------------------- CC-3M


def test_cc3m_tsv_becomes_coco_layout(tmp_path):
    put(tmp_path / "cc3m" / "images" / "0.jpg", image_bytes())
    put(tmp_path / "cc3m" / "images" / "1.jpg", image_bytes(COLOURS[1]))
    put(tmp_path / "cc3m" / "train.tsv", "filepath\ttitle\turl\nimages/0.jpg\ta dog on a beach \thttp://x/0\n"
                                         "images/1.jpg\tactor attends the premiere\thttp://x/1\n")
    cfg = DataConfig(source="paper", train_set="cc3m", cc3m="cc3m/train.tsv", winoground="./w", aro_sets=[],
                     zeroshot_sets=[], order_tagger=str(word_lexicon(tmp_path)))
    winoground_repo(tmp_path / "w")
    build_data(cfg, tmp_path / "data", base=tmp_path)
    pairs = train_pairs(tmp_path / "data", read_index(tmp_path / "data"))
    assert [(p.image.name, p.caption) for p in pairs] == [("0.jpg", "a dog on a beach"),
                                                         ("1.jpg", "actor attends the premiere")]


@pytest.mark.parametrize("text, match", [
    ("path\ttitle\nimages/0.jpg\tx\n", r"line 1: field 'filepath' is missing from the header"),
    ("filepath\ttitle\nimages/0.jpg\t\n", r"line 2: field 'title' is empty"),
    ("filepath\ttitle\nimages/0.jpg\ta\tb\n", r"line 2: has 3 fields, the header 2"),
    ("filepath\ttitle\nimages/9.jpg\ta cat\n", r"line 2: field 'filepath' names an image that does not exist"),
])
def test_cc3m_tsv_malformed_rows(tmp_path, text, match):
    put(tmp_path / "images" / "0.jpg", image_bytes())
    tsv = put(tmp_path / "train.tsv", text)
    with pytest.raises(DataFormatError, match=match):
        cc3m.read_tsv(tsv)


def test_cc3m_webdataset_shards_are_extracted(tmp_path):
    tar_shard(tmp_path / "wds" / "00000.tar", {"000000000.jpg": image_bytes(), "000000000.txt": b"a red car",
                                            "000000000.json": b"{}", "000000001.jpg": image_bytes(COLOURS[2]),
                                            "000000001.txt": "caf\u00e9 at night ".encode()})
    tar_shard(tmp_path / "wds" / "00001.tar", {"000010000.png": image_bytes(fmt="PNG"), "000010000.txt": b"a tree"})
    annotations, images = cc3m.index_cc3m(tmp_path / "wds", tmp_path / "out")
    from pipeline.data.coco import read_coco_captions
    pairs = read_coco_captions(annotations, images)
    assert [(p.image.relative_to(images).as_posix(), p.caption) for p in pairs] == [
        ("00000/000000000.jpg", "a red car"), ("00000/000000001.jpg", "caf\u00e9 at night"),
        ("00001/000010000.png", "a tree")]
    assert load_image(pairs[2].image).size == (8, 6)


@pytest.mark.parametrize("members, match", [
    ({"1.jpg": b"x"}, r"sample '1': field 'txt' is missing"),
    ({"1.txt": b"a caption"}, r"sample '1': has a caption but no image"),
    ({"1.jpg": b"x", "1.txt": b"  "}, r"sample '1': field 'txt' is empty"),
    ({"../1.jpg": b"x"}, r"points outside the shard"),
])
def test_cc3m_webdataset_malformed_samples(tmp_path, members, match):
    tar_shard(tmp_path / "wds" / "00000.tar", members)
    with pytest.raises(DataFormatError, match=match):
        cc3m.index_cc3m(tmp_path / "wds", tmp_path / "out")


def test_cc3m_folder_without_shards_is_missing_data(tmp_path):
    (tmp_path / "wds").mkdir()
    with pytest.raises(MissingDataError, match=r"\*\.tar: missing CC-3M webdataset shards"):
        cc3m.index_cc3m(tmp_path / "wds", tmp_path / "out")


# ---------------------------------------------------------------- zero-shot sets through torchvision


def test_corrupted_zero_shot_set_is_one_line(tmp_path):
    root = tmp_path / "tv"
    put(root / "cifar-10-batches-py" / "test_batch", b"not the real file")
    with pytest.raises(DataFormatError) as err:
        torchvision_sets.materialise("cifar10", root, tmp_path / "out")
    message = str(err.value)
    assert "\n" not in message and "torchvision cannot read the cifar10 test split" in message
    assert "Dataset not found or corrupted" in message and message.endswith("see README: Running the paper profile")


def test_zero_shot_class_without_test_image_is_an_error(tmp_path):
    dtd = tmp_path / "tv" / "dtd" / "dtd"
    put(dtd / "labels" / "test1.txt", "banded/banded_0002.jpg\n")
    put(dtd / "images" / "banded" / "banded_0002.jpg", image_bytes())
    torchvision_sets.materialise("dtd", tmp_path / "tv", tmp_path / "out")  # one class, one image: fine

    air = tmp_path / "tv" / "fgvc-aircraft-2013b" / "data"
    put(air / "variants.txt", "707-320\nA300B4\n")
    put(air / "images_variant_test.txt", "1514522 A300B4\n")
    put(air / "images" / "1514522.jpg", image_bytes())
    with pytest.raises(DataFormatError, match=r"fgvc_aircraft: class '707-320' has no test image"):
        torchvision_sets.materialise("fgvc_aircraft", tmp_path / "tv", tmp_path / "out2")


def test_paper_profile_in_params_yaml_is_valid():
    cfg = load(REPO / "params.yaml", {"profile": "paper"})
    assert cfg.data.source == "paper" and cfg.data.zeroshot_sets == list(ZEROSHOT_SETS)
    assert cfg.data.caption_choice == "first" and cfg.data.winoground == "facebook/winoground"


def test_negclip_negatives_swap_two_words_of_one_class_as_aro_describes():
    """ARO's example: "The horse is eating the grass and the zebra is drinking the water" -> the
    nouns, verbs (and so on) trade places pairwise; one negative per class with two different words."""
    tagger = aro.lexicon_tagger({"horse": "NOUN", "grass": "NOUN", "zebra": "NOUN", "water": "NOUN",
                                 "eating": "VERB", "drinking": "VERB", "brown": "ADJ"})
    caption = "The horse is eating the grass and the zebra is drinking the water"
    negatives = aro.swap_negatives(caption, tagger, random.Random(0))
    assert len(negatives) == 2     # verb phrases (one verb each here), nouns; one adjective cannot swap, no adverb
    verb, noun = (n.split() for n in negatives)
    words = caption.split()
    assert sorted(noun) == sorted(words) and sum(a != b for a, b in zip(noun, words)) == 2
    assert verb == caption.replace("eating", "#").replace("drinking", "eating").replace("#", "drinking").split()
    # Nothing to swap: the caption's tokens shuffled within trigrams instead; a lone word: none.
    assert aro.swap_negatives("Brown grass lies here", tagger, random.Random(1)) != []
    assert aro.swap_negatives("Hello", tagger, random.Random(1)) == []
    # A short caption's one shuffle kept its order one time in six, leaving it without a negative, which
    # stops a NegCLIP run: drawn until it changes. Only a caption no shuffle can change has none.
    for seed in range(200):
        (negative,) = aro.swap_negatives("A man surfing.", tagger, random.Random(seed))
        assert negative != "A man surfing ." and sorted(negative.split()) == sorted("A man surfing .".split())
    assert aro.swap_negatives("dog dog dog", tagger, random.Random(0)) == []


def test_negclip_negatives_swap_noun_phrases_of_three_words_and_verb_phrases_with_their_auxiliaries():
    """NegCLIP's generator also swaps two noun chunks of more than two words, and two verb phrases
    (VERB? ADV* AUX* VERB+). Hand-worked: a UPOS lexicon, then Penn tags as spaCy's tagger gives them
    (an auxiliary is VBZ there, so "is sitting" is one phrase)."""
    upos = aro.lexicon_tagger({"a": "DET", "man": "NOUN", "in": "ADP", "red": "ADJ", "shirt": "NOUN", "is": "AUX",
                               "riding": "VERB", "brown": "ADJ", "horse": "NOUN"})
    caption = "A man in a red shirt is riding a brown horse"
    assert aro.phrase_spans(upos(caption.split()), aro.NOUN_PHRASE) == [(0, 2), (3, 6), (8, 11)]
    assert aro.phrase_spans(upos(caption.split()), aro.VERB_PHRASE) == [(6, 8)]
    phrases, nouns, adjectives = aro.swap_negatives(caption, upos, random.Random(0))   # "a man": two words; one verb phrase
    assert phrases == "A man in a brown horse is riding a red shirt"
    assert adjectives == "A man in a brown shirt is riding a red horse"
    moved = [(a, b) for a, b in zip(nouns.split(), caption.split()) if a != b]
    assert len(moved) == 2 and moved[0] == moved[1][::-1] and {w for pair in moved for w in pair} < {"man", "shirt", "horse"}

    penn = aro.lexicon_tagger({"a": "DT", "dog": "NOUN", "is": "VBZ", "sitting": "VBG", "and": "CC", "cat": "NOUN",
                               "quickly": "RB", "running": "VBG"})
    caption = "A dog is sitting and a cat is quickly running"
    verbs, nouns = aro.swap_negatives(caption, penn, random.Random(0))     # one adverb; noun phrases of two words
    assert verbs == "A dog is quickly running and a cat is sitting"
    assert nouns == "A cat is sitting and a dog is quickly running"
    # Phrases (or words) alike are no swap: the two "a red shirt" stay, and only the nouns' negative is left.
    upos = aro.lexicon_tagger({"a": "DET", "red": "ADJ", "shirt": "NOUN", "near": "ADP", "dog": "NOUN"})
    (nouns,) = aro.swap_negatives("a red shirt near a dog and a red shirt", upos, random.Random(0))
    assert nouns in ("a red dog near a shirt and a red shirt", "a red shirt near a shirt and a red dog")


def test_a_copula_is_no_verb_phrase_and_a_possessor_stays_in_its_noun_phrase():
    """spaCy tags a copula or auxiliary VBZ (Penn) and AUX (its POS); `token_tag` keeps AUX, as NegCLIP's
    verb-phrase pattern reads POS: "is" alone is no verb phrase, and "is slowly walking" is "slowly
    walking". A possessor's 's (POS) stays inside its noun chunk ("a man 's brown dog")."""
    assert [paper.token_tag(penn, upos) for penn, upos in [("VBZ", "AUX"), ("MD", "AUX"), ("VBG", "VERB"),
                                                          ("NNS", "NOUN"), ("JJ", "ADJ"), ("POS", "PART"), ("", "X")]] \
        == ["AUX", "AUX", "VBG", "NOUN", "ADJ", "POS", "X"]
    tags = {"a": "DT", "man": "NOUN", "is": "AUX", "on": "IN", "skateboard": "NOUN", "doing": "VBG", "tricks": "NOUN",
            "woman": "NOUN", "slowly": "RB", "walking": "VBG", "'s": "POS", "brown": "ADJ", "dog": "NOUN",
            "chases": "VBZ", "big": "ADJ", "red": "ADJ", "ball": "NOUN"}
    penn = aro.lexicon_tagger(tags)
    caption = "a man is on a skateboard doing tricks"
    assert aro.phrase_spans(penn(caption.split()), aro.VERB_PHRASE) == [(6, 7)]       # "doing" alone
    (nouns,) = aro.swap_negatives(caption, penn, random.Random(0))                    # no verb-phrase pair
    assert sorted(nouns.split()) == sorted(caption.split()) and nouns != caption
    assert aro.phrase_spans(penn("a woman is slowly walking".split()), aro.VERB_PHRASE) == [(3, 5)]
    caption = "a man 's brown dog chases a big red ball"
    assert aro.phrase_spans(penn(caption.split()), aro.NOUN_PHRASE, aro.MIN_NOUN_PHRASE) == [(0, 5), (6, 10)]
    negatives = aro.swap_negatives("a man's brown dog chases a big red ball", penn, random.Random(0))  # 's split off
    assert negatives[0] == "a big red ball chases a man 's brown dog"


def test_a_caption_without_negatives_is_refused_by_name(tmp_path):
    from pipeline.data.records import ImageCaption

    path = dump(tmp_path / "train-negatives.json", {"a dog": ["a god"], "a cat": []})
    index = {"train": {"negatives": "train-negatives.json"}}
    pairs = [ImageCaption(tmp_path / "x.png", "a dog"), ImageCaption(tmp_path / "y.png", "a cat")]
    with pytest.raises(DataFormatError, match="train-negatives.json.*'a cat'.*has no hard negative"):
        datasets.train_negatives(tmp_path, index, pairs)
    with pytest.raises(DataFormatError, match="'a bird'.*is missing"):
        datasets.train_negatives(tmp_path, index, [ImageCaption(tmp_path / "z.png", "a bird")])
    assert datasets.train_negatives(tmp_path, index, pairs[:1]) == [["a god"]]
    assert path.is_file()


# ---------------------------------------------------------------- SugarCrepe, MMVP-VLM, CLEVR (GDBench)


def extra_data_config(tmp_path: Path, **changes) -> DataConfig:
    coco_2017(tmp_path / "coco")
    winoground_repo(tmp_path / "winoground")
    sugarcrepe_release(tmp_path)
    mmvp_release(tmp_path / "MMVP_VLM")
    clevr_release(tmp_path / "clevr")
    values = dict(source="paper", coco_annotations="coco/annotations/captions_train2017.json",
                  coco_images="coco/train2017", winoground="./winoground", aro_sets=[], zeroshot_sets=[],
                  sugarcrepe_root="sugar-crepe/data", sugarcrepe_images="coco/val2017", mmvp_root="MMVP_VLM",
                  clevr_root="clevr", order_tagger=str(word_lexicon(tmp_path)))
    return DataConfig(**{**values, **changes})


def test_data_stage_indexes_sugarcrepe_mmvp_and_clevr(tmp_path):
    build_data(extra_data_config(tmp_path, clevr_subtasks=["spatial", "recognition_color"],
                                 sugarcrepe_subsets=["swap_obj", "add_att"]), tmp_path / "data", base=tmp_path)
    root = tmp_path / "data"
    index = read_index(root)
    assert index["sugarcrepe"]["images"] == str((tmp_path / "coco" / "val2017").resolve())
    bench = benchmarks(root, index)
    assert list(bench.sugarcrepe) == ["swap_obj", "add_att"]
    case = bench.sugarcrepe["swap_obj"][1]
    assert case.options == ("A man on a motorcycle is waving at two men.", "Two men on a motorcycle are waving at a man.")
    assert case.answer == 0 and case.image == (tmp_path / "coco" / "val2017" / "000000480021.jpg").resolve()
    assert len(bench.mmvp) == 135 and bench.mmvp[0].statement_1 == "The dog's face is up, seen from the front"
    assert bench.mmvp[134].pattern == "Viewpoint and Perspective" and bench.mmvp[0].pattern == "Orientation and Direction"
    assert list(bench.clevr) == ["spatial", "recognition_color"] and len(bench.clevr["spatial"]) == 2
    assert bench.clevr["spatial"][0].options == ("A gray cylinder.", "A purple cylinder.")
    assert {k: v for k, v in index["counts"].items() if "/" in k or k == "mmvp"} == {
        "sugarcrepe/swap_obj": 2, "sugarcrepe/add_att": 2, "mmvp": 135, "clevr/spatial": 2, "clevr/recognition_color": 2}


def test_mmvp_under_the_underscored_folder_spelling(tmp_path):
    cfg = extra_data_config(tmp_path, sugarcrepe_root="", clevr_root="")
    (tmp_path / "MMVP_VLM" / "MLLM_VLM Images").rename(tmp_path / "MMVP_VLM" / "MLLM_VLM_Images")
    build_data(cfg, tmp_path / "data", base=tmp_path)
    bench = benchmarks(tmp_path / "data", read_index(tmp_path / "data"))
    assert bench.mmvp[0].image_1.parent.parent.name == "MLLM_VLM_Images" and bench.sugarcrepe == {} == bench.clevr


@pytest.mark.parametrize(("changes", "key", "needle"), [
    ({"sugarcrepe_root": "nowhere"}, "data.sugarcrepe_root", "nowhere/add_obj.json not found (SugarCrepe"),
    ({"sugarcrepe_images": ""}, "data.sugarcrepe_images", "not set (COCO 2017 val2017/"),
    ({"mmvp_root": "nowhere"}, "data.mmvp_root", "nowhere/Questions.csv not found (MMVP-VLM"),
    ({"clevr_root": "nowhere"}, "data.clevr_root", "nowhere/captions/pair_binding_size.json not found (CLEVR"),
])
def test_a_missing_new_benchmark_is_one_line_naming_key_and_path(tmp_path, changes, key, needle):
    cfg = extra_data_config(tmp_path, **changes)
    with pytest.raises(paper.PaperDataMissing) as err:
        paper.check_paper_data(cfg, tmp_path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{key}: ") and needle in message
    assert message.endswith("see README: Running the paper profile")


def test_mmvp_folder_missing_or_both_spellings_are_named(tmp_path):
    cfg = extra_data_config(tmp_path)
    images = tmp_path / "MMVP_VLM" / "MLLM_VLM Images"
    images.rename(tmp_path / "elsewhere")
    [problem] = paper.problems(cfg, tmp_path)
    assert problem.key == "data.mmvp_root" and "MLLM_VLM Images or" in problem.message
    (tmp_path / "elsewhere").rename(images)
    (tmp_path / "MMVP_VLM" / "MLLM_VLM_Images").mkdir()
    [problem] = paper.problems(cfg, tmp_path)
    assert problem.key == "data.mmvp_root" and "holds both" in problem.message


def test_empty_roots_leave_the_new_benchmarks_out(tmp_path):
    cfg = DataConfig(source="paper", coco_annotations="a.json", coco_images="i", winoground="./w", aro_sets=[],
                     zeroshot_sets=[])
    keys = {p.key for p in paper.problems(cfg, tmp_path)}
    assert not keys & {"data.sugarcrepe_root", "data.sugarcrepe_images", "data.mmvp_root", "data.clevr_root"}


@pytest.mark.parametrize(("spoil", "match"), [
    (lambda root: dump(root / "sugar-crepe" / "data" / "swap_att.json", {"0": {"filename": "000000222235.jpg",
                                                                                 "caption": "x"}}),
     r"swap_att.json: record '0': field 'negative_caption' is missing"),
    (lambda root: put(root / "MMVP_VLM" / "Questions.csv", "Question ID,Type,Statement\n1,Orientation,up\n"
                                                           "two,Orientation,down\n"),
     r"Questions.csv: line 3: field 'Question ID' must be an integer, got 'two'"),
    (lambda root: dump(root / "clevr" / "captions" / "spatial.json", {"CLEVR_val2_000138.png": [["a", "b", "c"]]}),
     r"spatial.json: record 'CLEVR_val2_000138.png': field '\[0\]' must be \[true caption, false caption\]"),
])
def test_malformed_new_benchmark_records_stop_the_data_stage(tmp_path, spoil, match):
    cfg = extra_data_config(tmp_path)
    spoil(tmp_path)
    with pytest.raises(DataFormatError, match=match):
        build_data(cfg, tmp_path / "data", base=tmp_path)
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize(("data", "match"), [
    ({"clevr_subtasks": ["spatial", "spatial"]}, r"^data.clevr_subtasks: 'spatial' is listed twice$"),
    ({"clevr_subtasks": ["spatial", "counting"]}, r"^data.clevr_subtasks\[1\]: 'counting' is not allowed"),
    ({"sugarcrepe_subsets": []}, r"^data.sugarcrepe_subsets: empty"),
    ({"sugarcrepe_subsets": ["swap_colour"]}, r"^data.sugarcrepe_subsets\[0\]: 'swap_colour' is not allowed"),
    ({"n_mmvp": 0}, r"^data.n_mmvp: 0"),
])
def test_new_benchmark_keys_are_checked(data, match):
    from pipeline.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match=match):
        from_dict({"data": data})
