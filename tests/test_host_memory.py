"""rz.host_memory: returning what one-off work freed."""

import gc
import weakref

from rz import host_memory


class _Cycle:
    def __init__(self):
        self.me = self


def test_release_unused_frees_reference_cycles_even_with_the_collector_off():
    cycle = _Cycle()
    ref = weakref.ref(cycle)
    del cycle
    gc.disable()
    try:
        assert ref() is not None
        host_memory.release_unused()
        assert ref() is None
    finally:
        gc.enable()


def test_malloc_trim_is_found_on_glibc_or_absent():
    trim = host_memory._malloc_trim()
    assert trim is None or callable(trim)
