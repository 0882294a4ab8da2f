"""Intake: a Generate becomes a Sequence ready to schedule — checks, chat template, tokenizing, grammar compile.

Runs on the worker's intake thread (worker/server.py), never on the thread that steps the model, so a 6,000-token
prompt or a large JSON schema does not stall the streams already decoding. It reads only what is fixed after start
(tokenizer, model card) and the grammar cache, which only this thread fills.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

from common.protocol import Generate, ModelCard
from worker.detokenizer import IncrementalDetokenizer, ReasoningSplitter, StopMatcher, ToolCallParser
from worker.grammar import GrammarError, Grammars
from worker.output import RequestState
from worker.sampler import Sampler, SamplingState
from worker.sequence import RequestKey, Sequence


class RequestError(Exception):
    """The request cannot be served as sent; `code` is the protocol's ErrorCode."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Intake:
    def __init__(self, tokenizer: Any, card: ModelCard, grammars: Grammars, sampler: Sampler) -> None:
        self.tokenizer = tokenizer
        self.card = card
        self.context_length = card.context_length
        self.vocab_size = card.vocab_size
        self.grammars = grammars
        self.sampler = sampler

    def prepare(self, key: RequestKey, request: Generate) -> Sequence:
        """The request as a waiting Sequence. Raises RequestError for anything the client must change."""
        self._check_token_ids(request)
        prompt_ids = self._tokenize(request)
        try:
            return self._make_sequence(key, request, prompt_ids)
        except GrammarError as exc:
            raise RequestError("bad_request", str(exc)) from None

    def _check_token_ids(self, request: Generate) -> None:
        """Token ids come from the client: ids outside this vocabulary would index past the logits."""
        params = request.params
        for field, ids in (("logit_bias", params.logit_bias), ("stop_token_ids", params.stop_token_ids)):
            bad = sorted(i for i in ids if not 0 <= i < self.vocab_size)
            if bad:
                raise RequestError(
                    "bad_request", f"{field}: token ids {bad[:5]} are outside the vocabulary (0-{self.vocab_size - 1})"
                )

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
        if not isinstance(text, str):
            raise RequestError("bad_request", "the chat template did not render text")
        return text

    def _make_sequence(self, key: RequestKey, request: Generate, prompt_ids: list[int]) -> Sequence:
        params = request.params
        room = self.context_length - len(prompt_ids)
        max_tokens = min(params.max_tokens or room, room)
        if params.max_total_tokens is not None:
            max_tokens = min(max_tokens, _room_within(params.max_total_tokens, len(prompt_ids)))
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


def _room_within(max_total_tokens: int, num_prompt_tokens: int) -> int:
    """Hugging Face's max_length counts the prompt too; like transformers, a prompt that fills it is an error."""
    if num_prompt_tokens >= max_total_tokens:
        raise RequestError(
            "context_length",
            f"The prompt is {num_prompt_tokens} tokens, but max_length (prompt and output) is {max_total_tokens}: "
            "raise max_length or shorten the prompt.",
        )
    return max_total_tokens - num_prompt_tokens


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
