"""Shared fixtures: hermetic cache dir, seeded RNG, quiet threads."""

import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _hermetic(tmp_path, monkeypatch):
    # No test may read or write the user's cache, or depend on what an earlier run left there.
    monkeypatch.setenv("SPARSECOMP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    yield


def pytest_configure(config):
    # Two xdist workers share two cores: one torch thread each avoids oversubscription.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
