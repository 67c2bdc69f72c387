"""A summary of a GGUF model for people and scripts: what `python -m rz info` prints."""

from collections import defaultdict
from dataclasses import asdict

from rz.config import ModelConfig
from rz.gguf import GGUFFile
from rz_kernels import cpu_ffi


def special_tokens(gguf: GGUFFile) -> dict[str, dict]:
    """Special token ids named in the metadata, with their text."""
    tokens = gguf.get("tokenizer.ggml.tokens") or []
    found = {}
    for key, value in gguf.metadata.items():
        if key.startswith("tokenizer.ggml.") and key.endswith("_token_id") and isinstance(value, int):
            role = key[len("tokenizer.ggml.") : -len("_token_id")]
            found[role] = {"id": value, "text": tokens[value] if 0 <= value < len(tokens) else None}
    return found


def quant_summary(gguf: GGUFFile) -> dict[str, dict]:
    """Tensor count and bytes per GGML type."""
    summary = defaultdict(lambda: {"tensors": 0, "bytes": 0})
    for info in gguf.tensors.values():
        summary[info.ggml_type.name]["tensors"] += 1
        summary[info.ggml_type.name]["bytes"] += info.nbytes
    return dict(sorted(summary.items(), key=lambda item: -item[1]["bytes"]))


def active_parameters(gguf: GGUFFile, config: ModelConfig) -> int:
    """The parameters one token goes through in a mixture of experts: every tensor's, the routed
    experts' (ffn_*_exps) counted at n_expert_used of n_expert (all of them in a dense model)."""
    total = 0
    for name, info in gguf.tensors.items():
        routed = config.n_expert and "_exps." in name
        total += info.n_elements * config.n_expert_used // config.n_expert if routed else info.n_elements
    return total


def model_info(gguf: GGUFFile) -> dict:
    """Everything `rz info` reports, as plain JSON-ready data."""
    config = ModelConfig.from_gguf(gguf)
    n_params = sum(info.n_elements for info in gguf.tensors.values())
    return {
        "path": str(gguf.path),
        "file_bytes": gguf.file_size,
        "gguf_version": gguf.version,
        "parameters": n_params,
        "active_parameters": active_parameters(gguf, config),
        "config": asdict(config) | {"chat_template": config.chat_template is not None},
        "quantization": quant_summary(gguf),
        "cpu_kernels": cpu_ffi.selected_name(),
        "tokenizer": {
            "model": gguf.get("tokenizer.ggml.model"),
            "pre": gguf.get("tokenizer.ggml.pre"),
            "vocab_size": len(gguf.get("tokenizer.ggml.tokens") or []),
            "add_bos_token": gguf.get("tokenizer.ggml.add_bos_token"),
            "special_tokens": special_tokens(gguf),
        },
    }


def format_model_info(info: dict) -> str:
    """The human-readable form of model_info()."""
    config = info["config"]
    lines = [
        f"model        {config['name']}  ({info['path']})",
        f"architecture {config['architecture']}  GGUF v{info['gguf_version']}, "
        f"{info['file_bytes'] / 2**20:.1f} MiB, {info['parameters'] / 1e6:.1f}M parameters",
        f"layers       {config['n_layer']}  embd {config['n_embd']}  ff {config['n_ff']}  "
        f"heads {config['n_head']} (kv {config['n_head_kv']})  head dim {config['head_dim']}",
        f"context      {config['context_length']}  sliding window {config['sliding_window'] or '-'}  "
        f"rope base {config['rope_base']:g}  norm eps {config['norm_eps']:g}",
        f"vocabulary   {config['n_vocab']}  tied embeddings: {config['tie_embeddings']}  "
        f"chat template: {'yes' if config['chat_template'] else 'no'}",
    ]
    if config["n_expert"]:
        shared = f", a shared expert {config['n_ff_shared_expert']} wide" if config["n_ff_shared_expert"] else ""
        lines.append(
            f"experts      {config['n_expert']}, {config['n_expert_used']} per token, each {config['n_ff_expert']} wide{shared}; "
            f"{info['active_parameters'] / 1e6:.1f}M active parameters"
        )
    lines.append("quantization:")
    for name, entry in info["quantization"].items():
        lines.append(f"  {name:<8} {entry['tensors']:>4} tensors  {entry['bytes'] / 2**20:>9.2f} MiB")
    tokenizer = info["tokenizer"]
    lines.append(
        f"tokenizer    {tokenizer['model']} (pre: {tokenizer['pre']}), {tokenizer['vocab_size']} tokens, "
        f"add_bos: {tokenizer['add_bos_token']}"
    )
    for role, token in tokenizer["special_tokens"].items():
        lines.append(f"  {role:<10} {token['id']:>7}  {token['text']!r}")
    lines.append(f"cpu kernels  {info['cpu_kernels'] or 'none (XLA paths)'}  (rz_kernels.build variant run on this CPU)")
    return "\n".join(lines)
