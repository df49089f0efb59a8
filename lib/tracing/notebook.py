"""What notebooks 04 (UNet) and 05 (text encoder) share: parameter checks, loading, the resumable sweep, the table.

Each notebook composes these calls; the maps, tables and findings that differ live in ``lib.tracing.report`` and
``lib.tracing.plots``.
"""

from __future__ import annotations

import shlex
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import pandas as pd

from lib.atomic import write_parquet_atomic
from lib.loading import describe_source, is_toy_world
from lib.params import COMMON, Param, ParameterError, ToySettingsWarning, distinct, positive, seed_value
from lib.paths import shell_path
from lib.sampling import scheduler_fingerprint, text_encoder_names
from lib.scoring import check_scorer_spec
from lib.tracing.layers import TEXT_KINDS
from lib.tracing.probes import NAMED_SETS, probe_path
from lib.tracing.report import pick_split
from lib.tracing.sweep import (SweepConfig, check_captions, collect, load_probes, model_fingerprint,
                               model_spec, run_sweep, sweep_dir)

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

    from lib.scoring import ClipScorer


def check_tau(value: Any) -> None:
    if isinstance(value, str) and value != "otsu" or isinstance(value, float) and not 0.0 <= value <= 1.0:
        raise ValueError(f"{value!r} is neither 'otsu' (chosen on the validation split) nor a number in [0, 1]")


def check_text_kinds(value: list[str]) -> None:
    bad = sorted(set(value) - set(TEXT_KINDS))
    if bad:
        raise ValueError(f"unknown kind(s) {bad}; choose from {', '.join(TEXT_KINDS)}")
    distinct(value, "each is traced once")


# The parameters both notebooks take besides lib.params.COMMON; each adds its own (UNET_PARAMS / TEXT_PARAMS).
TRACE_PARAMS: dict[str, Param | None] = {
    "CHECKPOINTING": None,  # COMMON's, not taken: nothing is differentiated
    "PROBES": Param(str), "N_VAL": Param(int, low=1, optional=True), "N_TEST": Param(int, low=0, optional=True),
    # no noise, no clean - corrupted gap: every item would fail to score, after the whole sweep
    "NOISE": Param(float, low=0.0, high=100.0, check=positive), "NOISE_SEED": seed_value(),
    "TAU": Param((str, float), check=check_tau),
    "SCORER": Param(str, check=check_scorer_spec), "MIN_GAP": Param(float, low=0.0),
    "EVAL_SPLIT": Param(str, choices=("all", "test", "val")),
    # a denoising loop holds the clean run and at least one more (SweepConfig); COMMON's other notebooks allow 1
    "BATCH_SIZE": Param(int, low=2, high=COMMON["BATCH_SIZE"].high),
}
UNET_PARAMS: dict[str, Param] = {
    "LAYERS": Param(list, items=str, min_len=1, optional=True, check=lambda v: distinct(v, "each is traced once")),
    "UNCOND": Param(str, choices=("restore", "own")),
}
TEXT_PARAMS: dict[str, Param] = {
    "TEXT_KINDS": Param(list, items=str, min_len=1, check=check_text_kinds),
    "TEXT_LAYERS": Param(list, items=int, low=0, min_len=1, optional=True,
                         check=lambda v: distinct(v, "each is traced once")),
}


def probes_warning(probes: str, model: str) -> str | None:
    """A warning when the toy world's probe captions are about to trace a real model (``-p PROBES sd`` is meant)."""
    if str(probes) != "toy":
        return None
    kind, _ = describe_source(model)
    if kind in ("hub", "local") and not is_toy_world(model):
        return (f"PROBES='toy' traces {model!r} on the toy world's captions ('a white square sleeping'); "
                "for a real model pass -p PROBES sd (and STEPS 50, GUIDANCE 7.5 as in the paper)")
    return None


def check_splits(P: SimpleNamespace, probes: pd.DataFrame) -> None:
    """``ParameterError`` when the selected probe rows cannot serve ``EVAL_SPLIT`` or ``TAU = "otsu"`` (which is
    chosen on the validation split): caught before loading, not after the whole sweep."""
    if probes.empty:
        raise ParameterError(f"N_VAL={P.N_VAL}, N_TEST={P.N_TEST} select no rows of PROBES={P.PROBES!r}")
    present = sorted(set(probes["split"]))
    if P.EVAL_SPLIT != "all" and P.EVAL_SPLIT not in present:
        raise ParameterError(f"EVAL_SPLIT={P.EVAL_SPLIT!r}: the selected probes have no such rows (splits present: "
                             f"{present}); raise N_TEST / N_VAL or use EVAL_SPLIT='all'")
    if P.TAU == "otsu" and "val" not in present:
        raise ParameterError(f"TAU='otsu' is chosen on the 'val' split, but the selected probes have none (splits "
                             f"present: {present}); give a numeric TAU or probes with 'val' rows")


def check_layers(P: SimpleNamespace) -> None:
    """``LayerError`` when ``LAYERS`` (04) or ``TEXT_LAYERS`` (05) name layers the model does not have, read from its
    configs before the pipeline loads (:func:`lib.tracing.layers.check_before_load`)."""
    from lib.tracing.layers import check_before_load

    check_before_load(P.MODEL, unet=getattr(P, "LAYERS", None), text=getattr(P, "TEXT_LAYERS", None))


def load(P: SimpleNamespace) -> tuple[DiffusionPipeline, ClipScorer, pd.DataFrame]:
    """The pipeline, its CLIP-Score scorer and the selected probe rows (validation and test split).

    The probe file, its captions (CLIP tokens: subject found once, at most 77 tokens), the splits that
    ``EVAL_SPLIT`` / ``TAU`` need and the traced layers are checked before the pipeline loads."""
    from lib.loading import load_pipeline, resolve_device
    from lib.scoring import scorer_for
    from lib.tokenizer import build_clip_tokenizer
    from lib.tracing.probes import check_toy_grammar, probe_path, select_probes

    probes = select_probes(load_probes(probe_path(P.PROBES)), P.N_VAL, P.N_TEST)  # before the heavy load
    check_captions(build_clip_tokenizer(), probes)  # every SD text encoder uses CLIP's BPE and 77 tokens
    try:
        check_toy_grammar(P.MODEL, probes)
    except ValueError as err:
        raise ParameterError(f"PROBES: {err}") from None
    check_splits(P, probes)
    check_layers(P)
    message = probes_warning(P.PROBES, P.MODEL)
    if message:
        warnings.warn(message, ToySettingsWarning, stacklevel=2)
    scorer = scorer_for(P.MODEL, P.SCORER, device=str(resolve_device(P.DEVICE)))  # a missing CLIP fails first
    pipe = load_pipeline(P.MODEL, device=P.DEVICE, dtype=P.DTYPE)
    return pipe, scorer, probes


def traced_encoders(pipe, df: pd.DataFrame) -> list[str]:
    """The pipeline's text encoders with rows in ``df`` (SDXL with ``TEXT_LAYERS`` all above 11: ``text_encoder_2``)."""
    present = set(df["component"])
    return [enc for enc in text_encoder_names(pipe) if enc in present]


def sweep_config(P: SimpleNamespace, mode: str, pipe, scorer) -> SweepConfig:
    """The notebook's settings as a ``SweepConfig`` (its hash names the sweep folder, so equal settings resume)."""
    extra = (dict(uncond=P.UNCOND, layers=tuple(P.LAYERS) if P.LAYERS else None) if mode == "unet" else
             dict(text_kinds=tuple(P.TEXT_KINDS), text_layers=tuple(P.TEXT_LAYERS) if P.TEXT_LAYERS else None))
    return SweepConfig(model=model_spec(P.MODEL), mode=mode, steps=P.STEPS, guidance=P.GUIDANCE,
                       batch_size=P.BATCH_SIZE,
                       multiplier=P.NOISE, noise_seed=P.NOISE_SEED, fingerprint=model_fingerprint(pipe),
                       scheduler=scheduler_fingerprint(pipe), scorer=P.SCORER,
                       scorer_fingerprint=scorer.fingerprint(), **extra)


def sweep_command(P: SimpleNamespace, cfg: SweepConfig, pipe, out: Path, processes: int = 2) -> str:
    """The ``accelerate launch`` command that traces the same configuration sharded over processes or GPUs.

    It writes into ``out/sweeps/<mode>-<hash>``, the folder this notebook reads: floats are printed exactly (``repr``)
    and the model loads on the notebook's device type and dtype (both enter the weights fingerprint), so a re-run of
    the notebook with the same parameters and ``OUTPUT_DIR`` resumes from it. ``N_VAL`` / ``N_TEST`` become
    ``--n-val`` / ``--n-test``, so the command traces the notebook's probe rows, no more.
    """
    dtype = str(pipe.unet.dtype).removeprefix("torch.")
    probes = shlex.quote(P.PROBES) if str(P.PROBES) in NAMED_SETS else shell_path(probe_path(P.PROBES))
    args = [("--model", model_spec(P.MODEL)), ("--mode", cfg.mode),
            ("--device", pipe.unet.device.type),
            ("--dtype", dtype), ("--seeds", ",".join(map(str, P.SEEDS))), ("--steps", cfg.steps),
            ("--guidance", repr(cfg.guidance)), ("--batch-size", cfg.batch_size),
            ("--multiplier", repr(cfg.multiplier)), ("--noise-seed", cfg.noise_seed), ("--scorer", cfg.scorer)]
    args += [(flag, n) for flag, n in (("--n-val", P.N_VAL), ("--n-test", P.N_TEST)) if n is not None]
    if cfg.mode == "unet":
        args.append(("--uncond", cfg.uncond))
        if cfg.layers:
            args.append(("--layers", ",".join(cfg.layers)))
    else:
        args.append(("--text-kinds", ",".join(cfg.text_kinds)))
        if cfg.text_layers:
            args.append(("--text-layers", ",".join(map(str, cfg.text_layers))))
    return (f"accelerate launch --multi_gpu --num_processes {processes} -m lib.tracing.sweep --probes {probes} "
            + " ".join(f"{flag} {shlex.quote(str(value))}" for flag, value in args)
            + f" --out {shell_path(Path(out) / 'sweeps')} --nested")


def trace(P: SimpleNamespace, cfg: SweepConfig, pipe, scorer, probes: pd.DataFrame, out: Path):
    """Run (or resume) the sweep in ``out/sweeps``; returns the folder, the files written now and the seconds taken."""
    folder = sweep_dir(out / "sweeps", cfg)
    t0 = time.perf_counter()
    written = run_sweep(pipe, scorer, probes, P.SEEDS, folder, cfg, process_index=0, num_processes=1)
    return folder, written, time.perf_counter() - t0


def timing_line(P: SimpleNamespace, probes: pd.DataFrame, folder: Path, out: Path, written: list,
                elapsed: float) -> str:
    n_items = len(probes) * len(P.SEEDS)
    return (f"{len(written)} of {n_items} (caption, seed) items traced now in {elapsed:.1f} s "
            f"({elapsed / max(1, len(written)):.1f} s per item; the rest resumed) -> {folder.relative_to(out)}")


def table(P: SimpleNamespace, folder: Path, probes: pd.DataFrame, path: Path) -> tuple[pd.DataFrame, float,
                                                                                        str | None]:
    """Collect the sweep's rows for this selection, choose τ, write them to ``path`` (parquet).

    ``TAU = "otsu"``: Otsu on the validation split's layer-level recoveries (ratio of sums per UNet (attribute, layer)
    or text cell, the values the tables compare to τ). Returns the rows, τ and the split the maps and findings use
    (``None``: all rows); ``ValueError`` when ``EVAL_SPLIT`` names a split without rows (e.g. "test" with N_TEST 0) or
    one in which no item has a recovery (no gap above ``MIN_GAP``).
    """
    df = collect(folder, tau=None if P.TAU == "otsu" else P.TAU, min_gap=P.MIN_GAP, probes=probes, seeds=P.SEEDS)
    write_parquet_atomic(df, path)
    tau = float(df["tau"].iloc[0])
    print(f"{len(df)} rows; tau = {tau:.3f} ({'Otsu on the validation split' if P.TAU == 'otsu' else 'given'})")
    split = None if P.EVAL_SPLIT == "all" else P.EVAL_SPLIT
    rows = pick_split(df, split)  # a split without rows fails here, not in the maps
    if not rows["recovery"].notna().any():
        raise ValueError(f"no item of EVAL_SPLIT={P.EVAL_SPLIT!r} has a clean − corrupted CLIP-Score gap above "
                         f"MIN_GAP={P.MIN_GAP:g}, so no recovery to map (e.g. random weights); the rows are saved in "
                         f"{path.name}: lower MIN_GAP or pick another EVAL_SPLIT, the sweep resumes")
    return df, tau, split
