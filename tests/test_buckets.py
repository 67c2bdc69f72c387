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
            assert last_length == buckets.tail_chunk_length(n - last_start, context)
        else:
            assert last_length == chunks[0][1]
    assert len(shapes) == len(buckets.context)


def test_batch_ladder():
    assert batch_ladder(1) == (1,)
    assert batch_ladder(8) == (1, 2, 4, 8)
    assert batch_ladder(6) == (1, 2, 4, 6)
