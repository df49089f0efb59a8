"""Scoring traces: CLIP-Score rows, recovery of the clean−corrupted gap, and the causal-threshold rule.

Rule. For a restored run with CLIP-Score ``s`` (against the caption), clean score ``s_clean`` and corrupted score
``s_corr`` of the same caption × seed, the row *recovery* is ``r = (s − s_corr) / (s_clean − s_corr)``; it is
undefined (NaN, never causal) when the gap ``s_clean − s_corr`` is at most ``min_gap`` (the corruption did not lower
the score) or when a run produced NaN. A row is causal when ``r ≥ τ``.

A group of rows — an (attribute, UNet layer), ``UNET_GROUP``, or an (attribute, component, kind, layer, token group)
text cell, ``TEXT_GROUP`` — has the recovery ``Σ(s − s_corr) / Σ(s_clean − s_corr)`` over its rows with a defined ``r``
(``group_recovery``; ROME's average: mean restored score relative to mean clean and corrupted scores), so an item
with a tiny gap cannot dominate; the group is causal when that ratio is ``≥ τ`` (``lib.tracing.report``).

``τ`` is chosen on the validation split (``split == "val"``) by ``choose_tau``: without labels, Otsu's threshold of
the validation split's group recoveries (the statistic the layer verdicts threshold; clipped to [0, 1]): the ``τ``
that best separates them into two groups, since restoring a non-causal state leaves the recovery near 0 and a causal
one brings it near 1. Text cells at tokens before the subject (``UNAFFECTED_GROUPS``) are left out of that pool: the
CLIP text encoder is causally masked and the noise touches only the subject's tokens, so their states are the same in
the clean and the corrupted run and their recovery is 0 by construction, not a measurement; counted, they would pull
``τ`` down. With per-row labels (e.g. "the restored image shows the attribute", from a classifier of the toy
world) the ``τ`` of the grid with the best balanced accuracy on the row recoveries. ``τ`` stays a parameter
everywhere (``mark_causal(df, tau=...)``).
"""

from __future__ import annotations

import math
import numbers
import zlib
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from lib.scoring import ClipScorer
from lib.tracing.unet import Trace

COLUMNS: tuple[str, ...] = (
    "model", "caption", "subject", "attribute", "split", "seed", "noise_seed", "component", "kind", "layer",
    "layer_index", "token", "token_str", "token_group", "score", "clean_score", "corrupted_score", "nan",
)
TAU_GRID = np.round(np.arange(0.05, 0.951, 0.01), 2)
MIN_GAP = 1.0  # default smallest clean − corrupted CLIP-Score gap with a recovery (notebooks 04/05's MIN_GAP)
UNET_GROUP: tuple[str, ...] = ("attribute", "layer", "layer_index")  # a cell of report.unet_layer_table
# a cell of report.text_token_table: per attribute, since which token group a caption's subject reaches depends on it
# (multi-token subjects, "van gogh", are mostly styles), so pooling the attributes would compare different captions
TEXT_GROUP: tuple[str, ...] = ("attribute", "component", "kind", "layer_index", "token_group")
UNAFFECTED_GROUPS: tuple[str, ...] = ("bos", "before")  # before the subject: unchanged by its corruption (causal mask)


@torch.no_grad()
def clip_scores(scorer: ClipScorer, images: torch.Tensor, caption: str, batch_size: int = 64) -> np.ndarray:
    """CLIP-Score of each image against ``caption``; non-finite images score NaN (the others are unaffected)."""
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size]
        ok = torch.isfinite(x.flatten(1)).all(1)
        s = scorer.score(torch.where(ok.view(-1, 1, 1, 1), x, torch.zeros_like(x)), [caption] * len(x)).float()
        out.append(torch.where(ok.to(s.device), s, torch.full_like(s, float("nan"))).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


def token_group(pos: int, subject: Sequence[int], n_tokens: int) -> str:
    """ROME-style token groups: bos, before, subject, last_subject, after, eos, pad (``-1``: UNet rows, '')."""
    if pos < 0:
        return ""
    if pos == 0:
        return "bos"
    if pos < subject[0]:
        return "before"
    if pos == subject[-1]:
        return "last_subject"
    if pos in subject:
        return "subject"
    if pos == n_tokens - 1:
        return "eos"
    return "pad" if pos >= n_tokens else "after"


def trace_rows(trace: Trace, scorer: ClipScorer, caption: str, *, model: str, subject: str, attribute: str,
               split: str, seed: int, noise_seed: int, subject_tokens: Sequence[int], n_tokens: int,
               batch_size: int = 64) -> pd.DataFrame:
    """Tidy rows (``COLUMNS``) of one trace: one row per restored run, clean/corrupted scores repeated."""
    if len(trace.meta) != len(trace.restored):
        raise ValueError("the trace has no per-run metadata (single-layer UNet traces and text traces have it)")
    ref = clip_scores(scorer, torch.cat([trace.clean, trace.corrupted]), caption, batch_size)
    scores = clip_scores(scorer, trace.restored, caption, batch_size)
    rows = pd.DataFrame(trace.meta)
    rows["token_group"] = [token_group(int(t), list(subject_tokens), n_tokens) for t in rows["token"]]
    rows = rows.assign(model=model, caption=caption, subject=subject, attribute=attribute, split=split,
                       seed=int(seed), noise_seed=int(noise_seed), score=scores, clean_score=float(ref[0]),
                       corrupted_score=float(ref[1]))
    rows["nan"] = trace.nan.numpy() | trace.nan_clean | trace.nan_corrupted | ~np.isfinite(scores)
    return rows[list(COLUMNS)]


def recovery(df: pd.DataFrame, min_gap: float = 0.0) -> pd.Series:
    """``(score − corrupted) / (clean − corrupted)``; NaN where the gap is ≤ ``min_gap`` or the row is flagged NaN."""
    gap = df["clean_score"] - df["corrupted_score"]
    r = (df["score"] - df["corrupted_score"]) / gap.where(gap > min_gap)
    return r.where(~df["nan"].astype(bool))


def _gaps(df: pd.DataFrame, cols: list[str], min_gap: float | None) -> pd.DataFrame:
    """``cols`` with ``num = score − corrupted`` and ``den = clean − corrupted``, NaN where the row recovery is
    undefined (``min_gap=None``: the rows' ``recovery`` column)."""
    ok = (df["recovery"] if min_gap is None else recovery(df, min_gap)).notna()
    return df[cols].assign(num=(df["score"] - df["corrupted_score"]).where(ok),
                           den=(df["clean_score"] - df["corrupted_score"]).where(ok))


def group_recovery(df: pd.DataFrame, by: Sequence[str], min_gap: float | None = None) -> pd.Series:
    """Per group of ``by`` (sorted): ``Σ(score − corrupted) / Σ(clean − corrupted)`` over the rows with a defined row
    recovery (gap > ``min_gap``, not NaN-flagged; ``min_gap=None``: the rows' ``recovery`` column, as ``mark_causal``
    set it); NaN for a group without such rows."""
    sums = _gaps(df, list(by), min_gap).groupby(list(by), sort=True)[["num", "den"]].sum(min_count=1)
    return (sums["num"] / sums["den"]).rename("recovery")


def _key_text(value) -> str:
    """A key part as text, a whole number as an integer (``3``, ``np.int64(3)`` and ``3.0`` alike: a parquet column
    with a missing value reads back as float)."""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer():
        return str(int(value))
    return str(value)


def group_rng(seed: int, key) -> np.random.Generator:
    """The bootstrap generator of one group: seeded by ``seed`` and the group's key (a value or a tuple of values,
    read as text, so ``np.int64(3)``, ``3`` and ``3.0`` are one key), independent of any other group."""
    parts = key if isinstance(key, tuple) else (key,)
    return np.random.default_rng([int(seed), 1, zlib.crc32("\x1f".join(map(_key_text, parts)).encode())])


def group_recovery_ci(df: pd.DataFrame, by: Sequence[str], level: float = 0.95, n_boot: int = 2000, seed: int = 0,
                      min_gap: float | None = None) -> pd.DataFrame:
    """``group_recovery`` per group of ``by`` (sorted) with a percentile bootstrap interval at ``level``.

    The resampled unit is the probe (caption, subject) with all its rows: the several tokens of a text token group
    share an item's clean and corrupted scores, and the image seeds of one caption are not independent draws (resampled
    one by one, 3 seeds of 6 captions made the intervals too narrow; review, 2026-12-06); with one seed per caption it
    is the item. Each group draws from its own generator, seeded by ``seed`` and the group's key (:func:`group_rng`):
    the same rows of a group give the same interval whatever other groups the table holds (one shared generator made
    a cell's interval depend on the cells sorted before it). A group with a single probe has no interval
    (NaN bounds: nothing to resample, and a zero-width interval would read as certainty); columns ``recovery``, ``recovery_lo``, ``recovery_hi``, ``items`` (the
    group's (caption, subject, seed) items) and ``probes``.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    probe = [c for c in ("caption", "subject") if c in df.columns] or [c for c in ("seed",) if c in df.columns]
    item = probe + [c for c in ("seed",) if c in df.columns and c not in probe]
    if not probe:  # no item columns: every row is its own item
        df, probe, item = df.assign(_row=np.arange(len(df))), ["_row"], ["_row"]
    parts = _gaps(df, list(by) + item, min_gap).dropna(subset=["num"])
    levels = list(range(len(by)))
    items = {k: len(g) for k, g in parts.groupby(list(by) + item, sort=True).size().groupby(level=levels, sort=True)}
    per_probe = parts.groupby(list(by) + probe, sort=True)[["num", "den"]].sum()
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    rows = {}
    for key, g in per_probe.groupby(level=levels, sort=True):
        num, den = g["num"].to_numpy(float), g["den"].to_numpy(float)
        value = num.sum() / den.sum()
        if len(g) > 1:
            idx = group_rng(seed, key).integers(0, len(g), size=(n_boot, len(g)))
            lo, hi = np.percentile(num[idx].sum(1) / den[idx].sum(1), q)
        else:
            lo = hi = np.nan
        rows[key] = (value, lo, hi, items[key], len(g))
    out = pd.DataFrame.from_dict(rows, orient="index",
                                 columns=["recovery", "recovery_lo", "recovery_hi", "items", "probes"])
    out = out.astype({"recovery": float, "recovery_lo": float, "recovery_hi": float, "items": int,
                      "probes": int})  # also when empty
    out.index = pd.MultiIndex.from_tuples(out.index, names=list(by)) if len(by) > 1 else pd.Index(
        [k[0] if isinstance(k, tuple) else k for k in out.index], name=by[0])
    return out


def layer_recoveries(df: pd.DataFrame, min_gap: float | None = None) -> np.ndarray:
    """The group recoveries the reports threshold: UNet rows per ``UNET_GROUP``, text rows per ``TEXT_GROUP`` (cells
    of ``UNAFFECTED_GROUPS`` left out: 0 by construction)."""
    unet = df["component"] == "unet"
    unaffected = df["token_group"].isin(UNAFFECTED_GROUPS) if "token_group" in df else pd.Series(False, df.index)
    text = ~unet & ~unaffected
    parts = [group_recovery(d, by, min_gap) for d, by in ((df[unet], UNET_GROUP), (df[text], TEXT_GROUP))
             if len(d)]
    return np.concatenate([p.to_numpy(float) for p in parts]) if parts else np.zeros(0)


def middle_of_best(scores: Sequence[float], grid: np.ndarray) -> float:
    """The grid value in the middle of the first run of equal best ``scores``: every threshold in a gap between two
    groups scores the same, and the middle of the gap, not its low edge just above the lower group, is the threshold
    that new values (the test split) cross least by chance."""
    s = np.asarray(scores, dtype=float)
    i0 = i1 = int(np.argmax(s))
    while i1 + 1 < len(s) and s[i1 + 1] == s[i0]:
        i1 += 1
    return float(grid[(i0 + i1) // 2])


def otsu(values: np.ndarray, grid: np.ndarray = TAU_GRID) -> float:
    """The grid threshold maximising the between-group variance of ``values`` (clipped to [0, 1]); of the equal best
    ones (one split of the values), the middle (:func:`middle_of_best`)."""
    v = np.round(np.clip(values[np.isfinite(values)], 0.0, 1.0), 9)  # 0.8999999999 (a ratio of sums) is 0.9
    if len(v) == 0:
        raise ValueError("no finite recovery values to choose a threshold from")
    between = np.full(len(grid), -1.0)
    for i, t in enumerate(grid):
        lo, hi = v[v < t], v[v >= t]
        if len(lo) and len(hi):
            between[i] = len(lo) * len(hi) / len(v) ** 2 * (lo.mean() - hi.mean()) ** 2
    best_t = middle_of_best(between, grid) if between.max() >= 0 else None
    if best_t is None:  # was a silent 0.5, printed as Otsu's choice
        raise ValueError(f"Otsu's threshold is undefined: all {len(v)} recoveries ({v.min():.3g}–{v.max():.3g}) lie on "
                         f"one side of every grid value ({grid[0]:g}–{grid[-1]:g}); pass a numeric τ (TAU): the "
                         f"sweep's traced items are kept and resume")
    return best_t


def choose_tau(df: pd.DataFrame, labels: str | None = None, split: str = "val", min_gap: float = 0.0,
               grid: np.ndarray = TAU_GRID) -> float:
    """``τ`` from the rows of ``split``: best balanced accuracy of the row recoveries against bool column ``labels``,
    else Otsu on the split's group recoveries (``layer_recoveries``: the values the layer verdicts compare to ``τ``);
    in both, the middle of the equal best thresholds (:func:`middle_of_best`)."""
    val = df[df["split"] == split]
    if val.empty:
        raise ValueError(f"no rows with split == {split!r} to choose the threshold on")
    r = recovery(val, min_gap).to_numpy()
    if not np.isfinite(r).any():
        raise ValueError(f"no {split} item has a clean − corrupted CLIP-Score gap above min_gap={min_gap:g} (the "
                         "corruption did not lower the score, e.g. random weights): nothing to choose τ from; "
                         "pass a numeric τ (TAU) or a lower min_gap (MIN_GAP)")
    if labels is None:
        return otsu(layer_recoveries(val, min_gap), grid)
    y = val[labels].astype(bool).to_numpy()
    ok = np.isfinite(r)
    if y[ok].all() or not y[ok].any():
        raise ValueError(f"column {labels!r} needs both True and False rows among finite recoveries")
    acc = [0.5 * (((r[ok] >= t) & y[ok]).sum() / y[ok].sum() + ((r[ok] < t) & ~y[ok]).sum() / (~y[ok]).sum())
           for t in grid]
    return middle_of_best(acc, grid)


def mark_causal(df: pd.DataFrame, tau: float, min_gap: float = 0.0) -> pd.DataFrame:
    """A copy with ``recovery``, ``causal`` (``recovery ≥ tau``; False where undefined), ``tau`` and ``min_gap``
    columns."""
    out = df.copy()
    out["recovery"] = recovery(out, min_gap)
    out["causal"] = (out["recovery"] >= tau).fillna(False).astype(bool)
    out["tau"] = float(tau)
    out["min_gap"] = float(min_gap)
    return out


def summarize(df: pd.DataFrame, by: Sequence[str] = ("attribute", "component", "kind", "layer", "layer_index"),
              z: float = 1.96) -> pd.DataFrame:
    """Per group: n, mean of the row recoveries with a normal 95% interval, fraction causal with a Wilson 95%
    interval (descriptive; the layer verdicts use ``group_recovery``)."""
    def one(g: pd.DataFrame) -> pd.Series:
        r = g["recovery"].dropna()
        n, k = len(g), int(g["causal"].sum())
        half = z * r.std(ddof=1) / np.sqrt(len(r)) if len(r) > 1 else np.nan
        p = k / n if n else np.nan
        den = 1 + z**2 / n
        mid = (p + z**2 / (2 * n)) / den
        w = z * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / den
        return pd.Series(dict(n=n, recovery=r.mean() if len(r) else np.nan, recovery_lo=r.mean() - half,
                              recovery_hi=r.mean() + half, causal_frac=p, causal_lo=mid - w, causal_hi=mid + w))

    return df.groupby(list(by), sort=False).apply(one, include_groups=False).reset_index()
