"""DVC stage `cache`: VAE latents and text conditioning of the teacher, in checksummed shards."""
import sys

from pipeline import cli


def body(args, cfg, root):
    from pipeline.digest import fingerprint
    from pipeline.device import resolve_device
    from pipeline.latents import build_cache
    from pipeline.models.build import teacher_dir
    from pipeline.models.teacher import load_teacher

    folder = teacher_dir(root / "models")
    teacher = load_teacher(folder).to(resolve_device(cfg.compute.device))
    build_cache(cfg, teacher, fingerprint(folder), root / cfg.data.root, root / cfg.cache.root)


def main(argv=None) -> int:
    return cli.run(__doc__, body, argv)


if __name__ == "__main__":
    sys.exit(main())
