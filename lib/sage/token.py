"""SAGE universal adversarial token: one token embedding, appended after the last word (before EOS) of any prompt,
that makes the image show a chosen target object.

Training: signed steps ``v ← clamp(v − lr·sign(∇_v L), −2.5, 2.5)`` from ``v = 0`` (the seed pseudo-code's lr, range
and start), with ``L`` the surrogate's ``become`` loss (:mod:`lib.sage.loss`) averaged over a minibatch of (training
prompt, seed) pairs drawn with a fixed numpy seed. The step descends ``L``, which is low when the target appears: the
seed's ascent of Σ(2p − 1) of the target (``emb_x += sign(grad)·step_size``) is the same update (for the token
attack the code does not depart from the seed; the latent and prompt searches' ``lose`` goal does, see
:mod:`lib.sage.loss`).

Evaluation on held-out prompts: success = every member's top-1 label is in the target group; the CLIP-Score change
is reported two ways (the paper does not say which it means):
``clip_image_delta`` = CLIP-Score(image with token, original caption) − CLIP-Score(image without, caption), with any
:class:`lib.scoring.ClipScorer`; ``text_cosine`` = cosine between the diffusion text encoder's pooled outputs of the
caption with and without the token (how little the prompt's representation moves).

Resume: with ``checkpoint_dir=`` the embedding, the loss history and the minibatch generator's state are written
atomically every ``checkpoint_every`` iterations and at the end, to
``token_<source>_to_<target>_<key>.ckpt.safetensors``; the key (:func:`token_key`) hashes the weights, the ensemble,
the prompts, seeds, device, dtype and every setting except ``iterations``. A rerun continues from its checkpoint and,
on the CPU, gives exactly the uninterrupted result. On a GPU it agrees only up to rounding: the signed step reads
only the gradient's signs, a nondeterministic backward pass can flip those of near-zero entries, and
``torch.use_deterministic_algorithms(True)`` is no remedy, since it raises on the backward pass of the members'
bilinear / bicubic resizing, which has no deterministic CUDA kernel (its ``warn_only=True`` leaves them
nondeterministic). A run with more iterations extends a finished one (one
with fewer starts fresh and leaves the longer run's checkpoint as it is). An unreadable checkpoint is ignored (a fresh
start overwrites it).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lib.atomic import remove_stale_tmp, write_safetensors_atomic
from lib.params import Param, check_fields, interval, positive, seed_value
from lib.progress import progress_bar, track
from lib.sage.gradient import grad_problem, loss_scale_for, scaled_grad
from lib.sage.latent import check_seeds, signed_step
from lib.sage.loss import Ensemble
from lib.sage.prompt import (
    _check_pipe, _replaced_embeddings, check_grad_from_step, encode_with_slots, render_with_slots, slot_dim,
    slot_ids,
)
from lib.sage.resume import campaign_key
from lib.sampling import is_sdxl


@dataclass(frozen=True)
class TokenAttack:
    """Hyper-parameters (seed pseudo-code: lr 0.05, 100 iterations, range [-2.5, 2.5]; batch size is ours)."""

    lr: float = 0.05
    iterations: int = 100
    emb_range: tuple[float, float] = (-2.5, 2.5)
    batch_size: int = 4
    grad_from_step: int = 0
    seed: int = 0  # minibatch order

    def __post_init__(self) -> None:
        check_fields(self, lr=Param(float, low=0.0, check=positive), iterations=Param(int, low=0),
                     emb_range=Param((tuple, list), check=interval), batch_size=Param(int, low=1),
                     grad_from_step=Param(int, low=0), seed=seed_value())


@dataclass
class TokenResult:
    embedding: torch.Tensor  # (D,)
    source: str
    target: str
    history: list[float] = field(default_factory=list)
    meta: dict = field(default_factory=dict)


def train_token(pipe, ensemble: Ensemble, prompts: Sequence[str], source: str, target: str, seeds: Sequence[int],
                steps: int = 25, guidance: float = 7.5, config: TokenAttack = TokenAttack(),
                progress: Any = False, checkpoint_dir: str | Path | None = None, checkpoint_every: int = 10,
                resume: bool = True) -> TokenResult:
    """Optimise one appended token embedding over ``prompts`` (captions of ``source``) towards ``target``.

    ``progress``: a flag or a bar (:mod:`lib.progress`), in iterations. ``checkpoint_dir``: where the training state
    is saved and, with ``resume``, resumed from (module docstring); ``meta["resumed_from"]`` is the iteration the run
    continued from (0: fresh).
    """
    _check_pipe(pipe)
    ensemble.check_distinct(source, target)
    if not prompts:
        raise ValueError("prompts is empty: give at least one training prompt")
    check_seeds(seeds)
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    check_grad_from_step(config.grad_from_step, steps)
    rng = np.random.default_rng(config.seed)
    d = slot_dim(pipe)
    v = torch.zeros(1, d)
    lo, hi = config.emb_range
    history: list[float] = []
    checkpoint, saved_scale = None, None
    if checkpoint_dir is not None:
        if Path(checkpoint_dir).is_dir():
            remove_stale_tmp(checkpoint_dir)  # a killed run's half-written checkpoint
        key = token_key(pipe, ensemble, prompts, source, target, seeds, steps, guidance, config)
        checkpoint = Path(checkpoint_dir) / f"token_{source}_to_{target}_{key}.ckpt.safetensors"
        state = _load_checkpoint(checkpoint) if resume else None
        if state is not None and len(state[1]) <= config.iterations:
            v, history, rng.bit_generator.state, saved_scale = state
        elif state is not None:  # a longer run of these settings: start fresh, leave its checkpoint alone
            checkpoint = None
    start, stopped = len(history), None
    scale = saved_scale if saved_scale is not None else loss_scale_for(pipe)  # a resumed run keeps its loss scale
    for it in track(range(start, config.iterations), progress, f"token {source}->{target}", config.iterations,
                    leave=False, initial=start):
        pi = rng.integers(len(prompts), size=config.batch_size)
        si = rng.integers(len(seeds), size=config.batch_size)
        v.requires_grad_(True)
        img = render_with_slots(pipe, [prompts[i] for i in pi], v, [seeds[i] for i in si], steps, guidance,
                                config.grad_from_step)
        loss = ensemble.loss(ensemble.probs(img), source, "become", target).mean()
        value = float(loss.detach())
        g, scale = scaled_grad(loss, v, scale)
        del img, loss  # frees the graph (kept for a retry while the loss is scaled)
        problem = grad_problem(g[None])[0]
        if problem is not None:  # v stays the last good embedding; not checkpointed, so a rerun retries from there
            stopped, v = f"{problem} at iteration {it}", v.detach()
            break
        history.append(value)
        v = signed_step(v.detach(), g, config.lr, lo, hi)
        if checkpoint is not None and ((it + 1) % checkpoint_every == 0 or it + 1 == config.iterations):
            _save_checkpoint(checkpoint, v, history, rng, scale)
    meta = dict(source=source, target=target, steps=steps, guidance=guidance, lr=config.lr,
                iterations=config.iterations, batch_size=config.batch_size, grad_from_step=config.grad_from_step,
                resumed_from=start, stopped=stopped)
    return TokenResult(v[0].detach(), source, target, history, meta)


def token_key(pipe, ensemble: Ensemble, prompts: Sequence[str], source: str, target: str, seeds: Sequence[int],
              steps: int, guidance: float, config: TokenAttack) -> str:
    """:func:`lib.sage.resume.campaign_key` of a token training: weights, device, dtype and every setting but
    ``config.iterations``."""
    return campaign_key(pipe, ensemble, prompts=list(prompts), source=source, target=target, seeds=list(seeds),
                        steps=steps, guidance=guidance, config={**asdict(config), "iterations": None},
                        device=pipe.unet.device.type, dtype=str(pipe.unet.dtype))  # cuda:1 resumes cuda:0's run


def _save_checkpoint(path: Path, v: torch.Tensor, history: list[float], rng, scale: float) -> None:
    """Write the training state atomically (an interrupted write leaves the previous checkpoint)."""
    write_safetensors_atomic({"embedding": v}, path, dict(history=json.dumps(history),
                                                          rng=json.dumps(rng.bit_generator.state), scale=str(scale)))


def _load_checkpoint(path: Path):
    """(v, history, rng state, loss scale or None) from ``path``; None when it is missing or unreadable."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            scale = float(meta["scale"]) if "scale" in meta else None
            return f.get_tensor("embedding"), json.loads(meta["history"]), json.loads(meta["rng"]), scale
    except Exception as err:  # noqa: BLE001 - a truncated or foreign file: start fresh, say so
        warnings.warn(f"ignoring unreadable token checkpoint {path.name}: {err}", stacklevel=3)
        return None


@torch.no_grad()
def pooled_text(pipe, prompts: Sequence[str], token: torch.Tensor | None) -> torch.Tensor:
    """The text encoder's pooled output (at EOS) of ``prompts``, with ``token`` appended when given (SDXL: the second
    encoder's projected pooled output, the one the UNet is conditioned on)."""
    if is_sdxl(pipe):
        slots = None if token is None else token.view(1, -1)
        return encode_with_slots(pipe, prompts, slots).added["text_embeds"].float()
    n = 0 if token is None else 1
    rows = [slot_ids(pipe.tokenizer, p, n) for p in prompts]
    ids = torch.tensor([r[0] for r in rows], device=pipe.text_encoder.device)
    if n == 0:
        return pipe.text_encoder(ids)[1].float()
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for b, (_, pos) in enumerate(rows):
        mask[b, pos] = True
    with _replaced_embeddings(pipe, mask, token.view(1, -1)):
        return pipe.text_encoder(ids)[1].float()


@torch.no_grad()
def evaluate_token(pipe, ensemble: Ensemble, result: TokenResult, prompts: Sequence[str], seeds: Sequence[int],
                   steps: int | None = None, guidance: float | None = None, scorer=None, return_images: bool = False,
                   batch_size: int | None = None, progress: Any = False, desc: str = "token images"):
    """One row per (prompt, seed): success, P(target), P(source), CLIP-Score change, text cosine.

    ``return_images``: return ``(table, images with the token, images without)`` instead of the table. No seed or
    repeated seeds are a ``ValueError`` (each pair would count twice). ``batch_size``: (prompt, seed) images rendered
    per call (None: all at once; SD at 512 px needs chunks). ``progress``: a flag (a bar labelled ``desc``) or a bar
    (:mod:`lib.progress`) over the images, with the token and without.
    """
    import pandas as pd

    check_seeds(seeds)
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (or None: every image at once), got {batch_size}")
    steps = int(steps or result.meta.get("steps", 25))
    guidance = float(guidance if guidance is not None else result.meta.get("guidance", 7.5))
    ps = [p for p in prompts for _ in seeds]
    ss = [s for _ in prompts for s in seeds]
    tok = result.embedding.view(1, -1)
    step = batch_size or max(len(ps), 1)

    both = scorer is not None or return_images  # the images without the token too
    with progress_bar(progress, len(ps) * (2 if both else 1), desc, "img", leave=False) as bar:

        def render(slots: torch.Tensor | None) -> torch.Tensor:
            out = []
            for i in range(0, len(ps), step):
                out.append(render_with_slots(pipe, ps[i : i + step], slots, ss[i : i + step], steps, guidance,
                                             grad=False))
                if bar is not None:
                    bar.update(len(out[-1]))
            return torch.cat(out)

        with_tok = render(tok)
        probs = ensemble.probs(with_tok)
        success = ensemble.judge(probs, result.source, "become", result.target)
        p_t, p_s = ensemble.class_prob(probs, result.target), ensemble.class_prob(probs, result.source)
        text_cos = F.cosine_similarity(pooled_text(pipe, ps, None), pooled_text(pipe, ps, result.embedding), dim=-1)
        f64 = lambda t: t.detach().cpu().double().numpy()  # noqa: E731 - float64 columns round and print cleanly
        df = pd.DataFrame(dict(prompt=ps, seed=ss, success=success.cpu().numpy(), p_target=f64(p_t),
                               p_source=f64(p_s), text_cosine=f64(text_cos)))
        plain = render(None) if both else None
    if scorer is not None:
        df["clip_with"] = f64(scorer.score(with_tok, ps))
        df["clip_without"] = f64(scorer.score(plain, ps))
        df["clip_image_delta"] = df["clip_with"] - df["clip_without"]
    return (df, with_tok, plain) if return_images else df


def save_token(path: str | Path, result: TokenResult) -> Path:
    """Write the token embedding, its settings (``meta``) and its loss ``history`` as safetensors (atomic)."""
    meta = {k: "" if v is None else str(v) for k, v in result.meta.items()}
    return write_safetensors_atomic({"embedding": result.embedding}, path,
                                    {**meta, "history": json.dumps(list(map(float, result.history)))})


def load_token(path: str | Path) -> TokenResult:
    """The :class:`TokenResult` :func:`save_token` wrote (loss history included; ``[]`` for a file without one)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata() or {})
        emb = f.get_tensor("embedding")
    history = json.loads(meta.pop("history", "") or "[]")
    meta = {k: (int(v) if k in ("steps", "iterations", "batch_size", "grad_from_step", "resumed_from") else
                float(v) if k in ("guidance", "lr") else v or None) for k, v in meta.items()}
    return TokenResult(emb, meta["source"], meta["target"], history, meta)
