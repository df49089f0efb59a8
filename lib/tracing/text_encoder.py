"""Text-encoder restoration: restore one (encoder, layer, output, token) state of the clean run, then generate.

For each site (``lib.tracing.layers.TextSite``: a layer's output hidden state, its ``self_attn`` output or its
``mlp`` output) and each token position, the corrupted encoder run gets that state replaced by the clean run's at
that position; everything downstream (later layers, later positions, SDXL's pooled embedding) is recomputed. The
restored conditionings are built in batches (one encoder call holds many restorations: row ``b`` restores
``restores[b]``), then the images come from one plain batched generation of all conditionings from the same latent.

On SDXL the conditioning is the penultimate hidden state of each encoder, so restoring the last layer of an encoder
changes only ``text_encoder_2``'s pooled embedding (and nothing for ``text_encoder``): those sites read as corrupted.

CLIP's text encoder is causally masked and the noise touches only the subject's tokens, so a state at a position before
the subject's first token is the same in the clean and the corrupted run: restoring it changes nothing. Those
restorations (the start token and the words before the subject, more than half of a caption's positions) are not
generated; they get the corrupted image (``skip_unaffected``; ``False`` generates them, e.g. to check the claim).
"""

from __future__ import annotations

import numbers
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from lib.sampling import Conditioning, decode, denoise, encode, initial_latents, text_encoder_names, tokenizer_for
from lib.tracing.corrupt import Corruption, Gate, cat_conditionings, gated
from lib.prompts import subject_positions
from lib.tracing.layers import TextSite, text_sites
from lib.tracing.unet import Trace, nonfinite


@dataclass(frozen=True)
class TextRestore:
    """Restore ``site`` at token positions ``tokens`` (usually one position)."""

    site: TextSite
    tokens: tuple[int, ...]

    @property
    def label(self) -> str:
        return f"{self.site.name}@{','.join(map(str, self.tokens))}"


def caption_positions(pipe, caption: str) -> list[int]:
    """Positions of the caption's tokens, start and end token included (0 … n-1)."""
    return list(range(len(pipe.tokenizer(caption, truncation=True).input_ids)))


def restores_for(pipe, caption: str, sites: Sequence[TextSite] | None = None,
                 tokens: Sequence[int | Sequence[int]] | None = None) -> list[TextRestore]:
    """Every site × every token entry (default: each caption position on its own); an entry may group positions."""
    sites = text_sites(pipe) if sites is None else list(sites)
    entries = caption_positions(pipe, caption) if tokens is None else list(tokens)
    if any(isinstance(t, bool) for t in entries):
        raise ValueError(f"token positions must be integers, got {list(entries)}")
    groups = [(int(t),) if isinstance(t, numbers.Integral) else tuple(int(x) for x in t) for t in entries]  # np.int64
    bad = [g for g in groups if not g or any(not 0 <= p < pipe.tokenizer.model_max_length for p in g)]
    if bad:
        raise ValueError(f"token positions must lie in 0..{pipe.tokenizer.model_max_length - 1}; got {bad}")
    return [TextRestore(s, g) for s in sites for g in groups]


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _with_first(out, value):
    return (value, *out[1:]) if isinstance(out, tuple) else value


@contextmanager
def _hooks(pipe, sites: Sequence[TextSite], hook_for) -> Iterator[None]:
    handles = []
    try:
        for site in dict.fromkeys(sites):
            module = getattr(pipe, site.encoder).get_submodule(site.module)
            handles.append(module.register_forward_hook(hook_for(site), prepend=True))
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def clean_states(pipe, caption: str, subject: str, sites: Sequence[TextSite],
                 negative: str | None = None) -> dict[TextSite, torch.Tensor]:
    """The clean run's output at each site for ``caption``, shape (77, width)."""
    states: dict[TextSite, torch.Tensor] = {}
    with gated(pipe, [caption], [subject]) as gates:
        def hook_for(site: TextSite):
            gate = gates[site.encoder]

            def hook(module, args, out):
                hit = (gate.rows >= 0).nonzero()
                if len(hit):
                    states[site] = _first(out)[int(hit[0])].detach().clone()

            return hook

        with _hooks(pipe, sites, hook_for):
            encode(pipe, [caption], negative)
    return states


@torch.no_grad()
def restored_conditionings(pipe, caption: str, subject: str, restores: Sequence[TextRestore],
                           corruption: Corruption = Corruption(), negative: str | None = None,
                           batch_size: int = 64) -> Conditioning:
    """One conditioning row per restoration: the corrupted encoding with that state restored from the clean run."""
    sites = [r.site for r in restores]
    clean = clean_states(pipe, caption, subject, sites, negative)
    parts = []
    for start in range(0, len(restores), batch_size):
        chunk = list(restores[start : start + batch_size])
        with gated(pipe, [caption], [subject], corruption) as gates:
            with _hooks(pipe, sites, lambda site: _restore_hook(site, chunk, gates[site.encoder], clean[site])):
                parts.append(encode(pipe, [caption] * len(chunk), negative))
    return cat_conditionings(parts)


def _restore_hook(site: TextSite, chunk: Sequence[TextRestore], gate: Gate, clean: torch.Tensor):
    rows = [(b, list(r.tokens)) for b, r in enumerate(chunk) if r.site == site]

    def hook(module, args, out):
        value = _first(out)
        if not rows or value.shape[0] != len(chunk):
            return out
        value = value.clone()
        for b, pos in rows:
            if gate.rows[b] >= 0:  # the caption's rows, not the negative prompt's
                value[b, pos] = clean[pos].to(value.dtype)
        return _with_first(out, value)

    return hook


@torch.no_grad()
def generate_conditionings(pipe, cond: Conditioning, latent: torch.Tensor, steps: int = 25, guidance: float = 7.5,
                           batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, H, W) of every conditioning row from one latent, in loops of ``batch_size``, on the CPU; NaN
    flags (N,)."""
    imgs, flags = [], []
    for start in range(0, len(cond), batch_size):
        idx = list(range(start, min(start + batch_size, len(cond))))
        lat = denoise(pipe, latent.expand(len(idx), -1, -1, -1), cond.select(idx), steps, guidance)
        img = decode(pipe, lat, keep_nonfinite=True)
        flags.append(nonfinite(lat, img))
        imgs.append(img.cpu())  # a Trace's images live on the CPU (lib.tracing.unet.Trace)
    return torch.cat(imgs), torch.cat(flags)


@torch.no_grad()
def trace_text(pipe, caption: str, subject: str, seed: int, sites: Sequence[TextSite] | None = None,
               tokens: Sequence[int | Sequence[int]] | None = None, *, steps: int = 25, guidance: float = 7.5,
               corruption: Corruption = Corruption(), batch_size: int = 16, negative: str | None = None,
               skip_unaffected: bool = True) -> Trace:
    """Trace text-encoder states for one caption × seed: one restored image per (site, token entry).

    The subject noise is ``corruption.at(seed)``'s: drawn for this caption, subject and latent seed. With
    ``skip_unaffected``, restorations of positions before the subject are not generated: they are the corrupted run
    (module docstring), so they get its image and flag."""
    corruption = corruption.at(seed)
    restores = restores_for(pipe, caption, sites, tokens)
    first = min(subject_positions(tokenizer_for(pipe, enc), caption, subject)[0] for enc in text_encoder_names(pipe))
    live = [i for i, r in enumerate(restores) if not (skip_unaffected and max(r.tokens) < first)]
    clean = encode(pipe, [caption], negative)
    with gated(pipe, [caption], [subject], corruption):
        bad = encode(pipe, [caption], negative)
    parts = [clean, bad]
    if live:
        parts.append(restored_conditionings(pipe, caption, subject, [restores[i] for i in live], corruption, negative,
                                            batch_size * 4))
    latent = initial_latents(pipe, [seed])
    done, done_flags = generate_conditionings(pipe, cat_conditionings(parts), latent, steps, guidance, batch_size)
    imgs = done[1:2].repeat(2 + len(restores), 1, 1, 1)  # every restoration not generated is the corrupted run
    flags = done_flags[1:2].repeat(2 + len(restores))
    imgs[:2], flags[:2] = done[:2], done_flags[:2]
    for j, i in enumerate(live):
        imgs[2 + i], flags[2 + i] = done[2 + j], done_flags[2 + j]
    tok = tokenizer_for(pipe, "text_encoder")
    ids = tok(caption, truncation=True).input_ids
    names = tok.convert_ids_to_tokens(ids)
    meta = [dict(component=r.site.encoder, kind=r.site.kind, layer=r.site.module, layer_index=r.site.layer,
                 token=r.tokens[0] if len(r.tokens) == 1 else -1,
                 token_str="|".join(names[p] if p < len(names) else "<pad>" for p in r.tokens)) for r in restores]
    return Trace([r.label for r in restores], imgs[:1], imgs[1:2], imgs[2:], flags[2:], bool(flags[0]),
                 bool(flags[1]), meta)
