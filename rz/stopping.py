"""Stop strings on the host: streamed text is cut before the earliest stop, and no part of a stop leaks.

Stop token ids (EOS, end-of-turn) are the engine's to check on the sampled ids; this module
handles only the text-level stops a request names, the way llama.cpp's server and
llama-cpp-python do: the output ends just before the first occurrence of any stop string, and
while a stop might still be forming, the text that could begin it is held back.
"""

from typing import Sequence

from rz.errors import RequestError


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
    return tuple(dict.fromkeys(stops))


class StopStringMatcher:
    """Streams text through, holding back any tail that could be the start of a stop string.

    feed() returns the text that is safe to emit and whether a stop was reached; once it has,
    everything after is dropped. flush() releases the held-back tail when generation ends
    for another reason (EOS, max_tokens).
    """

    def __init__(self, stops: str | Sequence[str] | None):
        self.stops = validate_stops(stops)
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> tuple[str, bool]:
        """Add generated text; returns (text safe to emit now, whether a stop string was reached)."""
        if self.stopped:
            return "", True
        pending = self._held + text
        # Everything emitted before was checked not to start any stop, so only `pending` can
        # contain the beginning of a match.
        matches = [index for index in (pending.find(stop) for stop in self.stops) if index >= 0]
        if matches:
            self._held = ""
            self.stopped = True
            return pending[: min(matches)], True
        held = self._longest_partial_stop(pending)
        self._held = pending[len(pending) - held :] if held else ""
        return pending[: len(pending) - held], False

    def flush(self) -> str:
        """The held-back text, when generation ended without reaching a stop."""
        held, self._held = self._held, ""
        return held

    def _longest_partial_stop(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop."""
        longest = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:length]):
                    longest = length
                    break
        return longest
