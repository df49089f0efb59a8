"""Train the toy Stable Diffusion on the toy world: (1) CLIP, (2) VAE, (3) UNet, following SD's recipe.

    python -m lib.toy.train --stage {clip,vae,unet,all,clip-vision,vae-decoder,unet-resume} --config {cpu,gpu} --out data/toy [--steps-override N]

Writes a diffusers folder that ``StableDiffusionPipeline.from_pretrained(out)`` loads offline
(``unet/ vae/ text_encoder/ tokenizer/ scheduler/ model_index.json``, fp16 safetensors), the toy CLIP's vision tower and
projections in ``clip_vision/`` (see :func:`load_toy_clip`), and ``TRAINING.json`` (steps, losses, wall time, hardware;
``unfinished``: the stages an interrupted run left, or whose UNet a new text encoder or VAE made stale, which the
loaders refuse: :func:`check_finished`).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from lib.atomic import save_pretrained_atomic, write_atomic, write_text_atomic
from lib.loading import dtype_kwarg
from lib.paths import TOY_DIR, from_repo_root, resolve_toy_folder
from lib.scoring import pooled_features
from lib.speed import cpu_threads
from lib.tokenizer import MAX_LENGTH, build_clip_tokenizer
from lib.toy import world as W

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

REBUILD = "python -m lib.toy.train --stage all --config gpu"
CLIP_MAX_TOKENS = 24  # contrastive training pads captions (<= 20 tokens) to 24; the UNet sees all 77

CONFIGS: dict[str, dict] = {
    # 2 CPU threads, <= ~65 min for all stages.  A shared 2-core CPU runs ~10 GFLOPS, so each stage has a wall-clock
    # budget: after 20 timed steps the step count is set to min(steps, budget × measured it/s) and the cosine LR
    # schedule is sized to it (the chosen counts are logged in TRAINING.json).
    "cpu": {
        "device": "cpu",
        "threads": 2,
        "amp": False,
        "n_train": 20_000,
        "seed": 0,
        "clip": {"steps": 3000, "budget_min": 14, "batch": 64, "lr": 5e-4, "warmup": 50},
        "vae": {"steps": 3000, "budget_min": 9, "batch": 16, "lr": 1e-3, "warmup": 50, "kl": 1e-6,
                "widths": (16, 32, 64, 64), "adv": 0.5, "disc_start": 100},  # adv, disc_start: vae-decoder stage only
        "unet": {"steps": 20000, "budget_min": 40, "batch": 32, "lr": 1e-3, "warmup": 100, "ema": 0.995,
                 "widths": (32, 64, 64, 64), "sample_every_min": 10},
    },
    # one CUDA GPU (an H100 lent for 30 min a session), bf16 autocast, big batches; wall-clock budgets as on the CPU so
    # `--stage clip` + `--stage vae` fit one 10-min device call and `--stage unet` another (TRAINING.json logs the steps)
    "gpu": {
        "device": "cuda",
        "threads": None,
        "amp": True,
        "n_train": 100_000,
        "render_workers": 16,
        "seed": 0,
        "clip": {"steps": 8000, "budget_min": 2.5, "batch": 512, "lr": 5e-4, "warmup": 200},
        "vae": {"steps": 12000, "budget_min": 3.5, "batch": 256, "lr": 1e-3, "warmup": 200, "kl": 1e-6,
                "widths": (32, 64, 64, 64), "adv": 0.5, "disc_start": 100},
        "unet": {"steps": 60000, "budget_min": 7.5, "batch": 512, "lr": 1e-3, "warmup": 500, "ema": 0.999,
                 "widths": (32, 64, 96, 96), "sample_every_min": 2},
    },
}


# ----------------------------------------------------------------------------------------------------------- models
def text_config():
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH, hidden_act="quick_gelu", projection_dim=64,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )


def vision_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        image_size=64, patch_size=8, hidden_size=96, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, hidden_act="quick_gelu", projection_dim=64, num_channels=3,
    )


def new_clip():
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(text_config=text_config().to_dict(), vision_config=vision_config().to_dict(), projection_dim=64)
    return CLIPModel(cfg)


def new_vae(widths=(32, 64, 64, 64), latent_channels: int = 4):
    """SD's f = 8 ``AutoencoderKL`` at toy width; ``latent_channels`` (config key ``vae.latent_channels``, default 4 as
    in SD v1) sizes the latent, and :func:`train_unet` sizes the UNet's input and output to match."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=tuple(widths), layers_per_block=1, latent_channels=latent_channels, norm_num_groups=8,
        sample_size=64, scaling_factor=1.0,
    )


def new_unet(widths=(32, 64, 64, 64), latent_channels: int = 4):
    """SD v1's UNet topology (the 70 traced layer names) at toy width, on 8 × 8 latents of ``latent_channels``."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=latent_channels, out_channels=latent_channels,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=tuple(widths), layers_per_block=2, cross_attention_dim=64,
        attention_head_dim=4, norm_num_groups=16,
    )


def train_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type="epsilon", clip_sample=False, steps_offset=1)


def sample_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def to_pixels(images_uint8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """N×64×64×3 uint8 → N×3×64×64 float in [-1, 1] (the VAE's and the toy CLIP's input convention)."""
    x = torch.as_tensor(np.asarray(images_uint8)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


clip_preprocess = to_pixels


def image_features(clip, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected (unnormalised) image embeddings of the toy CLIP."""
    return pooled_features(clip.get_image_features(pixel_values=pixel_values))


def text_features(clip, input_ids: torch.Tensor) -> torch.Tensor:
    """Projected (unnormalised) text embeddings of the toy CLIP."""
    return pooled_features(clip.get_text_features(input_ids=input_ids))


# ---------------------------------------------------------------------------------------------------- file checks
def training_table(folder: str | Path = TOY_DIR):
    """One row per stage of ``folder/TRAINING.json``: steps, wall time, final loss, when, config and hardware.

    Each stage keeps the config and hardware it ran with (a folder's stages may come from different machines); the
    top-level entries are those of the latest run only."""
    import pandas as pd

    record = _read_json(_require(Path(folder) / "TRAINING.json"))

    def hardware(r: dict) -> str:
        hw = r.get("hardware") or record.get("hardware", {})
        return f"{hw.get('gpu') or hw.get('cpu', '?')} ({hw.get('device')}, {hw.get('torch_threads')} threads)"

    return pd.DataFrame([{"stage": st, "steps": r["steps"], "wall (min)": round(r["wall_s"] / 60, 1),
                          "final loss": r["final_loss"], "finished": r.get("finished"),
                          "config": r.get("config_name", record.get("config_name")), "hardware": hardware(r)}
                         for st, r in record["stages"].items()]).set_index("stage")


_COMPONENTS = ("text_encoder", "vae", "unet", "clip_vision", "tokenizer", "scheduler")


def _toy_root(path: Path) -> Path:
    """The toy-world folder of one of its files (a component's file, or ``TRAINING.json`` / ``model_index.json``), of a
    component folder, or the toy-world folder itself (a path without a suffix)."""
    if path.is_dir() or not path.suffix:
        return path.parent if path.name in _COMPONENTS else path
    return path.parent.parent if path.parent.name in _COMPONENTS else path.parent


def rebuild_hint(path: Path) -> str:
    """How to get a toy-world file back: from git if it is a committed one, else by retraining its stage(s) into its
    own folder (``--out``)."""
    path = Path(path)
    out = f" --out {shlex.quote(from_repo_root(_toy_root(path)))}"
    if "clip_vision" in path.parts:
        train = (f"`python -m lib.toy.train --stage clip-vision --steps-override 7000 --n-train 100000 --train-split any"
                 f"{out}` (a new vision tower on the saved text encoder; a corrupt file of clip_vision/ is continued "
                 "from: delete it first)")
    else:
        train = (f"`{REBUILD}{out}`, then its `clip-vision` and `vae-decoder` continuations (README, \"Training\"), "
                 "from the repo root")
    try:
        committed = path.resolve().relative_to(TOY_DIR.resolve())
    except ValueError:
        return f"Rebuild it with {train}."
    return f"Restore the committed file with `git checkout -- {Path('data/toy') / committed}`, or rebuild it with {train}."


def _require(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"toy model file missing: {from_repo_root(path)}. {rebuild_hint(path)}")
    return path


def _check_readable(path: Path) -> Path:
    """``path`` when a JSON file parses and a safetensors file's header and sizes are sound (no tensor is read); else
    the one-line :func:`_corrupt` error, before a stage renders its training images."""
    if path.suffix == ".json":
        _read_json(path)
    elif path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                f.keys()
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            raise _corrupt(path, err) from err
    return path


def _corrupt(path: Path, err: Exception) -> RuntimeError:
    first = (str(err).strip().splitlines() or [""])[0]
    what = "toy model folder" if path.is_dir() else "toy model file"
    return RuntimeError(f"{what} {from_repo_root(path)} is unreadable or corrupt ({type(err).__name__}: {first}). "
                        f"{rebuild_hint(path)}")


# the stages whose weights each loader reads: an unfinished one of them (UNFINISHED in TRAINING.json) refuses the load
PIPELINE_STAGES = ("clip", "vae", "vae-decoder", "unet", "unet-resume")
CLIP_STAGES = ("clip", "clip-vision")
UNFINISHED = "unfinished"  # TRAINING.json: stage -> why its weights cannot be trusted (interrupted, or stale)


def check_finished(folder: str | Path, stages: tuple[str, ...]) -> None:
    """``RuntimeError`` (one line, with the commands that finish it) when ``folder/TRAINING.json`` lists one of
    ``stages`` as unfinished: a training run was interrupted, or a new text encoder or VAE made the UNet stale."""
    folder = Path(folder)
    log = folder / "TRAINING.json"
    if not stages:
        return
    record = _read_json(log) if log.is_file() else {}
    todo = record.get(UNFINISHED, {}) if isinstance(record, dict) else {}
    hit = [st for st in STAGES if st in todo and st in stages]
    if not hit:
        return
    why = "; ".join(f"{st}: {todo[st]}" for st in hit)
    config = record.get("config_name", "cpu")  # the interrupted run's (a run records it before marking its stages)
    where = from_repo_root(folder)
    redo = ", then ".join(f"`python -m lib.toy.train --stage {st} --config {config} --out {where}`"
                          + (" with its flags in the README" if "-" in st else "") for st in _redo(todo))
    try:
        folder.resolve().relative_to(TOY_DIR.resolve())
        restore = ", or restore the committed toy world with `git checkout -- data/toy`"
    except ValueError:
        restore = ""
    raise RuntimeError(f"toy world {folder} is unfinished ({why}): run {redo} (README, \"Training\"){restore}")


def _redo(todo: dict) -> list[str]:
    """The unfinished stages in training order; a continuation is left out when its fresh stage reruns."""
    return [st for st in STAGES if st in todo and not (st.split("-")[0] != st and st.split("-")[0] in todo)]


def check_toy_folder(folder: str | Path = TOY_DIR) -> Path:
    """``folder`` when it holds every file the toy pipeline loads and no unfinished training stage
    (:func:`check_finished`); else ``FileNotFoundError`` / ``RuntimeError`` naming the file and the rebuild command.
    ``"toy"`` is ``data/toy`` and a relative path is taken from the repo root (:func:`lib.paths.resolve_toy_folder`)."""
    folder = resolve_toy_folder(folder)
    for rel in ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json",
                "text_encoder/model.safetensors", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json",
                "scheduler/scheduler_config.json"):
        _require(folder / rel)
    check_finished(folder, PIPELINE_STAGES)
    return folder


def load_toy_pipeline(folder: str | Path = TOY_DIR, device: str = "cpu",
                      dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """``StableDiffusionPipeline`` of the toy model (offline), with a clear error if files are missing/corrupt."""
    from diffusers import StableDiffusionPipeline

    folder = check_toy_folder(folder)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(folder, **dtype_kwarg(dtype), local_files_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the rebuild command, naming the file when one is
        from lib.loading import damaged_file

        raise _corrupt(damaged_file(folder) or folder, err) from err
    from lib.loading import incomplete_weights, tokenizer_problem

    gap = incomplete_weights(pipe, folder)
    if gap:
        raise _corrupt(gap[0], KeyError(f"lacks {len(gap[1])} of its module's tensors, e.g. {gap[1][0]}"))
    cfg = pipe.text_encoder.config
    problem = tokenizer_problem(pipe.tokenizer, cfg.vocab_size, cfg.max_position_embeddings)
    if problem:
        raise _corrupt(folder / "tokenizer", ValueError(problem))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise _corrupt(path, err) from err


def load_toy_clip(folder: str | Path = TOY_DIR, dtype: torch.dtype = torch.float32):
    """The toy ``CLIPModel``: text tower from ``text_encoder/``, vision tower + projections from ``clip_vision/``.

    Images go in as :func:`clip_preprocess` makes them (64×64, values in [-1, 1]). ``folder`` as in
    :func:`check_toy_folder`.
    """
    folder = resolve_toy_folder(folder)
    check_finished(folder, CLIP_STAGES)
    return _read_toy_clip(folder, dtype)


def _read_toy_clip(folder: Path, dtype: torch.dtype = torch.float32):
    """:func:`load_toy_clip` without the unfinished-stage check (the ``clip-vision`` stage continues its own)."""
    from safetensors.torch import load_file
    from transformers import CLIPConfig, CLIPModel

    tcfg_p = _require(folder / "text_encoder/config.json")
    _require(folder / "text_encoder/model.safetensors")  # named before the vision files, as a load reads them
    vcfg_p, v_p = _require(folder / "clip_vision/config.json"), _require(folder / "clip_vision/model.safetensors")
    tcfg, vcfg = _read_json(tcfg_p), _read_json(vcfg_p)
    if not isinstance(vcfg, dict) or not {"vision_config", "projection_dim"} <= vcfg.keys():
        raise _corrupt(vcfg_p, KeyError("needs the keys 'vision_config' and 'projection_dim'"))
    te = _read_text_tower(folder)
    try:
        model = CLIPModel(CLIPConfig(text_config=tcfg, vision_config=vcfg["vision_config"],
                                     projection_dim=vcfg["projection_dim"]))
    except Exception as err:  # noqa: BLE001 - a config the model cannot be built from
        raise _corrupt(vcfg_p, err) from err
    model.text_model.load_state_dict(te.state_dict())
    try:
        state = load_file(str(v_p))
        missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    except Exception as err:  # noqa: BLE001
        raise _corrupt(v_p, err) from err
    missing = [k for k in missing if not k.startswith("text_model.") and not k.endswith("position_ids")]
    if missing or unexpected:
        raise _corrupt(v_p, RuntimeError(f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}"))
    return model.to(dtype).eval()


def _read_text_tower(folder: Path):
    """The saved ``CLIPTextModel`` of ``folder/text_encoder`` (float32); a corrupt file, or one lacking some of its
    module's tensors (which transformers would fill with random values), is named in one line."""
    from transformers import CLIPTextModel

    t_p = _require(folder / "text_encoder/model.safetensors")
    try:
        te, info = CLIPTextModel.from_pretrained(t_p.parent, dtype=torch.float32, local_files_only=True,
                                                 output_loading_info=True)
    except Exception as err:  # noqa: BLE001
        raise _corrupt(t_p, err) from err
    missing = sorted(info["missing_keys"])
    if missing:
        raise _corrupt(t_p, KeyError(f"lacks {len(missing)} of its module's tensors, e.g. {missing[0]}"))
    return te


def _vision_stage_clip(folder: Path):
    """The CLIP the ``clip-vision`` stage continues: the saved one when ``clip_vision/`` holds both its files, else a
    new vision tower and projections on the saved text encoder (which that stage never changes)."""
    if all((folder / rel).is_file() for rel in _CLIP_VISION):
        return _read_toy_clip(folder)
    model = new_clip()
    model.text_model.load_state_dict(_read_text_tower(folder).state_dict())
    return model


# ----------------------------------------------------------------------------------------------------------- helpers
def _hardware(device: str) -> dict:
    info = {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": device}
    try:
        info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "")
    except OSError:
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


class _Plan:
    """Step count of a stage; with a wall-clock budget it is re-sized from the speed of the first 20 steps."""

    def __init__(self, steps: int, budget_min: float | None, override: bool):
        self.total, self.max_steps = steps, steps
        self.budget_s = None if (override or not budget_min) else 60.0 * budget_min
        self.t_start = self.t20 = None
        self.measured_its = None

    def tick(self, step: int, log: "_Log"):
        if step == 0:
            self.t_start = time.time()  # step 0 (warm-up) is excluded from the timing
        elif step == 20 and self.t_start is not None:
            self.t20 = time.time()
            self.measured_its = 20 / (self.t20 - self.t_start)
            self._resize(log, 20)
        elif step == self.RECHECK and self.t_start is not None and self.budget_s is not None:
            # a GPU warms up (autotuning, allocator) over its first steps: size the run again from steps 20..200
            self.measured_its = (self.RECHECK - 20) / (time.time() - self.t20)
            self._resize(log, self.RECHECK)

    RECHECK = 200

    def _resize(self, log: "_Log", n: int) -> None:
        if self.budget_s is None:
            return
        elapsed = time.time() - self.t_start
        # never below the n + 1 steps already taken (a spent budget at step 200 recorded fewer steps than it trained)
        self.total = int(max(40, n + 1, min(self.max_steps, n + (self.budget_s - elapsed) * self.measured_its)))
        log.steps = self.total
        log.schedule.append([n, self.total])
        print(f"[{log.stage}] measured {self.measured_its:.3f} it/s over {n} steps: "
              f"{self.total} steps fit the {self.budget_s / 60:.1f}-min budget", flush=True)

    def info(self) -> dict:
        return {"planned_max_steps": self.max_steps, "budget_min": None if self.budget_s is None else self.budget_s / 60,
                "measured_its": None if self.measured_its is None else round(self.measured_its, 4)}


def _lr_lambda(warmup: int, plan: "_Plan"):
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        total = plan.total
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup)))) * 0.95 + 0.05

    return f


class _Log:
    def __init__(self, stage: str, steps: int, every: int):
        self.stage, self.steps, self.every = stage, steps, max(1, every)
        self.schedule = [[0, steps]]  # [from step, step count the cosine LR schedule is sized to] (budgeted: 3 sizes)
        self.t0 = time.time()
        self.curve: list[tuple[int, float]] = []
        self.acc: list[float] = []

    def due(self, step: int) -> bool:
        return (step + 1) % self.every == 0 or step + 1 == self.steps

    def __call__(self, step: int, loss: "float | torch.Tensor", extra: str = ""):
        self.acc.append(loss.detach() if isinstance(loss, torch.Tensor) else loss)  # a tensor syncs only when printed
        if self.due(step):
            m = float(np.mean([float(v) for v in self.acc]))
            self.acc = []
            self.curve.append((step + 1, round(m, 5)))
            dt = time.time() - self.t0
            print(f"[{self.stage}] step {step + 1}/{self.steps} loss {m:.4f} {extra} "
                  f"{(step + 1) / dt:.2f} it/s elapsed {dt / 60:.1f} min", flush=True)

    def summary(self, **kw) -> dict:
        return {"steps": self.steps, "lr_schedule_sizes": self.schedule, "wall_s": round(time.time() - self.t0, 1),
                "loss_curve": self.curve,
                "final_loss": self.curve[-1][1] if self.curve else None, **kw}


def _resident(x: torch.Tensor, dev: str) -> torch.Tensor:
    """Training tensors live on the GPU when training there (one copy instead of one per step)."""
    return x.to(dev) if dev.startswith("cuda") else x


def _index(b: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(b, device=like.device)


def _fused(dev: str) -> dict:
    return {"fused": True} if dev.startswith("cuda") else {}


def _optimize(stage: str, cfg: dict, params: list, lr: float, n: int, rng: np.random.Generator, steps: int,
              override: bool, step_loss) -> tuple["_Plan", "_Log"]:
    """The VAE stages' loop: AdamW (no weight decay; fused on CUDA), warm-up + cosine LR sized by the wall-clock plan,
    shuffled batches of ``cfg[stage]["batch"]`` indices into ``n`` items, gradient clipping at 1.
    ``step_loss(indices)`` returns (loss to minimise, value to log)."""
    c = cfg[stage.split("-")[0]]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, **_fused(cfg["device"]))
    plan = _Plan(steps, c.get("budget_min"), override)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(c["warmup"], plan))
    log = _Log(stage, steps, max(1, min(25, steps // 10)))
    it = _batches(n, min(c["batch"], n), rng)
    step = -1
    while step + 1 < plan.total:
        step += 1
        plan.tick(step, log)
        loss, shown = step_loss(next(it))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        log(step, shown, "(mse)")
    return plan, log


def _autocast(cfg):
    if cfg["amp"] and cfg["device"].startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _batches(n: int, batch: int, rng: np.random.Generator):
    while True:
        perm = rng.permutation(n)
        for i in range(0, n - batch + 1, batch):
            yield perm[i : i + batch]


def make_training_data(cfg: dict) -> dict:
    t = time.time()
    split = cfg.get("train_split", "train")
    if cfg.get("render_workers"):
        images, scenes, caps = W.make_dataset_parallel(cfg["n_train"], cfg["seed"], split, cfg["render_workers"])
    else:
        images, scenes, caps = W.make_dataset(cfg["n_train"], seed=cfg["seed"], split=split)
    print(f"[data] rendered {len(images)} {split}-split images in {time.time() - t:.1f} s", flush=True)
    return {"images": images, "scenes": scenes, "captions": caps}


def hard_negative(scene: W.Scene, cap: str, rng: np.random.Generator, allow_heldout: bool = False) -> str | None:
    """The same template with exactly one attribute word changed (a held-out combination only if ``allow_heldout``)."""
    opts = W.captions(scene)
    k = opts.index(cap)
    attrs = [a for a in ("object", "color", "style", "action", "character", "background") if getattr(scene, a)]
    if scene.character:
        attrs.remove("object")
    for _ in range(10):
        a = attrs[int(rng.integers(len(attrs)))]
        cur = getattr(scene, a)
        pool = [v for v in W.VOCAB[a] if v != cur]
        if a == "style":  # keep the template shape: named styles swap among themselves
            pool = [v for v in pool if (v == "painting") == (cur == "painting")]
        if not pool:
            continue
        v = pool[int(rng.integers(len(pool)))]
        kw = scene.as_dict()
        kw[a] = v
        if a == "character":
            kw["object"] = None
        try:
            neg = W.Scene(**kw)
        except ValueError:
            continue
        if W.is_heldout(neg) and not allow_heldout:
            continue
        nopts = W.captions(neg)
        if len(nopts) == len(opts):
            return nopts[k]
    return None


def _tokenize(tok, texts, max_length):
    enc = tok(list(texts), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    return enc.input_ids


# -------------------------------------------------------------------------------------------------------- stage 1
def train_clip(cfg: dict, data: dict, out: Path, steps: int, override: bool = False, freeze_text: bool = False) -> dict:
    """Contrastive CLIP training with one hard negative per image.

    ``freeze_text=True`` (stage ``clip-vision``) continues the saved toy CLIP with its text tower frozen: the text tower
    is the diffusion model's text encoder, so only the vision tower, the projections and the temperature move, and
    ``text_encoder/`` is left untouched. With ``cfg["train_split"] == "any"`` (allowed for ``clip-vision`` only) the
    vision tower also sees renders, and hard negatives, of the held-out combinations, as the classifiers do: it is a
    measuring instrument, while the text encoder, VAE and UNet never see a held-out combination.
    """
    from safetensors.torch import save_file

    c = cfg["clip"]
    dev = cfg["device"]
    torch.manual_seed(cfg["seed"])
    rng = np.random.default_rng(cfg["seed"] + 1)
    tok = build_clip_tokenizer()
    model = (_vision_stage_clip(out) if freeze_text else new_clip()).to(dev).train()
    if freeze_text:
        model.text_model.requires_grad_(False).eval()
    caps = data["captions"]
    any_split = cfg.get("train_split", "train") == "any"
    negs = [hard_negative(s, cp, rng, allow_heldout=any_split) for s, cp in zip(data["scenes"], caps)]
    negs = [n if n is not None else cp for n, cp in zip(negs, caps)]
    ids = _tokenize(tok, caps, CLIP_MAX_TOKENS)
    nids = _tokenize(tok, negs, CLIP_MAX_TOKENS)
    pix = _resident(to_pixels(data["images"]), dev)
    ids, nids = _resident(ids, dev), _resident(nids, dev)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=c["lr"], weight_decay=0.1, betas=(0.9, 0.98), **_fused(dev))
    plan = _Plan(steps, c.get("budget_min"), override)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(c["warmup"], plan))
    log = _Log("clip", steps, max(1, min(25, steps // 10)))
    it = _batches(len(caps), min(c["batch"], len(caps)), rng)
    step = -1
    while step + 1 < plan.total:
        step += 1
        plan.tick(step, log)
        b = next(it)
        x, t, tn = pix[b].to(dev), ids[b].to(dev), nids[b].to(dev)
        with _autocast(cfg):
            img = F.normalize(image_features(model, x), dim=-1)
            txt = F.normalize(text_features(model, torch.cat([t, tn])), dim=-1)
            scale = model.logit_scale.exp().clamp(max=100)
            logits = scale * img.float() @ txt.float().T  # B × 2B: texts + one hard negative per image
            target = torch.arange(len(b), device=dev)
            loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, : len(b)].T, target))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if log.due(step):  # accuracies are read (a device sync) only when printed
            with torch.no_grad():
                acc = (logits.argmax(1) == target).float().mean().item()
                hard = (logits[target, target] > logits[target, target + len(b)]).float().mean().item()
        log(step, loss, f"acc {acc:.3f} hardneg {hard:.3f}" if log.due(step) else "")
    model = model.cpu().eval()
    # text tower → text_encoder/ (a CLIPTextModel) ; vision tower + projections → clip_vision/
    if not freeze_text:
        _save_text_encoder(model, out)
    vis = {k: v.to(torch.float16).contiguous() for k, v in model.state_dict().items() if not k.startswith("text_model.")}
    write_atomic(out / "clip_vision/model.safetensors", lambda tmp: save_file(vis, str(tmp)))
    write_text_atomic(json.dumps(
        {"vision_config": model.config.vision_config.to_dict(), "projection_dim": model.config.projection_dim,
         "pixel_convention": "64x64 RGB, values image/127.5 - 1 (lib.toy.train.clip_preprocess)",
         "text_tower": "../text_encoder (CLIPTextModel); assemble with lib.toy.train.load_toy_clip"}, indent=1),
        out / "clip_vision/config.json")
    return log.summary(**plan.info(), batch=c["batch"], lr=c["lr"], hard_negatives=True, final_acc=acc,
                       final_hardneg_acc=hard, text_frozen=freeze_text)


def _save_text_encoder(model, out: Path) -> None:
    """The CLIP text tower as a standalone ``CLIPTextModel`` in ``text_encoder/`` (+ the offline tokenizer)."""
    from transformers import CLIPTextModel

    te = CLIPTextModel(model.config.text_config)
    te.load_state_dict(model.text_model.state_dict())  # transformers 5: CLIPTextModel has no .text_model wrapper
    save_pretrained_atomic(te.to(torch.float16), out / "text_encoder", safe_serialization=True)
    save_pretrained_atomic(build_clip_tokenizer(), out / "tokenizer")


# -------------------------------------------------------------------------------------------------------- stage 2
def train_vae(cfg: dict, data: dict, out: Path, steps: int, samples_dir: Path | None = None,
              override: bool = False) -> dict:
    c = cfg["vae"]
    dev = cfg["device"]
    torch.manual_seed(cfg["seed"])
    rng = np.random.default_rng(cfg["seed"] + 2)
    vae = new_vae(c["widths"], c.get("latent_channels", 4)).to(dev).train()
    pix = _resident(to_pixels(data["images"]), dev)

    def step_loss(idx: np.ndarray):
        x = pix[_index(idx, pix)].to(dev)
        with _autocast(cfg):
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample()).sample
            mse = F.mse_loss(rec.float(), x)
            return mse + 0.5 * F.l1_loss(rec.float(), x) + c["kl"] * post.kl().mean(), mse

    plan, log = _optimize("vae", cfg, list(vae.parameters()), c["lr"], len(pix), rng, steps, override, step_loss)
    vae.eval()
    with torch.no_grad():  # SD's scaling factor: 1 / std of the latents
        lat = torch.cat([vae.encode(pix[i : i + 256].to(dev)).latent_dist.mean.float().cpu()
                         for i in range(0, min(len(pix), 2048), 256)])
        sf = float(1.0 / lat.std())
        x = pix[:512].to(dev)
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.float().clamp(-1, 1)
        val_mse = F.mse_loss(rec, x).item()
    vae.register_to_config(scaling_factor=sf)
    vae = vae.cpu()
    if samples_dir is not None:
        _save_grid(torch.cat([x[:16].cpu(), rec[:16].cpu()]), samples_dir / "vae_recon.png", cols=16)
    save_pretrained_atomic(vae.to(torch.float16), out / "vae", safe_serialization=True)
    return log.summary(**plan.info(), batch=c["batch"], lr=c["lr"], scaling_factor=sf, latent_std=float(lat.std()),
                       recon_mse_train512=val_mse)


class PatchDiscriminator(torch.nn.Module):
    """A small spectrally normalised PatchGAN (pix2pix / SD's VAE recipe): one real/fake logit per 34-px patch of a
    64-px image (14 × 14 logits). Only the decoder stage uses it, to make the decoder draw texture instead of its blurry mean."""

    def __init__(self, width: int = 32):
        super().__init__()
        sn = torch.nn.utils.parametrizations.spectral_norm
        w = width
        self.net = torch.nn.Sequential(
            sn(torch.nn.Conv2d(3, w, 4, 2, 1)), torch.nn.LeakyReLU(0.2),
            sn(torch.nn.Conv2d(w, 2 * w, 4, 2, 1)), torch.nn.LeakyReLU(0.2),
            sn(torch.nn.Conv2d(2 * w, 4 * w, 4, 1, 1)), torch.nn.LeakyReLU(0.2),
            sn(torch.nn.Conv2d(4 * w, 1, 4, 1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Taming-transformers' balance: the adversarial term gets the reconstruction term's gradient norm at the last
    decoder layer (so neither dominates whatever the losses' scales)."""
    g_rec = torch.autograd.grad(rec_loss, last, retain_graph=True)[0]
    g_adv = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
    return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, 1e4).detach()


def train_vae_decoder(cfg: dict, data: dict, out: Path, steps: int, samples_dir: Path | None = None,
                      override: bool = False) -> dict:
    """Continue the saved VAE's decoder only (stage ``vae-decoder``): encoder and scaling factor stay fixed, so the
    latents the UNet was trained on do not move and a trained UNet stays valid while its images get sharper.

    The decoder learns to reconstruct the image from the posterior *mean* (what the UNet's targets are made of), with
    MSE + L1 and, when ``cfg["vae"]["adv"]`` > 0, SD's hinge PatchGAN term (adaptive weight × ``adv``, from step
    ``disc_start``): an MSE-trained decoder draws the mean of what a latent could be, which erases the styles' textures
    (through the GPU-trained decoder, 85 of the monet renders among 1,000 held-out ones came back "no style" to the
    classifier ensemble; ``python -m lib.toy.evaluate --roundtrip 1000 --out <dir>``).
    """
    c = cfg["vae"]
    dev = cfg["device"]
    torch.manual_seed(cfg["seed"])
    rng = np.random.default_rng(cfg["seed"] + 5)
    vae = _load_vae(out, dev).train()
    vae.encoder.requires_grad_(False).eval()
    vae.quant_conv.requires_grad_(False)
    params = [p for p in vae.parameters() if p.requires_grad]
    pix = _resident(to_pixels(data["images"]), dev)
    adv, start = float(c.get("adv", 0.0)), int(c.get("disc_start", 0))
    disc = PatchDiscriminator().to(dev).train() if adv > 0 else None
    d_opt = torch.optim.AdamW(disc.parameters(), lr=c["lr"] * 0.5, betas=(0.5, 0.9), weight_decay=0.0) if disc else None
    state = {"step": 0, "d_loss": [], "weight": []}

    def step_loss(idx: np.ndarray):
        x = pix[_index(idx, pix)].to(dev)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
        with _autocast(cfg):
            rec = vae.decode(z).sample.float()
            mse = F.mse_loss(rec, x)
            loss = mse + 0.5 * F.l1_loss(rec, x)
            if disc is not None:
                # the discriminator's own step (hinge), on this batch, before the decoder's step in _optimize
                d_loss = F.relu(1 - disc(x)).mean() + F.relu(1 + disc(rec.detach())).mean()
                d_opt.zero_grad(set_to_none=True)
                d_loss.backward()
                d_opt.step()
                state["d_loss"].append(float(d_loss.detach()))
                if state["step"] >= start:
                    g_loss = -disc(rec).mean()
                    w = _adaptive_weight(loss, g_loss, vae.decoder.conv_out.weight) * adv
                    state["weight"].append(float(w))
                    loss = loss + w * g_loss
            state["step"] += 1
            return loss, mse

    plan, log = _optimize("vae-decoder", cfg, params, c["lr"] * 0.5, len(pix), rng, steps, override, step_loss)
    vae.eval()
    with torch.no_grad():
        x = pix[:512].to(dev)
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.float().clamp(-1, 1)
        val_mse = F.mse_loss(rec, x).item()
    vae = vae.cpu()
    if samples_dir is not None:
        _save_grid(torch.cat([x[:16].cpu(), rec[:16].cpu()]), samples_dir / "vae_decoder_recon.png", cols=16)
    save_pretrained_atomic(vae.to(torch.float16), out / "vae", safe_serialization=True)
    extra = {}
    if disc is not None:
        extra = {"adv": adv, "disc_start": start, "final_d_loss": round(float(np.mean(state["d_loss"][-50:])), 4),
                 "final_adv_weight": round(float(np.mean(state["weight"][-50:])), 4) if state["weight"] else None}
    return log.summary(**plan.info(), batch=c["batch"], lr=c["lr"] * 0.5, encoder_frozen=True,
                       scaling_factor=float(vae.config.scaling_factor), recon_mse_train512=val_mse, **extra)


def _save_grid(x: torch.Tensor, path: Path, cols: int = 8):
    from PIL import Image

    x = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    rows = math.ceil(len(x) / cols)
    grid = np.zeros((rows * 66, cols * 66, 3), np.uint8)
    for i, im in enumerate(x):
        r, cc = divmod(i, cols)
        grid[r * 66 : r * 66 + 64, cc * 66 : cc * 66 + 64] = im
    big = Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST)
    write_atomic(path, lambda tmp: big.save(tmp, format="PNG"))  # the temporary name has no image suffix


# -------------------------------------------------------------------------------------------------------- stage 3
SAMPLE_PROMPTS = (
    "a photo of a red star", "a blue circle", "a green dog", "a photo of a yellow cat",
    "a van gogh painting of a red heart", "a pink fish painted by monet", "snoopy on a beach", "nemo",
    "a white robot jumping", "a sleeping orange cat", "a picture of a purple square, in the style of picasso",
    "a pixel art painting of r2d2", "a painting of grumpy cat", "a spinning green triangle in a city",
    "a purple dog", "a blue star",  # the last two are held-out pairs
)


def _load_text_encoder(out: Path, dev: str):
    from transformers import CLIPTextModel

    _require(out / "text_encoder/model.safetensors")
    return CLIPTextModel.from_pretrained(out / "text_encoder", dtype=torch.float32).to(dev).eval()


def _load_vae(out: Path, dev: str):
    from diffusers import AutoencoderKL

    _require(out / "vae/diffusion_pytorch_model.safetensors")
    return AutoencoderKL.from_pretrained(out / "vae", **dtype_kwarg(torch.float32)).to(dev).eval()


@torch.no_grad()
def _encode_texts(te, tok, texts: list[str], dev: str, bs: int = 512) -> torch.Tensor:
    outs = []
    for i in range(0, len(texts), bs):
        ids = _tokenize(tok, texts[i : i + bs], MAX_LENGTH).to(dev)
        outs.append(te(ids)[0].float().cpu())
    return torch.cat(outs)


def build_pipeline(unet, vae, te):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=build_clip_tokenizer(), unet=unet,
                                   scheduler=sample_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample_grid(pipe, path: Path, prompts=SAMPLE_PROMPTS, steps: int = 25, guidance: float = 4.0, seed: int = 0):
    from lib.sampling import initial_latents

    lat = initial_latents(pipe, range(seed, seed + len(prompts)))  # the UNet's latent shape, seed per prompt
    imgs = pipe(list(prompts), num_inference_steps=steps, guidance_scale=guidance, latents=lat,
                output_type="pt").images
    _save_grid(imgs.float().cpu() * 2 - 1, path, cols=8)


def _save_pipeline(unet, vae, te, out: Path):
    pipe = build_pipeline(copy.deepcopy(unet).cpu(), copy.deepcopy(vae).cpu(), copy.deepcopy(te).cpu())
    pipe.to(torch.float16)
    save_pretrained_atomic(pipe, out, safe_serialization=True)  # a kill mid-save tears no finished stage's file


@torch.no_grad()
def unet_training_inputs(vae, te, tok, data: dict, dev: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """What the UNet is trained on, computed once by the frozen encoders: the latents (posterior means × the VAE's
    ``scaling_factor``, the scale the pipeline samples in), each image's caption index, the text states of the unique
    captions with the empty caption as the last row (classifier-free guidance's), and that row's index (the caption
    dropout's)."""
    pix = to_pixels(data["images"])
    lat = torch.cat([vae.encode(pix[i : i + 256].to(dev)).latent_dist.mean.float().cpu()
                     for i in range(0, len(pix), 256)]) * vae.config.scaling_factor
    uniq = sorted(set(data["captions"]))
    index = {s: i for i, s in enumerate(uniq)}
    emb = _encode_texts(te, tok, uniq + [""], dev)
    cap_idx = torch.tensor([index[s] for s in data["captions"]])
    return lat, cap_idx, emb, len(uniq)


def train_unet(cfg: dict, data: dict, out: Path, steps: int, samples_dir: Path | None = None,
               override: bool = False, resume: bool = False) -> dict:
    """Denoising training of the UNet on frozen VAE latents and text states; ``resume=True`` (stage ``unet-resume``)
    continues from the UNet saved in ``out/unet`` (the EMA weights) instead of a fresh one."""
    c = cfg["unet"]
    dev = cfg["device"]
    torch.manual_seed(cfg["seed"])
    rng = np.random.default_rng(cfg["seed"] + 3)
    tok = build_clip_tokenizer()
    te, vae = _load_text_encoder(out, dev), _load_vae(out, dev)
    te.requires_grad_(False)
    vae.requires_grad_(False)
    t0 = time.time()
    lat, cap_idx, emb, drop_id = unet_training_inputs(vae, te, tok, data, dev)
    print(f"[unet] encoded {len(lat)} latents (std {lat.std():.3f}) and {drop_id} unique captions "
          f"in {time.time() - t0:.1f} s", flush=True)
    emb = emb.to(dev)
    lat, cap_idx = _resident(lat, dev), _resident(cap_idx, dev)
    if resume:
        from diffusers import UNet2DConditionModel

        _require(out / "unet/diffusion_pytorch_model.safetensors")
        unet = UNet2DConditionModel.from_pretrained(out / "unet", **dtype_kwarg(torch.float32)).to(dev).train()
        if unet.config.in_channels != vae.config.latent_channels:
            raise ValueError(f"the saved UNet takes {unet.config.in_channels}-channel latents but the VAE in {out} makes "
                             f"{vae.config.latent_channels}: a new VAE needs a new UNet (--stage unet), not unet-resume")
    else:
        unet = new_unet(c["widths"], vae.config.latent_channels).to(dev).train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    noise_sched = train_scheduler()
    acp = noise_sched.alphas_cumprod.to(dev)
    opt = torch.optim.AdamW(unet.parameters(), lr=c["lr"], weight_decay=0.01, **_fused(dev))
    plan = _Plan(steps, c.get("budget_min"), override)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(c["warmup"], plan))
    log = _Log("unet", steps, max(1, min(50, steps // 10)))
    it = _batches(len(lat), min(c["batch"], len(lat)), rng)
    gdev = dev if dev.startswith("cuda") else "cpu"  # noise is drawn where the model runs (CPU numbers unchanged)
    gen = torch.Generator(device=gdev).manual_seed(cfg["seed"] + 4)
    ema_params, params = list(ema.parameters()), list(unet.parameters())
    step = -1
    last_sample = time.time()
    while step + 1 < plan.total:
        step += 1
        plan.tick(step, log)
        b = _index(next(it), lat)
        x0 = lat[b].to(dev)
        ci = cap_idx[b].clone()
        ci[(torch.rand(len(b), generator=gen, device=gdev) < 0.1).to(ci.device)] = drop_id  # 10 % caption dropout
        cond = emb[ci.to(dev)]
        noise = torch.randn(x0.shape, generator=gen, device=gdev).to(dev)
        t = torch.randint(0, 1000, (len(b),), generator=gen, device=gdev).to(dev)
        a = acp[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with _autocast(cfg):
            pred = unet(xt, t, encoder_hidden_states=cond).sample
            loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            d = min(c["ema"], (1 + step) / (10 + step))
            torch._foreach_lerp_(ema_params, params, 1 - d)
        log(step, loss)
        due = (c.get("sample_every") and (step + 1) % c["sample_every"] == 0) or (
            c.get("sample_every_min") and time.time() - last_sample > 60 * c["sample_every_min"])
        if due and step + 1 < plan.total and not override:
            last_sample = time.time()
            ts = time.time()
            if samples_dir is not None:
                sample_grid(build_pipeline(ema, vae, te), samples_dir / f"unet_step{step + 1:06d}.png")
            _save_pipeline(ema, vae, te, out)  # checkpoint: a usable pipeline at every sample point
            print(f"[unet] samples + checkpoint at step {step + 1} ({time.time() - ts:.1f} s)", flush=True)
    if samples_dir is not None:
        sample_grid(build_pipeline(ema, vae, te), samples_dir / "unet_final.png")
    _save_pipeline(ema, vae, te, out)
    n_params = sum(p.numel() for p in unet.parameters())
    return log.summary(**plan.info(), batch=c["batch"], lr=c["lr"], ema=c["ema"], caption_dropout=0.1, params=n_params,
                       unique_captions=drop_id, resumed=resume)


# ----------------------------------------------------------------------------------------------------------- main
STAGES = ("clip", "vae", "unet", "all", "clip-vision", "vae-decoder", "unet-resume")
_TE, _VAE = ("text_encoder/config.json", "text_encoder/model.safetensors"), ("vae/config.json",
                                                                            "vae/diffusion_pytorch_model.safetensors")
# the saved weights each stage starts from (checked before its training images are rendered)
_CLIP_VISION = ("clip_vision/config.json", "clip_vision/model.safetensors")  # continued when present
STAGE_INPUTS: dict[str, tuple[str, ...]] = {
    "clip": (), "vae": (), "all": (), "vae-decoder": _VAE, "unet": _TE + _VAE, "clip-vision": _TE,
    "unet-resume": _TE + _VAE + ("unet/config.json", "unet/diffusion_pytorch_model.safetensors"),
}
TRAIN_SPLITS = ("train", "any")  # "any" (held-out combinations too) only for the clip-vision stage
# the stages whose weights a stage starts from (their files: STAGE_INPUTS)
STAGE_NEEDS: dict[str, tuple[str, ...]] = {"unet": ("clip", "vae", "vae-decoder"), "clip-vision": ("clip",),
                                           "unet-resume": ("clip", "vae", "vae-decoder"), "vae-decoder": ("vae",)}
# a fresh text encoder or VAE leaves the UNet trained on the old one: marked unfinished until a UNet stage runs
STALE_AFTER: dict[str, tuple[str, ...]] = {"clip": ("unet",), "vae": ("unet",)}


def mark_started(todo: dict[str, str], stages: tuple[str, ...], when: str) -> None:
    """Mark ``stages`` unfinished in ``todo`` (``TRAINING.json``'s ``unfinished``) before they write any weight, and
    the UNet stale after a fresh text encoder or VAE (:data:`STALE_AFTER`): an interrupted run leaves its marks."""
    for st in stages:
        todo[st] = f"started {when}, not finished"
        for later in STALE_AFTER.get(st, ()):
            todo.setdefault(later, f"trained on the {'text encoder' if st == 'clip' else 'VAE'} that stage {st} "
                                   f"replaced on {when}")


def mark_done(todo: dict[str, str], stage: str) -> None:
    """Clear ``stage``'s mark; a fresh stage also clears its continuations' (their weights are replaced), and a
    UNet stage the UNet's staleness (trained on today's text encoder and VAE)."""
    base = stage.split("-")[0]
    for st in list(todo):
        if st == stage or stage == base and st.startswith(f"{base}-") or base == "unet" and st.startswith("unet"):
            del todo[st]


@cpu_threads()  # the thread count it sets is the caller's again afterwards
def run(stage: str, config: str, out: str | Path, steps_override: int | None = None,
        samples_dir: str | Path | None = None, n_train: int | None = None,
        budget_min: float | None = None, threads: int | None = None, train_split: str = "train",
        latent_channels: int | None = None, batch: int | None = None) -> dict:
    """Train ``stage`` (``all`` = clip, vae, unet from scratch; ``clip-vision`` / ``vae-decoder`` / ``unet-resume``
    continue saved weights without invalidating the later stages) with ``CONFIGS[config]``; ``budget_min`` overrides the stage's wall-clock budget (either config), ``threads``
    the CPU thread count (use 1 when other jobs share the cores: OpenMP threads stall each other when oversubscribed);
    ``train_split="any"`` lets the ``clip-vision`` stage see held-out combinations (see :func:`train_clip`);
    ``latent_channels`` sizes a new VAE (stages ``vae`` and ``all``; the UNet follows the saved VAE); ``batch`` overrides
    each stage's batch size (on a GPU a small model is launch-bound: a bigger batch costs little time per step)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    if train_split not in TRAIN_SPLITS:
        raise ValueError(f"train_split must be one of {TRAIN_SPLITS}, got {train_split!r}")
    if train_split == "any" and stage != "clip-vision":
        raise ValueError(f"--train-split any is for --stage clip-vision only: the text encoder, VAE and UNet of "
                         f"stage {stage!r} must never see a held-out combination")
    if latent_channels is not None and stage not in ("vae", "all"):
        raise ValueError(f"latent_channels sizes a new VAE (stage vae or all), not stage {stage!r}: the UNet and the "
                         f"decoder continuation follow the VAE saved in the folder")
    for name, value in (("batch", batch), ("steps_override", steps_override), ("n_train", n_train)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if budget_min is not None and not budget_min > 0:
        raise ValueError(f"budget_min must be > 0 minutes, got {budget_min}")
    if latent_channels is not None and latent_channels < 1:
        raise ValueError(f"latent_channels must be >= 1, got {latent_channels}")
    cfg = copy.deepcopy(CONFIGS[config])
    if latent_channels is not None:
        cfg["vae"]["latent_channels"] = latent_channels
    if cfg["device"].startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--config gpu needs a CUDA device; use --config cpu on this machine")
    if threads is not None:
        cfg["threads"] = threads
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    if cfg["device"].startswith("cuda"):
        # fixed shapes: let cuDNN pick the fastest conv kernels (the 2026-11-24 UNet run, without it, reached only
        # 5.8 it/s at batch 512 on an H100 — launch- and kernel-choice-bound for a 5.5 M-parameter UNet on 8×8 latents)
        torch.backends.cudnn.benchmark = True
    cfg["train_split"] = train_split
    if n_train is not None:
        cfg["n_train"] = n_train
    elif steps_override is not None:
        cfg["n_train"] = min(cfg["n_train"], 64)
    out = Path(out)
    for rel in STAGE_INPUTS[stage]:  # before rendering up to 100,000 training images: present and readable
        _check_readable(_require(out / rel))
    if stage == "clip-vision" and all((out / rel).is_file() for rel in _CLIP_VISION):  # continued (else a new tower)
        for rel in _CLIP_VISION:
            _check_readable(_require(out / rel))
    check_finished(out, STAGE_NEEDS.get(stage, ()))  # nor from weights an interrupted stage may have torn
    out.mkdir(parents=True, exist_ok=True)
    samples = Path(samples_dir) if samples_dir else None
    log_path = out / "TRAINING.json"
    try:
        record = _read_json(log_path) if log_path.is_file() else {}
    except RuntimeError:
        if stage != "all":  # its unfinished-stage marks are lost: only a run that retrains every stage can do without
            raise
        kept = log_path.rename(log_path.with_name(f"TRAINING.json.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"))
        warnings.warn(f"{log_path} is unreadable: set aside as {kept.name}, a new log starts (the earlier stages' "
                      "records are lost)", stacklevel=2)
        record = {}
    hardware = _hardware(cfg["device"])
    record.update({"config_name": config, "config": cfg, "hardware": hardware,
                   "steps_override": steps_override})
    record.setdefault("stages", {})
    data = make_training_data(cfg)
    stages = ("clip", "vae", "unet") if stage == "all" else (stage,)
    todo = record.setdefault(UNFINISHED, {})
    mark_started(todo, stages, time.strftime("%Y-%m-%d %H:%M:%S"))  # before any weight is written
    write_text_atomic(json.dumps(record, indent=1), log_path)
    t_all = time.time()
    for st in stages:
        c = cfg[st.split("-")[0]]  # a continuation uses its base stage's recipe
        c.update({k: v for k, v in (("budget_min", budget_min), ("batch", batch)) if v is not None})
        steps = c["steps"] if steps_override is None else steps_override
        ov = steps_override is not None
        if st in ("clip", "clip-vision"):
            res = train_clip(cfg, data, out, steps, ov, freeze_text=st == "clip-vision")
        elif st == "vae-decoder":
            res = train_vae_decoder(cfg, data, out, steps, samples, ov)
        elif st == "vae":
            res = train_vae(cfg, data, out, steps, samples, ov)
        else:
            res = train_unet(cfg, data, out, steps, samples, ov, resume=st == "unet-resume")
        res["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        # the top-level config/hardware are those of the latest run; each stage keeps its own (stages of one folder may
        # come from different machines, e.g. a GPU-trained UNet and a CPU-continued CLIP vision tower)
        res["config_name"], res["hardware"] = config, hardware
        res["n_train"], res["steps_override"], res["train_split"] = cfg["n_train"], steps_override, train_split
        if st in ("clip", "vae", "unet"):  # a fresh stage voids the logs of the continuations of the weights it replaced
            for old in [k for k in record["stages"] if k.startswith(f"{st}-")]:
                del record["stages"][old]
        key, n = st, 2
        while key in record["stages"] and st.endswith(("-vision", "-decoder", "-resume")):  # keep every continuation's log
            key, n = f"{st}-{n}", n + 1
        record["stages"][key] = res
        mark_done(todo, st)
        if not todo:
            record.pop(UNFINISHED, None)
        write_text_atomic(json.dumps(record, indent=1), log_path)
        print(f"[{st}] done in {res['wall_s'] / 60:.1f} min", flush=True)
    record["total_wall_s_this_run"] = round(time.time() - t_all, 1)
    write_text_atomic(json.dumps(record, indent=1), log_path)
    return record


INSTRUMENT_VISION_STEPS = {"cpu": 7000, "gpu": None}  # None: the CLIP stage's wall-clock budget


def train_instrument_vision(config: str, out: str | Path, smoke_steps: int | None = None,
                            threads: int | None = None) -> dict:
    """Continue the toy CLIP's vision tower on renders of every combination (``clip-vision``, ``train_split="any"``),
    the step after every new ``clip`` stage: the recipe of the committed weights (cpu: 7,000 steps on 100,000 renders,
    ~23 min on 2 threads; gpu: the CLIP stage's wall-clock budget). ``smoke_steps`` runs that many steps on 64 renders."""
    if smoke_steps is not None:
        return run("clip-vision", config, out, smoke_steps, n_train=64, threads=threads, train_split="any")
    return run("clip-vision", config, out, INSTRUMENT_VISION_STEPS[config], n_train=100_000, threads=threads,
               train_split="any")


# the committed decoder's continuation (2026-11-25, CPU, 2 threads: 1,979 steps at batch 16 in 51 min)
# gpu: 3 min on the config's 100,000 renders, so that `device_session.sh vae` fits one 10-min device call
DECODER_RECIPE = {"cpu": {"budget_min": 48.0, "n_train": 30_000}, "gpu": {"budget_min": 3.0, "n_train": None}}


def continue_decoder(config: str, out: str | Path, smoke_steps: int | None = None, threads: int | None = None) -> dict:
    """The VAE decoder's adversarial continuation (``vae-decoder`` with the config's ``adv``), the step after every new
    ``vae`` stage: the recipe of the committed weights (:data:`DECODER_RECIPE`).
    ``smoke_steps`` runs that many steps on 64 renders."""
    if smoke_steps is not None:
        return run("vae-decoder", config, out, smoke_steps, n_train=64, threads=threads)
    r = DECODER_RECIPE[config]
    return run("vae-decoder", config, out, n_train=r["n_train"], budget_min=r["budget_min"], threads=threads)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=STAGES, required=True,
                    help="all = clip, vae, unet from scratch; clip-vision / vae-decoder / unet-resume continue saved weights")
    ap.add_argument("--budget-min", type=float, default=None, help="wall-clock budget of each stage, minutes (either config)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: the config's)")
    ap.add_argument("--config", choices=tuple(CONFIGS), default="cpu")
    ap.add_argument("--out", default=str(TOY_DIR))
    ap.add_argument("--steps-override", type=int, default=None,
                    help="a fixed step count, no wall-clock budget (CI uses a tiny one)")
    ap.add_argument("--n-train", type=int, default=None, help="override the number of rendered training images")
    ap.add_argument("--samples-dir", default=None, help="save VAE reconstructions / DDIM sample grids here")
    ap.add_argument("--train-split", choices=TRAIN_SPLITS, default="train",
                    help="any: the clip-vision stage also sees held-out combinations (an instrument, like the classifiers)")
    ap.add_argument("--latent-channels", type=int, default=None,
                    help="channels of a new VAE's 8x8 latent (stages vae, all; default 4 as in SD v1); the UNet follows")
    ap.add_argument("--batch", type=int, default=None, help="override the stage's batch size (the config's by default)")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run(a.stage, a.config, a.out, a.steps_override, a.samples_dir, a.n_train, a.budget_min, a.threads, a.train_split,
        a.latent_channels, a.batch)


if __name__ == "__main__":
    main()
