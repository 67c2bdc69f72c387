"""A model's shape twin: the same metadata, tokenizer, tensor names, shapes and quant types as a real
GGUF, with random weights. Its speed is the real model's (every kernel sees the same shapes and
bytes per block); its text is noise. It lets a machine that cannot receive the real file (the GPU
machine takes 64 MiB of files per call) benchmark the model.

    python benchmarks/shape_twin.py save MODEL.gguf SKELETON.json   # metadata + tensor list, small
    python benchmarks/shape_twin.py write SKELETON.json TWIN.gguf   # random blocks of the same types

A skeleton written by hand for a model whose file is not at hand (benchmarks/twins/: Llama 3.x at
1B-8B) may name an installed model to borrow the tokenizer from instead of listing one:
{"tokenizer_from": "smollm2-135m", "n_vocab": 128256} takes SmolLM2's BPE tokenizer, its
vocabulary padded with unreachable tokens to the model's size, so that the embedding and LM head
have the real model's shapes.
"""

import argparse
import json
import sys
from pathlib import Path

import gguf
import numpy as np

from rz.model_files import smollm2_135m_path
from rz_kernels.ggml_types import GGMLType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from support.kernels import random_blocks  # noqa: E402

# Written by GGUFWriter itself, or describing the file rather than the model.
SKIPPED_KEYS = ("general.architecture", "GGUF.version", "GGUF.tensor_count", "GGUF.kv_count")


def save_skeleton(model: Path, skeleton: Path) -> None:
    reader = gguf.GGUFReader(str(model))
    metadata = []
    for name, field in reader.fields.items():
        if name in SKIPPED_KEYS:
            continue
        types = [int(t) for t in field.types]
        value = field.contents()
        if isinstance(value, (bytes, bytearray)):
            value = value.decode("utf-8", errors="replace")
        metadata.append({"key": name, "types": types, "value": value})
    tensors = [
        {"name": t.name, "type": int(t.tensor_type), "shape": [int(n) for n in reversed(t.shape.tolist())]}
        for t in reader.tensors
    ]
    architecture = reader.fields["general.architecture"].contents()
    skeleton.write_text(json.dumps({"architecture": architecture, "metadata": metadata, "tensors": tensors}))


# The installed models a skeleton may borrow a tokenizer from.
TOKENIZER_SOURCES = {"smollm2-135m": smollm2_135m_path}


def borrowed_tokenizer(source: str, n_vocab: int) -> list[dict]:
    """The tokenizer.* metadata of an installed model, in a skeleton's form, its vocabulary padded
    to n_vocab with tokens no merge produces."""
    reader = gguf.GGUFReader(str(TOKENIZER_SOURCES[source]()))
    items = []
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        value = field.contents()
        if name == "tokenizer.ggml.tokens":
            value = value + [f"<|twin_pad_{i}|>" for i in range(len(value), n_vocab)]
        elif name == "tokenizer.ggml.token_type":
            value = value + [int(gguf.TokenType.NORMAL)] * (n_vocab - len(value))
        items.append({"key": name, "types": [int(t) for t in field.types], "value": value})
    return items


def write_twin(skeleton: Path, twin: Path, seed: int = 0) -> None:
    spec = json.loads(skeleton.read_text())
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(twin), spec["architecture"])
    metadata = spec["metadata"]
    if "tokenizer_from" in spec:
        metadata = metadata + borrowed_tokenizer(spec["tokenizer_from"], spec["n_vocab"])
    for item in metadata:
        types = [gguf.GGUFValueType(t) for t in item["types"]]
        sub_type = types[-1] if types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(item["key"], item["value"], types[0], sub_type=sub_type)
    for tensor in spec["tensors"]:
        ggml_type = GGMLType(tensor["type"])
        shape = tuple(tensor["shape"])  # NumPy order: [n_out, n_in]
        if ggml_type == GGMLType.F32:
            # Norm weights near 1, like a trained model's, so activations keep their scale.
            values = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
            writer.add_tensor(tensor["name"], values)
            continue
        raw = random_blocks(rng, ggml_type, shape)
        byte_shape = (*shape[:-1], raw.size // int(np.prod(shape[:-1])))
        writer.add_tensor(tensor["name"], raw.reshape(byte_shape), raw_dtype=gguf.GGMLQuantizationType(int(ggml_type)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    save = sub.add_parser("save")
    save.add_argument("model", type=Path)
    save.add_argument("skeleton", type=Path)
    write = sub.add_parser("write")
    write.add_argument("skeleton", type=Path)
    write.add_argument("twin", type=Path)
    args = parser.parse_args(argv)
    if args.command == "save":
        save_skeleton(args.model, args.skeleton)
    else:
        write_twin(args.skeleton, args.twin)
    return 0


if __name__ == "__main__":
    sys.exit(main())
