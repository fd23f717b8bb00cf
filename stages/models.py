"""DVC stage `models`: train (toy) or fetch (paper) the teacher and every student into models/."""
import sys

from pipeline import cli
from pipeline.config import DATA_DIR, MODELS_DIR


def body(args, cfg, root):
    from pipeline.models.build import build_models

    build_models(cfg, root / DATA_DIR, root / MODELS_DIR)


def main(argv=None) -> int:
    return cli.run(__doc__, body, argv)


if __name__ == "__main__":
    sys.exit(main())
