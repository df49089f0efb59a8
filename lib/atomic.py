"""Atomic result files: every finished item of a sweep, search or measurement is written whole or not at all.

:func:`write_atomic` writes into a temporary file beside the target (``.<name>.<pid>@<host>.<random>.tmp``: unique
to this writer), fsyncs it, renames it over the target and fsyncs the folder, so a killed run leaves either the old
file or the new one, never a torn one. A writer killed mid-write (SIGKILL, power loss) leaves its temporary file:
:func:`remove_stale_tmp` deletes those of dead processes on this machine when a run resumes in the folder.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch

HOST = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname()) or "host"
# Temporary names, newest first: .<name>.<pid>@<host>[.<hex>].tmp; SAGE's older .<name>.<pid>.<hex12>.tmp; tracing's
# oldest, host-less .<name>.<pid>.tmp (the two host-less forms: this machine's). The first that matches decides.
_TMP_NAMES = (re.compile(r"\..+\.(?P<pid>\d+)@(?P<host>[A-Za-z0-9_-]+)(?:\.[0-9a-f]+)?\.tmp"),
              re.compile(r"\..+\.(?P<pid>\d+)\.[0-9a-f]{12}\.tmp"),
              re.compile(r"\..+\.(?P<pid>\d+)\.tmp"))


def tmp_path(path: Path) -> Path:
    """The temporary file :func:`write_atomic` writes ``path`` through: beside it, named after this process, this
    machine and a random suffix (two writers never share one)."""
    return path.with_name(f".{path.name}.{os.getpid()}@{HOST}.{secrets.token_hex(6)}.tmp")


def write_atomic(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Write ``path`` through ``write(tmp)``: a temporary file in the same folder (:func:`tmp_path`; created by
    ``write``, so with the usual permissions), flushed to disk (fsync) and renamed over ``path``, then the folder
    fsynced where the OS allows. An interrupted or failed write leaves ``path`` as it was and no temporary file
    (a killed process leaves one: :func:`remove_stale_tmp`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:  # the writer closed it: its data may still sit in the OS cache
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def save_pretrained_atomic(obj, folder: str | Path, **kwargs) -> Path:
    """``obj.save_pretrained(folder, **kwargs)`` (a diffusers / transformers model, pipeline or tokenizer), file by
    file atomically: everything is written into a temporary folder beside ``folder`` (``.<name>.<pid>@<host>.<hex>
    .tmpdir``), each file fsynced and renamed over its target, weights before configs. ``save_pretrained`` itself
    writes in place, so a run killed while it re-saves a finished stage's weights (the toy world's UNet stage re-saves
    the whole pipeline at every checkpoint) left them torn. A killed run leaves the temporary folder (git-ignored)."""
    import shutil

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(folder).with_suffix(".tmpdir")
    try:
        obj.save_pretrained(tmp, **kwargs)
        files = sorted((p for p in tmp.rglob("*") if p.is_file()), key=lambda p: (p.suffix == ".json", str(p)))
        for src in files:
            dst = folder / src.relative_to(tmp)
            dst.parent.mkdir(parents=True, exist_ok=True)
            with open(src, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(src, dst)
            _fsync_dir(dst.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def write_text_atomic(text: str, path: str | Path) -> Path:
    """``text`` (UTF-8) to ``path`` atomically (:func:`write_atomic`)."""
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_parquet_atomic(df, path: str | Path) -> Path:
    """A pandas DataFrame to ``path`` (parquet, no index) atomically (:func:`write_atomic`)."""
    return write_atomic(path, lambda tmp: df.to_parquet(tmp, index=False))


def write_csv_atomic(df, path: str | Path, index: bool = False) -> Path:
    """A pandas DataFrame to ``path`` (CSV) atomically (:func:`write_atomic`)."""
    return write_atomic(path, lambda tmp: df.to_csv(tmp, index=index))


def write_safetensors_atomic(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> Path:
    """``tensors`` (moved to the CPU) and string ``metadata`` to ``path`` atomically (:func:`write_atomic`)."""
    from safetensors.torch import save_file

    cpu = {k: t.detach().cpu().contiguous() for k, t in tensors.items()}
    return write_atomic(path, lambda tmp: save_file(cpu, str(tmp), metadata=metadata))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


STALE_AFTER_S = 60.0  # a writer writes and renames its temporary file within seconds


def remove_stale_tmp(folder: str | Path, min_age_s: float = STALE_AFTER_S) -> list[Path]:
    """Delete the temporary files of killed writers in ``folder``: this machine's (or host-less) ones whose process is
    gone and that nothing has written for ``min_age_s`` seconds. Live writers' files, other machines' (a shared
    folder), files of other names and recent ones are left alone: a process of another container that shares this
    host name and the folder but not the pid numbers may be writing it (a recent killed writer's file goes at the
    next resume)."""
    removed, now = [], time.time()
    for f in Path(folder).glob(".*.tmp"):
        m = next((m for m in (p.fullmatch(f.name) for p in _TMP_NAMES) if m), None)
        if m is None or m.groupdict().get("host") not in (None, HOST):
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or _pid_alive(pid):
            continue
        try:
            if now - f.stat().st_mtime < min_age_s:
                continue
        except FileNotFoundError:  # renamed or removed meanwhile
            continue
        f.unlink(missing_ok=True)
        removed.append(f)
    return removed


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
