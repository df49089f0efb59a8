"""environment.yml (conda users) must list the same dependencies as pyproject.toml (pip users)."""

import re
import tomllib

import yaml

from lib.paths import REPO_ROOT


def _norm(req: str) -> str:
    return re.sub(r"\s+", "", req).lower().replace("_", "-")


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    wanted = set(project["dependencies"])
    for extra in ("notebooks", "dev"):
        wanted |= set(project["optional-dependencies"][extra])
    env = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = {p for p in pip if not p.startswith("-e")}
    assert {_norm(p) for p in listed} == {_norm(p) for p in wanted}
    assert f"python{project['requires-python']}" in env["dependencies"]  # a bound, as pip's (it pinned 3.11)


def test_constraints_pin_every_direct_dependency():
    pins = {_norm(l.split("==")[0]) for l in (REPO_ROOT / "constraints.txt").read_text().splitlines()
            if "==" in l}
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + sum(project["optional-dependencies"].values(), [])
    names = {_norm(re.split(r"[<>=!~ ]", r)[0]) for r in reqs}
    assert names <= pins, f"unpinned: {sorted(names - pins)}"


def test_every_third_party_import_of_lib_is_declared():
    """A package ``lib`` imports must be declared, not arrive through another one's dependencies (huggingface_hub and
    tokenizers came with transformers before they were declared)."""
    import ast
    import importlib.metadata as md
    import sys

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + sum(project["optional-dependencies"].values(), [])
    declared = {_norm(re.split(r"[<>=!~ ]", r)[0]) for r in reqs}
    via = {"ipython": "ipykernel"}  # IPython (display helpers) is part of the notebooks extra's kernel
    modules = set()
    for f in (REPO_ROOT / "lib").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                modules |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    dists = md.packages_distributions()
    third = sorted(m for m in modules if m not in sys.stdlib_module_names and m != "lib")
    assert "huggingface_hub" in third and "tokenizers" in third  # the scan sees the imports it must check
    missing = {m: dists.get(m) for m in third
               if not any(_norm(d) in declared or via.get(_norm(d)) in declared for d in dists.get(m, []))}
    assert not missing, f"imported by lib but not declared in pyproject.toml: {missing}"
