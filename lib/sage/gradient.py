"""Gradients for the signed-step searches that survive float16 pipelines, and an honest stop when there is none.

A signed step only uses the sign of the gradient, so the loss may be multiplied by any positive ``scale`` without
changing the search, except that a float16 backward pass (UNet, VAE decoder) no longer underflows to zero: the
same loss scaling as mixed-precision training (``torch.amp.GradScaler`` starts at 2**16). On inf/NaN entries the
scale backs off (÷16, down to 1) and the same graph is differentiated again. What is still non-finite at scale 1, or
a gradient that is exactly zero everywhere (a signed step would not move), ends that search with a reason.
"""

from __future__ import annotations

from typing import Sequence

import torch

FP16_LOSS_SCALE = 2.0**16  # torch.amp.GradScaler's initial scale
BACKOFF = 16.0


def loss_scale_for(pipe) -> float:
    """:data:`FP16_LOSS_SCALE` when a UNet, VAE or text encoder of ``pipe`` runs in float16, else 1 (float32 and
    bfloat16 have float32's exponent range)."""
    parts = [getattr(pipe, n, None) for n in ("unet", "vae", "text_encoder", "text_encoder_2")]
    return FP16_LOSS_SCALE if any(getattr(p, "dtype", None) == torch.float16 for p in parts) else 1.0


def scaled_grad(loss: torch.Tensor, wrt: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, float]:
    """``∇_wrt (scale · loss)`` and the scale to start the next iteration with. While the gradient has inf/NaN entries
    and ``scale`` > 1, the scale is divided by :data:`BACKOFF` (at least to 1) and the graph differentiated again. A
    gradient that is never finite returns the scale it started with. With ``scale`` > 1 the graph is retained for the
    retries: drop the references to its outputs (``del loss, ...``) before the next forward pass, or two graphs live
    at once."""
    start = scale
    while True:
        retry = scale > 1.0
        (g,) = torch.autograd.grad(loss * scale if scale != 1.0 else loss, wrt, retain_graph=retry)
        if bool(torch.isfinite(g).all()):
            return g, scale
        if not retry:
            return g, start
        scale = max(1.0, scale / BACKOFF)


def scaled_grad_rows(losses: torch.Tensor, wrt: torch.Tensor, rows: Sequence[int],
                     scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent searches, one per row of ``wrt`` (a batched latent search): ``losses[i]`` is the loss of row
    ``rows[i]`` and depends on that row alone. Each row is differentiated at its own scale (``scales``, one per row of
    ``wrt``; ``∇ Σ_i s_{rows[i]}·losses[i]``), and a row whose gradient has inf/NaN entries backs off alone, as
    :func:`scaled_grad` does for one search, while the others keep theirs. Returns the gradient (rows not in ``rows``:
    zero; rows never finite are left to :func:`grad_problem`) and the scales to start the next iteration with. One
    shared scale let one row's overflow push every other row into float16 underflow for the rest of the search."""
    scales = scales.detach().clone().to(torch.float64)
    start = scales.clone()
    out = torch.zeros_like(wrt)
    todo = list(rows)
    while True:
        retry = any(float(scales[r]) > 1.0 for r in todo)
        weight = scales[list(rows)].to(losses.device, losses.dtype)
        (g,) = torch.autograd.grad((losses * weight).sum(), wrt, retain_graph=retry)
        finite = torch.isfinite(g.reshape(len(g), -1)).all(1).tolist()
        for r in todo:
            out[r] = g[r]
        never = [r for r in todo if not finite[r] and float(scales[r]) <= 1.0]
        todo = [r for r in todo if not finite[r] and float(scales[r]) > 1.0]
        scales[never] = start[never]  # as scaled_grad: the search ends (grad_problem), its scale as it started
        if not todo:
            return out, scales
        for r in todo:
            scales[r] = max(1.0, float(scales[r]) / BACKOFF)


def grad_problem(g: torch.Tensor) -> list[str | None]:
    """Per row of ``g`` (one search each; ``g[None]`` for a single search): ``"non-finite gradient"``,
    ``"zero gradient"`` or None (usable)."""
    flat = g.detach().reshape(len(g), -1)
    finite = torch.isfinite(flat).all(1).tolist()
    zero = (flat == 0).all(1).tolist()
    return [None if f and not z else ("non-finite gradient" if not f else "zero gradient")
            for f, z in zip(finite, zero)]
