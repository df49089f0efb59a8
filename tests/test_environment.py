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


def test_constraints_pin_every_direct_dependency():
    pins = {_norm(l.split("==")[0]) for l in (REPO_ROOT / "constraints.txt").read_text().splitlines()
            if "==" in l}
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + sum(project["optional-dependencies"].values(), [])
    names = {_norm(re.split(r"[<>=!~ ]", r)[0]) for r in reqs}
    assert names <= pins, f"unpinned: {sorted(names - pins)}"
