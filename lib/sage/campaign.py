"""Notebook 01's latent searches as units of work, sharded over processes or GPUs.

A unit is one (class, mode, batch of seeds): exactly one batch of :func:`lib.sage.latent.latent_campaign`, the same
seeds searched together with the same ``BATCH_SIZE``, so its files carry the key the notebook computes. Under
``accelerate launch --num_processes N`` each process searches every N-th unit and writes its files; the notebook, re-run
with the same parameters and ``OUTPUT_DIR`` (the same device type and dtype: both enter the key), then loads every
unit instead of searching it (and re-renders its images). Those are the numbers one process gives up to float
rounding where the thread count (accelerate gives each process one CPU thread) or CUDA's non-deterministic kernels
differ; on the toy world on a CPU they are identical (``tests/test_sage_campaign.py``)::

    accelerate launch --multi_gpu --num_processes 2 -m lib.sage.campaign --params <OUTPUT_DIR>/params.json

The notebook writes ``params.json`` (its checked parameters) and prints this command in its timing cell.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping, Sequence

from lib.params import (COMMON, Param, ParameterError, ToySettingsWarning, check_step, distinct, has_placeholder,
                        positive, validate)
from lib.sage.build import SEARCH_PARAMS

OUTPUT_NAME = "01_sage_latent_search"  # the notebook's default output folder under runs/
PARAMS_FILE = "params.json"


def _modes(value: Sequence[str]) -> None:
    from lib.sage.latent import MODE_GOAL

    known = tuple(MODE_GOAL)
    if any(m not in known for m in value) or len(set(value)) != len(value):
        raise ValueError(f"modes must be distinct values of {known}, got {value}")


PARAMS: dict[str, Param] = {  # notebook 01's parameters besides lib.params.COMMON
    **SEARCH_PARAMS,
    "CLASSES": Param(list, items=str, min_len=1, check=distinct),
    "PROMPT_TEMPLATE": Param(str, check=has_placeholder("cls")),
    "MODES": Param(list, items=str, min_len=1, check=_modes),
    "DELTA_MAX": Param(float, low=0.0, high=100.0, check=positive),
    "SHELL_SIGMAS": Param(float, low=0.0, optional=True),
    "RESIDUAL_STEP": Param(int, low=0, optional=True),
    "RESIDUAL_WEIGHT": Param(float, low=0.0, optional=True, check=positive),
    "RESIDUAL_MODE": Param(str, choices=("straight_through", "additive")),
    "THRESHOLD": Param(float, low=0.0, high=1.0),
    "NGR_ALPHA": Param(float, low=0.0, high=1.0),
    "TIME_ITERATIONS": Param(int, low=0, high=100_000),
}


def check_params(values: Mapping[str, Any]) -> SimpleNamespace:
    """Notebook 01's parameters checked (:func:`lib.params.validate` with :data:`PARAMS`), as a namespace; every one
    must be there (an edited ``params.json`` that lacks one fails here, not after the pipeline load)."""
    missing = sorted((set(COMMON) | set(PARAMS)) - set(values))
    if missing:
        raise ParameterError(f"missing parameter(s) {', '.join(missing)}")
    P = validate(values, **PARAMS)
    check_step(P, "RESIDUAL_STEP", inclusive=True)
    check_toy_prompts(P)
    return P


def check_toy_prompts(P: SimpleNamespace) -> None:
    """On the toy world, ``ParameterError`` (one line, with the vocabulary) when ``PROMPT_TEMPLATE`` makes a prompt
    outside its caption grammar, e.g. "a photo of a {cls} on mars": its text encoder never saw such words. Classes
    that are no toy word are left to the ensemble's check, which names near matches."""
    from lib.loading import is_toy_world
    from lib.toy import world as W

    if not is_toy_world(P.MODEL):
        return
    words = {w for family in W.VOCAB.values() for w in family}
    for c in P.CLASSES:
        if c.strip().lower() in words:
            try:
                W.parse_caption(prompt_for(P, c))
            except ValueError as err:
                raise ParameterError(f"PROMPT_TEMPLATE: {err}") from None


def criteria(P: SimpleNamespace):
    """The ensemble's verdict thresholds: ``THRESHOLD`` for all three (:class:`lib.sage.loss.Criteria`)."""
    from lib.sage.loss import Criteria

    return Criteria(P.THRESHOLD, P.THRESHOLD, P.THRESHOLD)


def prompt_for(P: SimpleNamespace, cls: str) -> str:
    return P.PROMPT_TEMPLATE.format(cls=cls)


def search_config(P: SimpleNamespace, mode: str):
    """The :class:`lib.sage.latent.LatentSearch` of one mode."""
    from lib.sage.latent import LatentSearch, Residual

    return LatentSearch(mode=mode, lr=P.STEP_SIZE, iterations=P.ITERATIONS, delta_range=(-P.DELTA_MAX, P.DELTA_MAX),
                        shell_sigmas=P.SHELL_SIGMAS,
                        residual=Residual(P.RESIDUAL_STEP, P.RESIDUAL_WEIGHT, P.RESIDUAL_MODE))


def units(P: SimpleNamespace) -> list[tuple[str, str, list[int]]]:
    """Every (class, mode, batch of seeds) in the notebook's order: classes, then modes, then ``SEEDS`` in
    consecutive batches of ``BATCH_SIZE`` (the batches :func:`lib.sage.latent.latent_campaign` forms)."""
    b = P.BATCH_SIZE
    return [(c, m, list(P.SEEDS[i : i + b])) for c in P.CLASSES for m in P.MODES for i in range(0, len(P.SEEDS), b)]


def run_campaigns(pipe, ensemble, P: SimpleNamespace, latent_dir: str | Path, process_index: int = 0,
                  num_processes: int = 1, progress: Any = True):
    """Search (or, from ``latent_dir``, resume) this process's share of :func:`units`: (tidy table, results keyed
    by (class, mode, seed)). One process runs each (class, mode) as one campaign over all ``SEEDS``; with
    ``num_processes`` > 1 a process takes every ``num_processes``-th unit, from ``process_index``. ``progress``: a
    flag or a bar (:mod:`lib.progress`), one step per campaign."""
    import pandas as pd

    from lib.progress import track
    from lib.sage.latent import latent_campaign
    from lib.sage.resume import weights_part

    if not 0 <= process_index < num_processes:
        raise ValueError(f"process {process_index} of {num_processes}: the index must be in [0, {num_processes})")
    if num_processes == 1:
        jobs = [(c, m, list(P.SEEDS)) for c in P.CLASSES for m in P.MODES]
    else:
        jobs = units(P)[process_index::num_processes]
    runs, results = [], {}
    weights = weights_part(pipe, ensemble) if jobs else None  # the resume keys' fingerprints: once per process
    for c, m, seeds in track(jobs, progress, "latent searches"):
        df, res = latent_campaign(pipe, ensemble, prompt_for(P, c), c, seeds, P.STEPS, P.GUIDANCE,
                                  search_config(P, m), out_dir=latent_dir, model=P.MODEL, batch_size=P.BATCH_SIZE,
                                  weights=weights)
        runs.append(df)
        results.update({(c, m, s): r for s, r in zip(seeds, res)})
    return (pd.concat(runs, ignore_index=True) if runs else pd.DataFrame()), results  # no units: an empty share


def write_params(P: SimpleNamespace, out: str | Path) -> Path:
    """``out/params.json``: the checked parameters, for :func:`main` (written atomically)."""
    from lib.atomic import write_text_atomic

    return write_text_atomic(json.dumps(vars(P), indent=1) + "\n", Path(out) / PARAMS_FILE)


def command(params_path: str | Path, processes: int = 2) -> str:
    """The ``accelerate launch`` command that searches the notebook's units over ``processes`` processes or GPUs."""
    from lib.paths import shell_path

    return (f"accelerate launch --multi_gpu --num_processes {processes} -m lib.sage.campaign "
            f"--params {shell_path(params_path)}")


def read_params(path: str | Path) -> SimpleNamespace:
    """The parameters :func:`write_params` wrote, checked again (the file may have been edited)."""
    path = Path(path)
    try:
        values = json.loads(path.read_text())
    except FileNotFoundError:
        raise ParameterError(f"{path} does not exist: run notebook 01 (it writes {PARAMS_FILE} to its output "
                             "folder) or give another --params") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ParameterError(f"{path} is not a readable parameters file ({type(err).__name__}: {err})") from None
    if not isinstance(values, dict):
        raise ParameterError(f"{path} must hold an object of notebook parameters, got {type(values).__name__}")
    return check_params(values)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lib.sage.campaign", description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", required=True, help=f"the {PARAMS_FILE} notebook 01 wrote to its output folder")
    ap.add_argument("--latents", default=None,
                    help="folder for the searches' files (default: 'latents' beside the parameters file, i.e. "
                         "<OUTPUT_DIR>/latents, where the notebook resumes)")
    args = ap.parse_args(argv)
    from lib.processes import process_device, process_share

    index, count = process_share()
    with warnings.catch_warnings():
        if index > 0:  # process 0 says it; every process would say the same
            warnings.simplefilter("ignore", ToySettingsWarning)
        P = read_params(args.params)  # a bad file fails before the (slow) pipeline load
        if count > 1 and not units(P)[index::count]:
            print(f"process {index}/{count}: 0 search(es) (more processes than units)", flush=True)
            return 0
        P.DEVICE = process_device(P.DEVICE)  # this process's GPU, of the device type the notebook named
        from lib.sage.build import setup

        try:
            pipe, ens, _ = setup(P, P.CLASSES, criteria(P))
        except ValueError as err:  # a member spec or head refused before any search: the parameters' fault
            raise ParameterError(str(err)) from None
    latent_dir = Path(args.latents) if args.latents else Path(args.params).resolve().parent / "latents"
    runs, _ = run_campaigns(pipe, ens, P, latent_dir, index, count, progress=False)
    print(f"process {index}/{count}: {len(runs)} search(es), {int((~runs['resumed'].astype(bool)).sum())} run now, "
          f"{int(runs['found'].astype(bool).sum())} found", flush=True)
    return 0


if __name__ == "__main__":
    from lib.loading import ModelLoadError
    from lib.sage.loss import UnknownClassError

    try:
        raise SystemExit(main())
    except (ParameterError, UnknownClassError, ModelLoadError) as err:  # one line, not a traceback per process
        raise SystemExit(f"error: {err}") from None
