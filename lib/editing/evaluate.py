"""Evaluating concept edits in the toy world: held-out prompts, paraphrases and misspellings, generation under an
edit, ensemble classification against the known scene, and the toy CLIP-Score.

The edit is fitted on toy captions (:func:`caption_prompts`, notebook 06's default) or on ``TEMPLATES`` prompts ("A
photo of van gogh", ...); every evaluation prompt here is a toy-world caption (:func:`lib.toy.world.captions`) that
is *not* one of the fitting prompts, so the edit is always scored on prompts it was not built from.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from lib.editing.quickfix import TEMPLATES, WeightEdit, concept_pairs, normalize_phrase, phrase_pattern, substitute
from lib.progress import progress_bar
from lib.sampling import generate_all
from lib.toy import world as W
from lib.toy.classifiers import AttributeClassifier, EnsembleClassifier, scene_label

CONCEPT_ATTRIBUTES = ("style", "character", "object")  # where an anchor or a target phrase may live


@dataclass(frozen=True)
class Concept:
    """A toy-world phrase and the scene attribute that holds it, e.g. ``Concept("style", "van gogh")``."""

    attribute: str
    value: str


def concept(phrase: str) -> Concept:
    """The attribute of a toy-world phrase ("van gogh" → style, "snoopy" → character, "dog" → object)."""
    p = " ".join(phrase.lower().split())
    for a in CONCEPT_ATTRIBUTES:
        if p in W.VOCAB[a]:
            return Concept(a, p)
    known = sorted(v for a in CONCEPT_ATTRIBUTES for v in W.VOCAB[a])
    raise ValueError(f"{phrase!r} is not a toy-world style, character or object; known: {', '.join(known)}")


def check_pair(anchor: str, target: str) -> tuple[Concept, Concept]:
    """The concepts of an (anchor, target) pair the evaluation can draw: two toy-world phrases of one attribute (a
    style for a style), or a character and an object (snoopy → dog); ``ValueError`` otherwise (a style for a character
    leaves a scene with neither object nor character, an object for a style a character of the wrong kind)."""
    a, t = concept(anchor), concept(target)
    if a.attribute != t.attribute and {a.attribute, t.attribute} != {"character", "object"}:
        kinds = [f"{'an' if c.attribute[0] in 'aeiou' else 'a'} {c.attribute}" for c in (a, t)]
        raise ValueError(f"anchor {anchor!r} is {kinds[0]} and target {target!r} {kinds[1]}: pair a phrase with one of "
                         "its own kind (a style with a style), or a character with an object")
    return a, t


def check_pairs(pairs: Sequence) -> None:
    """Notebook 06's ``PAIRS`` / ``MULTI_PAIRS`` (a :class:`lib.params.Param` check): [anchor, target] pairs of
    non-empty strings that the evaluation can draw (:func:`check_pair`), each anchor once and never its own target
    (:func:`lib.editing.quickfix.concept_pairs`); ``ValueError`` otherwise."""
    for p in pairs:
        if not (isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, str) and x.strip() for x in p)):
            raise ValueError(f"every pair must be [anchor, target] (two non-empty strings), got {p!r}")
        check_pair(*p)
    concept_pairs([a for a, _ in pairs], [t for _, t in pairs])


def real_model_warning(model: str, toy_folder: str | None = None, scorer: str = "auto") -> str | None:
    """What notebook 06's numbers mean for a ``model`` that is neither the toy world nor a shape twin: the prompts
    come from the toy grammar and the removal / preservation rates from the toy world's 64-px classifiers (and, with
    ``toy_folder`` and the ``auto`` scorer, CLIP-Score from the toy CLIP), so they say nothing about that model; None
    for the toy world and twins."""
    from lib.loading import is_stand_in

    if is_stand_in(model):
        return None
    clip = (f"SCORER={scorer!r}" if scorer != "auto" else "the toy CLIP of TOY_FOLDER" if toy_folder
            else "open_clip ViT-L/14")
    return (f"MODEL={model!r} is not the toy world: notebook 06 evaluates toy-grammar prompts with the toy world's 64-px "
            f"classifiers, so its removal / preservation rates and goals say nothing about this model; the edit, its "
            f"images and CLIP-Scores ({clip}) do. Edit other concepts of a real model with lib.editing.quickfix "
            "(README, 06_diffquickfix)")


def edit_scene(scene: W.Scene, anchor: str, target: str) -> W.Scene:
    """The scene the edited model should draw for ``scene`` (anchor replaced by target; e.g. snoopy → a dog)."""
    a, t = concept(anchor), concept(target)
    if getattr(scene, a.attribute) != a.value:
        return scene
    d = scene.as_dict()
    if a.attribute == "character":
        d.update(character=None, object=None)
    else:
        d[a.attribute] = None
    if t.attribute == "character":
        d.update(character=t.value, object=None, color=None)
    else:
        d[t.attribute] = t.value
    return W.Scene(**d)


def nearest_caption(scene: W.Scene, like: str) -> str:
    """The phrasing of ``scene`` closest (word by word) to the caption ``like``."""
    return max(W.captions(scene), key=lambda c: difflib.SequenceMatcher(None, c.split(), like.split()).ratio())


def edit_prompts(anchors: Iterable[str], templates: Sequence[str] = TEMPLATES) -> set[str]:
    """The (lower-cased) prompts an edit is fitted on: excluded from every evaluation set."""
    return {" ".join(t.replace("{}", a).lower().split()) for a in anchors for t in templates}


def _distinct_prompts(n: int, seed: int, pick: Callable[[W.Scene], W.Scene | None],
                      skip: Iterable[str] = (), words: Iterable[str] = ()) -> list[tuple[str, W.Scene]]:
    """Up to ``n`` distinct (caption, scene) pairs: training-distribution scenes mapped by ``pick`` (``None`` rejects
    one), captioned from the same generator, minus captions in ``skip`` (normalised text) and captions naming one of
    ``words`` as a whole word (any case); reproducible from ``seed``."""
    named = re.compile("|".join(phrase_pattern(w) for w in words), re.IGNORECASE) if words else None
    skip = {normalize_phrase(e) for e in skip}
    rng = np.random.default_rng(seed)
    out, seen = [], set()
    for _ in range(200 * max(n, 1)):
        if len(out) >= n:
            break
        scene = pick(W.sample_scene(rng, "train"))
        if scene is None:
            continue
        cap = W.caption(scene, rng)
        if normalize_phrase(cap) in skip or cap in seen or named is not None and named.search(cap):
            continue
        seen.add(cap)
        out.append((cap, scene))
    return out


def concept_prompts(anchor: str, n: int, seed: int = 0, exclude: Iterable[str] = ()) -> list[tuple[str, W.Scene]]:
    """``n`` distinct (caption, scene) pairs from the toy world's training distribution holding ``anchor``, none of
    them in ``exclude`` (normalised text), reproducible from ``seed``."""
    c = concept(anchor)

    def holding(s: W.Scene) -> W.Scene | None:
        d = s.as_dict()
        if c.attribute == "character":
            d.update(character=c.value, object=None, color=None)
        elif c.attribute == "object":
            if s.character is not None:
                return None
            d["object"] = c.value
        else:
            d[c.attribute] = c.value
        try:
            s = W.Scene(**d)
        except ValueError:
            return None
        return None if W.is_heldout(s) else s

    out = _distinct_prompts(n, seed, holding, exclude)
    if len(out) < n:
        raise ValueError(f"found only {len(out)} of {n} distinct prompts holding {anchor!r}")
    return out


def caption_prompts(anchors: Iterable[str], n: int, seed: int = 0,
                    exclude: Iterable[str] = ()) -> dict[str, list[str]]:
    """Fitting prompts in the model's own prompt distribution: ``n`` toy-world captions per anchor (training
    distribution, none in ``exclude``), for ``QuickFixEdit.fit(..., prompts=...)``; the target prompts follow by
    substitution ("a red cat painted by van gogh" → "a red cat painted by painting").

    The paper's templates ("A photo of van gogh") are bare phrases, which the toy text encoder never saw: every toy
    caption names an object. Pass every evaluation caption in ``exclude``.
    """
    exclude = list(exclude)
    return {a: [c for c, _ in concept_prompts(a, n, seed=seed + i, exclude=exclude)] for i, a in enumerate(anchors)}


def unrelated_prompts(avoid: Iterable[str], n: int, seed: int = 0) -> list[tuple[str, W.Scene]]:
    """``n`` distinct training-distribution (caption, scene) pairs that hold none of the phrases in ``avoid``: not in
    the scene, nor as words of the caption (an anchor "painting" is in "a van gogh painting of a dog")."""
    avoid = [concept(p) for p in avoid]

    def free(s: W.Scene) -> W.Scene | None:
        if any(getattr(s, c.attribute) == c.value for c in avoid if c.attribute != "object") or any(
                s.object == c.value and s.character is None or c.value in (s.character or "").split()
                for c in avoid if c.attribute == "object"):  # "grumpy cat" holds the word "cat"
            return None
        return s

    return _distinct_prompts(n, seed, free, words=[c.value for c in avoid])


def preservation_prompts(pairs: Iterable[Sequence[str]], n: int, seed: int = 0) -> list[tuple[str, W.Scene]]:
    """:func:`unrelated_prompts` for edits of ``(anchor, target)`` ``pairs``: none holds an anchor (the edit changes
    those) or a style or character target; an object target (snoopy → dog) stays: plain dogs must be preserved."""
    pairs = [tuple(p) for p in pairs]
    return unrelated_prompts(list(dict.fromkeys([a for a, _ in pairs] + [t for _, t in pairs
                                                                           if concept(t).attribute != "object"])),
                             n, seed)


# A few misspellings per toy concept, as people type them (the paper's robustness demo); others are generated.
MISSPELLINGS: dict[str, tuple[str, ...]] = {
    "van gogh": ("van gough", "vangogh", "van goh"),
    "monet": ("monnet", "monett", "manet"),
    "snoopy": ("snoopi", "snopy", "snoppy"),
    "r2d2": ("r2-d2", "r2 d2", "rd2d"),
    "nemo": ("nemmo", "nimo", "neemo"),
    "grumpy cat": ("grumpycat", "grumpy kat", "grumpie cat"),
}


def misspellings(phrase: str, n: int = 3) -> list[str]:
    """``n`` misspellings of ``phrase``: the listed ones first, then a dropped, a doubled and a swapped letter."""
    known = list(MISSPELLINGS.get(normalize_phrase(phrase), ()))
    p = normalize_phrase(phrase)
    letters = [i for i, ch in enumerate(p) if ch.isalpha()]
    mid = letters[len(letters) // 2] if letters else 0
    made = [p[:mid] + p[mid + 1:], p[:mid] + p[mid] + p[mid:], p[:mid] + p[mid + 1:mid + 2] + p[mid] + p[mid + 2:]]
    out = []
    for m in known + made:
        if m != p and m not in out:
            out.append(m)
    return out[:n]


def variant_prompts(anchor: str, scene: W.Scene, n_misspellings: int = 3) -> list[tuple[str, str, str]]:
    """(kind, variant, prompt) for one scene holding ``anchor``: every paraphrase the toy grammar has for it
    (``kind="paraphrase"``), and the first paraphrase with the anchor misspelt (``kind="misspelling"``)."""
    caps = W.captions(scene)
    out = [("paraphrase", anchor, c) for c in caps]
    base = caps[0]
    a, b = W.subject_char_span(base, scene, concept(anchor).attribute)
    out += [("misspelling", m, base[:a] + m + base[b:]) for m in misspellings(anchor, n_misspellings)]
    return out


# ------------------------------------------------------------------------------------------ generate and classify
@torch.no_grad()
def generate_images(pipe, prompts: Sequence[str], seeds: Sequence[int], steps: int, guidance: float,
                    edit: WeightEdit | None = None, batch_size: int = 64, progress: Any = None) -> torch.Tensor:
    """Images for every (prompt, seed), prompt-major (``index = i_prompt * len(seeds) + i_seed``), in [0, 1], on
    the CPU; with ``edit`` applied during generation (and reverted afterwards). ``progress``: a flag or a bar
    (:mod:`lib.progress`), in images."""
    with edit.applied(pipe) if edit is not None else nullcontext():
        return generate_all(pipe, prompts, seeds, steps, guidance, batch_size, progress)


def classify(members: AttributeClassifier | Mapping[str, AttributeClassifier], images: torch.Tensor,
             batch_size: int = 256) -> pd.DataFrame:
    """Ensemble predictions (:class:`lib.toy.classifiers.EnsembleClassifier`), one column per family."""
    members = {members.name: members} if isinstance(members, AttributeClassifier) else dict(members)
    return pd.DataFrame(EnsembleClassifier(members).predict(images, batch_size))


def scene_accuracy(pred: pd.DataFrame, scenes: Sequence[W.Scene]) -> pd.Series:
    """Per image: the fraction of scored families (a scene's color only where it names one) predicted right."""
    acc = []
    for (_, row), s in zip(pred.iterrows(), scenes):
        truth = {f: scene_label(s, f) for f in pred.columns}
        scored = [f for f, v in truth.items() if v is not None]
        acc.append(float(np.mean([row[f] == truth[f] for f in scored])))
    return pd.Series(acc, index=pred.index, name="accuracy")


def edit_fingerprint(edit: WeightEdit | None) -> str:
    """A hash of an edit's weight deltas, exact (their bytes: deltas are small); ``"none"`` for no edit."""
    if edit is None:
        return "none"
    h = hashlib.sha1()
    for name in sorted(edit.deltas):
        t = edit.deltas[name].detach().cpu().contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


EVAL_CACHE_VERSION = 1  # raise when evaluate_edit computes its rows differently: older cached conditions are not reused


def _evaluation_base(pipe, members, prompts, scenes, seeds, steps, guidance, scorer, score_captions,
                     batch_size) -> dict:
    """What every condition's result of one :func:`evaluate_edit` call depends on besides its edit."""
    from lib.loading import model_fingerprint, weights_fingerprint
    from lib.sampling import scheduler_settings

    if scorer is not None and scorer.fingerprint() is None:
        raise ValueError("cache_dir needs a scorer whose weights can be fingerprinted (a ClipScorer with a module): "
                         "another scorer's CLIP-Scores would pass for this one's")
    mods = {members.name: members} if isinstance(members, AttributeClassifier) else dict(members)
    return dict(version=EVAL_CACHE_VERSION, model=model_fingerprint(pipe), scheduler=scheduler_settings(pipe), members=sorted(mods),
                member_weights=weights_fingerprint(mods), prompts=list(prompts), scenes=[repr(s) for s in scenes],
                seeds=[int(s) for s in seeds], steps=int(steps), guidance=float(guidance), batch_size=int(batch_size),
                scorer=None if scorer is None else scorer.fingerprint(),
                score_captions={k: list(v) for k, v in (score_captions or {}).items()})


def _cached(cache_dir: Path, key: str, keep_images: bool) -> tuple[pd.DataFrame, torch.Tensor | None] | None:
    """A condition's rows (and images) written by an earlier call with the same key, or None."""
    rows, imgs = cache_dir / f"condition_{key}.parquet", cache_dir / f"condition_{key}.safetensors"
    if not rows.is_file() or keep_images and not imgs.is_file():
        return None
    from safetensors.torch import load_file

    try:
        df = pd.read_parquet(rows)
        images = load_file(str(imgs))["images"] if keep_images else None
    except Exception as err:  # noqa: BLE001 - a truncated or foreign file: generate again, say so
        import warnings

        warnings.warn(f"ignoring unreadable cached evaluation {rows.name} ({type(err).__name__}); generating again",
                      stacklevel=3)
        return None
    return df, images


@torch.no_grad()
def evaluate_edit(pipe, members, conditions: Mapping[str, WeightEdit | None], prompts: Sequence[str],
                  scenes: Sequence[W.Scene], seeds: Sequence[int], steps: int, guidance: float,
                  scorer=None, score_captions: Mapping[str, Sequence[str]] | None = None,
                  batch_size: int = 64, progress: Any = None, keep_images: bool = False,
                  cache_dir: str | Path | None = None):
    """Generate ``prompts`` × ``seeds`` under each condition (name → edit, None = unedited) and classify.

    Returns a tidy frame (condition, prompt index, prompt, seed, one ``pred_<family>`` column per family, ``accuracy``
    against ``scenes``, and ``clip_<name>`` for each caption list of ``score_captions`` scored with ``scorer``), plus
    ``{condition: images}`` when ``keep_images``.

    ``cache_dir``: each condition's rows (and, with ``keep_images``, its images) are written there atomically as soon
    as it is done, named by a key hashing the weights, the edit's deltas (:func:`edit_fingerprint`), the classifiers,
    the scorer, the prompts, scenes, seeds and settings (not the condition's name); a later call with the same key
    loads them instead of generating again (``progress``, a flag or a bar of :mod:`lib.progress`, advances by their
    images), so an interrupted evaluation
    loses no finished condition, and a condition evaluated twice (the unedited model in several tables) is generated
    once.
    """
    if len(prompts) != len(scenes):
        raise ValueError(f"{len(prompts)} prompts but {len(scenes)} scenes")
    bad = {k: len(v) for k, v in (score_captions or {}).items() if len(v) != len(prompts)}
    if bad:  # before any image is generated
        raise ValueError(f"score_captions lists must have one caption per prompt ({len(prompts)}), got {bad}")
    if score_captions and scorer is None:
        raise ValueError(f"score_captions {sorted(score_captions)} given without a scorer to score them")
    if len(set(int(s) for s in seeds)) != len(seeds):
        raise ValueError(f"repeated seeds {list(seeds)}: each (prompt, seed) image would count twice")
    frames, images = [], {}
    base = None
    if cache_dir is not None:
        from lib.atomic import remove_stale_tmp

        cache_dir = Path(cache_dir)
        if cache_dir.is_dir():
            remove_stale_tmp(cache_dir)  # a killed run's half-written file
        base = _evaluation_base(pipe, members, prompts, scenes, seeds, steps, guidance, scorer, score_captions,
                                batch_size)
    with progress_bar(progress, len(conditions) * len(prompts) * len(seeds), "evaluating", "img") as bar:
        for name, edit in conditions.items():
            cache_key = None
            if base is not None:
                what = json.dumps(dict(base, edit=edit_fingerprint(edit)), sort_keys=True, default=str)
                cache_key = hashlib.sha1(what.encode()).hexdigest()[:12]
                hit = _cached(cache_dir, cache_key, keep_images)
                if hit is not None:
                    frames.append(hit[0].assign(condition=name))
                    if keep_images:
                        images[name] = hit[1]
                    if bar is not None:
                        bar.update(len(prompts) * len(seeds))
                    continue
            imgs = generate_images(pipe, prompts, seeds, steps, guidance, edit, batch_size, bar)
            pred = classify(members, imgs).add_prefix("pred_")
            rep_scenes = [s for s in scenes for _ in seeds]
            df = pd.DataFrame({
                "condition": name,
                "prompt_id": np.repeat(np.arange(len(prompts)), len(seeds)),
                "prompt": np.repeat(np.asarray(prompts, dtype=object), len(seeds)),
                "seed": np.tile(np.asarray(seeds), len(prompts)),
            })
            df = pd.concat([df, pred], axis=1)
            df["accuracy"] = scene_accuracy(pred.rename(columns=lambda c: c[5:]), rep_scenes).values
            for key, caps in (score_captions or {}).items():
                rep = [c for c in caps for _ in seeds]
                df[f"clip_{key}"] = scorer.score(imgs, rep).cpu().numpy()
            frames.append(df)
            if keep_images:
                images[name] = imgs
            if cache_key is not None:
                from lib.atomic import write_parquet_atomic
                from lib.atomic import write_safetensors_atomic

                if keep_images:  # the images first: rows without them are not a finished cache entry of this kind
                    write_safetensors_atomic({"images": imgs}, cache_dir / f"condition_{cache_key}.safetensors", {})
                write_parquet_atomic(df, cache_dir / f"condition_{cache_key}.parquet")
    out = pd.concat(frames, ignore_index=True)
    return (out, images) if keep_images else out


def concept_rate(df: pd.DataFrame, phrase: str) -> pd.Series:
    """Per row: whether the classifier found ``phrase`` (e.g. style == "van gogh"; for an object, the generic
    object without a character)."""
    c = concept(phrase)
    hit = df[f"pred_{c.attribute}"] == c.value
    if c.attribute == "object" and "pred_character" in df:
        hit &= df["pred_character"] == "none"
    return hit


def prompt_table(concept_sets: Mapping[str, Sequence[tuple[str, W.Scene]]], unrelated: Sequence[tuple[str, W.Scene]],
                 anchors: Sequence[str]) -> pd.DataFrame:
    """The evaluation prompts of ``anchors`` (their ``concept_sets``), then the ``unrelated`` ones (anchor None):
    columns anchor, prompt, scene."""
    rows = [(a, c, s) for a in anchors for c, s in concept_sets[a]] + [(None, c, s) for c, s in unrelated]
    return pd.DataFrame(rows, columns=["anchor", "prompt", "scene"])


def mark_hits(df: pd.DataFrame, target_of: Mapping[str, str] | None = None) -> pd.DataFrame:
    """``df`` (rows with an ``anchor`` column) with ``concept_hit``: the classifiers found the row's anchor, and, given
    ``target_of`` (anchor → target), ``target_hit``: they found its target; False on rows without an anchor."""
    df["concept_hit"] = False
    if target_of is not None:
        df["target_hit"] = False
    for a in df["anchor"].dropna().unique():
        m = df["anchor"] == a
        df.loc[m, "concept_hit"] = concept_rate(df[m], a)
        if target_of is not None:
            df.loc[m, "target_hit"] = concept_rate(df[m], target_of[a])
    return df


def evaluate_anchors(pipe, members, conditions: Mapping[str, WeightEdit | None], prompts: pd.DataFrame,
                     target_of: Mapping[str, str], seeds: Sequence[int], steps: int, guidance: float, **kwargs):
    """:func:`evaluate_edit` of a :func:`prompt_table` (``kwargs``: its options; ``scorer`` also scores each image
    against its prompt and against the caption of the scene the edit should draw, ``clip_prompt`` / ``clip_target``),
    with each row's ``anchor`` and :func:`mark_hits`."""
    targets = [nearest_caption(edit_scene(s, a, target_of[a]), c) if isinstance(a, str) else c
               for a, c, s in prompts.itertuples(index=False)]
    if kwargs.get("scorer") is not None:
        kwargs["score_captions"] = {"prompt": list(prompts.prompt), "target": targets}
    res = evaluate_edit(pipe, members, conditions, list(prompts.prompt), list(prompts.scene), seeds, steps, guidance,
                        **kwargs)
    df, images = res if kwargs.get("keep_images") else (res, None)
    df["anchor"] = prompts.anchor.to_numpy()[df.prompt_id]
    mark_hits(df, target_of)
    return (df, images) if kwargs.get("keep_images") else df


def substituted_rates(pipe, members, concept_sets: Mapping[str, Sequence[tuple[str, W.Scene]]],
                      target_of: Mapping[str, str], anchors: Sequence[str], seeds: Sequence[int], steps: int,
                      guidance: float, batch_size: int = 64) -> pd.DataFrame:
    """The unedited model's concept rate on each anchor's evaluation prompts with the anchor replaced by its target
    ("… painted by van gogh" → "… painted by painting"), per anchor with an example prompt: a reference for an edit's
    residual, since a phrasing the model never saw may draw the anchor by itself."""
    rows = [(a, substitute(c, a, target_of[a])) for a in anchors for c, _ in concept_sets[a]]
    images = generate_images(pipe, [p for _, p in rows], seeds, steps, guidance, batch_size=batch_size)
    pred = classify(members, images).add_prefix("pred_")
    pred["anchor"] = [a for a, _ in rows for _ in seeds]
    return pd.DataFrame({
        "substituted prompt, e.g.": [next(p for b, p in rows if b == a) for a in anchors],
        "unedited on substituted prompts": [concept_rate(pred[pred.anchor == a], a).mean() for a in anchors],
    }, index=pd.Index(anchors, name="anchor"))


__all__ = [
    "Concept", "MISSPELLINGS", "check_pair", "check_pairs", "classify", "concept", "concept_prompts", "concept_rate",
    "edit_prompts", "edit_scene", "edit_fingerprint", "evaluate_anchors", "evaluate_edit", "generate_images",
    "mark_hits", "misspellings", "nearest_caption", "prompt_table", "scene_accuracy", "substituted_rates",
    "unrelated_prompts", "variant_prompts",
]
