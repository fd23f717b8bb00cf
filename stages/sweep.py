"""DVC stage `sweep`: run every sweep file that params.yaml lists under `sweeps` through `pipeline.sweep`.

    python -m stages.sweep                         # the files listed in params.yaml's `sweeps`
    python -m stages.sweep sweeps/lambda.yaml      # or these

The sweeps run on params.yaml's profile (the one the other stages use) unless --profile
says otherwise. Every file, and the built inputs the trials read (data, models, cache), is checked
before the first one runs: a bad one stops the stage with the earlier outputs untouched. Outputs, both DVC-cached,
so that `dvc checkout` brings back what the report stage reads:

    results/sweeps/<name>.json   per sweep that ran: its parent run, each trial's run id,
                                 config, status, metrics and per-case outcomes
    results/sweeps.json          sweep name -> file, exit status, MLflow experiment, parent
                                 run id, trial counts, best run

The folder holds this launch's sweeps only, and both appear when every sweep has run: the
earlier ones are removed first, and an interrupted stage leaves neither. A sweep whose launch
was stopped (the stage killed or interrupted) with the same definition is resumed by the next
run of the stage: finished trials are kept, the others continue from their checkpoints. Exit
status: 0, or the worst of the sweeps' (1: a trial failed; 2: bad input; 130: interrupted, then
no further sweep runs).
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Callable

from pipeline import cli, config
from pipeline.sweep import cli as sweep_cli
from pipeline.sweep import driver, spec
from pipeline.sweep.driver import EXIT_INTERRUPTED, EXIT_USAGE
from pipeline.config import Config, ConfigError, read_yaml
from pipeline.io import atomic_dir, write_json

RESULTS = Path("results") / "sweeps"    # <name>.json per sweep: a DVC folder output, as sweep names vary
SUMMARY = Path("results") / "sweeps.json"


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


def _device_type(sweep: spec.Sweep) -> str:
    from pipeline.device import resolve_device   # imports torch: only where it decides the GPUs

    return resolve_device(sweep.base_config.compute.device).type


def main(argv: list[str] | None = None) -> int:
    p = cli.doc_parser(__doc__, cli.module_prog(__name__))
    p.add_argument("files", nargs="*", type=Path, help="sweep files (default: params.yaml's `sweeps`)")
    p.add_argument("--params", type=Path, default=Path("params.yaml"), help="parameter file (default: params.yaml)")
    p.add_argument("--profile", choices=config.PROFILES,
                   help="the profile every sweep runs on (default: params.yaml's, the one the other stages build "
                        "for; a sweep file's base.profile is not read here)")
    p.add_argument("--address", metavar="HOST:PORT", help="Ray cluster to run on (default: $RAY_ADDRESS or local)")
    p.add_argument("--gpus-per-trial", type=float, metavar="N",
                   help="GPUs per trial for every sweep (default: the sweep file's; 1 where it asks for none and "
                        "compute.device puts the stages on this machine's GPU)")
    args = p.parse_args(argv)
    params_path = args.params.resolve()
    root = params_path.parent
    try:
        params = read_yaml(params_path)
        cfg = config.from_dict(config.resolve(params, source=str(params_path)))   # read once: the sweeps read it too
        profile = args.profile or cfg.profile   # the sweeps run on the profile the rest of `dvc repro` uses
        files = sweep_files(cfg, args.files, root)
        sweeps = []
        for path in files:                                                    # all checked before any runs
            with sweep_cli.naming(path):
                sweeps.append(spec.load(path, params, profile, str(params_path)))
        names = [s.name for s in sweeps]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ConfigError(f"sweeps: two sweep files are named {dup!r}; each sweep needs its own name")
        cluster = driver.ray_address(args.address) is not None
        gpus = [gpus_per_trial(s.resources.gpu, lambda s=s: _device_type(s), args.gpus_per_trial, cluster)
                for s in sweeps]
        commands = [command(path, params_path, profile, args.address, gpu) for path, gpu in zip(files, gpus)]
        # The definition each command runs, its options (--gpus-per-trial) included: what its checks
        # read, and what a launch killed with the stage is found by when the stage runs again.
        launched = [sweep_cli.prepare(sweep_cli.build_parser().parse_args(c))[0] for c in commands]
        trials = [sweep_cli.checked_trials(s, root, args.address, gpus_option=gpu is not None)
                  for s, gpu in zip(launched, gpus)]
        for sweep, specs in zip(launched, trials):   # then their built inputs: a sweep that cannot start costs no results
            sweep_cli.preflight(sweep, specs, root)
    except cli.CONFIG_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE

    folder, listed = root / RESULTS, root / SUMMARY
    # An earlier launch's files must not pass for this one's if it stops early (`dvc repro` removes them too).
    listed.unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
    try:
        with atomic_dir(folder) as building:   # the folder appears whole, with every sweep's file
            summary, worst = run_sweeps(commands, launched, building, root)
    except KeyboardInterrupt:
        print(f"interrupted: the stage wrote neither {SUMMARY} nor {RESULTS}/; run it again", file=sys.stderr)
        return EXIT_INTERRUPTED
    write_json(listed, summary)   # last: without it the report reports no sweep
    return worst


def command(path: Path, params_path: Path, profile: str, address: str | None, gpu: float | None) -> list[str]:
    """`python -m pipeline.sweep`'s arguments for one sweep file (`run_sweeps` adds --results, --resume)."""
    return [str(path), "--params", str(params_path), "--profile", profile, *(["--address", address] if address else []),
            *(["--gpus-per-trial", f"{gpu:g}"] if gpu is not None else [])]


def run_sweeps(commands: list[list[str]], launched: list[spec.Sweep], folder: Path, root: Path) -> tuple[dict, int]:
    """Run each command, its results file under `folder`; (the summary of each, the worst exit status).
    `launched`: the sweep each command runs. Stops with KeyboardInterrupt when a sweep was interrupted:
    the rest must not start."""
    summary, worst = {}, 0
    for argv, sweep in zip(commands, launched):
        results = folder / f"{sweep.name}.json"
        argv = [*argv, "--results", str(results)]
        # A launch of this sweep killed with the stage (same definition) is finished, not started again.
        unfinished = driver.unfinished_launch(sweep, driver.storage_root(sweep, root, None))
        if unfinished:
            print(f"sweep {sweep.name}: resuming launch {unfinished}", flush=True)
            argv += ["--resume", unfinished]
        code = sweep_cli.main(argv)
        if code == EXIT_INTERRUPTED:
            raise KeyboardInterrupt
        path = Path(argv[0])
        file = str(path.relative_to(root) if path.is_relative_to(root) else path)
        summary[sweep.name] = listing(file, code, json.loads(results.read_text()) if results.is_file() else None)
        worst = max(worst, code)
    return summary, worst


def listing(file: str, code: int, payload: dict | None) -> dict:
    """A sweep's results/sweeps.json entry: its file and exit status, and the launch its results
    file (`payload`, `pipeline.sweep`'s) describes when it wrote one."""
    entry = {"file": file, "exit": code}
    if payload is not None:
        entry.update({"experiment": payload["experiment"], "parent_run_id": payload["parent_run_id"],
                      "counts": payload["counts"], "best_run_id": payload["best"]})
    return entry


if __name__ == "__main__":
    sys.exit(main())
