"""The sampler's truncation and draw as one C++ CPU kernel call (rz_kernels/cpu/sample_draw.cc).

rz.sampling.Sampler draws a row's token with top-k, top-p and min-p over its best candidates, and
redoes a row over the whole vocabulary where they do not hold its kept set. In XLA that is
several hundred instructions in every compiled step that samples (each decode variant, the first
token's step), and a compiled step keeps memory in proportion to its instructions. On CPU, with
the kernels built, the same steps run as one custom call; rz.sampling's XLA code stays the
reference and every other backend's path.
"""

import jax
import jax.numpy as jnp

from rz_kernels import cpu_ffi


def available() -> bool:
    """Whether this process can call the kernel (the CPU kernels are built and runnable here)."""
    return cpu_ffi.available()


def draw_cpu(penalized, frame_logits, frame_ids, full_lse, temperature, top_k, top_p, min_p, uniforms,
             variant: cpu_ffi.Variant | None = None) -> jax.Array:
    """Each row's token i32[B], drawn as rz.sampling.Sampler._draw draws it.

    penalized f32[B, V]; frame_logits f32[B, W] and frame_ids i32[B, W], the W best penalized
    logits best first (ties to the lowest id); full_lse f32[B], their log-sum-exp over the
    vocabulary; the row's settings temperature, top_p, min_p f32[B] and top_k i32[B]; uniforms
    f32[B] in [0, 1). A row whose temperature is not above 0 gets its frame's first id.
    """
    variant = cpu_ffi.active(variant)
    call = jax.ffi.ffi_call(
        cpu_ffi.sample_draw_target(variant), jax.ShapeDtypeStruct(penalized.shape[:1], jnp.int32), vmap_method="sequential"
    )
    f32, i32 = jnp.float32, jnp.int32
    return call(
        penalized.astype(f32), frame_logits.astype(f32), frame_ids.astype(i32), full_lse.astype(f32),
        temperature.astype(f32), top_k.astype(i32), top_p.astype(f32), min_p.astype(f32), uniforms.astype(f32),
    )
