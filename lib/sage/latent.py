"""SAGE latent search: perturb the initial latent ``z`` so that the image fools the surrogate ensemble.

Update: ``δ ← clamp(δ − lr·sign(∇_δ L), lo, hi)`` from ``δ = 0`` with the seed pseudo-code's lr 0.05, 100 iterations
and range [-1, 1]; the loss is :meth:`lib.sage.loss.Ensemble.loss` summed over the batch. Sign: the seed pseudo-code
writes ``perturb += lr·grad.sign()`` on its loss −Σ(1 − 2p) of the class, which taken literally would *raise* P(class);
the code departs from that literal sign on purpose and descends a loss that is low when the class is lost (or the
failure type reached), the direction the method intends. After each step ``z + δ`` is projected onto the Gaussian
shell ``√d ± shell_sigmas/√2`` (‖z‖ of a d-dim standard normal has mean ≈ √d and std ≈ 1/√2), so found latents stay
non-outliers by norm; the projection wins over the clamp.

Gradient approximation (the paper's residual trick; its exact form is not published — what we implement):
the sampling loop runs from ``z' = z + δ``; steps ``0 … k−1`` (``k = residual_step``) run without gradient and give
``x_k``; there the latent is replaced by

* ``residual_mode="straight_through"`` (default): ``x̃_k = x_k + w·(z' − sg(z'))`` — the value is exactly ``x_k``
  (so the image is the unmodified sampler's, and a found latent re-renders with the plain loop), the gradient is
  ``∂x̃_k/∂z' = w·I``;
* ``residual_mode="additive"``: ``x̃_k = x_k + w·z'`` — the literal residual connection: the value changes too, so
  the found latent is a failure of this modified sampler (saved with its residual parameters, re-rendered alike).

Steps ``k … T−1``, the VAE decode and the classifiers run with gradient. ``residual_step=None`` → ``T // 2``
(``T`` = the final latent: gradient through the VAE only; ``0`` with ``w = 1``: the exact gradient). ``weight=None``
→ ``w = √(1 − ᾱ_{t_k})``, the coefficient of the initial noise in a deterministic DDIM state ``x_{t_k}``. With sign
steps ``w`` only rescales the gradient in straight-through mode, so it does not change the search there.

Failure types: type 1 (distorted: no label confident, goal ``uncertain``), type 2 (a different label confident,
goal ``other``), or ``lose`` (the class is lost, whatever the members see instead). Found latents are saved as
safetensors with everything needed to re-render them exactly (:func:`save_latent`, :func:`render_latent`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Sequence

import torch

from lib.atomic import remove_stale_tmp
from lib.params import Param, check_fields, distinct
from lib.sage.gradient import grad_problem, loss_scale_for, scaled_grad_rows
from lib.sage.loss import Ensemble, Goal
from lib.sampling import Conditioning, decode, encode, initial_latents, make_scheduler, predict_noise

if TYPE_CHECKING:
    import pandas as pd

Mode = Literal["type1", "type2", "lose"]
MODE_GOAL: dict[str, str] = {"type1": "uncertain", "type2": "other", "lose": "lose"}
SHELL_STD = 1 / math.sqrt(2)  # std of the norm of a high-dimensional standard normal vector


class LatentShapeError(ValueError):
    """A latent whose shape does not match the pipeline's initial latents."""


# ------------------------------------------------------------------------------------------------ optimisation bits
def signed_step(param: torch.Tensor, grad: torch.Tensor, lr: float, low: float, high: float) -> torch.Tensor:
    """One signed-gradient *descent* step with a box projection: ``clamp(param − lr·sign(grad), low, high)``.

    Descent on purpose: the seed pseudo-code's literal ``+ lr·sign(grad)`` on its −Σ(1 − 2p) of the class would raise
    P(class); our losses are low when the goal is met (module docstring)."""
    return (param - lr * grad.sign()).clamp(low, high)


def shell_bounds(d: int, sigmas: float) -> tuple[float, float]:
    """Norm interval ``√d ± sigmas/√2`` of a non-outlier d-dimensional standard normal vector."""
    return math.sqrt(d) - sigmas * SHELL_STD, math.sqrt(d) + sigmas * SHELL_STD


def project_to_shell(latent: torch.Tensor, sigmas: float = 3.0) -> torch.Tensor:
    """Rescale each latent of the batch whose norm is outside the shell onto its nearest boundary."""
    flat = latent.flatten(1).float()
    lo, hi = shell_bounds(flat.shape[1], sigmas)
    norm = flat.norm(dim=1, keepdim=True)
    scale = norm.clamp(lo, hi) / norm.clamp_min(1e-12)
    return (flat * scale).view_as(latent).to(latent.dtype)


def check_latent(pipe, latent: torch.Tensor) -> None:
    """Raise :class:`LatentShapeError` unless ``latent`` is (B, C, S, S) like the pipeline's initial latents."""
    c, s = pipe.unet.config.in_channels, pipe.unet.config.sample_size
    if not isinstance(latent, torch.Tensor) or latent.dim() != 4 or tuple(latent.shape[1:]) != (c, s, s):
        shape = tuple(latent.shape) if isinstance(latent, torch.Tensor) else type(latent).__name__
        raise LatentShapeError(f"latent has shape {shape}; this pipeline expects (B, {c}, {s}, {s})")


def check_seeds(seeds: Sequence[int]) -> None:
    """Raise ``ValueError`` when there is no seed or a seed repeats: each seed is one search (one run of SSR, one
    image judged), so a repeat would count the same result twice."""
    if len(seeds) == 0:
        raise ValueError("seeds is empty: give at least one seed")
    distinct(seeds, "each seed is one search")


# ------------------------------------------------------------------------------------------------------ the sampler
@dataclass(frozen=True)
class Residual:
    """Where and how the input latent is tied into the loop (see the module docstring)."""

    step: int | None = None
    weight: float | None = None
    mode: Literal["straight_through", "additive"] = "straight_through"

    def resolved_step(self, steps: int) -> int:
        """The step ``k`` the latent is tied to: ``step``, or ``steps // 2`` when it is None (0 is the exact
        gradient, not the default)."""
        k = steps // 2 if self.step is None else int(self.step)
        if not 0 <= k <= steps:
            raise ValueError(f"residual_step {k} is outside [0, {steps}] for {steps} steps")
        return k

    def check(self, steps: int) -> int:
        """``ValueError`` before a search for an unknown mode, a step outside [0, steps] or a weight ≤ 0 (it would
        turn the descent into an ascent); the resolved step."""
        k = self._mode_and_step(steps)
        if self.weight is not None and not (isinstance(self.weight, (int, float)) and math.isfinite(self.weight)
                                            and self.weight > 0):
            raise ValueError(f"residual weight must be a positive number (None: √(1−ᾱ) at the step), got "
                             f"{self.weight!r}")
        return k

    def _mode_and_step(self, steps: int) -> int:
        if self.mode not in ("straight_through", "additive"):
            raise ValueError(f"residual mode must be 'straight_through' or 'additive', got {self.mode!r}")
        return self.resolved_step(steps)

    def resolve(self, sched, steps: int) -> tuple[int, float]:
        k = self._mode_and_step(steps)  # not the weight: with straight_through it only scales the gradient, so a
        # latent saved with any weight re-renders
        if self.weight is not None:
            return k, float(self.weight)
        a = sched.alphas_cumprod[sched.timesteps[k]] if k < steps else sched.final_alpha_cumprod
        return k, float(torch.sqrt(1 - a))


def sample_with_residual(pipe, latents: torch.Tensor, c: Conditioning, steps: int, guidance: float,
                         residual: Residual = Residual(), grad: bool = True) -> torch.Tensor:
    """The CFG DDIM loop of :func:`lib.sampling.denoise` with the residual tie at step ``k``; final latents.

    With ``grad`` the gradient reaches ``latents`` only through the residual; steps before ``k`` run without it.
    """
    sched = make_scheduler(pipe, steps)
    k, w = residual.resolve(sched, steps)
    x = latents.detach() * sched.init_noise_sigma

    def tie(x: torch.Tensor) -> torch.Tensor:
        if residual.mode == "additive":
            return x.detach() + w * latents
        return x.detach() + w * (latents - latents.detach())

    for i, t in enumerate(sched.timesteps):
        if i == k:
            x = tie(x)
        with torch.set_grad_enabled(grad and i >= k):
            eps = predict_noise(pipe, sched.scale_model_input(x, t), t, c, guidance)
            x = sched.step(eps, t, x).prev_sample
    return tie(x) if k == steps else x


# ------------------------------------------------------------------------------------------------------- the search
@dataclass(frozen=True)
class LatentSearch:
    """Hyper-parameters of one latent search (seed pseudo-code defaults where it gives them; the step's sign is
    not the seed's literal one: module docstring)."""

    mode: Mode = "type1"
    goal: Goal | None = None  # None → MODE_GOAL[mode]
    lr: float = 0.05
    iterations: int = 100
    delta_range: tuple[float, float] = (-1.0, 1.0)
    shell_sigmas: float | None = 3.0  # None: no norm projection
    residual: Residual = Residual()
    stop_on_success: bool = True

    def __post_init__(self) -> None:
        """``lr`` and ``delta_range`` are checked by :func:`search_latents`, with what a wrong value would do."""
        check_fields(self, iterations=Param(int, low=0),
                     shell_sigmas=Param(float, low=0.0, optional=True))  # 0: onto the sphere ‖z‖ = √d


@dataclass
class LatentResult:
    """Outcome of one search. ``found`` is False when no evaluated latent fooled the ensemble."""

    found: bool
    latent: torch.Tensor  # the first z + δ whose solo re-render fools the ensemble, else the best-loss one
    delta: torch.Tensor
    loss: float  # loss of ``latent``
    best_loss: float
    iterations: int  # updates made
    history: list[float]
    image: torch.Tensor | None = None  # ``latent`` rendered alone without gradient (as render_latent does), in [0, 1]
    meta: dict = field(default_factory=dict)

    def summary(self) -> str:
        what = "found" if self.found else "not found"
        why = f"; stopped: {self.meta['stopped']}" if self.meta.get("stopped") else ""
        return f"{what} after {self.iterations} iterations (loss {self.loss:.3f}, best {self.best_loss:.3f}{why})"


def search_latent(pipe, ensemble: Ensemble, prompt: str, cls: str, seed: int | None = None,
                  latent: torch.Tensor | None = None, steps: int = 25, guidance: float = 7.5,
                  negative: str | None = None, config: LatentSearch = LatentSearch()) -> LatentResult:
    """Search a perturbation of the seed's initial latent (or of ``latent``, shape (1, C, S, S)) that makes
    ``prompt``'s image a failure: every member of the ensemble fooled in the sense of ``config.mode``
    (:meth:`Ensemble.judge`). One search of :func:`search_latents`.
    """
    if (seed is None) == (latent is None):
        raise ValueError("give exactly one of seed= or latent=")
    if latent is not None:
        check_latent(pipe, latent)
        if len(latent) != 1:
            raise LatentShapeError(f"search_latent takes one latent (1, C, S, S), got a batch of {len(latent)}; "
                                   "use search_latents for independent searches")
    return search_latents(pipe, ensemble, prompt, cls, None if seed is None else [seed], latent, steps, guidance,
                          negative, config)[0]


def search_latents(pipe, ensemble: Ensemble, prompt: str, cls: str, seeds: Sequence[int] | None = None,
                   latents: torch.Tensor | None = None, steps: int = 25, guidance: float = 7.5,
                   negative: str | None = None, config: LatentSearch = LatentSearch()) -> list[LatentResult]:
    """Independent searches, one per seed (or per row of ``latents``), run as one batch: one sampling loop, decode
    and ensemble pass per iteration for all of them (far fewer, larger kernels than one search after another).

    Each search keeps its own δ, loss history, best and first success; with ``stop_on_success`` a search leaves the
    batch once it succeeds. The members and the sampler treat images independently, but batched kernels round
    differently from a batch of one, so a batched search agrees with the same search run alone only up to float
    rounding: a signed step turns the sign of a near-zero gradient entry, which rounding can flip, into a full
    ``lr`` step, and the trajectories can drift apart (in one batch of four, 2 of 256 δ entries differed from the solo
    search after 3 iterations, δ by up to 0.30 after 8). :func:`latent_campaign` therefore keys each result by the
    seeds of its batch.

    A success is confirmed on the latent rendered alone and without gradient, the prompt encoded alone (exactly what
    :func:`render_latent` and a resumed campaign give; on a GPU, batched or gradient-recording kernels may round
    differently): a search stops, and counts as ``found``, only when that solo image fools the ensemble too; a batched
    success the solo image does not reproduce is counted in ``meta["solo_rejected"]`` and the search goes on. The
    returned image is that solo rendering (of the best latent when nothing was found; should it fool the ensemble
    alone although its batched image did not, the search counts as ``found`` too). ``meta["batch_solo_max_diff"]``
    is the largest pixel difference between the search's image and the solo one (0 on the CPU for one search),
    ``meta["solo_fooled"]`` the solo image's verdict.
    """
    if config.mode not in MODE_GOAL:
        raise ValueError(f"unknown mode {config.mode!r}; choose one of {', '.join(MODE_GOAL)}")
    if not (isinstance(config.lr, (int, float)) and math.isfinite(config.lr) and config.lr > 0):
        raise ValueError(f"lr must be a positive number (a signed step of lr ≤ 0 never descends), got {config.lr!r}")
    config.residual.check(steps)  # before any sampling
    if (seeds is None) == (latents is None):
        raise ValueError("give exactly one of seed(s)= or latent(s)=")
    if seeds is not None:
        check_seeds(seeds)
    lo, hi = config.delta_range
    if not lo <= 0 <= hi:
        raise ValueError(f"delta_range must contain 0, got {config.delta_range}")
    goal = config.goal or MODE_GOAL[config.mode]
    ensemble.indices(cls)  # unknown class: fail before any sampling
    if latents is not None:
        check_latent(pipe, latents)  # before .to(): a list or a wrong shape fails in one line
    z = initial_latents(pipe, list(seeds)) if latents is None else latents.to(pipe.unet.device, pipe.unet.dtype)
    n = len(z)
    cond_all = encode(pipe, [prompt] * n, negative)
    delta = torch.zeros_like(z, dtype=torch.float32)
    history: list[list[float]] = [[] for _ in range(n)]
    best: list[tuple | None] = [None] * n
    found: list[tuple | None] = [None] * n
    stopped: list[str | None] = [None] * n
    solo: list[tuple[torch.Tensor, bool] | None] = [None] * n  # a find's solo image and verdict
    rejected = [0] * n  # batched finds its solo re-render did not reproduce
    with torch.no_grad():
        cond_one = encode(pipe, [prompt], negative)  # the prompt encoded as render_latent encodes it: alone

    def alone(zp1: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """The image exactly as render_latent re-renders it (alone, no gradient), and the ensemble's verdict."""
        with torch.no_grad():
            img = decode(pipe, sample_with_residual(pipe, zp1, cond_one, steps, guidance, config.residual, grad=False))
            return img, bool(ensemble.judge(ensemble.probs(img), cls, config.mode)[0])

    active = list(range(n))
    scales = torch.full((n,), loss_scale_for(pipe), dtype=torch.float64)  # per search: one's overflow is its own
    for it in range(config.iterations + 1):
        d = delta[active].clone().requires_grad_(True)
        z_act = z[active]
        zp = (z_act.float() + d).to(z.dtype)
        cond = cond_all if len(active) == n else cond_all.select(active)
        image = decode(pipe, sample_with_residual(pipe, zp, cond, steps, guidance, config.residual))
        probs = ensemble.probs(image)
        losses = ensemble.loss(probs, cls, goal)
        ok = ensemble.judge(probs, cls, config.mode).tolist()
        for j, b in enumerate(active):
            history[b].append(float(losses[j].detach()))
            state = (history[b][-1], zp[j : j + 1].detach().clone(), d[j : j + 1].detach().clone(),
                     image[j : j + 1].detach().clone(), bool(ok[j]))
            if best[b] is None or history[b][-1] < best[b][0]:
                best[b] = state
            if found[b] is None and ok[j]:
                img1, fooled1 = alone(state[1])
                if fooled1:
                    found[b], solo[b] = state, (img1, True)
                else:  # the batch's rounding judged it a failure, the solo image is not: search on
                    rejected[b] += 1
        keep = [j for j, b in enumerate(active) if not (config.stop_on_success and found[b] is not None)]
        if it == config.iterations or not keep:
            break
        g, new_scales = scaled_grad_rows(losses[keep], d, keep, scales[active])
        scales[active] = new_scales
        del zp, image, probs, losses  # frees the graph (kept for a retry while the loss is scaled)
        for j, problem in zip(list(keep), grad_problem(g[keep])):
            if problem is not None:  # a signed step cannot go on: this search ends with what it has
                stopped[active[j]] = f"{problem} at iteration {it}"
                keep.remove(j)
        if not keep:
            break
        with torch.no_grad():
            step = signed_step(d[keep], g[keep], config.lr, lo, hi)
            if config.shell_sigmas is not None:
                base = z_act[keep].float()
                step = project_to_shell(base + step, config.shell_sigmas) - base
            active = [active[j] for j in keep]
            delta[active] = step
    results = []
    for b in range(n):
        loss_v, zp, d, batch_img, fooled = found[b] if found[b] is not None else best[b]
        img, fooled = solo[b] if solo[b] is not None else alone(zp)
        diff = float((img.float() - batch_img.float()).abs().max())
        meta = dict(seed=None if seeds is None else seeds[b], prompt=prompt, negative=negative, steps=steps,
                    guidance=guidance, cls=cls, mode=config.mode, goal=goal, lr=config.lr,
                    residual_mode=config.residual.mode, residual_step=config.residual.step,
                    residual_weight=config.residual.weight, stopped=stopped[b], batch_solo_max_diff=diff,
                    solo_fooled=fooled, solo_rejected=rejected[b])
        # the solo verdict decides: a best latent whose batched image missed but whose solo image fools is a find too
        results.append(LatentResult(fooled, zp, d, loss_v, best[b][0], len(history[b]) - 1, history[b], img, meta))
    return results


def latent_key(pipe, ensemble: Ensemble, prompt: str, cls: str, steps: int, guidance: float,
                 config: LatentSearch, batch_size: int, batch: Sequence[int] | None = None,
                 weights: dict[str, str] | None = None) -> str:
    """:func:`lib.sage.resume.campaign_key` of one (prompt, class) latent campaign searched ``batch_size`` seeds at
    a time, for the searches of ``batch`` (the seeds searched together: batched searches agree with solo ones, and
    with other batches, only up to float rounding, :func:`search_latents`); ``weights``: the pipeline's and the
    ensemble's fingerprints, :func:`lib.sage.resume.weights_part`, when already computed."""
    from lib.sage.resume import campaign_key as key

    return key(pipe, ensemble, weights=weights, prompt=prompt, cls=cls, steps=steps, guidance=guidance,
               config=config_dict(config),
               batch_size=int(batch_size), stop_rule="solo-decides",  # files of the batch-verdict rules: not reused
               **({} if batch is None else {"batch": [int(s) for s in batch]}))


def latent_campaign(pipe, ensemble: Ensemble, prompt: str, cls: str, seeds: Sequence[int], steps: int = 25,
                    guidance: float = 7.5, config: LatentSearch = LatentSearch(), out_dir: str | Path | None = None,
                    model: str = "", batch_size: int = 8, resume: bool = True,
                    weights: dict[str, str] | None = None) -> tuple[pd.DataFrame, list[LatentResult]]:
    """One search per seed, in batches of ``batch_size`` consecutive ``seeds`` (:func:`search_latents`); returns (tidy
    table, results).

    With ``out_dir`` every search is written (atomically) as soon as its batch finishes, to
    ``out_dir/latent_<mode>_<cls>_<seed>_<key>.safetensors`` — the found latent, or the best one — where ``key``
    (:func:`latent_key`) hashes the weights (with their dtype and device type), the ensemble, every setting,
    ``batch_size`` and the seeds of the search's batch. With ``resume`` a batch whose files all exist is loaded (its
    images re-rendered exactly) instead of run again; a batch with a missing or unreadable file (a warning names it)
    is searched again whole. So a resumed, interrupted or extended campaign (more ``seeds``) gives exactly what a fresh
    run of the same ``seeds`` gives: a batched search differs from the same search in another batch in the last bits,
    which a signed step can grow (:func:`search_latents`), so a result is reused only from the same batch. Other
    settings never reuse stale results. No seed or repeated seeds are a ``ValueError``. The weights are fingerprinted
    once per call (``weights``: :func:`lib.sage.resume.weights_part` of this pipeline and ensemble, when the caller
    has it).
    """
    import pandas as pd

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_seeds(seeds)
    seeds = list(seeds)
    batches = [seeds[i : i + batch_size] for i in range(0, len(seeds), batch_size)]
    paths: dict[int, Path] = {}
    done: dict[int, LatentResult] = {}
    resumed: set[int] = set()
    if out_dir is not None and Path(out_dir).is_dir():
        remove_stale_tmp(out_dir)  # a killed run's half-written file
    if out_dir is not None and weights is None:
        from lib.sage.resume import weights_part

        weights = weights_part(pipe, ensemble)  # once, not per batch
    for batch in batches:
        if out_dir is not None:
            key = latent_key(pipe, ensemble, prompt, cls, steps, guidance, config, batch_size, batch, weights)
            paths.update({s: Path(out_dir) / f"latent_{config.mode}_{cls}_{s}_{key}.safetensors".replace(" ", "-")
                          for s in batch})
        loaded = _load_batch([paths[s] for s in batch], batch) if out_dir is not None and resume else None
        if loaded is not None:
            done.update({s: _rendered(pipe, r) for s, r in zip(batch, loaded)})
            resumed.update(batch)
            continue
        for s, r in zip(batch, search_latents(pipe, ensemble, prompt, cls, seeds=batch, steps=steps,
                                              guidance=guidance, config=config)):
            if out_dir is not None:
                save_latent(paths[s], r, model=model)
            done[s] = r
    rows, results = [], []
    for s in seeds:
        r = done[s]
        rows.append(dict(seed=s, mode=config.mode, cls=cls, prompt=prompt, found=r.found, loss=r.loss,
                         best_loss=r.best_loss, iterations=r.iterations,
                         delta_linf=float(r.delta.abs().max()), latent_norm=float(r.latent.float().norm()),
                         stopped=r.meta.get("stopped"), solo_rejected=r.meta.get("solo_rejected"),
                         path=str(paths[s]) if s in paths else None, resumed=s in resumed))
        results.append(r)
    return pd.DataFrame(rows), results


def _load_batch(paths: Sequence[Path], batch: Sequence[int]) -> list[LatentResult] | None:
    """Every finished search of one batch, or None (then the batch is searched again whole): a file is missing, or
    one is unreadable (a warning names it)."""
    if not all(p.is_file() for p in paths):
        return None
    out = []
    for p in paths:
        try:
            out.append(read_result(p))
        except Exception as err:  # noqa: BLE001 - a truncated or foreign file: search again, say so
            why = (str(err).splitlines() or [type(err).__name__])[0]
            warnings.warn(f"ignoring unreadable latent result {p.name} ({why}); searching its batch (seeds "
                          f"{', '.join(map(str, batch))}) again", stacklevel=3)
            return None
    return out


# ------------------------------------------------------------------------------------------------ saving, rendering
@dataclass
class LatentRecord:
    """A saved latent and the metadata that re-renders it (:func:`load_latent`, :func:`render_latent`)."""

    latent: torch.Tensor
    meta: dict


def save_latent(path: str | Path, result: LatentResult, model: str = "") -> Path:
    """Write the latent (exact dtype), its δ, the metadata needed to re-render it and the search's outcome
    (found, losses, iterations, history) as safetensors; written to a temporary name and renamed (atomic)."""
    import json

    from lib.atomic import write_safetensors_atomic

    meta = {k: "" if v is None else str(v) for k, v in {**result.meta, "found": result.found, "loss": result.loss,
                                                        "best_loss": result.best_loss, "iterations": result.iterations,
                                                        "model": model}.items()}
    meta["history"] = json.dumps(result.history)
    return write_safetensors_atomic({"latent": result.latent, "delta": result.delta}, path, meta)


def load_latent(path: str | Path) -> LatentRecord:
    """The latent and the metadata (strings) of a file :func:`save_latent` wrote, for :func:`render_latent`;
    :func:`read_result` reads the whole search outcome, typed."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata() or {})
        return LatentRecord(f.get_tensor("latent"), meta)


def load_result(pipe, path: str | Path) -> LatentResult:
    """A finished search written by :func:`save_latent`, its image re-rendered (exactly what the search saw)."""
    return _rendered(pipe, read_result(path))


def read_result(path: str | Path) -> LatentResult:
    """A finished search written by :func:`save_latent`, without its image (``image`` None); raises on a missing,
    truncated or foreign file."""
    import json

    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata() or {})
        latent, delta = f.get_tensor("latent"), f.get_tensor("delta")
    missing = [k for k in ("found", "loss", "best_loss", "iterations", "history", "prompt", "steps", "guidance")
               if k not in meta]
    if missing:
        raise ValueError(f"{path} lacks the search outcome {missing}; delete it to search again")
    keys = ("seed", "prompt", "negative", "steps", "guidance", "cls", "mode", "goal", "lr", "residual_mode",
            "residual_step", "residual_weight", "stopped", "batch_solo_max_diff", "solo_fooled", "solo_rejected")
    info = {k: meta.get(k) or None for k in keys}
    for k, cast in (("seed", int), ("steps", int), ("residual_step", int), ("guidance", float), ("lr", float),
                    ("residual_weight", float), ("solo_rejected", int)):  # typed as a fresh search's meta
        if info[k] is not None:
            info[k] = cast(info[k])
    if info["batch_solo_max_diff"] is not None:  # absent from files written before it was recorded
        info["batch_solo_max_diff"] = float(info["batch_solo_max_diff"])
    if info["solo_fooled"] is not None:
        info["solo_fooled"] = info["solo_fooled"] == "True"
    return LatentResult(meta["found"] == "True", latent, delta, float(meta["loss"]), float(meta["best_loss"]),
                        int(meta["iterations"]), json.loads(meta["history"]), None, info)


def _rendered(pipe, result: LatentResult) -> LatentResult:
    """``result`` (from :func:`read_result`) on the pipeline's device with its image re-rendered."""
    meta = {k: "" if v is None else str(v) for k, v in result.meta.items()}
    result.image = render_latent(pipe, LatentRecord(result.latent, meta))
    result.latent, result.delta = result.latent.to(pipe.unet.device), result.delta.to(pipe.unet.device)
    return result


def render_latent(pipe, record: LatentRecord | str | Path, prompt: str | None = None) -> torch.Tensor:
    """Re-render a saved latent with its prompt, steps, guidance and residual settings; images in [0, 1]."""
    rec = load_latent(record) if isinstance(record, (str, Path)) else record
    m = rec.meta
    missing = [k for k in ("prompt", "steps", "guidance") if k not in m]
    if missing:
        raise ValueError(f"latent record lacks metadata {missing}; was it written by save_latent?")
    check_latent(pipe, rec.latent)
    given = lambda k: m.get(k) not in (None, "")  # noqa: E731  (a step of 0 is given: the exact gradient's)
    residual = Residual(int(m["residual_step"]) if given("residual_step") else None,
                        float(m["residual_weight"]) if given("residual_weight") else None,
                        m.get("residual_mode") or "straight_through")
    cond = encode(pipe, [prompt or m["prompt"]] * len(rec.latent), m.get("negative") or None)
    lat = rec.latent.to(pipe.unet.device, pipe.unet.dtype)
    with torch.no_grad():
        return decode(pipe, sample_with_residual(pipe, lat, cond, int(m["steps"]), float(m["guidance"]),
                                                 residual, grad=False))


def config_dict(config: LatentSearch) -> dict:
    """The search settings as a flat dict (for tables)."""
    d = asdict(config)
    d.update({f"residual_{k}": v for k, v in d.pop("residual").items()})
    return d
