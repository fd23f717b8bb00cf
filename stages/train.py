"""DVC stages `train_clip` and `train_sds` (`python -m stages.train clip|sds`): fine-tune the student
from params and evaluate it.

`clip` fine-tunes with L_CLIP alone (objective.method clip, lambda_sds 0: what its run logs);
`sds` with the objective params.yaml sets, the paper's L_CLIP + lambda L_SDS by default. The
trial folder keeps a checkpoint, so an interrupted stage resumes where it stopped.
"""
import dataclasses
import sys

from pipeline import cli
from pipeline.config import CACHE_DIR, DATA_DIR, MODELS_DIR

ROW_NAMES = {"clip": "FT with L_CLIP", "sds": "FT with the configured objective"}


def clip_only(cfg):
    """The config with L_CLIP as its whole objective (the keys only a teacher loss reads stay as they
    are, unread; the ones that would contradict L_CLIP alone, `ObjectiveConfig`'s checks, are set to
    match it)."""
    objective = dataclasses.replace(cfg.objective, method="clip", lambda_sds=0.0, clip_weight=1.0, projector_steps=0,
                                    projector="linear", feedback_timesteps=1)
    return dataclasses.replace(cfg, objective=objective)


def body(args, cfg, root):
    from pipeline.config import ConfigError
    from pipeline.experiment import record_finetune
    from pipeline.io import check_writable, write_json
    from pipeline.tracking import Tracker
    from pipeline.train import NonFiniteLoss, discard_checkpoint

    results, folder = root / "results" / f"train-{args.variant}.json", root / "runs" / args.variant
    check_writable(results, "results")
    run_cfg = clip_only(cfg) if args.variant == "clip" else cfg
    try:
        result = record_finetune(run_cfg, root / DATA_DIR, root / MODELS_DIR, root / CACHE_DIR, folder,
                                 Tracker(cfg.tracking, root), ROW_NAMES[args.variant], tags={"row": f"ft_{args.variant}"})
    except NonFiniteLoss as err:            # what the settings made of the loss: said in one line
        raise ConfigError(f"{type(err).__name__}: {err}") from None
    write_json(results, result)
    discard_checkpoint(folder)              # only now: a failed write resumes from it


def main(argv=None) -> int:
    return cli.run(__doc__, body, argv,
                   extend=lambda p: p.add_argument("variant", choices=sorted(ROW_NAMES), help="which Table-1 row"))


if __name__ == "__main__":
    sys.exit(main())
