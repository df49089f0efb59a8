"""Toy-world attribute classifiers: shapes, gradients, colour-blind edge member, save/load, committed accuracy."""

import json

import numpy as np
import pytest
import torch

from lib.speed import cpu_threads
from lib.toy import classifiers as C
from lib.toy import world as W
from lib.toy.evaluate import accuracy_table, attribute_accuracy, clip_ranking_accuracy, swap_captions


@pytest.fixture(scope="module")
def members():
    torch.manual_seed(0)
    return {name: C.build_member(name).eval() for name in C.MEMBERS}


@pytest.fixture(scope="module")
def batch():
    arr, scenes, caps = W.make_dataset(4, seed=1, split="any")
    return C.to_tensor(arr), scenes, caps


def test_shapes_and_labels(members, batch):
    x, scenes, _ = batch
    for name, m in members.items():
        out = m(x)
        assert set(out) == set(m.families)
        for f, v in out.items():
            assert v.shape == (len(x), len(m.labels[f]))
        pred = m.predict(x)
        assert all(len(pred[f]) == len(x) and set(pred[f]) <= set(m.labels[f]) for f in m.families)
    assert "color" not in members["edges"].families
    assert C.LABELS["style"][-1] == "none" and "none" not in C.LABELS["color"]
    assert members["resnet"](torch.rand(2, 3, 96, 96))["object"].shape == (2, len(W.OBJECTS))  # resized inside


def test_sizes_fit_budget(members):
    for m in members.values():
        assert sum(p.numel() for p in m.parameters()) * 2 < 2.2e6  # fp16 bytes


def test_gradients_reach_pixels(members, batch):
    x = batch[0].clone().requires_grad_(True)
    for m in members.values():
        x.grad = None
        sum(v.logsumexp(-1).sum() for v in m(x).values()).backward()
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_edge_member_is_colour_blind(members, batch):
    x = batch[0]
    m = members["edges"]
    with torch.no_grad():
        a, b = m(x), m(x[:, [2, 0, 1]])
    for f in m.families:
        torch.testing.assert_close(a[f], b[f], atol=1e-4, rtol=1e-4)


def test_targets():
    s = [W.Scene(character="nemo", action="jumping"), W.Scene(object="star")]
    t = C.scene_targets(s)
    assert t["object"].tolist() == [W.OBJECTS.index("fish"), W.OBJECTS.index("star")]
    assert t["color"].tolist() == [-1, -1]
    assert t["style"].tolist() == [len(W.STYLES), len(W.STYLES)]
    assert t["character"].tolist() == [W.CHARACTERS.index("nemo"), len(W.CHARACTERS)]


def test_save_load_round_trip(members, batch, tmp_path):
    C.save_classifiers(members, tmp_path)
    loaded = C.load_classifiers(tmp_path)
    assert set(loaded) == set(members)
    x = batch[0]
    with torch.no_grad():
        for name, m in loaded.items():
            assert m.labels == members[name].labels
            stored = {k: v.half().float() for k, v in members[name].state_dict().items()}  # fp16 storage
            got = m.state_dict()
            assert set(got) == set(stored)
            for k, v in stored.items():
                assert torch.equal(got[k].float(), v), k
            a, b = m(x), members[name](x)
            for f in m.families:  # the fp16-rounded weights give the same logits up to fp16's precision
                torch.testing.assert_close(a[f], b[f], atol=2e-2, rtol=1e-2)


def test_missing_and_corrupt_files(members, tmp_path):
    with pytest.raises(C.ClassifierLoadError, match="config.json.*python -m lib.toy.classifiers"):
        C.load_classifiers(tmp_path / "nowhere")
    C.save_classifiers({"edges": members["edges"]}, tmp_path)
    (tmp_path / "edges.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(C.ClassifierLoadError, match="edges.safetensors.*python -m lib.toy.classifiers"):
        C.load_classifiers(tmp_path)
    from safetensors.torch import save_file

    save_file({"not.a.weight": torch.zeros(2)}, str(tmp_path / "edges.safetensors"))  # readable, but other tensors
    with pytest.raises(C.ClassifierLoadError, match=r"edges.safetensors \(\d+ tensor\(s\) missing .*1 tensor\(s\) unexpected .*not.a."
                                                    "weight.*python -m lib.toy.classifiers") as err:
        C.load_classifiers(tmp_path)
    assert "\n" not in str(err.value)  # one line
    wrong = {k: v.clone() for k, v in members["edges"].state_dict().items()}
    first = next(iter(wrong))
    wrong[first] = torch.zeros(3)  # the right names, a wrong shape
    save_file(wrong, str(tmp_path / "edges.safetensors"))
    with pytest.raises(C.ClassifierLoadError, match=r"edges.safetensors \(.*size mismatch.*python -m lib.toy"):
        C.load_classifiers(tmp_path)
    (tmp_path / "edges.safetensors").unlink()
    with pytest.raises(C.ClassifierLoadError, match="missing classifier weights .*edges.safetensors"):
        C.load_classifiers(tmp_path)
    for members_entry in ([], {}, {"edges": "edges.safetensors"}):  # crashed, or loaded no classifier at all
        (tmp_path / C.CONFIG_NAME).write_text(json.dumps({"members": members_entry}))
        with pytest.raises(C.ClassifierLoadError, match="corrupt classifier config .*'members' must map"):
            C.load_classifiers(tmp_path)


def test_accuracy_tables(members, batch):
    x, scenes, _ = batch
    counts = attribute_accuracy(x, scenes, members)
    assert list(counts.columns) == ["member", "family", "value", "correct", "n"]
    assert (counts.correct <= counts.n).all()
    table = accuracy_table(counts)
    assert set(table.index) == set(members) and np.isnan(table.loc["edges", "color"])
    assert table.equals(accuracy_table(x, scenes, members))


def test_accuracy_counts_and_table_values_with_fixed_predictions():
    scenes = [W.Scene(object="dog", color="red"), W.Scene(object="cat", color="blue"), W.Scene(character="nemo"),
              W.Scene(object="star", color="red", style="monet")]

    class Fixed:  # object: 3 of 4 right; color: 1 of the 3 scored (nemo has none); style: all 4 right
        families = ("object", "color", "style")

        def predict(self, images):
            return {"object": ["dog", "dog", "fish", "star"], "color": ["red", "red", "green", "green"],
                    "style": ["none", "none", "none", "monet"]}

    counts = attribute_accuracy(torch.zeros(4, 3, 8, 8), scenes, {"fixed": Fixed()})
    got = {(r.family, r.value): (r.correct, r.n) for r in counts.itertuples()}
    assert got == {("object", "dog"): (1, 1), ("object", "cat"): (0, 1), ("object", "fish"): (1, 1),
                   ("object", "star"): (1, 1), ("color", "red"): (1, 2), ("color", "blue"): (0, 1),
                   ("style", "none"): (3, 3), ("style", "monet"): (1, 1)}
    table = accuracy_table(counts)
    assert table.loc["fixed"].to_dict() == {"object": 0.75, "color": 1 / 3, "style": 1.0}
    with pytest.raises(ValueError, match="4 images but 3 scenes"):
        attribute_accuracy(torch.zeros(4, 3, 8, 8), scenes[:3], {"fixed": Fixed()})
    # the recorded held-out accuracy scores the same scenes (nemo has no colour to miss)
    assert C.heldout_accuracy(Fixed(), torch.zeros(4, 3, 8, 8), scenes) == {"object": 0.75, "color": 1 / 3,
                                                                             "style": 1.0}


def test_swap_captions_parse_to_swapped_scenes():
    rng = np.random.default_rng(0)
    for _ in range(50):
        scene = W.sample_scene(rng, "any")
        text = W.caption(scene, rng)
        present = ["character" if scene.character else "object"] + [
            a for a in ("color", "style", "action", "background") if getattr(scene, a)]
        swaps = swap_captions(text, scene)
        assert len(swaps) == sum(len(W.VOCAB[a]) - 1 for a in present)  # every other value of every named attribute
        for attribute, value, cand in swaps:  # ... and nothing else changed
            target = W.Scene(**{**scene.as_dict(), attribute: value, **({"object": None} if attribute == "character"
                                                                         else {})})
            assert W.parse_caption(cand) == target, (text, cand)


def test_clip_ranking_accuracy_with_an_oracle():
    _, scenes, caps = W.make_dataset(3, seed=2, split="any")
    x = torch.zeros(3, 3, 8, 8)
    x[:, 0, 0, 0] = torch.arange(3) / 10  # the image's index, for the fake scorers

    class Oracle:  # 1 for the image's own caption, 0 for every other text
        def rank(self, images, texts):
            idx = (images[:, 0, 0, 0] * 10).round().long().tolist()
            return torch.tensor([[float(t == caps[i]) for t in texts] for i in idx])

    class Blind:  # the same score for every text: ties never count as ranked first
        def rank(self, images, texts):
            return torch.zeros(len(images), len(texts))

    assert clip_ranking_accuracy(Oracle(), x, scenes, caps, batch_size=2) == 1.0
    assert clip_ranking_accuracy(Blind(), x, scenes, caps) == 0.0


@pytest.fixture(scope="module")
def committed_table():
    """Accuracy of the committed classifiers on 200 held-out renders: member × attribute (NaN: not read)."""
    assert (C.DEFAULT_DIR / C.CONFIG_NAME).is_file(), "the committed classifiers are missing: git checkout -- data/toy"
    arr, scenes, _ = W.make_dataset(200, seed=12345, split="heldout")
    return accuracy_table(arr, scenes, C.load_classifiers())


def test_committed_classifiers_reach_98_percent_on_every_attribute_but_object(committed_table):
    """The bar (issue 3: >= 0.98 on renders) holds today for colour, style, action and character of every member;
    the only head missing is the colour-blind edge member's colour (a lost head would otherwise read as a pass)."""
    rest = committed_table.drop(columns="object")
    missing = {(m, f) for m in rest.index for f in rest.columns if np.isnan(rest.loc[m, f])}
    assert missing == {("edges", "color")}, missing
    assert (rest.fillna(1.0) >= 0.98).all().all(), rest.round(3).to_string()


# What the committed weights measure on these 200 renders; a member may not lose a single image of it.
COMMITTED_OBJECT_ACCURACY = {"resnet": 0.985, "mobilenet": 0.975, "edges": 0.980}


def test_committed_classifiers_object_accuracy_does_not_regress(committed_table):
    """Object accuracy is below the bar (next test) but no member may fall below what the committed weights
    measured (``COMMITTED_OBJECT_ACCURACY``; one image is 0.005)."""
    obj = committed_table["object"]
    assert set(obj.index) == set(COMMITTED_OBJECT_ACCURACY)
    for member, floor in COMMITTED_OBJECT_ACCURACY.items():
        assert obj[member] >= floor - 1e-9, obj.round(3).to_string()


@pytest.mark.xfail(strict=True, reason="known unmet bar (issue 3): the committed classifiers reach object 0.985 / 0.975 / "
                   "0.980 (resnet / mobilenet / edges) on these renders (Picasso style is the hardest); mobilenet needs "
                   "another recipe or architecture (a GPU: --device cuda), then drop this marker")
def test_committed_classifiers_reach_98_percent_on_objects(committed_table):
    assert (committed_table["object"] >= 0.98).all(), committed_table["object"].round(3).to_string()


@pytest.fixture(scope="module")
def named_table():
    """Accuracy of the committed classifiers on the scenes of 1,000 held-out renders that name each attribute ("none"
    truths left out: 99 of the 1,000 have a character, so the all-scene figure says little about characters)."""
    assert (C.DEFAULT_DIR / C.CONFIG_NAME).is_file(), "the committed classifiers are missing: git checkout -- data/toy"
    arr, scenes, _ = W.make_dataset(1000, seed=12345, split="heldout")
    counts = attribute_accuracy(arr, scenes, C.load_classifiers())
    return accuracy_table(counts[counts.value != C.NONE])


def test_committed_classifiers_on_scenes_that_name_the_attribute(named_table):
    """>= 0.98 for every member and attribute but object (its floors: the tests above) and the edge member's
    character (0.970 on these 99 character scenes, 3 misses; next test), which may not fall below that."""
    rest = named_table.drop(columns="object")
    ok = rest.fillna(1.0) >= 0.98
    ok.loc["edges", "character"] = True  # the known miss, checked below
    assert ok.all().all(), rest.round(3).to_string()
    assert named_table.loc["edges", "character"] >= 96 / 99 - 1e-9, named_table.round(3).to_string()


@pytest.mark.xfail(strict=True, reason="known unmet bar (issue 3): the edge member reads characters on character scenes "
                   "at 0.970 (99 scenes of 1,000 held-out renders; 0.948 on another 1,000): it sees only Canny edges")
def test_the_edge_member_reads_characters_at_98_percent(named_table):
    assert named_table.loc["edges", "character"] >= 0.98, named_table.round(3).to_string()


def test_rebuild_command_reproduces_the_committed_recipe():
    """The default steps and architectures are those the committed weights were trained with."""
    config = json.loads((C.DEFAULT_DIR / C.CONFIG_NAME).read_text())
    cont = C.CONTINUATION
    first = {n: r.get("continues", r) for n, r in config["training"].items()}
    assert {n: r["steps"] for n, r in first.items()} == C.DEFAULT_STEPS
    assert {(r["seed"], r["lr"], r["n_train"]) for r in first.values()} == {(0, 3e-3, C.DEFAULT_N_TRAIN)}
    assert {n: r["steps"] for n, r in config["training"].items() if "continues" in r} == cont["steps"]
    assert {(r["seed"], r["lr"], r["n_train"]) for n, r in config["training"].items() if n in cont["steps"]} == \
        {(cont["seed"], cont["lr"], C.DEFAULT_N_TRAIN)}
    assert config["data"]["n_train"] == C.DEFAULT_N_TRAIN
    for name, spec in config["members"].items():
        built = C.build_member(name).config()
        assert {k: spec[k] for k in built} == built, name


def test_a_member_trained_alone_equals_the_same_member_trained_with_others(tmp_path):
    """Each member trains independently from ``seed`` on the same data (the docstring's promise), byte for byte."""
    kw = dict(n_train=16, n_eval=8, batch_size=4)
    C.train_classifiers(tmp_path / "both", steps={"edges": 2, "mobilenet": 2}, members=["mobilenet", "edges"], **kw)
    C.train_classifiers(tmp_path / "alone", steps={"edges": 2}, members=["edges"], **kw)
    C.train_classifiers(tmp_path / "again", steps={"edges": 2}, members=["edges"], **kw)
    edges = [(tmp_path / d / "edges.safetensors").read_bytes() for d in ("both", "alone", "again")]
    assert edges[0] == edges[1] == edges[2]
    C.train_classifiers(tmp_path / "seed1", steps={"edges": 2}, members=["edges"], seed=1, **kw)
    assert (tmp_path / "seed1" / "edges.safetensors").read_bytes() != edges[0]  # the seed does decide


def test_retraining_one_member_keeps_the_others(tmp_path, members, monkeypatch):
    C.save_classifiers(members, tmp_path, {"training": {"resnet": {"steps": 7}}, "hardware": {"device": "cpu"}})
    before = {k: v.clone() for k, v in C.load_classifiers(tmp_path)["resnet"].state_dict().items()}
    splits, make = [], W.make_dataset
    monkeypatch.setattr(W, "make_dataset", lambda n, seed, split="train", *a, **k: splits.append((n, split)) or
                        make(n, seed, split, *a, **k))
    with cpu_threads(3):  # the caller's count; the training sets its own (threads=1) and gives this one back
        meta = C.train_classifiers(tmp_path, steps={"edges": 2}, members=["edges"], n_train=16, n_eval=8, batch_size=4)
        assert torch.get_num_threads() == 3
    assert splits == [(16, "any"), (8, "heldout")]  # trained on every combination, "heldout_accuracy" on held-out ones
    assert meta["training"]["edges"]["steps"] == 2 and meta["training"]["resnet"]["steps"] == 7
    assert meta["training"]["resnet"]["hardware"] == {"device": "cpu"}  # the kept member's record travels with it
    loaded = C.load_classifiers(tmp_path)
    assert set(loaded) == set(C.MEMBERS) and set(meta["heldout_accuracy"]) == set(C.MEMBERS)
    assert all(torch.equal(v, before[k]) for k, v in loaded["resnet"].state_dict().items())
    assert not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(ValueError, match="unknown members"):
        C.train_classifiers(tmp_path, members=["vgg"])
    assert C._parse_steps(["5"]) == 5 and C._parse_steps(["edges=9", "resnet=3"]) == {"edges": 9, "resnet": 3}
    assert C._parse_steps([]) == {} and C.member_steps({}, ["edges"]) == {"edges": C.DEFAULT_STEPS["edges"]}
    assert C.member_steps({"edges": 2}, ["resnet", "edges"]) == {"resnet": C.DEFAULT_STEPS["resnet"], "edges": 2}
    assert C.member_steps(5, ["mobilenet"]) == {"mobilenet": 5}
    with pytest.raises(SystemExit, match="MEMBER=INT"):
        C._parse_steps(["vgg=3"])


def test_continuing_a_member_starts_from_its_saved_weights(tmp_path, members):
    src, out = tmp_path / "src", tmp_path / "out"
    C.save_classifiers(members, src, {"training": {"edges": {"steps": 7, "seed": 0}}})
    saved = C.load_classifiers(src)["edges"].state_dict()
    # lr 0: the weights stay those it started from, which only the saved member can explain (a fresh one differs)
    meta = C.train_classifiers(out, steps={"edges": 2}, members=["edges"], n_train=16, n_eval=8, batch_size=4,
                               lr=0.0, init_from=src, seed=3)
    cont = C.load_classifiers(out)["edges"].state_dict()
    weights = [k for k in saved if k.endswith("weight")]
    assert weights and all(torch.equal(cont[k], saved[k]) for k in weights)
    fresh = C.build_member("edges").state_dict()
    assert not all(torch.equal(fresh[k].half().float(), saved[k]) for k in weights)
    record = meta["training"]["edges"]
    assert record["continues"] == {"steps": 7, "seed": 0} and record["steps"] == 2 and record["seed"] == 3
    C.save_classifiers({"resnet": members["resnet"]}, tmp_path / "resnet_only")
    with pytest.raises(ValueError, match=r"holds no trained \['edges'\]"):
        C.train_classifiers(out, members=["edges"], init_from=tmp_path / "resnet_only", n_train=4)


def test_an_interrupted_training_is_refused_and_can_be_finished(tmp_path, members, monkeypatch):
    """A crash after the first of two continued members left a config listing that member alone: the folder loaded as
    a one-member ensemble, and the continuation of the other could not start again (its entry was gone)."""
    C.save_classifiers(members, tmp_path, {"training": {n: {"steps": 7} for n in members}})
    old_edges = (tmp_path / "edges.safetensors").read_bytes()
    real, calls = C.train_member, []

    def crash_on_second(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(C, "train_member", crash_on_second)
    kw = dict(n_train=16, n_eval=8, batch_size=4, init_from=tmp_path)
    with pytest.raises(KeyboardInterrupt):
        C.train_classifiers(tmp_path, steps=2, members=["resnet", "edges"], **kw)
    with pytest.raises(C.ClassifierLoadError, match=r"interrupted before edges finished: rerun its command with "
                                                    r"--members edges \(the finished members are kept\)"):
        C.load_classifiers(tmp_path)
    listed = C.load_classifiers(tmp_path, allow_unfinished=True)
    assert set(listed) == set(C.MEMBERS) and (tmp_path / "edges.safetensors").read_bytes() == old_edges
    monkeypatch.setattr(C, "train_member", real)
    meta = C.train_classifiers(tmp_path, steps=2, members=["edges"], **kw)  # continues edges from its earlier weights
    assert "unfinished" not in meta and set(C.load_classifiers(tmp_path)) == set(C.MEMBERS)
    assert meta["training"]["edges"]["continues"] == {"steps": 7} and meta["training"]["resnet"]["steps"] == 2
    # killed after the first member's new weights replaced its old ones, before the config said so: the folder is
    # already marked (before any weight is replaced), not an old config over a mixed ensemble
    real_save = C._save_weights
    monkeypatch.setattr(C, "_save_weights", lambda *a, **k: (real_save(*a, **k), (_ for _ in ()).throw(KeyboardInterrupt)))
    with pytest.raises(KeyboardInterrupt):
        C.train_classifiers(tmp_path, steps=1, members=["resnet"], **kw)
    with pytest.raises(C.ClassifierLoadError, match="interrupted before resnet finished"):
        C.load_classifiers(tmp_path)
    monkeypatch.setattr(C, "_save_weights", real_save)
    # a corrupt config: the full rebuild its error names replaces it; retraining some members needs the others' entries
    (tmp_path / C.CONFIG_NAME).write_text("{torn")
    with pytest.raises(C.ClassifierLoadError, match="corrupt classifier config .* the kept members"):
        C.train_classifiers(tmp_path, steps=1, members=["edges"], n_train=8, n_eval=4, batch_size=4)
    C.train_classifiers(tmp_path, steps=1, n_train=8, n_eval=4, batch_size=4)  # every member: rebuilt
    assert set(C.load_classifiers(tmp_path)) == set(C.MEMBERS)


def test_distillation_pulls_a_member_towards_the_teacher(tmp_path, members):
    """With ``distill=1`` and no labels at all, only the teacher's soft targets can move the member towards it."""
    import torch.nn.functional as F

    arr, _, _ = W.make_dataset(32, 5, "any")
    images = torch.from_numpy(arr)
    soft = C.teacher_log_probs({"resnet": C.load_classifiers()["resnet"]}, images, batch_size=10)  # trained
    assert set(soft) == set(C.FAMILIES) and soft["object"].shape == (32, len(C.LABELS["object"]))
    assert torch.allclose(soft["style"].exp().sum(-1), torch.ones(32), atol=1e-5)

    def kl(m):
        with torch.no_grad():
            out = m.eval()(C.to_tensor(arr))
        return sum(float(F.kl_div(F.log_softmax(out[f], -1), soft[f], log_target=True, reduction="batchmean"))
                   for f in ("object", "style", "action"))

    torch.manual_seed(0)
    before = kl(C.build_member("resnet"))  # train_member starts from this member (same seed)
    no_labels = {f: torch.full((32,), -1) for f in C.FAMILIES}
    student, info = C.train_member("resnet", images, no_labels, 60, 0, batch_size=8, soft=soft, distill=1.0,
                                   log_every=0)
    shuffled = {f: v[torch.randperm(32, generator=torch.Generator().manual_seed(1))] for f, v in soft.items()}
    control, _ = C.train_member("resnet", images, no_labels, 60, 0, batch_size=8, soft=shuffled, distill=1.0,
                                log_every=0)  # the same training towards soft targets of other images
    assert kl(student) < 0.8 * before and kl(student) < 0.8 * kl(control)
    assert info["distill"] == {"weight": 1.0, "temperature": C.DISTILL_T}
    # through train_classifiers: the teacher folder's record travels with the member
    C.save_classifiers(members, tmp_path / "teacher", {"heldout_accuracy": {"resnet": {"object": 0.9}}})
    meta = C.train_classifiers(tmp_path / "out", steps={"edges": 2}, members=["edges"], n_train=16, n_eval=8,
                               batch_size=4, distill_from=tmp_path / "teacher", distill=0.3)
    record = meta["training"]["edges"]["distill"]
    assert record["weight"] == 0.3 and record["teacher"]["folder_members"] == sorted(C.MEMBERS)
    with pytest.raises(ValueError, match=r"distill must be in \(0, 1\]"):
        C.train_classifiers(tmp_path / "out", members=["edges"], n_train=4, distill_from=tmp_path / "teacher",
                            distill=0.0)


def test_rebuild_committed_runs_both_stages(tmp_path):
    meta = C.rebuild_committed(tmp_path, smoke_steps=1, n_train=8, n_eval=4, batch_size=2)
    cont = C.CONTINUATION
    for name, record in meta["training"].items():
        assert (record["seed"], record["lr"]) == (cont["seed"], cont["lr"])
        assert (record["continues"]["seed"], record["continues"]["lr"]) == (0, 3e-3)
        assert "continues" not in record["continues"]
    assert set(meta["training"]) == set(C.MEMBERS) == set(cont["steps"])


def test_the_ensemble_is_the_mean_of_its_members_log_probabilities(members, batch):
    from lib.editing.evaluate import classify

    x = batch[0]
    with torch.no_grad():
        lp = C.ensemble_log_probs(members, x)
        for f in C.FAMILIES:
            having = [m(x)[f].log_softmax(-1) for m in members.values() if f in m.families]
            torch.testing.assert_close(lp[f], torch.stack(having).mean(0))
    assert "color" in lp and "color" not in members["edges"].families  # a family some members lack is still read
    one = classify({"resnet": members["resnet"]}, x)
    assert one.to_dict("list") == members["resnet"].predict(x)  # a one-member ensemble predicts as the member does


def test_channel_permuted_images_teach_no_colour(monkeypatch):
    """A colour-blind view (channels permuted) keeps every label but its colour: the colour head is neither taught
    the scene's colour on it (cross-entropy target -1) nor distilled towards the teacher's colour there."""
    import torch.nn.functional as F

    arr, scenes, _ = W.make_dataset(8, 0, "train")
    families = C.build_member("resnet").families
    soft = {f: torch.log_softmax(torch.zeros(8, len(C.LABELS[f])), -1) for f in families}
    seen = {"ce": [], "kl": 0}
    ce, kl = F.cross_entropy, F.kl_div
    monkeypatch.setattr(C.F, "cross_entropy", lambda logits, t, **k: seen["ce"].append(t.clone()) or ce(logits, t, **k))
    monkeypatch.setattr(C.F, "kl_div", lambda *a, **k: seen.__setitem__("kl", seen["kl"] + 1) or kl(*a, **k))
    with torch.random.fork_rng():
        C.train_member("resnet", torch.from_numpy(arr), C.scene_targets(scenes), steps=1, seed=0, batch_size=4,
                       p_permute=1.0, soft=soft, log_every=0)
    colour = seen["ce"][families.index("color")]
    assert (colour == -1).all() and not (seen["ce"][families.index("object")] == -1).all()
    assert seen["kl"] == len(families) - 1  # every family distilled but the colour
