"""How a trial's start, the report stage and the sweep driver scale with the data and the runs.

    .venv/bin/python benchmarks/scale.py                                  # rows 1k 10k 100k; runs 10 100 500
    .venv/bin/python benchmarks/scale.py --rows 1000 10000 --runs 10 100  # a shorter run

What it does, in a temporary folder (or --workdir):
1. builds the paper rehearsal's reduced workspace (benchmarks/paper_rehearsal.py --size
   reduced: the paper profile's layouts at toy widths) and runs `dvc repro` on it, so every
   stage's output and the Table-1 runs in MLflow are real;
2. trial start against rows: for each --rows N, the COCO captions file is rewritten with N
   images (links to one drawn image) and N captions, and the cache's training tables
   (`train_text`: 77 x 64 per caption, `train_images`: 4 x 8 x 8 per image) with N random
   rows under the keys the cache stage would write. A trial (`run_finetune`, lambda 1e-3,
   2 steps, in this process after one warm-up trial, torch on one thread) is timed from its
   call to its first logged step; the parts of that start which read the data are timed
   apart: reading the training pairs, opening the tables, looking up every caption's row;
3. runs against runs in MLflow: for each --runs N, an earlier launch of a sweep `scale` is
   grown to N trial runs (each with a trial's params, tags and Table-1 metrics), and
   - report (N trials): `python -m stages.report` with that launch listed in
     results/sweeps.json, so its table has N rows;
   - report (10 trials): the same with a 10-trial launch listed, the N runs beside it;
   - sweep driver: `python -m pipeline.sweep` of a 1-trial sweep file in the same MLflow
     experiment (a new launch beside the N runs), as a process; its wall time, its trial's
     own time (`time/trial_seconds`) and the rest (Ray, Tune, MLflow: the driver's share).
The report is timed in this process (imports warm), the driver as a fresh process. Times
are this machine's (2 shared cores: repeat for steadier figures); the "x" columns are the
ratios to the smallest N, the curves to read.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for folder in (REPO, REPO / "tests", REPO / "benchmarks"):
    sys.path.insert(0, str(folder))

import paper_rehearsal  # noqa: E402
from pipeline import cli  # noqa: E402

SWEEP = "scale"
LINKS_PER_FILE = 50_000  # ext4 allows 65,000 links to a file
SWEEP_FILE = f"""# One trial: what the driver costs around it.
name: {SWEEP}
base: {{profile: paper}}
space:
  objective.lambda_sds: [0]
search: grid
resources: {{cpu: 1, gpu: 0}}
max_concurrent: 1
"""


# ---------------------------------------------------------------- the workspace


def build(ws: Path) -> None:
    paper_rehearsal.build_workspace(ws, "reduced", "coco")
    lines, code, _ = paper_rehearsal.run_measured("dvc repro", ws, "dvc repro")
    if code:
        raise RuntimeError(f"dvc repro exited with {code}:\n{paper_rehearsal.tail(lines)}")
    (ws / "sweeps" / f"{SWEEP}.yaml").write_text(SWEEP_FILE)


def config(ws: Path, **overrides):
    from pipeline.config import load

    return load(ws / "params.yaml", overrides or None)


def drawn_image(folder: Path, number: int) -> Path:
    """The `number`-th copy of one drawn image, the target of up to LINKS_PER_FILE links."""
    from published import image_bytes

    path = folder / f"drawn-{number}.jpg"
    if not path.exists():
        path.write_bytes(image_bytes(size=(80, 60)))
    return path


def grow_data(ws: Path, rows: int) -> None:
    """N training images (links to one drawn image) with a caption each, and the training tables to match."""
    import torch

    from pipeline.cache import open_table, write_table
    from pipeline.data.datasets import read_index
    from pipeline.latents import table_keys

    cfg = config(ws)
    train = read_index(ws / cfg.data.root)["train"]
    annotations, images = Path(train["annotations"]), Path(train["images"])
    for k in range(rows):
        link = images / f"{k:012d}.jpg"
        if not link.exists():
            os.link(drawn_image(images.parent, k // LINKS_PER_FILE), link)
    document = json.loads(annotations.read_text())
    document["images"] = [{"id": k, "file_name": f"{k:012d}.jpg", "height": 60, "width": 80} for k in range(rows)]
    document["annotations"] = [{"id": k, "image_id": k, "caption": f"a photo of {k} people next to a red bus"}
                               for k in range(rows)]
    annotations.write_text(json.dumps(document))
    cache = ws / cfg.cache.root
    generator = torch.Generator().manual_seed(0)
    for name, keys in table_keys(ws / cfg.data.root).items():
        if name.startswith("train_"):
            small = open_table(cache, name)
            write_table(cache, name, keys, lambda batch: torch.randn(len(batch), *small.row_shape, generator=generator),
                        shard_size=cfg.cache.shard_size, batch_size=1024, description=name, meta=small.meta,
                        progress=False)


# ---------------------------------------------------------------- measurements


def trial_start(ws: Path) -> dict:
    """Seconds from `run_finetune`'s call to its first logged step, and of the data-reading parts of a start."""
    from pipeline.cache import open_table
    from pipeline.data.datasets import read_index, train_pairs
    from pipeline.experiment import run_finetune
    from pipeline.tracking import Tracker

    cfg = config(ws, objective={"method": "sds", "lambda_sds": 1e-3}, train={"steps": 2, "checkpoint_every": 100},
                 eval={"projected_score": False})
    data, cache = ws / cfg.data.root, ws / cfg.cache.root
    parts = {}
    start = time.perf_counter()
    pairs = train_pairs(data, read_index(data))
    parts["pairs"] = time.perf_counter() - start
    start = time.perf_counter()
    table = open_table(cache, "train_text")
    parts["open"] = time.perf_counter() - start
    start = time.perf_counter()
    [table.index(p.caption) for p in pairs]
    parts["lookup"] = time.perf_counter() - start
    first: list[float] = []
    with tempfile.TemporaryDirectory(dir=ws) as folder:
        start = time.perf_counter()
        run_finetune(cfg, data, ws / "models", cache, Path(folder), Tracker(cfg.tracking, ws), "scale trial",
                     progress=False, on_log=lambda step, values: first or first.append(time.perf_counter()))
    return {"rows": len(pairs), "start": first[0] - start, **parts}


def add_trials(ws: Path, parent: str | None, count: int) -> str:
    """`count` more trial runs under the launch `parent` of sweep `scale` (a new launch when None); its run id."""
    from pipeline.config import to_dict
    from pipeline.tracking import Tracker

    cfg = config(ws)
    tracker = Tracker(cfg.tracking, ws)
    experiment = f"{cfg.tracking.experiment}/{SWEEP}"
    metrics = json.loads((ws / "results" / "train-sds.json").read_text())["metrics"]
    if parent is None:
        run = tracker.start(f"{SWEEP} earlier launch", experiment=experiment,
                            tags={"sweep": SWEEP, "sweep_role": "parent", "status": "finished", "profile": "paper"})
        run.finish()
        parent = run.run_id
    done = len(tracker.find_runs(experiment, parent=parent))
    for k in range(done, done + count):
        lam = (0.0, 1e-4, 1e-3, 1e-2)[k % 4]
        params = {**to_dict(cfg), "train": {**to_dict(cfg)["train"], "seed": k // 4, "lambda_sds": lam},
                  "objective": {**to_dict(cfg)["objective"], "lambda_sds": lam}}
        run = tracker.start(f"{SWEEP} t{k:03d}", params=params, parent=parent, experiment=experiment, tags={
            "sweep": SWEEP, "sweep_role": "trial", "trial_id": f"{parent[:8]}_{k:05d}", "trial": f"t{k:03d}",
            "profile": "paper", "stage": "sweep", "status": "finished"})
        for step in (1, 2):
            run.log_metrics({"loss/clip": 0.7, "loss/sds": 1.0, "loss/total": 0.701}, step)
        run.log_metrics(metrics)
        run.finish()
    return parent


def report_seconds(ws: Path, parent: str) -> float:
    """`python -m stages.report`, in this process, with the launch `parent` listed as the sweep to report."""
    from pipeline.io import write_json
    from stages import report

    cfg = config(ws)
    write_json(ws / "results" / "sweeps.json", {SWEEP: {"file": f"sweeps/{SWEEP}.yaml", "exit": 0,
                                                        "experiment": f"{cfg.tracking.experiment}/{SWEEP}",
                                                        "parent_run_id": parent}})
    start = time.perf_counter()
    code = report.main(["--params", str(ws / "params.yaml")])
    if code:
        raise RuntimeError(f"stages.report exited with {code}")
    return time.perf_counter() - start


def driver(ws: Path) -> dict:
    """A 1-trial launch of sweep `scale` as a process: its wall seconds and its trial's own seconds."""
    results = ws / "results" / f"sweep-{SWEEP}.json"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    start = time.perf_counter()
    proc = subprocess.run(["python", "-m", "pipeline.sweep", f"sweeps/{SWEEP}.yaml", "--results", str(results)],
                          cwd=ws, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"the sweep driver exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
    [trial] = json.loads(results.read_text())["trials"]
    return {"wall": wall, "trial": trial["trial_seconds"]}


# ---------------------------------------------------------------- printing


def curve(title: str, rows: list[dict], key: str, columns: list[tuple[str, str]]) -> str:
    """A table of `columns` (heading, field) against `key`, each followed by its ratio to the first row."""
    heads = "".join(f" {h:>10} {'x':>6}" for h, _ in columns)
    out = [title, f"{key:>8}{heads}"]
    for row in rows:
        cells = "".join(f" {row[f]:10.3f} {row[f] / rows[0][f] if rows[0][f] else float('nan'):6.1f}"
                        for _, f in columns)
        out.append(f"{row[key]:8d}{cells}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(prog="benchmarks/scale.py", description=__doc__.split("\n\n")[0],
                           epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1000, 10000, 100000],
                   help="training images and captions (default: 1000 10000 100000)")
    p.add_argument("--runs", type=int, nargs="+", default=[10, 100, 500],
                   help="trial runs of the sweep in MLflow (default: 10 100 500)")
    p.add_argument("--workdir", type=Path,
                   help="build the workspace here (a new or empty folder; default: a temp folder)")
    args = p.parse_args(argv)
    for option, values in (("--rows", args.rows), ("--runs", args.runs)):
        if values != sorted(set(values)) or values[0] < 10:
            p.error(f"{option}: {' '.join(map(str, values))} must be increasing counts of at least 10")
    if args.workdir is not None and args.workdir.exists() and any(args.workdir.iterdir()):
        p.error(f"--workdir: {args.workdir} is not empty")
    ws = (args.workdir or Path(tempfile.mkdtemp(prefix="scale-"))).resolve()
    ws.mkdir(parents=True, exist_ok=True)
    try:
        print(f"building the reduced paper workspace in {ws} (dvc repro)", file=sys.stderr, flush=True)
        build(ws)
        import torch

        torch.set_num_threads(1)
        starts = []
        trial_start(ws)  # warm-up: first-use costs of the libraries
        for rows in args.rows:
            grow_data(ws, rows)
            starts.append(trial_start(ws))
            print(f"  trial start at {rows} rows measured", file=sys.stderr, flush=True)
        small = add_trials(ws, None, 10)
        big, runs = None, []
        for count in args.runs:
            big = add_trials(ws, big, count - (runs[-1]["runs"] if runs else 0))
            runs.append({"runs": count, "report_n": report_seconds(ws, big), "report_10": report_seconds(ws, small),
                         **driver(ws)})
            runs[-1]["driver"] = runs[-1]["wall"] - runs[-1]["trial"]
            print(f"  {count} runs measured", file=sys.stderr, flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(ws, ignore_errors=True)
    print(curve("trial start against training rows (seconds on this machine)", starts, "rows",
                [("start", "start"), ("pairs", "pairs"), ("open", "open"), ("lookup", "lookup")]))
    print("  start: run_finetune's call to its first logged step; pairs: reading the training pairs; open: opening\n"
          "  train_text; lookup: every caption's row in it\n")
    print(curve("report stage and sweep driver against trial runs in MLflow (seconds on this machine)", runs, "runs",
                [("report N", "report_n"), ("report 10", "report_10"), ("driver", "wall"), ("its trial", "trial"),
                 ("driver-own", "driver")]))
    print("  report N: reporting a sweep of N trials; report 10: a 10-trial sweep beside them; driver: a 1-trial\n"
          "  launch from process start to exit; its trial: that trial's own seconds; driver-own: the difference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
