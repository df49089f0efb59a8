"""Shared fixtures: offline, deterministic, small."""

import atexit
import os
import shutil
import tempfile

# Offline whatever the caller's environment says, with an empty Hugging Face home: no test reaches a hub, and none
# reads (or writes) a user's cached weights.
os.environ["HF_HUB_OFFLINE"] = os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="t2i-probe-hf-home-")
atexit.register(shutil.rmtree, os.environ["HF_HOME"], True)

import huggingface_hub.constants as hub  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

if not hub.HF_HUB_OFFLINE or hub.HF_HOME != os.environ["HF_HOME"]:
    raise RuntimeError("huggingface_hub was imported before tests/conftest.py made it offline")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def twin_dirs(tmp_path_factory):
    """The three tiny shape twins saved as diffusers folders (built once per test session)."""
    from lib.twins import FAMILIES, build_twin

    root = tmp_path_factory.mktemp("twins")
    out = {}
    for fam in FAMILIES:
        build_twin(fam).save_pretrained(root / fam)
        out[fam] = root / fam
    return out


@pytest.fixture
def dead_pid():
    """The pid of a process that has exited (a killed writer's, for temporary-file clean-up); drawn afresh for each
    test, since over a long session the system may hand an exited pid to a new process or thread."""
    import subprocess
    import sys

    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True, timeout=60).stdout)


class PipelineLoaded(Exception):
    """Raised where ``lib.loading.load_pipeline`` would have loaded a model (fixture ``load_reached``)."""


@pytest.fixture
def load_reached(monkeypatch):
    """``lib.loading.load_pipeline`` replaced by a stand-in that raises :class:`PipelineLoaded`: a test sees that the
    checks let a run through to the (slow) load, or, with ``pytest.raises`` of another error, that they stopped it."""
    import lib.loading

    def load(*args, **kwargs):
        raise PipelineLoaded

    monkeypatch.setattr(lib.loading, "load_pipeline", load)
    return PipelineLoaded
