"""Toy-world causal LM: word-level tokenizer, HF round trip, committed model speaks the grammar."""

import pytest
import torch

from lib.speed import cpu_threads
from lib.toy import lm
from lib.toy import world as W


@pytest.fixture(scope="module")
def tokenizer():
    return lm.build_tokenizer()


def test_vocabulary(tokenizer):
    words = lm.grammar_words()
    assert {"red", "star", "van", "gogh", "r2d2", ",", "painted"} <= set(words)
    assert len(tokenizer) == len(words) + 3
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == [lm.EOS, lm.UNK, lm.PAD]


def test_tokenizer_round_trip(tokenizer):
    for text in lm.sample_captions(200, seed=0):
        ids = tokenizer(text).input_ids
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == text
    assert tokenizer("A Photo of a zebra").input_ids[-1] == tokenizer.unk_token_id
    assert tokenizer("A Photo of a Red Star").input_ids == tokenizer("a photo of a red star").input_ids  # lower-cased
    ids = tokenizer("a red star, in the style of van gogh").input_ids  # one id per word and comma, no specials
    assert tokenizer.convert_ids_to_tokens(ids) == ["a", "red", "star", ",", "in", "the", "style", "of", "van", "gogh"]


def test_loads_with_auto_classes(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = lm.build_model(tokenizer)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path)
    t2 = AutoTokenizer.from_pretrained(tmp_path)
    assert m2.config.n_embd == 64 and m2.config.n_layer == 2 and m2.config.n_positions == 32
    text = "a photo of a red star"
    assert t2(text).input_ids == tokenizer(text).input_ids
    ids = t2(text, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(m2(ids).logits, model.eval()(ids).logits)


def test_committed_lm_continues_with_grammar_words():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(lm.DEFAULT_DIR).eval()
    tok = AutoTokenizer.from_pretrained(lm.DEFAULT_DIR)
    ids = tok("a photo of a", return_tensors="pt").input_ids
    with torch.no_grad():
        nxt = int(model(ids).logits[0, -1].argmax())
        out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    assert tok.convert_ids_to_tokens(nxt) in set(W.COLORS + W.OBJECTS + W.ACTIONS)
    text = tok.decode(out[0], skip_special_tokens=True)
    W.parse_caption(text)  # greedy decoding produces a caption of the grammar
    top = [w for w, _ in lm.next_words(model, tok, "a photo of a red", k=5)]
    assert set(top) <= set(W.OBJECTS + W.ACTIONS)


def test_training_batches_end_each_caption_and_skip_the_padding(tokenizer):
    ids, mask, labels = lm._batch(tokenizer, ["a red star", "a star"])
    eos = tokenizer.convert_tokens_to_ids(lm.EOS)
    assert ids.shape == labels.shape == (2, 4) and mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert labels[0, -1] == eos and labels[1, 2] == eos  # the LM learns where a caption ends
    assert labels[1, 3] == -100  # padding is never a target


def test_the_lm_is_validated_on_other_captions_than_it_trains_on(tmp_path, monkeypatch):
    seen = []
    real = lm.caption_loss
    monkeypatch.setattr(lm, "caption_loss", lambda model, tok, texts: seen.append(list(texts)) or real(model, tok,
                                                                                                        texts[:8]))
    with torch.random.fork_rng():  # train_lm seeds torch; threads=None leaves the thread count alone
        lm.train_lm(tmp_path, steps=1, batch_size=4, seed=3, threads=None)
    assert len(seen[0]) == 2000 and seen[0][:4] != lm.sample_captions(4, 3)


def test_training_gives_the_caller_its_thread_count_back(tmp_path, monkeypatch):
    real = lm.caption_loss
    monkeypatch.setattr(lm, "caption_loss", lambda model, tok, texts: real(model, tok, texts[:8]))
    with cpu_threads(3), torch.random.fork_rng():  # a notebook's count; train_lm trains on its own (threads=1)
        lm.train_lm(tmp_path, steps=1, batch_size=4, seed=3, threads=1)
        assert torch.get_num_threads() == 3
