"""The headline metrics files (`pipeline.headline`): the same keys in every file, a variant's mean over
its seeds; and, with real DVC, `dvc metrics show` prints them one narrow row per file, `dvc metrics diff`
compares them with a committed run, and the sweep plots of dvc.yaml render."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError
from pipeline.headline import KEYS, headline_files, write_headline
from pipeline.metrics import encode_correct
from pipeline.report import VariantRow, compare_variants, write_sweep_report, write_variant_report

ROOT = Path(__file__).resolve().parents[1]
WIDTH = 200   # what a terminal shows without wrapping the table

TABLE1 = [
    ("pretrained toy-vit", {"winoground/text": 0.25, "winoground/text/object": 0.5, "winoground/image": 0.125,
                            "winoground/group": 0.0, "aro/overall": 0.5, "aro/vg_relation": 0.4,
                            "zeroshot/mean": 0.3, "zeroshot/shape": 0.2}),
    ("FT with L_CLIP", {"winoground/text": 0.375, "winoground/image": 0.25, "winoground/group": 0.125,
                        "aro/overall": 0.625, "zeroshot/mean": 0.4}),
    ("FT with L_CLIP + 0.1 L_SDS", {"winoground/text": 0.5, "winoground/image": math.nan, "winoground/group": 0.25,
                                    "aro/overall": 0.75, "zeroshot/mean": 0.45, "projected/winoground/text": 0.6}),
    ("diffusion score (toy-ldm)", {"winoground/text": 0.625, "winoground/image": 0.5, "winoground/group": 0.375,
                                   "aro/overall": 0.875}),
]


def result_trial(label: str, config: dict, status: str, metrics: dict, outcomes: dict | None = None) -> dict:
    """A trial as a sweep's results file lists it, with what the report's tables read."""
    return {"trial": label, "config": config, "status": status, "metrics": metrics, "outcomes": outcomes or {}}


def trial(variant: str, seed: int, text: str, relation: str, attribution: str, shapes: str, colours: str,
          status: str = "finished") -> dict:
    """A variant sweep's trial with per-case outcomes: Winoground text, ARO's two VG sets, two zero-shot sets."""
    parts = {"winoground/text": text, "aro/vg_relation": relation, "aro/vg_attribution": attribution,
             "zeroshot/shape": shapes, "zeroshot/colour": colours}
    outcomes = {name: {"correct": encode_correct([c == "1" for c in bits]), "groups": None, "cases": "fixture"}
                for name, bits in parts.items()}
    return result_trial(f"t{seed:03d}", {"variant": variant, "train.seed": seed}, status,
                        {"winoground/text": text.count("1") / len(text)}, outcomes)


# Hand-computed means over the finished seeds (each metric the mean of its parts' values):
#   plain: text (2/4 + 3/4)/2 = 0.625; ARO ((2/4 + 4/4)/2 + (0/4 + 2/4)/2)/2 = 0.5;
#          zero-shot ((2/2 + 1/2)/2 + (0/4 + 1/4)/2)/2 = 0.4375
#   SDS-CLIP: text (4/4 + 3/4)/2 = 0.875; ARO ((1 + 1)/2 + (1/4 + 1/4)/2)/2 = 0.625;
#          zero-shot ((0 + 1/2)/2 + (4/4 + 4/4)/2)/2 = 0.625; its failed seed 2 counts for nothing.
VARIANT_TRIALS = [
    trial("plain", 0, "1100", "1010", "0000", "11", "0000"),
    trial("plain", 1, "1110", "1111", "1100", "10", "0001"),
    trial("SDS-CLIP", 0, "1111", "1111", "1000", "00", "1111"),
    trial("SDS-CLIP", 1, "1110", "1111", "0100", "01", "1111"),
    trial("SDS-CLIP", 2, "0000", "0000", "0000", "00", "0000", status="failed"),
]
EXPECTED = {
    "pretrained.json": {"wino_text": 0.25, "wino_image": 0.125, "wino_group": 0.0, "aro": 0.5, "zeroshot": 0.3},
    "ft-clip.json": {"wino_text": 0.375, "wino_image": 0.25, "wino_group": 0.125, "aro": 0.625, "zeroshot": 0.4},
    "ft-sds.json": {"wino_text": 0.5, "wino_image": None, "wino_group": 0.25, "aro": 0.75, "zeroshot": 0.45},
    "diffusion-score.json": {"wino_text": 0.625, "wino_image": 0.5, "wino_group": 0.375, "aro": 0.875,
                             "zeroshot": None},
    "methods.plain.json": {"wino_text": 0.625, "wino_image": None, "wino_group": None, "aro": 0.5, "zeroshot": 0.4375},
    "methods.sds-clip.json": {"wino_text": 0.875, "wino_image": None, "wino_group": None, "aro": 0.625,
                              "zeroshot": 0.625},
}


def variant_rows(trials=VARIANT_TRIALS, order=("plain", "SDS-CLIP")) -> list[VariantRow]:
    return compare_variants(trials, list(order), n_resamples=20)


def test_every_row_has_the_same_keys_a_variant_its_seed_mean_and_null_for_what_it_lacks():
    files = headline_files(TABLE1, {"methods": variant_rows()})
    assert list(files) == list(EXPECTED)
    for name, values in files.items():
        assert list(values) == list(KEYS), name
        assert values == pytest.approx(EXPECTED[name]), name
    json.dumps(files, allow_nan=False)   # strict JSON: the NaN image score became null


def test_a_file_is_named_by_its_place_in_table1_and_its_variant_not_by_a_label_a_param_changes():
    relabelled = [(f"{label} (again)", metrics) for label, metrics in TABLE1]
    assert list(headline_files(relabelled, {})) == list(EXPECTED)[:4]
    with pytest.raises(ValueError, match="Table 1 has 4 rows"):
        headline_files(TABLE1[:3], {})


def row(name: str) -> VariantRow:
    return VariantRow(name, [0], {"winoground/text": (0.5, 0.0, 0.4, 0.6)}, None, {})


def test_a_variant_file_is_named_by_the_words_of_its_name_in_any_script():
    files = headline_files(TABLE1, {"methods": [row("FT with L_CLIP"), row("λ = 0.1")], "lr": [row("FT with L_CLIP")]})
    assert list(files)[4:] == ["methods.ft-with-l-clip.json", "methods.λ-0-1.json", "lr.ft-with-l-clip.json"]


@pytest.mark.parametrize("names, message", [
    (["SDS-CLIP", "sds clip"], "sweep methods: variants 'SDS-CLIP' and 'sds clip' both make the metrics file "
                               "methods.sds-clip.json; rename one"),
    (["plain", "--"], "sweep methods: variant '--' has no letter or digit to name its metrics file"),
])
def test_variant_names_that_make_no_file_name_or_the_same_one_are_refused_in_one_line(names, message):
    with pytest.raises(ConfigError) as err:
        headline_files(TABLE1, {"methods": [row(n) for n in names]})
    assert str(err.value) == message


def test_write_headline_replaces_the_folder_so_an_earlier_runs_rows_are_gone(tmp_path):
    folder = tmp_path / "metrics"
    write_headline({"methods.dropped.json": {"wino_text": 0.1}, "ft-clip.json": {"wino_text": 0.1}}, folder)
    files = headline_files(TABLE1, {"methods": variant_rows()})
    write_headline(files, folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted(files)
    assert {p.name: json.loads(p.read_text()) for p in folder.iterdir()} == files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics"]   # no temp folder left beside it


# ----------------------------------------------------------------------------- real DVC


def run(cmd: list[str], cwd: Path, env: dict) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


# The stage command: the headline files of rows.json written into metrics/, as the report stage writes them.
WRITE = ("import json, pathlib, pipeline.headline as h; "
         "h.write_headline(json.loads(pathlib.Path('rows.json').read_text()), pathlib.Path(h.FOLDER))")


def methods_rows() -> list[VariantRow]:
    """A row per variant of sweeps/methods.yaml (its real names, the longest file names), two seeds each."""
    names = list(yaml.safe_load((ROOT / "sweeps" / "methods.yaml").read_text())["space"]["variant"])
    bits = ["1100", "1110", "1111", "1000", "0110"]
    trials = [trial(name, seed, bits[(i + seed) % 5], "1010", "1100", "10", "0011")
              for i, name in enumerate(names) for seed in (0, 1)]
    return variant_rows(trials, names)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A git + DVC repo whose dvc.yaml has the project's plots and a stage writing the headline files
    (a folder of git-tracked metrics, as the report stage declares it), run once and committed."""
    dest = tmp_path_factory.mktemp("headline")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(ROOT), "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@localhost"}
    plots = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    spec = {"stages": {"report": {"cmd": f'python -c "{WRITE}"', "deps": ["rows.json"],
                                  "metrics": [{"metrics": {"cache": False}}]}}, "plots": plots}
    (dest / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    (dest / "rows.json").write_text(json.dumps(headline_files(TABLE1, {"methods": methods_rows()})))
    write_sweep_tables(dest / "reports")
    dvc = [sys.executable, "-m", "dvc"]
    for cmd in (["git", "init", "-q"], dvc + ["init", "-q"], dvc + ["repro", "-q"], ["git", "add", "-A"],
                ["git", "commit", "-qm", "reference run"]):
        run(cmd, dest, env)
    shutil.copytree(ROOT / ".dvc" / "plots", dest / ".dvc" / "plots")     # the project's plot templates
    return dest, env, dvc


def write_sweep_tables(reports: Path) -> None:
    """The report's tables the plots read: a lambda and an lr sweep, and two variant sweeps' means."""
    for name, key, values in (("lambda", "objective.lambda_sds", [0.1, 0, 1e-3]), ("lr", "train.lr", [5e-3, 5e-5])):
        trials = [result_trial(f"t{i:03d}", {key: v}, "finished", {"winoground/text": 0.25 + i / 8})
                  for i, v in enumerate(values)]
        write_sweep_report(name, trials, reports)
    for name in ("methods", "scope"):
        write_variant_report(name, variant_rows(), {}, reports, 20)


@pytest.mark.slow
def test_dvc_metrics_show_prints_one_narrow_row_per_file_with_the_same_columns(repo):
    dest, env, dvc = repo
    assert (dest / "dvc.lock").is_file()
    # cache: false, so git keeps the reference run's files
    assert run(["git", "ls-files", "metrics"], dest, env).split() == sorted(
        f"metrics/{name}" for name in json.loads((dest / "rows.json").read_text()))
    lines = run(dvc + ["metrics", "show"], dest, env).rstrip("\n").splitlines()
    assert all(len(line) < WIDTH for line in lines), max(map(len, lines))
    header, *rows = [line.split() for line in lines]
    assert header == ["Path", *sorted(KEYS)]
    methods = len(yaml.safe_load((ROOT / "sweeps" / "methods.yaml").read_text())["space"]["variant"])
    assert len(rows) == 4 + methods and all(len(cells) == len(header) for cells in rows), lines
    shown = {cells[0]: dict(zip(header[1:], cells[1:])) for cells in rows}
    assert shown["metrics/ft-sds.json"]["wino_image"] == "-" and shown["metrics/ft-sds.json"]["wino_text"] == "0.5"
    assert shown["metrics/diffusion-score.json"]["zeroshot"] == "-"
    assert "metrics/methods.unet-feature-distillation.json" in shown


@pytest.mark.slow
def test_dvc_metrics_diff_compares_a_row_with_the_committed_run(repo):
    dest, env, dvc = repo
    files = json.loads((dest / "rows.json").read_text())
    files["ft-sds.json"]["wino_text"] = 0.75
    (dest / "rows.json").write_text(json.dumps(files))
    try:
        run(dvc + ["repro", "-q"], dest, env)
        changed = json.loads(run(dvc + ["metrics", "diff", "--json"], dest, env))
    finally:
        run(["git", "checkout", "-q", "--", "."], dest, env)   # the committed run again, for the other tests
    assert changed == {"metrics/ft-sds.json": {"wino_text": {"old": 0.5, "new": 0.75, "diff": 0.25}}}


@pytest.mark.slow
def test_the_sweep_plots_of_dvc_yaml_render_from_the_report_tables(repo):
    dest, env, dvc = repo
    out = run(dvc + ["plots", "show", "-o", "plots"], dest, env)
    html = (dest / "plots" / "index.html").read_text()
    assert "index.html" in out and "vega" in html
    shown = json.loads(run(dvc + ["plots", "show", "--json"], dest, env))
    assert "errors" not in shown, shown.get("errors")
    definitions = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    assert {name for plot in definitions for name in plot} == set(shown["data"]) == {
        "reports/sweep-lambda.csv", "reports/sweep-lr.csv", "reports/methods.csv", "reports/scope.csv"}
    for plot in definitions:
        (name, props), = plot.items()
        (content,) = [entry["content"] for entry in shown["data"][name]]
        points = content["data"]["values"]
        assert points and all(props["x"] in p and props["y"] in p for p in points), name
        assert content["encoding"]["x"]["field"] == props["x"].replace(".", "\\.")   # a dotted key is no path
    for name in ("reports/sweep-lambda.csv", "reports/sweep-lr.csv"):
        x = shown["data"][name][0]["content"]["encoding"]["x"]
        # A tick per swept value, in the table's order (by value), however the values are spaced.
        assert x["type"] == "ordinal" and x["sort"] is None, x
    lambdas = [(float(p["objective.lambda_sds"]), float(p["winoground/text"]))
               for p in shown["data"]["reports/sweep-lambda.csv"][0]["content"]["data"]["values"]]
    assert lambdas == [(0.0, 0.375), (1e-3, 0.5), (0.1, 0.25)]
    means = {p["variant"]: float(p["winoground/text/mean"])
             for p in shown["data"]["reports/methods.csv"][0]["content"]["data"]["values"]}
    assert means == pytest.approx({"plain": 0.625, "SDS-CLIP": 0.875})
