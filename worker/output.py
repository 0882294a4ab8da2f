"""The output side of a request: each sampled token becomes text, stops are found, reasoning and tool calls are
split out, and the request's events (Delta, then Done or Failed) are built.

Per-token work the step loop calls after sampling; it never touches the scheduler (the engine frees sequences).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from common.protocol import Delta, Done, Generate, Logprob, Timings, TokenLogprob, ToolCall, ToolCallFunction, Usage
from worker.detokenizer import IncrementalDetokenizer, ReasoningSplitter, StopMatcher, ToolCallParser
from worker.grammar import Matcher
from worker.sampler import SamplingState
from worker.sequence import Sequence

logger = logging.getLogger(__name__)


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
    num_reasoning_tokens: int = 0
    forced: deque[int] = field(default_factory=deque)  # tokens that come next whatever is sampled: a think block
    # closed at the thinking budget

    def constraint(self) -> Matcher | None:
        """The grammar governs the answer: after the reasoning, where the prompt opened a think block."""
        thinking = self.reasoning is not None and self.reasoning.inside
        if self.grammar is None or (thinking and not self.grammar.num_accepted):
            return None
        return self.grammar


class Output:
    """Turns one sequence's sampled tokens into its events."""

    def __init__(self, tokenizer: Any, eos_token_ids: set[int], context_length: int) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.context_length = context_length

    def append(self, seq: Sequence, token: int, choice: Any) -> Delta | None:
        """Take one sampled token; the Delta to send, if any. `seq.state.finish_reason` is set when it ends."""
        state: RequestState = seq.state
        if seq.first_token_at is None:
            seq.first_token_at = time.monotonic()
        params = state.generate.params
        grammar = state.constraint()  # before this token's text can end the reasoning
        text = ""
        if token in self.eos_token_ids and not params.ignore_eos:
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
        if state.finish_reason is None:
            self._spend_thinking(state)
        if state.finish_reason is not None and not isinstance(state.stop_reason, str):
            # Ending without a stop string: a character still held by the detokenizer goes through the stop
            # matcher too, then whatever the matcher held back is real output.
            tail, stop = state.stops.push(state.detokenizer.flush())
            text += tail if stop is not None else tail + state.stops.flush()
        return self._delta(seq, text, choice, final=state.finish_reason is not None)

    def _spend_thinking(self, state: RequestState) -> None:
        """Past its thinking budget, a request's think block is closed for it: the closing tag (and the blank line
        templates put after it, unless a grammar governs the answer) are forced as its next tokens."""
        budget = state.generate.params.thinking_budget
        if budget is None or state.reasoning is None or not state.reasoning.inside or state.forced:
            return
        state.num_reasoning_tokens += 1
        if state.num_reasoning_tokens >= budget:
            close = f"\n{state.reasoning.end}" + ("" if state.grammar is not None else "\n\n")
            state.forced.extend(self.tokenizer.encode(close, add_special_tokens=False))

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


def done(seq: Sequence, load_seconds: float = 0.0) -> Done:
    """The request's last event; its finish reason is the state's (abort when it has none)."""
    state: RequestState | None = seq.state
    now = time.monotonic()
    scheduled = seq.scheduled_at or now
    first = seq.first_token_at or now
    reason = (state.finish_reason if state else None) or "abort"
    if reason == "stop" and state is not None and state.num_tool_calls:
        reason = "tool_calls"
    logger.info(
        "request %d: %s after %d+%d tokens (%d cached), %.3fs",
        seq.key[1],
        reason,
        seq.num_prompt_tokens,
        seq.num_output_tokens,
        seq.num_cached,
        now - seq.arrived_at,
    )
    return Done(
        id=seq.key[1],
        finish_reason=reason,  # type: ignore[arg-type]
        usage=Usage(seq.num_prompt_tokens, seq.num_output_tokens, seq.num_cached),
        timings=Timings(
            queue=scheduled - seq.arrived_at, prefill=first - scheduled, decode=now - first, load=load_seconds
        ),
        stop_reason=state.stop_reason if state else None,
    )
