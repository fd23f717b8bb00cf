"""DVC stages `train_clip` and `train_sds` (`python -m stages.train clip|sds`): fine-tune the student
from params and evaluate it.

`clip` fine-tunes with L_CLIP alone (lambda 0); `sds` with L_CLIP + lambda L_SDS,
lambda = objective.lambda_sds. The trial folder keeps a checkpoint, so an interrupted
stage resumes where it stopped.
"""
import sys

from pipeline import cli

ROW_NAMES = {"clip": "FT with L_CLIP", "sds": "FT with L_CLIP + lambda L_SDS"}


def body(args, cfg, root):
    from pipeline.experiment import run_finetune
    from pipeline.io import write_json
    from pipeline.tracking import Tracker

    lambda_sds = 0.0 if args.variant == "clip" else cfg.objective.lambda_sds
    result = run_finetune(cfg, root / cfg.data.root, root / "models", root / cfg.cache.root,
                          root / "runs" / args.variant, Tracker(cfg.tracking, root), ROW_NAMES[args.variant],
                          lambda_sds, tags={"row": f"ft_{args.variant}"})
    write_json(root / "results" / f"train-{args.variant}.json", result)


def main(argv=None) -> int:
    return cli.run(__doc__, body, argv,
                   extend=lambda p: p.add_argument("variant", choices=sorted(ROW_NAMES), help="which Table-1 row"))


if __name__ == "__main__":
    sys.exit(main())
