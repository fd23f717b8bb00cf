"""The data stage: materialise the training pairs and every benchmark, and write the index.

Toy: generated from the seed into the published formats (COCO captions, Winoground's
release files, ARO's JSON files, ImageFolder zero-shot sets, SugarCrepe's subset files over
JPEG images, MMVP-VLM's Questions.csv and image folder, GDBench's CLEVR caption files). Paper: the index points at
the user's local copies, read by the same readers (see `pipeline.data.paper`).
"""
from __future__ import annotations

import io
from pathlib import Path

from tqdm import tqdm

from pipeline.config import ConfigError, DataConfig
from pipeline.data import aro, clevr, coco, mmvp, sugarcrepe, toyworld as tw, winoground, zeroshot
from pipeline.data.datasets import INDEX_NAME, NEGATIVES
from pipeline.io import atomic_dir, write_json


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _scene_file(folder: Path, name: str, scene: tw.Scene, size: int) -> str:
    # A plain write: the whole tree is published by one rename (`atomic_dir`).
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(_png(tw.render_scene(scene, size)))
    return name


def _picture_file(folder: Path, name: str, picture: tw.Picture, size: int) -> str:
    """A .png, or a .jpg where the release's files are JPEGs (near-lossless: no chroma subsampling)."""
    folder.mkdir(parents=True, exist_ok=True)
    image = tw.render_picture(picture, size)
    if name.endswith(".jpg"):
        image.save(folder / name, format="JPEG", quality=95, subsampling=0)
    else:
        (folder / name).write_bytes(_png(image))
    return name


def _toy_sugarcrepe(cfg: DataConfig, root: Path) -> dict:
    """data/<subset>.json over val2017/<12-digit id>.jpg, one image per case."""
    images, number = root / "val2017", 0
    for subset in sugarcrepe.SUBSET_SIZES:
        records = []
        for picture, true, negative in tw.sugarcrepe_cases(subset, cfg.n_sugarcrepe, cfg.seed):
            number += 1
            records.append({"filename": _picture_file(images, f"{number:012d}.jpg", picture, cfg.image_size),
                            "caption": true, "negative_caption": negative})
        sugarcrepe.write_subset(sugarcrepe.subset_file(root / "data", subset), records)
    return {"annotations": "sugarcrepe/data", "images": "sugarcrepe/val2017", "subsets": list(cfg.sugarcrepe_subsets)}


def _toy_mmvp(cfg: DataConfig, root: Path) -> dict:
    """Questions.csv + "MLLM_VLM Images/<Type>/<id>.jpg"; odd ids are the first image of a pair."""
    rows = []
    for k, (pattern, one, two, s_one, s_two) in enumerate(tw.mmvp_pairs(cfg.n_mmvp, cfg.seed)):
        kind = tw.MMVP_PATTERNS[pattern]
        for qid, picture, statement in ((2 * k + 1, one, s_one), (2 * k + 2, two, s_two)):
            _picture_file(root / mmvp.IMAGE_DIRS[0] / kind, f"{qid}.jpg", picture, cfg.image_size)
            rows.append({"Question ID": qid, "Type": kind, "Statement": statement})
    mmvp.write_mmvp(root, rows)
    return {"root": "mmvp", "patterns": list(tw.MMVP_PATTERNS)}


def _toy_clevr(cfg: DataConfig, root: Path) -> dict:
    """captions/<subtask>.json over images/CLEVR_toy_<n>.png."""
    files: dict[str, dict[str, list[list[str]]]] = {}
    for i, (scene, cases) in enumerate(tw.clevr_images(cfg.n_clevr, cfg.seed)):
        name = _picture_file(root / clevr.IMAGES, f"CLEVR_toy_{i:06d}.png", tw.Picture(scene), cfg.image_size)
        for subtask, pairs in cases.items():
            files.setdefault(subtask, {})[name] = pairs
    for subtask, records in files.items():
        clevr.write_subtask(clevr.subtask_file(root, subtask), records)
    return {"root": "clevr", "subtasks": list(cfg.clevr_subtasks)}


def build_toy(cfg: DataConfig, out: Path) -> None:
    """Generate the toy world into `out` (replaced atomically as a whole)."""
    size, seed = cfg.image_size, cfg.seed
    with atomic_dir(out) as root:
        train = tw.training_pairs(cfg.n_train, seed)
        images = root / "coco" / "train2017"
        records = [(i, _scene_file(images, f"{i:08d}.png", scene, size), [text])
                   for i, (scene, text) in enumerate(tqdm(train, desc="toy training pairs", leave=False))]
        coco.write_coco_captions(root / "coco" / "annotations" / "captions_train2017.json", records)
        write_json(root / NEGATIVES, {text: tw.hard_negatives(text) for _, text in train})

        tasks = []
        for i, task in enumerate(tw.winoground_tasks(cfg.n_winoground, seed)):
            tasks.append({"id": i, "image_0": f"ex_{i}_img_0", "image_1": f"ex_{i}_img_1",
                          "caption_0": task.caption_0, "caption_1": task.caption_1, "tag": task.tag,
                          "secondary_tag": "", "num_main_preds": task.num_main_preds,
                          "collapsed_tag": task.collapsed_tag,
                          "image_0_pil": tw.render_scene(task.scene_0, size),
                          "image_1_pil": tw.render_scene(task.scene_1, size)})
        # Extracted, as the release reads once unzipped: a zip would be unpacked inside data/ later.
        winoground.write_winoground(root / "winoground", tasks, extracted=True)

        vg_images = root / "aro" / "images"
        full_box = {"bbox_x": 0, "bbox_y": 0, "bbox_w": size, "bbox_h": size}
        relation = [{"image_id": i, "relation_name": scene.relation, **full_box, "true_caption": true,
                     "false_caption": false, "image_path": _scene_file(vg_images, f"rel_{i:06d}.png", scene, size)}
                    for i, (scene, true, false) in enumerate(tw.vg_relation_cases(cfg.n_aro, seed))]
        aro.write_vg_relation(root / "aro" / aro.VG_RELATION_FILE, relation)
        attribution = [{"image_id": i, "attributes": list(pair), **full_box, "true_caption": true,
                        "false_caption": false, "image_path": _scene_file(vg_images, f"attr_{i:06d}.png", scene, size)}
                       for i, (scene, true, false, pair) in enumerate(tw.vg_attribution_cases(cfg.n_aro, seed))]
        aro.write_vg_attribution(root / "aro" / aro.VG_ATTRIBUTION_FILE, attribution)
        order = [{"image": "order/" + _scene_file(root / "aro" / "order", f"{i:06d}.png", scene, size), "caption": caps}
                 for i, (scene, caps) in enumerate(tw.order_cases(cfg.n_aro // 2, seed))]
        aro.write_order_set(root / "aro" / aro.COCO_ORDER_FILE, order)

        for attribute, templates in (("shape", tw.SHAPE_TEMPLATES), ("colour", tw.COLOUR_TEMPLATES)):
            classes, shots = tw.zeroshot_images(attribute, cfg.n_zeroshot_per_class, size, seed)
            zeroshot.write_image_folder_set(root / "zeroshot" / attribute, attribute, list(classes),
                                            list(templates), shots)

        write_json(root / INDEX_NAME, {
            "source": "toy",
            "train": {"annotations": "coco/annotations/captions_train2017.json", "images": "coco/train2017",
                      "caption_choice": "first", "negatives": NEGATIVES},
            "winoground": {"root": "winoground"},
            "aro": {
                "vg_relation": {"annotations": f"aro/{aro.VG_RELATION_FILE}", "images": "aro/images"},
                "vg_attribution": {"annotations": f"aro/{aro.VG_ATTRIBUTION_FILE}", "images": "aro/images"},
                "coco_order": {"annotations": f"aro/{aro.COCO_ORDER_FILE}", "images": "aro",
                               "lexicon": tw.LEXICON, "seed": seed},
            },
            "zeroshot": [{"root": "zeroshot/shape"}, {"root": "zeroshot/colour"}],
            "sugarcrepe": _toy_sugarcrepe(cfg, root / "sugarcrepe"),
            "mmvp": _toy_mmvp(cfg, root / "mmvp"),
            "clevr": _toy_clevr(cfg, root / "clevr"),
        })


def check_replaceable(out: Path) -> None:
    """The data stage replaces `out` whole: refused unless it is absent, empty or an earlier build (it holds
    the index), so files of the user's own under that name (datasets unpacked into data/) are not lost
    when the stage runs by hand. (`dvc repro` deletes the stage's outputs before it runs it.)"""
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / INDEX_NAME).is_file())):
        raise ConfigError(f"{out}: not a folder the data stage built (no {INDEX_NAME}), and the stage would replace "
                          "it whole; move it away (keep datasets elsewhere, e.g. datasets/), or empty it")


def build_data(cfg: DataConfig, out: Path, base: Path | None = None) -> None:
    """Toy: generate; paper: check, index and materialise the user's copies (`pipeline.data.paper`).

    `base` is the folder relative dataset paths are under (the params file's folder; by
    default `out`'s parent).
    """
    check_replaceable(Path(out))
    if cfg.source == "toy":
        build_toy(cfg, out)
    else:
        from pipeline.data.paper import build_paper

        build_paper(cfg, Path(out), Path(out).parent if base is None else Path(base))
