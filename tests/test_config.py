"""rz.config: a model's hyperparameters read from its GGUF file, as llama.cpp reads them."""

import llama_cpp
import pytest

from rz.config import ModelConfig
from rz.gguf import GGUFFile
from rz.model_files import gemma3_270m_path, smollm2_135m_path


@pytest.fixture(scope="module", params=["gemma3", "smollm2"])
def both(request):
    path = {"gemma3": gemma3_270m_path, "smollm2": smollm2_135m_path}[request.param]()
    oracle = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    with GGUFFile(path) as gguf:
        return ModelConfig.from_gguf(gguf), oracle


def test_sizes_are_llama_cpps(both):
    """Against the metadata llama.cpp's own GGUF reader returns, and its vocabulary."""
    cfg, oracle = both
    arch = oracle.metadata["general.architecture"]
    assert cfg.architecture == arch
    assert cfg.n_vocab == oracle.n_vocab()
    assert cfg.n_embd == int(oracle.metadata[f"{arch}.embedding_length"])
    assert cfg.context_length == int(oracle.metadata[f"{arch}.context_length"])
    assert cfg.n_layer == int(oracle.metadata[f"{arch}.block_count"])
    assert cfg.n_head == int(oracle.metadata[f"{arch}.attention.head_count"])
    assert cfg.n_head_kv == int(oracle.metadata.get(f"{arch}.attention.head_count_kv", cfg.n_head))
    assert cfg.n_ff == int(oracle.metadata[f"{arch}.feed_forward_length"])


def test_a_config_is_frozen_and_hashable(both):
    """The compiled steps take the config as a static argument."""
    cfg, _ = both
    assert hash(cfg) == hash(ModelConfig(**{f: getattr(cfg, f) for f in cfg.__dataclass_fields__}))
    with pytest.raises(AttributeError):
        cfg.n_layer = 1


def test_every_layer_is_sliding_or_global(both):
    cfg, _ = both
    assert len(cfg.sliding_layers) == cfg.n_layer
    assert any(cfg.sliding_layers) == (cfg.sliding_window > 0)
