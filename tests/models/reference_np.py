"""A float64 NumPy forward pass over a whole prompt, written apart from rz: the yardstick for rz and llama.cpp.

It reads the file with gguf-py's own reader and dequantizer, computes every step in float64 from
the exactly dequantized weights, and attends over the full prompt with an explicit causal (and
sliding-window) mask, with no cache. It follows the llama.cpp graphs for llama, qwen2, phi2 and
gemma3; RoPE scaling is left out (no real model under test uses it).
"""

import math
from pathlib import Path

import gguf
import numpy as np

# The graphs the reference follows; the others are held to llama.cpp alone.
REFERENCE_ARCHITECTURES = ("llama", "qwen2", "phi2", "gemma3")

# Weights are kept in float32, which holds every dequantized value exactly, and widened to
# float64 one block of rows at a time, so the reference never holds a float64 copy of the model.
ROWS_PER_BLOCK = 16384


class ReferenceModel:
    def __init__(self, path: str | Path):
        self.reader = gguf.GGUFReader(path)
        self.arch = self._field("general.architecture")
        self.tensors = {tensor.name: tensor for tensor in self.reader.tensors}
        a = self.arch
        self.n_embd = self._field(f"{a}.embedding_length")
        self.n_layer = self._field(f"{a}.block_count")
        self.n_head = self._field(f"{a}.attention.head_count")
        self.n_head_kv = self._field(f"{a}.attention.head_count_kv", self.n_head)
        self.head_dim = self._field(f"{a}.attention.key_length", self.n_embd // self.n_head)
        self.rope_dim = self._field(f"{a}.rope.dimension_count", self.head_dim)
        self.rope_base = self._field(f"{a}.rope.freq_base", 10_000.0)
        self.eps = self._field(f"{a}.attention.layer_norm_rms_epsilon", None)
        if self.eps is None:
            self.eps = self._field(f"{a}.attention.layer_norm_epsilon")
        self.window = self._field(f"{a}.attention.sliding_window", 0) if a == "gemma3" else 0
        pattern = self._field(f"{a}.attention.sliding_window_pattern", 6)
        self.sliding = [bool(self.window) and i % pattern < pattern - 1 for i in range(self.n_layer)]
        self.rope_base_sliding = self._field(f"{a}.rope.freq_base_swa", 10_000.0)
        self.final_softcap = self._field(f"{a}.final_logit_softcapping", 0.0) if a == "gemma3" else 0.0
        self._cache: dict[str, np.ndarray] = {}

    def _field(self, key: str, default=...):
        field = self.reader.fields.get(key)
        if field is None:
            if default is ...:
                raise KeyError(key)
            return default
        value = field.contents()
        return value

    def has(self, name: str) -> bool:
        return name in self.tensors

    def weight(self, name: str) -> np.ndarray:
        """A tensor dequantized by gguf-py, float32, NumPy order ([n_out, n_in] for matrices)."""
        if name not in self._cache:
            tensor = self.tensors[name]
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            self._cache[name] = values.reshape(tuple(int(n) for n in reversed(tensor.shape))).astype(np.float32)
        return self._cache[name]

    def vector(self, name: str) -> np.ndarray:
        return self.weight(name).astype(np.float64).reshape(-1)

    def linear(self, x: np.ndarray, name: str, bias: str | None = None) -> np.ndarray:
        w = self.weight(name)
        blocks = [w[start : start + ROWS_PER_BLOCK].astype(np.float64) for start in range(0, w.shape[0], ROWS_PER_BLOCK)]
        out = np.concatenate([x @ block.T for block in blocks], axis=-1)
        if bias is not None and self.has(bias):
            out = out + self.vector(bias)
        return out

    # --- pieces -------------------------------------------------------------------------------

    def rms_norm(self, x: np.ndarray, name: str) -> np.ndarray:
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * self.vector(name)

    def layer_norm(self, x: np.ndarray, name: str) -> np.ndarray:
        centered = x - x.mean(axis=-1, keepdims=True)
        normed = centered / np.sqrt(np.mean(centered * centered, axis=-1, keepdims=True) + self.eps)
        return normed * self.vector(f"{name}.weight") + self.vector(f"{name}.bias")

    def rope(self, x: np.ndarray, base: float) -> np.ndarray:
        """x [T, H, D]; positions 0..T-1."""
        d = self.rope_dim
        positions = np.arange(x.shape[0], dtype=np.float64)
        inverse_frequencies = base ** (-np.arange(0, d, 2, dtype=np.float64) / d)
        if self.has("rope_freqs.weight"):
            inverse_frequencies = inverse_frequencies / self.vector("rope_freqs.weight")
        angles = positions[:, None] * inverse_frequencies[None, :]
        cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
        out = x.copy()
        if self.arch == "llama":  # consecutive pairs
            a, b = x[..., 0:d:2], x[..., 1:d:2]
            out[..., 0:d:2] = a * cos - b * sin
            out[..., 1:d:2] = a * sin + b * cos
        else:  # halves
            a, b = x[..., : d // 2], x[..., d // 2 : d]
            out[..., : d // 2] = a * cos - b * sin
            out[..., d // 2 : d] = a * sin + b * cos
        return out

    def attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, window: int) -> np.ndarray:
        """q [T, H, D], k/v [T, Hkv, D] -> [T, H * D], causal, keys within the window if any."""
        length = q.shape[0]
        group = self.n_head // self.n_head_kv
        i = np.arange(length)[:, None]
        j = np.arange(length)[None, :]
        visible = j <= i
        if window:
            visible &= j > i - window
        out = np.empty((length, self.n_head, v.shape[-1]))
        for h in range(self.n_head):
            scores = q[:, h] @ k[:, h // group].T * scale
            scores = np.where(visible, scores, -np.inf)
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            out[:, h] = (scores / scores.sum(axis=-1, keepdims=True)) @ v[:, h // group]
        return out.reshape(length, -1)

    def qkv(self, h: np.ndarray, i: int):
        blk = f"blk.{i}"
        length = h.shape[0]
        q_size, kv_size = self.n_head * self.head_dim, self.n_head_kv * self.head_dim
        if self.has(f"{blk}.attn_qkv.weight"):
            fused = self.linear(h, f"{blk}.attn_qkv.weight", f"{blk}.attn_qkv.bias")
            q, k, v = np.split(fused, [q_size, q_size + kv_size], axis=-1)
        else:
            q = self.linear(h, f"{blk}.attn_q.weight", f"{blk}.attn_q.bias")
            k = self.linear(h, f"{blk}.attn_k.weight", f"{blk}.attn_k.bias")
            v = self.linear(h, f"{blk}.attn_v.weight", f"{blk}.attn_v.bias")
        return (
            q.reshape(length, self.n_head, self.head_dim),
            k.reshape(length, self.n_head_kv, self.head_dim),
            v.reshape(length, self.n_head_kv, -1),
        )

    # --- the forward pass -----------------------------------------------------------------------

    def hidden(self, tokens) -> np.ndarray:
        """The final-normed hidden states float64 [T, n_embd] of a prompt (positions 0..T-1)."""
        x = self.weight("token_embd.weight")[np.asarray(tokens)].astype(np.float64)
        if self.arch == "gemma3":
            x = x * math.sqrt(self.n_embd)
        for i in range(self.n_layer):
            x = getattr(self, f"_block_{self.arch}", self._block_llama)(x, i)
        if self.arch == "phi2":
            return self.layer_norm(x, "output_norm")
        return self.rms_norm(x, "output_norm.weight")

    def logits(self, tokens) -> np.ndarray:
        """float64 [T, n_vocab]."""
        hidden = self.hidden(tokens)
        output = "output.weight" if self.has("output.weight") else "token_embd.weight"
        logits = self.linear(hidden, output, "output.bias" if self.arch in ("qwen2", "phi2") else None)
        if self.final_softcap:
            logits = self.final_softcap * np.tanh(logits / self.final_softcap)
        return logits

    def _block_llama(self, x: np.ndarray, i: int) -> np.ndarray:
        blk = f"blk.{i}"
        q, k, v = self.qkv(self.rms_norm(x, f"{blk}.attn_norm.weight"), i)
        q, k = self.rope(q, self.rope_base), self.rope(k, self.rope_base)
        attended = self.attention(q, k, v, 1 / math.sqrt(self.head_dim), 0)
        x = x + self.linear(attended, f"{blk}.attn_output.weight", f"{blk}.attn_output.bias")
        h = self.rms_norm(x, f"{blk}.ffn_norm.weight")
        gate = self.linear(h, f"{blk}.ffn_gate.weight")
        up = self.linear(h, f"{blk}.ffn_up.weight")
        return x + self.linear(gate / (1 + np.exp(-gate)) * up, f"{blk}.ffn_down.weight")

    def _block_phi2(self, x: np.ndarray, i: int) -> np.ndarray:
        blk = f"blk.{i}"
        h = self.layer_norm(x, f"{blk}.attn_norm")
        q, k, v = self.qkv(h, i)
        q, k = self.rope(q, self.rope_base), self.rope(k, self.rope_base)
        attended = self.attention(q, k, v, 1 / math.sqrt(self.head_dim), 0)
        attention_out = self.linear(attended, f"{blk}.attn_output.weight", f"{blk}.attn_output.bias")
        up = self.linear(h, f"{blk}.ffn_up.weight", f"{blk}.ffn_up.bias")
        mlp_out = self.linear(gelu(up), f"{blk}.ffn_down.weight", f"{blk}.ffn_down.bias")
        return x + attention_out + mlp_out

    def _block_gemma3(self, x: np.ndarray, i: int) -> np.ndarray:
        blk = f"blk.{i}"
        q, k, v = self.qkv(self.rms_norm(x, f"{blk}.attn_norm.weight"), i)
        q = self.rms_norm(q, f"{blk}.attn_q_norm.weight")
        k = self.rms_norm(k, f"{blk}.attn_k_norm.weight")
        base = self.rope_base_sliding if self.sliding[i] else self.rope_base
        q, k = self.rope(q, base), self.rope(k, base)
        window = self.window if self.sliding[i] else 0
        attended = self.attention(q, k, v, 1 / math.sqrt(self.head_dim), window)
        x = x + self.rms_norm(self.linear(attended, f"{blk}.attn_output.weight"), f"{blk}.post_attention_norm.weight")
        h = self.rms_norm(x, f"{blk}.ffn_norm.weight")
        gated = gelu(self.linear(h, f"{blk}.ffn_gate.weight")) * self.linear(h, f"{blk}.ffn_up.weight")
        mlp = self.linear(gated, f"{blk}.ffn_down.weight")
        return x + self.rms_norm(mlp, f"{blk}.post_ffw_norm.weight")


def gelu(x: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation, as Gemma and Phi-2 are trained with."""
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
