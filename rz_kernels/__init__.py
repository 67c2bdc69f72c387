"""Compute kernels for rz: fused-dequantization matmuls and attention, each with a pure-jnp reference."""
