"""BPE pre-tokenizers: how llama.cpp cuts text into words before merging, per `tokenizer.ggml.pre`.

llama.cpp gives each pre-tokenizer a list of regexes applied one after another: each regex
cuts every piece produced so far into its matches and the unmatched gaps between them. Three
regexes (GPT-2's, Llama 3's, Qwen2's) it runs through hand-written code rather than a regex
engine; the patterns below reproduce that code's splits. The rest it runs through std::regex:
on the collapsed text when the regex uses \\p{..} (see codepoints.py), otherwise on the text
with non-ASCII whitespace turned into \\x0b, with std::regex's ASCII-only \\s.
"""

import re
from dataclasses import dataclass

from rz.errors import TokenizerError
from rz.tokenizer.codepoints import (
    LETTER_CLASS as L,
    NUMBER_CLASS as N,
    PUNCTUATION_CLASS as P,
    SPACE_CLASS as S,
    collapse,
    widen,
)


@dataclass(frozen=True)
class SplitStep:
    """One regex of a pre-tokenizer and which form of the text it runs over."""

    pattern: re.Pattern
    on_collapsed: bool  # True: the collapsed text; False: the text with non-ASCII whitespace as \x0b


def _collapsed(pattern: str) -> SplitStep:
    return SplitStep(re.compile(pattern), on_collapsed=True)


def _wide(pattern: str) -> SplitStep:
    return SplitStep(re.compile(pattern), on_collapsed=False)


# llama.cpp's hand-written GPT-2 splitter: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)
# (a lone whitespace before a non-space, which that regex leaves unmatched, becomes its own word).
_GPT2 = _collapsed(rf"'(?:[stmd]|re|ve|ll)| ?[{L}]+| ?[{N}]+| ?[^{S}{L}{N}]+|[{S}]+(?![^{S}])|[{S}]+")

# llama.cpp's hand-written Llama 3 splitter:
# (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
_LLAMA3 = _collapsed(
    rf"'(?:[sStTmMdD]|[rR][eE]|[vV][eE]|[lL][lL])|[^\r\n{L}{N}]?[{L}]+|[{N}]{{1,3}}"
    rf"| ?[^{S}{L}{N}]+[\r\n]*|[{S}]*[\r\n]+|[{S}]+(?![^{S}])|[{S}]+"
)

# llama.cpp's hand-written Qwen2 splitter: Llama 3's with single digits.
_QWEN2 = _collapsed(
    rf"'(?:[sStTmMdD]|[rR][eE]|[vV][eE]|[lL][lL])|[^\r\n{L}{N}]?[{L}]+|[{N}]"
    rf"| ?[^{S}{L}{N}]+[\r\n]*|[{S}]*[\r\n]+|[{S}]+(?![^{S}])|[{S}]+"
)

# llama.cpp's GPT-4o regex (Phi-4-mini, Llama 4), run through std::regex on the collapsed text, where
# a non-ASCII letter is neither [a-z] nor [A-Z]: a word is a run of letters that are not lower case
# followed by letters that are not upper case (or the reverse), with an optional contraction.
_CONTRACTION = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?"
_GPT4O = _collapsed(
    rf"[^\r\n{L}{N}]?(?:(?=[{L}])[^a-z])*(?:(?=[{L}])[^A-Z])+{_CONTRACTION}"
    rf"|[^\r\n{L}{N}]?(?:(?=[{L}])[^a-z])+(?:(?=[{L}])[^A-Z])*{_CONTRACTION}"
    rf"|[{N}]{{1,3}}| ?[^{S}{L}{N}]+[\r\n/]*|[{S}]*[\r\n]+|[{S}]+(?![^{S}])|[{S}]+"
)

_SINGLE_DIGIT = _collapsed(rf"[{N}]")
_DIGIT_RUN = _collapsed(rf"[{N}]+")
_LINE_BREAK = _wide(r"[\r\n]")
# CJK ideographs, everything from U+0800 up to them, and Hangul syllables.
_CJK_RUN = _wide("[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+")

# DeepSeek LLM's letter class, as written in its tokenizer.json (escaped: several of these
# characters have canonical equivalents that an editor may silently substitute).
_DEEPSEEK_LETTERS = (
    "A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
    "\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1"
    "\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd"
    "\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d"
    "\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4"
    "\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec"
    "\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128"
    "\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b"
    "\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787"
    "\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a"
    "\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2"
    "\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943"
)
# DeepSeek's punctuation: ASCII and fullwidth punctuation, curly quotes, CJK space and full stop.
_DEEPSEEK_PUNCTUATION = "!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002"

_REGEX_FAMILIES: dict[str, tuple[SplitStep, ...]] = {
    "default": (
        _collapsed(rf"[{P}$+<=>^~|]+"),
        _GPT2,
        _DIGIT_RUN,
        _wide(r"[0-9][0-9][0-9]"),
    ),
    "gpt2": (_GPT2,),
    "llama3": (_LLAMA3,),
    "qwen2": (_QWEN2,),
    "gpt-4o": (_GPT4O,),
    "starcoder": (_SINGLE_DIGIT, _GPT2),
    "deepseek-llm": (
        _LINE_BREAK,
        _wide(rf"[{S}]?[{_DEEPSEEK_LETTERS}]+"),
        _wide(rf"[{S}]?[{_DEEPSEEK_PUNCTUATION}]+"),
        _wide(rf"[{S}]+\Z"),
        _CJK_RUN,
        _DIGIT_RUN,
    ),
    "deepseek-coder": (
        _LINE_BREAK,
        _collapsed(rf"[{S}]?[{L}]+"),
        _collapsed(rf"[{S}]?[{P}]+"),
        _CJK_RUN,
        _SINGLE_DIGIT,
    ),
}


@dataclass(frozen=True)
class PreTokenizer:
    """A pre-tokenizer name resolved to its regexes and the vocabulary defaults llama.cpp ties to it."""

    name: str
    steps: tuple[SplitStep, ...]
    ignore_merges: bool = False  # a word that is itself a token skips the merges
    add_bos: bool = False  # the default when the file has no tokenizer.ggml.add_bos_token
    has_bos: bool = True  # False: llama.cpp drops the BPE default BOS id for this tokenizer

    def split(self, text: str) -> list[str]:
        """text cut into words, in order; the words concatenate back to text."""
        collapsed = collapse(text) if any(step.on_collapsed for step in self.steps) else ""
        wide = widen(text) if not all(step.on_collapsed for step in self.steps) else ""
        bounds = [(0, len(text))]
        for step in self.steps:
            subject = collapsed if step.on_collapsed else wide
            finditer = step.pattern.finditer
            pieces = []
            for start, end in bounds:
                position = start
                for match in finditer(subject, start, end):
                    match_start, match_end = match.span()
                    if match_start > position:
                        pieces.append((position, match_start))
                    pieces.append((match_start, match_end))
                    position = match_end
                if position < end:
                    pieces.append((position, end))
            bounds = pieces
        return [text[start:end] for start, end in bounds]


def _aliases(family: str, names: str, **options) -> dict[str, tuple[str, dict]]:
    return {name: (family, options) for name in names.split()}


# Every `tokenizer.ggml.pre` llama.cpp maps onto the regex families above, with its defaults.
_PRE_TOKENIZERS = {
    **_aliases("default", "default"),
    **_aliases(
        "llama3",
        "llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano",
        ignore_merges=True,
        add_bos=True,
    ),
    **_aliases("llama3", "dbrx smaug-bpe"),
    **_aliases("llama3", "chatglm-bpe", has_bos=False),
    **_aliases("llama3", "glm4 glm5", has_bos=False, ignore_merges=True),
    **_aliases(
        "gpt2",
        "gpt-2 phi-2 jina-es jina-de gigachat jina-v2-es jina-v2-de a.x-4.0 mellum modern-bert "
        "jina-v1-en jina-v2-code roberta-bpe exaone4 mpt olmo jais trillion granite-docling",
    ),
    **_aliases("qwen2", "qwen2 deepseek-r1-qwen kormo f2llmv2 megrez stablelm2 hunyuan solar-open"),
    **_aliases("gpt-4o", "gpt-4o llama4"),
    **_aliases("starcoder", "starcoder refact command-r smollm codeshell exaone minerva-7b mellum2"),
    **_aliases("deepseek-llm", "deepseek-llm"),
    **_aliases("deepseek-coder", "deepseek-coder"),
}

SUPPORTED_PRE_TOKENIZERS = frozenset(_PRE_TOKENIZERS)


def pre_tokenizer(name: str) -> PreTokenizer:
    """The pre-tokenizer llama.cpp uses for `tokenizer.ggml.pre` = name."""
    try:
        family, options = _PRE_TOKENIZERS[name]
    except KeyError:
        raise TokenizerError(
            f"unsupported BPE pre-tokenizer tokenizer.ggml.pre={name!r}: rz tokenizes like llama.cpp "
            f"only for {', '.join(sorted(SUPPORTED_PRE_TOKENIZERS))}"
        ) from None
    return PreTokenizer(name=name, steps=_REGEX_FAMILIES[family], **options)
