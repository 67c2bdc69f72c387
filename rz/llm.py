"""rz.LLM: the object users hold — a loaded model, its tokenizer, and generation."""

import dataclasses
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from rz.compilation_cache import enable_compilation_cache
from rz.config import ModelConfig
from rz.engine import Engine
from rz.errors import ChatTemplateError, RequestError
from rz.generation import Generation, GenerationRequest
from rz.gguf import GGUFFile
from rz.host_memory import return_free_pages_after_compiles, share_one_arena
from rz.kv_cache import CacheTypes
from rz.model_files import default_model_path
from rz.request import Completion, RequestOptions
from rz.scheduler import Scheduler
from rz.speculative import check_draft_vocabulary, choose_self_draft_layers

DEFAULT_N_CTX = 4096
DEFAULT_MAX_BATCH = 16


class LLM:
    """A GGUF model loaded for tokenizing, scoring and generating.

    >>> llm = rz.LLM()                      # Gemma 3 270M Q4_K_M, the default model
    >>> llm.generate("Once upon a time", max_tokens=32, temperature=0).text
    """

    def __init__(
        self,
        path: str | Path | None = None,
        n_ctx: int | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
        compilation_cache: str | Path | None | bool = True,
        cache_type_k: str = CacheTypes.k,
        cache_type_v: str = CacheTypes.v,
        tensor_parallel: int = 1,
        data_parallel: int = 1,
        self_draft_layers: int | None = None,
        draft_model: str | Path | None = None,
        kv_cache_tokens: int | None = None,
    ):
        started = time.perf_counter()
        # How the KV cache stores keys and values (llama.cpp's names: f32, f16, bf16, q8_0).
        self.cache_types = CacheTypes(cache_type_k, cache_type_v)
        # The KV cache's pool of positions, shared by the sequences running at once (rz.kv_blocks);
        # None: max_batch full contexts, or what half the free memory holds.
        self.kv_cache_tokens = kv_cache_tokens
        share_one_arena()
        enable_compilation_cache(compilation_cache)
        return_free_pages_after_compiles()
        self.path = Path(path) if path is not None else default_model_path()
        self.gguf = GGUFFile(self.path)
        config = ModelConfig.from_gguf(self.gguf)
        if n_ctx is not None and (isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 1):
            raise RequestError(f"n_ctx must be a positive integer, got {n_ctx!r}")
        self.n_ctx = min(n_ctx or DEFAULT_N_CTX, config.context_length)
        # The layers speculative="self" drafts with (rz.speculative); None: its default share.
        if self_draft_layers is not None:
            try:
                choose_self_draft_layers(config.n_layer, self_draft_layers)
            except ValueError as error:
                raise RequestError(str(error)) from None
        self.self_draft_layers = self_draft_layers
        self.config = config.for_context(self.n_ctx)
        from rz.chat import chat_template_problem
        from rz.models import load_model, load_replicas
        from rz.tokenizer import Tokenizer

        self.tokenizer = Tokenizer.from_gguf_metadata(self.gguf.metadata)
        # Checked at load: a chat template broken for every chat is reported by chat() at once,
        # before any request, and does not get in the way of completions.
        self.chat_template_problem: str | None = chat_template_problem(
            self.config.chat_template,
            self._token_text(self.tokenizer.bos_id),
            self._token_text(self.tokenizer.eos_id),
            self.config.architecture,
        )
        # Split over this many devices (rz.sharding), after checking that the model's shapes divide;
        # with data parallelism, one copy per group of devices, each for an engine of a server
        # (rz.server.scheduler.EngineLoop): this object's own generation runs on the first.
        if data_parallel != 1:
            self.replicas = tuple(load_replicas(self.gguf, self.config, tensor_parallel, data_parallel))
        else:
            self.replicas = (load_model(self.gguf, self.config, tensor_parallel),)
        self.model = self.replicas[0]
        self.gguf.release_pages()
        # The `draft` proposer's model: a second GGUF with this one's vocabulary (rz.speculative).
        self.draft_model = self._load_draft_model(Path(draft_model), tensor_parallel, data_parallel) if draft_model else None
        self.max_batch = max_batch
        # One engine at a time, sized for the largest batch asked for so far: each engine holds a
        # KV cache of n_slots x n_ctx and its own compiled steps, so keeping one per batch size
        # would hold several caches and several copies of every executable.
        self._current: Engine | None = None
        self._current_scheduler: Scheduler | None = None
        self._retired_compilations: dict[str, float] = {}
        self.load_seconds = time.perf_counter() - started

    def _load_draft_model(self, path: Path, tensor_parallel: int, data_parallel: int):
        from rz.models import load_model
        from rz.tokenizer import Tokenizer

        if tensor_parallel != 1 or data_parallel != 1:
            raise RequestError("a draft model runs on one device: load it without tensor_parallel or data_parallel")
        gguf = GGUFFile(path)
        try:
            check_draft_vocabulary(self.tokenizer.vocab.tokens, Tokenizer.from_gguf_metadata(gguf.metadata).vocab.tokens)
        except ValueError as error:
            raise RequestError(f"{path}: {error}") from None
        model = load_model(gguf, ModelConfig.from_gguf(gguf).for_context(self.n_ctx))
        if model.cfg.n_vocab != self.model.cfg.n_vocab:
            raise RequestError(
                f"{path}: the draft model's output head scores {model.cfg.n_vocab:,} tokens, the model's "
                f"{self.model.cfg.n_vocab:,}: a draft model must share the model's vocabulary"
            )
        gguf.release_pages()
        return model

    # ----- tokens -----

    def tokenize(self, text: str, add_bos: bool | None = None, special: bool = False) -> list[int]:
        """Token ids of text, exactly as llama.cpp gives them; add_bos=None follows the model."""
        return self.tokenizer.encode(text, add_bos=add_bos, special=special)

    def detokenize(self, ids: Sequence[int]) -> str:
        """The text of a sequence of token ids."""
        return self.tokenizer.decode(ids)

    # ----- forward passes -----

    def score(self, ids: Sequence[int]) -> np.ndarray:
        """Next-token logits at every position, teacher-forced: f32 [len(ids), vocab]."""
        return self._scheduler(1).engine.score(list(ids))

    def generate(
        self,
        prompt: str | Sequence[int] | Sequence[str] | Sequence[Sequence[int]],
        max_tokens: int = RequestOptions.max_tokens,
        **options,
    ) -> Completion | list[Completion]:
        """Generate a continuation of one prompt, or of a list of prompts decoded together as one batch.

        A prompt is text or a list of token ids. The options are rz.request.FLAT_OPTIONS: temperature,
        top_k, top_p, min_p, repeat_penalty, presence_penalty, frequency_penalty, penalty_last_n, seed,
        stop, stop_token_ids, ignore_eos, logprobs, logit_bias ({token id: bias}, added to the logits);
        they default to llama.cpp's, and temperature=0 is greedy.
        speculative="ngram" drafts tokens by prompt lookup, "self" with the model's own first layers
        (self_draft_layers), "draft" with a second model of the same vocabulary (draft_model), and
        verifies several in one step (rz.speculative): the same output (greedy: the same tokens;
        sampled: the same distribution), sooner where drafts are kept.
        """
        prompts, single = _as_prompt_list(prompt)
        request_options = RequestOptions.from_flat(max_tokens=max_tokens, **options)
        completions = self._run([self._request(p, request_options) for p in prompts])
        return completions[0] if single else completions

    def stream(self, prompt: str | Sequence[int], max_tokens: int = RequestOptions.max_tokens, **options) -> Iterator[str]:
        """Generate like generate() (the same options), yielding text pieces as they are produced."""
        prompts, single = _as_prompt_list(prompt)
        if not single:
            raise RequestError("stream() takes one prompt; use generate() for a batch")
        request = self._request(prompts[0], RequestOptions.from_flat(max_tokens=max_tokens, **options))
        scheduler = self._scheduler(1)
        sequence = scheduler.add(request)
        try:
            for event in scheduler.drain():
                if event.text:
                    yield event.text
        finally:
            # A consumer that stops reading early must not leave its sequence holding the slot.
            scheduler.cancel(sequence)

    def chat(
        self,
        messages: list[dict],
        max_tokens: int = RequestOptions.max_tokens,
        enable_thinking: bool | None = None,
        tools: list[dict] | None = None,
        tool_choice: str | dict | None = None,
        **options,
    ) -> Completion:
        """Answer a conversation, formatted with the model's chat template as llama.cpp does
        (enable_thinking: see rz.chat.render_chat).

        tools and tool_choice are OpenAI's (rz.tools): the tools go into the prompt, and the calls
        the model makes come back parsed in tool_calls (OpenAI's entries; the text keeps what is
        outside them, and finish_reason stays the engine's). tool_choice "required" or a named
        function holds the answer to one call whose arguments validate against its parameters.

        ChatTemplateError if the model's template cannot render even a one-message chat (found
        at load: chat_template_problem says why); generate() works all the same.
        """
        from rz.tools import parse_tool_calls

        prompt_ids, functions, options = self._chat_request(messages, enable_thinking, tools, tool_choice, options)
        completion = self.generate(prompt_ids, max_tokens=max_tokens, **options)
        if not functions:
            return completion
        content, calls = parse_tool_calls(completion.text)
        return dataclasses.replace(completion, text=content if calls else completion.text,
                                   tool_calls=[call.as_openai() for call in calls])

    def chat_stream(
        self,
        messages: list[dict],
        max_tokens: int = RequestOptions.max_tokens,
        enable_thinking: bool | None = None,
        tools: list[dict] | None = None,
        tool_choice: str | dict | None = None,
        **options,
    ) -> Iterator[str | list[dict]]:
        """Answer like chat() (the same arguments), yielding text pieces as they are produced.

        With tools offered, text that may begin a call is held back until the answer ends; then
        what was not a call comes as text, and the calls, if any, as the last item: a list of
        OpenAI's tool_calls entries (as in chat()'s Completion.tool_calls).
        """
        from rz.tools import ToolCallStream

        prompt_ids, functions, options = self._chat_request(messages, enable_thinking, tools, tool_choice, options)
        pieces = self.stream(prompt_ids, max_tokens=max_tokens, **options)
        held = ToolCallStream() if functions else None
        try:
            for piece in pieces:
                text = held.feed(piece) if held is not None else piece
                if text:
                    yield text
        finally:
            pieces.close()  # a consumer that stops early frees the slot now
        if held is not None:
            tail, calls = held.finish()
            if tail:
                yield tail
            if calls:
                yield [call.as_openai() for call in calls]

    def _chat_request(self, messages, enable_thinking, tools, tool_choice, options: dict) -> tuple[list[int], list[dict], dict]:
        """A chat's prompt ids, the functions offered in it, and its options with a forced call's grammar (rz.tools)."""
        from rz.tools import offered_functions, with_call_constraint

        functions, forced = offered_functions(tools, tool_choice)
        prompt_ids = self.chat_prompt_ids(messages, enable_thinking, functions)
        return prompt_ids, functions, with_call_constraint(options, forced)

    def chat_prompt_ids(
        self, messages: list[dict], enable_thinking: bool | None = None, functions: list[dict] | None = None
    ) -> list[int]:
        """The token ids of a conversation rendered by the model's chat template, ready to answer.

        enable_thinking: see rz.chat.render_chat. functions (rz.tools.functions_of's) are offered as
        tools: handed to a template that renders tools, else described in the system message (rz.tools).
        """
        from rz.chat import render_chat
        from rz.tools import template_takes_tools, with_tool_prompt

        if self.chat_template_problem is not None:
            raise ChatTemplateError(
                "this model's chat template cannot render even a one-message chat, so chat is unavailable "
                f"(plain completions still work): {self.chat_template_problem}"
            )
        tools = None
        if functions and template_takes_tools(self.config.chat_template):
            tools = [{"type": "function", "function": function} for function in functions]
        elif functions:
            messages = with_tool_prompt(messages, functions)
        text = render_chat(
            self.config.chat_template,
            messages,
            bos_token=self._token_text(self.tokenizer.bos_id),
            eos_token=self._token_text(self.tokenizer.eos_id),
            add_generation_prompt=True,
            architecture=self.config.architecture,
            tools=tools,
            enable_thinking=enable_thinking,
        )
        ids = self.tokenize(text, special=True)
        # Templates that write the BOS token themselves would get a second one from add_bos.
        if len(ids) > 1 and ids[0] == ids[1] == self.tokenizer.bos_id:
            ids = ids[1:]
        return ids

    # ----- internals -----

    def _token_text(self, token_id: int | None) -> str:
        tokens = self.gguf.metadata["tokenizer.ggml.tokens"]
        return tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else ""

    def _request(self, prompt: str | Sequence[int], options: RequestOptions) -> GenerationRequest:
        if isinstance(prompt, str) and not prompt:
            raise RequestError("the prompt is empty: give at least one character of text")
        ids = self.tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        request = GenerationRequest(prompt_ids=tuple(ids), options=options)
        self._scheduler(1).engine.validate(request)
        return request

    def _scheduler(self, n_sequences: int) -> Scheduler:
        """A scheduler over an engine with at least the batch bucket of n_sequences slots (up to max_batch).

        A larger batch than the current engine holds replaces it (its cache is freed first); a smaller one runs on the first slots of the current engine, whose decode step
        is compiled per batch bucket anyway.
        """
        n_slots = 1
        while n_slots < min(n_sequences, self.max_batch):
            n_slots *= 2
        if self._current is None or self._current.n_slots < n_slots:
            if self._current is not None:
                self._retired_compilations.update(self._current.compilations)
                # Dropped (and so freed, cache and all) before the larger cache is allocated.
                self._current = self._current_scheduler = None
            self._current = Engine(
                self.model, self.tokenizer, self.n_ctx, n_slots, cache_types=self.cache_types, kv_cache_tokens=self.kv_cache_tokens,
                self_draft_layers=self.self_draft_layers, draft_model=self.draft_model,
            )
            self._current_scheduler = Scheduler(self._current)
        return self._current_scheduler

    def _run(self, requests: list[GenerationRequest]) -> list[Completion]:
        scheduler = self._scheduler(len(requests))
        queued_at = time.perf_counter()
        sequences = [scheduler.add(request, queued_at=queued_at) for request in requests]
        try:
            for _ in scheduler.drain():
                pass
        finally:
            # An interrupted batch (an error, Ctrl-C) must leave the engine's slots free.
            for sequence in sequences:
                scheduler.cancel(sequence)
        return [_completion(sequence) for sequence in sequences]

    def warm_up(self, n_sequences: int = 1) -> None:
        """Compile every step a session of up to n_sequences sequences at once meets (each context
        bucket, batch size, log-probabilities, structured output), as `rz serve` does at start, so
        that no later call waits for a compilation."""
        from rz.warm_up import warm_up

        warm_up(self._scheduler(n_sequences).engine)

    def compiled_variants(self) -> int:
        """How many shape variants of compiled steps this LLM holds; constant once warm."""
        return self._current.compiled_variants() if self._current is not None else 0

    @property
    def compilations(self) -> dict[str, float]:
        """Seconds the first call of each compiled step took, by step and shape bucket."""
        return self._retired_compilations | (self._current.compilations if self._current is not None else {})

    def __repr__(self) -> str:
        return f"rz.LLM({str(self.path)!r}, architecture={self.config.architecture!r}, n_ctx={self.n_ctx})"


def _as_prompt_list(prompt) -> tuple[list, bool]:
    """(prompts, whether a single prompt was given): text, token ids, or a list of either."""
    if isinstance(prompt, str):
        return [prompt], True
    if isinstance(prompt, np.ndarray):
        prompt = prompt.tolist()
    if not isinstance(prompt, (list, tuple)):
        raise RequestError(f"a prompt is text or a list of token ids, got {type(prompt).__name__}")
    if prompt and all(isinstance(p, (int, np.integer)) and not isinstance(p, bool) for p in prompt):
        return [list(prompt)], True
    if prompt and all(isinstance(p, (str, list, tuple, np.ndarray)) for p in prompt):
        return [p if isinstance(p, str) else list(p) for p in prompt], False
    raise RequestError("the prompt is empty: give text, token ids, or a non-empty list of prompts")


def _completion(sequence: Generation) -> Completion:
    prompt_tokens = len(sequence.request.prompt_ids)
    return Completion(
        text="".join(sequence.text),
        token_ids=list(sequence.output_ids),
        finish_reason=sequence.finish_reason,
        usage={
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(sequence.output_ids),
            "total_tokens": prompt_tokens + len(sequence.output_ids),
            "cached_tokens": sequence.n_cached,
        },
        timings=sequence.timings.as_dict(),
        logprobs=sequence.logprobs if sequence.request.options.sampling.n_logprobs else None,
    )
