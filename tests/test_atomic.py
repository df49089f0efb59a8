"""Atomic result files (lib.atomic): whole or absent, and a killed writer's temporary file cleaned up."""

import json
import os
import time
from pathlib import Path

import pandas as pd
import pytest

from lib.atomic import HOST, remove_stale_tmp, tmp_path, write_csv_atomic, write_parquet_atomic, write_text_atomic


def test_writes_are_fsynced_renamed_and_leave_no_temporary_file(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    df = pd.DataFrame(dict(a=[1, 2], b=["x", "y"]))
    write_parquet_atomic(df, tmp_path / "t.parquet")
    assert len(synced) == 2  # the file, then the folder that holds the new name
    write_csv_atomic(df, tmp_path / "t.csv")
    write_text_atomic("ünï\n", tmp_path / "sub" / "t.md")
    assert pd.read_parquet(tmp_path / "t.parquet").equals(df) and pd.read_csv(tmp_path / "t.csv").equals(df)
    assert (tmp_path / "sub" / "t.md").read_text(encoding="utf-8") == "ünï\n"
    assert not list(tmp_path.rglob(".*.tmp"))
    a, b = tmp_path_of(tmp_path), tmp_path_of(tmp_path)
    assert a != b and a.parent == tmp_path and a.name.startswith(".t.parquet.") and f"{os.getpid()}@{HOST}" in a.name


def tmp_path_of(folder):
    return tmp_path(folder / "t.parquet")


def test_stale_tmp_files_of_dead_writers_are_removed(tmp_path, dead_pid):
    pid = dead_pid
    stale = [tmp_path_of(tmp_path).with_name(f".t.parquet.{pid}@{HOST}.0123456789ab.tmp"),  # today's names
             tmp_path / f".unet_s0_x.parquet.{pid}@{HOST}.tmp",  # tracing's before the random suffix
             tmp_path / f".unet_00000_s0_y.parquet.{pid}.tmp",  # tracing's oldest, host-less
             tmp_path / f".latent_lose_cat_0_k.safetensors.{pid}.a1b2c3d4e5f6.tmp"]  # SAGE's before the host
    live = [tmp_path / f".unet_s0_z.parquet.{os.getppid()}@{HOST}.tmp",  # a live process (pytest's parent)
            tmp_path / f".unet_s0_w.parquet.{pid}@some-other-host.tmp",  # another machine's: never touched
            tmp_path / f".r.parquet.{os.getppid()}.123456789012.tmp",  # a live SAGE writer whose suffix is all digits
            tmp_path / f".notes.{pid}.txt"]  # not a temporary file
    recent = tmp_path / f".t.parquet.{pid}@{HOST}.0123456789ac.tmp"  # a dead pid, but written a moment ago
    for f in stale + live + [recent]:
        f.write_bytes(b"partial")
        if f != recent:
            os.utime(f, (time.time() - 120, time.time() - 120))  # not written for two minutes
    assert sorted(remove_stale_tmp(tmp_path)) == sorted(stale)
    assert all(f.exists() for f in live + [recent]) and not any(f.exists() for f in stale)
    assert remove_stale_tmp(tmp_path, min_age_s=0) == [recent]


def test_a_writer_this_user_may_not_signal_is_alive(tmp_path, monkeypatch, dead_pid):
    """os.kill(pid, 0) on another user's live process raises PermissionError: its file is being written."""
    other = tmp_path / f".t.parquet.{dead_pid}@{HOST}.0123456789ab.tmp"  # a pid no process of ours has
    other.write_bytes(b"partial")
    os.utime(other, (time.time() - 120, time.time() - 120))

    def kill(pid, sig):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "kill", kill)
    assert remove_stale_tmp(tmp_path) == [] and other.exists()


def test_an_interrupted_write_keeps_the_old_file(tmp_path):
    write_text_atomic("old", tmp_path / "t.md")

    class Bad(pd.DataFrame):
        def to_csv(self, *a, **k):
            open(a[0], "w").write("half")
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_csv_atomic(Bad(dict(a=[1])), tmp_path / "t.md")
    assert (tmp_path / "t.md").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["t.md"]


def test_lib_writes_result_files_only_through_lib_atomic():
    """A result file written straight onto its final path is torn by a kill mid-write (and a fixed temporary name is
    shared by two writers): every such write in ``lib`` goes through ``lib.atomic``. Model folders written by
    ``save_pretrained`` (several files, rebuilt by rerunning the training) are the listed exception."""
    import re

    from lib.paths import REPO_ROOT

    direct = re.compile(r"\.(to_csv|to_parquet|write_text|write_bytes|savefig|save)\(|(?<![\w.])save_file\(|"
                        r"json\.dump\(|torch\.save\(|open\([^)]*[\"'][wa]b?[\"']")
    # the writer passed to write_atomic, lib.atomic's own helpers, and save_edited_model's files inside the temporary
    # folder it renames into place when everything is written
    allowed = re.compile(r"lambda tmp|def write_|edit\.save\(tmp /")
    found = []
    for f in sorted((REPO_ROOT / "lib").rglob("*.py")):
        for n, line in enumerate(f.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if direct.search(code) and not allowed.search(code) and not code.lstrip().startswith("from "):
                found.append(f"{f.relative_to(REPO_ROOT)}:{n}: {line.strip()}")
    found = [x for x in found if not x.startswith("lib/atomic.py")]
    assert not found, "non-atomic writes:\n" + "\n".join(found)


def test_save_pretrained_atomic_replaces_file_by_file_and_leaves_the_old_files_on_failure(tmp_path, monkeypatch):
    """save_pretrained writes in place: a kill mid-save tore a finished stage's weights. Through a temporary folder,
    a failed save leaves the old files as they were, and a finished one equals a plain save_pretrained."""
    from lib.atomic import save_pretrained_atomic
    from lib.tokenizer import build_clip_tokenizer

    class Model:
        def __init__(self, tag: str, fail: bool = False):
            self.tag, self.fail = tag, fail

        def save_pretrained(self, folder, **kwargs):
            (folder / "sub").mkdir(parents=True)
            (folder / "sub" / "weights.safetensors").write_text(self.tag)
            if self.fail:
                raise RuntimeError("killed mid-save")
            (folder / "config.json").write_text(json.dumps({"tag": self.tag, **kwargs}))

    out = tmp_path / "model"
    renamed, replace = [], os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: renamed.append(Path(dst).name) or replace(src, dst))
    save_pretrained_atomic(Model("old"), out, safe_serialization=True)
    assert renamed == ["weights.safetensors", "config.json"]  # weights first: a kill leaves no new config on old weights
    assert (out / "sub" / "weights.safetensors").read_text() == "old"
    assert json.loads((out / "config.json").read_text()) == {"tag": "old", "safe_serialization": True}
    with pytest.raises(RuntimeError, match="killed mid-save"):
        save_pretrained_atomic(Model("new", fail=True), out)
    assert (out / "sub" / "weights.safetensors").read_text() == "old"  # untouched: the new one stayed in the temp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folder left behind
    tok = build_clip_tokenizer()
    plain, atomic = tmp_path / "plain", tmp_path / "atomic"
    tok.save_pretrained(plain)
    save_pretrained_atomic(tok, atomic)
    files = sorted(p.relative_to(plain) for p in plain.rglob("*"))
    assert files == sorted(p.relative_to(atomic) for p in atomic.rglob("*"))
    assert all((plain / f).read_bytes() == (atomic / f).read_bytes() for f in files if (plain / f).is_file())
