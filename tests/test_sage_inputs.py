"""SAGE inputs that used to slip through: member settings and the scheduler in the resume key, an aliasing CLIP
resize, an LM that proposes nothing, a latent that is not a tensor; and method steps a review found untested
(subword words, the nearest candidate, the shell projection, the CLIP-Score change, atomic writes, batched verdicts)."""

import math
import os
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from diffusers import DDIMScheduler
from torch import nn

from lib.sage.latent import (
    LatentSearch, LatentShapeError, latent_campaign, load_latent, search_latent, search_latents, shell_bounds,
)
from lib.sage.loss import ClipMember, EdgeMember, Ensemble, FnMember
from lib.sage.prompt import CandidateLM, PromptError, PromptSearch, final_prompts, prompt_campaign, search_prompt
from lib.atomic import write_atomic, write_parquet_atomic, write_safetensors_atomic
from lib.sage.resume import campaign_key, member_settings
from lib.sage.token import TokenAttack, TokenResult, evaluate_token, train_token
from lib.scoring import ClipScorer
from lib.twins import build_twin
from test_sage import LABELS, const_member, one_thread, pipe, small_net  # noqa: F401 - shared fixtures and helpers

NOTEBOOK_02_COLUMNS = ["cls", "round", "prompt", "word", "cosine", "loss_start", "loss_end", "loss_prompt", "best_loss",
                       "p_class", "fooled_fraction", "found", "category", "stopped"]  # what notebooks/02 reads


def edge_ensemble(**edge) -> Ensemble:
    """The same weights every time (seeded); only the edge member's settings vary."""
    return Ensemble([FnMember(small_net(seed=1), LABELS, "a"), EdgeMember(FnMember(small_net(seed=3), LABELS, "c"),
                                                                          name="edge", **edge)])


# ------------------------------------------------------------------------------------------------------ resume key
def scheduler_pipe(**config) -> SimpleNamespace:
    """No weights (the fingerprint skips missing modules), only a scheduler: the key's scheduler part alone."""
    base = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                set_alpha_to_one=False, steps_offset=1)
    return SimpleNamespace(scheduler=DDIMScheduler(**{**base, **config}))


def test_the_key_changes_with_edge_member_settings():
    p = scheduler_pipe()
    key = campaign_key(p, edge_ensemble())
    assert campaign_key(p, edge_ensemble()) == key  # a rebuilt, identical ensemble: the same key
    for change in (dict(low=0.05), dict(high=0.3), dict(sigma=2.0), dict(invert=False), dict(gradient="soft")):
        assert campaign_key(p, edge_ensemble(**change)) != key, change


def test_the_key_changes_with_the_clip_logit_scale():
    def clip(scale: float) -> Ensemble:
        torch.manual_seed(0)
        vis, txt = nn.Sequential(nn.Conv2d(3, 8, 4, 4), nn.AdaptiveAvgPool2d(1), nn.Flatten()), nn.Embedding(100, 8)
        scorer = ClipScorer(encode_image=vis, encode_text=lambda ids: txt(ids).mean(1), module=vis, image_size=32,
                            tokenize=lambda ts: torch.tensor([[len(w) % 100 for w in t.split()] for t in ts]))
        return Ensemble([ClipMember(scorer, LABELS, logit_scale=scale)])

    p = scheduler_pipe()
    assert campaign_key(p, clip(100.0)) == campaign_key(p, clip(100.0))
    assert campaign_key(p, clip(50.0)) != campaign_key(p, clip(100.0))
    assert member_settings(clip(50.0).members[0])["scorer"]["image_size"] == 32  # the scorer's preprocessing counts


def test_the_key_changes_with_the_scheduler_config():
    ens = edge_ensemble()
    key = campaign_key(scheduler_pipe(), ens)
    assert campaign_key(scheduler_pipe(), ens) == key  # a fresh scheduler, same config: the same key
    assert campaign_key(scheduler_pipe(beta_end=0.02), ens) != key
    assert campaign_key(scheduler_pipe(timestep_spacing="trailing"), ens) != key


def test_member_settings_recurse_into_the_wrapped_member():
    inner = EdgeMember(FnMember(small_net(), LABELS, "c"), low=0.3, high=0.4, name="inner-edge")
    s = member_settings(EdgeMember(inner, name="outer"))
    assert s["type"] == "EdgeMember" and s["low"] == 0.1 and s["invert"] is True
    assert s["inner"]["low"] == 0.3 and s["inner"]["inner"]["name"] == "c" and "training" not in s


# ----------------------------------------------------------------------------------------------- CLIP preprocessing
def captured_scorer(image_size: int) -> tuple[ClipScorer, list]:
    """A scorer whose image tower records the preprocessed pixels (mean 0, std 1: the resize alone)."""
    seen = []

    def encode_image(x):
        seen.append(x)
        return x.mean((2, 3))

    return ClipScorer(encode_image=encode_image, encode_text=lambda ids: ids.float(), tokenize=lambda ts: None,
                      image_size=image_size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)), seen


def test_the_clip_resize_is_antialiased():
    board = ((torch.arange(512)[:, None] + torch.arange(512)[None]) % 2).float().expand(1, 3, -1, -1)
    scorer, seen = captured_scorer(224)
    scorer.image_features(board)
    x = seen[0]
    assert x.shape == (1, 3, 224, 224)
    assert x.std() < 0.01 and abs(float(x.mean()) - 0.5) < 0.01, float(x.std())  # aliasing: std ≈ 0.2


def test_toy_size_images_are_not_resized():
    img = torch.rand(2, 3, 64, 64)
    scorer, seen = captured_scorer(64)  # the toy CLIP's size: its inputs reach the tower untouched
    scorer.image_features(img)
    assert torch.equal(seen[0], img)


# ----------------------------------------------------------------------------------------------- the prompt search
class StubLM:
    """Proposes ``words[round]`` (one word: no embedding optimisation), then nothing; never ends a sentence."""

    def __init__(self, *words: str):
        self.words = list(words)
        self.calls = 0
        self.model = nn.Linear(1, 1).requires_grad_(False)  # hashed into a campaign's key: fixed weights
        self.model.weight.zero_()
        self.model.bias.zero_()

    def encode(self, prefix: str, room: int = 1) -> list[int]:
        return [1]

    def propose(self, prefix: str, k: int = 20, scan: int = 2000, min_prob: float = 0.0) -> list[str]:
        self.calls += 1
        return [self.words[self.calls - 1]] if self.calls <= len(self.words) else []

    def end_prob(self, prompt: str) -> float:
        return 0.0


def test_an_lm_with_no_word_gives_one_row_saying_why(pipe, tmp_path):
    ens = edge_ensemble()
    cfg = PromptSearch(n_words=3, min_prob=0.25)
    df = search_prompt(pipe, ens, StubLM(), "cat", [0], steps=2, config=cfg)
    assert len(df) == 1 and df.found.tolist() == [False] and df.word.isna().all()
    assert df.stopped[0] == "LM proposed no word above min_prob=0.25" and df.prompt[0] == "a photo of a cat"
    assert math.isnan(df.best_loss[0])  # nothing rendered: no loss known
    grown = search_prompt(pipe, ens, StubLM("red"), "cat", [0], steps=2, config=cfg)
    assert list(df.columns) == list(grown.columns)  # the same columns as a normal round
    rounds = prompt_campaign(pipe, ens, StubLM(), ["cat"], [0], steps=2, config=cfg, out_dir=tmp_path)
    again = prompt_campaign(pipe, ens, StubLM(), ["cat"], [0], steps=2, config=cfg, out_dir=tmp_path)
    assert again.resumed.all() and again.stopped.tolist() == rounds.stopped.tolist()  # written and read back
    assert set(NOTEBOOK_02_COLUMNS) <= set(rounds.columns)
    final = final_prompts(rounds, ["cat"])  # notebook 02's choice of each class's result
    assert final.prompt.tolist() == ["a photo of a cat"] and not final.found.any()


def test_a_class_with_no_find_reports_its_best_loss(pipe):
    ens = edge_ensemble()
    df = search_prompt(pipe, ens, StubLM("red", "sleeping", "car"), "cat", [0, 1], steps=2,
                       config=PromptSearch(n_words=4))
    assert len(df) == 4 and not df.found.any() and df.stopped[:3].isna().all()
    assert df.word[:3].tolist() == ["red", "sleeping", "car"] and pd.isna(df.word[3])
    assert df.stopped[3].startswith("LM proposed no word")
    assert df.loss_prompt[:3].notna().all() and df.loss_prompt[:3].nunique() > 1  # the check is not vacuous
    assert df.best_loss[:3].tolist() == pytest.approx(df.loss_prompt[:3].cummin().tolist())
    assert df.best_loss.iloc[-1] == pytest.approx(df.loss_prompt.min())  # the best round's, not round 0's
    assert pd.isna(df.loss_prompt.iloc[-1])


def test_final_prompts_takes_the_first_find_else_the_best_round():
    rounds = pd.DataFrame(dict(
        cls=["cat"] * 3 + ["dog"] * 3 + ["car"],
        round=[0, 1, 2, 0, 1, 2, 0],
        prompt=["c0", "c1", "c2", "d0", "d1", "d2", "k0"],
        found=[False, True, True, False, False, False, False],
        loss_prompt=[0.5, -1.0, -1.5, 0.9, -0.2, math.nan, math.nan]))
    final = final_prompts(rounds.sample(frac=1, random_state=0), ["dog", "cat", "car"])
    assert final.prompt.tolist() == ["d1", "c1", "k0"]  # dog: best loss (not the last, not round 0); car: nothing rendered
    assert final.found.tolist() == [False, True, False]
    with pytest.raises(ValueError, match="no search rounds for class 'cow'"):
        final_prompts(rounds, ["cow"])
    twice = pd.concat([rounds[rounds.cls == "dog"]] * 2)  # a duplicated index (two campaigns concatenated)
    assert final_prompts(twice, ["dog"]).prompt.tolist() == ["d1"]
    odd = rounds[rounds.cls == "cat"].astype({"found": object})
    odd["found"] = [None, "False", math.nan]  # no boolean verdict is not a find
    assert final_prompts(odd, ["cat"]).prompt.tolist() == ["c2"] and not final_prompts(odd, ["cat"]).found.eq(True).any()


def byte_level_lm(n_positions: int = 64, eos_appended: bool = True, bos_is_eos: bool = False):
    """A GPT-2 shaped LM with a byte-level BPE tokenizer (no unknown token), built offline; its tokenizer appends
    EOS like some hub tokenizers do. Random weights: the words it proposes are arbitrary, the code paths are not."""
    from tokenizers import ByteLevelBPETokenizer, processors
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["a photo of a cat sleeping on a beach", "a picture of a dog jumping in a city"] * 20,
                            vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"])
    eos = bpe.token_to_id("<|endoftext|>")
    if eos_appended:
        bpe.post_processor = processors.TemplateProcessing(single="$A <|endoftext|>",
                                                           special_tokens=[("<|endoftext|>", eos)])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                  **({"bos_token": "<|endoftext|>"} if bos_is_eos else {}))  # as GPT-2's own
    cfg = GPT2Config(vocab_size=bpe.get_vocab_size(), n_positions=n_positions, n_embd=32, n_layer=1, n_head=2,
                     eos_token_id=eos, bos_token_id=eos)
    with torch.random.fork_rng():  # the same weights every time, the global RNG untouched
        torch.manual_seed(0)
        model = GPT2LMHeadModel(cfg)
    return CandidateLM(model, tok)


def test_a_sentence_end_counts_as_the_end_of_the_text():
    """A web-text LM ends a caption with "." far more often than with EOS: MIN_END_PROB would refuse every prompt."""
    tok = byte_level_lm().tokenizer
    vocab = tok.get_vocab()
    table = torch.full((len(vocab), len(vocab)), -20.0)
    table[vocab["Ġcat"], vocab["."]] = 6.0  # after "... cat": "." nearly surely, EOS (-20) almost never
    lm = CandidateLM(NextTokenTable(table, 64), tok)
    assert vocab["."] in lm.end_ids and tok.eos_token_id in lm.end_ids
    assert lm.end_prob("a photo of a cat") > 0.99
    table[vocab["Ġcat"], vocab["."]], table[vocab["Ġcat"], vocab["Ġsleeping"]] = -20.0, 6.0  # a word comes next
    assert lm.end_prob("a photo of a cat") < 0.01
    from lib.sage.build import load_lm

    toy = load_lm("toy")  # its vocabulary has no "." (it would be its unknown token): EOS alone, as before
    assert toy.end_ids == toy.eos_ids


def test_the_nearest_word_on_sdxl_weighs_both_encoders_alike():
    from lib.sage.prompt import slot_cosine

    twin = build_twin("sdxl")
    d1, d2 = (te.get_input_embeddings().embedding_dim for te in (twin.text_encoder, twin.text_encoder_2))
    slot = torch.cat([torch.ones(d1), torch.ones(d2)])[None]
    a = torch.cat([torch.ones(d1), -10 * torch.ones(d2)])  # first encoder agrees, second (large norm) opposes
    b = torch.cat([-torch.ones(d1), 0.5 * torch.ones(d2) + 0.5 * torch.randn(d2)])
    cos = slot_cosine(twin, torch.stack([a, b]), slot)
    assert torch.allclose(cos[0], torch.tensor(0.0), atol=1e-6)  # mean of +1 and -1
    assert cos[1] < 0  # -1 and well under +1
    sd1 = build_twin("sd-v1")
    w = torch.randn(3, d1)
    torch.testing.assert_close(slot_cosine(sd1, w, slot[:, :d1]), torch.nn.functional.cosine_similarity(w, slot[:, :d1]))


def test_a_byte_level_hub_style_lm_proposes_words_and_drives_the_search(pipe):
    lm = byte_level_lm()
    assert lm.tokenizer.unk_token_id is None and lm.tokenizer("a cat").input_ids[-1] == lm.tokenizer.eos_token_id
    ids = lm.encode("a photo of a cat")
    assert ids[-1] != lm.tokenizer.eos_token_id  # the appended EOS is dropped: the LM continues the text
    words = lm.propose("a photo of a cat", k=5)
    assert 0 < len(words) <= 5 and all(w.isalpha() for w in words) and len(set(words)) == len(words)
    assert lm.end_prob("a photo of a cat") < 0.5  # the EOS token's probability (1.0 would mean "no EOS known")
    df = search_prompt(pipe, edge_ensemble(), lm, "cat", [0], steps=2, config=PromptSearch(n_words=1, iterations=1))
    assert len(df) == 1 and df.prompt[0] == f"a photo of a cat {df.word[0]}" and df.candidates[0] > 1


def test_an_appended_eos_is_dropped_when_bos_is_eos_too():
    """GPT-2-style tokenizers declare one token as BOS and EOS; the appended EOS stayed, so the LM proposed the
    first words of a new text and end_prob measured P(EOS | ... EOS)."""
    lm = byte_level_lm(bos_is_eos=True)
    eos = lm.tokenizer.eos_token_id
    assert lm.tokenizer.bos_token_id == eos and lm.tokenizer("a photo of a cat").input_ids[-1] == eos
    assert lm.encode("a photo of a cat") == lm.tokenizer("a photo of a cat", add_special_tokens=False).input_ids
    assert lm.encode("a photo of a cat") == byte_level_lm().encode("a photo of a cat")


def test_the_end_of_sentence_check_reads_the_models_eos_when_the_tokenizer_has_none():
    """A tokenizer saved without its EOS made end_prob 1.0 for every prompt: MIN_END_PROB silently off."""
    from transformers import PreTrainedTokenizerFast

    lm = byte_level_lm(eos_appended=False)
    bare = CandidateLM(lm.model, PreTrainedTokenizerFast(tokenizer_object=lm.tokenizer.backend_tokenizer))
    assert bare.tokenizer.eos_token_id is None and bare.eos_ids == lm.eos_ids == {lm.model.config.eos_token_id}
    p = lm.end_prob("a photo of a cat")
    assert bare.end_prob("a photo of a cat") == pytest.approx(p) and p < 0.5
    lm.model.generation_config.eos_token_id = [lm.model.config.eos_token_id, 5]  # two ways to end, as Llama 3
    try:
        assert lm.eos_ids == {lm.model.config.eos_token_id, 5} and 5 in lm._special  # never proposed as a word
        assert lm.end_prob("a photo of a cat") > p  # P(EOS) + P(token 5)
    finally:
        lm.model.generation_config.eos_token_id = lm.model.config.eos_token_id


def test_a_template_the_lm_cannot_encode_is_a_prompt_error_without_an_unknown_token():
    """A BPE vocabulary without an UNK token drops the characters it lacks ("zebra" became "ebra"); a word-level
    vocabulary whose UNK the wrapper does not declare wrote "[UNK]" into the LM's context. Both passed silently."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator(["a photo of a cat sleeping on a beach", "a picture of a dog jumping in a city"] * 5,
                            trainers.BpeTrainer(vocab_size=80, special_tokens=["<eos>"]))
    word = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "photo": 2, "of": 3, "cat": 4}, unk_token="[UNK]"))
    word.pre_tokenizer = pre_tokenizers.Whitespace()
    for backend in (bpe, word):
        lm = CandidateLM(NextTokenTable(torch.zeros(backend.get_vocab_size(), backend.get_vocab_size()), 32),
                         PreTrainedTokenizerFast(tokenizer_object=backend))  # no unk_token declared
        assert lm.tokenizer.unk_token_id is None and len(lm.encode("a photo of a cat")) == 5
        with pytest.raises(PromptError, match=r"cannot encode 'a photo of a zebra': unknown word\(s\) \['zebra'\]"):
            lm.encode("a photo of a zebra")


def test_a_template_longer_than_the_lm_context_is_a_prompt_error(pipe):
    lm = byte_level_lm(n_positions=12, eos_appended=False)
    n = len(lm.encode("a photo of a cat"))
    assert len(lm.encode("a photo of a cat", room=12 - n)) == n  # exactly full is fine
    with pytest.raises(PromptError, match=rf"is {n} LM tokens and the LM's context holds 12: no room for {13 - n} more"):
        lm.encode("a photo of a cat", room=13 - n)
    fill = 12 - n  # as many words as the context holds (each proposed word is one token here)
    df = search_prompt(pipe, edge_ensemble(), lm, "cat", [0], steps=2,
                       config=PromptSearch(n_words=fill, iterations=0, min_end_prob=0.0, stop_on_success=False))
    assert len(df) == fill and len(lm.encode(df.prompt.iloc[-1], room=0)) == 12  # the last round fills the context
    long = "a photo of a cat " + "on a beach " * 4
    with pytest.raises(PromptError, match="the LM's context holds 12"):
        search_prompt(pipe, edge_ensemble(), lm, "cat", [0], steps=2, config=PromptSearch(template=long + "{cls}"))


def test_the_text_encoders_token_limit_ends_the_search_with_its_reason(pipe):
    """A template that fits 77 tokens with the first round's slots but not with a word more: the search keeps the
    rounds it made and says why it stopped (it raised mid-search and lost the class); one token more is refused before
    any rendering."""
    kw = dict(n_words=3, iterations=0, min_end_prob=0.0, stop_on_success=False)
    slots = 1 + PromptSearch().lookahead
    template = "a photo of a {cls}"
    while len(pipe.tokenizer(template.format(cls="cat")).input_ids) + slots < pipe.tokenizer.model_max_length:
        template = "red " + template  # one CLIP token each
    assert len(pipe.tokenizer(template.format(cls="cat")).input_ids) + slots == pipe.tokenizer.model_max_length
    df = search_prompt(pipe, edge_ensemble(), StubLM("red", "dog", "car"), "cat", [0], steps=2,
                       config=PromptSearch(template=template, **kw))
    assert len(df) == 2 and df.word[0] == "red" and pd.isna(df.word[1]) and df.loss_prompt[:1].notna().all()
    assert df.stopped[1].endswith(f"tokens, over the text encoder's limit of {pipe.tokenizer.model_max_length}")
    # a word of several CLIP tokens ("xqzvwk": 5) would outgrow the limit the slots fitted: not chosen, the reason given
    df = search_prompt(pipe, edge_ensemble(), StubLM("xqzvwk"), "cat", [0], steps=2,
                       config=PromptSearch(template=template, **kw))
    assert len(df) == 1 and pd.isna(df.word[0]) and "every proposed word would take" in df.stopped[0]
    with pytest.raises(PromptError, match="the template leaves no room for the searched words: .* over the text enc"):
        search_prompt(pipe, edge_ensemble(), StubLM("red"), "cat", [0], steps=2,
                      config=PromptSearch(template="red " + template, **kw))


# ----------------------------------------------------------------------------------------------- the latent search
def test_a_list_latent_raises_the_shape_error(pipe):
    ens = edge_ensemble()
    with pytest.raises(LatentShapeError, match=r"latent has shape list; this pipeline expects \(B, 4, 8, 8\)"):
        search_latents(pipe, ens, "a cat", "cat", latents=[[0.0] * 8] * 8, steps=2)
    with pytest.raises(LatentShapeError, match=r"shape \(4, 8, 8\)"):
        search_latents(pipe, ens, "a cat", "cat", latents=torch.zeros(4, 8, 8), steps=2)


# ------------------------------------------------------------------------------------------ subword words, the choice
class NextTokenTable(nn.Module):
    """A causal LM whose next-token logits depend on the last token only (``table[last]``), with a context length."""

    def __init__(self, table: torch.Tensor, context: int):
        super().__init__()
        self.table = nn.Parameter(table, requires_grad=False)
        self.config = SimpleNamespace(max_position_embeddings=context)

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.table[input_ids])


def table_lm(tok, nxt: dict[str, dict[str, float]], context: int = 32) -> CandidateLM:
    """A :class:`NextTokenTable` LM over ``tok``'s vocabulary: after token ``last`` the logits ``nxt[last]`` (every
    other token -20; a token without a row ends the text: EOS 6)."""
    vocab = tok.get_vocab()
    table = torch.full((len(vocab), len(vocab)), -20.0)
    table[:, tok.eos_token_id] = 6.0
    for last, row in nxt.items():
        table[vocab[last]] = -20.0
        for w, v in row.items():
            table[vocab[last], vocab[w]] = v
    return CandidateLM(NextTokenTable(table, context), tok)


def subword_lm(context: int = 32) -> CandidateLM:
    """WordPiece pieces ("sle" + "##eping" = "sleeping"); after "a photo of a cat" the most probable token is the
    fragment "sle", whose most probable continuation is "##eping"; "zz" goes on with "##zz" for ever."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["[UNK]", "[EOS]", "a", "photo", "of", "cat", "on", "red", "sle", "##eping", "zz", "##zz"]
    ids = {w: i for i, w in enumerate(vocab)}
    tk = Tokenizer(models.WordPiece(ids, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece(prefix="##")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="[EOS]")
    nxt = {"a": {"cat": 6.0}, "cat": {"sle": 6.0, "red": 5.0, "zz": 4.0, "on": 3.0, "[EOS]": 2.0},
           "sle": {"##eping": 6.0, "[EOS]": 1.0}, "##eping": {"on": 6.0, "[EOS]": 5.0}, "on": {"a": 6.0, "[EOS]": 1.0},
           "zz": {"##zz": 6.0, "[EOS]": 1.0}, "##zz": {"##zz": 6.0, "[EOS]": 1.0}}
    return table_lm(tok, nxt, context)


def test_a_subword_lm_proposes_whole_words_never_fragments():
    lm = subword_lm()
    assert lm.tokenizer("a photo of a cat sleeping").input_ids[-2:] == [8, 9]  # "sleeping" is two pieces here
    assert lm.propose("a photo of a cat", 3, min_prob=1e-3) == ["sleeping", "red", "on"]  # "zz…" never ends: dropped
    assert lm.propose("a photo of a cat", 1, min_prob=1e-3) == ["sleeping"]
    assert lm.propose("a photo of a cat", 3, min_prob=1e-3, max_pieces=1) == ["red", "on"]  # no room to finish
    # at the context's end a word that would need another piece is dropped too: 5 prompt tokens, context 6
    assert subword_lm(context=6).propose("a photo of a cat", 3, min_prob=1e-3) == ["red", "on"]
    assert subword_lm(context=7).propose("a photo of a cat", 3, min_prob=1e-3) == ["sleeping", "red", "on"]


def test_a_word_continued_by_a_hyphen_or_apostrophe_is_a_fragment_and_punctuation_ends_a_word():
    """"t" + "-shirt" and "don" + "'t" were proposed as the words "t" and "don"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["[UNK]", "[EOS]", "a", "photo", "of", "cat", "t", "##-", "##shirt", "don", "##'", "##t", "red", "##,"]
    tk = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece(prefix="##")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="[EOS]")
    lm = table_lm(tok, {"a": {"cat": 6.0}, "cat": {"t": 6.0, "don": 5.0, "red": 4.0}, "t": {"##-": 6.0},
                        "##-": {"##shirt": 6.0}, "don": {"##'": 6.0}, "##'": {"##t": 6.0}, "red": {"##,": 6.0}})
    ids = lm.encode("a photo of a cat") + tok.convert_tokens_to_ids(["t", "##-", "##shirt", "don", "##'", "##t"])
    assert tok.decode(ids) == "a photo of a cat t-shirt don't"
    assert lm.propose("a photo of a cat", 3, min_prob=1e-3) == ["red"]  # "red," is a whole word


def test_a_word_that_starts_with_a_bare_space_token_is_proposed():
    """Small SentencePiece vocabularies split " on" as "▁" + "o" + "n"; the bare "▁" was never a word's start, so the
    LM proposed nothing."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["<unk>", "</s>", "▁a", "▁photo", "▁of", "▁cat", "▁", "o", "n", "▁red"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="</s>")
    lm = table_lm(tok, {"▁a": {"▁cat": 6.0}, "▁cat": {"▁": 6.0, "▁red": 5.0}, "▁": {"o": 6.0}, "o": {"n": 6.0}})
    assert lm.propose("a photo of a cat", 3, min_prob=1e-3) == ["on", "red"]


def test_the_prompt_campaign_key_follows_the_lm_tokenizer(pipe, tmp_path):
    """Results found with one tokenizer were loaded for another over the same LM weights."""
    from transformers import PreTrainedTokenizerFast

    lm = byte_level_lm(eos_appended=False)
    other = CandidateLM(lm.model, PreTrainedTokenizerFast(tokenizer_object=lm.tokenizer.backend_tokenizer,
                                                          eos_token="<|endoftext|>", bos_token="<|endoftext|>"))
    assert lm.fingerprint != other.fingerprint and lm.fingerprint == byte_level_lm(eos_appended=False).fingerprint
    cfg = PromptSearch(n_words=1, iterations=0)
    first = prompt_campaign(pipe, edge_ensemble(), lm, ["cat"], [0], steps=2, config=cfg, out_dir=tmp_path)
    again = prompt_campaign(pipe, edge_ensemble(), other, ["cat"], [0], steps=2, config=cfg, out_dir=tmp_path)
    assert not first.resumed.any() and not again.resumed.any() and len(list(tmp_path.glob("*.parquet"))) == 2


def test_a_multi_piece_word_fills_the_lm_context_and_the_search_says_so(pipe):
    lm = subword_lm(context=8)  # the template is 5 tokens: room for 3 one-token words, but "sleeping" takes 2
    df = search_prompt(pipe, edge_ensemble(), lm, "cat", [0], steps=2,
                       config=PromptSearch(n_words=3, iterations=0, min_prob=1e-3, min_end_prob=0.0,
                                           stop_on_success=False))
    assert df.word[:2].tolist() == ["sleeping", "on"] and df.prompt[1] == "a photo of a cat sleeping on"
    assert len(lm.encode(df.prompt[1], room=0)) == 8 and pd.isna(df.word[2])
    assert df.stopped[2] == "the LM's context (8 tokens) is full"


class ListLM(StubLM):
    """Proposes the same words every round."""

    def propose(self, prefix: str, k: int = 20, scan: int = 2000, min_prob: float = 0.0) -> list[str]:
        return list(self.words)


def test_the_search_appends_the_candidate_nearest_to_the_optimised_embedding(pipe, monkeypatch):
    import lib.sage.prompt as SP

    for target in ("car", "dog"):  # not the first candidate
        x = SP.word_embedding(pipe, target)
        monkeypatch.setattr(SP, "signed_step", lambda emb, g, lr, lo, hi, x=x: torch.stack([x, -x]))
        df = search_prompt(pipe, edge_ensemble(), ListLM("red", "dog", "car"), "cat", [0], steps=2,
                           config=PromptSearch(n_words=1, iterations=1))
        assert df.word[0] == target and df.prompt[0] == f"a photo of a cat {target}"
        assert df.cosine[0] == pytest.approx(1.0, abs=1e-5) and df.candidates[0] == 3
    # one candidate: the word is forced, no embedding was optimised, so there is no cosine to report (it showed
    # 0.000, the cosine to the all-zero start)
    df = search_prompt(pipe, edge_ensemble(), ListLM("red"), "cat", [0], steps=2,
                       config=PromptSearch(n_words=1, iterations=3))
    assert df.word[0] == "red" and df.candidates[0] == 1 and pd.isna(df.cosine[0]) and pd.isna(df.loss_start[0])


def test_grad_from_step_outside_the_sampling_steps_is_a_value_error(pipe, monkeypatch):
    import lib.sage.prompt as SP
    import lib.sage.token as T

    def no_render(*a, **k):
        raise AssertionError("rendered before the settings were checked")

    monkeypatch.setattr(SP, "render_with_slots", no_render)
    monkeypatch.setattr(T, "render_with_slots", no_render)
    for cls in (PromptSearch, TokenAttack):  # a negative step: refused when the settings are made
        with pytest.raises(ValueError, match=rf"^{cls.__name__}\.grad_from_step: -1 is below the minimum 0$"):
            cls(grad_from_step=-1)
    for bad in (2, 5):
        with pytest.raises(ValueError, match=rf"grad_from_step must be in \[0, 1\] for 2 sampling steps.*got {bad}"):
            search_prompt(pipe, edge_ensemble(), ListLM("red", "dog"), "cat", [0], steps=2,
                          config=PromptSearch(grad_from_step=bad))
        with pytest.raises(ValueError, match=r"grad_from_step must be in \[0, 1\]"):
            train_token(pipe, edge_ensemble(), ["a photo of a cat"], "cat", "car", [0], steps=2,
                        config=TokenAttack(grad_from_step=bad))


# ----------------------------------------------------------------------------------------- latent search, token delta
def test_the_latent_search_projects_every_step_onto_the_shell(pipe, monkeypatch):
    import lib.sage.latent as L

    seen, real = [], L.sample_with_residual
    monkeypatch.setattr(L, "sample_with_residual", lambda p, lat, *a, **k: seen.append(lat.detach().clone())
                        or real(p, lat, *a, **k))
    lo, hi = shell_bounds(4 * 8 * 8, 1.0)
    norms = {}
    for sigmas in (1.0, None):
        seen.clear()
        cfg = LatentSearch(mode="lose", lr=1.0, iterations=3, shell_sigmas=sigmas, stop_on_success=False)
        r = search_latent(pipe, edge_ensemble(), "a photo of a cat", "cat", seed=0, steps=2, config=cfg)
        # 4 search renders, then the reported latent rendered once more as render_latent renders it
        assert r.iterations == 3 and len(seen) == 5 and r.delta.abs().max() > 0.9  # large steps were taken
        assert torch.equal(seen[-1], r.latent)
        norms[sigmas] = [float(z.float().norm()) for z in seen[1:4]]  # every latent after a step
    assert all(lo - 1e-4 <= n <= hi + 1e-4 for n in norms[1.0]), (lo, hi, norms[1.0])
    assert norms[None][-1] > hi  # without the projection the same steps leave the shell: the check is not vacuous


def test_the_latent_search_keeps_delta_in_its_box_without_the_shell(pipe):
    """lr 0.6 for 3 steps would take δ to ±1.8: the box stops it at each end (the shell projection, off here, comes
    after the box and wins over it; see the test above)."""
    for box in ((-1.0, 1.0), (-0.5, 0.25)):
        cfg = LatentSearch(mode="lose", lr=0.6, iterations=3, delta_range=box, shell_sigmas=None, stop_on_success=False)
        r = search_latent(pipe, edge_ensemble(), "a photo of a cat", "cat", seed=0, steps=2, config=cfg)
        assert (float(r.delta.min()), float(r.delta.max())) == box, (box, float(r.delta.min()), float(r.delta.max()))


def test_the_token_clip_score_change_is_with_minus_without(pipe, monkeypatch):
    import lib.sage.token as T

    def flat(pipe, prompts, slots, seeds, steps, guidance, grad_from_step=0, grad=True):
        return torch.full((len(prompts), 3, 64, 64), 0.75 if slots is not None else 0.25)  # with / without the token

    monkeypatch.setattr(T, "render_with_slots", flat)
    scorer = SimpleNamespace(score=lambda images, prompts: images.mean((1, 2, 3)))  # CLIP-Score = mean pixel
    res = TokenResult(torch.zeros(32), "cat", "car", meta=dict(steps=2, guidance=7.5))
    df = evaluate_token(pipe, edge_ensemble(), res, ["a photo of a cat"], [0, 1], scorer=scorer)
    assert df.clip_with.tolist() == [0.75, 0.75] and df.clip_without.tolist() == [0.25, 0.25]
    assert df.clip_image_delta.tolist() == [0.5, 0.5]  # with − without: positive when the token raises the score


# ----------------------------------------------------------------------------------------- batched verdicts, writes
def batch_size_member(name: str) -> FnMember:
    """Says "dog" for images seen in a batch of several, "cat" for an image seen alone."""
    def fn(x):
        z = 0 * x.mean((1, 2, 3))
        cat, dog = (0.0, 9.0) if x.shape[0] > 1 else (9.0, 0.0)
        return torch.stack([z + cat, z + dog, z], 1)
    return FnMember(fn, LABELS, name)


def test_a_batched_search_counts_as_found_only_if_its_solo_image_fools(pipe):
    cfg = LatentSearch(mode="lose", iterations=1)
    fickle = Ensemble([batch_size_member("f1"), batch_size_member("f2")])
    res = search_latents(pipe, fickle, "a photo of a cat", "cat", seeds=[0, 1], steps=2, config=cfg)
    assert len(res) == 2
    for r in res:  # fooled in the batch at once, not by the image that is saved and re-renders
        assert r.iterations == 0 and not r.found and r.meta["solo_fooled"] is False
        assert 0.0 <= r.meta["batch_solo_max_diff"] < 1e-4
    steady = Ensemble([const_member([0.0, 9.0, 0.0], name="d1"), const_member([0.0, 9.0, 0.0], name="d2")])
    res = search_latents(pipe, steady, "a photo of a cat", "cat", seeds=[0, 1], steps=2, config=cfg)
    assert len(res) == 2 and all(r.found and r.meta["solo_fooled"] is True for r in res)
    one = search_latent(pipe, steady, "a photo of a cat", "cat", seed=0, steps=2, config=cfg)
    assert one.found and one.meta["batch_solo_max_diff"] == 0.0 and one.meta["solo_fooled"] is True


def test_a_corrupt_latent_result_is_searched_again_with_a_warning(pipe, tmp_path):
    cfg = LatentSearch(mode="lose", iterations=1, stop_on_success=False)
    df, first = latent_campaign(pipe, edge_ensemble(), "a photo of a cat", "cat", seeds=[0, 1], steps=2, config=cfg,
                                out_dir=tmp_path)
    bad = Path(df.loc[1, "path"])
    bad.write_bytes(b"not a safetensors file")  # a truncated or foreign file
    with pytest.warns(UserWarning) as caught:
        df2, again = latent_campaign(pipe, edge_ensemble(), "a photo of a cat", "cat", seeds=[0, 1], steps=2,
                                     config=cfg, out_dir=tmp_path)
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1 and "\n" not in msgs[0]  # one line, naming the file and the seed
    assert msgs[0].startswith(f"ignoring unreadable latent result {bad.name}")
    assert msgs[0].endswith("searching its batch (seeds 0, 1) again")
    assert df2.resumed.tolist() == [False, False] and torch.equal(again[1].latent, first[1].latent)
    assert load_latent(bad).meta["seed"] == "1"  # written again, readable
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(Path(p).name for p in df.path)  # no temporary files


def test_atomic_writes_sync_use_unique_temporary_names_and_leave_nothing_behind(tmp_path, monkeypatch):
    events, real_replace, real_fsync = [], os.replace, os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", fd)) or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", Path(a), Path(b))) or real_replace(a, b))
    target = tmp_path / "sub" / "t.safetensors"
    for _ in range(2):
        write_safetensors_atomic({"x": torch.ones(3)}, target, {"k": "v"})
    write_parquet_atomic(pd.DataFrame(dict(a=[1, 2])), tmp_path / "sub" / "t.parquet")
    replaces = [e for e in events if e[0] == "replace"]
    assert len(replaces) == 3 and replaces[0][2] == replaces[1][2] == target
    tmps = [e[1] for e in replaces]
    assert len(set(tmps)) == 3 and all(t.parent == target.parent and t.name.startswith(".") for t in tmps)
    kinds = [e[0] for e in events]
    assert kinds[:3] == ["fsync", "replace", "fsync"]  # the file, the rename, the folder (POSIX)
    assert sorted(p.name for p in target.parent.iterdir()) == ["t.parquet", "t.safetensors"]

    def dies(tmp):
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, dies)
    assert sorted(p.name for p in target.parent.iterdir()) == ["t.parquet", "t.safetensors"]  # old file kept, no temp
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(target))["x"], torch.ones(3))


def test_setup_checks_members_heads_and_classes_before_the_pipeline_loads(monkeypatch):
    """A misspelt member, a checker inside the ensemble, an unknown head or class failed after the (for SD,
    minutes-long) pipeline load."""
    from types import SimpleNamespace

    import lib.loading
    from lib.sage.build import setup
    from lib.sage.loss import UnknownClassError

    monkeypatch.setattr(lib.loading, "load_pipeline", lambda *a, **k: pytest.fail("the pipeline loaded first"))
    P = SimpleNamespace(MODEL="toy", DEVICE="cpu", DTYPE="auto", CHECKPOINTING=None, ENSEMBLE=["resent"],
                        CHECKER=None, ATTRIBUTE="object")
    with pytest.raises(ValueError, match="unknown member spec 'resent'"):
        setup(P, ["cat"])
    P.ENSEMBLE, P.CHECKER = ["resnet", "edges"], "toy:resnet"
    with pytest.raises(ValueError, match="checker 'toy:resnet' is also an ensemble member"):
        setup(P, ["cat"])
    P.CHECKER, P.ATTRIBUTE = "mobilenet", "flavour"
    with pytest.raises(ValueError, match="has no 'flavour' head"):
        setup(P, ["cat"])
    P.ATTRIBUTE = "object"
    with pytest.raises(UnknownClassError, match="zebra"):
        setup(P, ["cat", "zebra"])
    with pytest.raises(ValueError, match="target 'Cat ' equals the source class"):  # notebook 03's SOURCE / TARGET
        setup(P, ["cat"], distinct=("cat", "Cat "))


def test_a_class_the_checker_lacks_is_refused_before_the_search():
    from lib.sage.build import check_classes
    from lib.sage.loss import UnknownClassError

    ens = Ensemble([const_member([0.0, 0.0, 0.0])], groups={"pet": ("cat", "dog")})
    check_classes(ens, ["car", "pet"], checker=const_member([0.0, 0.0], labels=("cat", "car"), name="held-out"))
    with pytest.raises(UnknownClassError, match="'car' is not a label of member 'held-out'"):
        check_classes(ens, ["cat", "car"], checker=const_member([0.0, 0.0], labels=("cat", "dog"), name="held-out"))


def test_a_missing_toy_lm_is_named_with_its_rebuild_command(tmp_path, monkeypatch):
    from lib.loading import ModelLoadError
    from lib.sage.build import check_lm, load_lm
    from lib.toy import lm as toy_lm

    monkeypatch.setattr(toy_lm, "DEFAULT_DIR", tmp_path)
    with pytest.raises(ValueError, match=f"toy LM file missing: {tmp_path / 'config.json'}. Rebuild it with `"):
        check_lm("toy")
    with pytest.raises(ModelLoadError, match=r"toy LM file missing: .*config\.json\. Rebuild it with `.*` \(from the "
                                             r"repo root\)\.$"):
        load_lm("toy")


def test_a_real_model_judged_by_the_toy_world_s_classifiers_is_warned_about():
    """01-03 default to the toy world's 64-px classifiers and caption LM; with a real MODEL their numbers would mean
    nothing, so setup warns (04/05 warn likewise for the toy probes). The toy world and shape twins stay quiet."""
    from lib.sage.build import toy_parts_warning

    real = "CompVis/stable-diffusion-v1-4"
    msg = toy_parts_warning(real, ["resnet", "edge:timm:resnet50", "toy:mobilenet"], lm="toy")
    assert msg.startswith(f"MODEL={real!r} is not the toy world, but resnet, toy:mobilenet, LM='toy' belong to it")
    assert toy_parts_warning(real, ["timm:resnet50", "edge:timm:resnet50"], lm="gpt2") is None
    for model in ("toy", "twin:sd-v1", "twin:sdxl"):
        assert toy_parts_warning(model, ["resnet", "edges"], lm="toy") is None
    from lib.loading import ModelLoadError
    from lib.sage.build import setup

    P = SimpleNamespace(MODEL=real, ENSEMBLE=["resnet"], CHECKER=None, DEVICE="cpu", ATTRIBUTE="object",
                        DTYPE="float32", CHECKPOINTING=None)
    with pytest.warns(UserWarning, match="is not the toy world"), pytest.raises(ModelLoadError):
        setup(P, ["cat"])  # warned before the load, which fails offline (the hub is off in tests)


@pytest.mark.parametrize("make, error", [
    (lambda: LatentSearch(iterations=-1), r"^LatentSearch\.iterations: -1 is below the minimum 0$"),  # a TypeError late
    (lambda: LatentSearch(shell_sigmas=-1.0), r"^LatentSearch\.shell_sigmas: -1\.0 is below the minimum 0\.0$"),
    (lambda: PromptSearch(iterations=-5), r"^PromptSearch\.iterations: -5 is below the minimum 0$"),  # ran no search
    (lambda: PromptSearch(lr=-0.05), r"^PromptSearch\.lr: -0\.05 is below the minimum 0\.0$"),  # climbed the loss
    (lambda: PromptSearch(n_words=0), r"^PromptSearch\.n_words: 0 is below the minimum 1$"),
    (lambda: PromptSearch(emb_range=(2.5, -2.5)), r"^PromptSearch\.emb_range: must be a \(low, high\) pair"),
    (lambda: PromptSearch(success_fraction=0.0), r"^PromptSearch\.success_fraction: must be > 0"),
    (lambda: TokenAttack(batch_size=0), r"^TokenAttack\.batch_size: 0 is below the minimum 1$"),
    (lambda: TokenAttack(iterations=-1), r"^TokenAttack\.iterations: -1 is below the minimum 0$"),  # an untrained token
    (lambda: TokenAttack(lr=0.0), r"^TokenAttack\.lr: must be > 0, got 0\.0$"),
    (lambda: TokenAttack(seed=-1), r"^TokenAttack\.seed: -1 is outside \[0, 9223372036854775807\]$"),
])
def test_search_settings_are_checked_when_made_by_library_callers_too(make, error):
    """The notebooks check their parameters; a direct library call made these silently (or failed late)."""
    from lib.params import ParameterError

    with pytest.raises(ParameterError, match=error):
        make()
    assert LatentSearch(shell_sigmas=0.0).shell_sigmas == 0.0  # the sphere ‖z‖ = √d, as notebook 01 accepts


class RunsOutLM(ListLM):
    """Proposes its words for the template, then nothing: the search ends with a row that adds no word."""

    def propose(self, prefix: str, k: int = 20, scan: int = 2000, min_prob: float = 0.0) -> list[str]:
        return list(self.words) if prefix == "a photo of a cat" else []


def test_a_rounds_file_resumes_a_search_that_ended_without_adding_its_table(pipe, tmp_path, monkeypatch):
    """Read back from parquet, the "no word" row's ``None`` was ``NaN``: a finished search, resumed, grew another
    "no word" row each time. A finished search's rounds file now gives its table without rendering anything."""
    import lib.sage.prompt as SP

    cfg = PromptSearch(n_words=3, iterations=1, min_end_prob=0.0, stop_on_success=False)
    rounds = tmp_path / "rounds.parquet"
    first = search_prompt(pipe, edge_ensemble(), RunsOutLM("red", "dog"), "cat", [0], steps=2, config=cfg,
                          rounds_file=rounds)
    assert len(first) == 2 and pd.isna(first.word[1]) and first.stopped[1].startswith("LM proposed no word")
    monkeypatch.setattr(SP, "render_with_slots", lambda *a, **k: pytest.fail("rendered again"))
    for _ in range(2):
        again = search_prompt(pipe, edge_ensemble(), RunsOutLM("red", "dog"), "cat", [0], steps=2, config=cfg,
                              rounds_file=rounds)
        pd.testing.assert_frame_equal(again, first)
    fooled = Ensemble([const_member([-9.0, 9.0, 0.0])])  # always "dog": the first word is a find
    found_file = tmp_path / "found.parquet"
    monkeypatch.undo()
    stop = PromptSearch(n_words=3, iterations=1, min_end_prob=0.0)
    found = search_prompt(pipe, fooled, ListLM("red", "dog"), "cat", [0], steps=2, config=stop, rounds_file=found_file)
    assert len(found) == 1 and found.found[0]
    monkeypatch.setattr(SP, "render_with_slots", lambda *a, **k: pytest.fail("rendered again"))
    pd.testing.assert_frame_equal(search_prompt(pipe, fooled, ListLM("red", "dog"), "cat", [0], steps=2, config=stop,
                                                rounds_file=found_file), found)  # a find ended it: nothing grown
    import warnings

    with warnings.catch_warnings(record=True) as caught:  # the rounds of a "cat" search are not a "dog" search's
        warnings.simplefilter("always")
        with pytest.raises(pytest.fail.Exception, match="rendered again"):
            search_prompt(pipe, fooled, ListLM("red", "dog"), "dog", [0], steps=2, config=stop, rounds_file=found_file)
    assert [str(w.message) for w in caught if "holds rounds of another search" in str(w.message)], caught


def test_checker_with_an_ensemble_members_weights_under_another_name_is_refused_when_built(tmp_path):
    """``timm:x@a`` and ``timm:x@b`` holding one set of weights are one classifier: refused when the ensemble is built,
    not after the search (where :func:`lib.sage.metrics.confirmed` compares weights)."""
    import timm
    from safetensors.torch import save_file

    from lib.sage.build import build_ensemble

    torch.manual_seed(0)
    weights = timm.create_model("resnet10t", pretrained=False).state_dict()
    save_file(weights, tmp_path / "a.safetensors")
    save_file(weights, tmp_path / "b.safetensors")
    save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in weights.items()}, tmp_path / "c.safetensors")
    member = f"timm:resnet10t@{tmp_path / 'a.safetensors'}"
    with pytest.raises(ValueError, match="has the weights of an ensemble member"):
        build_ensemble([member], f"timm:resnet10t@{tmp_path / 'b.safetensors'}")
    ens, checker = build_ensemble([member], f"timm:resnet10t@{tmp_path / 'c.safetensors'}")
    assert checker is not None and len(ens.members) == 1


def test_empty_seeds_or_prompts_are_one_message_in_every_search(pipe):
    """The latent, prompt and token searches say the same thing for no seed (each used to phrase it its own way)."""
    ens = edge_ensemble()
    with pytest.raises(ValueError, match="seeds is empty: give at least one seed"):
        search_prompt(pipe, ens, StubLM("red"), "cat", [], steps=2, config=PromptSearch(n_words=1, iterations=1))
    with pytest.raises(ValueError, match="seeds is empty: give at least one seed"):
        train_token(pipe, ens, ["a photo of a cat"], "cat", "car", [], steps=2)
    with pytest.raises(ValueError, match="prompts is empty: give at least one training prompt"):
        train_token(pipe, ens, [], "cat", "car", [0], steps=2)
