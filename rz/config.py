"""The model's hyperparameters, read once from GGUF metadata into a frozen, hashable config."""

import math
from dataclasses import dataclass, replace

import numpy as np

from rz.errors import GGUFError, UnsupportedModelError
from rz.gguf import GGUFFile

SUPPORTED_ARCHITECTURES = (
    "llama", "qwen2", "qwen2moe", "qwen3", "qwen3moe", "smollm3", "phi2", "phi3", "gemma2", "gemma3",
)

# Architectures whose feed-forward is a mixture of experts, always (qwen2moe, qwen3moe) or when the
# file's expert_count says so (llama: Mixtral).
MOE_ARCHITECTURES = ("qwen2moe", "qwen3moe")
# Qwen2-MoE sends every token through a shared expert too, and keeps the chosen experts' router
# weights as they are; the others renormalize them to sum to 1 (llama.cpp's norm_w).
SHARED_EXPERT_ARCHITECTURES = ("qwen2moe",)
EXPERT_ARCHITECTURES = ("llama", *MOE_ARCHITECTURES)

# llama.cpp's graph builders apply a GGUF's sliding window only for these architectures; a llama,
# qwen2 or phi3 file that carries one (Mistral's 4096, Phi-3's 2047) runs with full attention
# there, and so here. Each alternates (pattern - 1) sliding layers with one global layer, a period
# older GGUFs leave implicit; Gemma 2's window may be implicit too.
SLIDING_PATTERN = {"gemma2": 2, "gemma3": 6}
DEFAULT_SLIDING_WINDOW = {"gemma2": 4096}

# Gemma 3 uses a lower RoPE base on its sliding layers; the others the global one, unless the
# file says otherwise (llama.cpp's rope_freq_base_train_swa).
GEMMA3_SLIDING_ROPE_BASE = 10_000.0

# Gemma 2 always soft-caps; llama.cpp's defaults stand in for keys a file leaves out.
DEFAULT_SOFTCAPS = {"gemma2": (50.0, 30.0)}

# SmolLM3 leaves RoPE out of every fourth layer (llama.cpp's n_no_rope_layer_step, set by the
# architecture: no GGUF key carries it).
NO_ROPE_LAYER_STEP = {"smollm3": 4}


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
    n_expert: int  # 0: a dense MLP
    n_expert_used: int  # experts each token goes through
    n_ff_expert: int  # rows of each expert's gate and up
    n_ff_shared_expert: int  # 0: no shared expert
    normalize_expert_weights: bool  # renormalize the chosen experts' router weights to sum to 1
    context_length: int
    norm_eps: float
    rope_base: float
    rope_base_sliding: float
    rope_dim: int
    rope_scaling: str  # "none", "linear" or "yarn"
    rope_scaling_factor: float
    rope_scaling_original_context: int  # YaRN: the context length the model was trained with
    rope_attn_factor: float  # extra scale of the rotated values (YaRN's, Phi-3 LongRoPE's)
    rope_short_factors_context: int  # LongRoPE: the longest context of its short factors; 0: none
    rope_long_factors: bool  # LongRoPE: run the long factors (for_context: a context beyond the short ones')
    sliding_window: int  # 0: no sliding-window attention
    sliding_layers: tuple[bool, ...]  # per layer: does it attend only within the window?
    rope_layers: tuple[bool, ...]  # per layer: does RoPE rotate its queries and keys?
    attn_logit_softcap: float  # 0: none
    final_logit_softcap: float  # 0: none
    tie_embeddings: bool  # no output.weight: the token embedding doubles as the LM head
    chat_template: str | None

    @classmethod
    def from_gguf(cls, gguf: GGUFFile) -> "ModelConfig":
        """The config of a GGUF, every value checked for type, range and agreement with the
        tensors before anything is sized by it; a bad one is a GGUFError naming its key."""
        arch = gguf.require("general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"{gguf.path}: architecture {arch!r} is not supported; "
                f"rz supports {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        keys = _Keys(gguf, arch)
        n_embd = keys.integer("embedding_length", required=True)
        n_head = keys.integer("attention.head_count", required=True, high=MAX_HEADS)
        n_head_kv = keys.integer("attention.head_count_kv", n_head, high=n_head)
        n_layer = keys.integer("block_count", required=True, high=MAX_LAYERS)
        head_dim = keys.integer("attention.key_length", max(n_embd // n_head, 1))
        context_length = keys.integer("context_length", required=True, high=MAX_CONTEXT)
        tokens = gguf.require("tokenizer.ggml.tokens")
        if not isinstance(tokens, list) or not tokens:
            raise GGUFError(f"{gguf.path}: tokenizer.ggml.tokens must be a non-empty list of strings")
        sliding_window = keys.integer(
            "attention.sliding_window", DEFAULT_SLIDING_WINDOW.get(arch, 0), low=0, high=MAX_CONTEXT
        )
        _check_layer_count(gguf, n_layer)
        rope_base = keys.real("rope.freq_base", 10_000.0, low=0.0)
        if arch in SLIDING_PATTERN and sliding_window > 0:
            sliding_layers = keys.sliding_layers(n_layer, SLIDING_PATTERN[arch])
            sliding_default = GEMMA3_SLIDING_ROPE_BASE if arch == "gemma3" else rope_base
            rope_base_sliding = keys.real("rope.freq_base_swa", sliding_default, low=0.0)
        else:
            sliding_layers = (False,) * n_layer
            rope_base_sliding = rope_base
        no_rope_step = NO_ROPE_LAYER_STEP.get(arch, 0)
        moe_arch = arch in MOE_ARCHITECTURES
        n_ff = keys.integer("feed_forward_length", 0, required=not moe_arch, low=0 if moe_arch else 1)
        n_expert = keys.integer("expert_count", 0, low=0, high=MAX_EXPERTS) if arch in EXPERT_ARCHITECTURES else 0
        if moe_arch and n_expert == 0:
            raise GGUFError(f"{gguf.path}: metadata {arch}.expert_count is missing or 0; a {arch} model has experts")
        n_expert_used = keys.integer("expert_used_count", 0, low=1 if n_expert else 0, high=n_expert)
        n_ff_expert = 0
        if n_expert:
            # Without the key llama.cpp's qwen3moe takes n_ff / n_expert_used; Mixtral's experts are n_ff wide.
            n_ff_expert = keys.integer("expert_feed_forward_length", n_ff // n_expert_used if moe_arch else n_ff)
        shared_expert = arch in SHARED_EXPERT_ARCHITECTURES
        n_ff_shared_expert = keys.integer("expert_shared_feed_forward_length", n_ff) if shared_expert else 0
        original_context = keys.integer(
            "rope.scaling.original_context_length", context_length, high=MAX_CONTEXT, zero_means_default=True
        )
        attn_softcap_default, final_softcap_default = DEFAULT_SOFTCAPS.get(arch, (0.0, 0.0))
        eps_key = "attention.layer_norm_rms_epsilon" if keys.has("attention.layer_norm_rms_epsilon") else "attention.layer_norm_epsilon"
        rope_scaling_factor = keys.real("rope.scaling.factor", 1.0, low=0.0, zero_means_default=True)
        # Without a type, llama.cpp takes a scaling factor as linear scaling.
        rope_scaling = keys.raw("rope.scaling.type", "linear" if keys.raw("rope.scaling.factor") else "none")
        if not isinstance(rope_scaling, str) or rope_scaling not in ("none", "linear", "yarn"):
            raise UnsupportedModelError(f"{gguf.path}: RoPE scaling {_short(rope_scaling)} is not supported")
        config = cls(
            architecture=arch,
            name=str(gguf.get("general.name", gguf.path.stem)),
            n_vocab=keys.integer("vocab_size", len(tokens), high=len(tokens)),
            n_embd=n_embd,
            n_layer=n_layer,
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim=head_dim,
            head_dim_v=keys.integer("attention.value_length", head_dim),
            n_ff=n_ff,
            n_expert=n_expert,
            n_expert_used=n_expert_used,
            n_ff_expert=n_ff_expert,
            n_ff_shared_expert=n_ff_shared_expert,
            normalize_expert_weights=not shared_expert,
            context_length=context_length,
            norm_eps=keys.real(eps_key, required=True, low=0.0, high=1.0),
            rope_base=rope_base,
            rope_base_sliding=rope_base_sliding,
            rope_dim=keys.integer("rope.dimension_count", head_dim, high=head_dim),
            rope_scaling=rope_scaling,
            rope_scaling_factor=rope_scaling_factor,
            rope_scaling_original_context=original_context,
            rope_attn_factor=keys.real("rope.scaling.attn_factor", 1.0, low=0.0),
            rope_short_factors_context=original_context if "rope_factors_long.weight" in gguf.tensors else 0,
            rope_long_factors=False,
            sliding_window=sliding_window,
            sliding_layers=sliding_layers,
            rope_layers=tuple(not no_rope_step or (i + 1) % no_rope_step != 0 for i in range(n_layer)),
            attn_logit_softcap=keys.real(
                "attn_logit_softcapping", attn_softcap_default, low=None, zero_means_default=True
            ),
            final_logit_softcap=keys.real(
                "final_logit_softcapping", final_softcap_default, low=None, zero_means_default=True
            ),
            tie_embeddings="output.weight" not in gguf.tensors,
            chat_template=_chat_template(gguf),
        )
        config.validate(gguf)
        return config

    def for_context(self, n_ctx: int) -> "ModelConfig":
        """The config of a model run with n_ctx positions per sequence. A LongRoPE model (Phi-3-128k)
        takes its long factors, at every position, when n_ctx is beyond its original context, as
        llama.cpp does (llama_model::get_rope_factors): the weights it loads depend on it."""
        return replace(self, rope_long_factors=bool(self.rope_short_factors_context) and n_ctx > self.rope_short_factors_context)

    def layer_kind(self, layer: int) -> int:
        """The first layer of the same kind as `layer` (sliding or global, rotated or not), which
        stands for all the layers of its kind: they run the same computation."""
        kinds = list(zip(self.sliding_layers, self.rope_layers))
        return kinds.index(kinds[layer])

    def validate(self, gguf: GGUFFile) -> None:
        """The checks that join several keys, and the token embedding's shape against them."""
        problems = []
        if self.n_head % self.n_head_kv:
            problems.append(f"head_count {self.n_head} is not a multiple of head_count_kv {self.n_head_kv}")
        if self.rope_dim % 2:
            problems.append(f"rope.dimension_count {self.rope_dim} must be even (RoPE rotates pairs)")
        embedding = gguf.tensors.get("token_embd.weight")
        if embedding is not None and tuple(embedding.shape) != (self.n_vocab, self.n_embd):
            problems.append(
                f"token_embd.weight has shape {list(embedding.shape)}, but vocab_size (or the token list) and "
                f"embedding_length say [{self.n_vocab}, {self.n_embd}]"
            )
        if problems:
            raise GGUFError(f"{gguf.path}: inconsistent metadata: {'; '.join(problems)}")


# Upper bounds far above any released model, low enough that nothing sized by them can exhaust
# memory before the tensors are checked against them.
MAX_DIMENSION = 1 << 20
MAX_HEADS = 1 << 12
MAX_LAYERS = 1 << 12
MAX_EXPERTS = 1 << 12
MAX_CONTEXT = 1 << 24
MAX_REAL = 1e30


class _Keys:
    """An architecture's metadata keys, read with a check of type and range that names the key."""

    def __init__(self, gguf: GGUFFile, arch: str):
        self.gguf, self.arch = gguf, arch

    def has(self, name: str) -> bool:
        return f"{self.arch}.{name}" in self.gguf.metadata

    def raw(self, name: str, default=None, required: bool = False):
        full = f"{self.arch}.{name}"
        return self.gguf.require(full) if required else self.gguf.get(full, default)

    def integer(self, name, default=None, required=False, low=1, high=MAX_DIMENSION, zero_means_default=False) -> int:
        value = self.raw(name, default, required)
        if zero_means_default and isinstance(value, (int, np.integer)) and value == 0:
            value = default
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise self._bad(name, value, "an integer")
        if not low <= value <= high:
            raise self._bad(name, value, f"in {low}..{high}")
        return int(value)

    def real(self, name, default=None, required=False, low=0.0, high=MAX_REAL, zero_means_default=False) -> float:
        """A finite number; above `low` (exclusive) when low is given, else at least 0."""
        value = self.raw(name, default, required)
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise self._bad(name, value, "a number")
        value = float(value)
        if zero_means_default and value == 0:
            return float(default)
        if not math.isfinite(value) or value > high or (value <= low if low is not None else value < 0):
            bounds = f"in ({low:g}, {high:g}]" if low is not None else f"in [0, {high:g}]"
            raise self._bad(name, value, f"finite and {bounds}")
        return value

    def sliding_layers(self, n_layer: int, default_period: int) -> tuple[bool, ...]:
        """The sliding-window layers: every layer but each period-th, or one flag per layer."""
        name = "attention.sliding_window_pattern"
        pattern = self.raw(name, default_period)
        if isinstance(pattern, (int, np.integer)) and not isinstance(pattern, (bool, np.bool_)):
            period = self.integer(name, default_period)
            return tuple(i % period < period - 1 for i in range(n_layer))
        # Newer GGUFs spell the pattern out, one flag per layer.
        if not isinstance(pattern, (list, np.ndarray)) or len(pattern) < n_layer:
            raise self._bad(name, _short(pattern), f"a period or a list of at least {n_layer} flags")
        flags = pattern[:n_layer]
        if not all(isinstance(flag, (bool, int, np.bool_, np.integer)) for flag in flags):
            raise self._bad(name, _short(pattern), "a list of flags")
        return tuple(bool(flag) for flag in flags)

    def _bad(self, name: str, value, expected: str) -> GGUFError:
        return GGUFError(f"{self.gguf.path}: metadata {self.arch}.{name} is {_short(value)}; it must be {expected}")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_layer_count(gguf: GGUFFile, n_layer: int) -> None:
    """block_count must be the number of layers the file's tensors hold (blk.0 ... blk.N-1)."""
    layers = {name.split(".", 2)[1] for name in gguf.tensors if name.startswith("blk.")}
    if gguf.tensors and layers != {str(i) for i in range(n_layer)}:
        found = sorted(int(layer) for layer in layers if layer.isdigit())
        span = f"blk.{found[0]}..blk.{found[-1]} ({len(found)} layers)" if found else "no layers"
        raise GGUFError(f"{gguf.path}: metadata block_count is {n_layer}, but the tensors hold {span}")


def _chat_template(gguf: GGUFFile) -> str | None:
    template = gguf.get("tokenizer.chat_template")
    if template is not None and not isinstance(template, str):
        raise GGUFError(f"{gguf.path}: metadata tokenizer.chat_template must be a string, got {_short(template)}")
    return template
