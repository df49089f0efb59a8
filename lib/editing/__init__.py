"""Closed-form model edits: DiffQuickFix on the text encoder, and a TIME/UCE-style cross-attention baseline."""

from lib.editing.baseline import CrossAttentionEdit, cross_attention_baseline
from lib.editing.quickfix import (
    TEMPLATES,
    EditError,
    FingerprintWarning,
    GapReport,
    IllConditionedWarning,
    PrecisionWarning,
    QuickFixEdit,
    RidgeProblem,
    UnreachedLayerWarning,
    WeightEdit,
    align_prompts,
    closed_form,
    collect_keys_values,
    gradient_descent_gap,
    quickfix,
    save_edited_model,
)

__all__ = [
    "TEMPLATES", "CrossAttentionEdit", "EditError", "FingerprintWarning", "GapReport", "IllConditionedWarning",
    "PrecisionWarning", "QuickFixEdit", "RidgeProblem", "UnreachedLayerWarning", "WeightEdit", "align_prompts", "closed_form",
    "collect_keys_values", "cross_attention_baseline", "gradient_descent_gap", "quickfix", "save_edited_model",
]
