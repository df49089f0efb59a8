"""SAGE prompt search: natural prompts, grown word by word from "a photo of a [class]", whose images lose the class.

Each round (seed pseudo-code, one word per round):
1. a causal LM (any ``AutoModelForCausalLM`` id or folder; the toy one is ``data/toy/lm``) proposes the ``top_k``
   most probable next *words* after the current prompt (a token counts when it starts a new word and is
   alphabetic; a subword LM's word is completed greedily from its first piece, and dropped if unfinished:
   :meth:`CandidateLM.propose`; ``min_prob`` drops unlikely words, so that with the toy LM the prompt stays inside
   the world's grammar; a single proposal is taken without optimisation);
2. continuous embeddings ``[x]`` (the next word) and ``[y]`` (``lookahead`` future words) in the diffusion text
   encoder's token-embedding space are inserted after the last word (before EOS) and optimised against the surrogate
   loss (goal ``lose``, mean over the search seeds) with signed steps ``e ← clamp(e − lr·sign(∇), −2.5, 2.5)`` from 0
   (a descent of a loss that is low when the class is lost; the seed pseudo-code's literal
   ``emb_x += sign(grad)·step_size`` on its −Σ(1 − 2p) of the class would raise P(class), so the code departs from
   that sign on purpose);
3. the candidate whose token embedding (the mean over its CLIP BPE tokens, when it has several) is nearest in cosine
   to ``[x]`` is appended, and the new prompt is rendered on the seeds and judged.

A prompt is a found failure when the ensemble is fooled (``lose``) on at least ``success_fraction`` of the seeds
(ours: 0.5; the paper does not say) *and* it is a complete sentence for the LM: the LM's probability of ending the text
there (its EOS token, or a token of its own for ".", "!", "?" or a newline) is at least ``min_end_prob`` (ours: 0.1; 0 turns the check off), so that "a photo of a cat on"
is grown further instead of being reported. Gradients reach the embeddings through every denoising step from
``grad_from_step`` on (0: full backpropagation; later: truncated, cheaper). On SDXL a slot embedding is the
concatenation of one embedding per text encoder (768 + 1280 dimensions), each inserted into its own encoder, and word
embeddings are concatenated the same way (the two CLIP tokenizers share their vocabulary); the nearest candidate is
the one with the highest mean of the two encoders' cosines (:func:`slot_cosine`). :func:`categorize` is a rough, documented stand-in for the paper's ten hand-made failure categories.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lib.params import Param, check_fields, interval, positive
from lib.prompts import PromptError
from lib.sage.gradient import grad_problem, loss_scale_for, scaled_grad
from lib.sage.latent import Residual, check_seeds, sample_with_residual, signed_step
from lib.sage.loss import Ensemble
from lib.progress import progress_bar
from lib.sampling import Conditioning, decode, encode, initial_latents, is_sdxl, text_encoder_names, tokenizer_for

if TYPE_CHECKING:
    import pandas as pd

PLACEHOLDER_ID = 0  # any id other than EOS: its embedding is overwritten


SLOT_WORD = "!"  # SDXL: one CLIP token per slot, written into the prompt text, its embedding overwritten
MAX_WORD_PIECES = 4  # LM tokens a proposed word may take (CandidateLM.propose)


def _check_pipe(pipe) -> None:
    if getattr(pipe, "text_encoder", None) is None:
        raise NotImplementedError("prompt/token search needs a pipeline with its first text encoder")
    if is_sdxl(pipe) and (pipe.text_encoder.get_input_embeddings().num_embeddings
                          != pipe.text_encoder_2.get_input_embeddings().num_embeddings):
        raise NotImplementedError("SDXL prompt/token search needs two text encoders with the same vocabulary")


def _encoders(pipe) -> list:
    """The text-encoder modules, in :func:`lib.sampling.text_encoder_names`' order."""
    return [getattr(pipe, n) for n in text_encoder_names(pipe)]


# -------------------------------------------------------------------------------------------- embeddings in prompts
def token_table(pipe) -> torch.Tensor:
    """The token-embedding table (vocab, D); on SDXL both encoders' tables side by side (vocab, D₁ + D₂)."""
    tables = [te.get_input_embeddings().weight for te in _encoders(pipe)]
    return tables[0] if len(tables) == 1 else torch.cat([t.to(tables[0].device) for t in tables], dim=1)


def slot_dim(pipe) -> int:
    """Dimensions of one slot embedding: the token-embedding width (summed over SDXL's two encoders)."""
    return sum(te.get_input_embeddings().embedding_dim for te in _encoders(pipe))


def slot_cosine(pipe, words: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """Cosine of each row of ``words`` to ``slot`` (last dimension: :func:`slot_dim`); on SDXL the mean of the two
    encoders' cosines, so that the wider, larger-normed second table does not decide alone."""
    dims = [te.get_input_embeddings().embedding_dim for te in _encoders(pipe)]
    parts = zip(words.split(dims, dim=-1), slot.split(dims, dim=-1))
    return torch.stack([F.cosine_similarity(w, s, dim=-1) for w, s in parts]).mean(0)


def word_embedding(pipe, word: str) -> torch.Tensor:
    """Mean token embedding of ``word`` under the diffusion tokenizer (most words are one CLIP token), float32 on the
    CPU like the optimised slot embeddings (on SDXL both encoders' side by side, as :func:`token_table`)."""
    ids = pipe.tokenizer(word, add_special_tokens=False).input_ids
    if not ids:
        raise PromptError(f"word {word!r} has no tokens")
    return torch.cat([te.get_input_embeddings().weight[ids].detach().float().mean(0).cpu() for te in _encoders(pipe)])


def slot_ids(tokenizer, prompt: str, n_slots: int) -> tuple[list[int], list[int]]:
    """Padded ids of ``prompt`` with ``n_slots`` placeholder tokens after its last word, and the slot positions."""
    ids = tokenizer(prompt, truncation=False).input_ids  # [BOS, ..., EOS]
    ids = ids[:-1] + [PLACEHOLDER_ID] * n_slots + ids[-1:]
    limit = tokenizer.model_max_length
    if len(ids) > limit:
        raise PromptError(f"prompt {prompt[:60]!r} plus {n_slots} slot(s) has {len(ids)} tokens (limit {limit})")
    positions = list(range(len(ids) - 1 - n_slots, len(ids) - 1))
    return ids + [tokenizer.pad_token_id] * (limit - len(ids)), positions


def slots_overflow(pipe, prompt: str, n_slots: int) -> str | None:
    """Why ``prompt`` with ``n_slots`` slot tokens does not fit a text encoder of ``pipe`` (its tokenizer's
    ``model_max_length``, 77 in SD; both tokenizers on SDXL), or None when it fits."""
    for tok in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)):
        if tok is None:
            continue
        n = len(tok(prompt, truncation=False).input_ids) + n_slots
        if n > tok.model_max_length:
            return (f"{prompt[:60]!r} plus {n_slots} slot(s) has {n} tokens, over the text encoder's limit of "
                    f"{tok.model_max_length}")
    return None


@contextmanager
def _replaced_embeddings(pipe, mask: torch.Tensor, values: torch.Tensor):
    """Forward hook: token-embedding outputs at ``mask`` (B, L) become ``values`` (n_slots, D), tiled per row.

    ``values`` may live on the CPU in float32 (the optimised slots do) while the encoder runs on a GPU in fp16: they
    are moved and cast inside the graph, so gradients still reach them.
    """
    emb = pipe.text_encoder.get_input_embeddings()

    def hook(_module, _inputs, out):
        fill = values.to(device=out.device, dtype=out.dtype).repeat(out.shape[0], 1)
        out = out.clone()
        out[mask] = fill
        return out

    handle = emb.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def encode_with_slots(pipe, prompts: Sequence[str], slots: torch.Tensor | None,
                      negative: str | None = None) -> Conditioning:
    """CFG conditioning of ``prompts`` with embeddings ``slots`` (n, D) inserted before EOS; differentiable in them.

    ``slots=None`` (or 0 rows) equals :func:`lib.sampling.encode`.
    """
    _check_pipe(pipe)
    if is_sdxl(pipe):
        return _encode_with_slots_xl(pipe, prompts, slots, negative)
    n = 0 if slots is None else int(slots.shape[0])
    rows = [slot_ids(pipe.tokenizer, p, n) for p in prompts]
    ids = torch.tensor([r[0] for r in rows], device=pipe.text_encoder.device)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for b, (_, pos) in enumerate(rows):
        mask[b, pos] = True
    uncond = encode(pipe, list(prompts), negative).uncond
    if n == 0:
        with torch.no_grad():
            cond = pipe.text_encoder(ids)[0]
    else:
        with _replaced_embeddings(pipe, mask, slots):
            cond = pipe.text_encoder(ids)[0]
    return Conditioning(cond.to(pipe.text_encoder.dtype), uncond)


@contextmanager
def _slots_before_eos(pipe, n: int, values: torch.Tensor):
    """Forward hooks on every text encoder's token embedding: in each row whose ``n`` tokens before the first EOS are
    :data:`SLOT_WORD` (the prompts, not a negative prompt), they get ``values`` (n, D₁ + D₂), split between the
    encoders (SDXL)."""
    handles, start = [], 0
    for te, tok in zip(_encoders(pipe), (tokenizer_for(pipe, n) for n in text_encoder_names(pipe))):
        emb = te.get_input_embeddings()
        part = values[:, start : start + emb.embedding_dim]
        start += emb.embedding_dim
        eos = tok.eos_token_id  # not te.config.eos_token_id (2 in the original CLIP configs)
        slot = tok(f"a {SLOT_WORD}", add_special_tokens=False).input_ids[-1]

        def hook(_module, inputs, out, part=part, eos=eos, slot=slot):
            ids = inputs[0]
            first_eos = (ids == eos).int().argmax(1, keepdim=True)
            pos = torch.arange(ids.shape[1], device=ids.device)[None]
            mask = (pos >= first_eos - n) & (pos < first_eos)
            mask &= ((ids == slot) | ~mask).all(1, keepdim=True)  # rows carrying the n slot words
            out = out.clone()
            out[mask] = part.to(device=out.device, dtype=out.dtype).repeat(int(mask.any(1).sum()), 1)
            return out

        handles.append(emb.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _encode_with_slots_xl(pipe, prompts: Sequence[str], slots: torch.Tensor | None,
                          negative: str | None) -> Conditioning:
    """SDXL: the pipeline's own encoding of ``prompt + n × SLOT_WORD`` with the slot embeddings written in by hooks
    (both encoders' hidden states and the pooled embedding follow them); the unconditional half is the plain one."""
    plain = encode(pipe, list(prompts), negative)
    n = 0 if slots is None else int(slots.shape[0])
    if n == 0:
        return plain
    if slots.shape[1] != slot_dim(pipe):
        raise ValueError(f"SDXL slot embeddings have {slot_dim(pipe)} dimensions (both encoders), got {slots.shape[1]}")
    texts = [f"{p}{f' {SLOT_WORD}' * n}" for p in prompts]
    for tok in (pipe.tokenizer, pipe.tokenizer_2):
        for p, t in zip(prompts, texts):
            a, b = tok(p).input_ids, tok(t).input_ids
            if len(b) != len(a) + n or b[: len(a) - 1] != a[:-1]:
                raise PromptError(f"{p!r} followed by {n} slot(s) does not tokenise as the prompt plus {n} tokens")
    with _slots_before_eos(pipe, n, slots):
        c = encode(pipe, texts, negative, grad=True)
    return Conditioning(c.cond, plain.uncond, c.added, plain.added_uncond)


def render_with_slots(pipe, prompts: Sequence[str], slots: torch.Tensor | None, seeds: Sequence[int], steps: int,
                      guidance: float, grad_from_step: int = 0, grad: bool = True) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] of ``prompts[i]`` with ``seeds[i]``; gradients reach ``slots`` from
    ``grad_from_step`` on (steps before it run without gradient)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    with torch.set_grad_enabled(grad):
        c = encode_with_slots(pipe, prompts, slots)
        lat = initial_latents(pipe, seeds)
        x = sample_with_residual(pipe, lat, c, steps, guidance, Residual(grad_from_step, 1.0), grad=grad)
        return decode(pipe, x)


# -------------------------------------------------------------------------------------------------- the proposer LM
class CandidateLM:
    """A causal LM that proposes natural next words (``model``: a hub id, a local folder, or (model, tokenizer))."""

    def __init__(self, model, tokenizer=None, device: str = "cpu"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if isinstance(model, (str, Path)):
            local = Path(model).expanduser().exists()
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(str(model), local_files_only=local)
            model = AutoModelForCausalLM.from_pretrained(str(model), local_files_only=local)
        if tokenizer is None:
            raise ValueError("pass the tokenizer with a model object")
        self.model, self.tokenizer = model.to(device).eval(), tokenizer

    @property
    def context(self) -> int | None:
        """The LM's context length in tokens (``None`` when its config does not say)."""
        cfg = self.model.config
        for name in ("max_position_embeddings", "n_positions"):
            n = getattr(cfg, name, None)
            if isinstance(n, int) and n > 0:  # XLNet says -1: no limit
                return n
        return None

    def encode(self, prefix: str, room: int = 1) -> list[int]:
        """LM ids of ``prefix``; :class:`PromptError` when the LM's tokenizer cannot encode it or its context has no
        room for ``room`` more tokens after it."""
        tok = self.tokenizer
        ids = list(tok(prefix).input_ids)
        eos = tok.eos_token_id
        if len(ids) > 1 and eos is not None and ids[-1] == eos and \
                tok(prefix, add_special_tokens=False).input_ids[-1:] != [eos]:
            ids = ids[:-1]  # a tokenizer that appends EOS (BOS == EOS too): the LM must continue the text
        if not ids or not self._encodes(prefix):
            bad = [w for w in prefix.split() if not self._encodes(w)]
            raise PromptError(f"the LM's tokenizer cannot encode {prefix!r}: unknown word(s) {bad or '(all)'}; "
                              "use a template and class in its vocabulary")
        if self.context is not None and len(ids) + room > self.context:
            shown = repr(prefix) if len(prefix) <= 60 else f"{prefix[:60]!r}..."
            raise PromptError(f"{shown} is {len(ids)} LM tokens and the LM's context holds {self.context}: "
                              f"no room for {room} more; shorten the template or use an LM with a longer context")
        return ids

    def _encodes(self, text: str) -> bool:
        """Whether ``text`` survives the tokenizer's round trip (letters compared without whitespace or case): an
        unknown word becomes an UNK token, or, in a vocabulary without one, loses the characters it cannot encode."""
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        back = self.tokenizer.decode(ids, skip_special_tokens=True)
        return bool(ids) and "".join(back.split()).lower() == "".join(text.split()).lower()

    @property
    def fingerprint(self) -> str:
        """A hash of the tokenizer (vocabulary, merges, special tokens): resume keys change with it, not only with
        the LM's weights."""
        tok = self.tokenizer
        backend = getattr(tok, "backend_tokenizer", None)
        vocab = backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))
        special = json.dumps(tok.special_tokens_map, sort_keys=True, default=str)
        return hashlib.sha1(f"{type(tok).__name__}{vocab}{special}".encode()).hexdigest()[:16]

    @torch.no_grad()
    def end_prob(self, prompt: str) -> float:
        """The LM's probability that the text ends after ``prompt``: of its EOS token(s), :attr:`eos_ids`, or of a
        sentence-ending token, :attr:`end_ids` (a web-text LM rarely puts EOS right after a caption; 1.0 for an LM that
        declares no EOS)."""
        if not self.eos_ids:
            return 1.0
        eos = sorted(self.end_ids)
        ids = self.encode(prompt, room=0)  # scores the next token from the last position: no new position
        dev = next(self.model.parameters()).device
        return float(self.model(torch.tensor([ids], device=dev)).logits[0, -1].float().softmax(-1)[eos].sum())

    @property
    def end_ids(self) -> set[int]:
        """:attr:`eos_ids` and the tokens that end a sentence in this vocabulary: ".", "!", "?" or a newline, each
        when it is one token of its own (with or without a leading space), not the unknown token."""
        return set(self.eos_ids) | self._sentence_end_ids

    @functools.cached_property
    def _sentence_end_ids(self) -> set[int]:
        tok, ids = self.tokenizer, set()
        for end in (".", "!", "?", "\n"):
            for text in (end, " " + end):
                enc = tok(text, add_special_tokens=False).input_ids
                if len(enc) == 1 and enc[0] != tok.unk_token_id:
                    ids.add(enc[0])
        return ids

    @property
    def eos_ids(self) -> set[int]:
        """The ids that end a text: the tokenizer's EOS and those of the model's config and generation config (a
        tokenizer saved without its EOS no longer turns the end-of-sentence check off; Llama 3 declares two)."""
        found = [self.tokenizer.eos_token_id, getattr(self.model.config, "eos_token_id", None),
                 getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)]
        ids = {i for x in found for i in (x if isinstance(x, (list, tuple)) else [x]) if isinstance(i, int)}
        return {i for i in ids if 0 <= i < len(self.tokenizer)}

    @torch.no_grad()
    def propose(self, prefix: str, k: int = 20, scan: int = 2000, min_prob: float = 0.0,
                max_pieces: int = MAX_WORD_PIECES) -> list[str]:
        """The ``k`` most probable next words (alphabetic, lower case, each once), best first; only words whose first
        token has next-token probability ``>= min_prob`` (keeps the prompt natural: with the toy LM, inside the
        grammar).

        A word may take several LM tokens (BPE, SentencePiece): a first token that starts a new alphabetic word
        (" sle", or a bare space "▁" that small vocabularies put before "o" + "n") is completed greedily: while the
        LM's most probable next token continues the word (decodes without a leading space, alphabetic, not a special
        or EOS token) it is appended, up to ``max_pieces`` tokens in all and within the LM's context. The word is
        whole when the next token starts with a space, is special or is punctuation that ends a word (",", ".", ...);
        one continued by anything else ("t" + "-shirt", "don" + "'t", a character cut between byte tokens) is
        dropped, as is a word still unfinished at ``max_pieces`` or at the context's end: a fragment is never
        proposed. Words are ranked by their first token's
        probability (the probability of starting that word). A word-level LM (the toy one) needs no completion.
        """
        ids = self.encode(prefix)
        probs = self._logits([ids])[0].float().softmax(-1)
        base = self.tokenizer.decode(ids, skip_special_tokens=True)
        special = self._special
        words: list[str] = []
        firsts: list[int] = []  # first tokens waiting for completion, best first
        top = probs.topk(min(scan, probs.numel()))
        for p, i in zip(top.values.tolist(), top.indices.tolist()):
            if p < min_prob:
                break
            if i in special:
                continue
            new = self._added(ids, [i], base)
            if new[:1].isspace() and new.strip().isalpha() or new == " ":  # " " alone: a word split as "▁" + "on"
                firsts.append(i)
                if len(words) + len(firsts) >= k:  # enough to fill k, unless some stay unfinished
                    words, firsts = _unique(words + self._complete(ids, base, firsts, max_pieces)), []
                    if len(words) >= k:
                        break
        return _unique(words + self._complete(ids, base, firsts, max_pieces))[:k]

    @property
    def _special(self) -> set[int]:
        """Special token ids, EOS included."""
        return set(self.tokenizer.all_special_ids) | self.eos_ids

    def _logits(self, rows: list[list[int]]) -> torch.Tensor:
        """Next-token logits (B, vocab) after each row (rows of one length: no padding)."""
        dev = next(self.model.parameters()).device
        return self.model(torch.tensor(rows, device=dev)).logits[:, -1]

    def _added(self, ids: list[int], more: list[int], base: str | None = None) -> str:
        """The text that ``more`` adds after ``ids`` (decoded: ``base``), "" when it does not extend that text."""
        base = self.tokenizer.decode(ids, skip_special_tokens=True) if base is None else base
        text = self.tokenizer.decode(ids + more, skip_special_tokens=True)
        return text[len(base):] if text.startswith(base) else ""

    def _complete(self, ids: list[int], base: str, firsts: list[int], max_pieces: int) -> list[str]:
        """The whole words starting with the tokens ``firsts`` after ``ids`` (see :meth:`propose`), in their order;
        unfinished ones are left out. One batched LM call per token added."""
        pieces = {j: [i] for j, i in enumerate(firsts)}
        done: dict[int, str] = {}
        open_, special = list(pieces), self._special
        while open_:
            nxt = self._logits([ids + pieces[j] for j in open_]).argmax(-1).tolist()
            still = []
            for j, t in zip(open_, nxt):
                more = self._added(ids + pieces[j], [t]) if t not in special else ""
                if not more or more[0].isspace() or more[0] in _WORD_END:  # the word ends here
                    text = self.tokenizer.decode(ids + pieces[j], skip_special_tokens=True)
                    word = text[len(base):].strip().lower() if text.startswith(base) else ""
                    if word.isalpha():
                        done[j] = word
                elif not more.isalpha():  # "t-shirt", "don't", "cafe" cut inside a character: a fragment
                    continue
                elif len(pieces[j]) < max_pieces and (self.context is None
                                                       or len(ids) + len(pieces[j]) < self.context):
                    pieces[j].append(t)
                    still.append(j)
            open_ = still
        return [done[j] for j in sorted(done)]


_WORD_END = frozenset(",.;:!?)]}\"")  # punctuation after which the word before it is whole


def _unique(words: list[str]) -> list[str]:
    """``words`` without repeats, first occurrence kept."""
    return list(dict.fromkeys(words))


# ------------------------------------------------------------------------------------------------------- the search
@dataclass(frozen=True)
class PromptSearch:
    """Hyper-parameters (seed pseudo-code defaults: lr 0.05, 100 iterations, range [-2.5, 2.5])."""

    template: str = "a photo of a {cls}"
    n_words: int = 3
    top_k: int = 20
    min_prob: float = 0.0  # LM proposals below this next-token probability are dropped (ours)
    lookahead: int = 1  # future-word embeddings [y] optimised with [x]
    lr: float = 0.05
    iterations: int = 100
    emb_range: tuple[float, float] = (-2.5, 2.5)
    grad_from_step: int = 0
    success_fraction: float = 0.5
    min_end_prob: float = 0.1  # a found prompt must be one the LM would end there (ours; 0: off)
    stop_on_success: bool = True

    def __post_init__(self) -> None:
        check_fields(self, n_words=Param(int, low=1), top_k=Param(int, low=1), min_prob=Param(float, low=0.0, high=1.0),
                     lookahead=Param(int, low=0), lr=Param(float, low=0.0, check=positive),
                     iterations=Param(int, low=0), emb_range=Param((tuple, list), check=interval),
                     grad_from_step=Param(int, low=0), success_fraction=Param(float, low=0.0, high=1.0, check=positive),
                     min_end_prob=Param(float, low=0.0, high=1.0))


def search_prompt(pipe, ensemble: Ensemble, lm: CandidateLM, cls: str, seeds: Sequence[int], steps: int = 25,
                  guidance: float = 7.5, config: PromptSearch = PromptSearch(),
                  class_words: Sequence[str] = (), attribute_words: Sequence[str] = (), progress: Any = False,
                  rounds_file: str | Path | None = None) -> pd.DataFrame:
    """Grow a prompt from ``config.template`` word by word; returns a table, one row per round (word added).

    ``loss_prompt``: the surrogate loss (goal ``lose``, mean over the seeds) of the round's prompt, words only;
    ``best_loss``: the lowest ``loss_prompt`` of this and the earlier rounds, so a class with no find reports its best.
    When the LM proposes no word the search ends with a row that adds none (``found`` False, ``word`` None, the reason
    in ``stopped``). ``progress``: a flag or a bar (:mod:`lib.progress`; :func:`prompt_campaign` passes its own) over
    the search's embedding iterations; it ends advanced by ``n_words × iterations``, however early the search ends.

    ``rounds_file``: each finished round is written there at once (atomically; the rounds so far), and the rounds an
    existing file holds are taken instead of searched again (a file whose first prompt does not grow this search's
    template is ignored, with a warning). A round depends only on the prompt before it (each round starts from the
    pipeline's initial loss scale, so in float16 too), so a search interrupted after some rounds resumes to the same
    table. The caller names the file after everything the
    search depends on (:func:`prompt_campaign` does, with :func:`prompt_key`).
    """
    import pandas as pd

    check_prompt_search(pipe, ensemble, lm, [cls], seeds, steps, config)
    closing = ExitStack()  # closes a bar made here, not the caller's
    bar = closing.enter_context(progress_bar(progress, config.n_words * config.iterations, "prompt search"))
    done_before = bar.n if bar is not None else 0
    done = _read_rounds(Path(rounds_file), "its rounds are searched again") \
        if rounds_file is not None and Path(rounds_file).is_file() else None
    done = [] if done is None else done.drop(columns=["cls", "resumed"], errors="ignore").to_dict("records")
    done = [{k: None if k in ("word", "category", "stopped") and _no_word(v) else v for k, v in r.items()}
            for r in done]  # a missing string reads back as NaN: None, as a search writes it
    base = config.template.format(cls=cls)
    if done and not str(done[0]["prompt"]).startswith(base):
        warnings.warn(f"{Path(rounds_file).name} holds rounds of another search ({done[0]['prompt']!r} does not grow "
                      f"{base!r}); searching again", stacklevel=2)
        done = []
    save = None
    if rounds_file is not None:
        from lib.atomic import write_parquet_atomic

        def save(rows: list[dict]) -> None:
            write_parquet_atomic(pd.DataFrame(rows), rounds_file)
    try:
        if bar is not None and done:
            bar.update(len(done) * config.iterations)
        rows = _grow_prompt(pipe, ensemble, lm, cls, seeds, steps, guidance, config, class_words, attribute_words, bar,
                            done, save)
        if bar is not None:  # iterations not run (a forced word, an early stop) count as done
            bar.update(done_before + config.n_words * config.iterations - bar.n)
        return pd.DataFrame(rows)
    finally:
        closing.close()


def _grow_prompt(pipe, ensemble: Ensemble, lm: CandidateLM, cls: str, seeds: Sequence[int], steps: int,
                 guidance: float, config: PromptSearch, class_words: Sequence[str], attribute_words: Sequence[str],
                 bar, done: Sequence[dict] = (), save=None) -> list[dict]:
    """:func:`search_prompt`'s rounds as rows; ``bar`` (or None) advanced by one per embedding iteration. ``done``:
    rounds already searched (their last prompt is grown further, unless they ended the search); ``save(rows)`` is
    called after each round."""
    base = config.template.format(cls=cls)
    prompt, rows, best = base, list(done), math.nan
    if rows:
        last = rows[-1]
        if _no_word(last["word"]) or (last["found"] and config.stop_on_success) or len(rows) >= config.n_words:
            return rows  # the search had ended
        prompt, best = last["prompt"], last["best_loss"]
    d = slot_dim(pipe)
    lo, hi = config.emb_range
    for rnd in range(len(rows), config.n_words):
        scale = loss_scale_for(pipe)  # each round starts afresh (float16), so a resumed round is the same round
        full = _context_full(lm, prompt)  # words of several LM tokens can fill it before n_words rounds
        overflow = slots_overflow(pipe, prompt, 1 + config.lookahead)  # and the text encoder's 77 tokens
        proposed = [] if full or overflow else lm.propose(prompt, config.top_k, min_prob=config.min_prob)
        # a word of several CLIP tokens can outgrow the limit that the slots fitted
        cands = [w for w in proposed if slots_overflow(pipe, f"{prompt} {w}", 0) is None]
        if not cands:  # a row all the same: the table keeps its columns and says why the prompt stopped growing
            why = (f"the LM's context ({lm.context} tokens) is full" if full else overflow
                   or (f"every proposed word would take {prompt[:40]!r}... over the text encoder's token limit"
                       if proposed else f"LM proposed no word above min_prob={config.min_prob:g}"))
            rows.append(dict(round=rnd, prompt=prompt, word=None, cosine=math.nan, candidates=0, proposed="",
                             loss_start=math.nan, loss_end=math.nan, loss_prompt=math.nan, best_loss=best,
                             p_class=math.nan, fooled_fraction=math.nan, end_prob=math.nan, found=False, category=None,
                             stopped=why))
            if save is not None:
                save(rows)
            break
        emb = torch.zeros(1 + config.lookahead, d)
        history, stopped = [], None
        if bar is not None:
            bar.set_postfix_str(f"{cls}, word {rnd + 1}", refresh=False)
        for it in range(config.iterations if len(cands) > 1 else 0):  # one candidate: the choice is forced
            emb.requires_grad_(True)
            img = render_with_slots(pipe, [prompt] * len(seeds), emb, seeds, steps, guidance, config.grad_from_step)
            loss = ensemble.loss(ensemble.probs(img), cls, "lose").mean()
            history.append(float(loss.detach()))
            g, scale = scaled_grad(loss, emb, scale)
            del img, loss  # frees the graph (kept for a retry while the loss is scaled)
            problem = grad_problem(g[None])[0]
            if problem is not None:  # the word is chosen from the embedding reached so far
                stopped = f"{problem} at iteration {it}"
                emb = emb.detach()
                break
            emb = signed_step(emb.detach(), g, config.lr, lo, hi)
            if bar is not None:
                bar.update()
        table = torch.stack([word_embedding(pipe, w) for w in cands])
        cos = slot_cosine(pipe, table, emb[0].detach().float()[None])
        pick = int(cos.argmax())
        prompt = f"{prompt} {cands[pick]}"
        with torch.no_grad():
            probs = ensemble.probs(render_with_slots(pipe, [prompt] * len(seeds), None, seeds, steps, guidance,
                                                     grad=False))
            fooled = ensemble.judge(probs, cls, "lose").float().mean().item()
            p_cls = ensemble.class_prob(probs, cls).mean().item()
            loss_p = ensemble.loss(probs, cls, "lose").mean().item()
        best = loss_p if math.isnan(best) else min(best, loss_p)
        end = lm.end_prob(prompt)
        found = fooled >= config.success_fraction and end >= config.min_end_prob
        # the embedding never moved (one candidate, no iterations, or a zero gradient at the first): the pick is the
        # LM's first proposal, and a cosine to the all-zero start embedding means nothing (NaN)
        cosine = float(cos[pick]) if bool(emb[0].detach().any()) else math.nan
        rows.append(dict(round=rnd, prompt=prompt, word=cands[pick], cosine=cosine, candidates=len(cands),
                         proposed=", ".join(cands),
                         loss_start=history[0] if history else math.nan, loss_end=history[-1] if history else math.nan,
                         loss_prompt=loss_p, best_loss=best, p_class=p_cls, fooled_fraction=fooled, end_prob=end,
                         found=found,
                         category=categorize(prompt, base, cls, class_words, attribute_words,
                                            ensemble.groups.get(cls.strip().lower(), ())) if found else None,
                         stopped=stopped))
        if save is not None:
            save(rows)
        if found and config.stop_on_success:
            break
    return rows


def _no_word(word) -> bool:
    """A round that added no word (or a missing string): ``None``, or ``NaN`` once a rounds file has been read back
    (pandas stores a column of strings and ``None`` as strings, which read back with ``NaN``)."""
    return word is None or (isinstance(word, float) and math.isnan(word))


def check_prompt_search(pipe, ensemble: Ensemble, lm: CandidateLM, classes: Sequence[str], seeds: Sequence[int],
                        steps: int, config: PromptSearch) -> None:
    """Everything :func:`search_prompt` checks before rendering, for each of ``classes``: the pipeline, the seeds
    (some, none repeated), ``grad_from_step``, the class (ensemble), the template with the class for the LM (known
    words, room for ``n_words`` more tokens in its context) and for the text encoders (room for the first round's
    ``1 + lookahead`` slots; a later round that would not fit ends the search with the reason in ``stopped``)."""
    _check_pipe(pipe)
    check_seeds(seeds)
    check_grad_from_step(config.grad_from_step, steps)
    for c in classes:
        ensemble.indices(c)
        lm.encode(config.template.format(cls=c), room=config.n_words)
        overflow = slots_overflow(pipe, config.template.format(cls=c), 1 + config.lookahead)
        if overflow:
            raise PromptError(f"the template leaves no room for the searched words: {overflow}")


def check_grad_from_step(grad_from_step: int, steps: int) -> None:
    """Raise :class:`ValueError` unless ``0 <= grad_from_step < steps``: the slot embeddings reach the image only
    through the denoising steps run with gradient, so at least one must be."""
    if not 0 <= grad_from_step < steps:
        raise ValueError(f"grad_from_step must be in [0, {steps - 1}] for {steps} sampling steps (gradients reach the "
                         f"embeddings only through the steps from it on), got {grad_from_step}")


def _context_full(lm: CandidateLM, prompt: str) -> bool:
    """Whether ``prompt`` leaves no room for another LM token (an LM that does not say its context: never)."""
    context = getattr(lm, "context", None)
    if context is None:
        return False
    try:
        return len(lm.encode(prompt, room=0)) >= context
    except PromptError:  # re-encoded, the prompt is longer than the context
        return True


def final_prompts(rounds, classes: Sequence[str]):
    """Each class's result, one row per class in ``classes`` order: its first found round, else its best round by
    ``loss_prompt`` (reported as not found; the first round when no prompt was rendered)."""
    import pandas as pd

    rows = []
    for c in classes:
        d = rounds[rounds["cls"] == c].sort_values("round")
        if d.empty:
            raise ValueError(f"no search rounds for class {c!r}; classes searched: {sorted(set(rounds['cls']))}")
        hits = d[d["found"].eq(True)]  # NaN or a string is not a find
        losses = d["loss_prompt"].to_numpy(float)
        if len(hits):
            rows.append(hits.iloc[0])
        elif not np.isnan(losses).all():
            rows.append(d.iloc[int(np.nanargmin(losses))])  # the earliest round among equal losses
        else:
            rows.append(d.iloc[0])
    return pd.DataFrame(rows).reset_index(drop=True)


def prompt_key(pipe, ensemble: Ensemble, lm: CandidateLM, cls: str, seeds: Sequence[int], steps: int,
               guidance: float, config: PromptSearch, class_words: Sequence[str] = (),
               attribute_words: Sequence[str] = ()) -> str:
    """:func:`lib.sage.resume.campaign_key` of one class's prompt search: the weights (pipeline, ensemble, LM), the
    LM's tokenizer, the seeds, every setting and the search's rules version (:data:`RULES`)."""
    from lib.sage.resume import campaign_key

    return campaign_key(pipe, ensemble, {"lm": lm.model}, lm_tokenizer=getattr(lm, "fingerprint", None),
                        cls=cls, seeds=list(seeds), steps=steps, guidance=guidance, config=asdict(config),
                        class_words=list(class_words), attribute_words=list(attribute_words), rules=RULES)


def prompt_campaign(pipe, ensemble: Ensemble, lm: CandidateLM, classes: Sequence[str], seeds: Sequence[int],
                    steps: int = 25, guidance: float = 7.5, config: PromptSearch = PromptSearch(),
                    class_words: Sequence[str] = (), attribute_words: Sequence[str] = (),
                    out_dir: str | Path | None = None, resume: bool = True, progress: Any = False) -> pd.DataFrame:
    """:func:`search_prompt` for each class; returns the rounds of all classes (column ``cls``).

    With ``out_dir`` each finished class is written at once (atomically) to
    ``out_dir/prompt_rounds_<cls>_<key>.parquet``, ``key`` hashing the weights (pipeline, ensemble, LM), the seeds
    and every setting; with ``resume`` a finished class is loaded instead of searched again (an unreadable file: searched
    again, with a warning). A class's rounds are written as they finish too (``.<that name's stem>.rounds.parquet``,
    removed when the class is done), so a search interrupted mid-class resumes after its last finished round. Every
    class is checked (:func:`check_prompt_search`) before the first search, so a class the ensemble or the LM cannot
    take fails before any other class is searched. ``progress``: a flag or a bar (:mod:`lib.progress`), one bar over
    every class's embedding iterations (``n_words × iterations`` per class; a loaded class counts as done).
    """
    import pandas as pd

    from lib.atomic import remove_stale_tmp, write_parquet_atomic

    check_prompt_search(pipe, ensemble, lm, classes, seeds, steps, config)  # every class, before the first search
    if out_dir is not None and Path(out_dir).is_dir():
        remove_stale_tmp(out_dir)  # a killed run's half-written file
    parts = []
    per_class = config.n_words * config.iterations
    closing = ExitStack()  # closes a bar made here, not the caller's
    bar = closing.enter_context(progress_bar(progress, len(classes) * per_class, "prompt searches"))
    try:
        for c in classes:
            path = None
            if out_dir is not None:
                key = prompt_key(pipe, ensemble, lm, c, seeds, steps, guidance, config, class_words, attribute_words)
                path = Path(out_dir) / f"prompt_rounds_{c}_{key}.parquet".replace(" ", "-")
            df = _read_rounds(path) if path is not None and resume and path.is_file() else None
            if df is not None:
                df = df.assign(resumed=True)
                _rounds_file(path).unlink(missing_ok=True)  # left by a kill between the class file and its removal
                if bar is not None:
                    bar.update(per_class)
            else:
                partial = None if path is None else _rounds_file(path)
                if partial is not None and not resume and partial.exists():
                    partial.unlink()  # resume=False: every round searched again
                df = search_prompt(pipe, ensemble, lm, c, seeds, steps, guidance, config, class_words, attribute_words,
                                   bar if bar is not None else False, rounds_file=partial).assign(cls=c)
                if path is not None:
                    write_parquet_atomic(df, path)
                    partial.unlink(missing_ok=True)  # the class's file holds its rounds now
                df = df.assign(resumed=False)
            parts.append(df)
    finally:
        closing.close()
    return pd.concat(parts, ignore_index=True)


def _rounds_file(path: Path) -> Path:
    """Where a class's rounds are written while it is searched: beside its class file, hidden, so a listing of
    ``prompt_rounds_*.parquet`` finds only finished classes."""
    return path.with_name(f".{path.stem}.rounds.parquet")


def _read_rounds(path: Path, then: str = "searching its class again"):
    """A class's finished rounds written by :func:`prompt_campaign` (or a search's ``rounds_file``), with the columns
    older files lack; None (and a warning: the class is searched again and the file overwritten) when the file is
    unreadable."""
    import pandas as pd

    try:
        df = pd.read_parquet(path)
    except Exception as err:  # noqa: BLE001 - a truncated or foreign file: search again, say so
        why = (str(err).splitlines() or [type(err).__name__])[0]
        warnings.warn(f"ignoring unreadable prompt-search result {path.name} ({why}); {then}", stacklevel=3)
        return None
    if "stopped" not in df:  # written before searches recorded why they stopped
        df["stopped"] = None
    for col in ("loss_prompt", "best_loss"):  # written before the prompts' own losses were recorded
        if col not in df:
            df[col] = math.nan
    return df


# ------------------------------------------------------------------------------------------------ failure categories
# The version of the search's rules in its resume key: 2 (2026-12-06) ends a text at a one-token ".", "!", "?" or
# newline too, takes SDXL's nearest word by the mean of the two encoders' cosines and keeps a class's own group out of
# "concept overwrite"; 3 (2026-12-07) reports no cosine (NaN) for a word picked while the embedding never moved; campaigns
# saved under earlier rules are searched again, not resumed.
RULES = 3

CATEGORIES: dict[str, str] = {
    "concept overwrite": "an added word names another class (another object takes over the image)",
    "attribute": "an added word is an attribute (color, style, material...) that displaces the class",
    "context": "anything else: the added words change the context and the class gets lost",
}


def categorize(prompt: str, base: str, cls: str, class_words: Sequence[str] = (),
               attribute_words: Sequence[str] = (), same_class: Sequence[str] = ()) -> str:
    """Approximate failure category of a found prompt from the words added to ``base`` (see :data:`CATEGORIES`).
    ``same_class``: names of ``cls`` itself (an ImageNet group's labels, "tabby" for "cat"): not another class.

    A heuristic on words only, not a judgement of the image: the paper's ten categories were made by hand.
    """
    added = " " + prompt[len(base):].strip().lower() + " " if prompt.startswith(base) else " " + prompt.lower() + " "
    has = lambda words: any(f" {w.lower()} " in added for w in words)  # noqa: E731
    same = {cls.strip().lower()} | {w.strip().lower() for w in same_class}
    if has([w for w in class_words if w.strip().lower() not in same]):
        return "concept overwrite"
    if has(attribute_words):
        return "attribute"
    return "context"
