"""Restored-image examples for the notebooks' grids: re-trace one caption per attribute at a few chosen states
(the sweep itself keeps only scores), with the CLIP-Score of every image attached as ``trace.scores``."""

from __future__ import annotations

from typing import Sequence

import pandas as pd
import torch

from lib.prompts import subject_positions
from lib.sampling import conditioning_layers
from lib.scoring import ClipScorer
from lib.tracing.corrupt import Corruption
from lib.tracing.layers import TextSite, text_sites
from lib.tracing.report import top_layers
from lib.tracing.score import clip_scores
from lib.tracing.sweep import SweepConfig
from lib.tracing.text_encoder import trace_text
from lib.tracing.unet import Trace, trace_unet


def one_per_attribute(probes: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """The first probe row of each attribute in ``split`` (or in any split when the attribute has none there)."""
    rows = []
    for attr, g in probes.groupby("attribute", sort=True):
        pick = g[g["split"] == split]
        rows.append((pick if len(pick) else g).iloc[0])
    return pd.DataFrame(rows).reset_index(drop=True)


def largest_gap_per_attribute(df: pd.DataFrame, probes: pd.DataFrame) -> pd.DataFrame:
    """Per attribute, the probe row whose traced (caption, seed) had the largest clean − corrupted CLIP-Score gap
    (the clearest example of what the corruption removes), with that ``seed`` (the examples re-trace at it)."""
    items = df.drop_duplicates(["caption", "subject", "seed"]).assign(gap=lambda d: d["clean_score"] - d["corrupted_score"])
    best = items.sort_values(["gap", "caption", "seed"], ascending=[False, True, True]).drop_duplicates("attribute")
    keys = best.sort_values("attribute")[["caption", "subject", "seed"]]
    return keys.merge(probes, on=["caption", "subject"], how="left")[["caption", "subject", "attribute", "split",
                                                                      "seed"]]


def largest_gap_item(df: pd.DataFrame) -> pd.Series:
    """The traced (caption, subject, seed) with the largest clean − corrupted CLIP-Score gap over all attributes."""
    items = df.drop_duplicates(["caption", "subject", "seed"]).assign(gap=lambda d: d["clean_score"] - d["corrupted_score"])
    return items.sort_values(["gap", "caption"], ascending=[False, True]).iloc[0]


def attach_scores(trace: Trace, scorer: ClipScorer, caption: str) -> Trace:
    """``trace.scores``: CLIP-Score of [clean, corrupted, *restored] against ``caption``."""
    trace.scores = clip_scores(scorer, torch.cat([trace.clean, trace.corrupted, trace.restored]), caption)
    return trace


def _corruption(cfg: SweepConfig, seed: int) -> Corruption:
    return Corruption(cfg.multiplier, cfg.noise_seed).at(seed)  # the sweep's noise for this (caption, seed)


def _seed(row, seed: int | None) -> int:
    """``seed`` when given, else the item's own ``seed`` column (``largest_gap_per_attribute``'s traced seed)."""
    if seed is None and getattr(row, "seed", None) is None:
        raise ValueError("the items have no 'seed' column: pass seed=...")
    return int(row.seed if seed is None else seed)


@torch.no_grad()
def unet_examples(pipe, scorer: ClipScorer, items: pd.DataFrame, table: pd.DataFrame, cfg: SweepConfig,
                  seed: int | None = None, k: int = 3) -> list[Trace]:
    """Per item, at ``seed`` (None: the item's own ``seed``): the ``k`` most causal layers of its attribute
    (``table``: ``report.unet_layer_table``) and the best cross-attention layer, restored one at a time."""
    out = []
    for row in items.itertuples():
        layers, s = top_layers(table, row.attribute, k), _seed(row, seed)
        tr = trace_unet(pipe, row.caption, row.subject, s, layers, steps=cfg.steps, guidance=cfg.guidance,
                        corruption=_corruption(cfg, s), batch_size=max(2, min(cfg.batch_size, len(layers) + 2)),
                        uncond=cfg.uncond, negative=cfg.negative)
        out.append(attach_scores(tr, scorer, row.caption))
    return out


def text_example_sites(pipe, encoder: str = "text_encoder") -> list[TextSite]:
    """Layer-0 self-attention, MLP and hidden state, and the self-attention of the last layer that reaches the UNet
    (SDXL conditions on the penultimate hidden state: its last layer's restoration would always be the corrupted
    image), of ``encoder``."""
    last = conditioning_layers(pipe, encoder) - 1
    sites = text_sites(pipe, [encoder], kinds=("self_attn", "mlp", "hidden"), layers=[0])
    return sites + text_sites(pipe, [encoder], kinds=("self_attn",), layers=[last])


@torch.no_grad()
def text_examples(pipe, scorer: ClipScorer, items: pd.DataFrame, cfg: SweepConfig, seed: int | None = None,
                  sites: Sequence[TextSite] | None = None) -> list[Trace]:
    """Per item, at ``seed`` (None: the item's own ``seed``): each of ``sites`` (default ``text_example_sites``)
    restored at the last subject token."""
    sites = text_example_sites(pipe) if sites is None else list(sites)
    out = []
    for row in items.itertuples():
        last, s = subject_positions(pipe.tokenizer, row.caption, row.subject)[-1], _seed(row, seed)
        tr = trace_text(pipe, row.caption, row.subject, s, sites, tokens=[last], steps=cfg.steps,
                        guidance=cfg.guidance, corruption=_corruption(cfg, s), batch_size=cfg.batch_size,
                        negative=cfg.negative)
        tr.labels = [label.split("@")[0] + "@last" for label in tr.labels]  # same columns for every caption
        out.append(attach_scores(tr, scorer, row.caption))
    return out


def example_scores(traces: Sequence[Trace], items: pd.DataFrame) -> pd.DataFrame:
    """Tidy CLIP-Scores of the example images (attribute, image, score), rounded to 3 decimals."""
    from lib.tracing.report import short_layer

    rows = []
    for tr, row in zip(traces, items.itertuples()):
        names = ["clean", "corrupted", *[short_layer(x.split("@")[0]) + ("@" + x.split("@")[1] if "@" in x else "")
                                         for x in tr.labels]]
        rows += [dict(attribute=row.attribute, image=n, score=round(float(s), 3)) for n, s in zip(names, tr.scores)]
    return pd.DataFrame(rows)


__all__ = ["one_per_attribute", "largest_gap_per_attribute", "largest_gap_item", "attach_scores", "unet_examples",
           "text_examples", "text_example_sites", "example_scores"]
