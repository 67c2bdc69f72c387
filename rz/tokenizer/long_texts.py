"""Long texts (over LONG_TEXT_CHARS characters) tokenized in a child process, one at a time.

Merging a long text is seconds of pure Python at about 100 bytes per character. In the server's
process it would hold the GIL the engine loop needs (an unrelated request ran 2.4-2.8x slower
beside 1 MB texts even from a nice-19 thread) and leave its memory in the server's arenas. So one
child process per parent (rz.tokenizer.long_text_child, which imports rz.tokenizer, not JAX)
encodes them at nice 19: it starts on the first long text, gets each vocabulary once, and stays.

- Texts take turns; at most WAITING_LIMIT wait behind the one being encoded, and more at once is
  TokenizerBusyError (gRPC RESOURCE_EXHAUSTED), so they cannot hold every request thread.
- A text whose caller is gone (`dropped_when`) leaves the queue, or, when it is being encoded, the
  child is killed (a later text starts a new one): CallerGoneError.
- LONG_TEXTS.drop_all() (at shutdown) does the same to every text: ShuttingDownError.
"""

import contextlib
import contextvars
import select
import subprocess
import sys
import threading
from collections import OrderedDict, deque
from pathlib import Path

from rz.errors import CallerGoneError, ShuttingDownError, TokenizerBusyError, TokenizerError
from rz.tokenizer import long_text_child

LONG_TEXT_CHARS = 64 << 10
WAITING_LIMIT = 16
_TOKENIZERS_KEPT = 2  # vocabularies the child holds at once (a server has one)
_POLL_SECONDS = 0.05  # how often a waiting or running text looks whether it was dropped
# The child's entry point, with the directory holding this rz package, not the current one, first
# on the module path (a module in the current directory could shadow one of rz's).
_RUN_CHILD = "import sys; sys.path[0] = sys.argv[1]; from rz.tokenizer.long_text_child import main; main()"
_RZ_PARENT = str(Path(__file__).resolve().parents[2])

_caller_gone: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar("rz_long_text_caller_gone", default=None)


@contextlib.contextmanager
def dropped_when(gone: threading.Event):
    """Within the block, a long text being tokenized or waiting is dropped once `gone` is set (its
    caller left): the call raises CallerGoneError."""
    token = _caller_gone.set(gone)
    try:
        yield
    finally:
        _caller_gone.reset(token)


class LongTextEncoder:
    """Encodes texts in the child process, one at a time, at most waiting_limit more waiting; thread-safe."""

    def __init__(self, waiting_limit: int = WAITING_LIMIT):
        self.waiting_limit = waiting_limit
        self._turns = threading.Condition()
        self._queue: deque[object] = deque()  # the text being encoded first, then those waiting
        self._drops = 0  # drop_all() calls so far: a text submitted before the latest is dropped
        self._child: subprocess.Popen | None = None
        self._loaded: OrderedDict[int, None] = OrderedDict()  # the tokenizer keys the child holds

    def encode(self, key: int, vocab, text: str, add_bos: bool | None, special: bool) -> list[int]:
        """Tokenizer(vocab).encode(text, add_bos, special), computed in the child (key names the vocabulary)."""
        gone, turn = _caller_gone.get(), object()
        with self._turns:
            if len(self._queue) > self.waiting_limit:
                raise TokenizerBusyError(
                    f"{self.waiting_limit} long texts (over {LONG_TEXT_CHARS} characters) are already waiting to be "
                    "tokenized; retry later"
                )
            drops = self._drops
            self._queue.append(turn)
            try:
                while self._queue[0] is not turn:
                    self._check_dropped(gone, drops)
                    self._turns.wait(_POLL_SECONDS)
            except BaseException:
                self._queue.remove(turn)
                self._turns.notify_all()
                raise
        try:
            return self._exchange(key, vocab, text, add_bos, special, lambda: self._check_dropped(gone, drops))
        finally:
            with self._turns:
                self._queue.popleft()
                self._turns.notify_all()

    def drop_all(self) -> None:
        """Drop every text submitted so far, waiting or being encoded (their callers get
        ShuttingDownError), for a process that is shutting down; later texts are encoded again."""
        with self._turns:
            self._drops += 1
            self._turns.notify_all()

    def close(self) -> None:
        """Stop the child (a later text starts a new one), while no text is being encoded."""
        with self._turns:
            self._stop_child()

    def child_pid(self) -> int | None:
        """The child's process id, while it runs."""
        child = self._child
        return child.pid if child is not None and child.poll() is None else None

    def _check_dropped(self, gone: threading.Event | None, drops: int) -> None:
        if self._drops != drops:
            raise ShuttingDownError("the process is shutting down: the long texts waiting to be tokenized were dropped")
        if gone is not None and gone.is_set():
            raise CallerGoneError("the caller left: its long text was not tokenized")

    def _exchange(self, key, vocab, text, add_bos, special, check_dropped) -> list[int]:
        child = self._running_child()
        try:
            if key not in self._loaded:
                if len(self._loaded) >= _TOKENIZERS_KEPT:
                    long_text_child.write_frame(child.stdin, ("forget", self._loaded.popitem(last=False)[0]))
                long_text_child.write_frame(child.stdin, ("tokenizer", key, vocab))
                self._loaded[key] = None
            long_text_child.write_frame(child.stdin, ("encode", key, text, add_bos, special))
            while not select.select([child.stdout], [], [], _POLL_SECONDS)[0]:
                check_dropped()
            answer = long_text_child.read_frame(child.stdout)
        except BaseException:
            self._stop_child()  # dropped mid-text, or the pipe broke: the child's state is unknown
            raise
        if answer is None:
            self._stop_child()
            raise TokenizerError("the long-text tokenizer process died before it answered")
        kind, value = answer
        if kind == "error":
            raise value
        return value.tolist()

    def _running_child(self) -> subprocess.Popen:
        if self._child is not None and self._child.poll() is None:
            return self._child
        self._stop_child()
        self._child = subprocess.Popen(
            [sys.executable, "-c", _RUN_CHILD, _RZ_PARENT],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )
        return self._child

    def _stop_child(self) -> None:
        if self._child is not None:
            self._child.kill()
            self._child.wait()
            with contextlib.suppress(OSError):  # a write the child never read stays buffered
                self._child.stdin.close()
            self._child.stdout.close()
            self._child = None
        self._loaded.clear()


LONG_TEXTS = LongTextEncoder()  # the process's: every tokenizer's long texts take turns here
