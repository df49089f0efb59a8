"""The side-by-side baseline: a TIME/UCE-style closed-form edit of the UNet's cross-attention ``to_k``/``to_v``.

For every ``attn2`` projection ``W`` (``to_k`` and ``to_v`` of every cross-attention layer), the anchor's text
embeddings ``c_a`` (the encoder output the UNet sees; for SDXL both encoders, concatenated) are mapped to what the
*old* projection gives the target's embeddings ``c_t``::

    min_W Σ‖W c_a − W_old c_t‖² + λ‖W − W_old‖²   ⇒   W = (λ W_old + Σ W_old c_t c_aᵀ)(λI + Σ c_a c_aᵀ)⁻¹

(TIME's closed form, λ = 0.1 by default; UCE adds preservation of other concepts, not done here). Prompts and
positions are those of DiffQuickFix (:func:`lib.editing.quickfix.align_prompts`), so the two edits see the same
data; all projections share one factorisation, as the keys are the same.
"""

from __future__ import annotations

import time
from typing import ClassVar, Mapping, Sequence

import torch

from lib.editing.quickfix import (
    TEMPLATES,
    Align,
    EditError,
    RidgeProblem,
    WeightEdit,
    _fingerprint,
    _model_name,
    align_prompts,
    concept_pairs,
    f64,
)
from lib.sampling import encode

DEFAULT_LAMBDA_BASELINE = 0.1
PROJECTIONS: tuple[str, ...] = ("to_k", "to_v")


def cross_attention_projections(unet, projections: Sequence[str] = PROJECTIONS) -> dict[str, torch.nn.Linear]:
    """``{"unet:<module>.to_k.weight": linear, ...}`` for every ``attn2`` (cross-attention) of the UNet."""
    bad = [p for p in projections if p not in PROJECTIONS]
    if bad or not projections:
        raise EditError(f"projections must be a non-empty subset of {PROJECTIONS}, got {list(projections)!r}")
    out = {}
    for name, module in unet.named_modules():
        if name.endswith("attn2"):
            for p in projections:
                out[f"unet:{name}.{p}.weight"] = getattr(module, p)
    if not out:
        raise EditError("the UNet has no cross-attention (attn2) layers")
    return out


@torch.no_grad()
def collect_embeddings(pipe, anchors: str | Sequence[str], targets: str | Sequence[str],
                       templates: Sequence[str] = TEMPLATES, prompts: Mapping[str, Sequence[str]] | None = None,
                       align: Align = "pad") -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor embeddings ``c_a`` (keys) and target embeddings ``c_t`` at the aligned positions, float64 (n, D)."""
    pairs = align_prompts(pipe.tokenizer, anchors, targets, templates, prompts, align)
    n = len(pairs)
    cond = f64(encode(pipe, [p.anchor_prompt for p in pairs] + [p.target_prompt for p in pairs]).cond)
    keys = torch.cat([cond[i, list(p.key_positions)] for i, p in enumerate(pairs)])
    tgts = torch.cat([cond[n + i, list(p.value_positions)] for i, p in enumerate(pairs)])
    return keys, tgts


class CrossAttentionEdit(WeightEdit):
    """The TIME/UCE-style baseline: deltas on every ``attn2.to_k``/``to_v``. Build it with :meth:`fit`."""

    KIND: ClassVar[str] = "cross-attention"

    @classmethod
    def fit(cls, pipe, anchors: str | Sequence[str], targets: str | Sequence[str],
            lam: float = DEFAULT_LAMBDA_BASELINE, projections: Sequence[str] = PROJECTIONS,
            templates: Sequence[str] = TEMPLATES, prompts: Mapping[str, Sequence[str]] | None = None,
            align: Align = "pad") -> "CrossAttentionEdit":
        """Fit the edit mapping each anchor's embeddings onto its target's, through every cross-attention."""
        t0 = time.perf_counter()
        pairs = concept_pairs(anchors, targets)
        layers = cross_attention_projections(pipe.unet, projections)
        keys, tgts = collect_embeddings(pipe, [a for a, _ in pairs], [t for _, t in pairs], templates, prompts, align)
        ridge = RidgeProblem(keys, lam)
        deltas, shapes, prints, edited = {}, {}, {}, {}
        for path, linear in layers.items():
            w0 = linear.weight.detach().to(keys.device, torch.float64)
            w_new = ridge.solve(w0, tgts @ w0.T)  # values: the old projection of the target's embeddings
            deltas[path] = (w_new - w0).to("cpu", torch.float32)
            shapes[path], prints[path], edited[path] = list(w0.shape), _fingerprint(w0), _fingerprint(w_new)
        meta = dict(
            anchors=[a for a, _ in pairs], targets=[t for _, t in pairs], lam=float(lam), projections=list(projections),
            shapes=shapes, fingerprints=prints, edited_fingerprints=edited,
            solve=dict(n_keys=int(keys.shape[0]), lam_effective=ridge.lam_effective, condition=ridge.condition),
            templates=list(templates), prompts={k: list(v) for k, v in (prompts or {}).items()}, align=align,
            model=_model_name(pipe), fit_seconds=time.perf_counter() - t0,
        )
        return cls(deltas, meta)


def cross_attention_baseline(pipe, anchors: str | Sequence[str], targets: str | Sequence[str],
                             lam: float = DEFAULT_LAMBDA_BASELINE, **kwargs) -> CrossAttentionEdit:
    """Shorthand for :meth:`CrossAttentionEdit.fit`."""
    return CrossAttentionEdit.fit(pipe, anchors, targets, lam, **kwargs)
