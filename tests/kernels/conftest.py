"""The C++ CPU kernels' tests run once per variant of this machine, each skipped with the reason
where the CPU cannot run it or it is not built."""

import pytest

from rz_kernels import cpu_ffi
from rz_kernels.build import variants_for


@pytest.fixture(params=variants_for(), ids=lambda variant: variant.name)
def cpu_variant(request) -> cpu_ffi.Variant:
    variant = request.param
    reason = cpu_ffi.why_not_runnable(variant)
    if reason is None and not cpu_ffi.built(variant):
        reason = f"{variant.library} is not built (python -m rz_kernels build)"
    if reason:
        pytest.skip(reason)
    return variant
