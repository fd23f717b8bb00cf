"""DVC stage `baselines`: pretrained students and the teacher's diffusion score on every benchmark."""
import sys

from pipeline import cli
from pipeline.config import CACHE_DIR, DATA_DIR, MODELS_DIR


def body(args, cfg, root):
    from pipeline.experiment import run_baselines
    from pipeline.io import check_writable, write_json
    from pipeline.tracking import Tracker

    path = root / "results" / "baselines.json"
    check_writable(path, "results")     # before the evaluation, not after its runs are recorded
    results = run_baselines(cfg, root, root / DATA_DIR, root / MODELS_DIR, root / CACHE_DIR,
                            Tracker(cfg.tracking, root))
    write_json(path, results)


def main(argv=None) -> int:
    return cli.run(__doc__, body, argv)


if __name__ == "__main__":
    sys.exit(main())
