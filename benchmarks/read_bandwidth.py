"""The machine's read bandwidth: one process per thread, each summing its own array far larger
than the caches, started together; bytes read by all of them over the slowest one's time.

A decode step only reads its weights, so its GB/s compares with this figure; `python -m rz.bench`
reports the copy bandwidth (bytes read plus bytes written), a different roofline.

    python benchmarks/read_bandwidth.py [--threads 2] [--gib 1] [--repeats 5]
"""

import argparse
import multiprocessing as mp
import time

import numpy as np


def _reader(gib: float, repeats: int, barrier, results) -> None:
    array = np.ones(int(gib * (1 << 30)) // 4, np.float32)
    seconds = []
    for _ in range(repeats):
        barrier.wait()
        started = time.perf_counter()
        array.sum()
        seconds.append(time.perf_counter() - started)
    results.put((array.nbytes, seconds))


def read_bandwidth(threads: int, gib: float, repeats: int) -> float:
    """Best over `repeats` of the GB/s that `threads` processes read together."""
    context = mp.get_context("spawn")
    barrier, results = context.Barrier(threads), context.Queue()
    workers = [context.Process(target=_reader, args=(gib, repeats, barrier, results)) for _ in range(threads)]
    for worker in workers:
        worker.start()
    outcomes = [results.get() for _ in workers]
    for worker in workers:
        worker.join()
    total_bytes = sum(nbytes for nbytes, _ in outcomes)
    slowest = [max(times) for times in zip(*(seconds for _, seconds in outcomes))]
    return total_bytes / min(slowest) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gib", type=float, default=1.0, help="GiB each process reads")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"read bandwidth, {args.threads} processes x {args.gib} GiB: {read_bandwidth(args.threads, args.gib, args.repeats):.1f} GB/s")


if __name__ == "__main__":
    main()
