"""The toy world: determinism, Winoground/ARO constructions, and images that show what captions say."""
from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from pipeline.data import toyworld as tw

SIZE = 32


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int32)


def colour_mask(image, colour: str, tol: int = 12) -> np.ndarray:
    return np.abs(pixels(image) - np.array(tw.COLOURS[colour])).max(axis=2) <= tol


def centroid(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    assert len(xs) > 0, "colour not found in the image"
    return float(xs.mean()), float(ys.mean())


# --------------------------------------------------------------------------- determinism


def test_training_pairs_and_images_are_a_function_of_the_seed():
    a, b = tw.training_pairs(30, seed=5), tw.training_pairs(30, seed=5)
    assert a == b
    assert [tw.render_scene(s, SIZE).tobytes() for s, _ in a] == [tw.render_scene(s, SIZE).tobytes() for s, _ in b]
    c = tw.training_pairs(30, seed=6)
    assert [t for _, t in a] != [t for _, t in c]
    assert [s for s, _ in a] != [s for s, _ in c]
    assert [tw.render_scene(s, SIZE).tobytes() for s, _ in a] != [tw.render_scene(s, SIZE).tobytes() for s, _ in c]


def test_benchmarks_are_a_function_of_the_seed():
    for make in (tw.winoground_tasks, tw.vg_relation_cases, tw.vg_attribution_cases, tw.order_cases):
        assert make(12, 1) == make(12, 1), make.__name__
        assert make(12, 1) != make(12, 2), make.__name__
    t1, t2 = tw.winoground_tasks(8, 1), tw.winoground_tasks(8, 1)
    assert ([tw.render_scene(t.scene_1, SIZE).tobytes() for t in t1]
            == [tw.render_scene(t.scene_1, SIZE).tobytes() for t in t2])
    _, z1 = tw.zeroshot_images("colour", 3, SIZE, 0)
    _, z2 = tw.zeroshot_images("colour", 3, SIZE, 0)
    _, z3 = tw.zeroshot_images("colour", 3, SIZE, 1)
    assert [(l, i.tobytes()) for l, i in z1] == [(l, i.tobytes()) for l, i in z2]
    assert [i.tobytes() for _, i in z1] != [i.tobytes() for _, i in z3]


def test_different_seeds_give_different_layouts_of_the_same_scene():
    scene = tw.Scene(tw.Thing("red", "circle"), tw.Thing("blue", "square"), "left of", layout=1)
    other = tw.Scene(scene.first, scene.second, scene.relation, layout=2)
    assert tw.render_scene(scene, SIZE).tobytes() == tw.render_scene(scene, SIZE).tobytes()
    assert tw.render_scene(scene, SIZE).tobytes() != tw.render_scene(other, SIZE).tobytes()


def test_training_captions_describe_their_scene():
    for scene, text in tw.training_pairs(200, seed=0):
        flipped = tw.Scene(scene.second, scene.first, tw.INVERSE[scene.relation], scene.layout)
        assert text in {tw.caption(s, w) for s in (scene, flipped) for w in (False, True)}


# --------------------------------------------------------------------------- Winoground-style tasks


TAGS = {kind: (tag, collapsed) for kind, tag, collapsed in tw.SWAPS}


@pytest.fixture(scope="module")
def tasks():
    return tw.winoground_tasks(40, seed=0)


def test_winoground_captions_are_permutations_of_the_same_words(tasks):
    for task in tasks:
        assert task.caption_0 != task.caption_1
        assert Counter(task.caption_0.split()) == Counter(task.caption_1.split())
        assert task.scene_0 != task.scene_1


def test_winoground_captions_describe_their_own_scene(tasks):
    for task in tasks:
        with_size = task.num_main_preds == 2
        assert task.caption_0 == tw.caption(task.scene_0, with_size)
        assert task.caption_1 == tw.caption(task.scene_1, with_size)


def test_winoground_tags_follow_the_swap(tasks):
    for task in tasks:
        a0, b0, a1, b1 = task.scene_0.first, task.scene_0.second, task.scene_1.first, task.scene_1.second
        assert task.scene_0.relation == task.scene_1.relation
        if task.tag == "Noun":
            assert task.collapsed_tag == "Object"
            assert (a1.shape, b1.shape, a1.colour, b1.colour) == (b0.shape, a0.shape, a0.colour, b0.colour)
        elif task.tag == "Adjective-Color":
            assert task.collapsed_tag == "Relation"
            assert (a1.colour, b1.colour, a1.shape, b1.shape) == (b0.colour, a0.colour, a0.shape, b0.shape)
        elif task.tag == "Adjective-Size":
            assert task.collapsed_tag == "Relation"
            assert task.num_main_preds == 2, "a size swap needs the 2-predicate form"
            assert a0.size != b0.size and (a1.size, b1.size) == (b0.size, a0.size)
            assert (a1.colour, a1.shape) == (a0.colour, a0.shape)
        elif task.tag == "Noun Phrase":
            assert task.collapsed_tag == "Both"
            assert (a1, b1) == (b0, a0)
        else:
            raise AssertionError(f"unexpected tag {task.tag!r}")
        sized = any(w in task.caption_0.split() for w in tw.SIZES)
        assert sized == (task.num_main_preds == 2)
        if task.num_main_preds == 2 and task.tag != "Adjective-Size":
            assert a0.size == b0.size, "other 2-predicate swaps keep sizes equal"


def test_winoground_tag_and_pred_coverage(tasks):
    assert {t.collapsed_tag for t in tasks} == {"Object", "Relation", "Both"}
    assert {t.num_main_preds for t in tasks} == {1, 2}
    assert {t.tag for t in tasks} == {tag for tag, _ in TAGS.values()}
    assert Counter(t.tag for t in tasks) == Counter({tag: 10 for tag, _ in TAGS.values()})
    assert all(t.num_main_preds == 2 for t in tasks if t.tag == "Adjective-Size")
    assert any(t.num_main_preds == 1 for t in tasks if t.tag != "Adjective-Size")


# --------------------------------------------------------------------------- rendering


AXIS = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}


@pytest.mark.parametrize("relation", tw.RELATIONS)
def test_rendered_relation_puts_the_first_object_where_the_caption_says(relation):
    rng = random.Random(f"rel-{relation}")
    for _ in range(25):
        scene = tw.random_scene(rng)
        scene = tw.Scene(scene.first, scene.second, relation, scene.layout)
        image = tw.render_scene(scene, SIZE)
        first = centroid(colour_mask(image, scene.first.colour))
        second = centroid(colour_mask(image, scene.second.colour))
        axis, sign = AXIS[relation]
        # "left of": first x < second x; "above": first y < second y (image rows grow downwards).
        assert sign * (first[axis] - second[axis]) > 2.0, (scene, first, second)


def test_left_of_scene_has_first_colour_mass_on_the_left():
    scene = tw.Scene(tw.Thing("red", "circle", "big"), tw.Thing("blue", "square", "small"), "left of", layout=7)
    image = tw.render_scene(scene, SIZE)
    red_x, _ = centroid(colour_mask(image, "red"))
    blue_x, _ = centroid(colour_mask(image, "blue"))
    assert red_x < SIZE / 2 < blue_x


# --------------------------------------------------------------------------- ARO-style sets


def test_vg_relation_false_caption_swaps_subject_and_object():
    for scene, true, false in tw.vg_relation_cases(30, seed=0):
        a, b = scene.first.phrase(False), scene.second.phrase(False)
        assert true == f"the {a} is {scene.relation} the {b}"
        assert false == f"the {b} is {scene.relation} the {a}"
        assert true != false and Counter(true.split()) == Counter(false.split())


def test_vg_attribution_false_caption_swaps_the_colours():
    for scene, true, false, pair in tw.vg_attribution_cases(30, seed=0):
        a, b = scene.first, scene.second
        assert pair == (a.colour, b.colour) and a.colour != b.colour
        assert true.split() == ["the", a.colour, a.shape, "and", "the", b.colour, b.shape]
        assert false.split() == ["the", b.colour, a.shape, "and", "the", a.colour, b.shape]


def test_order_cases_describe_the_scene_both_ways_round():
    for scene, captions in tw.order_cases(20, seed=0):
        first, second = captions
        assert first != second and Counter(first.split()) != Counter() and len(captions) == 2
        flipped = tw.Scene(scene.second, scene.first, tw.INVERSE[scene.relation], scene.layout)
        w = any(s in first.split() for s in tw.SIZES)
        assert (first, second) == (tw.caption(scene, w), tw.caption(flipped, w))


def test_lexicon_covers_every_word_the_grammar_emits(tasks):
    words = {w for t in tasks for w in (t.caption_0 + " " + t.caption_1).split()}
    words |= {w for _, t, f in tw.vg_relation_cases(20, 0) for w in (t + " " + f).split()}
    words |= {w for _, t, f, _ in tw.vg_attribution_cases(20, 0) for w in (t + " " + f).split()}
    assert words <= set(tw.LEXICON)


# --------------------------------------------------------------------------- zero-shot sets


def test_zeroshot_colour_labels_match_the_rendered_colour():
    classes, images = tw.zeroshot_images("colour", 6, SIZE, seed=0)
    assert classes == tuple(tw.COLOURS)
    assert Counter(label for label, _ in images) == Counter({i: 6 for i in range(len(classes))})
    for label, image in images:
        counts = {c: int(colour_mask(image, c).sum()) for c in tw.COLOURS}
        assert max(counts, key=counts.get) == classes[label], counts
        assert sum(v > 0 for v in counts.values()) == 1, counts


def coverage(image) -> np.ndarray:
    """Per-pixel object coverage from anti-aliasing (background = 0, object = 1) of a one-object image."""
    px = pixels(image).astype(float)
    bg = np.array(tw.BACKGROUND, dtype=float)
    far = np.abs(px - bg).max(axis=2)
    colour = px[np.unravel_index(far.argmax(), far.shape)]
    channel = int(np.abs(colour - bg).argmax())
    return np.clip((px[..., channel] - bg[channel]) / (colour[channel] - bg[channel]), 0, 1)


def fill_ratio(cover: np.ndarray) -> float:
    """Object area over its bounding box."""
    return cover.sum() / (cover.max(axis=0).sum() * cover.max(axis=1).sum())


def top_share(cover: np.ndarray) -> float:
    """The share of the object's area above its centre row (0.5 for shapes symmetric top to bottom)."""
    rows = np.nonzero(cover.max(axis=1) > 0.5)[0]
    middle = (rows[0] + rows[-1] + 1) / 2
    weights = cover.sum(axis=1)
    below = np.clip(np.arange(len(weights)) + 1 - middle, 0, 1)  # the fraction of each row below the centre
    return float((weights * (1 - below)).sum() / weights.sum())


def test_zeroshot_shape_labels_match_the_rendered_shape():
    classes, images = tw.zeroshot_images("shape", 6, SIZE, seed=0)
    assert classes == tw.SHAPES
    # Area over bounding box: pi/4, 1, 1/2, 1/2, ~0.59 (two bars 0.36 wide); the triangle is the
    # only one heavier below its centre, and the cross the only one whose quarter-height row is
    # narrow (its vertical bar) where the diamond's is half the width.
    expected = {"circle": (0.65, 0.9), "square": (0.9, 1.01), "triangle": (0.3, 0.65), "diamond": (0.35, 0.65),
                "cross": (0.45, 0.72)}
    for label, image in images:
        name, cover = classes[label], coverage(image)
        low, high = expected[name]
        assert low <= fill_ratio(cover) < high, (name, fill_ratio(cover))
        assert (top_share(cover) < 0.42) == (name == "triangle"), (name, top_share(cover))
        if name in ("diamond", "cross"):
            rows, cols = np.nonzero(cover.max(axis=1) > 0.5)[0], np.nonzero(cover.max(axis=0) > 0.5)[0]
            quarter = cover[rows[0] + (rows[-1] - rows[0]) // 4]
            width = (quarter > 0.5).sum() / (cols[-1] - cols[0] + 1)
            assert (width < 0.45) == (name == "cross"), (name, width)


def test_hard_negatives_are_the_grammars_swaps_of_the_caption():
    caption = "a big red circle left of a small blue square"
    assert tw.hard_negatives(caption) == [
        "a big red square left of a small blue circle",      # shapes
        "a big blue circle left of a small red square",      # colours
        "a small red circle left of a big blue square",      # sizes
        "a small blue square left of a big red circle",      # whole noun phrases: who is where
    ]
    # Sizes that agree (or are not said) have no size swap; every negative differs from the caption.
    assert len(tw.hard_negatives("a red circle above a blue cross")) == 3
    assert len(tw.hard_negatives("a small red circle above a small blue cross")) == 3
    for _, text in tw.training_pairs(200, 0):
        negatives = tw.hard_negatives(text)
        assert negatives and text not in negatives and len(set(negatives)) == len(negatives)
    with pytest.raises(ValueError, match="not a caption of the toy grammar"):
        tw.hard_negatives("a dog on a beach")


# --------------------------------------------------------------------------- SugarCrepe-, MMVP- and CLEVR-style sets

SUBSETS = ("add_obj", "add_att", "replace_obj", "replace_att", "replace_rel", "swap_obj", "swap_att")


def present(image) -> set[str]:
    """The colours drawn in an image (a few pure pixels of each)."""
    return {c for c in tw.COLOURS if colour_mask(image, c, tol=8).sum() >= 3}


def test_new_sets_are_a_function_of_the_seed():
    for subset in SUBSETS:
        assert tw.sugarcrepe_cases(subset, 6, 1) == tw.sugarcrepe_cases(subset, 6, 1)
        assert tw.sugarcrepe_cases(subset, 6, 1) != tw.sugarcrepe_cases(subset, 6, 2)
    assert tw.mmvp_pairs(3, 1) == tw.mmvp_pairs(3, 1) != tw.mmvp_pairs(3, 2)
    assert tw.clevr_images(4, 1) == tw.clevr_images(4, 1) != tw.clevr_images(4, 2)


def test_sugarcrepe_negatives_change_what_their_subset_names():
    for subset in SUBSETS:
        for picture, true, negative in tw.sugarcrepe_cases(subset, 25, 0):
            scene = picture.scene
            assert picture.alone == (subset == "add_obj") and true != negative
            t, n = true.split(), negative.split()
            if subset == "add_obj":  # the image holds the first object; the negative adds the second
                assert true == f"a {scene.first.phrase(False)}" and negative == tw.caption(scene)
                continue
            assert true == tw.caption(scene)
            if subset == "add_att":  # one size word more, and not the object's size
                assert len(n) == len(t) + 1
                k = next(i for i, w in enumerate(n) if w in tw.SIZES)
                assert n[:k] + n[k + 1:] == t
                thing = scene.first if k == 1 else scene.second
                assert n[k] != thing.size
            elif subset.startswith("swap"):  # the same words in another order
                assert Counter(t) == Counter(n)
                kind = "colour" if subset == "swap_att" else "phrase"
                assert negative == tw.caption(tw._swap(scene, kind))
            else:  # one word replaced by one absent from the scene
                changed = [(a, b) for a, b in zip(t, n) if a != b]
                pool = {"replace_att": tw.COLOURS, "replace_obj": tw.SHAPES}.get(subset)
                if pool is None:
                    assert " ".join(n[3:-3]) in tw.RELATIONS and " ".join(n[3:-3]) != scene.relation
                else:
                    [(old, new)] = changed
                    things = (scene.first, scene.second)
                    assert new in pool and new not in {getattr(x, "colour" if pool is tw.COLOURS else "shape")
                                                       for x in things}


def test_sugarcrepe_add_obj_image_shows_only_the_first_object():
    for picture, true, _ in tw.sugarcrepe_cases("add_obj", 10, 0):
        assert present(tw.render_picture(picture, SIZE)) == {picture.scene.first.colour}
        assert present(tw.render_picture(tw.Picture(picture.scene), SIZE)) == {picture.scene.first.colour,
                                                                               picture.scene.second.colour}


def test_mmvp_pairs_differ_in_their_pattern_alone():
    pairs = tw.mmvp_pairs(12, 0)
    assert [p[0] for p in pairs] == [name for name in tw.MMVP_PATTERNS for _ in range(12)]
    for pattern, one, two, s_one, s_two in pairs:
        assert s_one != s_two and one != two
        for picture, statement in ((one, s_one), (two, s_two)):  # each statement describes its own picture
            scene = picture.scene
            if picture.alone:
                assert statement == f"a {scene.first.phrase(False)}"
            else:
                assert statement == tw.caption(scene, with_size=pattern == "Size")
        a, b = one.scene, two.scene
        if pattern == "Quantity and Count":
            assert a == b and one.alone != two.alone
            continue
        assert not one.alone and not two.alone and a.layout == b.layout and a.second == b.second
        if pattern == "Positional and Relational Context":
            assert a.first == b.first and b.relation == tw.INVERSE[a.relation]
        elif pattern == "Color and Appearance":
            assert a.relation == b.relation and a.first.colour != b.first.colour
            assert {a.first.colour, b.first.colour}.isdisjoint({a.second.colour})
            assert (a.first.shape, a.first.size) == (b.first.shape, b.first.size)
        else:
            assert a.relation == b.relation and a.first.size != b.first.size
            assert (a.first.colour, a.first.shape) == (b.first.colour, b.first.shape)
    # the picture that comes first is drawn, so no pattern's answer is a constant
    assert {one.alone for pattern, one, *_ in pairs if pattern == "Quantity and Count"} == {True, False}


def test_mmvp_position_pairs_put_the_objects_in_each_others_place():
    for pattern, one, two, *_ in tw.mmvp_pairs(8, 0):
        if pattern != "Positional and Relational Context":
            continue
        first = [centroid(colour_mask(tw.render_picture(p, SIZE), p.scene.first.colour)) for p in (one, two)]
        second = [centroid(colour_mask(tw.render_picture(p, SIZE), p.scene.second.colour)) for p in (one, two)]
        axis = 0 if one.scene.relation in ("left of", "right of") else 1
        assert (first[0][axis] - second[0][axis]) * (first[1][axis] - second[1][axis]) < 0


def test_clevr_cases_are_gdbench_templates_true_of_their_image():
    for scene, cases in tw.clevr_images(12, 0):
        a, b = scene.first, scene.second
        assert scene.relation in ("left of", "right of") and a.size != b.size
        assert set(cases) == {"pair_binding_size", "pair_binding_color", "recognition_color", "recognition_shape",
                              "spatial", "binding_color_shape", "binding_shape_color"}
        assert all(len(pairs) == 2 and all(t != f for t, f in pairs) for pairs in cases.values())
        assert cases["binding_color_shape"][0] == [f"A {a.colour} {a.shape}.", f"A {b.colour} {a.shape}."]
        assert cases["binding_shape_color"][1] == [f"A {b.colour} {b.shape}.", f"A {b.colour} {a.shape}."]
        assert cases["pair_binding_size"][0] == [f"A {a.size} {a.shape} and a {b.size} {b.shape}.",
                                                 f"A {b.size} {a.shape} and a {a.size} {b.shape}."]
        foil_colour = cases["recognition_color"][0][1].split()[1]
        foil_shape = cases["recognition_shape"][0][1].split()[1].rstrip(".")
        assert foil_colour not in (a.colour, b.colour) and foil_shape not in (a.shape, b.shape)
        image = tw.render_scene(scene, SIZE)
        for thing, (true, _) in zip((a, b), cases["spatial"]):
            x = centroid(colour_mask(image, thing.colour))[0]
            assert true == f"On the {'left' if x < SIZE / 2 else 'right'} is a {thing.colour} {thing.shape}."


def test_the_new_sets_leave_the_earlier_files_byte_for_byte(tmp_path):
    """Each new set draws from its own generator and writes its own folder: every file of the
    earlier sets, and their index entries, are what the data stage wrote before the new sets
    existed (the digest below was taken from that build)."""
    import hashlib
    import json

    from pipeline.config import DataConfig
    from pipeline.data.build import build_toy

    out = tmp_path / "data"
    build_toy(DataConfig(n_train=40, n_winoground=12, n_aro=12, n_zeroshot_per_class=3), out)
    new = ("sugarcrepe", "mmvp", "clevr", "train-negatives.json")   # the later additions, beside the earlier sets
    digest = hashlib.sha256()
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        relative = path.relative_to(out).as_posix()
        if relative.split("/")[0] not in new and relative != "index.json":
            digest.update(relative.encode())
            digest.update(path.read_bytes())
    index = {key: value for key, value in json.loads((out / "index.json").read_text()).items() if key not in new}
    index["train"].pop("negatives")
    digest.update(json.dumps(index, sort_keys=True).encode())
    assert digest.hexdigest() == "bd1f87010046de66addd760a46339dbc35f707416a32b807185abfef515ef0fd"
