"""The model's hyperparameters, read once from GGUF metadata into a frozen, hashable config."""

from dataclasses import dataclass

import numpy as np

from rz.errors import GGUFError, UnsupportedModelError
from rz.gguf import GGUFFile

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "phi2", "gemma3")

# Gemma 3 alternates five sliding-window layers with one global layer, and uses a lower RoPE
# base on the sliding ones; older GGUFs leave both implicit, as llama.cpp does.
GEMMA3_SLIDING_PATTERN = 6
GEMMA3_SLIDING_ROPE_BASE = 10_000.0

# llama.cpp's graph builders apply a GGUF's sliding window only for these architectures; a llama,
# qwen2 or phi2 file that carries one (Mistral's 4096) runs with full attention there, and so here.
SLIDING_WINDOW_ARCHITECTURES = ("gemma3",)


@dataclass(frozen=True)
class ModelConfig:
    """Everything the forward pass needs to know about a model's shape, read from the GGUF."""

    architecture: str
    name: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    head_dim_v: int
    n_ff: int
    context_length: int
    norm_eps: float
    rope_base: float
    rope_base_sliding: float
    rope_dim: int
    rope_scaling: str  # "none", "linear" or "yarn"
    rope_scaling_factor: float
    rope_scaling_original_context: int  # YaRN: the context length the model was trained with
    rope_attn_factor: float  # YaRN: extra scale of the rotated values
    sliding_window: int  # 0: no sliding-window attention
    sliding_layers: tuple[bool, ...]  # per layer: does it attend only within the window?
    attn_logit_softcap: float  # 0: none
    final_logit_softcap: float  # 0: none
    tie_embeddings: bool  # no output.weight: the token embedding doubles as the LM head
    chat_template: str | None

    @classmethod
    def from_gguf(cls, gguf: GGUFFile) -> "ModelConfig":
        arch = gguf.require("general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"{gguf.path}: architecture {arch!r} is not supported; "
                f"rz supports {', '.join(SUPPORTED_ARCHITECTURES)}"
            )

        def key(name, default=None, required=False):
            full = f"{arch}.{name}"
            return gguf.require(full) if required else gguf.get(full, default)

        n_embd = int(key("embedding_length", required=True))
        n_head = int(key("attention.head_count", required=True))
        n_head_kv = int(key("attention.head_count_kv", n_head))
        n_layer = int(key("block_count", required=True))
        head_dim = int(key("attention.key_length", n_embd // n_head))
        tokens = gguf.require("tokenizer.ggml.tokens")
        sliding_window = int(key("attention.sliding_window", 0) or 0)
        if arch in SLIDING_WINDOW_ARCHITECTURES and sliding_window > 0:
            pattern = key("attention.sliding_window_pattern", GEMMA3_SLIDING_PATTERN)
            if isinstance(pattern, (int, np.integer)):
                sliding_layers = tuple(i % int(pattern) < int(pattern) - 1 for i in range(n_layer))
            else:  # newer GGUFs spell the pattern out, one flag per layer
                sliding_layers = tuple(bool(flag) for flag in pattern)[:n_layer]
            rope_base_sliding = float(key("rope.freq_base_swa", GEMMA3_SLIDING_ROPE_BASE))
        else:
            sliding_layers = (False,) * n_layer
            rope_base_sliding = float(key("rope.freq_base", 10_000.0))
        norm_eps = key("attention.layer_norm_rms_epsilon", None)
        if norm_eps is None:
            norm_eps = key("attention.layer_norm_epsilon", required=True)
        # Without a type, llama.cpp takes a scaling factor as linear scaling.
        rope_scaling = key("rope.scaling.type", "linear" if key("rope.scaling.factor") else "none")
        if rope_scaling not in ("none", "linear", "yarn"):
            raise UnsupportedModelError(f"{gguf.path}: RoPE scaling {rope_scaling!r} is not supported")
        config = cls(
            architecture=arch,
            name=str(gguf.get("general.name", gguf.path.stem)),
            n_vocab=int(key("vocab_size", len(tokens))),
            n_embd=n_embd,
            n_layer=n_layer,
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim=head_dim,
            head_dim_v=int(key("attention.value_length", head_dim)),
            n_ff=int(key("feed_forward_length", required=True)),
            context_length=int(key("context_length", required=True)),
            norm_eps=float(norm_eps),
            rope_base=float(key("rope.freq_base", 10_000.0)),
            rope_base_sliding=rope_base_sliding,
            rope_dim=int(key("rope.dimension_count", head_dim)),
            rope_scaling=rope_scaling,
            rope_scaling_factor=float(key("rope.scaling.factor", 1.0) or 1.0),
            rope_scaling_original_context=int(
                key("rope.scaling.original_context_length", 0) or key("context_length", required=True)
            ),
            rope_attn_factor=float(key("rope.scaling.attn_factor", 1.0)),
            sliding_window=sliding_window,
            sliding_layers=sliding_layers,
            attn_logit_softcap=float(key("attn_logit_softcapping", 0.0) or 0.0),
            final_logit_softcap=float(key("final_logit_softcapping", 0.0) or 0.0),
            tie_embeddings="output.weight" not in gguf.tensors,
            chat_template=gguf.get("tokenizer.chat_template"),
        )
        config.validate(gguf)
        return config

    def validate(self, gguf: GGUFFile) -> None:
        problems = []
        if min(self.n_embd, self.n_head, self.n_head_kv, self.n_layer, self.head_dim, self.n_ff) <= 0:
            problems.append("a model dimension is zero or negative")
        elif self.n_head % self.n_head_kv:
            problems.append(f"head_count {self.n_head} is not a multiple of head_count_kv {self.n_head_kv}")
        if self.context_length <= 0:
            problems.append(f"context_length {self.context_length} must be positive")
        if not 0 < self.rope_dim <= self.head_dim:
            problems.append(f"rope.dimension_count {self.rope_dim} must be in 1..{self.head_dim}")
        if len(self.sliding_layers) != self.n_layer:
            problems.append(
                f"attention.sliding_window_pattern has {len(self.sliding_layers)} flags for {self.n_layer} layers"
            )
        if problems:
            raise GGUFError(f"{gguf.path}: inconsistent metadata: {'; '.join(problems)}")
