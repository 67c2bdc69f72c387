"""Shape buckets: every prompt length maps to one of a few shapes, and chunks cover the prompt."""

import pytest

from rz.buckets import TAIL_CHUNK, Buckets, batch_ladder


def test_context_ladder_ends_at_the_context_size():
    assert Buckets.for_context(4096).context == (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
    assert Buckets.for_context(300).context == (8, 16, 32, 64, 128, 256, 300)
    assert Buckets.for_context(8).context == (8,)
    assert Buckets.for_context(5).context == (5,)


@pytest.mark.parametrize("n_ctx", [8, 300, 4096])
def test_chunks_cover_every_prompt_with_one_shape_per_context_bucket_and_its_tail(n_ctx):
    """One chunk length per context bucket, and for a last chunk of at most TAIL_CHUNK tokens
    after others, the reused-prefix tail's shape (which a bucket compiles anyway)."""
    buckets = Buckets.for_context(n_ctx)
    shapes = set()
    for n in range(1, n_ctx + 1):
        context = buckets.context_bucket(n)
        chunks = list(buckets.chunks(n))
        assert context >= n
        assert chunks[0][0] == 0 and chunks[-1][0] + chunks[-1][1] >= n
        assert all(b[0] == a[0] + a[1] for a, b in zip(chunks, chunks[1:]))
        shapes.add((context, chunks[0][1]))
        assert {length for _, length in chunks[:-1]} <= {chunks[0][1]}
        last_start, last_length = chunks[-1]
        if last_start and n - last_start <= TAIL_CHUNK:
            assert last_length == min(TAIL_CHUNK, chunks[0][1])
        else:
            assert last_length == chunks[0][1]
    assert len(shapes) == len(buckets.context)


@pytest.mark.parametrize("n_ctx", [300, 4096])
def test_a_tail_after_a_reused_prefix_runs_in_the_shape_that_pads_least(n_ctx):
    """A chat turn's new tokens: TAIL_CHUNK-long chunks when they pad less than the context's
    chunks, so 132 tokens take 2 x 128 positions, not 512; never more padding than before."""
    buckets = Buckets.for_context(n_ctx)
    for start in (1, 100, 250):
        for n in range(start + 1, n_ctx + 1, 7):
            context = buckets.context_bucket(n)
            chunks = buckets.tail_chunks(start, n, context)
            own = buckets.chunk_length(context)
            lengths = {length for _, length in chunks}
            assert len(lengths) == 1 and lengths <= {min(TAIL_CHUNK, own), own}
            assert chunks[0][0] == start and chunks[-1][0] + chunks[-1][1] >= n
            assert all(b[0] == a[0] + a[1] for a, b in zip(chunks, chunks[1:]))
            assert len(chunks) * chunks[0][1] <= -(-(n - start) // own) * own
    context = buckets.context_bucket(266)
    assert buckets.tail_chunks(134, 266, context) == ((134, 128), (262, 128))


def test_batch_ladder():
    assert batch_ladder(1) == (1,)
    assert batch_ladder(8) == (1, 2, 4, 8)
    assert batch_ladder(6) == (1, 2, 4, 6)
