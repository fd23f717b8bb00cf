"""DVC stage `models`: train (toy) or fetch (paper) the teacher and every student into models/."""
import sys

from pipeline import cli
from pipeline.models.build import build_models


def main(argv=None) -> int:
    return cli.run(__doc__, lambda args, cfg, root: build_models(cfg, root / cfg.data.root, root / "models"), argv)


if __name__ == "__main__":
    sys.exit(main())
