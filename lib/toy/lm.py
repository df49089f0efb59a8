"""A tiny causal LM of the toy world's captions, saved as an ordinary transformers folder.

``GPT2LMHeadModel`` (n_embd 64, 2 layers, 2 heads, n_positions 32) over a word-level ``PreTrainedTokenizerFast``
(one token per grammar word and ","; plus ``<|endoftext|>``, ``<unk>``, ``<pad>``)::

    python -m lib.toy.lm --out data/toy/lm --steps 1500

then ``AutoModelForCausalLM.from_pretrained("data/toy/lm")`` and ``AutoTokenizer.from_pretrained("data/toy/lm")`` load it
offline.  SAGE uses it to propose natural next words (``"a photo of a red"`` -> star, circle, ...).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from lib.atomic import save_pretrained_atomic, write_text_atomic
from lib.paths import TOY_DIR
from lib.speed import cpu_threads
from lib.toy import world as W

DEFAULT_DIR = TOY_DIR / "lm"
EOS, UNK, PAD = "<|endoftext|>", "<unk>", "<pad>"
MAX_POSITIONS = 32
REBUILD = "python -m lib.toy.lm --out data/toy/lm --steps 1500"


def all_scenes() -> list[W.Scene]:
    """Every valid scene of the world (generic objects with/without color, and characters)."""
    opt = lambda xs: (None,) + tuple(xs)  # noqa: E731
    out = [W.Scene(object=o, color=c, style=s, action=a, background=b) for o in W.OBJECTS for c in opt(W.COLORS)
           for s in opt(W.STYLES) for a in opt(W.ACTIONS) for b in opt(W.BACKGROUNDS)]
    out += [W.Scene(character=ch, style=s, action=a, background=b) for ch in W.CHARACTERS for s in opt(W.STYLES)
            for a in opt(W.ACTIONS) for b in opt(W.BACKGROUNDS)]
    return out


def grammar_words() -> list[str]:
    """Every word (and ",") that the caption grammar can produce, sorted."""
    return sorted({w for s in all_scenes() for c in W.captions(s) for w in c.replace(",", " ,").split()})


def build_tokenizer():
    """Word-level fast tokenizer: lower-cases, splits on whitespace and punctuation, decodes "a , b" as "a, b"."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([EOS, UNK, PAD] + grammar_words())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
                                   model_max_length=MAX_POSITIONS, clean_up_tokenization_spaces=True)


def build_model(tokenizer):
    """An untrained GPT-2 of the brief's size for ``tokenizer``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=2, n_positions=MAX_POSITIONS,
                     bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id)
    return GPT2LMHeadModel(cfg)


def sample_captions(n: int, seed: int, split: str = "any") -> list[str]:
    """``n`` captions drawn the way the world draws them (scene, then a phrasing)."""
    rng = np.random.default_rng(seed)
    return [W.caption(W.sample_scene(rng, split), rng) for _ in range(n)]


def _batch(tokenizer, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    enc = tokenizer([t + EOS for t in texts], padding=True, return_tensors="pt")
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    return enc.input_ids, enc.attention_mask, labels


@torch.no_grad()
def caption_loss(model, tokenizer, texts: Sequence[str]) -> float:
    """Mean next-token cross-entropy (nats) over ``texts`` (each followed by ``<|endoftext|>``)."""
    ids, mask, labels = _batch(tokenizer, texts)
    return float(model.eval()(input_ids=ids, attention_mask=mask, labels=labels).loss)


@torch.no_grad()
def next_words(model, tokenizer, prompt: str, k: int = 5) -> list[tuple[str, float]]:
    """The ``k`` most likely next tokens after ``prompt`` with their probabilities."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    probs = model.eval()(input_ids=ids).logits[0, -1].softmax(-1)
    top = probs.topk(k)
    return [(tokenizer.convert_ids_to_tokens(int(i)), float(p)) for p, i in zip(top.values, top.indices)]


@cpu_threads()  # the thread count it sets is the caller's again afterwards
def train_lm(out_dir: str | Path = DEFAULT_DIR, steps: int = 1500, seed: int = 0, batch_size: int = 128,
             lr: float = 3e-3, split: str = "any", threads: int | None = 1) -> dict:
    """Train on freshly sampled captions (``split`` of the world, "any" by default: the grammar is the language) and
    save model + tokenizer + ``training.json`` to ``out_dir``."""
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    t0 = time.time()
    tokenizer = build_tokenizer()
    model = build_model(tokenizer).train()
    texts = sample_captions(steps * batch_size, seed, split)
    val = sample_captions(2000, seed + 10_000, split)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, i / steps))))
    losses = []
    for step in range(steps):
        ids, mask, labels = _batch(tokenizer, texts[step * batch_size : (step + 1) * batch_size])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 250 == 0:
            print(f"[lm] step {step + 1}/{steps} loss {np.mean(losses[-250:]):.4f} {time.time() - t0:.0f}s",
                  file=sys.stderr, flush=True)
    model.eval()
    info = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "split": split,
            "final_train_loss": round(float(np.mean(losses[-50:])), 4),
            "val_loss": round(caption_loss(model, tokenizer, val), 4), "n_val": len(val),
            "wall_s": round(time.time() - t0, 1), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "n_params": sum(p.numel() for p in model.parameters()), "rebuild": REBUILD}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_pretrained_atomic(model, out)
    save_pretrained_atomic(tokenizer, out)
    write_text_atomic(json.dumps(info, indent=2) + "\n", out / "training.json")
    return info


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(DEFAULT_DIR))
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--split", default="any", choices=("any", "train", "heldout"))
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    print(json.dumps(train_lm(a.out, a.steps, a.seed, a.batch_size, split=a.split, threads=a.threads), indent=2))


if __name__ == "__main__":
    main()
