import pytest

from lib.params import Param, ParameterError, validate
from lib.paths import REPO_ROOT


def test_valid_parameters_pass_and_ints_become_floats():
    p = validate(dict(MODEL="toy", SEEDS=[0, 1], GUIDANCE=4, STEPS=25, OUTPUT_DIR=None))
    assert p.GUIDANCE == 4.0 and isinstance(p.GUIDANCE, float) and p.SEEDS == [0, 1]


@pytest.mark.parametrize(
    "values, fragment",
    [
        (dict(STEPS="25"), "STEPS: expected int"),
        (dict(STEPS=0), "outside"),
        (dict(STEPS=1000), "outside"),  # a 1000-step DDIM schedule has no room (make_scheduler), before loading
        (dict(GUIDANCE=0.5), "outside"),  # below 1 diffusers switches guidance off
        (dict(SEEDS=[]), "at least 1"),
        (dict(SEEDS=[0, "1"]), "every item must be int"),
        (dict(SEEDS=[0, 1, 0]), "SEEDS: [0, 1, 0] repeat [0]"),
        (dict(SEEDS=[2**63]), "SEEDS: 9223372036854775808 is outside [0, 9223372036854775807]"),  # torch: 2**64 fails
        (dict(MODEL="sd-v9"), "MODEL: unknown model"),
        (dict(DEVICE="tpu"), "DEVICE: 'tpu' is not one of 'auto', 'cpu', 'cuda', 'cuda:N', 'mps'"),
        (dict(DEVICE="cuda:x"), "DEVICE: 'cuda:x' is not one of"),
        (dict(CHECKPOINTING="layers"), "CHECKPOINTING: 'layers' is not one of 'blocks', 'steps', 'steps+blocks'"),
        (dict(STPES=3), "unknown parameter(s) STPES"),
        (dict(STEPS=True), "expected int"),
        (dict(GUIDANCE=float("nan")), "GUIDANCE: nan is not a valid value (finite numbers only)"),
        (dict(GUIDANCE=float("inf")), "GUIDANCE: inf is not a valid value"),
    ],
)
def test_bad_parameters_are_named(values, fragment):
    with pytest.raises(ParameterError) as err:
        validate(values)
    assert fragment in str(err.value)


def test_every_device_the_loader_takes_is_a_valid_parameter():
    for device in ("auto", "cpu", "cuda", "cuda:1", "mps"):
        assert validate(dict(DEVICE=device)).DEVICE == device


def test_nan_is_refused_and_ints_stand_for_floats_in_mixed_types():
    with pytest.raises(ParameterError, match="GUIDANCE: nan is not a valid value"):
        validate(dict(GUIDANCE=float("nan")))
    assert Param((str, float)).validate("TAU", 1) == 1.0 and Param((str, float)).validate("TAU", "otsu") == "otsu"
    assert Param((int, float)).validate("X", 2) == 2 and isinstance(Param((int, float)).validate("X", 2), int)
    with pytest.raises(ParameterError, match="expected"):
        Param((str, float)).validate("TAU", True)


def test_a_real_model_with_the_toy_step_count_is_warned_about(twin_dirs):
    """A saved twin folder stands in for a real model (a local folder that is no toy world); the toy world and twins
    keep their small settings silently."""
    import warnings

    real = str(twin_dirs["sd-v1"])
    with pytest.warns(UserWarning, match=rf"^MODEL='{real}' is sampled with STEPS=10, GUIDANCE=4.0 \(the toy "
                                         r"world's small settings\); Stable Diffusion is usually sampled with -p STEPS "
                                         r"50 -p GUIDANCE 7.5$"):
        validate(dict(MODEL=real, STEPS=10, GUIDANCE=4.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate(dict(MODEL=real, STEPS=50, GUIDANCE=7.5))
        for model in ("toy", "twin:sdxl"):
            validate(dict(MODEL=model, STEPS=2, GUIDANCE=4.0))


def test_extra_specs():
    p = validate(dict(NOISE=3.0), NOISE=Param(float, low=0))
    assert p.NOISE == 3.0
    with pytest.raises(ParameterError, match=r"^NOISE: -1\.0 is below the minimum 0$"):
        validate(dict(NOISE=-1.0), NOISE=Param(float, low=0))
    with pytest.raises(ParameterError, match=r"^N: 5 is above the maximum 4$"):  # a one-sided range says which side
        validate(dict(N=5), N=Param(int, high=4))


def test_runs_root_can_be_redirected(tmp_path):
    import subprocess
    import sys

    from lib.paths import REPO_ROOT

    code = "from lib.paths import output_dir; print(output_dir(None, 'nb'))"
    env = {"T2I_RUNS_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         check=True, timeout=120).stdout.strip()
    assert out == str(tmp_path / "nb") and (tmp_path / "nb").is_dir()  # make test never resumes from runs/


def _parameter_names(notebook) -> list[str]:
    """Names assigned in the notebook's cell tagged ``parameters``."""
    import ast
    import json

    cells = [c for c in json.loads(notebook.read_text())["cells"] if "parameters" in c["metadata"].get("tags", [])]
    assert len(cells) == 1, f"{notebook.name}: {len(cells)} cells tagged 'parameters'"
    tree = ast.parse("".join(cells[0]["source"]))
    return [t.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target]) if isinstance(t, ast.Name)]


def test_every_notebook_parameter_is_documented_in_the_readme():
    import re

    from lib.paths import REPO_ROOT

    readme = (REPO_ROOT / "README.md").read_text()
    first_cells = re.findall(r"^\| (`[A-Z][^|]*)\|", readme, re.M)  # a table row's first cell: `STEPS` / `GUIDANCE`
    documented = {n for cell in first_cells for n in re.findall(r"`([A-Z][A-Z0-9_]*)`", cell)}
    notebooks = sorted((REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert notebooks
    missing = {nb.name: m for nb in notebooks if (m := [n for n in _parameter_names(nb) if n not in documented])}
    assert not missing, f"parameters missing from the README's tables: {missing}"


def test_template_and_step_checks_shared_by_the_sage_notebooks():
    from types import SimpleNamespace

    from lib.params import check_step, has_placeholder

    spec = {"TEMPLATE": Param(str, check=has_placeholder("cls"))}
    assert validate({"TEMPLATE": "a photo of a {cls}"}, **spec).TEMPLATE == "a photo of a {cls}"
    with pytest.raises(ParameterError, match=r"TEMPLATE: must contain '\{cls\}', got 'a photo of a dog'"):
        validate({"TEMPLATE": "a photo of a dog"}, **spec)
    check_step(SimpleNamespace(STEPS=10, GRAD_FROM_STEP=9), "GRAD_FROM_STEP")
    check_step(SimpleNamespace(STEPS=10, RESIDUAL_STEP=10), "RESIDUAL_STEP", inclusive=True)
    check_step(SimpleNamespace(STEPS=10, RESIDUAL_STEP=None), "RESIDUAL_STEP", inclusive=True)  # None: the default
    with pytest.raises(ParameterError, match="GRAD_FROM_STEP=10 must be < STEPS=10"):
        check_step(SimpleNamespace(STEPS=10, GRAD_FROM_STEP=10), "GRAD_FROM_STEP")
    with pytest.raises(ParameterError, match="RESIDUAL_STEP=11 must be <= STEPS=10"):
        check_step(SimpleNamespace(STEPS=10, RESIDUAL_STEP=11), "RESIDUAL_STEP", inclusive=True)


def test_toy_folders_resolve_from_the_repo_root():
    from lib.paths import REPO_ROOT, TOY_DIR, resolve_toy_folder

    assert resolve_toy_folder(None) == resolve_toy_folder("toy") == TOY_DIR
    assert resolve_toy_folder("data/toy") == REPO_ROOT / "data/toy"  # as 00's MODEL and 06's TOY_FOLDER take it
    assert resolve_toy_folder("/elsewhere/toy") == __import__("pathlib").Path("/elsewhere/toy")


def test_min_len_holds_for_lists_without_an_item_type():
    """06's PAIRS / MULTI_PAIRS: an empty list passed and failed after the model loaded, without naming PAIRS."""
    with pytest.raises(ParameterError, match=r"PAIRS: needs at least 1 item\(s\), got \[\]"):
        validate(dict(PAIRS=[]), PAIRS=Param(list, min_len=1))
    assert validate(dict(PAIRS=[["a", "b"]]), PAIRS=Param(list, min_len=1)).PAIRS == [["a", "b"]]


MODEL_LOADS = ("load_pipeline(", "setup(P", "tracing.load(", "load_toy_pipeline(", "from_pretrained(", "load_lm(",
               "load_classifiers(")  # how the notebooks load weights


def _validate_cell(name: str, tmp_path, **over):
    """Run notebook ``name``'s parameters cell, the papermill overrides and its validating cell (the one calling
    ``validate``, itself or through a ``lib`` module's ``check_params``) in one namespace, as the kernel would: the
    checks a bad ``-p`` meets before any model loads (no earlier cell may load one: :data:`MODEL_LOADS`)."""
    import json
    import os

    from lib.paths import REPO_ROOT

    cells = json.loads((REPO_ROOT / "notebooks" / f"{name}.ipynb").read_text())["cells"]
    params = next(c for c in cells if "parameters" in c["metadata"].get("tags", []))
    check = next(c for c in cells if any(f in "".join(c["source"]) for f in ("P = validate(", ".check_params(")))
    earlier = "".join("".join(c["source"]) for c in cells[: cells.index(check)] if c["cell_type"] == "code")
    loads = [f for f in MODEL_LOADS if f in earlier]
    assert not loads, f"{name}: a cell before its parameter check loads a model ({loads})"
    ns: dict = {}
    exec("".join(params["source"]), ns)
    ns.update({"OUTPUT_DIR": str(tmp_path / "out"), **over})
    cwd = os.getcwd()
    os.chdir(REPO_ROOT / "notebooks")  # where papermill runs them
    try:
        exec("".join(check["source"]).replace("display(", "print("), ns)
    finally:
        os.chdir(cwd)
    return ns["P"]


NOTEBOOK_REFUSALS = [  # (notebook, override, message): each notebook's own checks, before its model loads
    ("00_toy_world", dict(DTYPE="float16"), "unknown parameter(s) DTYPE"),  # a COMMON name the notebook never reads
    ("00_toy_world", dict(CHECKPOINTING="blocks"), "unknown parameter(s) CHECKPOINTING"),
    ("01_sage_latent_search", dict(CLASSES=["cat", "dog", "cat"]), "CLASSES: ['cat', 'dog', 'cat'] repeat ['cat']"),
    ("01_sage_latent_search", dict(DELTA_MAX=0.0), "DELTA_MAX: must be > 0, got 0.0"),
    ("01_sage_latent_search", dict(RESIDUAL_WEIGHT=0.0), "RESIDUAL_WEIGHT: must be > 0, got 0.0"),  # a zero gradient
    ("01_sage_latent_search", dict(PROMPT_TEMPLATE="a photo of a {cls} on mars"),  # searched without a word before
     "PROMPT_TEMPLATE: cannot parse subject 'cat on mars' in caption 'a photo of a cat on mars'. Valid vocabulary: objects"),
    ("01_sage_latent_search", dict(MODEL="twin:sd-v1", PROMPT_TEMPLATE="a photo of a {cls} on mars"), None),  # not toy
    ("02_sage_prompt_search", dict(BATCH_SIZE=4), "unknown parameter(s) BATCH_SIZE"),
    ("02_sage_prompt_search", dict(CLASSES=["cat", "cat"]), "CLASSES: ['cat', 'cat'] repeat ['cat']"),
    ("02_sage_prompt_search", dict(EMB_RANGE=0.0), "EMB_RANGE: must be > 0"),
    ("02_sage_prompt_search", dict(SUCCESS_FRACTION=0.0), "SUCCESS_FRACTION: must be > 0"),
    ("02_sage_prompt_search", dict(EVAL_SEEDS=[1, 100]), "EVAL_SEEDS and SEEDS share [1]: a prompt judged on the images"),
    ("02_sage_prompt_search", dict(EVAL_SEEDS=[100, 100]), "EVAL_SEEDS: [100, 100] repeat [100]"),
    ("02_sage_prompt_search", dict(LM="no_such_org/no-such-lm"), "LM: hub LM 'no_such_org/no-such-lm' is not in the local cache"),
    ("02_sage_prompt_search", dict(LM="."), "LM: '.' is a folder without config.json"),
    ("02_sage_prompt_search", dict(LM="gpt2"), "LM: hub LM 'gpt2' is not in the local cache"),  # an org-less hub id
    ("02_sage_prompt_search", dict(LM="./no_such_lm"), "LM: LM folder not found: ./no_such_lm"),
    ("03_sage_token_attack", dict(TEST_SEEDS=[3, 100]), "SEEDS and TEST_SEEDS share [3]"),
    ("03_sage_token_attack", dict(EMB_RANGE=0.0), "EMB_RANGE: must be > 0"),
    ("03_sage_token_attack", dict(TARGET="Cat "), "TARGET: 'Cat ' equals SOURCE 'cat'"),  # was a ValueError, untested
    ("03_sage_token_attack", dict(TEST_SEEDS=[2**64]), "TEST_SEEDS: 18446744073709551616 is outside"),
    ("02_sage_prompt_search", dict(EVAL_SEEDS=[2**64]), "EVAL_SEEDS: 18446744073709551616 is outside"),
    ("00_toy_world", dict(RENDER_SEEDS=[2**64]), "RENDER_SEEDS: 18446744073709551616 is outside"),
    ("04_causal_tracing_unet", dict(NOISE_SEED=2**64), "NOISE_SEED: 18446744073709551616 is outside"),
    ("03_sage_token_attack", dict(MODEL="twin:sd-v1", N_TRAIN_PROMPTS=10, N_TEST_PROMPTS=7),
     "10 + 7 captions of 'cat' (N_TRAIN_PROMPTS + N_TEST_PROMPTS): only 16 captions of 'cat' available, 17 asked"),
    ("03_sage_token_attack", dict(SOURCE="zebra"), "SOURCE: 'zebra' is not a toy-world object"),
    ("03_sage_token_attack", dict(SCORER="openclip:ViT-B-32"), "SCORER: scorer 'openclip:ViT-B-32'"),
    ("06_diffquickfix", dict(SCORER="toy:no/such/folder"), "SCORER: scorer 'toy:no/such/folder': no folder"),
    # 600 of the 672 captions of "cat", but the held-out draw loses every phrasing of the 400 training scenes
    ("03_sage_token_attack", dict(N_TRAIN_PROMPTS=400, N_TEST_PROMPTS=200),
     "400 + 200 captions of 'cat' (N_TRAIN_PROMPTS + N_TEST_PROMPTS): only 0 captions of 'cat' available, 200 asked"),
    ("04_causal_tracing_unet", dict(DTYPE="float64"), "DTYPE: 'float64' is not one of 'auto', 'float32'"),
    ("05_causal_tracing_text_encoder", dict(CHECKPOINTING="blocks"), "unknown parameter(s) CHECKPOINTING"),
    ("04_causal_tracing_unet", dict(NOISE=0.0), "NOISE: must be > 0"),
    ("04_causal_tracing_unet", dict(LAYERS=["mid_block.resnets.0", "mid_block.resnets.0"]), "each is traced once"),
    ("05_causal_tracing_text_encoder", dict(TEXT_KINDS=["mlp", "mlp"]), "TEXT_KINDS: ['mlp', 'mlp'] repeat ['mlp']"),
    ("05_causal_tracing_text_encoder", dict(TEXT_LAYERS=[0, 0]), "TEXT_LAYERS: [0, 0] repeat [0]"),
    ("06_diffquickfix", dict(DTYPE="float64"), "DTYPE: 'float64' is not one of 'auto', 'float32'"),
    ("06_diffquickfix", dict(CHECKPOINTING="blocks"), "unknown parameter(s) CHECKPOINTING"),  # nothing differentiated
    ("06_diffquickfix", dict(SWEEP_LAYERS=[1, 1]), "SWEEP_LAYERS: [1, 1] repeat [1]"),
    ("06_diffquickfix", dict(PAIRS=[["dog", "cat"], ["Dog", "fish"]]), "PAIRS: anchor 'Dog' is given twice"),
    ("06_diffquickfix", dict(MULTI_PAIRS=[["dog", "dog"]]), "MULTI_PAIRS: anchor and target are the same phrase"),
    ("06_diffquickfix", dict(PAIRS=[["snoopy", "painting"]]),  # it crashed in the evaluation, after every fit
     "PAIRS: anchor 'snoopy' is a character and target 'painting' a style: pair a phrase with one of its own kind"),
    ("06_diffquickfix", dict(TOY_FOLDER="data/toy/classifiers/.."), None),  # the toy world itself: accepted
]


@pytest.mark.parametrize("name, over, message", NOTEBOOK_REFUSALS)
def test_notebooks_refuse_bad_parameters_before_loading(name, over, message, tmp_path, monkeypatch):
    import lib.loading

    monkeypatch.setattr(lib.loading, "load_pipeline", lambda *a, **k: pytest.fail("a pipeline loaded"))
    if message is None:
        _validate_cell(name, tmp_path, **over)
        return
    with pytest.raises(ParameterError) as err:
        _validate_cell(name, tmp_path, **over)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


@pytest.mark.parametrize("name", [p.stem for p in sorted((REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))])
def test_every_notebook_refuses_an_output_folder_it_cannot_write_before_loading(name, tmp_path, monkeypatch):
    """The first write comes after the heavy work (02: after its first class), so a file, a path under a file or a
    read-only folder given as OUTPUT_DIR / FIGURES_DIR fails in the parameter check, in one line naming it."""
    import os

    import lib.loading

    monkeypatch.setattr(lib.loading, "load_pipeline", lambda *a, **k: pytest.fail("a pipeline loaded"))
    a_file = tmp_path / "results.csv"
    a_file.write_text("")
    cases = [("OUTPUT_DIR", str(a_file), "is a file, not a folder"),
             ("OUTPUT_DIR", str(a_file / "out"), f"lies under the file {a_file}, not a folder"),
             ("FIGURES_DIR", "README.md", "FIGURES_DIR: 'README.md' is a file")]  # relative: from the repo root
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        cases.append(("OUTPUT_DIR", str(locked / "out"), f"{locked} is not writable"))
    for key, value, message in cases:
        with pytest.raises(ParameterError) as err:
            _validate_cell(name, tmp_path, **{key: value})
        assert str(err.value).startswith(f"{key}: ") and message in str(err.value), str(err.value)
        assert "\n" not in str(err.value)
    assert not (a_file.is_dir() or (REPO_ROOT / "README.md").is_dir())
    _validate_cell(name, tmp_path, OUTPUT_DIR=str(tmp_path / "new" / "deeper"))  # a folder yet to create: accepted
    _validate_cell(name, tmp_path, OUTPUT_DIR="", FIGURES_DIR="")  # "": the default folder, as None


def test_06_checks_its_layers_against_the_model_configs_before_loading(tmp_path, monkeypatch):
    import lib.loading
    from lib.editing import EditError

    monkeypatch.setattr(lib.loading, "load_pipeline", lambda *a, **k: pytest.fail("a pipeline loaded"))
    with pytest.raises(EditError, match=r"^LAYER 4 is out of range: text_encoder has layers 0..3$"):
        _validate_cell("06_diffquickfix", tmp_path, LAYER=4)  # the toy text encoder has 4 layers
    with pytest.raises(EditError, match=r"^SWEEP_LAYERS \[4\] out of range"):
        _validate_cell("06_diffquickfix", tmp_path, SWEEP_LAYERS=[0, 4])
    assert _validate_cell("06_diffquickfix", tmp_path, LAYER=3, SWEEP_LAYERS=[3]).LAYER == 3


def test_06_warns_before_loading_that_its_rates_are_the_toy_world_s(tmp_path, monkeypatch, twin_dirs):
    """A real model (here a saved shape twin's folder standing in for one) gets toy-grammar prompts and the toy world's
    classifiers: the notebook says so before it loads anything; the toy world and twins run without the warning."""
    import warnings

    import lib.loading
    from lib.params import ToySettingsWarning

    monkeypatch.setattr(lib.loading, "load_pipeline", lambda *a, **k: pytest.fail("a pipeline loaded"))
    with pytest.warns(ToySettingsWarning, match=r"is not the toy world: notebook 06 evaluates toy-grammar prompts with "
                                                r"the toy world's 64-px classifiers.*CLIP-Scores \(open_clip ViT-L/14\)"):
        _validate_cell("06_diffquickfix", tmp_path, MODEL=str(twin_dirs["sd-v1"]), STEPS=50)
    with pytest.warns(ToySettingsWarning, match=r"CLIP-Scores \(the toy CLIP of TOY_FOLDER\)"):
        _validate_cell("06_diffquickfix", tmp_path, MODEL=str(twin_dirs["sd-v1"]), STEPS=50, TOY_FOLDER="data/toy")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for model in ("toy", "twin:sd-v1"):
            _validate_cell("06_diffquickfix", tmp_path, MODEL=model)


def test_02_checks_its_template_with_the_lm_and_its_classes_before_the_pipeline_loads(tmp_path, monkeypatch,
                                                                                       load_reached):
    """A template word the proposer LM cannot encode fails before the pipeline loads (it failed after); an unknown
    class is named with near matches before the LM loads too (the LM refused 'cta' as an unknown word, with no class
    list, after loading: several GB for a hub LM)."""
    import json

    import lib.sage.build
    from lib.prompts import PromptError
    from lib.sage.loss import UnknownClassError

    cells = json.loads((REPO_ROOT / "notebooks" / "02_sage_prompt_search.ipynb").read_text())["cells"]
    load_cell = "".join(next(c for c in cells if "load_lm(" in "".join(c["source"]))["source"])  # the models' cell
    cases = [(dict(TEMPLATE="a photo of a {cls} on mars"), PromptError,
              r"cannot encode 'a photo of a cat on mars': unknown word\(s\) \['mars'\]"),
             (dict(CLASSES=["cta"]), UnknownClassError, r"'cta'.*near matches: 'cat'"),
             (dict(TEMPLATE="a photo of a {cls}"), load_reached, None)]
    for over, raised, match in cases:
        with monkeypatch.context() as m:
            if raised is UnknownClassError:
                m.setattr(lib.sage.build, "load_lm", lambda *a, **k: pytest.fail("the LM loaded"))
            ns = {"__builtins__": __builtins__, "P": _validate_cell("02_sage_prompt_search", tmp_path, **over)}
            m.chdir(REPO_ROOT / "notebooks")
            with pytest.raises(raised, match=match):
                exec(load_cell, ns)


def test_a_toy_folder_without_its_clip_is_refused_by_06(tmp_path):
    (tmp_path / "toy" / "classifiers").mkdir(parents=True)
    with pytest.raises(ParameterError, match="TOY_FOLDER: .* has no clip_vision/ folder"):
        _validate_cell("06_diffquickfix", tmp_path, TOY_FOLDER=str(tmp_path / "toy"))


def test_infinity_is_refused_where_no_bound_would_catch_it():
    with pytest.raises(ParameterError, match=r"^X: inf is not a valid value \(finite numbers only\)$"):
        validate(dict(X=float("inf")), X=Param(float, low=0.0))  # no high bound: inf passed
    with pytest.raises(ParameterError, match=r"^X: -inf is not a valid value"):
        validate(dict(X=[1.0, float("-inf")]), X=Param(list, items=float))
    assert validate(dict(X=1e300), X=Param(float, low=0.0)).X == 1e300


def test_positive_and_disjoint_checks():
    from types import SimpleNamespace

    from lib.params import check_disjoint, positive

    assert validate(dict(X=1e-9), X=Param(float, low=0.0, check=positive)).X == 1e-9
    with pytest.raises(ParameterError, match=r"X: must be > 0, got -1"):
        validate(dict(X=[2, -1]), X=Param(list, items=int, check=positive))
    check_disjoint(SimpleNamespace(A=[0, 1], B=[2]), "A", "B", "why")
    with pytest.raises(ParameterError, match=r"A and B share \[1\]: why"):
        check_disjoint(SimpleNamespace(A=[0, 1], B=[1, 2]), "A", "B", "why")
    assert not hasattr(validate(dict(MODEL="toy")), "DTYPE")
    with pytest.raises(ParameterError, match=r"unknown parameter\(s\) DTYPE"):
        validate(dict(DTYPE="auto"), DTYPE=None)


@pytest.mark.parametrize("name", ["00_toy_world", "01_sage_latent_search", "02_sage_prompt_search",
                                  "03_sage_token_attack", "04_causal_tracing_unet", "05_causal_tracing_text_encoder",
                                  "06_diffquickfix"])
def test_every_notebooks_defaults_pass_its_checks(name, tmp_path):
    P = _validate_cell(name, tmp_path)
    assert P.OUTPUT_DIR == str(tmp_path / "out")
