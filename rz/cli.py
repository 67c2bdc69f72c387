"""The command line: python -m rz {info,tokenize,...}."""

import argparse
import json
import sys

from rz.errors import ChatTemplateError, RzError
from rz.request import FLAT_OPTIONS
from rz.server.cli import add_cache_type_arguments, add_commands as add_server_commands, add_parallel_arguments, start_devices


def _add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="PATH", help="GGUF file (default: Gemma 3 270M Q4_K_M)")


def _model_path(args):
    from rz.model_files import default_model_path

    return args.model if args.model else default_model_path()


def cmd_info(args) -> int:
    from rz.gguf import GGUFFile
    from rz.model_info import format_model_info, model_info

    info = model_info(GGUFFile(_model_path(args)))
    print(json.dumps(info, indent=2) if args.json else format_model_info(info))
    return 0


def cmd_tokenize(args) -> int:
    from rz.llm import LLM

    llm = LLM(_model_path(args))
    ids = llm.tokenize(args.text, add_bos=args.add_bos, special=args.special)
    if args.json:
        print(json.dumps({"ids": ids, "pieces": [llm.tokenizer.token_to_piece(i).decode("utf-8", "replace") for i in ids]}))
    else:
        print(" ".join(map(str, ids)))
    return 0


def _load(args):
    from rz.llm import LLM

    print(f"loading {args.model or 'the default model (Gemma 3 270M Q4_K_M)'} ...", file=sys.stderr, flush=True)
    llm = LLM(
        _model_path(args), n_ctx=args.n_ctx, cache_type_k=args.cache_type_k, cache_type_v=args.cache_type_v,
        tensor_parallel=args.tensor_parallel, draft_model=args.draft_model,
    )
    print(f"loaded in {llm.load_seconds:.1f} s", file=sys.stderr, flush=True)
    return llm


def _lead_or_follow(run):
    """A command that generates, run on the mesh --tensor-parallel and the process flags ask for:
    process 0 runs it (and lets the others go at the end); another process follows it (rz.multihost)."""

    def command(args) -> int:
        from rz import multihost

        process = start_devices(args)
        llm = _load(args)
        if process:
            multihost.follow(llm.model)
            return 0
        try:
            return run(args, llm)
        finally:
            multihost.close(llm.model)

    return command


# The request options that python -m rz generate and chat take as flags (--top-k for top_k), with
# RequestOptions' defaults; generate adds --stop and --ignore-eos.
_FLAG_OPTIONS = {
    "max_tokens": "tokens to generate at most",
    "temperature": "0 = greedy",
    "top_k": "0 = off",
    "top_p": "1 = off",
    "min_p": "0 = off",
    "repeat_penalty": "1 = off",
    "presence_penalty": None,
    "frequency_penalty": None,
    "penalty_last_n": "recent tokens the penalties look at",
    "seed": "default: a fresh random seed",
    "speculative": "draft tokens with this proposer (ngram: prompt lookup; self: the model's first layers; "
    "draft: --draft-model); "
    "the output is the same; default: off",
}
# The flags whose default (None) does not give their type.
_FLAG_TYPES = {"seed": int, "speculative": str}


def _sampling(args) -> dict:
    return {name: getattr(args, name) for name in _FLAG_OPTIONS if name != "max_tokens"}


@_lead_or_follow
def cmd_generate(args, llm) -> int:
    options = _sampling(args) | {"stop": args.stop or None, "ignore_eos": args.ignore_eos}
    if args.json:
        out = llm.generate(args.prompt, max_tokens=args.max_tokens, **options)
        print(json.dumps({
            "text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason,
            "usage": out.usage, "timings": out.timings,
        }))
        return 0
    for piece in llm.stream(args.prompt, max_tokens=args.max_tokens, **options):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


@_lead_or_follow
def cmd_chat(args, llm) -> int:
    from rz.chat import chat_loop

    if llm.chat_template_problem is not None:  # said before the first message, not after it
        raise ChatTemplateError(
            f"this model's chat template cannot render even a one-message chat: {llm.chat_template_problem} "
            "(`python -m rz generate` still works)"
        )

    def reply(messages):
        return llm.stream(llm.chat_prompt_ids(messages), max_tokens=args.max_tokens, **_sampling(args))

    return chat_loop(args.system, reply)


def _add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    _add_model_argument(parser)
    parser.add_argument("--n-ctx", type=int, default=None, help="context size (default: min(4096, the model's))")
    parser.add_argument(
        "--draft-model", metavar="PATH", default=None,
        help="a smaller GGUF with the model's vocabulary, for --speculative draft",
    )
    add_cache_type_arguments(parser)
    add_parallel_arguments(parser)
    for name, help_text in _FLAG_OPTIONS.items():
        default = FLAT_OPTIONS[name]
        parser.add_argument(
            f"--{name.replace('_', '-')}", type=_FLAG_TYPES.get(name, type(default)), default=default,
            help=help_text if default is None else f"{help_text + '; ' if help_text else ''}default: {default}",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rz", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="describe a GGUF model: architecture, sizes, quant types, tokenizer")
    _add_model_argument(info)
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(run=cmd_info)

    tokenize = commands.add_parser("tokenize", help="print the token ids of a text")
    _add_model_argument(tokenize)
    tokenize.add_argument("text")
    tokenize.add_argument("--special", action="store_true", help="parse control tokens written in the text")
    bos = tokenize.add_mutually_exclusive_group()
    bos.add_argument("--add-bos", dest="add_bos", action="store_true", default=None)
    bos.add_argument("--no-bos", dest="add_bos", action="store_false")
    tokenize.add_argument("--json", action="store_true", help="print ids and pieces as JSON")
    tokenize.set_defaults(run=cmd_tokenize)

    generate = commands.add_parser("generate", help="continue a prompt, streaming the text as it is produced")
    _add_generation_arguments(generate)
    generate.add_argument("prompt")
    generate.add_argument("--stop", action="append", help="stop string (repeatable)")
    generate.add_argument("--ignore-eos", action="store_true")
    generate.add_argument("--json", action="store_true", help="print one JSON object at the end")
    generate.set_defaults(run=cmd_generate)

    chat = commands.add_parser("chat", help="an interactive chat using the model's chat template")
    _add_generation_arguments(chat)
    chat.add_argument("--system", help="a system message")
    chat.set_defaults(run=cmd_chat)

    add_server_commands(commands)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except RzError as error:
        print(f"rz: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
