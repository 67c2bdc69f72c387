"""Stop strings on the host: streamed text is cut before the earliest stop, and no part of a stop leaks.

Stop token ids (EOS, end-of-turn) are the engine's to check on the sampled ids; this module
handles only the text-level stops a request names, the way llama.cpp's server and
llama-cpp-python do: the output ends just before the first occurrence of any stop string, and
while a stop might still be forming, the text that could begin it is held back.

The stops are compiled into an Aho-Corasick automaton, so each generated character costs the
same whatever the number and length of the stops (llama-server instead scans every stop string at
every token, which made 1,000 stops of 1,000 characters cost 0.2 s per token). Building the
automaton costs memory per character of the stops, so a request may name at most MAX_STOPS stop
strings of at most MAX_STOP_CHARS characters each. llama-server and vLLM set no such limit;
OpenAI's and Mistral's APIs accept 4 stops.
"""

from typing import Sequence

from rz.errors import RequestError

MAX_STOPS = 16
MAX_STOP_CHARS = 256


def validate_stops(stops: str | Sequence[str] | None) -> tuple[str, ...]:
    """A request's `stop` (one string, a list of them, or None) as a tuple of distinct non-empty strings."""
    if stops is None:
        return ()
    if isinstance(stops, str):
        stops = [stops]
    if not isinstance(stops, (list, tuple)):
        raise RequestError(f"stop must be a string or a list of strings, got {type(stops).__name__}")
    for stop in stops:
        if not isinstance(stop, str):
            raise RequestError(f"every stop must be a string, got {stop!r}")
        if not stop:
            raise RequestError("a stop string must not be empty")
        if len(stop) > MAX_STOP_CHARS:
            raise RequestError(f"a stop string is {len(stop)} characters, over the limit of {MAX_STOP_CHARS}")
    distinct = tuple(dict.fromkeys(stops))
    if len(distinct) > MAX_STOPS:
        raise RequestError(f"{len(distinct)} stop strings is over the limit of {MAX_STOPS}")
    return distinct


class _Automaton:
    """Aho-Corasick over the stops' characters. Node 0 is the root; a node stands for the string
    spelled on the way to it, and every node is a prefix of some stop."""

    def __init__(self, stops: tuple[str, ...]):
        self.goto: list[dict[str, int]] = [{}]
        self.depth = [0]
        stop_ends = set()
        for stop in stops:
            node = 0
            for char in stop:
                if char not in self.goto[node]:
                    self.goto[node][char] = len(self.goto)
                    self.goto.append({})
                    self.depth.append(self.depth[node] + 1)
                node = self.goto[node][char]
            stop_ends.add(node)
        # fail[n]: the node of the longest proper suffix of n's string that is also a node.
        # match[n]: the length of the longest stop that is a suffix of n's string (0: none).
        self.fail = [0] * len(self.goto)
        self.match = [0] * len(self.goto)
        queue = list(self.goto[0].values())
        for node in queue:  # breadth first: a node's fail link is set before it is reached
            self.match[node] = self.depth[node] if node in stop_ends else self.match[self.fail[node]]
            for char, child in self.goto[node].items():
                self.fail[child] = self.step(self.fail[node], char) if node else 0
                queue.append(child)

    def step(self, node: int, char: str) -> int:
        while node and char not in self.goto[node]:
            node = self.fail[node]
        return self.goto[node].get(char, 0)


class StopStringMatcher:
    """Streams text through, holding back any tail that could be the start of a stop string.

    feed() returns the text that is safe to emit and whether a stop was reached; once it has,
    everything after is dropped. flush() releases the held-back tail when generation ends
    for another reason (EOS, max_tokens).
    """

    def __init__(self, stops: str | Sequence[str] | None):
        self.stops = validate_stops(stops)
        self._automaton = _Automaton(self.stops)
        # The automaton's node after all text fed so far: the held-back tail is its string.
        self._node = 0
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> tuple[str, bool]:
        """Add generated text; returns (text safe to emit now, whether a stop string was reached)."""
        if self.stopped:
            return "", True
        pending = self._held + text
        automaton, node, cut = self._automaton, self._node, None
        # Everything emitted before was checked not to start any stop, so a match starts within
        # `pending`; of the matches completing in this piece of text, the earliest start wins.
        for end, char in enumerate(text, start=len(self._held) + 1):
            node = automaton.step(node, char)
            if automaton.match[node]:
                start = end - automaton.match[node]
                cut = start if cut is None else min(cut, start)
        if cut is not None:
            self._held = ""
            self.stopped = True
            return pending[:cut], True
        self._node = node
        held = automaton.depth[node]
        self._held = pending[len(pending) - held :] if held else ""
        return pending[: len(pending) - held], False

    def flush(self) -> str:
        """The held-back text, when generation ended without reaching a stop."""
        held, self._held, self._node = self._held, "", 0
        return held
