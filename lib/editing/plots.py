"""Figures of notebook 06: the layer sweep of an edit."""

from __future__ import annotations

from typing import Sequence

import pandas as pd

import lib.plotting  # noqa: F401  (selects the Agg backend before pyplot loads)
import matplotlib.pyplot as plt  # noqa: E402, I001
import seaborn as sns  # noqa: E402

from lib.editing.report import PRESERVED_RATIO, REMOVED_RATE  # noqa: E402


def layer_sweep_figure(sweep: pd.DataFrame, before: pd.Series, anchors: Sequence[str]):
    """Two panels over the edited layer of a :func:`lib.editing.report.layer_sweep_table`: each anchor's concept rate
    after the edit (dashed: the unedited rate ``before``; dotted: the removal goal), and the unrelated prompts'
    accuracy relative to the unedited model (dotted: the preservation goal)."""
    long = sweep.drop(columns="preservation").reset_index().melt("layer", var_name="anchor", value_name="concept rate")
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    sns.lineplot(data=long, x="layer", y="concept rate", hue="anchor", hue_order=list(anchors), marker="o", ax=axes[0])
    for a, color in zip(anchors, sns.color_palette()):
        axes[0].axhline(before[a], ls="--", lw=0.8, color=color)
    axes[0].axhline(REMOVED_RATE, ls=":", color="grey", lw=0.8)
    axes[0].set(ylim=(-0.05, 1.05), title="concept rate after the edit (dashed: unedited)")
    sns.lineplot(x=sweep.index, y=sweep.preservation.values, marker="o", ax=axes[1], color="black")
    axes[1].axhline(PRESERVED_RATIO, ls=":", color="grey", lw=0.8)
    axes[1].set(xlabel="layer", ylabel="accuracy / unedited", title="preservation (unrelated prompts)")
    for ax in axes:
        ax.set_xticks(list(sweep.index))
    fig.tight_layout()
    return fig
