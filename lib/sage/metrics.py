"""SAGE's numbers: SSR(A), the independent re-check of reported failures, and NGR of found latents.

* SSR(A), automatic search success rate: per mode, the fraction of search runs whose result fools the ensemble.
* Re-check: every reported failure judged again by a classifier *not* in the ensemble (same :class:`Criteria`), and,
  in the toy world, the prompt checked against the renderer's labels (does the caption really ask for the class?).
  A failure is confirmed per image (:func:`confirmed`: ensemble fooled and checker agrees on that image); a prompt
  over several seeds by the share of such images (:func:`confirmed_fraction`).
* NGR, non-Gaussian rate: the fraction of found latents whose entries fail a normality test at level ``alpha``.
  ``test="dagostino"`` (default): D'Agostino–Pearson K² on the entries standardised by their own mean and std (shape
  only); ``test="ks"``: Kolmogorov–Smirnov of the raw entries against N(0, 1) (shape, location and scale; no
  parameter is estimated, so its p-values are exact). A fresh Gaussian latent fails either at rate ≈ ``alpha``.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from lib.sage.loss import Criteria, Ensemble, Member, Verdict


def ssr(runs, by: str | Sequence[str] = "mode", success: str = "found", at_start: str | None = None,
        confirmed: str | None = None):
    """SSR(A) per group of a runs table (one row per search run): n_runs, n_found, ssr.

    ``at_start`` names a column marking runs whose start (the unperturbed latent, the bare template) already fails,
    found or not: adds ``n_found_at_start`` (finds among them) and ``ssr_searched``, the SSR of the other runs, whose
    finds the search itself made (NaN where every start failed). ``confirmed`` names a column marking finds an
    independent checker confirms: adds ``n_confirmed`` and ``ssr_confirmed`` (over all runs). A missing value counts
    as False.
    """
    import pandas as pd

    df = pd.DataFrame(runs)
    for col in (success, at_start, confirmed):
        if col is not None and col not in df:
            raise KeyError(f"runs table has no {col!r} column (columns: {list(df.columns)})")
    keys = [df[k] for k in ([by] if isinstance(by, str) else by)]
    found = df[success].eq(True)

    def count(mask):
        return mask.groupby(keys, dropna=False).sum().astype(int)

    cols = {"n_runs": found.groupby(keys, dropna=False).size(), "n_found": count(found),
            "ssr": found.groupby(keys, dropna=False).mean()}
    if at_start is not None:
        start = df[at_start].eq(True)
        cols.update(n_found_at_start=count(found & start),
                    ssr_searched=count(found & ~start) / count(~start))
    if confirmed is not None:
        n_ok = count(found & df[confirmed].eq(True))
        cols.update(n_confirmed=n_ok, ssr_confirmed=n_ok / cols["n_runs"])
    return pd.DataFrame(cols).reset_index()


@torch.no_grad()
def recheck(images: torch.Tensor, checker: Member, cls: str, verdict: Verdict = "lose", target: str | None = None,
            ensemble: Ensemble | None = None, groups=None, criteria: Criteria | None = None) -> torch.Tensor:
    """Bool (B,): does an independent ``checker`` confirm each reported failure (same verdict and thresholds)?

    Passing the search's ``ensemble`` makes sure the checker is not one of its members (nor the same network behind
    another wrapper or name: compared by weights), and, for ``type2``, that the checker sees the same other label the
    members agreed on (:meth:`Ensemble.agreed_label`; a label the checker does not have cannot be confirmed).
    """
    if ensemble is not None:
        mine = network_prints(checker)
        if any(checker is m or mine & network_prints(m) for m in ensemble.members):
            raise ValueError("the checker is a member of the ensemble (the same network): an independent re-check "
                             "needs a held-out classifier")
    crit = criteria or (ensemble.criteria if ensemble is not None else Criteria())
    grp = groups if groups is not None else (ensemble.groups if ensemble is not None else None)
    solo = Ensemble([checker], grp, crit)
    probs = solo.probs(images)
    ok = solo.judge(probs, cls, verdict, target)
    if verdict == "type2" and ensemble is not None:
        labels = [str(l).lower() for l in checker.labels]
        for b, name in enumerate(ensemble.agreed_label(ensemble.probs(images), cls)):
            idx = [i for i, l in enumerate(labels) if l == name] if name is not None else []
            ok[b] &= bool(idx) and float(probs[0][b, idx].sum()) >= crit.confident_above
    return ok


def confirmed(fooled, checker_confirms) -> np.ndarray:
    """Bool per image: the ensemble is fooled *and* the held-out checker confirms it on that same image (a
    re-checked failure); two separate shares (ensemble, checker) would count images that fool only one of them."""
    f, c = np.asarray(fooled, dtype=bool), np.asarray(checker_confirms, dtype=bool)
    if f.shape != c.shape:
        raise ValueError(f"{f.shape} ensemble verdicts but {c.shape} checker verdicts: one of each per image")
    return f & c


def confirmed_fraction(fooled, checker_confirms) -> float:
    """Share of the images (e.g. one prompt's seeds) that are re-checked failures (:func:`confirmed`); NaN for none."""
    both = confirmed(fooled, checker_confirms)
    return float(both.mean()) if both.size else float("nan")


def prompt_confirmed(fooled, checker_confirms, success_fraction: float) -> bool:
    """Whether a prompt's failure is confirmed: at least ``success_fraction`` of its images (one per seed) fool the
    ensemble *and* the checker (:func:`confirmed_fraction`), the prompt search's success rule applied per image."""
    return confirmed_fraction(fooled, checker_confirms) >= success_fraction


def network_prints(member) -> set[str]:
    """Weight fingerprints of the networks inside a member (the member itself and what it wraps), to tell whether
    two members are one classifier."""
    from lib.loading import weights_fingerprint

    found, todo, seen = set(), [member], set()
    while todo:
        m = todo.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        if isinstance(m, torch.nn.Module) and any(True for _ in m.parameters()):
            found.add(weights_fingerprint({"net": m}))
        todo += [getattr(m, a) for a in ("member", "inner", "classifier", "model", "scorer", "module")
                 if getattr(m, a, None) is not None]  # a CLIP member's scorer is no module: its CLIP is .module
    return found


def renderer_check(prompts: Sequence[str], cls: str, attribute: str = "object"):
    """Toy world: parse each found prompt with the world's grammar; does the scene it describes have ``cls``?

    ``parsed`` is False for prompts outside the grammar (then the renderer has no label for them);
    ``asks_for_class`` True means a faithful generator should have drawn the class: a genuine failure.
    """
    import pandas as pd

    from lib.toy.world import parse_caption

    rows = []
    for p in prompts:
        try:
            scene = parse_caption(p)
        except ValueError as err:
            rows.append(dict(prompt=p, parsed=False, renderer_label=None, asks_for_class=None, note=str(err)[:80]))
            continue
        label = getattr(scene, attribute)
        rows.append(dict(prompt=p, parsed=True, renderer_label=label, asks_for_class=label == cls, note=""))
    return pd.DataFrame(rows)


NORMALITY_TESTS = ("dagostino", "ks", "norm")


def normality(latents: torch.Tensor | Sequence[torch.Tensor], test: str = "dagostino", alpha: float = 0.05):
    """Per latent: the test statistic, its p-value and whether it is non-Gaussian at ``alpha``.

    ``dagostino``: D'Agostino–Pearson K² on the standardised entries (shape only, blind to scale); ``ks``:
    Kolmogorov–Smirnov against N(0, 1) (shape, location, scale; weak against a small change of scale); ``norm``:
    the squared norm against its law under N(0, I), χ² with d degrees of freedom, two-sided (an outlier by norm,
    which the shell projection bounds but does not prevent).
    """
    import pandas as pd
    from scipy import stats

    if test not in NORMALITY_TESTS:
        raise ValueError(f"unknown test {test!r}; choose one of {NORMALITY_TESTS}")
    rows = []
    for i, lat in enumerate(_as_list(latents)):
        x = lat.detach().cpu().double().flatten().numpy()
        if x.size < 20:
            raise ValueError(f"latent {i} has {x.size} entries; a normality test needs at least 20")
        if test == "dagostino":
            stat, p = stats.normaltest((x - x.mean()) / (x.std() + 1e-12))
        elif test == "ks":
            stat, p = stats.kstest(x, "norm")
        else:
            stat = float(x @ x)
            p = min(1.0, 2 * min(stats.chi2.cdf(stat, x.size), stats.chi2.sf(stat, x.size)))
        rows.append(dict(latent=i, test=test, statistic=float(stat), p_value=float(p), non_gaussian=bool(p < alpha),
                         mean=float(x.mean()), std=float(x.std()), norm=float(np.linalg.norm(x))))
    return pd.DataFrame(rows)


def ngr(latents, test: str = "dagostino", alpha: float = 0.05) -> float:
    """Non-Gaussian rate: fraction of latents rejected by the normality test."""
    return float(normality(latents, test, alpha)["non_gaussian"].mean())


def ngr_table(latent_sets: Mapping[str, Sequence[torch.Tensor]], alpha: float = 0.05):
    """One row per named set of latents: ``n``, the NGR of each test (:func:`normality`'s ``dagostino``, ``ks``,
    ``norm``; NaN for an empty set) and the mean norm."""
    import pandas as pd

    rows = []
    for name, lats in latent_sets.items():
        lats = _as_list(lats) if len(lats) else []  # a batch (B, C, S, S) or a list of latents
        row = dict(latents=name, n=len(lats))
        for test in ("dagostino", "ks", "norm"):
            row[f"NGR_{test}"] = float(normality(lats, test, alpha).non_gaussian.mean()) if lats else float("nan")
        row["mean_norm"] = float(np.mean([float(z.float().norm()) for z in lats])) if lats else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def qq_points(latent: torch.Tensor, n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """(theoretical N(0, 1) quantiles, sample quantiles) at ``n`` probability levels, for a QQ-plot."""
    from scipy import stats

    x = latent.detach().cpu().double().flatten().numpy()
    q = (np.arange(n) + 0.5) / n
    return stats.norm.ppf(q), np.quantile(x, q)


def _as_list(latents) -> list[torch.Tensor]:
    """One latent (C, S, S) or (1, C, S, S), a batch (B, C, S, S), or a sequence of those; anything else is refused
    (a stacked (B, 1, C, S, S) or a flattened (B, D) would be tested as one latent)."""
    out = []
    for z in [latents] if isinstance(latents, torch.Tensor) else list(latents):
        if not isinstance(z, torch.Tensor) or z.dim() not in (3, 4):
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"a latent is (C, S, S) or a batch (B, C, S, S), got {shape}; cat saved (1, C, S, S) "
                             "latents along dim 0 (torch.cat), not torch.stack")
        out.extend(list(z) if z.dim() == 4 else [z])
    return out
