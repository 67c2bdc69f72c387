"""`python -m rz.bench`: run engines side by side, serve load on a URL, render the history, print the schema.

    python -m rz.bench --model M.gguf --engines rz,llama.cpp [--tests pp512,tg128] [--depth 0,512] [--batch 1,8]
    python -m rz.bench serve --url http://127.0.0.1:8080 --model M.gguf --concurrency 4
    python -m rz.bench report [--history benchmarks/results/history.jsonl]
    python -m rz.bench parity [--model M.gguf] [--prompts 48] [--tokens 48]
    python -m rz.bench chat [--model M.gguf] [--turns 10] [--engines rz,llama.cpp]
    python -m rz.bench speculative [--model M.gguf ...] [--proposers ngram] [--workloads free] [--draft-model D.gguf] [--reps 2] [--max-tokens 128]
    python -m rz.bench shared-prompt [--model M.gguf ...] [--clients 8] [--system-tokens 1000] [--engines rz,llama.cpp]
    python -m rz.bench score [--model M.gguf ...] [--tokens 1100] [--reps 3]
    python -m rz.bench schema

Exit status: 0 done; 1 a test failed while timing (the rest is still reported); 2 bad input or
a failed preflight (one line each, no stack trace); 3 the regression gate failed.
"""

import argparse
import json
import re
import sys
import uuid
from datetime import datetime, timezone
from pathlib import Path

from rz.bench.errors import BenchError, PreflightError
from rz.bench.history import DEFAULT_HISTORY
from rz.server.cli import add_cache_type_arguments

EXIT_FAILED_TEST, EXIT_BAD_INPUT, EXIT_REGRESSION = 1, 2, 3
_COMMANDS = ("run", "serve", "report", "parity", "chat", "schema", "speculative", "shared-prompt", "score")


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are BenchErrors: one line and exit status 2, like every bad input."""

    def error(self, message):
        raise BenchError(message)


def main(argv: list[str] | None = None) -> int:
    from rz.errors import RzError

    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in _COMMANDS else "run"
    try:
        commands = {"run": cmd_run, "serve": cmd_serve, "report": cmd_report, "parity": cmd_parity, "chat": cmd_chat,
                    "schema": cmd_schema, "speculative": cmd_speculative, "shared-prompt": cmd_shared_prompt,
                    "score": cmd_score}
        return commands[command](argv)
    except RzError as error:
        print(f"rz.bench: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("rz.bench: interrupted", file=sys.stderr)
        return 130


# ----- run: engines side by side -----

def run_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m rz.bench", description="llama-bench-style tests of rz and its peers, side by side.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="other commands:\n"
               "  python -m rz.bench serve --url URL --concurrency N | --rate R   load on a server (grpc:// for rz's)\n"
               "  python -m rz.bench report [--history FILE ...]                  markdown tables and a plot of the history\n"
               "  python -m rz.bench parity [--model M.gguf]                      greedy continuations against llama.cpp's\n"
               "  python -m rz.bench schema                                       the JSON schema of results\n"
               "exit status: 0 done, 1 a test failed while timing, 2 bad input or failed preflight, 3 regression",
    )
    parser.add_argument("--model", metavar="GGUF", help="model file (default: Gemma 3 270M Q4_K_M)")
    parser.add_argument("--engines", default="rz,llama.cpp",
                        help="comma list of rz, llama.cpp, llama-server[=URL], openai[=URL], ollama[=URL]; "
                             "ratios are the first engine over each other (default: rz,llama.cpp)")
    parser.add_argument("--tests", default="pp512,tg128", help="comma list of ppN, tgN, ppN+tgM (default: pp512,tg128)")
    parser.add_argument("--depth", default="0", help="comma list of KV-cache depths: tokens already in the cache (default: 0)")
    parser.add_argument("--batch", default="1", help="comma list of sequences decoding together, for tg tests (default: 1)")
    parser.add_argument("--threads", type=int, help="CPU threads of every engine (default: every usable core)")
    parser.add_argument("--n-ctx", type=int, help="context positions per sequence (default: what the tests need, to 256)")
    parser.add_argument("--max-batch", type=int, help="rz's decode slots / llama.cpp's sequences (default: the largest --batch)")
    parser.add_argument("--n-batch", type=int, default=512, help="llama.cpp's prompt batch (default: 512)")
    add_cache_type_arguments(parser)
    parser.add_argument("--reps-min", type=int, default=3, help="repetitions before the CV may stop them (default: 3)")
    parser.add_argument("--reps-max", type=int, default=10, help="most repetitions per engine and test (default: 10)")
    parser.add_argument("--max-time", type=float, default=60.0, help="most seconds of repetitions per engine and test (default: 60)")
    parser.add_argument("--cv", default="5%", help="stop repeating when the CV of tok/s is at most this (default: 5%%)")
    parser.add_argument("--warmup", type=int, default=1, help="repetitions discarded first, per engine and test (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts (default: 0)")
    parser.add_argument("--server-model", help="the model name HTTP servers are asked for (Ollama's tag)")
    parser.add_argument("--no-isolate", action="store_true", help="run in-process engines in this process, not one worker each")
    parser.add_argument("--no-bandwidth", action="store_true", help="skip measuring the machine's memory bandwidth")
    parser.add_argument("--json", metavar="FILE", help="write the result as JSON to FILE")
    parser.add_argument("--history", metavar="FILE", default=str(DEFAULT_HISTORY), help=f"append the result to FILE (default: {DEFAULT_HISTORY})")
    parser.add_argument("--no-history", action="store_true", help="do not append to the history")
    parser.add_argument("--baseline", metavar="FILE", help="a result (.json) or history (.jsonl) to compare with")
    parser.add_argument("--max-regression", default="5%", help="with --baseline: fail beyond this slowdown (default: 5%%)")
    parser.add_argument("--quiet", action="store_true", help="no progress display")
    return parser


def cmd_run(argv: list[str]) -> int:
    from rz.bench.engines import EngineSettings, create_engine, parse_engines
    from rz.bench.environment import file_sha256, model_facts
    from rz.bench.runner import Progress
    from rz.bench.workloads import parse_tests

    args = run_parser().parse_args(argv)
    rule = _stopping_rule(args)
    max_regression = parse_fraction(args.max_regression)
    engine_names = parse_engines(args.engines)
    tests = parse_tests(args.tests, args.depth, args.batch, n_ctx=_positive(args.n_ctx, "--n-ctx"))
    threads = _positive(args.threads, "--threads") or _usable_cores()
    n_ctx = args.n_ctx or _round_up(max(t.prompt_length + t.max_tokens for t in tests), 256)
    max_batch = _positive(args.max_batch, "--max-batch") or max(t.batch for t in tests)
    _positive(args.n_batch, "--n-batch")
    if args.warmup < 0:
        raise BenchError(f"--warmup {args.warmup} is impossible: it must be at least 0")
    baseline = _load_baseline(args.baseline) if args.baseline else None

    model_path = Path(args.model) if args.model else _default_model()
    model = model_facts(model_path) | {"sha256": file_sha256(model_path)}
    settings = EngineSettings(model_path=model_path, threads=threads, n_ctx=n_ctx, max_batch=max_batch,
                              n_batch=args.n_batch, seed=args.seed, server_model=args.server_model,
                              cache_type_k=args.cache_type_k, cache_type_v=args.cache_type_v,
                              isolated=not args.no_isolate)
    progress = Progress(enabled=not args.quiet)
    engines = []
    try:
        for name, url in engine_names:
            engines.append(create_engine(name, url, settings))
        records = _prepare(engines, progress, args.no_bandwidth, threads)
        result = _measure(args, engines, records, tests, rule, model, settings, progress)
        result["command"] = ["python", "-m", "rz.bench"] + argv
    finally:
        for engine in engines:
            engine.close()

    if baseline is not None:
        from rz.bench.gate import check_regression

        result["gate"] = check_regression(result, _matching_baseline(baseline, result), max_regression)
    from rz.bench.schema import validate_result
    from rz.bench.tables import markdown_tables

    validate_result(result)
    print(markdown_tables(result))
    _save(result, args)
    if "gate" in result:
        from rz.bench.gate import format_gate

        print("\n" + format_gate(result["gate"]))
        if not result["gate"]["passed"]:
            return EXIT_REGRESSION
    return EXIT_FAILED_TEST if any(e["status"] == "failed" for e in result["results"]) else 0


def _prepare(engines, progress, skip_bandwidth: bool, threads: int) -> dict:
    """Preflight every engine (all failures reported together), measure the machine, then load."""
    problems = []
    for engine in engines:
        progress.update(f"[{engine.name}] preflight")
        try:
            engine.preflight()
        except BenchError as error:
            problems.append(str(error))
    if problems:
        raise PreflightError("\n".join(problems) if len(problems) == 1 else "preflight failed:\n  " + "\n  ".join(problems))
    bandwidth = None
    if not skip_bandwidth:
        from rz.bench.bandwidth import measure_copy_bandwidth

        progress.update("measuring the machine's memory bandwidth")
        bandwidth = measure_copy_bandwidth(threads)
    records = {"machine_bandwidth": bandwidth, "engines": []}
    for engine in engines:
        progress.update(f"[{engine.name}] loading")
        try:
            loaded = engine.load()
            description = engine.describe()
        except BenchError as error:
            raise PreflightError(f"{engine.name} cannot load the model: {error}") from None
        notes = description.pop("notes", [])
        records["engines"].append({"name": engine.name, "kind": engine.kind, "url": engine.settings.url,
                                   "description": description, "load_seconds": loaded.get("load_seconds"),
                                   "notes": notes})
        progress.message(f"[{engine.name}] loaded in {loaded.get('load_seconds') or 0:.2f} s: {description.get('version') or engine.settings.url}")
    _check_threads(records["engines"])
    return records


def _check_threads(engines: list[dict]) -> None:
    """Engines on the CPU must use the same number of threads, or the comparison is not fair."""
    counts = {e["name"]: e["description"].get("threads") for e in engines if e["kind"] == "in-process"}
    counts = {name: count for name, count in counts.items() if count is not None}
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{name} {count}" for name, count in counts.items())
        raise PreflightError(f"thread settings differ ({listed}): set --threads, and keep engines isolated (no --no-isolate)")


def _measure(args, engines, records, tests, rule, model, settings, progress) -> dict:
    from rz.bench.environment import capture_environment
    from rz.bench.runner import Runner, compute_ratios
    from rz.bench.workloads import PromptMaker, model_tokenizer

    environment = capture_environment()
    bandwidth = records["machine_bandwidth"]
    runner = Runner(engines, PromptMaker(model_tokenizer(settings.model_path), seed=args.seed), rule, warmup=args.warmup,
                    weight_bytes_per_token=model["weight_bytes_per_token"],
                    machine_gb_per_s=bandwidth["gb_per_s"] if bandwidth else None, progress=progress)
    results = runner.run(tests)
    progress.message("done")
    for record, engine in zip(records["engines"], engines):
        try:
            record["resources"] = engine.resources()
        except BenchError as error:
            record["resources"] = {"peak_rss_bytes": None}
            record["notes"].append(f"resources unavailable: {error}")
    return _envelope("engines", environment, model, {
        "engines_requested": args.engines, "tests": [t.as_dict() for t in tests],
        "threads": settings.threads, "n_ctx": settings.n_ctx, "max_batch": settings.max_batch, "n_batch": settings.n_batch,
        "cache_type_k": settings.cache_type_k, "cache_type_v": settings.cache_type_v,
        "reps_min": rule.min_reps, "reps_max": rule.max_reps, "max_time_s": rule.max_seconds, "cv_threshold": rule.cv_threshold,
        "warmup": args.warmup, "seed": args.seed, "isolated": settings.isolated, "server_model": settings.server_model,
    }) | {
        "machine_bandwidth": bandwidth,
        "engines": records["engines"],
        "results": results,
        "ratios": compute_ratios(results, engines[0].name),
    }


# ----- serve: load on a server -----

def serve_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m rz.bench serve", description="Concurrent or Poisson load on an OpenAI-compatible server.")
    parser.add_argument("--url", required=True, help="grpc://HOST:PORT for rz's server, or an OpenAI-compatible http://HOST:PORT")
    parser.add_argument("--engine", default="openai", choices=("openai", "llama-server"), help="what the HTTP server is (a label)")
    parser.add_argument("--model", metavar="GGUF", help="the GGUF file the server runs: prompts and the same-model check (default: Gemma 3)")
    parser.add_argument("--server-model", help="the model name to ask the server for")
    arrivals = parser.add_mutually_exclusive_group(required=True)
    arrivals.add_argument("--concurrency", type=int, help="clients sending requests back to back")
    arrivals.add_argument("--rate", type=float, help="Poisson arrivals, requests per second")
    parser.add_argument("--requests", type=int, default=32, help="requests in all (default: 32)")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="tokens per prompt (default: 128)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request (default: 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request (default: 600)")
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--history", metavar="FILE", default=str(DEFAULT_HISTORY))
    parser.add_argument("--no-history", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    return parser


def cmd_serve(argv: list[str]) -> int:
    from rz.bench.engines import EngineSettings
    from rz.bench.engines.http_engines import LlamaServerEngine, OpenAIServerEngine
    from rz.bench.environment import capture_environment, file_sha256, model_facts
    from rz.bench.report import serving_table
    from rz.bench.runner import Progress
    from rz.bench.serving import Arrivals, GrpcTarget, OpenAITarget, run_serving
    from rz.bench.workloads import PromptMaker, Workload, model_tokenizer

    args = serve_parser().parse_args(argv)
    arrivals = Arrivals(concurrency=args.concurrency, rate=args.rate)
    for option, value in (("--requests", args.requests), ("--prompt-tokens", args.prompt_tokens), ("--max-tokens", args.max_tokens)):
        _positive(value, option)
    model_path = Path(args.model) if args.model else _default_model()
    model = model_facts(model_path) | {"sha256": file_sha256(model_path)}
    if args.url.startswith("grpc://"):
        target = GrpcTarget(args.url, model_path, args.seed, args.timeout)
    else:
        settings = EngineSettings(model_path=model_path, threads=_usable_cores(), n_ctx=args.prompt_tokens + args.max_tokens,
                                  seed=args.seed, url=args.url, server_model=args.server_model, isolated=False,
                                  timeout_s=args.timeout)
        target = OpenAITarget((LlamaServerEngine if args.engine == "llama-server" else OpenAIServerEngine)(settings))
    target.preflight()
    maker = PromptMaker(model_tokenizer(model_path), seed=args.seed)
    shape = Workload("pg", args.prompt_tokens, args.max_tokens)
    prompts = [maker.make(args.prompt_tokens, shape, index) for index in range(args.requests)]
    progress = Progress(enabled=not args.quiet)
    serving = run_serving(target, prompts, args.max_tokens, arrivals, seed=args.seed, progress=progress)
    progress.message("done")
    result = _envelope("serving", capture_environment(), model, {
        "url": target.url, "engine": target.name, "arrivals": arrivals.as_dict(), "requests": args.requests,
        "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens, "seed": args.seed,
        "server_model": args.server_model, "notes": target.notes,
    }) | {"serving": serving}
    result["command"] = ["python", "-m", "rz.bench", "serve"] + argv
    from rz.bench.schema import validate_result

    validate_result(result)
    print(serving_table([result]))
    for error in serving["errors"]:
        print(f"- error: {error}")
    _save(result, args)
    return EXIT_FAILED_TEST if serving["failed"] else 0


# ----- parity: greedy continuations against llama.cpp, and each engine against itself -----

def cmd_parity(argv: list[str]) -> int:
    from rz.bench.parity import GREEDY_PROMPTS, measure, table

    parser = _Parser(prog="python -m rz.bench parity",
                     description="Greedy continuations of rz against llama.cpp's, next to each engine against itself.")
    parser.add_argument("--model", metavar="GGUF", help="the GGUF file (default: Gemma 3)")
    parser.add_argument("--prompts", type=int, default=len(GREEDY_PROMPTS), help=f"how many prompts (default: all {len(GREEDY_PROMPTS)})")
    parser.add_argument("--tokens", type=int, default=48, help="tokens per continuation (default: 48)")
    parser.add_argument("--threads", type=int, default=_usable_cores(), help="llama.cpp's threads (default: the usable cores)")
    parser.add_argument("--json", metavar="FILE", help="also write the result here")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    model_path = Path(args.model) if args.model else _default_model()
    if not model_path.is_file():
        raise BenchError(f"--model {model_path}: no such file")
    progress = (lambda message: None) if args.quiet else (lambda message: print(f"parity: {message}", file=sys.stderr))
    result = measure(model_path, args.prompts, args.tokens, args.threads, progress)
    result["command"] = ["python", "-m", "rz.bench", "parity"] + argv
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def cmd_chat(argv: list[str]) -> int:
    from rz.bench.chat import measure, measure_servers, table
    from rz.model_files import smollm2_135m_path

    parser = _Parser(prog="python -m rz.bench chat",
                     description="A multi-turn chat: each turn's time to its first token, rz beside llama.cpp.")
    parser.add_argument("--model", metavar="GGUF", help="the GGUF file (default: SmolLM2 135M)")
    parser.add_argument("--engines", default="rz,llama.cpp", help="comma list of rz, llama.cpp (default: both)")
    parser.add_argument("--turns", type=int, default=10, help="turns of the chat (default: 10)")
    parser.add_argument("--user-tokens", type=int, default=100, help="tokens of each user message (default: 100)")
    parser.add_argument("--answer-tokens", type=int, default=16, help="tokens of each assistant answer (default: 16)")
    parser.add_argument("--n-ctx", type=int, default=4096, help="context positions (default: 4096)")
    parser.add_argument("--warm", action="store_true",
                        help="rz compiles every shape first, so no measured turn compiles (as a warmed-up server)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of the whole chat, each from empty caches; a turn's TTFT is their median (default: 3)")
    parser.add_argument("--servers", metavar="NAME=URL,...",
                        help="instead of --engines: running OpenAI-compatible servers, e.g. "
                             "rz=http://127.0.0.1:8000,llama-server=http://127.0.0.1:8080 (each turn through /v1/completions)")
    _add_measurement_options(parser)
    args = parser.parse_args(argv)
    if args.turns < 1:
        raise BenchError(f"--turns must be at least 1, got {args.turns}")
    model_path = Path(args.model) if args.model else smollm2_135m_path()
    if not model_path.is_file():
        raise BenchError(f"--model {model_path}: no such file")
    if args.servers:
        servers = _servers(args.servers)
        result = measure_servers(model_path, servers, args.turns, args.user_tokens, args.answer_tokens,
                                 _progress("chat", args.quiet))
        return _report_measurement(result, table, "chat", argv, args.json)
    engines = _comma_list(args.engines, ("rz", "llama.cpp"), "--engines")
    result = measure(model_path, args.turns, args.user_tokens, args.answer_tokens, args.n_ctx, args.threads, engines,
                     _progress("chat", args.quiet), warm=args.warm, repeats=args.repeats)
    return _report_measurement(result, table, "chat", argv, args.json)


def cmd_speculative(argv: list[str]) -> int:
    from rz.bench.speculative import WORKLOADS, measure, table
    from rz.model_files import gemma3_270m_path, smollm2_135m_path
    from rz.speculative import PROPOSERS

    parser = _Parser(prog="python -m rz.bench speculative",
                     description="Speculative decoding at batch 1: verify costs, and tok/s of rz's proposers beside "
                                 "plain decoding and llama.cpp's prompt lookup, on an input-grounded and a free workload.")
    parser.add_argument("--model", metavar="GGUF", action="append",
                        help="a GGUF file, repeatable (default: SmolLM2 135M and Gemma 3 270M)")
    parser.add_argument("--proposers", default=",".join(PROPOSERS), help=f"comma list of {', '.join(PROPOSERS)} (default: all)")
    parser.add_argument("--reps", type=int, default=2, help="runs of each engine per workload; medians are reported (default: 2)")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens generated per run (default: 128)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma list of {', '.join(WORKLOADS)} (default: all)")
    parser.add_argument("--draft-model", metavar="GGUF",
                        help="the draft proposer's model, with every --model's vocabulary (without it, draft is left out)")
    _add_measurement_options(parser)
    args = parser.parse_args(argv)
    proposers = _comma_list(args.proposers, PROPOSERS, "--proposers")
    workloads = _comma_list(args.workloads, tuple(WORKLOADS), "--workloads")
    draft_model = Path(args.draft_model) if args.draft_model else None
    if draft_model is None:
        proposers = tuple(p for p in proposers if p != "draft")
    elif not draft_model.is_file():
        raise BenchError(f"--draft-model {draft_model}: no such file")
    if args.reps < 1 or args.max_tokens < 2:
        raise BenchError(f"--reps must be at least 1 and --max-tokens at least 2, got {args.reps} and {args.max_tokens}")
    paths = [Path(p) for p in args.model] if args.model else [smollm2_135m_path(), gemma3_270m_path()]
    for path in paths:
        if not path.is_file():
            raise BenchError(f"--model {path}: no such file")
    result = measure({path.name: path for path in paths}, proposers, args.reps, args.max_tokens, args.threads,
                     _progress("speculative", args.quiet), draft_model, workloads)
    return _report_measurement(result, table, "speculative", argv, args.json)


def cmd_shared_prompt(argv: list[str]) -> int:
    from rz.bench.shared_prompt import measure, table

    parser = _Parser(prog="python -m rz.bench shared-prompt",
                     description="Clients sending one system prompt with different questions: prompt tokens computed "
                                 "against the shared prefix once plus the unique parts, rz with and without prefix reuse "
                                 "beside llama.cpp reusing its previous prompt's prefix.")
    _add_models_option(parser)
    parser.add_argument("--engines", default="rz,llama.cpp", help="comma list of rz, llama.cpp (default: both)")
    parser.add_argument("--clients", type=int, default=8, help="clients, each with its own question (default: 8)")
    parser.add_argument("--system-tokens", type=int, default=1000, help="tokens of the shared system prompt (default: 1000)")
    parser.add_argument("--n-ctx", type=int, default=2048, help="context positions per client (default: 2048)")
    parser.add_argument("--reps", type=int, default=1, help="counted rounds after the first; times are medians (default: 1)")
    _add_measurement_options(parser)
    args = parser.parse_args(argv)
    engines = _comma_list(args.engines, ("rz", "llama.cpp"), "--engines")
    if args.reps < 1 or args.system_tokens < 1:
        raise BenchError(f"--reps and --system-tokens must be at least 1, got {args.reps} and {args.system_tokens}")
    models = _model_files(args.model)
    result = _on_this_machine(lambda: measure(models, args.clients, args.system_tokens, args.n_ctx, args.threads, engines,
                                              args.reps, _progress("shared-prompt", args.quiet)))
    return _report_measurement(result, table, "shared-prompt", argv, args.json)


def cmd_score(argv: list[str]) -> int:
    from rz.bench.score import measure, table

    parser = _Parser(prog="python -m rz.bench score",
                     description="rz.LLM.score against llama.cpp evaluating the same tokens with all logits, interleaved.")
    _add_models_option(parser)
    parser.add_argument("--tokens", type=int, default=1100, help="tokens scored, from the start of a passage (default: 1100)")
    parser.add_argument("--n-ctx", type=int, default=2048, help="both engines' context positions (default: 2048)")
    parser.add_argument("--reps", type=int, default=3, help="counted rounds after the first; the best is compared (default: 3)")
    _add_measurement_options(parser)
    args = parser.parse_args(argv)
    if args.reps < 1:
        raise BenchError(f"--reps must be at least 1, got {args.reps}")
    models = _model_files(args.model)
    result = _on_this_machine(lambda: measure(models, args.tokens, args.n_ctx, args.reps, args.threads,
                                              _progress("score", args.quiet)))
    return _report_measurement(result, table, "score", argv, args.json)


def _add_models_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="GGUF", action="append",
                        help="a GGUF file, repeatable (default: SmolLM2 135M and Gemma 3 270M)")


def _model_files(paths: list[str] | None) -> dict[str, Path]:
    """The --model files by name (default: both real models), else BenchError naming a missing one."""
    from rz.model_files import gemma3_270m_path, smollm2_135m_path

    files = [Path(p) for p in paths] if paths else [smollm2_135m_path(), gemma3_270m_path()]
    for path in files:
        if not path.is_file():
            raise BenchError(f"--model {path}: no such file")
    return {path.name: path for path in files}


def _on_this_machine(measure) -> dict:
    """measure()'s result with the CPU it ran on and the load averages before and after (the machine may be shared)."""
    import os

    from rz.bench.environment import cpu_info

    before = os.getloadavg()
    result = measure()
    return result | {"cpu": cpu_info(), "load_average": {"before": list(before), "after": list(os.getloadavg())}}


def _add_measurement_options(parser: argparse.ArgumentParser) -> None:
    """The options every in-process measurement command takes: llama.cpp's threads, a JSON copy, quiet."""
    parser.add_argument("--threads", type=int, default=_usable_cores(), help="llama.cpp's threads (default: the usable cores)")
    parser.add_argument("--json", metavar="FILE", help="also write the result here")
    parser.add_argument("--quiet", action="store_true")


def _comma_list(text: str, choices: tuple[str, ...], option: str) -> tuple[str, ...]:
    """A non-empty comma list of choices, else BenchError naming them."""
    names = tuple(name for name in text.split(",") if name)
    if not names or set(names) - set(choices):
        raise BenchError(f"{option}: expected a comma list of {', '.join(choices)}, got {text!r}")
    return names


def _servers(text: str) -> dict[str, str]:
    """NAME=URL,... as {name: url}, else BenchError saying how to write it."""
    pairs = [item.strip().partition("=") for item in text.split(",") if item.strip()]
    if not pairs or any(not name or not url for name, _, url in pairs) or len({name for name, _, _ in pairs}) < len(pairs):
        raise BenchError(f"--servers: expected distinct NAME=URL items separated by commas, got {text!r}")
    return {name: url for name, _, url in pairs}


def _progress(command: str, quiet: bool):
    return (lambda message: None) if quiet else (lambda message: print(f"{command}: {message}", file=sys.stderr))


def _report_measurement(result: dict, table, command: str, argv: list[str], json_path: str | None) -> int:
    """Print a measurement command's table and write its result, with the command line, to json_path."""
    result["command"] = ["python", "-m", "rz.bench", command] + argv
    print(table(result))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    return 0


# ----- report and schema -----

def cmd_report(argv: list[str]) -> int:
    from rz.bench.history import load_results
    from rz.bench.report import plot_history, render_report

    parser = _Parser(prog="python -m rz.bench report", description="Markdown tables and a PNG plot of the results history.")
    parser.add_argument("--history", metavar="FILE", nargs="+", default=[str(DEFAULT_HISTORY)], help=f"history files (default: {DEFAULT_HISTORY})")
    parser.add_argument("--markdown", metavar="FILE", help="write the report here (default: report.md beside the first history)")
    parser.add_argument("--plot", metavar="FILE", help="write the plot here (default: report.png beside the first history)")
    args = parser.parse_args(argv)
    results = [result for path in args.history for result in load_results(Path(path))]
    folder = Path(args.history[0]).parent
    markdown_path = Path(args.markdown) if args.markdown else folder / "report.md"
    plot_path = plot_history(results, Path(args.plot) if args.plot else folder / "report.png")
    text = render_report(results, plot_path)
    markdown_path.parent.mkdir(parents=True, exist_ok=True)
    markdown_path.write_text(text, encoding="utf-8")
    print(text)
    print(f"wrote {markdown_path}" + (f" and {plot_path}" if plot_path else " (no plot: pip install matplotlib)"), file=sys.stderr)
    return 0


def cmd_schema(argv: list[str]) -> int:
    from rz.bench.schema import RESULT_SCHEMA

    _Parser(prog="python -m rz.bench schema", description="Print the JSON schema of results.").parse_args(argv)
    print(json.dumps(RESULT_SCHEMA, indent=2))
    return 0


# ----- helpers -----

def _envelope(mode: str, environment: dict, model: dict, settings: dict) -> dict:
    from rz.bench.schema import SCHEMA_VERSION

    return {
        "schema": "rz.bench/result",
        "schema_version": SCHEMA_VERSION,
        "mode": mode,
        "run_id": uuid.uuid4().hex,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": [],  # filled in by the command
        "settings": settings,
        "environment": environment,
        "model": model,
    }


def _save(result: dict, args) -> None:
    from rz.bench.history import append_history

    sys.stdout.flush()  # the tables before the lines saying where they went
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {path}", file=sys.stderr)
    if not args.no_history:
        append_history(result, Path(args.history))
        print(f"appended to {args.history}", file=sys.stderr)


def _stopping_rule(args):
    from rz.bench.stats import StoppingRule

    if args.reps_min < 1 or args.reps_max < args.reps_min:
        raise BenchError(f"--reps-min {args.reps_min} and --reps-max {args.reps_max} are impossible: need 1 <= min <= max")
    if not args.max_time > 0:
        raise BenchError(f"--max-time {args.max_time} is impossible: seconds must be positive")
    return StoppingRule(cv_threshold=parse_fraction(args.cv), min_reps=args.reps_min, max_reps=args.reps_max,
                        max_seconds=args.max_time)


def _load_baseline(path: str) -> list[dict]:
    from rz.bench.history import load_results

    runs = [r for r in load_results(Path(path)) if r["mode"] == "engines"]
    if not runs:
        raise BenchError(f"baseline {path} holds no engine runs")
    return runs


def _matching_baseline(runs: list[dict], result: dict) -> dict:
    """The newest baseline run on the same model file."""
    same_model = [r for r in runs if r["model"]["sha256"] == result["model"]["sha256"]]
    if not same_model:
        raise BenchError(f"the baseline has no run of {result['model']['file_name']} (sha256 differs)")
    return max(same_model, key=lambda r: r["created"])


def parse_fraction(text: str) -> float:
    """'5%', '5' or '0.05' as the fraction 0.05."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(%?)\s*", str(text))
    if not match:
        raise BenchError(f"{text!r} is not a percentage: write it like 5% or 0.05")
    value = float(match[1])
    fraction = value / 100 if match[2] or value >= 1 else value
    if not 0 <= fraction < 1:
        raise BenchError(f"{text!r} is not a percentage between 0% and 100%")
    return fraction


def _positive(value: int | None, option: str) -> int | None:
    if value is not None and value < 1:
        raise BenchError(f"{option} {value} is impossible: it must be at least 1")
    return value


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _usable_cores() -> int:
    from rz.bench.engines.base import usable_cores

    return usable_cores()


def _default_model() -> Path:
    from rz.model_files import default_model_path

    return default_model_path()
