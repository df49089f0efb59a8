"""Resumable SAGE campaigns: a key hashing everything a result depends on.

A campaign writes each finished item (:mod:`lib.atomic`'s ``write_parquet_atomic`` and ``write_safetensors_atomic``:
a unique temporary file, fsynced, then renamed; ``remove_stale_tmp`` clears a killed writer's) under a name that
carries :func:`campaign_key`, so a rerun with the same weights and settings loads it, and any other weights or settings
(a retrained classifier with the same name included) start fresh instead of reusing a stale result.
"""

from __future__ import annotations

import hashlib
import json

import torch

from lib.loading import model_fingerprint, weights_fingerprint
from lib.sampling import scheduler_settings


def weights_part(pipe, ensemble, modules: dict[str, torch.nn.Module] | None = None) -> dict[str, str]:
    """The weights fingerprints :func:`campaign_key` hashes: the pipeline's, and the ensemble's with its scorers'
    models and ``modules``. Hashing every weight takes a while for a full-size model on a CPU (seconds), so a loop
    that keys many batches of one campaign computes them once and passes them to each :func:`campaign_key`."""
    scorers = {}  # a CLIP member's scorer that is not itself a module holds its models as attributes
    for n, m in zip(ensemble.names, ensemble.members):
        scorer = getattr(m, "scorer", None)
        if scorer is not None and not isinstance(scorer, torch.nn.Module):
            scorers.update({f"{n}.scorer.{k}": v for k, v in vars(scorer).items() if isinstance(v, torch.nn.Module)})
    return dict(model=model_fingerprint(pipe),
                member_weights=weights_fingerprint({"ensemble": ensemble, **scorers, **(modules or {})},
                                                   non_persistent=True))


def campaign_key(pipe, ensemble, modules: dict[str, torch.nn.Module] | None = None,
                 weights: dict[str, str] | None = None, **settings) -> str:
    """10 hex digits from the pipeline's and the ensemble's weights (``weights``: :func:`weights_part` of the same,
    unchanged, pipeline, ensemble and ``modules``, computed earlier), the pipeline's scheduler config, the members,
    their non-weight settings (:func:`member_settings`), criteria and groups, ``modules`` (e.g. a proposal LM) and
    ``settings`` (anything JSON-able; dataclasses as dicts)."""
    what = dict(**(weights if weights is not None else weights_part(pipe, ensemble, modules)),
                scheduler=scheduler_settings(pipe), members=ensemble.names,
                member_settings=[member_settings(m) for m in ensemble.members],
                groups=sorted(ensemble.groups.items()), criteria=vars(ensemble.criteria), settings=settings)
    return hashlib.sha1(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:10]


_SCALARS = (bool, int, float, str)
_SKIP = frozenset({"training"})  # module state, not a setting


def member_settings(member, _depth: int = 0) -> dict:
    """A member's settings that are not weights: its ``config()`` when it has one, else its public attributes that
    are scalars (or tuples/lists of scalars, e.g. labels), recursing into wrapped members and scorers (an
    :class:`~lib.sage.loss.EdgeMember`'s ``inner``, a :class:`~lib.sage.loss.ClipMember`'s ``scorer``)."""
    config = getattr(member, "config", None)
    if callable(config) and not isinstance(config, torch.nn.Module):
        return dict(config())
    attrs = dict(getattr(member, "__dict__", {}))
    if isinstance(member, torch.nn.Module):
        attrs.update(member._modules)  # submodules live there, not in vars()
    attrs = {k: v for k, v in attrs.items() if not k.startswith("_") and k not in _SKIP}
    out: dict = {"type": type(member).__name__}
    for k, v in sorted(attrs.items()):
        if isinstance(v, _SCALARS) or v is None:
            out[k] = v
        elif isinstance(v, (tuple, list)) and all(isinstance(x, _SCALARS) for x in v):
            out[k] = list(v)
        elif _depth < 4 and _is_part(v):
            out[k] = member_settings(v, _depth + 1)
    return out


def _is_part(value) -> bool:
    """A wrapped member (callable with ``labels``) or a scorer (has ``image_features``): its settings count too."""
    return (callable(value) and hasattr(value, "labels")) or hasattr(value, "image_features")


