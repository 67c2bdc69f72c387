"""The warm-up: the compiled steps' shapes, run once with tiny requests so that no later request
waits for a compilation. A server runs the units a first short request needs before it reports
SERVING and the others while idle (rz.server.scheduler.EngineLoop); rz.LLM.warm_up runs them all.
"""

import collections
from typing import Callable

from rz.engine import Engine
from rz.generation import GenerationRequest
from rz.request import RequestOptions, SamplingParams
from rz.scheduler import Scheduler


def warm_up(engine: Engine) -> None:
    """Compile every step before serving, so that no request waits for a compilation (see warm_up_units)."""
    scheduler = Scheduler(engine)
    for unit in warm_up_units(engine):
        unit(scheduler)


WarmUpUnit = Callable[[Scheduler], None]
# Every warm-up prompt is made of this token, so that its blocks can be told from requests' (a
# request's prompt starts with a BOS or a chat template's first token, seldom with token 0).
WARM_UP_TOKEN = 0


def warm_up_units(engine: Engine) -> list[WarmUpUnit]:
    """The warm-up as units of work on a scheduler, each a few requests run to their end, in the
    order serving is likely to meet the shapes they compile. The first FIRST_REQUEST_UNITS are what
    a short greedy request needs; a server runs those before it reports SERVING and the rest while
    it is idle (EngineLoop), so it starts in seconds rather than after every shape.

    The units cover the prefill (a chunk, the first token) of each context bucket's chunk length,
    with and without a reused prefix, the copy of a block that holds a prompt's next tokens
    among others', and the decode step of each batch bucket (token masks and log-probabilities
    are run-time branches of the same step); and with a default proposer (rz serve --speculative),
    its verify calls of each width, greedy. The vocabulary that llguidance compiles structured
    output against is left to the first constrained request: it takes seconds and a hundred MiB
    for a large vocabulary, which a server that never sees one should not hold.

    Each bucket is compiled with a one-token prompt in that bucket's chunks (the scheduler's
    `context`), not with a prompt of the bucket's length: that would spend most of the warm-up
    prefilling prompts nobody asked for.
    """
    greedy = SamplingParams(temperature=0.0)

    def options(params: SamplingParams) -> RequestOptions:
        return RequestOptions(max_tokens=2, sampling=params, ignore_eos=True)

    def prefill(context: int, prompt_ids: tuple[int, ...]) -> WarmUpUnit:
        request = GenerationRequest(prompt_ids=prompt_ids, options=options(greedy))

        def run(scheduler: Scheduler) -> None:
            scheduler.add(request, context=context)
            collections.deque(scheduler.drain(), maxlen=0)
        return run

    def prefills(context: int) -> list[WarmUpUnit]:
        # The second prompt starts with the first, whose KV its slot still holds: the reuse path
        # (the row's copy and a tail chunk) of the same bucket.
        return [prefill(context, (WARM_UP_TOKEN,)), prefill(context, (WARM_UP_TOKEN,) * 2)]

    def decode(rows: int, request_options: RequestOptions) -> WarmUpUnit:
        def run(scheduler: Scheduler) -> None:
            for _ in range(rows):
                scheduler.add(GenerationRequest(prompt_ids=(WARM_UP_TOKEN,), options=request_options))
            collections.deque(scheduler.drain(), maxlen=0)
        return run

    smallest, *larger = engine.buckets.context
    first, *more_rows = engine.batch_sizes
    fresh, reused = prefills(smallest)
    units = [fresh, decode(first, options(greedy)), reused]
    units += [decode(rows, options(greedy)) for rows in more_rows]
    units += [unit for context in larger for unit in prefills(context)]
    units.append(lambda scheduler: scheduler.engine.compile_block_copy())
    if engine.speculative is not None:
        units += [speculation(rows) for rows in engine.batch_sizes]
    # The warm-up's prompts are nobody's: their blocks go back first in line for the free list,
    # not into the prefix cache, where they would keep pages resident that requests could reuse.
    # Requests a server ran between the units keep theirs.
    units.append(lambda scheduler: scheduler.engine.blocks.forget_prompts_starting((WARM_UP_TOKEN,)))
    return units


def speculation(rows: int) -> WarmUpUnit:
    """The verify calls (and draft calls) a batch of `rows` speculating with the engine's default proposer runs."""
    def run(scheduler: Scheduler) -> None:
        scheduler.engine.compile_speculation(rows)
    return run


# warm_up_units' first units: a short greedy request's prefill and its one-row decode.
FIRST_REQUEST_UNITS = 2
