"""Notebook 01's latent searches as units of work (lib.sage.campaign): the units cover every search once, processes
launched with accelerate write exactly the files the notebook resumes from, and a bad parameters file fails in one
line before anything loads."""

import json
import shlex
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from lib.params import ParameterError
from lib.paths import REPO_ROOT
from lib.sage import campaign


def params(**over):
    values = dict(MODEL="toy", DEVICE="cpu", DTYPE="float32", CHECKPOINTING=None, CLASSES=["cat"],
                  PROMPT_TEMPLATE="a photo of a {cls}", MODES=["type1"], SEEDS=[0, 1], STEPS=2, GUIDANCE=4.0,
                  BATCH_SIZE=1, ITERATIONS=1, STEP_SIZE=0.05, DELTA_MAX=1.0, SHELL_SIGMAS=3.0, RESIDUAL_STEP=None,
                  RESIDUAL_WEIGHT=None, RESIDUAL_MODE="straight_through", ENSEMBLE=["resnet", "edges"],
                  CHECKER=None, ATTRIBUTE="object", THRESHOLD=0.5, NGR_ALPHA=0.05, TIME_ITERATIONS=0, OUTPUT_DIR=None,
                  FIGURES_DIR=None)
    values.update(over)
    return campaign.check_params(values)


def test_units_are_the_campaigns_batches_and_processes_share_them_out():
    P = params(CLASSES=["cat", "dog"], MODES=["type1", "type2"], SEEDS=[5, 3, 9, 1, 7], BATCH_SIZE=2)
    units = campaign.units(P)
    assert units[:3] == [("cat", "type1", [5, 3]), ("cat", "type1", [9, 1]), ("cat", "type1", [7])]
    assert len(units) == 2 * 2 * 3 and units[-1] == ("dog", "type2", [7])
    import pandas as pd

    import lib.sage.latent
    import lib.sage.resume

    searched = []

    def fake_campaign(pipe, ens, prompt, cls, seeds, steps, guidance, config, **k):  # what run_campaigns asks for
        searched.append((cls, config.mode, list(seeds)))
        return pd.DataFrame({"seed": seeds}), [None] * len(seeds)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lib.sage.latent, "latent_campaign", fake_campaign)
        mp.setattr(lib.sage.resume, "weights_part", lambda *a, **k: {})
        for count in (2, 5, 13):  # more processes than units: some get none
            searched.clear()
            tables = [campaign.run_campaigns(None, None, P, "d", i, count, progress=False)[0] for i in range(count)]
            assert [len(t) for t in tables] == [len(sum((u[2] for u in units[i::count]), [])) for i in range(count)]
            assert sorted(map(repr, searched)) == sorted(map(repr, units))  # every unit once, across the processes
        searched.clear()
        campaign.run_campaigns(None, None, P, "d", 0, 1, progress=False)  # one process: a campaign per (class, mode)
        assert searched == [(c, m, list(P.SEEDS)) for c in P.CLASSES for m in P.MODES]
    with pytest.raises(ValueError, match=r"process 2 of 2: the index must be in \[0, 2\)"):
        campaign.run_campaigns(None, None, P, "unused", process_index=2, num_processes=2)


def test_a_parameters_file_round_trips_and_a_bad_one_fails_before_loading(tmp_path, monkeypatch, capsys):
    import lib.loading
    import lib.processes

    P = params(OUTPUT_DIR=str(tmp_path / "out dir"))
    path = campaign.write_params(P, tmp_path / "out dir")
    assert vars(campaign.read_params(path)) == vars(P)
    monkeypatch.setattr(lib.loading, "load_pipeline", lambda *a, **k: pytest.fail("a pipeline loaded"))
    monkeypatch.setattr(lib.processes, "process_share", lambda: (3, 4))  # 2 units, 4 processes: the 4th has none
    assert campaign.main(["--params", str(path)]) == 0
    assert capsys.readouterr().out == "process 3/4: 0 search(es) (more processes than units)\n"
    command = campaign.command(path)
    assert command.startswith("accelerate launch --multi_gpu --num_processes 2 -m lib.sage.campaign --params ")
    assert shlex.split(command)[-1] == str(path)  # quoted: the folder name has a space
    with pytest.raises(ParameterError, match=r"missing\.json does not exist: run notebook 01"):
        campaign.main(["--params", str(tmp_path / "missing.json")])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**vars(P), "MODES": ["type3"]}))
    with pytest.raises(ParameterError, match=r"^MODES: modes must be distinct values of"):
        campaign.main(["--params", str(bad)])
    bad.write_text(json.dumps({**vars(P), "STEPSS": 3}))
    with pytest.raises(ParameterError, match=r"unknown parameter\(s\) STEPSS"):
        campaign.read_params(bad)
    for text in ("[1, 2]", "{not json"):
        bad.write_text(text)
        with pytest.raises(ParameterError, match=r"bad\.json (must hold an object|is not a readable parameters file)"):
            campaign.read_params(bad)
    bad.write_text(json.dumps({k: v for k, v in vars(P).items() if k not in ("STEP_SIZE", "STEPS")}))
    with pytest.raises(ParameterError, match=r"^missing parameter\(s\) STEPS, STEP_SIZE$"):
        campaign.read_params(bad)  # not an AttributeError after the pipeline load


def test_only_the_first_launched_process_warns_about_the_toy_settings(tmp_path, monkeypatch, twin_dirs):
    """A real model (a saved twin folder) with the toy world's step count and classifiers: process 0 of 2 warns of
    both, process 1 stays silent (it would repeat the same words)."""
    import warnings

    import lib.loading
    import lib.processes
    from lib.params import ToySettingsWarning

    class Loading(Exception):
        pass

    def load(*args, **kwargs):
        raise Loading

    real = str(twin_dirs["sd-v1"])
    with pytest.warns(ToySettingsWarning):
        path = campaign.write_params(params(MODEL=real, OUTPUT_DIR=str(tmp_path)), tmp_path)
    monkeypatch.setattr(lib.loading, "load_pipeline", load)  # stops each process where the pipeline would load
    said = {}
    for index in (0, 1):
        monkeypatch.setattr(lib.processes, "process_share", lambda i=index: (i, 2))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(Loading):
                campaign.main(["--params", str(path)])
        said[index] = [str(w.message) for w in caught if issubclass(w.category, ToySettingsWarning)]
    assert len(said[0]) == 2, said[0]
    assert said[0][0].startswith(f"MODEL={real!r} is sampled with STEPS=2, GUIDANCE=4.0")
    assert said[0][1].startswith(f"MODEL={real!r} is not the toy world, but resnet, edges belong to it")
    assert said[1] == []


def test_the_command_line_says_what_is_wrong_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lib.sage.campaign", "--params", str(tmp_path / "none.json")],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'none.json'} does not exist: run notebook 01 (it writes params.json to its output "
        "folder) or give another --params"]
    path = campaign.write_params(params(CLASSES=["cta"]), tmp_path)  # the ensemble's check: a traceback before
    proc = subprocess.run([sys.executable, "-m", "lib.sage.campaign", "--params", str(path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "'cta'" in lines[0] and "near matches: 'cat'" in lines[0], lines[0]
    path = campaign.write_params(params(ENSEMBLE=["resnet", "edge:edges"]), tmp_path)  # a member spec refused
    proc = subprocess.run([sys.executable, "-m", "lib.sage.campaign", "--params", str(path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        "error: 'edge:edges': the toy world's edge member is 'edges' (it computes Canny itself)"], proc.stderr


def test_each_launched_process_takes_its_own_gpu_and_auto_means_what_the_notebook_means(monkeypatch):
    import accelerate

    from lib.processes import process_device

    for where, asked, got in (("cuda:1", "auto", "cuda:1"), ("cuda:1", "cuda", "cuda:1"), ("cuda:1", "cpu", "cpu"),
                              ("cuda:1", "cuda:0", "cuda:0"), ("cpu", "auto", "cpu"), ("mps", "auto", "cpu"),
                              ("mps", "mps", "mps"), ("cpu", "cpu", "cpu")):
        monkeypatch.setattr(accelerate, "PartialState", lambda w=where: SimpleNamespace(device=torch.device(w)))
        assert process_device(asked) == got, (where, asked)


def test_two_launched_processes_write_what_the_notebook_resumes_exactly(tmp_path):
    """``accelerate launch --multi_gpu --num_processes 2`` (torchrun; CPU-only works) on the toy world: each process
    searches one of the two units (a batch of two seeds, and the last seed alone); the notebook's call then loads
    them, and here equals one process searching them (the processes run on 1 CPU thread, this one on 2)."""
    from lib.sage.build import setup

    P = params(OUTPUT_DIR=str(tmp_path / "out"), SEEDS=[0, 1, 2], BATCH_SIZE=2)  # units [0, 1] and [2]
    path = campaign.write_params(P, tmp_path / "out")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "lib.sage.campaign",
           "--params", str(path)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "process 0/2: 2 search(es), 2 run now" in proc.stdout and "process 1/2: 1 search(es), 1 run now" in proc.stdout
    latents = tmp_path / "out" / "latents"  # beside params.json
    assert len(list(latents.glob("latent_type1_cat_*.safetensors"))) == 3

    pipe, ens, _ = setup(P, P.CLASSES, campaign.criteria(P))
    runs, results = campaign.run_campaigns(pipe, ens, P, latents, progress=False)
    assert runs["resumed"].all() and list(runs["seed"]) == [0, 1, 2]
    fresh_runs, fresh = campaign.run_campaigns(pipe, ens, P, tmp_path / "one process", progress=False)
    assert not fresh_runs["resumed"].any()
    assert sorted(p.name for p in latents.iterdir()) == sorted(p.name for p in (tmp_path / "one process").iterdir())
    assert set(fresh) == set(results) and len(fresh) == 3
    for key, r in fresh.items():
        assert torch.equal(results[key].latent, r.latent) and torch.equal(results[key].image, r.image)
        assert results[key].found == r.found and results[key].history == r.history
