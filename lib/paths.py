"""Where things live: the repository root, committed data, default output folders."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT / "data"
TOY_DIR = DATA_DIR / "toy"
FIGURES_DIR = REPO_ROOT / "figures"
# Default output root of the notebooks; `make test`/`make notebooks-update` point it at a fresh temporary folder so
# that checked outputs never depend on (or resume from) earlier runs.
RUNS_DIR = Path(os.environ.get("T2I_RUNS_DIR") or REPO_ROOT / "runs")


def from_repo_root(path: str | Path) -> str:
    """``path`` as a command run from the repo root names it: relative when inside the repo (no machine path in a
    printed command), else absolute."""
    p = Path(path).expanduser().resolve()
    return str(p.relative_to(REPO_ROOT)) if p.is_relative_to(REPO_ROOT) else str(p)


def shell_path(path: str | Path) -> str:
    """``path`` quoted for a printed shell command with no machine path in it: relative when inside the repo,
    ``"$T2I_RUNS_DIR"/...`` when inside the runs folder that variable names (``make test`` / ``make notebooks-update``
    point it at a temporary folder), else absolute."""
    import shlex

    p = Path(path).expanduser().resolve()
    runs = os.environ.get("T2I_RUNS_DIR")
    if runs and p.is_relative_to(Path(runs).expanduser().resolve()) and not p.is_relative_to(REPO_ROOT):
        rest = p.relative_to(Path(runs).expanduser().resolve())
        return '"$T2I_RUNS_DIR"' + ("/" + shlex.quote(str(rest)) if str(rest) != "." else "")
    return shlex.quote(from_repo_root(p))


def in_repo(path: str | Path) -> Path:
    """``path`` with ``~`` expanded, a relative one taken from the repo root (where the README's commands run; papermill
    runs the notebooks in ``notebooks/``)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else REPO_ROOT / p


def output_dir(path: str | Path | None, default_name: str) -> Path:
    """Resolve a notebook's output folder (relative paths are taken from the repo root) and create it."""
    out = RUNS_DIR / default_name if path in (None, "") else in_repo(path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def resolve_toy_folder(value: str | Path | None = None) -> Path:
    """A toy-world folder: ``None`` or ``"toy"`` → ``data/toy``; else the path, absolute, where it exists from the
    working directory, otherwise taken from the repo root (as :func:`lib.loading.describe_source` finds a model)."""
    if value in (None, "", "toy"):
        return TOY_DIR
    path = Path(value).expanduser()
    return path.absolute() if path.exists() else in_repo(path)
