"""rz.api.messages: request options and finish reasons survive the trip through the rz.v1 messages."""

import pytest

from rz.api.messages import finish_reason, finish_reason_value, options_message, request_options
from rz.api.v1 import inference_pb2 as pb
from rz.errors import RequestError
from rz.request import FinishReason, RequestOptions


def test_options_survive_the_round_trip_through_a_message():
    flat = dict(max_tokens=7, temperature=0.0, top_k=3, seed=9, stop="END", stop_token_ids=[5, 6], ignore_eos=True, logprobs=2,
                logit_bias={"5": -2.5, 9: False})
    assert request_options(options_message(flat)) == RequestOptions.from_flat(**flat)


def test_unset_fields_take_the_same_defaults_as_the_python_api():
    assert request_options(pb.GenerationOptions()) == RequestOptions()
    assert request_options(options_message({"temperature": None, "seed": None})) == RequestOptions()


def test_an_unknown_option_is_refused_before_sending():
    with pytest.raises(RequestError, match="unknown generation options: temprature"):
        options_message({"temprature": 0.5})


def test_every_finish_reason_has_its_message_value():
    assert [finish_reason(finish_reason_value(reason)) for reason in FinishReason] == list(FinishReason)
    assert finish_reason(pb.FINISH_REASON_UNSPECIFIED) is None


def test_structured_output_options_survive_the_round_trip():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    for flat in (
        {"response_format": {"type": "json_schema", "json_schema": {"schema": schema}}},
        {"response_format": {"type": "json_object"}},
        {"response_format": {"type": "regex", "regex": "[0-9]+"}},
        {"response_format": {"type": "lark", "lark": 'start: "x"'}},
        {"grammar": 'root ::= "a"'},
    ):
        assert request_options(options_message(flat)) == RequestOptions.from_flat(**flat)


def test_a_response_format_whose_schema_is_not_json_is_refused():
    with pytest.raises(RequestError, match="not valid JSON"):
        request_options(pb.GenerationOptions(response_format=pb.ResponseFormat(type="json_schema", json_schema="{")))
