"""A GGUF vocabulary read as llama.cpp reads it: token texts and attributes, special ids, flags.

llama.cpp does more than copy `tokenizer.ggml.*`: it fills in default special ids per
tokenizer kind, finds end-of-turn and end-of-generation tokens by their text, and marks such
tokens as control tokens (which changes how they tokenize and detokenize). All of that is
reproduced here, because it decides which ids rz produces.
"""

import enum
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from rz.errors import TokenizerError
from rz.tokenizer.pretokenizers import PreTokenizer, pre_tokenizer


class TokenAttr(enum.IntFlag):
    """llama.cpp's per-token attributes (llama_token_attr)."""

    UNDEFINED = 0
    UNKNOWN = 1 << 0
    UNUSED = 1 << 1
    NORMAL = 1 << 2
    CONTROL = 1 << 3
    USER_DEFINED = 1 << 4
    BYTE = 1 << 5


# tokenizer.ggml.token_type values 0..6 (llama_token_type) as attributes.
_ATTR_BY_TOKEN_TYPE = np.array(
    [
        TokenAttr.UNDEFINED,
        TokenAttr.NORMAL,
        TokenAttr.UNKNOWN,
        TokenAttr.CONTROL,
        TokenAttr.USER_DEFINED,
        TokenAttr.UNUSED,
        TokenAttr.BYTE,
    ],
    dtype=np.int32,
)

# Texts llama.cpp recognises, in the order rz prefers them when a vocabulary has several:
# llama.cpp takes whichever its hash map yields first.
_EOT_TEXTS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
    "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>",
)  # fmt: skip
_EOM_TEXTS = ("<|eom_id|>",)
_FIM_PRE_TEXTS = (
    "<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
    "<|code_prefix|>", "<|prefix|>",
)  # fmt: skip
_FIM_SUF_TEXTS = (
    "<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
    "<|code_suffix|>", "<|suffix|>",
)  # fmt: skip
_FIM_MID_TEXTS = (
    "<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
    "<|code_middle|>", "<|middle|>",
)  # fmt: skip
_FIM_PAD_TEXTS = ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]")
_FIM_REP_TEXTS = ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>")
_FIM_SEP_TEXTS = ("<|file_sep|>",)
# Special ids llama.cpp looks up by text when the file does not give them.
_TEXTS_BY_SPECIAL = {
    "eot": _EOT_TEXTS,
    "eom": _EOM_TEXTS,
    "fim_pre": _FIM_PRE_TEXTS,
    "fim_suf": _FIM_SUF_TEXTS,
    "fim_mid": _FIM_MID_TEXTS,
    "fim_pad": _FIM_PAD_TEXTS,
    "fim_rep": _FIM_REP_TEXTS,
    "fim_sep": _FIM_SEP_TEXTS,
}
_EOG_TEXTS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<｜end▁of▁sentence｜>", "[e~[",
)  # fmt: skip
# gpt-oss's channel markers: llama.cpp always renders them, so it makes them user-defined.
_ALWAYS_RENDERED_TEXTS = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")

# (special, metadata key) in llama.cpp's reading order: a later key for the same special wins.
_SPECIAL_ID_KEYS = (
    ("bos", "tokenizer.ggml.bos_token_id"),
    ("eos", "tokenizer.ggml.eos_token_id"),
    ("eot", "tokenizer.ggml.eot_token_id"),
    ("eom", "tokenizer.ggml.eom_token_id"),
    ("unk", "tokenizer.ggml.unknown_token_id"),
    ("fim_pre", "tokenizer.ggml.fim_pre_token_id"),
    ("fim_suf", "tokenizer.ggml.fim_suf_token_id"),
    ("fim_mid", "tokenizer.ggml.fim_mid_token_id"),
    ("fim_pad", "tokenizer.ggml.fim_pad_token_id"),
    ("fim_rep", "tokenizer.ggml.fim_rep_token_id"),
    ("fim_sep", "tokenizer.ggml.fim_sep_token_id"),
    ("fim_pre", "tokenizer.ggml.prefix_token_id"),
    ("fim_suf", "tokenizer.ggml.suffix_token_id"),
    ("fim_mid", "tokenizer.ggml.middle_token_id"),
)

SPM, BPE = "spm", "bpe"
_KIND_BY_MODEL = {"llama": SPM, "gpt2": BPE}


@dataclass(frozen=True, eq=False)
class Vocab:
    """Everything the tokenizer needs from `tokenizer.ggml.*`, with llama.cpp's defaults applied."""

    kind: str  # SPM or BPE
    pre_tokenizer: PreTokenizer | None  # BPE only
    tokens: list[str]
    token_to_id: dict[str, int]
    scores: np.ndarray  # float32 [vocab_size]
    attrs: np.ndarray  # int32 [vocab_size] of TokenAttr bits
    merges: list[str]  # BPE only
    bos_id: int | None
    eos_id: int | None
    eot_id: int | None
    eog_ids: frozenset[int]
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool

    @property
    def size(self) -> int:
        return len(self.tokens)

    def special_token_ids(self) -> list[int]:
        """Control, user-defined and unknown tokens, longest text first: the order llama.cpp matches them in text."""
        mask = TokenAttr.CONTROL | TokenAttr.USER_DEFINED | TokenAttr.UNKNOWN
        ids = np.flatnonzero(self.attrs & mask).tolist()
        # llama.cpp's sort is not stable; rz breaks length ties by id.
        return sorted(ids, key=lambda token_id: -len(self.tokens[token_id].encode("utf-8")))


def read_vocab(metadata: Mapping[str, Any]) -> Vocab:
    """The vocabulary described by a GGUF file's metadata."""
    model = metadata.get("tokenizer.ggml.model")
    if model is None:
        raise TokenizerError("the GGUF metadata has no tokenizer.ggml.model: the file carries no vocabulary")
    kind = _KIND_BY_MODEL.get(model)
    if kind is None:
        raise TokenizerError(
            f"tokenizer.ggml.model={model!r} is not supported; rz reads 'llama' (SentencePiece) and 'gpt2' (BPE)"
        )
    tokens = _token_texts(metadata)
    size = len(tokens)
    token_to_id = {text: token_id for token_id, text in enumerate(tokens)}
    if len(token_to_id) != size:
        raise TokenizerError(f"tokenizer.ggml.tokens holds {size - len(token_to_id)} duplicate token texts")
    scores = _per_token_array(metadata, "tokenizer.ggml.scores", size, np.float32, default=0.0)
    attrs = _token_attrs(_per_token_array(metadata, "tokenizer.ggml.token_type", size, np.int32, default=1))

    pre = metadata.get("tokenizer.ggml.pre")
    merges: list[str] = []
    pre_tok = None
    if kind == BPE:
        merges = metadata.get("tokenizer.ggml.merges")
        if merges is None:
            raise TokenizerError("a BPE ('gpt2') vocabulary needs tokenizer.ggml.merges, and this file has none")
        if not pre:
            warnings.warn(
                "the GGUF has no tokenizer.ggml.pre; using llama.cpp's 'default' pre-tokenizer, "
                "which may tokenize differently from the model's training (re-convert the model)",
                stacklevel=3,
            )
        pre_tok = pre_tokenizer(pre or "default")
        defaults = {"bos": 11 if pre_tok.has_bos else None, "eos": 11}
        add_bos, add_space_prefix = pre_tok.add_bos, False
    else:
        defaults = {"bos": 1, "eos": 2, "unk": 0}
        add_bos, add_space_prefix = True, True

    special = _special_ids(metadata, defaults, size)
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", add_bos))
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
    add_space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", add_space_prefix))

    def find(texts: tuple[str, ...]) -> int | None:
        return next((token_to_id[text] for text in texts if text in token_to_id), None)

    def mark_control(token_id: int | None) -> None:
        if token_id is not None:
            attrs[token_id] |= TokenAttr.CONTROL

    for name, texts in _TEXTS_BY_SPECIAL.items():
        if special[name] is None:
            special[name] = find(texts)
            mark_control(special[name])
    _mark_unused(tokens, attrs)
    eog_ids = _end_of_generation_ids(tokens, token_to_id, attrs, special)

    return Vocab(
        kind=kind,
        pre_tokenizer=pre_tok,
        tokens=tokens,
        token_to_id=token_to_id,
        scores=scores,
        attrs=attrs,
        merges=list(merges),
        bos_id=special["bos"],
        eos_id=special["eos"],
        eot_id=special["eot"],
        eog_ids=frozenset(eog_ids),
        add_bos=add_bos,
        add_eos=add_eos,
        add_space_prefix=add_space_prefix,
    )


def _token_texts(metadata: Mapping[str, Any]) -> list[str]:
    tokens = metadata.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise TokenizerError("the GGUF metadata has no tokenizer.ggml.tokens")
    if len(tokens) == 0:
        raise TokenizerError("tokenizer.ggml.tokens is empty")
    if isinstance(tokens, list) and all(tokens):
        return tokens  # the metadata's own list, not a second one of the vocabulary's size
    # llama.cpp renames empty tokens so that every text is a distinct, non-empty key.
    return [text if text else f"[EMPTY_{token_id}]" for token_id, text in enumerate(tokens)]


def _per_token_array(metadata: Mapping[str, Any], key: str, size: int, dtype, default) -> np.ndarray:
    values = metadata.get(key)
    if values is None:
        return np.full(size, default, dtype=dtype)
    values = np.asarray(values)
    if values.ndim != 1 or values.size < size:
        raise TokenizerError(f"{key} has {values.size} entries but the vocabulary has {size} tokens")
    return values[:size].astype(dtype)


def _token_attrs(token_types: np.ndarray) -> np.ndarray:
    """Each token's attributes from its type; a type llama.cpp does not know is UNDEFINED."""
    known = (token_types >= 0) & (token_types < len(_ATTR_BY_TOKEN_TYPE))
    attrs = np.where(known, _ATTR_BY_TOKEN_TYPE[np.where(known, token_types, 0)], TokenAttr.UNDEFINED)
    return attrs.astype(np.int32)


def _special_ids(metadata: Mapping[str, Any], defaults: dict[str, int | None], size: int) -> dict:
    special = {name: defaults.get(name) for name, _ in _SPECIAL_ID_KEYS}
    for name, token_id in special.items():
        if token_id is not None and token_id >= size:
            special[name] = None
    for name, key in _SPECIAL_ID_KEYS:
        value = metadata.get(key)
        # llama.cpp ignores an id outside the vocabulary and keeps what it had.
        if value is not None and 0 <= int(value) < size:
            special[name] = int(value)
    return special


def _mark_unused(tokens: list[str], attrs: np.ndarray) -> None:
    for token_id in np.flatnonzero(attrs & TokenAttr.CONTROL).tolist():
        if "unused" in tokens[token_id]:
            attrs[token_id] |= TokenAttr.UNUSED


def _end_of_generation_ids(tokens: list[str], token_to_id: dict[str, int], attrs: np.ndarray, special: dict) -> set[int]:
    eog = {special[name] for name in ("fim_pad", "fim_rep", "fim_sep") if special[name] is not None}
    for text in _EOG_TEXTS:
        token_id = token_to_id.get(text)
        if token_id is not None:
            eog.add(token_id)
            attrs[token_id] |= TokenAttr.CONTROL
    for text in _ALWAYS_RENDERED_TEXTS:
        if text in token_to_id:
            attrs[token_to_id[text]] = TokenAttr.USER_DEFINED
    eog.update(special[name] for name in ("eos", "eot", "eom") if special[name] is not None)

    eog_by_text = {tokens[token_id]: token_id for token_id in eog}
    # gpt-oss and solar-open end a message with <|end|> but a generation with <|return|> or
    # <|call|> (<|calls|> and <|flush|>): there <|end|> does not end a generation.
    has_call = "<|call|>" in eog_by_text or "<|calls|>" in eog_by_text
    has_end_alternative = "<|return|>" in eog_by_text or "<|flush|>" in eog_by_text
    if "<|end|>" in eog_by_text and has_call and has_end_alternative:
        eog.discard(eog_by_text["<|end|>"])
        attrs[eog_by_text["<|end|>"]] = TokenAttr.USER_DEFINED
    # Gemma 4 and PLaMo use </s> as an ordinary token.
    if "</s>" in eog_by_text and ("<|tool_response>" in eog_by_text or "<|plamo:eos|>" in eog_by_text):
        eog.discard(eog_by_text["</s>"])
        attrs[eog_by_text["</s>"]] = TokenAttr.NORMAL
    return eog
