"""rz_kernels.build and cpu_ffi: which variant of the C++ CPU kernels runs, and how they are built."""

import os

import pytest

from rz_kernels import build, cpu_ffi
from rz_kernels.build import KernelBuildError, variant_named, variants_for


@pytest.fixture
def fresh_selection(monkeypatch):
    """cpu_ffi.selected() recomputed under the test's environment, and again afterwards."""
    for name in ("RZ_CPU_VARIANT", "RZ_CPU_KERNELS"):
        monkeypatch.delenv(name, raising=False)
    cpu_ffi.selected.cache_clear()
    yield monkeypatch
    cpu_ffi.selected.cache_clear()


def test_every_variant_is_declared_once_for_a_known_machine():
    names = [variant.name for variant in build.VARIANTS]
    assert len(names) == len(set(names))
    assert {variant.machine for variant in build.VARIANTS} <= {"x86_64", "aarch64"}
    for variant in build.VARIANTS:
        assert all(path.exists() for path in variant.inputs()), variant.name
    with pytest.raises(KeyError, match="no CPU kernel variant 'sse2'"):
        variant_named("sse2")


def test_the_best_built_variant_the_cpu_has_runs(fresh_selection):
    usable = [v for v in variants_for() if cpu_ffi.runnable(v) and cpu_ffi.built(v)]
    assert cpu_ffi.selected() == (usable[0] if usable else None)


def test_a_variant_can_be_forced_or_the_kernels_turned_off(fresh_selection):
    fresh_selection.setenv("RZ_CPU_KERNELS", "0")
    assert cpu_ffi.selected() is None
    fresh_selection.delenv("RZ_CPU_KERNELS")
    for variant in variants_for():
        cpu_ffi.selected.cache_clear()
        fresh_selection.setenv("RZ_CPU_VARIANT", variant.name)
        if cpu_ffi.runnable(variant) and cpu_ffi.built(variant):
            assert cpu_ffi.selected() == variant
        else:
            with pytest.raises(RuntimeError, match=f"RZ_CPU_VARIANT={variant.name}"):
                cpu_ffi.selected()


def test_a_variant_the_cpu_cannot_run_says_why():
    here = build.machine()
    lacking = build.Variant("future", here, (), (), ("no_such_feature",))
    assert not cpu_ffi.runnable(lacking)
    assert "no_such_feature" in cpu_ffi.why_not_runnable(lacking)
    elsewhere = build.Variant("elsewhere", "riscv64" if here != "riscv64" else "x86_64", (), (), ())
    assert not cpu_ffi.runnable(elsewhere)
    assert "riscv64" in cpu_ffi.why_not_runnable(elsewhere) or "x86_64" in cpu_ffi.why_not_runnable(elsewhere)


def test_a_library_older_than_its_sources_is_an_error(tmp_path, monkeypatch):
    variant = variants_for()[0] if variants_for() else build.VARIANTS[0]
    monkeypatch.setattr(build, "LIBRARY_DIR", tmp_path)
    variant.library.write_bytes(b"")
    os.utime(variant.library, (0, 0))
    with pytest.raises(cpu_ffi.StaleKernelsError, match="python -m rz_kernels build"):
        cpu_ffi.load.__wrapped__(variant)


def test_a_failed_compile_says_which_variant_and_why(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "false")
    with pytest.raises(KernelBuildError, match=f"compiling the {build.VARIANTS[0].name} CPU kernels failed"):
        build.build_variant(build.VARIANTS[0], tmp_path / "lib.so")
    assert not (tmp_path / "lib.so").exists()
