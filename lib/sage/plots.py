"""Figures of the SAGE notebooks: the QQ-plot of a found latent beside the searches' losses (01), the class
probability per added word (02) and a loss history (03)."""

from __future__ import annotations

from typing import Mapping, Sequence

import lib.plotting  # noqa: F401  (selects the Agg backend before pyplot loads)
import matplotlib.pyplot as plt  # noqa: E402, I001
import torch  # noqa: E402

from lib.sage.metrics import qq_points  # noqa: E402


def qq_loss_figure(seed_latent: torch.Tensor, seed_label: str, found_latent: torch.Tensor | None, found_label: str,
                   histories: Mapping[str, Sequence[float]]):
    """Two panels: the QQ-plot of a seed's latent entries against N(0, 1), with a found latent's beside it when there
    is one, and every search's surrogate loss per iteration (``histories``: label → losses)."""
    fig, axes = plt.subplots(1, 2, figsize=(7, 3.2))
    th, sm = qq_points(seed_latent)
    axes[0].plot(th, sm, ".", ms=3, label=seed_label)
    if found_latent is not None:
        th2, sm2 = qq_points(found_latent)
        axes[0].plot(th2, sm2, ".", ms=3, label=found_label)
    axes[0].plot([-3, 3], [-3, 3], "k--", lw=0.8)
    axes[0].set(xlabel="N(0,1) quantile", ylabel="latent entry quantile", title="QQ-plot")
    axes[0].legend(fontsize=7)
    for label, history in histories.items():
        axes[1].plot(history, lw=1, label=label)
    axes[1].set(xlabel="iteration", ylabel="surrogate loss (sum over members)", title="search loss")
    axes[1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return fig


def class_probability_figure(rounds, classes: Sequence[str], n_words: int):
    """The prompt search's mean P(class) (over members and seeds) after each added word, one line per class
    (``rounds``: :func:`lib.sage.prompt.prompt_campaign`'s table)."""
    fig, ax = plt.subplots(figsize=(5, 3))
    for c in classes:
        d = rounds[rounds.cls == c]
        ax.plot(d["round"] + 1, d.p_class, "o-", label=c)
    ax.set(xlabel="words added", ylabel="mean P(class) over members and seeds", ylim=(0, 1),
           title="prompt search: class probability per added word")
    ax.set_xticks(range(1, n_words + 1))
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def loss_figure(history: Sequence[float], ylabel: str, title: str):
    """One loss history over the iterations."""
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(history, lw=1)
    ax.set(xlabel="iteration", ylabel=ylabel, title=title)
    fig.tight_layout()
    return fig
