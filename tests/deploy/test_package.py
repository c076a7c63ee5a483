"""The installed package: one import name of its own, layers that point down, a CLI that works anywhere.

Once a dependency (transformers 5.25, through Hugging Face's `kernels` distribution) installed
a top-level package named like one of ours, and every model load broke on a clean machine.
So: the project installs exactly one top-level name, `rlhf_loop`, and no other distribution
in the environment installs it; inside it the layers import only downwards
(docs/architecture.md, "One import package"); and the CLI runs from any directory.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from importlib.metadata import distribution, packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "rlhf_loop"

# layer -> the layers it may import (besides itself). service and trainer never import each other.
MAY_IMPORT = {
    "core": set(),
    "kernels": set(),
    "service": {"core"},
    "trainer": {"core", "kernels"},
    "app": {"core", "kernels", "service", "trainer"},
}


def top_level_names(dist_name: str) -> set[str]:
    """The import names a distribution puts at the top of site-packages (from its RECORD, as
    packages_distributions() reads it; an editable install's finder maps the same name)."""
    return {name for name, dists in packages_distributions().items() if dist_name in dists}


def test_the_project_installs_one_import_name_and_nothing_else_installs_it():
    ours = top_level_names(distribution("rlhf-loop").metadata["Name"])
    assert ours == {"rlhf_loop"}, ours
    for name in ours:
        others = set(packages_distributions()[name]) - {"rlhf-loop"}
        assert not others, f"{name} is also installed by {sorted(others)}"


def test_no_generic_top_level_name_is_left_in_the_checkout():
    """The repository's top holds no importable package but rlhf_loop (a `kernels/` or `service/`
    there would shadow a dependency's package for anything run from the checkout)."""
    packages = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages <= {"rlhf_loop", "tests"}, packages


def imports(file: Path, modules: set[str]) -> set[str]:
    """The modules of `modules` a file imports, lazy imports inside functions included
    (`from pkg import mod` imports the module mod; `from pkg.mod import name` the module pkg.mod)."""
    found = set()
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                      for a in node.names}
    return found & modules


def module_name(file: Path) -> str:
    parts = file.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_graph() -> dict[str, set[str]]:
    """module -> the project's modules it imports."""
    files = {module_name(f): f for f in PACKAGE.rglob("*.py")}
    return {m: imports(f, set(files)) - {m} for m, f in files.items()}


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in MAY_IMPORT else None


def test_layers_import_only_downwards():
    wrong = [f"{m} ({layer(m)}) imports {i} ({layer(i)})"
             for m, targets in project_graph().items() for i in targets
             if layer(m) and layer(i) and layer(i) != layer(m) and layer(i) not in MAY_IMPORT[layer(m)]]
    assert wrong == []


def test_no_module_imports_by_string():
    """An import by name in a string (importlib, __import__) would hide an arrow from the test above."""
    offenders = [str(f.relative_to(ROOT)) for f in PACKAGE.rglob("*.py")
                 if "import_module(" in f.read_text() or "__import__(" in f.read_text()]
    assert offenders == []


def test_no_import_cycles():
    graph = project_graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(" -> ".join(path[path.index(n):] + [n]) if n in path else f"{m} -> {n}")
            elif n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_the_cli_runs_outside_the_checkout(tmp_path):
    """The console script from a directory with nothing of the project in it: the installed package
    is what it imports (there a bare `kernels` would be Hugging Face's)."""
    rlhf = Path(sys.executable).parent / "rlhf"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for command in (["train", "--help"], ["serve", "--help"], ["model", "import", "--help"]):
        out = subprocess.run([str(rlhf), *command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, f"rlhf {' '.join(command)}: {out.stdout}{out.stderr}"
        assert "usage: rlhf" in out.stdout


def test_transformers_loads_its_own_kernels_inside_the_checkout():
    """Run from the repository root, where `.` is on the path: transformers' `from kernels import ...`
    must find Hugging Face's package, not a folder of ours."""
    code = "from transformers import AutoConfig; print(AutoConfig.for_model('llama').model_type)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "llama", out.stderr


def test_pip_check_is_clean():
    """Every installed distribution's requirements are met by what the lock installed."""
    out = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
