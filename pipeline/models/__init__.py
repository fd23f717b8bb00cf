"""Model factories: CLIP students (open_clip), diffusion teachers (diffusers), the map h_w.

The models stage writes `models/teacher/` and `models/students/<name>/`; every reader finds them
here, without importing the code that builds them.
"""
from pathlib import Path


def teacher_dir(models: Path) -> Path:
    return Path(models) / "teacher"


def student_dir(models: Path, name: str) -> Path:
    return Path(models) / "students" / name
