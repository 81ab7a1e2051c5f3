"""Test settings shared by the suite.

Hypothesis profiles: ``ci`` (default: derandomized, so every run checks the same examples and
CI cannot flake), ``thorough`` (random, many examples) and ``quick`` (derandomized, 3 examples:
``benchmarks/gpu_check.sh`` runs the CUDA cases in a few minutes with it), chosen with the
environment variable ``HYPOTHESIS_PROFILE=thorough``.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

from attnzoo.integrations._torchvision import ensure_importable as _ensure_torchvision_importable

# timm needs torchvision, whose PyPI wheel (a CUDA build) cannot load its C++ ops beside our CPU
# torch and then fails at import; define the two operators it needs first (see that module).
# At conftest import, not in a fixture: test modules import timm/transformers while collected.
_ensure_torchvision_importable()

_COMMON = dict(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile("ci", max_examples=12, derandomize=True, **_COMMON)
settings.register_profile("thorough", max_examples=200, **_COMMON)
settings.register_profile("quick", max_examples=3, derandomize=True, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _results_db_in_tmp(tmp_path_factory, monkeypatch):
    """Benchmarks run by tests write a throwaway database, never the user's cache."""
    monkeypatch.setenv("ATTNZOO_DB", str(tmp_path_factory.getbasetemp() / "results.sqlite"))


@pytest.fixture
def one_thread():
    """torch on one intra-op thread for the test, restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
