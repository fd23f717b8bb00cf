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
