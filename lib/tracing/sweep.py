"""Sweeps: trace every probe item × seed, one parquet file per finished (caption, subject, seed), resumable, sharded.

Probe files are CSVs with columns ``caption, subject, attribute, split`` (``data/probes/sd_probes.csv``; the toy
world writes its own). Each (caption, subject, seed) is written atomically (temporary file, fsync, then
``os.replace``) to ``out_dir`` under a name hashed from that key (not the probe row), so any probe selection resumes
the items another one traced; a re-run skips the files that exist. Under ``accelerate launch --num_processes N``
each process takes every N-th item (:func:`lib.processes.process_share`: ``accelerate.PartialState``, or torchrun's
``RANK``/``WORLD_SIZE``), so processes never write the same file. ``--multi_gpu`` makes accelerate start N processes
through torchrun; on a CPU-only machine too (``--cpu`` would start a single process)::

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \\
        -m lib.tracing.sweep --model twin:sd-v1 \\
        --probes data/probes/sd_probes.csv --seeds 0 --steps 2 --out runs/trace_smoke --limit 2

``collect(out_dir, probes=..., seeds=...)`` reads the files back (one row per key, whatever the file names), keeps
the given items, chooses ``τ`` on their validation split and marks causal rows.

Notebooks keep each configuration in its own folder, ``sweep_dir(root, cfg)`` = ``root/<mode>-<hash of the config>``,
where the config includes ``model_fingerprint(pipe)`` (a hash of the weights): re-running with other weights or
settings starts a new folder instead of silently resuming stale results.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import numbers
import re
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd
import torch

from lib.atomic import remove_stale_tmp, write_parquet_atomic, write_text_atomic
from lib.loading import model_fingerprint  # noqa: F401  (re-exported: notebooks import it from here)
from lib.paths import from_repo_root  # noqa: F401  (re-exported: notebooks import it from here)
from lib.params import ParameterError, seed_list
from lib.processes import process_device, process_share
from lib.progress import track
from lib.prompts import subject_positions
from lib.sampling import make_scheduler, scheduler_fingerprint
from lib.scoring import ClipScorer, check_scorer_spec
from lib.tokenizer import build_clip_tokenizer
from lib.tracing.corrupt import Corruption, item_noise_seed
from lib.tracing.layers import TEXT_KINDS, LayerError, check_before_load, resolve_unet_layers, text_sites
from lib.tracing.score import MIN_GAP, choose_tau, mark_causal, trace_rows
from lib.tracing.text_encoder import trace_text
from lib.tracing.unet import trace_unet

PROBE_COLUMNS: tuple[str, ...] = ("caption", "subject", "attribute", "split")
# one traced run; token_str tells grouped token restorations (token -1) apart
ROW_KEY: tuple[str, ...] = ("caption", "subject", "seed", "component", "layer", "token", "token_str")
CONFIG_FILE = "sweep.json"
NOISE_SCHEME = "per-item"  # lib.tracing.corrupt: noise seeded by a hash of (noise_seed, caption, subject, seed)


class SweepError(ValueError):
    """A sweep cannot start as asked (empty probe set, bad columns, a different config in the folder)."""


def load_probes(source: str | Path | pd.DataFrame) -> pd.DataFrame:
    """Read and check a probe set: columns ``caption, subject, attribute, split``, at least one row, subject in caption."""
    df = source.copy() if isinstance(source, pd.DataFrame) else pd.read_csv(source, dtype=str, keep_default_na=False)
    missing = [c for c in PROBE_COLUMNS if c not in df.columns]
    if missing:
        raise SweepError(f"probe set lacks column(s) {missing}; needs {list(PROBE_COLUMNS)} (has {list(df.columns)})")
    if df.empty:
        raise SweepError(f"the probe set {source if not isinstance(source, pd.DataFrame) else ''} is empty: "
                         "nothing to trace")
    for i, row in df.iterrows():
        if not str(row["caption"]).strip() or row["subject"].lower() not in row["caption"].lower():
            tok = build_clip_tokenizer()  # every SD text encoder uses CLIP's BPE: the tokens a model would see
            raise SweepError(f"probe row {i}: subject {row['subject']!r} (tokens "
                             f"{tok.tokenize(row['subject'])}) is not in caption {row['caption']!r} "
                             f"(tokens {tok.tokenize(row['caption'])})")
    return df.reset_index(drop=True)


@dataclass(frozen=True)
class SweepConfig:
    """What to trace and how; stored as ``sweep.json`` in the output folder (a resume must match it)."""

    model: str
    mode: str = "unet"  # "unet" or "text"
    steps: int = 25
    guidance: float = 7.5
    batch_size: int = 16
    multiplier: float = 3.0
    uncond: str = "restore"
    layers: tuple[str, ...] | None = None  # UNet layer names (None: all 70 / SDXL's 226, lib.tracing.layers)
    text_kinds: tuple[str, ...] = TEXT_KINDS
    text_layers: tuple[int, ...] | None = None
    negative: str | None = None
    noise_seed: int = 0  # base seed of the subject noise (each caption × subject × seed × encoder hashes its own)
    noise_scheme: str = NOISE_SCHEME  # how the noise is seeded: in the hash, so older folders are never resumed
    fingerprint: str | None = None  # model_fingerprint(pipe): results of other weights are never resumed
    scheduler: str | None = None  # scheduler_fingerprint(pipe): nor those of another noise schedule
    scorer: str | None = None  # which CLIP scored the images (lib.scoring.scorer_for spec)
    scorer_fingerprint: str | None = None  # ClipScorer.fingerprint(): rows of another CLIP's weights are never resumed

    def __post_init__(self):
        if self.mode not in ("unet", "text"):
            raise SweepError(f"mode must be 'unet' or 'text', got {self.mode!r}")
        if self.uncond not in ("restore", "own"):
            raise SweepError(f"uncond must be 'restore' or 'own', got {self.uncond!r}")
        if self.batch_size < 2:
            raise SweepError(f"batch_size must be >= 2 (clean + one more run), got {self.batch_size}")
        if self.noise_scheme != NOISE_SCHEME:
            raise SweepError(f"noise_scheme must be {NOISE_SCHEME!r}, got {self.noise_scheme!r}")
        if isinstance(self.steps, bool) or not (isinstance(self.steps, numbers.Integral) and 1 <= self.steps <= 999):
            raise SweepError(f"steps must be an integer in [1, 999], got {self.steps!r}")
        if not (math.isfinite(self.guidance) and 1.0 <= self.guidance <= 50.0):  # the notebooks' GUIDANCE bound
            raise SweepError(f"guidance must be in [1, 50] (below 1 diffusers switches guidance off), got "
                             f"{self.guidance!r}")
        if not (math.isfinite(self.multiplier) and self.multiplier > 0):
            raise SweepError(f"multiplier (the corruption noise scale) must be > 0, got {self.multiplier!r}: with "
                             "no noise nothing is corrupted and every recovery is undefined")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, indent=1)

    def key(self) -> str:
        """A short hash of the whole config (folder names)."""
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


def model_spec(model: str) -> str:
    """``model`` as a sweep config records it: a local folder by :func:`from_repo_root` (the notebooks run in
    ``notebooks/``, the CLI in the repo root: one folder, one spelling, one config hash); presets, twins and hub ids
    as given."""
    from lib.loading import describe_source

    kind, where = describe_source(model)
    return from_repo_root(where) if kind == "local" and model != "toy" else model


def sweep_dir(root: str | Path, cfg: SweepConfig) -> Path:
    """``root/<mode>-<config hash>``: one folder per distinct configuration (model and CLIP weights included)."""
    return Path(root) / f"{cfg.mode}-{cfg.key()}"


_LEGACY_NAME = re.compile(r"(?P<mode>[a-z]+)_\d+_s(?P<seed>-?\d+)_(?P<hash>[0-9a-f]{8})\.parquet")


@dataclass(frozen=True)
class WorkItem:
    """One (probe row, seed); ``index`` is the row's position in the probe table (not part of the file name)."""

    index: int
    caption: str
    subject: str
    attribute: str
    split: str
    seed: int

    @property
    def digest(self) -> str:
        """SHA-1 of (caption, subject, seed): what the trace depends on besides the sweep config."""
        return hashlib.sha1(f"{self.caption}\0{self.subject}\0{self.seed}".encode()).hexdigest()

    def filename(self, mode: str) -> str:
        return f"{mode}_s{self.seed}_{self.digest[:16]}.parquet"

    def done(self, mode: str, names: set[str], legacy: set[tuple[str, int, str]]) -> bool:
        """Finished: its file exists, or one of the older ``{mode}_{row:05d}_s{seed}_{hash8}`` names does."""
        return self.filename(mode) in names or (mode, self.seed, self.digest[:8]) in legacy


def work_items(probes: pd.DataFrame, seeds: Sequence[int]) -> list[WorkItem]:
    """Every probe row × seed, in a fixed order (rows outer, seeds inner)."""
    try:  # numpy integers (a table's seed column) are seeds too
        plain = [int(s) if isinstance(s, numbers.Integral) and not isinstance(s, bool) else s for s in seeds]
        seeds = seed_list().validate("seeds", plain)
    except ParameterError as err:
        raise SweepError(str(err)) from None
    return [WorkItem(int(i), r.caption, r.subject, r.attribute, r.split, int(s))
            for i, r in enumerate(probes.itertuples()) for s in seeds]


def unique_items(items: Iterable[WorkItem]) -> list[WorkItem]:
    """The first item of each (caption, subject, seed), in order: repeated probe rows trace (and write) once."""
    first: dict[str, WorkItem] = {}
    for it in items:
        first.setdefault(it.digest, it)
    return list(first.values())


def finished(out: Path) -> tuple[set[str], set[tuple[str, int, str]]]:
    """Names of the folder's parquet files, and (mode, seed, hash8) of those with the older row-numbered names."""
    names = {f.name for f in out.glob("*.parquet")}
    legacy = {(m["mode"], int(m["seed"]), m["hash"]) for m in map(_LEGACY_NAME.fullmatch, names) if m}
    return names, legacy


def shard(items: Sequence, index: int, count: int) -> list:
    """Process ``index`` of ``count`` takes items ``index, index+count, ...``."""
    if count < 1 or not 0 <= index < count:
        raise SweepError(f"bad shard {index} of {count}")
    return list(items[index::count])


def _readable(path: Path) -> bool:
    """Whether ``path`` is a whole parquet file (its footer reads): a truncated copy is not."""
    import pyarrow.parquet as pq

    try:
        pq.read_metadata(path)
    except Exception:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ... for a torn file
        return False
    return True


def set_aside_unreadable(out: Path) -> list[Path]:
    """Rename the folder's unreadable item files (a truncated copy, a full disk) to ``<name>.unreadable`` with a
    warning, so their items are traced again instead of counting as finished; returns the new paths."""
    import warnings

    moved = []
    for f in sorted(out.glob("*.parquet")):
        if not _readable(f):
            try:
                moved.append(f.rename(f.with_name(f.name + ".unreadable")))
            except FileNotFoundError:  # another process of this sweep set it aside first
                continue
            warnings.warn(f"{f} is not a readable parquet file (a truncated copy?): set aside as {moved[-1].name}, "
                          "its item is traced again", stacklevel=3)
    return moved


def _check_config(out_dir: Path, cfg: SweepConfig) -> None:
    """Write ``sweep.json``, or check that the folder's is ``cfg``; a folder with item files but no readable config
    cannot be resumed (its items' settings are unknown)."""
    path = out_dir / CONFIG_FILE
    fix = "use another output folder, or delete the whole folder to start over"
    if path.exists():
        try:
            held = json.loads(path.read_text())
        except ValueError as err:
            raise SweepError(f"{path} is not valid JSON ({err}): the settings of the traces in {out_dir} are "
                             f"unknown; {fix}") from None
        diff = _config_diff(held, json.loads(cfg.to_json()))
        if diff:
            raise SweepError(f"{path} holds a different sweep config ({diff}); {fix}")
        return
    if any(out_dir.glob("*.parquet")):
        raise SweepError(f"{out_dir} holds trace files but no {CONFIG_FILE}: their settings are unknown; {fix}")
    write_text_atomic(cfg.to_json(), path)


_LOADED = ("fingerprint", "scheduler", "scorer_fingerprint")  # known only once the pipeline and the scorer are loaded


def _config_diff(held: dict, now: dict, skip: Sequence[str] = ()) -> str:
    """The settings that differ between a folder's ``sweep.json`` and this run's, as ``key: there, now`` items."""
    return "; ".join(f"{k}: {held.get(k)!r} there, {now.get(k)!r} now" for k in sorted(set(held) | set(now))
                     if k not in skip and held.get(k) != now.get(k))


def check_folder_settings(out_dir: str | Path, cfg: SweepConfig) -> None:
    """Before the (slow) load: ``SweepError`` when ``out_dir`` holds a sweep whose settings differ from ``cfg``'s in
    anything but what loading decides (weights, scheduler and scorer fingerprints, checked when the sweep starts)."""
    path = Path(out_dir) / CONFIG_FILE
    try:
        held = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # no folder, or one :func:`_check_config` refuses with its own reason
    diff = _config_diff(held, json.loads(cfg.to_json()), _LOADED)
    if diff:
        raise SweepError(f"{path} holds a different sweep config ({diff}); use another output folder, or delete the "
                         "whole folder to start over")


def check_captions(tokenizer, probes: pd.DataFrame) -> None:
    """``PromptError`` (naming caption, subject and tokens) for a caption over the tokenizer's context (77 tokens)
    or a subject whose tokens are not in its caption."""
    from lib.prompts import check_length

    for row in probes.itertuples():
        check_length(tokenizer, [row.caption])
        subject_positions(tokenizer, row.caption, row.subject)


def check_subjects(pipe, probes: pd.DataFrame) -> None:
    """Fail before any generation when a caption does not fit or a subject is not found (every encoder's tokenizer)."""
    from lib.sampling import text_encoder_names, tokenizer_for

    for enc in text_encoder_names(pipe):
        check_captions(tokenizer_for(pipe, enc), probes)


def run_item(pipe, scorer: ClipScorer, item: WorkItem, cfg: SweepConfig) -> pd.DataFrame:
    """Trace and score one (caption, seed): the tidy rows of ``lib.tracing.score.COLUMNS`` (``noise_seed``: the
    item's derived noise seed, ``lib.tracing.corrupt.item_noise_seed``)."""
    corruption = Corruption(cfg.multiplier, cfg.noise_seed).at(item.seed)
    noise_seed = item_noise_seed(corruption, item.caption, item.subject)
    common = dict(steps=cfg.steps, guidance=cfg.guidance, corruption=corruption, batch_size=cfg.batch_size,
                  negative=cfg.negative)
    if cfg.mode == "unet":
        trace = trace_unet(pipe, item.caption, item.subject, item.seed, cfg.layers, uncond=cfg.uncond, **common)
    else:
        sites = text_sites(pipe, kinds=cfg.text_kinds, layers=cfg.text_layers)
        trace = trace_text(pipe, item.caption, item.subject, item.seed, sites, **common)
    n_tokens = len(pipe.tokenizer(item.caption, truncation=True).input_ids)
    return trace_rows(trace, scorer, item.caption, model=cfg.model, subject=item.subject, attribute=item.attribute,
                      split=item.split, seed=item.seed, noise_seed=noise_seed,
                      subject_tokens=subject_positions(pipe.tokenizer, item.caption, item.subject),
                      n_tokens=n_tokens)


def run_sweep(pipe, scorer: ClipScorer, probes: pd.DataFrame | str | Path, seeds: Sequence[int],
              out_dir: str | Path, cfg: SweepConfig, process_index: int | None = None,
              num_processes: int | None = None, limit: int | None = None, progress: Any = True) -> list[Path]:
    """Trace this process's share of probe items × seeds; returns the files written now (skipped ones excluded).

    ``process_index``/``num_processes`` default to ``accelerate.PartialState()``'s. ``limit`` keeps the first items.
    Every input is checked before ``sweep.json`` is written, so a corrected rerun into the same folder is accepted.
    ``progress``: a flag or a bar (:mod:`lib.progress`), one step per item traced now.
    """
    probes = load_probes(probes)
    if cfg.scorer_fingerprint is not None and scorer.fingerprint() != cfg.scorer_fingerprint:
        raise SweepError("the scorer's weights differ from those the sweep config names (scorer_fingerprint); "
                         "build the config with scorer_fingerprint=scorer.fingerprint()")
    if cfg.fingerprint is not None and model_fingerprint(pipe) != cfg.fingerprint:
        raise SweepError("the pipeline's weights differ from those the sweep config names (fingerprint): its rows "
                         "would join another model's; build the config with fingerprint=model_fingerprint(pipe)")
    if cfg.scheduler is not None and scheduler_fingerprint(pipe) != cfg.scheduler:
        raise SweepError("the pipeline's scheduler config differs from the one the sweep config names (scheduler); "
                         "build the config with scheduler=scheduler_fingerprint(pipe)")
    if limit is not None and limit < 1:
        raise SweepError(f"limit must be >= 1 (or None: every item), got {limit}")
    try:
        with warnings.catch_warnings():  # its ScheduleWarning comes with the first item's sampler
            warnings.simplefilter("ignore")
            make_scheduler(pipe, cfg.steps)  # a step count the schedule cannot take fails before sweep.json exists
    except ValueError as err:
        raise SweepError(str(err)) from None
    check_subjects(pipe, probes)
    if cfg.mode == "unet":  # unknown names, kinds or layers fail before any work
        resolve_unet_layers(pipe.unet, cfg.layers)
    else:
        text_sites(pipe, kinds=cfg.text_kinds, layers=cfg.text_layers)
    items = unique_items(work_items(probes, seeds))[:limit]
    if process_index is None or num_processes is None:
        process_index, num_processes = process_share()
    share = shard(items, process_index, num_processes)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_config(out, cfg)
    remove_stale_tmp(out)
    set_aside_unreadable(out)
    names, legacy = finished(out)
    mine = [it for it in share if not it.done(cfg.mode, names, legacy)]
    written = []
    for item in track(mine, progress, f"trace {cfg.mode} [{process_index}/{num_processes}]"):  # text on stderr
        rows = run_item(pipe, scorer, item, cfg)
        path = out / item.filename(cfg.mode)
        write_parquet_atomic(rows, path)
        written.append(path)
    return written


def collect(out_dir: str | Path, tau: float | None = None, labels: str | None = None, min_gap: float = MIN_GAP,
            probes: pd.DataFrame | str | Path | None = None, seeds: Sequence[int] | None = None) -> pd.DataFrame:
    """Finished rows of a sweep folder, one per ``ROW_KEY``, with ``recovery``/``causal``/``tau``; ``SweepError`` when
    one file holds two grouped token restorations with the same key (they would count as one).

    ``probes`` and ``seeds`` keep only those (caption, subject) pairs and seeds (``attribute``/``split`` taken from
    ``probes``) *before* ``τ`` is chosen on their ``val`` rows (when ``tau`` is None); without them, every row is used.
    ``min_gap``: the notebooks' default (``lib.tracing.score.MIN_GAP``); the rows keep it in their ``min_gap`` column.
    """
    files = sorted(Path(out_dir).glob("*.parquet"))
    if not files:
        raise SweepError(f"no finished trace files in {out_dir}")
    bad = [f for f in files if not _readable(f)]
    if bad:
        raise SweepError(f"{bad[0]} is not a readable parquet file (a truncated copy?) ({len(bad)} such file(s) in "
                         f"{out_dir}); rerun the sweep into this folder to set them aside and trace their items again")
    frames = [pd.read_parquet(f) for f in files]
    for f, d in zip(files, frames):  # grouped token restorations (token -1) told apart only by their token names
        grouped = d[(d["component"] != "unet") & (d["token"] == -1)]
        if grouped.duplicated(list(ROW_KEY)).any():
            raise SweepError(f"{f}: two grouped token restorations share one row key {list(ROW_KEY)} (the same "
                             "token names at other positions?); trace each group once")
    df = pd.concat(frames, ignore_index=True)
    df = df.drop_duplicates(list(ROW_KEY), ignore_index=True)  # an item traced under two file names counts once
    if probes is not None:
        keep = load_probes(probes)[list(PROBE_COLUMNS)].drop_duplicates(["caption", "subject"])
        df = df.drop(columns=["attribute", "split"]).merge(keep, on=["caption", "subject"])[list(df.columns)]
    if seeds is not None:
        df = df[df["seed"].isin([int(s) for s in seeds])].reset_index(drop=True)
    if df.empty:
        raise SweepError(f"no rows of the given probes/seeds in {out_dir}")
    return mark_causal(df, choose_tau(df, labels, min_gap=min_gap) if tau is None else tau, min_gap)


def _scorer(model: str, spec: str, device: str) -> ClipScorer:
    """``lib.scoring.scorer_for``: ``auto``, ``toy[:<folder>]``, ``random``, ``openclip:<model>:<pretrained|none>``."""
    from lib.scoring import scorer_for

    try:
        return scorer_for(model, spec, device)
    except ValueError as err:
        raise SweepError(str(err)) from None


def _ints(text: str, flag: str) -> list[int]:
    """Comma-separated integers of a command-line flag; ``SweepError`` naming the flag for anything else."""
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SweepError(f"{flag} {text!r}: give comma-separated integers, e.g. 0,1,2") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="preset, hub id, local folder or twin:<family>")
    ap.add_argument("--probes", required=True, help="'toy', 'sd' (the committed probe sets) or a CSV path")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", default="0", help="comma-separated")
    ap.add_argument("--mode", choices=("unet", "text"), default="unet")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--multiplier", type=float, default=3.0)
    ap.add_argument("--noise-seed", type=int, default=0,
                    help="base seed of the subject noise (each caption, subject, seed and encoder hashes its own)")
    ap.add_argument("--uncond", choices=("restore", "own"), default="restore")
    ap.add_argument("--layers", default=None, help="comma-separated UNet layer names (default: all)")
    ap.add_argument("--text-layers", default=None, help="comma-separated text-encoder layer indices")
    ap.add_argument("--text-kinds", default=",".join(TEXT_KINDS),
                    help=f"comma-separated states restored per text-encoder layer (default: {','.join(TEXT_KINDS)})")
    ap.add_argument("--scorer", default="auto", help="auto (toy CLIP for toy folders, random toy CLIP for twins, "
                    "open_clip ViT-L-14/openai otherwise), toy[:<folder>], random, openclip:<model>:<pretrained|none>")
    ap.add_argument("--n-val", type=int, default=None,
                    help="the first N validation rows of each attribute, as a notebook's N_VAL (default: all)")
    ap.add_argument("--n-test", type=int, default=None,
                    help="the first N test rows of each attribute, as a notebook's N_TEST (default: all)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N (probe, seed) items")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto",
                    help="auto: this process's accelerate device; cuda: this process's GPU; mps: Apple's GPU (one "
                         "process); cpu even on a GPU machine")
    ap.add_argument("--dtype", default="auto", help="auto (float16 on CUDA, float32 on CPU), float32, float16, "
                    "bfloat16 (notebooks 04/05 print the dtype they loaded)")
    ap.add_argument("--nested", action="store_true",
                    help="write to OUT/<mode>-<config hash> (the folder notebooks 04/05 use under OUTPUT_DIR/sweeps "
                         "when given the same settings), so a notebook resumes from this sweep")
    args = ap.parse_args(argv)
    from lib.loading import load_pipeline
    from lib.tracing.probes import check_toy_grammar, probe_path, select_probes

    try:
        probes = load_probes(probe_path(args.probes))  # bad probe files and seeds fail before the (slow) pipeline load
    except SweepError:
        raise
    except FileNotFoundError as err:
        raise SweepError(str(err)) from None
    except (OSError, ValueError) as err:  # not a CSV pandas can parse
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise SweepError(f"--probes {args.probes!r}: cannot read it ({type(err).__name__}: {first})") from None
    for flag, n, low in (("--n-val", args.n_val, 1), ("--n-test", args.n_test, 0)):
        if n is not None and n < low:
            raise SweepError(f"{flag} must be >= {low} (or left out: every row), got {n}")
    probes = select_probes(probes, args.n_val, args.n_test)
    if probes.empty:
        raise SweepError(f"--n-val {args.n_val} --n-test {args.n_test} select no rows of {args.probes!r}")
    kinds = tuple(k.strip() for k in args.text_kinds.split(",") if k.strip())
    if not kinds or set(kinds) - set(TEXT_KINDS):
        raise SweepError(f"--text-kinds {args.text_kinds!r}: choose from {', '.join(TEXT_KINDS)}")
    check_captions(build_clip_tokenizer(), probes)  # every SD text encoder uses CLIP's BPE and 77 tokens
    try:
        check_toy_grammar(args.model, probes)
    except ValueError as err:
        raise SweepError(f"--probes: {err}") from None
    try:  # at least one, distinct, in torch's range
        seeds = seed_list().validate("--seeds", _ints(args.seeds, "--seeds"))
    except ParameterError as err:
        raise SweepError(str(err)) from None
    try:
        check_scorer_spec(args.scorer)
    except ValueError as err:
        raise SweepError(str(err)) from None
    layers = tuple(n.strip() for n in args.layers.split(",") if n.strip()) if args.layers else None
    text_layers = tuple(_ints(args.text_layers, "--text-layers")) if args.text_layers else None
    try:
        check_before_load(args.model, unet=layers if args.mode == "unet" else None,
                          text=text_layers if args.mode == "text" else None)
    except LayerError as err:
        raise SweepError(str(err)) from None
    if args.limit is not None and args.limit < 1:
        raise SweepError(f"--limit must be >= 1, got {args.limit}")
    given = SweepConfig(model=model_spec(args.model), mode=args.mode, steps=args.steps, guidance=args.guidance,
                        batch_size=args.batch_size, multiplier=args.multiplier, noise_seed=args.noise_seed,
                        uncond=args.uncond, layers=layers, text_kinds=kinds, text_layers=text_layers,
                        scorer=args.scorer)  # bad settings fail before the (slow) load
    if not args.nested:  # a folder of other settings, too (a nested folder is named by them)
        check_folder_settings(args.out, given)
    index, count = process_share()
    device = process_device(args.device)
    pipe = load_pipeline(args.model, device=device, dtype=args.dtype)  # device type and dtype enter the fingerprint
    scorer = _scorer(args.model, args.scorer, str(pipe.unet.device))  # as notebooks 04/05 place it
    cfg = SweepConfig(
        model=model_spec(args.model), mode=args.mode, steps=args.steps, guidance=args.guidance,
        batch_size=args.batch_size,
        multiplier=args.multiplier, noise_seed=args.noise_seed, uncond=args.uncond,
        layers=layers, text_kinds=kinds, text_layers=text_layers,
        fingerprint=model_fingerprint(pipe), scheduler=scheduler_fingerprint(pipe), scorer=args.scorer,
        scorer_fingerprint=scorer.fingerprint(),
    )
    out = sweep_dir(args.out, cfg) if args.nested else args.out
    with torch.no_grad():
        written = run_sweep(pipe, scorer, probes, seeds, out, cfg,
                            index, count, args.limit, progress=False)
    print(f"process {index}/{count}: wrote {len(written)} file(s)", flush=True)
    return 0


def cli(argv: list[str] | None = None) -> int:
    """``main`` for the shell: a refused sweep ends with one ``error:`` line (per process) instead of a traceback."""
    from lib.loading import ModelLoadError
    from lib.prompts import PromptError

    try:
        return main(argv)
    except (SweepError, PromptError, ModelLoadError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(cli())
