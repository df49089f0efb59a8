"""SAGE on the tiny SD v1 twin (64 px, 2–3 steps) with small random classifier members: shapes, gradients, errors."""

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lib.prompts import PromptError
from lib.sage.gradient import FP16_LOSS_SCALE, grad_problem, loss_scale_for, scaled_grad, scaled_grad_rows
from lib.sage.latent import (
    MODE_GOAL, SHELL_STD, LatentSearch, LatentShapeError, Residual, check_latent, latent_campaign, load_latent,
    load_result, project_to_shell, read_result, render_latent, sample_with_residual, save_latent, search_latent,
    search_latents, shell_bounds, signed_step,
)
from lib.sage.loss import (
    ClipMember, Criteria, EdgeMember, Ensemble, FnMember, ToyMember, UnknownClassError, imagenet_groups, timm_member,
)
from lib.sage.metrics import (
    confirmed, confirmed_fraction, ngr, normality, prompt_confirmed, qq_points, recheck, renderer_check, ssr,
)
from lib.sage.prompt import (
    CandidateLM, PromptSearch, categorize, encode_with_slots, render_with_slots, search_prompt, slot_dim, token_table,
    word_embedding,
)
from lib.sage.token import (TokenAttack, TokenResult, evaluate_token, load_token, pooled_text, save_token,
                            train_token)
from lib.sampling import decode, denoise, encode, initial_latents, make_scheduler, predict_noise
from lib.scoring import ClipScorer
from lib.speed import cpu_threads
from lib.twins import build_twin

LABELS = ("cat", "dog", "car")


def small_net(n: int = len(LABELS), seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, n))


def const_member(logits, labels=LABELS, name="const") -> FnMember:
    """Ignores the image except for a zero-weighted term (so gradients exist but are 0)."""
    t = torch.tensor(logits, dtype=torch.float32)
    return FnMember(lambda x: t.expand(x.shape[0], -1) + 0 * x.mean((1, 2, 3))[:, None], labels, name)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on the shared 2-core machine two threads under contention run ~30x slower."""
    with cpu_threads(1):
        yield


@pytest.fixture(scope="module")
def pipe():
    p = build_twin("sd-v1")
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def ens():
    return Ensemble([FnMember(small_net(seed=1), LABELS, "a"), FnMember(small_net(seed=2), LABELS, "b"),
                     EdgeMember(FnMember(small_net(seed=3), LABELS, "c"))])


# ------------------------------------------------------------------------------------------------------------- loss
def test_loss_formulas_and_verdicts():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.2, 0.7], [0.2, 0.45, 0.35]])
    ens = Ensemble([const_member([0.0, 0.0, 0.0])] * 2, groups={"pet": ("cat", "dog")})
    probs = [p, p]
    assert torch.allclose(ens.loss(probs, "cat", "lose"), 2 * (2 * p[:, 0] - 1))
    assert torch.allclose(ens.loss(probs, "cat", "uncertain"), 2 * (2 * p.max(-1).values - 1))
    other = ((2 * p[:, 0] - 1) + (1 - 2 * p[:, 1:].max(-1).values)) / 2
    assert torch.allclose(ens.loss(probs, "cat", "other"), 2 * other)
    assert torch.allclose(ens.loss(probs, "cat", "become", "car"), 2 * (1 - 2 * p[:, 2]))
    assert torch.allclose(ens.loss(probs, "pet", "lose"), 2 * (2 * (p[:, 0] + p[:, 1]) - 1))  # a group
    # type 1 of a group counts the group as one label: all "pet", split between cat and dog, is no uncertain image
    pet = (p[:, 0] + p[:, 1]).clamp_min(p[:, 2])
    assert torch.allclose(ens.loss(probs, "pet", "uncertain"), 2 * (2 * pet - 1))
    split = [torch.tensor([[0.5, 0.5, 0.0]])] * 2
    assert ens.loss(split, "pet", "uncertain").item() == pytest.approx(2.0)  # was 0: half-way to a type-1 find
    assert not ens.judge(split, "pet", "type1").item()
    assert ens.judge(probs, "cat", "lose").tolist() == [False, True, True]
    assert ens.judge(probs, "cat", "type2").tolist() == [False, True, False]
    assert ens.judge(probs, "cat", "type1").tolist() == [False, False, True]
    assert ens.judge(probs, "cat", "become", "car").tolist() == [False, True, False]
    strict = Ensemble(ens.members, criteria=Criteria(confident_above=0.8))
    assert strict.judge(probs, "cat", "type2").tolist() == [False, False, False]


def test_type2_needs_the_members_to_agree_on_the_other_label():
    a = torch.tensor([[0.05, 0.90, 0.05], [0.05, 0.90, 0.05]])  # member a: a dog, twice
    b = torch.tensor([[0.05, 0.10, 0.85], [0.05, 0.70, 0.25]])  # member b: a car, then a dog
    ens = Ensemble([const_member([0.0, 0.0, 0.0], name="a"), const_member([0.0, 0.0, 0.0], name="b")])
    assert ens.judge([a, b], "cat", "lose").tolist() == [True, True]
    assert ens.judge([a, b], "cat", "type2").tolist() == [False, True]  # a dog to one and a car to the other: no
    assert ens.agreed_label([a, b], "cat") == ["dog", "dog"]  # summed over the members: dog 1.00 / 1.60
    # the loss pulls every member towards the one agreed label, not each towards its own favourite
    other = sum(((2 * p[:, 0] - 1) + (1 - 2 * p[:, 1])) / 2 for p in (a, b))
    assert torch.allclose(ens.loss([a, b], "cat", "other"), other)
    # members without a shared label name fall back to each one's own most probable other label
    odd = Ensemble([const_member([0.0, 0.0, 0.0], name="a"),
                    const_member([0.0, 0.0, 0.0], labels=("cat", "fox", "bus"), name="b")])
    assert odd.agreed_label([a, b], "cat") == [None, None] and odd.judge([a, b], "cat", "type2").tolist() == [True, True]
    # the held-out checker confirms a type-2 failure only if it sees the label the members agreed on
    dog, car = const_member([0.0, 5.0, 0.0], name="sees-dog"), const_member([0.0, 0.0, 5.0], name="sees-car")
    pair = Ensemble([const_member([0.0, 5.0, 0.0], name="a"), const_member([0.0, 4.0, 1.0], name="b")])
    images = torch.rand(2, 3, 8, 8)
    assert recheck(images, dog, "cat", "type2", ensemble=pair).tolist() == [True, True]
    assert recheck(images, car, "cat", "type2", ensemble=pair).tolist() == [False, False]
    assert recheck(images, car, "cat", "lose", ensemble=pair).tolist() == [True, True]


def test_failure_types_map_to_their_goals_and_the_documented_thresholds():
    # type 1 (distorted: nothing recognised) descends "uncertain", type 2 (something else, confidently) "other"
    assert MODE_GOAL == {"type1": "uncertain", "type2": "other", "lose": "lose"}
    assert Criteria() == Criteria(class_below=0.5, uncertain_below=0.5, confident_above=0.5)  # README: THRESHOLD 0.5


def test_each_verdict_reads_its_own_threshold_the_group_sum_and_every_member():
    one = Ensemble([const_member([0.0, 0.0, 0.0])], groups={"pet": ("cat", "dog")},
                   criteria=Criteria(class_below=0.5, uncertain_below=0.4))
    # "pet" spread over cat and dog: car is the top label, but the group holds 0.55 ≥ class_below, so not lost
    spread = [torch.tensor([[0.30, 0.25, 0.45], [0.20, 0.20, 0.60]])]
    assert one.judge(spread, "pet", "lose").tolist() == [False, True]
    # type 1 asks max probability < uncertain_below (0.4), not < class_below (0.5)
    assert one.judge([torch.tensor([[0.10, 0.45, 0.45], [0.25, 0.37, 0.38]])], "cat", "type1").tolist() == [False, True]
    # become: every member's top label is the target
    two = Ensemble([const_member([0.0, 0.0, 0.0], name="a"), const_member([0.0, 0.0, 0.0], name="b")])
    car, dog = torch.tensor([[0.1, 0.1, 0.8]]), torch.tensor([[0.1, 0.8, 0.1]])
    assert two.judge([car, dog], "cat", "become", "car").tolist() == [False]
    assert two.judge([car, car], "cat", "become", "car").tolist() == [True]
    # the agreed other label sums over the members: not the first member's favourite (a: dog 0.6; a + b: car 1.35)
    assert two.agreed_label([torch.tensor([[0.0, 0.6, 0.4]]), torch.tensor([[0.0, 0.05, 0.95]])], "cat") == ["car"]
    # the re-check judges with the search ensemble's criteria and groups
    checker = const_member([np.log(0.3), np.log(0.7), -20.0], name="held-out")  # cat 0.3, dog 0.7
    images = torch.rand(1, 3, 8, 8)
    assert recheck(images, checker, "cat", ensemble=two).tolist() == [True]  # 0.3 < 0.5
    lenient = Ensemble(two.members, criteria=Criteria(class_below=0.2))
    assert recheck(images, checker, "cat", ensemble=lenient).tolist() == [False]  # 0.3 ≥ 0.2: the class is still seen
    grouped = Ensemble(two.members, groups={"pet": ("cat", "dog")})
    assert recheck(images, checker, "pet", ensemble=grouped).tolist() == [False]  # dog is a pet


def test_the_checker_cannot_be_an_ensemble_member_under_another_name():
    import copy

    from lib.sage.build import build_ensemble

    with pytest.raises(ValueError, match="also an ensemble member"):
        build_ensemble(["resnet", "edges"], checker="toy:resnet")
    net = small_net(seed=5)
    ens = Ensemble([EdgeMember(FnMember(net, LABELS, "inner"))])
    for same in (FnMember(net, LABELS, "alias"), FnMember(copy.deepcopy(net), LABELS, "copy")):
        with pytest.raises(ValueError, match="same network"):
            recheck(torch.rand(1, 3, 16, 16), same, "cat", ensemble=ens)
    assert recheck(torch.rand(1, 3, 16, 16), FnMember(small_net(seed=6), LABELS, "other"), "cat", ensemble=ens).shape == (1,)


def test_bad_classes_and_goals_raise():
    ens = Ensemble([const_member([0.0, 0.0, 0.0])])
    with pytest.raises(UnknownClassError, match="near matches: 'cat'"):
        ens.indices("catt")
    with pytest.raises(UnknownClassError, match="its labels: cat, dog, car"):
        ens.indices("zebra")
    with pytest.raises(ValueError, match="equals the source"):
        ens.loss([torch.ones(1, 3) / 3], "cat", "become", "Cat")
    many = Ensemble([const_member([0.0] * 60, [f"label{i:02d}" for i in range(60)], "wide")])
    with pytest.raises(UnknownClassError, match=r"no near match \(first labels: label00, label01, .*, …\)$"):
        many.indices("qwxyzz")
    grouped = Ensemble([const_member([0.0, 0.0, 0.0])], groups={"pet": ("cat", "dog")})
    with pytest.raises(ValueError, match=r"target 'cat' overlaps the source class 'pet' for member .*shared labels: cat"):
        grouped.loss([torch.ones(1, 3) / 3], "pet", "become", "cat")
    with pytest.raises(ValueError, match="overlaps the source class"):
        grouped.judge([torch.ones(1, 3) / 3], "cat", "become", "pet")
    assert grouped.loss([torch.ones(1, 3) / 3], "pet", "become", "car").shape == (1,)
    with pytest.raises(ValueError, match="unknown goal"):
        ens.loss([torch.ones(1, 3) / 3], "cat", "win")
    with pytest.raises(ValueError, match="at least one member"):
        Ensemble([])
    with pytest.raises(ValueError, match=r"images must be \(B, 3, H, W\)"):
        ens.probs(torch.rand(1, 1, 8, 8))


def test_report_table(ens):
    df = ens.report(torch.rand(2, 3, 32, 32), "cat", target="dog")
    assert len(df) == 6 and set(df.columns) >= {"member", "p_class", "top_label", "top_prob", "p_target"}
    import math

    known = Ensemble([const_member([math.log(0.7), math.log(0.2), math.log(0.1)], name="a"),
                      const_member([math.log(0.1), math.log(0.3), math.log(0.6)], name="b")])
    t = known.report(torch.rand(2, 3, 8, 8), "cat", target="dog").set_index(["member", "image"])
    assert t.loc[("a", 1), ["p_class", "top_prob", "p_target"]].tolist() == pytest.approx([0.7, 0.7, 0.2])
    assert t.loc[("b", 0), ["p_class", "top_prob", "p_target"]].tolist() == pytest.approx([0.1, 0.6, 0.3])
    assert t["top_label"].tolist() == ["cat", "cat", "car", "car"]


def test_edge_member_is_canny_forward_and_differentiable():
    from kornia.filters import canny

    seen = {}

    def inner(x):
        seen["x"] = x
        return x.mean((2, 3))

    edge = EdgeMember(FnMember(inner, LABELS, "mean"))
    img = torch.rand(2, 3, 32, 32, requires_grad=True)
    logits = edge(img)
    assert logits.shape == (2, 3)
    hard = canny(img.detach(), 0.1, 0.2)[1]
    assert torch.allclose(seen["x"][:, :1], 1 - hard, atol=1e-5)  # forward: exactly Canny (inverted sketch)
    logits.sum().backward()
    assert img.grad is not None and img.grad.abs().sum() > 0 and torch.isfinite(img.grad).all()
    # straight-through: the soft map's gradient (the inner mean is linear, so the two backward passes agree exactly)
    soft_img = img.detach().clone().requires_grad_(True)
    EdgeMember(FnMember(inner, LABELS, "mean"), gradient="soft")(soft_img).sum().backward()
    torch.testing.assert_close(img.grad, soft_img.grad)


def test_edge_member_runs_canny_at_the_inner_member_s_resolution():
    """A 512-px image is downscaled to the inner member's input size before Canny: the sketch the classifier sees is
    that of the image at its own resolution (crisp black lines), not a 512-px edge map thinned to faint grey."""
    from kornia.filters import canny

    seen = {}

    def inner(x):
        seen["x"] = x
        return x.mean((2, 3))

    yy, xx = torch.meshgrid(torch.arange(512), torch.arange(512), indexing="ij")
    disk = ((yy - 256) ** 2 + (xx - 256) ** 2 < 150 ** 2).float().expand(1, 3, -1, -1)
    edge = EdgeMember(FnMember(inner, LABELS, "mean"), size=128)
    edge(disk)
    small = F.interpolate(disk, size=(128, 128), mode="bilinear", antialias=True).clamp(0, 1)
    assert seen["x"].shape == (1, 3, 128, 128)
    assert torch.allclose(seen["x"][:, :1], 1 - canny(small, 0.1, 0.2)[1], atol=1e-5) and seen["x"].min() == 0
    noise = torch.rand(1, 3, 512, 512, requires_grad=True)
    edge(noise).sum().backward()
    assert noise.grad.abs().sum() > 0  # the downscale is differentiable
    edge(disk[..., :256, :])  # non-square: the shorter side goes to 128, the aspect is kept
    assert seen["x"].shape == (1, 3, 128, 256)
    edge(torch.rand(1, 3, 64, 64))  # smaller than size: untouched
    assert seen["x"].shape == (1, 3, 64, 64)
    m = timm_member("test_resnet.r160_in1k", pretrained=False)
    assert EdgeMember(m).size == m.resize and EdgeMember(FnMember(inner, LABELS)).size is None


def test_timm_member_preprocessing_and_groups():
    m = timm_member("test_resnet.r160_in1k", pretrained=False)
    img = torch.rand(1, 3, 64, 64, requires_grad=True)
    out = m(img)
    assert out.shape == (1, 1000) and len(m.labels) == 1000 and m.size == 160
    out[0, 0].backward()
    assert img.grad.abs().sum() > 0
    ens = Ensemble([m], groups=imagenet_groups())
    assert len(ens.indices("cat")[0]) == 5 and ens.indices("tabby") == [[281]]
    assert len(set(m.labels)) == 1000  # ImageNet's three doubled first synonyms are told apart ...
    assert ens.indices("dog") == [list(range(151, 269))]  # ... so "dog" is dogs only (not 474, the cardigan sweater)
    assert ens.indices("bird") == [[i for a, b in ((7, 25), (80, 101), (127, 147)) for i in range(a, b)]]  # no crane
    assert ens.indices("crane (bird)") == [[134]] and ens.indices("crane (machine)") == [[517]]
    with pytest.raises(UnknownClassError, match="near matches: 'crane \\(bird\\)', 'crane \\(machine\\)'"):
        ens.indices("crane")


def test_a_timm_member_loads_local_weights_and_says_in_one_line_what_it_lacks(tmp_path, monkeypatch):
    """Offline, ``timm:<name>@<file>`` reads the weights from a file; weights neither cached nor given, an unknown
    name and a missing file are one-line errors that say what to pass."""
    from safetensors.torch import save_file

    from lib.loading import ModelLoadError
    from lib.paths import REPO_ROOT
    from lib.sage.build import make_member

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(3)
    ref = timm_member("test_resnet.r160_in1k", pretrained=False)
    save_file({k: v.contiguous() for k, v in ref.model.state_dict().items()}, tmp_path / "w.safetensors")
    loaded = make_member(f"timm:test_resnet.r160_in1k@{tmp_path / 'w.safetensors'}")
    assert all(torch.equal(a, b) for a, b in zip(ref.model.state_dict().values(), loaded.model.state_dict().values()))
    relative = os.path.relpath(tmp_path / "w.safetensors", REPO_ROOT)  # taken from the repo root
    monkeypatch.chdir(tmp_path.parent)
    assert torch.equal(make_member(f"timm:test_resnet.r160_in1k@{relative}").model.fc.weight, ref.model.fc.weight)
    for spec, message in (
            ("timm:test_resnet.r160_in1k", r"^timm:test_resnet\.r160_in1k could not be created \(.*\) \(without hub "
                                           r"access its weights must be in the Hugging Face cache, or give a file: "
                                           r"'timm:test_resnet\.r160_in1k@<weights file>'\)$"),
            ("timm:no_such_net", r"^timm:no_such_net could not be created \(RuntimeError: Unknown model"),
            (f"timm:test_resnet.r160_in1k@{tmp_path / 'none.pt'}", r"^timm:test_resnet\.r160_in1k: weights file not "
                                                                   r"found: .*none\.pt$")):
        with pytest.raises(ModelLoadError, match=message) as err:
            make_member(spec)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"give the weights file after '@'"):
        make_member("timm:test_resnet.r160_in1k@")
    with pytest.raises(ModelLoadError, match=r"^timm:hf-hub:timm/no-such-net@v2 could not be created"):
        make_member("timm:hf-hub:timm/no-such-net@v2")  # timm's revision of a hub name, not a weights file


def test_timm_member_resizes_and_crops_as_timms_eval_transform():
    """Each member's own preprocessing: shorter side to floor(size / crop_pct), then torchvision's centre crop."""
    import math

    import timm
    from timm.data import create_transform, resolve_data_config
    from torchvision import transforms as TV

    for crop_pct in (0.875, 0.9, 0.95):
        overlay = {"crop_pct": crop_pct}
        net = timm.create_model("test_resnet.r160_in1k", pretrained=False, pretrained_cfg_overlay=overlay)
        m = timm_member("test_resnet.r160_in1k", pretrained=False, pretrained_cfg_overlay=overlay)
        tf = create_transform(**resolve_data_config({}, model=net))
        (resize,) = [t.size for t in tf.transforms if isinstance(t, TV.Resize)]
        assert m.resize == (resize if isinstance(resize, int) else resize[0]) == math.floor(160 / crop_pct)


@pytest.mark.parametrize("interpolation,max_diff", [("bilinear", 0.02), ("bicubic", 0.15)])
def test_timm_member_pixels_match_timms_eval_transform(interpolation, max_diff):
    """The network sees what timm's own eval transform (PIL) gives it, up to PIL's uint8 rounding (bilinear: one level)
    and, for bicubic, the kernels (torch's a = -0.75, PIL's -0.5) at sharp edges; without the clamp to [0, 1], which PIL's
    uint8 output has, bicubic overshoot differed by 0.22 (in the normalised units compared here)."""
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    from lib.toy import world as W

    img = np.array(W.render(W.Scene(object="cat", color="red", style="van gogh"), np.random.default_rng(0)))
    m = timm_member("test_resnet.r160_in1k", pretrained=False, pretrained_cfg_overlay={"interpolation": interpolation})
    seen = []
    m.model.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    m(torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255)
    ref = create_transform(**resolve_data_config({}, model=m.model))(Image.fromarray(img))[None]
    diff = (seen[0] - ref).abs()
    assert seen[0].shape == ref.shape == (1, 3, 160, 160)
    assert float(diff.max()) <= max_diff and float(diff.mean()) <= 0.005, (float(diff.max()), float(diff.mean()))


def test_clip_member_zero_shot():
    torch.manual_seed(0)
    vis, txt = nn.Sequential(nn.Conv2d(3, 8, 4, 4), nn.AdaptiveAvgPool2d(1), nn.Flatten()), nn.Embedding(100, 8)
    scorer = ClipScorer(encode_image=vis, encode_text=lambda ids: txt(ids).mean(1),
                        tokenize=lambda ts: torch.tensor([[len(w) % 100 for w in t.split()] for t in ts]),
                        image_size=32)
    m = ClipMember(scorer, LABELS)
    out = m(torch.rand(2, 3, 64, 64))
    assert out.shape == (2, 3) and out.abs().max() <= 100 + 1e-4
    # known features: image k's is label k's text feature, so the logits are 100 · one-hot(k)
    onehot = ClipScorer(encode_image=lambda x: torch.eye(3)[x[:, 0, 0, 0].round().long()],
                        encode_text=lambda ids: torch.eye(3)[ids[:, 0]],
                        tokenize=lambda ts: torch.tensor([[LABELS.index(t.split()[-1])] for t in ts]),
                        image_size=8, mean=(0, 0, 0), std=(1, 1, 1))
    images = torch.zeros(3, 3, 8, 8) + torch.tensor([2.0, 0.0, 1.0]).view(3, 1, 1, 1)
    got = ClipMember(onehot, LABELS)(images)
    torch.testing.assert_close(got, 100 * torch.eye(3)[[2, 0, 1]])
    assert got.argmax(-1).tolist() == [2, 0, 1]
    with pytest.raises(ValueError, match=r"template must contain '\{label\}', got 'a photo'"):
        ClipMember(scorer, LABELS, template="a photo")
    with pytest.raises(ValueError, match="wraps functions"):
        scorer.to("cpu")


def test_moving_an_ensemble_moves_its_clip_members_model(pipe):
    from lib.sage.resume import campaign_key

    def member(seed):
        torch.manual_seed(seed)
        vis, txt = nn.Sequential(nn.Conv2d(3, 8, 4, 4), nn.AdaptiveAvgPool2d(1), nn.Flatten()), nn.Embedding(100, 8)
        scorer = ClipScorer(encode_image=lambda x: vis(x), encode_text=lambda ids: txt(ids).mean(1), module=vis,
                            tokenize=lambda ts: torch.tensor([[len(w) % 100 for w in t.split()] for t in ts]),
                            image_size=32)
        return ClipMember(scorer, LABELS, name="clip"), vis

    m, vis = member(0)
    ens = Ensemble([m])
    before = ens.probs(torch.rand(2, 3, 64, 64))[0]
    ens.double()  # what .to("cuda") does to the device, with a dtype (observable on a CPU-only machine)
    assert vis[0].weight.dtype == torch.float64 and m.scorer.dtype == torch.float64
    assert ens.probs(torch.rand(2, 3, 64, 64))[0].shape == before.shape
    # the image tower is part of the campaign key (the text features alone do not identify the CLIP)
    other, _ = member(1)
    other.text = m.text.clone()  # same text side, other image weights
    assert campaign_key(pipe, Ensemble([other.double()])) != campaign_key(pipe, ens)


def test_toy_member_adapter():
    class FakeToy(nn.Module):  # the lib.toy.classifiers interface
        labels = {"object": ("circle", "cat"), "color": ("red", "blue", "green")}

        def forward(self, x):
            return {"object": x.mean((2, 3))[:, :2], "color": x.mean((2, 3))}

    m = ToyMember(FakeToy(), "color")
    assert m(torch.rand(2, 3, 8, 8)).shape == (2, 3) and m.labels == ("red", "blue", "green")
    with pytest.raises(ValueError, match="no 'style' head"):
        ToyMember(FakeToy(), "style")


# --------------------------------------------------------------------------------------------------- latent search
def test_signed_steps_decrease_a_quadratic():
    a = torch.linspace(-0.8, 0.8, 50)
    x = torch.zeros(50)
    losses = []
    for _ in range(20):
        x.requires_grad_(True)
        loss = ((x - a) ** 2).sum()
        losses.append(float(loss.detach()))
        (g,) = torch.autograd.grad(loss, x)
        x = signed_step(x.detach(), g, 0.05, -1, 1)
    assert all(b < a_ for a_, b in zip(losses[:10], losses[1:10]))  # strictly down while far from the optimum
    assert losses[-1] <= 50 * 0.05**2 + 1e-6 < 0.02 * losses[0]  # then within one step of it, per entry
    assert signed_step(torch.zeros(3), torch.tensor([-1.0, 1.0, 0.0]), 5.0, -1, 1).tolist() == [1, -1, 0]


def test_projection_keeps_the_norm_in_the_shell():
    torch.manual_seed(0)
    # the shell's width: the norm of a d-dim standard normal has std ≈ 1/√2 (here d = 256, 4,000 draws)
    assert torch.randn(4000, 256).norm(dim=1).std().item() == pytest.approx(SHELL_STD, abs=0.03)
    assert shell_bounds(256, 3.0) == pytest.approx((16 - 3 / 2**0.5, 16 + 3 / 2**0.5))
    lat = torch.cat([torch.randn(1, 4, 8, 8) * 3, torch.randn(1, 4, 8, 8) * 0.1, torch.randn(1, 4, 8, 8)])
    out = project_to_shell(lat, 3.0)
    lo, hi = shell_bounds(4 * 8 * 8, 3.0)
    norms = out.flatten(1).norm(dim=1)
    assert ((norms >= lo - 1e-4) & (norms <= hi + 1e-4)).all()
    assert torch.allclose(norms[:2], torch.tensor([hi, lo]))  # each outlier onto its nearest boundary ...
    cos = torch.nn.functional.cosine_similarity(out.flatten(1)[:2], lat.flatten(1)[:2])
    assert torch.allclose(cos, torch.ones(2))  # ... by rescaling it, not turning it
    inside = lat[2:].flatten().norm()
    assert lo <= inside <= hi  # the third latent is a non-outlier ...
    assert torch.equal(out[2], lat[2])  # ... and left untouched


def test_straight_through_value_is_the_plain_loop_and_gradient_reaches_the_latent(pipe, ens):
    z = initial_latents(pipe, [3]).requires_grad_(True)
    c = encode(pipe, ["a photo of a cat"])
    with torch.no_grad():
        plain = denoise(pipe, z.detach(), c, steps=3, guidance=7.5)
    for k in (1, 3):  # an intermediate step, and the final latent (gradient through the VAE only)
        x = sample_with_residual(pipe, z, c, 3, 7.5, Residual(step=k))
        assert torch.allclose(x, plain, atol=1e-6)
        (g,) = torch.autograd.grad(ens.loss(ens.probs(decode(pipe, x)), "cat").sum(), z)
        assert g.shape == z.shape and torch.isfinite(g).all() and g.abs().sum() > 0
    x = sample_with_residual(pipe, z, c, 3, 7.5, Residual(step=1, weight=0.5, mode="additive"))
    assert not torch.allclose(x, plain, atol=1e-3)  # the literal residual changes the sampler
    with pytest.raises(ValueError, match="outside"):
        sample_with_residual(pipe, z, c, 3, 7.5, Residual(step=4))


def test_the_residual_gradient_is_w_times_autograd_from_the_latent_entering_its_step(pipe, ens):
    """Residual(k, w): ∇_z = w · ∂L/∂x_k, the plain autograd gradient from the latent entering step k (k = 0, w = 1: the
    exact gradient through the whole loop; k = T: through the VAE only); the default w is √(1 − ᾱ) at step k."""
    steps, z, c = 3, initial_latents(pipe, [3]), encode(pipe, ["a photo of a cat"])
    loss = lambda x: ens.loss(ens.probs(decode(pipe, x)), "cat").sum()  # noqa: E731
    sched = make_scheduler(pipe, steps)
    alpha = [sched.alphas_cumprod[t] for t in sched.timesteps] + [sched.final_alpha_cumprod]
    for k, w in ((0, 1.0), (1, 0.7), (1, None), (steps, None)):
        x = z.clone()
        for i, t in enumerate(sched.timesteps):  # the reference: the plain loop, differentiated from step k on
            if i == k:
                x = x.detach().requires_grad_(True)
                x_k = x
            with torch.set_grad_enabled(i >= k):
                x = sched.step(predict_noise(pipe, sched.scale_model_input(x, t), t, c, 7.5), t, x).prev_sample
        if k == steps:
            x = x_k = x.detach().requires_grad_(True)
        (ref,) = torch.autograd.grad(loss(x), x_k)
        zg = z.clone().requires_grad_(True)
        (got,) = torch.autograd.grad(loss(sample_with_residual(pipe, zg, c, steps, 7.5, Residual(k, w))), zg)
        expected = float(torch.sqrt(1 - alpha[k])) if w is None else w
        assert ref.abs().sum() > 0 and 0 < expected <= 1
        assert torch.allclose(got, expected * ref, rtol=1e-5, atol=1e-8), (k, w, float((got - expected * ref).abs().max()))


def test_a_batched_search_reports_the_image_render_latent_gives(pipe, ens, tmp_path, monkeypatch):
    """The reported image is rendered as render_latent renders it: the prompt encoded alone, without gradient.
    A batch encoding that rounds differently (as GPU kernels may) must not reach the reported image."""
    import lib.sage.latent as L

    real = L.encode
    monkeypatch.setattr(L, "encode", lambda pipe, prompts, *a, **k: _nudged(real(pipe, prompts, *a, **k), prompts))
    cfg = LatentSearch(mode="lose", iterations=0)
    for seeds in ([0, 1], [2]):
        for r in search_latents(pipe, ens, "a photo of a cat", "cat", seeds=seeds, steps=2, config=cfg):
            path = save_latent(tmp_path / f"z{r.meta['seed']}.safetensors", r)
            assert torch.equal(r.image, render_latent(pipe, path))
            assert r.meta["batch_solo_max_diff"] > 0 if len(seeds) > 1 else r.meta["batch_solo_max_diff"] == 0


def _nudged(c, prompts):
    """A batch's conditioning shifted by 1e-3 (a batch of one unchanged)."""
    if not isinstance(prompts, str) and len(prompts) > 1:
        c.cond = c.cond + 1e-3
    return c


def test_a_read_result_has_the_types_of_a_fresh_one(pipe, ens, tmp_path):
    cfg = LatentSearch(mode="lose", iterations=1, lr=0.05, residual=Residual(1, 0.5))
    r = search_latent(pipe, ens, "a photo of a cat", "cat", seed=4, steps=2, guidance=3.0, config=cfg)
    back = read_result(save_latent(tmp_path / "z.safetensors", r))
    assert back.meta == r.meta and back.history == r.history and torch.equal(back.latent, r.latent)
    assert torch.equal(load_result(pipe, tmp_path / "z.safetensors").image, r.image)  # with the image re-rendered
    assert {k: type(v) for k, v in back.meta.items()} == {k: type(v) for k, v in r.meta.items()}  # 2 == 2.0 too


def test_an_additive_find_re_renders_with_its_own_sampler(pipe, ens, tmp_path):
    """The literal residual changes the image, so a re-render must use the saved mode, step and weight (from the
    file, or from a fresh result's meta, where a step of 0 is an int, not a missing value)."""
    from lib.sage.latent import LatentRecord

    for k in (0, 3):  # neither is the default step (4 // 2)
        cfg = LatentSearch(mode="lose", iterations=1, residual=Residual(k, 0.5, "additive"), stop_on_success=False)
        r = search_latent(pipe, ens, "a photo of a cat", "cat", seed=4, steps=4, config=cfg)
        assert torch.equal(render_latent(pipe, save_latent(tmp_path / f"a{k}.safetensors", r)), r.image)
        assert torch.equal(render_latent(pipe, LatentRecord(r.latent, r.meta)), r.image)
        plain = render_latent(pipe, LatentRecord(r.latent, {**r.meta, "residual_mode": "straight_through"}))
        assert not torch.allclose(plain, r.image, atol=1e-3)


def test_search_save_and_rerender_exactly(pipe, ens, tmp_path):
    cfg = LatentSearch(mode="lose", iterations=3, stop_on_success=False)
    r = search_latent(pipe, ens, "a photo of a cat", "cat", seed=0, steps=2, config=cfg)
    assert r.latent.shape == (1, 4, 8, 8) and len(r.history) == 4 and r.iterations == 3
    assert r.delta.abs().max() <= 1.0 + 1e-6
    path = save_latent(tmp_path / "z.safetensors", r, model="twin:sd-v1")
    rec = load_latent(path)
    assert torch.equal(rec.latent, r.latent) and rec.meta["prompt"] == "a photo of a cat" and rec.meta["seed"] == "0"
    img = render_latent(pipe, path)
    assert torch.equal(img, r.image)  # bit-exact re-render of what the search evaluated
    assert torch.equal(img, render_latent(pipe, path))


def _alone(pipe, ens, seeds, cfg):
    return [search_latent(pipe, ens, "a photo of a cat", "cat", seed=s, steps=2, config=cfg) for s in seeds]


def test_batched_searches_match_searches_one_at_a_time_on_the_twin(pipe, ens):
    """No mixing of the searches in a batch. Bit-equality holds on this tiny setup for 4 iterations; in general a
    batched search agrees with a solo one only up to float rounding (search_latents), so the key has the batch size."""
    seeds = [0, 1, 2, 3]
    cfg = LatentSearch(mode="lose", iterations=4, stop_on_success=False)
    batched, alone = search_latents(pipe, ens, "a photo of a cat", "cat", seeds=seeds, steps=2, config=cfg), \
        _alone(pipe, ens, seeds, cfg)
    assert len(batched) == len(alone) == len(seeds)
    for s, a, b in zip(seeds, batched, alone):
        assert a.meta["seed"] == s and a.iterations == b.iterations == 4
        assert a.history == pytest.approx(b.history, abs=1e-5)  # batched kernels: last-bit differences only
        assert torch.equal(a.delta, b.delta) and torch.equal(a.latent, b.latent)
        assert torch.equal(a.image, b.image)  # the image as re-rendered alone


def test_a_successful_search_leaves_the_batch(pipe):
    """A brightness 'classifier': seeds brighter than the median already lose the class; the others must search."""
    x0 = decode(pipe, denoise(pipe, initial_latents(pipe, [0, 1, 2, 3]), encode(pipe, ["a photo of a cat"] * 4), 2))
    m0 = float(x0.detach().mean((1, 2, 3)).median())

    def member(name):
        return FnMember(lambda x: torch.stack([40 * (m0 - x.mean((1, 2, 3)))] + [0 * x.mean((1, 2, 3))] * 2, 1),
                        LABELS, name)

    bright = Ensemble([member("b1"), member("b2")])
    cfg = LatentSearch(mode="lose", iterations=6, lr=0.2)
    batched = search_latents(pipe, bright, "a photo of a cat", "cat", seeds=[0, 1, 2, 3], steps=2, config=cfg)
    alone = _alone(pipe, bright, [0, 1, 2, 3], cfg)
    assert [r.iterations for r in batched] == [r.iterations for r in alone]
    assert [r.found for r in batched] == [r.found for r in alone]
    its = {r.iterations for r in batched if r.found}
    assert 0 in its and len(its) > 1, its  # some found at once, others later: the batch shrank mid-search
    for a, b in zip(batched, alone):
        assert torch.equal(a.latent, b.latent) and torch.equal(a.image, b.image)
    with pytest.raises(ValueError, match="seeds is empty"):
        search_latents(pipe, bright, "a cat", "cat", seeds=[], steps=2)
    with pytest.raises(LatentShapeError, match="search_latents"):
        search_latent(pipe, bright, "a cat", "cat", latent=initial_latents(pipe, [0, 1]), steps=2)


def test_wrong_shape_latent_raises(pipe, ens, tmp_path):
    with pytest.raises(LatentShapeError, match=r"expects \(B, 4, 8, 8\)"):
        check_latent(pipe, torch.zeros(1, 4, 16, 16))
    with pytest.raises(LatentShapeError, match=r"latent has shape \(4, 8, 8\); this pipeline expects \(B, 4, 8, 8\)"):
        search_latent(pipe, ens, "a cat", "cat", latent=torch.zeros(4, 8, 8), steps=2)
    with pytest.raises(ValueError, match="exactly one"):
        search_latent(pipe, ens, "a cat", "cat", steps=2)
    with pytest.raises(UnknownClassError, match="class 'zebra' is not a label of member 'a'.*labels: cat, dog, car"):
        search_latent(pipe, ens, "a cat", "zebra", seed=0, steps=2)
    from safetensors.torch import save_file

    save_file({"latent": torch.zeros(1, 4, 9, 9)}, str(tmp_path / "bad.safetensors"),
              metadata={"prompt": "a cat", "steps": "2", "guidance": "7.5"})
    with pytest.raises(LatentShapeError, match=r"latent has shape \(1, 4, 9, 9\)"):
        render_latent(pipe, tmp_path / "bad.safetensors")


def test_a_search_that_cannot_succeed_reports_not_found(pipe, tmp_path):
    stubborn = Ensemble([const_member([9.0, 0.0, 0.0], name="s1"), const_member([9.0, 0.0, 0.0], name="s2")])
    df, results = latent_campaign(pipe, stubborn, "a photo of a cat", "cat", seeds=[0], steps=2,
                                  config=LatentSearch(mode="type1", iterations=2), out_dir=tmp_path)
    r = results[0]
    assert not r.found and "not found" in r.summary() and r.best_loss == pytest.approx(2 * (2 * 0.99975 - 1), abs=1e-3)
    assert df.loc[0, "found"] == False and ssr(df).loc[0, "ssr"] == 0.0  # noqa: E712
    assert load_latent(df.loc[0, "path"]).meta["found"] == "False"  # the best latent is kept, marked not found


def nan_grad_member(name: str) -> FnMember:
    """Finite logits whose gradient is NaN (0 · d√u at u = 0)."""
    def fn(x):
        u = x.mean((1, 2, 3)) - x.mean((1, 2, 3)).detach()
        return torch.stack([9.0 + 0 * u.sqrt(), 0 * u, 0 * u], 1)
    return FnMember(fn, LABELS, name)


def test_loss_scaling_recovers_float16_underflow_and_backs_off_on_overflow():
    x = torch.ones(3, requires_grad=True)
    tiny = lambda: (((x.half() * 1e-4).float()) * 1e-4).sum()  # noqa: E731 - true gradient 1e-8: below float16
    g1, s1 = scaled_grad(tiny(), x, 1.0)
    assert s1 == 1.0 and (g1 == 0).all() and grad_problem(g1[None]) == ["zero gradient"]
    g2, s2 = scaled_grad(tiny(), x, FP16_LOSS_SCALE)
    assert s2 == FP16_LOSS_SCALE and (g2 > 0).all() and grad_problem(g2[None]) == [None]
    huge = lambda: ((x.half() * 1000).float()).sum()  # noqa: E731 - 2**16 · 1000 overflows float16
    g3, s3 = scaled_grad(huge(), x, FP16_LOSS_SCALE)
    assert s3 == FP16_LOSS_SCALE / 16**3 and torch.isfinite(g3).all() and (g3 > 0).all()  # backed off 2**16 → 16
    nan = lambda: (0 * (x - x.detach()).sqrt()).sum()  # noqa: E731 - NaN at every scale
    g4, s4 = scaled_grad(nan(), x, FP16_LOSS_SCALE)
    assert s4 == FP16_LOSS_SCALE and grad_problem(g4[None]) == ["non-finite gradient"]  # the search stops; scale kept
    # a batch: one broken row must not drag the healthy row down to scale 1 (where its float16 gradient is 0)
    xb = torch.ones(2, 3, requires_grad=True)
    rows = lambda: torch.stack([(((xb[0].half() * 1e-4).float()) * 1e-4).sum(),  # noqa: E731
                                (0 * (xb[1] - xb[1].detach()).sqrt()).sum()])
    g5, s5 = scaled_grad_rows(rows(), xb, [0, 1], torch.full((2,), FP16_LOSS_SCALE))
    assert s5[0] == FP16_LOSS_SCALE and grad_problem(g5) == [None, "non-finite gradient"] and (g5[0] > 0).all()
    # nor keep it down afterwards: row 1 overflows at 2**16 once, row 0's tiny gradient still needs 2**16 next time
    over = lambda: torch.stack([(((xb[0].half() * 1e-5).float()) * 1e-5).sum(),  # noqa: E731
                                ((xb[1].half() * 1000).float()).sum()])
    g6, s6 = scaled_grad_rows(over(), xb, [0, 1], torch.full((2,), FP16_LOSS_SCALE))
    assert s6.tolist() == [FP16_LOSS_SCALE, FP16_LOSS_SCALE / 16**3] and grad_problem(g6) == [None, None]
    g7, s7 = scaled_grad_rows(over(), xb, [0, 1], s6)  # the next iteration starts from each row's own scale
    assert torch.equal(s7, s6) and grad_problem(g7) == [None, None] and (g7[0] > 0).all()
    g8, _ = scaled_grad_rows(over(), xb, [0, 1], torch.full((2,), FP16_LOSS_SCALE / 16**3))  # one shared scale:
    assert grad_problem(g8) == ["zero gradient", None]  # row 0 underflows (was: stopped as "zero gradient")
    g9, _ = scaled_grad_rows(over()[1:], xb, [1], s6)  # rows left out get no gradient
    assert (g9[0] == 0).all() and (g9[1] > 0).all()
    _, s10 = scaled_grad_rows(rows(), xb, [0, 1], torch.full((2,), FP16_LOSS_SCALE))  # row 1 never finite:
    assert s10.tolist() == [FP16_LOSS_SCALE, FP16_LOSS_SCALE]  # its scale as it started, as scaled_grad does
    assert grad_problem(torch.tensor([[1.0, 0.0], [0.0, 0.0], [float("inf"), 1.0]])) == [
        None, "zero gradient", "non-finite gradient"]


def test_loss_scale_follows_the_pipeline_dtype(pipe):
    assert loss_scale_for(pipe) == 1.0  # float32 twin
    half = SimpleNamespace(unet=SimpleNamespace(dtype=torch.float32), vae=SimpleNamespace(dtype=torch.float16))
    assert loss_scale_for(half) == FP16_LOSS_SCALE
    assert loss_scale_for(SimpleNamespace(unet=SimpleNamespace(dtype=torch.bfloat16))) == 1.0


def test_a_float16_search_moves_every_latent_entry(monkeypatch):
    """On the float16 twin ~4% of the unscaled gradient entries underflow to 0 (a signed step leaves them);
    with the loss scale every entry moves."""
    import lib.sage.latent as L

    half = build_twin("sd-v1", dtype=torch.float16)
    half.set_progress_bar_config(disable=True)
    torch.manual_seed(0)
    net = small_net()
    one = Ensemble([FnMember(lambda x: net(x.float()), LABELS, "a")])
    cfg = LatentSearch(mode="lose", iterations=1, shell_sigmas=None, stop_on_success=False)
    grads, real = [], L.signed_step
    monkeypatch.setattr(L, "signed_step", lambda p, g, *a: grads.append(g) or real(p, g, *a))
    r = search_latent(half, one, "a photo of a cat", "cat", seed=0, steps=2, config=cfg)
    assert len(grads) == 1 and grads[0].ne(0).all() and torch.isfinite(grads[0]).all() and r.meta["stopped"] is None
    monkeypatch.setattr(L, "loss_scale_for", lambda pipe: 1.0)
    search_latent(half, one, "a photo of a cat", "cat", seed=0, steps=2, config=cfg)
    assert grads[1].eq(0).any()  # what the scale prevents (the check is not vacuous)


def test_searches_without_a_usable_gradient_stop_and_say_why(pipe, lm, tmp_path):
    for members, why in (([const_member([9.0, 0.0, 0.0], name="s1")], "zero gradient"),
                         ([nan_grad_member("n1")], "non-finite gradient")):
        stuck = Ensemble(members)
        df, (r,) = latent_campaign(pipe, stuck, "a photo of a cat", "cat", seeds=[0], steps=2,
                                   config=LatentSearch(mode="lose", iterations=3), out_dir=tmp_path)
        assert not r.found and r.iterations == 0 and len(r.history) == 1 and not r.delta.any()
        assert r.meta["stopped"] == f"{why} at iteration 0" and why in r.summary()
        assert df.loc[0, "stopped"] == r.meta["stopped"] == load_latent(df.loc[0, "path"]).meta["stopped"]
        rounds = search_prompt(pipe, stuck, lm, "cat", [0], steps=2,
                               config=PromptSearch(n_words=1, top_k=3, iterations=3))
        assert rounds.stopped.tolist() == [f"{why} at iteration 0"] and rounds.loss_end[0] == rounds.loss_start[0]
        tok = train_token(pipe, stuck, ["a photo of a cat"], "cat", "car", [0], steps=2,
                          config=TokenAttack(iterations=3, batch_size=1), checkpoint_dir=tmp_path)
        assert tok.meta["stopped"] == f"{why} at iteration 0" and tok.history == [] and not tok.embedding.any()
        assert load_token(save_token(tmp_path / "t.safetensors", tok)).meta["stopped"] == tok.meta["stopped"]
    fine = search_prompt(pipe, Ensemble([FnMember(small_net(seed=1), LABELS, "a")]), lm, "cat", [0], steps=2,
                         config=PromptSearch(n_words=1, top_k=3, iterations=2))
    assert fine.stopped.isna().all()  # a usable gradient: no reason recorded


def test_an_interrupted_campaign_resumes_without_searching_again(pipe, ens, tmp_path, monkeypatch, dead_pid):
    import lib.sage.latent as L

    cfg = LatentSearch(mode="lose", iterations=2, stop_on_success=False)
    df, first = latent_campaign(pipe, ens, "a photo of a cat", "cat", seeds=[0, 1, 2], steps=2, config=cfg,
                                out_dir=tmp_path, batch_size=2)
    assert not df.resumed.any() and len(list(tmp_path.glob("latent_lose_cat_*.safetensors"))) == 3
    Path(df.loc[1, "path"]).unlink()  # as if the run had stopped before seed 1 finished
    searched = []
    real = L.search_latents
    monkeypatch.setattr(L, "search_latents", lambda *a, **k: searched.append(k["seeds"]) or real(*a, **k))
    from lib.atomic import HOST

    stale = tmp_path / f".{Path(df.loc[1, 'path']).name}.{dead_pid}@{HOST}.0123456789ab.tmp"
    stale.write_bytes(b"half")  # the killed run's half-written file
    os.utime(stale, (0, 0))  # untouched since long ago (recent ones are left: lib.atomic)
    df2, again = latent_campaign(pipe, ens, "a photo of a cat", "cat", seeds=[0, 1, 2], steps=2, config=cfg,
                                 out_dir=tmp_path, batch_size=2)
    # seed 1's batch, [0, 1], is searched again whole: every result is the fresh run's, bit for bit
    assert searched == [[0, 1]] and df2.resumed.tolist() == [False, False, True] and not stale.exists()
    for a, b in zip(first, again):
        assert a.history == b.history and a.iterations == b.iterations and a.found == b.found
        assert torch.equal(a.latent, b.latent) and torch.equal(a.delta, b.delta) and torch.equal(a.image, b.image)
    assert df2.path.equals(df.path) and df2.found.equals(df.found)
    searched.clear()
    other = LatentSearch(mode="lose", iterations=3, stop_on_success=False)  # other settings: never a stale result
    df3, _ = latent_campaign(pipe, ens, "a photo of a cat", "cat", seeds=[0], steps=2, config=other, out_dir=tmp_path)
    assert searched == [[0]] and not df3.resumed.any() and df3.loc[0, "path"] != df.loc[0, "path"]
    assert not list(tmp_path.glob(".*.tmp"))
    key = L.latent_key(pipe, ens, "a photo of a cat", "cat", 2, 7.5, cfg, 2, [0, 1])
    assert Path(df.loc[0, "path"]).name == f"latent_lose_cat_0_{key}.safetensors"
    assert Path(df.loc[2, "path"]).name.endswith(f"{L.latent_key(pipe, ens, 'a photo of a cat', 'cat', 2, 7.5, cfg, 2, [2])}"
                                                 ".safetensors")
    retrained = Ensemble([FnMember(small_net(seed=1), LABELS, "a"), FnMember(small_net(seed=2), LABELS, "b"),
                          EdgeMember(FnMember(small_net(seed=4), LABELS, "c"))])  # same names, other weights
    assert L.latent_key(pipe, retrained, "a photo of a cat", "cat", 2, 7.5, cfg, 2, [0, 1]) != key
    assert L.latent_key(pipe, ens, "a photo of a cat", "cat", 2, 7.5, cfg, 2, [0, 1]) == key
    from lib.sage.resume import weights_part

    assert L.latent_key(pipe, ens, "a photo of a cat", "cat", 2, 7.5, cfg, 2, [0, 1],
                          weights=weights_part(pipe, ens)) == key  # precomputed fingerprints: the same key


def test_a_latent_campaign_fingerprints_the_weights_once(pipe, ens, tmp_path, monkeypatch):
    """Hashing every weight takes seconds for a full-size model on a CPU: once per campaign, not once per batch."""
    import lib.sage.resume as R

    calls = []
    real = R.model_fingerprint
    monkeypatch.setattr(R, "model_fingerprint", lambda p: calls.append(1) or real(p))
    cfg = LatentSearch(mode="lose", iterations=0)
    df, _ = latent_campaign(pipe, ens, "a photo of a cat", "cat", seeds=[0, 1, 2], steps=2, config=cfg,
                            out_dir=tmp_path, batch_size=1)
    assert len(calls) == 1 and df.path.map(lambda p: Path(p).is_file()).all()


def test_the_latent_key_and_file_names_change_with_the_batch_size(pipe, ens, tmp_path):
    """Batched searches agree with solo ones only up to float rounding: another BATCH_SIZE must not reuse results."""
    import lib.sage.latent as L

    cfg = LatentSearch(mode="lose", iterations=0)
    keys = {b: L.latent_key(pipe, ens, "a photo of a cat", "cat", 2, 7.5, cfg, b, [0]) for b in (1, 2, 8)}
    assert len(set(keys.values())) == 3, keys
    one, _ = latent_campaign(pipe, ens, "a photo of a cat", "cat", seeds=[0], steps=2, config=cfg, out_dir=tmp_path,
                             batch_size=1)
    two, _ = latent_campaign(pipe, ens, "a photo of a cat", "cat", seeds=[0], steps=2, config=cfg, out_dir=tmp_path,
                             batch_size=2)
    assert not two.resumed.any() and one.loc[0, "path"] != two.loc[0, "path"]
    assert keys[1] in one.loc[0, "path"] and keys[2] in two.loc[0, "path"]


def test_an_extended_campaign_gives_exactly_what_a_fresh_run_of_all_its_seeds_gives(pipe, ens, tmp_path, monkeypatch):
    """Batches are cut at fixed places of SEEDS and a result is reused only from the same batch: seeds [0, 1, 2]
    extended to [0, 1, 2, 3] searches [2, 3] together, as a fresh run does (it searched 3 alone, or [3] after [2])."""
    import lib.sage.latent as L

    cfg = LatentSearch(mode="lose", iterations=2, stop_on_success=False)
    run = lambda seeds, out: latent_campaign(pipe, ens, "a photo of a cat", "cat", seeds=seeds, steps=2, config=cfg,
                                             out_dir=out, batch_size=2)
    run([0, 1, 2], tmp_path / "a")
    searched = []
    real = L.search_latents
    monkeypatch.setattr(L, "search_latents", lambda *a, **k: searched.append(k["seeds"]) or real(*a, **k))
    extended, ext = run([0, 1, 2, 3], tmp_path / "a")
    assert searched == [[2, 3]] and extended.resumed.tolist() == [True, True, False, False]
    fresh, new = run([0, 1, 2, 3], tmp_path / "b")
    assert [Path(p).name for p in fresh.path] == [Path(p).name for p in extended.path]
    for a, b in zip(ext, new):
        assert torch.equal(a.latent, b.latent) and a.history == b.history and a.found == b.found


def test_repeated_seeds_are_rejected_before_any_search(pipe, ens, lm, monkeypatch):
    """A repeated seed would be one search counted twice (notebook 01: two run rows inflating SSR's n_runs)."""
    import lib.sage.latent as L
    import lib.sage.prompt as SP
    import lib.sage.token as T

    def never(*a, **k):
        raise AssertionError("searched before the seeds were checked")

    monkeypatch.setattr(L, "search_latents", never)
    monkeypatch.setattr(SP, "search_prompt", never)
    monkeypatch.setattr(SP, "render_with_slots", never)
    monkeypatch.setattr(T, "render_with_slots", never)
    with pytest.raises(ValueError, match=r"\[0, 1, 0\] repeat \[0\]: each seed is one search"):
        L.latent_campaign(pipe, ens, "a photo of a cat", "cat", seeds=[0, 1, 0], steps=2)
    with pytest.raises(ValueError, match=r"repeat \[1\]"):
        search_latents(pipe, ens, "a photo of a cat", "cat", seeds=[1, 1], steps=2)  # the real one, before sampling
    with pytest.raises(ValueError, match=r"repeat \[2\]"):
        SP.prompt_campaign(pipe, ens, lm, ["cat"], [2, 2], steps=2)
    with pytest.raises(ValueError, match=r"repeat \[3\]"):
        train_token(pipe, ens, ["a photo of a cat"], "cat", "car", [3, 3], steps=2)
    tok = TokenResult(torch.zeros(slot_dim(pipe)), "cat", "car", meta=dict(steps=2, guidance=7.5))
    with pytest.raises(ValueError, match=r"repeat \[4\]"):
        T.evaluate_token(pipe, ens, tok, ["a photo of a cat"], [4, 4])


# --------------------------------------------------------------------------------------------------- prompt search
@pytest.fixture(scope="module")
def lm():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = ["[UNK]", "[EOS]", "a", "photo", "of", "cat", "dog", "red", "on", "beach", "sleeping", "car", "1"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="[EOS]")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(words), n_embd=16, n_layer=1, n_head=2, n_positions=32,
                                       bos_token_id=1, eos_token_id=1))
    return CandidateLM(model, tok)


@pytest.mark.parametrize("damage", ["missing tokenizer.json", "missing model.safetensors", "corrupt model.safetensors"])
def test_a_damaged_toy_lm_fails_in_one_line_naming_the_file(tmp_path, monkeypatch, damage):
    import shutil

    from lib.loading import ModelLoadError
    from lib.sage.build import load_lm
    from lib.toy import lm as toy_lm

    bad = tmp_path / "lm"
    shutil.copytree(toy_lm.DEFAULT_DIR, bad)
    action, name = damage.split()
    if action == "missing":
        (bad / name).unlink()
    else:
        (bad / name).write_bytes(b"not a safetensors file")
    monkeypatch.setattr(toy_lm, "DEFAULT_DIR", bad)
    with pytest.raises(ModelLoadError) as err:
        load_lm("toy")
    msg = str(err.value)
    assert str(bad / name) in msg and toy_lm.REBUILD in msg and "\n" not in msg, msg
    with pytest.raises(ModelLoadError, match="could not load the LM in"):
        load_lm(str(tmp_path / "empty"))  # a local folder without an LM: one line, no rebuild hint


def test_lm_proposes_words_and_rejects_unknown_templates(lm):
    words = lm.propose("a photo of a cat", 5)
    assert 0 < len(words) <= 5 and all(w.isalpha() for w in words) and len(set(words)) == len(words)
    assert lm.propose("a photo of a cat", 5, min_prob=1.0) == []  # no next word is certain
    with pytest.raises(PromptError, match=r"cannot encode.*zebra"):
        lm.propose("a photo of a zebra")


def test_slots_match_the_pipeline_encoding(pipe):
    base = encode(pipe, ["a photo of a cat"]).cond
    assert torch.allclose(encode_with_slots(pipe, ["a photo of a cat"], None).cond, base, atol=1e-6)
    dog = word_embedding(pipe, "dog")[None]  # one CLIP token: inserting its embedding = writing the word
    ref = encode(pipe, ["a photo of a cat dog"]).cond
    assert torch.allclose(encode_with_slots(pipe, ["a photo of a cat"], dog).cond, ref, atol=1e-5)
    ids = pipe.tokenizer("photosynthesis", add_special_tokens=False).input_ids
    assert len(ids) > 1  # a word of several CLIP tokens stands for their mean
    table = pipe.text_encoder.get_input_embeddings().weight
    torch.testing.assert_close(word_embedding(pipe, "photosynthesis"), table[ids].detach().float().mean(0))
    with pytest.raises(NotImplementedError, match="first text encoder"):
        encode_with_slots(SimpleNamespace(text_encoder=None, text_encoder_2=object()), ["a cat"], None)


@pytest.fixture(scope="module")
def xl():
    p = build_twin("sdxl")
    p.set_progress_bar_config(disable=True)
    return p


def test_sdxl_slots_go_into_both_encoders_and_the_pooled_embedding(xl):
    base = encode(xl, ["a photo of a cat"])
    same = encode_with_slots(xl, ["a photo of a cat"], None)
    assert torch.equal(same.cond, base.cond) and torch.equal(same.added["text_embeds"], base.added["text_embeds"])
    d1 = xl.text_encoder.get_input_embeddings().embedding_dim
    dog = word_embedding(xl, "dog")[None]  # one CLIP token in both vocabularies: inserting it = writing the word
    d2 = xl.text_encoder_2.get_input_embeddings().embedding_dim
    assert dog.shape == (1, d1 + d2) == (1, token_table(xl).shape[1])
    ref, got = encode(xl, ["a photo of a cat dog"]), encode_with_slots(xl, ["a photo of a cat"], dog)
    assert torch.allclose(got.cond, ref.cond, atol=1e-5)
    assert torch.allclose(got.added["text_embeds"], ref.added["text_embeds"], atol=1e-5)
    assert torch.equal(got.uncond, base.uncond)  # the unconditional half is the plain one
    only_first = torch.cat([dog[:, :d1], torch.zeros(1, dog.shape[1] - d1)], 1)  # each encoder gets its own part
    partial = encode_with_slots(xl, ["a photo of a cat"], only_first)
    assert not torch.allclose(partial.cond[..., d1:], ref.cond[..., d1:])
    with pytest.raises(ValueError, match="dimensions"):
        encode_with_slots(xl, ["a cat"], torch.zeros(1, d1))
    neg = encode_with_slots(xl, ["a photo of a cat"], dog, negative="blurry")  # the negative prompt is left alone
    assert torch.allclose(neg.cond, ref.cond, atol=1e-5)
    assert torch.equal(neg.uncond, encode(xl, ["a cat"], "blurry").uncond)
    two = encode_with_slots(xl, ["a photo of a cat"], torch.zeros(2, dog.shape[1]), negative="")  # 2 slots > 1 token
    assert two.cond.shape == ref.cond.shape and torch.isfinite(two.cond).all()


def test_sdxl_latent_prompt_and_token_search_run(xl, ens, lm, tmp_path):
    r = search_latent(xl, ens, "a photo of a cat", "cat", seed=0, steps=2,
                      config=LatentSearch(mode="lose", iterations=1, stop_on_success=False))
    assert r.latent.shape == initial_latents(xl, [0]).shape and r.iterations == 1 and r.delta.abs().max() > 0
    assert torch.equal(render_latent(xl, save_latent(tmp_path / "xl.safetensors", r)), r.image)
    emb = torch.zeros(2, token_table(xl).shape[1], requires_grad=True)
    (g,) = torch.autograd.grad(ens.loss(ens.probs(render_with_slots(xl, ["a photo of a cat"], emb, [0], 2, 7.5)),
                                        "cat").sum(), emb)
    assert torch.isfinite(g).all() and g[:, :32].abs().sum() > 0 and g[:, 32:].abs().sum() > 0  # both encoders
    df = search_prompt(xl, ens, lm, "cat", seeds=[0], steps=2, config=PromptSearch(n_words=1, top_k=3, iterations=2))
    assert len(df) == 1 and df.prompt[0].startswith("a photo of a cat ")
    tok = train_token(xl, ens, ["a photo of a cat"], "cat", "car", [0], steps=2,
                      config=TokenAttack(iterations=2, batch_size=1))
    assert tok.embedding.shape == (token_table(xl).shape[1],) and len(tok.history) == 2
    table = evaluate_token(xl, ens, tok, ["a cat on a beach"], [1])
    assert len(table) == 1 and table.text_cosine.between(-1 - 1e-5, 1 + 1e-5).all()
    dog = word_embedding(xl, "dog")  # both encoders' slots, through the second encoder's pooled output
    torch.testing.assert_close(pooled_text(xl, ["a photo of a cat"], dog), pooled_text(xl, ["a photo of a cat dog"], None))
    assert not torch.allclose(pooled_text(xl, ["a photo of a cat"], dog), pooled_text(xl, ["a photo of a cat"], None))


def test_the_prompt_search_optimises_the_next_word_and_its_lookahead_slots(pipe, ens, lm, monkeypatch):
    import lib.sage.prompt as SP

    shapes, real = [], SP.render_with_slots
    monkeypatch.setattr(SP, "render_with_slots", lambda p, prompts, emb, *a, **k: shapes.append(
        None if emb is None else tuple(emb.shape)) or real(p, prompts, emb, *a, **k))
    for lookahead in (0, 2):
        shapes.clear()
        search_prompt(pipe, ens, lm, "cat", seeds=[0], steps=2,
                      config=PromptSearch(n_words=1, top_k=3, iterations=2, lookahead=lookahead))
        assert shapes == [(1 + lookahead, 32)] * 2 + [None]  # two optimised renders, then the picked word's


def test_gradient_reaches_the_embeddings(pipe, ens):
    emb = torch.zeros(2, 32, requires_grad=True)
    img = render_with_slots(pipe, ["a photo of a cat"], emb, [0], steps=2, guidance=7.5)
    (g,) = torch.autograd.grad(ens.loss(ens.probs(img), "cat").sum(), emb)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_prompt_search_table(pipe, ens, lm):
    df = search_prompt(pipe, ens, lm, "cat", seeds=[0], steps=2,
                       config=PromptSearch(n_words=2, top_k=4, iterations=2, stop_on_success=False),
                       class_words=LABELS)
    assert len(df) == 2 and df.prompt[1].startswith(df.prompt[0] + " ") and df.prompt[0].startswith("a photo of a cat ")
    assert set(df.columns) >= {"word", "cosine", "fooled_fraction", "found", "category"}
    assert df.cosine.notna().all() and (df.candidates > 1).all()
    # no iterations: the embedding never moves, the LM's first proposal is taken and no cosine is claimed (was 0.000)
    still = search_prompt(pipe, ens, lm, "cat", seeds=[0], steps=2,
                          config=PromptSearch(n_words=1, top_k=4, iterations=0, stop_on_success=False),
                          class_words=LABELS)
    assert still.candidates[0] > 1 and np.isnan(still.cosine[0])
    assert still.word[0] == still.proposed[0].split(", ")[0]
    # found: fooled on *at least* success_fraction of the seeds (here all of them: 1.0 of 1.0 counts)
    every = PromptSearch(n_words=1, top_k=2, iterations=0, success_fraction=1.0, min_end_prob=0.0)
    for logits, found in (([0.0, 5.0, 0.0], True), ([5.0, 0.0, 0.0], False)):  # sees a dog / a cat
        df = search_prompt(pipe, Ensemble([const_member(logits)]), lm, "cat", seeds=[0, 1], steps=2, config=every)
        assert df.fooled_fraction.tolist() == [float(found)] and df.found.tolist() == [found]
    with pytest.raises(PromptError, match="zebra"):
        search_prompt(pipe, Ensemble([const_member([0.0] * 4, LABELS + ("zebra",))]), lm, "zebra", [0], steps=2)


def test_prompt_campaign_writes_each_class_and_resumes(pipe, ens, lm, tmp_path, monkeypatch):
    import lib.sage.prompt as SP

    cfg = PromptSearch(n_words=2, top_k=4, iterations=1, stop_on_success=False)
    first = SP.prompt_campaign(pipe, ens, lm, ["cat", "dog"], [0], steps=2, config=cfg, class_words=LABELS,
                               out_dir=tmp_path)
    files = sorted(tmp_path.glob("prompt_rounds_*.parquet"))
    assert [f.name.split("_")[2] for f in files] == ["cat", "dog"] and not first.resumed.any()
    assert first.cls.tolist() == ["cat", "cat", "dog", "dog"]
    files[1].unlink()  # dog unfinished
    searched = []
    real = SP.search_prompt
    monkeypatch.setattr(SP, "search_prompt", lambda *a, **k: searched.append(a[3]) or real(*a, **k))
    again = SP.prompt_campaign(pipe, ens, lm, ["cat", "dog"], [0], steps=2, config=cfg, class_words=LABELS,
                               out_dir=tmp_path)
    assert searched == ["dog"] and again.resumed.tolist() == [True, True, False, False]
    pd.testing.assert_frame_equal(again.drop(columns="resumed"), first.drop(columns="resumed"))
    SP.prompt_campaign(pipe, ens, lm, ["cat"], [0, 1], steps=2, config=cfg, class_words=LABELS, out_dir=tmp_path)
    assert searched == ["dog", "cat"]  # other seeds: searched, not loaded
    pd.read_parquet(files[0]).drop(columns="stopped").to_parquet(files[0])  # a file from before the column existed
    old = SP.prompt_campaign(pipe, ens, lm, ["cat"], [0], steps=2, config=cfg, class_words=LABELS, out_dir=tmp_path)
    assert searched == ["dog", "cat"] and old.resumed.all() and old.stopped.isna().all()
    with pytest.raises(UnknownClassError):  # every class checked before any search
        SP.prompt_campaign(pipe, ens, lm, ["cat", "zebra"], [0], steps=2, config=cfg, out_dir=tmp_path)
    assert searched == ["dog", "cat"]


def test_an_interrupted_prompt_search_resumes_after_its_last_finished_round(pipe, ens, lm, tmp_path, monkeypatch):
    """A class's rounds are written as they finish (at SD size a round is minutes of backward passes): a search
    stopped in its second round resumes there, to the table an uninterrupted search gives, and the class's file
    replaces the rounds file when it is done."""
    import lib.sage.prompt as SP

    cfg = PromptSearch(n_words=3, top_k=4, iterations=1, stop_on_success=False)
    whole = SP.prompt_campaign(pipe, ens, lm, ["cat"], [0], steps=2, config=cfg, class_words=LABELS,
                               out_dir=tmp_path / "whole")
    assert len(whole) == 3
    real_end, ends, interrupt = lm.end_prob, [], [True]

    def end_prob(prompt):
        ends.append(prompt)
        if len(ends) == 2 and interrupt and interrupt.pop():
            raise KeyboardInterrupt  # in round 2, after round 1 was written
        return real_end(prompt)

    monkeypatch.setattr(lm, "end_prob", end_prob)
    with pytest.raises(KeyboardInterrupt):
        SP.prompt_campaign(pipe, ens, lm, ["cat"], [0], steps=2, config=cfg, class_words=LABELS, out_dir=tmp_path / "x")
    (partial,) = (tmp_path / "x").glob("*.rounds.parquet")
    assert pd.read_parquet(partial)["prompt"].tolist() == whole["prompt"].tolist()[:1]
    ends.clear()
    again = SP.prompt_campaign(pipe, ens, lm, ["cat"], [0], steps=2, config=cfg, class_words=LABELS,
                               out_dir=tmp_path / "x")
    assert ends == whole["prompt"].tolist()[1:]  # rounds 2 and 3 only
    pd.testing.assert_frame_equal(again, whole)
    assert not partial.exists() and len(list((tmp_path / "x").glob("prompt_rounds_*.parquet"))) == 1
    assert partial.name.startswith(".")  # hidden: a listing of prompt_rounds_*.parquet finds finished classes only
    (tmp_path / "whole").joinpath(partial.name).write_bytes(b"")  # left by a kill after the class file was written
    assert SP.prompt_campaign(pipe, ens, lm, ["cat"], [0], steps=2, config=cfg, class_words=LABELS,
                              out_dir=tmp_path / "whole").resumed.all()
    assert not (tmp_path / "whole" / partial.name).exists()  # removed when its class loads
    ends.clear()
    alone = SP.search_prompt(pipe, ens, lm, "cat", [0], steps=2, config=cfg, class_words=LABELS,
                             rounds_file=tmp_path / "alone.parquet")  # a single search takes a rounds file too
    pd.testing.assert_frame_equal(alone, whole.drop(columns=["cls", "resumed"]))
    ends.clear()
    assert SP.search_prompt(pipe, ens, lm, "cat", [0], steps=2, config=cfg, class_words=LABELS,
                            rounds_file=tmp_path / "alone.parquet").equals(alone) and ends == []  # all loaded


def test_prompt_campaign_shows_one_bar_that_ends_full(pipe, ens, lm, tmp_path, monkeypatch):
    """One bar over every class's embedding iterations, no nested bar per word: it steps each iteration, and what is
    not run (a loaded class, a forced word, an early stop) counts as done, so the bar ends at its total."""
    import tqdm as tqdm_module

    import lib.sage.prompt as SP

    bars = []

    class Bar:
        def __init__(self, total=None, desc=None, unit=None, **kwargs):
            self.total, self.desc, self.n, self.steps, self.closed = total, desc, 0, [], False
            bars.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.close()

        def update(self, k=1):
            self.n += k
            self.steps.append(k)

        def set_postfix_str(self, text, refresh=True):
            self.postfix = text

        def close(self):
            self.closed = True

    monkeypatch.setattr(tqdm_module, "tqdm", Bar)
    cfg = PromptSearch(n_words=2, top_k=4, iterations=3)
    SP.prompt_campaign(pipe, ens, lm, ["cat", "dog"], [0], steps=2, config=cfg, class_words=LABELS, out_dir=tmp_path,
                       progress=True)
    assert len(bars) == 1 and bars[0].desc == "prompt searches" and bars[0].closed
    assert bars[0].total == bars[0].n == 2 * 2 * 3 and bars[0].steps[:3] == [1, 1, 1]
    SP.prompt_campaign(pipe, ens, lm, ["cat", "dog"], [0], steps=2, config=cfg, class_words=LABELS, out_dir=tmp_path,
                       progress=True)  # both loaded
    assert len(bars) == 2 and bars[1].steps == [6, 6] and bars[1].n == bars[1].total
    SP.search_prompt(pipe, ens, lm, "cat", [0], steps=2, config=cfg, progress=True)  # alone: its own bar
    assert len(bars) == 3 and bars[2].n == bars[2].total == 6 and bars[2].closed

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(SP, "_grow_prompt", interrupted)
    with pytest.raises(KeyboardInterrupt):
        SP.prompt_campaign(pipe, ens, lm, ["cat"], [0], steps=2, config=cfg, progress=True)
    assert len(bars) == 4 and bars[3].n == 0 and bars[3].closed  # not shown as done, and closed


def test_every_resume_key_changes_with_each_of_its_settings(pipe, ens, lm):
    """A changed setting must never load a result searched under the old one."""
    import lib.sage.latent as L
    import lib.sage.prompt as SP
    import lib.sage.token as T
    from lib.sage.resume import campaign_key

    def differ(fn, base: dict, changes: dict):
        key = fn(**base)
        assert fn(**base) == key
        for name, value in changes.items():
            assert fn(**{**base, name: value}) != key, name

    cfg = LatentSearch(mode="lose", iterations=2)
    differ(lambda **k: L.latent_key(pipe, ens, **k),
           dict(prompt="a photo of a cat", cls="cat", steps=2, guidance=7.5, config=cfg, batch_size=2, batch=[0, 1]),
           dict(prompt="a photo of a dog", cls="dog", steps=3, guidance=5.0, config=LatentSearch(mode="lose"),
                batch_size=4, batch=[0, 2]))
    pcfg = PromptSearch(n_words=2, top_k=4, iterations=1)
    differ(lambda **k: SP.prompt_key(pipe, ens, lm, **k),
           dict(cls="cat", seeds=[0], steps=2, guidance=7.5, config=pcfg, class_words=LABELS, attribute_words=()),
           dict(cls="dog", seeds=[1], steps=3, guidance=5.0, config=PromptSearch(n_words=3, top_k=4, iterations=1),
                class_words=("cat",), attribute_words=("red",)))
    tcfg = TokenAttack(iterations=2, batch_size=2)
    differ(lambda **k: T.token_key(pipe, ens, **k),
           dict(prompts=["a photo of a cat"], source="cat", target="car", seeds=[0], steps=2, guidance=7.5,
                config=tcfg),
           dict(prompts=["a photo of a red cat"], source="dog", target="dog", seeds=[1], steps=3, guidance=5.0,
                config=TokenAttack(iterations=2, batch_size=1)))
    assert campaign_key(pipe, Ensemble(ens.members, criteria=Criteria(class_below=0.4))) != campaign_key(pipe, ens)
    assert campaign_key(pipe, Ensemble(ens.members, groups={"pet": ("cat", "dog")})) != campaign_key(pipe, ens)


def test_prompt_campaign_searches_an_unreadable_class_again(pipe, ens, lm, tmp_path, monkeypatch, dead_pid):
    """A truncated class file is searched again with a warning (it crashed the campaign); a killed writer's temporary
    file is removed."""
    import lib.sage.prompt as SP

    cfg = PromptSearch(n_words=2, top_k=4, iterations=1, stop_on_success=False)
    first = SP.prompt_campaign(pipe, ens, lm, ["cat"], [0], steps=2, config=cfg, out_dir=tmp_path)
    (path,) = tmp_path.glob("prompt_rounds_*.parquet")
    path.write_bytes(path.read_bytes()[:100])
    stale = tmp_path / f".{path.name}.{dead_pid}.0123456789ab.tmp"  # the name SAGE's writer used before the host
    stale.write_bytes(b"half")
    os.utime(stale, (0, 0))  # untouched since long ago (recent ones are left: lib.atomic)
    searched = []
    real = SP.search_prompt
    monkeypatch.setattr(SP, "search_prompt", lambda *a, **k: searched.append(a[3]) or real(*a, **k))
    with pytest.warns(UserWarning, match=f"unreadable prompt-search result {path.name}"):
        again = SP.prompt_campaign(pipe, ens, lm, ["cat"], [0], steps=2, config=cfg, out_dir=tmp_path)
    assert searched == ["cat"] and not again.resumed.any() and not stale.exists()
    pd.testing.assert_frame_equal(again, first)
    pd.testing.assert_frame_equal(pd.read_parquet(path), first.drop(columns="resumed"))


def test_prompt_campaign_checks_every_class_for_the_lm_before_any_search(pipe, lm, tmp_path, monkeypatch):
    """A later class the LM cannot encode (or a bad grad_from_step) fails before the first class is searched."""
    import lib.sage.prompt as SP

    def never(*a, **k):
        raise AssertionError("a class was searched before every class was checked")

    monkeypatch.setattr(SP, "search_prompt", never)
    zoo = Ensemble([const_member([0.0] * 4, LABELS + ("zebra",))])  # the ensemble knows zebra, the LM does not
    with pytest.raises(PromptError, match="cannot encode.*zebra"):
        SP.prompt_campaign(pipe, zoo, lm, ["cat", "zebra"], [0], steps=2, out_dir=tmp_path)
    with pytest.raises(PromptError, match="no room for 40 more"):  # the toy LM's context holds 32 tokens
        SP.prompt_campaign(pipe, zoo, lm, ["cat"], [0], steps=2, config=PromptSearch(n_words=40))
    with pytest.raises(ValueError, match="grad_from_step must be in"):
        SP.prompt_campaign(pipe, zoo, lm, ["cat"], [0], steps=2, config=PromptSearch(grad_from_step=2))
    assert not list(tmp_path.iterdir())


def test_found_prompts_must_be_complete_sentences_for_the_lm(pipe, lm):
    fooled = Ensemble([const_member([-9.0, 9.0, 0.0])])  # always "dog": every prompt loses "cat"
    end = lm.end_prob("a photo of a cat")
    assert 0.0 <= end <= 1.0
    cfg = dict(n_words=2, top_k=3, iterations=1)
    df = search_prompt(pipe, fooled, lm, "cat", [0], steps=2, config=PromptSearch(min_end_prob=0.0, **cfg))
    assert len(df) == 1 and df.found[0]  # check off: the first word already counts
    df = search_prompt(pipe, fooled, lm, "cat", [0], steps=2, config=PromptSearch(min_end_prob=1.0, **cfg))
    assert (df.end_prob < 1.0).all()  # so no prompt is complete enough for the bar of 1.0
    assert len(df) == 2 and not df.found.any()  # fooled, but grown on and not reported
    assert (df.fooled_fraction == 1.0).all() and df.end_prob.between(0, 1).all()


def test_categories():
    base = "a photo of a cat"
    assert categorize(base + " dog on", base, "cat", LABELS) == "concept overwrite"
    assert categorize(base + " red", base, "cat", LABELS, ["red"]) == "attribute"
    assert categorize(base + " sleeping cat", base, "cat", LABELS, ["red"]) == "context"
    imagenet = ("tabby", "tiger cat", "dog", "cat")  # "tabby" names the class itself (its ImageNet group), "dog" not
    assert categorize(base + " tabby sleeping", base, "cat", imagenet, same_class=("tabby", "tiger cat")) == "context"
    assert categorize(base + " tabby sleeping", base, "cat", imagenet) == "concept overwrite"  # without the group
    assert categorize(base + " dog", base, "cat", imagenet, same_class=("tabby",)) == "concept overwrite"


# --------------------------------------------------------------------------------------------------- token attack
def test_token_attack_train_evaluate_save(pipe, ens, tmp_path):
    with pytest.raises(ValueError, match="equals the source"):
        train_token(pipe, ens, ["a photo of a cat"], "cat", "cat", [0])
    res = train_token(pipe, ens, ["a photo of a cat", "a cat on a beach"], "cat", "car", [0, 1], steps=2,
                      config=TokenAttack(lr=2.0, iterations=2, batch_size=2))  # 2 + 2 > 2.5: the clamp bites
    assert res.embedding.shape == (32,) and len(res.history) == 2 and res.embedding.abs().max() == 2.5
    scorer = ClipScorer(encode_image=lambda x: x.mean((2, 3)), encode_text=lambda ids: ids[:, :3].float() + 1,
                        tokenize=lambda ts: torch.tensor([[len(t), 1, 2] for t in ts]), image_size=16)
    df = evaluate_token(pipe, ens, res, ["a photo of a cat"], [5, 6], scorer=scorer)
    assert len(df) == 2 and set(df.columns) >= {"success", "p_target", "text_cosine", "clip_image_delta"}
    assert (df.text_cosine < 0.9999).all()  # the token moves the pooled text (a token ignored would give 1)
    dog = word_embedding(pipe, "dog")  # the token in the slot is the word: the pooled output of the prompt with it
    torch.testing.assert_close(pooled_text(pipe, ["a photo of a cat"], dog), pooled_text(pipe, ["a photo of a cat dog"],
                                                                                       None))
    back = load_token(save_token(tmp_path / "tok.safetensors", res))
    assert torch.equal(back.embedding, res.embedding) and back.target == "car" and back.meta["steps"] == 2
    assert back.history == res.history and "history" not in back.meta  # the loss curve survives the file


def test_token_training_resumes_from_its_checkpoint_exactly(pipe, ens, tmp_path, monkeypatch, dead_pid):
    import lib.sage.token as T
    from lib.atomic import HOST

    prompts, seeds = ["a photo of a cat", "a cat on a beach", "a small cat"], [0, 1, 2]
    kw = dict(steps=2, guidance=7.5, checkpoint_dir=tmp_path)
    cfg = lambda n: TokenAttack(iterations=n, batch_size=2, lr=0.1)  # noqa: E731
    ref = train_token(pipe, ens, prompts, "cat", "car", seeds, steps=2, config=cfg(5))
    calls, real = [], T.render_with_slots

    def dies_at_the_fourth_step(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # as if the kernel were interrupted during iteration 4
        return real(*a, **k)

    monkeypatch.setattr(T, "render_with_slots", dies_at_the_fourth_step)
    with pytest.raises(KeyboardInterrupt):
        train_token(pipe, ens, prompts, "cat", "car", seeds, config=cfg(5), checkpoint_every=2, **kw)
    monkeypatch.setattr(T, "render_with_slots", real)
    key = T.token_key(pipe, ens, prompts, "cat", "car", seeds, 2, 7.5, cfg(5))
    ckpt = tmp_path / f"token_cat_to_car_{key}.ckpt.safetensors"
    assert [p.name for p in tmp_path.iterdir()] == [ckpt.name]  # no temporary file left behind
    stale = tmp_path / f".{ckpt.name}.{dead_pid}@{HOST}.0123456789ab.tmp"  # a SIGKILLed writer's, though
    stale.write_bytes(b"half")
    os.utime(stale, (0, 0))  # untouched since long ago (recent ones are left: lib.atomic)
    again = train_token(pipe, ens, prompts, "cat", "car", seeds, config=cfg(5), checkpoint_every=2, **kw)
    assert again.meta["resumed_from"] == 2 and again.history == ref.history and not stale.exists()
    assert torch.equal(again.embedding, ref.embedding) and ref.meta["resumed_from"] == 0
    assert len(set(ref.history)) > 1  # the steps moved the loss: the comparison is not vacuous
    done = train_token(pipe, ens, prompts, "cat", "car", seeds, config=cfg(5), **kw)  # finished: loaded, not retrained
    assert done.meta["resumed_from"] == 5 and done.history == ref.history and torch.equal(done.embedding, ref.embedding)
    fresh = train_token(pipe, ens, prompts, "cat", "car", seeds, config=cfg(5), resume=False, **kw)
    assert fresh.meta["resumed_from"] == 0 and fresh.history == ref.history
    # a finished run is extended by a longer one, and equals that longer run from scratch
    longer = train_token(pipe, ens, prompts, "cat", "car", seeds, config=cfg(7), **kw)
    assert longer.meta["resumed_from"] == 5 and longer.history[:5] == ref.history
    assert torch.equal(longer.embedding, train_token(pipe, ens, prompts, "cat", "car", seeds, steps=2,
                                                     config=cfg(7)).embedding)
    # a shorter run of the same settings starts fresh and leaves the longer run's checkpoint as it is
    short = train_token(pipe, ens, prompts, "cat", "car", seeds, config=cfg(3), **kw)
    assert short.meta["resumed_from"] == 0 and short.history == ref.history[:3]
    assert len(T._load_checkpoint(ckpt)[1]) == 7 and T._load_checkpoint(ckpt)[3] == 1.0  # float32: loss scale 1
    # other settings or weights have other keys: never a stale checkpoint
    assert T.token_key(pipe, ens, prompts, "cat", "car", seeds, 2, 7.5, TokenAttack(iterations=5, batch_size=2)) != key
    assert T.token_key(pipe, ens, prompts, "cat", "car", seeds, 2, 7.5, cfg(9)) == key  # iterations are not in it
    retrained = Ensemble([FnMember(small_net(seed=1), LABELS, "a"), FnMember(small_net(seed=2), LABELS, "b"),
                          EdgeMember(FnMember(small_net(seed=5), LABELS, "c"))])
    assert T.token_key(pipe, retrained, prompts, "cat", "car", seeds, 2, 7.5, cfg(5)) != key
    ckpt.write_bytes(b"not a safetensors file")  # unreadable: a warning and a fresh start
    with pytest.warns(UserWarning, match="unreadable token checkpoint"):
        broken = train_token(pipe, ens, prompts, "cat", "car", seeds, config=cfg(5), **kw)
    assert broken.meta["resumed_from"] == 0 and torch.equal(broken.embedding, ref.embedding)
    with pytest.raises(ValueError, match="checkpoint_every"):
        train_token(pipe, ens, prompts, "cat", "car", seeds, config=cfg(1), checkpoint_every=0, **kw)


# --------------------------------------------------------------------------------------------------------- metrics
def test_ssr_recheck_and_renderer_check(ens):
    df = ssr([dict(mode="type1", found=True), dict(mode="type1", found=False), dict(mode="type2", found=True)])
    assert df.set_index("mode").ssr.to_dict() == {"type1": 0.5, "type2": 1.0}
    # finds at the start and confirmed finds (hand-computed); a missing value is False
    runs = pd.DataFrame(dict(mode=["a", "a", "a", "a", "b", "b"], found=[True, False, True, True, True, True],
                             start=[True, True, False, False, True, True],
                             ok=[True, True, np.nan, False, np.nan, True]))
    t = ssr(runs, at_start="start", confirmed="ok").set_index("mode")
    assert t.n_runs.to_dict() == {"a": 4, "b": 2} and t.n_found.to_dict() == {"a": 3, "b": 2}
    assert t.n_found_at_start.to_dict() == {"a": 1, "b": 2}
    # a's second run failed at its start but was not found: it is no run of the search's own (denominator 2, not 3)
    assert t.loc["a", "ssr_searched"] == 1.0 and np.isnan(t.loc["b", "ssr_searched"])  # every start of b failed
    assert t.n_confirmed.to_dict() == {"a": 1, "b": 1} and t.ssr_confirmed.to_dict() == {"a": 0.25, "b": 0.5}
    # a run without a recorded result is a run, not a find
    gap = ssr(pd.DataFrame(dict(mode=["a", "a", "a"], found=[True, None, np.nan]))).iloc[0]
    assert (gap.n_runs, gap.n_found, gap.ssr) == (3, 1, pytest.approx(1 / 3))
    with pytest.raises(KeyError, match="'checked'"):
        ssr(runs, confirmed="checked")
    with pytest.raises(ValueError, match="member of the ensemble"):
        recheck(torch.rand(1, 3, 16, 16), ens.members[0], "cat", ensemble=ens)
    ok = recheck(torch.rand(2, 3, 16, 16), const_member([0.0, 5.0, 0.0], name="held-out"), "cat", ensemble=ens)
    assert ok.tolist() == [True, True]
    from lib.scoring import random_toy_clip_scorer

    scorer = random_toy_clip_scorer()  # two CLIP members on one CLIP (its scorer is no module) are one classifier
    a, b = ClipMember(scorer, LABELS, name="clip-a"), ClipMember(scorer, LABELS, name="clip-b")
    with pytest.raises(ValueError, match="member of the ensemble"):
        recheck(torch.rand(1, 3, 16, 16), b, "cat", ensemble=Ensemble([a]))
    other = ClipMember(random_toy_clip_scorer(seed=1), LABELS, name="clip-c")
    assert len(recheck(torch.rand(1, 3, 16, 16), other, "cat", ensemble=Ensemble([a]))) == 1
    tab = renderer_check(["a photo of a red cat", "a photo of a cat zzz"], "cat")
    assert tab.parsed.tolist() == [True, False] and tab.asks_for_class[0] == True  # noqa: E712


def test_a_prompt_is_confirmed_only_by_images_that_fool_the_ensemble_and_the_checker():
    """Ensemble fooled on seed 0 only, checker on seed 1 only: each share is 0.5, but no image fools both."""
    assert confirmed([True, False], [False, True]).tolist() == [False, False]
    assert confirmed_fraction([True, False], [False, True]) == 0.0
    assert not prompt_confirmed([True, False], [False, True], 0.5)
    assert prompt_confirmed(pd.Series([True, True]), pd.Series([True, False]), 0.5)  # seed 0: both
    assert confirmed_fraction([True, True, True, False], [True, True, False, True]) == 0.5
    assert np.isnan(confirmed_fraction([], []))
    with pytest.raises(ValueError, match="one of each per image"):
        confirmed([True, False], [True])


def test_residual_step_zero_is_kept_not_taken_for_the_default():
    """Step 0 is a valid choice (with weight 1, the exact gradient: checked by the gradient tests), not "unset"."""
    assert [Residual(k).resolved_step(10) for k in (0, None, 10)] == [0, 5, 10]  # 0 is not None: not the default
    assert Residual().resolved_step(25) == 12  # T // 2 (README: RESIDUAL_STEP None → STEPS // 2)
    with pytest.raises(ValueError, match="outside"):
        Residual(11).resolved_step(10)
    for w in (0.0, -0.5, float("nan")):  # w ≤ 0 would turn the descent into an ascent
        with pytest.raises(ValueError, match="residual weight must be a positive number"):
            Residual(1, weight=w).check(10)


@pytest.mark.parametrize("bad,error", [(dict(lr=0.0), "lr must be a positive number"),
                                       (dict(lr=-0.05), "lr must be a positive number"),
                                       (dict(residual=Residual(1, weight=-1.0)), "residual weight"),
                                       (dict(delta_range=(0.2, 1.0)), "delta_range must contain 0")])
def test_a_latent_search_refuses_a_step_that_cannot_descend_before_sampling(pipe, ens, monkeypatch, bad, error):
    import lib.sage.latent as L

    for name in ("encode", "sample_with_residual", "decode"):
        monkeypatch.setattr(L, name, lambda *a, **k: pytest.fail("encoded or sampled before the check"))
    with pytest.raises(ValueError, match=error):
        search_latents(pipe, ens, "a photo of a cat", "cat", seeds=[0], steps=2, config=LatentSearch(**bad))


def test_the_sage_clip_scorer_follows_its_spec():
    from lib.sage.build import clip_scorer

    auto, rand = clip_scorer("toy"), clip_scorer("toy", spec="random")
    assert auto.fingerprint() != rand.fingerprint() == clip_scorer("twin:sd-v1").fingerprint()  # twins: random
    assert not any(p.requires_grad for p in rand.module.parameters())  # frozen


def test_the_token_notebook_loads_the_clip_scorer_before_training():
    """Missing CLIP weights must fail before the token is trained, not after."""
    import json

    cells = json.loads((Path(__file__).parents[1] / "notebooks/03_sage_token_attack.ipynb").read_text())["cells"]
    src = ["".join(c["source"]) for c in cells]
    load = next(i for i, s in enumerate(src) if "clip_scorer(" in s)
    train = next(i for i, s in enumerate(src) if "train_token(" in s)
    assert load < train, (load, train)


def test_ngr_flags_non_gaussian_latents():
    torch.manual_seed(0)
    gauss = torch.randn(40, 4, 16, 16)  # N(0, I) latents: each test rejects about alpha of them
    uniform = (torch.rand(2, 4, 16, 16) - 0.5) * 3.4
    for test in ("dagostino", "ks", "norm"):
        assert ngr(gauss, test=test) <= 0.15 and ngr(gauss, test=test, alpha=1e-9) == 0.0, test
    assert ngr(gauss, alpha=0.5) >= 0.3  # alpha is the level used
    assert ngr(uniform) == 1.0 and ngr(uniform, alpha=1e-9) == 1.0 and ngr(uniform, test="ks") == 1.0
    # KS sees the scale, D'Agostino only the shape (doubling is exact in floating point: the same statistic)
    assert ngr(gauss * 2, test="ks") == 1.0 and ngr(gauss * 2) == ngr(gauss)
    assert set(normality(gauss).columns) >= {"p_value", "non_gaussian", "norm"}
    # a 10% larger scale: invisible to D'Agostino (shape), plain in the norm test
    wide = gauss * 1.1
    assert ngr(wide, test="norm") == 1.0 and ngr(wide) <= 0.15
    assert ngr(gauss * 0.9, test="norm") == 1.0  # two-sided: a latent shrunk towards the origin is an outlier too
    th, sm = qq_points(gauss[0], 50)
    assert th.shape == sm.shape == (50,)
    from scipy import stats

    # plotting positions (i + 0.5) / n: finite, symmetric theoretical quantiles
    np.testing.assert_allclose(th, stats.norm.ppf((np.arange(50) + 0.5) / 50))
    np.testing.assert_allclose(th, -th[::-1], atol=1e-12)
    with pytest.raises(ValueError, match="unknown test"):
        ngr(gauss, test="shapiro")
    # saved latents are (1, C, S, S): a list, a batch and their torch.cat agree; a stack or a flattening is refused
    saved = list(torch.cat([gauss, uniform]).split(1))
    assert ngr(saved) == ngr(torch.cat(saved)) == ngr(list(torch.cat([gauss, uniform]))) == pytest.approx(
        (2 + ngr(gauss) * 40) / 42)
    for bad in (torch.stack(saved), torch.cat(saved).flatten(1), [gauss.flatten()]):
        with pytest.raises(ValueError, match=r"a latent is \(C, S, S\)"):
            ngr(bad)


# ----------------------------------------------------------------------------------------- notebook helpers (build)
def test_build_specs_and_captions():
    from lib.sage.build import build_ensemble, class_captions, make_member, vocabulary

    with pytest.raises(ValueError, match="also an ensemble member"):
        build_ensemble(["resnet", "edges"], checker="edges")
    with pytest.raises(ValueError, match="unknown member spec"):
        make_member("nonsense")
    with pytest.raises(ValueError, match="toy world's edge member"):
        make_member("edge:resnet")
    train = class_captions("toy", "cat", 8, seed=0)
    test = class_captions("toy", "cat", 6, seed=1, exclude=train)
    assert len(set(train)) == 8 and not set(train) & set(test)
    from lib.toy.world import parse_caption

    assert not {parse_caption(c) for c in train} & {parse_caption(c) for c in test}  # no paraphrase of a train scene
    assert renderer_check(train + test, "cat").asks_for_class.all()
    assert class_captions("toy", "cat", 8, seed=0) == train  # reproducible
    with pytest.raises(ValueError, match="not a toy-world object"):
        class_captions("toy", "zebra", 2)
    assert class_captions("sd-v1-4", "cat", 3)[0].count("cat") == 1
    words, attrs = vocabulary("toy")
    assert "fish" in words and "red" in attrs and "gogh" in attrs


def test_judge_images_and_before_after(ens):
    from lib.sage.report import before_after, judge_images

    imgs = torch.rand(3, 3, 32, 32)
    df = judge_images(imgs, ens, "cat", "lose", checker=const_member([0.0, 5.0, 0.0], name="held-out"))
    assert len(df) == 3 and {"fooled", "p_class", "checker_confirms", "checker_top"} <= set(df.columns)
    assert (df.checker_top == "dog").all() and df.checker_confirms.all()
    with pytest.raises(ValueError, match="member of the ensemble"):  # the re-check knows the search's ensemble
        judge_images(imgs, ens, "cat", "lose", checker=ens.members[0])
    fig = before_after(imgs, imgs.flip(0), ["a", "b", "c"])
    assert len(fig.axes) == 6
    with pytest.raises(ValueError, match="'before' images"):
        before_after(imgs, imgs[:2])


def test_render_and_judge_generates_one_image_per_seed_and_judges_it(pipe, ens):
    from lib.sage.report import judge_images, render_and_judge
    from lib.sampling import generate

    images, table = render_and_judge(pipe, ens, "a photo of a cat", "cat", [3, 1], 2, 4.0, batch_size=1)
    torch.testing.assert_close(images, generate(pipe, ["a photo of a cat"] * 2, [3, 1], 2, 4.0, batch_size=1))
    expected = judge_images(images, ens, "cat").drop(columns="image")
    assert table["seed"].tolist() == [3, 1]
    pd.testing.assert_frame_equal(table.drop(columns="seed"), expected)


def test_prompt_result_applies_the_success_rules_per_image(monkeypatch):
    """Notebook 02's judgement of a class's result: the template and the prompt on the search's seeds, a found prompt
    again on the evaluation seeds (in batches the size of the search's), each rule per image."""
    import lib.sage.report as R

    fooled = {"a photo of a cat": [True, False, False, False], "a photo of a cat sleeping": [True, True, True, False],
              "eval": [True, False, False, False, True, True]}
    checked = {"a photo of a cat": [False] * 4, "a photo of a cat sleeping": [True, True, False, True],
               "eval": [True] * 6}
    calls = []

    def fake(pipe, ensemble, prompt, cls, seeds, steps, guidance, checker=None, batch_size=None, verdict="lose"):
        key = "eval" if seeds[0] >= 100 else prompt
        calls.append((prompt, list(seeds), batch_size))
        table = pd.DataFrame(dict(seed=seeds, fooled=fooled[key], p_class=0.5, checker_confirms=checked[key],
                                  checker_top="cat"))
        return torch.zeros(len(seeds), 3, 8, 8), table

    monkeypatch.setattr(R, "render_and_judge", fake)
    result = SimpleNamespace(cls="cat", prompt="a photo of a cat sleeping", found=True, category="context",
                             loss_prompt=-1.5)
    row, base, images = R.prompt_result(None, None, result, "a photo of a {cls}", [0, 1, 2, 3],
                                        list(range(100, 106)), 2, 4.0, 0.5, checker=object(), attribute="object")
    assert calls == [("a photo of a cat", [0, 1, 2, 3], None), ("a photo of a cat sleeping", [0, 1, 2, 3], None),
                     ("a photo of a cat sleeping", list(range(100, 106)), 4)]
    assert base.shape == images.shape == (4, 3, 8, 8)
    assert row["words_added"] == 1 and row["fooled_fraction"] == 0.75 and row["base_fooled_fraction"] == 0.25
    assert not row["found_at_base"]  # the template alone fools 1 of 4 seeds, under 0.5
    assert row["checker_fraction"] == 0.75 and row["confirmed_fraction"] == 0.5 and row["confirmed"]  # seeds 0, 1
    assert row["eval_fooled_fraction"] == 0.5 and row["holds_on_eval"] and row["confirmed_on_eval"]
    assert row["renderer_label"] == "cat" and row["asks_for_class"]
    calls.clear()
    lost = SimpleNamespace(**{**vars(result), "found": False})
    row, _, _ = R.prompt_result(None, None, lost, "a photo of a {cls}", [0, 1, 2, 3], [100], 2, 4.0, 0.5)
    assert len(calls) == 2 and np.isnan(row["eval_fooled_fraction"]) and not row["holds_on_eval"]
    assert "confirmed" not in row and "renderer_label" not in row  # no checker, no toy attribute


def test_evaluate_token_returns_images(pipe, ens):
    from lib.sage.token import TokenResult

    res = TokenResult(torch.zeros(32), "cat", "car", meta=dict(steps=2, guidance=7.5))
    df, with_tok, plain = evaluate_token(pipe, ens, res, ["a photo of a cat"], [0, 1], return_images=True)
    assert len(df) == 2 and with_tok.shape == plain.shape == (2, 3, 64, 64)
    # rendered one image per call (SD at 512 px): the same images and rows, up to batched kernels' rounding
    df1, with1, plain1 = evaluate_token(pipe, ens, res, ["a photo of a cat"], [0, 1], return_images=True, batch_size=1)
    torch.testing.assert_close(with1, with_tok, atol=1e-4, rtol=0)
    torch.testing.assert_close(plain1, plain, atol=1e-4, rtol=0)
    pd.testing.assert_frame_equal(df1, df, atol=1e-4)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        evaluate_token(pipe, ens, res, ["a photo of a cat"], [0, 1], batch_size=0)
    p = torch.tensor([0.0, 1.0, 2.0]).softmax(0)  # cat, dog, car: the columns name their classes
    fixed = evaluate_token(pipe, Ensemble([const_member([0.0, 1.0, 2.0])]), res, ["a photo of a cat"], [0])
    assert fixed.p_target[0] == pytest.approx(float(p[2])) and fixed.p_source[0] == pytest.approx(float(p[0]))


def test_a_type2_latent_search_needs_the_members_to_agree(pipe, tmp_path):
    """Through the batched campaign: two members that see one other label make every seed a type-2 failure at once;
    two that see different other labels make none, each reported with its best loss."""
    cfg = LatentSearch(mode="type2", iterations=2)
    agree = Ensemble([const_member([0.0, 9.0, 0.0], name="d1"), const_member([0.0, 9.0, 0.0], name="d2")])
    df, res = latent_campaign(pipe, agree, "a photo of a cat", "cat", seeds=[0, 1], steps=2, config=cfg,
                              out_dir=tmp_path / "agree")
    assert df.found.tolist() == [True, True] and [r.iterations for r in res] == [0, 0]
    split = Ensemble([const_member([0.0, 9.0, 0.0], name="d1"), const_member([0.0, 0.0, 9.0], name="c1")])
    df, res = latent_campaign(pipe, split, "a photo of a cat", "cat", seeds=[0, 1], steps=2, config=cfg,
                              out_dir=tmp_path / "split")
    assert not df.found.any() and all("not found" in r.summary() for r in res)
    agreed_loss = float(agree.loss(agree.probs(res[0].image), "cat", "other").max())
    assert df.best_loss.notna().all() and (df.best_loss > agreed_loss).all()  # disagreement costs loss


def test_a_batched_find_its_solo_render_does_not_reproduce_does_not_end_the_search(pipe):
    """A search stops only on a success its solo re-render (what render_latent and a resume give) reproduces; before,
    it left the batch at the first batched success and was then reported "not found" after fewer iterations, with no
    trace of why. Here the gradient-recording pass always sees a failure and the solo render never does."""
    def logits(x):
        cat = (-3.0 if torch.is_grad_enabled() else 3.0) + x.mean((1, 2, 3))  # image in [0, 1]
        return torch.stack([cat, torch.zeros_like(cat), torch.zeros_like(cat)], dim=1)

    rounding = Ensemble([FnMember(logits, LABELS, "rounding")])
    (r,) = search_latents(pipe, rounding, "a photo of a cat", "cat", seeds=[0], steps=2,
                          config=LatentSearch(mode="lose", iterations=3))
    assert not r.found and r.iterations == 3 and r.meta["stopped"] is None
    assert r.meta["solo_rejected"] == 4 and r.meta["solo_fooled"] is False
    # the other way round: the batched image never fails, the solo image of the best latent does: a find
    flipped = Ensemble([FnMember(lambda x: -logits(x), LABELS, "flipped")])
    (f,) = search_latents(pipe, flipped, "a photo of a cat", "cat", seeds=[0], steps=2,
                          config=LatentSearch(mode="lose", iterations=2))
    assert f.found and f.meta["solo_fooled"] is True and f.iterations == 2 and f.meta["solo_rejected"] == 0


def test_ngr_table_and_the_sage_figures():
    import matplotlib.pyplot as plt

    from lib.sage.metrics import ngr_table
    from lib.sage.plots import class_probability_figure, loss_figure, qq_loss_figure

    torch.manual_seed(0)
    gauss, uniform = list(torch.randn(3, 4, 8, 8)), list((torch.rand(2, 4, 8, 8) - 0.5) * 3.4)
    t = ngr_table({"gauss": gauss, "uniform": uniform, "none": []}, alpha=0.05)
    pd.testing.assert_frame_equal(ngr_table({"gauss": torch.stack(gauss)}), t.iloc[:1])  # a batch as well as a list
    assert t.latents.tolist() == ["gauss", "uniform", "none"] and t.n.tolist() == [3, 2, 0]
    assert t.loc[1, "NGR_dagostino"] == ngr(uniform) and t.loc[0, "NGR_norm"] == ngr(gauss, test="norm")
    assert t.loc[0, "mean_norm"] == pytest.approx(float(np.mean([float(z.norm()) for z in gauss])))
    assert t.loc[2, ["NGR_dagostino", "NGR_ks", "NGR_norm", "mean_norm"]].isna().all()
    fig = qq_loss_figure(gauss[0], "seed 0", None, "", {"a": [1.0, 0.5], "b": [2.0]})
    assert len(fig.axes[0].lines) == 2 and len(fig.axes[1].lines) == 2  # the seed's points and the diagonal
    fig = qq_loss_figure(gauss[0], "seed 0", uniform[0], "found", {"a": [1.0]})
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["seed 0", "found"]
    rounds = pd.DataFrame(dict(cls=["cat", "cat", "dog"], round=[0, 1, 0], p_class=[0.9, 0.4, 0.8]))
    assert [len(line.get_xdata()) for line in class_probability_figure(rounds, ["cat", "dog"], 3).axes[0].lines] \
        == [2, 1]
    assert list(loss_figure([3.0, 2.0, 1.0], "loss", "t").axes[0].lines[0].get_ydata()) == [3.0, 2.0, 1.0]
    plt.close("all")
