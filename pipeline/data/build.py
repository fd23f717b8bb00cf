"""The data stage: materialise the training pairs and every benchmark, and write the index.

Toy: generated from the seed into the published formats (COCO captions, Winoground's
release files, ARO's JSON files, ImageFolder zero-shot sets). Paper: the index points at
the user's local copies, read by the same readers (see `pipeline.data.paper`).
"""
from __future__ import annotations

import io
from pathlib import Path

from tqdm import tqdm

from pipeline.config import DataConfig
from pipeline.data import aro, coco, toyworld as tw, winoground, zeroshot
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
        })


def build_data(cfg: DataConfig, out: Path, base: Path | None = None) -> None:
    """Toy: generate; paper: check, index and materialise the user's copies (`pipeline.data.paper`).

    `base` is the folder relative dataset paths are under (the params file's folder; by
    default `out`'s parent).
    """
    if cfg.source == "toy":
        build_toy(cfg, out)
    else:
        from pipeline.data.paper import build_paper

        build_paper(cfg, Path(out), Path(out).parent if base is None else Path(base))
