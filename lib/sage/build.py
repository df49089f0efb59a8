"""What the SAGE notebooks (01–03) share: ensemble and checker from short specs, the proposer LM, the CLIP scorer,
vocabularies for failure categories, and captions of a class for the token attack.

Member specs (strings, as notebook parameters):

* toy world: ``"resnet"``, ``"mobilenet"``, ``"edges"`` (``lib.toy.classifiers``; ``edges`` sees only Canny edges:
  the edge-based member) — the head is ``attribute`` (default ``"object"``); ``"toy:resnet"`` works too;
* ``"timm:<name>"``: a pretrained timm ImageNet classifier (its own data config); ``"timm:<name>@<file>"`` with its
  weights from a local file (a path from the repo root, or absolute) instead of the Hugging Face cache (not for
  ``hf-hub:`` names, where timm reads ``@`` as a revision);
* ``"edge:timm:<name>"`` (or ``"edge:<any non-toy spec>"``, e.g. ``"edge:clip:ViT-B-32"``): that classifier behind
  kornia Canny edges (:class:`EdgeMember`);
* ``"clip:<open_clip model>"``: open_clip zero-shot over the ImageNet label names (OpenAI weights).

Real classifiers need their weights in the local caches (no downloads here); the toy ones are committed.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from lib.params import Param, ToySettingsWarning, positive
from lib.paths import in_repo
from lib.sage.loss import ClipMember, Criteria, EdgeMember, Ensemble, imagenet_groups, imagenet_labels, timm_member
from lib.sage.metrics import network_prints

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

    from lib.sage.loss import Member

TOY_MEMBERS: tuple[str, ...] = ("resnet", "mobilenet", "edges")
SEARCH_PARAMS: dict[str, Param] = {  # the parameters of notebooks 01-03 alike (besides lib.params.COMMON)
    "ITERATIONS": Param(int, low=0, high=100_000),
    "STEP_SIZE": Param(float, low=1e-6, high=10.0),
    "ENSEMBLE": Param(list, items=str, min_len=1),
    "CHECKER": Param(str, optional=True),
    "ATTRIBUTE": Param(str),
}
EMBEDDING_PARAMS: dict[str, Param] = {  # and of the two searches over text embeddings (02, 03)
    "EMB_RANGE": Param(float, low=0.0, check=positive),
    "GRAD_FROM_STEP": Param(int, low=0),
}
_CAPTION_TEMPLATES: tuple[str, ...] = (  # non-toy captions of a class for the token attack (ours)
    "a photo of a {cls}", "a picture of a {cls}", "an image of a {cls}", "a close-up photo of a {cls}",
    "a photo of a {cls} on a sofa", "a photo of a {cls} in a garden", "a {cls} sitting on the grass",
    "a {cls} lying on a bed", "a photo of a small {cls}", "a photo of a large {cls}", "a {cls} in the snow",
    "a {cls} on a beach", "a black and white photo of a {cls}", "a photo of a {cls} at night",
    "a blurry photo of a {cls}", "a {cls} next to a window",
)
ATTRIBUTE_WORDS_REAL: tuple[str, ...] = (  # failure-category heuristic for real models (ours)
    "red", "green", "blue", "yellow", "purple", "orange", "pink", "white", "black", "brown", "grey", "gray",
    "golden", "wooden", "metal", "glass", "plastic", "painted", "cartoon", "sketch", "painting", "drawing",
)


def is_toy(model: str) -> bool:
    """The toy world (``"toy"`` or a folder :mod:`lib.toy.train` wrote): :func:`lib.loading.is_toy_world`."""
    from lib.loading import is_toy_world

    return is_toy_world(model)


def freeze(*modules) -> None:
    """No weight gradients: the searches differentiate only w.r.t. latents or embeddings."""
    for m in modules:
        if m is not None and hasattr(m, "requires_grad_"):
            m.requires_grad_(False)


def freeze_pipeline(pipe) -> None:
    freeze(pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None))


def make_member(spec: str, device: str = "cpu", attribute: str = "object", _toy_cache: dict | None = None):
    """One ensemble member from its spec (see the module docstring)."""
    spec = spec.strip()
    if spec.startswith("edge:"):
        inner = spec[len("edge:"):]
        if inner in TOY_MEMBERS or inner.startswith("toy:"):
            raise ValueError(f"{spec!r}: the toy world's edge member is 'edges' (it computes Canny itself)")
        return EdgeMember(make_member(inner, device, attribute, _toy_cache), name=f"edge-{inner}")
    if spec.startswith("timm:"):
        name, at, file = spec[len("timm:"):].partition("@")
        if name.startswith(("hf-hub:", "hf_hub:")):  # timm's own "@<revision>" of a hub name: not a file
            name, at, file = spec[len("timm:"):], "", ""
        if at and not file:
            raise ValueError(f"{spec!r}: give the weights file after '@' (timm:<name>@<file>)")
        return timm_member(name, pretrained=True, device=device, weights=in_repo(file) if file else None)
    if spec.startswith("clip:"):
        from lib.scoring import openclip_scorer

        return ClipMember(openclip_scorer(spec[len("clip:"):], "openai", device), imagenet_labels(), name=spec)
    name = spec[len("toy:"):] if spec.startswith("toy:") else spec
    if name in TOY_MEMBERS:
        from lib.sage.loss import ToyMember
        from lib.toy.classifiers import load_classifiers

        cache = _toy_cache if _toy_cache is not None else {}
        if "clfs" not in cache:
            cache["clfs"] = load_classifiers(device=device)
        if name not in cache["clfs"]:
            raise ValueError(f"toy classifier {name!r} is not in data/toy/classifiers (have {sorted(cache['clfs'])})")
        clf = cache["clfs"][name]
        freeze(clf)
        return ToyMember(clf, attribute, name=f"toy-{name}")
    raise ValueError(f"unknown member spec {spec!r}: use one of {', '.join(TOY_MEMBERS)} (toy world), "
                     "'timm:<model>', 'edge:<spec>' or 'clip:<open_clip model>'")


def build_ensemble(specs: Sequence[str], checker: str | None = None, device: str = "cpu", attribute: str = "object",
                   criteria: Criteria = Criteria()):
    """(ensemble, checker member or None). The checker is the independent re-check: it must not be in the ensemble."""
    specs = [s.strip() for s in specs]
    if checker is not None and _canonical(checker) in {_canonical(s) for s in specs}:
        raise ValueError(f"checker {checker!r} is also an ensemble member: the re-check needs a held-out classifier")
    cache: dict = {}
    members = [make_member(s, device, attribute, cache) for s in specs]
    toy = all(_is_toy_spec(s) for s in specs)
    groups = None if toy else imagenet_groups()
    ens = Ensemble(members, groups, criteria)
    chk = make_member(checker, device, attribute, cache) if checker else None
    if chk is not None and any(network_prints(chk) & network_prints(m) for m in members):  # e.g. one file, two names
        raise ValueError(f"checker {checker!r} has the weights of an ensemble member: the re-check needs a held-out "
                         "classifier")
    return ens, chk


def _is_toy_spec(spec: str) -> bool:
    return spec in TOY_MEMBERS or spec.startswith("toy:")


def _canonical(spec: str) -> str:
    """The classifier a spec loads, whatever the spelling or edge wrapper ("toy:resnet" is "resnet"; "edge:timm:x"
    sees through timm:x's network)."""
    spec = spec.strip()
    while spec.startswith(("edge:", "toy:")):
        spec = spec.split(":", 1)[1]
    return spec


def check_classes(ensemble: Ensemble, classes: Sequence[str], checker=None) -> None:
    """Fail early (``UnknownClassError`` with near matches) for a class the ensemble or the checker cannot judge."""
    for c in classes:
        ensemble.indices(c)
        if checker is not None:
            Ensemble([checker], ensemble.groups).indices(c)


TOY_LM_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def toy_parts_warning(model: str, members: Sequence[str], lm: str | None = None) -> str | None:
    """A warning when a model that is neither the toy world nor a shape twin is about to be judged by the toy world's
    64-px classifiers (or searched with its caption LM): numbers that say nothing about that model."""
    from lib.loading import is_stand_in

    if is_stand_in(model):
        return None
    toy = [m for m in members if _is_toy_spec(m)] + (["LM='toy'"] if lm == "toy" else [])
    if not toy:
        return None
    return (f"MODEL={model!r} is not the toy world, but {', '.join(toy)} belong to it (classifiers of 64-px renders, "
            "an LM of its caption grammar): pass real members (timm:<name>, edge:timm:<name>, clip:<model>) and a "
            "causal LM id")


def build_members(P, classes: Sequence[str], criteria: Criteria = Criteria(),
                  distinct: tuple[str, str] | None = None, _stacklevel: int = 2):
    """(ensemble, checker) for a SAGE notebook's parameters ``P``: the members ``P.ENSEMBLE`` and ``P.CHECKER`` on
    ``P.ATTRIBUTE``, ``classes`` checked, and ``distinct`` = (source, target) a target that shares no member's label
    with the source (:meth:`lib.sage.loss.Ensemble.check_distinct`). A misspelt member, head or class, or an ImageNet
    target inside the source's group, fails here in one line, before any diffusion model or LM loads."""
    from lib.loading import resolve_device

    message = toy_parts_warning(P.MODEL, list(P.ENSEMBLE) + ([P.CHECKER] if P.CHECKER else []), getattr(P, "LM", None))
    if message:
        warnings.warn(message, ToySettingsWarning, stacklevel=_stacklevel)
    ens, checker = build_ensemble(P.ENSEMBLE, P.CHECKER, device=str(resolve_device(P.DEVICE)),
                                  attribute=P.ATTRIBUTE, criteria=criteria)
    check_classes(ens, classes, checker)
    if distinct is not None:
        ens.check_distinct(*distinct)
    return ens, checker


def setup(P, classes: Sequence[str], criteria: Criteria = Criteria(), distinct: tuple[str, str] | None = None,
          members: tuple | None = None) -> tuple[DiffusionPipeline, Ensemble, Member | None]:
    """(pipeline, ensemble, checker) for a SAGE notebook's parameters ``P``: the pipeline frozen and set to
    ``P.CHECKPOINTING``, and the members of :func:`build_members` (or ``members``, the pair it returned earlier).

    The ensemble is built and checked first: a misspelt member, head or class fails in one line before the (for SD,
    minutes-long) pipeline load."""
    from lib.loading import load_pipeline
    from lib.speed import save_memory

    ens, checker = members if members is not None else build_members(P, classes, criteria, distinct, _stacklevel=3)
    pipe = load_pipeline(P.MODEL, device=P.DEVICE, dtype=P.DTYPE)
    freeze_pipeline(pipe)
    save_memory(pipe, P.CHECKPOINTING)
    print("ensemble:", ens.names, "| checker:", getattr(checker, "name", None))
    return pipe, ens, checker


def load_lm(lm: str = "toy", device: str = "cpu"):
    """The proposer LM of the prompt search: ``"toy"`` (``data/toy/lm``), a local folder, or a hub id.

    A missing or unreadable LM is a one-line :class:`lib.loading.ModelLoadError` naming the file (and, for the toy
    LM, the command that rebuilds it)."""
    from lib.loading import ModelLoadError
    from lib.sage.prompt import CandidateLM
    from lib.toy import lm as toy_lm

    where = toy_lm.DEFAULT_DIR if lm == "toy" else lm
    hint = f" Rebuild it with `{toy_lm.REBUILD}` (from the repo root)." if lm == "toy" else ""
    if lm == "toy":
        try:
            check_lm(lm)  # names the first missing file and the rebuild command
        except ValueError as err:
            raise ModelLoadError(f"{err}.") from None
    try:
        return CandidateLM(where, device=device)
    except Exception as err:  # noqa: BLE001 - transformers' errors span many lines and rarely name the file
        from lib.loading import unreadable_weight_file

        first = (str(err).strip().splitlines() or [""])[0]
        bad = unreadable_weight_file(where, "*.safetensors") if Path(where).is_dir() else None
        which = f": {bad} is unreadable" if bad is not None else ""
        raise ModelLoadError(f"could not load the LM in {where}{which} ({type(err).__name__}: {first}).{hint}"
                             ) from None


def check_lm(lm: str) -> None:
    """A ``Param`` check of the prompt search's ``LM`` before anything loads: ``"toy"`` needs its files, a local folder
    its ``config.json``, a hub id (``gpt2``, ``org/name``) its config in the local cache when the hub is offline;
    ``ValueError`` naming what is missing."""
    from lib.toy import lm as toy_lm

    if lm == "toy":
        missing = [rel for rel in TOY_LM_FILES if not (toy_lm.DEFAULT_DIR / rel).is_file()]
        if missing:
            raise ValueError(f"toy LM file missing: {toy_lm.DEFAULT_DIR / missing[0]}. Rebuild it with "
                             f"`{toy_lm.REBUILD}` (from the repo root)")
        return
    where = Path(lm).expanduser()
    if where.is_dir():
        if not (where / "config.json").is_file():
            raise ValueError(f"{lm!r} is a folder without config.json: not a transformers causal-LM folder")
        return
    if lm.startswith((".", "/", "~")) or lm.count("/") > 1 or "\\" in lm:
        raise ValueError(f"LM folder not found: {lm}")
    from lib.loading import hub_offline

    if hub_offline():  # online, a hub id is only known when it downloads
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(lm, "config.json"), str):
            raise ValueError(f"hub LM {lm!r} is not in the local cache and the hub is offline: download it first "
                             "or give its local folder")


def clip_scorer(model: str, spec: str = "auto", device: str = "cpu"):
    """CLIP-Score model, frozen: :func:`lib.scoring.scorer_for` of ``spec`` (``auto``: the toy CLIP for the toy world,
    a random toy-size CLIP for shape twins, else open_clip ViT-L/14 with OpenAI weights from the local cache;
    ``openclip:<model>:<weights or local file>``, ``toy:<folder>``, ``random``)."""
    from lib.scoring import scorer_for

    scorer = scorer_for(model, spec, device)
    if scorer.module is not None:
        freeze(scorer.module)
    return scorer


def vocabulary(model: str, ensemble: Ensemble | None = None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(class words, attribute words) for :func:`lib.sage.prompt.categorize`."""
    if is_toy(model):
        from lib.toy import world as W

        styles = tuple(w for s in W.STYLES for w in s.split())
        return W.OBJECTS + W.CHARACTERS, W.COLORS + styles + W.ACTIONS
    classes = set(ensemble.groups) if ensemble is not None else set()
    if ensemble is not None:
        for m in ensemble.members:
            classes |= {str(l).lower() for l in m.labels}
    return tuple(sorted(classes)), ATTRIBUTE_WORDS_REAL


def check_caption_count(model: str, cls: str, n_train: int, n_test: int, seed: int = 0) -> None:
    """Before any model loads: notebook 03's draw of ``n_train`` training captions of ``cls`` (``seed``) and ``n_test``
    held-out ones (``seed + 1``, none describing a training scene) succeeds (:func:`class_captions`;
    ``N_TRAIN_PROMPTS``, ``N_TEST_PROMPTS``, ``PROMPT_SEED``), else a one-line ``ParameterError``. The draw itself,
    not a count: the held-out pool loses every phrasing of the training scenes, more than ``n_train`` captions."""
    from lib.params import ParameterError

    try:
        class_captions(model, cls, 0)
    except ValueError as err:
        raise ParameterError(f"SOURCE: {err}") from None
    try:
        class_captions(model, cls, n_train + n_test)  # the plain count first: its message says which sum is short
        train = class_captions(model, cls, n_train, seed)
        class_captions(model, cls, n_test, seed + 1, exclude=train)
    except ValueError as err:
        raise ParameterError(f"{n_train} + {n_test} captions of {cls!r} (N_TRAIN_PROMPTS + N_TEST_PROMPTS): {err}") from None


def class_captions(model: str, cls: str, n: int, seed: int = 0, exclude: Sequence[str] = ()) -> list[str]:
    """``n`` distinct captions that ask for ``cls`` (toy world: drawn from the grammar, generic objects, no style, no
    held-out pair; otherwise from fixed templates), none of them in ``exclude``, reproducible from ``seed``. In the
    toy world no caption describes the scene of an excluded one either (the grammar has several phrasings of a scene:
    "a jumping blue cat" is "a photo of a blue cat jumping"), so held-out captions are held-out scenes."""
    rng = np.random.default_rng(seed)
    skip = set(exclude)
    if is_toy(model):
        from lib.toy import world as W

        if cls not in W.OBJECTS:
            raise ValueError(f"{cls!r} is not a toy-world object ({', '.join(W.OBJECTS)})")
        skip_scenes = {W.parse_caption(c) for c in exclude}
        pool = []
        for color in (None,) + W.COLORS:
            for action in (None,) + W.ACTIONS:
                for bg in (None,) + W.BACKGROUNDS:
                    s = W.Scene(object=cls, color=color, action=action, background=bg)
                    if not W.is_heldout(s) and s not in skip_scenes:
                        pool += [c for c in W.captions(s) if c not in skip]
    else:
        pool = [t.format(cls=cls) for t in _CAPTION_TEMPLATES if t.format(cls=cls) not in skip]
    pool = sorted(set(pool))
    if len(pool) < n:
        raise ValueError(f"only {len(pool)} captions of {cls!r} available, {n} asked")
    return [pool[i] for i in sorted(rng.choice(len(pool), size=n, replace=False))]
