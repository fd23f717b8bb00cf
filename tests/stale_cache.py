"""A cache made stale: `models/teacher` replaced by other weights after the cache stage encoded its
tables, as a models stage run by hand without the cache stage leaves it."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from pipeline.config import TeacherConfig
from pipeline.digest import fingerprint
from pipeline.models import teacher_dir
from pipeline.models.teacher import build_toy_teacher, save_teacher


def replace_the_teacher(teacher: TeacherConfig, image_size: int, models: Path) -> tuple[str, str]:
    """`models`/teacher overwritten with the toy teacher of the next seed; (old, new) fingerprints."""
    old = fingerprint(teacher_dir(models))
    other = dataclasses.replace(teacher, seed=teacher.seed + 1)
    save_teacher(build_toy_teacher(other, image_size), teacher_dir(models))
    return old, fingerprint(teacher_dir(models))
