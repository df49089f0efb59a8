"""The real-model path of the notebooks: each one runs headless (papermill) on the tiny SDXL shape twin, the family
with two text encoders, so a notebook that only works on the toy world fails here and not on a researcher's GPU."""

import pytest
import torch

from lib.paths import REPO_ROOT

TINY = {"MODEL": "twin:sdxl", "STEPS": 2}
CASES = {
    # the memory savings a GPU run of SD needs (lib.speed.save_memory), through the gradient passes of 01 and 02
    "01_sage_latent_search": dict(CLASSES=["cat"], SEEDS=[0], MODES=["type1"], ITERATIONS=1, CHECKPOINTING="steps"),
    "02_sage_prompt_search": dict(CLASSES=["cat"], SEEDS=[0], EVAL_SEEDS=[1], ITERATIONS=2, N_WORDS=1, TOP_K=3, CHECKPOINTING="blocks"),
    "03_sage_token_attack": dict(SEEDS=[0], TEST_SEEDS=[1], ITERATIONS=2, N_TRAIN_PROMPTS=2, N_TEST_PROMPTS=1,
                                 BATCH_SIZE=1),
    # random weights: the corruption does not lower CLIP-Score, so no Otsu threshold exists; a numeric τ is used
    "04_causal_tracing_unet": dict(N_VAL=1, N_TEST=1, TAU=0.5, MIN_GAP=0.0, LAYERS=[  # 3 of SDXL's 227 layers
        "down_blocks.0.resnets.0", "mid_block.attentions.0.transformer_blocks.0.attn2", "up_blocks.2.resnets.2"]),
    "05_causal_tracing_text_encoder": dict(N_VAL=1, N_TEST=1, TAU=0.5, MIN_GAP=0.0, TEXT_LAYERS=[0]),
    "06_diffquickfix": dict(SEEDS=[0], N_PROMPTS=1, N_UNRELATED=1, N_PARAPHRASES=1, N_MISSPELLINGS=1,
                            TIMING_REPEATS=1, N_FIT=2, SWEEP_LAYERS=[1],  # without LAYER 0: unedited from the main run
                            SAVE_EDITED_MODEL=True, SCORER="toy"),  # a scorer spec other than auto's choice
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_notebook_runs_on_the_sdxl_twin(name, tmp_path, monkeypatch):
    import papermill as pm

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    hf_home = tmp_path / "hf_home"  # the kernel's own, empty: a notebook that reached a hub would cache files there
    hf_home.mkdir()
    monkeypatch.setenv("HF_HOME", str(hf_home))
    out = tmp_path / "out"
    pm.execute_notebook(str(REPO_ROOT / "notebooks" / f"{name}.ipynb"), str(tmp_path / f"{name}.ipynb"),
                        parameters={**TINY, **CASES[name], "OUTPUT_DIR": str(out)},
                        cwd=str(REPO_ROOT / "notebooks"), progress_bar=False, kernel_name="python3",
                        execution_timeout=600)  # per cell: a hang fails the test instead of CI
    written = [p.suffix for p in out.rglob("*") if p.is_file()]
    assert ".png" in written and (".csv" in written or ".parquet" in written), sorted(set(written))
    assert not list(hf_home.iterdir())  # nothing fetched or cached from a hub
    if name == "06_diffquickfix":  # the edited model kept as a folder the other notebooks take as MODEL
        from lib.editing.quickfix import encoder_layers
        from lib.loading import load_pipeline

        def out_proj(p):
            return encoder_layers(p.text_encoder)[0].self_attn.out_proj.weight

        edited, base = load_pipeline(str(out / "edited_model")), load_pipeline(TINY["MODEL"])
        assert out_proj(edited).shape == out_proj(base).shape and not torch.equal(out_proj(edited), out_proj(base))


@pytest.mark.parametrize("bad,error", [({"SWEEP_LAYERS": [0, 50]}, r"SWEEP_LAYERS \[50\] out of range"),
                                       ({"LAYER": 12}, r"LAYER 12 is out of range: text_encoder has layers 0..11")])
def test_out_of_range_layers_fail_before_the_model_loads(tmp_path, monkeypatch, bad, error):
    """06 checks LAYER and SWEEP_LAYERS against the model's text-encoder configs (the twin's: 12 and 32 layers) before
    the pipeline loads."""
    import nbformat
    import papermill as pm

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    executed = tmp_path / "06.ipynb"
    with pytest.raises(pm.PapermillExecutionError, match=error):
        pm.execute_notebook(str(REPO_ROOT / "notebooks" / "06_diffquickfix.ipynb"), str(executed),
                            parameters={**TINY, **CASES["06_diffquickfix"], **bad, "OUTPUT_DIR": str(tmp_path / "out")},
                            cwd=str(REPO_ROOT / "notebooks"), progress_bar=False, kernel_name="python3",
                            execution_timeout=600)
    loading = [c for c in nbformat.read(executed, as_version=4).cells if "load_pipeline(" in c.source]
    assert len(loading) == 1 and loading[0].execution_count is None  # the load never ran
    assert not list((tmp_path / "out").rglob("*.csv"))
