"""DVC stage `data`: generate the toy world (or index the paper's datasets) into data.root."""
import sys

from pipeline import cli
from pipeline.data.build import build_data


def main(argv=None) -> int:
    return cli.run(__doc__, lambda args, cfg, root: build_data(cfg.data, root / cfg.data.root), argv)


if __name__ == "__main__":
    sys.exit(main())
