"""Shape buckets: every prompt length maps to one of a few shapes, and chunks cover the prompt."""

import pytest

from rz.buckets import TAIL_CHUNK, Buckets, batch_ladder


def test_context_ladder_ends_at_the_context_size():
    assert Buckets.for_context(4096).context == (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
    assert Buckets.for_context(300).context == (8, 16, 32, 64, 128, 256, 300)
    assert Buckets.for_context(8).context == (8,)
    assert Buckets.for_context(5).context == (5,)


def _covers(chunks, start, n):
    """The chunks start at `start`, follow each other, and hold every token up to n."""
    assert chunks[0][0] == start and chunks[-1][0] + chunks[-1][1] >= n > chunks[-1][0]
    assert all(b[0] == a[0] + a[1] for a, b in zip(chunks, chunks[1:]))


def _positions(chunks) -> int:
    return sum(length for _, length in chunks)


def _padded(n_tokens: int, length: int) -> int:
    return -(-n_tokens // length) * length


@pytest.mark.parametrize("n_ctx", [8, 300, 4096])
def test_chunks_cover_every_prompt_in_compiled_shapes_with_the_least_padding(n_ctx):
    """A prompt runs in its bucket's chunks or the bucket's below, whichever pads less, the last of
    several in the smallest bucket that holds its tokens: every length is a bucket's chunk length,
    a shape the warm-up compiles."""
    buckets = Buckets.for_context(n_ctx)
    compiled = {buckets.chunk_length(context) for context in buckets.context}
    for n in range(1, n_ctx + 1):
        chunks = buckets.chunks(n)
        _covers(chunks, 0, n)
        own = buckets.chunk_length(n)
        assert {length for _, length in chunks} <= compiled
        assert {length for _, length in chunks[:-1]} <= {chunks[0][1]} and chunks[0][1] <= own
        if len(chunks) > 1:
            assert chunks[-1][1] == buckets.chunk_length(n - chunks[-1][0])
        assert _positions(chunks) <= _padded(n, own)
    large = Buckets.for_context(4096)
    assert large.chunks(134) == ((0, 128), (128, 8))
    assert large.chunks(200) == ((0, 256),)  # 128 + 128 would run as many positions in two calls
    assert large.chunks(700) == ((0, 512), (512, 256))
    assert large.chunks(1100) == ((0, 512), (512, 512), (1024, 128))
    assert large.chunks(1, 4096) == ((0, 512),)  # a larger context: one chunk of its length


@pytest.mark.parametrize("n_ctx", [300, 4096])
def test_a_tail_after_a_reused_prefix_runs_in_the_shapes_that_pad_least(n_ctx):
    """A chat turn's new tokens: the context's chunks, the bucket's below or TAIL_CHUNK-long ones,
    whichever pad least, the last in the smallest compiled shape that holds its tokens, so 143
    tokens run as 128 + 16 positions, not 2 x 128 or 512."""
    buckets = Buckets.for_context(n_ctx)
    compiled = {buckets.chunk_length(context) for context in buckets.context}
    for start in (1, 100, 250):
        for n in range(start + 1, n_ctx + 1, 7):
            context = buckets.context_bucket(n)
            chunks = buckets.tail_chunks(start, n, context)
            own = buckets.chunk_length(context)
            _covers(chunks, start, n)
            assert {length for _, length in chunks} <= compiled
            assert {length for _, length in chunks[:-1]} <= {chunks[0][1]} and chunks[0][1] <= own
            assert chunks[-1][1] == buckets.chunk_length(n - chunks[-1][0])
            assert _positions(chunks) <= min(_padded(n - start, own), _padded(n - start, min(TAIL_CHUNK, own)))
    context = buckets.context_bucket(527)
    assert buckets.tail_chunks(384, 527, context) == ((384, 128), (512, 16))
    assert buckets.tail_chunks(128, 140, context) == ((128, 16),)


def test_batch_ladder():
    assert batch_ladder(1) == (1,)
    assert batch_ladder(8) == (1, 2, 4, 8)
    assert batch_ladder(6) == (1, 2, 4, 6)
