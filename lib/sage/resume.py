"""Resumable SAGE campaigns: a key hashing everything a result depends on, and atomic table writes.

A campaign writes each finished item (:func:`write_parquet_atomic`, :func:`write_safetensors_atomic`) under a name
that carries :func:`campaign_key`, so a rerun with the same weights and settings loads it, and any other weights or
settings (a retrained classifier with the same name included) start fresh instead of reusing a stale result.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from lib.loading import model_fingerprint, weights_fingerprint


def campaign_key(pipe, ensemble, modules: dict[str, torch.nn.Module] | None = None, **settings) -> str:
    """10 hex digits from the pipeline's and the ensemble's weights, the members, their criteria and groups,
    ``modules`` (e.g. a proposal LM) and ``settings`` (anything JSON-able; dataclasses as dicts)."""
    scorers = {}  # a CLIP member's scorer that is not itself a module holds its models as attributes
    for n, m in zip(ensemble.names, ensemble.members):
        scorer = getattr(m, "scorer", None)
        if scorer is not None and not isinstance(scorer, torch.nn.Module):
            scorers.update({f"{n}.scorer.{k}": v for k, v in vars(scorer).items() if isinstance(v, torch.nn.Module)})
    what = dict(model=model_fingerprint(pipe), members=ensemble.names,
                member_weights=weights_fingerprint({"ensemble": ensemble, **scorers, **(modules or {})},
                                                   non_persistent=True),
                groups=sorted(ensemble.groups.items()), criteria=vars(ensemble.criteria), settings=settings)
    return hashlib.sha1(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:10]


def write_parquet_atomic(df, path: str | Path) -> Path:
    """``df`` to ``path`` through a temporary file and a rename (an interrupted write leaves no partial file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)
    return path


def write_safetensors_atomic(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> Path:
    """``tensors`` (moved to the CPU) and string ``metadata`` to ``path`` through a temporary file and a rename."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: t.detach().cpu().contiguous() for k, t in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path
