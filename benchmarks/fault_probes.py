"""Fault-injection probes: bad inputs refused, kills survived, and what the MLflow store and the files hold after them.

    .venv/bin/python benchmarks/fault_probes.py                  # all of it, in a new smoke project (~4 min)
    .venv/bin/python benchmarks/fault_probes.py --only inputs    # the bad inputs alone
    .venv/bin/python benchmarks/fault_probes.py --project DIR    # reuse a built smoke project

What it does:
1. builds a smoke project in a temporary folder with the stage mains (or uses --project);
2. inputs: every malformed params file (tests/test_config.py's BAD, each set where the smoke
   preset would not hide it, and the README's cases: an empty or comment-only file, a missing
   section or preset, values that cannot mean anything, tracking URIs and stores MLflow cannot
   use, a CUDA device this machine lacks, a toy student's shape open_clip
   refuses) through `python -m stages.train clip --params FILE`,
   and every malformed sweep file (tests/test_sweep_config.py's BAD, resources beyond this
   machine, an ASHA metric the trials never report) through `python -m pipeline.sweep FILE
   --dry-run`. A case is refused when the command exits 2 with one line on stderr and wrote
   nothing: no file under the folder it ran in is new or changed. They run side by side, one per
   CPU core, each worker in its own copy of the project's data/, models/ and cache/, so that a
   case that is not refused trains there, apart from the others' folders and from the project's
   MLflow store, which the kills keep. MLflow's notes on creating or updating its
   database tables are not counted as the command's stderr lines (only a case that opens a
   store prints them, and such a case wrote it);
3. kills, each on its own sweep (a fresh name) or stage, every process with
   AWS_SECRET_ACCESS_KEY set to a marker and tracking.uri naming a user (another marker) of an
   MLflow server on 127.0.0.1 that keeps the project's store (mlruns/):
   (a) the sweep driver SIGKILLed mid-trial after one trial finished; a copy of its launch with
       Ray Tune's trial state cut in half (as a kill during Ray's copy of it would leave it) is
       refused by `--resume COPY` in one line; then `--resume`: it completes, one run per trial,
       the finished trial not run again;
   (b) the driver killed between Ray Tune writing tuner.pkl and its first snapshot (staged as
       tests/test_sweep.py does: the tuner built, never fitted, then the process killed), then
       `--resume`: refused in one line, the launch's run ended KILLED; then a new launch completes;
   (c) a killed launch resumed twice at once: the second is refused in one line, the first completes;
   (d) the sweep stage (`python -m stages.sweep FILE`) SIGKILLed mid-launch, then run again: it
       says "resuming launch" and completes that launch;
   (e) `python -m stages.train clip` SIGKILLed mid-training, then run again: it resumes from its
       checkpoint and the killed run is ended KILLED.
   A SIGKILL hits the one process, as a crash of it would; the Ray processes it started are then
   stopped by PID (found by their temp dir) before anything else runs;
4. after all of them, with every process ended: over the whole MLflow store, duplicate runs
   (two child runs of one trial under a parent, two parent runs of one launch, two finished runs
   of one stage command) and RUNNING runs; and every file under the project's mlruns/,
   ray_results/, runs/ and results/, Ray's temp dirs and each command's stdout and stderr
   (and the MLflow server's) searched for either marker (the user name is allowed in a launch's
   Ray Tune state, tuner.pkl, which resuming needs: README "Sweeps").

Prints `bad inputs refused: N/M` (and each case not refused), `kills survived: N/5`, and
`duplicates: N, RUNNING orphans: N, secrets found: N (files scanned: K)`. Exit status 0 only when
every count is as it should be: all refused, 5/5 survived, 0 duplicates, orphans and secrets.
"""
from __future__ import annotations

import copy
import json
import os
import queue
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.sweep_overhead import build_project  # noqa: E402
from pipeline import cli  # noqa: E402
from pipeline.config import CACHE_DIR, DATA_DIR, MODELS_DIR  # noqa: E402
from tests.test_config import BAD as BAD_PARAMS, _set  # noqa: E402
from tests.test_sweep import env, free_port, last_logged_step, processes_under, sigkill_when, stop  # noqa: E402
from tests.test_sweep_config import BAD as BAD_SWEEPS  # noqa: E402

PYTHON = sys.executable
KILLS = 5
BLOCKER = "a-file"    # a file where a case's params name a folder
# What MLflow logs on stderr when a command creates or migrates its store: not the command's own words.
MLFLOW_NOTES = re.compile(r"Creating initial MLflow database tables|Updating database tables|"
                         r"alembic\.runtime\.migration")


class Failed(Exception):
    """A kill scenario that did not end as it should: the reason, in one line."""


# --------------------------------------------------------------------------- bad inputs


def has_key(node, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def mutated(params: dict, dotted: str, value) -> dict:
    """`params` with `dotted` set to `value`, and in the active preset too where it sets that key:
    the preset merges over the sections, so its own value would hide the bad one."""
    out = copy.deepcopy(params)
    preset = (out.get("profiles") or {}).get(out.get("profile"))
    _set(out, dotted, value)
    if has_key(preset, dotted):
        _set(preset, dotted, copy.deepcopy(value))
    return out


def without(params: dict, key: str) -> dict:
    out = copy.deepcopy(params)
    del out[key]
    return out


def cuda_devices() -> int:
    import torch     # only here: the rest of the probe never needs it

    return torch.cuda.device_count()


def params_cases(params: dict, steps: int, blocker: str, gpus: int) -> dict[str, dict | str]:
    """Malformed params files (a mapping to write as YAML, or the file's text) by case name."""
    cases: dict[str, dict | str] = {f"params: {name}": mutated(params, key, value)
                                    for name, (key, value, _) in BAD_PARAMS.items()}
    readme = {
        "empty file": "",
        "comment-only file": "# every section forgotten\n",
        "no train section": without(params, "train"),
        "no profiles section under profile smoke": without(params, "profiles"),
        "batch 100000 on 96 images": mutated(params, "train.batch_size", 100000),
        "warm-up longer than training": mutated(params, "train.warmup_steps", steps + 1),
        "lambda 1e30": mutated(params, "objective.lambda_sds", 1e30),
        "threads 4096": mutated(params, "train.threads", 4096),
        "steps 1e12": mutated(params, "train.steps", 10**12),
        "tracking.uri foo://bar": mutated(params, "tracking.uri", "foo://bar"),
        "tracking.uri a folder": mutated(params, "tracking.uri", "mlruns"),
        "tracking.experiment empty": mutated(params, "tracking.experiment", ""),
        "tracking store behind a file": mutated(params, "tracking.uri", f"sqlite:///{blocker}/mlruns/mlflow.db"),
        "password in tracking.uri": mutated(params, "tracking.uri", "http://probe:pa55-w0rd@127.0.0.1:5000"),
        "train.seed 2^70": mutated(params, "train.seed", 2**70),
        "student heads not dividing its width": mutated(params, "students.toy-vit.vision_heads", 3),
        "student patch larger than the image": mutated(params, "students.toy-vit.patch_size", 64),
    }
    if gpus == 0:
        readme["compute.device cuda without a GPU"] = mutated(params, "compute.device", "cuda")
    cases.update({f"params: {name}": value for name, value in readme.items()})
    return cases


def sweep_cases(gpus: int) -> dict[str, str]:
    """Malformed sweep files (their text) by case name."""
    cases = {f"sweep: {name}": text for name, (text, _) in BAD_SWEEPS.items()}
    cpus = os.cpu_count() or 1
    cases.update({
        "sweep: cpu beyond this machine": f"name: big\nspace: {{train.lr: [1e-3]}}\nresources: {{cpu: {cpus + 1}}}\n",
        "sweep: gpu beyond this machine": f"name: big\nspace: {{train.lr: [1e-3]}}\nresources: {{gpu: {gpus + 1}}}\n",
        "sweep: ASHA metric never reported": ("name: asha\nsearch: {type: random, num_samples: 4}\n"
                                              "space: {objective.lambda_sds: {choice: [0, 1e-3]}}\n"
                                              "scheduler: {type: asha, metric: loss/sds}\n"),
    })
    return cases


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under `root` (links not followed): path -> (size, mtime)."""
    found = {}
    for folder, _, files in os.walk(root):
        for name in files:
            info = os.lstat(os.path.join(folder, name))
            found[os.path.relpath(os.path.join(folder, name), root)] = (info.st_size, info.st_mtime_ns)
    return found


def stderr_lines(text: str) -> tuple[list[str], int]:
    """The command's own stderr lines, and how many of MLflow's database notes were left out."""
    lines = [line for line in text.splitlines() if line.strip()]
    kept = [line for line in lines if not MLFLOW_NOTES.search(line)]
    return kept, len(lines) - len(kept)


@dataclass
class Verdict:
    name: str
    code: int
    lines: list[str]
    notes: int
    written: list[str]

    @property
    def refused(self) -> bool:
        return self.code == 2 and len(self.lines) == 1 and not self.written

    def why(self) -> str:
        said = self.lines[0][:160] if len(self.lines) == 1 else f"{len(self.lines)} stderr lines"
        wrote = f"; wrote {len(self.written)} files ({', '.join(self.written[:3])})" if self.written else ""
        return f"exit {self.code}, {said}{wrote}"


def judge(name: str, argv: list[str], folder: Path, timeout: float) -> Verdict:
    before = snapshot(folder)
    try:
        proc = subprocess.run(argv, cwd=folder, env=env(), capture_output=True, text=True, timeout=timeout)
        code, err = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as timed_out:
        code, err = -1, (timed_out.stderr or b"").decode(errors="replace") + f"\ntimed out after {timeout:g} s"
    after = snapshot(folder)
    written = sorted(p for p, seen in after.items() if before.get(p) != seen)
    lines, notes = stderr_lines(err)
    return Verdict(name, code, lines, notes, written)


def inputs_folder(project: Path, folder: Path) -> Path:
    """`folder`: a copy of the project's built inputs and params.yaml, where bad inputs run."""
    folder.mkdir()
    for name in (DATA_DIR, MODELS_DIR, CACHE_DIR):
        shutil.copytree(project / name, folder / name, symlinks=True)
    shutil.copy(project / "params.yaml", folder / "params.yaml")
    (folder / BLOCKER).write_text("")
    return folder


def probe_inputs(project: Path, work: Path, timeout: float) -> tuple[int, int]:
    """Run every bad input; (refused, cases). The cases run side by side, one per CPU core, each
    worker in a folder of its own, so that what a case wrote is told apart from the others'."""
    from pipeline.config import load, read_yaml

    free: queue.SimpleQueue[Path] = queue.SimpleQueue()
    workers = os.cpu_count() or 1
    for i in range(workers):
        free.put(inputs_folder(project, work / f"inputs-{i}"))
    params = read_yaml(project / "params.yaml")
    steps = load(project / "params.yaml").train.steps
    gpus = cuda_devices()
    groups = [
        ("python -m stages.train clip --params FILE", params_cases(params, steps, BLOCKER, gpus), "bad-params.yaml",
         lambda path, folder: [PYTHON, "-m", "stages.train", "clip", "--params", str(path)]),
        ("python -m pipeline.sweep FILE --dry-run", sweep_cases(gpus), "bad-sweep.yaml",
         lambda path, folder: [PYTHON, "-m", "pipeline.sweep", str(path), "--dry-run", "--params",
                               str(folder / "params.yaml")]),
    ]
    if gpus:
        print("  (this machine has a GPU: the case of compute.device cuda without one is left out)")
    verdicts: list[Verdict] = []
    for command, cases, file_name, argv in groups:
        def judged(case: tuple[str, dict | str]) -> Verdict:
            name, value = case
            folder = free.get()
            try:
                path = folder / file_name
                path.write_text(value if isinstance(value, str) else yaml.safe_dump(value, sort_keys=False))
                verdict = judge(name, argv(path, folder), folder, timeout)
                path.unlink()
                return verdict
            finally:
                free.put(folder)

        start = time.perf_counter()
        print(f"  {len(cases)} cases through `{command}` in {work}/inputs-*, {workers} at a time ...", flush=True)
        with ThreadPoolExecutor(workers) as pool:
            group = list(pool.map(judged, cases.items()))
        for verdict in group:
            if not verdict.refused:
                print(f"    not refused: {verdict.name}: {verdict.why()}", flush=True)
        print(f"  {sum(v.refused for v in group)}/{len(group)} refused ({time.perf_counter() - start:.0f} s)",
              flush=True)
        verdicts += group
    notes = sum(v.notes for v in verdicts)
    refused = sum(v.refused for v in verdicts)
    print(f"bad inputs refused: {refused}/{len(verdicts)} ({notes} stderr lines of MLflow's notes on creating or "
          "updating its database tables not counted)")
    for verdict in verdicts:
        if not verdict.refused:
            print(f"  not refused: {verdict.name}: {verdict.why()}")
    return refused, len(verdicts)


# --------------------------------------------------------------------------- kills


@dataclass
class Kills:
    """The kill scenarios' shared set-up: the project, its params file for them, the MLflow server,
    and every Ray temp dir and output file they leave (all scanned at the end)."""

    project: Path
    work: Path
    timeout: float
    secret: str = field(default_factory=lambda: f"aws-{secrets.token_hex(8)}")
    user: str = field(default_factory=lambda: f"user-{secrets.token_hex(6)}")
    temps: list[str] = field(default_factory=list)
    outputs: list[Path] = field(default_factory=list)
    files: dict[int, tuple[Path, Path]] = field(default_factory=dict)     # a process's stdout and stderr
    tag: str = field(default_factory=lambda: time.strftime("%H%M%S"))
    since: int = field(default_factory=lambda: int(time.time() * 1000))   # ms: the runs made from here on
    server: subprocess.Popen | None = None

    # ----------------------------------------------------------------- set-up

    def start_server(self) -> None:
        """An MLflow server on 127.0.0.1 keeping the project's store (mlruns/), so that tracking.uri
        can name a user; the probe itself talks to it without one."""
        self.port = free_port()
        store = self.project / "mlruns"
        store.mkdir(exist_ok=True)
        log = self.log("mlflow-server")
        with log.open("w") as out:
            self.server = subprocess.Popen(
                [PYTHON, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
                 "--artifacts-destination", str(store / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port),
                 "--workers", "1"], cwd=self.project, env=env(), stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5).close()
                break
            except OSError:
                if self.server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the MLflow server did not answer; see {log.name}")
                time.sleep(1)
        from pipeline.config import TrackingConfig
        from pipeline.tracking import Tracker

        self.tracker = Tracker(TrackingConfig(uri=f"http://127.0.0.1:{self.port}", experiment="sds-clip"), self.project)

    def stop_server(self) -> None:
        if self.server is not None and self.server.poll() is None:
            import psutil

            stop([psutil.Process(self.server.pid), *psutil.Process(self.server.pid).children(recursive=True)])

    def write_params(self) -> None:
        """The smoke params with the user-naming tracking URI, and stage trainings long enough to kill."""
        params = yaml.safe_load((self.project / "params.yaml").read_text())
        params["profile"] = "smoke"
        params["tracking"]["uri"] = f"http://{self.user}@127.0.0.1:{self.port}"
        # A smoke step takes ~25 ms here: enough of them that the kill lands mid-training.
        params["profiles"]["smoke"]["train"].update(steps=300, checkpoint_every=10, log_every=1, warmup_steps=0)
        self.params = self.project / "fault-params.yaml"
        self.params.write_text(yaml.safe_dump(params, sort_keys=False))
        self.env = {**env(), "AWS_SECRET_ACCESS_KEY": self.secret}

    def sweep(self, letter: str, space: dict, steps: int) -> tuple[str, Path]:
        """A sweep file of clip-only smoke trials, one at a time, under a name no earlier run used."""
        name = f"fault-{letter}-{self.tag}"
        path = self.project / f"{name}.yaml"
        path.write_text(yaml.safe_dump({
            "name": name,
            "base": {"profile": "smoke", "params": {"train.steps": steps, "train.checkpoint_every": 4,
                                                    "objective.method": "clip", "objective.lambda_sds": 0}},
            "space": space, "max_concurrent": 1}, sort_keys=False))
        return name, path

    # ----------------------------------------------------------------- processes

    def temp(self) -> str:
        """A Ray temp dir of its own (short: Ray's socket paths have a length limit), to find and stop its processes."""
        folder = tempfile.mkdtemp(prefix="fp-", dir="/tmp")
        self.temps.append(folder)
        return folder

    def log(self, label: str) -> Path:
        path = self.work / "logs" / f"{len(self.outputs):02d}-{label}"
        path.parent.mkdir(exist_ok=True)
        self.outputs.append(path)
        return path

    def start(self, label: str, argv: list[str], extra_env: dict | None = None) -> subprocess.Popen:
        files = self.log(f"{label}.out"), self.log(f"{label}.err")
        with files[0].open("w") as out, files[1].open("w") as err:
            proc = subprocess.Popen(argv, cwd=self.project, env={**self.env, **(extra_env or {})}, stdout=out,
                                    stderr=err, start_new_session=True)
        self.files[proc.pid] = files
        return proc

    def finish(self, proc: subprocess.Popen) -> tuple[int, str, str]:
        try:
            code = proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        out, err = (path.read_text(errors="replace") for path in self.files[proc.pid])
        return code, out, err

    def run(self, label: str, argv: list[str], extra_env: dict | None = None) -> tuple[int, str, str]:
        return self.finish(self.start(label, argv, extra_env))

    def driver(self, path: Path, *extra: str) -> list[str]:
        return [PYTHON, "-m", "pipeline.sweep", str(path), "--params", str(self.params), *extra]

    def crash_when(self, proc: subprocess.Popen, ready: Callable[[], bool], temp: str | None, what: str) -> None:
        """SIGKILL `proc` alone once `ready()`, then stop what it started (tests/test_sweep.py's `sigkill_when`)."""
        try:
            sigkill_when(proc, lambda: self.holds(ready), temp, self.timeout, what)
        except AssertionError as err:
            raise Failed(str(err)) from None

    @staticmethod
    def holds(condition: Callable[[], bool]) -> bool:
        try:
            return condition()
        except Exception:       # the store answering mid-write (a lock, a half-made run): ask again
            return False

    # ----------------------------------------------------------------- what the store says

    def launch(self, name: str) -> tuple[dict | None, list[dict]]:
        """The sweep's newest parent run and its children."""
        parents = self.tracker.find_runs(f"sds-clip/{name}", tags={"sweep_role": "parent"})
        if not parents:
            return None, []
        return parents[0], self.tracker.find_runs(f"sds-clip/{name}", parent=parents[0]["run_id"])

    def completed(self, name: str, parent_id: str, trials: int, out: str) -> list[dict]:
        """The launch's children, after checking that it ended with every trial finished, one run each."""
        parent, kids = self.launch(name)
        if parent is None or parent["run_id"] != parent_id or parent["status"] != "FINISHED":
            raise Failed(f"the launch's run is {parent and parent['status']} (run {parent and parent['run_id']})")
        if f"{trials} trials, {trials} finished" not in out:
            raise Failed(f"its summary does not say {trials} trials, {trials} finished")
        if len(kids) != trials or len({k["tags"]["trial_id"] for k in kids}) != trials:
            raise Failed(f"{len(kids)} child runs for {trials} trials")
        if {k["status"] for k in kids} != {"FINISHED"}:
            raise Failed(f"child runs {sorted(k['status'] for k in kids)}")
        return kids

    # ----------------------------------------------------------------- the scenarios

    def driver_killed_mid_trial(self) -> str:
        """(a) SIGKILL the driver once one trial finished and another is mid-way, then --resume."""
        name, path = self.sweep("a", {"train.seed": [0, 1]}, steps=60)
        temp = self.temp()
        proc = self.start("a-driver", self.driver(path), {"RAY_TMPDIR": temp})

        def midway() -> bool:
            _, kids = self.launch(name)
            return (any(k["status"] == "FINISHED" for k in kids) and
                    any(k["status"] == "RUNNING" and 9 <= last_logged_step(self.tracker, k) <= 48 for k in kids))

        self.crash_when(proc, midway, temp, "one trial finished and another at step 9-48")
        parent, kids = self.launch(name)
        before = {k["tags"]["trial_id"]: k for k in kids if k["status"] == "FINISHED"}
        # A kill while Ray copies its state into the launch folder leaves the file cut short: a copy of
        # the killed launch with its trials' state halved is refused in one line, the launch untouched.
        (launch,) = self.project.glob(f"ray_results/{name}-*")
        cut = self.project / "cut-short" / launch.name
        shutil.copytree(launch, cut)
        state = max(cut.glob("experiment_state-*.json"))
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
        code, out, err = self.run("a-cut-short", self.driver(path, "--resume", str(cut)), {"RAY_TMPDIR": self.temp()})
        shutil.rmtree(cut.parent)
        lines, _ = stderr_lines(err)
        if code != 2 or len(lines) != 1 or f"{cut} cannot be continued ({state.name} cannot be read: cut short" \
                not in lines[0]:
            raise Failed(f"--resume of a launch whose state was cut short exited {code}: {lines[:2]}")
        code, out, err = self.run("a-resume", self.driver(path, "--resume"), {"RAY_TMPDIR": self.temp()})
        stop(processes_under(self.temps[-1]))
        if code != 0:
            raise Failed(f"--resume exited {code}: {err.strip().splitlines()[-1:] or out[-200:]}")
        kids = {k["tags"]["trial_id"]: k for k in self.completed(name, parent["run_id"], 2, out)}
        for trial_id, was in before.items():
            if kids[trial_id]["end_time"] != was["end_time"] or kids[trial_id]["tags"].get("attempts") != "1":
                raise Failed(f"finished trial {was['tags']['trial']} was run again")
        resumed = [k for t, k in kids.items() if t not in before]
        return ", ".join(f"{k['tags']['trial']} attempt {k['tags'].get('attempts')} from step "
                         f"{k['tags'].get('resumed_from_step', '0')}" for k in resumed) + \
            f"; {len(before)} not re-run; a copy with its state cut short refused in one line"

    def killed_before_first_snapshot(self) -> str:
        """(b) The driver dies between tuner.pkl and Ray Tune's first snapshot; --resume; a new launch."""
        name, path = self.sweep("b", {"train.seed": [0]}, steps=4)
        temp = self.temp()
        code, out, err = self.run("b-staged", [PYTHON, "-c", STAGE_UNSNAPSHOTTED, str(path), str(self.params)],
                                  {"RAY_TMPDIR": temp})
        stop(processes_under(temp))
        ray_path = out.strip().splitlines()[-1] if out.strip() else ""
        if code != -signal.SIGKILL or not (Path(ray_path) / "tuner.pkl").is_file() or \
                list(Path(ray_path).glob("experiment_state-*.json")):
            raise Failed(f"could not stage the kill (exit {code}; {err.strip()[-200:]})")
        code, out, err = self.run("b-resume", self.driver(path, "--resume"), {"RAY_TMPDIR": self.temp()})
        stop(processes_under(self.temps[-1]))
        lines, _ = stderr_lines(err)
        if code != 2 or len(lines) != 1 or "was stopped before Ray Tune recorded any trial" not in lines[0]:
            raise Failed(f"--resume exited {code} with {len(lines)} stderr lines: {lines[:1]}")
        parent, kids = self.launch(name)
        if parent["tags"].get("ray_path") != ray_path or parent["status"] != "KILLED" or kids:
            raise Failed(f"the staged launch's run is {parent['status']} with {len(kids)} children")
        code, out, err = self.run("b-new", self.driver(path), {"RAY_TMPDIR": self.temp()})
        stop(processes_under(self.temps[-1]))
        if code != 0:
            raise Failed(f"the new launch exited {code}: {err.strip().splitlines()[-1:]}")
        parent, _ = self.launch(name)
        self.completed(name, parent["run_id"], 1, out)
        return "refused in one line, its run KILLED; the new launch finished"

    def two_resumes_at_once(self) -> str:
        """(c) A killed launch resumed by two drivers at once."""
        name, path = self.sweep("c", {"train.seed": [0]}, steps=60)
        temp = self.temp()
        proc = self.start("c-driver", self.driver(path), {"RAY_TMPDIR": temp})

        def recorded() -> bool:
            _, kids = self.launch(name)
            return (bool(list(self.project.glob(f"ray_results/{name}-*/experiment_state-*.json"))) and
                    any(k["status"] == "RUNNING" and 5 <= last_logged_step(self.tracker, k) <= 40 for k in kids))

        self.crash_when(proc, recorded, temp, "the trial at step 5-40")
        parent, _ = self.launch(name)
        (lock,) = self.project.glob(f"ray_results/{name}-*/driver.lock")
        first_temp, second_temp = self.temp(), self.temp()
        first = self.start("c-resume-1", self.driver(path, "--resume"), {"RAY_TMPDIR": first_temp})
        try:
            deadline = time.monotonic() + self.timeout
            while lock.read_text() != f"pid {first.pid} on {socket.gethostname()}":
                if first.poll() is not None or time.monotonic() > deadline:
                    raise Failed(f"the first --resume never held the launch (exit {first.poll()})")
                time.sleep(0.2)
            code, out, err = self.run("c-resume-2", self.driver(path, "--resume"), {"RAY_TMPDIR": second_temp})
            first_code, first_out, first_err = self.finish(first)
        finally:
            if first.poll() is None:
                first.kill()
                first.wait()
            stop(processes_under(first_temp) + processes_under(second_temp))
        lines, _ = stderr_lines(err)
        if code != 2 or len(lines) != 1 or f"is being run by another driver (pid {first.pid}" not in lines[0]:
            raise Failed(f"the second --resume exited {code} with {len(lines)} stderr lines: {lines[:1]}")
        if first_code != 0:
            raise Failed(f"the first --resume exited {first_code}: {first_err.strip().splitlines()[-1:]}")
        self.completed(name, parent["run_id"], 1, first_out)
        return "the second refused in one line; the first finished the launch"

    def stage_killed_mid_launch(self) -> str:
        """(d) SIGKILL the sweep stage once a trial finished, then run the stage again."""
        name, path = self.sweep("d", {"train.seed": [0, 1]}, steps=8)
        temp = self.temp()
        command = [PYTHON, "-m", "stages.sweep", str(path), "--params", str(self.params)]
        proc = self.start("d-stage", command, {"RAY_TMPDIR": temp})
        self.crash_when(proc, lambda: any(k["status"] == "FINISHED" for k in self.launch(name)[1]), temp,
                        "a trial finished")
        parent, _ = self.launch(name)
        code, out, err = self.run("d-stage-again", command, {"RAY_TMPDIR": temp})
        stop(processes_under(temp))
        if code != 0:
            raise Failed(f"the stage exited {code} when run again: {err.strip().splitlines()[-1:]}")
        if f"sweep {name}: resuming launch " not in out:
            raise Failed("run again, the stage did not say it resumes the launch")
        self.completed(name, parent["run_id"], 2, out)
        listed = json.loads((self.project / "results" / "sweeps.json").read_text())[name]
        if listed["parent_run_id"] != parent["run_id"] or listed["counts"]["finished"] != 2:
            raise Failed(f"results/sweeps.json lists {listed}")
        return "resumed its launch; both trials finished, one run each"

    def train_stage_killed(self) -> str:
        """(e) SIGKILL `python -m stages.train clip` mid-training, then run it again."""
        since = int(time.time() * 1000)
        command = [PYTHON, "-m", "stages.train", "clip", "--params", str(self.params)]

        def runs() -> list[dict]:
            return [r for r in self.tracker.find_runs(tags={"stage": "train", "row": "ft_clip"})
                    if r["start_time"] >= since]

        proc = self.start("e-train", command)
        self.crash_when(proc, lambda: any(r["status"] == "RUNNING" and 20 <= last_logged_step(self.tracker, r) <= 240
                                          for r in runs()), None, "training at step 20-240")
        (killed,) = runs()
        code, out, err = self.run("e-train-again", command, {"LOGLEVEL": "INFO"})
        if code != 0:
            raise Failed(f"run again, the stage exited {code}: {err.strip().splitlines()[-1:]}")
        resumed = re.search(r"resumed \S+ at step (\d+)", err)
        if not resumed or int(resumed.group(1)) < 10:
            raise Failed("run again, the stage did not resume from a checkpoint")
        after = {r["run_id"]: r for r in runs()}
        if len(after) != 2 or after[killed["run_id"]]["status"] != "KILLED":
            raise Failed(f"{len(after)} runs of the stage; the killed one is {after[killed['run_id']]['status']}")
        if [r["status"] for i, r in after.items() if i != killed["run_id"]] != ["FINISHED"]:
            raise Failed("the second run did not finish")
        return f"resumed from step {resumed.group(1)}; the killed run KILLED, the new one FINISHED"

    # ----------------------------------------------------------------- after all of them

    def duplicates_and_orphans(self) -> tuple[int, int, list[str]]:
        """Over the whole store: runs one thing has twice, and runs still RUNNING."""
        duplicates, orphans, notes = 0, 0, []
        groups: dict[tuple, list[dict]] = {}
        experiments = self.tracker.experiment_names()
        every = [(name, run) for name in experiments for run in self.tracker.find_runs(name)]
        print(f"  the store: {len(every)} runs in {len(experiments)} experiments", flush=True)
        for experiment, run in every:
            tags = run["tags"]
            if run["status"] == "RUNNING":
                orphans += 1
                notes.append(f"RUNNING: {experiment} {run['name']} ({run['run_id']})")
            if tags.get("sweep_role") == "trial":
                key = ("trial", tags.get("mlflow.parentRunId"), tags.get("trial_id"))
            elif tags.get("sweep_role") == "parent":
                key = ("launch", tags.get("ray_path"))
            elif run["status"] == "FINISHED" and run["start_time"] >= self.since:
                # The probe ran each stage command to its end once: a second finished run is a duplicate.
                key = ("stage", experiment, tags.get("stage"), tags.get("row"))
            else:
                continue
            groups.setdefault(key, []).append(run)
        for key, runs in groups.items():
            if len(runs) > 1:
                duplicates += len(runs) - 1
                notes.append(f"duplicate: {len(runs)} runs of {' '.join(map(str, key))}")
        return duplicates, orphans, notes

    def scan(self) -> tuple[int, int, list[str]]:
        """Files (and captured outputs) holding either marker; how many were read."""
        roots = [self.project / name for name in ("mlruns", "ray_results", "runs", "results")]
        files = [p for root in roots + [Path(t) for t in self.temps] for p in regular_files(root)] + self.outputs
        hits = []
        for path in files:
            data = path.read_bytes()
            # A launch's Ray Tune state (tuner.pkl) keeps the URI's user name, which resuming the
            # launch's runs needs (README); a password never gets that far (refused).
            markers = (("AWS secret", self.secret),) + ((("URI user", self.user),) if path.name != "tuner.pkl" else ())
            found = [what for what, marker in markers if marker.encode() in data]
            if found:
                hits.append(f"{' and '.join(found)} in {path}")
        return len(hits), len(files), hits


STAGE_UNSNAPSHOTTED = """
import os, signal, sys, time
from pathlib import Path
from pipeline.config import read_yaml
from pipeline.sweep import driver, spec
from pipeline.sweep.recorder import RunRecorder
from pipeline.tracking import resolve_uri

sweep_file, params = Path(sys.argv[1]), Path(sys.argv[2])
root = params.parent
sweep = spec.load(sweep_file, read_yaml(params))
stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid() % 10000:04d}"
ray_path = f"{driver.storage_root(sweep, root, None)}/{sweep.name}-{stamp}-{sweep.spec_hash()}"
driver.start_ray(None)                      # under $RAY_TMPDIR, which the probe sets
recorder = RunRecorder(sweep, root, resolve_uri(sweep.base_config.tracking.uri, root), driver.experiment_name(sweep))
recorder.open_launch(ray_path)
driver.tuner(sweep, spec.trials(sweep), root, recorder, ray_path, resume=False, retry=False)   # writes tuner.pkl
print(ray_path, flush=True)
os.kill(os.getpid(), signal.SIGKILL)        # before fit(): Ray Tune never snapshots the launch
"""


def regular_files(root: Path) -> list[Path]:
    """Regular files under `root` (not Ray's sockets, no links followed)."""
    found = []
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder) / name
            if stat.S_ISREG(os.lstat(path).st_mode):
                found.append(path)
    return found


SCENARIOS = [
    ("(a) driver SIGKILLed mid-trial, then --resume", Kills.driver_killed_mid_trial),
    ("(b) driver killed between tuner.pkl and the first snapshot, then --resume", Kills.killed_before_first_snapshot),
    ("(c) two --resume of a killed launch at once", Kills.two_resumes_at_once),
    ("(d) sweep stage SIGKILLed mid-launch, then run again", Kills.stage_killed_mid_launch),
    ("(e) train stage SIGKILLed mid-training, then run again", Kills.train_stage_killed),
]


def probe_kills(project: Path, work: Path, timeout: float) -> bool:
    """Run the kills, then count; whether every count is as it should be."""
    kills = Kills(project, work, timeout)
    survived = 0
    try:
        start = time.perf_counter()
        kills.start_server()
        kills.write_params()
        print(f"  MLflow server on 127.0.0.1:{kills.port} ({time.perf_counter() - start:.0f} s to answer); "
              f"tracking.uri names user {kills.user!r}, AWS_SECRET_ACCESS_KEY={kills.secret}", flush=True)
        for title, scenario in SCENARIOS:
            start = time.perf_counter()
            try:
                detail = scenario(kills)
                survived += 1
                print(f"  {title}: survived, {detail} ({time.perf_counter() - start:.0f} s)", flush=True)
            except Exception as failed:       # Failed, or what a scenario met instead of what it waited for
                reason = str(failed) if isinstance(failed, Failed) else f"{type(failed).__name__}: {failed}"
                print(f"  {title}: NOT survived: {reason} ({time.perf_counter() - start:.0f} s)", flush=True)
        print(f"kills survived: {survived}/{KILLS}")
        for temp in kills.temps:                        # every process ended before the counts
            stop(processes_under(temp))
        duplicates, orphans, notes = kills.duplicates_and_orphans()
    finally:
        kills.stop_server()
    found, scanned, hits = kills.scan()
    print(f"duplicates: {duplicates}, RUNNING orphans: {orphans}, secrets found: {found} (files scanned: {scanned})")
    for line in notes + hits:
        print(f"  {line}")
    for temp in kills.temps:
        shutil.rmtree(temp, ignore_errors=True)
    return survived == KILLS and duplicates == orphans == found == 0


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = cli.doc_parser(__doc__, "benchmarks/fault_probes.py")
    p.add_argument("--project", type=Path, help="a built smoke project to use (default: build one in a temp dir); "
                                                "the kills add their sweep and params files, runs and store to it")
    p.add_argument("--only", choices=["inputs", "kills"], help="run one part (kills: with the counts after them)")
    p.add_argument("--timeout", type=float, default=600, help="seconds any one command may take (default 600)")
    p.add_argument("--keep", action="store_true", help="keep the temporary project, inputs folder and logs")
    args = p.parse_args(argv)

    wall = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="fault-probes-"))
    project = args.project.resolve() if args.project else work / "project"
    ok = True
    try:
        if not (project / CACHE_DIR).exists():
            start = time.perf_counter()
            project.mkdir(parents=True, exist_ok=True)
            build_project(project)
            print(f"built the smoke project in {time.perf_counter() - start:.0f} s: {project}", flush=True)
        if args.only in (None, "inputs"):
            refused, cases = probe_inputs(project, work, args.timeout)
            ok &= refused == cases
        if args.only in (None, "kills"):
            ok &= probe_kills(project, work, args.timeout)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"wall time {time.perf_counter() - wall:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
