"""Very long pre-tokenized words: the ids stay llama.cpp's, memory grows linearly and leanly, the
word cache stays within its byte budget; long texts go to a child process, in turns that a
caller's leaving or a shutdown drops."""

import os
import random
import sys
import threading
import time
import tracemalloc

import pytest

from rz.errors import CallerGoneError, ShuttingDownError, TokenizerBusyError
from rz.tokenizer import long_texts
from rz.tokenizer import tokenizer as tokenizer_module

LONG_TEXT = "ab" * (long_texts.LONG_TEXT_CHARS // 2 + 1)


def long_words(seed: int) -> list[str]:
    rng = random.Random(seed)
    return [
        "a" * 30_000,
        "ab" * 15_000,
        "".join(rng.choice("abcdefgh") for _ in range(20_000)),
        "\u00e9" * 10_000 + "z",
        " " * 20_000 + "x",
    ]


@pytest.mark.parametrize("model_name", ["gemma3", "smollm2"])
def test_long_words_tokenize_as_llama_cpp_does(model_name, request):
    model = request.getfixturevalue(model_name)
    for text in long_words(5):
        expected = model.reference.tokenize(text, add_special=False, special=False)
        assert model.rz.encode(text, add_bos=False) == expected, text[:20]


@pytest.mark.parametrize("model_name", ["gemma3", "smollm2"])
def test_merging_a_long_word_takes_linear_lean_memory(model_name, request):
    model = request.getfixturevalue(model_name)
    text = "ab" * 50_000
    tracemalloc.start()
    try:
        model.rz.encode_here(text, add_bos=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # One heap key, two array slots and one list slot per character, plus the text's copies;
    # queueing (priority, left, merged text) tuples took 245-257 bytes per character.
    assert peak / len(text) < 150


def test_word_cache_keeps_within_its_byte_budget_and_skips_long_words(smollm2, monkeypatch):
    tokenizer = smollm2.rz
    monkeypatch.setattr(tokenizer, "_word_ids", {})
    monkeypatch.setattr(tokenizer, "_word_cache_bytes", 0)
    monkeypatch.setattr(tokenizer_module, "_WORD_CACHE_BYTES", 20_000)
    tokenizer.encode("x" * (tokenizer_module._CACHED_WORD_CHARS + 1), add_bos=False)
    assert tokenizer._word_ids == {}
    words = [f"word{i}" for i in range(2_000)]
    for word in words:
        tokenizer.encode(" " + word, add_bos=False)
        cached = tokenizer._word_ids
        assert sum(tokenizer_module._cache_cost(w, ids) for w, ids in cached.items()) == tokenizer._word_cache_bytes <= 20_000
    assert 0 < len(tokenizer._word_ids) < len(words)
    assert tokenizer.encode(" word1999", add_bos=False) == smollm2.reference.tokenize(" word1999", add_special=False, special=False)


def test_long_texts_are_encoded_in_a_child_process_at_the_lowest_cpu_priority(smollm2):
    reference = smollm2.reference.tokenize(LONG_TEXT, add_special=False, special=False)
    assert smollm2.rz.encode(LONG_TEXT, add_bos=False) == reference
    child = long_texts.LONG_TEXTS.child_pid()
    assert child is not None and child != os.getpid()
    if sys.platform.startswith("linux"):
        assert os.getpriority(os.PRIO_PROCESS, child) == 19
    assert smollm2.rz.encode(LONG_TEXT, add_bos=False) == reference
    assert long_texts.LONG_TEXTS.child_pid() == child  # the child stays for the next text


def test_a_tokenizer_error_in_the_child_reaches_the_caller(smollm2):
    import dataclasses

    from rz.errors import TokenizerError
    from rz.tokenizer import Tokenizer

    without_bos = Tokenizer(dataclasses.replace(smollm2.rz._vocab, bos_id=None))
    with pytest.raises(TokenizerError, match="no BOS token"):
        without_bos.encode(LONG_TEXT, add_bos=True)
    assert without_bos.encode(LONG_TEXT, add_bos=False) == smollm2.rz.encode(LONG_TEXT, add_bos=False)


def _in_thread(call):
    """Start call in a thread; returns a list that gets its result or exception, and the thread."""
    outcome = []

    def run():
        try:
            outcome.append(call())
        except Exception as error:  # noqa: BLE001 - the test inspects it
            outcome.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    return outcome, thread


def _wait_until(condition, seconds=30.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_long_texts_take_turns_the_waiting_ones_are_bounded_and_dropped_at_shutdown(smollm2):
    encoder = long_texts.LongTextEncoder(waiting_limit=1)
    key, vocab = smollm2.rz._key, smollm2.rz._vocab
    try:
        running = object()  # stands for a text being encoded, so that the next ones wait
        encoder._queue.append(running)
        waiting, thread = _in_thread(lambda: encoder.encode(key, vocab, LONG_TEXT, False, False))
        _wait_until(lambda: len(encoder._queue) == 2)
        with pytest.raises(TokenizerBusyError, match="1 long texts"):
            encoder.encode(key, vocab, LONG_TEXT, False, False)
        encoder.drop_all()
        thread.join(5)
        assert isinstance(waiting[0], ShuttingDownError)
        encoder._queue.remove(running)
        assert encoder.encode(key, vocab, LONG_TEXT, False, False) == smollm2.rz.encode_here(LONG_TEXT, add_bos=False)
    finally:
        encoder.close()


def test_a_gone_callers_long_text_is_dropped_while_waiting_and_while_being_encoded(smollm2):
    encoder = long_texts.LongTextEncoder()
    key, vocab = smollm2.rz._key, smollm2.rz._vocab
    gone = threading.Event()

    def encode(text):
        with long_texts.dropped_when(gone):
            return encoder.encode(key, vocab, text, False, False)

    try:
        encoder.encode(key, vocab, LONG_TEXT, False, False)  # the child is started
        child = encoder.child_pid()
        being_encoded, first = _in_thread(lambda: encode("a" * (4 << 20)))  # merging takes many seconds
        _wait_until(lambda: len(encoder._queue) == 1)
        waiting, second = _in_thread(lambda: encode(LONG_TEXT))
        _wait_until(lambda: len(encoder._queue) == 2)
        gone.set()
        started = time.monotonic()
        first.join(5)
        second.join(5)
        assert time.monotonic() - started < 2
        assert isinstance(being_encoded[0], CallerGoneError) and isinstance(waiting[0], CallerGoneError)
        assert encoder.child_pid() is None  # the child merging the dropped text was killed
        with pytest.raises(ProcessLookupError):
            os.kill(child, 0)
        assert encoder.encode(key, vocab, LONG_TEXT, False, False) == smollm2.rz.encode_here(LONG_TEXT, add_bos=False)
    finally:
        encoder.close()
