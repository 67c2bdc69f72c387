"""A model's layers with their weights stacked per run of alike layers in their repeating period,
for the loop over layers (rz.models.forward).

A compiled step's memory grows with its instruction count, and a loop carries every array its
body reads. With each layer's weights arrays of their own, a decode step carried every layer's
through its two loops, most of its instructions (benchmarks/results/memory-session25.md). Stacked
at load, a run's matrix is one array per name ([layers, ...]), which the layer-indexed
kernel reads in place (rz_kernels.quantized_matmul.qmatmul_stacked). The stacks and the layers'
own weights share their bytes (rz_kernels.quants.stack_in_place), so every other path (unrolled
steps, self-drafting's first layers, analysis) still finds each layer's weights as before. A
matrix whose type differs between the layers of a run (Q4_K_M's mix) is stacked per type.
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


def _signatures(weights: Any, cfg: ModelConfig) -> list | None:
    """Each layer's signature (weight tree, leaf types and shapes, sliding, rotated), or None where
    a loop cannot run the layers (see repeat_period)."""
    layers = weights.layers
    if os.environ.get("RZ_LAYER_LOOP", "1") == "0" or cfg.n_expert or len(layers) < 2:
        return None
    flat = [jax.tree.flatten(layer, is_leaf=is_matrix) for layer in layers]
    if any(not isinstance(leaf, (QTensor, jax.Array)) for leaves, _ in flat for leaf in leaves):
        return None
    return [
        (treedef, tuple((type(leaf), leaf.shape, getattr(leaf, "dtype", None)) for leaf in leaves), sliding, rotated)
        for (leaves, treedef), sliding, rotated in zip(flat, cfg.sliding_layers, cfg.rope_layers)
    ]


def repeat_period(weights: Any, cfg: ModelConfig) -> int | None:
    """The shortest run of layers whose repeats make up the model (same kinds, same weight
    shapes), or None where a loop cannot run them: a mixture of experts, a single layer, a leaf that
    is neither a QTensor nor an array, or no run shorter than the model. RZ_LAYER_LOOP=0: None
    (every step unrolled, to compare)."""
    signatures = _signatures(weights, cfg)
    if signatures is None:
        return None
    n = len(signatures)
    period = next(p for p in range(1, n + 1) if n % p == 0 and all(signatures[l] == signatures[l % p] for l in range(n)))
    return None if period == n else period


def layer_runs(weights: Any, cfg: ModelConfig) -> tuple[tuple[int, int], ...] | None:
    """(start, length) of each run of alike positions in the repeating period (repeat_period):
    consecutive positions whose layers have the same kind and weight shapes, which a loop runs as
    one layer in an inner loop rather than as `length` copies in the step's graph (Gemma 3's five
    sliding layers and one global one: two layers' instructions, not six). None where the layers
    do not repeat."""
    period = repeat_period(weights, cfg)
    if period is None:
        return None
    signatures = _signatures(weights, cfg)[:period]
    runs = []
    for position, signature in enumerate(signatures):
        if runs and signatures[runs[-1][0]] == signature:
            runs[-1][1] += 1
        else:
            runs.append([position, 1])
    return tuple((start, length) for start, length in runs)


def run_members(n_layers: int, runs: tuple[tuple[int, int], ...], run: int) -> list[int]:
    """The layers of run `run` of each repeat of the period, in order: its stack's layers."""
    period = sum(length for _, length in runs)
    start, length = runs[run]
    return [group + start + i for group in range(0, n_layers, period) for i in range(length)]


@partial(jax.tree_util.register_dataclass, data_fields=("stacks",), meta_fields=("groups", "indices"))
@dataclass(frozen=True)
class TypedStacks:
    """A run's matrix whose type differs between its layers (Q4_K_M gives some layers' attn_v and
    ffn_down Q6_K, others Q4_K): a QTensorStack per type, and for each of the run's layers (in
    run_members' order) the stack that holds it and its place there. A loop carries a few stacked
    arrays instead of every layer's own, each of which adds instructions at every loop level."""

    stacks: tuple[QTensorStack, ...]
    groups: tuple[int, ...]
    indices: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.stacks[0].shape


def stack_by_type(column: list[QTensor]) -> tuple[TypedStacks, list[QTensor]] | None:
    """A column of differing types stacked per type (stack_in_place), and each weight again as a
    view of its stack, in the column's order; None where a type's weights cannot share a buffer."""
    members: dict = {}
    for position, weight in enumerate(column):
        members.setdefault(weight.ggml_type, []).append(position)
    stacks, views = [], [None] * len(column)
    groups, indices = [0] * len(column), [0] * len(column)
    for group, positions in enumerate(members.values()):
        made = stack_in_place([column[position] for position in positions])
        if made is None:
            return None
        stack, stacked_views = made
        stacks.append(stack)
        for index, (position, view) in enumerate(zip(positions, stacked_views)):
            views[position], groups[position], indices[position] = view, group, index
    return TypedStacks(tuple(stacks), tuple(groups), tuple(indices)), views


@partial(jax.tree_util.register_dataclass, data_fields=("matrices", "vectors"), meta_fields=("treedef", "run"))
@dataclass(frozen=True)
class RunStack:
    """The weights of the layers of one run of the period (layer_runs; its layers: run_members),
    leaf by leaf in the layer's tree (treedef, QTensors as leaves): each matrix as a QTensorStack,
    as TypedStacks where its type differs between those layers, or as their QTensors where they
    cannot share a buffer; each array leaf stacked [layers, ...]."""

    treedef: Any
    run: tuple[int, int]  # (start, length) in the period
    matrices: tuple[QTensorStack | TypedStacks | tuple[QTensor, ...] | None, ...]
    vectors: tuple[jax.Array | None, ...]


class Layers(tuple):
    """A model's layers (a tuple of each layer's weights) and `stacks`, a RunStack per run of
    their repeating period (layer_runs), or None. Slicing gives a plain tuple (no stacks)."""

    def __new__(cls, layers, stacks: tuple[RunStack, ...] | None = None):
        self = super().__new__(cls, layers)
        self.stacks = stacks
        return self


jax.tree_util.register_pytree_node(
    Layers,
    lambda layers: ((tuple(layers), layers.stacks), None),
    lambda _, children: Layers(children[0], children[1]),
)


def run_stacks(layers: tuple) -> tuple[Any, list, list]:
    """The layers of one run (run_members, given in order) as (treedef, matrices, vectors), stacked
    in the step's graph: what a loop takes where the model was not stacked at load (stack_layers)."""
    flat = [jax.tree.flatten(layer, is_leaf=is_matrix) for layer in layers]
    columns = list(zip(*(leaves for leaves, _ in flat)))
    matrices = [tuple(column) if is_matrix(column[0]) else None for column in columns]
    vectors = [None if is_matrix(column[0]) else jnp.stack(column) for column in columns]
    return flat[0][1], matrices, vectors


def stack_layers(weights: Any, cfg: ModelConfig) -> Any:
    """weights with its layers as Layers whose stacks hold each run's weights stacked (sharing the
    layers' bytes), where the layers repeat; otherwise weights unchanged.

    Each layer's matrices are re-made as views of the stacks, and the arrays they replace are
    deleted as soon as they are copied, so that loading holds the matrices once more only one
    run's matrix at a time: `weights` must be freshly loaded, its matrices used nowhere else."""
    runs = layer_runs(weights, cfg)
    # Elsewhere than on CPU the loop is a switch over the layers (loop_period), and the device
    # would copy the host buffers the stacks share with the layers.
    if runs is None or jax.default_backend() != "cpu":
        return weights
    layers = weights.layers
    flat = [jax.tree.flatten(layer, is_leaf=is_matrix) for layer in layers]
    leaves = [list(layer_leaves) for layer_leaves, _ in flat]
    uses = Counter(id(array) for array in jax.tree.leaves(weights))  # an array met twice is not released
    stacks = []
    for run, (start, _) in enumerate(runs):
        members = run_members(len(layers), runs, run)
        treedef = flat[start][1]
        matrices, vectors = [], []
        for index, leaf in enumerate(flat[start][0]):
            column = [flat[layer][0][index] for layer in members]
            if not is_matrix(leaf):
                matrices.append(None)
                vectors.append(jnp.stack(column))
                continue
            made = stack_in_place(column) or stack_by_type(column)
            if made is None:  # the arrays cannot share a buffer: each layer keeps its own
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
        stacks.append(RunStack(treedef, runs[run], tuple(matrices), tuple(vectors)))
    rebuilt = [jax.tree.unflatten(treedef, layer_leaves) for (_, treedef), layer_leaves in zip(flat, leaves)]
    return_free_pages()  # the released arrays' pages, most of them small blocks of malloc's heap
    return replace(weights, layers=Layers(rebuilt, tuple(stacks)))
