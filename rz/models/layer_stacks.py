"""A model's layers with their weights stacked per position of their repeating run, for the loop
over layers (rz.models.forward).

A compiled step's memory grows with its instruction count, and a loop carries every array its
body reads. With each layer's weights arrays of their own, a decode step carried every layer's
through its two loops, most of its instructions (benchmarks/results/memory-session25.md). Stacked
at load, a run position's matrix is one array per name ([layers, ...]), which the layer-indexed
kernel reads in place (rz_kernels.quantized_matmul.qmatmul_stacked). The stacks and the layers'
own weights share their bytes (rz_kernels.quants.stack_in_place), so every other path (unrolled
steps, self-drafting's first layers, analysis) still finds each layer's weights as before. A
matrix whose type differs between the layers of a position (Q4_K_M's mix) stays per layer.
"""

import os
from collections import Counter
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from rz.config import ModelConfig
from rz.host_memory import return_free_pages
from rz_kernels.quants import QTensor, QTensorStack, stack_in_place


def is_matrix(leaf) -> bool:
    return isinstance(leaf, QTensor)


def repeat_period(weights: Any, cfg: ModelConfig) -> int | None:
    """The shortest run of layers whose repeats make up the model (same kinds, same weight
    shapes), or None where a loop cannot run them: a mixture of experts, a single layer, a leaf that
    is neither a QTensor nor an array, or no run shorter than the model. RZ_LAYER_LOOP=0: None
    (every step unrolled, to compare)."""
    layers = weights.layers
    if os.environ.get("RZ_LAYER_LOOP", "1") == "0" or cfg.n_expert or len(layers) < 2:
        return None
    flat = [jax.tree.flatten(layer, is_leaf=is_matrix) for layer in layers]
    if any(not isinstance(leaf, (QTensor, jax.Array)) for leaves, _ in flat for leaf in leaves):
        return None

    def signature(layer: int):
        leaves, treedef = flat[layer]
        shapes = tuple((type(leaf), leaf.shape, getattr(leaf, "dtype", None)) for leaf in leaves)
        return treedef, shapes, cfg.sliding_layers[layer], cfg.rope_layers[layer]

    n = len(layers)
    period = next(p for p in range(1, n + 1) if n % p == 0 and all(signature(l) == signature(l % p) for l in range(n)))
    return None if period == n else period


@partial(jax.tree_util.register_dataclass, data_fields=("matrices", "vectors"), meta_fields=("treedef",))
@dataclass(frozen=True)
class PositionStack:
    """The weights of the layers at one position of the run, leaf by leaf in the layer's tree
    (treedef, QTensors as leaves): each matrix as a QTensorStack, or, where its type differs
    between those layers, as their QTensors; each array leaf stacked [layers, ...]."""

    treedef: Any
    matrices: tuple[QTensorStack | tuple[QTensor, ...] | None, ...]
    vectors: tuple[jax.Array | None, ...]


class Layers(tuple):
    """A model's layers (a tuple of each layer's weights) and `stacks`, a PositionStack per position
    of their repeating run (repeat_period), or None. Slicing gives a plain tuple (no stacks)."""

    def __new__(cls, layers, stacks: tuple[PositionStack, ...] | None = None):
        self = super().__new__(cls, layers)
        self.stacks = stacks
        return self


jax.tree_util.register_pytree_node(
    Layers,
    lambda layers: ((tuple(layers), layers.stacks), None),
    lambda _, children: Layers(children[0], children[1]),
)


def position_stacks(layers: tuple) -> tuple[Any, list, list]:
    """The layers of one position (given in order) as (treedef, matrices, vectors), stacked in the
    step's graph: what a loop takes where the model was not stacked at load (stack_layers)."""
    flat = [jax.tree.flatten(layer, is_leaf=is_matrix) for layer in layers]
    columns = list(zip(*(leaves for leaves, _ in flat)))
    matrices = [tuple(column) if is_matrix(column[0]) else None for column in columns]
    vectors = [None if is_matrix(column[0]) else jnp.stack(column) for column in columns]
    return flat[0][1], matrices, vectors


def stack_layers(weights: Any, cfg: ModelConfig) -> Any:
    """weights with its layers as Layers whose stacks hold the repeating run's weights stacked
    (sharing the layers' bytes), where the layers repeat; otherwise weights unchanged.

    Each layer's matrices are re-made as views of the stacks, and the arrays they replace are
    deleted as soon as they are copied, so that loading holds the matrices once more only one
    position's matrix at a time: `weights` must be freshly loaded, its matrices used nowhere else."""
    period = repeat_period(weights, cfg)
    # Elsewhere than on CPU the loop is a switch over the layers (loop_period), and the device
    # would copy the host buffers the stacks share with the layers.
    if period is None or jax.default_backend() != "cpu":
        return weights
    layers = weights.layers
    flat = [jax.tree.flatten(layer, is_leaf=is_matrix) for layer in layers]
    leaves = [list(layer_leaves) for layer_leaves, _ in flat]
    uses = Counter(id(array) for array in jax.tree.leaves(weights))  # an array met twice is not released
    stacks = []
    for position in range(period):
        members = range(position, len(layers), period)
        treedef = flat[position][1]
        matrices, vectors = [], []
        for index, leaf in enumerate(flat[position][0]):
            column = [flat[layer][0][index] for layer in members]
            if not is_matrix(leaf):
                matrices.append(None)
                vectors.append(jnp.stack(column))
                continue
            made = stack_in_place(column)
            if made is None:  # types differ between the layers: each keeps its own
                matrices.append(tuple(column))
                vectors.append(None)
                continue
            stack, views = made
            for layer, view, original in zip(members, views, column):
                leaves[layer][index] = view
                for array in original.arrays.values():
                    if uses[id(array)] == 1:
                        array.delete()
            matrices.append(stack)
            vectors.append(None)
        stacks.append(PositionStack(treedef, tuple(matrices), tuple(vectors)))
    rebuilt = [jax.tree.unflatten(treedef, layer_leaves) for (_, treedef), layer_leaves in zip(flat, leaves)]
    return_free_pages()  # the released arrays' pages, most of them small blocks of malloc's heap
    return replace(weights, layers=Layers(rebuilt, tuple(stacks)))
