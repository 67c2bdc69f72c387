"""Shape buckets: the explicit ladder of prompt-chunk lengths the compiled steps are built for.

Every compiled step has a fixed shape, so a prompt is cut into chunks whose padded lengths come
from a short ladder of powers of two. After each length of the ladder has been seen once, a
session never compiles again, however long it runs.
"""

from dataclasses import dataclass

MIN_PREFILL_BUCKET = 16
MAX_PREFILL_BUCKET = 512


def _ladder(smallest: int, largest: int) -> tuple[int, ...]:
    """Powers of two from smallest while below largest, then largest itself."""
    ladder = []
    length = smallest
    while length < largest:
        ladder.append(length)
        length *= 2
    ladder.append(largest)
    return tuple(sorted(set(ladder)))


@dataclass(frozen=True)
class Buckets:
    prefill: tuple[int, ...]  # ascending chunk lengths; a longer prompt is split into the largest
    # Ascending cache sizes a prompt is prefilled into (then copied into its decode slot): a short
    # prompt neither allocates nor attends over the whole context.
    context: tuple[int, ...] = ()

    @classmethod
    def for_context(cls, n_ctx: int, smallest: int = MIN_PREFILL_BUCKET, largest: int = MAX_PREFILL_BUCKET):
        n_ctx = max(n_ctx, 1)
        prefill = _ladder(min(smallest, n_ctx), min(largest, n_ctx))
        return cls(prefill=prefill, context=_ladder(min(smallest, n_ctx), n_ctx))

    def context_bucket(self, n_tokens: int) -> int:
        """The smallest cache size that holds n_tokens positions (the context size at most)."""
        for size in self.context:
            if size >= n_tokens:
                return size
        return self.context[-1]

    def prefill_bucket(self, n_tokens: int) -> int:
        """The smallest chunk length that holds n_tokens (the largest if none does)."""
        for length in self.prefill:
            if length >= n_tokens:
                return length
        return self.prefill[-1]

    def chunks(self, n_tokens: int):
        """(start, padded length) of each chunk covering n_tokens tokens."""
        start = 0
        while start < n_tokens:
            bucket = self.prefill_bucket(n_tokens - start)
            yield start, bucket
            start += bucket
