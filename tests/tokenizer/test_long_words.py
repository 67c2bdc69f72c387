"""Very long pre-tokenized words: the ids stay llama.cpp's, memory grows linearly and leanly, and
the word cache stays within its byte budget."""

import os
import random
import sys
import time
import tracemalloc

import pytest

from rz.tokenizer import tokenizer as tokenizer_module


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
        model.rz.encode(text, add_bos=False)
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


def test_long_texts_are_encoded_one_at_a_time(smollm2, monkeypatch):
    import threading

    inside, most = [0], [0]
    guard = threading.Lock()
    encode = type(smollm2.rz)._encode

    def counting_encode(self, *args):
        with guard:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        try:
            return encode(self, *args)
        finally:
            with guard:
                inside[0] -= 1

    monkeypatch.setattr(type(smollm2.rz), "_encode", counting_encode)
    text = "ab" * (tokenizer_module._HEAVY_TEXT_CHARS // 2 + 1)
    threads = [threading.Thread(target=smollm2.rz.encode, args=(text,)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most[0] == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="only Linux gives each thread its own niceness")
def test_long_texts_are_encoded_at_the_lowest_cpu_priority_and_short_ones_where_called(smollm2, monkeypatch):
    import threading

    niceness = {}
    encode = type(smollm2.rz)._encode

    def recording_encode(self, text, *args):
        niceness[len(text)] = (threading.get_ident(), os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return encode(self, text, *args)

    monkeypatch.setattr(type(smollm2.rz), "_encode", recording_encode)
    caller = threading.get_ident(), os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    long_text, short_text = "ab" * (tokenizer_module._HEAVY_TEXT_CHARS // 2 + 1), "ab ab"
    assert smollm2.rz.encode(long_text, add_bos=False) == smollm2.reference.tokenize(long_text, add_special=False, special=False)
    smollm2.rz.encode(short_text, add_bos=False)
    assert niceness[len(short_text)] == caller
    assert niceness[len(long_text)][0] != caller[0] and niceness[len(long_text)][1] == 19
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == caller[1]


def test_long_texts_waiting_their_turn_are_dropped_at_shutdown_and_the_one_running_finishes(smollm2, monkeypatch):
    import threading

    from rz.errors import ShuttingDownError

    entered, release = threading.Event(), threading.Event()
    encode = type(smollm2.rz)._encode

    def held_encode(self, *args):
        entered.set()
        release.wait(10)
        return encode(self, *args)

    monkeypatch.setattr(type(smollm2.rz), "_encode", held_encode)
    text = "ab" * (tokenizer_module._HEAVY_TEXT_CHARS // 2 + 1)
    outcomes = []

    def one():
        try:
            outcomes.append(len(smollm2.rz.encode(text, add_bos=False)))
        except ShuttingDownError:
            outcomes.append("dropped")

    threads = [threading.Thread(target=one) for _ in range(3)]
    for thread in threads:
        thread.start()
    entered.wait(10)  # the first is being encoded
    while len(tokenizer_module._WAITING_LONG_TEXTS) < 3:
        time.sleep(0.01)
    tokenizer_module.drop_waiting_long_texts()
    release.set()
    for thread in threads:
        thread.join()
    assert sorted(outcomes, key=str) == sorted([len(encode(smollm2.rz, text, False, False)), "dropped", "dropped"], key=str)
    assert smollm2.rz.encode(text, add_bos=False) == encode(smollm2.rz, text, False, False)  # later texts are encoded again
