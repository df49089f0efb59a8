"""Scoring images of the toy world against their known scenes: attribute classifiers and CLIP caption ranking.

The quality measurement on prompts held out from training (renders and generated images, classifier ensemble and
toy-CLIP caption ranking, against the bar in :data:`GENERATED_BAR`, :data:`RENDER_BAR`, :data:`CLIP_BAR`)::

    python -m lib.toy.evaluate --seeds 8 --out runs/toy_quality

and, attribute by attribute, where the world is drawn well (renders, VAE round trips, generated images per cell)::

    python -m lib.toy.evaluate --pair-grid character style --out runs/pair_grid
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from lib.atomic import write_csv_atomic, write_text_atomic
from lib.params import distinct
from lib.paths import TOY_DIR, in_repo, resolve_toy_folder
from lib.scoring import toy_clip_scorer
from lib.toy import world as W
from lib.toy.classifiers import FAMILIES, NONE, AttributeClassifier, EnsembleClassifier, scene_label, to_tensor

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

    from lib.scoring import ClipScorer


def attribute_accuracy(images: np.ndarray | torch.Tensor, scenes: Sequence[W.Scene],
                       classifiers: AttributeClassifier | Mapping[str, AttributeClassifier]) -> pd.DataFrame:
    """Tidy counts: one row per (member, family, true value) with ``correct`` and ``n``.

    ``images``: uint8 (N, 64, 64, 3) or float (N, 3, H, W) in [0, 1].  Families a member lacks (the edge member has no
    "color") and scenes without a color are left out.
    """
    if len(images) != len(scenes):
        raise ValueError(f"{len(images)} images but {len(scenes)} scenes")
    members = {classifiers.name: classifiers} if isinstance(classifiers, AttributeClassifier) else dict(classifiers)
    x = to_tensor(images)
    rows = []
    for name, m in members.items():
        pred = m.predict(x)
        for f in m.families:
            for p, s in zip(pred[f], scenes):
                truth = scene_label(s, f)
                if truth is not None:
                    rows.append((name, f, truth, p == truth))
    df = pd.DataFrame(rows, columns=["member", "family", "value", "correct"])
    out = df.groupby(["member", "family", "value"], sort=False).agg(correct=("correct", "sum"), n=("correct", "size"))
    return out.reset_index().astype({"correct": int, "n": int})


def accuracy_table(images_or_counts, scenes: Sequence[W.Scene] | None = None,
                   classifiers: AttributeClassifier | Mapping[str, AttributeClassifier] | None = None) -> pd.DataFrame:
    """Accuracy per member (rows) and family (columns), from :func:`attribute_accuracy`'s counts or from
    ``(images, scenes, classifiers)``; NaN where a member has no such head."""
    counts = images_or_counts
    if not isinstance(counts, pd.DataFrame):
        counts = attribute_accuracy(images_or_counts, scenes, classifiers)
    g = counts.groupby(["member", "family"], sort=False)[["correct", "n"]].sum()
    table = (g.correct / g.n).unstack("family")
    return table.reindex(columns=[f for f in FAMILIES if f in table.columns]).rename_axis(columns=None)


# --------------------------------------------------------------------------------------------------- CLIP ranking
def _fix_articles(text: str) -> str:
    """"a orange" -> "an orange", "an red" -> "a red" (articles before the word that follows them)."""
    return re.sub(r"\b(a|an) (\w)", lambda m: ("an" if m.group(2) in "aeiou" else "a") + " " + m.group(2), text)


def swap_captions(text: str, scene: W.Scene) -> list[tuple[str, str, str]]:
    """Captions of ``scene`` with one attribute word swapped for another value of the same attribute, keeping the
    phrasing of ``text`` where the grammar allows (else the closest phrasing of the swapped scene).

    Returns (attribute, new value, caption).  Swapped attributes: the object (the character for a character scene),
    the color, style, action and background where present.
    """
    out = []
    attributes = ["character" if scene.character else "object", "color", "style", "action", "background"]
    for a in attributes:
        value = getattr(scene, a)
        if value is None:
            continue
        start, end = W.subject_char_span(text, scene, a)
        for v in W.VOCAB[a]:
            if v == value:
                continue
            target = W.Scene(**{**scene.as_dict(), a: v, **({"object": None} if a == "character" else {})})
            cand = _fix_articles(text[:start] + v + text[end:])
            try:
                ok = W.parse_caption(cand) == target
            except ValueError:
                ok = False
            if not ok:  # e.g. "a painting of ..." <-> "a monet painting of ...": the nearest phrasing instead
                options = W.captions(target)
                cand = max(options, key=lambda c: difflib.SequenceMatcher(None, c.split(), text.split()).ratio())
            out.append((a, v, cand))
    return out


@torch.no_grad()
def clip_ranking_accuracy(scorer, images: np.ndarray | torch.Tensor, scenes: Sequence[W.Scene],
                          captions: Sequence[str] | None = None, seed: int = 0, batch_size: int = 32) -> float:
    """Fraction of images whose true caption scores strictly above every one-attribute swap of it
    (``scorer``: a :class:`lib.scoring.ClipScorer`; captions drawn with ``seed`` when not given)."""
    if len(images) != len(scenes):
        raise ValueError(f"{len(images)} images but {len(scenes)} scenes")
    if captions is None:
        rng = np.random.default_rng(seed)
        captions = [W.caption(s, rng) for s in scenes]
    wins = [w for w, _ in clip_ranking(scorer, images, scenes, captions, batch_size)]
    return float(np.mean(wins)) if wins else float("nan")


# ------------------------------------------------------------------------------------ held-out quality measurement
# The quality bar of the toy world (fractions correct); "generated" is measured on prompts held out from training.
GENERATED_BAR: dict[str, float] = {"object": 0.90, "color": 0.90, "style": 0.80, "action": 0.80, "character": 0.80}
RENDER_BAR = 0.98  # every classifier family on renders
CLIP_BAR = {"render": 0.90, "generated": 0.75}  # true caption ranked first among attribute swaps
CLIP_FAMILY = "caption rank"  # the CLIP row of the tidy frames (member "clip")


@dataclass(frozen=True)
class EvalPrompt:
    """One evaluation prompt: its scene, caption and the held-out combination it was drawn for."""

    prompt_id: int
    scene: W.Scene
    caption: str
    pair: str  # e.g. "color=red + object=triangle"


def _pair_name(a: str, va: str, b: str, vb: str) -> str:
    return f"{a}={va} + {b}={vb}"


def scenes_per_pair() -> dict[str, int]:
    """How many distinct scenes contain each held-out pair (``"color=red + object=triangle"`` → count): the most
    prompts :func:`heldout_prompts` can draw for it."""
    counts = {_pair_name(a, va, b, vb): 0 for (a, b), pairs in W.HELDOUT.items() for va, vb in sorted(pairs)}
    for s in W.all_scenes():
        for pair in W.heldout_pairs(s):
            counts[_pair_name(*pair)] += 1
    return counts


def max_per_pair() -> int:
    """The largest ``per_pair`` every held-out pair has distinct scenes for (12: a character in a style)."""
    return min(scenes_per_pair().values())


def heldout_prompts(per_pair: int = 2, seed: int = 0) -> list[EvalPrompt]:
    """``per_pair`` distinct scenes (with a caption) for each pair of :data:`world.HELDOUT`, drawn like the world draws
    scenes but kept only when they contain that pair: every prompt is held out from training."""
    if per_pair < 1:
        raise ValueError(f"per_pair must be >= 1, got {per_pair}")
    counts = scenes_per_pair()
    pair, n = min(counts.items(), key=lambda kv: kv[1])
    if n < per_pair:
        raise ValueError(f"per_pair {per_pair} asks for more distinct scenes than the held-out pair {pair} has ({n}); "
                         f"at most {n}")
    rng = np.random.default_rng(seed)
    out: list[EvalPrompt] = []
    seen: set[W.Scene] = set()
    for (a, b), pairs in W.HELDOUT.items():
        for va, vb in sorted(pairs):
            k = 0
            while k < per_pair:
                s = W.sample_scene(rng, "any")
                if (a, va, b, vb) in W.heldout_pairs(s) and s not in seen:
                    seen.add(s)
                    out.append(EvalPrompt(len(out), s, W.caption(s, rng), _pair_name(a, va, b, vb)))
                    k += 1
    return out


def prompts_frame(prompts: Sequence[EvalPrompt]) -> pd.DataFrame:
    """The prompt set as a table: id, caption, held-out pair and the scene's attributes."""
    return pd.DataFrame([{"prompt_id": p.prompt_id, "caption": p.caption, "pair": p.pair, **p.scene.as_dict()}
                         for p in prompts])


def with_ensemble(members: Mapping[str, AttributeClassifier]) -> dict:
    """``members`` plus their :class:`EnsembleClassifier` under the name "ensemble"."""
    return {**dict(members), "ensemble": EnsembleClassifier(members)}


@torch.no_grad()
def clip_ranking(scorer, images: np.ndarray | torch.Tensor, scenes: Sequence[W.Scene], captions: Sequence[str],
                 batch_size: int = 32) -> list[tuple[bool, str]]:
    """Per image: (true caption strictly above every one-attribute swap, the best-scoring caption)."""
    if not (len(images) == len(scenes) == len(captions)):
        raise ValueError(f"{len(images)} images, {len(scenes)} scenes, {len(captions)} captions")
    x = to_tensor(images)
    out = []
    for i in range(0, len(scenes), batch_size):
        groups = [[captions[j]] + [c for _, _, c in swap_captions(captions[j], scenes[j])]
                  for j in range(i, min(i + batch_size, len(scenes)))]
        texts = sorted({c for g in groups for c in g})
        index = {c: k for k, c in enumerate(texts)}
        sims = scorer.rank(x[i : i + len(groups)], texts)
        for row, g in zip(sims, groups):
            s = row[[index[c] for c in g]]
            out.append((bool((s[0] > s[1:]).all()), g[int(s.argmax())]))
    return out


def predictions_frame(images: np.ndarray | torch.Tensor, meta: pd.DataFrame,
                      classifiers: Mapping[str, AttributeClassifier], scorer=None,
                      scenes: Sequence[W.Scene] | None = None) -> pd.DataFrame:
    """Tidy predictions: one row per (image, member, family) with ``truth``, ``pred``, ``correct`` and ``named``
    (the prompt names that attribute; a character names its object: "snoopy" is a dog), next to the image's ``meta``
    columns (one row per image).

    Families with no truth for a scene (no color named) are left out.  With a CLIP ``scorer`` each image also gets a
    row (member "clip", family :data:`CLIP_FAMILY`): truth = its caption, pred = the best of it and its swaps.
    ``scenes`` default to ``meta["scene"]``.
    """
    scenes = list(meta["scene"] if scenes is None else scenes)
    if not (len(images) == len(meta) == len(scenes)):
        raise ValueError(f"{len(images)} images, {len(meta)} meta rows, {len(scenes)} scenes")
    x = to_tensor(images)
    base = meta.drop(columns=["scene"], errors="ignore").reset_index(drop=True)
    rows = []
    for name, m in classifiers.items():
        pred = m.predict(x)
        for f in m.families:
            for i, (p, s) in enumerate(zip(pred[f], scenes)):
                truth = scene_label(s, f)
                if truth is not None:
                    rows.append((i, name, f, truth, p, p == truth, truth != NONE))
    if scorer is not None:
        for i, (win, best) in enumerate(clip_ranking(scorer, x, scenes, list(base["caption"]))):
            rows.append((i, "clip", CLIP_FAMILY, base["caption"][i], best, win, True))
    df = pd.DataFrame(rows, columns=["image", "member", "family", "truth", "pred", "correct", "named"])
    return base.rename_axis("image").reset_index().merge(df, on="image")


def _image_meta(prompts: Sequence[EvalPrompt], seeds: Sequence[int], source: str) -> pd.DataFrame:
    return pd.DataFrame([{"source": source, "prompt_id": p.prompt_id, "caption": p.caption, "pair": p.pair,
                          "seed": int(s), "scene": p.scene} for p in prompts for s in seeds])


def render_prompts(prompts: Sequence[EvalPrompt], seeds: Sequence[int]) -> np.ndarray:
    """Renders of every prompt's scene for every seed (order: prompt-major), uint8 (N, 64, 64, 3)."""
    return np.stack([np.asarray(W.render(p.scene, np.random.default_rng([int(s), p.prompt_id])))
                     for p in prompts for s in seeds])


def generate_captions(pipe, captions: Sequence[str], seeds: Sequence[int], steps: int = 25, guidance: float = 4.0,
                      batch_size: int = 64, progress: Any = True) -> torch.Tensor:
    """One image per (caption, seed) pair with :func:`lib.sampling.generate`, ``batch_size`` images per call;
    float (N, 3, H, W) in [0, 1] on the CPU. ``progress``: a flag or a bar (:mod:`lib.progress`)."""
    from lib.progress import progress_bar
    from lib.sampling import generate

    if len(captions) != len(seeds):
        raise ValueError(f"{len(captions)} captions but {len(seeds)} seeds")
    out = []
    with progress_bar(progress, len(captions), "generating", "img") as bar:
        for i in range(0, len(captions), batch_size):
            caps, sds = list(captions[i : i + batch_size]), [int(s) for s in seeds[i : i + batch_size]]
            out.append(generate(pipe, caps, sds, steps=steps, guidance=guidance).float().cpu())
            if bar is not None:
                bar.update(len(caps))
    return torch.cat(out) if out else torch.empty(0, 3, W.SIZE, W.SIZE)


def generate_prompts(pipe, prompts: Sequence[EvalPrompt], seeds: Sequence[int], steps: int = 25,
                     guidance: float = 4.0, batch_size: int = 64, progress: Any = True) -> torch.Tensor:
    """Images of every prompt's caption for every seed (order: prompt-major; :func:`lib.sampling.generate_all`),
    float (N, 3, H, W) in [0, 1] on the CPU. ``progress``: a flag or a bar (:mod:`lib.progress`)."""
    from lib.sampling import generate_all

    return generate_all(pipe, [p.caption for p in prompts], [int(s) for s in seeds], steps, guidance, batch_size,
                        progress)


def evaluate_renders(classifiers: Mapping[str, AttributeClassifier], prompts: Sequence[EvalPrompt],
                     seeds: Sequence[int], scorer=None) -> pd.DataFrame:
    """Tidy predictions (:func:`predictions_frame`, source "render") on renders of the prompts' scenes."""
    return predictions_frame(render_prompts(prompts, seeds), _image_meta(prompts, seeds, "render"), classifiers, scorer)


def evaluate_generations(pipe, classifiers: Mapping[str, AttributeClassifier], prompts: Sequence[EvalPrompt],
                         seeds: Sequence[int], scorer=None, steps: int = 25, guidance: float = 4.0,
                         batch_size: int = 64, progress: bool = True) -> tuple[pd.DataFrame, torch.Tensor]:
    """Generate every prompt × seed, classify (and CLIP-rank) the images; returns (tidy predictions, images)."""
    images = generate_prompts(pipe, prompts, seeds, steps, guidance, batch_size, progress)
    df = predictions_frame(images, _image_meta(prompts, seeds, "generated"), classifiers, scorer)
    df.insert(df.columns.get_loc("seed") + 1, "steps", steps)
    df.insert(df.columns.get_loc("steps") + 1, "guidance", float(guidance))
    return df, images


def family_accuracy(df: pd.DataFrame, named_only: bool = True) -> pd.DataFrame:
    """Accuracy per (source, member) row and family column from tidy predictions (``named_only``: only images whose
    prompt names the attribute, i.e. "none" truths left out)."""
    d = df[df["named"]] if named_only else df
    g = d.groupby(["source", "member", "family"], sort=False)["correct"].mean().unstack("family")
    cols = [f for f in (*FAMILIES, CLIP_FAMILY) if f in g.columns]
    return g.reindex(columns=cols).rename_axis(columns=None)


def quality_table(df: pd.DataFrame, member: str = "ensemble") -> pd.DataFrame:
    """The toy world's accuracy table against the quality bar, from tidy predictions of renders and generations.

    Rows: the attribute families (``member``'s predictions) and CLIP caption ranking.  Columns: accuracy on renders and
    on generated images of scenes / prompts that name the attribute (a "named character" row counts character scenes
    only), the same including those that do not (where "none" is the truth, read right far more easily), the counts
    of the named ones, the bars and whether both are met.
    """
    rows = []
    for fam in (*FAMILIES, CLIP_FAMILY):
        mem = "clip" if fam == CLIP_FAMILY else member
        sel = df[(df["member"] == mem) & (df["family"] == fam)]
        if sel.empty:
            continue
        ren, gen = sel[sel["source"] == "render"], sel[sel["source"] == "generated"]
        ren_named, gen_named = ren[ren["named"]], gen[gen["named"]]
        bar_r = CLIP_BAR["render"] if fam == CLIP_FAMILY else RENDER_BAR
        bar_g = CLIP_BAR["generated"] if fam == CLIP_FAMILY else GENERATED_BAR.get(fam, float("nan"))
        acc = lambda d: float(d["correct"].mean()) if len(d) else float("nan")  # noqa: E731
        r, g = acc(ren_named), acc(gen_named)
        ok_r = bool(r >= bar_r) if len(ren_named) else None
        ok_g = None if (np.isnan(bar_g) or not len(gen_named)) else bool(g >= bar_g)
        rows.append({"metric": fam, "renders": r, "generated": g, "renders (incl. absent)": acc(ren),
                     "generated (incl. absent)": acc(gen),
                     "n renders": len(ren_named), "n generated": len(gen_named), "bar renders": bar_r,
                     "bar generated": bar_g,
                     "meets bar": None if ok_r is None and ok_g is None else all(v for v in (ok_r, ok_g) if v is not None)})
    return pd.DataFrame(rows).set_index("metric")


def to_markdown(table: pd.DataFrame, digits: int = 3) -> str:
    """A pandas table as a GitHub markdown table (no ``tabulate`` needed); floats rounded to ``digits``."""
    def fmt(v) -> str:
        if isinstance(v, (float, np.floating)):
            return "" if np.isnan(v) else f"{v:.{digits}f}"
        return "" if v is None else str(v)

    t = table.reset_index() if table.index.name is not None or not isinstance(table.index, pd.RangeIndex) else table
    head = "| " + " | ".join(map(str, t.columns)) + " |"
    sep = "| " + " | ".join("---" for _ in t.columns) + " |"
    body = ["| " + " | ".join(fmt(v) for v in row) + " |" for row in t.itertuples(index=False)]
    return "\n".join([head, sep, *body])


# ----------------------------------------------------------------------------------------------- loading and grids
def load_toy_world(folder: str | Path = TOY_DIR, device: str = "cpu", classifiers: str | Path | None = None,
                   ) -> tuple[StableDiffusionPipeline, dict[str, AttributeClassifier], ClipScorer]:
    """(pipeline, classifier members, toy-CLIP scorer) of a toy-world folder; missing or corrupt files raise an error
    that names the file and the command that rebuilds it. ``"toy"`` is ``data/toy``; relative paths are taken from the
    repo root."""
    from lib.toy.classifiers import load_classifiers
    from lib.toy.train import load_toy_pipeline

    folder = resolve_toy_folder(folder)
    pipe = load_toy_pipeline(folder, device=device)
    members = load_classifiers(in_repo(classifiers) if classifiers else folder / "classifiers", device)
    return pipe, members, toy_clip_scorer(folder, device)


SHOWCASE_BASE: dict[str, dict] = {  # the fixed attributes of each showcase row; the family varies over its values
    "object": {},
    "color": {"object": "circle"},
    "style": {"object": "square", "color": "red"},
    "action": {"object": "dog", "color": "orange"},
    "character": {},
    "background": {"object": "star", "color": "yellow"},
}


def showcase_scenes() -> dict[str, list[tuple[str, W.Scene]]]:
    """Per family, (value, scene) varying that attribute over its vocabulary ("none" included where it can be absent)
    with the others fixed (:data:`SHOWCASE_BASE`)."""
    out = {}
    for fam, base in SHOWCASE_BASE.items():
        values = list(W.VOCAB[fam]) if fam in ("object", "color", "character") else [None, *W.VOCAB[fam]]
        out[fam] = [(v or NONE, W.Scene(**{**base, fam: v})) for v in values]
    return out


def showcase_captions() -> dict[str, list[str]]:
    """The first phrasing of each showcase scene (e.g. "a photo of a red square, in the style of monet")."""
    return {f: [W.captions(s)[0] for _, s in v] for f, v in showcase_scenes().items()}


def showcase_figure(images: Mapping[str, Sequence], title: str | None = None, scale: float = 1.0):
    """One row per family, one labelled image per value (``images[family]``: images in :func:`lib.plotting.image_grid`
    formats, in :func:`showcase_scenes` order)."""
    from lib.plotting import _as_hwc, image_grid

    scenes = showcase_scenes()
    fams = [f for f in scenes if f in images]
    cols = max(len(scenes[f]) for f in fams)
    blank = np.full((W.SIZE, W.SIZE, 3), 255, np.uint8)
    flat, labels = [], []
    for f in fams:
        ims = _as_hwc(images[f])
        flat += ims + [blank] * (cols - len(ims))
        labels += [v for v, _ in scenes[f]] + [""] * (cols - len(ims))
    fig = image_grid(flat, len(fams), cols, row_labels=fams, title=title, scale=scale)
    for ax, lab in zip(fig.axes, labels):
        ax.set_title(lab, fontsize=6, pad=2)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------- the VAE's ceiling
@torch.no_grad()
def vae_roundtrip(vae, images: np.ndarray | torch.Tensor, batch_size: int = 100) -> torch.Tensor:
    """Images (uint8 or float in [0, 1]) encoded to the posterior mean and decoded, rounded to uint8 levels as a
    generated image is: the best picture the UNet could produce for that scene."""
    x = to_tensor(images)
    p = next(vae.parameters())
    out = []
    for i in range(0, len(x), batch_size):
        xb = (x[i : i + batch_size] * 2 - 1).to(p.device, p.dtype)
        rec = vae.decode(vae.encode(xb).latent_dist.mean).sample.float().cpu()
        out.append(((rec + 1) / 2).clamp(0, 1))
    return (torch.cat(out) * 255).round() / 255


def reconstruction_table(vae, classifiers: Mapping[str, AttributeClassifier], n: int = 1000,
                         seed: int = 10_000) -> pd.DataFrame:
    """Accuracy per member (ensemble included) and family on ``n`` held-out renders and on their VAE round trips:
    what the classifiers can read in an image that has passed through the latent space (generated images always
    have). Columns: member, family, n, render, roundtrip (all scored scenes, "none" truths included), n named, render
    named, roundtrip named (only scenes that name the attribute: a character row over character scenes, most scenes
    having none), mse (the round trip's pixel MSE in [0, 1] units)."""
    arr, scenes, _ = W.make_dataset(n, seed, "heldout")
    x = to_tensor(arr)
    rec = vae_roundtrip(vae, x)
    mse = float(((rec - x) ** 2).mean())
    members = with_ensemble(classifiers)
    counts = {k: attribute_accuracy(v, scenes, members) for k, v in (("render", x), ("roundtrip", rec))}
    table = {k: accuracy_table(c) for k, c in counts.items()}
    named = {k: accuracy_table(c[c.value != NONE]) for k, c in counts.items()}
    c = counts["render"]
    n_all = c[c.member == c.member.iloc[0]].groupby("family").n.sum()  # the same scenes for every member
    n_named = c[(c.member == c.member.iloc[0]) & (c.value != NONE)].groupby("family").n.sum()
    rows = []
    for name, m in members.items():
        for f in m.families:
            get = lambda t: float(t.loc[name, f]) if f in t.columns and name in t.index else float("nan")  # noqa: E731
            rows.append({"member": name, "family": f, "n": int(n_all.get(f, 0)), "render": get(table["render"]),
                         "roundtrip": get(table["roundtrip"]), "n named": int(n_named.get(f, 0)),
                         "render named": get(named["render"]), "roundtrip named": get(named["roundtrip"]),
                         "mse": mse})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------ attribute-pair grids
GRID_SOURCES = ("render", "roundtrip", "generated")


def grid_values(attribute: str) -> list[str | None]:
    """The values a grid runs over: the vocabulary, plus ``None`` (absent) for style, action and background."""
    if attribute not in W.ATTRIBUTES:
        raise ValueError(f"unknown attribute {attribute!r}; choose one of {', '.join(W.ATTRIBUTES)}")
    return list(W.VOCAB[attribute]) if attribute in ("object", "color", "character") else [None, *W.VOCAB[attribute]]


def grid_scene(rng: np.random.Generator, fixed: Mapping[str, str | None], max_draws: int = 1000) -> W.Scene:
    """A scene drawn as the world draws one, with the attributes in ``fixed`` set (``None``: absent) and no held-out
    pair besides the fixed attributes' own.  A fixed character replaces the drawn object and colour; with a fixed object
    or colour, scenes are drawn until they have no character.  An impossible combination (a character with a colour)
    raises the world's error."""
    own = {(a, va, b, vb) for (a, b), pairs in W.HELDOUT.items() for va, vb in pairs
           if a in fixed and b in fixed and (fixed[a], fixed[b]) == (va, vb)}
    for _ in range(max_draws):
        d = W.sample_scene(rng, "any").as_dict()
        if (fixed.get("object") or fixed.get("color")) and d["character"]:
            continue
        if fixed.get("character"):
            d["object"], d["color"] = None, None
        d.update(fixed)
        s = W.Scene(**d)
        if set(W.heldout_pairs(s)) <= own:
            return s
    raise RuntimeError(f"no scene with {dict(fixed)} and no other held-out pair in {max_draws} draws")


def _cell_heldout(a: str, va: str | None, b: str, vb: str | None) -> bool:
    """Whether the cell (a=va, b=vb) is a held-out pair of the world (in either order)."""
    pairs = W.HELDOUT.get((a, b), frozenset()) | {(y, x) for x, y in W.HELDOUT.get((b, a), frozenset())}
    return (va, vb) in pairs


def grid_scenes(rows: str, cols: str, family: str, n: int, seed: int = 0
                ) -> tuple[list[tuple[str | None, str | None]], list[W.Scene], np.random.Generator]:
    """The cells of a :func:`pair_grid` and ``n`` scenes per cell (cell-major), with the generator that drew them;
    every bad input (unknown attribute or family, rows == cols, an impossible pair such as a character's colour)
    raises here, before any rendering or sampling."""
    values = {a: grid_values(a) for a in (rows, cols)}  # unknown attribute: said first
    if family not in FAMILIES:
        raise ValueError(f"no classifier family {family!r}; choose one of {', '.join(FAMILIES)}")
    if rows == cols:
        raise ValueError(f"rows and cols are both {rows!r}; choose two different attributes")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    cells = [(vr, vc) for vr in values[rows] for vc in values[cols]]
    return cells, [grid_scene(rng, {rows: vr, cols: vc}) for vr, vc in cells for _ in range(n)], rng


def pair_grid(pipe, classifiers: Mapping[str, AttributeClassifier], rows: str, cols: str, family: str | None = None,
              n: int = 16, seed: int = 0, steps: int = 25, guidance: float = 4.0, batch_size: int = 64,
              progress: bool = True, sources: Sequence[str] = GRID_SOURCES) -> pd.DataFrame:
    """The ensemble's accuracy on ``family`` (default: ``rows``) in every (``rows`` value, ``cols`` value) cell of
    the world, held-out pairs and training pairs alike: ``n`` random scenes per cell (the other attributes drawn as
    the world draws them), read on their renders, on their VAE round trips and on images generated from their captions
    (one seed each, ``seed`` + image index), or the ``sources`` asked for (``pipe`` needs only a ``vae`` without
    "generated").  Where the round trip already fails, the autoencoder caps what any UNet can show.
    Tidy: ``rows``, ``cols`` (values, "none" for absent), heldout, source, n (scenes with a truth for ``family``),
    accuracy."""
    family = family or rows
    if isinstance(sources, str) or not sources or set(sources) - set(GRID_SOURCES):
        raise ValueError(f"sources must be a non-empty list drawn from {', '.join(GRID_SOURCES)}; got {sources!r}")
    cells, scenes, rng = grid_scenes(rows, cols, family, n, seed)
    renders = np.stack([np.asarray(W.render(s, rng)) for s in scenes])
    captions = [W.caption(s, rng) for s in scenes]
    ens = EnsembleClassifier(classifiers)
    images = {"render": to_tensor(renders)}
    if "roundtrip" in sources:
        images["roundtrip"] = vae_roundtrip(pipe.vae, renders)
    if "generated" in sources:
        images["generated"] = generate_captions(pipe, captions, [seed + j for j in range(len(scenes))], steps,
                                                guidance, batch_size, progress)
    truth = np.array([scene_label(s, family) for s in scenes], dtype=object)
    scored = truth != None  # noqa: E711  (no truth: e.g. the colour of a scene that names none)
    rows_out = []
    for source in (s for s in GRID_SOURCES if s in sources):
        ok = np.array(ens.predict(images[source])[family], dtype=object) == truth
        for c, (vr, vc) in enumerate(cells):
            cell = slice(c * n, (c + 1) * n)
            k = int(scored[cell].sum())
            rows_out.append({rows: vr or NONE, cols: vc or NONE, "heldout": _cell_heldout(rows, vr, cols, vc),
                             "source": source, "n": k,
                             "accuracy": float(ok[cell][scored[cell]].mean()) if k else float("nan")})
    return pd.DataFrame(rows_out)


def pair_grid_markdown(grid: pd.DataFrame, digits: int = 2) -> str:
    """One markdown table per source (rows × cols accuracy; a held-out cell is starred)."""
    rows, cols = grid.columns[:2]
    parts = []
    for source, d in grid.groupby("source", sort=False):
        cell = d["accuracy"].map(lambda v: f"{v:.{digits}f}") + np.where(d["heldout"], "*", "")
        t = _grid_pivot(d.assign(cell=cell), rows, cols, "cell")
        head = f"{source} (up to {d['n'].max()} per cell; * held out)\n\n"
        parts.append(head + to_markdown(t.rename_axis(index=rows, columns=None)))
    return "\n\n".join(parts) + "\n"


def _grid_pivot(d: pd.DataFrame, rows: str, cols: str, value: str) -> pd.DataFrame:
    t = d.pivot(index=rows, columns=cols, values=value)
    return t.reindex(index=list(dict.fromkeys(d[rows])), columns=list(dict.fromkeys(d[cols])))


def pair_grid_figure(grid: pd.DataFrame, title: str | None = None):
    """One annotated heatmap per source of a :func:`pair_grid` (rows × cols accuracy; held-out cells boxed)."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    from matplotlib.patches import Rectangle

    rows, cols = grid.columns[:2]
    sources = list(dict.fromkeys(grid["source"]))
    first = grid[grid["source"] == sources[0]]
    n_r, n_c = first[rows].nunique(), first[cols].nunique()
    fig, axes = plt.subplots(1, len(sources), figsize=(len(sources) * (0.55 * n_c + 1.2) + 0.6, 0.4 * n_r + 1.3),
                             squeeze=False)
    for k, (ax, source) in enumerate(zip(axes[0], sources)):
        d = grid[grid["source"] == source]
        acc, held = _grid_pivot(d, rows, cols, "accuracy"), _grid_pivot(d, rows, cols, "heldout")
        sns.heatmap(acc, ax=ax, vmin=0, vmax=1, cmap="rocket", annot=True, fmt=".2f", annot_kws={"fontsize": 6},
                    cbar=k == len(sources) - 1, yticklabels=k == 0)
        for i, j in zip(*np.nonzero(held.to_numpy(bool))):
            ax.add_patch(Rectangle((j, i), 1, 1, fill=False, edgecolor="deepskyblue", linewidth=1.5))
        ax.set_title(f"{source} ({int(d['n'].max())} per cell)", fontsize=8)
        ax.set_xlabel(cols)
        ax.set_ylabel(rows if k == 0 else "")
        ax.tick_params(labelsize=7)
    fig.suptitle(title or f"{rows} accuracy per ({rows}, {cols}) cell; boxed: held out of training", fontsize=9)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------------------- the CLI
def run_quality(out: str | Path, model: str | Path = TOY_DIR, seeds: Sequence[int] = tuple(range(8)),
                per_pair: int = 2, render_seeds: Sequence[int] = tuple(range(8)), steps: int = 25,
                guidance: float = 4.0, device: str = "cpu", batch_size: int = 64, prompt_seed: int = 0,
                classifiers: str | Path | None = None, roundtrip: int = 0) -> pd.DataFrame:
    """Measure the quality table on held-out prompts and write ``predictions.csv`` (tidy), ``prompts.csv``,
    ``quality.csv``, ``quality.md`` and ``run.json`` (settings, wall time, hardware) to ``out``; returns the table.
    ``roundtrip`` > 0 also writes ``roundtrip.csv`` (:func:`reconstruction_table` on that many held-out renders).
    Each file is written atomically and ``run.json`` last (an earlier one is deleted first): a folder without
    ``run.json`` holds an interrupted run's mix of files."""
    import json
    import platform
    import time

    t0 = time.time()
    seeds, render_seeds = [int(s) for s in seeds], [int(s) for s in render_seeds]
    for name, values in (("seeds", seeds), ("render_seeds", render_seeds)):  # bad input: before anything loads
        if not values:
            raise ValueError(f"{name} is empty: give at least one")
        distinct(values, f"each of the {name} is one image per prompt")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    prompts = heldout_prompts(per_pair, prompt_seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pipe, members, scorer = load_toy_world(model, device, classifiers)
    clf = with_ensemble(members)
    ren = evaluate_renders(clf, prompts, render_seeds, scorer)
    gen, _ = evaluate_generations(pipe, clf, prompts, seeds, scorer, steps, guidance, batch_size)
    df = pd.concat([ren, gen], ignore_index=True)
    table = quality_table(df)
    members_table = family_accuracy(df, named_only=False)
    (out / "run.json").unlink(missing_ok=True)  # written last: a folder without it holds an unfinished run's files
    (out / "roundtrip.csv").unlink(missing_ok=True)  # an earlier run's, whose run.json is gone; written again below
    write_csv_atomic(df, out / "predictions.csv")
    write_csv_atomic(prompts_frame(prompts), out / "prompts.csv")
    write_csv_atomic(table, out / "quality.csv", index=True)
    write_csv_atomic(members_table, out / "accuracy_by_member.csv", index=True)
    settings = {"model": str(model), "seeds": seeds, "per_pair": per_pair, "n_prompts": len(prompts),
                "render_seeds": render_seeds, "steps": steps, "guidance": guidance,
                "prompt_seed": prompt_seed, "device": device, "roundtrip": roundtrip}
    md = (f"Held-out prompts: {len(prompts)} ({per_pair} per held-out pair), {len(seeds)} seeds each; "
          f"renders: {len(render_seeds)} seeds each; DDIM {steps} steps, guidance {guidance}.\n\n"
          + to_markdown(table) + "\n\nAll images, \"none\" truths included, per member:\n\n"
          + to_markdown(members_table) + "\n")
    write_text_atomic(md, out / "quality.md")
    if roundtrip:
        write_csv_atomic(reconstruction_table(pipe.vae, members, roundtrip), out / "roundtrip.csv")
    write_text_atomic(json.dumps({**settings, "wall_s": round(time.time() - t0, 1),
                                  "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                                  "machine": platform.platform()}, indent=1) + "\n", out / "run.json")
    return table


def main(argv: Sequence[str] | None = None) -> None:
    import argparse
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ap = argparse.ArgumentParser(description="Toy-world quality on held-out prompts: classifier and CLIP accuracy on "
                                             "renders and generated images (writes CSV + quality.md).")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--model", default=str(TOY_DIR), help="toy-world folder (pipeline, clip_vision/, classifiers/)")
    ap.add_argument("--classifiers", default=None, help="classifier folder (default: <model>/classifiers)")
    ap.add_argument("--seeds", type=int, default=8, help="generation seeds per prompt (0..N-1)")
    ap.add_argument("--render-seeds", type=int, default=8, help="render seeds per prompt")
    ap.add_argument("--per-pair", type=int, default=2, help="prompts per held-out pair (15 pairs)")
    ap.add_argument("--prompt-seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--roundtrip", type=int, default=0, metavar="N",
                    help="also measure the classifiers on N held-out renders and their VAE round trips "
                         "(roundtrip.csv; the ceiling of generated-image accuracy that the VAE sets)")
    ap.add_argument("--pair-grid", nargs=2, metavar=("ROWS", "COLS"), default=None,
                    help="instead of the quality table: accuracy of the ROWS attribute in every (ROWS, COLS) cell on "
                         "renders, VAE round trips and generated images (pair_grid.csv, .md, .png), e.g. "
                         "--pair-grid character style")
    ap.add_argument("--pair-n", type=int, default=16, help="scenes per cell of --pair-grid")
    ap.add_argument("--pair-sources", nargs="+", choices=GRID_SOURCES, default=list(GRID_SOURCES),
                    help="images --pair-grid reads (e.g. render roundtrip: a new VAE before its UNet exists)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.pair_grid:
        rows, cols = a.pair_grid
        grid_scenes(rows, cols, rows, a.pair_n, a.prompt_seed)  # bad input: fail before loading anything
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        pipe, members, _ = load_toy_world(a.model, a.device, a.classifiers)
        grid = pair_grid(pipe, members, rows, cols, n=a.pair_n, seed=a.prompt_seed, steps=a.steps,
                         guidance=a.guidance, batch_size=a.batch_size, sources=a.pair_sources)
        write_csv_atomic(grid, out / "pair_grid.csv")
        write_text_atomic(pair_grid_markdown(grid), out / "pair_grid.md")
        from lib.plotting import save_figure

        save_figure(pair_grid_figure(grid), "pair_grid", out)
        print(pair_grid_markdown(grid))
        return
    table = run_quality(a.out, a.model, range(a.seeds), a.per_pair, range(a.render_seeds), a.steps, a.guidance,
                        a.device, a.batch_size, a.prompt_seed, a.classifiers, a.roundtrip)
    print(to_markdown(table))
    if a.roundtrip:
        rt = pd.read_csv(Path(a.out) / "roundtrip.csv")
        print(rt[rt.member == "ensemble"].to_string(index=False))


if __name__ == "__main__":
    main()
