"""Shape buckets: the explicit ladders the compiled steps are built for.

Every compiled step has a fixed shape. A prompt of n tokens is prefilled straight into its slot's
blocks of the KV cache, in chunks of the length of the smallest context bucket that holds it
(powers of two from 8, the last one the context size), at most MAX_PREFILL_BUCKET, or of the
bucket's below when that runs fewer positions, the last chunk in the smallest bucket that holds
its tokens: one prefill shape per bucket, so a prompt does not run a chunk mostly of padding, and
the set of shapes stays small. Decode steps run on the first rows of the slots, in powers of two
(batch_ladder). After each bucket has been seen once, a session never compiles again.
"""

from dataclasses import dataclass

MIN_PREFILL_BUCKET = 8  # a short prompt (a chat turn, a benchmark's seed) pads to 8, not 16
MAX_PREFILL_BUCKET = 512
# A prompt whose prefix a slot already holds prefills only its tail: a tail this short (a chat
# turn, a question after a shared system prompt) runs in one chunk of this length rather than
# of its context's, which would be mostly padding. One more prefill shape per larger context.
TAIL_CHUNK = 128
# Tokens per row of a speculative verify step (rz.steps.verify): the last token and up to
# width - 1 drafts, padded to the smallest width that holds them.
VERIFY_WIDTHS = (2, 4, 8)


def ladder(smallest: int, largest: int) -> tuple[int, ...]:
    """Powers of two from smallest while below largest, then largest itself."""
    sizes = []
    size = smallest
    while size < largest:
        sizes.append(size)
        size *= 2
    sizes.append(largest)
    return tuple(sorted(set(sizes)))


@dataclass(frozen=True)
class Buckets:
    context: tuple[int, ...]  # ascending cache sizes a prompt is prefilled into; the last is n_ctx
    max_chunk: int = MAX_PREFILL_BUCKET  # a longer prompt is prefilled in chunks of this length

    @classmethod
    def for_context(cls, n_ctx: int, smallest: int = MIN_PREFILL_BUCKET, largest: int = MAX_PREFILL_BUCKET):
        n_ctx = max(n_ctx, 1)
        return cls(context=ladder(min(smallest, n_ctx), n_ctx), max_chunk=min(largest, n_ctx))

    def context_bucket(self, n_tokens: int) -> int:
        """The smallest cache size that holds n_tokens positions (the context size at most)."""
        for size in self.context:
            if size >= n_tokens:
                return size
        return self.context[-1]

    def chunk_length(self, n_tokens: int) -> int:
        """The padded length of each prefill chunk of an n_tokens prompt."""
        return min(self.context_bucket(n_tokens), self.max_chunk)

    def tail_chunks(self, start: int, n_tokens: int, context: int) -> tuple[tuple[int, int], ...]:
        """(start, padded length) of each chunk of a prompt's tokens [start, n_tokens) after a
        reused prefix, in a cache of `context` positions: in the context's own chunks, TAIL_CHUNK-long
        ones or the bucket below the context's, whichever runs the fewest positions (a 300-token chat
        turn: 256 and 64, not 512), the last chunk in the smallest bucket that holds its tokens."""
        own = self.chunk_length(context)
        return _fewest_positions(self._chunked(start, n_tokens, length) for length in (own, self._below(own), min(TAIL_CHUNK, own)))

    def chunks(self, n_tokens: int, context: int = 0) -> tuple[tuple[int, int], ...]:
        """(start, padded length) of each chunk covering n_tokens tokens: in their bucket's chunks or
        the bucket's below, whichever runs fewer positions, the last of several in the smallest bucket
        that holds its tokens (a 134-token prompt: 128 and 8, not 256; scoring 1,100 tokens: 512, 512
        and 128). Given a larger context, one chunk of that context's length: that is how the warm-up
        compiles each bucket's shape with a one-token prompt."""
        if context > n_tokens:
            return self._chunked(0, n_tokens, self.chunk_length(context))
        own = self.chunk_length(n_tokens)
        return _fewest_positions(self._chunked(0, n_tokens, length) for length in (own, self._below(own)))

    def _below(self, length: int) -> int:
        """The chunk length of the context bucket below the one whose chunks are `length` long (itself if none)."""
        return max((self.chunk_length(size) for size in self.context if self.chunk_length(size) < length), default=length)

    def _chunked(self, start: int, n_tokens: int, length: int) -> tuple[tuple[int, int], ...]:
        """Chunks of `length` from start, the last of several shrunk to the smallest bucket that
        holds its tokens: every bucket's chunk length is a compiled prefill shape, so this
        compiles nothing more, and a chat turn's 15 tokens past a chunk run as 16, not 128."""
        starts = range(start, n_tokens, length)
        return tuple(
            (chunk, min(length, self.chunk_length(n_tokens - chunk)) if chunk else length) for chunk in starts
        )


def _fewest_positions(candidates) -> tuple[tuple[int, int], ...]:
    """The chunking that runs the fewest positions through the model; on a tie, the one of fewer
    (larger) calls, the first given on a full tie: a call's fixed cost and a small chunk's lower
    throughput are why padding is not all that counts."""
    return min(candidates, key=lambda chunks: (sum(length for _, length in chunks), len(chunks)))


def batch_ladder(n_slots: int) -> tuple[int, ...]:
    """The row counts a decode step is compiled for: powers of two up to n_slots, and n_slots."""
    return ladder(1, max(n_slots, 1))
