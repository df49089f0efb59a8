"""Figures: image grids, heatmaps and deterministic saving to a run folder and ``figures/``."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from lib.atomic import write_atomic  # noqa: E402
from lib.paths import in_repo  # noqa: E402


def save_figure(fig, name: str, out_dir: Path, figures_dir: str | Path | None = None, dpi: int = 120) -> Path:
    """Save ``fig`` as ``out_dir/name.png`` (no timestamps in the metadata) and copy it to ``figures_dir`` if given;
    both written atomically (an interrupted run leaves the previous figure, never a torn one)."""
    path = Path(out_dir) / f"{name}.png"
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight",
                                               metadata={"Software": None}))
    if figures_dir:  # a relative folder from the repo root, as OUTPUT_DIR (papermill runs in notebooks/)
        write_atomic(in_repo(figures_dir) / path.name, lambda tmp: shutil.copyfile(path, tmp))
    return path


def show_figure(fig, name: str, out_dir: Path, figures_dir: str | Path | None = None, dpi: int = 120) -> None:
    """:func:`save_figure` as ``out_dir/name.png``, close ``fig``, and display that file in a notebook: this module
    selects the Agg backend, which shows nothing inline, so what the reader sees is the file written. Outside IPython
    only the file is made. Returns None, so that a cell ending with it prints no path."""
    path = save_figure(fig, name, out_dir, figures_dir, dpi)
    plt.close(fig)
    try:
        from IPython.display import Image, display
    except ImportError:
        return
    display(Image(filename=str(path)))


def image_grid(images: torch.Tensor | np.ndarray | Sequence, rows: int, cols: int,
               row_labels: Sequence[str] | None = None, col_labels: Sequence[str] | None = None,
               title: str | None = None, scale: float = 1.2):
    """A rows × cols grid of images ((N, 3, H, W) tensors in [0, 1], (N, H, W, 3) uint8 arrays, or PIL images)."""
    imgs = _as_hwc(images)
    if len(imgs) > rows * cols:
        raise ValueError(f"{len(imgs)} images do not fit a {rows}×{cols} grid")
    fig, axes = plt.subplots(rows, cols, figsize=(cols * scale, rows * scale), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        for s in ax.spines.values():
            s.set_visible(False)
        if k < len(imgs):
            ax.imshow(imgs[k], interpolation="nearest")
    for r, label in enumerate(row_labels or []):
        axes[r, 0].set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    for c, label in enumerate(col_labels or []):
        axes[0, c].set_title(label, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def _as_hwc(images) -> list[np.ndarray]:
    if isinstance(images, torch.Tensor):
        arr = images.detach().float().cpu().clamp(0, 1).permute(0, 2, 3, 1).numpy()
        return [(a * 255).round().astype(np.uint8) for a in arr]
    return [np.asarray(im) for im in images]
