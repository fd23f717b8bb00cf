"""The toy world: coloured shapes in spatial relations, with captions from a small grammar.

Everything is a pure function of a seed. A scene holds two objects (colour, shape, size)
in one of four spatial relations; a caption names them in one of two forms:
  1 main predicate:  "a red circle left of a blue square"
  2 main predicates: "a big red circle left of a small blue square" (size is a second
                      predicate on each object, so a swap can move it independently).
Benchmarks mirror the real ones' constructions:
  Winoground-style: two scenes and two captions with the same words in another order;
    Object = the shape nouns swap, Relation = the colour (or size) adjectives swap,
    Both = whole noun phrases (adjectives and noun) swap, which flips who is where.
  ARO-style: VG-Relation (subject/object swapped around the relation), VG-Attribution
    (colours swapped between the two objects), Order (the ARO word-order shuffles).
  Zero-shot: single objects classified by shape and by colour.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace

from PIL import Image, ImageDraw

# A vocabulary large enough that two random scenes rarely share both their colours and their
# shapes (1 pair in 280): a contrastive batch then seldom holds a caption with the same words in
# another order, so a student can match captions as bags of words, as CLIP does on web data,
# while a text-to-image teacher must still bind each colour to its shape to draw the scene.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 190),
    "orange": (245, 135, 20),
    "cyan": (30, 190, 210),
    "brown": (120, 75, 40),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
SIZES = ("big", "small")
RELATIONS = ("left of", "right of", "above", "below")
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
BACKGROUND = (245, 245, 240)
SUPERSAMPLE = 4

# Part of speech of every word the grammar emits (universal tags, as a tagger would give).
LEXICON: dict[str, str] = {
    **{c: "ADJ" for c in COLOURS},
    **{s: "ADJ" for s in SIZES},
    **{s: "NOUN" for s in SHAPES},
    "a": "DET", "the": "DET", "left": "NOUN", "right": "NOUN", "of": "ADP",
    "above": "ADP", "below": "ADP", "is": "AUX", "and": "CCONJ",
}
SHAPE_TEMPLATES = ("a {}", "a picture of a {}", "one {}")
COLOUR_TEMPLATES = ("a {} shape", "something {}", "a {} object")


@dataclass(frozen=True)
class Thing:
    colour: str
    shape: str
    size: str = "big"

    def phrase(self, with_size: bool) -> str:
        words = ([self.size] if with_size else []) + [self.colour, self.shape]
        return " ".join(words)


@dataclass(frozen=True)
class Scene:
    """`first` stands in `relation` to `second`; `layout` jitters positions reproducibly."""

    first: Thing
    second: Thing
    relation: str
    layout: int


def caption(scene: Scene, with_size: bool = False, article: str = "a") -> str:
    return (f"{article} {scene.first.phrase(with_size)} {scene.relation} "
            f"{article} {scene.second.phrase(with_size)}")


def _radius(size: str, image_size: int) -> float:
    return image_size * (0.17 if size == "big" else 0.11)


def _centres(scene: Scene, image_size: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """Centres of the two objects: apart along the relation's axis, jittered across it."""
    rng = random.Random(scene.layout)
    s = image_size
    near, far = rng.uniform(0.22, 0.34) * s, rng.uniform(0.66, 0.78) * s
    across_a, across_b = rng.uniform(0.25, 0.75) * s, rng.uniform(0.25, 0.75) * s
    if scene.relation in ("left of", "right of"):
        a, b = (near, across_a), (far, across_b)
    else:
        a, b = (across_a, near), (across_b, far)
    return (a, b) if scene.relation in ("left of", "above") else (b, a)


def _draw(draw: ImageDraw.ImageDraw, thing: Thing, centre: tuple[float, float], r: float) -> None:
    x, y = centre
    fill = COLOURS[thing.colour]
    if thing.shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif thing.shape == "square":
        k = r * 0.88
        draw.rectangle((x - k, y - k, x + k, y + k), fill=fill)
    elif thing.shape == "diamond":
        k = r * 1.15
        draw.polygon([(x, y - k), (x + k, y), (x, y + k), (x - k, y)], fill=fill)
    elif thing.shape == "cross":
        k, w = r * 1.0, r * 0.36
        draw.rectangle((x - k, y - w, x + k, y + w), fill=fill)
        draw.rectangle((x - w, y - k, x + w, y + k), fill=fill)
    else:
        draw.polygon([(x, y - r * 1.1), (x - r * 1.1, y + r * 0.9), (x + r * 1.1, y + r * 0.9)], fill=fill)


def render(things: list[tuple[Thing, tuple[float, float]]], image_size: int) -> Image.Image:
    """Anti-aliased RGB image of objects at (fractional) pixel centres."""
    big = image_size * SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for thing, (x, y) in things:
        _draw(draw, thing, (x * SUPERSAMPLE, y * SUPERSAMPLE), _radius(thing.size, image_size) * SUPERSAMPLE)
    return canvas.resize((image_size, image_size), Image.Resampling.BOX)


def render_scene(scene: Scene, image_size: int) -> Image.Image:
    a, b = _centres(scene, image_size)
    return render([(scene.first, a), (scene.second, b)], image_size)


def random_scene(rng: random.Random) -> Scene:
    """Two objects differing in colour and in shape, so every swap changes the scene."""
    c1, c2 = rng.sample(list(COLOURS), 2)
    s1, s2 = rng.sample(SHAPES, 2)
    z1, z2 = rng.choice(SIZES), rng.choice(SIZES)
    return Scene(Thing(c1, s1, z1), Thing(c2, s2, z2), rng.choice(RELATIONS), rng.getrandbits(32))


def training_pairs(n: int, seed: int) -> list[tuple[Scene, str]]:
    """Scenes with one caption each, phrased from either object and in either form."""
    rng = random.Random(f"train-{seed}")
    pairs = []
    for _ in range(n):
        scene = random_scene(rng)
        described = scene
        if rng.random() < 0.5:  # the same scene said the other way round
            described = Scene(scene.second, scene.first, INVERSE[scene.relation], scene.layout)
        pairs.append((scene, caption(described, with_size=rng.random() < 0.5)))
    return pairs


_PHRASE = rf"(?:({'|'.join(SIZES)}) )?({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})"
_CAPTION = re.compile(rf"(a|the) {_PHRASE} ({'|'.join(RELATIONS)}) (?:a|the) {_PHRASE}")


def hard_negatives(text: str) -> list[str]:
    """NegCLIP-style negatives of a training caption, by the grammar's own swaps: the shapes, the
    colours, the sizes (when both are said and differ) and the whole noun phrases (which flips
    who is where). Each differs from the caption; none comes from a benchmark scene."""
    match = _CAPTION.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not a caption of the toy grammar")
    article, size_a, colour_a, shape_a, relation, size_b, colour_b, shape_b = match.groups()
    with_size = size_a is not None
    scene = Scene(Thing(colour_a, shape_a, size_a or "big"), Thing(colour_b, shape_b, size_b or "big"), relation, 0)
    kinds = ["shape", "colour"] + (["size"] if with_size and size_a != size_b else []) + ["phrase"]
    return [caption(_swap(scene, kind), with_size, article) for kind in kinds]


@dataclass(frozen=True)
class WinogroundToyTask:
    scene_0: Scene
    scene_1: Scene
    caption_0: str
    caption_1: str
    tag: str
    collapsed_tag: str
    num_main_preds: int


def _swap(scene: Scene, kind: str) -> Scene:
    a, b = scene.first, scene.second
    if kind == "shape":
        a, b = replace(a, shape=b.shape), replace(b, shape=a.shape)
    elif kind == "colour":
        a, b = replace(a, colour=b.colour), replace(b, colour=a.colour)
    elif kind == "size":
        a, b = replace(a, size=b.size), replace(b, size=a.size)
    else:  # whole noun phrases
        a, b = b, a
    return replace(scene, first=a, second=b)


# (swapped part, Winoground tag, collapsed tag)
SWAPS = (
    ("shape", "Noun", "Object"),
    ("colour", "Adjective-Color", "Relation"),
    ("size", "Adjective-Size", "Relation"),
    ("phrase", "Noun Phrase", "Both"),
)


def winoground_tasks(n: int, seed: int) -> list[WinogroundToyTask]:
    """Tasks cycling through the swap kinds; size swaps need the 2-predicate form."""
    rng = random.Random(f"winoground-{seed}")
    tasks = []
    while len(tasks) < n:
        kind, tag, collapsed = SWAPS[len(tasks) % len(SWAPS)]
        with_size = kind == "size" or rng.random() < 0.5
        scene_0 = random_scene(rng)
        if kind == "size" and scene_0.first.size == scene_0.second.size:
            other = "small" if scene_0.first.size == "big" else "big"
            scene_0 = replace(scene_0, second=replace(scene_0.second, size=other))
        elif with_size and kind != "size":
            # Equal sizes keep a 2-predicate swap about the swapped words alone.
            scene_0 = replace(scene_0, second=replace(scene_0.second, size=scene_0.first.size))
        scene_1 = replace(_swap(scene_0, kind), layout=rng.getrandbits(32))
        tasks.append(WinogroundToyTask(
            scene_0, scene_1, caption(scene_0, with_size), caption(scene_1, with_size),
            tag, collapsed, 2 if with_size else 1,
        ))
    return tasks


def vg_relation_cases(n: int, seed: int) -> list[tuple[Scene, str, str]]:
    """(scene, true caption, false caption): subject and object swapped around the relation."""
    rng = random.Random(f"vg-relation-{seed}")
    cases = []
    for _ in range(n):
        scene = random_scene(rng)
        true = f"the {scene.first.phrase(False)} is {scene.relation} the {scene.second.phrase(False)}"
        false = f"the {scene.second.phrase(False)} is {scene.relation} the {scene.first.phrase(False)}"
        cases.append((scene, true, false))
    return cases


def vg_attribution_cases(n: int, seed: int) -> list[tuple[Scene, str, str, tuple[str, str]]]:
    """(scene, true, false, (colour_a, colour_b)): the two colours swapped between objects."""
    rng = random.Random(f"vg-attribution-{seed}")
    cases = []
    for _ in range(n):
        scene = random_scene(rng)
        a, b = scene.first, scene.second
        true = f"the {a.colour} {a.shape} and the {b.colour} {b.shape}"
        false = f"the {b.colour} {a.shape} and the {a.colour} {b.shape}"
        cases.append((scene, true, false, (a.colour, b.colour)))
    return cases


def order_cases(n: int, seed: int) -> list[tuple[Scene, list[str]]]:
    """(scene, captions) for the word-order set; each scene described both ways round."""
    rng = random.Random(f"order-{seed}")
    cases = []
    for _ in range(n):
        scene = random_scene(rng)
        flipped = Scene(scene.second, scene.first, INVERSE[scene.relation], scene.layout)
        with_size = rng.random() < 0.5
        cases.append((scene, [caption(scene, with_size), caption(flipped, with_size)]))
    return cases


def zeroshot_images(attribute: str, per_class: int, image_size: int, seed: int) -> tuple[tuple[str, ...], list[tuple[int, Image.Image]]]:
    """Single-object images labelled by `attribute` ("shape" or "colour")."""
    rng = random.Random(f"zeroshot-{attribute}-{seed}")
    classes = SHAPES if attribute == "shape" else tuple(COLOURS)
    images = []
    for label, name in enumerate(classes):
        for _ in range(per_class):
            thing = Thing(
                name if attribute == "colour" else rng.choice(list(COLOURS)),
                name if attribute == "shape" else rng.choice(SHAPES),
                rng.choice(SIZES),
            )
            centre = (rng.uniform(0.3, 0.7) * image_size, rng.uniform(0.3, 0.7) * image_size)
            images.append((label, render([(thing, centre)], image_size)))
    return classes, images


# --------------------------------------------------------------------------- SugarCrepe-, MMVP- and CLEVR-style sets
#
# Each set draws from its own generator, so adding one changes none of the sets above.


@dataclass(frozen=True)
class Picture:
    """What an image shows: the scene, or (`alone`) only its first object, where the scene puts it."""

    scene: Scene
    alone: bool = False


def render_picture(picture: Picture, image_size: int) -> Image.Image:
    if not picture.alone:
        return render_scene(picture.scene, image_size)
    centre, _ = _centres(picture.scene, image_size)
    return render([(picture.scene.first, centre)], image_size)


def _other(rng: random.Random, options, taken) -> str:
    return rng.choice([o for o in options if o not in taken])


def _phrase(article: str, thing: Thing, size: str | None = None) -> str:
    return f"{article} {size + ' ' if size else ''}{thing.colour} {thing.shape}"


def _sugarcrepe_case(subset: str, rng: random.Random) -> tuple[Picture, str, str]:
    """(picture, caption, negative caption) of one SugarCrepe-style case in the 1-predicate form.

    add_att: a size the object does not have is put before it; add_obj: the image holds one
    object and the negative adds the second; replace_att / replace_obj: one object's colour /
    shape becomes one absent from the scene; replace_rel: another relation; swap_att: the two
    colours trade places; swap_obj: the two noun phrases trade places around the relation.
    """
    scene = random_scene(rng)
    true = caption(scene)
    if subset == "add_obj":
        return Picture(scene, alone=True), _phrase("a", scene.first), true
    if subset == "add_att":
        first = rng.random() < 0.5
        thing = scene.first if first else scene.second
        wrong = "small" if thing.size == "big" else "big"
        a = _phrase("a", scene.first, wrong if first else None)
        b = _phrase("a", scene.second, None if first else wrong)
        return Picture(scene), true, f"{a} {scene.relation} {b}"
    if subset == "replace_rel":
        changed = replace(scene, relation=_other(rng, RELATIONS, {scene.relation}))
    elif subset in ("replace_att", "replace_obj"):
        key, options = ("colour", COLOURS) if subset == "replace_att" else ("shape", SHAPES)
        taken = {getattr(scene.first, key), getattr(scene.second, key)}
        field_name = "first" if rng.random() < 0.5 else "second"
        thing = replace(getattr(scene, field_name), **{key: _other(rng, options, taken)})
        changed = replace(scene, **{field_name: thing})
    elif subset == "swap_att":
        changed = _swap(scene, "colour")
    elif subset == "swap_obj":
        changed = _swap(scene, "phrase")
    else:
        raise ValueError(f"unknown SugarCrepe subset {subset!r}")
    return Picture(scene), true, caption(changed)


def sugarcrepe_cases(subset: str, n: int, seed: int) -> list[tuple[Picture, str, str]]:
    """n SugarCrepe-style cases of one subset (add_att, add_obj, replace_att, replace_obj,
    replace_rel, swap_att, swap_obj): (picture, caption, negative caption)."""
    rng = random.Random(f"sugarcrepe-{subset}-{seed}")
    return [_sugarcrepe_case(subset, rng) for _ in range(n)]


# MMVP-VLM patterns the toy world can show, with the image folder (MMVP's "Type") of each;
# size has no MMVP pattern and keeps its own name.
MMVP_PATTERNS = {
    "Quantity and Count": "Quantity",
    "Positional and Relational Context": "Spatial",
    "Color and Appearance": "Color",
    "Size": "Size",
}


def _mmvp_pair(pattern: str, rng: random.Random) -> tuple[Picture, Picture, str, str]:
    """Two pictures that differ in one visual pattern, and a statement of each."""
    scene = random_scene(rng)
    with_size = pattern == "Size"
    if pattern == "Quantity and Count":  # the scene, and its first object alone
        one, two = Picture(scene, alone=True), Picture(scene)
        return one, two, _phrase("a", scene.first), caption(scene)
    if pattern == "Positional and Relational Context":  # the two objects trade places
        other = replace(scene, relation=INVERSE[scene.relation])
    elif pattern == "Color and Appearance":  # the first object in a colour absent from the scene
        colour = _other(rng, COLOURS, {scene.first.colour, scene.second.colour})
        other = replace(scene, first=replace(scene.first, colour=colour))
    elif pattern == "Size":
        other = replace(scene, first=replace(scene.first, size="small" if scene.first.size == "big" else "big"))
    else:
        raise ValueError(f"unknown MMVP pattern {pattern!r}")
    return Picture(scene), Picture(other), caption(scene, with_size), caption(other, with_size)


def mmvp_pairs(n_per_pattern: int, seed: int) -> list[tuple[str, Picture, Picture, str, str]]:
    """(pattern, picture 1, picture 2, statement 1, statement 2), pattern by pattern in
    `MMVP_PATTERNS` order (MMVP-VLM's file holds its patterns in blocks); which of the two
    pictures comes first is drawn, so the answer does not follow from the pattern."""
    rng = random.Random(f"mmvp-{seed}")
    pairs = []
    for pattern in MMVP_PATTERNS:
        for _ in range(n_per_pattern):
            one, two, s_one, s_two = _mmvp_pair(pattern, rng)
            if rng.random() < 0.5:
                one, two, s_one, s_two = two, one, s_two, s_one
            pairs.append((pattern, one, two, s_one, s_two))
    return pairs


def _clevr_scene(rng: random.Random) -> Scene:
    """Two objects side by side differing in colour, shape and size, as in GDBench's CLEVR images
    (every subtask, the spatial and size ones included, is asked of every image)."""
    scene = random_scene(rng)
    second = replace(scene.second, size="small" if scene.first.size == "big" else "big")
    return replace(scene, second=second, relation=rng.choice(("left of", "right of")))


def _clevr_captions(scene: Scene, colour: str, shape: str) -> dict[str, list[list[str]]]:
    """GDBench's seven CLEVR subtasks of one image, each [true caption, false caption] per object;
    `colour` and `shape` are absent from the scene (the recognition foils)."""
    cases: dict[str, list[list[str]]] = {}
    for this, that in ((scene.first, scene.second), (scene.second, scene.first)):
        here = "left" if (this == scene.first) == (scene.relation == "left of") else "right"
        there = "right" if here == "left" else "left"
        own = {
            "pair_binding_size": [f"A {this.size} {this.shape} and a {that.size} {that.shape}.",
                                  f"A {that.size} {this.shape} and a {this.size} {that.shape}."],
            "pair_binding_color": [f"A {this.colour} {this.shape} and a {that.colour} {that.shape}.",
                                   f"A {that.colour} {this.shape} and a {this.colour} {that.shape}."],
            "recognition_color": [f"A {this.colour} object.", f"A {colour} object."],
            "recognition_shape": [f"A {this.shape}.", f"A {shape}."],
            "spatial": [f"On the {here} is a {this.colour} {this.shape}.",
                        f"On the {there} is a {this.colour} {this.shape}."],
            "binding_color_shape": [f"A {this.colour} {this.shape}.", f"A {that.colour} {this.shape}."],
            "binding_shape_color": [f"A {this.colour} {this.shape}.", f"A {this.colour} {that.shape}."],
        }
        for subtask, pair in own.items():
            cases.setdefault(subtask, []).append(pair)
    return cases


def clevr_images(n: int, seed: int) -> list[tuple[Scene, dict[str, list[list[str]]]]]:
    """n CLEVR-style images, each with its cases of every GDBench subtask (two per subtask)."""
    rng = random.Random(f"clevr-{seed}")
    images = []
    for _ in range(n):
        scene = _clevr_scene(rng)
        colour = _other(rng, COLOURS, {scene.first.colour, scene.second.colour})
        shape = _other(rng, SHAPES, {scene.first.shape, scene.second.shape})
        images.append((scene, _clevr_captions(scene, colour, shape)))
    return images
