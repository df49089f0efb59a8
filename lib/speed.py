"""Optional speed-ups for the long UNet loops (tracing sweeps, latent searches): channels-last and ``torch.compile``;
and memory savings for the searches that differentiate through the sampler (SAGE): :func:`save_memory`.

``speed_up(pipe, channels_last=True, compile=True)`` changes a pipeline in place and returns what it applied (for a
benchmark record). Both change results only in the last bits: on the toy UNet (CPU, fp32, a 4-step trace of 24 images
per loop) the traced images differ from eager by at most 6.3e-5 (channels-last) and 4.2e-5 (compiled).

The UNet is compiled with :meth:`torch.nn.Module.compile`, in place: module names stay as they are (no ``_orig_mod.``
prefix, so :func:`lib.tracing.layers.unet_layers` and saved layer names still match) and the forward hooks that
tracing and editing register keep firing. Compilation is lazy: the first call compiles (on a CPU with inductor this
takes minutes for the toy UNet), and so does each new batch shape and each new set of hooked modules (dynamo guards
on the hooks: a trace split into several loops compiles once per loop's layer set; later traces with other prompts
or seeds reuse them). Past dynamo's recompile limit (``torch._dynamo.config.recompile_limit``, 8 by default) a
function runs eager: prefer a tracing ``batch_size`` that holds all layers in one loop, or raise the limit.

:func:`cpu_threads` runs a block (or, as a decorator, a function) with a set number of CPU threads and gives the
caller back its own count afterwards: the toy world's trainers use it, so a notebook that trains goes on with its
own thread count (and its numbers) afterwards.

``cudnn_benchmark=True`` sets the process-wide ``torch.backends.cudnn.benchmark`` (cuDNN times its convolution
algorithms once per shape and keeps the fastest): it pays off in loops that repeat one shape many times.
"""

from __future__ import annotations

import contextlib
import shutil

import torch

COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CHECKPOINTING = (None, "blocks", "steps", "steps+blocks")


def check_compile(backend: str, mode: str | None, device: torch.device | str) -> None:
    """Raise a one-line ``ValueError``/``RuntimeError`` for a compile request that could only fail at the first call."""
    import torch._dynamo

    backends = torch._dynamo.list_backends(exclude_tags=())
    if backend not in backends:
        raise ValueError(f"unknown torch.compile backend {backend!r}; available: {', '.join(sorted(backends))}")
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown torch.compile mode {mode!r}; choose one of {COMPILE_MODES}")
    if backend == "inductor" and torch.device(device).type == "cpu" and not (shutil.which("cc") or shutil.which("gcc")
                                                                             or shutil.which("clang")):
        raise RuntimeError("torch.compile with inductor on a CPU needs a C compiler (cc/gcc/clang) on PATH; "
                           "install one or use compile=False")


def speed_up(pipe, channels_last: bool = False, compile: bool = False, mode: str | None = None,
             backend: str = "inductor", cudnn_benchmark: bool = False) -> dict:
    """Put the UNet and VAE in channels-last memory format, compile the UNet in place and/or let cuDNN pick its
    fastest convolutions; returns the settings.

    Call it after moving the pipeline to its device and dtype; gradient checkpointing or VAE slicing may be enabled
    before or after (nothing is compiled before the first call).
    """
    if compile:
        check_compile(backend, mode, pipe.unet.device)
    applied: dict = {"channels_last": bool(channels_last), "compile": bool(compile)}
    if cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
        applied["cudnn_benchmark"] = True
    if channels_last:
        for module in (pipe.unet, getattr(pipe, "vae", None)):
            if module is not None:
                module.to(memory_format=torch.channels_last)
    if compile:
        pipe.unet.compile(backend=backend, mode=mode)
        applied.update(compile_backend=backend, compile_mode=mode or "default")
    return applied


def save_memory(pipe, checkpointing: str | None = None, vae_slicing: bool = False) -> dict:
    """Trade compute for memory in gradient passes through the sampler; returns the settings.

    ``checkpointing`` (the VAE decoder's blocks are checkpointed in every mode but ``None``):

    * ``"blocks"``: diffusers' gradient checkpointing of the UNet's blocks: each block's inner activations are
      recomputed in the backward pass, but the block boundaries of every differentiated UNet call stay stored, so
      memory still grows with the number of differentiated steps (the SD v1.4 twin at 512 px, float32, CPU:
      0.58 GiB per image and step);
    * ``"steps"``: each differentiated UNet call is checkpointed whole (:func:`lib.sampling.set_step_checkpointing`):
      only its inputs are stored, and the backward pass recomputes one call at a time with all its activations
      (same twin: 3.5 GiB per image, once). About the recomputation of ``"blocks"`` (the whole call, not only its
      blocks);
    * ``"steps+blocks"``: both, nested: the least memory (one call's block boundaries at a time), one more forward.

    ``vae_slicing``: decode one image at a time. None of them changes a result beyond the last bits; without
    gradients (sampling, tracing) none has an effect.
    """
    from lib.sampling import set_step_checkpointing

    if checkpointing not in CHECKPOINTING:
        raise ValueError(f"unknown checkpointing {checkpointing!r}; choose one of {CHECKPOINTING}")
    for module, on in ((pipe.unet, checkpointing in ("blocks", "steps+blocks")), (pipe.vae, checkpointing is not None)):
        if on:
            module.enable_gradient_checkpointing()
        elif module.is_gradient_checkpointing:
            module.disable_gradient_checkpointing()
    set_step_checkpointing(pipe, checkpointing in ("steps", "steps+blocks"))
    if vae_slicing:
        pipe.vae.enable_slicing()
    else:
        pipe.vae.disable_slicing()
    return {"checkpointing": checkpointing or "none", "vae_slicing": bool(vae_slicing)}


def stored_activation_bytes(fn, exclude: tuple[torch.nn.Module, ...] = ()) -> tuple[object, int]:
    """Run ``fn()`` and return (its result, the bytes of the distinct tensors autograd stored for the backward pass).

    Tensors stored inside checkpointed regions are not counted (they are recomputed, not kept); storages of the
    parameters of ``exclude`` are not counted either (weights are in memory anyway). A device-independent measure of
    what a gradient pass keeps alive, e.g. to compare :func:`save_memory` settings on a CPU.
    """
    skip = {p.untyped_storage().data_ptr() for m in exclude for p in m.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


class cpu_threads(contextlib.ContextDecorator):
    """``with cpu_threads(n):`` runs the block with ``n`` intra-op CPU threads (``None`` or 0: the count as it is) and
    then restores the count it found, also when the block raises or set another count itself. As ``@cpu_threads()``,
    it restores the caller's count after each call of a function that sets its own."""

    def __init__(self, n: int | None = None):
        self.n = n
        self._before: list[int] = []  # a stack: the same decorator may be entered again by a nested call

    def __enter__(self) -> "cpu_threads":
        before = torch.get_num_threads()
        if self.n:
            torch.set_num_threads(self.n)  # a bad count raises here, before anything is pushed
        self._before.append(before)
        return self

    def __exit__(self, *exc) -> bool:
        before = self._before.pop()
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
        return False


def median_seconds(fn, repeats: int = 5) -> float:
    """The median wall-clock seconds of ``repeats`` calls of ``fn()`` (a quick timing for a notebook table; the
    benchmarks in ``benchmarks/`` add warm-ups, CUDA synchronisation and memory)."""
    import statistics
    import time

    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(statistics.median(times))
