"""The aarch64 side of tests/kernels/test_neon_emulated.py, run by an emulated Python (qemu-aarch64).

    neon_emulated_run.py INPUTS.npz OUTPUTS.npz

Loads the NEON variant this (emulated) CPU selects from $RZ_CPU_KERNEL_DIR (cross-compiled by the
host), through rz_kernels.cpu_ffi as any user would, then calls the kernels through jax.ffi on the inputs the host prepared, and writes
their outputs (and what was selected) for the host to check against its references. Emulated SIMD
is 35-80x slower than native, so the host keeps the shapes small and computes every reference.
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from rz_kernels.ggml_types import GGMLType
from rz_kernels.quants import QTensor, QTensorStack
from rz_kernels import attention, attention_kv, cache_write, cpu_ffi, qmatmul, sample_draw, zero_pages
from rz_kernels.causal_attention import DECODE_MAX_T, decode_attention_cpu, prompt_attention_cpu
from rz_kernels.quantized_matmul import CPU_FFI_ARRAYS, qmatmul_cpu, qmatmul_layer_cpu, qmatmul_stacked_cpu


def weight(inputs, key: str, ggml_type: int, shape) -> QTensor:
    arrays = {name: jnp.asarray(inputs[f"{key}.{name}"]) for name in CPU_FFI_ARRAYS[GGMLType(ggml_type)]}
    return QTensor(arrays, GGMLType(ggml_type), tuple(shape))


def main(inputs_path: str, outputs_path: str) -> None:
    inputs = np.load(inputs_path)
    plan = json.loads(str(inputs["plan"]))
    variant = cpu_ffi.selected()
    outputs = {
        "report": json.dumps(
            {
                "features": sorted(cpu_ffi.cpu_features()),
                "selected": variant.name if variant else None,
                "available": cpu_ffi.available(),
                "library": str(variant.library) if cpu_ffi.available() else None,
                # The bandwidth probe runs (its number means nothing emulated); the int8 peak probe's
                # 240 M sdots would take minutes here.
                "stream_read_gbps": cpu_ffi.stream_read_gbps(1 << 20, threads=1, repeats=1) if cpu_ffi.available() else None,
            }
        )
    }
    # Without the kernels, one case through the public entry point shows the fallback works.
    weights_of = {}
    for case in plan["qmatmul"] if cpu_ffi.available() else plan["qmatmul"][:1]:
        key = case["key"]
        weights = [weight(inputs, f"{key}.w{i}", t, s) for i, (t, s) in enumerate(zip(case["types"], case["shapes"]))]
        weights_of[key] = weights
        x = inputs[f"{key}.x"]
        for m in case["rows"]:
            if cpu_ffi.available():
                y = qmatmul_cpu(jnp.asarray(x[:m]), weights)
            else:  # the fallback: the public entry point, which must not reach the kernels
                y = jnp.concatenate([qmatmul(jnp.asarray(x[:m]), w) for w in weights], axis=1)
            outputs[f"{key}.y{m}"] = np.asarray(y)
        for i in range(case["alone"] if cpu_ffi.available() else 0):
            outputs[f"{key}.alone{i}"] = np.asarray(qmatmul_cpu(jnp.asarray(x[i : i + 1]), weights))
        if cpu_ffi.available() and len(weights) == 1:
            # The public entry point, through its dispatch (platform_dependent, jit), must reach the kernel.
            outputs[f"{key}.public"] = np.asarray(jax.jit(qmatmul)(jnp.asarray(x[:4]), weights[0]))
    if cpu_ffi.available():  # the layer-indexed kernel on each layer, and that layer's own call
        by_layer = [weights_of[key] for key in plan["layers"]["cases"]]
        x = inputs[f"{plan['layers']['cases'][0]}.x"]
        by_index = jax.jit(qmatmul_layer_cpu)
        for layer, weights in enumerate(by_layer):
            for m in plan["layers"]["rows"]:
                outputs[f"layers.{layer}.y{m}"] = np.asarray(by_index(jnp.asarray(x[:m]), jnp.int32(layer), by_layer))
                outputs[f"layers.{layer}.own{m}"] = np.asarray(qmatmul_cpu(jnp.asarray(x[:m]), weights))
        try:
            by_index(jnp.asarray(x[:1]), jnp.int32(len(by_layer)), by_layer).block_until_ready()
            outputs["layers.out_of_range"] = np.asarray("no error")
        except Exception as error:  # the kernel's InvalidArgument, as whichever exception jax raises it
            outputs["layers.out_of_range"] = np.asarray(str(error))
        # The same kernel on weights stacked per layer: the first case's, and its rows reversed.
        first = by_layer[0]
        second = [QTensor({name: jnp.asarray(np.ascontiguousarray(np.asarray(a)[::-1])) for name, a in w.arrays.items()}, w.ggml_type, w.shape) for w in first]
        stacks = [QTensorStack({name: jnp.stack([a.arrays[name], b.arrays[name]]) for name in a.arrays}, a.ggml_type, a.shape) for a, b in zip(first, second)]
        stacked = jax.jit(qmatmul_stacked_cpu)
        for layer, weights in enumerate((first, second)):
            for m in plan["layers"]["rows"]:
                outputs[f"stacked.{layer}.y{m}"] = np.asarray(stacked(jnp.asarray(x[:m]), jnp.int32(layer), stacks))
                outputs[f"stacked.{layer}.own{m}"] = np.asarray(qmatmul_cpu(jnp.asarray(x[:m]), weights))
    for case in plan["attention"] if cpu_ffi.available() else ():
        key = case["key"]
        q, k, v, q_positions, k_positions = (jnp.asarray(inputs[f"{key}.{name}"]) for name in ("q", "k", "v", "qp", "kp"))
        k, v = attention_kv.store(k, case["types"][0]), attention_kv.store(v, case["types"][1])
        kernel = decode_attention_cpu if q.shape[2] <= DECODE_MAX_T else prompt_attention_cpu
        table = jnp.asarray(inputs[f"{key}.table"]) if f"{key}.table" in inputs else None
        options = {**case["options"], "block_table": table}
        outputs[f"{key}.o"] = np.asarray(kernel(q, k, v, q_positions, k_positions, **options))
        if table is not None:  # a paged pool: the slab of the same slots
            k_slab, v_slab, slab_positions = attention_kv.paged_as_slab(k, v, k_positions, table)
            outputs[f"{key}.slab"] = np.asarray(kernel(q, k_slab, v_slab, q_positions, slab_positions, **case["options"]))
        # The public entry point, through its dispatch (platform_dependent, jit), must reach the kernel.
        outputs[f"{key}.public"] = np.asarray(jax.jit(lambda *a: attention(*a, **options))(q, k, v, q_positions, k_positions))
    if cpu_ffi.available():  # the sampler's draw, through jit as a step calls it
        operands = [jnp.asarray(inputs[f"draw.{i}"]) for i in range(9)]
        outputs["draw.tokens"] = np.asarray(jax.jit(sample_draw.draw_cpu)(*operands))
        # Zeros over memory that held ones just before: the emulator may ignore the kernel's advice
        # to drop the pages, and its scan must then write them.
        make_zeros, nonzero = jax.jit(lambda: zero_pages.zeros((1 << 20,), jnp.float32)), 0
        for _ in range(2):
            ones = jnp.ones((1 << 20,), jnp.float32)
            ones.block_until_ready()
            del ones
            nonzero += int(np.count_nonzero(np.asarray(make_zeros())))
        outputs["zeros.nonzero"] = np.asarray(nonzero)
        # The KV cache's writes (cache_write.cc) against the scatters they replace.
        rng = np.random.default_rng(5)
        pool, rows = (jnp.asarray(rng.normal(size=shape), jnp.float16) for shape in ((6, 3, 4, 8), (2, 5, 3, 8)))
        pairs = rng.permutation(24)[:10].reshape(2, 5)
        blocks, slots = (pairs // 4).astype(np.int32), (pairs % 4).astype(np.int32)
        blocks[0, 0] = 1 << 30  # dropped
        positions_pool = jnp.asarray(rng.integers(0, 99, size=(6, 4)), jnp.int32)
        positions, started = jnp.asarray(pairs, jnp.int32), np.where(slots == 0, blocks, 1 << 30).astype(np.int32)
        rows_written = jax.jit(cache_write.write_rows)(pool, rows, blocks, slots)
        positions_written = jax.jit(cache_write.write_positions, static_argnums=5)(positions_pool, positions, blocks, slots, started, -1)
        outputs["write.mismatches"] = np.asarray(
            np.count_nonzero(np.asarray(rows_written) != np.asarray(cache_write.scatter_rows(pool, rows, blocks, slots)))
            + np.count_nonzero(
                np.asarray(positions_written)
                != np.asarray(cache_write.scatter_positions(positions_pool, positions, blocks, slots, started, -1))
            )
        )
    np.savez(outputs_path, **outputs)


if __name__ == "__main__":
    jax.config.update("jax_platforms", "cpu")
    main(*sys.argv[1:])
