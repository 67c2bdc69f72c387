"""`rz info` on a mixture of experts: its expert counts and the parameters one token goes through."""

from rz.gguf import GGUFFile
from rz.model_info import format_model_info, model_info
from tiny_models import write_tiny_model


def test_info_shows_the_experts_and_the_active_parameters(tmp_path):
    info = model_info(GGUFFile(write_tiny_model(tmp_path / "m.gguf", "qwen2moe", "F16")))
    config = info["config"]
    routed = config["n_layer"] * 3 * config["n_expert"] * config["n_ff_expert"] * config["n_embd"]
    idle = routed * (config["n_expert"] - config["n_expert_used"]) // config["n_expert"]
    assert info["active_parameters"] == info["parameters"] - idle
    text = format_model_info(info)
    assert (
        f"experts      {config['n_expert']}, {config['n_expert_used']} per token, each {config['n_ff_expert']} wide, "
        f"a shared expert {config['n_ff_shared_expert']} wide; {info['active_parameters'] / 1e6:.1f}M active parameters"
    ) in text


def test_a_dense_model_has_no_experts_line_and_all_its_parameters_active(tmp_path):
    info = model_info(GGUFFile(write_tiny_model(tmp_path / "m.gguf", "qwen3", "F16")))
    assert info["active_parameters"] == info["parameters"]
    assert "experts" not in format_model_info(info)
