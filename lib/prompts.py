"""Prompt checks shared by every method: length limits and locating a subject's tokens."""

from __future__ import annotations

from typing import Sequence

from transformers import PreTrainedTokenizerBase


class PromptError(ValueError):
    """A prompt cannot be used as given (too long, or the subject is not in it)."""


def check_length(tokenizer: PreTrainedTokenizerBase, prompts: str | Sequence[str], truncate: bool = False,
                 fix: str = "shorten it") -> None:
    """Raise ``PromptError`` for a prompt longer than the encoder's context, unless truncation is asked for; ``fix``
    says what the caller can do about it."""
    limit = tokenizer.model_max_length
    for p in [prompts] if isinstance(prompts, str) else prompts:
        n = len(tokenizer(p, truncation=False).input_ids)
        if n > limit and not truncate:
            raise PromptError(f"prompt has {n} tokens (limit {limit} with start/end): {p[:60]!r}...; {fix}")


def subject_occurrences(tokenizer: PreTrainedTokenizerBase, prompt: str, subject: str) -> list[list[int]]:
    """Token positions (with the start token at 0) of every non-overlapping occurrence of ``subject`` in ``prompt``,
    in order; empty when its tokens do not occur contiguously (absent, or tokenised differently in context)."""
    ids = tokenizer(prompt, truncation=False).input_ids
    sub = tokenizer(subject, add_special_tokens=False).input_ids
    out: list[list[int]] = []
    start = 0
    while sub and start <= len(ids) - len(sub):
        if ids[start : start + len(sub)] == sub:
            out.append(list(range(start, start + len(sub))))
            start += len(sub)
        else:
            start += 1
    return out


def subject_positions(tokenizer: PreTrainedTokenizerBase, prompt: str, subject: str) -> list[int]:
    """Token positions (with the start token at 0) of the one occurrence of ``subject`` inside ``prompt``.

    Raises ``PromptError`` naming the caption, the subject and both tokenisations when the subject's tokens do
    not occur contiguously in the caption (absent, or tokenised differently in context), and when they occur more
    than once: corrupting one span would leave the subject readable in the other, and "the last subject token" would
    be ambiguous.
    """
    found = subject_occurrences(tokenizer, prompt, subject)
    if len(found) == 1:
        if found[0][-1] >= tokenizer.model_max_length - 1:  # past the encoder's context (the end token's place)
            raise PromptError(f"subject {subject!r} is at token positions {found[0]} of caption {prompt!r}, beyond the "
                              f"{tokenizer.model_max_length}-token context; shorten the caption")
        return found[0]
    if found:
        raise PromptError(f"subject {subject!r} is named {len(found)} times in caption {prompt!r} (at token "
                          f"positions {found}); name it once")
    raise subject_not_found(tokenizer, prompt, subject)


def subject_not_found(tokenizer: PreTrainedTokenizerBase, prompt: str, subject: str) -> PromptError:
    """The error for a subject whose tokens do not occur in the caption, naming both tokenisations."""
    ids = tokenizer(prompt, truncation=False).input_ids
    sub = tokenizer(subject, add_special_tokens=False).input_ids
    return PromptError(
        f"subject {subject!r} (tokens {tokenizer.convert_ids_to_tokens(sub)}) not found in caption {prompt!r} "
        f"(tokens {tokenizer.convert_ids_to_tokens(ids)})"
    )
