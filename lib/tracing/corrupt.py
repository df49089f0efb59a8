"""Corrupting the subject: Gaussian noise on the subject tokens' embeddings, through a hook on every encoder.

ROME's convention: noise ``N(0, (k·σ)²)`` with ``σ`` the standard deviation of the token-embedding table and
``k = 3``, added to the embeddings at the subject's token positions. Every (caption, subject, image seed) draws its
own noise, and every encoder its own draw: the generator seed is a SHA-256 hash of (base ``seed``, caption, subject,
image seed), then of that and the encoder's name (``item_noise_seed``, ``encoder_noise_seed``), so draws are
independent across captions, latent seeds and encoders and reproducible run to run. The hook sits on
``embeddings.token_embedding`` of each text encoder (SDXL has two, each with its own ``σ``), so anything
that encodes the caption through the pipeline is corrupted consistently. Rows are recognised by their token ids:
only rows whose ids start with the caption's ids are corrupted, so the negative (unconditional) prompt encoded in
the same ``encode`` call stays clean.

Samples: ROME averages 10 corrupted samples per prompt. Here each (caption, image seed) item is one sample, its noise
drawn with its latent seed, so a caption gets ``len(SEEDS)`` corrupted samples (one with the default ``SEEDS=[0]``,
three in the README's full sweep) and noise and latent vary together: ``SEEDS`` of ten is ROME's count.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Iterator, Sequence

import torch

from lib.prompts import subject_positions
from lib.sampling import Conditioning, encode, text_encoder_names, tokenizer_for
from lib.tracing.layers import encoder_root


@dataclass(frozen=True)
class Corruption:
    """Noise scale ``multiplier × σ`` (``σ``: std of the token-embedding table, or ``std`` if given), the base noise
    ``seed``, and ``image_seed``, the latent seed of the trace the noise belongs to (the traces set it: ``at``)."""

    multiplier: float = 3.0
    seed: int = 0
    std: float | None = None
    image_seed: int | None = None

    def at(self, image_seed: int) -> Corruption:
        """The same corruption for a trace from latent seed ``image_seed``."""
        return replace(self, image_seed=int(image_seed))


def _hash_seed(*parts) -> int:
    """A 63-bit generator seed from a SHA-256 of ``parts`` (stable across runs and machines, unlike ``hash``)."""
    digest = hashlib.sha256(json.dumps(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def item_noise_seed(corruption: Corruption, caption: str, subject: str) -> int:
    """The noise seed of one (caption, subject, image seed) under ``corruption.seed``: the tidy rows' ``noise_seed``."""
    return _hash_seed("item", int(corruption.seed), caption, subject, corruption.image_seed)


def encoder_noise_seed(item_seed: int, encoder: str) -> int:
    """The generator seed of ``encoder``'s noise for an item (SDXL's two encoders draw independently)."""
    return _hash_seed("encoder", int(item_seed), encoder)


def subject_noise(corruption: Corruption, caption: str, subject: str, encoder: str,
                  shape: tuple[int, int]) -> torch.Tensor:
    """Standard-normal draws (unscaled) of ``encoder`` for (caption, subject, ``corruption.image_seed``)."""
    gen = torch.Generator().manual_seed(encoder_noise_seed(item_noise_seed(corruption, caption, subject), encoder))
    return torch.randn(*shape, generator=gen)


def token_embedding(pipe, encoder: str) -> torch.nn.Embedding:
    return encoder_root(getattr(pipe, encoder)).embeddings.token_embedding


def embedding_std(pipe, encoder: str) -> float:
    """Standard deviation of all entries of ``encoder``'s token-embedding table."""
    return float(token_embedding(pipe, encoder).weight.detach().float().std())


@dataclass
class Target:
    """A caption to recognise in a batch: its unpadded token ids, its subject positions, its noise."""

    caption: str
    ids: torch.Tensor
    positions: list[int]
    noise: torch.Tensor  # (len(positions), width), already scaled


class Gate:
    """Per encoder: which rows of the current call hold which target caption (``rows[b]`` = index or -1).

    A forward pre-hook on the token embedding (the first module every call runs) updates ``rows``; the corruption
    hook and the restoration hooks of ``lib.tracing.text_encoder`` read it.
    """

    def __init__(self, targets: Sequence[Target]):
        self.targets = list(targets)
        self.rows = torch.empty(0, dtype=torch.long)

    def observe(self, ids: torch.Tensor) -> None:
        rows = torch.full((ids.shape[0],), -1, dtype=torch.long)
        for k, t in enumerate(self.targets):
            n = len(t.ids)
            if ids.shape[1] >= n:
                hit = (ids[:, :n] == t.ids.to(ids.device)).all(dim=1).cpu() & (rows < 0)
                rows[hit] = k
        self.rows = rows


def targets_for(pipe, encoder: str, captions: Sequence[str], subjects: Sequence[str],
                corruption: Corruption | None) -> list[Target]:
    """Targets of ``encoder``; ``PromptError`` names caption, subject and tokens when a subject is absent."""
    tok = tokenizer_for(pipe, encoder)
    emb = token_embedding(pipe, encoder)
    scale = 0.0
    if corruption is not None:
        scale = corruption.multiplier * (corruption.std if corruption.std is not None else embedding_std(pipe, encoder))
    out = []
    for caption, subject in zip(captions, subjects, strict=True):
        pos = subject_positions(tok, caption, subject)
        ids = torch.tensor(tok(caption, truncation=True, max_length=tok.model_max_length).input_ids)
        shape = (len(pos), emb.embedding_dim)
        draw = torch.zeros(shape) if corruption is None else subject_noise(corruption, caption, subject, encoder, shape)
        noise = draw * scale
        out.append(Target(caption, ids, pos, noise.to(emb.weight.device, emb.weight.dtype)))
    return out


@contextmanager
def gated(pipe, captions: Sequence[str], subjects: Sequence[str],
          corruption: Corruption | None = None) -> Iterator[dict[str, Gate]]:
    """Install a ``Gate`` on every text encoder; with ``corruption``, also add the subject noise to matching rows.

    Yields ``{encoder: Gate}``; hooks are removed on exit, also after an error.
    """
    gates, handles = {}, []
    try:
        for enc in text_encoder_names(pipe):
            gate = Gate(targets_for(pipe, enc, captions, subjects, corruption))
            emb = token_embedding(pipe, enc)
            handles.append(emb.register_forward_pre_hook(lambda m, args, g=gate: g.observe(args[0])))
            if corruption is not None:
                handles.append(emb.register_forward_hook(_add_noise(gate), prepend=True))
            gates[enc] = gate
        yield gates
    finally:
        for h in handles:
            h.remove()


def _add_noise(gate: Gate):
    def hook(module, args, out: torch.Tensor) -> torch.Tensor:
        if not (gate.rows >= 0).any():
            return out
        out = out.clone()
        for b, k in enumerate(gate.rows.tolist()):
            if k >= 0:
                t = gate.targets[k]
                out[b, t.positions] += t.noise
        return out

    return hook


@contextmanager
def corrupted(pipe, captions: str | Sequence[str], subjects: str | Sequence[str],
              corruption: Corruption = Corruption()) -> Iterator[dict[str, Gate]]:
    """Within the block, every encoding of one of ``captions`` has its subject's embeddings corrupted."""
    captions = [captions] if isinstance(captions, str) else list(captions)
    subjects = [subjects] if isinstance(subjects, str) else list(subjects)
    with gated(pipe, captions, subjects, corruption) as gates:
        yield gates


def encode_pair(pipe, caption: str, subject: str, corruption: Corruption = Corruption(),
                negative: str | None = None) -> tuple[Conditioning, Conditioning]:
    """Clean and corrupted conditioning of one caption (the unconditional part is identical in both)."""
    clean = encode(pipe, [caption], negative)
    with corrupted(pipe, caption, subject, corruption):
        bad = encode(pipe, [caption], negative)
    return clean, bad


def cat_conditionings(parts: Sequence[Conditioning]) -> Conditioning:
    """Concatenate conditionings along the batch."""
    keys = parts[0].added.keys()
    return Conditioning(
        torch.cat([p.cond for p in parts]), torch.cat([p.uncond for p in parts]),
        {k: torch.cat([p.added[k] for p in parts]) for k in keys},
        {k: torch.cat([p.added_uncond[k] for p in parts]) for k in keys},
    )
