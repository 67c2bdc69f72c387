"""The batched sampler against a NumPy transcription of llama.cpp's chain, and against llama.cpp itself."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rz.errors import RequestError
from rz.sampling import (
    MAX_PENALTY_LAST_N,
    Sampler,
    SamplerState,
    SamplingParams,
    SamplingTensors,
    apply_logit_bias,
    apply_penalties,
    first_argmax,
)

GREEDY = SamplingParams(temperature=0.0)
OPEN = SamplingParams(top_k=0, top_p=1.0, min_p=0.0, temperature=1.0)  # nothing truncates

# Twelve logits with distinct values, a few negative, so every filter has something to cut.
LOGITS = np.array([2.0, -1.0, 0.5, 3.0, 1.5, -0.5, 2.5, 0.0, 1.0, -2.0, 0.25, 1.75], np.float32)


def reference_penalties(logits, history, params: SamplingParams) -> np.ndarray:
    """llama.cpp's penalties sampler, written from its formula, for one row."""
    out = logits.astype(np.float32).copy()
    window = list(history[-params.penalty_last_n :]) if params.penalty_last_n else []
    for token in set(window):
        count = window.count(token)
        value = out[token]
        value = value * params.repeat_penalty if value <= 0 else value / params.repeat_penalty
        out[token] = value - count * params.frequency_penalty - params.presence_penalty
    return out


def reference_distribution(logits, params: SamplingParams, history=()) -> np.ndarray:
    """The probability of every token after llama.cpp's chain: logit bias, penalties, top-k, top-p, min-p, temperature."""
    biased = np.asarray(logits, np.float32).copy()
    for token, bias in params.logit_bias:
        biased[token] += bias
    penalized = reference_penalties(biased, list(history), params).astype(np.float64)
    order = np.argsort(-penalized, kind="stable")
    k = params.top_k if 0 < params.top_k < len(penalized) else len(penalized)
    kept = order[:k]
    if params.top_p < 1:
        probs = np.exp(penalized[kept] - penalized[kept].max())
        mass = np.cumsum(probs / probs.sum())
        kept = kept[: int(np.argmax(mass >= params.top_p)) + 1]
    if params.min_p > 0:
        kept = kept[penalized[kept] >= penalized[kept[0]] + math.log(params.min_p)]
    distribution = np.zeros(len(penalized))
    weights = np.exp((penalized[kept] - penalized[kept].max()) / params.temperature)
    distribution[kept] = weights / weights.sum()
    return distribution


# One compiled step per sampler configuration and shape, shared by every test: compiling dominates.
compiled = functools.cache(jax.jit)
N_SEEDS = 4000  # rows in the statistical tests: one batch, one seed per row
# Counting penalties costs B * W * W; every history here is shorter than this window.
TEST_WINDOW = 16


def run(sampler, logits, rows, histories=None, steps=1):
    """Sample `steps` tokens for each row; returns tokens [steps, B], the last SampledTokens, final state."""
    histories = histories if histories is not None else [[] for _ in rows]
    params = SamplingTensors.from_params(rows)
    state = SamplerState.create(rows, histories, window=TEST_WINDOW)
    logits = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (len(rows), np.shape(logits)[-1]))
    step = compiled(sampler)
    tokens = []
    for _ in range(steps):
        sampled, state = step(logits, params, state)
        tokens.append(np.asarray(sampled.tokens))
    return np.stack(tokens), sampled, state


def seeded(params: SamplingParams, n: int) -> list[SamplingParams]:
    return [dataclasses.replace(params, seed=seed) for seed in range(n)]


def test_greedy_is_argmax_with_ties_to_the_lowest_id():
    logits = np.array([[1.0, 5.0, 5.0, 2.0], [7.0, 7.0, 7.0, 7.0], [-3.0, -1.0, -2.0, -1.0]], np.float32)
    rows = [GREEDY] * 3
    state = SamplerState.create(rows, [[]] * 3)
    sampled, _ = compiled(Sampler())(jnp.asarray(logits), SamplingTensors.from_params(rows), state)
    assert sampled.tokens.tolist() == [1, 0, 1]


@pytest.mark.parametrize("vocab", [7, 128, 1000, 49152, 262144 + 5])
def test_first_argmax_is_argmax_with_ties_to_the_lowest_id(vocab):
    rng = np.random.default_rng(vocab)
    logits = rng.standard_normal((6, vocab)).astype(np.float32)
    top = logits.max() + 1
    # Ties inside one tile, across tiles, at the last id, and a row of -inf but one.
    logits[1, [vocab // 3, vocab - 1]] = top
    logits[2, [min(5, vocab - 1), vocab - 1]] = top
    logits[3, :] = top
    logits[4, :] = -np.inf
    logits[4, vocab // 2] = 0.0
    expected = np.argmax(logits, axis=-1)
    assert jax.jit(first_argmax)(jnp.asarray(logits)).tolist() == expected.tolist()


def test_greedy_takes_the_argmax_after_penalties():
    rows = [dataclasses.replace(GREEDY, repeat_penalty=2.0)]
    tokens, _, _ = run(Sampler(), LOGITS, rows, histories=[[3]])
    # 3.0 / 2 = 1.5 drops token 3 below token 6 (2.5).
    assert tokens[0, 0] == 6


@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0])
def test_top_k_one_is_greedy(temperature):
    rows = seeded(SamplingParams(top_k=1, temperature=temperature), N_SEEDS)
    tokens, _, _ = run(Sampler(), LOGITS, rows)
    assert set(tokens.ravel().tolist()) == {int(np.argmax(LOGITS))}


def test_tiny_temperature_is_greedy():
    rows = seeded(dataclasses.replace(OPEN, temperature=1e-3), N_SEEDS)
    tokens, _, _ = run(Sampler(), LOGITS, rows)
    assert set(tokens.ravel().tolist()) == {int(np.argmax(LOGITS))}


CHAINS = {
    "top_k": SamplingParams(top_k=3, top_p=1.0, min_p=0.0, temperature=1.0),
    "top_p": SamplingParams(top_k=0, top_p=0.6, min_p=0.0, temperature=1.0),
    "min_p": SamplingParams(top_k=0, top_p=1.0, min_p=0.2, temperature=1.0),
    "defaults": SamplingParams(),
    "hot_defaults": SamplingParams(temperature=2.5),
    "open": OPEN,
    "top_k_then_top_p": SamplingParams(top_k=5, top_p=0.7, min_p=0.0, temperature=0.7),
    "penalized": SamplingParams(repeat_penalty=1.5, frequency_penalty=0.3, presence_penalty=0.2, top_k=6),
}


@pytest.mark.parametrize("cpu_kernel", [True, False], ids=["kernel", "xla"])
@pytest.mark.parametrize("candidate_count", [256, 4], ids=["all_candidates", "redo_paths"])
@pytest.mark.parametrize("name", list(CHAINS))
def test_empirical_distribution_matches_llama_cpp_chain(name, candidate_count, cpu_kernel):
    """Over many seeds, tokens outside the reference support never appear and frequencies agree.

    candidate_count=4 pushes top-p, min-p and the open chain past the candidate frame, so the
    exact redo paths (unsorted for min-p only, full sort otherwise) are the ones checked. Both the
    draw's C++ kernel (where built) and its XLA ops (every other backend's path) are checked.
    """
    params = CHAINS[name]
    history = [3, 3, 6, 0] if params.repeat_penalty != 1.0 else []
    n = N_SEEDS
    sampler = Sampler(candidate_count=candidate_count, cpu_kernel=cpu_kernel)
    tokens, _, _ = run(sampler, LOGITS, seeded(params, n), [history] * n)
    expected = reference_distribution(LOGITS, params, history)
    counts = np.bincount(tokens.ravel(), minlength=len(LOGITS))
    assert set(np.flatnonzero(counts)) <= set(np.flatnonzero(expected))
    # Five standard deviations of a binomial count: a false failure is a one-in-a-million event.
    tolerance = 5 * np.sqrt(n * expected * (1 - expected)) + 1
    np.testing.assert_array_less(np.abs(counts - n * expected), tolerance)


@pytest.mark.parametrize("candidate_count", [256, 4], ids=["all_candidates", "redo_paths"])
@pytest.mark.parametrize("name", list(CHAINS))
def test_probabilities_are_the_distribution_the_sampler_draws_from(name, candidate_count):
    """Sampler.probabilities (speculative sampling's p) is llama.cpp's chain's distribution; one-hot when greedy."""
    params = CHAINS[name]
    history = [3, 3, 6, 0] if params.repeat_penalty != 1.0 else []
    rows = [params, GREEDY]
    state = SamplerState.create(rows, [history] * 2, window=TEST_WINDOW)
    logits = jnp.broadcast_to(jnp.asarray(LOGITS), (2, len(LOGITS)))
    probabilities = compiled(Sampler(candidate_count=candidate_count).probabilities)(logits, SamplingTensors.from_params(rows), state)
    np.testing.assert_allclose(np.asarray(probabilities[0]), reference_distribution(LOGITS, params, history), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(probabilities[1]), np.eye(len(LOGITS))[np.argmax(LOGITS)])


def test_large_vocabulary_uses_the_candidate_frame_exactly():
    vocab = jax.random.normal(jax.random.key(7), (262_144,)) * 4
    rows = seeded(SamplingParams(), 4)
    tokens, _, _ = run(Sampler(), vocab, rows)
    support = np.flatnonzero(reference_distribution(np.asarray(vocab), SamplingParams()))
    assert set(tokens.ravel().tolist()) <= set(support.tolist())


@pytest.mark.parametrize("penalty_last_n", [0, 3, 6, MAX_PENALTY_LAST_N])
def test_penalties_follow_llama_cpp_formula(penalty_last_n):
    rng = np.random.default_rng(penalty_last_n)
    logits = rng.normal(size=(3, 10)).astype(np.float32) * 2
    histories = [[1, 2, 2, 5, 9, 2], [], [0, 0, 0, 0, 7, 4, 4, 3, 1, 8]]
    rows = [
        SamplingParams(repeat_penalty=1.3, frequency_penalty=0.25, presence_penalty=0.5, penalty_last_n=penalty_last_n),
        SamplingParams(repeat_penalty=0.7, penalty_last_n=penalty_last_n),
        SamplingParams(repeat_penalty=1.1, frequency_penalty=-0.4, penalty_last_n=penalty_last_n),
    ]
    state = SamplerState.create(rows, histories)
    got = apply_penalties(jnp.asarray(logits), state.recent_tokens, SamplingTensors.from_params(rows))
    expected = np.stack([reference_penalties(logits[i], histories[i], rows[i]) for i in range(3)])
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6, atol=1e-6)


def test_same_seed_same_tokens_different_seeds_differ():
    rows = [dataclasses.replace(OPEN, seed=11)] * 2 + [dataclasses.replace(OPEN, seed=12)]
    first, _, _ = run(Sampler(), LOGITS, rows, steps=20)
    again, _, _ = run(Sampler(), LOGITS, rows, steps=20)
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first[:, 0], first[:, 1])
    assert not np.array_equal(first[:, 0], first[:, 2])


def test_rows_in_a_mixed_batch_behave_as_each_alone():
    """Each row's tokens are the same alone and batched, even when other rows take the redo paths."""
    rows = [
        GREEDY,
        SamplingParams(seed=1),
        dataclasses.replace(OPEN, seed=2),
        SamplingParams(seed=3, top_k=0, top_p=0.9, min_p=0.0, temperature=1.3),
        SamplingParams(seed=4, top_k=0, top_p=1.0, min_p=0.1, repeat_penalty=1.2, presence_penalty=0.5),
        SamplingParams(seed=5, top_k=7, top_p=0.8, temperature=0.6, frequency_penalty=0.3),
    ]
    histories = [[3, 6], [], [1, 1, 1], [4], [3, 3, 6], [0, 11, 11]]
    logits = jax.random.normal(jax.random.key(3), (len(rows), 40)) * 2
    sampler = compiled(Sampler(candidate_count=5))

    def tokens_of(row_indices):
        params = SamplingTensors.from_params([rows[i] for i in row_indices])
        state = SamplerState.create([rows[i] for i in row_indices], [histories[i] for i in row_indices])
        out = []
        for _ in range(12):
            sampled, state = sampler(logits[jnp.asarray(row_indices)], params, state)
            out.append(np.asarray(sampled.tokens))
        return np.stack(out)

    batched = tokens_of(list(range(len(rows))))
    for i in range(len(rows)):
        np.testing.assert_array_equal(batched[:, i], tokens_of([i])[:, 0], err_msg=f"row {i}")


def test_logprobs_are_log_softmax_of_raw_logits():
    rows = [dataclasses.replace(SamplingParams(repeat_penalty=1.4, seed=s), n_logprobs=3) for s in range(4)]
    logits = np.random.default_rng(0).normal(size=(4, 12)).astype(np.float32) * 3
    params = SamplingTensors.from_params(rows)
    state = SamplerState.create(rows, [[0, 1, 2]] * 4)
    sampled, _ = compiled(Sampler(n_top_logprobs=3))(jnp.asarray(logits), params, state)
    shifted = logits - logits.max(-1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    tokens = np.asarray(sampled.tokens)
    np.testing.assert_allclose(sampled.logprobs, log_softmax[np.arange(4), tokens], rtol=1e-5, atol=1e-6)
    expected_ids = np.argsort(-log_softmax, axis=-1, kind="stable")[:, :3]
    np.testing.assert_array_equal(sampled.top_ids, expected_ids)
    np.testing.assert_allclose(
        sampled.top_logprobs, np.take_along_axis(log_softmax, expected_ids, -1), rtol=1e-5, atol=1e-6
    )


def test_no_top_logprobs_gives_empty_columns():
    _, sampled, _ = run(Sampler(), LOGITS, [GREEDY, GREEDY])
    assert sampled.top_ids.shape == (2, 0) and sampled.top_logprobs.shape == (2, 0)


def test_state_appends_each_token_to_the_history():
    tokens, _, state = run(Sampler(), LOGITS, [GREEDY, SamplingParams(seed=0)], histories=[[5, 7], []], steps=3)
    windows = np.asarray(state.recent_tokens)
    assert windows.shape == (2, TEST_WINDOW)
    assert windows[0, -5:].tolist() == [5, 7, *tokens[:, 0].tolist()]
    assert windows[1, -4:].tolist() == [-1, *tokens[:, 1].tolist()]


def test_default_window_holds_the_longest_allowed_penalty_history():
    history = list(range(MAX_PENALTY_LAST_N + 10))
    state = SamplerState.create([SamplingParams()], [history])
    assert np.asarray(state.recent_tokens)[0].tolist() == history[-MAX_PENALTY_LAST_N:]


def test_with_row_restarts_one_row():
    rows = [dataclasses.replace(OPEN, seed=1), dataclasses.replace(OPEN, seed=2)]
    params = SamplingTensors.from_params(rows)
    logits = jnp.broadcast_to(jnp.asarray(LOGITS), (2, len(LOGITS)))
    step = compiled(Sampler())
    fresh = SamplerState.create(rows, [[4], [9]])
    advanced = step(logits, params, fresh)[1]
    restarted = advanced.with_row(1, SamplerState.create([rows[1]], [[9]]))
    np.testing.assert_array_equal(restarted.recent_tokens[1], fresh.recent_tokens[1])
    assert step(logits, params, restarted)[0].tokens[1] == step(logits, params, fresh)[0].tokens[1]


def test_one_compilation_serves_batches_with_different_settings():
    traces = []

    def counted(logits, params, state):
        traces.append(1)
        return Sampler(n_top_logprobs=2)(logits, params, state)

    step = jax.jit(counted)
    logits = jnp.broadcast_to(jnp.asarray(LOGITS), (3, len(LOGITS)))
    for rows in (
        [GREEDY, GREEDY, GREEDY],
        [SamplingParams(seed=1), OPEN, GREEDY],
        [SamplingParams(top_k=2, top_p=0.5, min_p=0.3, repeat_penalty=1.3, penalty_last_n=0, seed=3)] * 3,
        [SamplingParams(seed=4, logit_bias=((3, -100.0), (5, 2.5))), GREEDY, SamplingParams(logit_bias=((1, -math.inf),))],
    ):
        step(logits, SamplingTensors.from_params(rows), SamplerState.create(rows, [[1, 2]] * 3))
    assert len(traces) == 1


@pytest.mark.parametrize(
    "change, message",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
        ({"min_p": -0.01}, "min_p"),
        ({"min_p": 1.01}, "min_p"),
        ({"repeat_penalty": 0.0}, "repeat_penalty"),
        ({"repeat_penalty": -1.0}, "repeat_penalty"),
        ({"presence_penalty": float("nan")}, "presence_penalty"),
        ({"frequency_penalty": float("-inf")}, "frequency_penalty"),
        ({"penalty_last_n": -1}, "penalty_last_n"),
        ({"penalty_last_n": MAX_PENALTY_LAST_N + 1}, "penalty_last_n"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**32}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"n_logprobs": -1}, "n_logprobs"),
        ({"n_logprobs": 21}, "n_logprobs"),
        ({"logit_bias": ((1, 100.5),)}, "logit_bias"),
        ({"logit_bias": ((1, float("inf")),)}, "logit_bias"),
        ({"logit_bias": ((1, float("nan")),)}, "logit_bias"),
        ({"logit_bias": ((-1, 1.0),)}, "logit_bias"),
        ({"logit_bias": ((1, "5"),)}, "logit_bias"),
        ({"logit_bias": {1: 5.0}}, "logit_bias"),
        ({"logit_bias": tuple((i, 1.0) for i in range(301))}, "logit_bias"),
    ],
)
def test_validation_names_the_bad_setting(change, message):
    params = dataclasses.replace(SamplingParams(), **change)
    with pytest.raises(RequestError, match=message):
        params.validate()
    with pytest.raises(RequestError, match=message):
        SamplingTensors.from_params([params])


def test_defaults_are_llama_cpp_defaults_and_valid():
    params = SamplingParams()
    params.validate()
    assert (params.temperature, params.top_k, params.top_p, params.min_p) == (0.8, 40, 0.95, 0.05)
    assert (params.repeat_penalty, params.penalty_last_n) == (1.0, 64)
    assert (params.presence_penalty, params.frequency_penalty) == (0.0, 0.0)


def llama_cpp_chain(logits: np.ndarray, params: SamplingParams, history, with_truncation: bool):
    """Run llama.cpp's own samplers (through llama-cpp-python's bindings) over one row of logits.

    Returns {token id: logit} for the candidates left after logit bias and penalties (and, with_truncation,
    after top-k, top-p, min-p and temperature), or the greedy choice when temperature is 0.
    """
    import ctypes

    llama_cpp = pytest.importorskip("llama_cpp")
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    biases = (llama_cpp.llama_logit_bias * max(len(params.logit_bias), 1))(
        *[llama_cpp.llama_logit_bias(token, bias) for token, bias in params.logit_bias]
    )
    stages = [
        # Leading, as in common_sampler (llama.cpp's common/sampling.cpp).
        llama_cpp.llama_sampler_init_logit_bias(len(logits), len(params.logit_bias), biases),
        llama_cpp.llama_sampler_init_penalties(
            len(logits), params.penalty_last_n, params.repeat_penalty, params.frequency_penalty, params.presence_penalty
        )
    ]
    if params.temperature == 0:
        stages.append(llama_cpp.llama_sampler_init_greedy())
    elif with_truncation:
        stages += [
            llama_cpp.llama_sampler_init_top_k(params.top_k),
            llama_cpp.llama_sampler_init_top_p(params.top_p, 1),
            llama_cpp.llama_sampler_init_min_p(params.min_p, 1),
            llama_cpp.llama_sampler_init_temp(params.temperature),
        ]
    for stage in stages:
        llama_cpp.llama_sampler_chain_add(chain, stage)
    for token in history:
        llama_cpp.llama_sampler_accept(chain, token)
    data = (llama_cpp.llama_token_data * len(logits))(
        *[llama_cpp.llama_token_data(i, float(logit), 0.0) for i, logit in enumerate(logits)]
    )
    candidates = llama_cpp.llama_token_data_array(data=data, size=len(logits), selected=-1, sorted=False)
    llama_cpp.llama_sampler_apply(chain, ctypes.byref(candidates))
    llama_cpp.llama_sampler_free(chain)
    if params.temperature == 0:
        return data[candidates.selected].id
    return {data[i].id: data[i].logit for i in range(candidates.size)}


def random_case(rng: np.random.Generator, vocab: int):
    logits = (rng.normal(size=vocab) * rng.uniform(0.5, 4)).astype(np.float32)
    params = SamplingParams(
        temperature=float(rng.choice([0.0, 0.5, 1.0, 1.7])),
        top_k=int(rng.choice([0, 1, 5, 20, vocab + 3])),
        top_p=float(rng.choice([1.0, 0.95, 0.6, 0.2])),
        min_p=float(rng.choice([0.0, 0.05, 0.3])),
        repeat_penalty=float(rng.choice([1.0, 1.1, 1.8, 0.8])),
        frequency_penalty=float(rng.choice([0.0, 0.4, -0.3])),
        presence_penalty=float(rng.choice([0.0, 0.7])),
        penalty_last_n=int(rng.choice([0, 4, 64])),
    )
    history = rng.integers(0, vocab, size=int(rng.integers(0, 12))).tolist()
    return logits, params, history


def biased_case(rng: np.random.Generator, vocab: int):
    """random_case with biases on a few tokens: small ones, OpenAI's extremes, and bans."""
    logits, params, history = random_case(rng, vocab)
    tokens = rng.choice(vocab, size=int(rng.integers(1, 6)), replace=False)
    biases = rng.choice([-math.inf, -100.0, -3.0, -0.5, 0.7, 4.0, 100.0], size=len(tokens))
    # Keep at least one token unbanned: a row with nothing left to sample is a caller's error.
    biases[0] = max(biases[0], -100.0)
    return logits, dataclasses.replace(params, logit_bias=tuple(sorted(zip(tokens.tolist(), biases.tolist())))), history


@pytest.mark.parametrize("make_case", [random_case, biased_case], ids=["penalties", "logit-bias-then-penalties"])
def test_penalties_and_logit_bias_match_llama_cpp(make_case):
    rng = np.random.default_rng(1)
    cases = [make_case(rng, 30) for _ in range(40)]
    rows = [params for _, params, _ in cases]
    state = SamplerState.create(rows, [history for _, _, history in cases], window=TEST_WINDOW)
    tensors = SamplingTensors.from_params(rows)
    logits = jnp.asarray(np.stack([logits for logits, _, _ in cases]))
    biased = apply_logit_bias(logits, tensors.bias_ids, tensors.bias_values)
    ours = np.asarray(apply_penalties(biased, state.recent_tokens, tensors))
    for row, (row_logits, params, history) in enumerate(cases):
        theirs = llama_cpp_chain(row_logits, dataclasses.replace(params, temperature=1.0), history, False)
        expected = np.array([theirs[i] for i in range(len(row_logits))], np.float32)
        np.testing.assert_allclose(ours[row], expected, rtol=1e-6, atol=1e-6, err_msg=f"{params} {history}")


@pytest.mark.parametrize("make_case", [random_case, biased_case], ids=["plain", "logit-bias"])
def test_reference_chain_and_greedy_match_llama_cpp(make_case):
    """The NumPy chain the statistical tests trust keeps exactly llama.cpp's candidates, at its
    probabilities, and rz draws only among them."""
    rng = np.random.default_rng(2)
    for _ in range(200):
        logits, params, history = make_case(rng, 40)
        theirs = llama_cpp_chain(logits, params, history, True)
        if params.temperature == 0:
            tokens, _, _ = run(Sampler(), logits, [params], [history])
            assert tokens[0, 0] == theirs, (params, history)
            continue
        expected = reference_distribution(logits, params, history)
        theirs = {token: logit for token, logit in theirs.items() if logit > -math.inf}  # banned: never drawn
        assert set(theirs) == set(np.flatnonzero(expected)), (params, history)
        kept_logits = np.array(list(theirs.values()), np.float64)
        probs = np.exp(kept_logits - kept_logits.max())
        np.testing.assert_allclose(expected[list(theirs)], probs / probs.sum(), rtol=1e-4, atol=1e-7)
        tokens, _, _ = run(Sampler(), logits, seeded(params, 64), [history] * 64)
        assert set(tokens[0].tolist()) <= set(theirs), (params, history)


def test_greedy_ties_match_llama_cpp():
    logits = np.array([0.5, 3.0, -1.0, 3.0, 3.0, 2.0], np.float32)
    assert llama_cpp_chain(logits, GREEDY, [], False) == 1
    tokens, _, _ = run(Sampler(), logits, [GREEDY])
    assert tokens[0, 0] == 1


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="inspects XLA:CPU's lowering of top_k")
@pytest.mark.parametrize("cpu_kernel", [True, False], ids=["kernel", "xla"])
def test_candidate_frame_compiles_to_top_k_not_a_full_sort(cpu_kernel):
    """The fast path must stay a TopK: a regression here turns 5 ms into 0.4 s per step at Gemma's
    vocabulary. With the draw's C++ kernel, the redos are in it and the step holds no sort at all."""
    from rz_kernels import sample_draw

    rows = [SamplingParams(seed=0)] * 2
    logits = jnp.zeros((2, 4096), jnp.float32)
    state = SamplerState.create(rows, [[]] * 2, window=TEST_WINDOW)
    sampler = Sampler(n_top_logprobs=2, cpu_kernel=cpu_kernel)
    hlo = jax.jit(sampler).lower(logits, SamplingTensors.from_params(rows), state).compile().as_text()
    full_sorts = [line for line in hlo.splitlines() if " sort(" in line and "[2,4096]" in line.split("=")[1]]
    assert hlo.count('custom_call_target="TopK"') == 2  # the candidate frame and the top logprobs
    kernel = cpu_kernel and sample_draw.available()
    assert len(full_sorts) == (0 if kernel else 1)  # else only the exact redo path, behind its lax.cond
    assert hlo.count('custom_call_target="rz_sample_draw_') == (1 if kernel else 0)


@pytest.mark.parametrize(
    "setting", [dict(temperature=1e308), dict(repeat_penalty=1e308), dict(frequency_penalty=-1e308),
                dict(presence_penalty=3.5e38), dict(top_k=2**31)],
    ids=lambda setting: next(iter(setting)),
)
def test_values_beyond_the_devices_f32_and_i32_are_request_errors(setting):
    name = next(iter(setting))
    with pytest.raises(RequestError, match=name):
        SamplingParams(**setting).validate()
    SamplingParams(**{name: 1e38 if name != "top_k" else 2**31 - 1}).validate()


def test_a_minus_100_bias_on_the_argmax_gives_the_runner_up_under_greedy():
    logits = np.random.default_rng(7).normal(size=50).astype(np.float32)
    first, second = np.argsort(-logits)[:2]
    for ban in (-100.0, -math.inf):
        tokens, _, _ = run(Sampler(), logits, [dataclasses.replace(GREEDY, logit_bias=((int(first), ban),))])
        assert tokens[0, 0] == second


def test_a_banned_token_is_never_drawn_and_a_plus_100_bias_always_is():
    logits = np.zeros(12, np.float32)
    banned, forced = (SamplingParams(top_k=0, top_p=1.0, min_p=0.0, temperature=1.5, logit_bias=bias) for bias in (((4, -math.inf),), ((9, 100.0),)))
    tokens, _, _ = run(Sampler(), logits, seeded(banned, 400))
    assert 4 not in tokens and len(set(tokens[0].tolist())) == 11
    tokens, _, _ = run(Sampler(), logits, seeded(forced, 400))
    assert set(tokens[0].tolist()) == {9}


def test_a_biased_row_leaves_its_neighbours_tokens_and_logprobs_alone():
    rows = [dataclasses.replace(p, n_logprobs=2) for p in (SamplingParams(seed=1), GREEDY, SamplingParams(seed=2))]
    biased = [rows[0], dataclasses.replace(rows[1], logit_bias=((3, 100.0),)), rows[2]]
    logits = jax.random.normal(jax.random.key(8), (3, 40)) * 2
    sampler = compiled(Sampler(n_top_logprobs=2))
    plain, _ = sampler(logits, SamplingTensors.from_params(rows), SamplerState.create(rows, [[]] * 3))
    mixed, _ = sampler(logits, SamplingTensors.from_params(biased), SamplerState.create(biased, [[]] * 3))
    assert mixed.tokens[1] == 3
    for row in (0, 2):
        assert mixed.tokens[row] == plain.tokens[row]
    # Log-probabilities are the raw model's, biased row or not.
    np.testing.assert_array_equal(mixed.top_logprobs, plain.top_logprobs)
