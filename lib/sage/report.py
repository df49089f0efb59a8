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
    idx = ensemble.indices(cls)
    p_cls = torch.stack([p[:, i].sum(-1) for p, i in zip(probs, idx)]).mean(0)
    fooled = ensemble.judge(probs, cls, verdict, target)
    df = pd.DataFrame({"image": range(len(images)), "fooled": fooled.cpu().numpy(), "p_class": p_cls.cpu().numpy()})
    if target is not None:
        t_idx = ensemble.indices(target)
        df["p_target"] = torch.stack([p[:, i].sum(-1) for p, i in zip(probs, t_idx)]).mean(0).cpu().numpy()
    for m, name, p in zip(ensemble.members, ensemble.names, probs):
        df[f"top_{name}"] = [m.labels[int(i)] for i in p.argmax(-1)]
    if checker is not None:
        df["checker_confirms"] = recheck(images, checker, cls, verdict, target, ensemble=ensemble).cpu().numpy()
        logits = checker(images)
        df["checker_top"] = [checker.labels[int(i)] for i in logits.argmax(-1)]
    return df


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


def show(fig, name: str, out_dir, figures_dir=None) -> None:
    """Save ``fig`` with :func:`lib.plotting.save_figure`, close it, and display the saved PNG in the notebook
    (``lib.plotting`` selects the Agg backend, so figures are not shown inline by themselves)."""
    import matplotlib.pyplot as plt

    from lib.plotting import save_figure

    path = save_figure(fig, name, out_dir, figures_dir)
    plt.close(fig)
    try:
        from IPython.display import Image, display
    except ImportError:  # outside IPython: the file is the result
        return
    display(Image(filename=str(path)))
