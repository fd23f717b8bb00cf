"""Orchestration overhead of `python -m pipeline.sweep`: sweep wall time against the trials' own time.

    .venv/bin/python benchmarks/sweep_overhead.py                     # 4 trials of ~30 s, one at a time
    .venv/bin/python benchmarks/sweep_overhead.py --trial-seconds 10 --concurrent 2

What it does:
1. builds a smoke project in a temporary folder (or uses --root) with the stage mains;
2. calibrates `train.steps` so that one smoke trial takes about --trial-seconds here (one
   in-process fine-tune of 60 steps, with the torch threads a sweep trial gets: --cpu, default 1;
   on a machine shared with other work, 2 torch threads on 2 cores can be 10-50x slower per step
   than 1, so 1 is also the steadier measurement);
3. runs a 4-trial grid sweep (`objective.lambda_sds` in {1e-4, 3e-4, 1e-3, 3e-3}: every trial
   trains through the teacher, so all four last about as long) as a subprocess, the way a
   user runs it (`python -m pipeline.sweep FILE`), on a fresh local Ray, and times it from
   process start to exit;
4. prints each trial's own time and the overhead.

A trial's own time is what the trial function spends from entry to its final report, minus
the time it sat blocked in `tune.report` (result hand-off and checkpoint upload: Ray's share).
The imports of torch & co. inside a trial (paid once per fresh Ray worker) count as the
trial's, as they would for a trial run on its own; the figures without them are printed too.
overhead = wall - (sum of own times) / concurrency.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline import cli  # noqa: E402
from pipeline.config import CACHE_DIR, DATA_DIR, MODELS_DIR  # noqa: E402


def build_project(root: Path) -> None:
    from pipeline.config import read_yaml
    from stages import cache, data, models

    params = read_yaml(REPO / "params.yaml")
    params["profile"] = "smoke"
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for stage in (data, models, cache):
        if stage.main(["--params", str(root / "params.yaml")]) != 0:
            raise SystemExit(f"{stage.__name__} failed")


def calibrate(root: Path, threads: int, steps: int = 60, every: int = 10) -> tuple[float, float]:
    """(seconds per training step, fixed seconds per trial) of a smoke trial with lambda 1e-3.

    Logged every 10 steps as in the sweep (a per-step MLflow write costs tens of ms here);
    the step time is the median gap between logs after the first (warm-up) over 10, the
    fixed part (loading, first steps, evaluation, logging) the rest of the run.
    """
    import statistics

    import torch

    from pipeline.config import load
    from pipeline.experiment import run_finetune

    torch.set_num_threads(threads)
    cfg = load(root / "params.yaml", {"profile": "smoke", "train": {"steps": steps, "checkpoint_every": 10**6,
                                                                     "log_every": every},
                                      "objective": {"lambda_sds": 1e-3}})
    stamps: list[float] = []
    start = time.perf_counter()
    run_finetune(cfg, root / DATA_DIR, root / MODELS_DIR, root / CACHE_DIR, root / "calibration" / "run",
                 progress=False, on_log=lambda step, values: stamps.append(time.perf_counter()))
    total = time.perf_counter() - start
    per_step = statistics.median(b - a for a, b in zip(stamps[1:], stamps[2:])) / every
    return per_step, total - per_step * steps


def main(argv: list[str] | None = None) -> int:
    p = cli.doc_parser(__doc__, "benchmarks/sweep_overhead.py")
    p.add_argument("--root", type=Path, help="an already built smoke project (default: build one in a temp dir)")
    p.add_argument("--trial-seconds", type=float, default=30.0, help="target length of one trial (default 30)")
    p.add_argument("--concurrent", type=int, default=1, help="trials at once (default 1)")
    p.add_argument("--cpu", type=int, default=1, help="CPUs (= torch threads) per trial (default 1)")
    p.add_argument("--keep", action="store_true", help="keep the temporary project")
    args = p.parse_args(argv)

    cpus = os.cpu_count() or 1
    per_trial_cpu = args.cpu
    root = args.root or Path(tempfile.mkdtemp(prefix="sweep-bench-"))
    try:
        if not (root / CACHE_DIR).exists():
            t = time.perf_counter()
            build_project(root)
            print(f"built the smoke project in {time.perf_counter() - t:.1f} s: {root}")
        os.chdir(root)                      # MLflow puts a new experiment's artifacts under the cwd
        per_step, fixed = calibrate(root, per_trial_cpu)
        steps = max(10, round((args.trial_seconds - fixed) / per_step))
        steps = -(-steps // 10) * 10
        load = os.getloadavg()[0]
        print(f"calibration: {per_step * 1000:.0f} ms per step, {fixed:.1f} s fixed per trial "
              f"-> train.steps {steps} for ~{args.trial_seconds:.0f} s trials")

        sweep_file = root / "bench.yaml"
        sweep_file.write_text(yaml.safe_dump({
            "name": "bench",
            "base": {"profile": "smoke", "params": {"train.steps": steps, "train.log_every": 10,
                                                    "train.checkpoint_every": 50}},
            "space": {"objective.lambda_sds": [1e-4, 3e-4, 1e-3, 3e-3]},
            "resources": {"cpu": per_trial_cpu}, "max_concurrent": args.concurrent,
        }, sort_keys=False))
        results = root / "bench.json"
        temp = tempfile.mkdtemp(prefix="rb-", dir="/tmp")
        env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_TMPDIR": temp}
        env.pop("RAY_ADDRESS", None)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pipeline.sweep", str(sweep_file), "--params",
                               str(root / "params.yaml"), "--results", str(results)],
                              cwd=root, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        shutil.rmtree(temp, ignore_errors=True)
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
            return 1
        summary = json.loads(results.read_text())
        trials = summary["trials"]
        rows = []
        for t in trials:
            own = t["trial_seconds"] - t["report_seconds"]
            rows.append((t["trial"], t["trial_seconds"], t["import_seconds"], t["report_seconds"], own))
        own_total = sum(r[4] for r in rows)
        imports = sum(r[2] for r in rows)
        ideal = own_total / args.concurrent
        ideal_no_imports = (own_total - imports) / args.concurrent
        timing = summary["timing"]
        print(f"\n{len(trials)}-trial smoke grid, {steps} steps each, {args.concurrent} at a time, "
              f"{per_trial_cpu} CPU(s) / torch threads per trial, on {cpus} CPU cores "
              f"(1-min load average before / after: {load:.1f} / {os.getloadavg()[0]:.1f})")
        print(f"  {'trial':6} {'in trial':>9} {'imports':>8} {'in report':>10} {'own':>8}")
        for label, total, imp, rep, own in rows:
            print(f"  {label:6} {total:8.1f}s {imp:7.1f}s {rep:9.2f}s {own:7.1f}s")
        print(f"  sum of the trials' own times        {own_total:8.1f} s   (imports {imports:.1f} s of it)")
        print(f"  sweep wall time (process start-exit) {wall:7.1f} s")
        print(f"    driver: Ray start {timing['ray_start_seconds']:.1f} s, MLflow/Tuner set-up "
              f"{timing['setup_seconds']:.1f} s, Tuner.fit {timing['tune_seconds']:.1f} s, "
              f"summary {summary['wall_seconds'] - sum(timing.values()):.1f} s; rest (interpreter, imports, exit) "
              f"{wall - summary['wall_seconds']:.1f} s")
        over = wall - ideal
        print(f"  overhead = wall - own/{args.concurrent}: {over:.1f} s = {100 * over / ideal:.1f}% "
              f"of the trials' own time")
        over2 = wall - ideal_no_imports
        print(f"  counting the trials' imports as overhead too: {over2:.1f} s = "
              f"{100 * over2 / ideal_no_imports:.1f}%")
        print(f"  inside Tuner.fit only (no Ray start / driver start-up): "
              f"{timing['tune_seconds'] - ideal:.1f} s = {100 * (timing['tune_seconds'] - ideal) / ideal:.1f}%")
    finally:
        if not args.root and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
