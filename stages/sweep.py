"""DVC stage `sweep`: run every sweep file that params.yaml lists under `sweeps` through `pipeline.sweep`.

    python -m stages.sweep                         # the files listed in params.yaml's `sweeps`
    python -m stages.sweep sweeps/lambda.yaml      # or these

The sweeps run on params.yaml's profile (the one the other stages use) unless --profile
says otherwise. Every file is validated before the first one runs. Each sweep writes
`results/sweep-<name>.json` (parent run id, child run ids, statuses, metrics) and the stage
writes `results/sweeps.json` (sweep name -> file, MLflow experiment, parent run id, exit
status), which the report stage reads to find the sweeps' runs in MLflow. Exit status: 0,
or the worst of the sweeps' (1: a trial failed; 2: bad input; 130: interrupted).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable

from pipeline import cli, config, sweep_config
from pipeline import sweep as driver
from pipeline.config import Config, ConfigError, read_yaml
from pipeline.io import write_json


def sweep_files(cfg: Config, given: list[Path], root: Path) -> list[Path]:
    return given or [root / f for f in cfg.sweeps]


def gpus_per_trial(asked: float, device_type: Callable[[], str], given: float | None, cluster: bool) -> float | None:
    """The `--gpus-per-trial` to pass for a sweep file asking for `asked` GPUs: what the command line
    gave, else one GPU when the file asks for none and the other stages run on this machine's GPU
    (`device_type()` is "cuda"), since Ray hides the GPUs from a trial that asks for none; on a
    named cluster only what was given (the driver refuses GPU-less trials on a GPU cluster).
    `device_type` is called only in that last case: it imports torch and checks `compute.device`
    against this machine, which says nothing about a cluster's nodes."""
    if given is not None:
        return given
    if asked == 0 and not cluster and device_type() == "cuda":
        return 1.0
    return None


def _device_type(sweep: sweep_config.Sweep) -> str:
    from pipeline.device import resolve_device   # imports torch: only where it decides the GPUs

    return resolve_device(sweep.base_config.compute.device).type


def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(prog=cli.module_prog(__name__), description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("files", nargs="*", type=Path, help="sweep files (default: params.yaml's `sweeps`)")
    p.add_argument("--params", type=Path, default=Path("params.yaml"), help="parameter file (default: params.yaml)")
    p.add_argument("--profile", choices=config.PROFILES, help="override every sweep's base.profile")
    p.add_argument("--address", metavar="HOST:PORT", help="Ray cluster to run on (default: $RAY_ADDRESS or local)")
    p.add_argument("--gpus-per-trial", type=float, metavar="N",
                   help="GPUs per trial for every sweep (default: the sweep file's; 1 where it asks for none and "
                        "compute.device puts the stages on this machine's GPU)")
    args = p.parse_args(argv)
    params_path = args.params.resolve()
    root = params_path.parent
    try:
        params = read_yaml(params_path)
        cfg = config.from_dict(config.resolve(params or {}))   # the file read once, as config.load reads it
        profile = args.profile or cfg.profile   # the sweeps run on the profile the rest of `dvc repro` uses
        files = sweep_files(cfg, args.files, root)
        sweeps = []
        for path in files:                                                    # all checked before any runs
            try:
                sweeps.append(sweep_config.load(path, params, profile))
            except ConfigError as err:
                text = str(err)
                raise ConfigError(text if text.startswith(str(path)) else f"{path}: {text}") from None
        names = [s.name for s in sweeps]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ConfigError(f"sweeps: two sweep files are named {dup!r}; each sweep needs its own name")
        cluster = bool(args.address or os.environ.get("RAY_ADDRESS"))
        gpus = [gpus_per_trial(s.resources.gpu, lambda s=s: _device_type(s), args.gpus_per_trial, cluster)
                for s in sweeps]
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return driver.EXIT_USAGE

    summary, worst = {}, 0
    for path, sweep, gpu in zip(files, sweeps, gpus):
        results = root / "results" / f"sweep-{sweep.name}.json"
        results.unlink(missing_ok=True)   # a stale file must not pass for this launch's outcome
        extra = ["--profile", profile] + (["--address", args.address] if args.address else [])
        extra += ["--gpus-per-trial", f"{gpu:g}"] if gpu is not None else []
        code = driver.main([str(path), "--params", str(params_path), "--results", str(results), *extra])
        entry = {"file": str(path.relative_to(root) if path.is_relative_to(root) else path), "exit": code}
        if results.is_file():
            done = json.loads(results.read_text())
            entry.update({"experiment": done["experiment"], "parent_run_id": done["parent_run_id"],
                          "counts": done["counts"], "best_run_id": done["best"]})
        summary[sweep.name] = entry
        worst = max(worst, code)
    write_json(root / "results" / "sweeps.json", summary)
    return worst


if __name__ == "__main__":
    sys.exit(main())
