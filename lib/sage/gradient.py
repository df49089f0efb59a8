"""Gradients for the signed-step searches that survive float16 pipelines, and an honest stop when there is none.

A signed step only uses the sign of the gradient, so the loss may be multiplied by any positive ``scale`` without
changing the search, except that a float16 backward pass (UNet, VAE decoder) no longer underflows to zero: the
same loss scaling as mixed-precision training (``torch.amp.GradScaler`` starts at 2**16). On inf/NaN entries the
scale backs off (÷16, down to 1) and the same graph is differentiated again. What is still non-finite at scale 1, or
a gradient that is exactly zero everywhere (a signed step would not move), ends that search with a reason.
"""

from __future__ import annotations

import torch

FP16_LOSS_SCALE = 2.0**16  # torch.amp.GradScaler's initial scale
BACKOFF = 16.0


def loss_scale_for(pipe) -> float:
    """:data:`FP16_LOSS_SCALE` when a UNet, VAE or text encoder of ``pipe`` runs in float16, else 1 (float32 and
    bfloat16 have float32's exponent range)."""
    parts = [getattr(pipe, n, None) for n in ("unet", "vae", "text_encoder", "text_encoder_2")]
    return FP16_LOSS_SCALE if any(getattr(p, "dtype", None) == torch.float16 for p in parts) else 1.0


def scaled_grad(loss: torch.Tensor, wrt: torch.Tensor, scale: float = 1.0,
                per_row: bool = False) -> tuple[torch.Tensor, float]:
    """``∇_wrt (scale · loss)`` and the scale to start the next iteration with. While the gradient has inf/NaN entries
    and ``scale`` > 1, the scale is divided by :data:`BACKOFF` (at least to 1) and the graph differentiated again.

    ``per_row``: the rows of ``wrt`` are independent searches (a batched latent search): each row keeps the gradient of
    the largest scale at which it is finite, so one broken row does not push the others into float16 underflow, and
    the returned scale is the smallest of those (rows never finite are left to :func:`grad_problem`). A gradient that
    is never finite returns the scale it started with. With ``scale`` > 1 the graph is retained for the retries: drop
    the references to its outputs (``del loss, ...``) before the next forward pass, or two graphs live at once."""
    out, done, next_scale = None, None, scale
    while True:
        retry = scale > 1.0
        (g,) = torch.autograd.grad(loss * scale if scale != 1.0 else loss, wrt, retain_graph=retry)
        finite = torch.isfinite(g.reshape(len(g), -1)).all(1) if per_row else torch.isfinite(g).all().reshape(1)
        new = finite if done is None else finite & ~done
        if out is None:
            out, done = g, finite.clone()
        elif bool(new.any()):
            if per_row:
                out[new] = g[new]
            else:
                out = g
            done |= new
        if bool(new.any()):
            next_scale = scale  # the scales only go down: the smallest one that some row needed
        if not retry or bool(done.all()):
            return out, next_scale
        scale = max(1.0, scale / BACKOFF)


def grad_problem(g: torch.Tensor) -> list[str | None]:
    """Per row of ``g`` (one search each; ``g[None]`` for a single search): ``"non-finite gradient"``,
    ``"zero gradient"`` or None (usable)."""
    flat = g.detach().reshape(len(g), -1)
    finite = torch.isfinite(flat).all(1).tolist()
    zero = (flat == 0).all(1).tolist()
    return [None if f and not z else ("non-finite gradient" if not f else "zero gradient")
            for f, z in zip(finite, zero)]
