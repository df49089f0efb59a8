"""DiffQuickFix (Basu et al., arXiv 2310.13730): a closed-form edit of a CLIP text encoder's attention output.

The edited weight is ``W`` of ``encoder.layers[L].self_attn.out_proj`` (bias untouched). Keys ``k`` are the *input*
of ``out_proj`` for prompts holding the anchor ("van gogh"), values ``v`` its *output* for the same prompts with the
target ("painting"); the update is the minimiser of ``Σ‖W k − v‖² + λ‖W − W_old‖²``::

    W_new = (λ·W_old + Σ v kᵀ)(λ·I + Σ k kᵀ)⁻¹          (float64, Cholesky solve, never an explicit inverse)

Positions (``align``). The keys are every anchor position from the anchor's last subject token to the last position
(76): the subject token, the end token and all padding, which the UNet sees. Anchor and target prompts are aligned
from their last subject tokens onward, position by position. When the phrases have different token lengths the two
tails differ in length: ``align="pad"`` (default, as the released notebook) keeps every anchor position and pairs
the anchor positions beyond the target's tail with the target's last position (76), which holds padding in both;
``align="truncate"`` (as UCE) drops the extra anchor positions.

Values (``subtract_bias``). The released notebook regresses ``W k`` on the whole output ``W k + b`` of the target,
so the edited layer's output is off by the bias ``b``. By default the bias is subtracted from the values, so that the
edited *output* ``W_new k + b`` matches the target's; ``subtract_bias=False`` reproduces the notebook.

This module also holds what the two edits (this one and the cross-attention baseline in :mod:`lib.editing.baseline`)
share: the ridge solve, its check against gradient descent, and :class:`WeightEdit` (apply, revert, save, load).
"""

from __future__ import annotations

import json
import math
import numbers
import operator
import re
import time
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator, Literal, Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lib.atomic import write_atomic, write_text_atomic
from lib.prompts import PromptError, check_length, subject_not_found, subject_occurrences
from lib.sampling import TOKENIZER_OF, conditioning_layers, text_encoder_names

TEMPLATES: tuple[str, ...] = ("{}", "A photo of {}", "An image of {}", "A picture of {}")
DEFAULT_LAMBDA = 0.01
MAX_CONDITION = 1e12  # above this condition number of λI + Σkkᵀ, λ is raised (with a warning)
FORMAT_VERSION = 1
Align = Literal["pad", "truncate"]


class EditError(ValueError):
    """An edit was asked with bad inputs, or does not fit the model it is applied to."""


class IllConditionedWarning(UserWarning):
    """The normal equations were ill-conditioned; λ was raised to keep the solution finite."""


class FingerprintWarning(UserWarning):
    """An edit is applied to a weight that differs from the one it was fitted on (same shape, other values)."""


class PrecisionWarning(UserWarning):
    """Rounding to the weight's dtype (float16, bfloat16) lost a sizeable part of an edit's delta."""


class UnreachedLayerWarning(UserWarning):
    """An edited layer's output does not reach the UNet's cross-attention (SDXL conditions on the penultimate hidden
    state): that encoder's part of the edit changes no token embedding the UNet reads."""


def f64(t: torch.Tensor) -> torch.Tensor:
    """``t`` (detached) in float64, on the CPU when its device has no float64 (Apple's MPS)."""
    return t.detach().to("cpu" if t.device.type == "mps" else t.device, torch.float64)


ROUNDING_TOLERANCE = 0.05  # relative error ‖applied change − Δ‖ / ‖Δ‖ above which apply() warns


# ------------------------------------------------------------------------------------------------- closed form
@dataclass
class RidgeProblem:
    """``min_W Σ‖W kᵢ − vᵢ‖² + λ‖W − W₀‖²`` for fixed keys; several weights can share one factorisation.

    ``A = λI + KᵀK`` is checked (eigenvalues) before the Cholesky factorisation: if its condition number exceeds
    ``max_condition`` (e.g. ``λ = 0`` with fewer keys than dimensions), λ is raised to ``lam_effective`` so that it
    does not, and an :class:`IllConditionedWarning` says so. The solution is then the exact optimum for
    ``lam_effective``.
    """

    keys: torch.Tensor  # (n, d_in)
    lam: float = DEFAULT_LAMBDA
    max_condition: float = MAX_CONDITION
    lam_effective: float = field(init=False)
    condition: float = field(init=False)

    def __post_init__(self) -> None:
        if isinstance(self.lam, bool) or not isinstance(self.lam, numbers.Real) or not (
                self.lam >= 0 and float(self.lam) < float("inf")):
            raise EditError(f"λ must be a finite number >= 0, got {self.lam!r}")
        k = f64(self.keys)
        if k.ndim != 2 or k.shape[0] == 0:
            raise EditError(f"keys must be a non-empty (n, d) matrix, got shape {tuple(k.shape)}")
        if not torch.isfinite(k).all():
            raise EditError("keys contain NaN or inf (a half-precision overflow?); collect them in float32")
        gram = k.T @ k
        eig = torch.linalg.eigvalsh(gram)  # ascending, >= 0 up to rounding
        lo, hi = float(eig[0]), float(eig[-1])
        lam_eff = float(self.lam)
        if math.isinf(self.max_condition):  # λ as given (gradient_descent_gap's reference solve)
            if lo + lam_eff <= hi * gram.shape[0] * torch.finfo(gram.dtype).eps:  # singular up to rounding
                raise EditError(f"λ = {lam_eff:g} with singular keys (smallest eigenvalue of Σkkᵀ {lo:.3g}: fewer "
                                "independent keys than dimensions) has no unique solution; pass a λ > 0 (for "
                                "gradient_descent_gap, the λ the edit used: edit.meta['solve'][<encoder>]"
                                "['lam_effective'])")
        elif hi + lam_eff <= 0 or (hi + lam_eff) > self.max_condition * (lo + lam_eff):
            lam_eff = max((hi - self.max_condition * lo) / (self.max_condition - 1), lam_eff, 1e-300)
            warnings.warn(
                f"ill-conditioned edit: cond(λI + Σkkᵀ) = {(hi + self.lam) / max(lo + self.lam, 1e-300):.3g} with "
                f"λ = {self.lam:g}; λ raised to {lam_eff:.3g} (condition {self.max_condition:.0e})",
                IllConditionedWarning, stacklevel=3,
            )
        self.lam_effective = lam_eff
        self.condition = (hi + lam_eff) / (lo + lam_eff)
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        self._chol, info = torch.linalg.cholesky_ex(gram + lam_eff * eye)
        if int(info) != 0:
            raise EditError(f"the normal equations are not positive definite (leading minor {int(info)}) even with "
                            f"λ = {lam_eff:.3g}; the keys are degenerate")
        self._k = k

    def solve(self, weight: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """The optimal ``W`` (float64, shape of ``weight``) for targets ``values`` (n, d_out) of ``W k``."""
        w0 = weight.detach().to(self._k.device, torch.float64)
        v = values.detach().to(self._k.device, torch.float64)
        if v.shape != (self._k.shape[0], w0.shape[0]) or w0.shape[1] != self._k.shape[1]:
            raise EditError(f"shapes do not match: keys {tuple(self._k.shape)}, values {tuple(v.shape)}, "
                            f"weight {tuple(w0.shape)}")
        if not torch.isfinite(v).all() or not torch.isfinite(w0).all():
            raise EditError("values or weight contain NaN or inf")
        rhs = self.lam_effective * w0 + v.T @ self._k  # λ W₀ + Σ v kᵀ, (d_out, d_in)
        w = torch.cholesky_solve(rhs.T, self._chol).T  # W A = rhs  ⇔  A Wᵀ = rhsᵀ (A symmetric)
        if not torch.isfinite(w).all():
            raise EditError("the solve produced non-finite weights; refusing to write them")
        return w


def closed_form(keys: torch.Tensor, values: torch.Tensor, weight: torch.Tensor, lam: float = DEFAULT_LAMBDA,
                max_condition: float = MAX_CONDITION) -> torch.Tensor:
    """``(λW + Σ v kᵀ)(λI + Σ k kᵀ)⁻¹`` in float64 (see :class:`RidgeProblem`)."""
    return RidgeProblem(keys, lam, max_condition).solve(weight, values)


@dataclass(frozen=True)
class GapReport:
    """Closed form vs an iterative gradient-based minimiser of the same objective."""

    rel_weight: float  # ‖W_it − W_cf‖ / ‖W_cf‖
    rel_update: float  # ‖W_it − W_cf‖ / ‖W_cf − W_old‖: the stricter one (the update is small next to W)
    objective_closed: float
    objective_iterative: float
    iterations: int
    method: str


def gradient_descent_gap(keys: torch.Tensor, values: torch.Tensor, weight: torch.Tensor, lam: float = DEFAULT_LAMBDA,
                         method: Literal["cg", "lbfgs"] = "cg", max_iter: int = 2000, tol: float = 1e-10) -> GapReport:
    """Minimise ``Σ‖W k − v‖² + λ‖W − W_old‖²`` iteratively in float64 from ``W_old``; compare with the closed form.

    The objective is written from the residuals (not from the normal equations) and differentiated by autograd.
    ``method="cg"``: nonlinear conjugate gradient (Polak–Ribière+) with the exact line search of a quadratic (step
    from an autograd Hessian-vector product); it stops when the gradient has shrunk by ``tol``. ``"lbfgs"``:
    ``torch.optim.LBFGS`` with a strong-Wolfe line search; on these badly conditioned problems (cond ~1e4 with
    λ = 0.01) it stalls near a 1e-4 relative error of the update, so CG is the default.
    """
    k = f64(keys)
    v = values.detach().to(k.device, torch.float64)
    w0 = weight.detach().to(k.device, torch.float64)
    w_cf = closed_form(k, v, w0, lam, max_condition=float("inf"))

    def objective(u: torch.Tensor) -> torch.Tensor:  # of the update u = W − W_old
        return ((k @ (w0 + u).T - v) ** 2).sum() + lam * (u**2).sum()

    def grad(u: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
        u = u if u.requires_grad else u.detach().requires_grad_(True)
        return torch.autograd.grad(objective(u), u, create_graph=create_graph)[0]

    u = torch.zeros_like(w0)
    it = 0
    if method == "cg":
        g = grad(u)
        g0 = float(g.abs().max())
        p = -g
        for it in range(1, max_iter + 1):
            if g0 == 0.0:  # W_old is already the optimum (v = W_old k): no step to take, and 0/0 below
                it = 0
                break
            ur = u.detach().requires_grad_(True)
            hp = torch.autograd.grad((grad(ur, create_graph=True) * p).sum(), ur)[0]  # Hessian · p
            u = u + (-(g * p).sum() / (p * hp).sum()) * p
            g_new = grad(u)
            if float(g_new.abs().max()) <= tol * g0:
                break
            beta = max(0.0, float((g_new * (g_new - g)).sum() / (g * g).sum()))
            p, g = -g_new + beta * p, g_new
    elif method == "lbfgs":
        param = torch.zeros_like(w0, requires_grad=True)
        scale = float(objective(u)) or 1.0
        opt = torch.optim.LBFGS([param], lr=1, max_iter=max_iter, max_eval=2 * max_iter, tolerance_grad=tol * 1e-4,
                                tolerance_change=0.0, history_size=50, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = objective(param) / scale
            loss.backward()
            return loss

        opt.step(closure)
        u, it = param.detach(), int(opt.state[param].get("n_iter", 0))
    else:
        raise EditError(f"method must be 'cg' or 'lbfgs', got {method!r}")
    u = u.detach()
    diff = float((w0 + u - w_cf).norm())
    update = float((w_cf - w0).norm())
    rel_weight = diff / float(w_cf.norm())
    with torch.no_grad():
        return GapReport(
            rel_weight=rel_weight,
            # an update at rounding level (W_old already optimal) has no scale of its own: measure against W
            rel_update=diff / update if update > 1e-12 * float(w_cf.norm()) else rel_weight,
            objective_closed=float(objective(w_cf - w0)),
            objective_iterative=float(objective(u)),
            iterations=it,
            method=method,
        )


# ------------------------------------------------------------------------------------------- prompt alignment
@dataclass(frozen=True)
class PromptPair:
    """One anchor prompt and its target prompt, with the aligned token positions (keys ↔ values)."""

    anchor: str
    target: str
    anchor_prompt: str
    target_prompt: str
    key_positions: tuple[int, ...]
    value_positions: tuple[int, ...]


def _phrases(name: str, value: str | Sequence[str]) -> list[str]:
    items = [value] if isinstance(value, str) else list(value)
    if not items:
        raise EditError(f"no {name} given")
    for p in items:
        if not isinstance(p, str) or not p.strip():
            raise EditError(f"empty {name} phrase {p!r}")
    return items


def normalize_phrase(phrase: str) -> str:
    """A phrase as CLIP's tokenizer sees it: lower case, single spaces."""
    return " ".join(phrase.lower().split())


def _prompts_by_phrase(prompts: Mapping[str, Sequence[str]] | None,
                       pairs: Sequence[tuple[str, str]]) -> dict[str, list[str]]:
    """``prompts`` keyed by normalised phrase (keys naming other phrases are ignored, so one mapping of anchors'
    prompts can serve several edits); :class:`EditError` for two keys naming one phrase, a value that is not a list of
    strings, prompts for a phrase that is both an anchor and a target here (its prompts would be paired with another
    anchor's), or a mapping that holds other edits' phrases and this edit's target (a shared mapping: the target's
    entry is another edit's anchor prompts, which would silently be paired with this edit's anchor prompts). A mapping
    of exactly this edit's anchor and target cannot be told from explicit target prompts and is taken as such: give
    each edit a mapping of its own anchors only."""
    out: dict[str, list[str]] = {}
    for key, value in (prompts or {}).items():
        k = normalize_phrase(key)
        if k in out:
            raise EditError(f"prompts are given twice for {key!r} (keys are matched case-insensitively)")
        if isinstance(value, str) or not all(isinstance(p, str) for p in value):
            raise EditError(f"prompts[{key!r}] must be a list of prompt strings, got {value!r}")
        if not list(value):  # was taken as "no prompts given" and fitted on the templates, recorded as []
            raise EditError(f"prompts[{key!r}] is empty: give its prompts, or leave the key out for the templates")
        out[k] = list(value)
    anchors, targets = {normalize_phrase(x) for x, _ in pairs}, {normalize_phrase(y) for _, y in pairs}
    both = [k for k in out if k in anchors and k in targets]
    if both:
        raise EditError(f"prompts given for {both}, which are both an anchor and a target: give the anchors' prompts "
                        "only (each target prompt is then its anchor prompt with the phrase replaced)")
    others = sorted(k for k in out if k not in anchors | targets)
    named = sorted(k for k in out if k in targets)
    if others and named:  # a mapping shared with other edits: its entry for this target is another edit's anchor's
        raise EditError(f"prompts holds {named} (a target here: its prompts would be taken as the target prompts) and "
                        f"phrases of other edits {others}: pass this edit's anchors' prompts only, or its anchors' "
                        "and targets' prompts alone")
    return out


def concept_pairs(anchors: str | Sequence[str], targets: str | Sequence[str]) -> list[tuple[str, str]]:
    """Check and pair anchors with targets (one target may serve every anchor)."""
    a = _phrases("anchor", anchors)
    t = _phrases("target", targets)
    if len(t) == 1 and len(a) > 1:
        t = t * len(a)
    if len(a) != len(t):
        raise EditError(f"{len(a)} anchors but {len(t)} targets; give one target, or one per anchor")
    seen: dict[str, str] = {}
    for x, y in zip(a, t):
        if normalize_phrase(x) == normalize_phrase(y):
            raise EditError(f"anchor and target are the same phrase ({x!r}): the edit would do nothing")
        if normalize_phrase(x) in seen:
            raise EditError(f"anchor {x!r} is given twice (targets {seen[normalize_phrase(x)]!r} and {y!r}): give each "
                            "anchor once")
        seen[normalize_phrase(x)] = y
    return list(zip(a, t))


def align_prompts(tokenizer, anchors: str | Sequence[str], targets: str | Sequence[str],
                  templates: Sequence[str] = TEMPLATES, prompts: Mapping[str, Sequence[str]] | None = None,
                  align: Align = "pad") -> list[PromptPair]:
    """Anchor and target prompts with the positions whose keys and values enter the edit (see the module doc).

    Prompts are each template with its ``{}`` replaced by the phrase, or ``prompts[phrase]`` when given (keys matched
    case-insensitively; anchor and target lists are paired in order; see :func:`_prompts_by_phrase` for the keys
    refused). When ``prompts`` holds an anchor but not its target, the target prompts are the
    anchor's with the phrase replaced ("a dog, in the style of van gogh" → "a dog, in the style of painting"), so
    several anchors may share one target. A phrase absent from its own prompt raises :class:`~lib.prompts.PromptError`.

    The anchor must occur once in each of its prompts (:class:`EditError` otherwise: the keys of a second occurrence
    would meet whatever target tokens sit at the same offset). The target is aligned at the occurrence that fills the
    anchor's place — the template's slot or the substituted span — so it may also occur elsewhere ("a van gogh
    painting" → "a painting painting"); in target prompts given by the user it must occur once.
    """
    if align not in ("pad", "truncate"):
        raise EditError(f"align must be 'pad' or 'truncate', got {align!r}")
    templates = list(templates)
    if not templates or any(not isinstance(t, str) or t.count("{}") != 1 for t in templates):
        raise EditError(f"every template needs exactly one '{{}}' for the phrase, got {templates!r}")
    pairs = concept_pairs(anchors, targets)
    given = _prompts_by_phrase(prompts, pairs)
    length = int(tokenizer.model_max_length)
    out = []
    for anchor, target in pairs:
        a_prompts = list(given.get(normalize_phrase(anchor)) or [t.replace("{}", anchor) for t in templates])
        if given.get(normalize_phrase(target)):
            t_prompts, t_before = list(given[normalize_phrase(target)]), [None] * len(given[normalize_phrase(target)])
        elif given.get(normalize_phrase(anchor)):
            t_prompts = [substitute(p, anchor, target) for p in a_prompts]
            t_before = [_text_before(p, anchor) for p in a_prompts]
        else:
            t_prompts, t_before = [t.replace("{}", target) for t in templates], [t.split("{}")[0] for t in templates]
        if len(a_prompts) != len(t_prompts):
            raise EditError(f"{len(a_prompts)} prompts for anchor {anchor!r} but {len(t_prompts)} for target "
                            f"{target!r}; they are paired in order")
        check_length(tokenizer, a_prompts + t_prompts)
        for ap, tp, before in zip(a_prompts, t_prompts, t_before):
            a_last = _last_subject_token(tokenizer, ap, anchor, "anchor")
            t_last = _last_subject_token(tokenizer, tp, target, "target", before)
            keys = list(range(a_last, length))
            if align == "pad":
                vals = [min(t_last + j, length - 1) for j in range(len(keys))]
            else:
                n = min(length - a_last, length - t_last)
                keys, vals = keys[:n], list(range(t_last, t_last + n))
            out.append(PromptPair(anchor, target, ap, tp, tuple(keys), tuple(vals)))
    return out


def phrase_pattern(phrase: str) -> str:
    """A regular expression for ``phrase`` as whole words, any whitespace between them."""
    return r"(?<!\w)" + r"\s+".join(map(re.escape, phrase.split())) + r"(?!\w)"


def _text_before(prompt: str, phrase: str) -> str:
    """The text of ``prompt`` before the first occurrence of ``phrase`` (as :func:`substitute` matches it)."""
    m = re.search(phrase_pattern(phrase), prompt, flags=re.IGNORECASE)
    if m is None:
        raise PromptError(f"anchor {phrase!r} is absent from its own prompt {prompt!r}")
    return prompt[: m.start()]


def substitute(prompt: str, phrase: str, replacement: str) -> str:
    """``prompt`` with every occurrence of ``phrase`` (case-insensitive, whole words) replaced."""
    out, n = re.subn(phrase_pattern(phrase), replacement, prompt, flags=re.IGNORECASE)
    if n == 0:
        raise PromptError(f"anchor {phrase!r} is absent from its own prompt {prompt!r}")
    return out


def _last_subject_token(tokenizer, prompt: str, phrase: str, role: str, before: str | None = None) -> int:
    """The last token of ``phrase`` in ``prompt``: of the occurrence that follows the text ``before`` (the slot it was
    put in), or of its only occurrence when ``before`` is None (absent, or repeated, is then an error)."""
    found = subject_occurrences(tokenizer, prompt, phrase)
    if not found:
        err = subject_not_found(tokenizer, prompt, phrase)
        raise PromptError(f"{role} {phrase!r} is absent from its own prompt {prompt!r}: {err}")
    if before is not None:
        k = len(subject_occurrences(tokenizer, before + phrase, phrase)) - 1
        if 0 <= k < len(found):
            return found[k][-1]
        raise PromptError(f"{role} {phrase!r} does not tokenise in place in {prompt!r} (occurrence {k + 1} of "
                          f"{len(found)})")
    if len(found) > 1:
        raise EditError(f"{role} {phrase!r} occurs {len(found)} times in its prompt {prompt!r}; DiffQuickFix aligns "
                        "one occurrence per prompt: give prompts that name it once")
    return found[0][-1]


# ------------------------------------------------------------------------------------------ the edit object
def _resolve(pipe, path: str) -> torch.nn.Parameter | None:
    """``"component:dotted.param.name"`` → the parameter, or None. ``text_model.`` prefixes are matched loosely
    (transformers 5 drops it from ``CLIPTextModel`` but keeps it in ``CLIPTextModelWithProjection``)."""
    comp, _, name = path.partition(":")
    module = getattr(pipe, comp, None)
    if not isinstance(module, torch.nn.Module):
        return None
    params = dict(module.named_parameters())
    for cand in (name, name.removeprefix("text_model."), "text_model." + name):
        if cand in params:
            return params[cand]
    return None


def _fingerprint(w: torch.Tensor) -> list[float]:
    """A dtype-tolerant signature of a weight: its norm and 16 evenly spaced entries."""
    flat = f64(w.reshape(-1))
    step = max(1, flat.numel() // 16)
    return [float(flat.norm())] + flat[::step][:16].cpu().tolist()


_STATE_ATTR = "_t2i_applied_edit"  # on each edited Parameter: (edit uid, original tensor). On the weight, not the
# pipeline: two pipelines built from the same components share it, and a swapped-in module starts clean


def _same(fingerprint: list[float] | None, p: torch.Tensor) -> bool:
    """Whether weight ``p`` matches a :func:`_fingerprint` (dtype-tolerant)."""
    return fingerprint is not None and torch.allclose(torch.tensor(_fingerprint(p)), torch.tensor(fingerprint),
                                                      rtol=1e-2, atol=1e-3)


@dataclass(eq=False)
class WeightEdit:
    """Additive float32 deltas on named weights of a pipeline, with exact revert and a small safetensors file.

    ``deltas`` maps ``"component:param.name"`` (e.g. ``"text_encoder:encoder.layers.0.self_attn.out_proj.weight"``)
    to ``W_new − W_old``; ``meta`` is JSON-serialisable (``fingerprints`` / ``edited_fingerprints``: signatures of
    the weights before and after, which :meth:`apply` checks). :meth:`apply` keeps each original tensor on its weight,
    so :meth:`revert` restores it bit for bit; a weight carries one applied edit at a time, whichever pipeline holds it.
    """

    deltas: dict[str, torch.Tensor]
    meta: dict[str, Any]
    KIND: ClassVar[str] = "weight-edit"
    _registry: ClassVar[dict[str, type]] = {}

    def __post_init__(self) -> None:
        if not self.deltas:  # applied vacuously, then its revert found nothing applied
            raise EditError(f"a {self.KIND} edit needs at least one weight delta")
        self.uid = uuid.uuid4().hex
        self.rounding_error: dict[str, float] = {}  # set by apply()
        self.meta.setdefault("kind", self.KIND)

    def __init_subclass__(cls, **kw) -> None:
        super().__init_subclass__(**kw)
        WeightEdit._registry[cls.KIND] = cls

    # ----- application
    def _params(self, pipe) -> dict[str, torch.nn.Parameter]:
        found, problems = {}, []
        for path, delta in self.deltas.items():
            p = _resolve(pipe, path)
            if p is None:
                problems.append(f"{path}: no such weight in this pipeline")
            elif tuple(p.shape) != tuple(delta.shape):
                problems.append(f"{path}: model weight {tuple(p.shape)} vs edit {tuple(delta.shape)}")
            else:
                found[path] = p
        if problems:
            raise EditError(f"this {self.KIND} edit does not fit the model (fitted on "
                            f"{self.meta.get('model', 'another model')}): " + "; ".join(problems))
        return found

    def check_compatible(self, pipe) -> None:
        """Raise :class:`EditError` if a weight is missing or has another shape."""
        self._params(pipe)

    def is_applied(self, pipe) -> bool:
        try:
            params = self._params(pipe)
        except EditError:
            return False
        return all(getattr(p, _STATE_ATTR, (None,))[0] == self.uid for p in params.values())

    def apply(self, pipe) -> "WeightEdit":
        """Add the deltas to the pipeline's weights (in place, in their dtype); returns ``self``.

        ``W_old + Δ`` is formed in float64 and rounded once to the weight's dtype. ``self.rounding_error`` holds, per
        weight, ``‖applied change − Δ‖ / ‖Δ‖``; above :data:`ROUNDING_TOLERANCE` a :class:`PrecisionWarning` says to
        load that component in float32 (a small Δ on float16 weights is partly rounded away).
        """
        params = self._params(pipe)
        busy = [path for path, p in params.items() if hasattr(p, _STATE_ATTR)]
        if busy:
            mine = all(getattr(params[path], _STATE_ATTR)[0] == self.uid for path in busy)
            raise EditError(("this edit is already applied" if mine else "another edit is applied to "
                             + ", ".join(busy)) + "; revert it first")
        for path, p in params.items():
            ref = self.meta.get("fingerprints", {}).get(path)
            if _same(self.meta.get("edited_fingerprints", {}).get(path), p) and not _same(ref, p):
                raise EditError(f"{path} already holds this edit (a model saved with it applied?): applying it "
                                "again would add the change twice")
            if ref is not None and not _same(ref, p):
                warnings.warn(f"{path} differs from the weight this edit was fitted on", FingerprintWarning,
                              stacklevel=2)
        self.rounding_error = {}
        with torch.no_grad():
            for path, p in params.items():
                orig = p.detach().clone()
                start = f64(orig)  # the CPU's float64 for a weight on MPS, which has none
                delta = self.deltas[path].to(start.device, torch.float64)
                setattr(p, _STATE_ATTR, (self.uid, orig))
                p.copy_((start + delta).to(p.dtype))
                self.rounding_error[path] = float((f64(p) - start - delta).norm() / delta.norm().clamp_min(1e-300))
        try:  # after every weight is applied; a warning turned into an error leaves the weights as they were
            for path, lost in self.rounding_error.items():
                if lost > ROUNDING_TOLERANCE:
                    warnings.warn(f"{path}: {lost:.0%} of this edit's delta is lost to {params[path].dtype} rounding; "
                                  f"load {path.split(':')[0]} in float32 for the edit as fitted", PrecisionWarning,
                                  stacklevel=2)
        except BaseException:
            self.revert(pipe)
            raise
        return self

    def revert(self, pipe) -> "WeightEdit":
        """Restore the exact original weights; returns ``self``."""
        if not self.deltas or not self.is_applied(pipe):
            raise EditError("this edit is not applied to this pipeline; nothing to revert")
        with torch.no_grad():
            for p in self._params(pipe).values():
                p.copy_(getattr(p, _STATE_ATTR)[1])
                delattr(p, _STATE_ATTR)
        return self

    @contextmanager
    def applied(self, pipe) -> Iterator["WeightEdit"]:
        """``with edit.applied(pipe): ...`` — applied inside, reverted on exit (also on errors)."""
        self.apply(pipe)
        try:
            yield self
        finally:
            self.revert(pipe)

    # ----- files
    @property
    def nbytes(self) -> int:
        return sum(d.numel() * d.element_size() for d in self.deltas.values())

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the deltas (float32 safetensors, metadata in its header) and a readable ``.json`` beside it."""
        path = Path(path)
        if path.suffix != ".safetensors":
            path = Path(f"{path}.safetensors")
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {**self.meta, "format_version": FORMAT_VERSION}
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.deltas.items()}
        # each file through a temporary one and a rename: a killed save leaves the previous edit intact
        write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata={"edit": json.dumps(meta)}))
        write_text_atomic(json.dumps(meta, indent=2) + "\n", path.with_suffix(".json"))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "WeightEdit":
        """Read an edit written by :meth:`save`; the class follows the file's ``kind``."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no edit file at {path}")
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            if "edit" not in header:
                raise EditError(f"{path} is not an edit file (no 'edit' metadata in its header)")
            meta = json.loads(header["edit"])
            deltas = {k: f.get_tensor(k) for k in f.keys()}
        kind = meta.get("kind", cls.KIND)
        klass = WeightEdit._registry.get(kind, cls)
        if cls is not WeightEdit and not issubclass(klass, cls):
            raise EditError(f"{path} holds a {kind!r} edit, not a {cls.KIND!r} one")
        return klass(deltas, meta)

    def __repr__(self) -> str:
        keys = ("anchors", "targets", "layer", "lam")
        info = ", ".join(f"{k}={self.meta[k]!r}" for k in keys if k in self.meta)
        return f"{type(self).__name__}({info}, {len(self.deltas)} weight(s), {self.nbytes / 2**20:.1f} MiB)"


def check_not_source(source: str | Path | None, folder: str | Path) -> None:
    """``EditError`` when ``folder`` is the model's ``source`` folder or inside it (a save there would overwrite or
    nest in the weights it was loaded from); ``source``: a local path, or anything else (a hub id: nothing to check)."""
    if not source or not Path(source).expanduser().exists():
        return
    src, folder = Path(source).expanduser().resolve(), Path(folder).expanduser().resolve()
    if folder == src or src in folder.parents:
        raise EditError(f"refusing to write into the model's source folder {src}; choose a new folder")


def save_edited_model(pipe, edit: WeightEdit, folder: str | Path, replace: bool = False) -> Path:
    """Save the pipeline with ``edit`` applied as a new diffusers folder, with the edit file and ``EDITED_FROM.json``
    (the source model, repo-relative when inside the repo: an edited toy world stays a toy world,
    :func:`lib.loading.toy_source`).

    Refuses the pipeline's own source folder (or a folder inside it), a pipeline that holds another applied edit (it
    would be saved too, recorded nowhere), and an existing folder unless ``replace`` (the old one is removed only once
    the new one is complete). The pipeline is left as it was (edited or not). Writes to a temporary sibling folder
    first, so a failure leaves nothing behind.
    """
    import shutil

    others = sorted({name for c_name, module in pipe.components.items() if isinstance(module, torch.nn.Module)
                     for name, p in ((f"{c_name}:{n}", p) for n, p in module.named_parameters())
                     if hasattr(p, _STATE_ATTR) and getattr(p, _STATE_ATTR)[0] != edit.uid})
    if others:
        raise EditError(f"another edit is applied to {len(others)} weight(s) ({others[0]}, ...): revert it first, or "
                        "the saved model would hold it without a record")

    import json

    from lib.atomic import write_text_atomic
    from lib.loading import EDITED_FROM
    from lib.paths import from_repo_root

    folder = Path(folder).expanduser().resolve()
    source = getattr(pipe, "name_or_path", None) or getattr(getattr(pipe, "config", None), "_name_or_path", None)
    check_not_source(source, folder)
    if folder.exists() and not replace:
        raise FileExistsError(f"{folder} exists; save_edited_model writes a new folder and never overwrites "
                              "(replace=True replaces it)")
    tmp = folder.with_name(f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
    old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}") if folder.exists() else None
    was_applied = edit.is_applied(pipe)
    if not was_applied:
        edit.apply(pipe)
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        edit_file = edit.save(tmp / f"{edit.KIND}_edit.safetensors")
        where = from_repo_root(source) if source and Path(source).expanduser().exists() else source
        write_text_atomic(json.dumps({"source": where, "edit": edit_file.name}, indent=1) + "\n", tmp / EDITED_FROM)
        if old is not None:
            folder.rename(old)  # the complete new folder is in place before the old one is removed
        tmp.rename(folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and not folder.exists():
            old.rename(folder)  # the earlier model, as it was
        raise
    finally:
        if not was_applied:
            edit.revert(pipe)
    return folder


# ------------------------------------------------------------------------------------------------ DiffQuickFix
def encoder_layers(text_encoder) -> torch.nn.ModuleList:
    """``encoder.layers`` of a ``CLIPTextModel`` (transformers 5) or ``CLIPTextModelWithProjection``."""
    tm = getattr(text_encoder, "text_model", text_encoder)
    layers = getattr(getattr(tm, "encoder", None), "layers", None)
    if layers is None:
        raise EditError(f"{type(text_encoder).__name__} has no encoder.layers: not a CLIP text encoder")
    return layers


def unreached_encoders(pipe, layer: int, encoders: Sequence[str] | None = None) -> list[str]:
    """The text encoders (of ``encoders``, default all) whose ``layer`` exists but does not reach the UNet's
    cross-attention (:func:`lib.sampling.conditioning_layers`; SDXL's last layers): an edit there changes no token
    embedding the UNet reads."""
    return [n for n in (text_encoder_names(pipe) if encoders is None else encoders)
            if conditioning_layers(pipe, n) <= layer < len(encoder_layers(getattr(pipe, n)))]


def check_edit_layers(depths: Mapping[str, int], layer: int, sweep_layers: Sequence[int] | None = None) -> list[int]:
    """The layers of a layer sweep (``None``: every layer of ``text_encoder``), after an ``EditError`` for an edited
    ``layer`` that some text encoder lacks (an edit changes that layer in every encoder) or a sweep layer that
    ``text_encoder`` lacks. ``depths``: encoder → number of layers, from the loaded pipeline or, before it loads,
    :func:`lib.loading.text_depths` (empty: nothing to check yet, returns ``[]`` for a full sweep)."""
    for name, depth in depths.items():
        if not 0 <= layer < depth:
            raise EditError(f"LAYER {layer} is out of range: {name} has layers 0..{depth - 1}")
    first = depths.get("text_encoder")
    if first is None:
        return list(sweep_layers or [])
    chosen = list(range(first)) if sweep_layers is None else list(sweep_layers)
    bad = [i for i in chosen if not 0 <= i < first]
    if bad:
        raise EditError(f"SWEEP_LAYERS {bad} out of range: the text encoder has layers 0..{first - 1}")
    return chosen


def out_proj(text_encoder, layer: int) -> torch.nn.Linear:
    """``encoder.layers[layer].self_attn.out_proj``, with a clear error for a layer out of range."""
    layers = encoder_layers(text_encoder)
    layer = layer_index(layer)
    if not 0 <= layer < len(layers):
        raise EditError(f"layer {layer!r} is out of range: this text encoder has layers 0..{len(layers) - 1}")
    return layers[layer].self_attn.out_proj


def layer_index(layer) -> int:
    """``layer`` as a Python int (numpy and torch integers too: a sweep over ``np.arange``), else :class:`EditError`."""
    try:
        if isinstance(layer, bool) or isinstance(layer, torch.Tensor) and layer.ndim:
            raise TypeError
        return operator.index(layer)
    except TypeError:
        raise EditError(f"layer must be an integer index, got {layer!r} ({type(layer).__name__})") from None


class _Stop(Exception):
    """Raised by the capture hook to skip the layers after the edited one."""


@torch.no_grad()
def capture_out_proj(text_encoder, layer: int, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Input and output (B, T, D) of ``out_proj`` at ``layer``, running the encoder only up to that layer.

    The encoder is called as the pipelines call it (token ids, no attention mask: CLIP's mask is causal only).
    """
    module = out_proj(text_encoder, layer)
    seen: dict[str, torch.Tensor] = {}

    def hook(_m, inp, out):
        seen["in"], seen["out"] = inp[0].detach(), out.detach()
        raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        text_encoder(input_ids.to(text_encoder.device))
    except _Stop:
        pass
    finally:
        handle.remove()
    if "in" not in seen:
        raise EditError(f"out_proj of layer {layer} was not called by the encoder's forward")
    return seen["in"], seen["out"]


@dataclass
class KeysValues:
    """What one encoder's edit is fitted on (float64)."""

    encoder: str
    param: str  # "component:param.name"
    keys: torch.Tensor  # (n, d_in)
    values: torch.Tensor  # (n, d_out), targets for W·k (bias removed when subtract_bias)
    weight: torch.Tensor  # (d_out, d_in), the original W
    pairs: list[PromptPair]


def collect_keys_values(pipe, anchors: str | Sequence[str], targets: str | Sequence[str], layer: int = 0,
                        encoder: str = "text_encoder", templates: Sequence[str] = TEMPLATES,
                        prompts: Mapping[str, Sequence[str]] | None = None, align: Align = "pad",
                        subtract_bias: bool = True) -> KeysValues:
    """Keys (``out_proj`` inputs, anchor prompts) and values (outputs, target prompts) at the aligned positions."""
    te = getattr(pipe, encoder, None)
    tok = getattr(pipe, TOKENIZER_OF.get(encoder, ""), None)
    if te is None or tok is None:
        raise EditError(f"the pipeline has no {encoder!r} with a tokenizer; encoders here: {text_encoder_names(pipe)}")
    proj = out_proj(te, layer)
    n_pos = getattr(getattr(te, "config", None), "max_position_embeddings", None)
    if n_pos is not None and int(tok.model_max_length) != int(n_pos):
        raise EditError(f"{encoder}'s tokenizer pads to model_max_length={tok.model_max_length}, but the encoder has "
                        f"{n_pos} positions (a tokenizer built without its config?); set tokenizer.model_max_length = "
                        f"{n_pos}")
    pairs = align_prompts(tok, anchors, targets, templates, prompts, align)
    texts = [p.anchor_prompt for p in pairs] + [p.target_prompt for p in pairs]
    ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    x, y = capture_out_proj(te, layer, ids)
    x, y = f64(x), f64(y)
    n = len(pairs)
    keys = torch.cat([x[i, list(p.key_positions)] for i, p in enumerate(pairs)])
    values = torch.cat([y[n + i, list(p.value_positions)] for i, p in enumerate(pairs)])
    if subtract_bias and proj.bias is not None:
        values = values - proj.bias.detach().to(values.device, torch.float64)
    name = {id(m): k for k, m in te.named_modules()}[id(proj)]
    return KeysValues(encoder, f"{encoder}:{name}.weight", keys, values, f64(proj.weight),
                      pairs)


class QuickFixEdit(WeightEdit):
    """A DiffQuickFix edit: one ``out_proj`` delta per text encoder. Build it with :meth:`fit` (or ``quickfix``)."""

    KIND: ClassVar[str] = "quickfix"

    @classmethod
    def fit(cls, pipe, anchors: str | Sequence[str], targets: str | Sequence[str], layer: int | Mapping[str, int] = 0,
            lam: float = DEFAULT_LAMBDA, encoders: Sequence[str] | None = None, templates: Sequence[str] = TEMPLATES,
            prompts: Mapping[str, Sequence[str]] | None = None, align: Align = "pad", subtract_bias: bool = True,
            max_condition: float = MAX_CONDITION) -> "QuickFixEdit":
        """Fit the edit that maps each anchor onto its target (several pairs: one joint solve per encoder).

        ``layer``: one index for every encoder, or ``{"text_encoder": 0, "text_encoder_2": 3}``. ``encoders``:
        default every text encoder of the pipeline (both for SDXL, each with its own keys and values).
        """
        t0 = time.perf_counter()
        pairs = concept_pairs(anchors, targets)
        names = [encoders] if isinstance(encoders, str) else list(encoders) if encoders is not None \
            else text_encoder_names(pipe)
        if not names:
            raise EditError("the pipeline has no CLIP text encoder to edit")
        unknown = [n for n in names if n not in text_encoder_names(pipe)]
        if unknown:
            raise EditError(f"unknown encoder(s) {unknown}; this pipeline has {text_encoder_names(pipe)}")
        if isinstance(layer, Mapping):
            lacking, extra = [n for n in names if n not in layer], [n for n in layer if n not in names]
            if lacking or extra:
                raise EditError(f"layer mapping {dict(layer)} does not match the edited encoders {names}: "
                                + (f"no layer for {lacking}" if lacking else f"{extra} not edited (encoders=...)"))
        layers = {n: layer_index(layer[n] if isinstance(layer, Mapping) else layer) for n in names}
        for n in names:
            if n in unreached_encoders(pipe, layers[n], [n]):
                pooled = " only changes the pooled embedding" if n == "text_encoder_2" else " changes no image"
                warnings.warn(f"{n} layer {layers[n]} does not reach the UNet's cross-attention (it reads the output "
                              f"of layer {conditioning_layers(pipe, n) - 1}): this part of the edit{pooled}",
                              UnreachedLayerWarning, stacklevel=3)
        deltas, info = {}, {}
        for n in names:
            kv = collect_keys_values(pipe, [a for a, _ in pairs], [t for _, t in pairs], layers[n], n, templates,
                                     prompts, align, subtract_bias)
            ridge = RidgeProblem(kv.keys, lam, max_condition)
            w_new = ridge.solve(kv.weight, kv.values)
            deltas[kv.param] = (w_new - kv.weight.to(w_new.device)).to("cpu", torch.float32)
            info[n] = dict(param=kv.param, layer=layers[n], shape=list(kv.weight.shape), n_keys=int(kv.keys.shape[0]),
                           lam_effective=ridge.lam_effective, condition=ridge.condition,
                           fingerprint=_fingerprint(kv.weight), edited=_fingerprint(w_new))
        meta = dict(
            anchors=[a for a, _ in pairs], targets=[t for _, t in pairs], layer=layers, lam=float(lam),
            encoders=names, shapes={i["param"]: i["shape"] for i in info.values()},
            fingerprints={i["param"]: i["fingerprint"] for i in info.values()},
            edited_fingerprints={i["param"]: i["edited"] for i in info.values()},
            solve={n: {k: i[k] for k in ("n_keys", "lam_effective", "condition")} for n, i in info.items()},
            templates=list(templates), prompts={k: list(v) for k, v in (prompts or {}).items()}, align=align,
            subtract_bias=subtract_bias, model=_model_name(pipe), fit_seconds=time.perf_counter() - t0,
        )
        return cls(deltas, meta)


def quickfix(pipe, anchors: str | Sequence[str], targets: str | Sequence[str], layer: int | Mapping[str, int] = 0,
             lam: float = DEFAULT_LAMBDA, **kwargs) -> QuickFixEdit:
    """Shorthand for :meth:`QuickFixEdit.fit`."""
    return QuickFixEdit.fit(pipe, anchors, targets, layer, lam, **kwargs)


def _model_name(pipe) -> str:
    name = getattr(pipe, "name_or_path", None)
    return str(name) if name else type(pipe).__name__
