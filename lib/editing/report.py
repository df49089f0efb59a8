"""Notebook 06's tables and verdicts, read from the rows :func:`lib.editing.evaluate.evaluate_anchors` writes (one
row per image: ``condition``, ``anchor`` (None on unrelated prompts), ``concept_hit``, ``target_hit``, ``accuracy``,
CLIP-Scores): removal and preservation per condition, CLIP-Scores, the layer sweep and the paper's claims as goals.
"""

from __future__ import annotations

from typing import Sequence

import pandas as pd

TESTABLE_RATE = 0.8  # a removal is only a removal if the unedited model drew the concept at least this often
REMOVED_RATE = 0.1  # a concept counts as removed when the edited model draws it at most this often (ours)
PRESERVED_RATIO = 0.95  # unrelated prompts keep at least this share of the unedited model's accuracy (ours)
CLAIM_LAYER = 0  # the paper: only an edit of the first layer (its causal state) removes the concept


def removal_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per (anchor, condition) on the anchors' prompts: concept and target rates, CLIP-Scores (when scored), images."""
    c = df[df.anchor.notna()].groupby(["anchor", "condition"], sort=False)
    clip = {k: (k, "mean") for k in ("clip_prompt", "clip_target") if k in df}
    return c.agg(concept_rate=("concept_hit", "mean"), target_rate=("target_hit", "mean"), **clip, n=("seed", "size"))


def preservation_table(df: pd.DataFrame, reference: str = "unedited") -> pd.DataFrame:
    """Per condition on the unrelated prompts: scene accuracy, CLIP-Score (when scored), and accuracy relative to
    ``reference``."""
    clip = {"clip_prompt": ("clip_prompt", "mean")} if "clip_prompt" in df else {}
    u = df[df.anchor.isna()].groupby("condition", sort=False).agg(accuracy=("accuracy", "mean"), **clip)
    u["accuracy_vs_unedited"] = u.accuracy / u.loc[reference, "accuracy"]
    return u


def clip_table(df: pd.DataFrame) -> pd.DataFrame:
    """Mean CLIP-Score per condition: of each anchor prompt's image with its prompt (falls after a removal) and with
    the prompt the edit should draw (rises), and of each unrelated prompt's image with its prompt (should not move)."""
    anchored, unrelated = df[df.anchor.notna()].groupby("condition", sort=False), df[df.anchor.isna()]
    return pd.DataFrame({
        "CLIP(anchor prompt)": anchored.clip_prompt.mean(),
        "CLIP(target prompt)": anchored.clip_target.mean(),
        "CLIP(unrelated prompt)": unrelated.groupby("condition", sort=False).clip_prompt.mean(),
    })


def goal_verdict(ok: bool, before: float | None = None) -> str:
    """``met`` / ``missed``; ``not testable`` when the unedited model's concept rate ``before`` is below
    :data:`TESTABLE_RATE` (a removal goal)."""
    if before is not None and not before >= TESTABLE_RATE:
        return f"not testable (unedited rate < {TESTABLE_RATE:.2f})"
    return "met" if ok else "missed"


def layer_sweep_table(unedited: pd.DataFrame, edited: pd.DataFrame, anchors: Sequence[str]) -> pd.DataFrame:
    """Per edited layer (``edited`` rows carry a ``layer`` column): each anchor's concept rate, and ``preservation``,
    the unrelated prompts' accuracy relative to the ``unedited`` rows'."""
    sweep = edited[edited.anchor.notna()].groupby(["layer", "anchor"]).concept_hit.mean().unstack()[list(anchors)]
    sweep["preservation"] = (edited[edited.anchor.isna()].groupby("layer").accuracy.mean()
                             / unedited[unedited.anchor.isna()].accuracy.mean())
    return sweep


def layer_claim(sweep: pd.DataFrame, before: pd.Series) -> pd.DataFrame:
    """The paper's claim per anchor of a :func:`layer_sweep_table`: an edit of layer :data:`CLAIM_LAYER` removes the
    concept (rate ≤ :data:`REMOVED_RATE`) and an edit of no other layer does. ``before``: the unedited concept rate
    per anchor; below :data:`TESTABLE_RATE` the claim is not testable on that anchor, nor where the sweep left out
    layer :data:`CLAIM_LAYER` or every other layer."""
    rows = []
    for a in sweep.columns.drop("preservation"):
        removed = [int(layer) for layer in sweep.index if sweep.loc[layer, a] <= REMOVED_RATE]
        if CLAIM_LAYER not in sweep.index:
            verdict = f"not testable (layer {CLAIM_LAYER} not swept)"
        elif len(sweep.index) < 2:
            verdict = f"not testable (no layer but {CLAIM_LAYER} swept)"
        else:
            verdict = goal_verdict(removed == [CLAIM_LAYER], float(before[a]))
        rows.append(dict(anchor=a, unedited_rate=float(before[a]), removed_at_layers=removed, verdict=verdict))
    return pd.DataFrame(rows).set_index("anchor")


def goals_table(removal: pd.DataFrame, preservation: pd.DataFrame, multi_removal: pd.DataFrame,
                multi_preservation: pd.DataFrame, claim: pd.DataFrame,
                multi_condition: str = "multi-concept edit") -> pd.DataFrame:
    """Every goal of notebook 06 with its value and verdict, per edit: each anchor drawn before (≥
    :data:`TESTABLE_RATE`) and removed after (≤ :data:`REMOVED_RATE`), unrelated accuracy kept (≥
    :data:`PRESERVED_RATIO` × unedited), the same for the multi-concept edit (``multi_removal``: anchors × [unedited,
    ``multi_condition``]), and the layer claim per anchor (:func:`layer_claim`). ``removal``, ``preservation``: the
    :func:`removal_table` / :func:`preservation_table` of the main conditions, the unedited one included."""
    anchors = list(removal.index.get_level_values("anchor").unique())
    edits = [c for c in removal.index.get_level_values("condition").unique() if c != "unedited"]
    rows = []

    def goal(edit: str, check: str, value: float, met: str) -> None:
        rows.append(dict(edit=edit, check=check, value=value, met=met))

    for a in anchors:
        before = float(removal.loc[(a, "unedited"), "concept_rate"])
        for cond in edits:
            after = float(removal.loc[(a, cond), "concept_rate"])
            goal(cond, f"{a}: rate before ≥ {TESTABLE_RATE:.2f}", before, goal_verdict(before >= TESTABLE_RATE))
            goal(cond, f"{a}: rate after ≤ {REMOVED_RATE:.2f}", after, goal_verdict(after <= REMOVED_RATE, before))
    kept = f"unrelated accuracy ≥ {PRESERVED_RATIO:.2f} × unedited"
    for cond in edits:
        v = float(preservation.loc[cond, "accuracy_vs_unedited"])
        goal(cond, kept, v, goal_verdict(v >= PRESERVED_RATIO))
    for a in multi_removal.index:
        v, before = float(multi_removal.loc[a, multi_condition]), float(multi_removal.loc[a, "unedited"])
        goal("multi-concept", f"{a}: rate after ≤ {REMOVED_RATE:.2f}", v, goal_verdict(v <= REMOVED_RATE, before))
    v = float(multi_preservation.loc[multi_condition, "accuracy_vs_unedited"])
    goal("multi-concept", kept, v, goal_verdict(v >= PRESERVED_RATIO))
    for a, r in claim.iterrows():
        goal("layer sweep", f"{a}: only layer {CLAIM_LAYER} removes it", float(r.removed_at_layers == [CLAIM_LAYER]),
             r.verdict)
    return pd.DataFrame(rows)


__all__ = [
    "CLAIM_LAYER", "PRESERVED_RATIO", "REMOVED_RATE", "TESTABLE_RATE", "clip_table", "goal_verdict", "goals_table",
    "layer_claim", "layer_sweep_table", "preservation_table", "removal_table",
]
