"""The latent probe (lib.toy.latent_probe): the probe learns what its inputs hold, and nothing else."""

import pytest
import torch

from lib.toy import latent_probe as LP
from lib.toy import world as W


def test_the_probe_reads_a_class_written_into_its_inputs_and_not_one_that_is_absent():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(8, (600,), generator=g)
    z = 0.3 * torch.randn(600, 4, 8, 8, generator=g)
    z[torch.arange(600), y % 4, y // 4, 0] += 3.0  # the class as one strong entry
    test, train = LP.probe_accuracy(z[:400], y[:400], z[400:], y[400:], steps=300)
    assert test > 0.95 and train > 0.95
    noise = torch.randn(600, 4, 8, 8, generator=g)
    test, train = LP.probe_accuracy(noise[:400], y[:400], noise[400:], y[400:], steps=300)
    assert test < 0.3 and train > test  # chance is 0.125: it can only memorise


def test_the_image_probe_reads_a_class_drawn_into_a_patch():
    g = torch.Generator().manual_seed(1)
    y = torch.randint(8, (600,), generator=g)
    x = 0.3 * torch.rand(600, 3, 64, 64, generator=g)
    for i, c in enumerate(y.tolist()):  # class c: a bright 4 x 4 square at the centre of patch (c, c)
        x[i, :, 8 * c + 2 : 8 * c + 6, 8 * c + 2 : 8 * c + 6] += 0.7
    test, _ = LP.probe_accuracy(x[:400], y[:400], x[400:], y[400:], steps=100)
    assert test > 0.95
    test, _ = LP.probe_accuracy(x[:400], y[torch.randperm(600, generator=g)][:400], x[400:], y[400:], steps=100)
    assert test < 0.3  # labels shuffled: nothing to read


def test_character_scenes_are_labelled_by_class_and_style():
    x, y, scenes = LP.character_scenes("picasso", 40, seed=3)
    assert x.shape == (40, 3, 64, 64) and 0 <= x.min() and x.max() <= 1 and len(set(y.tolist())) > 4
    for label, s in zip(y.tolist(), scenes):
        assert s.style == "picasso"
        name = LP.CLASSES[label]
        assert (s.character == name) if label < 4 else (s.character is None and f"plain {s.object}" == name)
    again = LP.character_scenes("picasso", 40, seed=3)
    assert torch.equal(again[0], x) and torch.equal(again[1], y)
    with pytest.raises(ValueError, match="unknown style 'cubism'; choose one of van gogh, monet, picasso"):
        LP.character_scenes("cubism", 1, seed=0)


def test_class_accuracy_maps_character_and_object_names():
    class Fixed:
        def predict(self, images):
            return {"character": ["snoopy", "none", "none", "nemo"], "object": ["dog", "dog", "car", "fish"]}

    y = torch.tensor([LP.CLASSES.index("snoopy"), LP.CLASSES.index("plain dog"), LP.CLASSES.index("plain cat"),
                      LP.CLASSES.index("plain fish")])
    assert LP.class_accuracy(Fixed(), torch.zeros(4, 3, 8, 8), y) == 0.5
    assert set(LP.CLASSES[4:]) == {f"plain {W.CHARACTER_OBJECT[c]}" for c in W.CHARACTERS}


def test_run_probe_on_the_toy_world_reports_the_four_readings(tmp_path, monkeypatch):
    calls, results, real = [], [], LP.probe_accuracy

    def recorded(z_tr, y_tr, z_te, y_te, **k):
        calls.append((len(z_tr), len(z_te), tuple(z_tr.shape[1:])))
        results.append(real(z_tr, y_tr, z_te, y_te, **k))
        return results[-1]

    monkeypatch.setattr(LP, "probe_accuracy", recorded)
    with pytest.raises(ValueError, match="n_train and n_test must be >= 1"):
        LP.run_probe("picasso", n_train=0)
    with pytest.raises(ValueError, match="unknown style"):
        LP.main(["--style", "cubism", "--out", str(tmp_path)])
    LP.main(["--style", "none", "--n-train", "48", "--n-test", "16", "--steps", "5", "--image-probes",
             "--out", str(tmp_path)])
    import json

    (row,) = json.loads((tmp_path / "latent_probe.json").read_text())
    assert row["style"] == "none" and row["n_train"] == 48
    assert all(0.0 <= row[k] <= 1.0 for k in ("latent", "latent_train", "pixels8", "roundtrip", "render",
                                               "roundtrip_probe", "render_probe"))
    assert row["render"] >= 0.9  # unstyled renders: the ensemble names character and object
    assert calls[0][:2] == (48, 16)  # the latent probe is read on the 16 test scenes, not on its 48 training ones
    # each reading is its own probe's: latents (4 × 8 × 8), 8 × 8 pixels, round trips and renders (3 × 64 × 64)
    assert [c[2] for c in calls] == [(4, 8, 8), (3, 8, 8), (3, 64, 64), (3, 64, 64)]
    assert (row["latent"], row["latent_train"]) == (round(results[0][0], 4), round(results[0][1], 4))
    assert (row["pixels8"], row["roundtrip_probe"], row["render_probe"]) == tuple(
        round(r[0], 4) for r in results[1:])
