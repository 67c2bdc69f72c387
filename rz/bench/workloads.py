"""What is measured: llama-bench's tests (pp, tg, pg, at a depth, for a batch) and their prompts.

Definitions, the same for every engine (llama-bench's, with generation made real):
  ppN      N prompt tokens processed (after `depth` tokens already in the KV cache); tok/s = N / t.
  tgN      N tokens generated one at a time after the first, greedy, EOS ignored; tok/s = N / t.
  ppN+tgM  a prompt of N tokens, then M generated; tok/s = (N + M) / t over the whole request.
  xB       B sequences decoding together (tg only); tok/s = B * N / t, the aggregate.
Each repetition gets a prompt of its own (same across engines, different across repetitions), so
no engine can answer from a prompt cache.
"""

import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from rz.bench.errors import BenchError

KINDS = ("pp", "tg", "pg")
MAX_TOKENS = 1 << 20

# Plain words tokenize to about one token each in every vocabulary, and a shuffled
# sequence of them gives a distinct but realistic prompt per repetition.
_WORDS = (
    "time person year way day thing man world life hand part child eye woman place work week case "
    "point government company number group problem fact be have do say get make go know take see "
    "come think look want give use find tell ask seem feel try leave call good new first last long "
    "great little own other old right big high different small large next early young important few "
    "public bad same able to of in for on with at by from up about into over after beneath under "
    "above the and a that I it not he as you this but his they her she or an will my one all would "
    "there their river mountain garden window market letter music story kitchen morning evening "
    "winter summer island forest engine bridge harbor village silver copper paper stone"
).split()


@dataclass(frozen=True)
class Workload:
    """One test: its kind, token counts, KV-cache depth and number of sequences decoding together."""

    kind: str
    n_prompt: int = 0
    n_gen: int = 0
    depth: int = 0
    batch: int = 1

    @property
    def name(self) -> str:
        """llama-bench's name: pp512, tg128, pp512+tg128, then ' x8' for a batch and ' @ d512' for depth."""
        base = {"pp": f"pp{self.n_prompt}", "tg": f"tg{self.n_gen}", "pg": f"pp{self.n_prompt}+tg{self.n_gen}"}[self.kind]
        return base + (f" x{self.batch}" if self.batch > 1 else "") + (f" @ d{self.depth}" if self.depth else "")

    @property
    def tokens_counted(self) -> int:
        """The tokens a repetition's tok/s is counted over."""
        return {"pp": self.n_prompt, "tg": self.n_gen, "pg": self.n_prompt + self.n_gen}[self.kind] * self.batch

    @property
    def prompt_length(self) -> int:
        """Tokens in each sequence's prompt: depth then the measured prompt (at least one token for tg)."""
        if self.kind == "tg":
            return max(self.depth, 1)
        return self.depth + self.n_prompt

    @property
    def max_tokens(self) -> int:
        """Tokens each sequence generates, counting the first (which comes from the prompt pass)."""
        return 1 if self.kind == "pp" else self.n_gen + 1

    def as_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "n_prompt": self.n_prompt, "n_gen": self.n_gen,
                "depth": self.depth, "batch": self.batch}


_PATTERNS = (
    (re.compile(r"pp(-?\d+)"), lambda m: ("pp", int(m[1]), 0)),
    (re.compile(r"tg(-?\d+)"), lambda m: ("tg", 0, int(m[1]))),
    (re.compile(r"(?:pg|pp)(-?\d+)\+(?:tg)?(-?\d+)"), lambda m: ("pg", int(m[1]), int(m[2]))),
)


def parse_tests(tests: str, depths: str = "0", batches: str = "1", n_ctx: int | None = None) -> list[Workload]:
    """The tests named in a comma list (pp512,tg128,pp512+tg128), crossed with depths and batch sizes.

    Batch sizes above 1 apply to tg tests only (decoding together is what a batch measures).
    """
    depth_values = _int_list(depths, "--depth", minimum=0)
    batch_values = _int_list(batches, "--batch", minimum=1)
    specs = []
    for item in _split(tests):
        kind, n_prompt, n_gen = _parse_one(item)
        for depth in depth_values:
            for batch in batch_values:
                if batch > 1 and kind != "tg":
                    continue
                spec = Workload(kind, n_prompt, n_gen, depth, batch)
                needed = spec.prompt_length + spec.max_tokens
                if n_ctx is not None and needed > n_ctx:
                    raise BenchError(f"{spec.name} needs {needed} positions per sequence, more than --n-ctx {n_ctx}")
                if spec not in specs:
                    specs.append(spec)
    if not specs:
        raise BenchError(f"no tests to run from --tests {tests!r} and --batch {batches!r} (a batch applies to tg tests)")
    return specs


def _parse_one(item: str) -> tuple[str, int, int]:
    text = item.replace(" ", "").lower()
    for pattern, build in _PATTERNS:
        match = pattern.fullmatch(text)
        if match:
            kind, n_prompt, n_gen = build(match)
            for label, value in (("prompt", n_prompt), ("generated", n_gen)):
                needed = (kind == "pp" and label == "prompt") or (kind == "tg" and label == "generated") or kind == "pg"
                if needed and not 1 <= value <= MAX_TOKENS:
                    raise BenchError(f"test {item!r} is impossible: the number of {label} tokens must be 1..{MAX_TOKENS}")
            return kind, n_prompt, n_gen
    raise BenchError(f"unknown test {item!r}: use ppN, tgN or ppN+tgM (like pp512, tg128, pp512+tg128)")


def _split(text: str) -> list[str]:
    items = [item.strip() for item in str(text).split(",") if item.strip()]
    if not items:
        raise BenchError("--tests is empty: name at least one test, like pp512,tg128")
    return items


def _int_list(text: str, option: str, minimum: int) -> list[int]:
    values = []
    for item in str(text).split(","):
        try:
            value = int(item.strip())
        except ValueError:
            raise BenchError(f"{option} takes a comma list of integers, got {text!r}") from None
        if value < minimum:
            raise BenchError(f"{option} {value} is impossible: values must be at least {minimum}")
        values.append(value)
    return values


@dataclass(frozen=True)
class Prompt:
    """One sequence's prompt as token ids, and as the text that tokenizes to them (for HTTP servers)."""

    ids: tuple[int, ...]
    text: str


class PromptMaker:
    """Deterministic prompts of an exact token length, from the model's own tokenizer."""

    def __init__(self, tokenizer, seed: int = 0):
        self.tokenizer = tokenizer
        self.seed = seed
        self._bos = getattr(tokenizer, "bos_id", None)

    def make(self, length: int, test: Workload, repetition: int, sequence: int = 0) -> Prompt:
        """A prompt of `length` tokens, the same for every engine at this (test, repetition, sequence)."""
        rng = random.Random(f"{self.seed}/{test.name}/{repetition}/{sequence}")
        words = []
        ids: list[int] = []
        while len(ids) < length:
            # Starting each prompt with a different word keeps any prefix cache to the BOS token.
            words.extend(rng.sample(_WORDS, len(_WORDS)))
            ids = self.tokenizer.encode(" ".join(words), add_bos=None)
        ids = ids[:length]
        body = ids[1:] if ids and ids[0] == self._bos else ids
        return Prompt(ids=tuple(ids), text=self.tokenizer.decode(body))


@lru_cache(maxsize=4)
def model_tokenizer(path: Path):
    """rz's tokenizer for a GGUF file (the same ids as llama.cpp's), without loading weights."""
    from rz.gguf import GGUFFile
    from rz.tokenizer import Tokenizer

    with GGUFFile(path) as model:
        return Tokenizer.from_gguf_metadata(model.metadata)
