"""Tiny random GGUF models of every supported architecture, readable by both rz and llama.cpp.

    path = write_tiny_model(tmp_path / "m.gguf", "gemma3", weight_type="Q8_0")

Each has a small SentencePiece-style vocabulary (llama.cpp will not load a model without one),
a few layers with grouped-query attention, and weights drawn from a seeded generator, so a
(architecture, weight_type, overrides) triple always gives the same file.
"""

import ctypes
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import gguf
import numpy as np

TINY_ARCHITECTURES = (
    "llama", "qwen2", "qwen2moe", "qwen3", "qwen3moe", "smollm3", "phi2", "phi3", "gemma2", "gemma3",
)
MOE_ARCHITECTURES = ("qwen2moe", "qwen3moe")
WEIGHT_TYPES = ("F32", "F16", "Q8_0")
# K-quants quantize rows in super-blocks of 256: the models written in one are this much wider.
K_QUANT_SHAPE = dict(n_embd=256, n_ff=256, n_head=4, head_dim=64, rope_dim=64, n_ff_shared_expert=256)

# <|endoftext|>: llama.cpp sets token attributes of Phi-3 models (by name) on it, and will not load one without it.
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<|endoftext|>")
N_WORD_TOKENS = 44  # on top of the specials and the 256 byte tokens: 304 in all


@dataclass(frozen=True)
class TinyShape:
    """The hyperparameters written into a tiny model; defaults per architecture in DEFAULT_SHAPES."""

    n_embd: int = 64
    n_layer: int = 3
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int = 16
    n_ff: int = 96
    context_length: int = 512
    rope_base: float = 10_000.0
    rope_dim: int = 16
    norm_eps: float = 1e-5
    sliding_window: int = 0
    sliding_window_pattern: int = 0  # gemma3: every pattern-th layer is global
    rope_base_sliding: float = 10_000.0
    rope_scaling: str = "none"  # "none", "linear" or "yarn"
    rope_scaling_factor: float = 1.0
    rope_scaling_original_context: int = 0
    rope_attn_factor: float = 0.0  # 0: no rope.scaling.attn_factor key
    attn_logit_softcap: float = 0.0
    final_logit_softcap: float = 0.0
    tie_embeddings: bool = False
    fused_qkv: bool = False
    rope_freq_factors: bool = False  # llama: write a Llama 3 style rope_freqs tensor
    long_rope_factors: bool = False  # phi3: write LongRoPE's rope_factors_short and _long tensors
    n_expert: int = 0  # llama, qwen2moe, qwen3moe: a mixture of n_expert experts, each n_ff wide, instead of the MLP
    n_expert_used: int = 0
    n_ff_shared_expert: int = 96  # qwen2moe: its shared expert's width


DEFAULT_SHAPES = {
    "llama": TinyShape(),
    "qwen2": TinyShape(tie_embeddings=True),
    "phi2": TinyShape(head_dim=16, rope_dim=8, fused_qkv=True),
    # QK-norm over heads wider than n_embd / n_head, as in real Qwen3 models.
    "qwen3": TinyShape(head_dim=32, rope_dim=32, rope_base=1_000_000.0, tie_embeddings=True),
    # Eight experts, two per token.
    "qwen3moe": TinyShape(head_dim=32, rope_dim=32, n_ff=64, n_expert=8, n_expert_used=2, tie_embeddings=True),
    # Four experts, two per token, and a shared expert (96 wide).
    "qwen2moe": TinyShape(n_ff=64, n_expert=4, n_expert_used=2),
    # Four layers: the last one has no RoPE.
    "smollm3": TinyShape(n_layer=4),
    # Partial rotary (Phi-4-mini's) with LongRoPE factors and attn_factor (Phi-3-128k's).
    "phi3": TinyShape(
        rope_dim=12, fused_qkv=True, long_rope_factors=True, rope_attn_factor=1.2, rope_scaling_original_context=256,
    ),
    "gemma2": TinyShape(
        n_layer=4, head_dim=32, rope_dim=32, n_ff=128, norm_eps=1e-6, sliding_window=8,
        attn_logit_softcap=5.0, final_logit_softcap=10.0, tie_embeddings=True,
    ),
    # head_dim * n_head != n_embd, as in real Gemma 3 models; a window shorter than the test sequences.
    "gemma3": TinyShape(
        n_layer=4, head_dim=32, rope_dim=32, n_ff=128, norm_eps=1e-6, sliding_window=8,
        sliding_window_pattern=2, rope_base=1_000_000.0, tie_embeddings=True,
    ),
}


def vocabulary() -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and token types of a minimal SentencePiece vocabulary with byte fallback."""
    tokens = list(SPECIAL_TOKENS) + [f"<0x{byte:02X}>" for byte in range(256)]
    tokens += [f"\u2581w{index}" for index in range(N_WORD_TOKENS)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * N_WORD_TOKENS
    scores = [0.0] * (len(SPECIAL_TOKENS) + 256) + [-float(index) for index in range(N_WORD_TOKENS)]
    return tokens, scores, [int(t) for t in types]


N_VOCAB = len(vocabulary()[0])


def write_tiny_model(
    path: Path,
    architecture: str,
    weight_type: str = "F32",
    seed: int = 0,
    edit_tensors: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
    quantize_only: str = "",
    **overrides,
) -> Path:
    """Write a tiny random model; overrides replace TinyShape fields. Returns path.

    edit_tensors, if given, maps the tensor dict (name -> f32 values) to the one written: a way
    to drop or misshape a tensor. quantize_only, if given, limits weight_type to the matrices whose
    name contains it; the others are F32.
    """
    shape = replace(DEFAULT_SHAPES[architecture], **overrides)
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), architecture)
    _write_metadata(writer, architecture, shape)
    tensors = _tensors(architecture, shape, rng)
    if edit_tensors is not None:
        tensors = edit_tensors(tensors)
    for name, values in tensors.items():
        _add_tensor(writer, name, values, weight_type if quantize_only in name else "F32")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


# A mixture of experts in a quantized type quantizes its experts alone. With every matrix quantized,
# the rounding of activations upstream (which rz and llama.cpp do alike but not bit for bit) moves
# router logits by about 1%, enough to swap the k-th expert for the next on a near tie: whole
# positions then differ (Q8_0 throughout: 3 of 64 positions at NMSE 0.05, 3e-3 overall). With F32
# around them, both engines (and rz's decode and prefill paths) route alike, and the quantized
# experts are what is compared.
QUANTIZED_MOE_TENSORS = "exp"  # the routed experts (_exps) and the shared one (_shexp)


def comparable_tiny_model(path: Path, architecture: str, weight_type: str, **overrides) -> Path:
    """write_tiny_model for comparing logits: a quantized MoE has only its experts quantized (see QUANTIZED_MOE_TENSORS)."""
    moe = architecture in MOE_ARCHITECTURES or overrides.get("n_expert")
    quantized = weight_type not in ("F32", "F16")
    only = QUANTIZED_MOE_TENSORS if moe and quantized else ""
    return write_tiny_model(path, architecture, weight_type, quantize_only=only, **overrides)


def _write_metadata(writer: gguf.GGUFWriter, arch: str, s: TinyShape) -> None:
    writer.add_name(f"tiny {arch}")
    writer.add_uint32(f"{arch}.context_length", s.context_length)
    writer.add_uint32(f"{arch}.embedding_length", s.n_embd)
    writer.add_uint32(f"{arch}.block_count", s.n_layer)
    writer.add_uint32(f"{arch}.feed_forward_length", s.n_ff)
    writer.add_uint32(f"{arch}.attention.head_count", s.n_head)
    writer.add_uint32(f"{arch}.attention.head_count_kv", s.n_head_kv)
    writer.add_uint32(f"{arch}.attention.key_length", s.head_dim)
    writer.add_uint32(f"{arch}.attention.value_length", s.head_dim)
    writer.add_uint32(f"{arch}.rope.dimension_count", s.rope_dim)
    writer.add_float32(f"{arch}.rope.freq_base", s.rope_base)
    if arch == "phi2":
        writer.add_float32(f"{arch}.attention.layer_norm_epsilon", s.norm_eps)
    else:
        writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", s.norm_eps)
    if s.sliding_window:
        writer.add_uint32(f"{arch}.attention.sliding_window", s.sliding_window)
        writer.add_float32(f"{arch}.rope.freq_base_swa", s.rope_base_sliding)
    if s.sliding_window_pattern:
        writer.add_uint32(f"{arch}.attention.sliding_window_pattern", s.sliding_window_pattern)
    if s.rope_scaling != "none":
        writer.add_string(f"{arch}.rope.scaling.type", s.rope_scaling)
        writer.add_float32(f"{arch}.rope.scaling.factor", s.rope_scaling_factor)
    # Keys written only where the shape sets them (0: absent).
    optional_keys = {
        "rope.scaling.original_context_length": (writer.add_uint32, s.rope_scaling_original_context),
        "rope.scaling.attn_factor": (writer.add_float32, s.rope_attn_factor),
        "attn_logit_softcapping": (writer.add_float32, s.attn_logit_softcap),
        "final_logit_softcapping": (writer.add_float32, s.final_logit_softcap),
        "expert_count": (writer.add_uint32, s.n_expert),
        "expert_used_count": (writer.add_uint32, s.n_expert_used),
        "expert_feed_forward_length": (writer.add_uint32, s.n_ff if s.n_expert else 0),
        "expert_shared_feed_forward_length": (writer.add_uint32, s.n_ff_shared_expert if arch == "qwen2moe" else 0),
    }
    for key, (add, value) in optional_keys.items():
        if value:
            add(f"{arch}.{key}", value)
    tokens, scores, types = vocabulary()
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)


def _tensors(arch: str, s: TinyShape, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Every tensor of the model, in NumPy order ([n_out, n_in] for matrices), f32."""

    def matrix(n_out: int, n_in: int) -> np.ndarray:
        return (rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    def bias(n: int) -> np.ndarray:
        return (0.1 * rng.standard_normal(n)).astype(np.float32)

    q_size, kv_size = s.n_head * s.head_dim, s.n_head_kv * s.head_dim
    tensors = {"token_embd.weight": rng.standard_normal((N_VOCAB, s.n_embd), dtype=np.float32)}
    for i in range(s.n_layer):
        blk = f"blk.{i}"
        tensors[f"{blk}.attn_norm.weight"] = norm(s.n_embd)
        if arch == "phi2":
            tensors[f"{blk}.attn_norm.bias"] = bias(s.n_embd)
        if s.fused_qkv:
            tensors[f"{blk}.attn_qkv.weight"] = matrix(q_size + 2 * kv_size, s.n_embd)
        else:
            tensors[f"{blk}.attn_q.weight"] = matrix(q_size, s.n_embd)
            tensors[f"{blk}.attn_k.weight"] = matrix(kv_size, s.n_embd)
            tensors[f"{blk}.attn_v.weight"] = matrix(kv_size, s.n_embd)
        if arch in ("qwen2", "qwen2moe", "phi2"):
            if s.fused_qkv:
                tensors[f"{blk}.attn_qkv.bias"] = bias(q_size + 2 * kv_size)
            else:
                tensors[f"{blk}.attn_q.bias"] = bias(q_size)
                tensors[f"{blk}.attn_k.bias"] = bias(kv_size)
                tensors[f"{blk}.attn_v.bias"] = bias(kv_size)
        if arch in ("gemma3", "qwen3", "qwen3moe"):
            tensors[f"{blk}.attn_q_norm.weight"] = norm(s.head_dim)
            tensors[f"{blk}.attn_k_norm.weight"] = norm(s.head_dim)
        tensors[f"{blk}.attn_output.weight"] = matrix(s.n_embd, q_size)
        if arch == "phi2":
            tensors[f"{blk}.attn_output.bias"] = bias(s.n_embd)
            tensors[f"{blk}.ffn_up.weight"] = matrix(s.n_ff, s.n_embd)
            tensors[f"{blk}.ffn_up.bias"] = bias(s.n_ff)
            tensors[f"{blk}.ffn_down.weight"] = matrix(s.n_embd, s.n_ff)
            tensors[f"{blk}.ffn_down.bias"] = bias(s.n_embd)
            continue
        if arch in ("gemma2", "gemma3"):
            tensors[f"{blk}.post_attention_norm.weight"] = norm(s.n_embd)
            tensors[f"{blk}.post_ffw_norm.weight"] = norm(s.n_embd)
        tensors[f"{blk}.ffn_norm.weight"] = norm(s.n_embd)
        if s.n_expert:
            tensors[f"{blk}.ffn_gate_inp.weight"] = matrix(s.n_expert, s.n_embd)
            experts = [(matrix(s.n_ff, s.n_embd), matrix(s.n_ff, s.n_embd), matrix(s.n_embd, s.n_ff)) for _ in range(s.n_expert)]
            for part, name in enumerate(("gate", "up", "down")):
                tensors[f"{blk}.ffn_{name}_exps.weight"] = np.stack([expert[part] for expert in experts])
            if arch == "qwen2moe":
                tensors[f"{blk}.ffn_gate_inp_shexp.weight"] = (rng.standard_normal(s.n_embd) / np.sqrt(s.n_embd)).astype(np.float32)
                tensors[f"{blk}.ffn_gate_shexp.weight"] = matrix(s.n_ff_shared_expert, s.n_embd)
                tensors[f"{blk}.ffn_up_shexp.weight"] = matrix(s.n_ff_shared_expert, s.n_embd)
                tensors[f"{blk}.ffn_down_shexp.weight"] = matrix(s.n_embd, s.n_ff_shared_expert)
            continue
        if arch == "phi3":  # gate and up fused, gate first
            tensors[f"{blk}.ffn_up.weight"] = matrix(2 * s.n_ff, s.n_embd)
        else:
            tensors[f"{blk}.ffn_gate.weight"] = matrix(s.n_ff, s.n_embd)
            tensors[f"{blk}.ffn_up.weight"] = matrix(s.n_ff, s.n_embd)
        tensors[f"{blk}.ffn_down.weight"] = matrix(s.n_embd, s.n_ff)
    if s.rope_freq_factors:
        tensors["rope_freqs.weight"] = np.linspace(1.0, 8.0, s.rope_dim // 2, dtype=np.float32)
    if s.long_rope_factors:
        tensors["rope_factors_short.weight"] = np.linspace(1.0, 3.0, s.rope_dim // 2, dtype=np.float32)
        tensors["rope_factors_long.weight"] = np.linspace(1.0, 40.0, s.rope_dim // 2, dtype=np.float32)
    tensors["output_norm.weight"] = norm(s.n_embd)
    if arch == "phi2":
        tensors["output_norm.bias"] = bias(s.n_embd)
    if not s.tie_embeddings:
        tensors["output.weight"] = matrix(N_VOCAB, s.n_embd)
    if arch in ("qwen2", "phi2"):
        tensors["output.bias"] = bias(N_VOCAB)
    return tensors


def _add_tensor(writer: gguf.GGUFWriter, name: str, values: np.ndarray, weight_type: str) -> None:
    """Matrices in weight_type; vectors (norms, biases, rope factors) and MoE routers in F32, as llama.cpp's
    converter and quantizer write them."""
    if values.ndim == 1 or weight_type == "F32" or name.endswith("ffn_gate_inp.weight"):
        writer.add_tensor(name, values)
    elif weight_type == "F16":
        writer.add_tensor(name, values.astype(np.float16))
    else:
        qtype = gguf.GGMLQuantizationType[weight_type]
        writer.add_tensor(name, _quantize(values, qtype), raw_dtype=qtype)


def _quantize(values: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """The GGUF bytes [..., rows, row bytes] of a matrix (or a stack of them) in qtype: gguf-py's quantizer, or for the types it
    cannot write (K-quants) ggml's own, from the library bundled with llama-cpp-python."""
    try:
        return gguf.quants.quantize(values, qtype)
    except NotImplementedError:
        pass
    import llama_cpp

    ggml = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    ggml.ggml_quantize_chunk.restype = ctypes.c_size_t
    ggml.ggml_quantize_chunk.argtypes = (
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
    )
    n_per_row = values.shape[-1]
    rows = values.size // n_per_row
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    out = np.zeros((*values.shape[:-1], n_per_row // block_size * type_size), np.uint8)
    source = np.ascontiguousarray(values, np.float32)
    written = ggml.ggml_quantize_chunk(int(qtype), source.ctypes.data, out.ctypes.data, 0, rows, n_per_row, None)
    assert written == out.nbytes, f"ggml_quantize_chunk wrote {written} bytes, expected {out.nbytes}"
    return out

