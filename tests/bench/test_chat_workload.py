"""The multi-turn chat workload of `python -m rz.bench chat`."""

from rz.bench.chat import conversation, measure, table


def _words(text: str) -> list[int]:
    return [len(word) for word in text.split()]


def _render(messages: list[dict]) -> list[int]:
    return [token for message in messages for token in [0, *_words(message["content"])]]


def test_each_turn_extends_the_last():
    turns = conversation(_words, _render, 3, user_tokens=5, answer_tokens=3)
    assert all(len(later) > len(earlier) and later[: len(earlier)] == earlier for earlier, later in zip(turns, turns[1:]))


def test_a_warm_chat_warms_up_first_and_reuses_each_turn(smollm2_path):
    progress = []
    result = measure(smollm2_path, 2, 8, 4, 256, 2, ("rz",), progress.append, warm=True)
    assert result["warm"] and len(result["ttft_s"]["rz"]) == 2
    assert progress[0].startswith("rz warmed up")
    # The second turn reuses the first's prompt: all of it but the token it samples from.
    assert result["cached_tokens"]["rz"][1] >= result["prompt_tokens"][0] - 1
    assert "| 2 |" in table(result)
