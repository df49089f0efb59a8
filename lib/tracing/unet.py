"""UNet restoration: the clean, corrupted and K restored runs in one batched denoising loop.

Batch layout of one loop (``lib.sampling.predict_noise`` stacks the unconditional half first)::

    element   0      1          2 … B-1
    run       clean  corrupted  restored (each restores a set of layers, usually one)
    UNet rows [u_0 … u_{B-1} | c_0 … c_{B-1}]   (u: unconditional half, c: conditional half)

All elements start from the same seed's latent. A forward hook on each restored layer copies the clean element's
output into the rows of the elements that restore it, at every UNet call, i.e. at every denoising step.

CFG choice (``uncond``): the unconditional *prompt* is not corrupted, but the unconditional *activations* of the
clean and the corrupted runs still differ after the first step, because their latents diverge. The default
``uncond="restore"`` copies the clean element's output into both halves (rows ``j`` ← ``0`` and ``B+j`` ← ``B``):
the restored run is then exactly "the corrupted run with that layer's output replaced by the clean run's output in
every UNet evaluation", which is what a cache-and-replace implementation of the paper's definition does on the
pipeline's CFG-batched UNet call. ``uncond="own"`` restores the conditional half only and lets the unconditional
half run on the restored run's own latent (an ablation). Both give the clean image when every layer is restored and
the corrupted image when none is. K layers are split into loops of ``batch_size`` elements; the clean element is
repeated in each loop (it supplies the activations), the corrupted one runs in the first loop only.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Collection, Iterator, Literal, Sequence

import torch

from lib.sampling import Conditioning, decode, denoise, initial_latents
from lib.tracing.corrupt import Corruption, cat_conditionings, encode_pair
from lib.tracing.layers import resolve_unet_layers, unet_kind, unet_layers

Uncond = Literal["restore", "own"]


@dataclass
class Trace:
    """Images of one caption × seed: clean (1, 3, H, W), corrupted (1, 3, H, W), restored (K, 3, H, W), float32 on
    the CPU (a text-encoder trace of SDXL holds ~1,800 images of 1024 px: kept on the GPU they would crowd out the
    next decode; the scorer moves them back in batches).

    ``labels[k]`` names what restored run ``k`` restored; ``nan[k]`` is True when its latent or image holds a NaN/inf
    (``nan_clean``/``nan_corrupted`` likewise for the two references); ``meta[k]`` holds the row fields of run ``k``
    for ``lib.tracing.score`` (component, kind, layer, layer_index, token, token_str).
    """

    labels: list[str]
    clean: torch.Tensor
    corrupted: torch.Tensor
    restored: torch.Tensor
    nan: torch.Tensor
    nan_clean: bool = False
    nan_corrupted: bool = False
    meta: list[dict] = field(default_factory=list)


def nonfinite(lat: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
    return ~(torch.isfinite(lat.flatten(1)).all(1) & torch.isfinite(img.flatten(1)).all(1)).cpu()


@contextmanager
def _copy_rows(unet: torch.nn.Module, plan: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    """For each layer name: ``out[dst] = out[src]`` on its output (batch rows), via forward hooks. The row indices
    move to the UNet's device once, here: a compiled UNet then sees no host tensors (which would keep CUDA graphs off)."""
    modules = dict(unet.named_modules())
    first = next(unet.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    handles = []

    def make(dst: torch.Tensor, src: torch.Tensor):
        def hook(module, args, out):
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"{type(module).__name__} returned {type(out).__name__}; expected a tensor")
            d, s = (dst, src) if dst.device == out.device else (dst.to(out.device), src.to(out.device))  # offload
            return out.index_copy(0, d, out.index_select(0, s))

        return hook

    try:
        for name, (dst, src) in plan.items():
            hook = make(dst.to(device), src.to(device))
            handles.append(modules[name].register_forward_hook(hook, prepend=True))
        yield
    finally:
        for h in handles:
            h.remove()


def restoration_plan(sets: Sequence[Collection[str] | None], uncond: Uncond = "restore") -> dict:
    """Hook plan for one loop whose element ``j`` restores ``sets[j]`` (``None``: clean source or unrestored).

    Element 0 must be the clean run (``sets[0] is None``). Returns ``{layer: (dst_rows, src_rows)}`` in UNet rows.
    """
    if uncond not in ("restore", "own"):
        raise ValueError(f"uncond must be 'restore' or 'own', got {uncond!r}")
    if sets[0]:
        raise ValueError("element 0 is the clean source and cannot restore anything")
    b = len(sets)
    plan: dict[str, tuple[list[int], list[int]]] = {}
    for j, layers in enumerate(sets):
        for name in layers or ():
            dst, src = plan.setdefault(name, ([], []))
            dst.append(b + j)
            src.append(b)
            if uncond == "restore":
                dst.append(j)
                src.append(0)
    return {k: (torch.tensor(d), torch.tensor(s)) for k, (d, s) in plan.items()}


@torch.no_grad()
def restore_sets(pipe, clean: Conditioning, corrupted: Conditioning, latent: torch.Tensor,
                 sets: Sequence[Collection[str]], steps: int = 25, guidance: float = 7.5, batch_size: int = 16,
                 uncond: Uncond = "restore", labels: Sequence[str] | None = None) -> Trace:
    """Batched restoration: restored run ``k`` takes the clean run's outputs of every layer in ``sets[k]``.

    ``clean``/``corrupted``: one-row conditionings; ``latent``: one initial latent (1, C, h, w). ``batch_size`` is
    the number of images per loop (the UNet sees twice as many rows under CFG); it must be at least 2.
    """
    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 (clean + one more run), got {batch_size}")
    if len(clean) != 1 or len(corrupted) != 1 or latent.shape[0] != 1:
        raise ValueError("restore_sets traces one caption × one seed: pass one-row conditionings and one latent")
    sets = [frozenset(s) for s in sets]
    both = cat_conditionings([clean, corrupted])
    imgs, flags, ref_imgs, ref_flags = [], [], None, None
    k, first = 0, True
    while first or k < len(sets):
        take = batch_size - (2 if first else 1)
        chunk = sets[k : k + take]
        elems: list = [None, None] + list(chunk) if first else [None] + list(chunk)
        rows = [0, 1] + [1] * len(chunk) if first else [0] + [1] * len(chunk)
        cond = both.select(rows)
        with _copy_rows(pipe.unet, restoration_plan(elems, uncond)):
            lat = denoise(pipe, latent.expand(len(rows), -1, -1, -1), cond, steps, guidance)
        img = decode(pipe, lat, keep_nonfinite=True)
        bad = nonfinite(lat, img)
        img = img.cpu()
        start = 2 if first else 1
        if first:
            ref_imgs, ref_flags = img[:2], bad[:2]
        imgs.append(img[start:])
        flags.append(bad[start:])
        k += len(chunk)
        first = False
    restored = torch.cat(imgs)
    return Trace(list(labels) if labels is not None else ["+".join(sorted(s)) or "none" for s in sets],
                 ref_imgs[:1], ref_imgs[1:2], restored, torch.cat(flags), bool(ref_flags[0]), bool(ref_flags[1]))


def _prepare(pipe, caption: str, subject: str, seed: int, corruption: Corruption, negative: str | None):
    """Clean and corrupted conditionings (the noise keyed by ``seed``: ``Corruption.at``) and the seed's latent."""
    clean, bad = encode_pair(pipe, caption, subject, corruption.at(seed), negative)
    return clean, bad, initial_latents(pipe, [seed])


def trace_unet(pipe, caption: str, subject: str, seed: int, layers: Sequence[str] | None = None, *,
               steps: int = 25, guidance: float = 7.5, corruption: Corruption = Corruption(),
               batch_size: int = 16, uncond: Uncond = "restore", negative: str | None = None) -> Trace:
    """Trace every UNet candidate layer (or ``layers``) for one caption × seed, batched; one restored run per layer.

    The subject noise is ``corruption.at(seed)``'s: drawn for this caption, subject and latent seed."""
    names = resolve_unet_layers(pipe.unet, layers)
    clean, bad, lat = _prepare(pipe, caption, subject, seed, corruption, negative)
    trace = restore_sets(pipe, clean, bad, lat, [{n} for n in names], steps, guidance, batch_size, uncond, names)
    trace.meta = unet_meta(pipe, names)
    return trace


def unet_meta(pipe, names: Sequence[str]) -> list[dict]:
    """Row fields of single-layer UNet restorations (``layer_index``: position in the forward order)."""
    order = {n: i for i, n in enumerate(unet_layers(pipe.unet))}
    return [dict(component="unet", kind=unet_kind(n), layer=n, layer_index=order[n], token=-1, token_str="")
            for n in names]


@torch.no_grad()
def trace_unet_reference(pipe, caption: str, subject: str, seed: int, layers: Sequence[str] | None = None, *,
                         steps: int = 25, guidance: float = 7.5, corruption: Corruption = Corruption(),
                         uncond: Uncond = "restore", negative: str | None = None,
                         sets: Sequence[Collection[str]] | None = None, cache_device: str | None = None) -> Trace:
    """Unbatched reference: one clean run caching the layers' outputs, then one corrupted generation per layer
    (or per set in ``sets``) that replaces the layer's output by the cached one at every UNet call."""
    clean, bad, lat = _prepare(pipe, caption, subject, seed, corruption, negative)
    if sets is None:
        names = resolve_unet_layers(pipe.unet, layers)
        sets, labels = [{n} for n in names], names
    else:
        sets = [set(s) for s in sets]
        labels = ["+".join(sorted(s)) or "none" for s in sets]
    needed = sorted(set().union(*sets)) if sets else []
    modules = dict(pipe.unet.named_modules())
    cache: dict[str, list[torch.Tensor]] = {n: [] for n in needed}
    handles = [modules[n].register_forward_hook(
        lambda m, a, out, n=n: cache[n].append(out.detach().to(cache_device or out.device)), prepend=True)
        for n in needed]
    try:
        lat_c = denoise(pipe, lat, clean, steps, guidance)
    finally:
        for h in handles:
            h.remove()
    img_c = decode(pipe, lat_c, keep_nonfinite=True)
    lat_x = denoise(pipe, lat, bad, steps, guidance)
    img_x = decode(pipe, lat_x, keep_nonfinite=True)
    imgs, flags = [], []
    for layer_set in sets:
        counter = {"calls": -1}
        pre = pipe.unet.register_forward_pre_hook(lambda m, a: counter.__setitem__("calls", counter["calls"] + 1))
        hs = [modules[n].register_forward_hook(_replace_from(cache[n], counter, uncond), prepend=True)
              for n in layer_set]
        try:
            lat_r = denoise(pipe, lat, bad, steps, guidance)
        finally:
            for h in [pre, *hs]:
                h.remove()
        img = decode(pipe, lat_r, keep_nonfinite=True)
        flags.append(nonfinite(lat_r, img))
        imgs.append(img.cpu())  # on the CPU, as a batched Trace's
    empty = img_c[:0].cpu()
    meta = unet_meta(pipe, labels) if all(len(s) == 1 for s in sets) else []
    return Trace(labels, img_c.cpu(), img_x.cpu(), torch.cat(imgs) if imgs else empty,
                 torch.cat(flags) if flags else torch.zeros(0, dtype=torch.bool),
                 bool(nonfinite(lat_c, img_c)[0]), bool(nonfinite(lat_x, img_x)[0]), meta)


def _replace_from(cached: list[torch.Tensor], counter: dict, uncond: Uncond):
    def hook(module, args, out):
        saved = cached[counter["calls"]].to(out.device)
        if uncond == "restore":
            return saved.clone()
        out = out.clone()
        out[1:] = saved[1:]  # rows: [uncond, cond]; the conditional half only
        return out

    return hook
