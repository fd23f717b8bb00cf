"""DVC stage `data`: generate the toy world (or index the paper's datasets) into data/.

With the paper profile, the user's dataset roots are checked before anything heavy is
imported: a missing one stops the stage in well under a second with one line naming it.
"""
import sys


def body(args, cfg, root):
    from pipeline.config import DATA_DIR
    from pipeline.data.build import build_data

    build_data(cfg.data, root / DATA_DIR, base=root)


def main(argv=None) -> int:
    from pipeline.data.paper import preflight

    code = preflight(argv)
    if code is not None:
        return code
    from pipeline import cli

    return cli.run(__doc__, body, argv)


if __name__ == "__main__":
    sys.exit(main())
