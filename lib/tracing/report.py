"""Tables that notebooks 04 and 05 print: score gaps, per-layer summaries, and the paper's findings checked.

All functions take the tidy rows of ``lib.tracing.sweep.collect`` (with ``recovery``, ``causal`` and ``tau``).
Layer-level rule: an (attribute, layer) — or an (attribute, component, kind, layer, token group) cell of the text
encoder — is
*causal* when its recovery ``Σ(score − corrupted) / Σ(clean − corrupted)`` over its rows on ``split`` with a defined
row recovery (``lib.tracing.score.group_recovery``) is at least ``τ``; ``τ = "otsu"`` is chosen on these same group
recoveries of the validation split. The row-level ``causal`` flag (row recovery ≥ ``τ``) is kept in the rows.
Tables and findings carry ``tau`` and ``eval_split`` (``"all"``: the validation rows ``τ`` was chosen on are counted
too, an in-sample reading).
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import pandas as pd

from lib.tracing.layers import unet_kind
from lib.tracing.score import TEXT_GROUP, UNAFFECTED_GROUPS, UNET_GROUP, group_recovery_ci

GROUP_ORDER: tuple[str, ...] = ("bos", "before", "subject", "last_subject", "after", "eos")


def short_layer(name: str) -> str:
    """``down_blocks.1.attentions.0.transformer_blocks.0.attn1`` → ``d1.a0.attn1``; ``mid_block.resnets.0`` → ``m.r0``;
    ``text_encoder.encoder.layers.0.self_attn`` → ``L0.self_attn`` (``te2.`` for SDXL's second encoder)."""
    t = re.match(r"(text_encoder(?:_2)?)\.(?:text_model\.)?encoder\.layers\.(\d+)(?:\.(self_attn|mlp))?$", name)
    if t is not None:
        return f"{'te2.' if t.group(1).endswith('_2') else ''}L{t.group(2)}.{t.group(3) or 'hidden'}"
    m = re.match(r"(down_blocks|mid_block|up_blocks)(?:\.(\d+))?\.(resnets|attentions)\.(\d+)"
                 r"(?:\.transformer_blocks\.(\d+)\.(attn1|attn2|ff))?$", name)
    if m is None:
        return name
    group, block, part, j, t, sub = m.groups()
    head = {"down_blocks": "d", "mid_block": "m", "up_blocks": "u"}[group] + (block or "")
    s = f"{head}.{'r' if part == 'resnets' else 'a'}{j}"
    if t not in (None, "0"):
        s += f".t{t}"
    return f"{s}.{sub}" if sub else s


def unet_block(name: str) -> str:
    """``down``, ``mid`` or ``up``."""
    return name.split("_", 1)[0]


def pick_split(df: pd.DataFrame, split: str | None) -> pd.DataFrame:
    """Rows of ``split`` (``None``: all rows); ``ValueError`` naming the splits present when it has no rows."""
    if split is None:
        return df
    if split not in set(df["split"]):
        raise ValueError(f"no rows of split {split!r} (splits present: {sorted(set(df['split']))}); trace some "
                         "(N_TEST / N_VAL) or use split=None (EVAL_SPLIT='all') for every row")
    return df[df["split"] == split]


def clip_gap(df: pd.DataFrame) -> pd.DataFrame:
    """Per attribute: mean clean and corrupted CLIP-Score over the (caption, seed) items, and the gap."""
    items = df.drop_duplicates(["caption", "subject", "seed"])
    g = items.groupby("attribute", sort=True).agg(items=("caption", "size"), clean=("clean_score", "mean"),
                                                  corrupted=("corrupted_score", "mean"))
    g["gap"] = g["clean"] - g["corrupted"]
    g["gap_positive"] = items.assign(pos=items["clean_score"] > items["corrupted_score"]).groupby(
        "attribute", sort=True)["pos"].mean()
    return g.reset_index()


def nan_report(df: pd.DataFrame) -> pd.DataFrame:
    """Items with NaN/inf runs: caption, seed, component and how many restored runs were non-finite."""
    bad = df[df["nan"].astype(bool)]
    cols = ["caption", "subject", "seed", "component"]
    if bad.empty:
        return pd.DataFrame(columns=[*cols, "nan_runs"])
    return bad.groupby(cols, sort=True).size().rename("nan_runs").reset_index()


def unet_layer_table(df: pd.DataFrame, split: str | None = "test") -> pd.DataFrame:
    """Per (attribute, layer): kind, block, ``recovery`` (ratio of sums, ``group_recovery``) with its 95% bootstrap
    interval over items (``recovery_lo``/``recovery_hi``, ``group_recovery_ci``), fraction of causal rows, n, and the
    layer-level ``causal`` (``recovery ≥ τ``)."""
    d = pick_split(df[df["component"] == "unet"], split)
    tau = float(d["tau"].iloc[0])
    t = d.groupby(list(UNET_GROUP), sort=True).agg(causal_frac=("causal", "mean"), n=("score", "size"))
    t = t.join(group_recovery_ci(d, UNET_GROUP))[["recovery", "recovery_lo", "recovery_hi", "causal_frac", "n"]]
    t = t.reset_index()
    t["kind"] = t["layer"].map(unet_kind)
    t["block"] = t["layer"].map(unet_block)
    t["short"] = t["layer"].map(short_layer)
    t["causal"] = t["recovery"] >= tau
    t["tau"] = tau
    t["eval_split"] = split or "all"
    return t.sort_values(["attribute", "layer_index"]).reset_index(drop=True)


def unet_causal_counts(table: pd.DataFrame) -> pd.DataFrame:
    """Per attribute: causal layers in total, by kind and by block (the "distributed" finding)."""
    c = table[table["causal"]]
    rows = []
    for attr in sorted(table["attribute"].unique()):
        a = c[c["attribute"] == attr]
        row = {"attribute": attr, "causal_layers": len(a), "of": int((table["attribute"] == attr).sum())}
        row.update({k: int((a["kind"] == k).sum()) for k in ("resnet", "attn1", "attn2", "ff")})
        row.update({b: int((a["block"] == b).sum()) for b in ("down", "mid", "up")})
        rows.append(row)
    return pd.DataFrame(rows)


def text_token_table(df: pd.DataFrame, split: str | None = "test") -> pd.DataFrame:
    """Per (attribute, component, kind, layer, token group): ``recovery`` (ratio of sums, ``group_recovery``) with its
    95% bootstrap interval over items (``recovery_lo``/``recovery_hi``), fraction of causal rows, n, the cell-level
    ``causal`` (``recovery ≥ τ``) and ``unaffected`` (a token before the subject: the corruption cannot reach it, so
    its recovery is 0 by construction; ``lib.tracing.score.UNAFFECTED_GROUPS``)."""
    d = pick_split(df[df["component"] != "unet"], split)
    tau = float(d["tau"].iloc[0])
    t = d.groupby(list(TEXT_GROUP), sort=True).agg(causal_frac=("causal", "mean"), n=("score", "size"))
    t = t.join(group_recovery_ci(d, TEXT_GROUP))[["recovery", "recovery_lo", "recovery_hi", "causal_frac", "n"]]
    t = t.reset_index()
    t["causal"] = t["recovery"] >= tau
    t["unaffected"] = t["token_group"].isin(UNAFFECTED_GROUPS)
    t["tau"] = tau
    t["eval_split"] = split or "all"
    return t


def interval_counts(table: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    """Per group of ``by``: cells (layers), causal (recovery ≥ τ), *surely* causal (the 95% interval's lower end ≥ τ),
    *possibly* causal (its upper end ≥ τ; a causal cell without an interval counts here, so surely ≤ causal ≤
    possibly) and cells with a recovery but no interval (a single probe), from ``unet_layer_table`` /
    ``text_token_table``."""
    tau = table["tau"]
    no_interval = table["recovery"].notna() & table["recovery_lo"].isna()
    t = table.assign(cells=1, causal=table["causal"].astype(int), surely=(table["recovery_lo"] >= tau).astype(int),
                     possibly=((table["recovery_hi"] >= tau) | (no_interval & table["causal"])).astype(int),
                     no_interval=no_interval.astype(int))
    cols = ["cells", "causal", "surely", "possibly", "no_interval"]
    return t.groupby(list(by), sort=True)[cols].sum().reset_index()


def _fmt(x: float) -> str:
    return "nan" if not np.isfinite(x) else f"{x:.3f}"


NOT_TRACED = "undetermined (not traced)"
STRADDLES = "undetermined (intervals straddle τ)"


def cell_flags(table: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """(surely, possibly) causal per cell of a layer / token table: surely when the 95% interval's lower end reaches τ,
    possibly when its upper end does; nested with ``causal`` by construction (surely ⊆ causal ⊆ possibly, also should a
    percentile interval miss its point value). A cell without an interval (a single probe: nothing to resample) counts
    by its value for both, so a single-caption run gets the point verdicts; :func:`interval_counts`, which counts the
    intervals, does not count such a cell as surely causal (its ``no_interval`` column counts them)."""
    causal = table["causal"].astype(bool)
    if "recovery_lo" not in table or "recovery_hi" not in table:
        return causal, causal
    tau = table["tau"]
    no_interval = table["recovery_lo"].isna() | table["recovery_hi"].isna()
    surely = (((table["recovery_lo"] >= tau).fillna(False) & ~no_interval) | no_interval) & causal
    possibly = ((table["recovery_hi"] >= tau).fillna(False) & ~no_interval) | causal
    return surely.astype(bool), possibly.astype(bool)


def _verdict(ok: bool, defined: bool, traced: bool = True, sure: tuple[bool, bool] | None = None) -> str:
    """``reproduced`` / ``not reproduced``; ``undetermined`` when what the finding is about was not traced or has no
    finite recovery, or (``sure`` = (it holds whichever way each cell falls within its interval, it fails whichever
    way)) when neither is certain: the point values decide it, but a cell's interval straddles τ."""
    if not traced:
        return NOT_TRACED
    if not defined:
        return "undetermined (no finite recovery)"
    if sure is not None and not any(sure):
        return STRADDLES
    return "reproduced" if ok else "not reproduced"


def unet_findings(table: pd.DataFrame) -> pd.DataFrame:
    """The paper's UNet findings against ``unet_layer_table`` (one row each: finding, measured, verdict).

    ``verdict`` is ``reproduced``, ``not reproduced``, or ``undetermined``: ``(not traced)`` when the table holds no
    attn2 layer (cross-attention finding), or no attn1 layer or no ``style`` row at the first traced attn1 (style
    finding); ``(no finite recovery)`` when no layer has one (the corruption did not lower any item's CLIP-Score).
    """
    counts = unet_causal_counts(table).set_index("attribute")
    defined = bool(table["recovery"].notna().any())
    surely, possibly = cell_flags(table)
    rows = []
    spread = {a: int((counts.loc[a, ["down", "mid", "up"]] > 0).sum()) for a in counts.index}

    def distributed(flags: pd.Series) -> bool:  # every attribute: >= 2 of these cells, in >= 2 block groups
        blocks = [table.loc[flags & (table["attribute"] == a), "block"] for a in counts.index]
        return all(len(b) >= 2 and b.nunique() >= 2 for b in blocks)

    dist = distributed(table["causal"].astype(bool))

    rows.append(dict(
        finding="UNet knowledge is distributed (several causal layers, in more than one of down/mid/up)",
        measured="; ".join(f"{a}: {counts.loc[a, 'causal_layers']}/{counts.loc[a, 'of']} causal in {spread[a]} "
                           f"block group(s)" for a in counts.index),
        verdict=_verdict(dist, defined, sure=(distributed(surely), not distributed(possibly)))))
    is_x = table["kind"] == "attn2"
    x = table[is_x]
    n_x = x.groupby("attribute")["causal"].agg(["sum", "size"])  # size: the attn2 layers traced for it
    rows.append(dict(
        finding="cross-attention (attn2) layers are not causal",
        measured="; ".join(f"{a}: {int(n_x.loc[a, 'sum'])}/{int(n_x.loc[a, 'size'])} causal, max recovery "
                           f"{_fmt(x[x['attribute'] == a]['recovery'].max())}" for a in n_x.index),
        verdict=_verdict(bool(n_x["sum"].sum() == 0), defined, traced=len(x) > 0,
                         sure=(not possibly[is_x].any(), bool(surely[is_x].any())))))
    first = table[table["kind"] == "attn1"]["layer_index"].min()
    at_first = table["layer_index"] == first
    f = table[at_first].set_index("attribute")
    style_only = bool(f["causal"].get("style", False)) and not f.drop(index="style", errors="ignore")["causal"].any()
    sty = at_first & (table["attribute"] == "style")
    others = at_first & (table["attribute"] != "style")
    rows.append(dict(
        finding=f"the first self-attention ({short_layer(f['layer'].iloc[0]) if len(f) else '-'}) is causal for style only",
        measured="; ".join(f"{a}: recovery {_fmt(f.loc[a, 'recovery'])}{' (causal)' if f.loc[a, 'causal'] else ''}"
                           for a in f.index),
        verdict=_verdict(style_only, defined, traced="style" in f.index,
                         sure=(bool(surely[sty].any()) and not possibly[others].any(),
                               not possibly[sty].any() or bool(surely[others].any())))))
    return _with_reading(pd.DataFrame(rows), table)


def _with_reading(findings: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """``findings`` with the ``tau`` and ``eval_split`` of the table they read (``"all"``: in-sample for τ)."""
    for col in ("tau", "eval_split"):
        findings[col] = table[col].iloc[0] if col in table and len(table) else np.nan
    return findings


def text_findings(table: pd.DataFrame, kinds: Sequence[str] = ("self_attn", "mlp")) -> pd.DataFrame:
    """The paper's text-encoder finding, per encoder and attribute (the paper claims it for every attribute): one
    causal state, layer-0 self-attention at the last subject token (``undetermined (not traced)`` where the table
    lacks that cell). Cells are compared within one attribute's captions, since which token groups a caption has
    depends on its subject."""
    rows = []
    for (enc, attr), t in table.groupby(["component", "attribute"], sort=True):
        t = t[t["kind"].isin(kinds)]
        surely, possibly = cell_flags(t)
        causal = t[t["causal"]].sort_values("recovery", ascending=False)
        cells = [f"{r.kind} L{r.layer_index} @{r.token_group} ({_fmt(r.recovery)})" for r in causal.itertuples()]
        target = t[(t["kind"] == "self_attn") & (t["layer_index"] == 0) & (t["token_group"] == "last_subject")]
        best = t.sort_values("recovery", ascending=False).head(1)
        ok = len(causal) == 1 and len(target) == 1 and bool(target["causal"].iloc[0])
        is_target = t.index.isin(target.index)
        sure = (bool(surely[is_target].any()) and not possibly[~is_target].any(),
                not possibly[is_target].any() or bool(surely[~is_target].any()))
        rows.append(dict(
            finding=f"{enc}, {attr}: a single causal {'/'.join(kinds)} state, layer-0 self-attention at the last "
                    "subject token",
            measured=(f"causal cells: {', '.join(cells) if cells else 'none'}; self_attn L0 @last_subject recovery "
                      f"{_fmt(target['recovery'].iloc[0]) if len(target) else 'n/a'}; best cell "
                      + (f"{best['kind'].iloc[0]} L{best['layer_index'].iloc[0]} @{best['token_group'].iloc[0]}"
                         if len(best) else "n/a")),
            verdict=_verdict(ok, bool(t["recovery"].notna().any()), traced=len(target) > 0, sure=sure)))
    return _with_reading(pd.DataFrame(rows, columns=["finding", "measured", "verdict"]), table)


def top_layers(table: pd.DataFrame, attribute: str, k: int = 3, extra_kinds: Sequence[str] = ("attn2",)) -> list[str]:
    """The ``k`` layers with the highest recovery for ``attribute``, plus the best layer of each ``extra_kinds``."""
    t = table[table["attribute"] == attribute].sort_values(["recovery", "layer_index"], ascending=[False, True])
    names = list(t["layer"].head(k))
    for kind in extra_kinds:
        best = t[t["kind"] == kind]["layer"].head(1).tolist()
        names += [n for n in best if n not in names]
    return names
