"""Cache keys of benchmark and training images, and the (image, caption) pairs each benchmark scores.

The cache stage stores one teacher latent per key and every scorer reads them back by key, so the
pairs a benchmark scores are spelled out once, here, for both.
"""
from __future__ import annotations

from pipeline.data.mmvp import MMVPPair, prompt
from pipeline.data.records import ChoiceCase, WinogroundTask


def image_key(path, bbox=None) -> str:
    """The cache key of an image (and crop): one latent per distinct crop. The box is written
    exactly (`repr` round-trips a float), since `parse_image_key` crops from the key."""
    return f"{path}" if bbox is None else f"{path}#bbox={','.join(repr(float(v)) for v in bbox)}"


def parse_image_key(key: str):
    path, _, box = key.partition("#bbox=")
    return path, (tuple(float(v) for v in box.split(",")) if box else None)


def winoground_pairs(tasks: list[WinogroundTask]) -> tuple[list[str], list[str]]:
    """Image keys and captions for scores[i, c, k], flattened in (i, c, k) order."""
    images, captions = [], []
    for task in tasks:
        for caption in (task.caption_0, task.caption_1):
            for image in (task.image_0, task.image_1):
                images.append(image_key(image))
                captions.append(caption)
    return images, captions


def choice_pairs(cases: list[ChoiceCase]) -> tuple[list[str], list[str]]:
    images, captions = [], []
    for case in cases:
        for option in case.options:
            images.append(image_key(case.image, case.bbox))
            captions.append(option)
    return images, captions


def mmvp_pairs(pairs: list[MMVPPair]) -> tuple[list[str], list[str]]:
    """Image keys and prompts for scores[i, k, j] (statement k of pair i with its image j), flattened in
    (i, k, j) order; each statement is scored in the release's prompt, "a photo of <statement>"."""
    images, captions = [], []
    for pair in pairs:
        for statement in (pair.statement_1, pair.statement_2):
            for image in (pair.image_1, pair.image_2):
                images.append(image_key(image))
                captions.append(prompt(statement))
    return images, captions
