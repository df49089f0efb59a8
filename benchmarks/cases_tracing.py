"""Tracing benchmark case: a whole UNet trace (every candidate layer) of one caption × seed, batched.

    python benchmarks/bench.py --cases trace_sd14_unet70 --size full --device cuda --dtype float16 --out trace.json

Full size: the SD v1.4 shape twin, 512 px, 50 DDIM steps, CFG 7.5, all 70 layers (the issue's target on an H100:
≤ 12 s, peak memory reported by the harness). ``TRACE_BATCH`` images share one denoising loop (clean + corrupted +
restored runs; 72 = everything in one loop); ``--size tiny`` runs the same code on the tiny twin in seconds.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib.tracing.layers import unet_layers  # noqa: E402
from lib.tracing.unet import trace_unet  # noqa: E402

CAPTION, SUBJECT = "a photo of a dog in the style of van gogh", "van gogh"
TRACE_BATCH = 72


def _trace(ctx):
    pipe = ctx.pipe("sd-v1")
    steps = 50 if ctx.size == "full" else 4
    layers = unet_layers(pipe.unet)

    @torch.no_grad()
    def run():
        torch.compiler.cudagraph_mark_step_begin()  # a new trace for CUDA graph trees (no-op without them)
        return trace_unet(pipe, CAPTION, SUBJECT, seed=0, steps=steps, guidance=7.5, batch_size=TRACE_BATCH)

    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    params = dict(layers=len(layers), steps=steps, resolution=side, guidance=7.5, images_per_loop=TRACE_BATCH,
                  caption=CAPTION, subject=SUBJECT)
    return run, params, {}


CASES = {"trace_sd14_unet70": _trace}
