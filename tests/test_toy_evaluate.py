"""The toy-world quality measurement: held-out prompt set, tidy predictions, the quality table, the CLI's errors."""

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from lib.toy import classifiers as C
from lib.toy import evaluate as E
from lib.toy import world as W


@pytest.fixture(scope="module")
def members():
    torch.manual_seed(0)
    return {name: C.build_member(name).eval() for name in C.MEMBERS}


class _Oracle:
    """A CLIP-like scorer that knows the truth: image i matches exactly the caption it was rendered from."""

    def __init__(self, captions):
        self.captions = list(captions)

    def rank(self, images, candidates):
        return torch.tensor([[1.0 if c == self.captions[i] else 0.0 for c in candidates] for i in range(len(images))])


def test_heldout_prompts_cover_every_pair_and_are_held_out():
    ps = E.heldout_prompts(per_pair=2, seed=0)
    n_pairs = sum(len(v) for v in W.HELDOUT.values())
    assert len(ps) == 2 * n_pairs and len({p.scene for p in ps}) == len(ps)
    assert [p.prompt_id for p in ps] == list(range(len(ps)))
    for p in ps:
        assert W.is_heldout(p.scene) and W.parse_caption(p.caption) == p.scene
        a, b = (kv.split("=") for kv in p.pair.split(" + "))
        assert getattr(p.scene, a[0]) == a[1] and getattr(p.scene, b[0]) == b[1]
    assert E.heldout_prompts(2, 0) == ps and E.heldout_prompts(2, 1) != ps
    assert set(E.prompts_frame(ps).columns) >= {"prompt_id", "caption", "pair", *W.ATTRIBUTES}
    with pytest.raises(ValueError, match="per_pair"):
        E.heldout_prompts(0)


def test_every_scene_is_drawable_and_per_pair_is_bounded_by_the_distinct_scenes():
    scenes = W.all_scenes()
    assert len(set(scenes)) == len(scenes) == 4 * 6 * 4 * 3 + 10 * 9 * 6 * 4 * 3  # characters, then objects
    rng = np.random.default_rng(0)
    assert {W.sample_scene(rng, "any") for _ in range(2000)} <= set(scenes)
    counts = E.scenes_per_pair()
    assert counts["character=snoopy + style=van gogh"] == 12 == E.max_per_pair()  # 4 actions × 3 backgrounds
    assert len(E.heldout_prompts(12, 0)) == 12 * len(counts)  # every distinct scene of the rarest pairs
    with pytest.raises(ValueError, match=r"per_pair 13 .* \(12\); at most 12"):  # was an endless loop
        E.heldout_prompts(13)


@pytest.mark.parametrize("args, match", [(["--seeds", "0"], "seeds is empty"), (["--render-seeds", "0"], "render_seeds"),
                                         (["--per-pair", "13"], "at most 12")])
def test_bad_evaluation_arguments_fail_before_loading(tmp_path, args, match):
    with pytest.raises(ValueError, match=match):  # tmp_path holds no world: loading would fail differently
        E.main(["--model", str(tmp_path), "--out", str(tmp_path / "out"), *args])


def test_ensemble_predicts_every_family(members):
    ens = E.EnsembleClassifier(members)
    x = torch.rand(3, 3, 64, 64)
    pred = ens.predict(x, batch_size=2)
    assert ens.families == C.FAMILIES and all(len(v) == 3 for v in pred.values())
    with torch.no_grad():  # batches of 2: the argmax of the members' mean log-probabilities, image by image
        lp = C.ensemble_log_probs(members, x)
    assert pred == {f: [C.LABELS[f][i] for i in lp[f].argmax(-1).tolist()] for f in ens.families}
    one = E.EnsembleClassifier({"resnet": members["resnet"]}).predict(x)  # one member: its own predictions
    assert one == {f: v for f, v in members["resnet"].predict(x).items() if f in one}


def test_render_predictions_and_quality_table(members):
    ps = E.heldout_prompts(1, 0)[:3]
    seeds = [0, 1]
    caps = [p.caption for p in ps for _ in seeds]
    df = E.evaluate_renders(E.with_ensemble(members), ps, seeds, _Oracle(caps))
    n_img = len(ps) * len(seeds)
    assert df["image"].nunique() == n_img and set(df["member"]) == {*C.MEMBERS, "ensemble", "clip"}
    clip = df[df["member"] == "clip"]
    assert len(clip) == n_img and clip["correct"].all()  # the oracle ranks the true caption first
    assert (df["named"] == (df["truth"] != C.NONE)).all()
    gen = df.assign(source="generated")
    table = E.quality_table(pd.concat([df, gen], ignore_index=True))
    assert table.loc[E.CLIP_FAMILY, "renders"] == 1.0 and table.loc[E.CLIP_FAMILY, "generated"] == 1.0
    assert table.loc["object", "bar generated"] == 0.9 and table.loc["object", "bar renders"] == E.RENDER_BAR
    md = E.to_markdown(table)
    assert md.splitlines()[0].startswith("| metric | renders") and len(md.splitlines()) == len(table) + 2
    acc = E.family_accuracy(df)
    assert ("render", "ensemble") in acc.index and E.CLIP_FAMILY in acc.columns


def test_the_character_row_scores_character_scenes_only():
    """32 character images (16 right) among 240: the bar is about drawing characters, not about reading "none"."""
    def rows(source):
        named = [dict(truth="snoopy", correct=i < 16, named=True) for i in range(32)]
        absent = [dict(truth=C.NONE, correct=True, named=False) for _ in range(208)]
        return pd.DataFrame(named + absent).assign(source=source, member="ensemble", family="character")

    table = E.quality_table(pd.concat([rows("render"), rows("generated")], ignore_index=True))
    row = table.loc["character"]
    assert row["renders"] == row["generated"] == 0.5 and row["n renders"] == row["n generated"] == 32
    assert row["renders (incl. absent)"] == row["generated (incl. absent)"] == (16 + 208) / 240
    assert not row["meets bar"]


def test_generation_is_batched_and_ordered(members):
    from lib.sampling import generate
    from lib.twins import build_twin

    pipe = build_twin("sd-v1")
    pipe.set_progress_bar_config(disable=True)
    ps = E.heldout_prompts(1, 0)[:2]
    imgs = E.generate_prompts(pipe, ps, [3, 4], steps=2, batch_size=3, progress=False)
    assert imgs.shape[0] == 4
    ref = generate(pipe, [ps[1].caption], [3], steps=2, guidance=4.0)
    torch.testing.assert_close(imgs[2:3], ref, atol=1e-4, rtol=1e-4)
    df, _ = E.evaluate_generations(pipe, {"resnet": members["resnet"]}, ps, [3], steps=2, progress=False)
    assert set(df["source"]) == {"generated"} and (df["steps"] == 2).all() and df["image"].nunique() == 2


def test_showcase_scenes_vary_one_attribute():
    sc = E.showcase_scenes()
    assert list(sc) == list(W.ATTRIBUTES)
    for fam, items in sc.items():
        vals = [getattr(s, fam) for _, s in items]
        assert len(set(vals)) == len(vals) and set(vals) - {None} == set(W.VOCAB[fam])
    fig = E.showcase_figure({f: np.zeros((len(v), 64, 64, 3), np.uint8) for f, v in sc.items()})
    assert len(fig.axes) == len(sc) * max(len(v) for v in sc.values())


def test_missing_files_name_the_file_and_the_rebuild_command(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model_index\.json.*lib\.toy\.train --stage all"):
        E.main(["--model", str(tmp_path), "--out", str(tmp_path / "out")])


class _IdentityVAE(torch.nn.Module):
    """encode/decode as the identity (in diffusers' output shapes): a round trip that loses nothing."""

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))

    def encode(self, x):
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=x))

    def decode(self, z):
        return SimpleNamespace(sample=z)


class _BlurVAE(_IdentityVAE):
    def decode(self, z):
        return SimpleNamespace(sample=torch.nn.functional.avg_pool2d(z, 8).repeat_interleave(8, -1).repeat_interleave(8, -2))


def test_vae_roundtrip_table_compares_renders_with_their_reconstructions(members):
    arr, _, _ = W.make_dataset(6, 3, "heldout")
    assert torch.equal(E.vae_roundtrip(_IdentityVAE(), arr), C.to_tensor(arr))  # uint8 levels survive exactly
    same = E.reconstruction_table(_IdentityVAE(), members, n=12, seed=3)
    assert set(same.member) == set(C.MEMBERS) | {"ensemble"}
    assert (same.render == same.roundtrip).all() and (same.mse == 0).all()
    assert set(same[same.member == "edges"].family) == set(C.MEMBERS["edges"]["families"])
    blurred = E.reconstruction_table(_BlurVAE(), members, n=12, seed=3)
    assert (blurred.mse > 0.001).all()
    assert blurred.render.tolist() == same.render.tolist()  # the renders' column does not depend on the VAE
    _, scenes, _ = W.make_dataset(12, 7, "heldout")
    chars = sum(s.character is not None for s in scenes)
    named = E.reconstruction_table(_IdentityVAE(), members, n=12, seed=7)
    row = named[(named.member == "ensemble") & (named.family == "character")].iloc[0]
    assert chars == 3 and row["n"] == 12 and row["n named"] == chars  # named: the character scenes only
    assert row["render named"] == row["roundtrip named"]  # the identity VAE changes nothing


class _NemoIfBright:
    """A stand-in ensemble: every family reads "nemo" on an image with any bright pixel, "none" on a black one."""

    def __init__(self, members):
        pass

    def predict(self, images):
        lab = ["nemo" if float(x.max()) > 0 else C.NONE for x in images]
        return {f: lab for f in C.FAMILIES}


def test_pair_grid_reads_every_cell_on_renders_round_trips_and_generations(members, monkeypatch):
    import lib.sampling

    calls = []

    def black_generate(pipe, captions, seeds, steps, guidance):
        calls.append((list(captions), list(seeds)))
        return torch.zeros(len(captions), 3, 64, 64)

    monkeypatch.setattr(lib.sampling, "generate", black_generate)
    monkeypatch.setattr(E, "EnsembleClassifier", _NemoIfBright)
    pipe = SimpleNamespace(vae=_IdentityVAE())
    grid = E.pair_grid(pipe, members, "character", "style", n=2, seed=5, batch_size=7, progress=False)
    n_cells = len(W.CHARACTERS) * (1 + len(W.STYLES))
    assert len(grid) == 3 * n_cells and list(grid.columns[:2]) == ["character", "style"]
    assert set(grid.source) == set(E.GRID_SOURCES) and (grid.n == 2).all()
    held = grid[grid.heldout & (grid.source == "render")]
    assert sorted(zip(held["character"], held["style"])) == [("nemo", "picasso"), ("snoopy", "van gogh")]
    for source, want in [("render", 1.0), ("roundtrip", 1.0), ("generated", 0.0)]:  # each source its own images
        d = grid[grid.source == source]
        assert (d.accuracy == np.where(d["character"] == "nemo", want, 0.0)).all(), source  # each cell its scenes
    captions = [c for cs, _ in calls for c in cs]
    seeds = [s for _, ss in calls for s in ss]
    assert len(captions) == 2 * n_cells and seeds == list(range(5, 5 + 2 * n_cells))
    cells, scenes, _ = E.grid_scenes("character", "style", "character", 2, 5)
    assert [W.parse_caption(c) for c in captions] == scenes  # cell-major, every scene captioned
    md = E.pair_grid_markdown(grid)
    assert md.count("| character |") == 3 and md.count("*") == 3 * 2 + 3  # 2 held-out cells per table + headers
    fig = E.pair_grid_figure(grid)
    heat = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in heat] == [f"{s} (2 per cell)" for s in E.GRID_SOURCES]
    assert all(sum(type(p).__name__ == "Rectangle" and not p.get_fill() for p in ax.patches) == 2 for ax in heat)
    calls.clear()
    only = E.pair_grid(SimpleNamespace(vae=None), members, "character", "style", n=2, seed=5,
                       sources=["render"], progress=False)
    assert set(only.source) == {"render"} and not calls  # no VAE, no sampling
    colour = E.pair_grid(pipe, members, "object", "style", family="color", n=8, sources=["render"], progress=False)
    assert (colour.n < 8).any() and (colour.n >= 1).all()  # scenes that name no colour are not scored
    for bad in ("render", [], ["renders"]):
        with pytest.raises(ValueError, match="sources"):
            E.pair_grid(pipe, members, "character", "style", n=1, sources=bad)


@pytest.mark.parametrize("rows, cols", [("object", "style"), ("color", "object"), ("style", "action"),
                                        ("character", "background")])
def test_grid_scenes_keep_the_cell_and_no_other_heldout_pair(rows, cols):
    cells, scenes, _ = E.grid_scenes(rows, cols, "object", 6, 0)
    for i, s in enumerate(scenes):
        vr, vc = cells[i // 6]
        assert (getattr(s, rows), getattr(s, cols)) == (vr, vc)
        assert bool(W.heldout_pairs(s)) == E._cell_heldout(rows, vr, cols, vc)
        if rows in ("object", "color") or cols in ("object", "color"):
            assert s.character is None
    for bad, msg in [(("character", "color"), "fixed color"), (("style", "style"), "both"),
                     (("shape", "style"), "unknown attribute")]:
        with pytest.raises(ValueError, match=msg):
            E.grid_scenes(*bad, family="character", n=1)
    with pytest.raises(ValueError, match="unknown attribute"):
        E.grid_scenes("shape", "style", family="shape", n=1)  # the attribute is named before the family


def test_pair_grid_cli_on_the_committed_world(tmp_path):
    E.main(["--pair-grid", "character", "style", "--pair-n", "1", "--pair-sources", "render", "roundtrip",
            "--out", str(tmp_path / "g"), "--threads", "1"])
    g = pd.read_csv(tmp_path / "g" / "pair_grid.csv")
    assert set(g.source) == {"render", "roundtrip"} and len(g) == 2 * len(W.CHARACTERS) * (1 + len(W.STYLES))
    assert (tmp_path / "g" / "pair_grid.md").read_text().count("| character |") == 2
    assert (tmp_path / "g" / "pair_grid.png").is_file()
    with pytest.raises(ValueError, match="fixed color"):
        E.main(["--pair-grid", "character", "color", "--out", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()  # refused before any folder, model or image


def test_quality_run_writes_run_json_last(tmp_path, monkeypatch):
    """``run.json`` marks a finished measurement: an interrupted run leaves a folder without it, never an earlier
    run's ``run.json`` beside this run's tables."""
    out = tmp_path / "q"
    small = dict(seeds=[0], per_pair=1, render_seeds=[0], steps=1, batch_size=16)
    E.run_quality(out, roundtrip=2, **small)
    assert len(pd.read_csv(out / "roundtrip.csv"))
    table = E.run_quality(out, **small)  # without a round trip: the earlier run's table is not left beside it
    assert not (out / "roundtrip.csv").exists()
    run = json.loads((out / "run.json").read_text())
    assert run["n_prompts"] == len(pd.read_csv(out / "prompts.csv")) == 15 and run["roundtrip"] == 0
    assert pd.read_csv(out / "quality.csv", index_col=0).shape == table.shape and not list(out.glob(".*"))

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(E, "reconstruction_table", killed)  # the last measurement, after every table is written
    with pytest.raises(KeyboardInterrupt):
        E.run_quality(out, roundtrip=2, **small)
    assert not (out / "run.json").exists() and (out / "quality.md").is_file() and not list(out.glob(".*"))


def test_committed_toy_clip_ranks_the_true_caption_of_held_out_renders_first():
    """The issue's bar (>= 0.90 of renders) on its protocol: the quality table's 30 held-out prompts x 8 render seeds
    (measured 0.925, 222 of 240). The toy CLIP serves every toy CLIP-Score, so a preprocessing or tokenising slip (other
    mean/std, unpadded captions) shows here; on 200 other held-out renders (lib.toy.world.make_dataset, seed 12345,
    scenes with more attributes) it ranks 0.875 (RESULTS)."""
    from lib.scoring import toy_clip_scorer
    from lib.toy.evaluate import clip_ranking_accuracy, heldout_prompts, render_prompts

    prompts, seeds = heldout_prompts(2, 0), list(range(8))
    renders = render_prompts(prompts, seeds)
    scenes = [p.scene for p in prompts for _ in seeds]
    captions = [p.caption for p in prompts for _ in seeds]
    assert clip_ranking_accuracy(toy_clip_scorer(), renders, scenes, captions) >= 0.90


class _Fixed:
    """A classifier that predicts the same labels whatever the images."""

    def __init__(self, preds: dict):
        self.families, self.preds = tuple(preds), preds

    def predict(self, x):
        return self.preds


def test_absent_attributes_count_only_when_read_as_absent():
    """A plain star is a "none" character: a classifier that reads "snoopy" there is wrong, in both tables."""
    scenes = [W.Scene(object="star", color="red"), W.Scene(object="star", color="red")]
    images = np.zeros((2, 64, 64, 3), np.uint8)
    fixed = {"m": _Fixed({"character": ["snoopy", C.NONE], "object": ["star", "heart"]})}
    counts = E.attribute_accuracy(images, scenes, fixed).set_index(["family", "value"])
    assert counts.loc[("character", C.NONE), ["correct", "n"]].tolist() == [1, 2]
    assert counts.loc[("object", "star"), ["correct", "n"]].tolist() == [1, 2]
    meta = pd.DataFrame(dict(source="render", caption=["a photo of a red star"] * 2))
    df = E.predictions_frame(images, meta, fixed, scenes=scenes)
    char = df[df["family"] == "character"]
    assert char["correct"].tolist() == [False, True] and not char["named"].any()
    # named only (the default) leaves the "none" truths out; with them the accuracy counts the miss
    both = pd.concat([df, df.assign(source="generated")])
    assert "character" not in E.family_accuracy(both).columns
    assert E.family_accuracy(both, named_only=False).loc[("render", "m"), "character"] == 0.5


def test_the_quality_bar_needs_renders_and_generations_and_the_caption_rank_reads_its_own_bars():
    def rows(family, member, render, generated):
        return [dict(source=src, member=member, family=family, correct=c, named=True)
                for src, hits in (("render", render), ("generated", generated)) for c in hits]

    df = pd.DataFrame(rows("object", "ensemble", [True] * 10, [True] * 5 + [False] * 5)
                      + rows(E.CLIP_FAMILY, "clip", [True] * 8 + [False] * 2, [True] * 8 + [False] * 2))
    q = E.quality_table(df)
    assert q.loc["object", "meets bar"] == False  # noqa: E712 - renders 1.0 meet 0.98, generated 0.5 miss 0.90
    assert q.loc[E.CLIP_FAMILY, ["bar renders", "bar generated"]].tolist() == [0.90, 0.75]
    assert q.loc[E.CLIP_FAMILY, "meets bar"] == False  # noqa: E712 - 0.8 of renders under their 0.90


def test_swapped_captions_change_each_present_attribute_including_the_background():
    scene = W.Scene(object="star", color="red", background="on a beach")
    swaps = E.swap_captions("a photo of a red star on a beach", scene)
    assert ("background", "in a city", "a photo of a red star in a city") in swaps
    assert ("color", "orange", "a photo of an orange star on a beach") in swaps  # "an" before a vowel
    assert all(W.parse_caption(c) != scene for _, _, c in swaps)


def test_pair_grid_accuracy_counts_only_scenes_with_a_truth(monkeypatch):
    """Reading colour per (object, style) cell: a scene that names no colour is left out, not counted as a miss."""
    class Red:
        def predict(self, x):
            return {"color": ["red"] * len(x)}

    monkeypatch.setattr(E, "EnsembleClassifier", lambda members: Red())
    grid = E.pair_grid(None, {}, "object", "style", family="color", n=6, sources=["render"], progress=False)
    cells, scenes, _ = E.grid_scenes("object", "style", "color", 6, 0)
    colours = np.array([s.color for s in scenes], dtype=object).reshape(len(cells), 6)
    named = colours != None  # noqa: E711
    assert (grid["n"].to_numpy() == named.sum(1)).all() and (named.sum(1) < 6).any()
    expected = [(c[k] == "red").mean() if k.any() else np.nan for c, k in zip(colours, named)]
    np.testing.assert_allclose(grid["accuracy"].to_numpy(float), expected)
