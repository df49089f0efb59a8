import pytest
import torch

from lib.scoring import ClipScorer, openclip_scorer


def _identity_scorer():
    # image "features" are the mean colour, text "features" one-hot colours: the score is checkable by hand
    table = {"red": [1.0, 0, 0], "green": [0, 1.0, 0], "anti": [-1.0, 0, 0]}
    return ClipScorer(
        encode_image=lambda x: x.mean(dim=(2, 3)),
        encode_text=lambda ids: ids,
        tokenize=lambda texts: torch.tensor([table[t] for t in texts]),
        image_size=8, mean=(0, 0, 0), std=(1, 1, 1),
    )


def test_clip_score_is_100_times_clamped_cosine():
    s = _identity_scorer()
    red = torch.zeros(1, 3, 8, 8)
    red[:, 0] = 1
    assert torch.allclose(s.score(red, ["red"]), torch.tensor([100.0]))
    assert torch.allclose(s.score(red, ["green"]), torch.tensor([0.0]))
    assert torch.allclose(s.score(red, ["anti"]), torch.tensor([0.0]))  # negative cosine clamps to 0
    assert s.rank(red, ["red", "anti"]).tolist() == [[1.0, -1.0]]
    yellow = torch.zeros(1, 3, 8, 8)
    yellow[:, :2] = 1  # cosine 1/sqrt(2) with "red"
    assert torch.allclose(s.score(yellow, ["red"]), torch.tensor([100 / 2**0.5]))
    assert torch.allclose(s.score(torch.cat([red, yellow]), ["green", "green"]), torch.tensor([0.0, 100 / 2**0.5]))
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        s.score(torch.cat([red, yellow]), ["red"])
    # text features of any length: the score is still a cosine (a text encoder's output is not unit length)
    long = ClipScorer(encode_image=lambda x: x.mean(dim=(2, 3)), encode_text=lambda ids: 3.0 * ids,
                      tokenize=lambda texts: torch.tensor([[1.0, 0, 0]] * len(texts)), image_size=8, mean=(0, 0, 0),
                      std=(1, 1, 1))
    assert torch.allclose(long.score(yellow, ["red"]), torch.tensor([100 / 2**0.5]))


def test_openclip_path_runs_offline_with_random_weights():
    s = openclip_scorer("ViT-B-32", pretrained=None)
    x = torch.rand(2, 3, 64, 64, requires_grad=True)
    out = s.score(x, ["a cat", "a dog"])
    out.sum().backward()
    assert out.shape == (2,) and (out >= 0).all() and x.grad is not None
    import open_clip  # the same numbers from open_clip's own model, tokenizer and normalisation (224 px: no resize)

    x = torch.rand(2, 3, 224, 224)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1)
                 for v in (open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD))
    tokens = open_clip.get_tokenizer("ViT-B-32")(["a cat", "a dog"])
    with torch.no_grad():
        img = torch.nn.functional.normalize(s.module.encode_image((x - mean) / std), dim=-1)
        txt = torch.nn.functional.normalize(s.module.encode_text(tokens), dim=-1)
        torch.testing.assert_close(s.rank(x, ["a cat", "a dog"]), img @ txt.T, atol=1e-5, rtol=1e-4)


def test_openai_weights_get_the_quick_gelu_they_were_trained_with(monkeypatch):
    """open_clip's plain ViT configs use GELU; OpenAI's weights need QuickGELU (open_clip only warns). The weights
    are replaced by random ones here (no download): what is checked is the model the scorer builds around them."""
    import warnings

    import open_clip
    from open_clip.transformer import QuickGELU

    real = open_clip.create_model
    seen = {}

    def no_download(name, pretrained=None, **kwargs):
        seen.update(kwargs, pretrained=pretrained)
        return real(name, pretrained=None, **kwargs)

    monkeypatch.setattr(open_clip, "create_model", no_download)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = openclip_scorer("ViT-B-32", "openai")
    assert seen["pretrained"] == "openai" and seen["force_quick_gelu"] is True
    assert isinstance(s.module.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    plain = openclip_scorer("ViT-B-32", None)  # random weights: the config's own activation
    assert seen["force_quick_gelu"] is False and not isinstance(plain.module.visual.transformer.resblocks[0].mlp.gelu,
                                                                QuickGELU)
    plain.module.load_state_dict(s.module.state_dict())
    assert plain.fingerprint() != s.fingerprint()  # same weights, other activation: scores never mixed on resume
    assert s.architecture == "quick_gelu" and plain.architecture == ""


def test_missing_openai_clip_weights_fail_in_one_line_before_the_pipeline_loads(monkeypatch):
    """Offline with an empty cache (conftest): one line, and the tracing notebooks' load stops before the pipeline."""
    from types import SimpleNamespace

    import lib.loading
    from lib.loading import ModelLoadError
    from lib.tracing import notebook as TN

    with pytest.raises(ModelLoadError, match="open_clip ViT-B-32 weights 'openai' are not available locally") as err:
        openclip_scorer("ViT-B-32", "openai")
    assert "\n" not in str(err.value)
    loads = []
    monkeypatch.setattr(lib.loading, "load_pipeline", lambda *a, **k: loads.append(a))
    P = SimpleNamespace(PROBES="toy", N_VAL=1, N_TEST=1, MODEL="toy", DEVICE="cpu", SCORER="openclip:ViT-B-32:openai",
                        EVAL_SPLIT="all", TAU=0.3)
    with pytest.raises(ModelLoadError, match="not available locally"):
        TN.load(P)
    assert loads == []


def test_a_quickgelu_config_is_recorded_as_built():
    """A local OpenAI checkpoint goes with a -quickgelu config (no tag to read the activation from): the scorer's
    fingerprint follows the model as built."""
    s = openclip_scorer("ViT-B-32-quickgelu", None)
    assert s.architecture == "quick_gelu"


@pytest.mark.parametrize("shape", [(64, 96), (96, 64), (300, 300)])
def test_openclip_pixels_match_its_own_eval_transform(shape):
    """A non-square image was squashed to a square; open_clip's eval transform (and transformers') resizes the shorter
    side and crops the centre. The model now sees what open_clip's own transform gives it, up to uint8 rounding."""
    import numpy as np
    import open_clip
    from PIL import Image

    torch.manual_seed(0)
    scorer = openclip_scorer("ViT-B-32", None)
    _, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]  # smooth: the two bicubic kernels differ only at sharp edges
    img = np.stack([128 + 100 * np.sin(xx / 9.0), 128 + 100 * np.cos(yy / 7.0), 128 + 60 * np.sin((xx + yy) / 11.0)],
                   -1).astype(np.uint8)
    seen, encode = [], scorer.encode_image
    scorer.encode_image = lambda x: (seen.append(x.detach()), encode(x))[1]
    ref = preprocess(Image.fromarray(img))[None]
    levels = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1) * 255  # normalised units -> uint8 levels

    def gap() -> float:  # the largest difference from open_clip's transform, in uint8 levels
        seen.clear()
        scorer.image_features(torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255)
        assert seen[0].shape == ref.shape == (1, 3, 224, 224)
        return float(((seen[0] - ref).abs() * levels).max())

    assert gap() < 1.2  # PIL rounds to uint8 and its bicubic kernel (a = -0.5) is not torch's: measured 1.00-1.06
    assert scorer.resize_mode == "shortest" and scorer.interpolation == "bicubic"
    scorer.interpolation = "bilinear"  # the bound tells the resampling kernels apart: bilinear measured 1.34-1.57
    assert gap() > 1.2
