"""The JSON schema of rz.bench results, version 1, and its validation.

Shipped as Python so that it travels with the package; `python -m rz.bench schema` prints it.
A change that breaks readers of old results bumps SCHEMA_VERSION.
"""

from rz.bench.errors import BenchError

SCHEMA_VERSION = 1

_NUMBER_OR_NULL = {"type": ["number", "null"]}
_SUMMARY = {
    "type": "object",
    "required": ["n", "mean", "stdev", "cv", "min", "max", "median", "ci95"],
    "properties": {
        "n": {"type": "integer", "minimum": 1},
        "mean": {"type": "number"},
        "stdev": {"type": "number", "minimum": 0},
        "cv": _NUMBER_OR_NULL,
        "min": {"type": "number"},
        "max": {"type": "number"},
        "median": {"type": "number"},
        "ci95": {"type": ["array", "null"], "items": {"type": "number"}, "minItems": 2, "maxItems": 2},
    },
}
_LATENCY = {
    "type": ["object", "null"],
    "required": ["n", "mean", "p50", "p95", "p99"],
    "properties": {key: {"type": "number"} for key in ("mean", "p50", "p95", "p99")} | {"n": {"type": "integer", "minimum": 1}},
}
_TEST = {
    "type": "object",
    "required": ["name", "kind", "n_prompt", "n_gen", "depth", "batch"],
    "properties": {
        "name": {"type": "string"},
        "kind": {"enum": ["pp", "tg", "pg"]},
        "n_prompt": {"type": "integer", "minimum": 0},
        "n_gen": {"type": "integer", "minimum": 0},
        "depth": {"type": "integer", "minimum": 0},
        "batch": {"type": "integer", "minimum": 1},
    },
}
_SAMPLE = {
    "type": "object",
    "required": ["seconds", "tokens", "tokens_per_second"],
    "properties": {
        "seconds": {"type": "number"},
        "tokens": {"type": "integer", "minimum": 0},
        "tokens_per_second": {"type": "number"},
        "ttft_s": _NUMBER_OR_NULL,
        "tpot_s": _NUMBER_OR_NULL,
        "itl_s": {"type": "array", "items": {"type": "number"}},
        "detail": {"type": "object"},
    },
}
_RESULT = {
    "type": "object",
    "required": ["test", "engine", "status", "reason", "warmup", "samples", "tokens_per_second", "stop_reason",
                 "outliers", "latency", "bandwidth"],
    "properties": {
        "test": _TEST,
        "engine": {"type": "string"},
        "status": {"enum": ["ok", "skipped", "failed"]},
        "reason": {"type": ["string", "null"]},
        "warmup": {"type": "array", "items": _SAMPLE},
        "samples": {"type": "array", "items": _SAMPLE},
        "tokens_per_second": {"oneOf": [_SUMMARY, {"type": "null"}]},
        "stop_reason": {"enum": ["cv", "max_reps", "max_time", None]},
        "outliers": {
            "type": "array",
            "items": {"type": "object", "required": ["index", "value", "robust_z"],
                      "properties": {"index": {"type": "integer"}, "value": {"type": "number"}, "robust_z": {"type": "number"}}},
        },
        "latency": {
            "type": "object",
            "required": ["ttft_s", "tpot_s", "itl_s"],
            "properties": {"ttft_s": _LATENCY, "tpot_s": _LATENCY, "itl_s": _LATENCY},
        },
        "bandwidth": {
            "type": ["object", "null"],
            "required": ["achieved_gb_per_s", "fraction_of_machine"],
            "properties": {"achieved_gb_per_s": {"type": "number"}, "fraction_of_machine": _NUMBER_OR_NULL},
        },
    },
    "allOf": [
        {"if": {"properties": {"status": {"const": "ok"}}},
         "then": {"properties": {"tokens_per_second": _SUMMARY, "samples": {"minItems": 1}}}},
        {"if": {"properties": {"status": {"enum": ["skipped", "failed"]}}},
         "then": {"properties": {"reason": {"type": "string"}}}},
    ],
}
_ENGINE = {
    "type": "object",
    "required": ["name", "kind", "description", "load_seconds", "resources", "notes"],
    "properties": {
        "name": {"type": "string"},
        "kind": {"enum": ["in-process", "http"]},
        "url": {"type": ["string", "null"]},
        "description": {"type": "object"},
        "load_seconds": _NUMBER_OR_NULL,
        "resources": {
            "type": "object",
            "required": ["peak_rss_bytes"],
            "properties": {"peak_rss_bytes": {"type": ["integer", "null"]}, "rss_before_load_bytes": {"type": ["integer", "null"]},
                           "compile_seconds": {"type": "object"}},
        },
        "notes": {"type": "array", "items": {"type": "string"}},
    },
}
_RATIO = {
    "type": "object",
    "required": ["test", "engine", "peer", "ratio", "cv", "ci95"],
    "properties": {
        "test": {"type": "string"},
        "engine": {"type": "string"},
        "peer": {"type": "string"},
        "ratio": {"type": "number"},
        "cv": _NUMBER_OR_NULL,
        "ci95": {"type": ["array", "null"], "items": {"type": "number"}, "minItems": 2, "maxItems": 2},
    },
}
_MODEL = {
    "type": "object",
    "required": ["file_name", "file_bytes", "sha256", "architecture", "quantization", "parameters", "weight_bytes_per_token"],
    "properties": {
        "file_name": {"type": "string"},
        "file_bytes": {"type": "integer"},
        "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        "architecture": {"type": ["string", "null"]},
        "quantization": {"type": "string"},
        "parameters": {"type": "integer"},
        "weight_bytes_per_token": {"type": "integer"},
    },
}
_ENVIRONMENT = {
    "type": "object",
    "required": ["cpu", "memory_bytes", "os", "python", "packages", "rz_git"],
    "properties": {
        "cpu": {"type": "object", "required": ["model", "logical_cores", "usable_cores", "flags"]},
        "memory_bytes": {"type": ["integer", "null"]},
        "os": {"type": "string"},
        "python": {"type": "string"},
        "packages": {"type": "object"},
        "rz_git": {"type": "object", "required": ["commit", "dirty"]},
    },
}
_SERVING = {
    "type": "object",
    "required": ["url", "engine", "arrivals", "requests", "completed", "failed", "duration_s", "request_throughput",
                 "output_token_throughput", "total_token_throughput", "ttft_s", "tpot_s", "itl_s", "e2e_s"],
    "properties": {
        "url": {"type": "string"},
        "engine": {"type": "string"},
        "arrivals": {"type": "object"},
        "requests": {"type": "integer", "minimum": 1},
        "completed": {"type": "integer", "minimum": 0},
        "failed": {"type": "integer", "minimum": 0},
        "duration_s": {"type": "number"},
        "request_throughput": {"type": "number"},
        "output_token_throughput": {"type": "number"},
        "total_token_throughput": {"type": "number"},
        "ttft_s": _LATENCY,
        "tpot_s": _LATENCY,
        "itl_s": _LATENCY,
        "e2e_s": _LATENCY,
        "errors": {"type": "array", "items": {"type": "string"}},
    },
}

RESULT_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "urn:rz:bench:result:v1",
    "title": "rz.bench result",
    "type": "object",
    "required": ["schema", "schema_version", "mode", "run_id", "created", "command", "settings", "environment", "model"],
    "properties": {
        "schema": {"const": "rz.bench/result"},
        "schema_version": {"const": SCHEMA_VERSION},
        "mode": {"enum": ["engines", "serving"]},
        "run_id": {"type": "string"},
        "created": {"type": "string", "format": "date-time"},
        "command": {"type": "array", "items": {"type": "string"}},
        "settings": {"type": "object"},
        "environment": _ENVIRONMENT,
        "model": _MODEL,
        "machine_bandwidth": {
            "type": ["object", "null"],
            "required": ["gb_per_s", "method", "threads"],
            "properties": {"gb_per_s": {"type": "number"}, "method": {"type": "string"}, "threads": {"type": "integer"}},
        },
        "engines": {"type": "array", "items": _ENGINE},
        "results": {"type": "array", "items": _RESULT},
        "ratios": {"type": "array", "items": _RATIO},
        "serving": _SERVING,
        "gate": {"type": "object"},
    },
    "allOf": [
        {"if": {"properties": {"mode": {"const": "engines"}}},
         "then": {"required": ["engines", "results", "ratios", "machine_bandwidth"]}},
        {"if": {"properties": {"mode": {"const": "serving"}}}, "then": {"required": ["serving"]}},
    ],
}


def validate_result(result: dict) -> None:
    """Raise BenchError naming the first place where a result departs from the schema."""
    try:
        import jsonschema
    except ImportError as error:
        raise BenchError("validating results needs jsonschema: pip install jsonschema") from error
    validator = jsonschema.Draft202012Validator(RESULT_SCHEMA)
    error = jsonschema.exceptions.best_match(validator.iter_errors(result))
    if error is not None:
        where = "/".join(str(part) for part in error.absolute_path) or "(top level)"
        raise BenchError(f"result does not match the rz.bench schema v{SCHEMA_VERSION} at {where}: {error.message}")
