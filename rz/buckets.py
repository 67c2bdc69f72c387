"""Shape buckets: the explicit ladders the compiled steps are built for.

Every compiled step has a fixed shape. A prompt of n tokens is prefilled straight into its slot's
blocks of the KV cache, in chunks of the length of the smallest context bucket that holds it
(powers of two from 8, the last one the context size), at most MAX_PREFILL_BUCKET: one prefill
shape per chunk length, so a short prompt does not run a chunk mostly of padding, and the set of
shapes stays small. Decode steps run on the first rows of the slots, in powers of two
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
        reused prefix, in a cache of `context` positions: in TAIL_CHUNK-long chunks when they pad
        fewer tokens than the context's own chunks would (a 132-token chat turn: two of 128, not
        one of 512), else in the context's."""
        n_tail = n_tokens - start
        length = self.chunk_length(context)
        tail = min(TAIL_CHUNK, length)
        if _padded(n_tail, tail) < _padded(n_tail, length):
            length = tail
        return tuple((chunk, length) for chunk in range(start, n_tokens, length))

    def chunks(self, n_tokens: int, context: int = 0):
        """(start, padded length) of each chunk covering n_tokens tokens, in the chunks of the
        bucket for max(n_tokens, context) positions; the last of several chunks, when its tokens
        fit TAIL_CHUNK, in a chunk of that length (the reused-prefix tail's shape) rather than
        one mostly padding (scoring 1,100 tokens ran 1,536 through the model)."""
        length = self.chunk_length(max(n_tokens, context))
        tail = min(TAIL_CHUNK, length)
        for start in range(0, n_tokens, length):
            yield start, tail if start and n_tokens - start <= tail else length


def _padded(n_tokens: int, chunk: int) -> int:
    """The tokens n_tokens take in chunks of `chunk`, padding included."""
    return -(-n_tokens // chunk) * chunk


def batch_ladder(n_slots: int) -> tuple[int, ...]:
    """The row counts a decode step is compiled for: powers of two up to n_slots, and n_slots."""
    return ladder(1, max(n_slots, 1))
