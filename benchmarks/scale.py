"""How a trial's start, the report stage and the sweep driver scale with the data and the runs.

    .venv/bin/python benchmarks/scale.py                                  # rows 1k 10k 100k; runs 10 100 500
    .venv/bin/python benchmarks/scale.py --rows 1000 10000 --runs 10 100  # a shorter run

What it does, in a temporary folder (or --workdir):
1. builds the paper rehearsal's reduced workspace (benchmarks/paper_rehearsal.py --size
   reduced: the paper profile's layouts at toy widths), or takes the one such a rehearsal left
   in --workdir, and runs `dvc repro` on it, so every stage's output and the Table-1 runs in
   MLflow are real;
2. trial start against rows: for each --rows N, the COCO captions file is rewritten with N
   images (links to one drawn image) and N captions, and the cache's training tables
   (`train_text`: 77 x 64 per caption, `train_images`: 4 x 8 x 8 per image) with N random
   rows under the keys the cache stage would write. A trial (`run_finetune`, lambda 1e-3,
   2 steps, in this process after one warm-up trial, torch on one thread) is timed from its
   call to its first logged step; the parts of that start which read the data are timed
   apart: reading the training pairs, opening the tables, looking up every caption's row;
3. runs against trials: for each --runs N, an earlier launch of a sweep `scale` is grown to
   N trial runs in MLflow (each with a trial's params, tags and Table-1 metrics) and its
   results file, results/sweeps/scale.json, to N trials (the sweep stage's payload: config,
   status, metrics and the per-case outcomes of the train_sds stage's run), and
   - report (N trials): `python -m stages.report` with that launch listed in
     results/sweeps.json, so its table has N rows;
   - report (10 trials): the same with a 10-trial sweep listed, the N-trial file beside it;
   - sweep driver: `python -m pipeline.sweep` of a 1-trial sweep file in the same MLflow
     experiment (a new launch beside the N runs), as a process; its wall time, its trial's
     own time (`time/trial_seconds`) and the rest (Ray, Tune, MLflow: the driver's share).
The report is timed in this process (imports warm), the driver as a fresh process. Times
are this machine's (2 shared cores: repeat for steadier figures); the "x" columns are the
ratios to the smallest N, the curves to read.
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

REPO = Path(__file__).resolve().parents[1]
for folder in (REPO, REPO / "tests", REPO / "benchmarks"):
    sys.path.insert(0, str(folder))

import paper_rehearsal  # noqa: E402
from pipeline import cli  # noqa: E402
from pipeline.config import CACHE_DIR, DATA_DIR, MODELS_DIR  # noqa: E402

SWEEP = "scale"
LOSSES = {"loss/clip": 0.7, "loss/sds": 1.0, "loss/total": 0.701}   # each logged step of a trial
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
    """The reduced workspace built in `ws`, or the one a rehearsal left there brought up to date."""
    if not rehearsed(ws):
        paper_rehearsal.build_workspace(ws, "reduced", "coco")
    lines, code, _ = paper_rehearsal.run_measured("dvc repro", ws, "dvc repro")
    if code:
        raise RuntimeError(f"dvc repro exited with {code}:\n{paper_rehearsal.tail(lines)}")
    (ws / "sweeps" / f"{SWEEP}.yaml").write_text(SWEEP_FILE)


def rehearsed(ws: Path) -> bool:
    """Whether `ws` holds a workspace `paper_rehearsal.py --size reduced` built on COCO captions."""
    try:
        return json.loads((ws / paper_rehearsal.MARKER).read_text()) == {"size": "reduced", "train_set": "coco"}
    except (OSError, ValueError):
        return False


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
    train = read_index(ws / DATA_DIR)["train"]
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
    cache = ws / CACHE_DIR
    generator = torch.Generator().manual_seed(0)
    for name, keys in table_keys(ws / DATA_DIR).items():
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

    cfg = config(ws, objective={"method": "sds", "lambda_sds": 1e-3}, train={"steps": 2, "checkpoint_every": 100},
                 eval={"projected_score": False})
    data, cache = ws / DATA_DIR, ws / CACHE_DIR
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
        run_finetune(cfg, data, ws / MODELS_DIR, cache, Path(folder), progress=False,
                     on_log=lambda step, values: first or first.append(time.perf_counter()))
    return {"rows": len(pairs), "start": first[0] - start, **parts}


def add_trials(ws: Path, name: str, launch: dict | None, count: int) -> dict:
    """`count` more finished trials of a launch of sweep `name` (a new launch when None): runs in
    MLflow and the launch's results-file payload (`pipeline.sweep`'s), which is returned."""
    from pipeline.config import flatten, to_dict
    from pipeline.tracking import Tracker

    cfg = config(ws)
    tracker = Tracker(cfg.tracking, ws)
    experiment = f"{cfg.tracking.experiment}/{name}"
    sds = json.loads((ws / "results" / "train-sds.json").read_text())
    if launch is None:
        run = tracker.start(f"{name} earlier launch", experiment=experiment,
                            tags={"sweep": name, "sweep_role": "parent", "status": "finished", "profile": "paper"})
        run.finish()
        launch = {"sweep": name, "experiment": experiment, "tracking_uri": tracker.uri, "parent_run_id": run.run_id,
                  "metric": "winoground/text", "mode": "max", "trials": []}
    parent, trials = launch["parent_run_id"], launch["trials"]
    for k in range(len(trials), len(trials) + count):
        lam, seed, trial_id = (0.0, 1e-4, 1e-3, 1e-2)[k % 4], k // 4, f"{parent[:8]}_{k:05d}"
        params = {**to_dict(cfg), "train": {**to_dict(cfg)["train"], "seed": seed},
                  "objective": {**to_dict(cfg)["objective"], "lambda_sds": lam}}
        run = tracker.start(f"{name} t{k:03d}", params=params, parent=parent, experiment=experiment, tags={
            "sweep": name, "sweep_role": "trial", "trial_id": trial_id, "trial": f"t{k:03d}",
            "profile": "paper", "stage": "sweep", "status": "finished"})
        for step in (1, 2):
            run.log_metrics(LOSSES, step)
        run.log_metrics(sds["metrics"])
        run.finish()
        trials.append(result_trial(k, run.run_id, trial_id, {"objective.lambda_sds": lam, "train.seed": seed},
                                   flatten(params), sds))
    finished = [t for t in trials if t["status"] == "finished"]
    counts = {s: sum(t["status"] == s for t in trials) for s in ("finished", "early_stopped", "failed", "interrupted")}
    head = ("sweep", "experiment", "tracking_uri", "parent_run_id", "metric", "mode")
    wall = 5.0 + sum(t["trial_seconds"] for t in trials) / 2   # two at a time
    return {**{key: launch[key] for key in head},
            "best": max(finished, key=lambda t: t["metric"])["run_id"] if finished else None, "counts": counts,
            "wall_seconds": wall, "timing": {"ray_start_seconds": 3.0, "setup_seconds": 1.0,
                                             "tune_seconds": wall - 4.0}, "trials": trials}


def result_trial(k: int, run_id: str, trial_id: str, values: dict, params: dict, sds: dict) -> dict:
    """Trial `k` as a sweep's results file lists it (`params`: its whole config, dotted): the train_sds
    stage's scores and per-case outcomes, spread a little per trial; every 25th stopped early by ASHA
    (losses only), every 50th failed."""
    status = "failed" if k % 50 == 49 else "early_stopped" if k % 25 == 24 else "finished"
    timing = {"time/trial_seconds": 40.0 + k % 7, "time/import_seconds": 2.0, "time/report_seconds": 0.4}
    scores = {key: value + 0.001 * (k % 9) if isinstance(value, float) else value
              for key, value in sds["metrics"].items()}
    metrics = {**LOSSES, **timing, **(scores if status == "finished" else {})}
    return {"trial": f"t{k:03d}", "trial_id": trial_id, "run_id": run_id, "config": values, "params": params,
            "status": status, "failure": "RuntimeError: loss/total is nan at step 2" if status == "failed" else "",
            "metric": metrics["winoground/text"] if status == "finished" else None,
            "trial_seconds": timing["time/trial_seconds"], "import_seconds": timing["time/import_seconds"],
            "report_seconds": timing["time/report_seconds"], "metrics": metrics,
            "outcomes": sds.get("outcomes", {}) if status == "finished" else {}}


def report_seconds(ws: Path, launch: dict) -> float:
    """`python -m stages.report`, in this process, with `launch` the one sweep listed: its results file
    written where the sweep stage writes it, beside the other sweeps' files."""
    from pipeline.io import write_json
    from stages import report
    from stages.sweep import listing

    results = ws / "results"
    write_json(report.sweep_file(results, launch["sweep"]), launch)
    write_json(results / "sweeps.json", {launch["sweep"]: listing(f"sweeps/{launch['sweep']}.yaml", 0, launch)})
    start = time.perf_counter()
    code = report.main(["--params", str(ws / "params.yaml")])
    if code:
        raise RuntimeError(f"stages.report exited with {code}")
    return time.perf_counter() - start


def driver(ws: Path) -> dict:
    """A 1-trial launch of sweep `scale` as a process: its wall seconds and its trial's own seconds."""
    results = ws / f"driver-{SWEEP}.json"   # not the sweep stage's folder: the report reads that one
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
    p = cli.doc_parser(__doc__, "benchmarks/scale.py")
    p.add_argument("--rows", type=int, nargs="+", default=[1000, 10000, 100000],
                   help="training images and captions (default: 1000 10000 100000)")
    p.add_argument("--runs", type=int, nargs="+", default=[10, 100, 500],
                   help="trials of the sweep, in MLflow and its results file (default: 10 100 500)")
    p.add_argument("--workdir", type=Path,
                   help="build the workspace here (a new or empty folder; default: a temp folder), or measure in "
                        "the one `benchmarks/paper_rehearsal.py --size reduced --workdir DIR` left there (it is "
                        "changed: data and cache tables rewritten, runs added)")
    args = p.parse_args(argv)
    for option, values in (("--rows", args.rows), ("--runs", args.runs)):
        if values != sorted(set(values)) or values[0] < 10:
            p.error(f"{option}: {' '.join(map(str, values))} must be increasing counts of at least 10")
    if args.workdir is not None and args.workdir.exists() and any(args.workdir.iterdir()):
        if not rehearsed(args.workdir):
            p.error(f"--workdir: {args.workdir} is neither empty nor a reduced paper rehearsal's workspace")
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
        small = add_trials(ws, f"{SWEEP}10", None, 10)
        report_seconds(ws, small)  # warm-up: first-use costs of the report's libraries
        big, runs = None, []
        for count in args.runs:
            big = add_trials(ws, SWEEP, big, count - (runs[-1]["runs"] if runs else 0))
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
    print(curve("report stage and sweep driver against trials (seconds on this machine)", runs, "runs",
                [("report N", "report_n"), ("report 10", "report_10"), ("driver", "wall"), ("its trial", "trial"),
                 ("driver-own", "driver")]))
    print("  report N: reporting a sweep of N trials (its results file); report 10: a 10-trial sweep, the N-trial\n"
          "  file beside it; driver: a 1-trial launch beside the N runs in MLflow, from process start to exit; its\n"
          "  trial: that trial's own seconds; driver-own: the difference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
