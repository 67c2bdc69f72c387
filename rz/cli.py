"""The command line: python -m rz {info,tokenize,...}."""

import argparse
import json
import sys

from rz.errors import RzError


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
