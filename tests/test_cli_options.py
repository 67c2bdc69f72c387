"""python -m rz's command line: the options it parses (running a command is tested where it is implemented)."""

import pytest

from rz.cli import build_parser


@pytest.mark.parametrize("command", [["generate", "hi"], ["chat"], ["serve"]])
def test_cache_types_are_llama_cpps_flags_defaulting_to_f16(command, capsys):
    parser = build_parser()
    args = parser.parse_args([*command, "--cache-type-k", "q8_0"])
    assert (args.cache_type_k, args.cache_type_v) == ("q8_0", "f16")
    with pytest.raises(SystemExit):
        parser.parse_args([*command, "--cache-type-v", "q4_0"])
    assert "'f32', 'f16', 'bf16', 'q8_0'" in capsys.readouterr().err


def test_serve_takes_a_tensor_parallel_size_of_at_least_one(capsys):
    parser = build_parser()
    assert parser.parse_args(["serve"]).tensor_parallel == 1
    assert parser.parse_args(["serve", "--tensor-parallel", "2"]).tensor_parallel == 2
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--tensor-parallel", "0"])
    assert "must be at least 1" in capsys.readouterr().err
