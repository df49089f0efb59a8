"""Attribute classifiers for the toy world: three small multi-head members, one of which sees only Canny edges.

Each :class:`AttributeClassifier` maps float images (B, 3, H, W) in [0, 1] to one logit vector per attribute family
(differentiably: SAGE backpropagates through them); its normalisation lives inside ``forward``.  Members::

    resnet     timm resnet10t (channels 24-48-96-192) on RGB
    mobilenet  timm mobilenetv3_small_050 on RGB upsampled to 128×128 (at 64 px its depthwise stages learn objects
               too slowly: held-out object 0.74 against 0.84 at 128 px after 1,500 steps)
    edges      timm resnet10t (channels 24-48-96-192) on Canny edges (thinned magnitude + edge map) of the
               channel-mean grey image: it never sees colour, so it has no "color" head (the edge-based detector of
               SAGE's robust ensemble). An lcnet_050 backbone reached held-out object 0.59 after 1,500 steps, this
               one 0.91.

Labels: ``object`` (a character's generic object included), ``color`` (scored only where the scene names one), and
``style``/``action``/``character``/``background`` with ``"none"`` for absent.

    python -m lib.toy.classifiers --recipe committed --out data/toy/classifiers  # the committed weights (2 stages)
    python -m lib.toy.classifiers --out data/toy/classifiers                      # every member, first stage only
    python -m lib.toy.classifiers --members edges --steps 12000                  # retrain one, keep the others
    python -m lib.toy.classifiers --members edges --steps 4500 --lr 1e-3 --seed 1 --init-from data/toy/classifiers
    python -m lib.toy.classifiers --members mobilenet --init-from data/toy/classifiers --distill-from data/toy/classifiers
                                                     # continue one member, taught by the ensemble's soft labels
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from lib.atomic import write_atomic, write_text_atomic
from lib.paths import TOY_DIR
from lib.speed import cpu_threads
from lib.toy import world as W

NONE = "none"
FAMILIES = ("object", "color", "style", "action", "character", "background")
LABELS: dict[str, tuple[str, ...]] = {
    "object": W.OBJECTS,
    "color": W.COLORS,
    "style": W.STYLES + (NONE,),
    "action": W.ACTIONS + (NONE,),
    "character": W.CHARACTERS + (NONE,),
    "background": W.BACKGROUNDS + (NONE,),
}
MEMBERS: dict[str, dict] = {
    "resnet": {"arch": "resnet10t", "arch_kwargs": {"channels": [24, 48, 96, 192]}, "input": "rgb", "families": FAMILIES},
    "mobilenet": {"arch": "mobilenetv3_small_050", "arch_kwargs": {}, "input": "rgb", "families": FAMILIES, "size": 128},
    "edges": {"arch": "resnet10t", "arch_kwargs": {"channels": [24, 48, 96, 192]}, "input": "edges",
              "families": tuple(f for f in FAMILIES if f != "color")},
}
# Default training steps per member (batch 64): the first stage of the committed weights (from scratch, DEFAULT_LR).
DEFAULT_LR = 3e-3  # peak learning rate (linear warm-up, cosine decay)
DEFAULT_STEPS: dict[str, int] = {"resnet": 4500, "mobilenet": 9000, "edges": 6000}
# The committed weights' second stage: every member continued (fresh optimiser, peak lr 1e-3, cosine decay) on
# 100,000 new renders (seed 1): held-out object accuracy (1,000 renders, seed 10000) resnet 0.975 -> 0.980, mobilenet
# 0.954 -> 0.964, edges 0.964 -> 0.970.
CONTINUATION: dict = {"steps": {"resnet": 3000, "mobilenet": 6000, "edges": 4500}, "lr": 1e-3, "seed": 1}
# Renders to train on (each seen about 3-4 times): with 20,000 the members fit the renders (edges: training loss 0.04)
# and reached held-out object accuracy 0.94-0.96 only.
DEFAULT_N_TRAIN = 100_000
DEFAULT_DIR = TOY_DIR / "classifiers"
CONFIG_NAME = "config.json"
REBUILD = "python -m lib.toy.classifiers --recipe committed --out data/toy/classifiers"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EDGE_MEAN = (0.11, 0.18)  # thinned Canny magnitude, edge map (0 / 0.5 / 1), measured on renders
EDGE_STD = (0.27, 0.37)
DISTILL_T = 2.0  # distillation temperature
CANNY = {"low_threshold": 0.1, "high_threshold": 0.2, "kernel_size": 5, "sigma": 1.0}


class ClassifierLoadError(FileNotFoundError):
    """A classifier file is missing or unreadable; the message names it and the command that rebuilds it."""


def scene_label(scene: W.Scene, family: str) -> str | None:
    """The label ``family`` should predict for ``scene``; None where it is not scored (a scene without a color)."""
    value = getattr(scene, family)
    if value is None:
        return None if family in ("color", "object") else NONE
    return value


def scene_targets(scenes: Sequence[W.Scene], families: Sequence[str] = FAMILIES) -> dict[str, torch.Tensor]:
    """Class indices per family (-1 where not scored), as long tensors of shape (N,)."""
    out = {}
    for f in families:
        labels = [scene_label(s, f) for s in scenes]
        out[f] = torch.tensor([-1 if v is None else LABELS[f].index(v) for v in labels], dtype=torch.long)
    return out


class AttributeClassifier(nn.Module):
    """A timm backbone with one linear head per attribute family; ``forward(images) -> {family: logits}``."""

    def __init__(self, name: str, arch: str, input: str = "rgb", families: Sequence[str] = FAMILIES,
                 arch_kwargs: dict | None = None, size: int = W.SIZE):
        super().__init__()
        import timm

        if input not in ("rgb", "edges"):
            raise ValueError(f"input must be 'rgb' or 'edges', got {input!r}")
        unknown = [f for f in families if f not in LABELS]
        if unknown:
            raise ValueError(f"unknown families {unknown}; known: {FAMILIES}")
        self.name, self.arch, self.input, self.size = name, arch, input, size
        self.families = tuple(families)
        self.arch_kwargs = dict(arch_kwargs or {})
        self.labels: dict[str, tuple[str, ...]] = {f: LABELS[f] for f in self.families}
        in_chans = 3 if input == "rgb" else 2
        self.backbone = timm.create_model(arch, num_classes=0, pretrained=False, in_chans=in_chans, **self.arch_kwargs)
        with torch.no_grad():
            dim = self.backbone.eval()(torch.zeros(2, in_chans, size, size)).shape[-1]
        self.heads = nn.ModuleDict({f: nn.Linear(dim, len(LABELS[f])) for f in self.families})
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if input == "rgb" else (EDGE_MEAN, EDGE_STD)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def config(self) -> dict:
        return {"arch": self.arch, "arch_kwargs": self.arch_kwargs, "input": self.input, "families": list(self.families),
                "labels": {f: list(v) for f, v in self.labels.items()}, "size": self.size}

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] RGB (B, 3, H, W) -> normalised network input at ``size``×``size`` (differentiable)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W) in [0, 1], got {tuple(images.shape)}")
        x = images.to(self.mean.device, torch.float32)
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        if self.input == "edges":
            x = edge_maps(x)
        return (x - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone(self.preprocess(images))
        return {f: head(feats) for f, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> dict[str, list[str]]:
        """Predicted label names per family (eval mode, no gradients)."""
        was_training = self.training
        self.eval()
        out: dict[str, list[str]] = {f: [] for f in self.families}
        for i in range(0, len(images), batch_size):
            logits = self(images[i : i + batch_size])
            for f, v in logits.items():
                out[f] += [self.labels[f][j] for j in v.argmax(-1).tolist()]
        self.train(was_training)
        return out


def edge_maps(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, 2, H, W): Canny's thinned gradient magnitude and edge map of the channel mean.

    The channel mean makes the result invariant to any permutation of the colour channels; gradients flow back to the
    pixels through the magnitude (the edge map is a threshold of it).
    """
    import kornia

    grey = images.mean(1, keepdim=True)
    k, s = CANNY["kernel_size"], CANNY["sigma"]
    mag, edges = kornia.filters.canny(grey, CANNY["low_threshold"], CANNY["high_threshold"], (k, k), (s, s),
                                      hysteresis=False)
    return torch.cat([mag, edges], 1)


def build_member(name: str) -> AttributeClassifier:
    """An untrained member from :data:`MEMBERS`."""
    if name not in MEMBERS:
        raise ValueError(f"unknown member {name!r}; choose from {sorted(MEMBERS)}")
    return AttributeClassifier(name, **MEMBERS[name])


# -------------------------------------------------------------------------------------------------------- save / load
def save_classifiers(members: dict[str, AttributeClassifier], folder: str | Path, extra: dict | None = None) -> Path:
    """Write ``<name>.safetensors`` (fp16) per member and ``config.json`` (architectures, labels, ``extra``); each file
    is written to a temporary name and renamed, so an interrupted save leaves the previous files intact."""
    for name, m in members.items():
        _save_weights(name, m, folder)
    return _write_config(members, folder, extra)


def _save_weights(name: str, member: AttributeClassifier, folder: str | Path) -> None:
    """``<folder>/<name>.safetensors`` (fp16), written to a temporary name and renamed."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: (v.half() if v.is_floating_point() else v).contiguous().cpu() for k, v in member.state_dict().items()}
    write_atomic(folder / f"{name}.safetensors", lambda tmp: save_file(state, str(tmp)))  # a per-writer temp name


def _write_config(members: dict[str, AttributeClassifier], folder: str | Path, extra: dict | None = None,
                  pending: dict[str, dict] | None = None) -> Path:
    """``config.json`` for ``members`` whose weights are in ``folder`` (written atomically: ``lib.atomic``).

    ``pending``: the earlier entries of members a running training has not finished yet (their earlier weights stay
    listed, so an interrupted continuation can go on from them); ``extra["unfinished"]`` names those members, and
    :func:`load_classifiers` refuses the folder until they are trained."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    specs = {**(pending or {}), **{n: {**m.config(), "weights": f"{n}.safetensors"} for n, m in members.items()}}
    config = {"members": {n: specs[n] for n in MEMBERS if n in specs} | {n: s for n, s in specs.items()
                                                                        if n not in MEMBERS},
              "rebuild": REBUILD, **(extra or {})}
    write_text_atomic(json.dumps(config, indent=2) + "\n", folder / CONFIG_NAME)
    return folder


def load_classifiers(folder: str | Path = DEFAULT_DIR, device: str | torch.device = "cpu",
                     allow_unfinished: bool = False) -> dict[str, AttributeClassifier]:
    """The trained members saved in ``folder`` (fp32, eval mode), by name.

    A folder whose training was interrupted (``config.json`` names ``unfinished`` members) is a
    :class:`ClassifierLoadError` naming the command that finishes it: its ensemble is not the one trained.
    ``allow_unfinished`` (training itself: kept and continued members) loads what it lists."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file():
        raise ClassifierLoadError(f"missing classifier config {cfg_path}; rebuild with: {REBUILD}")
    try:
        config = json.loads(cfg_path.read_text())
        specs = config["members"]
        if not (isinstance(specs, dict) and specs and all(isinstance(v, dict) for v in specs.values())):
            raise TypeError("'members' must map each member's name to its settings")
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ClassifierLoadError(f"corrupt classifier config {cfg_path} ({err}); rebuild with: {REBUILD}") from None
    unfinished = config.get("unfinished") or []
    if unfinished and not allow_unfinished:
        raise ClassifierLoadError(f"the training in {folder} was interrupted before {', '.join(unfinished)} finished: "
                                  f"rerun its command with --members {' '.join(unfinished)} (the finished members are "
                                  f"kept), or rebuild all with: {REBUILD}")
    members = {}
    for name, spec in specs.items():
        path = folder / spec.get("weights", f"{name}.safetensors")
        if not path.is_file():
            raise ClassifierLoadError(f"missing classifier weights {path}; rebuild with: {REBUILD}")
        try:
            m = AttributeClassifier(name, spec["arch"], spec["input"], spec["families"], spec.get("arch_kwargs"),
                                    spec.get("size", W.SIZE))
            missing, unexpected = m.load_state_dict(load_file(str(path)), strict=False)
            if missing or unexpected:
                raise ValueError(", ".join(f"{len(keys)} tensor(s) {what} (e.g. {', '.join(keys[:2])})"
                                           for keys, what in ((missing, "missing"), (unexpected, "unexpected")) if keys))
        except (SafetensorError, RuntimeError, KeyError, OSError, ValueError) as err:
            why = " ".join(str(err).split())[:300]  # one line, however long torch's message
            raise ClassifierLoadError(f"corrupt classifier weights {path} ({why}); rebuild with: {REBUILD}") from None
        members[name] = m.to(device).eval()
    return members


def ensemble_log_probs(members: dict[str, AttributeClassifier], images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean log-probabilities per family over the members that have that family (differentiable)."""
    acc: dict[str, list[torch.Tensor]] = {}
    for m in members.values():
        for f, v in m(images).items():
            acc.setdefault(f, []).append(F.log_softmax(v, -1))
    return {f: torch.stack(v).mean(0) for f, v in acc.items()}


class EnsembleClassifier:
    """The classifier members as one predictor: per family, argmax of the mean log-probability over the members that
    have that family (:func:`ensemble_log_probs`).  Quacks like an ``AttributeClassifier``."""

    name = "ensemble"

    def __init__(self, members: Mapping[str, AttributeClassifier]):
        self.members = dict(members)
        have = {f for m in self.members.values() for f in m.families}
        self.families = tuple(f for f in FAMILIES if f in have)
        self.labels = {f: LABELS[f] for f in self.families}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {f: [] for f in self.families}
        for m in self.members.values():
            m.eval()
        for i in range(0, len(images), batch_size):
            lp = ensemble_log_probs(self.members, images[i : i + batch_size])
            for f in self.families:
                out[f] += [self.labels[f][j] for j in lp[f].argmax(-1).tolist()]
        return out


# ------------------------------------------------------------------------------------------------------------ training
@torch.no_grad()
def teacher_log_probs(teacher: dict[str, AttributeClassifier], images: torch.Tensor,
                      batch_size: int = 256) -> dict[str, torch.Tensor]:
    """The ensemble's log-probabilities per family (CPU, fp32) for uint8 renders (N, H, W, 3), in batches."""
    device = next(iter(teacher.values())).mean.device
    out: dict[str, list[torch.Tensor]] = {}
    for i in range(0, len(images), batch_size):
        x = to_tensor(images[i : i + batch_size]).to(device)
        for f, v in ensemble_log_probs(teacher, x).items():
            out.setdefault(f, []).append(v.float().cpu())
    return {f: torch.cat(v) for f, v in out.items()}


def augment(x: torch.Tensor, gen: torch.Generator, p_permute: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Jitter that keeps every label: flip, mild brightness/contrast/saturation, Gaussian blur (half the batch), noise.

    With probability ``p_permute`` an image's colour channels are also permuted (a colour-blind view that breaks
    colour->object shortcuts); the returned mask marks those images, whose colour label no longer holds.
    """
    import kornia

    b = x.shape[0]

    def u(lo, hi):
        return lo + (hi - lo) * torch.rand(b, 1, 1, 1, generator=gen)

    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip.view(b, 1, 1, 1), x.flip(-1), x)
    permuted = torch.rand(b, generator=gen) < p_permute
    if permuted.any():
        perms = torch.tensor([[1, 2, 0], [2, 0, 1], [0, 2, 1], [2, 1, 0], [1, 0, 2]])
        which = perms[torch.randint(len(perms), (int(permuted.sum()),), generator=gen)]
        x[permuted] = torch.gather(x[permuted], 1, which[:, :, None, None].expand(-1, -1, *x.shape[-2:]))
    x = x * u(0.9, 1.1)
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (x - mean) * u(0.9, 1.1) + mean
    grey = x.mean(1, keepdim=True)
    x = (grey + (x - grey) * u(0.85, 1.15)).clamp(0, 1)
    blur = torch.rand(b, generator=gen) < 0.5
    if blur.any():
        sig = 0.4 + 0.9 * torch.rand(int(blur.sum()), generator=gen)
        x[blur] = kornia.filters.gaussian_blur2d(x[blur], (7, 7), torch.stack([sig, sig], 1))
    x = x + u(0.0, 0.03) * torch.randn(x.shape, generator=gen)
    return x.clamp(0, 1), permuted


def to_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) arrays -> float (N, 3, H, W) in [0, 1]; float tensors pass through."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if images.dtype == torch.uint8:
        return images.permute(0, 3, 1, 2).float() / 255.0
    return images


def heldout_accuracy(member: AttributeClassifier, images: torch.Tensor, scenes: Sequence[W.Scene]) -> dict[str, float]:
    """Accuracy per family of one member (scored scenes only)."""
    pred = member.predict(images)
    out = {}
    for f in member.families:
        pairs = [(p, scene_label(s, f)) for p, s in zip(pred[f], scenes) if scene_label(s, f) is not None]
        out[f] = sum(p == t for p, t in pairs) / max(1, len(pairs))
    return out


def train_member(name: str, images: torch.Tensor, targets: dict[str, torch.Tensor], steps: int, seed: int,
                 device: str = "cpu", batch_size: int = 32, lr: float = DEFAULT_LR, p_permute: float = 0.5,
                 val: tuple[torch.Tensor, Sequence[W.Scene]] | None = None, log_every: int = 50,
                 eval_every: int = 0, init: AttributeClassifier | None = None,
                 soft: dict[str, torch.Tensor] | None = None, distill: float = 0.5,
                 temperature: float = DISTILL_T) -> tuple[AttributeClassifier, dict]:
    """AdamW with linear warm-up and cosine decay; the loss is the sum of the per-family cross-entropies.

    ``init``: a trained member to continue from (its weights are copied; the optimiser starts afresh).
    ``soft``: a teacher's log-probabilities per family for every one of ``images`` (:func:`teacher_log_probs`, on the
    un-augmented renders; the augmentations keep every label); the member is distilled from them: per family,
    ``(1 - distill) * CE + distill * T² * KL(teacher_T || member_T)`` (Hinton et al.'s knowledge distillation at
    temperature ``T``); the colour term skips channel-permuted images, whose colour no longer matches the teacher's.
    ``val`` (images, scenes) is only monitored (printed every ``eval_every`` steps), never used for selection.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = build_member(name)
    if init is not None:
        model.load_state_dict(init.state_dict())
    model = model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, i / steps))))
    t0, losses, curve = time.time(), [], []
    for step in range(steps):
        idx = torch.randint(len(images), (batch_size,), generator=gen)
        x, permuted = augment(images[idx].permute(0, 3, 1, 2).float() / 255.0, gen, p_permute)
        x = x.to(device)
        logits = model(x)
        loss = 0.0
        for f in model.families:
            t = targets[f][idx].masked_fill(permuted, -1) if f == "color" else targets[f][idx]
            ce = F.cross_entropy(logits[f], t.to(device), ignore_index=-1)
            if soft is None:
                loss = loss + ce
                continue
            keep = ~permuted.to(device) if f == "color" else torch.ones(len(x), dtype=torch.bool, device=device)
            teach = soft[f][idx].to(device)[keep]
            kl = F.kl_div(F.log_softmax(logits[f][keep] / temperature, -1), F.log_softmax(teach / temperature, -1),
                          log_target=True, reduction="batchmean") if keep.any() else logits[f].sum() * 0
            loss = loss + (1 - distill) * ce + distill * temperature ** 2 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            print(f"[{name}] step {step + 1}/{steps} loss {np.mean(losses[-log_every:]):.4f} "
                  f"{time.time() - t0:.0f}s", file=sys.stderr, flush=True)
        if val is not None and eval_every and ((step + 1) % eval_every == 0 or step + 1 == steps):
            acc = heldout_accuracy(model, *val)
            model.train()
            curve.append({"step": step + 1, **{f: round(a, 4) for f, a in acc.items()}})
            print(f"[{name}] val {curve[-1]}", file=sys.stderr, flush=True)
    info = {"steps": steps, "batch_size": batch_size, "lr": lr, "p_permute": p_permute, "seed": seed,
            "wall_s": round(time.time() - t0, 1), "final_loss": round(float(np.mean(losses[-50:])), 4)}
    if soft is not None:
        info["distill"] = {"weight": distill, "temperature": temperature}
    if curve:
        info["val_curve"] = curve
    return model.eval(), info


def member_steps(steps: int | dict[str, int], members: Sequence[str]) -> dict[str, int]:
    """Training steps of each of ``members``: one count for all, or a dict that overrides :data:`DEFAULT_STEPS`."""
    table = {**DEFAULT_STEPS, **steps} if isinstance(steps, dict) else dict.fromkeys(members, steps)
    out = {n: int(table[n]) for n in members}
    bad = {n: k for n, k in out.items() if k < 1}
    if bad:
        raise ValueError(f"steps must be >= 1 for every member, got {bad}")
    return out


@cpu_threads()  # the thread count it sets is the caller's again afterwards
def train_classifiers(out_dir: str | Path = DEFAULT_DIR, steps: int | dict[str, int] = DEFAULT_STEPS, seed: int = 0,
                      device: str = "cpu", members: Sequence[str] = tuple(MEMBERS), n_train: int = DEFAULT_N_TRAIN,
                      n_eval: int = 1000, batch_size: int = 64, threads: int | None = 1, train_split: str = "any",
                      eval_every: int = 0, lr: float = DEFAULT_LR, init_from: str | Path | None = None,
                      distill_from: str | Path | None = None, distill: float = 0.5) -> dict:
    """Train ``members`` on ``n_train`` renders of ``train_split``, save them, and measure held-out accuracy.

    ``steps``: one count for every member, or a dict per member (:data:`DEFAULT_STEPS` for the others). Members of
    :data:`MEMBERS` not in ``members`` are kept from ``out_dir`` (weights and training record) when it holds them, so
    one member can be retrained alone; every member trains independently from ``seed`` on the same data, so this equals
    one run that trains them all.

    The classifiers are the measuring instrument, not the model under study: by default (``"any"``) they see every
    attribute combination, the held-out ones included (those are held out from the text-to-image model and its CLIP).
    Trained on ``"train"`` only, they fail on exactly the combinations they must judge (a "dog" in "picasso" style).

    The accuracies in ``config.json`` are those of the saved (fp16-rounded) weights on ``n_eval`` renders of
    split="heldout" (every such scene contains a held-out combination). ``eval_every`` > 0 prints the accuracy on 300
    other held-out renders during training (monitoring only).

    ``init_from``: a classifier folder whose trained ``members`` are continued (``steps`` more, peak ``lr``, on the
    renders of ``seed``) instead of trained from scratch; each continued member's record keeps the one it continues
    under ``"continues"``.

    ``distill_from``: a classifier folder whose members, as an ensemble, are the teacher of every trained member
    (:func:`train_member`, weight ``distill``); loaded before anything is saved, so it may be ``out_dir`` itself.
    """
    unknown = sorted(set(members) - set(MEMBERS))
    if unknown:
        raise ValueError(f"unknown members {unknown}; choose from {sorted(MEMBERS)}")
    per_member = member_steps(steps, members)
    if n_train < 1 or n_eval < 1 or batch_size < 1:
        raise ValueError(f"n_train, n_eval and batch_size must be >= 1, got {n_train}, {n_eval}, {batch_size}")
    if threads and str(device) == "cpu":
        torch.set_num_threads(threads)
    t0 = time.time()
    kept, old = {}, {}
    others = [n for n in MEMBERS if n not in members]
    if (Path(out_dir) / CONFIG_NAME).is_file():
        try:
            old = json.loads((Path(out_dir) / CONFIG_NAME).read_text())
            if not (isinstance(old, dict) and isinstance(old.get("members", {}), dict)
                    and all(isinstance(s, dict) for s in old.get("members", {}).values())):
                raise ValueError("'members' must map each member's name to its settings")
        except ValueError as err:  # a corrupt config: a full retrain replaces it, keeping members needs it
            if others:
                raise ClassifierLoadError(f"corrupt classifier config {Path(out_dir) / CONFIG_NAME} ({err}): the kept "
                                          f"members {others} cannot be read; rebuild with: {REBUILD}") from None
            old = {}
    if others and old:
        kept = {n: m for n, m in load_classifiers(out_dir, allow_unfinished=True).items() if n in others}
    # the earlier entries of the members retrained here stay listed until each one finishes (marked unfinished)
    pending = {n: s for n, s in old.get("members", {}).items()
               if n in members and (Path(out_dir) / s.get("weights", f"{n}.safetensors")).is_file()}
    inits: dict[str, AttributeClassifier] = {}
    init_records: dict[str, dict] = {}
    if init_from is not None:
        inits = load_classifiers(init_from, allow_unfinished=True)
        missing = sorted(set(members) - set(inits))
        if missing:
            raise ValueError(f"--init-from {init_from} holds no trained {missing}; it has {sorted(inits)}")
        init_records = json.loads((Path(init_from) / CONFIG_NAME).read_text()).get("training", {})
    teacher = None
    if distill_from is not None:
        if not 0.0 < distill <= 1.0:
            raise ValueError(f"distill must be in (0, 1], got {distill}")
        teacher = load_classifiers(distill_from, device)
        teacher_record = {"folder_members": sorted(teacher), "heldout_accuracy": json.loads(
            (Path(distill_from) / CONFIG_NAME).read_text()).get("heldout_accuracy", {})}
    arr, scenes, _ = W.make_dataset(n_train, seed, train_split)
    images, targets = torch.from_numpy(arr), scene_targets(scenes)
    ev_arr, ev_scenes, _ = W.make_dataset(n_eval, seed + 10_000, "heldout")
    val = None
    if eval_every:
        val_arr, val_scenes, _ = W.make_dataset(300, seed + 20_000, "heldout")
        val = (to_tensor(val_arr), val_scenes)
    print(f"rendered {n_train} train + {n_eval} held-out images in {time.time() - t0:.0f}s", file=sys.stderr)
    soft = None
    if teacher is not None:
        soft = teacher_log_probs(teacher, images)
        print(f"teacher log-probabilities of {n_train} renders at {time.time() - t0:.0f}s", file=sys.stderr)
    trained = dict(kept)
    training = {n: {**({"hardware": old["hardware"]} if "hardware" in old else {}), **old.get("training", {}).get(n, {})}
                for n in kept}
    data = {"n_train": n_train, "train_seed": seed, "train_split": train_split, "n_eval": n_eval,
            "eval_seed": seed + 10_000, "eval_split": "heldout"}

    def ordered(d: dict) -> dict:
        return {n: d[n] for n in MEMBERS if n in d}

    def write_config(remaining: list[str]) -> None:
        waiting = {n: s for n, s in pending.items() if n in remaining}  # earlier entries and records, kept listed
        records = ordered({**{n: old.get("training", {}).get(n, {}) for n in waiting}, **training})
        _write_config(ordered(trained), out_dir, {"data": data, "training": records,
                                                  **({"unfinished": remaining} if remaining else {})}, pending=waiting)

    write_config(list(members))  # before any weight is replaced: a kill between a member's weights and the config
    # write left the old config over a mixed ensemble, loaded without a word
    for name in members:
        trained[name], training[name] = train_member(name, images, targets, per_member[name], seed, device, batch_size,
                                                     lr, val=val, eval_every=eval_every, init=inits.get(name),
                                                     soft=soft, distill=distill)
        training[name]["n_train"] = n_train
        training[name]["hardware"] = {"device": str(device), "threads": torch.get_num_threads(),
                                      "torch": torch.__version__, "machine": platform.machine()}
        if name in inits:
            training[name]["continues"] = init_records.get(name, {})
        if teacher is not None:
            training[name]["distill"]["teacher"] = teacher_record
        # every finished member is saved at once (a later crash loses nothing; rerun with the remaining --members);
        # the kept members' weights are already in out_dir
        _save_weights(name, trained[name], out_dir)
        write_config([n for n in members if n not in trained])
    meta = {"data": data, "training": ordered(training)}
    loaded = load_classifiers(out_dir, device)
    ev = to_tensor(ev_arr)
    meta["heldout_accuracy"] = {n: {f: round(a, 4) for f, a in heldout_accuracy(m, ev, ev_scenes).items()}
                                for n, m in loaded.items()}
    meta["wall_s_this_run"] = round(time.time() - t0, 1)
    _write_config(ordered(trained), out_dir, meta)
    return meta


def rebuild_committed(out_dir: str | Path = DEFAULT_DIR, device: str = "cpu", threads: int | None = 1,
                      smoke_steps: int | None = None, **kwargs) -> dict:
    """The committed recipe: every member from scratch (:data:`DEFAULT_STEPS`), then continued (:data:`CONTINUATION`).

    ``smoke_steps``: that many steps in both stages (a test of the path, not the recipe); ``kwargs`` go to both
    :func:`train_classifiers` calls (``n_train``, ``n_eval``, ``batch_size``: tests only).
    """
    steps = smoke_steps or DEFAULT_STEPS
    train_classifiers(out_dir, steps, 0, device, tuple(MEMBERS), threads=threads, **kwargs)
    cont = CONTINUATION
    return train_classifiers(out_dir, smoke_steps or cont["steps"], cont["seed"], device, tuple(cont["steps"]),
                             threads=threads, lr=cont["lr"], init_from=out_dir, **kwargs)


def _parse_steps(values: Sequence[str]) -> int | dict[str, int]:
    """``--steps 5000`` (every member) or ``--steps mobilenet=9000 edges=12000``."""
    if len(values) == 1 and "=" not in values[0]:
        return int(values[0])
    out = {}
    for v in values:
        name, _, n = v.partition("=")
        if name not in MEMBERS or not n.isdigit():
            raise SystemExit(f"--steps: expected an integer or MEMBER=INT with MEMBER in {sorted(MEMBERS)}, got {v!r}")
        out[name] = int(n)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(DEFAULT_DIR))
    ap.add_argument("--recipe", choices=("committed",), default=None,
                    help="rebuild the committed weights: both stages (DEFAULT_STEPS, then CONTINUATION)")
    ap.add_argument("--steps", nargs="+", default=[],
                    help=f"an integer for every member, or MEMBER=INT pairs (default: {DEFAULT_STEPS})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--members", nargs="+", default=list(MEMBERS), choices=list(MEMBERS),
                    help="members to train; the others are kept from --out")
    ap.add_argument("--n-train", type=int, default=DEFAULT_N_TRAIN)
    ap.add_argument("--n-eval", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-every", type=int, default=0, help="print held-out accuracy every N steps (monitoring)")
    ap.add_argument("--lr", type=float, default=DEFAULT_LR, help="peak learning rate (linear warm-up, cosine decay)")
    ap.add_argument("--init-from", default=None,
                    help="continue the --members saved in this classifier folder instead of training from scratch")
    ap.add_argument("--distill-from", default=None,
                    help="distil the --members from the ensemble of the classifiers saved in this folder")
    ap.add_argument("--distill", type=float, default=0.5, help="weight of the distillation term (0, 1]")
    ap.add_argument("--train-split", choices=("any", "train"), default="any",
                    help="renders to train on: every combination (default) or the T2I model's training split only")
    a = ap.parse_args(argv)
    if a.recipe and (a.steps or a.init_from or a.distill_from or a.lr != DEFAULT_LR or a.seed
                     or a.members != list(MEMBERS)):
        ap.error("--recipe committed fixes members, steps, lr, seeds and initialisation; drop those options")
    if a.recipe == "committed":
        meta = rebuild_committed(a.out, a.device, a.threads)
    else:
        meta = train_classifiers(a.out, _parse_steps(a.steps), a.seed, a.device, a.members, a.n_train, a.n_eval,
                                 a.batch_size, a.threads, a.train_split, a.eval_every, a.lr, a.init_from,
                                 a.distill_from, a.distill)
    print(json.dumps({"heldout_accuracy": meta["heldout_accuracy"], "training": meta["training"],
                      "wall_s_this_run": meta["wall_s_this_run"]}, indent=2))


if __name__ == "__main__":
    main()
