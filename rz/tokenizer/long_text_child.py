"""The long-text tokenizer's child process (rz.tokenizer.long_texts starts it and explains why):
reads framed requests from stdin, answers each on stdout.

Requests: ("tokenizer", key, vocab) holds a vocabulary's tokenizer under key (once per child),
("forget", key) drops it, ("encode", key, text, add_bos, special) answers ("ids", array of ids) or
("error", the TokenizerError raised). It imports rz.tokenizer, not JAX.
"""

import os
import pickle
import struct
import sys

_LENGTH = struct.Struct("<Q")


def write_frame(stream, message) -> None:
    """One message, pickled and length-prefixed (both ends are this file's code: nothing untrusted is unpickled)."""
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_LENGTH.pack(len(payload)) + payload)
    stream.flush()


def read_frame(stream):
    """The next message, or None at the end of the stream."""
    header = stream.read(_LENGTH.size)
    if len(header) < _LENGTH.size:
        return None
    payload = stream.read(_LENGTH.unpack(header)[0])
    return pickle.loads(payload)


def serve(requests, answers) -> None:
    """Answer requests until the parent closes the stream."""
    from array import array

    from rz.errors import TokenizerError
    from rz.host_memory import return_free_pages
    from rz.tokenizer.tokenizer import Tokenizer

    tokenizers = {}
    while (request := read_frame(requests)) is not None:
        kind, key, *rest = request
        if kind == "tokenizer":
            tokenizers[key] = Tokenizer(rest[0])
        elif kind == "forget":
            tokenizers.pop(key, None)
        else:
            text, add_bos, special = rest
            try:
                answer = ("ids", array("l", tokenizers[key].encode_here(text, add_bos, special)))
            except TokenizerError as error:
                answer = ("error", error)
            del text
            return_free_pages()
            write_frame(answers, answer)


def main() -> None:
    """The child's entry point: lowest CPU priority, framed requests on stdin, answers on stdout."""
    os.nice(19)
    # Answers go to a private copy of stdout; anything printed (a warning) goes to stderr instead.
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    serve(sys.stdin.buffer, answers)
