"""The GGUF weight loader: each family declares its weights once, as a pytree of tensor specs, and
the loader turns every spec into an array, checking the tensor's presence, shape and type.

Matrices stay quantized (QTensor, used by matmuls and embedding lookups); norm weights and
biases become f32. Each tensor is read from the memory-mapped file once, straight into its final
layout: the model never passes through host RAM twice.
"""

import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from rz.config import ModelConfig
from rz.errors import GGUFError, UnsupportedModelError
from rz.gguf import GGUFFile
from rz.quants import dequantize_raw, pack
from rz_kernels.ggml_types import tensor_nbytes
from rz_kernels.quants import QTensor


@dataclass(frozen=True)
class Tensor:
    """A GGUF tensor of the given shape (NumPy order), or only its rows [start, stop) when it is fused.

    quantized: kept as a QTensor (a matrix); otherwise loaded as an f32 array (a norm or bias).
    """

    name: str
    shape: tuple[int, ...]
    quantized: bool
    rows: tuple[int, int] | None = None


def matrix(name: str, *shape: int, rows: tuple[int, int] | None = None) -> Tensor:
    return Tensor(name, tuple(shape), quantized=True, rows=rows)


def vector(name: str, *shape: int, rows: tuple[int, int] | None = None) -> Tensor:
    return Tensor(name, tuple(shape), quantized=False, rows=rows)


@dataclass(frozen=True)
class Either:
    """The first of `choices` the file has. Else an error, or None if the tensor is optional: an
    absent bias or scale factor is no operation at all, which the model skips (rather than add
    zeros or divide by ones: a pass over the logits, for the LM head's bias)."""

    choices: tuple[Tensor, ...]
    optional: bool = False


Spec = Tensor | Either


def optional(tensor: Tensor) -> Either:
    """A vector llama.cpp treats as optional (a bias, Llama 3's rope_freqs): None when absent."""
    return Either((tensor,), optional=True)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class AttentionProjections:
    """A layer's query, key and value projections, the same in every family (rz.models.attention.project_qkv)."""

    wq: QTensor
    wk: QTensor
    wv: QTensor
    bq: jax.Array | None  # absent from the file: None, no add
    bk: jax.Array | None  # absent from the file: None, no add
    bv: jax.Array | None  # absent from the file: None, no add


def attention_projections(layer: int, cfg: ModelConfig) -> AttentionProjections:
    """The specs of wq, wk, wv and their biases: separate tensors, or rows of a fused attn_qkv
    (create_tensor_qkv). Biases are optional in every architecture, as in llama.cpp; absent, they
    are None (no add).
    """
    sizes = {"q": cfg.n_head * cfg.head_dim, "k": cfg.n_head_kv * cfg.head_dim, "v": cfg.n_head_kv * cfg.head_dim_v}
    starts = {"q": 0, "k": sizes["q"], "v": sizes["q"] + sizes["k"]}
    total = sum(sizes.values())
    fused = f"blk.{layer}.attn_qkv"
    specs = {}
    for part, size in sizes.items():
        rows = (starts[part], starts[part] + size)
        separate = f"blk.{layer}.attn_{part}"
        specs[f"w{part}"] = Either(
            (matrix(f"{separate}.weight", size, cfg.n_embd), matrix(f"{fused}.weight", total, cfg.n_embd, rows=rows))
        )
        specs[f"b{part}"] = Either(
            (vector(f"{separate}.bias", size), vector(f"{fused}.bias", total, rows=rows)), optional=True
        )
    return AttentionProjections(**specs)


def load_weights(gguf: GGUFFile, specs: Any) -> Any:
    """The pytree `specs` (leaves: Tensor or Either) with every leaf loaded.

    A tensor named twice (tied embeddings, the parts of a fused QKV) is read once per distinct
    row range, and a repeated spec yields the very same array.
    """
    loaded: dict[Tensor, Any] = {}

    def load(spec: Spec):
        tensor = _choose(gguf, spec) if isinstance(spec, Either) else spec
        if not isinstance(tensor, Tensor):  # an absent optional vector
            return tensor
        if tensor not in loaded:
            loaded[tensor] = _load_tensor(gguf, tensor)
        return loaded[tensor]

    return jax.tree.map(load, specs, is_leaf=lambda leaf: isinstance(leaf, (Tensor, Either)))


def _choose(gguf: GGUFFile, spec: Either) -> Tensor | None:
    for choice in spec.choices:
        if choice.name in gguf.tensors:
            return choice
    if spec.optional:
        return None
    names = " or ".join(repr(choice.name) for choice in spec.choices)
    raise GGUFError(f"{gguf.path}: missing tensor {names}: the file is incomplete or not a model of this architecture")


def _load_tensor(gguf: GGUFFile, tensor: Tensor):
    if tensor.name not in gguf.tensors:
        raise GGUFError(
            f"{gguf.path}: missing tensor {tensor.name!r}: the file is incomplete or not a model of this architecture"
        )
    info = gguf.tensors[tensor.name]
    # A vector may be stored as [1, n]; what matters is its elements.
    found = tuple(n for n in info.shape if n != 1) if not tensor.quantized else info.shape
    expected = tuple(n for n in tensor.shape if n != 1) if not tensor.quantized else tensor.shape
    if found != expected:
        raise GGUFError(
            f"{gguf.path}: tensor {tensor.name!r} has shape {list(info.shape)}, expected {list(tensor.shape)} "
            "from the model's metadata"
        )
    raw = gguf.tensor_bytes(tensor.name)
    shape = tensor.shape
    if tensor.rows is not None:
        start, stop = tensor.rows
        row_bytes = tensor_nbytes(info.ggml_type, math.prod(shape[1:]))
        raw = raw[start * row_bytes : stop * row_bytes]
        shape = (stop - start, *shape[1:])
    try:
        if tensor.quantized:
            loaded = pack(raw, info.ggml_type, shape)
        else:
            loaded = jnp.asarray(dequantize_raw(raw, info.ggml_type, shape))
    except (UnsupportedModelError, GGUFError) as error:
        raise type(error)(f"{gguf.path}: tensor {tensor.name!r}: {error}") from None
    gguf.release_tensor_pages(tensor.name)
    return loaded

