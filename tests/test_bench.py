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
    assert len(summary) == 3 and summary[0].startswith("| case | speed |")
    cells = [c.strip() for c in summary[2].strip("|").split("|")]
    assert cells[:3] == ["generate_sd14_b1", "eager", f"{res['median_s']:.3f}"]
    assert cells[4] == f"{res['extra']['s_per_image']:.3f} s/image" and cells[7].startswith("cpu")


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
    assert res["params"]["batch"] == 8 and res["extra"]["s_per_search"] == res["median_s"] / 8
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
    assert subprocess.run(["bash", "-n", script], capture_output=True).returncode == 0
    r = subprocess.run(["bash", script, "everything"], capture_output=True, text=True, env={**os.environ, "OUT": str(tmp_path)})
    assert r.returncode == 2 and "usage: bash benchmarks/device_session.sh {clip-vae|" in r.stderr
    assert not list(tmp_path.iterdir())  # nothing installed or written
