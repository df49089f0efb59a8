"""A real CLIP BPE tokenizer built offline from the vocabulary that ships inside ``open_clip``."""

from __future__ import annotations

import gzip
import importlib.util
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

MAX_LENGTH = 77  # CLIP's context length, used by every Stable Diffusion text encoder
_N_MERGES = 48_894  # merges used by CLIP (the file holds more lines than CLIP uses)


def _bpe_path() -> Path:
    """Path of ``bpe_simple_vocab_16e6.txt.gz`` inside the installed ``open_clip`` (without importing it)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("open_clip_torch is not installed: `pip install open_clip_torch` (it ships the CLIP BPE).")
    path = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"CLIP BPE vocabulary not found at {path}; reinstall open_clip_torch.")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable-character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """CLIP's 49,408-token vocabulary and its merges, exactly as OpenAI's CLIP defines them."""
    lines = gzip.open(_bpe_path(), "rt", encoding="utf-8").read().split("\n")
    merges = lines[1 : _N_MERGES + 1]
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def build_clip_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """A ``CLIPTokenizer`` identical to what transformers loads from ``openai/clip-vit-large-patch14``'s files, built
    with no network access (like it, and unlike OpenAI's reference tokenizer, it neither unescapes HTML entities nor
    repairs mis-decoded text with ftfy).

    ``pad_token="!"`` gives the padding of SD 2.x's tokenizer and SDXL's second tokenizer as transformers loads them
    (OpenCLIP pads with 0, the id of "!"). As there, a "!" written in the text then becomes the pad token too ("wow!"
    and "!!" tokenise differently from the default tokenizer): a caption with "!" has other token positions there.
    """
    vocab, merges = clip_vocab_and_merges()
    pairs = [tuple(m.split()) for m in merges]
    return CLIPTokenizer(dict(vocab), pairs, pad_token=pad_token, model_max_length=MAX_LENGTH)
