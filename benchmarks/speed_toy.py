"""What ``lib.speed`` buys on a real pipeline: one batched UNet trace, eager vs channels-last vs compiled.

    python benchmarks/speed_toy.py --model toy --steps 4 --batch-size 24 --threads 1 --out speed_toy.json

The same pipeline is timed eager, then in channels-last format, then additionally compiled in place
(``speed_up(pipe, compile=True)``): the first compiled call includes the compilation and is reported apart; a last
call with another caption and seed shows whether the compiled graphs are reused. Every variant's images are compared
with the eager ones.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import machine_facts, write_json  # noqa: E402

from lib.loading import load_pipeline  # noqa: E402
from lib.speed import check_compile, speed_up  # noqa: E402
from lib.tracing.unet import trace_unet  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy")
    ap.add_argument("--device", default="cpu", choices=("cpu",),
                    help="CPU only: these timings do not synchronise a GPU (GPU figures: bench.py)")
    ap.add_argument("--caption", default="a photo of a red cat")
    ap.add_argument("--subject", default="cat")
    ap.add_argument("--other", nargs=2, default=["a photo of a blue dog", "dog"], metavar=("CAPTION", "SUBJECT"))
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--batch-size", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    check_compile("inductor", None, args.device)
    pipe = load_pipeline(args.model, device=args.device)

    def run(caption=args.caption, subject=args.subject, seed=0):
        with torch.no_grad():
            return trace_unet(pipe, caption, subject, seed, steps=args.steps, guidance=args.guidance,
                              batch_size=args.batch_size)

    def timed(repeats: int):
        times, out = [], None
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = run()
            times.append(time.perf_counter() - t0)
        return times, out

    res: dict = dict(model=args.model, device=args.device, steps=args.steps, batch_size=args.batch_size)
    run()  # warm-up (allocator, scheduler tables)
    times, ref = timed(args.repeats)
    res["eager_s"] = statistics.median(times)
    speed_up(pipe, channels_last=True)
    times, out = timed(args.repeats)
    res["channels_last_s"] = statistics.median(times)
    res["channels_last_max_diff"] = float((out.restored - ref.restored).abs().max())
    speed_up(pipe, compile=True)
    first, out = timed(1)
    res["compiled_first_call_s"] = first[0]
    times, out = timed(args.repeats)
    res["compiled_s"] = statistics.median(times)
    res["compiled_max_diff"] = float((out.restored - ref.restored).abs().max())
    t0 = time.perf_counter()
    run(*args.other, seed=1)
    res["compiled_other_caption_s"] = time.perf_counter() - t0
    res.update(layers=len(ref.labels), **machine_facts())
    print(json.dumps(res, indent=1))
    if args.out:
        write_json(args.out, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
