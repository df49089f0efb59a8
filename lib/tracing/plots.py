"""Figures of notebooks 04 and 05: attribute × layer maps of the UNet, token × layer maps of the text encoder
(ROME style), and restored-image grids."""

from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch

from lib.plotting import image_grid
from lib.tracing.report import GROUP_ORDER, pick_split, short_layer
from lib.tracing.score import group_recovery
from lib.tracing.unet import Trace

KIND_COLORS = {"resnet": "#444444", "attn1": "#1f77b4", "attn2": "#d62728", "ff": "#2ca02c"}


def unet_layer_map(table: pd.DataFrame, value: str = "recovery", title: str | None = None, vmin: float = 0.0,
                   vmax: float = 1.0):
    """Heatmap attribute × UNet layer (forward order) of ``value`` from ``lib.tracing.report.unet_layer_table``.

    Tick labels are short layer names coloured by kind (resnet grey, attn1 blue, attn2 red, ff green); layers that
    pass the threshold are marked with a red dot. Values outside [vmin, vmax] (a recovery can be negative or above 1)
    take the end colours; the colour bar's pointed ends say so. Missing cells are grey.
    """
    piv = table.pivot(index="attribute", columns="layer_index", values=value).sort_index(axis=1)
    causal = table.pivot(index="attribute", columns="layer_index", values="causal").reindex_like(piv)
    names = table.drop_duplicates("layer_index").set_index("layer_index").reindex(piv.columns)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.16 * piv.shape[1] + 2), 0.45 * piv.shape[0] + 1.9))
    sns.heatmap(piv, ax=ax, cmap="viridis", vmin=vmin, vmax=vmax,
                cbar_kws={"label": value, "pad": 0.01, "extend": _extend(piv, vmin, vmax)},
                xticklabels=list(names["short"]), yticklabels=True)
    ax.set_facecolor("0.85")
    ys, xs = np.nonzero(causal.fillna(False).to_numpy(bool))
    ax.scatter(xs + 0.5, ys + 0.5, s=7, c="red", marker="o", linewidths=0)
    ax.tick_params(axis="x", labelsize=5, rotation=90)
    ax.tick_params(axis="y", rotation=0)
    for tick, kind in zip(ax.get_xticklabels(), names["kind"]):
        tick.set_color(KIND_COLORS.get(kind, "black"))
    ax.set_xlabel("UNet layer (forward order; grey resnet, blue self-attn, red cross-attn, green ff)")
    ax.set_ylabel("")
    ax.set_title(title or f"UNet causal tracing: {value} per attribute (dots: causal, τ = {table_tau(table)})",
                 fontsize=9)
    fig.tight_layout()
    return fig


def _extend(values: pd.DataFrame, vmin: float, vmax: float) -> str:
    """The colour bar's ``extend`` for ``values`` clipped to [vmin, vmax]: which ends have values beyond them."""
    below, above = bool((values < vmin).any().any()), bool((values > vmax).any().any())
    return {(False, False): "neither", (True, False): "min", (False, True): "max", (True, True): "both"}[below, above]


def unet_recovery_profile(table: pd.DataFrame, title: str | None = None, floor: float = -0.5):
    """ROME-style line plot, one panel per attribute: each UNet layer's recovery (forward order) with its 95% bootstrap
    interval over items (``recovery_lo``/``recovery_hi`` of ``unet_layer_table``), points coloured by kind, τ dashed;
    the y axis starts at ``floor`` (values below it drawn as triangles on it)."""
    attrs = sorted(table["attribute"].unique())
    fig, axes = plt.subplots(len(attrs), 1, figsize=(max(6.0, 0.12 * table["layer_index"].nunique() + 2),
                                                     1.5 * len(attrs) + 0.9), sharex=True, squeeze=False)
    tau = float(table["tau"].iloc[0])
    for ax, attr in zip(axes[:, 0], attrs):
        t = table[table["attribute"] == attr].sort_values("layer_index")
        x = t["layer_index"].to_numpy()
        ax.fill_between(x, t["recovery_lo"], t["recovery_hi"], color="0.8", lw=0, label="95% interval")
        ax.plot(x, t["recovery"], color="0.35", lw=0.8)
        for kind, color in KIND_COLORS.items():
            k = t[t["kind"] == kind]
            ax.scatter(k["layer_index"], k["recovery"], s=9, color=color, label=kind, zorder=3)
        ax.axhline(tau, color="black", lw=0.8, ls="--", label=f"τ = {tau:.2f}")
        low = t["recovery"] < floor  # restoring e.g. the first resnet alone can push far below the corrupted score
        ax.scatter(t.loc[low, "layer_index"], np.full(int(low.sum()), floor), marker="v", s=14, color="black",
                   zorder=4, label=f"< {floor:g} (clipped)" if attr == attrs[0] else None)
        top = np.nanmax([1.0, t["recovery_hi"].max(), t["recovery"].max()])  # a layer without interval has NaN bounds
        ax.set_ylim(floor - 0.05, float(top) + 0.05)
        ax.set_ylabel(attr, fontsize=8)
        ax.tick_params(labelsize=7)
    names = table.drop_duplicates("layer_index").sort_values("layer_index")
    step = max(1, len(names) // 24)
    axes[-1, 0].set_xticks(names["layer_index"].to_numpy()[::step], names["short"].to_numpy()[::step], rotation=90,
                           fontsize=5)
    axes[-1, 0].set_xlabel("UNet layer (forward order)")
    axes[0, 0].legend(fontsize=6, ncols=6, loc="lower center", bbox_to_anchor=(0.5, 1.02))
    fig.suptitle(title or "UNet recovery per layer with 95% bootstrap intervals over (caption, seed) items", fontsize=9,
                 y=1.0)
    fig.tight_layout()
    return fig


def text_recovery_profile(table: pd.DataFrame, component: str = "text_encoder",
                          kinds: Sequence[str] = ("hidden", "self_attn", "mlp"),
                          groups: Sequence[str] = ("subject", "last_subject", "after", "eos")):
    """ROME's line plots: recovery per text-encoder layer for each token group (lines) with 95% bootstrap intervals
    over items (``text_token_table``), one row of panels per attribute, one column per site kind; τ dashed."""
    t = table[table["component"] == component]
    kinds = [k for k in kinds if k in set(t["kind"])]
    if t.empty or not kinds:
        raise ValueError(f"no rows of {component!r} for kinds {list(kinds)} in the table")
    tau = float(t["tau"].iloc[0])
    attrs = sorted(t["attribute"].unique())
    fig, axes = plt.subplots(len(attrs), len(kinds), figsize=(3.2 * len(kinds), 2.1 * len(attrs) + 0.5), sharey=True,
                             sharex=True, squeeze=False)
    palette = dict(zip(GROUP_ORDER, sns.color_palette("tab10", len(GROUP_ORDER))))
    for row, attr in zip(axes, attrs):
        a = t[t["attribute"] == attr]
        for ax, kind in zip(row, kinds):
            for g in [g for g in groups if g in set(a["token_group"])]:
                d = a[(a["kind"] == kind) & (a["token_group"] == g)].sort_values("layer_index")
                ax.fill_between(d["layer_index"], d["recovery_lo"], d["recovery_hi"], color=palette[g], alpha=0.2,
                                lw=0)
                ax.plot(d["layer_index"], d["recovery"], marker="o", ms=3, lw=1, color=palette[g], label=g)
            ax.axhline(tau, color="black", lw=0.8, ls="--")
            ax.set_title(f"{attr} · {kind}", fontsize=8)
            ax.set_xticks(sorted(t["layer_index"].unique()))
            ax.tick_params(labelsize=7)
        row[0].set_ylabel("recovery", fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("layer")
    handles = {h.get_label(): h for ax in axes.flat for h in ax.get_lines() if not h.get_label().startswith("_")}
    fig.legend(list(handles.values()), list(handles), fontsize=6, ncols=len(handles), loc="lower center",
               bbox_to_anchor=(0.5, 0.0))
    fig.suptitle(f"{component}: recovery by layer and token group, per attribute; 95% bootstrap intervals "
                 f"(τ = {tau:.2f} dashed)", fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def table_tau(table: pd.DataFrame) -> str:
    return f"{table['tau'].iloc[0]:.2f}" if "tau" in table and len(table) else "?"


def kind_bars(table: pd.DataFrame):
    """Mean recovery per attribute and UNet layer kind (the "distributed / cross-attention not causal" view)."""
    fig, ax = plt.subplots(figsize=(6, 2.6))
    sns.barplot(table, x="attribute", y="recovery", hue="kind", palette=KIND_COLORS, ax=ax, errorbar=("ci", 95), seed=0,
                hue_order=[k for k in KIND_COLORS if k in set(table["kind"])])
    ax.axhline(float(table["tau"].iloc[0]), color="black", lw=0.8, ls="--", label="τ")
    ax.set_ylabel("mean recovery")
    ax.set_xlabel("")
    ax.legend(fontsize=7, ncols=5, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    fig.tight_layout()
    return fig


def token_group_maps(df: pd.DataFrame, component: str = "text_encoder", split: str | None = "test",
                     kinds: Sequence[str] = ("hidden", "self_attn", "mlp"), value: str = "recovery"):
    """ROME-style panels, one row per attribute and one column per site kind: token group (rows) × text-encoder layer
    (columns); ``value`` per cell (``recovery``: the ratio of sums of ``report.text_token_table``,
    ``group_recovery``, over the attribute's captions). Each panel has its colour bar (values beyond [0, 1] take the
    end colours: pointed ends); missing cells are grey."""
    d = pick_split(df[df["component"] == component], split)
    tau = float(d["tau"].iloc[0])
    groups = [g for g in GROUP_ORDER if g in set(d["token_group"])]
    attrs = sorted(d["attribute"].unique())
    fig, axes = plt.subplots(len(attrs), len(kinds), figsize=(3.6 * len(kinds), (0.3 * len(groups) + 0.7) * len(attrs)
                                                              + 0.6), squeeze=False)
    for row, attr in zip(axes, attrs):
        a = d[d["attribute"] == attr]
        for ax, kind in zip(row, kinds):
            piv = _cells(a[a["kind"] == kind], value).reindex(groups)
            sns.heatmap(piv, ax=ax, cmap={"hidden": "Purples", "self_attn": "Greens", "mlp": "Reds"}.get(kind, "viridis"),
                        vmin=0, vmax=1, annot=piv.shape[1] <= 6, fmt=".2f", annot_kws={"fontsize": 6},
                        cbar_kws={"extend": _extend(piv, 0, 1), "pad": 0.02})
            ax.set_facecolor("0.85")
            ax.set_title(f"{attr} · {kind}", fontsize=8)
            ax.set_xlabel("layer" if attr == attrs[-1] else "")
            ax.set_ylabel("")
            ax.tick_params(labelsize=7)
    fig.suptitle(f"{component}: restoring one state at one token group, per attribute ({value}; τ = {tau:.2f})",
                 fontsize=9)
    fig.tight_layout()
    return fig


def _cells(d: pd.DataFrame, value: str) -> pd.DataFrame:
    """token group × layer: the cells' ``group_recovery`` for ``value == "recovery"``, else the mean of ``value``."""
    if value == "recovery":
        return group_recovery(d, ("token_group", "layer_index")).unstack("layer_index")
    return d.pivot_table(index="token_group", columns="layer_index", values=value, aggfunc="mean")


def token_layer_maps(df: pd.DataFrame, caption: str, seed: int | None = None, component: str = "text_encoder",
                     kinds: Sequence[str] = ("hidden", "self_attn", "mlp"), value: str = "recovery",
                     subject: str | None = None):
    """ROME's per-prompt figure: token (rows, the caption's tokens) × layer (columns), one panel per kind."""
    d = df[(df["component"] == component) & (df["caption"] == caption)]
    if subject is not None:
        d = d[d["subject"] == subject]
    if seed is not None:
        d = d[d["seed"] == seed]
    if d.empty:
        raise ValueError(f"no {component} rows for caption {caption!r}")
    toks = d.drop_duplicates("token").sort_values("token")
    labels = [f"{s.replace('</w>', '')}{'*' if g in ('subject', 'last_subject') else ''}"
              for s, g in zip(toks["token_str"], toks["token_group"])]
    fig, axes = plt.subplots(1, len(kinds), figsize=(2.6 * len(kinds) + 1, 0.26 * len(toks) + 1.3), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        piv = d[d["kind"] == kind].pivot_table(index="token", columns="layer_index", values=value, aggfunc="mean")
        piv = piv.reindex(toks["token"])
        sns.heatmap(piv, ax=ax, cmap={"hidden": "Purples", "self_attn": "Greens", "mlp": "Reds"}.get(kind, "viridis"),
                    vmin=0, vmax=1, cbar_kws={"extend": _extend(piv, 0, 1), "pad": 0.02},
                    yticklabels=labels if kind == kinds[0] else False)
        ax.set_facecolor("0.85")  # missing cells
        ax.set_title(kind, fontsize=9)
        ax.set_xlabel("layer")
        ax.set_ylabel("")
        ax.tick_params(axis="y", labelsize=7, rotation=0)
    fig.suptitle(f"{caption!r} (* subject tokens; {value})", fontsize=9)
    fig.tight_layout()
    return fig


def restored_grid(traces: Sequence[Trace], row_labels: Sequence[str], col_labels: Sequence[str] | None = None,
                  title: str | None = None, scale: float = 1.25, cell_labels: bool = True):
    """One row per trace: clean, corrupted, then its restored images; each cell titled by what it restored
    (``short_layer`` of the trace's label) and its CLIP-Score when the trace carries ``scores``."""
    n = 2 + max(len(t.restored) for t in traces)
    imgs = []
    for t in traces:
        row = [t.clean[0], t.corrupted[0], *t.restored]
        row += [torch.ones_like(t.clean[0])] * (n - len(row))
        imgs += row
    fig = image_grid(torch.stack(imgs), len(traces), n, row_labels=row_labels, col_labels=col_labels, title=title,
                     scale=scale)
    if cell_labels and col_labels is None:
        axes = np.asarray(fig.axes).reshape(len(traces), n)
        for r, t in enumerate(traces):
            scores = getattr(t, "scores", None)
            names = ["clean", "corrupted", *[short_layer(x.split("@")[0]) + ("@" + x.split("@")[1] if "@" in x else "")
                                             for x in t.labels]]
            for c, name in enumerate(names):
                s = f"\n{scores[c]:.1f}" if scores is not None and c < len(scores) else ""
                axes[r, c].set_title(f"{name}{s}", fontsize=5)
        fig.tight_layout()
    return fig
