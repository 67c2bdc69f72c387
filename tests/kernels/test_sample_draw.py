"""rz_kernels.sample_draw: the sampler's truncation and draw as one C++ call, against rz.sampling's
XLA ops (the reference) on the same candidates and uniform numbers.

Both take the same steps (the frame's cut, the unsorted redo where min-p alone truncates, the
sorted redo otherwise), so they draw the same tokens. The tolerance allows for float rounding:
an exp or a running sum rounded otherwise could move a draw whose uniform number lands on a
boundary between two candidates, a one-in-millions event per row.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rz.sampling import SamplingParams, SamplingTensors, _draw_xla, _top_k
from rz_kernels import cpu_ffi, sample_draw

pytestmark = pytest.mark.skipif(not cpu_ffi.available(), reason="the C++ CPU kernels cannot be built here")

# Settings that exercise every path: top-k inside and beyond the frame or off, top-p and min-p on
# and off, greedy rows (temperature 0) among sampled ones.
TEMPERATURES, TOP_KS, TOP_PS, MIN_PS = (0.0, 0.3, 0.8, 1.0, 2.5), (0, 1, 5, 40, 300, 5000), (1.0, 0.99, 0.95, 0.5), (0.0, 0.001, 0.05, 0.2)


def random_rows(rng, n):
    return [
        SamplingParams(
            temperature=float(rng.choice(TEMPERATURES)), top_k=int(rng.choice(TOP_KS)),
            top_p=float(rng.choice(TOP_PS)), min_p=float(rng.choice(MIN_PS)), seed=row,
        )
        for row in range(n)
    ]


@pytest.mark.parametrize("frame", [256, 16], ids=["frame-holds-most", "redo-paths"])
def test_the_kernel_draws_what_the_xla_ops_draw(frame):
    rng = np.random.default_rng(frame)
    batch, vocab = 384, 3000
    params = SamplingTensors.from_params(random_rows(rng, batch))
    # Flat and peaked rows: a flat one's kept set outgrows the frame.
    logits = jnp.asarray(rng.normal(size=(batch, vocab)) * rng.choice([0.5, 2.0, 6.0], size=(batch, 1)), jnp.float32)
    uniforms = jnp.asarray(rng.random(batch), jnp.float32)

    def operands(penalized):
        frame_logits, frame_ids = _top_k(penalized, frame)
        full_lse = jax.nn.logsumexp(penalized, axis=-1)
        return (penalized, frame_logits, frame_ids, full_lse, params.temperature, params.top_k, params.top_p, params.min_p, uniforms)

    expected = np.asarray(jax.jit(lambda p: _draw_xla(*operands(p)))(logits))
    drawn = np.asarray(jax.jit(lambda p: sample_draw.draw_cpu(*operands(p)))(logits))
    sampling = np.asarray(params.temperature) > 0
    assert sampling.sum() > batch // 2
    assert np.mean(drawn[sampling] != expected[sampling]) <= 0.01
    frames = np.asarray(operands(logits)[2])
    np.testing.assert_array_equal(drawn[~sampling], frames[~sampling, 0])  # greedy rows: the frame's first


def test_shapes_that_do_not_fit_are_errors():
    penalized = jnp.zeros((2, 8), jnp.float32)
    row = jnp.zeros((2,), jnp.float32)
    with pytest.raises(Exception, match="rz_sample_draw"):
        # A frame wider than the vocabulary.
        jax.jit(sample_draw.draw_cpu)(penalized, jnp.zeros((2, 9)), jnp.zeros((2, 9), jnp.int32), row, row, jnp.zeros(2, jnp.int32), row, row, row).block_until_ready()
