"""The `serve` and `client` commands of python -m rz; gRPC is imported only when one of them runs."""

import argparse
import json
import os
import sys
from pathlib import Path

from rz.speculative import PROPOSERS


def add_cache_type_arguments(parser: argparse.ArgumentParser) -> None:
    """--cache-type-k and --cache-type-v: how the KV cache stores keys and values, as llama.cpp's flags."""
    from rz.kv_cache import CacheTypes
    from rz_kernels.attention_kv import CACHE_TYPES

    for which, default in (("k", CacheTypes.k), ("v", CacheTypes.v)):
        parser.add_argument(
            f"--cache-type-{which}", choices=CACHE_TYPES, default=default,
            help=f"KV cache type for {'keys' if which == 'k' else 'values'}; f32 for exact analysis (default: {default})",
        )


def add_parallel_arguments(parser: argparse.ArgumentParser) -> None:
    """--tensor-parallel N (rz.sharding), and how this process joins others (rz.multihost)."""
    parser.add_argument(
        "--tensor-parallel", type=_at_least(1), default=1, metavar="N",
        help="split the model's heads, FFN and vocabulary over N devices (default: 1); "
        "on a machine without accelerators, the CPU is presented as N devices",
    )
    hosts = parser.add_argument_group(
        "several processes (hosts)", "one mesh over the devices of several processes, started alike with their own "
        "--process-id; process 0 serves, the others follow it. Without these flags or their RZ_* variables, "
        "a Slurm or Open MPI launch of several tasks is found by jax.distributed.initialize",
    )
    hosts.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address for the others to join (default: $RZ_COORDINATOR)")
    hosts.add_argument("--num-processes", type=_at_least(1), metavar="N", help="how many processes form the mesh (default: $RZ_NUM_PROCESSES)")
    hosts.add_argument("--process-id", type=_at_least(0), metavar="I", help="this process's index, 0 to N-1 (default: $RZ_PROCESS_ID)")


def start_devices(args, replicas: int = 1) -> int:
    """Before JAX starts: join the other processes if asked, and give JAX's CPU backend the
    devices --tensor-parallel needs, for each of `replicas`; this process's index (0 alone)."""
    from rz import multihost
    from rz.sharding import provide_cpu_devices

    distributed = multihost.Distributed.from_flags(args.coordinator, args.num_processes, args.process_id)
    if distributed.asked:
        # On CPU each process holds its share of the mesh (one device when the count is unknown).
        share = args.tensor_parallel // distributed.num_processes if distributed.num_processes else None
        return multihost.initialize(distributed, local_devices=share)
    devices = args.tensor_parallel * replicas
    if devices > 1:
        provide_cpu_devices(devices)
    return 0


def add_commands(commands) -> None:
    """Add `serve` and `client` to python -m rz's subcommands."""
    serve = commands.add_parser(
        "serve", help="serve a model over gRPC (health, reflection, Prometheus metrics) and HTTP (OpenAI- and Ollama-compatible)"
    )
    serve.add_argument("--model", metavar="PATH", help="GGUF file (default: Gemma 3 270M Q4_K_M)")
    serve.add_argument("--n-ctx", type=int, default=None, help="context size per slot (default: min(4096, the model's))")
    add_cache_type_arguments(serve)
    serve.add_argument(
        "--kv-cache-tokens", type=_at_least(1), default=None, metavar="N",
        help="the KV cache's pool in positions, shared by the requests running at once (blocks of 64); a request waits "
        "while the pool cannot promise it the blocks it may need (default: --max-batch x --n-ctx, or what half the "
        "free memory holds)",
    )
    add_parallel_arguments(serve)
    serve.add_argument(
        "--data-parallel", type=_at_least(1), default=1, metavar="M",
        help="M engine replicas behind the one queue, each with --max-batch slots on --tensor-parallel devices "
        "of its own: throughput when the model fits (default: 1); one process only",
    )
    serve.add_argument("--max-batch", type=_at_least(1), default=8, help="decode slots: requests generating at once (default: 8)")
    serve.add_argument("--max-queue", type=_at_least(0), default=64, help="requests that may wait for a slot (default: 64)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=50051, help="gRPC port; 0 picks a free one (default: 50051)")
    serve.add_argument(
        "--metrics-port", type=int, default=9090, help="Prometheus port; 0 picks a free one, -1 turns metrics off (default: 9090)"
    )
    serve.add_argument(
        "--http-port", type=int, default=8080,
        help="HTTP port of the OpenAI- and Ollama-compatible API; 0 picks a free one, -1 turns it off (default: 8080)",
    )
    serve.add_argument(
        "--prefill-chunk", type=_at_least(8), default=256,
        help="longest prompt chunk prefilled between two decode steps: shorter stalls running streams less, "
        "longer prefills a long prompt faster (default: 256)",
    )
    serve.add_argument(
        "--speculative", choices=PROPOSERS, default=None,
        help="draft tokens with this proposer for requests that do not choose (their 'speculative' option): "
        "ngram is prompt lookup, fastest on output that quotes its input; self drafts with the model's own first "
        "layers; draft with --draft-model; the output is unchanged (default: off)",
    )
    serve.add_argument(
        "--draft-model", metavar="PATH", default=None,
        help="a smaller GGUF with the model's vocabulary, for the 'draft' proposer (default: none)",
    )
    serve.add_argument(
        "--self-draft-layers", type=_at_least(1), default=None,
        help="layers the 'self' proposer drafts with (default: half the model's)",
    )
    serve.add_argument("--grace", type=float, default=10.0, help="seconds in-flight requests get on SIGTERM (default: 10)")
    serve.add_argument("--max-request-bytes", type=_at_least(1), default=1 << 20, help="largest request accepted (default: 1 MiB)")
    serve.add_argument(
        "--api-key", default=os.environ.get("RZ_API_KEY") or None,
        help="require 'authorization: Bearer KEY' (gRPC metadata, HTTP header) on every call but health checks "
        "(default: $RZ_API_KEY; none)",
    )
    serve.add_argument("--tls-cert", type=Path, help="PEM certificate chain: serve gRPC over TLS (with --tls-key)")
    serve.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    serve.set_defaults(run=run_serve)

    client = commands.add_parser("client", help="talk to a running rz server")
    client.add_argument("--target", default="127.0.0.1:50051", help="server address (default: 127.0.0.1:50051)")
    client.add_argument("--timeout", type=float, default=None, help="seconds per call")
    client.add_argument("--api-key", default=os.environ.get("RZ_API_KEY") or None, help="the server's API key (default: $RZ_API_KEY)")
    client.add_argument("--tls", action="store_true", help="connect over TLS, trusting the system's certificate authorities")
    client.add_argument("--tls-ca", type=Path, help="connect over TLS, trusting this PEM certificate (a self-signed server's)")
    calls = client.add_subparsers(dest="call", required=True)
    generate = calls.add_parser("generate", help="continue a prompt, streaming the text")
    generate.add_argument("prompt")
    chat = calls.add_parser("chat", help="an interactive chat using the model's chat template")
    chat.add_argument("--system", help="a system message")
    for parser in (generate, chat):
        parser.add_argument("--max-tokens", type=int, default=None)
        parser.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: the server's, 0.8)")
        parser.add_argument("--top-k", type=int, default=None)
        parser.add_argument("--top-p", type=float, default=None)
        parser.add_argument("--min-p", type=float, default=None)
        parser.add_argument("--repeat-penalty", type=float, default=None)
        parser.add_argument("--seed", type=int, default=None)
        parser.add_argument("--stop", action="append", help="stop string (repeatable)")
        parser.add_argument("--ignore-eos", action="store_true")
    generate.add_argument("--json", action="store_true", help="print one JSON object at the end")
    tokenize = calls.add_parser("tokenize", help="print the token ids of a text")
    tokenize.add_argument("text")
    detokenize = calls.add_parser("detokenize", help="print the text of token ids")
    detokenize.add_argument("ids", type=int, nargs="+")
    calls.add_parser("info", help="what the server runs, as JSON")
    calls.add_parser("health", help="the server's health status")
    client.set_defaults(run=run_client)


def _at_least(minimum: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def run_serve(args) -> int:
    import logging

    from rz.model_files import default_model_path
    from rz.server.server import ServerConfig, follow, serve

    logging.basicConfig(level=logging.INFO, format="rz serve: %(message)s", stream=sys.stderr)
    process = start_devices(args, args.data_parallel)
    return (follow if process else serve)(ServerConfig(
        model=args.model or default_model_path(),
        n_ctx=args.n_ctx,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        grace_seconds=args.grace,
        max_request_bytes=args.max_request_bytes,
        prefill_chunk=args.prefill_chunk,
        api_key=args.api_key,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        http_port=args.http_port,
        cache_type_k=args.cache_type_k,
        cache_type_v=args.cache_type_v,
        kv_cache_tokens=args.kv_cache_tokens,
        tensor_parallel=args.tensor_parallel,
        data_parallel=args.data_parallel,
        speculative=args.speculative,
        self_draft_layers=args.self_draft_layers,
        draft_model=args.draft_model,
    ))


def run_client(args) -> int:
    import grpc
    from google.protobuf.json_format import MessageToDict

    from rz.client import Client

    with Client(args.target, timeout=args.timeout, api_key=args.api_key, tls=args.tls, tls_ca=args.tls_ca) as client:
        try:
            if args.call == "generate":
                return _generate(client, args)
            if args.call == "chat":
                return _chat(client, args)
            if args.call == "tokenize":
                print(" ".join(map(str, client.tokenize(args.text))))
            elif args.call == "detokenize":
                print(client.detokenize(args.ids))
            elif args.call == "info":
                print(json.dumps(MessageToDict(client.model_info(), preserving_proto_field_name=True), indent=2))
            else:
                print(client.health())
        except grpc.RpcError as error:
            print(f"rz: error: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    return 0


def _options(args) -> dict:
    return {
        "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "min_p": args.min_p,
        "repeat_penalty": args.repeat_penalty, "seed": args.seed, "stop": args.stop, "ignore_eos": args.ignore_eos,
    }


def _generate(client, args) -> int:
    if args.json:
        out = client.generate(args.prompt, args.max_tokens, **_options(args))
        print(json.dumps({
            "text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason,
            "usage": out.usage, "timings": out.timings,
        }))
        return 0
    for chunk in client.stream(args.prompt, args.max_tokens, **_options(args)):
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _chat(client, args) -> int:
    from rz.chat import chat_loop

    def reply(messages):
        return (chunk.text for chunk in client.chat_stream(messages, args.max_tokens, **_options(args)))

    return chat_loop(args.system, reply)
