"""Every third-party module the project imports is declared in pyproject.toml.

A module that is only installed by hand (or only arrives as some other package's dependency)
works on a developer's machine and breaks on a clean clone: LoRA once failed in CI because
`peft` was imported (lazily, inside a function) but never declared. This reads every import
statement, nested ones included, so a lazy import counts as much as a top-level one:
the runtime packages against `[project] dependencies`, tests and benches against those plus
the `dev` extra.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUNTIME = ["rlhf_loop"]
LOCAL = set(RUNTIME) | {"tests", "bench"}


def imported_modules(paths: list[Path]) -> dict[str, str]:
    """top-level module name -> one file importing it, for every absolute import under `paths`."""
    found: dict[str, str] = {}
    for path in paths:
        for file in sorted(path.rglob("*.py")):
            for node in ast.walk(ast.parse(file.read_text(), str(file))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.partition(".")[0], str(file.relative_to(ROOT)))
    return found


def third_party(found: dict[str, str], local: set[str]) -> dict[str, str]:
    siblings = {p.stem for d in ("tests", "bench") for p in (ROOT / d).rglob("*.py")}  # helpers on sys.path
    return {m: f for m, f in found.items() if m not in sys.stdlib_module_names and m not in local | siblings}


def declared(*groups: str) -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for g in groups:
        reqs += project["optional-dependencies"][g]
    return {normalize(re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0]) for r in reqs}


def normalize(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def undeclared(modules: dict[str, str], allowed: set[str]) -> list[str]:
    dists = packages_distributions()
    missing = []
    for module, file in sorted(modules.items()):
        providers = {normalize(d) for d in dists.get(module, [])}
        if not providers:
            missing.append(f"{module} (imported by {file}) is not installed at all")
        elif not providers & allowed:
            missing.append(f"{module} (imported by {file}) comes from {sorted(providers)}, not declared")
    return missing


def test_the_runtime_packages_import_only_declared_distributions():
    modules = third_party(imported_modules([ROOT / p for p in RUNTIME]), LOCAL)
    assert {"torch", "transformers", "peft", "bentoml"} <= set(modules)  # the scan sees lazy imports too
    assert undeclared(modules, declared()) == []


def test_tests_and_benches_import_only_declared_distributions():
    modules = third_party(imported_modules([ROOT / "tests", ROOT / "bench"]), LOCAL)
    assert undeclared(modules, declared("dev")) == []
