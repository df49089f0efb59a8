import pytest

from lib.params import Param, ParameterError, validate


def test_valid_parameters_pass_and_ints_become_floats():
    p = validate(dict(MODEL="toy", SEEDS=[0, 1], GUIDANCE=4, STEPS=25, OUTPUT_DIR=None))
    assert p.GUIDANCE == 4.0 and isinstance(p.GUIDANCE, float) and p.SEEDS == [0, 1]


@pytest.mark.parametrize(
    "values, fragment",
    [
        (dict(STEPS="25"), "STEPS: expected int"),
        (dict(STEPS=0), "outside"),
        (dict(SEEDS=[]), "at least 1"),
        (dict(SEEDS=[0, "1"]), "every item must be int"),
        (dict(SEEDS=[0, 1, 0]), "SEEDS: [0, 1, 0] repeat [0]"),
        (dict(MODEL="sd-v9"), "MODEL: unknown model"),
        (dict(DEVICE="tpu"), "not one of"),
        (dict(CHECKPOINTING="layers"), "CHECKPOINTING: 'layers' is not one of 'blocks', 'steps', 'steps+blocks'"),
        (dict(STPES=3), "unknown parameter(s) STPES"),
        (dict(STEPS=True), "expected int"),
    ],
)
def test_bad_parameters_are_named(values, fragment):
    with pytest.raises(ParameterError) as err:
        validate(values)
    assert fragment in str(err.value)


def test_nan_is_refused_and_ints_stand_for_floats_in_mixed_types():
    with pytest.raises(ParameterError, match="GUIDANCE: NaN"):
        validate(dict(GUIDANCE=float("nan")))
    assert Param((str, float)).validate("TAU", 1) == 1.0 and Param((str, float)).validate("TAU", "otsu") == "otsu"
    assert Param((int, float)).validate("X", 2) == 2 and isinstance(Param((int, float)).validate("X", 2), int)
    with pytest.raises(ParameterError, match="expected"):
        Param((str, float)).validate("TAU", True)


def test_extra_specs():
    p = validate(dict(NOISE=3.0), NOISE=Param(float, low=0))
    assert p.NOISE == 3.0
    with pytest.raises(ParameterError, match="NOISE"):
        validate(dict(NOISE=-1.0), NOISE=Param(float, low=0))


def test_runs_root_can_be_redirected(tmp_path):
    import subprocess
    import sys

    from lib.paths import REPO_ROOT

    code = "from lib.paths import output_dir; print(output_dir(None, 'nb'))"
    env = {"T2I_RUNS_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         check=True).stdout.strip()
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
