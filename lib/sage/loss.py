"""SAGE's robust surrogate loss: an ensemble of differentiable classifiers (each with its own preprocessing) plus an
edge-based member, so that a failure found by the search fools all of them and is less likely a classifier artefact.

Member interface: any callable ``images (B, 3, H, W) in [0, 1] → logits (B, len(labels))`` with a ``.labels``
sequence (and optionally a ``.name``). Adapters: :func:`timm_member` (ImageNet classifiers), :class:`ClipMember`
(open_clip zero-shot), :class:`ToyMember` (the toy world's attribute classifiers), :class:`EdgeMember` (kornia Canny
edges fed to any member) and :class:`FnMember` (wrap a plain function or module).

Loss (per image; ``P_m(c)`` = probability that member ``m`` gives to class ``c``, summed over ``c``'s label group;
``max_k`` runs over the member's labels; every term lies in [-1, 1], lower is better for the search)::

    lose       L = Σ_m (2·P_m(c) − 1)                                  the seed's  −Σ_m (1 − 2·p_target),  p = P(c)
    uncertain  L = Σ_m (2·max(P_m(c), max_{k∉c} p_m,k) − 1)           type 1: no label confident, c's group summed
    other      L = Σ_m ½[(2·P_m(c) − 1) + (1 − 2·P_m(o))]              type 2: lose c, one other label o confident
    become     L = Σ_m (1 − 2·P_m(t))                                  token attack: the target t appears

Every ``L`` is *minimised* by the searches (``δ − lr·sign ∇L``, :func:`lib.sage.latent.signed_step`). This departs
from the seed pseudo-code's literal sign: it steps *up* the gradient (``perturb += lr·grad.sign()``,
``emb_x += sign(grad)·step_size``) of −Σ(1 − 2p) for the class, which taken literally would raise P(class). The
formulas above are the seed's; only the update's sign is ours, chosen so that the searches move towards the goal
(the class lost, the target shown), the direction the method intends.

``lose`` and ``become`` are the seed pseudo-code's formula for the two goals; ``uncertain`` and ``other`` are our
variants for the two latent failure types (the paper does not give them). Type 2 is "a natural image of something
else", so the members must agree on what else: ``o`` is, per image, the label (by name, outside ``c``'s group) with
the largest summed probability over the members (:meth:`Ensemble.agreed_label`), and the verdict needs every member
confident in that same ``o``. Only when the members share no label name does each member's own most probable other
label stand in for ``o``. A class name may stand for a group of
labels (``groups``, e.g. ImageNet's five domestic-cat classes for "cat"); unknown names raise ``UnknownClassError``
listing near matches.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Mapping, Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

Goal = Literal["lose", "uncertain", "other", "become"]
Verdict = Literal["lose", "type1", "type2", "become"]
GOALS: tuple[str, ...] = ("lose", "uncertain", "other", "become")
VERDICTS: tuple[str, ...] = ("lose", "type1", "type2", "become")


class UnknownClassError(KeyError):
    """A class name that a member's labels (or the groups) do not contain; the message lists near matches."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


@runtime_checkable
class Member(Protocol):
    """A differentiable classifier: images in [0, 1] → logits over ``labels``."""

    labels: Sequence[str]

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


def member_name(member: Member, index: int = 0) -> str:
    return str(getattr(member, "name", None) or f"{type(member).__name__}{index}")


# ---------------------------------------------------------------------------------------------------------- adapters
class FnMember(nn.Module):
    """Wrap a function or module ``images → logits`` with its labels (tests, custom classifiers)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], labels: Sequence[str], name: str = "fn"):
        super().__init__()
        self.fn, self.labels, self.name = fn, tuple(labels), name

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fn(images)


class TimmMember(nn.Module):
    """A timm classifier with its own data config: resize (shorter side to size/crop_pct), centre crop, normalise."""

    def __init__(self, model: nn.Module, labels: Sequence[str], name: str = "timm"):
        super().__init__()
        from timm.data import resolve_data_config

        cfg = resolve_data_config({}, model=model)
        self.model, self.labels, self.name = model.eval(), tuple(labels), name
        self.size = int(cfg["input_size"][-1])
        self.resize = math.floor(self.size / float(cfg.get("crop_pct") or 1.0))  # as timm's eval transform
        self.mode = "bicubic" if cfg.get("interpolation") == "bicubic" else "bilinear"
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.mean.device, torch.float32)
        x = F.interpolate(x, size=(self.resize, self.resize), mode=self.mode, align_corners=False, antialias=True)
        x = x.clamp(0.0, 1.0)  # as timm's PIL transform, whose uint8 output clips the bicubic overshoot at edges
        off = int(round((self.resize - self.size) / 2.0))  # torchvision's CenterCrop
        x = x[..., off : off + self.size, off : off + self.size]
        p = next(self.model.parameters())
        return self.model(((x - self.mean) / self.std).to(p.dtype)).float()


# The three first synonyms ImageNet-1k uses twice, told apart (else "dog" would take in the cardigan sweater with the
# Cardigan corgi, and "bird" the construction crane).
_IMAGENET_DUPLICATES = {134: "crane (bird)", 517: "crane (machine)", 264: "cardigan welsh corgi", 639: "tank suit"}


def imagenet_labels() -> tuple[str, ...]:
    """ImageNet-1k label names, one per class and all distinct: the first synonym of each class, lower case ("tabby",
    "tiger cat", ...), except where two classes share it (``_IMAGENET_DUPLICATES``: "crane (bird)" / "crane
    (machine)", "cardigan welsh corgi" / "cardigan", "maillot" / "tank suit")."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return tuple(_IMAGENET_DUPLICATES.get(i) or info.index_to_description(i).split(",")[0].strip().lower()
                 for i in range(1000))


# Coarse ImageNet classes as index ranges of the WordNet hierarchy (approximate; extend as needed).
_IMAGENET_RANGES: dict[str, list[tuple[int, int]]] = {
    "dog": [(151, 269)],
    "cat": [(281, 286)],
    "big cat": [(286, 294)],
    "bird": [(7, 25), (80, 101), (127, 147)],
    "fish": [(0, 7), (389, 398)],
}


def imagenet_groups() -> dict[str, tuple[str, ...]]:
    """Coarse names → ImageNet label names ("cat" → tabby, tiger cat, persian cat, siamese cat, egyptian cat)."""
    names = imagenet_labels()
    return {k: tuple(names[i] for a, b in r for i in range(a, b)) for k, r in _IMAGENET_RANGES.items()}


def timm_member(model_name: str, pretrained: bool = True, device: str = "cpu", labels: Sequence[str] | None = None,
                weights: str | Path | None = None, **kwargs) -> TimmMember:
    """``timm.create_model(model_name, pretrained=...)`` wrapped as a member; ImageNet labels unless given.
    ``weights``: a local file of the pretrained weights (safetensors or a torch state dict), for a machine without
    them in the Hugging Face cache. A model that cannot be created (an unknown name, weights not at hand) is a
    one-line :class:`lib.loading.ModelLoadError`."""
    import timm

    from lib.loading import ModelLoadError

    if weights is not None:
        if not Path(weights).is_file():
            raise ModelLoadError(f"timm:{model_name}: weights file not found: {weights}")
        kwargs["pretrained_cfg_overlay"] = {**kwargs.get("pretrained_cfg_overlay", {}), "file": str(weights)}
    try:
        model = timm.create_model(model_name, pretrained=pretrained or weights is not None, **kwargs)
    except Exception as err:  # noqa: BLE001 - hub, file and name errors span lines and rarely say what to do
        first = (str(err).strip().splitlines() or [""])[0]
        hint = "" if weights is not None else (" (without hub access its weights must be in the Hugging Face cache, "
                                               f"or give a file: 'timm:{model_name}@<weights file>')")
        raise ModelLoadError(f"timm:{model_name} could not be created ({type(err).__name__}: {first}){hint}") from None
    model = model.to(device)
    n = model.num_classes
    labels = tuple(labels) if labels is not None else (imagenet_labels() if n == 1000 else tuple(map(str, range(n))))
    if len(labels) != n:
        raise ValueError(f"{model_name} has {n} outputs but {len(labels)} labels were given")
    return TimmMember(model, labels, name=model_name).to(device)  # the normalisation buffers too


class ClipMember(nn.Module):
    """CLIP zero-shot: logits = scale · cos(image, "a photo of a {label}") through a :class:`lib.scoring.ClipScorer`."""

    def __init__(self, scorer, labels: Sequence[str], template: str = "a photo of a {label}",
                 logit_scale: float = 100.0, name: str = "clip"):
        super().__init__()
        if "{label}" not in template:
            raise ValueError(f"template must contain '{{label}}', got {template!r}")
        self.scorer, self.labels, self.name, self.logit_scale = scorer, tuple(labels), name, logit_scale
        with torch.no_grad():
            self.register_buffer("text", scorer.text_features([template.format(label=l) for l in labels]),
                                 persistent=False)

    def _apply(self, fn, *args, **kwargs):
        """``.to()`` / ``.cuda()`` / ``.half()`` of this member (or of its ensemble) also move the scorer's CLIP."""
        super()._apply(fn, *args, **kwargs)
        module = getattr(self.scorer, "module", None)
        if module is not None:
            module._apply(fn, *args, **kwargs)
            self.scorer.device = self.text.device
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.scorer.image_features(images)
        return self.logit_scale * feats @ self.text.to(feats).T


def openclip_member(labels: Sequence[str], model_name: str = "ViT-L-14", pretrained: str | None = "openai",
                    device: str = "cpu", **kwargs) -> ClipMember:
    """A zero-shot member from open_clip (``pretrained=None``: random weights, for tests/benchmarks)."""
    from lib.scoring import openclip_scorer

    return ClipMember(openclip_scorer(model_name, pretrained, device), labels, name=f"clip-{model_name}", **kwargs)


class ToyMember(nn.Module):
    """One head (``attribute``, default "object") of a toy-world attribute classifier.

    Built against ``lib.toy.classifiers``: ``classifier(images) -> dict[attribute, logits]`` and
    ``classifier.labels[attribute]``; the classifier does its own preprocessing (one of them sees only Canny
    edges: that is the toy world's edge-based member).
    """

    def __init__(self, classifier: nn.Module, attribute: str = "object", name: str = "toy"):
        super().__init__()
        labels = getattr(classifier, "labels", None)
        if not isinstance(labels, Mapping) or attribute not in labels:
            have = sorted(labels) if isinstance(labels, Mapping) else "none"
            raise ValueError(f"toy classifier {name!r} has no {attribute!r} head (heads: {have})")
        self.classifier, self.attribute, self.labels, self.name = classifier, attribute, tuple(labels[attribute]), name

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(images)[self.attribute]


def toy_members(attribute: str = "object", names: Sequence[str] | None = None, **load_kwargs) -> list[ToyMember]:
    """The toy world's trained classifiers (``lib.toy.classifiers.load_classifiers``) as members of one head."""
    from lib.toy.classifiers import load_classifiers

    clfs = load_classifiers(**load_kwargs)
    if names is not None:
        missing = [n for n in names if n not in clfs]
        if missing:
            raise ValueError(f"unknown toy classifier(s) {missing}; available: {sorted(clfs)}")
        clfs = {n: clfs[n] for n in names}
    return [ToyMember(c.eval(), attribute, name=f"toy-{n}") for n, c in clfs.items()]


class EdgeMember(nn.Module):
    """Canny edges (kornia) of the image, shown to ``inner`` as a 3-channel sketch (dark edges on white by default).

    The hard Canny map (NMS + hysteresis) is not differentiable, so ``gradient`` chooses the backward path:
    ``"straight_through"`` (default): the forward pass is exactly Canny's 0/1 map, the backward pass uses the soft map
    ``sigmoid((m − τ)/T)`` of the NMS'd gradient magnitude ``m`` (τ = midpoint of the two thresholds, T = their gap/4);
    ``"soft"``: the soft map in both passes. Thresholds are in kornia's units (unnormalised Sobel magnitude).

    Canny runs at the inner member's input resolution (``size``; default: a timm member's resize before its crop, a
    CLIP member's image size): a larger image is first downscaled (shorter side, antialiased), so the sketch the
    classifier sees does not depend on the generated image's resolution. Canny at 512-1024 px with these fixed
    thresholds finds fewer edges, and the inner member's downscale thins its 1-px lines to faint grey.
    """

    def __init__(self, inner: Member, low: float = 0.1, high: float = 0.2, sigma: float = 1.0,
                 gradient: Literal["straight_through", "soft"] = "straight_through", invert: bool = True,
                 name: str | None = None, size: int | None = None):
        super().__init__()
        if gradient not in ("straight_through", "soft"):
            raise ValueError(f"gradient must be 'straight_through' or 'soft', got {gradient!r}")
        if not 0 < low <= high:
            raise ValueError(f"need 0 < low <= high, got low={low}, high={high}")
        self.inner, self.labels = inner, tuple(inner.labels)
        self.low, self.high, self.sigma, self.gradient, self.invert = low, high, sigma, gradient, invert
        self.name = name or f"edge-{member_name(inner)}"
        scorer = getattr(inner, "scorer", None)
        self.size = size or getattr(inner, "resize", None) or getattr(scorer, "image_size", None)
        if self.size is not None and int(self.size) < 8:
            raise ValueError(f"size must be at least 8 pixels, got {self.size}")

    def edges(self, images: torch.Tensor) -> torch.Tensor:
        """Edge map (B, 1, h, w) in [0, 1] (1 = edge), differentiable per ``gradient``; (h, w) is the image's size,
        or its downscale to ``size`` (shorter side) when it is larger."""
        from kornia.filters import canny

        x = images.float()
        h, w = x.shape[-2:]
        if self.size is not None and min(h, w) > self.size:
            s = int(self.size)
            x = F.interpolate(x, size=(s, round(s * w / h)) if h <= w else (round(s * h / w), s), mode="bilinear",
                              align_corners=False, antialias=True).clamp(0, 1)
        mag, hard = canny(x, self.low, self.high, sigma=(self.sigma, self.sigma))
        soft = torch.sigmoid((mag - (self.low + self.high) / 2) / ((self.high - self.low) / 4 + 1e-6))
        return soft if self.gradient == "soft" else hard.detach() + soft - soft.detach()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        e = self.edges(images)
        return self.inner((1 - e if self.invert else e).expand(-1, 3, -1, -1))


# ---------------------------------------------------------------------------------------------------------- ensemble
@dataclass(frozen=True)
class Criteria:
    """When a member counts as fooled (the paper gives no thresholds: ours, as parameters).

    lose:  top-1 label not in the class group and ``P(c) < class_below``;
    type1: lose, and the member's max probability ``< uncertain_below``;
    type2: lose, and the label the members agree on (:meth:`Ensemble.agreed_label`) ``>= confident_above``;
    become: top-1 label in the target group.  A failure needs every member fooled.
    """

    class_below: float = 0.5
    uncertain_below: float = 0.5
    confident_above: float = 0.5


class Ensemble(nn.Module):
    """The surrogate: members (classifiers with their own preprocessing, plus edge members) and label groups."""

    def __init__(self, members: Sequence[Member], groups: Mapping[str, Sequence[str]] | None = None,
                 criteria: Criteria = Criteria()):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        for i, m in enumerate(members):
            if not callable(m) or not getattr(m, "labels", None):
                raise TypeError(f"member {i} ({type(m).__name__}) must be callable and have non-empty .labels")
        self.members = list(members)
        self._modules_list = nn.ModuleList([m for m in members if isinstance(m, nn.Module)])
        self.groups = {k.lower(): tuple(v) for k, v in (groups or {}).items()}
        self.criteria = criteria
        self._shared: dict[str, tuple[list[str], list[torch.Tensor]]] = {}

    @property
    def names(self) -> list[str]:
        return [member_name(m, i) for i, m in enumerate(self.members)]

    def indices(self, name: str) -> list[list[int]]:
        """For each member, the label indices that class ``name`` stands for (exact label, or a group)."""
        key = name.strip().lower()
        out = []
        for m, mname in zip(self.members, self.names):
            labels = [str(l).lower() for l in m.labels]
            wanted = self.groups.get(key, (key,))
            idx = [i for i, l in enumerate(labels) if l in {w.lower() for w in wanted}]
            if not idx:
                names = sorted(set(labels) | set(self.groups))
                near = [l for l in names if re.search(rf"\b{re.escape(key)}\b", l)][:5]  # "crane" → "crane (bird)"
                close = difflib.get_close_matches(key, names, n=5, cutoff=0.5)
                near += [l for l in close if l not in near][: 5 - len(near)]
                if near:
                    hint = f"; near matches: {', '.join(repr(n) for n in near)}"
                elif len(labels) <= 50:
                    hint = f"; its labels: {', '.join(labels)}"
                else:
                    hint = (f"; no near match (first labels: {', '.join(labels[:8])}, …)"
                            + (f"; groups: {', '.join(sorted(self.groups)[:20])}" if self.groups else ""))
                raise UnknownClassError(f"class {name!r} is not a label of member {mname!r}"
                                        f" ({len(labels)} labels) nor a group{hint}")
            out.append(idx)
        return out

    def check_distinct(self, source: str, target: str) -> None:
        """``ValueError`` when ``target`` names the source class, or shares a label with it for some member (an
        ImageNet "tabby" inside the "cat" group): such a target is reached without leaving the source."""
        if source.strip().lower() == target.strip().lower():
            raise ValueError(f"target {target!r} equals the source class: choose a different target")
        for name, src, tgt, m in zip(self.names, self.indices(source), self.indices(target), self.members):
            shared = sorted(set(src) & set(tgt))
            if shared:
                raise ValueError(f"target {target!r} overlaps the source class {source!r} for member {name!r} (shared "
                                 f"labels: {', '.join(str(m.labels[i]) for i in shared[:5])}); choose a target "
                                 "outside the source's group")

    def _shared_names(self, cls: str) -> tuple[list[str], list[torch.Tensor]]:
        """Label names every member has, outside ``cls``'s group, and per member a (n_labels, K) 0/1 matrix that sums
        its probabilities per name (a name may label several classes, e.g. ImageNet's two "crane"s)."""
        key = cls.strip().lower()
        if key not in self._shared:
            c_idx = self.indices(cls)
            lower = [[str(l).lower() for l in m.labels] for m in self.members]
            excluded = {lab[i] for lab, idx in zip(lower, c_idx) for i in idx}
            names = sorted(set.intersection(*(set(lab) for lab in lower)) - excluded)
            pos = {n: k for k, n in enumerate(names)}
            mats = []
            for lab in lower:
                a = torch.zeros(len(lab), len(names))
                for i, n in enumerate(lab):
                    if n in pos:
                        a[i, pos[n]] = 1.0
                mats.append(a)
            self._shared[key] = (names, mats)
        return self._shared[key]

    def _agreed(self, probs: Sequence[torch.Tensor], cls: str) -> tuple[list[str], torch.Tensor, list[torch.Tensor]] | None:
        """(shared names, per-image index of the agreed name, per-member probability of it), or None without shared
        names."""
        names, mats = self._shared_names(cls)
        if not names:
            return None
        per_name = [p @ a.to(p) for p, a in zip(probs, mats)]
        star = torch.stack(per_name).sum(0).argmax(-1)
        return names, star, [q.gather(1, star[:, None]).squeeze(1) for q in per_name]

    @torch.no_grad()
    def agreed_label(self, probs: Sequence[torch.Tensor], cls: str) -> list[str | None]:
        """Per image, the label (outside ``cls``'s group, a name every member has) with the largest summed
        probability over the members: what a type-2 failure must show to all of them (None: no shared names)."""
        agreed = self._agreed(probs, cls)
        if agreed is None:
            return [None] * probs[0].shape[0]
        names, star, _ = agreed
        return [names[int(i)] for i in star]

    def probs(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Softmax probabilities of every member, each (B, n_labels), differentiable."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
        out = []
        for m, name in zip(self.members, self.names):
            logits = m(images)
            if logits.shape != (images.shape[0], len(m.labels)):
                raise ValueError(f"member {name!r} returned logits {tuple(logits.shape)}, expected "
                                 f"({images.shape[0]}, {len(m.labels)})")
            out.append(logits.float().softmax(-1))
        return out

    def loss(self, probs: Sequence[torch.Tensor], cls: str, goal: Goal = "lose", target: str | None = None
             ) -> torch.Tensor:
        """Per-image surrogate loss (B,), summed over members (formulas in the module docstring)."""
        if goal not in GOALS:
            raise ValueError(f"unknown goal {goal!r}; choose one of {', '.join(GOALS)}")
        if goal == "become":
            if target is None:
                raise ValueError("goal 'become' needs a target class")
            self.check_distinct(cls, target)
            tgt = self.indices(target)
        c_idx = self.indices(cls)
        agreed = self._agreed(probs, cls) if goal == "other" else None
        total = 0.0
        for m, p in enumerate(probs):
            if goal == "lose":
                term = 2 * p[:, c_idx[m]].sum(-1) - 1
            elif goal == "uncertain":  # c as one label: spreading c over its group's labels is no loss of c
                term = 2 * torch.maximum(p[:, c_idx[m]].sum(-1), _max_other(p, c_idx[m])) - 1
            elif goal == "other":
                other = agreed[2][m] if agreed is not None else _max_other(p, c_idx[m])
                term = ((2 * p[:, c_idx[m]].sum(-1) - 1) + (1 - 2 * other)) / 2
            else:
                term = 1 - 2 * p[:, tgt[m]].sum(-1)
            total = total + term
        return total

    @torch.no_grad()
    def judge(self, probs: Sequence[torch.Tensor], cls: str, verdict: Verdict = "lose", target: str | None = None
              ) -> torch.Tensor:
        """Bool (B,): every member fooled in the sense of ``verdict`` (see :class:`Criteria`)."""
        if verdict not in VERDICTS:
            raise ValueError(f"unknown verdict {verdict!r}; choose one of {', '.join(VERDICTS)}")
        if verdict == "become":
            if target is None:
                raise ValueError("verdict 'become' needs a target class")
            self.check_distinct(cls, target)
            tgt = self.indices(target)
            return torch.stack([_in(p.argmax(-1), tgt[m]) for m, p in enumerate(probs)]).all(0)
        c_idx, k = self.indices(cls), self.criteria
        agreed = self._agreed(probs, cls) if verdict == "type2" else None
        ok = []
        for m, p in enumerate(probs):
            lost = ~_in(p.argmax(-1), c_idx[m]) & (p[:, c_idx[m]].sum(-1) < k.class_below)
            if verdict == "type1":
                lost &= p.max(-1).values < k.uncertain_below
            elif verdict == "type2":
                lost &= (agreed[2][m] if agreed is not None else _max_other(p, c_idx[m])) >= k.confident_above
            ok.append(lost)
        return torch.stack(ok).all(0)

    def class_prob(self, probs: Sequence[torch.Tensor], name: str) -> torch.Tensor:
        """P(``name``) per image (B,): each member's probability of the labels ``name`` stands for
        (:meth:`indices`), summed, then the mean over members."""
        return torch.stack([p[:, i].sum(-1) for p, i in zip(probs, self.indices(name))]).mean(0)

    @torch.no_grad()
    def report(self, images: torch.Tensor, cls: str, target: str | None = None):
        """Tidy table, one row per (image, member): P(class), top label and probability, P(target)."""
        import pandas as pd

        probs = self.probs(images)
        c_idx = self.indices(cls)
        t_idx = self.indices(target) if target is not None else None
        rows = []
        for m, (p, name) in enumerate(zip(probs, self.names)):
            top = p.max(-1)
            for b in range(p.shape[0]):
                row = dict(image=b, member=name, p_class=float(p[b, c_idx[m]].sum()),
                           top_label=self.members[m].labels[int(top.indices[b])], top_prob=float(top.values[b]))
                if t_idx is not None:
                    row["p_target"] = float(p[b, t_idx[m]].sum())
                rows.append(row)
        return pd.DataFrame(rows)


def _in(idx: torch.Tensor, allowed: Sequence[int]) -> torch.Tensor:
    return torch.isin(idx, torch.as_tensor(list(allowed), device=idx.device))


def _max_other(p: torch.Tensor, c_idx: Sequence[int]) -> torch.Tensor:
    mask = torch.zeros(p.shape[-1], dtype=torch.bool, device=p.device)
    mask[list(c_idx)] = True
    return p.masked_fill(mask, float("-inf")).max(-1).values

