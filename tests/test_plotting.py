"""Figures reach the reader: ``lib.plotting`` draws with Agg (nothing inline), so a notebook shows a figure by
displaying the PNG it wrote (``show_figure``), and every numbered notebook does so for every figure it saves."""

import json

import matplotlib.pyplot as plt
import pytest

from lib.paths import REPO_ROOT


def test_show_figure_displays_exactly_the_file_it_wrote_and_closes_the_figure(tmp_path, monkeypatch):
    import IPython.display

    from lib.plotting import show_figure

    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda obj: shown.append(obj))
    fig, ax = plt.subplots(figsize=(1, 1))
    ax.plot([0, 1], [1, 0])
    assert show_figure(fig, "line", tmp_path / "out", figures_dir=tmp_path / "figs") is None  # a cell prints no path
    path = tmp_path / "out" / "line.png"
    assert (tmp_path / "figs" / "line.png").read_bytes() == path.read_bytes()
    assert len(shown) == 1 and shown[0].data == path.read_bytes()
    assert not plt.fignum_exists(fig.number)


NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name[:2])
def test_every_notebook_shows_the_figures_it_saves(notebook):
    """No cell saves a figure without showing it (``save_figure`` alone, or ``display(fig)`` of an Agg figure, which
    prints only ``<Figure size ...>``), and the committed, executed notebook holds the images."""
    cells = [c for c in json.loads(notebook.read_text())["cells"] if c["cell_type"] == "code"]
    source = "".join("".join(c["source"]) for c in cells)
    assert "save_figure(" not in source and "plt.show()" not in source and "display(fig)" not in source
    outputs = [o for c in cells for o in c.get("outputs", [])]
    plain = ["".join(o.get("data", {}).get("text/plain", "")) for o in outputs]
    assert not [t for t in plain if "<Figure size" in t or "PosixPath(" in t]
    for index, cell in enumerate(cells):  # each cell that shows figures holds at least one image per call
        calls = "".join(cell["source"]).count("show_figure(")
        images = sum("image/png" in o.get("data", {}) for o in cell.get("outputs", []))
        assert images >= calls, f"{notebook.name}, code cell {index}: {calls} show_figure calls, {images} images"
    assert "show_figure(" in source, f"{notebook.name} shows no figure"


def test_the_numbered_notebooks_are_found():
    assert [p.name[:2] for p in NOTEBOOKS] == ["00", "01", "02", "03", "04", "05", "06"]
