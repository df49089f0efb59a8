"""Candidate layers for causal tracing, found by module type so that SD v1, v2 and XL share one rule.

UNet: every ``ResnetBlock2D`` and the ``attn1`` (self-attention), ``attn2`` (cross-attention) and ``ff`` of every
``BasicTransformerBlock`` (SD v1/v2: 22 + 16 × 3 = 70; SDXL: 17 + 70 × 3 = 227), in forward order. By default
SDXL's last resnet is left out (226): only the output convolution follows it, so its restoration is the clean run by
construction (:func:`restores_the_output`); it is traced when named.
Text encoders: per encoder (``text_encoder``, and ``text_encoder_2`` on SDXL) and per layer ``i`` of
``encoder.layers`` (``text_model.encoder.layers`` in ``CLIPTextModelWithProjection``): the layer's output hidden
state, its ``self_attn`` output and its ``mlp`` output.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Iterable, Literal, Sequence

import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.resnet import ResnetBlock2D

UnetKind = Literal["resnet", "attn1", "attn2", "ff"]
TextKind = Literal["hidden", "self_attn", "mlp"]
UNET_KINDS: tuple[str, ...] = ("resnet", "attn1", "attn2", "ff")
TEXT_KINDS: tuple[str, ...] = ("hidden", "self_attn", "mlp")


class LayerError(KeyError):
    """An unknown layer (or text-encoder) name; the message lists close matches, then every valid name."""

    def __str__(self) -> str:  # KeyError would print the message with quotes
        return str(self.args[0])


def unet_layers(unet: torch.nn.Module) -> list[str]:
    """Names of the UNet's candidate layers, in forward order (resnets, then each block's attn1, attn2, ff)."""
    names = [n for n, m in unet.named_modules() if isinstance(m, ResnetBlock2D)]
    for n, m in unet.named_modules():
        if isinstance(m, BasicTransformerBlock):
            names += [f"{n}.{sub}" for sub in ("attn1", "attn2", "ff") if getattr(m, sub, None) is not None]
    return sorted(names, key=_forward_key)


def restores_the_output(unet: torch.nn.Module) -> list[str]:
    """Candidate layers after which only the output convolution runs (no attention, no resnet: SDXL's time embedding
    carries its pooled text into every resnet), so that restoring one at every step gives the clean run by
    construction: SDXL's ``up_blocks.2.resnets.2``. None on SD 1.x / 2.x, whose last layer is a transformer block's
    ``ff``, added to a residual that carries the corruption."""
    last = len(unet.up_blocks) - 1
    block = unet.up_blocks[last]
    if getattr(block, "attentions", None) or getattr(block, "upsamplers", None) or not len(block.resnets):
        return []
    return [f"up_blocks.{last}.resnets.{len(block.resnets) - 1}"]


def unet_layers_of(config: dict) -> list[str]:
    """:func:`unet_layers` of the UNet that ``config`` describes, built without weights (meta tensors, well under a
    second even for SDXL): layer names are checked before a pipeline loads."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        return unet_layers(UNet2DConditionModel.from_config(config))


def check_before_load(model: str, unet: Sequence[str] | None = None, text: Sequence[int] | None = None) -> None:
    """``LayerError`` when ``unet`` layer names or ``text`` layer indices are not in ``model``, read from its configs
    before its weights load (a model whose configs are not at hand is checked when its sweep starts)."""
    from lib.loading import component_config, text_depths

    if unet:
        config = component_config(model, "unet")
        if config is not None:
            check_names(list(unet), unet_layers_of(config), "UNet layer")
    if text:
        depths = text_depths(model)
        if depths:
            check_text_layers(text, depths)


def unet_kind(name: str) -> str:
    """``resnet``, ``attn1``, ``attn2`` or ``ff`` for a UNet candidate-layer name."""
    last = name.rsplit(".", 1)[-1]
    return last if last in ("attn1", "attn2", "ff") else "resnet"


_PART = re.compile(r"(down_blocks|mid_block|up_blocks)(?:\.(\d+))?\.(resnets|attentions)\.(\d+)"
                   r"(?:\.transformer_blocks\.(\d+)\.(attn1|attn2|ff))?$")
_GROUP = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
_SUB = {"attn1": 0, "attn2": 1, "ff": 2}


def _forward_key(name: str) -> tuple:
    """Forward order inside the UNet: down < mid < up; within a block resnet j before attention j."""
    m = _PART.match(name)
    if m is None:  # unknown layout: keep it after the known ones, by name
        return (9, name)
    group, block, part, j, t, sub = m.groups()
    return (_GROUP[group], int(block or 0), int(j), part == "attentions", int(t or 0), _SUB.get(sub or "", -1))


def resolve_unet_layers(unet: torch.nn.Module, names: Iterable[str] | None = None,
                        kinds: Sequence[str] | None = None) -> list[str]:
    """Validate ``names`` (default: every candidate but those whose restoration is the clean run by construction,
    :func:`restores_the_output`), optionally keep only ``kinds``; unknown names raise ``LayerError``."""
    valid = unet_layers(unet)
    if names is None:
        trivial = set(restores_the_output(unet))
        chosen = [n for n in valid if n not in trivial]
    else:
        chosen = list(names)
        check_names(chosen, valid, "UNet layer")
    if kinds is not None:
        bad = sorted(set(kinds) - set(UNET_KINDS))
        if bad:
            raise LayerError(f"unknown UNet layer kind(s) {bad}; choose from {list(UNET_KINDS)}")
        chosen = [n for n in chosen if unet_kind(n) in kinds]
    return chosen


def check_names(names: Sequence[str], valid: Sequence[str], what: str) -> None:
    """Raise ``LayerError`` for the first name not in ``valid`` (``what``: the kind of name, e.g. ``"UNet layer"``):
    close matches first, then every valid name."""
    known = set(valid)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, valid, n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise LayerError(f"unknown {what} {name!r}; {hint}valid names ({len(valid)}): {', '.join(valid)}")


@dataclass(frozen=True)
class TextSite:
    """One restorable text-encoder state: encoder attribute, layer index, and which output of that layer."""

    encoder: str
    layer: int
    kind: str = "hidden"
    prefix: str = "encoder.layers"  # where the layers live inside the encoder model

    @property
    def module(self) -> str:
        """The module's name inside the encoder (``encoder.layers.3.self_attn``)."""
        base = f"{self.prefix}.{self.layer}"
        return base if self.kind == "hidden" else f"{base}.{self.kind}"

    @property
    def name(self) -> str:
        return f"{self.encoder}.{self.module}"


def encoder_root(model: torch.nn.Module) -> torch.nn.Module:
    """The CLIP text transformer holding ``embeddings`` and ``encoder`` (``model.text_model`` when present)."""
    return getattr(model, "text_model", model)


def layers_prefix(model: torch.nn.Module) -> str:
    return "text_model.encoder.layers" if hasattr(model, "text_model") else "encoder.layers"


def check_text_layers(layers: Sequence[int], depths: dict[str, int]) -> None:
    """``LayerError`` for layer indices that no text encoder has (``depths``: encoder → number of layers)."""
    wrong = sorted({i for i in layers if not any(0 <= i < d for d in depths.values())})
    if wrong:
        have = ", ".join(f"{enc} has layers 0..{d - 1}" for enc, d in depths.items())
        raise LayerError(f"no text encoder has layer(s) {wrong}: {have}")


def text_sites(pipe, encoders: Sequence[str] | None = None, kinds: Sequence[str] = TEXT_KINDS,
               layers: Sequence[int] | None = None) -> list[TextSite]:
    """Candidate text-encoder sites, per encoder, layer, then kind; ``layers`` selects layer indices, each from the
    encoders that have it (SDXL: 12–31 from ``text_encoder_2`` only); a layer no encoder has is a ``LayerError``.

    By default (``layers=None``) a layer whose output never reaches the UNet is left out
    (:func:`lib.sampling.layer_reaches_unet`; SDXL's ``text_encoder`` layer 11: its restoration is the corrupted image
    by construction, a zero that would only pull Otsu's τ down); named in ``layers``, it is traced."""
    from lib.sampling import layer_reaches_unet, text_encoder_names

    present = text_encoder_names(pipe)
    encoders = present if encoders is None else list(encoders)
    check_names(encoders, present, "text encoder")
    bad = sorted(set(kinds) - set(TEXT_KINDS))
    if bad:
        raise LayerError(f"unknown text-encoder site kind(s) {bad}; choose from {list(TEXT_KINDS)}")
    depths = {enc: getattr(pipe, enc).config.num_hidden_layers for enc in encoders}
    if layers is not None:
        check_text_layers(layers, depths)
    sites = []
    for enc, depth in depths.items():
        idx = ([i for i in range(depth) if layer_reaches_unet(pipe, enc, i)] if layers is None
               else [i for i in layers if 0 <= i < depth])
        sites += [TextSite(enc, i, k, layers_prefix(getattr(pipe, enc))) for i in idx for k in kinds]
    return sites

