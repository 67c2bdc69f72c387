"""The machine's memory bandwidth, measured, and the bandwidth a decode rate implies.

Decoding one token reads every weight once, so weight bytes per token x tokens per second is the
bandwidth an engine achieves (gpt-fast's figure); next to the machine's measured STREAM-style
copy bandwidth it says how close decode runs to the hardware limit (roofline, Williams et al.).
"""

import threading
import time

import numpy as np

DEFAULT_BYTES = 256 << 20  # per array: well past any last-level cache


def measure_copy_bandwidth(threads: int, array_bytes: int = DEFAULT_BYTES, repeats: int = 5) -> dict:
    """Best-of-`repeats` copy bandwidth over `threads` threads, counting bytes read plus bytes written."""
    source = np.ones(array_bytes // 8, dtype=np.float64)
    target = np.empty_like(source)
    parts = np.array_split(np.arange(len(source)), max(threads, 1))
    bounds = [(int(p[0]), int(p[-1]) + 1) for p in parts if len(p)]

    def copy(start: int, stop: int) -> None:
        np.copyto(target[start:stop], source[start:stop])  # NumPy releases the GIL for the copy

    best = float("inf")
    for _ in range(repeats):
        workers = [threading.Thread(target=copy, args=bound) for bound in bounds]
        started = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        best = min(best, time.perf_counter() - started)
    moved = 2 * source.nbytes
    return {"method": "numpy copy, read + write bytes, best of repeats", "threads": len(bounds),
            "array_bytes": int(source.nbytes), "repeats": repeats, "gb_per_s": moved / best / 1e9}


def achieved_bandwidth(weight_bytes_per_token: int, tokens_per_second: float, batch: int, machine_gb_per_s: float | None) -> dict:
    """GB/s of weights read at a decode rate (one read per step, shared by a batch) and its share of the machine's."""
    gb_per_s = weight_bytes_per_token * tokens_per_second / max(batch, 1) / 1e9
    return {
        "achieved_gb_per_s": gb_per_s,
        "fraction_of_machine": gb_per_s / machine_gb_per_s if machine_gb_per_s else None,
    }
