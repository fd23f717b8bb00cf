"""The paper's appendix tables from the same results as its Table 1, each row beside the published one
on the paper profile where it ran the published row's setting (`published.beside_measured`).

    appendix-unet-feature   A.2: train.student pretrained and fine-tuned with L_CLIP, with L_CLIP +
                            lambda L_SDS and with L_CLIP + lambda UNet-feature loss: the seeds of the
                            first sweep that ran objective.method unet_feature (sweeps/methods.yaml),
                            each row against that sweep's FT with L_CLIP
    appendix-diffusion-score
                            section 2, appendices D and K: the teacher's diffusion score on
                            Winoground, ARO and the order sets beside every pretrained student, each
                            student's ARO against the diffusion score's on the same cases
    appendix-clevr          J: CLEVR per subtask of the diffusion score and of every Table-1 row that
                            has CLEVR, each row's mean against its student's FT with L_CLIP
    appendix-sd21, appendix-cc3m
                            G and H: Table 1's FT with L_CLIP + L_SDS rows of a study run in the
                            appendix's setting (teacher.name stable-diffusion-v2-1; data.train_set
                            cc3m), which only the paper profile has

The lambda and learning-rate ablations (appendix F) are the sweep reports of sweeps/lambda.yaml and
sweeps/lr.yaml (`pipeline.report`); the paper publishes no numbers for them. Appendix L's CoCa is a
student of `pipeline.paper_tables`.
"""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from pipeline import published
from pipeline.config import CLEVR_SUBTASKS
from pipeline.paper_tables import (TEXT_VS_FT_CLIP, Comparison, Row, ft_clip_references, own_numbers, paper_numbers,
                                   trial_rows, write_table)
from pipeline.report import COLUMNS
from pipeline.report_names import APPENDIX, STUDY_SETTINGS

# Table ids (published.yaml's) of the tables built here rather than from a setting.
A2, DIFFUSION_SCORE, CLEVR = "appendix_unet_feature", "appendix_diffusion_score", "appendix_clevr"
NAMES = dict((key, name) for name, key in COLUMNS)
UNET_FEATURE = "unet_feature"
# Which of a sweep's rows A.2 shows, by objective.method: the reference first.
UNET_FEATURE_RUNS = ("ft_clip", "ft_sds", f"ft_{UNET_FEATURE}")


def _columns(*keys: str) -> list[tuple[str, str]]:
    return [(NAMES.get(key, key.split("/", 1)[1]), key) for key in keys]


def unet_feature_rows(cfg, table1: list[Row], sweeps: dict[str, list[dict]]) -> list[Row]:
    """A.2's rows: train.student's pretrained row and its FT rows of the first sweep (in `sweeps`' order)
    with a finished UNet-feature trial; [] when none has one."""
    for name, trials in sweeps.items():
        ran = [r for r in trial_rows(cfg, trials, name) if r.student == cfg.train.student and r.run in UNET_FEATURE_RUNS]
        if any(r.run == f"ft_{UNET_FEATURE}" for r in ran):
            ran.sort(key=lambda r: UNET_FEATURE_RUNS.index(r.run))
            pretrained = [r for r in table1 if r.student == cfg.train.student and r.run == "pretrained"]
            return pretrained + [replace(r, label=f"{r.label} (sweep {name})") for r in ran]
    return []


def write(cfg, table1: list[Row], sweeps: dict[str, list[dict]], out: Path, n_resamples: int = 1000,
          seed: int = 0) -> list[Path]:
    """Every appendix table the results allow, under `out`; `table1`: `paper_tables.rows`, `sweeps`: the
    trials of each sweep that ran, by name."""
    written = []
    references = ft_clip_references(cfg, table1)
    a2 = unet_feature_rows(cfg, table1, sweeps)
    if a2:
        reference = ft_clip_references(cfg, a2).get(cfg.train.student)
        written += write_table(out, APPENDIX[A2], a2, [paper_numbers(A2, r) for r in a2],
                               _columns("winoground/text", "winoground/text/object", "winoground/text/relation",
                                        "winoground/text/both", "winoground/image", "winoground/group",
                                        "aro/overall", "zeroshot/mean"),
                               TEXT_VS_FT_CLIP, lambda r: reference, n_resamples, seed)
    else:
        print("appendix A.2: no sweep has a finished trial of objective.method unet_feature (sweeps/methods.yaml "
              "runs it); no appendix-unet-feature table", file=sys.stderr)

    score = next(r for r in table1 if r.run == published.DIFFUSION_SCORE)
    aro = [score, *(r for r in table1 if r.run == "pretrained")]
    written += write_table(out, APPENDIX[DIFFUSION_SCORE], aro, [own_numbers(r, cfg.profile) for r in aro],
                           _columns("winoground/text", "aro/overall", "aro/vg_relation", "aro/vg_attribution",
                                    "aro/coco_order", "aro/flickr_order"),
                           Comparison("ARO", "aro/overall", "diffusion score", "diffusion_score"),
                           lambda r: score, n_resamples, seed)

    clevr = [r for r in [score, *(r for r in table1 if r is not score)] if "clevr/mean" in r.metrics]
    if clevr:
        written += write_table(out, APPENDIX[CLEVR], clevr, [paper_numbers(CLEVR, r) for r in clevr],
                               _columns("clevr/mean", *(f"clevr/{task}" for task in CLEVR_SUBTASKS)),
                               Comparison("CLEVR", "clevr/mean", "FT with L_CLIP", "ft_clip"),
                               lambda r: references.get(r.student), n_resamples, seed)

    for table_id, stem in STUDY_SETTINGS.items():
        beside = [(r, numbers) for r in table1
                  if r.run == "ft_sds" and (numbers := paper_numbers(table_id, r)) is not None]
        if beside:
            chosen, paper = map(list, zip(*beside))
            written += write_table(out, stem, chosen, paper, _columns("winoground/text"), TEXT_VS_FT_CLIP,
                                   lambda r: references.get(r.student), n_resamples, seed)
        elif cfg.profile == "paper":
            table = published.table(table_id)
            setting = " ".join(f"-S profiles.paper.{key}={value}"
                               for key, value in {**table.rows[0].values, **table.study}.items())
            print(f"{table.source}: no {stem} table; it needs a study of its own, "
                  f"e.g. dvc exp run {setting} (README: Running the paper profile)", file=sys.stderr)
    return written
