"""What every command shares: --params/--profile, config loading, and one-line errors (exit 2).

Nothing here imports torch: a stage imports its heavy modules inside its body, so `--help`
and a bad parameter file are answered at once.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Callable

from pipeline.config import PROFILES, Config, ConfigError, load
from pipeline.data.errors import DataFormatError, MissingInput

# Bad input found before a stage's body runs: reported without importing torch.
CONFIG_ERRORS = (ConfigError, DataFormatError, MissingInput)


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "bad input": reported in one line, exit code 2, no traceback. Only the
    project's own: a library's FileNotFoundError or NotImplementedError is a bug to see whole."""
    from pipeline.cache import CacheError  # imports torch, so only once the arguments are parsed

    return (*CONFIG_ERRORS, CacheError)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (`error: ...`, exit 2) like every other bad input."""

    def error(self, message: str):
        self.exit(2, f"error: {message}\n")


def doc_parser(doc: str, prog: str | None, **kwargs) -> ArgumentParser:
    """A parser whose --help is `doc` whole: its first paragraph above the options, the rest below them."""
    head, _, rest = doc.partition("\n\n")
    return ArgumentParser(prog=prog, description=head, epilog=rest or None,
                          formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)


def module_prog(module: str) -> str | None:
    """How a command is typed: `python -m stages.data`, also when it runs as __main__ (None, i.e.
    argparse's file name, for a script run by its path)."""
    if module == "__main__":
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        if spec is None:
            return None
        module = spec.name
    return f"python -m {module}"


def parser(doc: str, prog: str | None = None) -> argparse.ArgumentParser:
    p = ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml", type=Path, help="parameter file (default: params.yaml)")
    p.add_argument("--profile", choices=PROFILES, help="override the file's `profile`")
    return p


def check_device(device: str) -> None:
    """A CUDA device this machine lacks, refused before a run is opened or a model loaded (torch is
    imported only to ask, and only when a CUDA device is named)."""
    if device.startswith("cuda"):
        from pipeline.device import resolve_device

        resolve_device(device)


def run(doc: str, body: Callable[[argparse.Namespace, Config, Path], None],
        argv: list[str] | None = None, extend: Callable[[argparse.ArgumentParser], None] | None = None) -> int:
    """Parse arguments, load the config, run `body(args, config, root)`; map bad input to exit 2.

    `root` is the folder holding the params file: every relative path is under it.
    """
    p = parser(doc, module_prog(body.__module__))
    if extend:
        extend(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=os.environ.get("LOGLEVEL", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load(args.params, {"profile": args.profile} if args.profile else None)
        check_device(cfg.compute.device)
    except CONFIG_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        body(args, cfg, args.params.resolve().parent)
    except user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
