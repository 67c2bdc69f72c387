"""A float64 NumPy forward pass over a whole prompt, written apart from rz: the yardstick for rz and llama.cpp.

It reads the file with gguf-py's own reader and dequantizer, computes every step in float64 from
the exactly dequantized weights, and attends over the full prompt with an explicit causal (and
sliding-window) mask, with no cache. It follows the llama.cpp graphs of every architecture rz
runs; RoPE scaling (linear, YaRN) is left out (no real model under test uses it).
"""

import math
from pathlib import Path

import gguf
import numpy as np

# Consecutive RoPE pairs (llama.cpp's LLAMA_ROPE_TYPE_NORM); the others rotate halves.
CONSECUTIVE_PAIRS = ("llama", "smollm3")
SLIDING_PATTERN = {"gemma2": 2, "gemma3": 6}

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
        self.window = self._field(f"{a}.attention.sliding_window", 4096 if a == "gemma2" else 0) if a in SLIDING_PATTERN else 0
        pattern = self._field(f"{a}.attention.sliding_window_pattern", SLIDING_PATTERN.get(a, 1))
        self.sliding = [bool(self.window) and i % pattern < pattern - 1 for i in range(self.n_layer)]
        self.rope_base_sliding = self._field(f"{a}.rope.freq_base_swa", 10_000.0 if a == "gemma3" else self.rope_base)
        self.rope_magnitude = self._field(f"{a}.rope.scaling.attn_factor", 1.0)
        self.rotated = [a != "smollm3" or (i + 1) % 4 != 0 for i in range(self.n_layer)]
        self.attn_softcap = self._field(f"{a}.attn_logit_softcapping", 50.0 if a == "gemma2" else 0.0)
        default_final = 30.0 if a == "gemma2" else 0.0
        self.final_softcap = self._field(f"{a}.final_logit_softcapping", default_final) if a in SLIDING_PATTERN else 0.0
        self.n_expert_used = self._field(f"{a}.expert_used_count", 0)
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
        for factors in ("rope_freqs.weight", "rope_factors_short.weight"):  # Llama 3's, Phi-3's
            if self.has(factors):
                inverse_frequencies = inverse_frequencies / self.vector(factors)
        angles = positions[:, None] * inverse_frequencies[None, :]
        cos = np.cos(angles)[:, None, :] * self.rope_magnitude
        sin = np.sin(angles)[:, None, :] * self.rope_magnitude
        out = x.copy()
        if self.arch in CONSECUTIVE_PAIRS:
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
            if self.attn_softcap:
                scores = self.attn_softcap * np.tanh(scores / self.attn_softcap)
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
        if self.arch in SLIDING_PATTERN:  # Gemma
            x = x * math.sqrt(self.n_embd)
        blocks = {"phi2": self._block_phi2, "gemma2": self._block_gemma, "gemma3": self._block_gemma}
        for i in range(self.n_layer):
            x = blocks.get(self.arch, self._block_llama)(x, i)
        if self.arch == "phi2":
            return self.layer_norm(x, "output_norm")
        return self.rms_norm(x, "output_norm.weight")

    def logits(self, tokens) -> np.ndarray:
        """float64 [T, n_vocab]."""
        hidden = self.hidden(tokens)
        output = "output.weight" if self.has("output.weight") else "token_embd.weight"
        logits = self.linear(hidden, output, "output.bias")
        if self.final_softcap:
            logits = self.final_softcap * np.tanh(logits / self.final_softcap)
        return logits

    def _block_llama(self, x: np.ndarray, i: int) -> np.ndarray:
        """llama, qwen2, qwen3, smollm3, phi3 and their mixtures of experts."""
        blk = f"blk.{i}"
        q, k, v = self.qkv(self.rms_norm(x, f"{blk}.attn_norm.weight"), i)
        if self.has(f"{blk}.attn_q_norm.weight"):
            q, k = self.rms_norm(q, f"{blk}.attn_q_norm.weight"), self.rms_norm(k, f"{blk}.attn_k_norm.weight")
        if self.rotated[i]:
            q, k = self.rope(q, self.rope_base), self.rope(k, self.rope_base)
        attended = self.attention(q, k, v, 1 / math.sqrt(self.head_dim), 0)
        x = x + self.linear(attended, f"{blk}.attn_output.weight", f"{blk}.attn_output.bias")
        h = self.rms_norm(x, f"{blk}.ffn_norm.weight")
        if self.has(f"{blk}.ffn_gate_inp.weight"):
            return x + self.experts(h, blk)
        if self.has(f"{blk}.ffn_gate.weight"):
            gate, up = self.linear(h, f"{blk}.ffn_gate.weight"), self.linear(h, f"{blk}.ffn_up.weight")
        else:  # Phi-3: gate and up are the halves of one tensor
            gate, up = np.split(self.linear(h, f"{blk}.ffn_up.weight"), 2, axis=-1)
        return x + self.linear(silu(gate) * up, f"{blk}.ffn_down.weight")

    def experts(self, h: np.ndarray, blk: str) -> np.ndarray:
        """The top-k experts of each token, weighted by the router (renormalized but in Qwen2-MoE),
        plus Qwen2-MoE's shared expert; every expert's matrices dequantized whole."""
        logits = self.linear(h, f"{blk}.ffn_gate_inp.weight")
        probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        chosen = np.argsort(-probs, axis=-1, kind="stable")[:, : self.n_expert_used]
        gates, ups, downs = (self.weight(f"{blk}.ffn_{part}_exps.weight") for part in ("gate", "up", "down"))
        out = np.zeros_like(h)
        for t in range(h.shape[0]):
            weights = probs[t, chosen[t]]
            if self.arch != "qwen2moe":
                weights = weights / weights.sum()
            for e, weight in zip(chosen[t], weights):
                gate, up = gates[e].astype(np.float64) @ h[t], ups[e].astype(np.float64) @ h[t]
                out[t] += weight * (downs[e].astype(np.float64) @ (silu(gate) * up))
        if self.has(f"{blk}.ffn_gate_inp_shexp.weight"):
            shared_gate = 1 / (1 + np.exp(-(h @ self.vector(f"{blk}.ffn_gate_inp_shexp.weight"))))
            gate, up = self.linear(h, f"{blk}.ffn_gate_shexp.weight"), self.linear(h, f"{blk}.ffn_up_shexp.weight")
            out += self.linear(silu(gate) * up, f"{blk}.ffn_down_shexp.weight") * shared_gate[:, None]
        return out

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

    def _block_gemma(self, x: np.ndarray, i: int) -> np.ndarray:
        """gemma3, and gemma2 (no QK-norm)."""
        blk = f"blk.{i}"
        q, k, v = self.qkv(self.rms_norm(x, f"{blk}.attn_norm.weight"), i)
        if self.has(f"{blk}.attn_q_norm.weight"):
            q, k = self.rms_norm(q, f"{blk}.attn_q_norm.weight"), self.rms_norm(k, f"{blk}.attn_k_norm.weight")
        base = self.rope_base_sliding if self.sliding[i] else self.rope_base
        q, k = self.rope(q, base), self.rope(k, base)
        window = self.window if self.sliding[i] else 0
        width_scaled = {"gemma2": 46, "gemma3": 62}[self.arch] == self.n_layer  # the 27B models
        scale = (self.n_embd / self.n_head) ** -0.5 if width_scaled else self.head_dim**-0.5
        attended = self.attention(q, k, v, scale, window)
        x = x + self.rms_norm(self.linear(attended, f"{blk}.attn_output.weight"), f"{blk}.post_attention_norm.weight")
        h = self.rms_norm(x, f"{blk}.ffn_norm.weight")
        gated = gelu(self.linear(h, f"{blk}.ffn_gate.weight")) * self.linear(h, f"{blk}.ffn_up.weight")
        mlp = self.linear(gated, f"{blk}.ffn_down.weight")
        return x + self.rms_norm(mlp, f"{blk}.post_ffw_norm.weight")


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1 + np.exp(-x))


def gelu(x: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation, as Gemma and Phi-2 are trained with."""
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
