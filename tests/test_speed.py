"""lib.speed on the tiny SD v1 twin: channels-last and in-place compile keep names, hooks and (nearly) the numbers."""

import json
import subprocess
import sys

import pytest
import torch

from lib.paths import REPO_ROOT
from lib.speed import cpu_threads, speed_up
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
    for kwargs, message in ((dict(backend="nope"), "unknown torch.compile backend 'nope'"),
                            (dict(mode="fast"), "unknown torch.compile mode 'fast'")):
        with pytest.raises(ValueError, match=message) as err:
            speed_up(p, compile=True, **kwargs)
        assert "\n" not in str(err.value), str(err.value)
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


# ------------------------------------------------------------------------------------------------- memory savings
def _residual_grad(p, steps: int = 3, k: int = 0):
    """Gradient of a latent-search loss (the mean image, any differentiable function of it will do) w.r.t. the
    initial latent, through ``steps - k`` differentiated UNet calls; and the bytes autograd stored for it."""
    from lib.sage.latent import Residual, sample_with_residual
    from lib.sampling import decode, encode, initial_latents
    from lib.speed import stored_activation_bytes

    z = initial_latents(p, [0, 1]).requires_grad_(True)
    c = encode(p, ["a photo of a cat", "a photo of a dog"])

    def forward():
        return (decode(p, sample_with_residual(p, z, c, steps, 5.0, Residual(step=k))) ** 2).mean()

    loss, stored = stored_activation_bytes(forward, exclude=(p.unet, p.vae, p.text_encoder))
    (g,) = torch.autograd.grad(loss, z)
    return g, stored


@pytest.fixture
def one_thread():
    with cpu_threads(1):  # later test files keep conftest's thread count
        yield


def test_cpu_threads_gives_the_count_back():
    start = torch.get_num_threads()
    with cpu_threads(start + 2):
        assert torch.get_num_threads() == start + 2
        torch.set_num_threads(start + 1)  # the block sets another count itself
    assert torch.get_num_threads() == start
    with pytest.raises(KeyError), cpu_threads(start + 1):
        raise KeyError("the block fails")
    assert torch.get_num_threads() == start
    with cpu_threads(None):  # None: the count as it is
        assert torch.get_num_threads() == start

    @cpu_threads()
    def sets(n: int, inner: int | None = None) -> int:
        torch.set_num_threads(n)
        if inner is not None:  # the same decorator entered again by a nested call
            assert sets(inner) == inner and torch.get_num_threads() == n
        return torch.get_num_threads()

    assert sets(start + 3, inner=start + 1) == start + 3 and torch.get_num_threads() == start


def test_checkpointing_keeps_the_gradient_and_stores_less(one_thread):
    from lib.speed import save_memory

    p = _pipe()
    ref, plain = _residual_grad(p)
    _, plain1 = _residual_grad(p, k=2)  # one differentiated step instead of three
    assert save_memory(p, "blocks", vae_slicing=True) == {"checkpointing": "blocks", "vae_slicing": True}
    assert p.unet.is_gradient_checkpointing and p.vae.is_gradient_checkpointing and p.vae.use_slicing
    g, blocks = _residual_grad(p)
    assert torch.allclose(g, ref, rtol=1e-5, atol=1e-7) and ref.abs().sum() > 0
    assert blocks < plain
    for mode in ("steps", "steps+blocks"):
        assert save_memory(p, mode) == {"checkpointing": mode, "vae_slicing": False}
        assert p.unet.is_gradient_checkpointing == (mode == "steps+blocks") and p.vae.is_gradient_checkpointing
        g, stored3 = _residual_grad(p)
        _, stored1 = _residual_grad(p, k=2)
        assert torch.allclose(g, ref, rtol=1e-5, atol=1e-7), mode
        # per differentiated step only the call's inputs are kept (latent-sized), not its activations
        assert (stored3 - stored1) / 2 < 0.02 * (plain - plain1) / 2, mode
        assert stored3 < blocks
    save_memory(p, None)
    assert not p.unet.is_gradient_checkpointing and not p.vae.is_gradient_checkpointing
    g, off = _residual_grad(p)
    assert torch.equal(g, ref) and off == plain


def test_bad_checkpointing_is_a_one_line_error():
    from lib.speed import save_memory

    with pytest.raises(ValueError, match="unknown checkpointing 'layers'; choose one of") as err:
        save_memory(_pipe(), "layers")
    assert "\n" not in str(err.value), str(err.value)
