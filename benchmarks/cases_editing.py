"""Editing benchmark cases: the time of one DiffQuickFix edit, key/value collection included, and of the baseline.

    python benchmarks/bench.py --cases quickfix_sd14,quickfix_sdxl --size full --device cpu
    python benchmarks/bench.py --cases quickfix_sd14,crossattn_baseline_sd14 --size full --device cuda

``quickfix_*`` builds only the text encoder(s) and tokenizer(s) of the shape twin (the edit touches nothing else), so
the full-size case runs on a laptop CPU in seconds; the paper reports "under a second" for SD v1.4's 768×768
``out_proj``. ``crossattn_baseline_sd14`` needs the whole twin (the UNet's 32 cross-attention projections).
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib.editing import cross_attention_baseline, quickfix  # noqa: E402
from lib.tokenizer import build_clip_tokenizer  # noqa: E402

ANCHORS = ["van gogh", "snoopy"]
TARGETS = ["painting", "dog"]


def text_only_twin(family: str, size: str, device, dtype):
    """The tokenizer(s) and randomly initialised text encoder(s) of a shape twin, as a pipeline-like namespace."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from lib.twins import _TEXT, _check

    _check(family, size)
    parts = {}
    for i, spec in enumerate(_TEXT[family]):
        torch.manual_seed(2 + i)  # as lib.twins.build_twin
        cls = CLIPTextModelWithProjection if spec.projection else CLIPTextModel
        suffix = "" if i == 0 else f"_{i + 1}"
        parts[f"text_encoder{suffix}"] = cls(spec.config(size == "tiny")).to(device, dtype).eval()
        parts[f"tokenizer{suffix}"] = build_clip_tokenizer(**({} if i == 0 else {"pad_token": "!"}))
    return SimpleNamespace(name_or_path=f"twin:{family}:{size} (text encoders only)", **parts)


def _quickfix(family: str):
    def build(ctx):
        key = f"text-only:{family}"
        if key not in ctx._pipes:
            ctx._pipes[key] = text_only_twin(family, ctx.size, ctx.device, ctx.dtype)
        pipe = ctx._pipes[key]
        edit = quickfix(pipe, ANCHORS, TARGETS, layer=0)

        def run():
            return quickfix(pipe, ANCHORS, TARGETS, layer=0)

        shapes = {k: tuple(v.shape) for k, v in edit.deltas.items()}
        n_keys = {k: v["n_keys"] for k, v in edit.meta["solve"].items()}
        return run, dict(family=family, pairs=len(ANCHORS), templates=4, layer=0, lam=0.01), dict(
            weights=shapes, n_keys=n_keys, delta_bytes=edit.nbytes)

    return build


def _baseline(ctx):
    pipe = ctx.pipe("sd-v1")
    edit = cross_attention_baseline(pipe, ANCHORS, TARGETS)

    def run():
        return cross_attention_baseline(pipe, ANCHORS, TARGETS)

    return run, dict(family="sd-v1", pairs=len(ANCHORS), templates=4, lam=0.1), dict(
        weights=len(edit.deltas), delta_bytes=edit.nbytes)


CASES = {
    "quickfix_sd14": _quickfix("sd-v1"),
    "quickfix_sd21": _quickfix("sd-v2"),
    "quickfix_sdxl": _quickfix("sdxl"),
    "crossattn_baseline_sd14": _baseline,
}
