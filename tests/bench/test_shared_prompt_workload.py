"""The shared-system-prompt workload of `python -m rz.bench shared-prompt`."""

from rz.bench.shared_prompt import LLAMA_CPP, RZ_NO_REUSE, RZ_REUSE, client_prompts, measure, shared_prefix, table, target_tokens


def test_the_target_computes_the_shared_prefix_once_and_every_unique_part():
    prompts = [[1, 2, 3, 4], [1, 2, 3, 5, 6], [1, 2, 7]]
    assert shared_prefix(prompts) == 2
    assert target_tokens(prompts) == 2 + 2 + 3 + 1
    assert shared_prefix([[1, 2], [1, 2, 3]]) == 2 and target_tokens([[1, 2], [1, 2]]) == 2


class _WordModel:
    """One token per distinct word (ids from 1); a chat renders each message as a 0 then its words."""

    def __init__(self):
        self.words: list[str] = []

    def tokenize(self, text, add_bos=None):
        for word in text.split():
            if word not in self.words:
                self.words.append(word)
        return [self.words.index(word) + 1 for word in text.split()]

    def detokenize(self, ids):
        return " ".join(self.words[i - 1] for i in ids)

    def chat_prompt_ids(self, messages):
        return [token for message in messages for token in [0, *self.tokenize(message["content"])]]


def test_clients_share_one_system_prompt_and_ask_different_questions():
    prompts = client_prompts(_WordModel(), 3, 40)
    assert len(prompts) == 3 and len({tuple(p) for p in prompts}) == 3
    # The system message (a 0, at least 40 tokens) and the question's first words are shared.
    assert 40 < shared_prefix(prompts) < min(map(len, prompts))
    assert prompts[0].count(0) == 2 and prompts[0].index(0, 1) > 40


def test_rz_and_llama_cpp_reuse_the_whole_shared_prefix(smollm2_path):
    """rz: the first client's full blocks, and its partly written last block, which holds the rest
    of the shared prefix (the first client has finished: it asks for one token)."""
    from rz.kv_cache import BLOCK_SIZE

    progress = []
    result = measure({"smollm2": smollm2_path}, 2, 80, 256, 2, ("rz", "llama.cpp"), 1, progress.append)
    entry = result["models"][0]
    runs, shared = entry["engines"], entry["shared_prefix_tokens"]
    assert shared >= BLOCK_SIZE and len(progress) == 2  # a round not counted, then one counted
    assert runs[RZ_NO_REUSE]["computed"] == sum(entry["prompt_tokens"]) and runs[RZ_NO_REUSE]["reused"] == [0, 0]
    assert runs[RZ_REUSE]["reused"] == [0, shared]
    assert runs[RZ_REUSE]["computed"] == sum(entry["prompt_tokens"]) - runs[RZ_REUSE]["reused"][1]
    assert runs[LLAMA_CPP] | {"seconds": 0, "ttft_s": []} == {"computed": entry["target_tokens"], "reused": [0, shared],
                                                                "seconds": 0, "ttft_s": []}
    assert all(len(run["ttft_s"]) == 2 and run["seconds"] > 0 for run in runs.values())
    assert f"| {LLAMA_CPP} | {entry['target_tokens']} | 1.00 |" in table(result)
