"""rz.request: one options type behind every front, with one validation path."""

import json
import math

import pytest

from rz.errors import RequestError
from rz.request import FLAT_OPTIONS, Completion, FinishReason, RequestOptions, SamplingParams


def test_flat_names_are_the_options_own_fields_and_the_sampling_ones():
    assert RequestOptions.from_flat(**FLAT_OPTIONS) == RequestOptions()
    options = RequestOptions.from_flat(max_tokens=5, temperature=0.0, logprobs=3, stop="x", stop_token_ids=[1, 1, 2])
    assert options == RequestOptions(5, SamplingParams(temperature=0.0, n_logprobs=3), ("x",), frozenset({1, 2}))
    assert RequestOptions.from_flat(**options.flat()) == options


def test_unknown_options_are_named():
    with pytest.raises(RequestError, match="unknown generation options: temprature, top_q"):
        RequestOptions.from_flat(temprature=0.5, top_q=1)


@pytest.mark.parametrize(
    "flat, message",
    [
        ({"max_tokens": 0}, "max_tokens must be a positive integer"),
        ({"max_tokens": True}, "max_tokens must be a positive integer"),
        ({"temperature": -1.0}, "temperature must be >= 0"),
        ({"logprobs": 21}, "n_logprobs must be in"),
        ({"stop": [""]}, "a stop string must not be empty"),
        ({"stop_token_ids": ["a"]}, "stop_token_ids must hold integer token ids"),
        ({"logit_bias": {"7": 100.5}}, r"logit_bias of token 7 must be in \[-100, 100\]"),
        ({"logit_bias": {"7": "up"}}, "logit_bias of token 7 must be a number"),
        ({"logit_bias": {"7": True}}, "logit_bias of token 7 must be a number"),
        ({"logit_bias": {"seven": 1}}, "logit_bias keys must be token ids"),
        ({"logit_bias": {"-3": 1}}, "logit_bias keys must be token ids"),
        ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias may bias at most 300 tokens, got 301"),
        ({"logit_bias": [[7, 1], [7, 2]]}, "logit_bias gives token 7 twice"),
        ({"logit_bias": [7, 1]}, "logit_bias must map token ids to biases"),
        ({"logit_bias": "7:1"}, "logit_bias must map token ids to biases"),
    ],
)
def test_validation_names_the_bad_option(flat, message):
    with pytest.raises(RequestError, match=message):
        RequestOptions.from_flat(**flat).validate()


def test_logit_bias_takes_openais_map_and_llama_servers_pairs_with_false_as_a_ban():
    expected = SamplingParams(logit_bias=((7, -math.inf), (15043, 2.5)))
    for given in ({"15043": 2.5, "7": False}, {15043: 2.5, 7: False}, [[15043, 2.5], [7, False]]):
        options = RequestOptions.from_flat(logit_bias=given)
        options.validate()
        assert options.sampling == expected
        assert RequestOptions.from_flat(**options.flat()) == options
    assert RequestOptions.from_flat(logit_bias=None).sampling.logit_bias == ()
    RequestOptions.from_flat(logit_bias={str(i): -100 for i in range(300)}).validate()


def test_a_finish_reason_reads_and_serializes_as_its_string():
    assert FinishReason.STOP == "stop" and str(FinishReason.LENGTH) == "length"
    completion = Completion("", [], FinishReason.CANCELLED, {}, {})
    assert json.loads(json.dumps({"finish_reason": completion.finish_reason})) == {"finish_reason": "cancelled"}
