"""`python -m pipeline.sweep` end to end on a real local Ray and a real MLflow store (smoke profile).

One smoke project (data/, models/, cache/ built by the stage mains) and one local Ray serve
the in-process sweeps; the kill-and-resume and cluster tests run the driver as a process
(its own Ray, or a `ray start --head` on 127.0.0.1) and stop the Ray processes they started
by PID.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml

from pipeline.sweep import cli as sweep
from pipeline.sweep.trial import release_memory
from pipeline.config import TrackingConfig
from pipeline.tracking import Tracker

REPO = Path(__file__).resolve().parents[1]
PYTHON = REPO / ".venv" / "bin" / "python"
RAY = REPO / ".venv" / "bin" / "ray"
pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="session")
def project(tmp_path_factory) -> Path:
    """A smoke project: params.yaml (profile smoke) and the data/, models/, cache/ the stages build."""
    from stages import cache, data, models

    root = tmp_path_factory.mktemp("sweep-project")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["profile"] = "smoke"
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for stage in (data, models, cache):
        assert stage.main(["--params", str(root / "params.yaml")]) == 0, stage.__name__
    return root


@pytest.fixture(scope="session")
def local_ray():
    import ray

    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")         # short: Ray's socket paths have a length limit
    before = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = temp                             # read by ray.init, as a driver's Ray reads it
    try:
        ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, logging_level="WARNING")
    finally:
        if before is None:
            del os.environ["RAY_TMPDIR"]
        else:
            os.environ["RAY_TMPDIR"] = before
    yield
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


def write(root: Path, name: str, text: str) -> Path:
    path = root / name
    path.write_text(text)
    return path


def tracker(root: Path, name: str) -> Tracker:
    return Tracker(TrackingConfig(uri="sqlite:///mlruns/mlflow.db", experiment=f"sds-clip/{name}"), root)


def launches(tr: Tracker) -> list[dict]:
    return tr.find_runs(tags={"sweep_role": "parent"})


def children(tr: Tracker, parent: str) -> list[dict]:
    return tr.find_runs(parent=parent)


def run_main(project: Path, sweep_file: Path, *extra: str) -> int:
    return sweep.main([str(sweep_file), "--params", str(project / "params.yaml"), *extra])


def env(ray_tmpdir: str | None = None) -> dict:
    """The environment of a driver or stage this test starts; `ray_tmpdir`: where its local Ray keeps its sessions."""
    out = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if ray_tmpdir:
        out["RAY_TMPDIR"] = ray_tmpdir
    out["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return out


def cli(project: Path, *args: str, ray_tmpdir: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(PYTHON), "-m", "pipeline.sweep", *args, "--params", str(project / "params.yaml")],
                          cwd=project, env=env(ray_tmpdir), capture_output=True, text=True, timeout=540)


def processes_under(temp_dir: str, also: list[psutil.Process] = ()) -> list[psutil.Process]:
    """Processes of a Ray started with this temp dir (by command line) and their descendants, plus `also`."""
    found = {p.pid: p for p in also if p.is_running()}
    me = {os.getpid()} | {p.pid for p in psutil.Process().parents()}
    for proc in psutil.process_iter(["cmdline"]):
        if proc.pid in me:
            continue
        try:
            if any(temp_dir in part for part in proc.info["cmdline"] or []):
                found[proc.pid] = proc
                found.update({c.pid: c for c in proc.children(recursive=True)})
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return list(found.values())


def stop(procs: list[psutil.Process]) -> None:
    """SIGTERM, then SIGKILL what is left: only the processes handed in (ones this test started)."""
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=15)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


def sigkill_when(proc: subprocess.Popen, ready, temp: str | None, timeout: float, what: str) -> None:
    """SIGKILL `proc` alone (as a crash of it would) once `ready()`, then stop what it started: its
    child processes and, given its Ray temp dir, that Ray's."""
    leftovers: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert proc.poll() is None, f"it ended (exit {proc.returncode}) before {what}"
            assert time.monotonic() < deadline, f"no {what} within {timeout:g} s"
            time.sleep(0.3)
        leftovers = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stop(processes_under(temp, leftovers) if temp else [p for p in leftovers if p.is_running()])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- a grid sweep


GRID = """
name: grid4
base:
  profile: smoke
  params: {train.steps: 4, train.checkpoint_every: 2}
space:
  objective.lambda_sds: [0, 1e-3]
  train.scope: [layernorm, full]
"""


def test_grid_sweep_logs_one_parent_and_a_child_per_trial(project, local_ray, monkeypatch, capsys):
    monkeypatch.chdir(project)
    results = project / "results" / "grid4.json"
    assert run_main(project, write(project, "grid4.yaml", GRID), "--results", str(results)) == 0
    out = capsys.readouterr().out

    tr = tracker(project, "grid4")
    (parent,) = launches(tr)
    assert parent["status"] == "FINISHED" and parent["tags"]["status"] == "finished"
    assert parent["metrics"]["trials/finished"] == 4 and parent["metrics"]["trials/total"] == 4
    kids = children(tr, parent["run_id"])
    assert len(kids) == 4 and len(tr.find_runs()) == 5                  # nothing else in the experiment
    assert {k["status"] for k in kids} == {"FINISHED"} and {k["tags"]["status"] for k in kids} == {"finished"}
    assert len({k["tags"]["trial_id"] for k in kids}) == 4
    assert {(k["params"]["objective.lambda_sds"], k["params"]["train.scope"]) for k in kids} == {
        ("0.0", "layernorm"), ("0.0", "full"), ("0.001", "layernorm"), ("0.001", "full")}
    for kid in kids:
        assert kid["params"]["profile"] == "smoke" and kid["params"]["train.steps"] == "4"
        assert kid["tags"]["profile"] == "smoke" and kid["tags"]["git_commit"] and kid["tags"]["attempts"] == "1"
        assert kid["tags"]["git_dirty"] in ("true", "false")
        for metric in ("winoground/text", "winoground/text/object", "aro/vg_relation", "aro/overall",
                       "zeroshot/mean", "loss/clip", "loss/total", "time/trial_seconds"):
            assert metric in kid["metrics"], metric
        assert [s for s, _ in tr.metric_history(kid["run_id"], "loss/clip")] == [1, 2, 3, 4]
        if kid["params"]["objective.lambda_sds"] != "0.0":
            assert "loss/sds" in kid["metrics"]

    assert "4 trials, 4 finished" in out
    for label in ("t000", "t001", "t002", "t003"):
        assert label in out
    summary = json.loads(results.read_text())
    assert summary["parent_run_id"] == parent["run_id"]
    assert {t["run_id"] for t in summary["trials"]} == {k["run_id"] for k in kids}
    assert all(t["status"] == "finished" and t["metric"] is not None for t in summary["trials"])
    # Each trial's whole config, as its MLflow run holds it, for the report to group and label rows by.
    by_run = {k["run_id"]: k["params"] for k in kids}
    for t in summary["trials"]:
        assert {k: str(t["params"][k]) for k in by_run[t["run_id"]]} == by_run[t["run_id"]]
        assert t["params"]["train.steps"] == 4 and t["params"]["objective.method"] == "sds"

    trial_dirs = [d for d in (project / "ray_results").glob("grid4-*/t*") if d.is_dir()]
    assert len(trial_dirs) == 4
    for folder in trial_dirs:   # Tune's CSV and JSON results stay; its TensorBoard logger (~3 s of imports) is off
        assert (folder / "progress.csv").is_file() and (folder / "result.json").is_file()
        assert not list(folder.glob("events.out.tfevents*"))


# --------------------------------------------------------------------------- Optuna + ASHA


OPTUNA = """
name: optuna-asha
base:
  profile: smoke
  params: {train.steps: 6, train.checkpoint_every: 3}
space:
  train.lr: {loguniform: [1e-5, 1.0]}
  objective.lambda_sds: {loguniform: [1e-4, 1e-1]}
search: {type: optuna, sampler: tpe, seed: 0, num_samples: 5}
scheduler: {type: asha, metric: loss/clip, mode: min, grace_period: 2, reduction_factor: 2}
max_concurrent: 1
"""


def test_optuna_with_asha_stops_some_trials_early(project, local_ray, monkeypatch, capsys):
    monkeypatch.chdir(project)
    assert run_main(project, write(project, "optuna.yaml", OPTUNA)) == 0
    out = capsys.readouterr().out

    tr = tracker(project, "optuna-asha")
    (parent,) = launches(tr)
    kids = children(tr, parent["run_id"])
    assert len(kids) == 5 and parent["status"] == "FINISHED"
    stopped = [k for k in kids if k["tags"]["status"] == "early_stopped"]
    finished = [k for k in kids if k["tags"]["status"] == "finished"]
    assert stopped and finished and len(stopped) + len(finished) == 5, [k["tags"]["status"] for k in kids]
    for kid in stopped:
        assert kid["status"] == "KILLED" and "winoground/text" not in kid["metrics"]
        assert max(s for s, _ in tr.metric_history(kid["run_id"], "loss/clip")) < 6
    for kid in finished:
        assert kid["status"] == "FINISHED" and "winoground/text" in kid["metrics"]
    for kid in kids:
        assert 1e-5 <= float(kid["params"]["train.lr"]) <= 1.0
        assert 1e-4 <= float(kid["params"]["objective.lambda_sds"]) <= 1e-1
    assert parent["metrics"]["trials/early_stopped"] == len(stopped)
    assert f"{len(stopped)} stopped early" in out


# --------------------------------------------------------------------------- failure isolation


FAILING = """
name: failing
base:
  profile: smoke
  params:
    objective.lambda_sds: 1e-3
space:
  train.student: [toy-vit, ghost]
  objective.latent_scale: [1.0, 1e300]     # 1e300 overflows float32: the SDS loss is NaN at step 0
resources: {cpu: 0.5}                      # all four at once (an errored trial's worker is not reused)
max_concurrent: 4
"""


def test_raising_and_nan_trials_fail_alone_and_the_sweep_exits_nonzero(project, local_ray, monkeypatch, capsys):
    monkeypatch.chdir(project)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["profiles"]["smoke"]["students"]["ghost"] = {"embed_dim": 32}   # valid, but the models stage never built it
    ghost = write(project, "ghost-params.yaml", yaml.safe_dump(params, sort_keys=False))
    assert sweep.main([str(write(project, "failing.yaml", FAILING)), "--params", str(ghost)]) == 1
    out = capsys.readouterr().out

    tr = tracker(project, "failing")
    (parent,) = launches(tr)
    assert parent["status"] == "FAILED" and parent["metrics"]["trials/failed"] == 3
    kids = {(k["params"]["train.student"], k["params"]["objective.latent_scale"]): k
            for k in children(tr, parent["run_id"])}
    assert len(kids) == 4
    ok = kids[("toy-vit", "1.0")]
    assert ok["status"] == "FINISHED" and ok["tags"]["status"] == "finished" and "winoground/text" in ok["metrics"]
    nan = kids[("toy-vit", "1e+300")]
    assert nan["status"] == "FAILED" and nan["tags"]["status"] == "failed"
    assert nan["tags"]["failure"].startswith("NonFiniteLoss: step 0")
    for scale in ("1.0", "1e+300"):
        ghost = kids[("ghost", scale)]
        assert ghost["status"] == "FAILED" and ghost["tags"]["status"] == "failed"
        assert ghost["tags"]["failure"].startswith("MissingInput:") and "ghost" in ghost["tags"]["failure"]

    table = out[out.index("sweep failing: 4 trials"):]
    assert "1 finished" in table and "3 failed" in table
    rows = {line.split()[0]: line for line in table.splitlines()[2:] if line.strip().startswith("t0")}
    assert "finished" in rows["t000"] and "failed" in rows["t001"] and "NonFiniteLoss" in rows["t001"]
    assert "MissingInput" in rows["t002"] and "MissingInput" in rows["t003"]


RETRIED = """
name: retried
base:
  profile: smoke
  params: {train.steps: 2, train.checkpoint_every: 2}
space:
  variant:
    clip: {objective.method: clip, objective.lambda_sds: 0}      # reads no cache table
    sds: {objective.method: sds, objective.lambda_sds: 1e-3}     # reads train_text
max_concurrent: 2
"""

NANS = {"F32": b"\x00\x00\xc0\x7f", "F16": b"\x00\x7e", "BF16": b"\xc0\x7f"}


def fill_with_nan(shard: Path) -> None:
    """A shard of the same size whose every value is NaN: a table that opens, and a loss that is NaN."""
    data = bytearray(shard.read_bytes())
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    for name, entry in header.items():
        if name != "__metadata__":
            start, end = (8 + size + offset for offset in entry["data_offsets"])
            nan = NANS[entry["dtype"]]
            data[start:end] = nan * ((end - start) // len(nan))
    shard.write_bytes(bytes(data))


def test_retry_failed_runs_the_failed_trial_again_and_not_the_finished_one(project, local_ray, tmp_path,
                                                                           monkeypatch, capsys):
    """A trial failed on a broken input (the text conditioning all NaN); the input mended, `--resume
    --retry-failed` runs that trial again, in its own run, and leaves the finished one as it was."""
    root = tmp_path / "project"
    for name in ("data", "models", "cache"):
        shutil.copytree(project / name, root / name)
    shutil.copy(project / "params.yaml", root / "params.yaml")
    monkeypatch.chdir(root)
    shards = sorted((root / "cache" / "train_text").glob("shard-*.safetensors"))
    kept = {shard: shard.read_bytes() for shard in shards}
    for shard in shards:
        fill_with_nan(shard)
    sweep_file = write(root, "retried.yaml", RETRIED)
    assert run_main(root, sweep_file) == 1
    tr = tracker(root, "retried")
    (parent,) = launches(tr)
    before = {k["tags"]["variant"]: k for k in children(tr, parent["run_id"])}
    assert before["sds"]["status"] == "FAILED" and before["sds"]["tags"]["failure"].startswith("NonFiniteLoss: step 0")
    assert before["clip"]["status"] == "FINISHED"
    (launch,) = (root / "ray_results").glob("retried-*")
    assert json.loads((launch / "ended.json").read_text()) == {"exit": 1}

    for shard, data in kept.items():
        shard.write_bytes(data)
    capsys.readouterr()
    assert run_main(root, sweep_file, "--resume", "--retry-failed") == 0
    assert "2 trials, 2 finished" in capsys.readouterr().out
    (again,) = launches(tr)
    assert again["run_id"] == parent["run_id"] and again["status"] == "FINISHED"
    after = {k["tags"]["variant"]: k for k in children(tr, parent["run_id"])}
    assert after.keys() == before.keys()                  # no second run of either trial
    sds, clip = after["sds"], after["clip"]
    assert sds["run_id"] == before["sds"]["run_id"] and sds["status"] == "FINISHED"
    assert sds["tags"]["attempts"] == "2" and sds["tags"]["failure"] == "" and "winoground/text" in sds["metrics"]
    assert clip == before["clip"], "the finished trial ran again"
    assert json.loads((launch / "ended.json").read_text()) == {"exit": 0}


BAD_DRAWS = """
name: bad-draws
base:
  profile: smoke
  params: {train.steps: 2, train.checkpoint_every: 2}
space:
  objective.method: {choice: [clip, sds]}         # clip with a lambda > 0: refused by the config
  objective.lambda_sds: {loguniform: [1e-4, 1e-2]}
search: {type: optuna, sampler: random, seed: 1, num_samples: 4}
max_concurrent: 2
"""


def test_an_optuna_draw_the_config_refuses_fails_alone(project, local_ray, monkeypatch, capsys):
    """Optuna's draws are not known before the sweep runs: one the config refuses fails as its own
    trial (recorded with its values), and the others run."""
    monkeypatch.chdir(project)
    assert run_main(project, write(project, "bad-draws.yaml", BAD_DRAWS)) == 1
    tr = tracker(project, "bad-draws")
    (parent,) = launches(tr)
    kids = children(tr, parent["run_id"])
    assert len(kids) == 4 and parent["status"] == "FAILED"
    refused = [k for k in kids if k["params"]["objective.method"] == "clip"]
    assert refused and len(refused) < 4, [k["params"] for k in kids]
    for kid in kids:
        if kid in refused:
            assert kid["status"] == "FAILED" and kid["tags"]["failure"].startswith("ConfigError: objective.lambda_sds")
        else:
            assert kid["status"] == "FINISHED" and "winoground/text" in kid["metrics"]


# --------------------------------------------------------------------------- SIGKILL the driver, then --resume


# The driver persists a reported checkpoint a moment after the trial moved on, so the kill waits
# until a trial is several checkpoints past its first, yet far enough from its end not to finish first.
KILL_STEPS, KILL_AFTER_STEP, KILL_BEFORE_STEP = 60, 20, 40
KILL = """
name: killed
base:
  profile: smoke
  params: {train.steps: %d, train.checkpoint_every: 4}
space:
  objective.lambda_sds: [0, 1e-3]
  train.scope: [layernorm, full]
max_concurrent: 2
""" % KILL_STEPS


def last_logged_step(tr, run: dict) -> int:
    return max((step for step, _ in tr.metric_history(run["run_id"], "loss/total")), default=0)


def test_sigkill_of_the_driver_then_resume_finishes_with_one_run_per_trial(project):
    sweep_file = write(project, "killed.yaml", KILL)
    tr = tracker(project, "killed")
    temp = tempfile.mkdtemp(prefix="rk-", dir="/tmp")
    driver = subprocess.Popen([str(PYTHON), "-m", "pipeline.sweep", str(sweep_file), "--params",
                               str(project / "params.yaml")],
                              cwd=project, env=env(temp), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    def finished_and_midway() -> bool:
        """A trial has finished and another is mid-way, past several checkpoints."""
        parents = launches(tr) if tr.client.get_experiment_by_name("sds-clip/killed") else []
        if not parents:
            return False
        kids = children(tr, parents[0]["run_id"])
        return any(k["status"] == "FINISHED" for k in kids) and any(
            k["status"] == "RUNNING" and KILL_AFTER_STEP <= last_logged_step(tr, k) <= KILL_BEFORE_STEP for k in kids)

    try:
        sigkill_when(driver, finished_and_midway, temp, 400, "a trial got far enough to kill the driver mid-sweep")
    finally:
        shutil.rmtree(temp, ignore_errors=True)

    (parent,) = launches(tr)
    assert parent["status"] == "RUNNING"
    before = {k["tags"]["trial_id"]: k for k in children(tr, parent["run_id"])}
    finished_before = {t for t, k in before.items() if k["status"] == "FINISHED"}
    assert finished_before and any(k["status"] == "RUNNING" for k in before.values())

    # Two resumes at once: the second is refused while the first holds the launch, which it finishes.
    temp, other = tempfile.mkdtemp(prefix="rk-", dir="/tmp"), tempfile.mkdtemp(prefix="rk-", dir="/tmp")
    (lock,) = (project / "ray_results").glob("killed-*/driver.lock")
    first = subprocess.Popen([str(PYTHON), "-m", "pipeline.sweep", str(sweep_file), "--params",
                              str(project / "params.yaml"), "--resume"],
                             cwd=project, env=env(temp), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while lock.read_text() != f"pid {first.pid} on {socket.gethostname()}":
            assert first.poll() is None and time.monotonic() < deadline, "the first resume never held the launch"
            time.sleep(0.2)
        second = cli(project, str(sweep_file), "--resume", ray_tmpdir=other)
        out, err = first.communicate(timeout=540)
    finally:
        if first.poll() is None:
            first.kill()
        stop(processes_under(temp) + processes_under(other))
        shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(other, ignore_errors=True)
    assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr[-3000:]
    assert "is being run by another driver (pid %d" % first.pid in second.stderr
    assert first.returncode == 0, out[-3000:] + err[-3000:]
    assert "4 trials, 4 finished" in out
    # Trials side by side draw no progress bars, which the driver's output would interleave.
    assert "diffusion score:" not in err and "Loading weights" not in err, err[-3000:]

    (after_parent,) = launches(tr)                       # the same launch, now finished
    assert after_parent["run_id"] == parent["run_id"] and after_parent["status"] == "FINISHED"
    after = children(tr, parent["run_id"])
    assert len(after) == 4 and len({k["tags"]["trial_id"] for k in after}) == 4
    assert len(tr.find_runs()) == 5                      # no duplicate, no orphan
    assert {k["status"] for k in after} == {"FINISHED"} and {k["tags"]["status"] for k in after} == {"finished"}
    by_id = {k["tags"]["trial_id"]: k for k in after}
    for trial_id in finished_before:                     # not run again: untouched since it finished
        again = by_id[trial_id]
        assert again["end_time"] == before[trial_id]["end_time"] and again["tags"]["attempts"] == "1"
    resumed = [k for t, k in by_id.items() if t in before and t not in finished_before]
    # A trial can still finish between the snapshot above and the kill landing: at least one is resumed.
    assert any(k["tags"]["attempts"] == "2" for k in resumed), [k["tags"]["attempts"] for k in resumed]
    assert any(int(k["tags"]["resumed_from_step"]) >= 4 for k in resumed), \
        [k["tags"]["resumed_from_step"] for k in resumed]  # restarted from its checkpoint, not from step 0
    for kid in after:
        steps = [s for s, _ in tr.metric_history(kid["run_id"], "loss/clip")]
        # Each step logged once: the steps a resumed trial re-ran after its checkpoint are not logged twice.
        assert sorted(steps) == list(range(1, KILL_STEPS + 1)) and "winoground/text" in kid["metrics"], steps


def test_a_broken_table_the_evaluation_reads_stops_a_trial_before_its_first_step(project, tmp_path):
    """The tables scored after training (the projected score's `bench_text`) are opened before it: a
    truncated shard stops the trial at once, not after every step was trained."""
    from pipeline.cache import CacheError
    from pipeline.config import load
    from pipeline.experiment import run_finetune

    cache = shutil.copytree(project / "cache", tmp_path / "cache")
    shard = next((cache / "bench_text").glob("shard-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-16])
    cfg = load(project / "params.yaml", {"objective": {"method": "sds"}, "eval": {"projected_score": True}})
    steps = []
    with pytest.raises(CacheError, match="bench_text"):
        run_finetune(cfg, project / "data", project / "models", cache, tmp_path / "trial",
                     on_log=lambda step, losses: steps.append(step), progress=False)
    assert steps == [] and not (tmp_path / "trial").exists()


def test_a_sweep_whose_trials_read_a_cache_other_teacher_weights_encoded_is_refused_before_it_starts(
        project, tmp_path, capsys):
    """`models/teacher` replaced after the cache was built (a models stage run by hand): the launch stops
    in one line naming the table (exit 2) before Ray or MLflow is touched; a sweep whose trials read
    no table (L_CLIP alone) passes the same check."""
    from stale_cache import replace_the_teacher
    from pipeline.config import load
    from pipeline.models import teacher_dir
    from pipeline.sweep import spec

    copy = shutil.copytree(project, tmp_path / "stale", ignore=shutil.ignore_patterns("mlruns", "ray_results", "runs"))
    cfg = load(copy / "params.yaml")
    old, _ = replace_the_teacher(cfg.teacher, cfg.data.image_size, copy / "models")
    sds = write(tmp_path, "stale.yaml", "name: stale\nbase: {params: {objective.method: sds}}\n"
                                        "space: {objective.lambda_sds: [0.1]}\n")
    capsys.readouterr()                    # the teacher's saving bars
    assert run_main(copy, sds) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cache table 'train_text': ") and "\n" not in err
    assert f"encoded by teacher {old}, but {teacher_dir(copy / 'models')} holds teacher " in err
    assert not (copy / "ray_results").exists() and not (copy / "mlruns").exists()

    clip = write(tmp_path, "clip.yaml", "name: clip\nbase: {params: {objective.method: clip, objective.lambda_sds: 0}}"
                                        "\nspace: {train.lr: [1e-3]}\n")
    loaded = spec.load(clip, yaml.safe_load((copy / "params.yaml").read_text()))
    assert sweep.preflight(loaded, spec.trials(loaded), copy) is None


SECRET = "aws-secret-3f9a7c1e"
STAGE_KILL = """
name: stagekill
base:
  profile: smoke
  params: {train.steps: 24, train.checkpoint_every: 4}
space:
  objective.lambda_sds: [0, 1e-3, 1e-2]
max_concurrent: 1
"""


def test_the_sweep_stage_killed_mid_launch_resumes_that_launch_when_run_again(project):
    """`dvc repro` re-runs a killed stage: the sweep it was running continues its launch (finished
    trials kept, one MLflow run per trial) instead of starting from step 0."""
    sweep_file = write(project, "stagekill.yaml", STAGE_KILL)
    tr = tracker(project, "stagekill")
    temp = tempfile.mkdtemp(prefix="rs-", dir="/tmp")     # the stage's Ray lives here (RAY_TMPDIR), to stop it
    command = [str(PYTHON), "-m", "stages.sweep", str(sweep_file), "--params", str(project / "params.yaml")]
    # A credential in the environment (as a cloud storage_path needs) must reach no log or file.
    stage_env = {**env(temp), "AWS_SECRET_ACCESS_KEY": SECRET}
    stage = subprocess.Popen(command, cwd=project, env=stage_env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    def a_trial_finished() -> bool:
        parents = launches(tr) if tr.client.get_experiment_by_name("sds-clip/stagekill") else []
        return bool(parents) and any(k["status"] == "FINISHED" for k in children(tr, parents[0]["run_id"]))

    sigkill_when(stage, a_trial_finished, temp, 300, "a finished trial")
    (parent,) = launches(tr)
    finished_before = {k["tags"]["trial_id"]: k for k in children(tr, parent["run_id"]) if k["status"] == "FINISHED"}
    assert not (project / "results" / "sweeps.json").exists()

    try:
        again = subprocess.run(command, cwd=project, env=stage_env, capture_output=True, text=True, timeout=400)
        stop(processes_under(temp))
        ray_logs = [p for p in Path(temp).rglob("*.log") if p.is_file()]
        assert len(ray_logs) > 5, ray_logs              # Ray's own logs are among the files scanned
        written = [p for folder in (Path(temp), project / "ray_results", project / "mlruns", project / "runs",
                                    project / "results") for p in folder.rglob("*") if p.is_file()]
        leaks = [str(p) for p in written if SECRET.encode() in p.read_bytes()]
        assert leaks == [] and SECRET not in again.stdout + again.stderr, leaks
    finally:
        stop(processes_under(temp))
        shutil.rmtree(temp, ignore_errors=True)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "sweep stagekill: resuming launch " in again.stdout
    (after,) = launches(tr)                              # the same launch, finished: no second one
    assert after["run_id"] == parent["run_id"] and after["status"] == "FINISHED"
    kids = children(tr, parent["run_id"])
    assert len(kids) == 3 and {k["status"] for k in kids} == {"FINISHED"}
    for trial_id, before in finished_before.items():     # not trained again
        (now,) = [k for k in kids if k["tags"]["trial_id"] == trial_id]
        assert now["end_time"] == before["end_time"] and now["tags"]["attempts"] == "1"
    listed = json.loads((project / "results" / "sweeps.json").read_text())
    assert listed["stagekill"]["counts"]["finished"] == 3 and listed["stagekill"]["parent_run_id"] == parent["run_id"]


# --------------------------------------------------------------------------- a separate Ray head


def test_sweep_runs_on_a_ray_head_given_by_address(project):
    temp = tempfile.mkdtemp(prefix="rh-", dir="/tmp")
    port = free_port()
    start = subprocess.run([str(RAY), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                            "--num-cpus=2", "--num-gpus=0", "--include-dashboard=false", f"--temp-dir={temp}",
                            "--disable-usage-stats"],
                           cwd=tempfile.gettempdir(), env=env(), capture_output=True, text=True, timeout=180)
    try:
        assert start.returncode == 0, start.stdout + start.stderr
        sweep_file = write(project, "cluster.yaml", "name: cluster\nbase: {profile: smoke}\n"
                                                    "space: {objective.lambda_sds: [0, 1e-3]}\n")
        proc = cli(project, str(sweep_file), "--address", f"127.0.0.1:{port}")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "2 trials, 2 finished" in proc.stdout
        logs = list(Path(temp).glob("session_*/logs/*"))
        assert any("run_trial" in p.read_text(errors="ignore") for p in logs if p.is_file() and p.stat().st_size < 10**7)
    finally:
        stop(processes_under(temp))
        shutil.rmtree(temp, ignore_errors=True)
    tr = tracker(project, "cluster")
    (parent,) = launches(tr)
    kids = children(tr, parent["run_id"])
    assert parent["status"] == "FINISHED" and len(kids) == 2 and {k["status"] for k in kids} == {"FINISHED"}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_a_trial_gives_the_previous_trials_freed_memory_back():
    """Ray reuses a worker for the next trial: what the last one freed in many small blocks stays in
    glibc's heap (RSS) until `release_memory`, which each trial calls first, returns it."""
    import gc

    process = psutil.Process()
    release_memory()              # what earlier tests freed would serve the blocks below unseen
    base = process.memory_info().rss
    blocks = [bytearray(2000) for _ in range(150_000)]      # ~300 MB in heap-sized blocks
    pins = [bytearray(10) for _ in range(1000)]              # live blocks above them: glibc cannot trim the top
    del blocks
    gc.collect()
    held = process.memory_info().rss - base
    release_memory()
    released = process.memory_info().rss - base
    assert held > 200e6 and released < held / 4
    del pins


# --------------------------------------------------------------------------- faults around a launch


def test_a_launch_killed_before_ray_recorded_a_trial_is_refused_and_its_run_ended(project, local_ray, monkeypatch,
                                                                                   capsys):
    """Ray Tune writes a launch's settings (`tuner.pkl`) when the tuner is built and its first trial
    state only once `fit()` runs: a driver killed between the two leaves a launch that restoring
    would run as one trial with an empty config."""
    from pipeline.config import read_yaml
    from pipeline.sweep import driver, spec
    from pipeline.sweep.recorder import RunRecorder

    monkeypatch.chdir(project)
    sweep_file = write(project, "early.yaml", "name: early\nbase: {profile: smoke}\n"
                                              "space: {objective.lambda_sds: [0, 1e-3]}\n")
    sweep = spec.load(sweep_file, read_yaml(project / "params.yaml"))
    tr = tracker(project, "early")
    ray_path = f"{project}/ray_results/early-20261205-093000-0001-{sweep.spec_hash()}"
    recorder = RunRecorder(sweep, project, tr.uri, "sds-clip/early")
    recorder.open_launch(ray_path)
    driver.tuner(sweep, spec.trials(sweep), project, recorder, ray_path, resume=False, retry=False)   # the kill: no fit()

    # While its driver still starts (it holds the launch's lock; no snapshot yet), a resume is refused
    # as another driver's launch, and the launch's run is left to that driver.
    holder = subprocess.Popen([str(PYTHON), "-c", "import time; from pipeline.sweep.driver import launch_lock\n"
                               f"with launch_lock({ray_path!r}):\n    print('held', flush=True); time.sleep(60)"],
                              cwd=REPO, env=env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert run_main(project, sweep_file, "--resume") == 2
        assert "is being run by another driver" in capsys.readouterr().err
        (parent,) = launches(tr)
        assert parent["status"] == "RUNNING"
    finally:
        holder.kill()
        holder.wait()
    assert run_main(project, sweep_file, "--resume") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "mlflow.store.db" not in line]  # a new store's notes
    assert len(err) == 1 and "was stopped before Ray Tune recorded any trial" in err[0], err
    (parent,) = launches(tr)
    assert parent["status"] == "KILLED" and parent["tags"]["status"] == "interrupted"
    assert children(tr, parent["run_id"]) == []

    # Another such launch, then a new one (the sweep stage's way on): it ends the earlier one's run,
    # which would otherwise stay RUNNING, since nothing can continue that launch.
    killed = f"{project}/ray_results/early-20261205-094500-0001-{sweep.spec_hash()}"
    recorder = RunRecorder(sweep, project, tr.uri, "sds-clip/early")
    recorder.open_launch(killed)
    driver.tuner(sweep, spec.trials(sweep), project, recorder, killed, resume=False, retry=False)
    # And one killed while Ray Tune wrote its snapshot (cut short), a trial's run open: the sweep stage
    # starts a new launch in its place (a resume is refused), which ends both runs.
    cut = f"{project}/ray_results/early-20261205-095000-0001-{sweep.spec_hash()}"
    recorder = RunRecorder(sweep, project, tr.uri, "sds-clip/early")
    recorder.open_launch(cut)
    driver.tuner(sweep, spec.trials(sweep), project, recorder, cut, resume=False, retry=False)
    Path(cut, "experiment_state-2026-12-05_09-50-00.json").write_text('{"trial_data": [')
    (cut_parent,) = [run for run in launches(tr) if run["tags"]["ray_path"] == cut]
    tr.start("t000", tags={"sweep_role": "trial"}, parent=cut_parent["run_id"], experiment="sds-clip/early")
    assert driver.unfinished_launch(sweep, f"{project}/ray_results") is None
    assert f"note: launch {cut} cannot be continued (experiment_state-2026-12-05_09-50-00.json cannot be read: " \
           "cut short by a kill while Ray Tune wrote it, or written by another Ray Tune); a new launch runs the " \
           "sweep" in capsys.readouterr().err
    # And one killed after its run opened, before Ray Tune wrote its settings: a folder with its lock alone.
    unset = f"{project}/ray_results/early-20261205-095500-0001-{sweep.spec_hash()}"
    with driver.launch_lock(unset):
        RunRecorder(sweep, project, tr.uri, "sds-clip/early").open_launch(unset)
    assert run_main(project, sweep_file) == 0
    by_path = {run["tags"]["ray_path"]: run for run in launches(tr)}
    assert len(by_path) == 5 and all(by_path[p]["status"] == "KILLED" for p in (killed, ray_path, cut, unset))
    assert by_path[unset]["tags"]["failure"] == driver.UNRECORDED
    assert "cannot be read" in by_path[cut]["tags"]["failure"]
    (trial,) = children(tr, by_path[cut]["run_id"])
    assert trial["status"] == "KILLED" and trial["tags"]["failure"] == by_path[cut]["tags"]["failure"]
    (new,) = [run for path, run in by_path.items() if path not in (killed, ray_path, cut, unset)]
    assert new["status"] == "FINISHED" and len(children(tr, new["run_id"])) == 2


def test_a_sweep_whose_store_moved_with_the_project_is_refused_in_one_line_before_ray_starts(project, capsys):
    """Its experiment made where the project was (an absolute artifact folder): the launch's run would
    have written its files there; the refusal came after Ray started, as a traceback (no run to fail)."""
    sweep_file = write(project, "moved.yaml", "name: moved\nbase: {profile: smoke}\nspace: {objective.lambda_sds: [0]}\n")
    tr = tracker(project, "moved")
    elsewhere = "/elsewhere/mlruns/mlflow-artifacts"
    tr.client.create_experiment("sds-clip/moved", artifact_location=elsewhere)
    assert run_main(project, sweep_file) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "mlflow.store.db" not in line]   # a new store's
    assert len(err) == 1 and err[0].startswith(f"error: tracking.uri: {project}/mlruns/mlflow.db was made in another "
                                               f"folder: experiment 'sds-clip/moved' keeps its runs' files in {elsewhere}")
    assert list((project / "ray_results").glob("moved-*")) == [] and launches(tr) == []


def test_a_trial_that_failed_after_rays_last_snapshot_runs_again_and_loses_its_failure(tmp_path):
    """Ray restores such a trial as unfinished (its snapshot says RUNNING) and runs it again; its run
    ended FINISHED with the old failure still tagged, which reports read as a failed trial."""
    import pickle

    from ray.tune.experiment import Trial

    from pipeline.config import read_yaml
    from pipeline.sweep import spec
    from pipeline.sweep.recorder import RunRecorder

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    sweep_file = write(tmp_path, "s.yaml", "name: s\nspace: {train.lr: [0.1, 0.2]}\n")
    sweep = spec.load(sweep_file, read_yaml(tmp_path / "params.yaml"))
    tr = tracker(tmp_path, "s")
    recorder = RunRecorder(sweep, tmp_path, tr.uri, "sds-clip/s")
    recorder.open_launch(str(tmp_path / "ray_results" / "s-launch"))
    launch = pickle.dumps(recorder)                 # as Ray Tune keeps the callback (tuner.pkl)
    trial = Trial("run_trial", config={"trial": {"index": 0, "values": {"train.lr": 0.1}}}, stub=True,
                  experiment_tag="1")
    trial.set_status(Trial.RUNNING)
    recorder.on_trial_start(0, [trial], trial)
    snapshot = pickle.loads(pickle.dumps(recorder.get_state()))       # Ray's last snapshot: running
    rec = recorder.trials[trial.trial_id]
    rec["failure"] = "RuntimeError: boom"
    recorder.end(rec, "failed")                                        # then it failed, then the driver died

    resumed = pickle.loads(launch)
    resumed.set_state(snapshot)
    resumed.setup()
    resumed.on_trial_start(0, [trial], trial)
    (tmp_path / "trained.bin").write_bytes(b"x")
    resumed.on_trial_result(0, [trial], trial, {"final": 1, "step": 10, "winoground/text": 0.5, "outcomes": "{}",
                                                "trained": str(tmp_path / "trained.bin")})
    resumed.on_trial_complete(0, [trial], trial)
    (run,) = tr.runs([rec["run_id"]])
    assert run["status"] == "FINISHED" and run["tags"]["status"] == "finished"
    assert run["tags"]["failure"] == "" and run["tags"]["attempts"] == "2"
