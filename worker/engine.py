"""The engine: requests in, one batched model step at a time, per-request events out.

step() reads as schedule → run → sample → postprocess. Everything torch happens in the runner and the
sampler; the scheduler and block manager decide, on plain Python data, what runs.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

import msgspec

from common.protocol import (
    Delta,
    Done,
    Failed,
    Generate,
    Logprob,
    Timings,
    ToGateway,
    TokenLogprob,
    ToolCall,
    ToolCallFunction,
    Usage,
    WorkerInfo,
)
from worker.detokenizer import IncrementalDetokenizer, ReasoningSplitter, StopMatcher, ToolCallParser
from worker.grammar import GrammarError, Grammars, Matcher
from worker.kv_blocks import BlockManager
from worker.models import LoadedModel
from worker.runner import ModelRunner, SeqChunk
from worker.sampler import Sampler, SamplingState
from worker.scheduler import QueueFull, ScheduledChunk, Scheduler
from worker.sequence import RequestKey, Sequence

logger = logging.getLogger(__name__)

Outgoing = tuple[bytes, ToGateway]  # (gateway peer, message)


@dataclass(frozen=True)
class EngineConfig:
    max_running: int = 64
    max_waiting: int = 256
    max_prefill_tokens: int = 256  # prompt tokens per step, beside the decodes: bounds how long a step stalls streams
    block_size: int = 16
    kv_cache_bytes: int = 2 << 30  # on CPU
    kv_cache_fraction: float = 0.85  # on a GPU: of the memory free after loading the weights
    max_model_len: int | None = None  # cap on context length (default: the model's)
    prefix_caching: bool = True  # reuse the KV of prompt prefixes seen before


@dataclass(eq=False)
class RequestState:
    """Everything per request that the scheduler does not need to see."""

    generate: Generate
    sampling: SamplingState
    detokenizer: IncrementalDetokenizer
    stops: StopMatcher
    reasoning: ReasoningSplitter | None
    tools: ToolCallParser | None
    stop_token_ids: frozenset[int]
    grammar: Matcher | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_tool_calls: int = 0

    def constraint(self) -> Matcher | None:
        """The grammar governs the answer: after the reasoning, where the prompt opened a think block."""
        thinking = self.reasoning is not None and self.reasoning.inside
        if self.grammar is None or (thinking and not self.grammar.num_accepted):
            return None
        return self.grammar


class RequestError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Engine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig) -> None:
        self.loaded = loaded
        self.config = config
        self.tokenizer = loaded.tokenizer
        self.context_length = min(loaded.context_length, config.max_model_len or loaded.context_length)
        self.card = msgspec.structs.replace(loaded.card(), context_length=self.context_length)
        num_blocks = self._kv_budget() // ModelRunner.bytes_per_block(
            loaded.model.config, loaded.dtype, config.block_size
        )
        if num_blocks < 2:
            raise ValueError("the KV cache budget holds fewer than 2 blocks; raise --kv-cache-bytes")
        self.runner = ModelRunner(
            loaded.model,
            device=loaded.device,
            dtype=loaded.dtype,
            num_blocks=num_blocks,
            block_size=config.block_size,
            quantized=loaded.quantized,
        )
        self.blocks = BlockManager(num_blocks, config.block_size, prefix_caching=config.prefix_caching)
        self.scheduler = Scheduler(
            self.blocks,
            max_running=config.max_running,
            max_waiting=config.max_waiting,
            max_prefill_tokens=config.max_prefill_tokens,
        )
        self.sampler = Sampler(len(self.tokenizer), loaded.eos_token_ids, loaded.device)
        self.grammars = Grammars(self.tokenizer, loaded.model.config.vocab_size, loaded.eos_token_ids)
        self.instance = uuid.uuid4().hex
        self._unreported_load = loaded.load_seconds  # reported once, by the first request to finish
        self.started_at = time.time()
        logger.info(
            "KV cache: %d blocks of %d tokens (%d tokens, %.0f MiB)",
            num_blocks,
            config.block_size,
            num_blocks * config.block_size,
            num_blocks * ModelRunner.bytes_per_block(loaded.model.config, loaded.dtype, config.block_size) / 2**20,
        )

    def _kv_budget(self) -> int:
        if self.loaded.device.type == "cuda":
            import torch

            free, _ = torch.cuda.mem_get_info(self.loaded.device)
            return int(free * self.config.kv_cache_fraction)
        return self.config.kv_cache_bytes

    # -- requests in ------------------------------------------------------------------------

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def add(self, peer: bytes, request: Generate) -> list[Outgoing]:
        key = (peer, request.id)
        try:
            if self.scheduler.find(key) is not None:
                raise RequestError("bad_request", f"request id {request.id} is already in flight")
            prompt_ids = self._tokenize(request)
            self.scheduler.add(self._make_sequence(key, request, prompt_ids))
        except RequestError as exc:
            return [(peer, Failed(id=request.id, code=exc.code, message=exc.message))]  # type: ignore[arg-type]
        except GrammarError as exc:
            return [(peer, Failed(id=request.id, code="bad_request", message=str(exc)))]
        except QueueFull:
            return [(peer, Failed(id=request.id, code="busy", message="server busy, please try again"))]
        logger.debug("request %s: %d prompt tokens queued", key, len(prompt_ids))
        return []

    def abort(self, peer: bytes, request_id: int) -> list[Outgoing]:
        seq = self.scheduler.find((peer, request_id))
        if seq is None:
            return []  # already finished: its Done is on the way
        seq.state.finish_reason = "abort"
        return [self._finish(seq)]

    def abort_peer(self, peer: bytes) -> None:
        """A gateway vanished: drop everything it asked for."""
        for seq in [*self.scheduler.running, *self.scheduler.waiting]:
            if seq.key[0] == peer:
                self.scheduler.finish(seq)

    def _tokenize(self, request: Generate) -> list[int]:
        if (request.messages is None) == (request.prompt is None):
            raise RequestError("bad_request", "exactly one of messages or prompt must be given")
        if request.prompt is not None:
            ids: list[int] = self.tokenizer.encode(request.prompt)
        else:
            ids = self.tokenizer.encode(self._render_chat(request), add_special_tokens=False)
        if not ids:
            raise RequestError("bad_request", "the prompt is empty")
        if len(ids) >= self.context_length:
            raise RequestError(
                "context_length",
                f"This model's maximum context length is {self.context_length} tokens. However, your messages "
                f"resulted in {len(ids)} tokens, which leaves no room for the completion. "
                "Please reduce the length of the messages.",
            )
        return ids

    def _render_chat(self, request: Generate) -> str:
        messages = [_message_for_template(m) for m in msgspec.to_builtins(request.messages)]
        kwargs: dict[str, Any] = dict(request.template_kwargs)
        if request.think is not None:
            kwargs.setdefault("enable_thinking", request.think)
        try:
            text = self.tokenizer.apply_chat_template(
                messages,
                tools=request.tools or None,
                add_generation_prompt=request.add_generation_prompt,
                tokenize=False,
                **kwargs,
            )
        except Exception as exc:  # jinja raises anything, e.g. "Conversation roles must alternate"
            raise RequestError("bad_request", f"the chat template rejected these messages: {exc}") from exc
        assert isinstance(text, str)
        return text

    def _make_sequence(self, key: RequestKey, request: Generate, prompt_ids: list[int]) -> Sequence:
        params = request.params
        room = self.context_length - len(prompt_ids)
        max_tokens = min(params.max_tokens or room, room)
        reasoning = None
        # A chat answer is split unless thinking is off; a raw prompt's continuation only when asked to (Ollama's
        # raw generate with think), so /v1/completions gets back exactly the text the model wrote.
        wants_split = request.think is not False if request.prompt is None else request.think is True
        if "thinking" in self.card.capabilities and wants_split:
            prompt_tail = self.tokenizer.decode(prompt_ids[-8:])
            reasoning = ReasoningSplitter(starts_inside=prompt_tail.rstrip().endswith("<think>"))
        grammar = self.grammars.matcher(request)
        if grammar is not None and reasoning is not None and not reasoning.inside:
            reasoning = None  # constrained from the first token: no think block can open
        state = RequestState(
            generate=request,
            sampling=SamplingState(params, self.sampler.make_generator(params.seed), prompt_ids, []),
            detokenizer=IncrementalDetokenizer(self.tokenizer, prompt_ids),
            stops=StopMatcher(list(params.stop)),
            reasoning=reasoning,
            tools=ToolCallParser() if request.tools else None,
            stop_token_ids=frozenset(params.stop_token_ids),
            grammar=grammar,
        )
        return Sequence(key, list(prompt_ids), len(prompt_ids), max_tokens, state=state)

    # -- the step ---------------------------------------------------------------------------

    def step(self) -> list[Outgoing]:
        chunks = self.scheduler.schedule()  # 1) schedule
        if not chunks:
            return []
        logits = self.runner.forward(  # 2) run
            [
                SeqChunk(
                    c.seq.token_ids[c.seq.num_computed : c.seq.num_computed + c.num_tokens],
                    c.seq.num_computed,
                    c.seq.block_table,
                    prompt=c.seq.num_computed < c.seq.num_prompt_tokens,
                )
                for c in chunks
            ]
        )
        self.scheduler.on_computed(chunks)
        rows = [i for i, c in enumerate(chunks) if c.completes]
        if not rows:
            return []
        finished_prefill: list[ScheduledChunk] = [chunks[i] for i in rows]
        states: list[RequestState] = [c.seq.state for c in finished_prefill]
        logits = logits[rows]
        self.grammars.mask(logits, [s.constraint() for s in states])  # 3) sample, within each request's grammar
        result = self.sampler.sample(logits, [s.sampling for s in states])
        out: list[Outgoing] = []  # 4) postprocess: detokenize, stop, emit
        for i, chunk in enumerate(finished_prefill):
            choice = result.logprobs[i] if result.logprobs is not None else None
            out.extend(self._append(chunk.seq, result.token_ids[i], choice))
        return out

    def _append(self, seq: Sequence, token: int, choice: Any) -> list[Outgoing]:
        state: RequestState = seq.state
        now = time.monotonic()
        if seq.first_token_at is None:
            seq.first_token_at = now
        params = state.generate.params
        grammar = state.constraint()  # before this token's text can end the reasoning
        text = ""
        if token in self.loaded.eos_token_ids and not params.ignore_eos:
            state.finish_reason, choice = "stop", None  # an end token is not output: no logprob for it either
        elif token in state.stop_token_ids:
            state.finish_reason, state.stop_reason, choice = "stop", token, None
        else:
            seq.token_ids.append(token)
            state.sampling.output_ids.append(token)
            if grammar is not None and not grammar.accept(token):
                logger.warning("request %s: token %d is outside its grammar", seq.key, token)
            text, stop = state.stops.push(state.detokenizer.push(token))
            if stop is not None:
                state.finish_reason, state.stop_reason = "stop", stop
            elif seq.num_output_tokens >= seq.max_tokens or seq.num_tokens >= self.context_length:
                state.finish_reason = "length"
            elif grammar is not None and grammar.is_completed and params.ignore_eos:
                state.finish_reason = "stop"  # a whole match, and eos is masked: end while the output is valid
        if state.finish_reason is not None and not isinstance(state.stop_reason, str):
            # Ending without a stop string: a character still held by the detokenizer goes through the stop
            # matcher too, then whatever the matcher held back is real output.
            tail, stop = state.stops.push(state.detokenizer.flush())
            text += tail if stop is not None else tail + state.stops.flush()
        delta = self._delta(seq, text, choice, final=state.finish_reason is not None)
        out = [(seq.key[0], delta)] if delta is not None else []
        if state.finish_reason is not None:
            out.append(self._finish(seq))
        return out

    def _delta(self, seq: Sequence, text: str, choice: Any, *, final: bool) -> Delta | None:
        state: RequestState = seq.state
        reasoning = ""
        if state.reasoning is not None:
            text, reasoning = state.reasoning.push(text)
            if final:
                more_text, more_reasoning = state.reasoning.flush()
                text, reasoning = text + more_text, reasoning + more_reasoning
        calls: list[ToolCall] | None = None
        if state.tools is not None:
            text, parsed = state.tools.push(text)
            if final:
                more_text, more_parsed = state.tools.flush()
                text, parsed = text + more_text, parsed + more_parsed
            if parsed:
                calls = [
                    ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", function=ToolCallFunction(p.name, p.arguments))
                    for p in parsed
                ]
                state.num_tool_calls += len(calls)
        wants_logprobs = choice is not None and state.generate.params.logprobs is not None
        logprobs = [self._logprob(choice)] if wants_logprobs else None
        if not (text or reasoning or calls or logprobs) and not (final and seq.num_output_tokens == 0):
            return None
        return Delta(
            id=seq.key[1],
            text=text,
            reasoning=reasoning,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens,
            logprobs=logprobs,
            tool_calls=calls,
        )

    def _logprob(self, choice: Any) -> Logprob:
        token = self.tokenizer.decode([choice.token_id])
        top = []
        for token_id, logprob in choice.top:
            text = self.tokenizer.decode([token_id])  # once per alternative, not once per field
            top.append(TokenLogprob(text, logprob, list(text.encode())))
        return Logprob(token, choice.logprob, list(token.encode()), top)

    def _finish(self, seq: Sequence) -> Outgoing:
        state: RequestState = seq.state
        self.scheduler.finish(seq)
        now = time.monotonic()
        scheduled = seq.scheduled_at or now
        first = seq.first_token_at or now
        reason = state.finish_reason or "abort"
        if reason == "stop" and state.num_tool_calls:
            reason = "tool_calls"
        # Ollama's load_duration is the load a request waited for: the model's load on a cold start, then ~0.
        self._unreported_load, load = 0.0, self._unreported_load
        done = Done(
            id=seq.key[1],
            finish_reason=reason,  # type: ignore[arg-type]
            usage=Usage(seq.num_prompt_tokens, seq.num_output_tokens, seq.num_cached),
            timings=Timings(
                queue=scheduled - seq.arrived_at,
                prefill=first - scheduled,
                decode=now - first,
                load=load,
            ),
            stop_reason=state.stop_reason,
        )
        logger.info(
            "request %d: %s after %d+%d tokens (%d cached), %.3fs",
            seq.key[1],
            reason,
            seq.num_prompt_tokens,
            seq.num_output_tokens,
            seq.num_cached,
            now - seq.arrived_at,
        )
        return (seq.key[0], done)

    # -- self-description -------------------------------------------------------------------

    def info(self) -> WorkerInfo:
        queries = self.blocks.num_prefix_queries
        return WorkerInfo(
            instance=self.instance,
            pid=os.getpid(),
            models=[self.card],
            device=str(self.loaded.device),
            started_at=self.started_at,
            max_running=self.config.max_running,
            max_waiting=self.config.max_waiting,
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_blocks_total=self.blocks.num_blocks,
            kv_blocks_used=self.blocks.num_used,
            prefix_cache_hit_rate=self.blocks.num_prefix_hits / queries if queries else 0.0,
        )


def _message_for_template(message: dict[str, Any]) -> dict[str, Any]:
    """Chat templates (Qwen, Hermes) render tool-call arguments with `tojson`: give them objects, not strings."""
    for call in message.get("tool_calls") or []:
        arguments = call.get("function", {}).get("arguments")
        if isinstance(arguments, str):
            try:
                call["function"]["arguments"] = json.loads(arguments)
            except json.JSONDecodeError:
                pass
    if message.get("reasoning") is not None:
        message["reasoning_content"] = message["reasoning"]
    return message
