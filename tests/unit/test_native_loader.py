"""kernels/_native.py: the C++ kernels build with OpenMP, fall back to one thread without it, and
to the PyTorch paths without a toolchain, saying which in a warning (no build runs here)."""

from __future__ import annotations

import pytest

from attnzoo.kernels import _native


@pytest.fixture
def fresh_loader(monkeypatch):
    """load_kernel with an empty cache before and after the test (the real modules stay cached elsewhere)."""
    _native.load_kernel.cache_clear()
    yield monkeypatch
    _native.load_kernel.cache_clear()


def test_a_compiler_without_openmp_still_gets_the_kernel(fresh_loader):
    built = object()

    def build(stem, what, openmp):
        if openmp:
            raise RuntimeError("unsupported option '-fopenmp'")
        return built

    fresh_loader.setattr(_native, "_build", build)
    with pytest.warns(UserWarning, match="without OpenMP.*one thread"):
        assert _native.load_kernel("linear_scan", "linear-attention scan") is built


def test_no_toolchain_means_the_pytorch_path(fresh_loader):
    def build(stem, what, openmp):
        raise RuntimeError("no compiler")

    fresh_loader.setattr(_native, "_build", build)
    with pytest.warns(UserWarning, match="could not be built.*PyTorch path"):
        assert _native.load_kernel("linear_scan", "linear-attention scan") is None


def test_attnzoo_native_0_disables_the_kernels(fresh_loader):
    fresh_loader.setenv("ATTNZOO_NATIVE", "0")
    fresh_loader.setattr(_native, "_build", lambda *a: pytest.fail("built although disabled"))
    assert _native.load_kernel("linear_scan", "linear-attention scan") is None


def test_the_build_name_carries_the_flags(tmp_path):
    source = tmp_path / "k.cpp"
    source.write_text("int x;")
    assert _native._build_name("k", source, ["-O3"]) != _native._build_name("k", source, ["-O3", "-fopenmp"])
