"""A fake of rz.engine.Engine's protocol, without a model: every slot samples token 7 ("x") at every
step; decode calls wait for `go`, prompt chunks take `prefill_seconds`, and a log records the order."""

import threading
import time
from types import SimpleNamespace

import numpy as np

from rz.engine import Admission
from rz.generation import Generation, GenerationRequest, Timings
from rz.sampling import SampledTokens
from rz.stopping import StopStringMatcher

FAIL_ADMIT = 13  # a prompt starting with this token fails in prefill
CHUNK = 3  # prompt tokens per prefill chunk
# Every row of every step samples token 7.
SEVENS = SampledTokens(tokens=np.full(8, 7), logprobs=np.zeros(8), top_ids=np.zeros((8, 0)), top_logprobs=np.zeros((8, 0)))


class FakeDecoder:
    """Every token reads "x"."""

    def add(self, token_id: int) -> str:
        return "x"

    def flush(self) -> str:
        return ""


class FakeEngine:
    """Engine's slot protocol without a model: one token "x" per slot per step; steps wait for `go`."""

    eog_ids = frozenset()

    def __init__(self, n_slots: int):
        self.n_slots, self.n_ctx = n_slots, 64
        self.plan = SimpleNamespace(pool_tokens=n_slots * self.n_ctx)  # rz.kv_blocks.BlockPlan's
        self.slots: list[Generation | None] = [None] * n_slots
        self.go = threading.Semaphore(0)  # one release per step allowed to run
        self.fail_next_step = False
        self.prefill_seconds = 0.0  # how long each prompt chunk takes
        self.log: list[str] = []  # "chunk", "admit" (a request into its slot) and "step", in order

    def free_slots(self) -> int:
        return self.slots.count(None)

    def active(self) -> list[Generation]:
        return [s for s in self.slots if s is not None]

    def new_sequence(self, request: GenerationRequest, queued_at: float) -> Generation:
        return Generation(request, decoder=FakeDecoder(), matcher=StopStringMatcher(()), timings=Timings(queued_at=queued_at))

    def begin_admission(self, sequence: Generation, context: int | None = None) -> Admission:
        n_chunks = max(1, len(sequence.request.prompt_ids) // CHUNK)
        return Admission(sequence, chunks=tuple((CHUNK * i, CHUNK) for i in range(n_chunks)), logits=0)

    def prefill_chunk(self, admission: Admission) -> None:
        time.sleep(self.prefill_seconds)
        self.log.append("chunk")
        admission.n_done += 1

    def complete_admission(self, admission: Admission):
        self.log.append("admit")
        sequence = admission.sequence
        sequence.slot = self.slots.index(None)
        self.slots[sequence.slot] = sequence
        if sequence.request.prompt_ids[0] == FAIL_ADMIT:
            raise RuntimeError("prefill exploded")
        return sequence, SEVENS, sequence.slot

    def decode(self):
        self.go.acquire()
        self.log.append("step")
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("decode exploded")
        return [(s, SEVENS, s.slot) for s in self.active()]

    def release(self, sequence: Generation) -> None:
        if 0 <= sequence.slot < self.n_slots and self.slots[sequence.slot] is sequence:
            self.slots[sequence.slot] = None
