"""Benchmark harness: time named cases on shape twins (random weights time the same as real ones) and write JSON.

    python benchmarks/bench.py --list
    python benchmarks/bench.py --cases generate_sd14_b1,generate_sd14_b8 --size full --device cuda --dtype float16 \
        --out $OUT/bench.json

Every case gets warm-up runs (timed and recorded apart: a compiled case compiles there), CUDA synchronisation around
each timed run, and peak-memory accounting (allocated and reserved); after each case the shared pipeline's memory
settings are reset (:meth:`Context.reset`), so the cases of one run are independent. On the device machine,
diffusers and open_clip travel as wheels: see ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lib.atomic import write_text_atomic  # noqa: E402
from lib.sampling import decode, denoise, encode, initial_latents  # noqa: E402
from lib.speed import COMPILE_MODES, check_compile, speed_up  # noqa: E402
from lib.twins import build_twin  # noqa: E402


@dataclass
class Result:
    case: str
    params: dict
    times_s: list[float]
    median_s: float
    min_s: float
    peak_mem_gib: float | None
    extra: dict = field(default_factory=dict)
    warmup_s: list[float] = field(default_factory=list)  # each untimed warm-up call (a compiled case compiles here)
    peak_reserved_gib: float | None = None  # what the caching allocator held (CUDA-graph pools included)
    start_mem_gib: float | None = None  # allocated when the timed runs began (an earlier case's kept pipeline counts)


@dataclass
class Context:
    """What a case gets: the device, the dtype, the size of the twins, and a cache of built pipelines."""

    device: torch.device
    dtype: torch.dtype
    size: str
    speed: dict = field(default_factory=dict)  # lib.speed.speed_up keyword arguments (channels_last, compile, mode)
    _pipes: dict = field(default_factory=dict)

    def pipe(self, family: str = "sd-v1"):
        if family not in self._pipes:
            self._pipes[family] = build_twin(family, self.size, dtype=self.dtype).to(self.device)
            if self.speed:
                speed_up(self._pipes[family], **self.speed)
        return self._pipes[family]

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset(self) -> None:
        """Undo what a case changed, so that the next one measures what its name says: every cached pipeline's
        memory settings back to none (a SAGE case turns on VAE slicing and checkpointing, which would slice the next
        case's decode), and the pipelines that are not the shared SD v1 twin dropped (their weights would count in
        the next case's peak memory)."""
        from lib.speed import save_memory

        for family in [f for f in self._pipes if f != "sd-v1"]:
            del self._pipes[family]
        if "sd-v1" in self._pipes:
            save_memory(self._pipes["sd-v1"], None, vae_slicing=False)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


# A case takes the context and returns (a function to time, its parameters, extra facts to record).
Case = Callable[[Context], tuple[Callable[[], object], dict, dict]]
CASES: dict[str, Case] = {}


def case(name: str):
    def register(fn: Case) -> Case:
        CASES[name] = fn
        return fn

    return register


def _generation(batch: int) -> Case:
    def build(ctx: Context):
        pipe = ctx.pipe("sd-v1")
        steps = 50 if ctx.size == "full" else 4
        cond = encode(pipe, ["a photo of an astronaut riding a horse"] * batch)
        lat = initial_latents(pipe, list(range(batch)))

        @torch.no_grad()
        def run():
            return decode(pipe, denoise(pipe, lat, cond, steps=steps, guidance=7.5))

        side = pipe.unet.config.sample_size * pipe.vae_scale_factor
        return run, dict(batch=batch, steps=steps, resolution=side, guidance=7.5, scheduler="DDIM"), {}

    return build


for _b in (1, 8, 32):
    case(f"generate_sd14_b{_b}")(_generation(_b))


def _register_method_cases() -> None:
    """Cases that the method modules contribute (imported lazily: they may need extra packages)."""
    for module in ("cases_tracing", "cases_editing", "cases_sage"):
        path = Path(__file__).with_name(f"{module}.py")
        if path.is_file():
            sys.path.insert(0, str(path.parent))
            mod = __import__(module)
            for name, fn in getattr(mod, "CASES", {}).items():
                CASES[name] = fn


class _LimitHits(logging.Handler):
    """Counts dynamo's "hit config.recompile_limit" warnings: the frame runs eagerly from then on (torch keeps no
    counter of recompiles)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.hits = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.hits += str(record.msg).startswith("torch._dynamo hit config.")


def _frames_converted() -> int:
    """Frames dynamo has converted so far: one per cache miss, i.e. per compile or recompile."""
    from torch._dynamo.utils import counters

    return int(counters["frames"]["total"])


def time_case(name: str, ctx: Context, warmup: int, repeats: int,
              progress: Callable[[dict], None] | None = None) -> Result:
    """Time one case: ``warmup`` untimed calls, then ``repeats`` timed ones. ``progress`` gets what is measured so far
    after every call (the JSON of a case killed mid-way still holds its warm-up and compile times)."""
    compiled = bool(ctx.speed.get("compile"))
    limit_log, limit_hits = logging.getLogger("torch._dynamo.convert_frame"), _LimitHits()
    if compiled:
        from torch._dynamo.utils import counters

        counters.clear()  # process-wide: each case reports its own compile counters
        limit_log.addHandler(limit_hits)
    try:
        return _time_case(name, ctx, warmup, repeats, limit_hits, progress or (lambda _: None))
    finally:
        limit_log.removeHandler(limit_hits)


def _time_case(name: str, ctx: Context, warmup: int, repeats: int, limit_hits: _LimitHits,
               progress: Callable[[dict], None]) -> Result:
    progress(dict(case=name, warmup_s=[], times_s=[], extra={}))  # building the case (twins, members) is under way
    fn, params, extra = CASES[name](ctx)
    warm = []
    for i in range(warmup):
        ctx.sync()
        t0 = time.perf_counter()
        fn()
        ctx.sync()
        warm.append(time.perf_counter() - t0)
        sage = "".join(f", {k} {extra[k]}" for k in ("grad_finite", "backward_passes_max") if k in extra)
        print(f"{name}: warm-up {i + 1}/{warmup} {warm[-1]:.1f} s{sage}", flush=True)  # a case cut short says how far
        progress(dict(case=name, warmup_s=warm, times_s=[],
                      extra={k: v for k, v in extra.items() if k != "backward_passes_max"}))  # as a timed row drops it
    extra.pop("backward_passes_max", None)  # a SAGE case's count restarts: a warm-up's overflow is not a timed run's
    start = None
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()  # blocks cached while compiling do not count towards the timed runs' reserved peak
        torch.cuda.reset_peak_memory_stats(ctx.device)
        start = torch.cuda.memory_allocated(ctx.device) / 2**30
    frames_before = _frames_converted() if ctx.speed.get("compile") else 0
    times = []
    for _ in range(repeats):
        ctx.sync()
        t0 = time.perf_counter()
        fn()
        ctx.sync()
        times.append(time.perf_counter() - t0)
        progress(dict(case=name, warmup_s=warm, times_s=times, extra=dict(extra)))
    cuda = ctx.device.type == "cuda"
    peak = torch.cuda.max_memory_allocated(ctx.device) / 2**30 if cuda else None
    reserved = torch.cuda.max_memory_reserved(ctx.device) / 2**30 if cuda else None
    if "batch" in params:  # a SAGE case's batch is of independent searches (one iteration each), a generation's images
        unit = "search_iteration" if "searches" in params else "image"
        extra = {**extra, f"s_per_{unit}": statistics.median(times) / params["batch"]}
    if ctx.speed.get("compile"):  # a row labelled compiled that fell back (graph breaks, skipped CUDA graphs) says so
        from torch._dynamo.utils import counters

        extra = {**extra, "compile_counters": {k: dict(v) for k, v in counters.items()
                                               if k in ("stats", "frames", "inductor", "graph_break") and v},
                 "frames_compiled_while_timed": _frames_converted() - frames_before,
                 "recompile_limit_hits": limit_hits.hits}
    return Result(name, params, times, statistics.median(times), min(times), peak, dict(extra), warm, reserved, start)


def machine_facts() -> dict:
    """What a CPU timing depends on: threads, cores, load, platform, torch."""
    return dict(torch_threads=torch.get_num_threads(), cpu_count=os.cpu_count(), load_avg=os.getloadavg(),
                platform=platform.platform(), torch=torch.__version__)


def write_json(path: Path, obj: dict) -> None:
    """Atomically (a kill mid-write leaves the previous file, not a truncated one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(json.dumps(obj, indent=1), path)


def environment(device: torch.device) -> dict:
    import diffusers
    import transformers

    import subprocess

    env = dict(python=platform.python_version(), torch=torch.__version__, diffusers=diffusers.__version__,
               transformers=transformers.__version__, cpu_threads=torch.get_num_threads(), argv=sys.argv[1:])
    try:  # the device machine gets a copy of the working tree, possibly without .git
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
        if env["commit"]:  # uncommitted changes: the numbers are not those of the commit alone
            env["dirty"] = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                               capture_output=True, text=True, cwd=Path(__file__).parent,
                                               timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        env["commit"] = None
    env["commit"] = env["commit"] or os.environ.get("T2I_COMMIT")  # given in the device call's command line
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(),
                   gpu_mem_gib=round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1))
    return env


def flags(result: dict) -> list[str]:
    """What makes a case's timing not what its row says: a compiled case that fell back (graph breaks, the recompile
    limit hit, skipped CUDA graphs) or compiled during its timed runs, a SAGE gradient that was not finite, backward
    passes repeated after a float16 overflow, a case that failed."""
    out = []
    extra = result.get("extra", {})
    counters = extra.get("compile_counters", {})
    breaks = sum(counters.get("graph_break", {}).values())
    skips = sum(v for k, v in counters.get("inductor", {}).items() if "cudagraph_skip" in k)
    out += [f"{n} {what}" for n, what in ((breaks, "graph breaks"),
                                          (extra.get("recompile_limit_hits", 0), "recompile-limit fallbacks"),
                                          (skips, "CUDA-graph skips"),
                                          (extra.get("frames_compiled_while_timed", 0),
                                           "frames compiled during the timed runs")) if n]
    if result.get("error"):
        out.append(f"failed: {result['error']}")
    if extra.get("grad_finite") is False:
        out.append("gradient not finite")
    if extra.get("backward_passes_max", 1) > 1:
        out.append(f"up to {extra['backward_passes_max']} backward passes per iteration (float16 overflow)")
    return out


def summary_rows(paths: list[Path]) -> list[str]:
    """One markdown row per measured case of bench.py's JSON files (for notebooks/RESULTS.md): case, size, speed
    settings, median and min seconds, seconds per image or per search iteration, peak allocated / reserved GiB (and
    allocated at the start), warm-ups, device, commit, and :func:`flags`."""
    rows = ["| case | size | speed | median s | min s | per image / search iteration | peak GiB (reserved; at start) "
            "| warm-ups s | device | commit | flags |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for path in paths:
        try:
            report = json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:  # one unreadable file does not cost the others' rows
            rows.append(f"| {Path(path).name}: unreadable ({type(err).__name__}) |" + "  |" * 10)
            continue
        env, speed = report.get("environment", {}), report.get("speed", {})
        how = ", ".join(f"{k}={v}" if v is not True else k for k, v in speed.items() if v is not None) or "eager"
        for r in report.get("results", []):
            per = next((f"{v:.3f} s/{k[6:].replace('_', ' ')}" for k, v in r.get("extra", {}).items()
                        if k.startswith("s_per_")), "")
            peak, reserved, start = r.get("peak_mem_gib"), r.get("peak_reserved_gib"), r.get("start_mem_gib")
            mem = "" if peak is None else f"{peak:.1f}" + ("" if reserved is None else f" ({reserved:.1f}"
                                                          + ("" if start is None else f"; {start:.1f}") + ")")
            warm = " / ".join(f"{w:.1f}" for w in r.get("warmup_s", []))
            med, low = r.get("median_s", float("nan")), r.get("min_s", float("nan"))
            commit = f"{env.get('commit')}{' (dirty)' if env.get('dirty') else ''}"
            rows.append(f"| {r.get('case', '?')} | {report.get('size', '?')} | {how} | {med:.3f} | {low:.3f} | {per} | "
                        f"{mem} | {warm} | {env.get('gpu', 'cpu')}, {report.get('dtype', '')} | {commit} | "
                        f"{'; '.join(flags(r))} |")
        cut = report.get("unfinished")
        if cut:  # killed mid-case: its warm-ups (compile times) and any timed runs, no median
            warm = " / ".join(f"{w:.1f}" for w in cut.get("warmup_s", []))
            timed = " / ".join(f"{t:.3f}" for t in cut.get("times_s", []))
            status = "failed" if cut.get("error") else "cut short"
            rows.append(f"| {cut.get('case', '?')} | {report.get('size', '?')} | {how} | {status} | "
                        f"{timed or '–'} | | | {warm} | {env.get('gpu', 'cpu')}, {report.get('dtype', '')} | "
                        f"{env.get('commit')}{' (dirty)' if env.get('dirty') else ''} | "
                        f"{'; '.join(flags(cut)) or 'unfinished'} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    _register_method_cases()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="generate_sd14_b1", help="comma-separated case names, or 'all'")
    ap.add_argument("--size", choices=("tiny", "full"), default="full")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="JSON file to write (appends nothing: one run per file)")
    ap.add_argument("--channels-last", action="store_true", help="UNet and VAE in channels-last memory format")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the UNet in place (the warm-up run compiles; keep --warmup >= 1)")
    ap.add_argument("--compile-mode", default=None, choices=[m for m in COMPILE_MODES if m])
    ap.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--summarize", nargs="+", type=Path, metavar="JSON",
                    help="print one markdown row per case of these result files and exit")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.compile_mode and not args.compile:  # it would time the eager UNet under a compiled run's name
        ap.error(f"--compile-mode {args.compile_mode} needs --compile")
    need = (2 if args.compile_mode == "reduce-overhead" else 1) if args.compile else 0
    if args.warmup < need:  # else the compilation (or CUDA-graph recording) would be timed
        ap.error(f"--warmup must be >= {need} with --compile{' --compile-mode reduce-overhead' if need == 2 else ''}, "
                 f"got {args.warmup}")
    if args.summarize:
        print("\n".join(summary_rows(args.summarize)))
        return 0
    if args.list:
        print("\n".join(sorted(CASES)))
        return 0
    names = sorted(CASES) if args.cases == "all" else [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(sorted(CASES))}")
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    speed = dict(channels_last=True) if args.channels_last else {}
    if args.compile:
        check_compile("inductor", args.compile_mode, device)  # fail now, not after building the first twin
        speed.update(compile=True, mode=args.compile_mode)
    if args.cudnn_benchmark:
        speed["cudnn_benchmark"] = True
    ctx = Context(device, dtype, args.size, speed)
    report = dict(environment=environment(device), size=args.size, dtype=str(dtype), speed=speed, results=[])
    def unfinished(state: dict) -> None:  # the case under way, rewritten after each call: cut short, it says how far
        if args.out:
            write_json(args.out, {**report, "unfinished": state})

    for name in names:
        state: dict = {}  # the last progress of this case

        def track(st: dict) -> None:
            state.update(st)
            unfinished(state)

        try:
            res = time_case(name, ctx, args.warmup, args.repeats, track)
        except Exception as err:  # a failed case is named as failed, not as cut short by the call's limit
            unfinished({**state, "error": f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"})
            raise
        ctx.reset()
        report["results"].append(asdict(res))
        mem = (f", peak {res.peak_mem_gib:.1f} GiB (reserved {res.peak_reserved_gib:.1f})"
               if res.peak_mem_gib is not None else "")
        print(f"{name}: median {res.median_s:.3f} s (min {res.min_s:.3f}){mem} {res.extra}", flush=True)
        if args.out:  # rewrite after every case, so a run cut short keeps what it measured
            write_json(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
