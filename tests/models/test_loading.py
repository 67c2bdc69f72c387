"""Loading models: specific errors for what rz cannot load, weights that stay quantized, attention maps."""

import dataclasses
import re

import gguf
import jax
import numpy as np
import pytest

from rz.config import ModelConfig
from rz.errors import GGUFError, UnsupportedModelError
from rz_kernels.ggml_types import GGMLType
from rz.gguf import GGUFFile
from rz.models import SUPPORTED_ARCHITECTURES, load_model
from rz_kernels.quants import QTensor
from rz_run import load
from tiny_models import write_tiny_model


def without(*names):
    return lambda tensors: {name: values for name, values in tensors.items() if name not in names}


def test_unsupported_architecture_is_named_with_the_supported_ones(tmp_path):
    path = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(str(path), "mamba")
    writer.add_uint32("mamba.block_count", 1)
    writer.add_token_list(["a", "b"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match="'mamba'.*" + re.escape(", ".join(SUPPORTED_ARCHITECTURES))):
        ModelConfig.from_gguf(GGUFFile(path))


def test_load_model_rejects_an_unsupported_architecture(tmp_path):
    gguf_file = GGUFFile(write_tiny_model(tmp_path / "m.gguf", "llama"))
    cfg = dataclasses.replace(ModelConfig.from_gguf(gguf_file), architecture="falcon")
    with pytest.raises(UnsupportedModelError, match="'falcon'") as error:
        load_model(gguf_file, cfg)
    assert all(arch in str(error.value) for arch in SUPPORTED_ARCHITECTURES)


def test_missing_tensor_is_named(tmp_path):
    path = write_tiny_model(tmp_path / "m.gguf", "gemma3", edit_tensors=without("blk.2.ffn_up.weight"))
    with pytest.raises(GGUFError, match="missing tensor 'blk.2.ffn_up.weight'"):
        load(path)


def test_missing_attention_names_both_layouts(tmp_path):
    path = write_tiny_model(tmp_path / "m.gguf", "phi2", edit_tensors=without("blk.0.attn_qkv.weight"))
    with pytest.raises(GGUFError, match="'blk.0.attn_q.weight' or 'blk.0.attn_qkv.weight'"):
        load(path)


def test_misshaped_tensor_is_named_with_both_shapes(tmp_path):
    def shrink(tensors):
        tensors["blk.1.attn_output.weight"] = tensors["blk.1.attn_output.weight"][:, :32]
        return tensors

    path = write_tiny_model(tmp_path / "m.gguf", "llama", edit_tensors=shrink)
    with pytest.raises(GGUFError, match=r"'blk.1.attn_output.weight' has shape \[64, 32\], expected \[64, 64\]"):
        load(path)


def test_matrices_stay_quantized_and_tied_embeddings_are_shared(tmp_path):
    model = load(write_tiny_model(tmp_path / "m.gguf", "gemma3", "Q8_0"))
    weights = model.weights
    assert isinstance(weights.layers[0].qkv.wq, QTensor) and weights.layers[0].qkv.wq.ggml_type == GGMLType.Q8_0
    assert weights.output is weights.token_embd  # tied: one copy
    assert weights.layers[0].attn_norm.dtype == np.float32


def test_fused_qkv_is_split_into_rows(tmp_path):
    model = load(write_tiny_model(tmp_path / "m.gguf", "phi2", "Q8_0"))
    cfg, layer = model.cfg, model.weights.layers[0].qkv
    assert layer.wq.shape == (cfg.n_head * cfg.head_dim, cfg.n_embd)
    assert layer.wk.shape == layer.wv.shape == (cfg.n_head_kv * cfg.head_dim, cfg.n_embd)
    assert layer.bq.shape == (cfg.n_head * cfg.head_dim,)


def test_attention_probs_are_causal_rows_within_the_window(tmp_path):
    model = load(write_tiny_model(tmp_path / "m.gguf", "gemma3"))
    tokens = np.arange(3, 23)
    sliding_layer, global_layer = model.cfg.sliding_layers.index(True), model.cfg.sliding_layers.index(False)
    window = model.cfg.sliding_window
    for layer in (sliding_layer, global_layer):
        probs = np.asarray(model.attention_probs(model.weights, tokens, layer))
        assert probs.shape == (model.cfg.n_head, len(tokens), len(tokens))
        np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
        query, key = np.indices(probs.shape[1:])
        hidden = key > query
        if layer == sliding_layer:
            hidden |= key <= query - window
        assert (probs[:, hidden] == 0).all()
        assert (probs[:, ~hidden] > 0).all()


def test_forward_is_jittable_with_the_cache_donated(tmp_path):
    model = load(write_tiny_model(tmp_path / "m.gguf", "llama"))
    forward = jax.jit(model.forward, donate_argnums=(1,))
    cache = model.init_cache(2, 16)
    positions = np.tile(np.arange(4, dtype=np.int32), (2, 1))
    hidden, new_cache = forward(model.weights, cache, np.zeros((2, 4), np.int32), positions)
    assert hidden.shape == (2, 4, model.cfg.n_embd)
    assert jax.tree.structure(new_cache) == jax.tree.structure(model.init_cache(2, 16))
    assert model.lm_head(model.weights, hidden).shape == (2, 4, model.cfg.n_vocab)


def test_unsupported_tensor_type_is_named(tmp_path):
    def widen(tensors):
        tensors["blk.0.ffn_gate.weight"] = tensors["blk.0.ffn_gate.weight"].astype(np.float64)
        return tensors

    path = write_tiny_model(tmp_path / "m.gguf", "llama", edit_tensors=widen)
    with pytest.raises(UnsupportedModelError, match="'blk.0.ffn_gate.weight'.*F64 is not supported"):
        load(path)


@pytest.mark.parametrize(
    "overrides",
    [dict(rope_dim=2), dict(rope_base=1e20), dict(norm_eps=1.0), dict(context_length=1), dict(n_head_kv=1)],
    ids=lambda overrides: ",".join(f"{key}={value}" for key, value in overrides.items()),
)
def test_extreme_hyperparameters_that_pass_validation_run(tmp_path, overrides):
    """The edges of what ModelConfig accepts load and give finite logits, not a later TypeError."""
    from rz_run import rz_logits

    model = load(write_tiny_model(tmp_path / "m.gguf", "llama", **overrides))
    assert np.isfinite(rz_logits(model, [1, 5, 9])).all()


@pytest.mark.parametrize(
    "overrides, key",
    [(dict(rope_dim=3), "rope.dimension_count"), (dict(norm_eps=-1.0), "layer_norm_rms_epsilon"),
     (dict(rope_base=float("nan")), "rope.freq_base"), (dict(n_head_kv=3), "head_count_kv 3"), (dict(), "block_count is 3")],
    ids=lambda value: str(value),
)
def test_out_of_range_hyperparameters_are_gguf_errors_naming_the_key(tmp_path, overrides, key):
    def drop_last_layer(tensors):
        return {name: values for name, values in tensors.items() if not name.startswith("blk.2.")}

    edit = drop_last_layer if not overrides else None
    path = write_tiny_model(tmp_path / "m.gguf", "llama", **overrides, edit_tensors=edit)
    with pytest.raises(GGUFError, match=key):
        ModelConfig.from_gguf(GGUFFile(path))


def test_a_longrope_model_takes_its_long_factors_beyond_its_original_context(tmp_path):
    """llama.cpp switches every position to the long factors when the context is beyond the
    original one (256 here), and so does rz; a model without long factors never does."""
    cfg = ModelConfig.from_gguf(GGUFFile(write_tiny_model(tmp_path / "m.gguf", "phi3", rope_scaling_original_context=256)))
    assert not cfg.for_context(256).rope_long_factors
    assert cfg.for_context(257).rope_long_factors
    without_factors = write_tiny_model(tmp_path / "plain.gguf", "phi3", long_rope_factors=False)
    assert not ModelConfig.from_gguf(GGUFFile(without_factors)).for_context(512).rope_long_factors
