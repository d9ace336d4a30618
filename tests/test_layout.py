"""The package layout: one `dinodist` namespace, one-way layers, no import cycles, a torch-free driver.

The import graph is built from the source (every `import` statement, those inside functions too,
plus the names a package exports lazily through `core.lazy.lazy_exports`), so a cycle or a wrong
dependency is caught even where no test happens to execute the import.
"""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "teacher", "students", "orchestrator")
NAMESPACE = "dinodist"
RUNTIME = "dinodist.orchestrator.runtime"
# what the rank runtime may read of the driver: the schemas of the files the driver writes
RUNTIME_READS = {"dinodist.orchestrator.topology", "dinodist.orchestrator.planfile"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([NAMESPACE, *parts])


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


MODULES = _modules()


def _imported(path: Path, module: str) -> set[str]:
    """Every module name `path` imports (absolute, relative, in functions, lazy exports)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:
                # `from pkg import sub` imports the submodule pkg.sub when there is one
                names.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod)
        elif (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "lazy_exports"
              and len(node.args) == 2 and isinstance(node.args[1], ast.Dict)):
            names.update(f"{module}.{v.value}" for v in node.args[1].values if isinstance(v, ast.Constant))
    return names


def _graph() -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        deps = set()
        for name in _imported(path, module):
            while name and name not in MODULES:  # `from a.b import C`: the module a.b
                name = name.rpartition(".")[0]
            if name and name != module:
                deps.add(name)
        graph[module] = deps
    return graph


GRAPH = _graph()


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _edges(where, to) -> list[str]:
    return sorted(f"{a} -> {b}" for a, deps in GRAPH.items() if where(a) for b in deps if to(b))


def _in(*prefixes: str):
    return lambda m: any(m == p or m.startswith(p + ".") for p in prefixes)


def test_the_graph_sees_lazy_and_function_level_imports():
    # guards the checker itself: a function-level import and a lazy export are both edges
    assert "dinodist.core.models.vit" in GRAPH["dinodist.core.models"]
    assert "dinodist.core.eval.backbone" in GRAPH["dinodist.orchestrator.commands.eval"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert _cycles(GRAPH) == []


def test_layers_are_one_way():
    ns = NAMESPACE
    assert _edges(_in(f"{ns}.core"), _in(f"{ns}.teacher", f"{ns}.students", f"{ns}.orchestrator")) == []
    assert _edges(_in(f"{ns}.teacher"), _in(f"{ns}.students", f"{ns}.orchestrator")) == []
    assert _edges(_in(f"{ns}.students"), _in(f"{ns}.teacher", f"{ns}.orchestrator")) == []
    driver = lambda m: _in(f"{ns}.orchestrator")(m) and not _in(RUNTIME)(m)
    # the driver never imports the rank runtime (it starts it as a program: launch.RANK_MODULE)
    assert _edges(driver, _in(RUNTIME)) == []
    # the runtime reads the plan the driver wrote; it does not plan, launch, or touch the CLI
    assert _edges(_in(RUNTIME), lambda m: driver(m) and m not in RUNTIME_READS) == []


def test_every_import_is_namespaced():
    bare = []
    for folder in (*PACKAGES, "tests", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    names = [node.module]
                bare += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names
                         if n.split(".")[0] in PACKAGES]
    assert bare == []


def test_pyproject_lists_every_package():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setup = project["tool"]["setuptools"]
    assert setup["package-dir"] == {f"{NAMESPACE}.{p}": p for p in PACKAGES}
    on_disk = sorted(_module_name(p.parent / "__init__.py") for pkg in PACKAGES
                     for p in (ROOT / pkg).rglob("__init__.py"))
    assert sorted(setup["packages"]) == on_disk
    folders = {p.parent for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    assert sorted(str(f.relative_to(ROOT)) for f in folders if not (f / "__init__.py").exists()) == []
    assert project["project"]["scripts"]["dinodist"] == f"{NAMESPACE}.orchestrator.cli:main"


DRIVER = sorted(m for m in MODULES if _in(f"{NAMESPACE}.orchestrator")(m) and not _in(RUNTIME)(m))
NO_TORCH = """
import importlib, sys

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch imported")

sys.meta_path.insert(0, Refuse())
bad = []
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except ImportError as exc:
        bad.append(f"{name}: {exc}")
print("\\n".join(bad))
"""


@pytest.mark.multiproc
def test_driver_imports_no_torch():
    # the CLI, plan and deploy work on a machine without torch; torch loads only inside the
    # functions of the commands that train or evaluate in-process (train, eval, export-teacher)
    assert f"{NAMESPACE}.orchestrator.cli" in DRIVER and f"{NAMESPACE}.orchestrator.commands.plan" in DRIVER
    out = subprocess.run([sys.executable, "-c", NO_TORCH, *DRIVER], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == ""


def test_rank_module_is_the_runtime_entry():
    from dinodist.orchestrator import launch

    assert launch.RANK_MODULE == f"{RUNTIME}.rank" and importlib.util.find_spec(launch.RANK_MODULE)


@pytest.mark.multiproc
def test_installed_names_live_under_dinodist(tmp_path):
    # from outside the repository nothing but `dinodist` is importable
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    ok = subprocess.run(
        [sys.executable, "-c", "import dinodist.core.models, dinodist.teacher, dinodist.students, "
         "dinodist.orchestrator; from dinodist.core.models import build_backbone; "
         "from dinodist.core import losses; print(losses.dino_loss.__module__)"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "dinodist.core.losses.dino"
    for generic in PACKAGES:
        bad = subprocess.run([sys.executable, "-c", f"import {generic}"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode != 0 and "ModuleNotFoundError" in bad.stderr, generic
