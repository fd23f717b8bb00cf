"""Each DVC stage lists the code it runs: a stage that misses a module it imports would not
re-run when that module changes, and one that lists all of `pipeline/` re-runs for any edit.

Coverage is computed from every import statement (also those inside functions) reachable
from the stage's entry point, so a lazily imported loader counts too.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
PACKAGES = ("pipeline", "stages")


def module_file(name: str) -> Path | None:
    base = REPO.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_names(path: Path) -> set[str]:
    package = list(path.relative_to(REPO).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            parts = (package[: len(package) - node.level + 1] if node.level else []) + (node.module or "").split(".")
            base = ".".join(p for p in parts if p)
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}   # `from pkg import module`
    return {n for n in names if n.split(".")[0] in PACKAGES}


def reachable_files(module: str) -> set[Path]:
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # parent packages run first
        path = module_file(name)
        if path is not None and path not in seen:
            seen.add(path)
            todo.extend(imported_names(path))
    return seen


def has_code(path: Path) -> bool:
    body = ast.parse(path.read_text()).body
    return not all(isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in body)


def covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(REPO)
    return any(rel == Path(dep) or Path(dep) in rel.parents for dep in deps)


def entry_module(cmd: str) -> str:
    words = cmd.split()
    assert words[:2] == ["python", "-m"], f"stage command {cmd!r} is not `python -m stages.<name>`"
    return words[2]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_deps_cover_the_code_it_imports(stage):
    spec = STAGES[stage]
    deps = spec["deps"]
    missing = sorted(str(p.relative_to(REPO)) for p in reachable_files(entry_module(spec["cmd"]))
                     if has_code(p) and not covered(p, deps))
    assert not missing, f"stage {stage} imports code its deps do not list: {missing}"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_code_deps_exist_and_are_used(stage):
    spec = STAGES[stage]
    code = {p.relative_to(REPO) for p in reachable_files(entry_module(spec["cmd"]))}
    for dep in spec["deps"]:
        path = Path(dep)
        assert (REPO / path).exists() or path.parts[0] not in PACKAGES, f"{stage}: dep {dep} does not exist"
        if path.parts[0] in PACKAGES and path.suffix not in ("", ".py"):   # data a module beside it reads
            assert any(p.parent == path.parent and path.name in (REPO / p).read_text() for p in code), \
                f"{stage}: dep {dep} is read by no module the stage imports"
        elif path.parts[0] in PACKAGES:   # a code dep the stage never imports re-runs it for nothing
            assert any(p == path or path in p.parents for p in code), f"{stage}: dep {dep} is not imported"


def test_reachability_follows_lazy_imports():
    # pipeline.models.build imports pipeline.models.paper inside a function, for pretrained models only
    files = {p.relative_to(REPO) for p in reachable_files("stages.models")}
    assert Path("pipeline/models/paper.py") in files
    assert Path("pipeline/sweep/driver.py") not in files


@pytest.mark.parametrize("stage", ["models", "cache"])
def test_an_edit_of_the_scores_or_the_reports_reruns_neither_models_nor_cache(stage):
    """The teacher (7 minutes on the toy profile, Stable Diffusion's import on the paper's) and its
    cache depend on neither the metrics nor the report code, by import or by listed dep."""
    code = {p.relative_to(REPO) for p in reachable_files(entry_module(STAGES[stage]["cmd"]))}
    for module in ("pipeline/metrics.py", "pipeline/report.py", "pipeline/evaluate.py"):
        assert Path(module) not in code, f"{stage} imports {module}"
        assert not covered(REPO / module, STAGES[stage]["deps"]), f"{stage} lists {module}"


def test_the_cache_does_not_rerun_for_the_trainer():
    """The cache stage reads the models folder's layout (`pipeline.models`), not the code that builds
    the models: an edit of the training loop re-encodes no latent."""
    code = {p.relative_to(REPO) for p in reachable_files(entry_module(STAGES["cache"]["cmd"]))}
    for module in ("pipeline/train.py", "pipeline/objectives.py", "pipeline/teacher_training.py"):
        assert Path(module) not in code and not covered(REPO / module, STAGES["cache"]["deps"]), module


def test_every_sweep_file_is_a_dep_of_the_sweep_stage():
    """The files are listed one by one (a `sweeps` folder dep beside the `sweeps` param breaks `dvc exp
    show --only-changed`), so a new one must be added to the list to re-run the stage when it changes."""
    files = {str(p.relative_to(REPO)) for p in (REPO / "sweeps").glob("*.yaml")}
    assert files and files <= set(STAGES["sweep"]["deps"]), sorted(files - set(STAGES["sweep"]["deps"]))
