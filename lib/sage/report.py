"""Tables and figures the SAGE notebooks share: judged images (ensemble + held-out checker), before/after grids."""

from __future__ import annotations

from typing import Sequence

import torch

from lib.sage.loss import Ensemble, Verdict
from lib.sage.metrics import recheck


@torch.no_grad()
def judge_images(images: torch.Tensor, ensemble: Ensemble, cls: str, verdict: Verdict = "lose",
                 target: str | None = None, checker=None) -> "pd.DataFrame":  # noqa: F821
    """One row per image: the ensemble's verdict, P(class) (mean over members), each member's top-1 label, and —
    with a held-out ``checker`` — whether it confirms the verdict and its own top-1 label."""
    import pandas as pd

    probs = ensemble.probs(images)
    p_cls = ensemble.class_prob(probs, cls)
    fooled = ensemble.judge(probs, cls, verdict, target)
    df = pd.DataFrame({"image": range(len(images)), "fooled": fooled.cpu().numpy(), "p_class": p_cls.cpu().numpy()})
    if target is not None:
        df["p_target"] = ensemble.class_prob(probs, target).cpu().numpy()
    for m, name, p in zip(ensemble.members, ensemble.names, probs):
        df[f"top_{name}"] = [m.labels[int(i)] for i in p.argmax(-1)]
    if checker is not None:
        df["checker_confirms"] = recheck(images, checker, cls, verdict, target, ensemble=ensemble).cpu().numpy()
        logits = checker(images)
        df["checker_top"] = [checker.labels[int(i)] for i in logits.argmax(-1)]
    return df


def render_and_judge(pipe, ensemble: Ensemble, prompt: str, cls: str, seeds: Sequence[int], steps: int,
                     guidance: float, checker=None, batch_size: int | None = None, verdict: Verdict = "lose"):
    """(images, table): ``prompt`` generated once per seed (``batch_size`` images a call; None: all in one) and each
    image judged by :func:`judge_images`, the table with a ``seed`` column in place of ``image``."""
    from lib.sampling import generate

    images = generate(pipe, [prompt] * len(seeds), list(seeds), steps, guidance, batch_size=batch_size)
    judged = judge_images(images, ensemble, cls, verdict, checker=checker)
    judged.insert(0, "seed", list(seeds))
    return images, judged.drop(columns="image")


def prompt_result(pipe, ensemble: Ensemble, result, template: str, seeds: Sequence[int], eval_seeds: Sequence[int],
                  steps: int, guidance: float, success_fraction: float, checker=None, attribute: str | None = None):
    """Notebook 02's judgement of one class's prompt-search result (a row of
    :func:`lib.sage.prompt.final_prompts`): (row, template images, result images), every image on ``seeds``.

    The row holds the ensemble's verdicts on the template and on the prompt, ``found_at_base`` (a find whose template
    alone already fools the ensemble on ``success_fraction`` of the seeds: a find of the model, not of the search),
    with a ``checker`` the per-seed re-check (``confirmed``: fooled *and* confirmed on enough of the same images), the
    verdict on fresh ``eval_seeds`` for a found prompt (``holds_on_eval``, ``confirmed_on_eval``; NaN / False when
    nothing was found), and with ``attribute`` (the toy world) the renderer's reading of the prompt."""
    from lib.sage.metrics import confirmed_fraction, prompt_confirmed, renderer_check

    cls, prompt, found = result.cls, result.prompt, bool(result.found)
    base = template.format(cls=cls)
    base_images, jb = render_and_judge(pipe, ensemble, base, cls, seeds, steps, guidance, checker)
    images, jf = render_and_judge(pipe, ensemble, prompt, cls, seeds, steps, guidance, checker)
    row = dict(cls=cls, prompt=prompt, found=found, words_added=len(prompt.split()) - len(base.split()),
               category=result.category, loss_prompt=result.loss_prompt, p_class_base=jb.p_class.mean(),
               p_class_prompt=jf.p_class.mean(), fooled_fraction=jf.fooled.mean(),
               base_fooled_fraction=jb.fooled.mean())
    row["found_at_base"] = found and row["base_fooled_fraction"] >= success_fraction
    if checker is not None:
        row["checker_fraction"] = jf.checker_confirms.mean()
        row["confirmed_fraction"] = confirmed_fraction(jf.fooled, jf.checker_confirms)  # per seed: both
        row["confirmed"] = found and prompt_confirmed(jf.fooled, jf.checker_confirms, success_fraction)
        row["checker_top"] = ", ".join(jf.checker_top)
    row.update(eval_fooled_fraction=float("nan"), holds_on_eval=False)
    if checker is not None:
        row["confirmed_on_eval"] = False
    if found:  # chosen on ``seeds``: does it fail on images it never saw? Batches the size of the search's
        _, je = render_and_judge(pipe, ensemble, prompt, cls, eval_seeds, steps, guidance, checker,
                                 batch_size=len(seeds))
        row.update(eval_fooled_fraction=je.fooled.mean(), holds_on_eval=bool(je.fooled.mean() >= success_fraction))
        if checker is not None:
            row["confirmed_on_eval"] = prompt_confirmed(je.fooled, je.checker_confirms, success_fraction)
    if attribute is not None:
        rc = renderer_check([prompt], cls, attribute).iloc[0]
        row.update(renderer_label=rc.renderer_label, asks_for_class=rc.asks_for_class)
    return row, base_images, images


def before_after(before: torch.Tensor, after: torch.Tensor, labels: Sequence[str] | None = None,
                 rows: tuple[str, str] = ("before", "after"), title: str | None = None, max_cols: int = 8):
    """A 2 × N grid: ``before[i]`` above ``after[i]`` (both (N, 3, H, W) in [0, 1]); column labels ``labels``."""
    from lib.plotting import image_grid

    if len(before) != len(after):
        raise ValueError(f"{len(before)} 'before' images but {len(after)} 'after' images")
    n = min(len(before), max_cols)
    if n == 0:
        raise ValueError("no images to show")
    imgs = torch.cat([before[:n].float().cpu(), after[:n].float().cpu()])
    return image_grid(imgs, 2, n, row_labels=list(rows), col_labels=list(labels or [])[:n], title=title, scale=1.3)


def no_result_figure(message: str):
    """A small figure that says honestly that nothing was found (instead of an empty grid)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 1))
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=8, wrap=True)
    return fig
