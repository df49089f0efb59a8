"""Scoring images of the toy world against their known scenes: attribute classifiers and CLIP caption ranking."""

from __future__ import annotations

import difflib
import re
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from lib.toy import world as W
from lib.toy.classifiers import FAMILIES, AttributeClassifier, scene_label, to_tensor


def attribute_accuracy(images: np.ndarray | torch.Tensor, scenes: Sequence[W.Scene],
                       classifiers: AttributeClassifier | Mapping[str, AttributeClassifier]) -> pd.DataFrame:
    """Tidy counts: one row per (member, family, true value) with ``correct`` and ``n``.

    ``images``: uint8 (N, 64, 64, 3) or float (N, 3, H, W) in [0, 1].  Families a member lacks (the edge member has no
    "color") and scenes without a color are left out.
    """
    if len(images) != len(scenes):
        raise ValueError(f"{len(images)} images but {len(scenes)} scenes")
    members = {classifiers.name: classifiers} if isinstance(classifiers, AttributeClassifier) else dict(classifiers)
    x = to_tensor(images)
    rows = []
    for name, m in members.items():
        pred = m.predict(x)
        for f in m.families:
            for p, s in zip(pred[f], scenes):
                truth = scene_label(s, f)
                if truth is not None:
                    rows.append((name, f, truth, p == truth))
    df = pd.DataFrame(rows, columns=["member", "family", "value", "correct"])
    out = df.groupby(["member", "family", "value"], sort=False).agg(correct=("correct", "sum"), n=("correct", "size"))
    return out.reset_index().astype({"correct": int, "n": int})


def accuracy_table(images_or_counts, scenes: Sequence[W.Scene] | None = None,
                   classifiers: AttributeClassifier | Mapping[str, AttributeClassifier] | None = None) -> pd.DataFrame:
    """Accuracy per member (rows) and family (columns), from :func:`attribute_accuracy`'s counts or from
    ``(images, scenes, classifiers)``; NaN where a member has no such head."""
    counts = images_or_counts
    if not isinstance(counts, pd.DataFrame):
        counts = attribute_accuracy(images_or_counts, scenes, classifiers)
    g = counts.groupby(["member", "family"], sort=False)[["correct", "n"]].sum()
    table = (g.correct / g.n).unstack("family")
    return table.reindex(columns=[f for f in FAMILIES if f in table.columns]).rename_axis(columns=None)


# --------------------------------------------------------------------------------------------------- CLIP ranking
def _fix_articles(text: str) -> str:
    """"a orange" -> "an orange", "an red" -> "a red" (articles before the word that follows them)."""
    return re.sub(r"\b(a|an) (\w)", lambda m: ("an" if m.group(2) in "aeiou" else "a") + " " + m.group(2), text)


def swap_captions(text: str, scene: W.Scene) -> list[tuple[str, str, str]]:
    """Captions of ``scene`` with one attribute word swapped for another value of the same attribute, keeping the
    phrasing of ``text`` where the grammar allows (else the closest phrasing of the swapped scene).

    Returns (attribute, new value, caption).  Swapped attributes: the object (the character for a character scene),
    the color, style, action and background where present.
    """
    out = []
    attributes = ["character" if scene.character else "object", "color", "style", "action", "background"]
    for a in attributes:
        value = getattr(scene, a)
        if value is None:
            continue
        start, end = W.subject_char_span(text, scene, a)
        for v in W.VOCAB[a]:
            if v == value:
                continue
            target = W.Scene(**{**scene.as_dict(), a: v, **({"object": None} if a == "character" else {})})
            cand = _fix_articles(text[:start] + v + text[end:])
            try:
                ok = W.parse_caption(cand) == target
            except ValueError:
                ok = False
            if not ok:  # e.g. "a painting of ..." <-> "a monet painting of ...": the nearest phrasing instead
                options = W.captions(target)
                cand = max(options, key=lambda c: difflib.SequenceMatcher(None, c.split(), text.split()).ratio())
            out.append((a, v, cand))
    return out


@torch.no_grad()
def clip_ranking_accuracy(scorer, images: np.ndarray | torch.Tensor, scenes: Sequence[W.Scene],
                          captions: Sequence[str] | None = None, seed: int = 0, batch_size: int = 32) -> float:
    """Fraction of images whose true caption scores strictly above every one-attribute swap of it
    (``scorer``: a :class:`lib.scoring.ClipScorer`; captions drawn with ``seed`` when not given)."""
    if len(images) != len(scenes):
        raise ValueError(f"{len(images)} images but {len(scenes)} scenes")
    if captions is None:
        rng = np.random.default_rng(seed)
        captions = [W.caption(s, rng) for s in scenes]
    x = to_tensor(images)
    wins = []
    for i in range(0, len(scenes), batch_size):
        groups = [[captions[j]] + [c for _, _, c in swap_captions(captions[j], scenes[j])]
                  for j in range(i, min(i + batch_size, len(scenes)))]
        texts = sorted({c for g in groups for c in g})
        index = {c: k for k, c in enumerate(texts)}
        sims = scorer.rank(x[i : i + len(groups)], texts)
        for row, g in zip(sims, groups):
            s = row[[index[c] for c in g]]
            wins.append(bool((s[0] > s[1:]).all()))
    return float(np.mean(wins)) if wins else float("nan")
