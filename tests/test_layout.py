"""The layout's rules, read off every module's imports (no module is imported).

- Dependencies point one way: jobs -> pipeline -> adarevd.
- Ray only in `pipeline/deblur/ray/`, `pipeline/cluster/`, `pipeline/train/ray_train.py` and the job
  client of `jobs/submit.py`; fsspec only where storage is reached (`pipeline/store/`, the shard reader,
  ingest's sources). The model library imports neither.
- No import cycles between modules.
- No function in `pipeline/` or `jobs/` takes more than 6 parameters (`self` and `cls` aside): more
  context travels as a frozen dataclass (`ShardTask`, `WorkerRun`, `AssembleOptions`).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("adarevd", "pipeline", "jobs")
ALLOWED = {
    "ray": ("pipeline/deblur/ray/", "pipeline/cluster/", "pipeline/train/ray_train.py", "jobs/submit.py"),
    "fsspec": ("pipeline/store/", "pipeline/formats/shards.py", "pipeline/ingest/sources.py"),
}
LAYERS = {"adarevd": set(), "pipeline": {"adarevd"}, "jobs": {"adarevd", "pipeline"}}


def modules() -> Iterator[tuple[str, Path]]:
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path


def imports(path: Path) -> set[str]:
    """Every module the file imports, at any depth (inside functions too). `from package import name`
    imports the submodule where one has that name, else the package."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if _is_module(submodule) else node.module)
    return found


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def test_ray_and_fsspec_are_imported_only_at_the_edges() -> None:
    wrong = []
    for _, path in modules():
        rel = path.relative_to(ROOT).as_posix()
        for library, places in ALLOWED.items():
            used = {name for name in imports(path) if name.split(".")[0] == library}
            if used and not rel.startswith(places):
                wrong.append(f"{rel} imports {sorted(used)[0]}")
    assert not wrong, "; ".join(wrong)


def test_dependencies_point_one_way() -> None:
    wrong = []
    for name, path in modules():
        top = name.split(".")[0]
        for other in imports(path):
            target = other.split(".")[0]
            if target in PACKAGES and target != top and target not in LAYERS[top]:
                wrong.append(f"{name} imports {other}")
    assert not wrong, "; ".join(wrong)


def test_no_import_cycles() -> None:
    known = dict(modules())
    graph = {name: {m for m in imports(path) if m in known and m != name} for name, path in known.items()}
    cycles, state = [], {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for other in sorted(graph[name]):
            if state.get(other) == "open":
                cycles.append(" -> ".join([*trail[trail.index(other) :], other]))
            elif other not in state:
                visit(other, [*trail, other])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "; ".join(cycles)


MAX_PARAMETERS = 6


def parameter_counts(path: Path) -> Iterator[tuple[str, int]]:
    """(function name and line, parameters) of every function in the file, nested ones too."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            a = node.args
            named = [p.arg for p in [*a.posonlyargs, *a.args, *a.kwonlyargs] if p.arg not in ("self", "cls")]
            yield f"{node.name} (line {node.lineno})", len(named) + bool(a.vararg) + bool(a.kwarg)


def test_no_long_parameter_lists_in_the_dataflow_and_the_jobs() -> None:
    long = [
        f"{path.relative_to(ROOT)}: {name} takes {count}"
        for module, path in modules()
        if module.startswith(("pipeline", "jobs"))
        for name, count in parameter_counts(path)
        if count > MAX_PARAMETERS
    ]
    assert not long, "; ".join(long)


def test_the_rules_see_what_they_check() -> None:
    # The walk finds the modules and the imports it judges (a rule over nothing would always pass).
    names = dict(modules())
    assert {"adarevd.model", "pipeline.deblur.ray.driver", "pipeline.store.storage", "jobs.cli"} <= set(names)
    assert "ray" in imports(names["pipeline.deblur.ray.driver"])
    assert "fsspec" in imports(names["pipeline.store.storage"])
    assert "jobs.submit" in imports(names["jobs.cli"])
    counts = dict(parameter_counts(names["pipeline.deblur.shard"]))
    assert next(n for name, n in counts.items() if name.startswith("process_shard ")) == 6


def test_job_configs_and_shard_workers_load_without_torch() -> None:
    # They name the model's modes (adarevd.modes) and read its config; torch stays out of their processes.
    code = (
        "import sys, pipeline.deblur.job, pipeline.deblur.ray.workers, adarevd.config, adarevd.modes; "
        "print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
