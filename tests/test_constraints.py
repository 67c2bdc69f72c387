"""Structured output: constraints parsed from the request options, masks applied on device, and
real models whose output always matches its JSON schema, regex or grammar."""

import json
import re

import jax.numpy as jnp
import jsonschema
import llguidance.numpy
import numpy as np
import pytest

import rz
from rz.constraints import Constraint, constraint_of, response_format_of
from rz.engine import Engine
from rz.errors import RequestError
from rz.generation import GenerationRequest
from rz.model_files import gemma3_270m_path, smollm2_135m_path
from rz.request import FinishReason, RequestOptions
from rz.sampling import apply_token_mask
from rz.scheduler import Scheduler

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 3},
        "member": {"type": "boolean"},
    },
    "required": ["name", "age", "pets", "member"],
    "additionalProperties": False,
}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
PROMPTS = ["A person, as JSON:", "Here is a customer record:", "{", "Write about a farmer."]


# ----- options -----


def test_response_format_and_grammar_become_one_constraint_and_back():
    assert constraint_of() is None and constraint_of({"type": "text"}) is None
    assert constraint_of({"type": "json_object"}) == Constraint("json_schema", '{"type": "object"}')
    assert constraint_of(JSON_SCHEMA) == Constraint("json_schema", json.dumps(PERSON, sort_keys=True))
    assert constraint_of({"type": "regex", "regex": "[a-z]+"}) == Constraint("regex", "[a-z]+")
    assert constraint_of(grammar='root ::= "a"') == Constraint("gbnf", 'root ::= "a"')
    for given in (JSON_SCHEMA, {"type": "lark", "lark": 'start: "x"'}):
        options = RequestOptions.from_flat(response_format=given)
        assert RequestOptions.from_flat(**options.flat()) == options
    assert response_format_of(Constraint("gbnf", "g")) == (None, "g")


@pytest.mark.parametrize(
    "options, message",
    [
        ({"response_format": "json"}, "response_format must be an object"),
        ({"response_format": {"type": "xml"}}, "response_format must be an object"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": 3}}}, "JSON schema object"),
        ({"response_format": {"type": "regex"}}, "needs its regex"),
        ({"grammar": ""}, "non-empty GBNF"),
        ({"grammar": 'root ::= "a"', "response_format": {"type": "json_object"}}, "not both"),
    ],
)
def test_malformed_constraint_options_are_refused(options, message):
    with pytest.raises(RequestError, match=message):
        RequestOptions.from_flat(**options)


# ----- the mask on device -----


@pytest.mark.parametrize("vocab", [31, 32, 100, 1000])
def test_the_token_mask_keeps_exactly_the_allowed_tokens(vocab):
    rng = np.random.default_rng(vocab)
    bits = rng.integers(-(2**31), 2**31, size=(3, (vocab + 31) // 32), dtype=np.int64).astype(np.int32)
    bits[1] = -1  # an unconstrained row
    logits = rng.standard_normal((3, vocab)).astype(np.float32)
    expected = logits.copy()
    llguidance.numpy.apply_token_bitmask_inplace(expected, bits)
    masked = np.asarray(apply_token_mask(jnp.asarray(logits), jnp.asarray(bits)))
    np.testing.assert_array_equal(masked, expected)
    np.testing.assert_array_equal(masked[1], logits[1])


# ----- real models -----


@pytest.fixture(scope="module", params=[smollm2_135m_path, gemma3_270m_path], ids=["smollm2", "gemma3"])
def llm(request):
    return rz.LLM(request.param(), n_ctx=512, max_batch=4)


@pytest.mark.slow
def test_json_schema_output_always_parses_and_validates(llm):
    for seed in range(4):
        for completion in llm.generate(PROMPTS, max_tokens=120, temperature=1.0, seed=seed, response_format=JSON_SCHEMA):
            assert completion.finish_reason == FinishReason.STOP, completion.text
            jsonschema.validate(json.loads(completion.text), PERSON)


@pytest.mark.slow
def test_json_object_regex_and_grammars_hold_in_chat_and_completion(llm):
    # Any JSON object may go on forever; this question gets a short one from both models.
    messages = [{"role": "user", "content": "Reply with a small JSON object giving the name and country of one city."}]
    reply = llm.chat(messages, max_tokens=120, temperature=0.7, seed=3, repeat_penalty=1.1, response_format={"type": "json_object"})
    assert reply.finish_reason == FinishReason.STOP and isinstance(json.loads(reply.text), dict)
    date = llm.generate("Today is", max_tokens=20, seed=1, response_format={"type": "regex", "regex": r"\d{4}-\d{2}-\d{2}"})
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", date.text)
    answer = llm.generate("Is the sky blue?", max_tokens=10, seed=2, grammar='root ::= ("yes" | "no") "."')
    assert answer.text in ("yes.", "no.")
    lark = llm.generate("Count:", max_tokens=30, seed=4, response_format={"type": "lark", "lark": r'start: NUM ("," NUM)~2' + "\nNUM: /[0-9]{1,3}/"})
    assert re.fullmatch(r"[0-9]{1,3}(,[0-9]{1,3}){2}", lark.text)
    streamed = "".join(llm.stream("A person, as JSON:", max_tokens=120, seed=5, response_format=JSON_SCHEMA))
    jsonschema.validate(json.loads(streamed), PERSON)


def test_a_malformed_schema_or_grammar_is_a_request_error():
    llm = rz.LLM(smollm2_135m_path(), n_ctx=64, max_batch=1)
    with pytest.raises(RequestError, match="json_schema"):
        llm.generate("x", max_tokens=2, response_format={"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}})
    with pytest.raises(RequestError, match="regex"):
        llm.generate("x", max_tokens=2, response_format={"type": "regex", "regex": "a(b"})
    with pytest.raises(RequestError, match="gbnf"):
        llm.generate("x", max_tokens=2, grammar="root ::= undefined_rule")


@pytest.mark.slow
def test_a_constrained_request_batches_with_unconstrained_ones_that_keep_their_tokens():
    llm = rz.LLM(smollm2_135m_path(), n_ctx=256, max_batch=4)
    free = [llm.generate(prompt, max_tokens=24, temperature=0.0) for prompt in PROMPTS[:3]]
    engine = Engine(llm.model, llm.tokenizer, llm.n_ctx, n_slots=4)
    scheduler = Scheduler(engine)
    plain = RequestOptions.from_flat(max_tokens=24, temperature=0.0)
    shaped = RequestOptions.from_flat(max_tokens=120, temperature=0.9, seed=11, response_format=JSON_SCHEMA)
    sequences = [scheduler.add(GenerationRequest(tuple(llm.tokenize(p)), plain)) for p in PROMPTS[:3]]
    constrained = scheduler.add(GenerationRequest(tuple(llm.tokenize(PROMPTS[0])), shaped))
    list(scheduler.drain())
    assert ["".join(s.text) for s in sequences] == [c.text for c in free]
    jsonschema.validate(json.loads("".join(constrained.text)), PERSON)
    # The constrained row's one-step calls ran the batch's one decode step, not a variant of their own.
    assert [name for name in engine.compilations if name.startswith("decode[4,")] == [f"decode[4, steps={engine.decode_steps}]"]
