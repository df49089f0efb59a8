"""Which share of a sweep this process runs, and on which device, under ``accelerate launch`` (or torchrun)."""

from __future__ import annotations

import os


def process_share() -> tuple[int, int]:
    """(index, count) of this process: ``accelerate.PartialState``'s, or the launcher's environment (``RANK`` /
    ``WORLD_SIZE`` of torchrun, which ``accelerate launch --multi_gpu`` uses even on a CPU-only machine, where
    ``PartialState`` reports a single process)."""
    from accelerate import PartialState

    state = PartialState()
    if state.num_processes > 1:
        return state.process_index, state.num_processes
    for rank, size in (("RANK", "WORLD_SIZE"), ("PMI_RANK", "PMI_SIZE"),
                       ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE")):
        if int(os.environ.get(size, "1")) > 1:
            return int(os.environ[rank]), int(os.environ[size])
    return 0, 1


def process_device(device: str) -> str:
    """The device this process runs on: accelerate's GPU for this process when ``device`` is ``"cuda"`` or
    ``"auto"`` and accelerate runs on CUDA; otherwise ``"auto"`` is the CPU (as :func:`lib.loading.resolve_device`
    resolves it without CUDA, on an Apple machine too), and any other value stays as given (``"cpu"`` on a GPU
    machine, ``"mps"``, one named GPU)."""
    from accelerate import PartialState

    state = PartialState()
    if device in ("auto", "cuda") and state.device.type == "cuda":
        return str(state.device)
    return "cpu" if device == "auto" else device
