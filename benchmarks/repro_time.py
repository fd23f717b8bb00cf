"""Where `dvc repro`'s time goes: wall seconds per stage, and how many of them are imports.

    .venv/bin/python benchmarks/repro_time.py                     # smoke profile, this venv
    .venv/bin/python benchmarks/repro_time.py --profile toy       # the default study
    .venv/bin/python benchmarks/repro_time.py --profile toy --install   # the README's first command

What it does:
1. clones HEAD into a temporary folder (as a new user would: no DVC cache, no run-cache)
   and sets `profile:` in its params.yaml;
2. runs `dvc repro` there with this interpreter's environment first on PATH, or with
   --install the README's first command itself (fresh venv, pip install, `dvc repro`), and
   timestamps every line of its output;
3. prints each stage's wall time (from DVC's "Running stage" line to the next) and the
   seconds its processes spent importing modules, read from Python's own import profiler
   (PYTHONPROFILEIMPORTTIME: the cumulative time of every top-level import). Ray workers'
   imports are reported apart (they run beside each other and beside the driver).

The import figures are a floor no stage's own work can lower: torch, diffusers, open_clip,
MLflow and Ray cost seconds per process, and each DVC stage is a process.
"""
from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline import cli  # noqa: E402
from pipeline.config import PROFILES  # noqa: E402

STAGE_LINE = re.compile(r"Running stage '([^']+)'")
# "import time: self | cumulative | name", nested imports indented under their parent; Ray
# prefixes a worker's lines with "(task pid=N)" and colour codes.
IMPORT_LINE = re.compile(r"^(?:\x1b\[[0-9;]*m)?(?:\([^)]*pid=(?P<pid>\d+)[^)]*\))?(?:\x1b\[[0-9;]*m)?\s*"
                         r"import time:\s+\d+ \|\s+(?P<cum>\d+) \|(?P<indent> +)\S")


def readme_command(readme: Path) -> str:
    """The README's first command: the first line of its first ```bash block."""
    block = re.search(r"```bash\n(.+?)\n", readme.read_text())
    if not block or not block.group(1).rstrip().endswith("dvc repro"):
        raise ValueError(f"{readme}: the first bash block does not end with `dvc repro`")
    return block.group(1).strip()


def set_profile(params: Path, profile: str) -> None:
    text, n = re.subn(r"(?m)^profile: .*$", f"profile: {profile}", params.read_text(), count=1)
    if not n:
        raise ValueError(f"{params}: no top-level `profile:` line")
    params.write_text(text)


def timed_lines(command: str, cwd: Path, env: dict,
                on_line: Callable[[float, str], None] | None = None) -> tuple[list[tuple[float, str]], int]:
    """Every output line (stdout and stderr together) with its seconds since start; the exit code.

    `on_line(seconds, line)` sees each line as it arrives (live progress of a long run).
    """
    start = time.perf_counter()
    proc = subprocess.Popen(["bash", "-c", command], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace")
    lines = []
    for line in proc.stdout:
        # Progress bars redraw with carriage returns: each redraw is a line of its own.
        now = time.perf_counter() - start
        for part in line.rstrip("\n").split("\r"):
            lines.append((now, part))
            if on_line:
                on_line(now, part)
    code = proc.wait()
    lines.append((time.perf_counter() - start, ""))
    return lines, code


def stage_times(lines: list[tuple[float, str]]) -> tuple[float, dict[str, dict]]:
    """(seconds before the first stage, {stage: {start, end, wall, imports, workers: {pid: imports}}}), in seconds."""
    stages: dict[str, dict] = {}
    current, before = None, lines[-1][0]
    for stamp, line in lines:
        found = STAGE_LINE.search(line)
        if found:
            if current is None:
                before = stamp
            current = found.group(1)
            stages[current] = {"start": stamp, "imports": 0.0, "workers": collections.Counter()}
            continue
        imported = IMPORT_LINE.match(line)
        if current is None or not imported or len(imported.group("indent")) != 1:
            continue
        seconds = int(imported.group("cum")) / 1e6
        if imported.group("pid"):
            stages[current]["workers"][imported.group("pid")] += seconds
        else:
            stages[current]["imports"] += seconds
    ends = [s["start"] for s in stages.values()][1:] + [lines[-1][0]]
    for stage, end in zip(stages.values(), ends):
        stage["end"] = end
        stage["wall"] = end - stage["start"]
    return before, stages


def report(profile: str, before: float, stages: dict[str, dict], install: bool) -> str:
    wall = sum(s["wall"] for s in stages.values())
    imports = sum(s["imports"] for s in stages.values())
    rows = [f"profile {profile}, {os.cpu_count()} CPU cores",
            f"{'stage':<14} {'wall s':>8} {'imports s':>10}  Ray workers' imports s",
            f"{'(before)':<14} {before:8.1f}    {'venv, pip install, DVC start' if install else 'DVC start'}"]
    for name, s in stages.items():
        workers = " ".join(f"{v:.1f}" for v in s["workers"].values() if v >= 0.5)
        rows.append(f"{name:<14} {s['wall']:8.1f} {s['imports']:10.1f}  {workers}")
    rows.append(f"{'stages':<14} {wall:8.1f} {imports:10.1f}  ({imports / wall:.0%} of the stages' wall time, "
                f"workers not counted)")
    rows.append(f"{'total':<14} {before + wall:8.1f}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = cli.doc_parser(__doc__, "benchmarks/repro_time.py")
    p.add_argument("--profile", default="smoke", choices=PROFILES, help="the params.yaml profile to run (default: smoke)")
    p.add_argument("--install", action="store_true",
                   help="run the README's first command (fresh venv + pip install + dvc repro), not this venv's dvc")
    p.add_argument("--keep", action="store_true", help="keep the clone and print its path")
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="repro-time-"))
    try:
        subprocess.run(["git", "clone", "-q", str(REPO), str(root / "clone")], check=True)
        clone = root / "clone"
        set_profile(clone / "params.yaml", args.profile)
        env = dict(os.environ, PYTHONPROFILEIMPORTTIME="1", RAY_DEDUP_LOGS="0")
        if args.install:
            command = readme_command(clone / "README.md")
            # pip's own imports are not wanted in the figures: profile the stages only.
            command = command[: -len("dvc repro")] + "PYTHONPROFILEIMPORTTIME=1 dvc repro"
            env.pop("PYTHONPROFILEIMPORTTIME")
        else:
            command = "dvc repro"
            env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
        print(f"running `{command}` in {clone}", flush=True)
        lines, code = timed_lines(command, clone, env)
        if code:
            print("\n".join(line for _, line in lines[-20:] if "import time:" not in line), file=sys.stderr)
            print(f"error: `{command}` exited with {code}", file=sys.stderr)
            return 1
        before, stages = stage_times(lines)
        if not stages:
            print(f"error: `{command}` ran no stage (were they all up to date?)", file=sys.stderr)
            return 1
        print(report(args.profile, before, stages, args.install))
    except (ValueError, subprocess.CalledProcessError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if args.keep:
            print(f"kept {root / 'clone'}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
