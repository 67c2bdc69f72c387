"""Structured output: a request's constraint (JSON schema, regex, GBNF or Lark grammar) and the
per-step token masks that hold the output to it.

llguidance compiles a constraint against the GGUF's own vocabulary (the bytes each token id stands
for) into a matcher, which gives the set of allowed next tokens as a bitmask and follows the tokens
sampled. The engine sends the masks of a batch to the device as one int32 [rows, ceil(n_vocab/32)]
array (bit i of word w allows token 32*w + i); rows without a constraint are all ones. This module
is host-side only and imports no JAX.
"""

import json
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from rz.errors import RequestError

# The kinds of constraint, by the name the fronts give them.
KINDS = ("json_schema", "regex", "gbnf", "lark")
# JSON as OpenAI's json_schema mode writes it: one line, a space after ':' and ','. Without
# fixed separators llguidance allows any run of whitespace, where a sampling model can wander.
_JSON_LAYOUT = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}
_ANY_OBJECT = '{"type": "object"}'
# Compiled constraints kept per vocabulary: a request is validated, then admitted, and n choices
# or a client's repeated requests ask for the same one; each use starts from a copy.
_COMPILED_KEPT = 64


@dataclass(frozen=True)
class Constraint:
    """What a request's output must match: `kind` (one of KINDS) and its source text (a schema as JSON text)."""

    kind: str
    source: str

    def grammar(self) -> str:
        """The constraint in llguidance's grammar format; RequestError if it is malformed."""
        import llguidance

        try:
            if self.kind == "json_schema":
                return llguidance.LLMatcher.grammar_from_json_schema(self.source, defaults=_JSON_LAYOUT)
            if self.kind == "regex":
                return llguidance.LLMatcher.grammar_from_regex(self.source)
            return llguidance.grammar_from("gbnf" if self.kind == "gbnf" else "lark", self.source)
        except ValueError as error:
            raise RequestError(f"the {self.kind} constraint is malformed: {error}") from None


def constraint_of(response_format: Any = None, grammar: Any = None) -> Constraint | None:
    """The constraint a request's `response_format` and `grammar` options ask for (None: free text).

    response_format is OpenAI's object: {"type": "text"}, {"type": "json_object"},
    {"type": "json_schema", "json_schema": {"schema": {...}}}, and rz's {"type": "regex", "regex": "..."}
    and {"type": "lark", "lark": "..."}. grammar is a GBNF grammar (llama.cpp's `grammar` field).
    """
    if grammar is not None:
        if not isinstance(grammar, str) or not grammar.strip():
            raise RequestError(f"grammar must be a non-empty GBNF grammar (text), got {grammar!r:.60}")
        if response_format is not None and _format_type(response_format) != "text":
            raise RequestError("give either grammar or a response_format other than text, not both")
        return Constraint("gbnf", grammar)
    if response_format is None:
        return None
    kind = _format_type(response_format)
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint("json_schema", _ANY_OBJECT)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema", {"type": "object"}) if isinstance(spec, dict) else None
        if not isinstance(schema, (dict, bool)):
            raise RequestError('response_format json_schema needs {"json_schema": {"schema": {...}}} with a JSON schema object')
        return Constraint("json_schema", json.dumps(schema, sort_keys=True))
    source = response_format.get(kind)
    if not isinstance(source, str) or not source:
        raise RequestError(f'response_format of type "{kind}" needs its {kind} as text: {{"type": "{kind}", "{kind}": "..."}}')
    return Constraint(kind, source)


def _format_type(response_format: Any) -> str:
    kinds = ("text", "json_object", "json_schema", "regex", "lark")
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind not in kinds:
        raise RequestError(f"response_format must be an object whose type is one of {', '.join(kinds)}, got {response_format!r:.80}")
    return kind


def response_format_of(constraint: Constraint | None) -> tuple[dict | None, str | None]:
    """(response_format, grammar) options asking for a constraint: the inverse of constraint_of."""
    if constraint is None:
        return None, None
    if constraint.kind == "gbnf":
        return None, constraint.source
    if constraint.kind == "json_schema":
        return {"type": "json_schema", "json_schema": {"schema": json.loads(constraint.source)}}, None
    return {"type": constraint.kind, constraint.kind: constraint.source}, None


class Vocabulary:
    """A tokenizer's vocabulary as llguidance sees it, built once per tokenizer (about a second for 262k tokens)."""

    def __init__(self, tokenizer, n_vocab: int):
        import llguidance

        self.n_vocab = n_vocab
        self.n_words = (n_vocab + 31) // 32
        wrapper = llguidance.TokenizerWrapper(_Tokens(tokenizer))
        self._tokenizer = llguidance.LLTokenizer(wrapper, n_vocab=n_vocab, eos_token=sorted(tokenizer.eog_ids))
        self._compiled: dict[Constraint, Any] = {}  # oldest first
        self._compiled_lock = threading.Lock()  # requests are validated on server threads, admitted on the loop's

    def matcher(self, constraint: Constraint) -> "ConstraintMatcher":
        """A fresh matcher at the start of the constraint; RequestError if it does not compile."""
        import llguidance

        with self._compiled_lock:
            compiled = self._compiled.get(constraint)
        if compiled is None:
            compiled = llguidance.LLMatcher(self._tokenizer, constraint.grammar(), log_level=0)
            if compiled.is_error():
                raise RequestError(f"the {constraint.kind} constraint does not compile: {compiled.get_error()}")
            with self._compiled_lock:
                if len(self._compiled) >= _COMPILED_KEPT:
                    del self._compiled[next(iter(self._compiled))]
                self._compiled[constraint] = compiled
        return ConstraintMatcher(compiled.deep_copy())

    def masks(self, matchers: list["ConstraintMatcher | None"]) -> np.ndarray:
        """int32 [len(matchers), n_words]: each matcher's allowed next tokens; all ones where None."""
        import llguidance.numpy

        bits = llguidance.numpy.allocate_token_bitmask(len(matchers), self.n_vocab)
        for row, matcher in enumerate(matchers):
            if matcher is not None:
                llguidance.numpy.fill_next_token_bitmask(matcher.llmatcher, bits, row)
        return bits


@dataclass(eq=False)
class ConstraintMatcher:
    """One request's position in its constraint: which tokens may come next, advanced token by token."""

    llmatcher: Any

    def advance(self, token: int) -> None:
        """Follow a sampled token; RequestError if the constraint did not allow it."""
        if not self.llmatcher.consume_token(token):
            raise RequestError(f"token {token} broke the output constraint: {self.llmatcher.get_error()}")

    @property
    def finished(self) -> bool:
        """The constraint is complete and allows no more tokens."""
        return self.llmatcher.is_stopped()


class _Tokens:
    """What llguidance.TokenizerWrapper reads: each token's bytes, the special ids, and an encoder.

    Control and unknown tokens are named by their text after a 0xFF byte, llguidance's mark of a
    special token (as its llama.cpp binding writes them): text can then never spell them.
    """

    def __init__(self, tokenizer):
        from rz.tokenizer.vocab import TokenAttr

        vocab = tokenizer.vocab
        special = TokenAttr.CONTROL | TokenAttr.UNKNOWN
        self.tokens = [
            b"\xff" + text.encode("utf-8") if int(attr) & special else tokenizer.token_to_piece(token_id)
            for token_id, (text, attr) in enumerate(zip(vocab.tokens, vocab.attrs))
        ]
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id
        self.special_token_ids = [i for i, attr in enumerate(vocab.attrs) if int(attr) & special]
        self._tokenizer = tokenizer

    def __call__(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_bos=False)
