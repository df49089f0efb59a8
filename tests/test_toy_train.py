"""The toy-model training path end to end: every stage for 2 steps, then an offline StableDiffusionPipeline."""

import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lib.speed import cpu_threads  # noqa: E402
from lib.toy import train as T  # noqa: E402
from lib.toy import world as W  # noqa: E402


THREADS_AFTER_RUN: list[int] = []


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    with cpu_threads(3):  # the caller's count; the cpu configuration trains on 2 threads
        T.run("all", "cpu", out, steps_override=2)
        THREADS_AFTER_RUN.append(torch.get_num_threads())
    return out


def test_training_gives_the_caller_its_thread_count_back(toy_dir):
    assert T.CONFIGS["cpu"]["threads"] == 2 and THREADS_AFTER_RUN == [3]


def test_pipeline_loads_and_generates(toy_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(toy_dir, dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.safety_checker is None and type(pipe.scheduler).__name__ == "DDIMScheduler"
    img = pipe("a photo of a red star", num_inference_steps=2, guidance_scale=4.0, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 64, 64, 3) and np.isfinite(img).all()
    assert pipe.unet.config.block_out_channels and len(pipe.unet.down_blocks) == 4


def test_files_and_training_log(toy_dir):
    for rel in ("model_index.json", "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                "text_encoder/model.safetensors", "tokenizer/tokenizer_config.json", "clip_vision/model.safetensors"):
        assert (toy_dir / rel).is_file(), rel
    log = json.loads((toy_dir / "TRAINING.json").read_text())
    assert set(log["stages"]) == {"clip", "vae", "unet"} and log["hardware"]["torch"]
    assert all(st["steps"] == 2 for st in log["stages"].values())


def test_load_toy_clip(toy_dir):
    clip = T.load_toy_clip(toy_dir)
    tok = T.build_clip_tokenizer()
    ids = tok(["a red star", "a blue dog"], padding=True, return_tensors="pt").input_ids
    with torch.no_grad():
        assert T.text_features(clip, ids).shape == (2, 64)
        assert T.image_features(clip, torch.zeros(2, 3, 64, 64)).shape == (2, 64)


def test_missing_or_corrupt_files_name_the_rebuild_command(toy_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="lib.toy.train --stage all"):
        T.load_toy_pipeline(tmp_path)
    import shutil

    bad = tmp_path / "toy"
    shutil.copytree(toy_dir, bad)
    (bad / "clip_vision/model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(RuntimeError, match=r"clip_vision/model\.safetensors.*lib\.toy\.train --stage clip-vision"):
        T.load_toy_clip(bad)


@pytest.mark.parametrize("damage", ["text_encoder/config.json", "clip_vision/config.json", "no vision_config"])
def test_a_damaged_clip_config_is_named_itself(toy_dir, tmp_path, damage):
    import shutil

    bad = tmp_path / "toy"
    shutil.copytree(toy_dir, bad)
    rel = "clip_vision/config.json" if damage == "no vision_config" else damage
    if damage == "no vision_config":  # valid JSON, wrong content
        cfg = json.loads((bad / rel).read_text())
        del cfg["vision_config"]
        (bad / rel).write_text(json.dumps(cfg))
    else:
        (bad / rel).write_text("{not json")
    with pytest.raises(RuntimeError) as err:
        T.load_toy_clip(bad)
    msg = str(err.value)
    assert str(bad / rel) in msg and "lib.toy.train --stage" in msg and "\n" not in msg, msg


def test_a_missing_committed_file_can_be_restored_from_git():
    hint = T.rebuild_hint(T.TOY_DIR / "unet/diffusion_pytorch_model.safetensors")
    assert "git checkout -- data/toy/unet/diffusion_pytorch_model.safetensors" in hint, hint
    assert "git checkout" not in T.rebuild_hint(Path("/elsewhere/unet/config.json"))


@pytest.mark.parametrize("damage", ["missing tokenizer.json", "missing tokenizer_config.json",
                                    "tiny tokenizer.json", "no length limit", "corrupt unet",
                                    "unet lacks a tensor", "text_encoder lacks a tensor", "missing unet weights",
                                    "broken tokenizer.json"])
def test_damaged_toy_folders_fail_in_one_line_naming_the_file(toy_dir, tmp_path, damage, monkeypatch):
    import shutil

    from lib import loading
    from lib.loading import ModelLoadError, load_pipeline

    bad = tmp_path / "toy"
    shutil.copytree(toy_dir, bad)
    tok = bad / "tokenizer"
    if damage == "missing unet weights":  # diffusers then looked for a .bin and named that
        (bad / "unet/diffusion_pytorch_model.safetensors").unlink()
    elif damage == "broken tokenizer.json":
        (tok / "tokenizer.json").write_text('{"version": ')
    elif damage.startswith("missing"):
        (tok / damage.split()[1]).unlink()
    elif damage == "tiny tokenizer.json":  # loads without complaint as a 2-token vocabulary
        spec = json.loads((tok / "tokenizer.json").read_text())
        spec["model"]["vocab"], spec["model"]["merges"] = {"a": 0, "b": 1}, []
        spec["added_tokens"] = []
        (tok / "tokenizer.json").write_text(json.dumps(spec))
    elif damage == "no length limit":
        cfg = json.loads((tok / "tokenizer_config.json").read_text())
        del cfg["model_max_length"]
        (tok / "tokenizer_config.json").write_text(json.dumps(cfg))
    elif damage.endswith("lacks a tensor"):  # both libraries load such a file without an error of their own
        from safetensors.torch import load_file, save_file

        file = next((bad / damage.split()[0]).glob("*.safetensors"))
        state = load_file(file)
        del state[sorted(state)[-1]]
        save_file(state, file)
    else:
        (bad / "unet/diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    where = damage.split()[-1 if damage == "corrupt unet" else 0] if "unet" in damage or "text_encoder" in damage \
        else "tokenizer"
    if damage.startswith("missing") or damage == "broken tokenizer.json":  # the file itself, not only its folder
        where = f"tokenizer/{damage.split()[1]}"
    if damage == "missing unet weights":
        where = "unet/diffusion_pytorch_model.safetensors"
    with pytest.raises((FileNotFoundError, RuntimeError), match=f"{where}.*lib.toy.train --stage all"):
        T.load_toy_pipeline(bad)
    if where == "text_encoder":  # CLIP-Score's model reads the same file
        with pytest.raises(RuntimeError, match="text_encoder/model.safetensors .*lacks 1 of its module's tensors"):
            T.load_toy_clip(bad)
    monkeypatch.setitem(loading.PRESETS, "toy", str(bad))  # the notebooks' path: load_pipeline("toy")
    with pytest.raises(ModelLoadError) as err:
        load_pipeline("toy")
    msg = str(err.value)
    assert where in msg and "lib.toy.train --stage all" in msg and "\n" not in msg, msg
    with pytest.raises(ModelLoadError) as err:  # the same folder given by its path, as a retrained world is
        load_pipeline(str(bad))
    msg = str(err.value)
    assert where in msg and f"lib.toy.train --stage all --config gpu --out {bad}" in msg and "\n" not in msg, msg


def test_a_vision_tower_lacking_a_tensor_is_named(toy_dir, tmp_path):
    """load_state_dict(strict=False) takes such a file without a word and leaves that tensor random."""
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "toy"
    shutil.copytree(toy_dir, bad)
    file = next((bad / "clip_vision").glob("*.safetensors"))
    state = load_file(file)
    del state[sorted(state)[0]]
    save_file(state, file)
    with pytest.raises(RuntimeError, match=f"clip_vision/{file.name}.*missing keys"):
        T.load_toy_clip(bad)


def test_continuation_stages_keep_the_text_encoder_and_log_each_run(toy_dir, tmp_path):
    import shutil

    work = tmp_path / "toy"
    shutil.copytree(toy_dir, work)
    te_bytes = (work / "text_encoder/model.safetensors").read_bytes()
    vis_bytes = (work / "clip_vision/model.safetensors").read_bytes()
    from diffusers import AutoencoderKL

    enc_before = AutoencoderKL.from_pretrained(work / "vae").encoder.state_dict()
    T.run("clip-vision", "cpu", work, steps_override=2)
    T.run("vae-decoder", "cpu", work, steps_override=2)
    T.run("unet-resume", "cpu", work, steps_override=2)
    T.run("unet-resume", "cpu", work, steps_override=2)
    vae = AutoencoderKL.from_pretrained(work / "vae")
    assert all(torch.equal(v, vae.encoder.state_dict()[k]) for k, v in enc_before.items())  # latents unchanged
    assert (work / "text_encoder/model.safetensors").read_bytes() == te_bytes  # the UNet's encoder never moves
    assert (work / "clip_vision/model.safetensors").read_bytes() != vis_bytes
    stages = json.loads((work / "TRAINING.json").read_text())["stages"]
    assert {"clip-vision", "vae-decoder", "unet-resume", "unet-resume-2"} <= set(stages)
    assert stages["vae-decoder"]["encoder_frozen"]
    assert stages["clip-vision"]["text_frozen"] and stages["unet-resume"]["resumed"]
    # each stage records where it ran (stages of one folder may come from different machines)
    assert all(st["hardware"]["device"] == "cpu" and st["config_name"] == "cpu" and st["steps_override"] == 2
               for st in stages.values())
    with pytest.raises(ValueError, match="batch must be >= 1"):
        T.run("unet", "cpu", tmp_path / "never", steps_override=2, batch=0)
    assert not (tmp_path / "never").exists()
    T.run("unet", "cpu", work, steps_override=2, batch=4)  # a fresh UNet voids the logs of the old one's continuations only
    stages = json.loads((work / "TRAINING.json").read_text())["stages"]
    assert not any(k.startswith("unet-") for k in stages) and {"unet", "clip-vision", "vae-decoder"} <= set(stages)
    assert stages["unet"]["batch"] == 4 and stages["vae-decoder"]["batch"] == T.CONFIGS["cpu"]["vae"]["batch"]
    with pytest.raises(ValueError, match="unknown stage"):
        T.run("everything", "cpu", work)


def test_an_interrupted_or_partial_retraining_is_refused_until_finished(toy_dir, tmp_path, monkeypatch):
    """A killed ``--stage all`` left a new text encoder beside the old VAE and UNet, which loaded silently; now
    TRAINING.json lists the unfinished stages and every loader refuses the folder, naming the commands that finish it."""
    import shutil

    from lib import loading
    from lib.loading import ModelLoadError, load_pipeline

    work = tmp_path / "toy"
    shutil.copytree(toy_dir, work)

    def killed(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(T, "train_vae", killed)
        with pytest.raises(KeyboardInterrupt):
            T.run("all", "cpu", work, steps_override=2)  # the clip stage finished, the VAE stage was killed
    todo = json.loads((work / "TRAINING.json").read_text())["unfinished"]
    assert set(todo) == {"vae", "unet"} and todo["vae"].startswith("started ")
    finish = (f"run `python -m lib.toy.train --stage vae --config cpu --out {work}`, then "
              f"`python -m lib.toy.train --stage unet --config cpu --out {work}`")
    with pytest.raises(RuntimeError, match=r"unfinished \(vae: started .*; unet: started .*\): " + re.escape(finish)):
        T.load_toy_pipeline(work)
    monkeypatch.setitem(loading.PRESETS, "toy", str(work))  # the notebooks' path
    with pytest.raises(ModelLoadError, match=re.escape(finish)):
        load_pipeline("toy")
    with pytest.raises(ModelLoadError, match=re.escape(finish)):  # the folder by its path, as notebooks 01-05 take it
        load_pipeline(str(work))
    T.load_toy_clip(work)  # its stage finished: CLIP-Score still loads
    with pytest.raises(RuntimeError, match="unfinished"):  # a UNet is not trained on a VAE an interrupted stage tore
        T.run("unet", "cpu", work, steps_override=2)
    T.run("vae", "cpu", work, steps_override=2)
    with pytest.raises(RuntimeError, match=r"unfinished \(unet: started [^;]*\): run `[^`]*--stage unet --config cpu --out"):
        T.load_toy_pipeline(work)
    T.run("unet", "cpu", work, steps_override=2)
    assert "unfinished" not in json.loads((work / "TRAINING.json").read_text())
    T.load_toy_pipeline(work)
    T.run("clip", "cpu", work, steps_override=2)  # a new text encoder alone: the UNet was conditioned on the old one
    with pytest.raises(RuntimeError, match="unet: trained on the text encoder that stage clip replaced"):
        T.load_toy_pipeline(work)
    T.run("unet-resume", "cpu", work, steps_override=2)  # continued on today's text encoder: no longer stale
    T.load_toy_pipeline(work)
    assert not any(k.startswith("unfinished") for k in json.loads((T.TOY_DIR / "TRAINING.json").read_text()))


def test_bad_training_sizes_and_missing_inputs_fail_before_any_rendering(tmp_path, monkeypatch):
    from lib.toy import classifiers as C
    from lib.toy import lm as LM

    monkeypatch.setattr(T, "make_training_data", lambda cfg: pytest.fail("rendered before checking its input"))
    for kw, match in ((dict(steps_override=0), "steps_override must be >= 1, got 0"),  # 0 was "not given"
                      (dict(steps_override=-1), "steps_override must be >= 1"), (dict(n_train=0), "n_train"),
                      (dict(budget_min=0.0), "budget_min")):
        with pytest.raises(ValueError, match=match):
            T.run("vae", "cpu", tmp_path / "never", **kw)
    for stage, first in (("unet", "text_encoder/config.json"), ("vae-decoder", "vae/config.json"),
                         ("clip-vision", "text_encoder/config.json")):
        with pytest.raises(FileNotFoundError, match=f"toy model file missing: .*{first}"):
            T.run(stage, "cpu", tmp_path / "never", steps_override=1)
    assert not (tmp_path / "never").exists()
    for steps in (-3, 0, {"edges": 0}):  # untrained weights were saved (or a ZeroDivisionError)
        with pytest.raises(ValueError, match="steps must be >= 1"):
            C.train_classifiers(tmp_path / "never", steps=steps)
    with pytest.raises(ValueError, match="steps and batch_size must be >= 1"):
        LM.train_lm(tmp_path / "never", steps=0)
    assert not (tmp_path / "never").exists()


def test_corrupt_inputs_fail_before_rendering_and_hints_name_the_folder(toy_dir, tmp_path, monkeypatch):
    """A garbage VAE file failed after the renders, in diffusers' words, and left the UNet marked unfinished."""
    import shutil

    work = tmp_path / "toy"
    shutil.copytree(toy_dir, work)
    (work / "vae/diffusion_pytorch_model.safetensors").write_bytes(b"garbage" * 100)
    log_before = (work / "TRAINING.json").read_bytes()
    monkeypatch.setattr(T, "make_training_data", lambda cfg: pytest.fail("rendered before checking its input"))
    with pytest.raises(RuntimeError, match=r"vae/diffusion_pytorch_model.safetensors is unreadable or corrupt .* "
                                           r"--stage all --config gpu --out "):
        T.run("unet", "cpu", work, steps_override=1)
    assert (work / "TRAINING.json").read_bytes() == log_before  # nothing marked unfinished
    hint = T.rebuild_hint(tmp_path / "else where" / "clip_vision" / "model.safetensors")
    assert "--stage clip-vision" in hint and f"--out '{tmp_path / 'else where'}'" in hint, hint  # quoted
    assert "delete it first" in hint
    assert f"--out {tmp_path / 'w'}`" in T.rebuild_hint(tmp_path / "w" / "TRAINING.json")


def test_the_vision_stage_starts_a_new_tower_without_clip_vision(toy_dir, tmp_path):
    """The rebuild hint of a missing clip_vision/ was the clip-vision stage, which needed clip_vision/ to start."""
    import shutil

    work = tmp_path / "toy"
    shutil.copytree(toy_dir, work)
    shutil.rmtree(work / "clip_vision")
    te_bytes = (work / "text_encoder/model.safetensors").read_bytes()
    T.run("clip-vision", "cpu", work, steps_override=2)
    assert (work / "text_encoder/model.safetensors").read_bytes() == te_bytes
    clip = T.load_toy_clip(work)
    from transformers import CLIPTextModel

    te = CLIPTextModel.from_pretrained(work / "text_encoder")
    assert all(torch.equal(v, clip.text_model.state_dict()[k]) for k, v in te.state_dict().items())


def test_a_corrupt_training_log_is_set_aside_by_a_full_rebuild_only(toy_dir, tmp_path):
    """Its hint is --stage all, which read the corrupt log first and failed the same way; a single stage still refuses
    (the log's unfinished marks are lost, so it could not tell a torn stage it starts from)."""
    import shutil

    work = tmp_path / "toy"
    shutil.copytree(toy_dir, work)
    (work / "TRAINING.json").write_text("{torn")
    for stage in ("unet-resume", "vae"):
        with pytest.raises(RuntimeError, match=r"TRAINING.json is unreadable or corrupt .*--stage all"):
            T.run(stage, "cpu", work, steps_override=1, n_train=8)
    with pytest.warns(UserWarning, match=r"set aside as TRAINING.json.corrupt-\d{8}-\d{6}, a new log starts"):
        T.run("all", "cpu", work, steps_override=1, n_train=8)
    (kept,) = work.glob("TRAINING.json.corrupt-*")
    assert kept.read_text() == "{torn"
    log = json.loads((work / "TRAINING.json").read_text())
    assert {"clip", "vae", "unet"} <= set(log["stages"]) and not log.get("unfinished")


def test_only_the_clip_vision_tower_may_see_heldout_combinations(toy_dir, tmp_path, monkeypatch):
    import shutil

    from lib.toy import world as W

    rendered = []  # (split, held-out scenes) of every training set the stages render
    make_dataset = W.make_dataset

    def spy(n, seed, split="train"):
        images, scenes, caps = make_dataset(n, seed=seed, split=split)
        rendered.append((split, sum(W.is_heldout(sc) for sc in scenes)))
        return images, scenes, caps

    monkeypatch.setattr(W, "make_dataset", spy)

    for stage in ("clip", "vae", "unet", "all", "vae-decoder", "unet-resume"):  # refused before any rendering
        with pytest.raises(ValueError, match="clip-vision only"):
            T.run(stage, "cpu", tmp_path / "never", steps_override=1, train_split="any")
    assert not (tmp_path / "never").exists()
    with pytest.raises(ValueError, match="train_split"):
        T.run("clip-vision", "cpu", tmp_path / "never", train_split="heldout")
    work = tmp_path / "toy"
    shutil.copytree(toy_dir, work)
    te_bytes = (work / "text_encoder/model.safetensors").read_bytes()
    assert not rendered
    T.run("clip-vision", "cpu", work, steps_override=2, n_train=64)
    T.train_instrument_vision("cpu", work, smoke_steps=2)  # the recipe notebook 00 and the GPU call use
    assert rendered[0] == ("train", 0) and rendered[1][0] == "any" and rendered[1][1] > 0, rendered
    assert (work / "text_encoder/model.safetensors").read_bytes() == te_bytes
    stages = json.loads((work / "TRAINING.json").read_text())["stages"]
    assert (stages["clip-vision"]["train_split"], stages["clip-vision-2"]["train_split"]) == ("train", "any")
    assert stages["clip-vision-2"]["steps"] == 2 and stages["clip-vision-2"]["n_train"] == 64
    # hard negatives may name a held-out combination only when asked to
    rng = np.random.default_rng(0)
    scenes = [W.sample_scene(rng, "any") for _ in range(300)]
    caps = [W.captions(s)[0] for s in scenes]
    negs = [[T.hard_negative(s, c, np.random.default_rng(i), allow_heldout=a) for i, (s, c) in enumerate(zip(scenes, caps))]
            for a in (False, True)]
    assert sum(n is not None for n in negs[0]) >= 250  # nearly every scene has one (the checks below see them)
    assert not any(W.is_heldout(W.parse_caption(n)) for n in negs[0] if n)
    assert any(W.is_heldout(W.parse_caption(n)) for n in negs[1] if n)
    # a hard negative keeps the caption's phrasing (its place among the scene's captions); only one word changes
    found = 0
    for i, s in enumerate(scenes[:100]):
        opts = W.captions(s)
        neg = T.hard_negative(s, opts[-1 - i % len(opts)], np.random.default_rng(i))
        if neg is not None:
            found += 1
            assert W.captions(W.parse_caption(neg)).index(neg) == len(opts) - 1 - i % len(opts), (s, neg)
            before, after = s.as_dict(), W.parse_caption(neg).as_dict()
            changed = {a for a in before if before[a] != after[a]} - ({"object"} if s.character else set())
            assert len(changed) == 1, (s, neg, changed)
    assert found >= 80


def test_a_rerun_with_the_same_steps_repeats_the_weights_byte_for_byte(tmp_path):
    """The README's promise: ``--steps-override N`` (the counts TRAINING.json records) repeats a run step for step."""
    for d in ("a", "b"):
        T.run("all", "cpu", tmp_path / d, steps_override=2, n_train=64)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.safetensors"))
    assert len(files) == 4  # text encoder, CLIP vision tower, VAE, UNet
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    # each stage seeds itself: a stage run alone, after anything else drew random numbers, repeats too
    unet = "unet/diffusion_pytorch_model.safetensors"
    with torch.random.fork_rng():
        torch.manual_seed(12345)
        torch.rand(7)
        T.run("unet", "cpu", tmp_path / "b", steps_override=2, n_train=64)
    assert (tmp_path / "a" / unet).read_bytes() == (tmp_path / "b" / unet).read_bytes()


def test_committed_toy_world_fits_30_mb_and_logs_its_training():
    from lib.paths import TOY_DIR

    total = sum(p.stat().st_size for p in TOY_DIR.rglob("*") if p.is_file())
    assert total <= 30_000_000, f"data/toy holds {total / 1e6:.1f} MB (> 30 MB)"
    rec = json.loads((TOY_DIR / "TRAINING.json").read_text())
    for stage in ("clip", "vae", "unet"):
        s = rec["stages"][stage]
        assert s["steps"] > 0 and s["wall_s"] > 0 and s["loss_curve"], stage
    assert rec["hardware"]["device"] == rec["config"]["device"]
    for name, s in rec["stages"].items():  # every stage says on which machine and with which recipe it ran
        assert s["hardware"]["device"] == T.CONFIGS[s["config_name"]]["device"] and s["n_train"] > 0, name
        # the T2I model (text encoder, VAE, UNet) never saw a held-out combination; only the CLIP vision tower may have
        assert s["train_split"] == "train" or name.startswith("clip-vision"), name


def test_plan_sizes_the_run_from_steps_20_to_200(monkeypatch):
    """Slow warm-up steps (a cold GPU) must not shrink the run: the recheck at step 200 uses steps 20..200 only."""
    clock = {"t": 0.0}
    monkeypatch.setattr(T.time, "time", lambda: clock["t"])
    plan, log = T._Plan(100_000, budget_min=1.0, override=False), T._Log("x", 100_000, 10_000)
    for step in range(201):
        clock["t"] += 1.0 if step <= 20 else 0.01  # 20 slow steps (1 it/s), then 100 it/s
        plan.tick(step, log)
    assert plan.measured_its == pytest.approx(100.0)
    elapsed = clock["t"] - 1.0  # step 0 is excluded
    assert plan.total == int(200 + (60.0 - elapsed) * 100.0) and log.steps == plan.total
    assert log.schedule == [[0, 100_000], [20, log.schedule[1][1]], [200, plan.total]]  # the LR schedule's sizes
    # a budget spent by step 200: 201 steps were taken, and the log says so (it recorded the 40-step floor)
    clock["t"] = 0.0
    plan, log = T._Plan(100_000, budget_min=1.0, override=False), T._Log("x", 100_000, 10_000)
    for step in range(201):
        clock["t"] += 1.0
        plan.tick(step, log)
    assert plan.total == 201 and log.steps == 201
    # --steps-override fixes the step count: the same slow run keeps all its steps
    clock["t"] = 0.0
    plan, log = T._Plan(1_000, budget_min=1.0, override=True), T._Log("x", 1_000, 100)
    for step in range(201):
        clock["t"] += 1.0
        plan.tick(step, log)
    assert plan.total == 1_000 and plan.budget_s is None


def test_adaptive_weight_balances_the_gradient_norms():
    last = torch.randn(4, 3, requires_grad=True)
    rec = (last ** 2).sum()
    assert float(T._adaptive_weight(rec, 2 * rec, last)) == pytest.approx(0.5, rel=1e-4)
    assert float(T._adaptive_weight(rec, -rec / 4, last)) == pytest.approx(4.0, rel=1e-4)


def test_adversarial_decoder_stage_trains_the_decoder_against_a_patch_discriminator(toy_dir, tmp_path, monkeypatch):
    import shutil

    from diffusers import AutoencoderKL

    work = tmp_path / "toy"
    shutil.copytree(toy_dir, work)
    before = AutoencoderKL.from_pretrained(work / "vae").state_dict()
    monkeypatch.setitem(T.CONFIGS["cpu"]["vae"], "adv", 0.5)
    monkeypatch.setitem(T.CONFIGS["cpu"]["vae"], "disc_start", 1)  # step 0: discriminator only; step 1: both
    T.run("vae-decoder", "cpu", work, steps_override=2)
    after = AutoencoderKL.from_pretrained(work / "vae").state_dict()
    enc = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    dec = [k for k in before if k.startswith("decoder.")]
    assert enc and all(torch.equal(before[k], after[k]) for k in enc)
    assert any(not torch.equal(before[k], after[k]) for k in dec)
    rec = json.loads((work / "TRAINING.json").read_text())["stages"]["vae-decoder"]
    assert rec["adv"] == 0.5 and rec["disc_start"] == 1
    assert np.isfinite(rec["final_d_loss"]) and rec["final_adv_weight"] > 0
    assert T.PatchDiscriminator()(torch.zeros(2, 3, 64, 64)).shape == (2, 1, 14, 14)


def test_notebook_00_retrains_the_toy_world_in_a_smoke_run(tmp_path, monkeypatch):
    """``TRAIN=True`` with ``TRAIN_STEPS=2``: every stage of the committed recipe (T2I model, CLIP vision tower, VAE
    decoder, classifiers, LM) for 2 steps, then the notebook evaluates what it trained."""
    import papermill as pm

    from lib.paths import REPO_ROOT

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "out"
    pm.execute_notebook(str(REPO_ROOT / "notebooks/00_toy_world.ipynb"), str(tmp_path / "00.ipynb"),
                        parameters={"TRAIN": True, "TRAIN_STEPS": 2, "SEEDS": [0], "STEPS": 2, "RENDER_SEEDS": [0],
                                    "GRID_N": 1, "OUTPUT_DIR": str(out)},
                        cwd=str(REPO_ROOT / "notebooks"), progress_bar=False, kernel_name="python3",
                        execution_timeout=600)  # per cell: a hang fails the test instead of CI
    stages = json.loads((out / "toy/TRAINING.json").read_text())["stages"]
    assert {"clip", "vae", "unet", "clip-vision", "vae-decoder"} <= set(stages), sorted(stages)
    assert stages["vae-decoder"]["adv"] > 0 and stages["clip-vision"]["train_split"] == "any"
    assert (out / "toy/classifiers/config.json").is_file() and (out / "toy/lm/config.json").is_file()
    assert len(pd.read_csv(out / "character_style_grid.csv")) == 3 * len(W.CHARACTERS) * (1 + len(W.STYLES))


def test_the_committed_decoder_continuation_is_the_recipe():
    from lib.paths import TOY_DIR

    rec = json.loads((TOY_DIR / "TRAINING.json").read_text())["stages"]["vae-decoder"]
    recipe, vae = T.DECODER_RECIPE[rec["config_name"]], T.CONFIGS[rec["config_name"]]["vae"]
    n_train = recipe["n_train"] or T.CONFIGS[rec["config_name"]]["n_train"]  # None: the config's training set
    assert (rec["n_train"], rec["budget_min"], rec["train_split"]) == (n_train, recipe["budget_min"], "train")
    assert (rec["adv"], rec["disc_start"], rec["batch"], rec["encoder_frozen"]) == (vae["adv"], vae["disc_start"],
                                                                                   vae["batch"], True)


def test_a_wider_latent_trains_end_to_end_and_keeps_the_sd_v1_layer_names(tmp_path):
    """``vae.latent_channels`` (default 4, SD's) sizes the UNet's input and output too; the traced names are unchanged."""
    from lib.sampling import generate
    from lib.tracing.layers import unet_layers

    with pytest.raises(ValueError, match="sizes a new VAE"):
        T.run("unet", "cpu", tmp_path, steps_override=2, latent_channels=8)
    T.main(["--stage", "all", "--steps-override", "2", "--out", str(tmp_path), "--latent-channels", "8",
            "--samples-dir", str(tmp_path / "samples")])  # the sample grids draw latents of the UNet's width too
    assert (tmp_path / "samples" / "unet_final.png").is_file()
    pipe = T.load_toy_pipeline(tmp_path)
    assert pipe.vae.config.latent_channels == 8 and pipe.unet.config.in_channels == 8 == pipe.unet.config.out_channels
    assert unet_layers(pipe.unet) == unet_layers(T.new_unet())
    img = generate(pipe, ["a photo of a red circle"], [0], steps=2, guidance=4.0)
    assert img.shape == (1, 3, 64, 64) and torch.isfinite(img).all()


def test_training_table_gives_each_stage_its_own_hardware(tmp_path):
    import json

    from lib.toy.train import training_table

    committed = training_table()
    assert committed.loc["unet", "config"] == "gpu" and "H100" in committed.loc["unet", "hardware"]
    assert committed.loc["vae-decoder", "config"] == "cpu" and "(cpu," in committed.loc["vae-decoder", "hardware"]
    (tmp_path / "TRAINING.json").write_text(json.dumps({  # an old log: hardware only at the top level
        "config_name": "cpu", "hardware": {"cpu": "Some CPU", "device": "cpu", "torch_threads": 2},
        "stages": {"vae": {"steps": 10, "wall_s": 60, "final_loss": 0.1}}}))
    assert training_table(tmp_path).loc["vae", "hardware"] == "Some CPU (cpu, 2 threads)"
    with pytest.raises(FileNotFoundError, match="TRAINING.json"):
        training_table(tmp_path / "missing")


def test_unfinished_marks_follow_the_stages():
    todo: dict = {}
    T.mark_started(todo, ("vae",), "t0")
    assert todo == {"vae": "started t0, not finished", "unet": "trained on the VAE that stage vae replaced on t0"}
    todo["vae-decoder"] = "started t-1, not finished"  # an earlier interrupted continuation
    T.mark_done(todo, "vae")  # a fresh VAE replaces the decoder that continuation was writing
    assert set(todo) == {"unet"}
    T.mark_started(todo, ("clip-vision",), "t1")
    T.mark_done(todo, "clip-vision")
    assert set(todo) == {"unet"}
    T.mark_started(todo, ("clip",), "t2")  # the UNet's earlier staleness keeps its first reason
    assert todo["unet"].endswith("stage vae replaced on t0") and T._redo(todo) == ["clip", "unet"]
    T.mark_done(todo, "clip")
    todo["unet-resume"] = "started t3, not finished"
    assert T._redo(todo) == ["unet"]  # a fresh UNet covers the continuation
    T.mark_done(todo, "unet-resume")
    assert todo == {}


def test_an_interrupted_continuation_stage_is_refused_by_the_loader_of_what_it_writes(tmp_path):
    """A killed vae-decoder run tore the decoder the pipeline loads; a killed clip-vision run the tower CLIP-Score uses."""
    for stage, refused, loaded in (("vae-decoder", T.PIPELINE_STAGES, T.CLIP_STAGES),
                                   ("clip-vision", T.CLIP_STAGES, T.PIPELINE_STAGES)):
        (tmp_path / "TRAINING.json").write_text(json.dumps({T.UNFINISHED: {stage: "started t0, not finished"}}))
        with pytest.raises(RuntimeError, match=f"unfinished \\({stage}: started t0.*--stage {stage} "):
            T.check_finished(tmp_path, refused)
        T.check_finished(tmp_path, loaded)  # the other part of the world is not touched by that stage


def test_training_data_is_drawn_from_the_configured_split_with_or_without_workers(monkeypatch):
    """The GPU configs render on worker processes: the held-out combinations must stay out there too."""
    from lib.toy import world as W

    seen = []
    monkeypatch.setattr(W, "make_dataset", lambda n, seed, split: seen.append(("serial", split)) or ([], [], []))
    monkeypatch.setattr(W, "make_dataset_parallel", lambda n, seed, split, workers: seen.append(("parallel", split))
                        or ([], [], []))
    for workers in (0, 4):
        T.make_training_data({"n_train": 8, "seed": 0, "render_workers": workers})
        T.make_training_data({"n_train": 8, "seed": 0, "render_workers": workers, "train_split": "any"})
    assert seen == [("serial", "train"), ("serial", "any"), ("parallel", "train"), ("parallel", "any")]


def test_the_text_encoder_s_hard_negatives_never_name_a_held_out_combination(monkeypatch, tmp_path):
    """Stage clip trains the diffusion model's text encoder: its hard negatives stay in the training split; only the
    clip-vision stage with train_split "any" (a measuring instrument) may name held-out combinations."""
    import copy

    from lib.toy import world as W

    class Stop(Exception):
        pass

    allowed = []
    monkeypatch.setattr(T, "hard_negative", lambda s, c, rng, allow_heldout=False: allowed.append(allow_heldout))
    monkeypatch.setattr(T, "_tokenize", lambda *a: (_ for _ in ()).throw(Stop()))  # stop before any training step
    images, scenes, caps = W.make_dataset(4, 0, "train")
    for split, expected in ((None, False), ("train", False), ("any", True)):
        cfg = {**copy.deepcopy(T.CONFIGS["cpu"]), "device": "cpu"}
        if split is not None:
            cfg["train_split"] = split
        allowed.clear()
        with torch.random.fork_rng(), pytest.raises(Stop):  # train_clip seeds torch
            T.train_clip(cfg, {"images": images, "scenes": scenes, "captions": caps}, tmp_path, steps=1)
        assert allowed == [expected] * 4, split


def test_the_unet_trains_on_scaled_latents_and_drops_captions_to_the_empty_one(toy_dir):
    from lib.tokenizer import build_clip_tokenizer
    from lib.toy import world as W

    vae, te, tok = T._load_vae(toy_dir, "cpu"), T._load_text_encoder(toy_dir, "cpu"), build_clip_tokenizer()
    images, _, caps = W.make_dataset(2, 0, "train")
    data = {"images": np.concatenate([images, images[:1]]), "captions": [caps[0], caps[1], caps[0]]}
    lat, cap_idx, emb, drop_id = T.unet_training_inputs(vae, te, tok, data, "cpu")
    with torch.no_grad():
        mean = vae.encode(T.to_pixels(data["images"])).latent_dist.mean
    torch.testing.assert_close(lat, mean * vae.config.scaling_factor)  # the scale the pipeline samples in
    assert drop_id == 2 and emb.shape[0] == 3 and cap_idx.tolist() == [sorted(caps).index(c) for c in data["captions"]]
    torch.testing.assert_close(emb[drop_id], T._encode_texts(te, tok, [""], "cpu")[0])  # dropout: the empty caption


def test_toy_folder_arguments_mean_what_load_pipeline_takes(tmp_path, monkeypatch):
    """"toy" is the committed world and a relative folder is taken from the repo root in every toy loader, as in
    ``load_pipeline`` (check_toy_folder("toy") used to send the user to retrain a folder named "toy")."""
    from lib.paths import TOY_DIR
    from lib.scoring import toy_clip_scorer

    monkeypatch.chdir(tmp_path)
    assert T.check_toy_folder("toy") == TOY_DIR
    assert T.check_toy_folder("data/toy") == TOY_DIR
    assert toy_clip_scorer("data/toy").module.config.projection_dim == T.load_toy_clip("toy").config.projection_dim
    (tmp_path / "mine").mkdir()  # a folder that exists from the working directory is that one, as load_pipeline finds it
    with pytest.raises(FileNotFoundError, match=f"toy model file missing: {tmp_path / 'mine'}/model_index.json"):
        T.check_toy_folder("mine")
    with pytest.raises(FileNotFoundError, match=r"toy model file missing: not_here/model_index\.json\. .*--out not_here"):
        T.check_toy_folder("not_here")  # from the repo root, and named as a command run there would name it
