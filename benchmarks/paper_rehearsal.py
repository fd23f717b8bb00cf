"""Rehearse the paper profile end to end: `dvc repro` from the data stage to the report, no download.

    .venv/bin/python benchmarks/paper_rehearsal.py                   # SD v1-4 at 512 px (~16 min on 2 cores)
    .venv/bin/python benchmarks/paper_rehearsal.py --sweep           # then sweeps/table1.yaml on it (~12 min more)
    .venv/bin/python benchmarks/paper_rehearsal.py --size reduced    # the same chain at toy widths (CI)

What it does, in a temporary folder (or --workdir):
1. copies the project as it is (tracked and untracked files, not the ignored ones) and
   commits it there;
2. writes the paper's datasets in their published layouts, a handful of records each,
   images drawn by code (tests/published.py): COCO 2017 captions + train2017/, Winoground's
   hub repo, ARO's four sets with their images and a part-of-speech lexicon, two zero-shot
   sets in torchvision's layout (MNIST, DTD), CC-3M webdataset shards;
3. writes the models as local folders in their hub layouts with random weights: Stable
   Diffusion v1-4 (model_index.json, UNet, VAE, CLIP text encoder, tokenizer, PNDM scheduler
   config with SD's betas) and open_clip's ViT-B-16-quickgelu / openai repo;
4. writes params.yaml: `profile: paper`, its roots pointing at those folders, the one
   student present, and CPU budgets (2 training steps of batch 2, 1 diffusion sample at full
   size and 2 reduced, cache batches of 4 images, no sweep in `dvc repro`), and the size and
   training set it was built with in rehearsal.json;
5. runs `dvc repro` and prints each stage's wall time and peak memory, then checks that
   reports/table1.csv has every paper column filled;
6. with --sweep, runs `python -m pipeline.sweep sweeps/table1.yaml --profile paper
   --max-concurrent 1` on the workspace (every student present x lambda {0, 1e-3} x 3 seeds).

Sizes: `full` is SD v1-4's real architecture (UNet 860M parameters) at 512 px (latent
4 x 64 x 64, 77-token conditioning) and ViT-B/16 at 224 px; a training step at batch 2
fits in memory here. `reduced` keeps every layout, the 77-token conditioning and the
VAE's 8x downsampling, at toy widths and 64 px (latent 4 x 8 x 8) with a small open_clip
ViT: what CI runs (tests/test_paper_rehearsal.py).

Memory is sampled every 0.25 s with psutil over this script's child processes (DVC, the
stages, Ray and its workers, DataLoader workers): "peak RSS" is the largest resident set
of one process, "peak PSS" the largest sum over all of them of the proportional set size
(pages shared between processes, e.g. forked workers, counted once). Times are wall
seconds on this machine.
"""
from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
for folder in (REPO, REPO / "tests", REPO / "benchmarks"):
    sys.path.insert(0, str(folder))

import repro_time  # noqa: E402
from pipeline import cli  # noqa: E402

ZEROSHOT = ("mnist", "dtd")  # two sets torchvision reads without an md5 check of the real release
STUDENT = "vit-b-16"
MARKER = "rehearsal.json"  # the size and training set a workspace was built with (benchmarks/scale.py reads it)
SIZES = {
    "full": {"image": (640, 480), "samples": 1,
             "what": "SD v1-4 (UNet 860M) at 512 px, latent 4x64x64, 77-token conditioning; "
                     "ViT-B-16-quickgelu at 224 px"},
    "reduced": {"image": (80, 60), "samples": 2,
                "what": "SD v1-4's layouts at toy widths and 64 px, latent 4x8x8, 77-token conditioning; "
                        "a small open_clip ViT at 64 px"},
}
# Table 1's columns in the paper (Winoground text score and breakdowns, image and group scores,
# ARO), the order sets and Fig. 2's zero-shot mean: the report must fill every one.
PAPER_COLUMNS = ["winoground/text", "winoground/text/object", "winoground/text/relation", "winoground/text/both",
                 "winoground/text/preds_1", "winoground/text/preds_2", "winoground/image", "winoground/group",
                 "aro/overall", "aro/vg_relation", "aro/vg_attribution", "aro/coco_order", "aro/flickr_order",
                 "zeroshot/mean"]
STUDENT_ONLY = {"zeroshot/mean"}  # the teacher's diffusion score has no zero-shot classifier


# ---------------------------------------------------------------- the workspace


def copy_project(ws: Path) -> None:
    """The project's files as they are now (tracked and untracked, not ignored), committed in `ws`."""
    listed = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=REPO, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.exists() or source.is_symlink():
            (ws / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, ws / name, follow_symlinks=False)
    git = ["git", "-c", "user.name=rehearsal", "-c", "user.email=rehearsal@localhost"]
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "paper rehearsal workspace"]):
        subprocess.run(git + command, cwd=ws, check=True)


def write_models(hub: Path, size: str) -> tuple[dict, dict]:
    """The teacher's and the student's params entries, their hub folders written under `hub`."""
    from published import open_clip_hub_folder, sd_hub_folder

    teacher_folder, student_folder = hub / "stable-diffusion-v1-4", hub / "vit_base_patch16_clip_224.openai"
    if size == "full":
        from pipeline.models.paper import SD_V1_4, random_student, random_teacher

        sd_hub_folder(teacher_folder, random_teacher(SD_V1_4, device="cpu"))
        model, tag = "ViT-B-16-quickgelu", "openai"
        open_clip_hub_folder(student_folder, random_student(model, tag, device="cpu"), model, tag)
    else:
        from pipeline.config import StudentConfig, TeacherConfig
        from pipeline.models.student import build_toy_student
        from pipeline.models.teacher import build_toy_teacher

        teacher = TeacherConfig(vae_channels=[32, 32, 64, 64], unet_channels=[32, 64], text_width=64, text_heads=4,
                                max_length=77)
        sd_hub_folder(teacher_folder, build_toy_teacher(teacher, 64))
        model, tag = "toy-vit", ""
        student = StudentConfig(embed_dim=64, vision_width=64, vision_layers=2, vision_heads=2, patch_size=8,
                                text_width=64, text_layers=2, text_heads=2, context_length=77)
        open_clip_hub_folder(student_folder, build_toy_student(student, 64), model, tag)
    gc.collect()
    return ({"pretrained": str(teacher_folder.relative_to(hub.parent))},
            {"source": "pretrained", "model": model, "pretrained": str(student_folder.relative_to(hub.parent))})


def write_params(ws: Path, data: dict, teacher: dict, student: dict, samples: int, train_set: str) -> None:
    """params.yaml of the workspace: the project's, with `profile: paper` and the rehearsal's roots and budgets."""
    from pipeline.config import read_yaml

    params = read_yaml(ws / "params.yaml")
    paper = params["profiles"]["paper"]
    # "./": a local folder, never a hub id (data.winoground takes both)
    paper["data"].update({key: f"./datasets/{value.removeprefix('./')}" if isinstance(value, str) else value
                          for key, value in data.items()}, train_set=train_set)
    paper["teacher"].update(teacher)
    paper["students"] = {**dict.fromkeys(params["students"]), STUDENT: student}    # no toy student
    paper["cache"].update(batch_size=4)
    paper["train"].update(student=STUDENT, steps=2, batch_size=2, log_every=1, checkpoint_every=1, warmup_steps=0)
    # The fixture's VG-Attribution holds a few cases per attribute pair, none of ARO's 25.
    paper["eval"].update(diffusion_samples=samples, vg_attribution_min_cases=1)
    params.update(profile="paper", sweeps=[])
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def build_workspace(ws: Path, size: str, train_set: str) -> None:
    from published import paper_datasets

    copy_project(ws)
    data = paper_datasets(ws / "datasets", size=SIZES[size]["image"], zeroshot_sets=ZEROSHOT)
    teacher, student = write_models(ws / "hub", size)
    write_params(ws, data, teacher, student, SIZES[size]["samples"], train_set)
    (ws / MARKER).write_text(json.dumps({"size": size, "train_set": train_set}) + "\n")


# ---------------------------------------------------------------- measuring


class Memory:
    """Samples the memory of this process's descendants (not its own) every `interval` seconds."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self.samples: list[tuple[float, int, int]] = []   # (seconds since start, largest RSS, total PSS)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Memory":
        self.start = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.wait(self.interval):
            largest = total = 0
            for child in me.children(recursive=True):
                try:
                    info = child.memory_full_info()
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                largest, total = max(largest, info.rss), total + info.pss
            self.samples.append((time.perf_counter() - self.start, largest, total))

    def peak(self, start: float, end: float) -> tuple[float, float]:
        """(largest RSS, largest total PSS) in GiB between two of its times."""
        inside = [(rss, pss) for t, rss, pss in self.samples if start <= t <= end] or [(0, 0)]
        return max(r for r, _ in inside) / 2**30, max(p for _, p in inside) / 2**30


def run_measured(command: str, ws: Path, label: str) -> tuple[list[tuple[float, str]], int, Memory]:
    """Run `command` in `ws` with this interpreter first on PATH, echoing DVC's stage lines live;
    its whole output, timestamped, goes to rehearsal-logs/<label>.log in `ws`."""
    env = dict(os.environ, DVC_NO_ANALYTICS="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")

    def echo(seconds: float, line: str) -> None:
        if repro_time.STAGE_LINE.search(line) or line.startswith(("ERROR", "error:")):
            print(f"  [{label} {seconds:7.1f} s] {line.strip()}", flush=True)

    with Memory() as memory:
        lines, code = repro_time.timed_lines(command, ws, env, on_line=echo)
    log = ws / "rehearsal-logs" / f"{label.replace(' ', '-')}.log"
    log.parent.mkdir(exist_ok=True)
    log.write_text("".join(f"{seconds:9.1f} {line}\n" for seconds, line in lines))
    return lines, code, memory


def stage_rows(lines: list[tuple[float, str]], memory: Memory) -> list[tuple[str, float, float, float]]:
    """(stage, wall seconds, peak RSS GiB, peak PSS GiB) of each stage DVC ran."""
    _, stages = repro_time.stage_times(lines)
    return [(name, s["wall"], *memory.peak(s["start"], s["end"])) for name, s in stages.items()]


def table(rows: list[tuple[str, float, float, float]]) -> str:
    out = [f"{'stage':<12} {'wall s':>8} {'peak RSS GiB':>13} {'peak PSS GiB':>13}"]
    out += [f"{name:<12} {wall:8.1f} {rss:13.2f} {pss:13.2f}" for name, wall, rss, pss in rows]
    return "\n".join(out)


def report_problems(ws: Path) -> list[str]:
    """What reports/table1.csv lacks: a paper column, or a number in a cell of a row that must have one."""
    path = ws / "reports" / "table1.csv"
    if not path.is_file():
        return [f"{path} was not written"]
    # The measured rows; on the paper profile each is followed by the paper's own ("... (paper)").
    every = list(csv.DictReader(path.read_text().splitlines()))
    rows = [row for row in every if not row["run"].endswith(" (paper)")]
    problems = [f"column {key} missing" for key in PAPER_COLUMNS if rows and key not in rows[0]]
    if f"{STUDENT} pretrained (paper)" not in {row["run"] for row in every}:
        problems.append(f"no published row beside {STUDENT} pretrained")
    for row in rows:
        teacher = row["run"].startswith("diffusion score")
        for key in PAPER_COLUMNS:
            if key in row and not (teacher and key in STUDENT_ONLY) and not _is_number(row[key]):
                problems.append(f"row {row['run']!r}: {key} is {row[key]!r}")
    if len(rows) != 4:
        problems.append(f"{len(rows)} rows, expected 4 (pretrained, FT L_CLIP, FT L_CLIP + L_SDS, diffusion score)")
    return problems


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def tail(lines: list[tuple[float, str]], n: int = 25) -> str:
    return "\n".join([line for _, line in lines if line.strip()][-n:])


# ---------------------------------------------------------------- main


def rehearse(ws: Path, args: argparse.Namespace) -> int:
    print(f"paper rehearsal, size {args.size}: {SIZES[args.size]['what']}; train set {args.train_set}; "
          f"{os.cpu_count()} CPU cores; workspace {ws}", flush=True)
    if not args.rerun:
        start = time.perf_counter()
        build_workspace(ws, args.size, args.train_set)
        print(f"workspace built in {time.perf_counter() - start:.1f} s (datasets, hub folders, params.yaml)",
              flush=True)

    lines, code, memory = run_measured("dvc repro", ws, "dvc repro")
    rows = stage_rows(lines, memory)
    print(f"\ndvc repro: exit {code}, {sum(r[1] for r in rows):.1f} s in the stages "
          f"(wall seconds on this machine; memory sampled every {memory.interval} s)")
    print(table(rows), flush=True)
    if code:
        print(tail(lines), file=sys.stderr)
        print(f"error: dvc repro exited with {code}", file=sys.stderr)
        return 1
    problems = report_problems(ws)
    if problems:
        print("error: reports/table1.csv: " + "; ".join(problems), file=sys.stderr)
        return 1
    print(f"report: reports/table1.csv has every paper column ({', '.join(PAPER_COLUMNS)}) filled\n"
          + (ws / "reports" / "table1.md").read_text(), flush=True)
    if not args.sweep:
        return 0
    command = "python -m pipeline.sweep sweeps/table1.yaml --profile paper --max-concurrent 1"
    print(f"\n{command}", flush=True)
    lines, code, memory = run_measured(command, ws, "sweep")
    wall, (rss, pss) = lines[-1][0], memory.peak(0.0, lines[-1][0])
    print("\n".join(line for _, line in lines if line.strip() and "pid=" not in line))
    print(f"sweep driver: exit {code}, {wall:.1f} s, peak RSS {rss:.2f} GiB, peak PSS {pss:.2f} GiB", flush=True)
    return 0 if code == 0 else 1


def main(argv: list[str] | None = None) -> int:
    p = cli.doc_parser(__doc__, "benchmarks/paper_rehearsal.py")
    p.add_argument("--size", choices=sorted(SIZES), default="full", help="model and image sizes (default: full)")
    p.add_argument("--train-set", choices=("coco", "cc3m"), default="coco",
                   help="data.train_set: COCO 2017 captions or the CC-3M shards (default: coco)")
    p.add_argument("--sweep", action="store_true", help="then run sweeps/table1.yaml on the workspace")
    p.add_argument("--workdir", type=Path,
                   help="build the workspace here (a new or empty folder; default: a temp folder)")
    p.add_argument("--rerun", action="store_true",
                   help="use the workspace an earlier run left in --workdir as it is: build nothing, `dvc repro` "
                        "runs what is not up to date")
    p.add_argument("--keep", action="store_true", help="keep the workspace and print its path")
    args = p.parse_args(argv)
    if args.rerun and (args.workdir is None or not (args.workdir / "params.yaml").is_file()):
        p.error("--rerun: needs --workdir naming the workspace of an earlier run")
    if not args.rerun and args.workdir is not None and args.workdir.exists() and any(args.workdir.iterdir()):
        p.error(f"--workdir: {args.workdir} is not empty (--rerun uses it as it is)")
    ws = args.workdir or Path(tempfile.mkdtemp(prefix="paper-rehearsal-"))
    ws.mkdir(parents=True, exist_ok=True)
    try:
        return rehearse(ws.resolve(), args)
    finally:
        if args.keep or args.workdir is not None:
            print(f"workspace kept: {ws}")
        else:
            shutil.rmtree(ws, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
