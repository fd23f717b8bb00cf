"""What a fine-tuning run reads from the cache beside the teacher, and the check that they belong together.

Light on purpose (no torch): a sweep's driver checks every trial's tables before it starts Ray,
and the trial checks again when it opens them (`pipeline.experiment.run_finetune`).
"""
from __future__ import annotations

from pathlib import Path

from pipeline.config import FEEDBACK_METHODS, Config
from pipeline.digest import fingerprint


def teacher_tables(cfg: Config) -> list[str]:
    """The cache tables a fine-tuning run of `cfg` reads beside the teacher: the captions' conditioning
    for any teacher loss, the training images' latents for the losses that read them, and what
    the evaluation's projected score (sds) and feedback diagnostic read. None without a teacher loss."""
    objective = cfg.objective
    if not objective.teacher_loss:
        return []
    method = objective.method
    reads = {"train_text": True, "train_images": method in ("unet_feature", *FEEDBACK_METHODS),
             "bench_text": cfg.eval.projected_score and method == "sds", "bench_images": method in FEEDBACK_METHODS}
    return [name for name, read in reads.items() if read]


def check_encoded_by(teacher: Path, *tables) -> None:
    """Refuse a cache table (`pipeline.cache.Table`) that other teacher weights encoded: its meta's
    `teacher` is the fingerprint the cache stage wrote. DVC re-runs the cache stage after the models
    stage; run by hand, a models stage followed by a training stage or a sweep would pair the new
    UNet with the old teacher's conditioning and latents, and train and score without a word."""
    from pipeline.cache import CacheError      # the tables' module: imported by whoever opened them

    teacher_id = fingerprint(teacher) if tables else None
    for table in tables:
        if table.meta.get("teacher") != teacher_id:
            raise CacheError(table.name, table.folder,
                             f"encoded by teacher {table.meta.get('teacher')}, but {teacher} holds teacher "
                             f"{teacher_id}; re-run the cache stage (dvc repro cache, or python -m stages.cache)")
