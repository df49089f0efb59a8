"""SAGE inputs that used to slip through: member settings and the scheduler in the resume key, an aliasing CLIP
resize, an LM that proposes nothing, a latent that is not a tensor."""

import math
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from diffusers import DDIMScheduler
from torch import nn

from lib.sage.latent import LatentShapeError, search_latents
from lib.sage.loss import ClipMember, EdgeMember, Ensemble, FnMember
from lib.sage.prompt import CandidateLM, PromptError, PromptSearch, final_prompts, prompt_campaign, search_prompt
from lib.sage.resume import campaign_key, member_settings
from lib.scoring import ClipScorer
from test_sage import LABELS, one_thread, pipe, small_net  # noqa: F401 - shared fixtures and helpers

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


def byte_level_lm(n_positions: int = 64, eos_appended: bool = True):
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
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    cfg = GPT2Config(vocab_size=bpe.get_vocab_size(), n_positions=n_positions, n_embd=32, n_layer=1, n_head=2,
                     eos_token_id=eos, bos_token_id=eos)
    with torch.random.fork_rng():  # the same weights every time, the global RNG untouched
        torch.manual_seed(0)
        model = GPT2LMHeadModel(cfg)
    return CandidateLM(model, tok)


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


# ----------------------------------------------------------------------------------------------- the latent search
def test_a_list_latent_raises_the_shape_error(pipe):
    ens = edge_ensemble()
    with pytest.raises(LatentShapeError, match=r"latent has shape list; this pipeline expects \(B, 4, 8, 8\)"):
        search_latents(pipe, ens, "a cat", "cat", latents=[[0.0] * 8] * 8, steps=2)
    with pytest.raises(LatentShapeError, match=r"shape \(4, 8, 8\)"):
        search_latents(pipe, ens, "a cat", "cat", latents=torch.zeros(4, 8, 8), steps=2)
