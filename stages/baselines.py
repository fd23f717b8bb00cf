"""DVC stage `baselines`: pretrained students and the teacher's diffusion score on every benchmark."""
import sys

from pipeline import cli


def body(args, cfg, root):
    from pipeline.experiment import run_baselines
    from pipeline.io import write_json
    from pipeline.tracking import Tracker

    results = run_baselines(cfg, root, root / cfg.data.root, root / "models", root / cfg.cache.root,
                            Tracker(cfg.tracking, root))
    write_json(root / "results" / "baselines.json", results)


def main(argv=None) -> int:
    return cli.run(__doc__, body, argv)


if __name__ == "__main__":
    sys.exit(main())
