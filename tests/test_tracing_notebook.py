"""What notebooks 04 and 05 share (lib.tracing.notebook): the sharded CLI command writes the folder the notebook
resumes from, and toy probes on a real model are flagged."""

import shlex

import pytest

from lib.params import ParameterError, validate
from lib.tracing import notebook as tracing
from lib.tracing.probes import probe_path
from lib.tracing.sweep import SweepError, load_probes, main

LAYERS = ["down_blocks.0.resnets.0", "up_blocks.3.attentions.2.transformer_blocks.0.ff"]


def params(mode: str, **over):
    values = dict(MODEL="toy", DEVICE="cpu", DTYPE="auto", PROBES="toy", N_VAL=1, N_TEST=0, SEEDS=[0], STEPS=2, GUIDANCE=4.0,
                  NOISE=3.0, NOISE_SEED=0, BATCH_SIZE=4, TAU=0.5, MIN_GAP=0.0, EVAL_SPLIT="all", SCORER="auto", OUTPUT_DIR=None,
                  FIGURES_DIR=None)
    extra = tracing.UNET_PARAMS if mode == "unet" else tracing.TEXT_PARAMS
    values.update(dict(LAYERS=LAYERS, UNCOND="restore") if mode == "unet" else
                  dict(TEXT_KINDS=["self_attn"], TEXT_LAYERS=[0]))
    values.update(over)
    return validate(values, **tracing.TRACE_PARAMS, **extra)


@pytest.mark.parametrize("mode", ["unet", "text"])
def test_the_printed_sharding_command_writes_the_folder_the_notebook_resumes(tmp_path, mode):
    P = params(mode, GUIDANCE=4.123456789)  # printed exactly: a rounded value would name another folder
    pipe, scorer, _ = tracing.load(P)
    cfg = tracing.sweep_config(P, mode, pipe, scorer)
    out = tmp_path / "output dir"  # quoted in the command
    command = tracing.sweep_command(P, cfg, pipe, out)
    assert command.startswith("accelerate launch --multi_gpu --num_processes 2 -m lib.tracing.sweep ")
    assert f"--noise-seed {cfg.noise_seed}" in command and "--device cpu --dtype float32" in command
    argv = shlex.split(command.split(" -m lib.tracing.sweep ")[1])
    assert main(argv + ["--limit", "1"]) == 0  # the CLI in this process (one shard of one)
    first = load_probes(probe_path("toy")).iloc[:1]
    folder, written, _ = tracing.trace(P, cfg, pipe, scorer, first, out)
    assert folder.is_dir() and written == []  # nothing left to trace: the notebook resumed the CLI's item
    df, tau, split = tracing.table(P, folder, first, tmp_path / "rows.parquet")
    assert tau == 0.5 and split is None and (tmp_path / "rows.parquet").is_file()
    assert set(df["caption"]) == set(first["caption"]) and (df["seed"] == 0).all()
    if mode == "unet":  # one row per traced layer
        assert sorted(df["layer"]) == sorted(LAYERS)
    else:  # one row per token of the caption, at layer 0's self-attention
        assert (df["kind"] == "self_attn").all() and (df["layer_index"] == 0).all()
        assert len(df) == df["token"].nunique() >= 5  # "a photo of ..." and its BOS / EOS
    with pytest.raises(ValueError, match=r"no rows of split 'test' \(splits present: \['val'\]\)"):
        tracing.table(params(mode, EVAL_SPLIT="test"), folder, first, tmp_path / "rows.parquet")  # N_TEST=0
    other = tracing.sweep_config(params(mode, STEPS=3), mode, pipe, scorer)
    assert tracing.trace(params(mode, STEPS=3), other, pipe, scorer, first, out)[0] != folder


def test_toy_probes_on_a_real_model_are_flagged(tmp_path):
    assert "PROBES sd" in tracing.probes_warning("toy", "CompVis/stable-diffusion-v1-4")
    assert "PROBES sd" in tracing.probes_warning("toy", str(tmp_path))  # a local folder that is no toy world
    assert tracing.probes_warning("sd", "CompVis/stable-diffusion-v1-4") is None
    assert tracing.probes_warning("toy", "toy") is None and tracing.probes_warning("toy", "twin:sd-v1") is None
    (tmp_path / "classifiers").mkdir()  # a classifiers/ folder alone does not make a toy world
    assert "PROBES sd" in tracing.probes_warning("toy", str(tmp_path))
    (tmp_path / "TRAINING.json").write_text("{}")  # a toy-world folder: lib.toy.train writes TRAINING.json
    assert tracing.probes_warning("toy", str(tmp_path)) is None


def test_bad_trace_parameters_and_cli_kinds_fail_first(tmp_path, monkeypatch):
    with pytest.raises(ParameterError, match=r"^TAU: 1\.5 is neither 'otsu' .* nor a number in \[0, 1\]$"):
        params("unet", TAU=1.5)
    with pytest.raises(ParameterError, match=r"^TAU: 'Otsu' is neither 'otsu'"):  # the value was not named
        params("unet", TAU="Otsu")
    with pytest.raises(ParameterError, match=r"TEXT_KINDS: unknown kind\(s\) \['attn'\]"):
        params("text", TEXT_KINDS=["attn"])
    for bad in ("clip", "openclip", "openclip::openai", "toy:"):
        with pytest.raises(ParameterError, match=f"SCORER: unknown scorer '{bad}'; use auto, toy"):
            params("unet", SCORER=bad)
    with pytest.raises(ParameterError, match=r"SCORER: scorer 'openclip:ViT-L-14' names no weights: use "
                                             r"openclip:ViT-L-14:<pretrained> .* or openclip:ViT-L-14:none"):
        params("unet", SCORER="openclip:ViT-L-14")  # it gave random weights without a word
    with pytest.raises(ParameterError, match=r"SCORER: scorer 'toy:no/such/world': no folder 'no/such/world'"):
        params("unet", SCORER="toy:no/such/world")
    for ok in ("auto", "toy", "random", "toy:data/toy", "openclip:ViT-B-32:none"):
        params("unet", SCORER=ok)
    import lib.loading

    monkeypatch.setattr(lib.loading, "load_pipeline", lambda *a, **k: pytest.fail("loaded before the check"))
    with pytest.raises(SweepError, match="--text-kinds 'hidden,attn'"):
        main(["--model", "toy", "--probes", "toy", "--out", str(tmp_path), "--text-kinds", "hidden,attn"])
    with pytest.raises(SweepError, match="scorer 'openclip:ViT-B-32' names no weights"):
        main(["--model", "toy", "--probes", "toy", "--out", str(tmp_path), "--scorer", "openclip:ViT-B-32"])
    with pytest.raises(SweepError, match="probe set 'no_such' not found"):
        main(["--model", "toy", "--probes", "no_such", "--out", str(tmp_path)])


def test_a_toy_world_refuses_probe_captions_outside_its_grammar_before_loading(tmp_path, monkeypatch):
    """A custom probe file with words the toy text encoder never saw was traced without a word."""
    import lib.loading

    monkeypatch.setattr(lib.loading, "load_pipeline", lambda *a, **k: pytest.fail("the pipeline loaded"))
    probes = tmp_path / "zoo.csv"
    probes.write_text("caption,subject,attribute,split\na photo of a zebra,zebra,objects,val\n")
    with pytest.raises(ParameterError, match=r"^PROBES: cannot parse subject 'zebra' in caption 'a photo of a zebra'\. "
                                             r"Valid vocabulary: objects: 'circle'"):
        tracing.load(params("unet", PROBES=str(probes), LAYERS=LAYERS))
    with pytest.raises(SweepError, match=r"^--probes: cannot parse subject 'zebra'"):
        main(["--model", "toy", "--probes", str(probes), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
