"""lib.speed on the tiny SD v1 twin: channels-last and in-place compile keep names, hooks and (nearly) the numbers."""

import json
import subprocess
import sys

import pytest
import torch

from lib.paths import REPO_ROOT
from lib.speed import speed_up
from lib.tracing.layers import unet_layers
from lib.tracing.unet import trace_unet
from lib.twins import build_twin

CAPTION, SUBJECT = "a photo of a red car", "red car"
LAYERS = ["down_blocks.0.resnets.0", "mid_block.attentions.0.transformer_blocks.0.attn2", "up_blocks.1.resnets.2"]


def _trace(p):
    return trace_unet(p, CAPTION, SUBJECT, 0, LAYERS, steps=2, guidance=5.0, batch_size=8)


def _pipe():
    p = build_twin("sd-v1")
    p.set_progress_bar_config(disable=True)
    return p


def test_channels_last_traces_the_same():
    p = _pipe()
    ref = _trace(p)
    applied = speed_up(p, channels_last=True)
    assert applied == {"channels_last": True, "compile": False}
    w = p.unet.conv_in.weight
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    out = _trace(p)
    assert (out.restored - ref.restored).abs().max() < 1e-4 and (out.clean - ref.clean).abs().max() < 1e-4
    assert (ref.clean - ref.corrupted).abs().max() > 1e-3  # the comparison is not vacuous


def test_in_place_compile_keeps_layer_names_and_hooks():
    p = _pipe()
    names = unet_layers(p.unet)
    ref = _trace(p)
    applied = speed_up(p, compile=True, backend="eager")  # dynamo capture without inductor: seconds, not minutes
    assert applied["compile"] and applied["compile_backend"] == "eager"
    assert unet_layers(p.unet) == names and not any("_orig_mod" in n for n, _ in p.unet.named_modules())
    fired = []
    handle = p.unet.conv_out.register_forward_hook(lambda m, i, o: fired.append(o.shape[0]))
    try:
        out = _trace(p)
    finally:
        handle.remove()
    assert fired, "a forward hook registered after compiling did not fire"
    assert p.unet._compiled_call_impl is not None  # the UNet really runs through torch.compile
    assert (out.restored - ref.restored).abs().max() < 1e-4


def test_bad_compile_requests_are_one_line_errors():
    p = _pipe()
    with pytest.raises(ValueError, match="unknown torch.compile backend 'nope'"):
        speed_up(p, compile=True, backend="nope")
    with pytest.raises(ValueError, match="unknown torch.compile mode 'fast'"):
        speed_up(p, compile=True, mode="fast")
    assert p.unet._compiled_call_impl is None  # nothing was applied


def test_cudnn_benchmark_is_the_global_flag(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # restored after the test
    applied = speed_up(_pipe(), cudnn_benchmark=True)
    assert torch.backends.cudnn.benchmark and applied == {"channels_last": False, "compile": False,
                                                          "cudnn_benchmark": True}


def test_bench_records_the_speed_settings(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(REPO_ROOT / "benchmarks" / "bench.py"), "--size", "tiny", "--cases",
           "generate_sd14_b1", "--warmup", "0", "--repeats", "1", "--channels-last", "--cudnn-benchmark",
           "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    report = json.loads(out.read_text())
    assert report["speed"] == {"channels_last": True, "cudnn_benchmark": True}
    assert report["results"][0]["median_s"] > 0
