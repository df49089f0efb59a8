"""The toy world's renderer and caption grammar (fast: no torch)."""

import hashlib
import re

import numpy as np
import pytest

from lib.toy import world as W
from lib.toy.world import Scene


def test_same_seed_same_bytes():
    s = Scene(object="star", color="red", style="van gogh", action="spinning", background="on a beach")
    a, b = W.render(s, 7).tobytes(), W.render(s, np.random.default_rng(7)).tobytes()
    assert a == b and a != W.render(s, 8).tobytes()
    x1, s1, c1 = W.make_dataset(40, seed=3, split="train")
    x2, s2, c2 = W.make_dataset(40, seed=3, split="train")
    assert x1.dtype == np.uint8 and x1.shape == (40, 64, 64, 3)
    assert np.array_equal(x1, x2) and s1 == s2 and c1 == c2


def test_the_renders_are_those_the_committed_world_was_trained_on():
    """80 scenes (every value of every attribute among them) pinned by hash: the committed weights in data/toy learnt
    this renderer, so a change to how it draws or captions (a colour's RGB, a glyph, a template) shows here."""
    x, scenes, caps = W.make_dataset(80, seed=0, split="any")
    assert all(set(W.VOCAB[a]) <= {getattr(s, a) for s in scenes} for a in W.ATTRIBUTES)
    digest = hashlib.sha256(x.tobytes() + "\n".join(caps).encode()).hexdigest()
    assert digest == "6dbb02b4dd35010cf135d70bcafcd7824e927b06d619b6509549fc0aad6adcf1", (
        "the renderer or the captions changed: retrain the toy world (README, Training) or revert the change")


@pytest.mark.parametrize("attr", W.ATTRIBUTES)
def test_every_value_renders(attr):
    base = {"character": "snoopy"} if attr == "character" else {"object": "dog", "color": "red"}
    flat = np.asarray(W.render(Scene(object="dog", color="red"), 0), np.int16)
    for v in W.VOCAB[attr]:
        kw = dict(base)
        kw[attr] = v
        if attr == "character":
            kw = {"character": v}
        img = W.render(Scene(**kw), 0)
        assert img.size == (64, 64) and img.mode == "RGB"
        arr = np.asarray(img, np.int16)
        assert arr.std() > 10
        if kw != {"object": "dog", "color": "red"}:
            assert np.abs(arr - flat).mean() > 1.0, (attr, v)


def test_caption_round_trip():
    rng = np.random.default_rng(0)
    for _ in range(500):
        s = W.sample_scene(rng, "any")
        c = W.caption(s, rng)
        assert W.parse_caption(c) == s, c
        assert "  " not in c and " a a" not in c and not re.search(r"\ba [aeiou]", c), c  # "an orange", never "a orange"
    for s in [Scene(object="heart", color="orange", action="jumping", style="monet"), Scene(character="grumpy cat")]:
        for c in W.captions(s):
            assert W.parse_caption(c) == s, c


def test_articles_and_phrasings():
    s = Scene(object="star", color="orange")
    assert "an orange star" in W.captions(s) and "a photo of an orange star" in W.captions(s)
    s = Scene(object="star", color="red", style="van gogh", background="on a beach")
    cs = W.captions(s)
    assert "a red star on a beach, in the style of van gogh" in cs
    assert "a van gogh painting of a red star on a beach" in cs
    assert "a red star on a beach painted by van gogh" in cs
    assert W.captions(Scene(object="star", color="red", style="painting")) == ["a painting of a red star"]
    dog = W.captions(Scene(object="dog", color="red", action="sleeping"))
    assert "a red dog sleeping" in dog and "a sleeping red dog" in dog


def test_subject_span():
    s = Scene(object="star", color="red", style="van gogh")
    c = "a van gogh painting of a red star"
    assert W.subject_span(c, s, "style") == "van gogh"
    assert W.subject_span(c, s, "color") == "red"
    assert W.subject_span(c, s, "object") == "star"
    g = Scene(character="grumpy cat", background="in a city")
    assert W.subject_span("a photo of grumpy cat in a city", g, "character") == "grumpy cat"
    assert W.subject_span("a photo of grumpy cat in a city", g, "background") == "in a city"
    with pytest.raises(ValueError, match="object 'cat' of character 'grumpy cat' is implied"):
        W.subject_span("a photo of grumpy cat", g, "object")
    rng = np.random.default_rng(1)
    for _ in range(200):
        s = W.sample_scene(rng, "any")
        c = W.caption(s, rng)
        for a in W.ATTRIBUTES:
            if getattr(s, a) is not None and not (a == "object" and s.character):
                assert W.subject_span(c, s, a) == getattr(s, a)


def test_heldout_split():
    _, scenes, _ = W.make_dataset(3000, seed=0, split="train")
    assert not any(W.is_heldout(s) for s in scenes)
    for a in W.ATTRIBUTES:  # every single value is still seen in training
        seen = {getattr(s, a) for s in scenes}
        assert set(W.VOCAB[a]) <= seen, a
    rng = np.random.default_rng(0)
    held = [W.sample_scene(rng, "heldout") for _ in range(200)]
    assert all(W.is_heldout(s) for s in held)
    kinds = {(p[0], p[2]) for s in held for p in W.heldout_pairs(s)}
    assert kinds == set(W.HELDOUT)


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"character 'snoopy' has a fixed color; got color='red'\. .*circle"):
        Scene(character="snoopy", color="red")
    with pytest.raises(ValueError, match=r"unknown object 'banana'\. Valid vocabulary: .*circle"):
        Scene(object="banana")
    with pytest.raises(ValueError, match="on the moon.*on a beach"):
        Scene(object="star", background="on the moon")
    assert W.parse_caption("A Photo of a Red Star") == Scene(object="star", color="red")  # case does not matter
    # labels: -1 where the attribute is absent, else the index into the vocabulary
    assert W.label_indices([Scene(object="star"), Scene(object="star", color="green")], "color").tolist() == [-1, 1]
    with pytest.raises(ValueError, match="character 'nemo' is a fish, not a 'dog'"):
        Scene(character="nemo", object="dog")
    with pytest.raises(ValueError, match="needs an object or a character. Valid vocabulary: objects: 'circle'"):
        Scene()
    with pytest.raises(ValueError, match=r"cannot parse style 'rembrandt' in caption .* Valid vocabulary: .*van gogh"):
        W.parse_caption("a red star painted by rembrandt")
    with pytest.raises(ValueError, match="Valid vocabulary: objects: .*colors: .*red"):
        W.parse_caption("a photo of a magenta star")
    with pytest.raises(ValueError, match="empty caption. Valid vocabulary"):
        W.parse_caption("")
    with pytest.raises(ValueError, match="character 'snoopy' has a fixed color, so 'red' cannot describe it"):
        W.parse_caption("a photo of a red snoopy on a beach")
    with pytest.raises(ValueError, match="character 'grumpy cat' is already a cat; write 'grumpy cat' alone"):
        W.parse_caption("a grumpy cat cat sleeping")
    with pytest.raises(ValueError, match="split must be 'train', 'heldout' or 'any', got 'test'"):
        W.sample_scene(0, "test")
    with pytest.raises(TypeError, match="numpy Generator or an int seed, got str"):
        W.render(Scene(object="star"), "seed")


def test_parallel_dataset_is_independent_of_workers_and_matches_its_chunks():
    a_img, a_sc, a_cap = W.make_dataset_parallel(10, seed=3, workers=1, chunk=4)
    b_img, b_sc, b_cap = W.make_dataset_parallel(10, seed=3, workers=2, chunk=4)
    assert a_img.shape == (10, W.SIZE, W.SIZE, 3) and len(a_sc) == len(a_cap) == 10
    assert np.array_equal(a_img, b_img) and a_cap == b_cap and a_sc == b_sc
    c_img, _, c_cap = W.make_dataset(2, seed=[3, 2], split="train")  # the last chunk
    assert np.array_equal(a_img[8:], c_img) and a_cap[8:] == c_cap
    with pytest.raises(ValueError, match="n must be"):
        W.make_dataset_parallel(-1, seed=0)
