"""Causal tracing on the tiny shape twins: layers, corruption, batched == unbatched restoration, scoring, sweeps."""

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from lib.paths import REPO_ROOT
from lib.prompts import PromptError
from lib.sampling import decode, denoise, initial_latents
from lib.scoring import ClipScorer
from lib.tracing.corrupt import (Corruption, corrupted, embedding_std, encode_pair, encoder_noise_seed,
                                 item_noise_seed, token_embedding)
from lib.tracing.layers import LayerError, TextSite, resolve_unet_layers, text_sites, unet_kind, unet_layers
from lib.tracing.report import nan_report
from lib.tracing.score import choose_tau, mark_causal, otsu, recovery, summarize, token_group
from lib.tracing.sweep import (SweepConfig, SweepError, collect, load_probes, run_sweep, shard, work_items)
from lib.tracing.text_encoder import TextRestore, restored_conditionings, trace_text
from lib.tracing.unet import restore_sets, trace_unet, trace_unet_reference
from lib.twins import build_twin

CAPTION, SUBJECT = "a photo of a red car", "red car"
ATOL = 1e-4  # batched vs one-run-per-layer, float32 CPU images in [0, 1] (measured: ~3e-6)
_PIPES: dict = {}


def pipe(family: str):
    if family not in _PIPES:
        p = build_twin(family)
        p.set_progress_bar_config(disable=True)
        _PIPES[family] = p
    return _PIPES[family]


def toy_scorer() -> ClipScorer:
    """Image features: mean colour; every caption's features: one fixed direction. Score checkable by hand."""
    return ClipScorer(encode_image=lambda x: x.mean(dim=(2, 3)), encode_text=lambda ids: ids,
                      tokenize=lambda texts: torch.tensor([[1.0, 0.5, 0.25]] * len(texts)),
                      image_size=64, mean=(0, 0, 0), std=(1, 1, 1))


# --- layers -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,total,resnets", [("sd-v1", 70, 22), ("sd-v2", 70, 22), ("sdxl", 227, 17)])
def test_candidate_layers_by_module_type(family, total, resnets):
    names = unet_layers(pipe(family).unet)
    kinds = [unet_kind(n) for n in names]
    assert len(names) == len(set(names)) == total and kinds.count("resnet") == resnets
    assert kinds.count("attn1") == kinds.count("attn2") == kinds.count("ff") == (total - resnets) // 3
    if family != "sdxl":
        assert "down_blocks.1.resnets.1" in names and "up_blocks.3.attentions.2.transformer_blocks.0.attn2" in names
        assert names[:2] == ["down_blocks.0.resnets.0", "down_blocks.0.attentions.0.transformer_blocks.0.attn1"]
    assert names[-1].startswith("up_blocks.") and names.index("mid_block.resnets.0") < names.index("up_blocks.0.resnets.0")
    # the order is the forward pass's (SDXL: a transformer block's attn1, attn2, ff before the next block's)
    from lib.sampling import encode, initial_latents, predict_noise

    p, called = pipe(family), []
    hooks = [p.unet.get_submodule(n).register_forward_hook(lambda *a, n=n: called.append(n)) for n in names]
    try:
        with torch.no_grad():
            predict_noise(p, initial_latents(p, [0]), p.scheduler.timesteps[0], encode(p, ["a"]), 7.5)
    finally:
        for h in hooks:
            h.remove()
    assert called[: len(names)] == names


def test_sdxl_s_last_resnet_restores_the_clean_run_and_is_left_out_by_default():
    """Only the output convolution follows SDXL's last resnet, so restoring it at every step gives the clean image
    exactly: a tautology that added a 1.0 to Otsu's pool and a "causal" layer to the map. The two resnets before it
    are not (the pooled text reaches them through the time embedding); SD 1.x / 2.x have no such layer."""
    from lib.tracing.layers import restores_the_output

    xl = pipe("sdxl")
    last = "up_blocks.2.resnets.2"
    assert restores_the_output(xl.unet) == [last] and unet_layers(xl.unet)[-1] == last
    default = resolve_unet_layers(xl.unet)
    assert len(default) == 226 and last not in default and resolve_unet_layers(xl.unet, [last]) == [last]
    for family in ("sd-v1", "sd-v2"):
        assert restores_the_output(pipe(family).unet) == [] and len(resolve_unet_layers(pipe(family).unet)) == 70
    names = ["up_blocks.2.resnets.1", last]
    t = trace_unet(xl, "a photo of a cat", "cat", 0, names, steps=3, guidance=5.0, batch_size=4)
    assert float((t.clean - t.corrupted).abs().max()) > 0.01
    assert torch.equal(t.restored[1], t.clean[0]) and not torch.equal(t.restored[0], t.clean[0])


def test_unknown_layer_names_are_clear_errors():
    unet = pipe("sd-v1").unet
    with pytest.raises(LayerError, match="did you mean down_blocks.1.resnets.1"):
        resolve_unet_layers(unet, ["down_block.1.resnets.1"])
    with pytest.raises(LayerError, match=r"did you mean down_blocks.1.resnets.1, .*\? valid names \(70\): down_blocks.0"):
        resolve_unet_layers(unet, ["down_block.1.resnets.1"])
    with pytest.raises(LayerError, match=r"valid names \(70\): down_blocks.0.resnets.0, .*up_blocks.3.attentions.2."
                                         r"transformer_blocks.0.ff$"):
        resolve_unet_layers(unet, ["nonsense"])
    with pytest.raises(LayerError, match=r"unknown text encoder 'text_encoder_2'; .*valid names \(1\): text_encoder$"):
        text_sites(pipe("sd-v1"), encoders=["text_encoder_2"])
    assert len(resolve_unet_layers(unet, kinds=["attn2"])) == 16
    from types import SimpleNamespace

    from lib.tracing.unet import unet_meta

    some = ["mid_block.resnets.0", "down_blocks.1.resnets.1"]  # a subset keeps each layer's place in the whole UNet
    all_names = unet_layers(unet)
    assert [m["layer_index"] for m in unet_meta(SimpleNamespace(unet=unet), some)] == [all_names.index(n) for n in some]


def test_text_sites_per_encoder():
    assert len(text_sites(pipe("sd-v1"))) == 12 * 3
    sites = text_sites(pipe("sdxl"))
    # SDXL: text_encoder's last layer reaches nothing (the UNet reads its penultimate one, and its pooled output is
    # unused), so it is left out by default; text_encoder_2's last layer feeds the pooled embedding and stays
    assert len(sites) == (11 + 32) * 3 and {s.encoder for s in sites} == {"text_encoder", "text_encoder_2"}
    assert max(s.layer for s in sites if s.encoder == "text_encoder") == 10
    assert max(s.layer for s in sites if s.encoder == "text_encoder_2") == 31
    assert {(s.encoder, s.layer) for s in text_sites(pipe("sdxl"), layers=[11])} == {("text_encoder", 11),
                                                                                    ("text_encoder_2", 11)}  # asked
    assert TextSite("text_encoder", 0, "self_attn").name == "text_encoder.encoder.layers.0.self_attn"
    with pytest.raises(LayerError, match="has layers 0..11"):
        text_sites(pipe("sd-v1"), layers=[12])


# --- corruption --------------------------------------------------------------------------------------------------

def test_corruption_adds_scaled_seeded_noise_at_the_subject_only():
    p = pipe("sd-v1")
    ids = p.tokenizer(CAPTION, return_tensors="pt").input_ids
    emb = token_embedding(p, "text_encoder")
    c = Corruption(multiplier=3.0, seed=5, image_seed=2)
    with corrupted(p, CAPTION, SUBJECT, c):
        noisy = emb(ids)
    diff = noisy - emb(ids)
    assert diff[0, [0, 1, 2, 3, 4, 7]].abs().max() == 0  # "<bos> a photo of a" and the end token untouched
    gen = torch.Generator().manual_seed(encoder_noise_seed(item_noise_seed(c, CAPTION, SUBJECT), "text_encoder"))
    expected = torch.randn(2, emb.embedding_dim, generator=gen) * 3 * embedding_std(p, "text_encoder")
    assert torch.allclose(diff[0, [5, 6]], expected, atol=1e-6)  # "red car" at positions 5, 6
    # σ is the standard deviation of the whole token-embedding table; the default noise is 3σ (ROME, the paper)
    assert embedding_std(p, "text_encoder") == pytest.approx(float(emb.weight.detach().float().std()), rel=1e-6)
    assert Corruption().multiplier == 3.0
    clean, bad = encode_pair(p, CAPTION, SUBJECT)
    assert torch.equal(clean.uncond, bad.uncond) and torch.equal(clean.cond[:, :5], bad.cond[:, :5])
    assert (clean.cond[:, 5:] - bad.cond[:, 5:]).abs().max() > 0.1  # causal mask: later positions change


def test_corruption_reaches_both_sdxl_encoders_and_pooled_embedding():
    p = pipe("sdxl")
    clean, bad = encode_pair(p, CAPTION, SUBJECT)
    width1 = p.text_encoder.config.hidden_size
    for part in (slice(0, width1), slice(width1, None)):
        assert (clean.cond[0, 5:, part] - bad.cond[0, 5:, part]).abs().max() > 0.05
    assert not torch.allclose(clean.added["text_embeds"], bad.added["text_embeds"])
    assert torch.equal(clean.uncond, bad.uncond)


def _unit_draws(p, captions, subjects, corruption: Corruption) -> dict[str, list[torch.Tensor]]:
    """Per encoder, the standard-normal noise of each caption (``std=1``, ``multiplier=1``), flattened."""
    with corrupted(p, captions, subjects, corruption) as gates:
        return {enc: [t.noise.flatten().float() for t in g.targets] for enc, g in gates.items()}


def test_noise_differs_per_caption_seed_and_encoder_and_repeats_per_item():
    p, c = pipe("sd-v1"), Corruption(multiplier=1.0, std=1.0, image_seed=0)
    other = "a red car on a road"  # same subject, same number of subject tokens
    a, b = _unit_draws(p, [CAPTION, other], [SUBJECT, SUBJECT], c)["text_encoder"]
    assert a.shape == b.shape and not torch.allclose(a, b, atol=1e-3)  # two captions, same image seed
    again = _unit_draws(p, CAPTION, SUBJECT, c)["text_encoder"][0]
    assert torch.equal(a, again)  # the same (caption, seed): the same noise, reproducibly
    for changed in (c.at(1), Corruption(1.0, seed=1, std=1.0, image_seed=0)):  # another latent seed, another base seed
        assert not torch.allclose(a, _unit_draws(p, CAPTION, SUBJECT, changed)["text_encoder"][0], atol=1e-3)
    assert item_noise_seed(c, CAPTION, SUBJECT) == item_noise_seed(c.at(0), CAPTION, SUBJECT) != c.image_seed
    draws = _unit_draws(pipe("sdxl"), CAPTION, SUBJECT, c)
    one, two = draws["text_encoder"][0], draws["text_encoder_2"][0]
    n = min(len(one), len(two))
    assert not torch.allclose(one[:n], two[:n], atol=1e-3)  # SDXL's encoders: independent draws


def test_absent_subject_names_caption_subject_and_tokens():
    with pytest.raises(PromptError, match=r"subject 'zebra'.*a photo of a red car.*tokens"):
        encode_pair(pipe("sd-v1"), CAPTION, "zebra")


# --- UNet restoration --------------------------------------------------------------------------------------------

SUBSET = ["down_blocks.0.resnets.0", "down_blocks.1.attentions.0.transformer_blocks.0.attn1",
          "mid_block.attentions.0.transformer_blocks.0.attn2", "up_blocks.1.resnets.2",
          "up_blocks.3.attentions.2.transformer_blocks.0.ff"]


@pytest.mark.parametrize("uncond", ["restore", "own"])
def test_batched_restoration_equals_one_run_per_layer(uncond):
    p = pipe("sd-v1")
    kw = dict(steps=3, guidance=5.0, uncond=uncond)
    batched = trace_unet(p, CAPTION, SUBJECT, 3, SUBSET, batch_size=3, **kw)  # 3 loops: chunking is exercised
    ref = trace_unet_reference(p, CAPTION, SUBJECT, 3, SUBSET, **kw)
    assert batched.labels == ref.labels == SUBSET and batched.restored.shape == ref.restored.shape
    assert torch.allclose(batched.clean, ref.clean, atol=ATOL) and torch.allclose(batched.corrupted, ref.corrupted, atol=ATOL)
    assert (batched.restored - ref.restored).abs().max() < ATOL
    assert (batched.clean - batched.corrupted).abs().max() > 10 * ATOL  # the comparison is not vacuous
    assert not batched.nan.any() and [m["layer"] for m in batched.meta] == SUBSET


def _plain(p, cond, seed: int, steps: int) -> torch.Tensor:
    """An independent generation (no hooks, batch of one) from ``cond``."""
    return decode(p, denoise(p, initial_latents(p, [seed]), cond, steps, 7.5))


@pytest.mark.parametrize("family", ["sd-v1", "sd-v2", "sdxl"])
def test_restoring_all_layers_gives_clean_and_none_gives_corrupted(family):
    """Against independent generations from the clean and the corrupted conditioning (not rows of the same batch)."""
    p = pipe(family)
    clean, bad = encode_pair(p, CAPTION, SUBJECT, Corruption().at(1))
    plain_clean, plain_bad = _plain(p, clean, 1, 2), _plain(p, bad, 1, 2)
    assert (plain_clean - plain_bad).abs().max() > 1e-3  # the comparison is not vacuous
    everything = set(unet_layers(p.unet))
    for uncond in (["restore", "own"] if family == "sd-v1" else ["restore"]):
        tr = restore_sets(p, clean, bad, initial_latents(p, [1]), [everything, set()], steps=2, uncond=uncond)
        assert torch.allclose(tr.restored[0], plain_clean[0], atol=ATOL)
        assert torch.allclose(tr.restored[1], plain_bad[0], atol=ATOL)
        assert torch.allclose(tr.corrupted[0], plain_bad[0], atol=ATOL)


def test_restore_and_own_modes_each_match_their_reference():
    """One layer restored under ``uncond="restore"`` and ``"own"``: each batched mode matches the one-run reference of
    the same mode, and the two modes differ by more than the tolerance (a swapped mode would fail)."""
    p = pipe("sd-v1")
    layer = "up_blocks.3.resnets.2"  # modes differ by ~0.03 here at 3 steps (tolerance 1e-4)
    clean, bad = encode_pair(p, CAPTION, SUBJECT, Corruption().at(2))
    batched, ref = {}, {}
    for uncond in ("restore", "own"):
        batched[uncond] = restore_sets(p, clean, bad, initial_latents(p, [2]), [{layer}], steps=3,
                                       uncond=uncond).restored[0]
        ref[uncond] = trace_unet_reference(p, CAPTION, SUBJECT, 2, [layer], steps=3, uncond=uncond).restored[0]
        assert (batched[uncond] - ref[uncond]).abs().max() < ATOL
    assert (ref["restore"] - ref["own"]).abs().max() > 10 * ATOL
    assert (batched["restore"] - ref["own"]).abs().max() > 10 * ATOL


@pytest.mark.parametrize("family", ["sd-v2", "sdxl"])
def test_batched_matches_reference_on_other_families(family):
    p = pipe(family)
    names = unet_layers(p.unet)
    layers = [names[0], names[len(names) // 2], names[-1]]
    batched = trace_unet(p, CAPTION, SUBJECT, 0, layers, steps=2, batch_size=8)
    ref = trace_unet_reference(p, CAPTION, SUBJECT, 0, layers, steps=2)
    assert (batched.restored - ref.restored).abs().max() < ATOL
    # not vacuous: the corruption moves the image and the restorations take effect (hooks that never fired would leave
    # every restored image the corrupted one, in both paths alike)
    assert (batched.clean - batched.corrupted).abs().max() > 100 * ATOL
    assert (batched.restored[-1] - batched.corrupted[0]).abs().max() > 10 * ATOL


# --- text encoder ------------------------------------------------------------------------------------------------

def test_text_restoration_semantics_sd_v1():
    p = pipe("sd-v1")
    clean, bad = encode_pair(p, CAPTION, SUBJECT)
    every = tuple(range(77))
    hidden3 = TextSite("text_encoder", 3, "hidden")
    restores = [TextRestore(hidden3, every), TextRestore(hidden3, (2,)), TextRestore(hidden3, (6,)),
                TextRestore(TextSite("text_encoder", 0, "self_attn"), every)]
    rc = restored_conditionings(p, CAPTION, SUBJECT, restores, batch_size=3)
    assert torch.allclose(rc.cond[0], clean.cond[0], atol=1e-5)  # the whole state restored: the clean encoding
    assert torch.equal(rc.cond[1], bad.cond[0])  # a position before the subject was never corrupted
    changed = (rc.cond[2] - bad.cond[0]).abs().amax(-1) > 0
    assert changed[6] and not changed[:6].any() and changed[7:].any()  # later positions see the restored state
    assert (rc.cond[3] - clean.cond[0]).abs().max() > 1e-3  # the residual still carries the noise
    assert torch.equal(rc.uncond, clean.uncond.expand(4, -1, -1))


def test_text_restoration_sdxl_touches_one_encoder():
    p = pipe("sdxl")
    clean, bad = encode_pair(p, CAPTION, SUBJECT)
    w = p.text_encoder.config.hidden_size
    rc = restored_conditionings(p, CAPTION, SUBJECT, [TextRestore(TextSite("text_encoder", 1), tuple(range(77)))])
    assert torch.allclose(rc.cond[0, :, :w], clean.cond[0, :, :w], atol=1e-5)
    assert torch.equal(rc.cond[0, :, w:], bad.cond[0, :, w:])


def test_text_restoration_sdxl_second_encoder_and_pooled():
    """Restoring a whole ``text_encoder_2`` state: its half of the conditioning and the pooled embedding come back
    clean; ``text_encoder``'s half stays exactly corrupted."""
    p = pipe("sdxl")
    clean, bad = encode_pair(p, CAPTION, SUBJECT)
    w = p.text_encoder.config.hidden_size
    site = text_sites(p, encoders=["text_encoder_2"], kinds=["hidden"], layers=[1])[0]
    rc = restored_conditionings(p, CAPTION, SUBJECT, [TextRestore(site, tuple(range(77)))])
    assert torch.equal(rc.cond[0, :, :w], bad.cond[0, :, :w])
    assert torch.allclose(rc.cond[0, :, w:], clean.cond[0, :, w:], atol=1e-5)
    assert (bad.cond[0, :, w:] - clean.cond[0, :, w:]).abs().max() > 1e-2  # the comparison is not vacuous
    assert torch.allclose(rc.added["text_embeds"], clean.added["text_embeds"], atol=1e-5)
    assert not torch.allclose(bad.added["text_embeds"], clean.added["text_embeds"], atol=1e-3)


def test_text_trace_images_and_metadata():
    p = pipe("sd-v1")
    sites = text_sites(p, layers=[0])
    tr = trace_text(p, CAPTION, SUBJECT, 0, sites, tokens=[0, 5, 6], steps=2, batch_size=4)
    assert tr.restored.shape == (9, 3, 64, 64) and len(tr.meta) == 9 and not tr.nan.any()
    assert [m["token"] for m in tr.meta[:3]] == [0, 5, 6] and tr.meta[1]["token_str"] == "red</w>"
    _, bad = encode_pair(p, CAPTION, SUBJECT, Corruption().at(0))
    plain_bad = _plain(p, bad, 0, 2)  # an independent generation from the corrupted conditioning
    assert torch.allclose(tr.corrupted[0], plain_bad[0], atol=ATOL)
    assert torch.allclose(tr.restored[0], plain_bad[0], atol=ATOL)  # restoring <bos> changes nothing
    assert (tr.restored[1] - plain_bad[0]).abs().max() > 10 * ATOL  # restoring the subject does
    from lib.tracing.text_encoder import restores_for  # token positions as a parquet column gives them: np.int64

    assert [r.tokens for r in restores_for(p, CAPTION, sites[:1], list(np.array([5, 6])))] == [(5,), (6,)]


def test_restorations_before_the_subject_are_the_corrupted_run_and_are_not_generated(monkeypatch):
    """The causal mask: a state before the subject's first token is the same in the clean and the corrupted run, so
    restoring it reproduces the corrupted image (checked by generating them); the trace skips those generations."""
    import lib.tracing.text_encoder as TE

    p = pipe("sd-v1")
    sites = text_sites(p, layers=[0, 3])
    rows, generate = [], TE.generate_conditionings
    monkeypatch.setattr(TE, "generate_conditionings", lambda pipe, cond, *a, **k: rows.append(len(cond)) or
                        generate(pipe, cond, *a, **k))
    full = trace_text(p, CAPTION, SUBJECT, 2, sites, steps=2, batch_size=8, skip_unaffected=False)
    fast = trace_text(p, CAPTION, SUBJECT, 2, sites, steps=2, batch_size=8)
    assert rows == [2 + 8 * len(sites), 2 + 3 * len(sites)]  # positions 0-7 generated; then only 5-7 (red car </s>)
    before = [k for k, m in enumerate(fast.meta) if m["token"] < 5]
    assert len(before) == 5 * len(sites) and [m["token"] for m in fast.meta] == [m["token"] for m in full.meta]
    assert all(torch.equal(fast.restored[k], fast.corrupted[0]) for k in before)
    assert (full.restored[before] - full.corrupted).abs().max() < ATOL  # generated: the corrupted run as well
    assert (full.restored - fast.restored).abs().max() < ATOL
    assert torch.equal(fast.nan, full.nan)
    # a group reaching into the subject ("a red": 4, 5) is generated; one wholly before it (1, 2) is not
    rows.clear()
    grouped = trace_text(p, CAPTION, SUBJECT, 2, sites[:1], tokens=[(1, 2), (4, 5)], steps=2, batch_size=8)
    assert rows == [2 + 1] and [m["token"] for m in grouped.meta] == [-1, -1]  # a group has no single token
    assert torch.equal(grouped.restored[0], grouped.corrupted[0])
    assert (grouped.restored[1] - grouped.corrupted[0]).abs().max() > 10 * ATOL


def test_the_example_columns_reach_the_unet():
    """SDXL conditions on each encoder's penultimate hidden state: its last layer's restoration is the corrupted image
    by construction, so the example grid shows the penultimate layer there (the last one on SD 1.x / 2.x)."""
    from lib.tracing.examples import text_example_sites

    for family, back in (("sd-v1", 1), ("sdxl", 2)):
        p = pipe(family)
        sites = text_example_sites(p)
        assert [s.layer for s in sites] == [0, 0, 0, p.text_encoder.config.num_hidden_layers - back]
    xl = pipe("sdxl")
    last = text_sites(xl, ["text_encoder"], kinds=("self_attn",), layers=[xl.text_encoder.config.num_hidden_layers - 1])
    tr = trace_text(xl, CAPTION, SUBJECT, 0, last, tokens=[6], steps=2, batch_size=4)
    assert torch.equal(tr.restored[0], tr.corrupted[0]) or (tr.restored - tr.corrupted).abs().max() < ATOL


def test_text_trace_batched_equals_one_run_per_restoration():
    """Many restorations per encoder call and per generation loop give the images of one trace per restoration."""
    p = pipe("sd-v1")
    sites = text_sites(p, layers=[0, 2])
    batched = trace_text(p, CAPTION, SUBJECT, 1, sites, tokens=[5, 6], steps=2, batch_size=4)
    one = [trace_text(p, CAPTION, SUBJECT, 1, [site], tokens=[tok], steps=2, batch_size=1)
           for site in sites for tok in (5, 6)]
    assert [m["layer"] for m in batched.meta] == [o.meta[0]["layer"] for o in one]
    reference = torch.cat([o.restored for o in one])
    assert (batched.restored - reference).abs().max() < ATOL
    assert torch.allclose(batched.corrupted, one[0].corrupted, atol=ATOL)
    moved = (reference - batched.corrupted).abs().amax((1, 2, 3))
    assert moved.min() > ATOL and moved.max() > 100 * ATOL  # every restoration moves its image beyond the tolerance


# --- scoring and the threshold rule --------------------------------------------------------------------------------

def _rows(scores, clean=30.0, corrupted=20.0, split="val", nan=None):
    n = len(scores)
    return pd.DataFrame(dict(score=scores, clean_score=clean, corrupted_score=corrupted, split=split,
                             nan=np.zeros(n, bool) if nan is None else nan, attribute="color",
                             component="unet", kind="resnet", layer=[f"l{i}" for i in range(n)],
                             layer_index=range(n)))


def test_recovery_threshold_and_causal_marks():
    df = _rows([20.0, 21.0, 29.0, 30.0, 25.0], nan=np.array([0, 0, 0, 0, 1], bool))
    assert np.allclose(recovery(df).to_numpy()[:4], [0.0, 0.1, 0.9, 1.0]) and np.isnan(recovery(df)[4])
    tau = choose_tau(df)  # Otsu on the recoveries: the middle of the gap between the two groups (0.11 … 0.90)
    assert tau == pytest.approx(0.50) and otsu(np.array([0.0, 0.05, 0.95, 1.0])) == pytest.approx(0.50)
    marked = mark_causal(df, tau)
    assert marked["causal"].tolist() == [False, False, True, True, False]
    assert not mark_causal(_rows([25.0], clean=20.0, corrupted=20.0), 0.5)["causal"].any()  # no gap: undefined
    labelled = df.assign(ok=[False, False, True, True, False])
    assert 0.1 < choose_tau(labelled, labels="ok") <= 0.9
    with pytest.raises(ValueError, match="no rows with split"):
        choose_tau(df.assign(split="test"))
    with pytest.raises(ValueError, match="gap above min_gap=1.*numeric τ"):  # random weights: nothing to trace
        choose_tau(_rows([20.0, 20.3], clean=20.5, corrupted=20.0), min_gap=1.0)
    summary = summarize(marked, by=["attribute"])
    assert summary["n"].item() == 5 and summary["causal_frac"].item() == pytest.approx(0.4)


def _gap_rows(cells: dict, split: str = "val") -> pd.DataFrame:
    """UNet rows: ``cells[i]`` lists one (clean, corrupted, score[, nan]) per item for layer ``l{i}``."""
    return pd.DataFrame([dict(score=float(x[2]), clean_score=float(x[0]), corrupted_score=float(x[1]), split=split,
                              nan=len(x) > 3 and x[3], attribute="color", component="unet", kind="resnet",
                              layer=f"l{i}", layer_index=i, caption=f"c{j}", token=-1, token_group="")
                         for i, items in cells.items() for j, x in enumerate(items)])


def test_layer_recovery_is_the_ratio_of_sums():
    """Layer 0: a 10-point gap not recovered and a 1-point gap swung by 3 points (row recovery 3): the mean of ratios
    (1.5) would call it causal, the ratio of sums (3/11) does not; no-gap and NaN-flagged rows do not count."""
    from lib.tracing.report import text_token_table, unet_layer_table

    cells = {0: [(30, 20, 20), (21, 20, 23), (20, 20, 29), (30, 20, 30, True)], 1: [(30, 20, 29), (21, 20, 20.9)]}
    df = mark_causal(_gap_rows(cells, split="test"), tau=0.5)
    assert df["causal"].tolist() == [False, True, False, False, True, True]  # the row-level flags are kept
    table = unet_layer_table(df)
    assert table["recovery"].tolist() == pytest.approx([3 / 11, 0.9]) and table["causal"].tolist() == [False, True]
    assert table["n"].tolist() == [4, 2] and table["causal_frac"].tolist() == [0.25, 1.0]
    text = text_token_table(df.assign(component="text_encoder", kind="self_attn", token_group="last_subject"))
    assert text["recovery"].tolist() == pytest.approx([3 / 11, 0.9]) and text["causal"].tolist() == [False, True]


def test_group_recovery_interval_resamples_items():
    """The point value is the ratio of sums; items with one ratio give a zero-width interval, varied ones a proper
    interval around it, a single item none (NaN: nothing to resample, not certainty); an item's several rows (tokens
    of one group) are drawn together; same rows, same interval."""
    from lib.tracing.report import interval_counts, text_token_table, unet_layer_table
    from lib.tracing.score import group_recovery, group_recovery_ci

    cells = {0: [(30, 20, 25), (40, 20, 30), (22, 20, 21)], 1: [(30, 20, 21), (30, 20, 29), (25, 20, 22), (40, 20, 20)],
             2: [(30, 20, 27)]}
    df = mark_causal(_gap_rows(cells, split="test").assign(subject="s", seed=0), tau=0.5)
    ci = group_recovery_ci(df, ("layer",))
    assert ci["recovery"].to_numpy() == pytest.approx(group_recovery(df, ("layer",)).to_numpy())
    assert ci.loc["l0", "recovery_lo"] == pytest.approx(0.5) and ci.loc["l0", "recovery_hi"] == pytest.approx(0.5)
    assert ci.loc["l1", "recovery_lo"] < ci.loc["l1", "recovery"] < ci.loc["l1", "recovery_hi"]
    assert ci.loc["l2", "recovery"] == pytest.approx(0.7)
    assert ci.loc["l2", ["recovery_lo", "recovery_hi"]].isna().all()  # one item: no interval
    assert ci["items"].tolist() == [3, 4, 1]
    pd.testing.assert_frame_equal(ci, group_recovery_ci(df, ("layer",)))
    narrow = group_recovery_ci(df, ("layer",), level=0.5)
    assert narrow.loc["l1", "recovery_hi"] - narrow.loc["l1", "recovery_lo"] < (
        ci.loc["l1", "recovery_hi"] - ci.loc["l1", "recovery_lo"])
    # two items, each with two rows (two tokens of a group) of recoveries 0 and 1: each one unit of ratio 0.5, so no
    # spread (drawn row by row, resamples of 0s or 1s would spread the interval)
    two = _gap_rows({0: [(30, 20, 20), (30, 20, 20)]}).assign(subject="s", seed=0)
    two = mark_causal(pd.concat([two, two.assign(score=30.0)]), tau=0.5)
    assert group_recovery_ci(two, ("layer",)).loc["l0", ["recovery_lo", "recovery_hi"]].tolist() == [0.5, 0.5]
    table = unet_layer_table(df)
    bounded = table.dropna(subset=["recovery_lo"])
    assert len(bounded) == 2 and (bounded["recovery_lo"] <= bounded["recovery"] + 1e-12).all()
    assert (bounded["recovery"] <= bounded["recovery_hi"] + 1e-12).all()
    text = text_token_table(df.assign(component="text_encoder", kind="mlp", token_group="eos"))
    assert text["recovery_hi"].tolist() == pytest.approx(table["recovery_hi"].tolist(), nan_ok=True)
    counts = interval_counts(table.assign(tau=0.45), ["attribute"])  # l0 0.5 (no spread), l1 12/45 (hi > .45), l2 0.7
    # l2 has no interval: causal by its value, so possibly causal (surely ≤ causal ≤ possibly), not surely
    assert counts[["cells", "causal", "surely", "possibly", "no_interval"]].values.tolist() == [[3, 2, 1, 3, 1]]
    with pytest.raises(ValueError, match="level"):
        group_recovery_ci(df, ("layer",), level=95)
    assert ci["probes"].tolist() == [3, 4, 1]  # one seed per caption: a probe is an item
    # a cell's interval is a property of its rows: dropping the cells sorted before it leaves it unchanged (20 items
    # of varied recoveries, so that other draws move the percentiles)
    rng = np.random.default_rng(0)
    many = {k: [(30.0, 20.0, float(20 + 10 * r)) for r in rng.random(20)] for k in range(2)}
    many = mark_causal(_gap_rows(many).assign(subject="s", seed=0), tau=0.5)
    both = group_recovery_ci(many, ("layer",))
    alone = group_recovery_ci(many[many["layer"] == "l1"], ("layer",))
    pd.testing.assert_series_equal(alone.loc["l1"], both.loc["l1"])
    # an integer key column that reads back as float (a missing value elsewhere in a parquet file) draws alike
    ints = group_recovery_ci(many.assign(layer_index=many["layer"].str[1:].astype(int)), ("layer_index",))
    floats = group_recovery_ci(many.assign(layer_index=many["layer"].str[1:].astype(float)), ("layer_index",))
    assert ints["recovery_lo"].tolist() == floats["recovery_lo"].tolist()
    assert ints["recovery_hi"].tolist() == floats["recovery_hi"].tolist()


def test_the_seeds_of_one_caption_are_resampled_together():
    """Caption c0 recovers 0.2 and c1 0.8 under each of 3 seeds: drawn as 2 probes, a quarter of the resamples are
    all-c0 (0.2) and a quarter all-c1 (0.8), so the 95% interval is [0.2, 0.8]; drawn as 6 independent items it was
    narrower (all six from c0 has probability 1/64 < 2.5%)."""
    from lib.tracing.score import group_recovery_ci

    base = _gap_rows({0: [(30, 20, 22), (30, 20, 28)]}, split="test").assign(subject="s")
    df = pd.concat([base.assign(seed=s) for s in range(3)], ignore_index=True)
    ci = group_recovery_ci(df, ("layer",), min_gap=0.0)
    assert ci.loc["l0", ["recovery", "recovery_lo", "recovery_hi"]].tolist() == pytest.approx([0.5, 0.2, 0.8])
    assert ci.loc["l0", ["items", "probes"]].tolist() == [6, 2]


def test_tau_is_the_middle_of_the_gap_between_the_groups():
    """Every grid value between the groups splits them alike; the first one sat just above the lower group, so a test
    layer a little above the validation's non-causal values was called causal (review, 2026-12-06)."""
    from lib.tracing.score import TAU_GRID, middle_of_best

    assert otsu(np.array([0, .02, .05, .1, .15, .6, .8, .95, 1])) == pytest.approx(0.38)  # gap 0.16 … 0.60
    assert otsu(np.array([0.0, 0.3, 0.31])) == pytest.approx(0.17)  # gap 0.05 … 0.30: one group at the grid's end
    assert middle_of_best([0, 2, 2, 2, 1, 2], TAU_GRID[:6]) == TAU_GRID[2]  # the first run of equal best scores
    df = _rows([20.0, 21.0, 29.0, 30.0])  # recoveries 0, 0.1, 0.9, 1
    assert choose_tau(df.assign(ok=[False, False, True, True]), labels="ok") == pytest.approx(0.50)  # 0.11 … 0.90


def test_otsu_tau_is_chosen_on_layer_level_recoveries():
    """Per-row values (clipped) {0, 1, .1, .1, .9, .9, 1, 1} would give τ = 0.50 (the middle of 0.11–0.90); the layer
    recoveries the tables threshold, {3/11, .1, .9, 1}, give 0.59 (the middle of 0.28–0.90)."""
    from lib.tracing.report import unet_layer_table

    cells = {0: [(30, 20, 20), (21, 20, 23)], 1: [(30, 20, 21), (21, 20, 20.1)], 2: [(30, 20, 29), (21, 20, 20.9)],
             3: [(30, 20, 30), (21, 20, 21)]}
    df = _gap_rows(cells)
    tau = choose_tau(df)
    assert tau == otsu(np.array([3 / 11, 0.1, 0.9, 1.0])) == pytest.approx(0.59)
    assert otsu(recovery(df).to_numpy()) == pytest.approx(0.50)
    assert choose_tau(df.assign(component="text_encoder", kind="mlp", token_group="after")) == pytest.approx(0.59)
    assert choose_tau(pd.concat([df, df.assign(split="test", score=25.0)])) == tau  # only the val split counts
    table = unet_layer_table(mark_causal(df, tau), split="val")
    assert table["causal"].tolist() == [False, False, True, True]
    with pytest.raises(ValueError, match="Otsu's threshold is undefined: all 3 recoveries"):  # was a silent 0.5
        otsu(np.array([0.0, 0.004, 0.005]))


def test_items_without_a_recovery_give_float_tables_and_a_clear_notebook_error(tmp_path, monkeypatch):
    """A numeric τ with no gap above MIN_GAP: the tables were object-typed and the maps died in seaborn."""
    from types import SimpleNamespace

    from lib.tracing import notebook as tracing
    from lib.tracing.report import unet_layer_table
    from lib.tracing.score import group_recovery_ci

    df = mark_causal(_gap_rows({0: [(30, 20, 25)], 1: [(30, 20, 22)]}), 0.5, min_gap=50.0)  # no gap above 50
    ci = group_recovery_ci(df, ("layer",), min_gap=50.0)
    assert ci.empty and ci.dtypes.tolist() == [float, float, float, int, int]  # recovery, lo, hi, items, probes
    assert unet_layer_table(df, split="val")["recovery"].dtype == float
    monkeypatch.setattr(tracing, "collect", lambda *a, **k: df)
    P = SimpleNamespace(TAU=0.5, MIN_GAP=50.0, SEEDS=[0], EVAL_SPLIT="all")
    with pytest.raises(ValueError, match="no item of EVAL_SPLIT='all' has a clean − corrupted CLIP-Score gap"):
        tracing.table(P, tmp_path, None, tmp_path / "rows.parquet")
    assert (tmp_path / "rows.parquet").is_file()  # the rows are kept


def test_token_groups():
    groups = [token_group(p, [5, 6], 8) for p in [-1, 0, 3, 5, 6, 7, 8, 9]]
    assert groups == ["", "bos", "before", "subject", "last_subject", "eos", "pad", "pad"]  # 8: the first pad
    assert token_group(7, [5, 6], 9) == "after"


def test_scoring_rules_at_their_edges():
    from lib.tracing.score import group_recovery, group_recovery_ci, group_rng, trace_rows
    from lib.tracing.unet import Trace

    # a reference run that went non-finite flags every row of its item (nan_report lists it), not only its own image
    img = torch.full((1, 3, 64, 64), 0.5)
    meta = [dict(component="unet", kind="resnet", layer="l0", layer_index=0, token=-1, token_str="")] * 2
    for flags in (dict(nan_clean=True), dict(nan_corrupted=True)):
        t = Trace(["l0", "l0"], img, img, img.repeat(2, 1, 1, 1), torch.zeros(2, dtype=torch.bool), meta=meta, **flags)
        rows = trace_rows(t, toy_scorer(), CAPTION, model="m", subject=SUBJECT, attribute="color", split="val", seed=0,
                          noise_seed=0, subject_tokens=[5, 6], n_tokens=8)
        assert rows["nan"].tolist() == [True, True], flags

    # a row exactly at τ is causal (r ≥ τ)
    assert mark_causal(_rows([25.0]), 0.5)["causal"].tolist() == [True]
    # rows marked with MIN_GAP: a 0.5-point gap has no recovery, and the group recovery follows the rows' marks
    rows = _gap_rows({0: [(30.0, 25.0, 27.5), (30.0, 29.5, 30.0)]})
    marked = mark_causal(rows, 0.5, min_gap=1.0)
    assert marked["recovery"].isna().tolist() == [False, True]
    assert group_recovery(marked, ["layer"]).tolist() == [pytest.approx(0.5)]  # the 0.5-point item left out
    assert group_recovery(rows, ["layer"], min_gap=0.0).tolist() == [pytest.approx(3.0 / 5.5)]
    # the percentile bootstrap at level 0.9 reads the 5th and 95th percentiles of its resamples
    many = _gap_rows({0: [(30.0, 20.0, 20.0 + k) for k in range(8)]})
    ci = group_recovery_ci(many, ["layer"], level=0.9, n_boot=500, seed=3, min_gap=0.0)
    r = np.arange(8) / 10.0
    idx = group_rng(3, ("l0",)).integers(0, 8, size=(500, 8))
    lo, hi = np.percentile(r[idx].mean(1), [5, 95])
    assert (ci.recovery_lo.item(), ci.recovery_hi.item()) == (pytest.approx(lo), pytest.approx(hi))
    # Otsu clips recoveries to [0, 1] before choosing: an overshoot of 5 or -3 counts as 1 or 0
    wild = np.array([-3.0, 0.0, 0.05, 0.1, 0.6, 0.9, 5.0])
    assert otsu(wild) == otsu(np.clip(wild, 0, 1))
    # the Wilson 95% interval of 3 causal rows of 10 (0.108, 0.603: Newcombe 1998's worked example)
    ten = mark_causal(_rows([30.0] * 3 + [20.0] * 7), 0.5)
    w = summarize(ten, by=["attribute"])
    assert (w.causal_lo.item(), w.causal_hi.item()) == (pytest.approx(0.1078, abs=1e-4), pytest.approx(0.6032, abs=1e-4))


# --- sweeps ------------------------------------------------------------------------------------------------------

PROBES = pd.DataFrame(dict(caption=[CAPTION, "a photo of a dog", "a photo of a blue cup"],
                           subject=[SUBJECT, "dog", "blue"], attribute=["objects", "objects", "color"],
                           split=["val", "val", "test"]))


def test_probe_loader_and_sharding(tmp_path):
    assert len(load_probes(REPO_ROOT / "data/probes/sd_probes.csv")) >= 56
    empty = tmp_path / "empty.csv"
    empty.write_text("caption,subject,attribute,split\n")
    with pytest.raises(SweepError, match="empty"):
        load_probes(empty)
    with pytest.raises(SweepError, match="lacks column"):
        load_probes(PROBES.drop(columns="split"))
    with pytest.raises(SweepError, match=r"subject 'cat' \(tokens \['cat</w>'\]\) is not in caption 'a photo of a red "
                                         r"car' \(tokens \['a</w>', 'photo</w>'"):
        load_probes(PROBES.assign(subject=["cat", "dog", "blue"]))
    items = work_items(PROBES, [0, 1])
    parts = [shard(items, i, 2) for i in range(2)]
    assert len(items) == 6 and sorted(parts[0] + parts[1], key=items.index) == items
    assert not set(parts[0]) & set(parts[1]) and len(shard(items, 2, 3)) == 2
    with pytest.raises(SweepError, match="bad shard 2 of 2"):
        shard(items, 2, 2)


def test_sweep_resumes_shards_and_flags_nan(tmp_path):
    p = pipe("sd-v1")
    cfg = SweepConfig(model="twin:sd-v1", steps=2, batch_size=8, layers=tuple(SUBSET[:3]))
    out = tmp_path / "sweep"
    # a NaN in the first restored run of every loop: flagged in its rows, the sweep goes on
    handle = p.unet.conv_out.register_forward_hook(
        lambda m, a, o: o.index_fill(0, torch.tensor([2, o.shape[0] // 2 + 2]), float("nan")))
    try:
        first = run_sweep(p, toy_scorer(), PROBES, [0], out, cfg, process_index=0, num_processes=2, progress=False)
    finally:
        handle.remove()
    second = run_sweep(p, toy_scorer(), PROBES, [0], out, cfg, process_index=1, num_processes=2, progress=False)
    again = run_sweep(p, toy_scorer(), PROBES, [0], out, cfg, process_index=0, num_processes=1, progress=False)
    assert len(first) == 2 and len(second) == 1 and again == []  # resume: everything is done
    assert not list(out.glob(".*tmp")) and (out / "sweep.json").exists()
    df = collect(out, tau=0.5)
    assert len(df) == 9 and set(df["caption"]) == set(PROBES["caption"])
    noise = df.drop_duplicates("caption").set_index("caption")["noise_seed"]
    assert noise.nunique() == 3 and noise[CAPTION] == item_noise_seed(Corruption().at(0), CAPTION, SUBJECT)
    nan_rows = df[df["nan"]]
    assert set(nan_rows["layer"]) == {SUBSET[0]} and len(nan_rows) == 2 and nan_rows["score"].isna().all()
    assert not df.loc[~df["nan"], "score"].isna().any() and not nan_rows["causal"].any()
    report = nan_report(df)  # what the notebooks show: one line per item with a non-finite run
    assert len(report) == 2 and (report["nan_runs"] == 1).all() and set(report["caption"]) == set(nan_rows["caption"])
    with pytest.raises(SweepError, match=r"different sweep config \(.*steps: 2 there, 3 now.*\); use another"):
        run_sweep(p, toy_scorer(), PROBES, [0], out, SweepConfig(model="twin:sd-v1", steps=3), 0, 1, progress=False)
    with pytest.raises(SweepError, match="empty"):
        run_sweep(p, toy_scorer(), PROBES.iloc[:0], [0], tmp_path / "x", cfg, 0, 1, progress=False)


def test_sweep_rows_hold_the_scores_of_their_own_images(tmp_path):
    """A sweep's row values, not only its counts: the item traced directly (same seed, same derived noise) gives the
    clean, corrupted and each restored image, whose CLIP-Scores the rows must hold in their own columns (a swap of
    clean and corrupted inverts every recovery)."""
    from lib.tracing.score import clip_scores

    p, scorer = pipe("sd-v1"), toy_scorer()
    cfg = SweepConfig(model="twin:sd-v1", steps=2, batch_size=8, layers=tuple(SUBSET[:3]), multiplier=3.0)
    run_sweep(p, scorer, PROBES.iloc[:1], [0], tmp_path, cfg, 0, 1, progress=False)
    df = collect(tmp_path, tau=0.5, min_gap=0.0).set_index("layer").loc[list(SUBSET[:3])]  # random twin: small gaps
    tr = trace_unet(p, CAPTION, SUBJECT, 0, SUBSET[:3], steps=2, batch_size=8, corruption=Corruption(3.0, 0).at(0))
    clean, corrupted = clip_scores(scorer, torch.cat([tr.clean, tr.corrupted]), CAPTION)
    assert clean - corrupted > 0.1  # seed 0's gap (0.30) is positive: the recoveries below are numbers, not NaN
    assert df["clean_score"].tolist() == pytest.approx([clean] * 3, abs=1e-5)
    assert df["corrupted_score"].tolist() == pytest.approx([corrupted] * 3, abs=1e-5)
    assert df["score"].tolist() == pytest.approx(list(clip_scores(scorer, tr.restored, CAPTION)), abs=1e-5)
    expected = (df["score"] - corrupted) / (clean - corrupted)
    assert df["recovery"].tolist() == pytest.approx(list(expected), abs=1e-4)  # a swap would give 1 − r ≈ 1
    assert (df["seed"] == 0).all() and (df["noise_seed"] == item_noise_seed(Corruption(3.0, 0).at(0), CAPTION,
                                                                            SUBJECT)).all()


def test_a_sweep_traces_every_seed_with_its_noise_scale_noise_seed_and_uncond(tmp_path):
    """Every setting of the config reaches the traces (the test above runs the defaults): each seed is traced, with
    the config's NOISE multiplier, NOISE_SEED and UNCOND; another multiplier is another folder's sweep."""
    import dataclasses

    from lib.tracing.score import clip_scores

    p, scorer = pipe("sd-v1"), toy_scorer()
    cfg = SweepConfig(model="twin:sd-v1", steps=2, batch_size=8, layers=tuple(SUBSET[:2]), multiplier=2.0,
                      noise_seed=7, uncond="own")
    run_sweep(p, scorer, PROBES.iloc[:1], [4, 5], tmp_path, cfg, 0, 1, progress=False)
    df = collect(tmp_path, tau=0.5)
    assert sorted(df["seed"].unique()) == [4, 5]
    # collect's min_gap reaches both the rows' recoveries and the choice of τ
    assert collect(tmp_path, tau=0.5, min_gap=1e6)["recovery"].isna().all()
    with pytest.raises(ValueError, match=r"gap above min_gap=1e\+06"):
        collect(tmp_path, min_gap=1e6)
    for seed in (4, 5):
        corruption = Corruption(2.0, 7).at(seed)
        tr = trace_unet(p, CAPTION, SUBJECT, seed, SUBSET[:2], steps=2, batch_size=8, corruption=corruption,
                        uncond="own")
        rows = df[df["seed"] == seed].set_index("layer").loc[list(SUBSET[:2])]
        assert rows["score"].tolist() == pytest.approx(list(clip_scores(scorer, tr.restored, CAPTION)), abs=1e-5)
        assert (rows["noise_seed"] == item_noise_seed(corruption, CAPTION, SUBJECT)).all()
    with pytest.raises(SweepError, match=r"different sweep config \(multiplier: 2\.0 there, 3\.0 now\)"):
        run_sweep(p, scorer, PROBES.iloc[:1], [4], tmp_path, dataclasses.replace(cfg, multiplier=3.0), 0, 1,
                  progress=False)


def test_a_sweep_refuses_other_weights_schedules_and_bad_settings_before_writing(tmp_path):
    """A config names the weights and noise schedule its rows come from: run with another pipeline, it would add that
    pipeline's rows to the folder and resume the first one's as done. Bad settings fail before ``sweep.json``."""
    import copy
    import dataclasses

    from lib.sampling import scheduler_fingerprint
    from lib.tracing.sweep import model_fingerprint

    p = pipe("sd-v1")
    cfg = SweepConfig(model="twin:sd-v1", steps=2, batch_size=8, layers=tuple(SUBSET[:1]),
                      fingerprint=model_fingerprint(p), scheduler=scheduler_fingerprint(p))
    out = tmp_path / "sweep"
    with pytest.raises(SweepError, match="pipeline's weights differ"):
        run_sweep(p, toy_scorer(), PROBES.iloc[:1], [0], out, dataclasses.replace(cfg, fingerprint="0" * 16), 0, 1,
                  progress=False)
    v_pred = copy.copy(p)
    v_pred.scheduler = type(p.scheduler).from_config(p.scheduler.config, prediction_type="v_prediction")
    assert scheduler_fingerprint(v_pred) != cfg.scheduler
    with pytest.raises(SweepError, match="scheduler config differs"):
        run_sweep(v_pred, toy_scorer(), PROBES.iloc[:1], [0], out, cfg, 0, 1, progress=False)
    with pytest.raises(SweepError, match="limit must be >= 1"):
        run_sweep(p, toy_scorer(), PROBES.iloc[:1], [0], out, cfg, 0, 1, limit=0, progress=False)
    assert not out.exists()  # nothing written, so a corrected rerun into this folder is accepted
    for bad, match in ((dict(steps=0), "steps must be an integer in"), (dict(steps=2.5), "steps must be"),
                       (dict(multiplier=0.0), "multiplier .* must be > 0"), (dict(guidance=float("nan")), "guidance")):
        with pytest.raises(SweepError, match=match):
            SweepConfig(model="m", **bad)


def test_probe_selections_share_item_files(tmp_path):
    """Item files are named by (caption, subject, seed): another probe selection (rows renumbered) resumes them, and
    older row-numbered names still count as done and are read once."""
    p = pipe("sd-v1")
    cfg = SweepConfig(model="twin:sd-v1", steps=2, batch_size=8, layers=tuple(SUBSET[:1]))
    out = tmp_path / "sweep"
    first = run_sweep(p, toy_scorer(), PROBES.iloc[[2]], [0], out, cfg, 0, 1, progress=False)  # blue cup: row 0
    second = run_sweep(p, toy_scorer(), PROBES, [0], out, cfg, 0, 1, progress=False)  # blue cup: row 2
    assert len(first) == 1 and len(second) == 2 and len(list(out.glob("*.parquet"))) == 3
    df = collect(out, tau=0.5)
    assert len(df) == 3 and not df.duplicated(["caption", "subject", "seed", "layer"]).any()
    legacy = out / f"unet_00007_s0_{work_items(PROBES.iloc[[2]], [0])[0].digest[:8]}.parquet"
    legacy.write_bytes(first[0].read_bytes())  # the same item under an old-style name too
    assert len(collect(out, tau=0.5)) == 3
    first[0].unlink()  # only the old-style name left: still done
    assert run_sweep(p, toy_scorer(), PROBES, [0], out, cfg, 0, 1, progress=False) == []


def test_damaged_sweep_folders_are_retraced_or_refused(tmp_path, dead_pid):
    """A truncated item file is named by ``collect`` and, on a rerun, set aside and traced again (a killed writer's
    temporary file removed); a folder whose ``sweep.json`` is gone or unreadable is refused: its items' settings are
    unknown."""
    from lib.atomic import HOST

    p = pipe("sd-v1")
    cfg = SweepConfig(model="twin:sd-v1", steps=2, batch_size=8, layers=tuple(SUBSET[:1]))
    out = tmp_path / "sweep"
    files = run_sweep(p, toy_scorer(), PROBES.iloc[:2], [0], out, cfg, 0, 1, progress=False)
    whole = pd.read_parquet(files[0])
    files[0].write_bytes(files[0].read_bytes()[:200])  # a truncated copy
    with pytest.raises(SweepError, match=f"{files[0].name} is not a readable parquet file"):
        collect(out, tau=0.5)
    stale = out / f".{files[0].name}.{dead_pid}@{HOST}.0123456789ab.tmp"
    stale.write_bytes(b"half")
    os.utime(stale, (0, 0))  # untouched since long ago (recent ones are left: lib.atomic)
    with pytest.warns(UserWarning, match=f"{files[0].name} is not a readable parquet file.*set aside"):
        again = run_sweep(p, toy_scorer(), PROBES.iloc[:2], [0], out, cfg, 0, 1, progress=False)
    assert again == [files[0]] and not stale.exists() and (out / f"{files[0].name}.unreadable").is_file()
    pd.testing.assert_frame_equal(pd.read_parquet(files[0]), whole)
    assert len(collect(out, tau=0.5)) == 2
    (out / "sweep.json").write_text('{"model": "twin')
    with pytest.raises(SweepError, match="sweep.json is not valid JSON.*delete the whole folder"):
        run_sweep(p, toy_scorer(), PROBES.iloc[:2], [0], out, cfg, 0, 1, progress=False)
    (out / "sweep.json").unlink()  # what "delete it" used to invite: the old items then passed for the new config's
    with pytest.raises(SweepError, match="holds trace files but no sweep.json.*delete the whole folder"):
        run_sweep(p, toy_scorer(), PROBES.iloc[:2], [0], out, SweepConfig(model="twin:sd-v1", steps=3), 0, 1,
                  progress=False)
    assert not (out / "sweep.json").exists()


def test_two_processes_setting_aside_one_file_do_not_crash(tmp_path, monkeypatch):
    """Every shard process scans the folder: the one that renames an unreadable file second finds it gone."""
    import lib.tracing.sweep as S

    bad = tmp_path / "unet_s0_x.parquet"
    bad.write_bytes(b"torn")

    def other_process_first(f):
        f.rename(f.with_name(f.name + ".unreadable"))  # the other process, between this one's read and rename
        return False

    monkeypatch.setattr(S, "_readable", other_process_first)
    assert S.set_aside_unreadable(tmp_path) == [] and (tmp_path / "unet_s0_x.parquet.unreadable").is_file()


def _item_rows(caption: str, recoveries, split: str = "val", seed: int = 0) -> pd.DataFrame:
    from lib.tracing.score import COLUMNS

    n = len(recoveries)
    return pd.DataFrame(dict(
        model="m", caption=f"a photo of {caption}", subject=caption, attribute="color", split=split, seed=seed,
        noise_seed=seed,
        component="unet", kind="resnet", layer=[f"l{i}" for i in range(n)], layer_index=range(n), token=-1,
        token_str="", token_group="", score=[20 + 10 * r for r in recoveries], clean_score=30.0,
        corrupted_score=20.0, nan=False))[list(COLUMNS)]


def test_collect_chooses_tau_on_the_given_items_only(tmp_path):
    """An earlier run's validation rows in the same folder do not move τ once ``probes``/``seeds`` are given."""
    mine = _item_rows("a", [0.0, 0.05, 0.95, 1.0])
    _item_rows("a", [0.0, 0.05, 0.95, 1.0]).to_parquet(tmp_path / "unet_s0_a.parquet", index=False)
    _item_rows("b", [0.3, 0.32, 0.35, 0.4]).to_parquet(tmp_path / "unet_s0_b.parquet", index=False)
    _item_rows("a", [0.3, 0.32, 0.35, 0.4], seed=1).to_parquet(tmp_path / "unet_s1_a.parquet", index=False)
    probes = pd.DataFrame(dict(caption=["a photo of a"], subject=["a"], attribute=["color"], split=["val"]))
    everything = collect(tmp_path)
    only = collect(tmp_path, probes=probes, seeds=[0])
    assert len(everything) == 12 and len(only) == 4
    assert set(only["caption"]) == {"a photo of a"} and set(only["seed"]) == {0}
    assert only["tau"].iloc[0] == pytest.approx(choose_tau(mine))
    assert only["tau"].iloc[0] != pytest.approx(everything["tau"].iloc[0])
    relabelled = collect(tmp_path, tau=0.5, probes=probes.assign(split="test"), seeds=[0])
    assert set(relabelled["split"]) == {"test"}  # labels come from the probe table given
    with pytest.raises(SweepError, match="no rows of the given probes"):
        collect(tmp_path, probes=probes, seeds=[7])


def test_a_text_sweep_traces_only_its_kinds_and_layers(tmp_path):
    p = pipe("sd-v1")
    cfg = SweepConfig(model="twin:sd-v1", mode="text", steps=2, batch_size=8, text_kinds=("mlp",), text_layers=(1,))
    run_sweep(p, toy_scorer(), PROBES.iloc[:1], [0], tmp_path, cfg, 0, 1, progress=False)
    df = collect(tmp_path, tau=0.5)
    assert set(df["kind"]) == {"mlp"} and set(df["layer_index"]) == {1} and len(df) == 8  # one row per position


def test_bad_text_sites_and_seeds_fail_before_sweep_json(tmp_path):
    """A refused start leaves no ``sweep.json``: a corrected rerun into the same folder is not a "different config"."""
    p = pipe("sd-v1")
    with pytest.raises(LayerError, match="unknown text-encoder site kind"):
        run_sweep(p, toy_scorer(), PROBES, [0], tmp_path, SweepConfig(model="twin:sd-v1", mode="text",
                                                                     text_kinds=("bogus",)), 0, 1, progress=False)
    with pytest.raises(LayerError, match="has layers 0..11"):
        run_sweep(p, toy_scorer(), PROBES, [0], tmp_path, SweepConfig(model="twin:sd-v1", mode="text",
                                                                     text_layers=(12,)), 0, 1, progress=False)
    with pytest.raises(SweepError, match=r"^seeds: needs at least 1 item\(s\), got \[\]$"):
        run_sweep(p, toy_scorer(), PROBES, [], tmp_path, SweepConfig(model="twin:sd-v1"), 0, 1, progress=False)
    with pytest.raises(SweepError, match="uncond must be"):
        SweepConfig(model="twin:sd-v1", uncond="both")
    for bad in (0.5, 51.0, float("nan")):  # the sharded sweep took any finite value, the notebooks [1, 50]
        with pytest.raises(SweepError, match=r"guidance must be in \[1, 50\]"):
            SweepConfig(model="twin:sd-v1", guidance=bad)
    assert not (tmp_path / "sweep.json").exists()
    cfg = SweepConfig(model="twin:sd-v1", steps=2, batch_size=8, layers=tuple(SUBSET[:1]))
    assert len(run_sweep(p, toy_scorer(), PROBES.iloc[:1], [0], tmp_path, cfg, 0, 1, progress=False)) == 1


@pytest.mark.parametrize("flags,error", [
    (["--mode", "text", "--text-layers", "x"], r"--text-layers 'x': give comma-separated integers"),
    (["--seeds", "0,one"], r"--seeds '0,one': give comma-separated integers"),
    (["--seeds", "-1"], r"seeds: -1 is outside \[0, 9223372036854775807\]"),  # was accepted
    (["--seeds", str(2**64)], r"seeds: 18446744073709551616 is outside"),  # was traced, then failed in the item
    (["--seeds", "0,0"], r"repeat \[0\]"),
    (["--n-val", "0"], r"--n-val must be >= 1"),
    (["--n-val", "1", "--n-test", "-1"], r"--n-test must be >= 0"),
    (["--mode", "text", "--text-layers", "0,12"], r"no text encoder has layer\(s\) \[12\]: text_encoder has layers 0..11"),
    (["--mode", "unet", "--layers", "mid_block.resnets.0,mid_block.resnets.2"],
     r"unknown UNet layer 'mid_block.resnets.2'; did you mean"),
])
def test_cli_checks_its_flags_before_loading_the_pipeline(tmp_path, monkeypatch, flags, error):
    import lib.loading
    from lib.tracing.sweep import main

    monkeypatch.setattr(lib.loading, "load_pipeline", lambda *a, **k: pytest.fail("the pipeline loaded"))
    with pytest.raises(SweepError, match=error):
        main(["--model", "twin:sd-v1", "--probes", "toy", "--out", str(tmp_path / "o"), *flags])
    assert not (tmp_path / "o").exists()


def test_the_cli_refuses_a_folder_of_other_settings_before_loading(tmp_path, load_reached):
    """Into a plain ``--out`` holding another sweep, the refusal came after the pipeline and CLIP had loaded."""
    from lib.tracing.sweep import main

    held = SweepConfig(model="twin:sd-v1", steps=2, batch_size=8, layers=(SUBSET[0],), scorer="auto",
                       fingerprint="f", scheduler="s", scorer_fingerprint="c")
    (tmp_path / "sweep.json").write_text(held.to_json())
    argv = ["--model", "twin:sd-v1", "--probes", "toy", "--out", str(tmp_path), "--batch-size", "8",
            "--layers", SUBSET[0]]
    with pytest.raises(SweepError, match=r"different sweep config \(steps: 2 there, 3 now\); use another"):
        main([*argv, "--steps", "3"])
    with pytest.raises(load_reached):  # the same settings: on to the load (the fingerprints are checked after it)
        main([*argv, "--steps", "2"])
    with pytest.raises(load_reached):  # --nested names its folder by the settings: nothing to compare
        main([*argv, "--steps", "3", "--nested"])


def test_the_cli_names_an_unparsable_probe_file_and_work_items_take_numpy_seeds(tmp_path):
    import numpy as np

    from lib.tracing.sweep import main

    bad = tmp_path / "probes.csv"
    bad.write_bytes(b"caption,subject\n\xff\xfe,\x00\n")  # not UTF-8: a traceback from pandas before
    with pytest.raises(SweepError, match=rf"^--probes '{bad}': cannot read it \(UnicodeDecodeError"):
        main(["--model", "twin:sd-v1", "--probes", str(bad), "--out", str(tmp_path / "o")])
    items = work_items(PROBES.iloc[:1], np.array([0, 1]))  # a table's seed column
    assert [it.seed for it in items] == [0, 1] and all(type(it.seed) is int for it in items)
    with pytest.raises(SweepError, match="every item must be int"):
        work_items(PROBES.iloc[:1], [True])


def test_the_cli_ends_a_refused_sweep_with_one_error_line(tmp_path):
    """``python -m lib.tracing.sweep`` (each process of ``accelerate launch`` too) prints ``error: ...``, no traceback."""
    cmd = [sys.executable, "-m", "lib.tracing.sweep", "--model", "twin:sd-v1", "--probes", str(tmp_path / "nope.csv"),
           "--out", str(tmp_path / "o")]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and "nope.csv" in proc.stderr, proc.stderr


@pytest.mark.parametrize("rows,error", [
    ("", "empty"),
    ("a photo of a dog,cat,objects,val\n", r"'cat' \(tokens \['cat</w>'\]\) is not in caption 'a photo of a dog' \(tokens"),
    ("a photo of a carpet,car,objects,val\n", "subject 'car'.*not found in caption 'a photo of a carpet'"),
    ("a red car next to a blue car,car,objects,val\n", "subject 'car' is named 2 times"),
    ("a photo of a " + "very " * 80 + "red car,red car,color,val\n", "limit 77"),
])
def test_cli_checks_probes_before_loading_the_pipeline(tmp_path, monkeypatch, rows, error):
    import lib.loading
    from lib.tracing.sweep import main

    def no_load(*args, **kwargs):
        raise AssertionError("the pipeline was loaded before the probe file was checked")

    monkeypatch.setattr(lib.loading, "load_pipeline", no_load)
    probes = tmp_path / "probes.csv"
    probes.write_text("caption,subject,attribute,split\n" + rows)
    with pytest.raises((SweepError, PromptError), match=error):
        main(["--model", "twin:sd-v1", "--probes", str(probes), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_accelerate_launch_splits_items(tmp_path):
    """Two processes through ``accelerate launch --multi_gpu`` (torchrun; CPU-only works) on the toy world, scored by
    the toy CLIP: ~30 s on 2 busy CPUs."""
    from lib.tracing.probes import probe_path

    probes = tmp_path / "probes.csv"
    load_probes(probe_path("toy")).iloc[:3].to_csv(probes, index=False)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m",
           "lib.tracing.sweep", "--model", "toy", "--probes", str(probes), "--out", str(tmp_path / "o"),
           "--steps", "2", "--layers", ",".join(SUBSET[:2])]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "process 0/2: wrote 2 file(s)" in proc.stdout and "process 1/2: wrote 1 file(s)" in proc.stdout
    df = collect(tmp_path / "o", tau=0.5)
    assert len(df) == 6 and set(df["model"]) == {"toy"} and df["score"].notna().all()


# --- probe sets, config folders, reports and figures ------------------------------------------------------------

def test_toy_probe_set_is_committed_and_well_formed():
    from lib.tracing.probes import ATTRIBUTES, probe_path, select_probes, toy_probe_set

    committed = load_probes(probe_path("toy"))
    pd.testing.assert_frame_equal(committed, toy_probe_set())  # regenerate: python -m lib.tracing.probes
    counts = committed.groupby(["attribute", "split"]).size()
    assert set(committed["attribute"]) == set(ATTRIBUTES) and all(counts[(a, "val")] == 10 for a in ATTRIBUTES)
    check = pipe("sd-v1")  # same CLIP BPE as the toy model: every subject is a contiguous token span
    from lib.tracing.sweep import check_subjects

    check_subjects(check, committed)
    sd = load_probes(probe_path("sd"))
    check_subjects(check, sd)
    assert (sd.groupby("attribute")["split"].apply(lambda s: (s == "val").sum()) == 10).all()
    small = select_probes(committed, n_val=2, n_test=1)
    assert len(small) == 12 and small.groupby(["attribute", "split"]).size().tolist() == [1, 2] * 4
    with pytest.raises(FileNotFoundError, match="probe set 'nope.csv' not found"):
        probe_path("nope.csv")


def test_long_caption_fails_before_any_generation(tmp_path, monkeypatch):
    """The too-long caption is the last item: a per-item check would trace the two before it."""
    import lib.tracing.sweep
    from lib.prompts import PromptError

    monkeypatch.setattr(lib.tracing.sweep, "trace_unet", lambda *a, **k: pytest.fail("an item was traced"))
    long = PROBES.assign(caption=[CAPTION, "a photo of a dog", "a photo of a blue cup " + "very " * 80])
    with pytest.raises(PromptError, match="tokens .limit 77"):
        run_sweep(pipe("sd-v1"), toy_scorer(), long, [0], tmp_path, SweepConfig(model="twin:sd-v1"), 0, 1,
                  progress=False)
    assert not list(tmp_path.glob("*.parquet"))


def test_config_folders_follow_weights_and_settings():
    from lib.tracing.sweep import model_fingerprint, sweep_dir

    p = build_twin("sd-v1")
    fp = model_fingerprint(p)
    assert fp == model_fingerprint(p)
    a, b = SweepConfig(model="x", fingerprint=fp), SweepConfig(model="x", fingerprint=fp, steps=3)
    assert sweep_dir("r", a) == sweep_dir("r", SweepConfig(model="x", fingerprint=fp)) != sweep_dir("r", b)
    assert sweep_dir("r", a) != sweep_dir("r", SweepConfig(model="x", fingerprint=fp, noise_seed=1))
    with torch.no_grad():
        p.unet.conv_out.bias.add_(1e-3)
    assert model_fingerprint(p) != fp
    fp = model_fingerprint(p)
    half = {name: param.detach().half().float() for name, param in p.unet.named_parameters()}
    with torch.no_grad():  # fp16-representable values, as in fp16 files: only the dtype tells fp16 from fp32 loads
        for name, param in p.unet.named_parameters():
            param.copy_(half[name])
    fp32 = model_fingerprint(p)
    assert model_fingerprint(p.to(torch.float16)) != fp32 != fp


def test_folders_of_the_old_noise_scheme_are_never_resumed(tmp_path):
    """Noise seeded per (caption, subject, seed, encoder) changes the folder hash, and a folder written under the old
    scheme (``noise_seed_offset``: seed + offset, shared by every caption) is refused."""
    import hashlib
    import json
    from dataclasses import asdict

    from lib.tracing.sweep import sweep_dir

    cfg = SweepConfig(model="twin:sd-v1", steps=2, batch_size=8, layers=tuple(SUBSET[:1]))
    old = {k: v for k, v in asdict(cfg).items() if k not in ("noise_seed", "noise_scheme")} | {"noise_seed_offset": 0}
    old_key = hashlib.sha1(json.dumps(old, sort_keys=True).encode()).hexdigest()[:10]
    assert cfg.noise_scheme == "per-item" and sweep_dir("r", cfg).name != f"unet-{old_key}"
    (tmp_path / "sweep.json").write_text(json.dumps(old, sort_keys=True, indent=1))
    with pytest.raises(SweepError, match="different sweep config"):
        run_sweep(pipe("sd-v1"), toy_scorer(), PROBES, [0], tmp_path, cfg, 0, 1, progress=False)
    with pytest.raises(SweepError, match="noise_scheme must be 'per-item'"):
        SweepConfig(model="x", noise_scheme="offset")


def test_sweep_folders_follow_the_scorer_weights(tmp_path):
    """A retrained CLIP behind the same spec ("auto") gets its own folder; a config names the scorer it was made for."""
    from lib.scoring import random_toy_clip_scorer
    from lib.tracing.sweep import sweep_dir

    s = random_toy_clip_scorer()
    fp = s.fingerprint()
    assert fp == s.fingerprint() and toy_scorer().fingerprint() is None
    a = SweepConfig(model="x", scorer="auto", scorer_fingerprint=fp)
    with torch.no_grad():
        next(s.module.vision_model.parameters()).add_(1e-3)  # the image tower alone changes
    b = SweepConfig(model="x", scorer="auto", scorer_fingerprint=s.fingerprint())
    assert s.fingerprint() != fp and sweep_dir("r", a) != sweep_dir("r", b)
    with pytest.raises(SweepError, match="scorer's weights differ"):
        run_sweep(pipe("sd-v1"), s, PROBES, [0], tmp_path, a, 0, 1, progress=False)
    assert not list(tmp_path.iterdir())  # refused before any work


def test_scorer_for_twins_and_bad_specs():
    from lib.scoring import scorer_for

    x, caps = torch.rand(2, 3, 64, 64), ["a red circle", "a dog"]
    s = scorer_for("twin:sd-v1").score(x, caps)
    assert s.shape == (2,) and torch.isfinite(s).all()
    assert torch.equal(s, scorer_for("twin:sd-v1", "random").score(x, caps))  # seeded random CLIP
    with pytest.raises(ValueError, match="unknown scorer"):
        scorer_for("twin:sd-v1", "clip-l")


def test_a_toy_world_without_its_clip_is_named_not_scored_by_another_clip(tmp_path):
    import shutil

    from lib.paths import TOY_DIR
    from lib.scoring import scorer_for

    world = tmp_path / "toy"
    shutil.copytree(TOY_DIR, world, ignore=shutil.ignore_patterns("clip_vision", "classifiers", "lm"))
    with pytest.raises(FileNotFoundError, match=r"clip_vision/config\.json.*--stage clip-vision"):
        scorer_for(str(world))  # "auto" used to fall through to open_clip's OpenAI ViT-L/14 (a download)


def test_the_seeded_random_scorer_leaves_the_callers_random_stream_alone():
    from lib.scoring import random_toy_clip_scorer

    torch.manual_seed(123)
    scorer = random_toy_clip_scorer(seed=0)
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), after)  # as if no scorer had been built
    assert scorer.module is not None and scorer.to("cpu").device == torch.device("cpu")


def _synthetic_rows():
    """UNet rows where resnets and self-attention recover, cross-attention never does; text rows where only layer-0
    self-attention at the last subject token recovers."""
    from lib.tracing.score import COLUMNS

    names = unet_layers(pipe("sd-v1").unet)
    rows = []
    for attr in ("objects", "style"):
        for split in ("val", "test"):
            for i, n in enumerate(names):
                k = unet_kind(n)
                r = 0.9 if k in ("resnet", "attn1") and (i % 3 == 0 or attr == "style" and i == 1) else 0.05
                rows.append(dict(component="unet", kind=k, layer=n, layer_index=i, token=-1, token_str="",
                                 token_group="", attribute=attr, split=split, score=20 + 10 * r))
            for layer in range(2):
                for kind in ("hidden", "self_attn", "mlp"):
                    for tok, group in enumerate(["bos", "before", "last_subject", "eos"]):
                        hit = kind == "self_attn" and layer == 0 and group == "last_subject"
                        r = 0.95 if hit else (0.6 if kind == "hidden" and group == "last_subject" else 0.0)
                        rows.append(dict(component="text_encoder", kind=kind, layer=f"encoder.layers.{layer}",
                                         layer_index=layer, token=tok, token_str=group, token_group=group,
                                         attribute=attr, split=split, score=20 + 10 * r))
    df = pd.DataFrame(rows).assign(model="m", caption=lambda d: d["attribute"] + d["split"], subject="s", seed=0,
                                   noise_seed=0, clean_score=30.0, corrupted_score=20.0, nan=False)
    return df[list(COLUMNS)]


def test_report_cells_at_tau_and_per_seed_gaps():
    from lib.tracing.examples import largest_gap_item
    from lib.tracing.report import cell_flags, clip_gap, text_token_table

    # a text cell whose recovery is exactly τ is causal (≥), as a UNet layer is
    text = pd.DataFrame([dict(score=25.0, clean_score=30.0, corrupted_score=20.0, split="test", nan=False,
                              attribute="objects", component="text_encoder", kind="self_attn", layer_index=0,
                              token_group="last_subject", caption=f"c{j}", subject="s", seed=0) for j in range(2)])
    assert text_token_table(mark_causal(text, 0.5))["causal"].tolist() == [True]
    # an interval whose lower end is exactly τ is surely causal
    cell = pd.DataFrame(dict(recovery=[0.6], recovery_lo=[0.5], recovery_hi=[0.7], tau=[0.5], causal=[True]))
    assert [f.tolist() for f in cell_flags(cell)] == [[True], [True]]
    # the gap averages over every (caption, seed) item, not one seed per caption
    seeds = pd.DataFrame(dict(caption="c", subject="s", attribute="objects", seed=[0, 1],
                              clean_score=[30.0, 26.0], corrupted_score=[20.0, 28.0]))
    gap = clip_gap(seeds).iloc[0]
    assert (gap["items"], gap["gap"], gap["gap_positive"]) == (2, pytest.approx(4.0), 0.5)
    assert largest_gap_item(seeds)["seed"] == 0  # the largest gap (10 against -2)


def test_reports_and_findings_on_synthetic_rows():
    from lib.tracing.report import (clip_gap, nan_report, short_layer, text_findings, text_token_table,
                                    top_layers, unet_findings, unet_layer_table)

    df = mark_causal(_synthetic_rows(), tau=0.5)
    gap = clip_gap(df)
    assert gap["gap"].tolist() == [10.0, 10.0] and gap["items"].tolist() == [2, 2] and nan_report(df).empty
    table = unet_layer_table(df)
    f = unet_findings(table).set_index("finding")["verdict"].tolist()
    assert f == ["reproduced", "reproduced", "reproduced"]  # distributed, attn2 not causal, first attn1 style only
    assert "objects: 0/16 causal" in unet_findings(table)["measured"].iloc[1]
    part = table[~((table["kind"] == "attn2") & table["layer"].str.startswith("up_blocks"))]  # 7 attn2 traced
    assert "objects: 0/7 causal" in unet_findings(part)["measured"].iloc[1]
    tt = text_token_table(df)
    assert text_findings(tt)["verdict"].tolist() == ["reproduced", "reproduced"]  # objects, style
    assert text_findings(tt, kinds=("hidden", "self_attn", "mlp"))["verdict"].tolist() == ["not reproduced"] * 2
    assert set(tt.loc[tt["unaffected"], "token_group"]) == {"bos", "before"}
    assert (text_findings(tt)["eval_split"] == "test").all() and (unet_findings(table)["tau"] == 0.5).all()
    assert short_layer("up_blocks.3.attentions.2.transformer_blocks.0.ff") == "u3.a2.ff"
    assert short_layer("text_encoder.encoder.layers.0.self_attn") == "L0.self_attn"
    top = top_layers(table, "objects", k=2)
    assert len(top) == 3 and unet_kind(top[-1]) == "attn2"
    from lib.tracing.examples import largest_gap_per_attribute

    probes = df.drop_duplicates("caption")[["caption", "subject", "attribute", "split"]]
    bigger = df.assign(clean_score=np.where(df["caption"] == "objectsval", 40.0, 30.0))
    assert largest_gap_per_attribute(bigger, probes)["caption"].tolist() == ["objectsval", "styletest"]
    undetermined = unet_findings(unet_layer_table(mark_causal(df.assign(corrupted_score=30.0), 0.5)))
    assert undetermined["verdict"].str.startswith("undetermined").all()


def test_a_verdict_the_intervals_cannot_decide_is_undetermined():
    """The point values said "not reproduced" for findings whose cells' 95% intervals straddle τ (review, 2026-12-07):
    a verdict stands only when it holds whichever way each cell falls within its interval."""
    from lib.tracing.report import STRADDLES, text_findings, unet_findings

    layers = [("down_blocks.0.resnets.0", "resnet", "down"), ("down_blocks.0.attentions.0.transformer_blocks.0.attn1",
              "attn1", "down"), ("up_blocks.1.resnets.0", "resnet", "up"),
              ("up_blocks.1.attentions.0.transformer_blocks.0.attn2", "attn2", "up")]

    def table(cells):  # cells: {(attribute, layer index): (recovery, lo, hi)}; others (0.1, 0.0, 0.2)
        rows = [dict(attribute=a, layer=n, layer_index=i, kind=k, block=b, tau=0.5, eval_split="all",
                     **dict(zip(("recovery", "recovery_lo", "recovery_hi"), cells.get((a, i), (0.1, 0.0, 0.2)))))
                for a in ("objects", "style") for i, (n, k, b) in enumerate(layers)]
        t = pd.DataFrame(rows)
        return t.assign(causal=t["recovery"] >= 0.5)

    sure = {(a, i): (0.9, 0.7, 1.0) for a in ("objects", "style") for i in (0, 2)} | {("style", 1): (0.9, 0.7, 1.0)}
    assert unet_findings(table(sure))["verdict"].tolist() == ["reproduced"] * 3
    loose = sure | {("style", 1): (0.6, 0.3, 0.8), ("objects", 3): (0.4, 0.2, 0.7), ("objects", 2): (0.6, 0.45, 0.9)}
    assert unet_findings(table(loose))["verdict"].tolist() == [STRADDLES] * 3
    assert unet_findings(table(loose | {("objects", 1): (0.8, 0.6, 1.0)}))["verdict"].iloc[2] == "not reproduced"
    assert unet_findings(table(loose | {("objects", 3): (0.8, 0.6, 1.0)}))["verdict"].iloc[1] == "not reproduced"
    assert unet_findings(table(sure | {("style", 2): (0.3, 0.1, 0.45)}))["verdict"].iloc[0] == "not reproduced"
    point = table(loose).assign(recovery_lo=np.nan, recovery_hi=np.nan)  # one probe: no interval, the point decides
    assert unet_findings(point)["verdict"].tolist() == ["reproduced", "reproduced", "reproduced"]
    from lib.tracing.report import cell_flags

    odd = pd.DataFrame(dict(recovery=[0.6, 0.4], recovery_lo=[0.1, 0.55], recovery_hi=[0.4, 0.7], tau=0.5))
    surely, possibly = cell_flags(odd.assign(causal=odd["recovery"] >= 0.5))  # points outside their intervals
    assert surely.tolist() == [False, False] and possibly.tolist() == [True, True]  # surely ⊆ causal ⊆ possibly

    def text(cells):
        rows = [dict(component="text_encoder", attribute="objects", kind=k, layer_index=i, token_group=g, tau=0.5,
                     eval_split="all", **dict(zip(("recovery", "recovery_lo", "recovery_hi"),
                                                  cells.get((k, i, g), (0.1, 0.0, 0.2)))))
                for k in ("self_attn", "mlp") for i in range(2) for g in ("last_subject", "eos")]
        t = pd.DataFrame(rows)
        return t.assign(causal=t["recovery"] >= 0.5)

    hit = ("self_attn", 0, "last_subject")
    assert text_findings(text({hit: (0.9, 0.7, 1.0)}))["verdict"].tolist() == ["reproduced"]
    assert text_findings(text({hit: (0.6, 0.4, 0.8)}))["verdict"].tolist() == [STRADDLES]
    assert text_findings(text({hit: (0.9, 0.7, 1.0), ("mlp", 1, "eos"): (0.3, 0.1, 0.6)}))["verdict"].tolist() == \
        [STRADDLES]
    assert text_findings(text({hit: (0.4, 0.2, 0.45)}))["verdict"].tolist() == ["not reproduced"]


def test_text_cells_are_per_attribute():
    """Objects recover at layer-0 self-attention @last_subject and color nowhere: pooled, the cell would pass τ on
    objects' strength (0.475 ≥ 0.4) and call the finding reproduced for both; per attribute it holds for objects only."""
    from lib.tracing.report import text_findings, text_token_table

    df = _synthetic_rows().query("component == 'text_encoder' and split == 'test'").copy()
    df["attribute"] = df["attribute"].map({"objects": "objects", "style": "color"})
    hit = (df["kind"] == "self_attn") & (df["layer_index"] == 0) & (df["token_group"] == "last_subject")
    df.loc[df["attribute"] == "color", "score"] = 20.0  # color: nothing recovers
    df.loc[(df["attribute"] == "objects") & ~hit, "score"] = 20.0
    tt = text_token_table(mark_causal(df, tau=0.4))
    assert len(tt) == 2 * 2 * 3 * 4  # attribute × layer × kind × token group
    cell = tt[(tt["kind"] == "self_attn") & (tt["layer_index"] == 0) & (tt["token_group"] == "last_subject")]
    assert cell.set_index("attribute")["recovery"].to_dict() == pytest.approx({"color": 0.0, "objects": 0.95})
    found = text_findings(tt)
    assert found["verdict"].tolist() == ["not reproduced", "reproduced"]
    assert found["finding"].str.startswith(("text_encoder, color:", "text_encoder, objects:")).all()


def test_otsu_leaves_out_text_cells_the_corruption_cannot_reach():
    """bos/before states are the same in the clean and the corrupted run (causal mask), so their recovery is 0 by
    construction: adding such cells must not move τ (counted, they pull it down)."""
    from lib.tracing.score import UNAFFECTED_GROUPS, layer_recoveries

    rows = _synthetic_rows().query("component == 'text_encoder' and split == 'val'").copy()
    rows["score"] = 20.0 + 10 * rows["token"].map({2: 0.35, 3: 0.8}).fillna(0.0)  # last_subject 0.35, eos 0.8
    rows.loc[(rows["token_group"] == "eos") & (rows["layer_index"] == 1) & (rows["kind"] == "mlp"), "score"] = 22.0
    affected = rows[~rows["token_group"].isin(UNAFFECTED_GROUPS)]
    unaffected = rows[rows["token_group"].isin(UNAFFECTED_GROUPS)]
    more = pd.concat([unaffected.assign(layer_index=unaffected["layer_index"] + k) for k in range(2, 8)])
    tau = choose_tau(affected)
    assert choose_tau(rows) == tau == choose_tau(pd.concat([rows, more]))
    assert len(layer_recoveries(pd.concat([rows, more]), 0.0)) == len(layer_recoveries(affected, 0.0)) == 24
    counted = otsu(np.concatenate([layer_recoveries(affected, 0.0), np.zeros(len(unaffected) + len(more))]))
    assert counted < tau  # what counting them would do


def test_findings_about_untraced_layers_are_undetermined():
    from lib.tracing.report import NOT_TRACED, text_findings, text_token_table, unet_findings, unet_layer_table

    df = mark_causal(_synthetic_rows(), tau=0.5)
    table = unet_layer_table(df)
    resnets = unet_findings(table[table["kind"] == "resnet"])  # LAYERS restricted to resnets
    assert resnets["verdict"].tolist()[1:] == [NOT_TRACED, NOT_TRACED]
    no_style = unet_findings(table[table["attribute"] != "style"])  # a probe set without style
    assert no_style["verdict"].tolist()[1:] == ["reproduced", NOT_TRACED]
    tt = text_token_table(df)
    no_target = tt[~((tt["kind"] == "self_attn") & (tt["layer_index"] == 0))]
    assert text_findings(no_target)["verdict"].tolist() == [NOT_TRACED, NOT_TRACED]


def test_a_requested_split_without_rows_is_an_error():
    from lib.tracing.plots import token_group_maps
    from lib.tracing.report import pick_split, text_token_table, unet_layer_table

    val = mark_causal(_synthetic_rows(), tau=0.5).query("split == 'val'")
    for build in (unet_layer_table, text_token_table, token_group_maps):
        with pytest.raises(ValueError, match=r"no rows of split 'test' \(splits present: \['val'\]\)"):
            build(val, split="test")
    assert pick_split(val, None) is val and len(pick_split(val, "val")) == len(val)


def test_figures_render(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from lib.plotting import save_figure
    from lib.tracing.plots import (kind_bars, restored_grid, text_recovery_profile, token_group_maps, token_layer_maps,
                                   unet_layer_map, unet_recovery_profile)
    from lib.tracing.report import text_token_table, unet_layer_table
    from lib.tracing.unet import Trace

    df = mark_causal(_synthetic_rows(), tau=0.5)
    table = unet_layer_table(df)
    tr = Trace(["down_blocks.0.resnets.0"], torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64),
               torch.rand(1, 3, 64, 64), torch.zeros(1, dtype=torch.bool))
    tr.scores = np.array([30.0, 20.0, 25.0])
    figs = [unet_layer_map(table), kind_bars(table), token_group_maps(df), token_layer_maps(df, "objectstest"),
            restored_grid([tr, tr], ["a", "b"]), unet_recovery_profile(table),
            text_recovery_profile(text_token_table(df))]
    with pytest.raises(ValueError, match="no rows of 'text_encoder_2'"):
        text_recovery_profile(text_token_table(df), "text_encoder_2")
    # the red dots sit on the causal cells (row: attribute, column: layer in forward order), and only there
    piv = table.pivot(index="attribute", columns="layer_index", values="causal").sort_index(axis=1)
    dots = {(int(x - 0.5), int(y - 0.5)) for x, y in figs[0].axes[0].collections[-1].get_offsets()}
    assert dots == {(x, y) for y, x in zip(*np.nonzero(piv.to_numpy(bool)))} and 0 < len(dots) < piv.size
    # the bars are the mean recovery per (attribute, kind); the profiles' lines are the tables' recoveries
    bars = [b.get_height() for c in figs[1].axes[0].containers for b in c]
    heights = sorted(round(h, 6) for h in bars if h == h)  # a (attribute, kind) without rows draws a NaN bar
    assert heights == sorted(round(v, 6) for v in table.groupby(["attribute", "kind"])["recovery"].mean())
    for ax, attr in zip(figs[5].axes, sorted(table["attribute"].unique())):
        want = table[table["attribute"] == attr].sort_values("layer_index")["recovery"].to_numpy()
        np.testing.assert_allclose(ax.lines[0].get_ydata(), want)
    text = text_token_table(df)
    t0 = text[(text["component"] == "text_encoder") & (text["attribute"] == sorted(text["attribute"].unique())[0])]
    kind0 = [k for k in ("hidden", "self_attn", "mlp") if k in set(t0["kind"])][0]
    drawn = {ln.get_label(): ln.get_ydata() for ln in figs[6].axes[0].lines if not ln.get_label().startswith("_")}
    assert drawn, "no token-group line in the first panel"
    for group, ys in drawn.items():
        want = t0[(t0["kind"] == kind0) & (t0["token_group"] == group)].sort_values("layer_index")["recovery"]
        np.testing.assert_allclose(ys, want.to_numpy())
    for i, fig in enumerate(figs):
        assert save_figure(fig, f"f{i}", tmp_path).stat().st_size > 1000
        plt.close(fig)
    monkeypatch.setattr("lib.paths.REPO_ROOT", tmp_path)  # a relative FIGURES_DIR is taken from the repo root
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")  # where papermill runs a notebook
    fig = kind_bars(table)
    save_figure(fig, "copied", tmp_path / "out", figures_dir="figs")
    plt.close(fig)
    assert (tmp_path / "figs" / "copied.png").is_file()
    beyond = table.assign(recovery=np.where(table["layer_index"] == 0, -1.2, table["recovery"]))
    fig = unet_layer_map(beyond)  # a recovery below the colour range: the colour bar says so with a pointed end
    assert fig.axes[-1].get_label() == "<colorbar>" and fig.axes[0].collections[0].colorbar.extend in ("min", "both")
    plt.close(fig)
    # a scale on every panel: one per kind, per attribute in the group maps (objects, style), per kind in one caption's
    for fig, panels in ((token_group_maps(df), 2 * 3), (token_layer_maps(df, "objectstest"), 3)):
        assert sum(a.get_label() == "<colorbar>" for a in fig.axes) == panels
        assert len({a.get_title() for a in fig.axes if a.get_label() != "<colorbar>"}) == panels
        plt.close(fig)


# --- what notebooks 04/05 share (lib.tracing.notebook), checked without loading a model ----------------------------

def _nb_params(mode: str = "text", **over):
    from lib.params import validate
    from lib.tracing import notebook as tracing

    values = dict(MODEL="twin:sd-v1", DEVICE="cpu", DTYPE="auto", PROBES="toy", N_VAL=1, N_TEST=0, SEEDS=[0], STEPS=2,
                  GUIDANCE=4.0, NOISE=3.0, NOISE_SEED=0, BATCH_SIZE=4, TAU=0.5, MIN_GAP=0.0, EVAL_SPLIT="all",
                  SCORER="auto", OUTPUT_DIR=None, FIGURES_DIR=None)
    values.update(dict(LAYERS=SUBSET[:2], UNCOND="restore") if mode == "unet" else
                  dict(TEXT_KINDS=["self_attn"], TEXT_LAYERS=[0]))
    values.update(over)
    return validate(values, **tracing.TRACE_PARAMS, **(tracing.UNET_PARAMS if mode == "unet" else tracing.TEXT_PARAMS))


@pytest.fixture
def no_pipeline(monkeypatch):
    import lib.loading

    def no_load(*args, **kwargs):
        raise AssertionError("the pipeline was loaded before the check")

    monkeypatch.setattr(lib.loading, "load_pipeline", no_load)


@pytest.mark.parametrize("rows,error", [
    ("a photo of a carpet,car,objects,val\n", "subject 'car'.*not found in caption 'a photo of a carpet'"),
    ("a red car next to a blue car,car,objects,val\n", "subject 'car' is named 2 times"),
    ("a photo of a " + "very " * 80 + "red car,red car,color,val\n", "limit 77"),
])
def test_notebook_load_checks_captions_before_the_pipeline(tmp_path, no_pipeline, rows, error):
    from lib.tracing import notebook as tracing

    probes = tmp_path / "probes.csv"
    probes.write_text("caption,subject,attribute,split\n" + rows)
    with pytest.raises(PromptError, match=error):
        tracing.load(_nb_params(PROBES=str(probes), N_VAL=None, N_TEST=None))


def test_notebook_load_checks_eval_split_and_otsu_before_the_pipeline(tmp_path, no_pipeline):
    from lib.params import ParameterError
    from lib.tracing import notebook as tracing

    with pytest.raises(ParameterError, match=r"EVAL_SPLIT='test': .*splits present: \['val'\]"):
        tracing.load(_nb_params(EVAL_SPLIT="test"))  # N_TEST=0
    only_test = tmp_path / "test_only.csv"
    only_test.write_text("caption,subject,attribute,split\na photo of a dog,dog,objects,test\n")
    with pytest.raises(ParameterError, match=r"TAU='otsu' .*splits present: \['test'\]"):
        tracing.load(_nb_params(PROBES=str(only_test), N_TEST=None, TAU="otsu", EVAL_SPLIT="test"))
    with pytest.raises(ParameterError, match="EVAL_SPLIT='val'"):
        tracing.load(_nb_params(PROBES=str(only_test), N_TEST=None, EVAL_SPLIT="val"))
    with pytest.raises(ParameterError, match="select no rows"):
        tracing.load(_nb_params(PROBES=str(only_test), N_TEST=0))


@pytest.mark.parametrize("model,mode,layers,error", [
    ("toy", "unet", ["down_blocks.1.resnet.1"], r"unknown UNet layer 'down_blocks.1.resnet.1'; did you mean "
                                                r"down_blocks.1.resnets.1"),
    ("twin:sdxl:full", "unet", ["up_blocks.0.attentions.0.transformer_blocks.10.attn2"],
     r"valid names \(227\)"),  # SDXL's up block 0 has 10 transformer blocks per attention: 0..9
    ("toy", "text", [3, 4], r"no text encoder has layer\(s\) \[4\]: text_encoder has layers 0..3$"),
    ("twin:sdxl:full", "text", [31, 32], r"\[32\]: text_encoder has layers 0..11, text_encoder_2 has layers 0..31"),
])
def test_notebook_load_checks_layers_before_the_pipeline(no_pipeline, model, mode, layers, error):
    from lib.tracing import notebook as tracing

    key = "LAYERS" if mode == "unet" else "TEXT_LAYERS"
    with pytest.raises(LayerError, match=error):
        tracing.load(_nb_params(mode, MODEL=model, SCORER="random", **{key: layers}))


def test_notebook_layer_check_passes_layers_the_model_has(no_pipeline):
    from lib.tracing import notebook as tracing

    for mode, key, layers in [("unet", "LAYERS", ["up_blocks.0.attentions.0.transformer_blocks.9.attn2"]),
                              ("text", "TEXT_LAYERS", [0, 31])]:
        with pytest.raises(AssertionError, match="loaded before the check"):  # every check passed: the load is next
            tracing.load(_nb_params(mode, MODEL="twin:sdxl:full", SCORER="random", **{key: layers}))


def test_notebook_loads_the_model_in_its_dtype(monkeypatch):
    """``DTYPE`` reaches the load (it enters the weights fingerprint, so the sharded sweep's ``--dtype`` must match)."""
    import lib.loading
    from lib.tracing import notebook as tracing

    asked = []
    monkeypatch.setattr(lib.loading, "load_pipeline", lambda model, **kw: asked.append(kw) or "pipe")
    assert tracing.load(_nb_params(DTYPE="bfloat16", SCORER="random"))[0] == "pipe"
    assert asked == [dict(device="cpu", dtype="bfloat16")]


def test_notebook_batch_size_needs_two_runs():
    from lib.params import ParameterError, validate

    with pytest.raises(ParameterError, match=r"BATCH_SIZE: 1 is outside \[2, 4096\]"):
        _nb_params(BATCH_SIZE=1)
    assert _nb_params(BATCH_SIZE=2).BATCH_SIZE == 2
    assert validate({"BATCH_SIZE": 1}).BATCH_SIZE == 1  # other notebooks keep COMMON's bound


def test_sdxl_text_layers_reach_each_encoder_that_has_them():
    p = pipe("sdxl")  # text_encoder: 12 layers, text_encoder_2: 32
    sites = text_sites(p, kinds=("self_attn",), layers=[0, 20])
    assert [(s.encoder, s.layer) for s in sites] == [("text_encoder", 0), ("text_encoder_2", 0), ("text_encoder_2", 20)]
    assert {s.encoder for s in text_sites(p, layers=[31])} == {"text_encoder_2"}
    with pytest.raises(LayerError, match=r"no text encoder has layer\(s\) \[32\]: text_encoder has layers 0..11, "
                                         r"text_encoder_2 has layers 0..31"):
        text_sites(p, layers=[5, 32])


def test_examples_retrace_each_item_at_its_own_seed(monkeypatch):
    from types import SimpleNamespace

    import lib.tracing.examples as ex
    from lib.tracing.report import unet_layer_table

    df = mark_causal(_synthetic_rows(), tau=0.5)
    df = pd.concat([df, df.assign(seed=3, clean_score=np.where(df["caption"] == "objectstest", 50.0, 30.0))])
    probes = df.drop_duplicates("caption")[["caption", "subject", "attribute", "split"]]
    items = ex.largest_gap_per_attribute(df, probes)
    assert items[["caption", "seed"]].values.tolist() == [["objectstest", 3], ["styletest", 0]]  # ties: lowest seed
    calls = []

    tokens = []

    def fake_trace(pipe_, caption, subject, seed, *args, corruption, **kwargs):
        calls.append((caption, seed, corruption.image_seed))
        tokens.append(kwargs.get("tokens"))
        return SimpleNamespace(labels=[])

    monkeypatch.setattr(ex, "trace_unet", fake_trace)
    monkeypatch.setattr(ex, "trace_text", fake_trace)
    monkeypatch.setattr(ex, "attach_scores", lambda tr, scorer, caption: tr)
    monkeypatch.setattr(ex, "subject_positions", lambda tok, caption, subject: [1, 2])
    cfg = SweepConfig(model="m")
    ex.unet_examples(None, None, items, unet_layer_table(df), cfg)
    tokens.clear()
    ex.text_examples(pipe("sd-v1"), None, items, cfg, sites=[])
    assert calls == [("objectstest", 3, 3), ("styletest", 0, 0)] * 2
    assert tokens == [[2], [2]]  # the last subject token
    calls.clear()
    ex.text_examples(pipe("sd-v1"), None, items, cfg, seed=7, sites=[])  # an explicit seed for every item
    assert [c[1] for c in calls] == [7, 7]
    with pytest.raises(ValueError, match="no 'seed' column"):
        ex.text_examples(pipe("sd-v1"), None, items.drop(columns="seed"), cfg, sites=[])


def test_collect_keeps_grouped_token_restorations_apart(tmp_path):
    rows = _item_rows("a", [0.2, 0.9]).assign(component="text_encoder", kind="hidden", layer="encoder.layers.0",
                                              layer_index=0, token=-1, token_str=["a</w>|b</w>", "c</w>|d</w>"])
    rows.to_parquet(tmp_path / "one.parquet", index=False)
    assert sorted(collect(tmp_path, tau=0.5)["score"]) == [22.0, 29.0]  # two groups, two rows
    rows.assign(token_str="a</w>|b</w>").to_parquet(tmp_path / "one.parquet", index=False)
    with pytest.raises(SweepError, match="two grouped token restorations share one row key"):
        collect(tmp_path, tau=0.5)


def test_printed_sweep_command_parses_to_the_notebooks_config(tmp_path, monkeypatch):
    """Exact floats, quoted paths, and the notebook's device type and dtype: the CLI builds the same config (folder)."""
    import shlex

    import lib.loading
    import lib.tracing.sweep as sweep_mod
    from lib.tracing import notebook as tracing
    from lib.tracing.sweep import sweep_dir

    P = _nb_params("unet", GUIDANCE=7.123456789, NOISE=2.718281828459045, NOISE_SEED=11)
    p, scorer = pipe("sd-v1"), toy_scorer()
    cfg = tracing.sweep_config(P, "unet", p, scorer)
    assert (cfg.multiplier, cfg.noise_seed) == (2.718281828459045, 11)  # the notebook's noise reaches the sweep
    out = tmp_path / "my out"
    command = tracing.sweep_command(P, cfg, p, out)
    argv = shlex.split(command.split(" -m lib.tracing.sweep ")[1])
    assert argv[argv.index("--guidance") + 1] == "7.123456789" and argv[argv.index("--out") + 1] == str(out / "sweeps")
    assert argv[argv.index("--device") + 1] == "cpu" and argv[argv.index("--dtype") + 1] == "float32"
    loaded, seen = [], {}
    monkeypatch.setattr(lib.loading, "load_pipeline", lambda model, **kw: (loaded.append(kw), p)[1])
    monkeypatch.setattr(sweep_mod, "_scorer", lambda *a: scorer)
    monkeypatch.setattr(sweep_mod, "run_sweep", lambda pipe_, sc, probes, seeds, folder, c, *a, **k:
                        seen.update(cfg=c, folder=folder, probes=probes, seeds=seeds) or [])
    assert sweep_mod.main(argv) == 0
    assert loaded == [dict(device="cpu", dtype="float32")]
    assert seen["cfg"] == cfg and seen["folder"] == sweep_dir(out / "sweeps", cfg)
    from lib.tracing.probes import probe_path, select_probes

    # the notebook's rows (N_VAL=1, N_TEST=0: one caption per attribute), not the whole probe set
    assert argv[argv.index("--n-val") + 1] == "1" and argv[argv.index("--n-test") + 1] == "0"
    pd.testing.assert_frame_equal(seen["probes"], select_probes(load_probes(probe_path("toy")), 1, 0))
    assert len(seen["probes"]) < len(load_probes(probe_path("toy"))) and seen["seeds"] == [0]
    assert "--n-test" not in tracing.sweep_command(_nb_params("unet", N_TEST=None), cfg, p, out)  # None: every row
    # paths as the command run from the repo root names them: no machine path for a folder inside the repo, and a
    # relative MODEL / PROBES path (taken from the notebook's cwd, notebooks/) made absolute or repo-relative
    from lib.paths import REPO_ROOT

    from lib.tracing.sweep import from_repo_root, model_spec

    assert from_repo_root(REPO_ROOT / "runs" / "04" / "sweeps") == "runs/04/sweeps"
    model, probes = tmp_path / "model", tmp_path / "p.csv"
    model.mkdir()
    probes.write_text("caption,subject,attribute,split\na photo of a cat,cat,objects,val\n")
    monkeypatch.chdir(tmp_path)
    from lib.params import ToySettingsWarning

    with pytest.warns(ToySettingsWarning):  # an empty folder stands for a real model sampled with 2 steps
        P2 = _nb_params("unet", MODEL="model", PROBES="p.csv")
    argv = shlex.split(tracing.sweep_command(P2, cfg, p, REPO_ROOT / "runs" / "04").split(" -m lib.tracing.sweep ")[1])
    assert argv[argv.index("--model") + 1] == str(model) and argv[argv.index("--probes") + 1] == str(probes)
    assert argv[argv.index("--out") + 1] == "runs/04/sweeps"
    cfg2 = tracing.sweep_config(P2, "unet", p, scorer)  # the notebook (cwd notebooks/) and the CLI (repo root) spell
    assert cfg2.model == model_spec(str(model)) == str(model)  # one local folder alike: one config hash
    assert model_spec("toy") == "toy" and model_spec("twin:sd-v1") == "twin:sd-v1"


def test_printed_paths_in_the_runs_folder_name_its_variable(tmp_path, monkeypatch):
    """make test / notebooks-update run in a temporary T2I_RUNS_DIR: the stored command printed its machine path."""
    import subprocess

    from lib.paths import REPO_ROOT, shell_path

    runs = tmp_path / "runs dir"
    (runs / "04 x").mkdir(parents=True)
    monkeypatch.setenv("T2I_RUNS_DIR", str(runs))
    printed = shell_path(runs / "04 x" / "sweeps")
    assert printed == '"$T2I_RUNS_DIR"/\'04 x/sweeps\'' and str(tmp_path) not in printed
    echoed = subprocess.run(["bash", "-c", f"echo {printed}"], env={"T2I_RUNS_DIR": str(runs)}, capture_output=True,
                            text=True, timeout=60).stdout.strip()
    assert echoed == str(runs / "04 x" / "sweeps")  # the shell expands it back
    assert shell_path(REPO_ROOT / "runs" / "04") == "runs/04" and shell_path(tmp_path / "a b") == f"'{tmp_path}/a b'"
