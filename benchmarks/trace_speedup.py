"""Speed-up of the batched UNet tracing engine over one generation per layer, same model, same run.

    python benchmarks/trace_speedup.py --model toy --steps 10 --batch-size 24 --out trace_speedup.json

Times ``lib.tracing.unet.trace_unet`` (clean + corrupted + all restored runs in chunked batched loops) and
``trace_unet_reference`` (one clean run caching the layers, then one corrupted generation per layer) for the same
caption × seed × layers, alternating them ``--repeats`` times, checks they agree, and prints/writes the ratio.
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
from lib.tracing.layers import resolve_unet_layers  # noqa: E402
from lib.tracing.unet import trace_unet, trace_unet_reference  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy")
    ap.add_argument("--device", default="cpu", choices=("cpu",),
                    help="CPU only: these timings do not synchronise a GPU (GPU figures: bench.py)")
    ap.add_argument("--caption", default="a photo of a purple circle painted by picasso")
    ap.add_argument("--subject", default="circle")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--batch-size", type=int, default=24)
    ap.add_argument("--layers", type=int, default=None, help="only the first N candidate layers (default: all)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    pipe = load_pipeline(args.model, device=args.device)
    layers = resolve_unet_layers(pipe.unet)[: args.layers]
    kw = dict(steps=args.steps, guidance=args.guidance)
    with torch.no_grad():
        trace_unet(pipe, args.caption, args.subject, 0, layers[:2], batch_size=4, **kw)  # warm-up
        batched, reference, diff = [], [], 0.0
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            a = trace_unet(pipe, args.caption, args.subject, 0, layers, batch_size=args.batch_size, **kw)
            batched.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            b = trace_unet_reference(pipe, args.caption, args.subject, 0, layers, **kw)
            reference.append(time.perf_counter() - t0)
            diff = max(diff, float((a.restored - b.restored).abs().max()))
    res = dict(model=args.model, device=args.device, layers=len(layers), steps=args.steps, batch_size=args.batch_size,
               batched_s=statistics.median(batched), reference_s=statistics.median(reference),
               speedup=statistics.median(reference) / statistics.median(batched), max_abs_diff=diff, **machine_facts())
    print(json.dumps(res, indent=1))
    if args.out:
        write_json(args.out, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
