"""Shared fixtures: offline, deterministic, small."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

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
