import json
import os
import subprocess
import sys

from lib.paths import REPO_ROOT


def test_harness_times_a_case_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(REPO_ROOT / "benchmarks" / "bench.py"), "--size", "tiny", "--cases",
           "generate_sd14_b1", "--warmup", "1", "--repeats", "1", "--out", str(out)]
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "T2I_COMMIT": "abc1234"}, cwd="/")
    report = json.loads(out.read_text())
    (res,) = report["results"]
    assert res["case"] == "generate_sd14_b1" and res["params"]["batch"] == 1 and res["median_s"] > 0
    assert report["environment"]["torch"] and len(res["warmup_s"]) == 1
    assert "generate_sd14_b1: warm-up 1/1" in proc.stdout  # printed as it happens: a case cut short says how far
    assert report["environment"]["commit"]  # this checkout's, or T2I_COMMIT where there is no .git
    summary = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "bench.py"), "--summarize", str(out)],
                             check=True, capture_output=True, text=True, timeout=120).stdout.splitlines()
    assert len(summary) == 3 and summary[0].startswith("| case | size | speed |")
    cells = [c.strip() for c in summary[2].strip("|").split("|")]
    assert cells[:4] == ["generate_sd14_b1", "tiny", "eager", f"{res['median_s']:.3f}"]  # a tiny run says so
    assert cells[5] == f"{res['extra']['s_per_image']:.3f} s/image" and cells[8].startswith("cpu") and cells[10] == ""


def test_summary_flags_what_makes_a_timing_not_what_its_row_says(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import bench

    fell_back = {"extra": {"compile_counters": {"graph_break": {"a": 2, "b": 1}, "frames": {"total": 9, "ok": 8},
                                                 "inductor": {"cudagraph_skips": 4}},
                           "recompile_limit_hits": 1, "frames_compiled_while_timed": 2}}
    assert bench.flags(fell_back) == ["3 graph breaks", "1 recompile-limit fallbacks", "4 CUDA-graph skips",
                                      "2 frames compiled during the timed runs"]
    assert bench.flags({"error": "OutOfMemoryError: CUDA out of memory", "extra": {}}) == [
        "failed: OutOfMemoryError: CUDA out of memory"]
    overflow = {"extra": {"grad_finite": False, "backward_passes_max": 5}}
    assert bench.flags(overflow) == ["gradient not finite",
                                     "up to 5 backward passes per iteration (float16 overflow)"]
    assert bench.flags({"extra": {"grad_finite": True, "backward_passes_max": 1}}) == []


def test_backward_passes_repeated_in_a_warm_up_are_not_flagged_on_the_timed_runs(monkeypatch):
    """A float16 loss scale backs off in the first calls; only the timed runs' repeats make a row's time longer."""
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import bench
    import torch

    info, calls = {}, []

    def case(ctx):
        def run():
            calls.append(1)
            n = 5 if len(calls) == 1 else 1  # the warm-up overflowed
            info["backward_passes_max"] = max(n, info.get("backward_passes_max", 0))
        return run, {}, info

    monkeypatch.setitem(bench.CASES, "fake_sage", case)
    res = bench.time_case("fake_sage", bench.Context(torch.device("cpu"), torch.float32, "tiny", {}), 1, 2)
    assert len(calls) == 3 and res.extra["backward_passes_max"] == 1 and bench.flags({"extra": res.extra}) == []
    calls.clear()
    info.clear()
    res = bench.time_case("fake_sage", bench.Context(torch.device("cpu"), torch.float32, "tiny", {}), 0, 2)
    assert res.extra["backward_passes_max"] == 5  # no warm-up: the timed run itself repeated them


def test_compiled_timings_need_their_warm_ups():
    """With fewer warm-ups the compilation (or reduce-overhead's CUDA-graph recording) was timed as a run."""
    bench = [sys.executable, str(REPO_ROOT / "benchmarks" / "bench.py"), "--device", "cpu"]
    for extra, msg in ((["--compile", "--warmup", "0"], "--warmup must be >= 1 with --compile"),
                       (["--compile", "--compile-mode", "reduce-overhead", "--warmup", "1"],
                        "--warmup must be >= 2 with --compile --compile-mode reduce-overhead"),
                       (["--repeats", "0"], "--repeats must be >= 1")):
        proc = subprocess.run(bench + extra, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and msg in proc.stderr, proc.stderr
    # a compile mode without --compile would compile nothing and time the eager UNet: refused, naming what is missing
    proc = subprocess.run(bench + ["--compile-mode", "reduce-overhead", "--warmup", "0", "--list"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "--compile-mode reduce-overhead needs --compile" in proc.stderr, proc.stderr


def test_the_commit_comes_from_t2i_commit_without_git(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import bench
    import torch

    monkeypatch.setenv("T2I_COMMIT", "abc1234")
    def no_git(*a, **k):
        raise OSError("no git here")

    monkeypatch.setattr(subprocess, "run", no_git)  # bench imports subprocess inside environment()
    assert bench.environment(torch.device("cpu"))["commit"] == "abc1234"


def test_unknown_case_is_a_clear_error():
    cmd = [sys.executable, str(REPO_ROOT / "benchmarks" / "bench.py"), "--cases", "nope"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown case(s) nope" in proc.stderr


def test_trace_case_runs_on_the_tiny_twin(tmp_path):
    out = tmp_path / "trace.json"
    cmd = [sys.executable, str(REPO_ROOT / "benchmarks" / "bench.py"), "--size", "tiny", "--cases",
           "trace_sd14_unet70", "--warmup", "0", "--repeats", "1", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    (res,) = json.loads(out.read_text())["results"]
    assert res["params"]["layers"] == 70 and res["params"]["steps"] == 4 and res["median_s"] > 0


def _tiny_sage_case(name: str, tmp_path) -> dict:
    """One run (no warm-up) of a SAGE case on the tiny twin, 1 thread; its JSON result."""
    out = tmp_path / "sage.json"
    cmd = [sys.executable, str(REPO_ROOT / "benchmarks" / "bench.py"), "--size", "tiny", "--cases", name,
           "--warmup", "0", "--repeats", "1", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    (res,) = json.loads(out.read_text())["results"]
    return res


def test_batched_sage_case_reports_the_time_per_search(tmp_path):
    res = _tiny_sage_case("sage_latent_iter_b8_steps", tmp_path)
    assert res["params"]["batch"] == 8 and res["extra"]["s_per_search_iteration"] == res["median_s"] / 8
    assert res["extra"]["backward_passes"] == res["extra"]["backward_passes_max"] == 1  # float32: no retry
    assert res["params"]["checkpointing"] == "steps" and res["params"]["vae_slicing"] is True


def test_sage_case_without_checkpointing_runs_one_search(tmp_path):
    res = _tiny_sage_case("sage_latent_iter_k40_nockpt", tmp_path)
    assert res["params"]["checkpointing"] == "none" and "batch" not in res["params"]
    assert (res["params"]["steps"], res["params"]["residual_step"]) == (4, 3) and res["median_s"] > 0


def test_a_case_leaves_nothing_behind_for_the_next():
    """A SAGE case turns on VAE slicing and step checkpointing on the shared twin; the next case (a trace, a
    generation) must get the pipeline back as built, and without the text-only twins of other cases."""
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    import bench
    import torch

    from lib.sampling import step_checkpointing

    bench._register_method_cases()
    ctx = bench.Context(torch.device("cpu"), torch.float32, "tiny")
    res = bench.time_case("sage_latent_iter_b8_steps", ctx, warmup=0, repeats=1)
    pipe = ctx.pipe("sd-v1")
    assert pipe.vae.use_slicing and step_checkpointing(pipe)  # what the case set (the test is not vacuous)
    assert res.warmup_s == [] and res.extra["grad_finite"] is True and res.extra["loss_scale"] == 1.0
    ctx._pipes["sd-v2-text"] = object()
    ctx.reset()
    assert not pipe.vae.use_slicing and not step_checkpointing(pipe) and not pipe.unet.is_gradient_checkpointing
    assert list(ctx._pipes) == ["sd-v1"] and ctx.pipe("sd-v1") is pipe


def test_the_device_session_script_parses_and_refuses_an_unknown_mode(tmp_path):
    """It runs only on the lent GPU box (one call per session): its syntax and its usage line are checked here."""
    script = str(REPO_ROOT / "benchmarks" / "device_session.sh")
    assert subprocess.run(["bash", "-n", script], capture_output=True, timeout=60).returncode == 0
    r = subprocess.run(["bash", script, "everything"], capture_output=True, text=True, env={**os.environ, "OUT": str(tmp_path)},
                       timeout=60)
    assert r.returncode == 2 and "usage: bash benchmarks/device_session.sh {clip-vae|" in r.stderr
    env = {k: v for k, v in os.environ.items() if k != "T2I_COMMIT"}
    r = subprocess.run(["bash", script, "speed"], capture_output=True, text=True, env={**env, "OUT": str(tmp_path)},
                       timeout=60)
    assert r.returncode != 0 and "T2I_COMMIT" in r.stderr  # its JSON would record no commit
    assert not list(tmp_path.iterdir())  # nothing installed or written


def test_the_device_session_both_mode_runs_its_three_cases_in_order(tmp_path):
    """``both`` (one session for the SAGE and the trace target), with python3 replaced by a stub that records each
    call: from another folder, the eager single search, the eager trace, then the single search under CUDA graphs."""
    stub, out = tmp_path / "bin", tmp_path / "out"
    stub.mkdir()
    out.mkdir()
    (stub / "python3").write_text('#!/bin/bash\necho "$PWD | $*" >> "$OUT/calls.txt"\n')
    (stub / "python3").chmod(0o755)
    env = {**os.environ, "OUT": str(out), "T2I_COMMIT": "abc1234", "PATH": f"{stub}:{os.environ['PATH']}"}
    r = subprocess.run(["bash", str(REPO_ROOT / "benchmarks" / "device_session.sh"), "both"], capture_output=True,
                       text=True, env=env, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    calls = (out / "calls.txt").read_text().splitlines()
    assert all(c.startswith(f"{REPO_ROOT} | ") for c in calls), calls  # run from the repo root wherever started
    cases = [c.split("--cases ")[1].split()[0] for c in calls if "--cases" in c]
    assert cases == ["sage_latent_iter_k40_nockpt", "trace_sd14_unet70", "sage_latent_iter_k40_nockpt"], calls
    assert "--compile-mode reduce-overhead" in calls[-1] and "--warmup 2" in calls[-1]
    assert "cut short: none; failed: none" in r.stdout


def test_the_standalone_sage_report_says_where_it_ran(tmp_path):
    """``cases_sage.py --out`` (RESULTS quotes its numbers) records device, dtype, checkpointing, members and the
    environment (versions, commit) at the top, as bench.py's JSON does."""
    out = tmp_path / "sage.json"
    cmd = [sys.executable, str(REPO_ROOT / "benchmarks" / "cases_sage.py"), "--size", "tiny", "--steps", "2",
           "--repeats", "1", "--device", "cpu", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300, cwd=tmp_path,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    report = json.loads(out.read_text())
    assert {k: report[k] for k in ("device", "dtype", "checkpointing", "members")} == dict(
        device="cpu", dtype="torch.float32", checkpointing="none", members="small")
    assert {"torch", "diffusers", "commit"} <= set(report["environment"])
    (row,) = report["iteration"]
    assert row["steps"] == 2 and row["dtype"] == "torch.float32" and row["median_s"] > 0



def test_a_compiled_case_counts_what_torch_does_not(monkeypatch):
    """Recompiles past dynamo's limit (the frame then runs eagerly) and compiles inside the timed runs are flagged from
    what really happens: a function compiled on CPU whose input shape changes on every call."""
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import bench
    import torch
    import torch._dynamo

    ctx = bench.Context(torch.device("cpu"), torch.float32, "tiny", {"compile": True})
    torch._dynamo.reset()
    try:
        f = torch.compile(lambda x: x * 2 + 1, backend="eager", dynamic=False)
        n = iter(range(1, 100))
        monkeypatch.setitem(bench.CASES, "reshaping", lambda ctx: ((lambda: f(torch.ones(next(n)))), {}, {}))
        with torch._dynamo.config.patch(recompile_limit=1):  # not monkeypatch: its undo hides a config entry
            res = bench.time_case("reshaping", ctx, 1, 2)
        flags = bench.flags({"extra": res.extra})
        assert res.extra["recompile_limit_hits"] == 1 and res.extra["frames_compiled_while_timed"] >= 1, res.extra
        assert "1 recompile-limit fallbacks" in flags, flags
        torch._dynamo.reset()
        g = torch.compile(lambda x: x * 2 + 1, backend="eager", dynamic=False)  # one shape: compiled in the warm-up
        monkeypatch.setitem(bench.CASES, "steady", lambda ctx: ((lambda: g(torch.ones(3))), {}, {}))
        res = bench.time_case("steady", ctx, 1, 2)
        assert bench.flags({"extra": res.extra}) == [] and res.extra["frames_compiled_while_timed"] == 0
    finally:
        torch._dynamo.reset()


def test_a_case_killed_mid_way_leaves_its_warm_ups_in_the_json(tmp_path):
    """A compiled case cut off by the device call's limit used to write nothing: its compile time was lost."""
    import signal
    import time

    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(REPO_ROOT / "benchmarks" / "bench.py"), "--size", "tiny", "--cases",
           "generate_sd14_b1", "--warmup", "1", "--repeats", "10000", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "T2I_COMMIT": "abc1234"})
    try:
        deadline = time.time() + 240
        while time.time() < deadline:  # until the file shows a timed run: then the process is killed mid-case
            try:
                if json.loads(out.read_text())["unfinished"]["times_s"]:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    report = json.loads(out.read_text())
    cut = report["unfinished"]
    assert report["results"] == [] and cut["case"] == "generate_sd14_b1" and len(cut["warmup_s"]) == 1
    assert cut["times_s"], cut  # timed runs finished before the kill are kept
    summary = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "bench.py"), "--summarize", str(out)],
                             check=True, capture_output=True, text=True, timeout=120).stdout.splitlines()
    assert len(summary) == 3 and "| generate_sd14_b1 | tiny | eager | cut short |" in summary[2], summary


def test_a_case_that_raises_is_summarised_as_failed_not_cut_short(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import bench
    import pytest

    def boom(ctx):
        def run():
            raise RuntimeError("out of memory\nmore lines")
        return run, {}, {}

    monkeypatch.setitem(bench.CASES, "boom", boom)
    out = tmp_path / "b.json"
    with pytest.raises(RuntimeError, match="out of memory"):
        bench.main(["--size", "tiny", "--device", "cpu", "--cases", "boom", "--warmup", "1", "--out", str(out)])
    cut = json.loads(out.read_text())["unfinished"]
    assert cut["case"] == "boom" and cut["error"] == "RuntimeError: out of memory" and cut["warmup_s"] == []
    (row,) = bench.summary_rows([out])[2:]
    assert "| boom | tiny | eager | failed |" in row and "failed: RuntimeError: out of memory" in row, row
