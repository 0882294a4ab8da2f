"""Streaming text out of token ids: incremental detokenization, stop strings, reasoning and tool-call splitting."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

# How many prompt tokens to decode in front of the first output token. Some tokenizers (SentencePiece) render
# a token differently at the start of a text ("▁Hello" → "Hello"), so the window never starts at the output.
_PROMPT_CONTEXT = 5
_REPLACEMENT = "\ufffd"  # what decode() makes of a partial UTF-8 sequence


class Tokenizer(Protocol):
    """The part of a transformers tokenizer used here."""

    @property
    def all_special_ids(self) -> list[int]: ...

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Turns one token at a time into text deltas that never split a UTF-8 character.

    The prefix_offset/read_offset technique (vLLM, TGI): decode only a short window of recent tokens and emit
    what the newest token added beyond the text already emitted for that window. While the window's text ends
    in U+FFFD, the newest token holds part of a character and nothing is emitted until it completes.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.special_ids = frozenset(tokenizer.all_special_ids) if skip_special_tokens else frozenset()
        self.tokens = [t for t in prompt_ids[-_PROMPT_CONTEXT:] if t not in self.special_ids]
        self.prefix_offset = 0  # window start: tokens before it are never decoded again
        self.read_offset = len(self.tokens)  # text of tokens[prefix_offset:read_offset] is already emitted
        if self.decode(self.tokens).endswith(_REPLACEMENT):
            # The prompt ends inside a character; its tail would not be a prefix of the window's text later.
            self.prefix_offset = self.read_offset

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text it completes (often "", e.g. mid-character)."""
        if token_id in self.special_ids:
            return ""  # skipping it here keeps the window short when a model emits many special tokens
        self.tokens.append(token_id)
        prefix_text = self.decode(self.tokens[self.prefix_offset : self.read_offset])
        new_text = self.decode(self.tokens[self.prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        """The text still held at the end: a character the generation never finished decodes as U+FFFD,
        exactly as decode() of the whole output would render it."""
        if self.read_offset == len(self.tokens):
            return ""
        prefix_text = self.decode(self.tokens[self.prefix_offset : self.read_offset])
        new_text = self.decode(self.tokens[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.tokens)
        return new_text[len(prefix_text) :]


def partial_suffix(text: str, patterns: Sequence[str]) -> int:
    """Length of the longest proper suffix of text that is a prefix of some pattern (text that must wait)."""
    longest = min(len(text), max((len(p) for p in patterns), default=1) - 1)
    for size in range(longest, 0, -1):
        tail = text[-size:]
        if any(p.startswith(tail) for p in patterns):
            return size
    return 0


class StopMatcher:
    """Cuts the output at the first stop string, which never reaches the client even when split over deltas."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""  # held back: a suffix that may begin a stop string
        self.stopped = False

    def push(self, text: str) -> tuple[str, str | None]:
        """Return (text safe to emit now, the stop string if one matched). Nothing is emitted after a stop."""
        if self.stopped:
            return "", None
        if not self.stops:
            return text, None
        self.pending += text
        # The pending part was checked before and holds no whole stop, so a match may begin anywhere in it.
        matches = [(index, stop) for stop in self.stops if (index := self.pending.find(stop)) >= 0]
        if matches:
            index, stop = min(matches, key=lambda m: m[0])  # the earliest in the text wins
            self.stopped = True
            emit, self.pending = self.pending[:index], ""
            return emit, stop
        held = partial_suffix(self.pending, self.stops)
        emit = self.pending[: len(self.pending) - held]
        self.pending = self.pending[len(self.pending) - held :]
        return emit, None

    def flush(self) -> str:
        """At the end of generation without a stop (length or eos), the held-back text is plain output."""
        emit, self.pending = self.pending, ""
        return "" if self.stopped else emit


class ReasoningSplitter:
    """Splits streamed text into (content, reasoning) at <think>…</think>; the tags appear in neither.

    starts_inside: the chat template already opened the think tag in the prompt (Qwen3 thinking, DeepSeek-R1),
    so the output begins as reasoning and the first thing to look for is the end tag.
    """

    def __init__(self, start: str = "<think>", end: str = "</think>", starts_inside: bool = False) -> None:
        self.start, self.end = start, end
        self.inside = starts_inside
        self.pending = ""  # held back: a suffix that may begin the tag being looked for
        self.strip_content = False  # right after the end tag, until the first non-space content

    def push(self, text: str) -> tuple[str, str]:
        content: list[str] = []
        reasoning: list[str] = []
        self.pending += text
        while self.pending:
            tag = self.end if self.inside else self.start
            out = reasoning if self.inside else content
            index = self.pending.find(tag)
            if index < 0:
                held = partial_suffix(self.pending, [tag])
                self.emit(out, self.pending[: len(self.pending) - held])
                self.pending = self.pending[len(self.pending) - held :]
                break
            self.emit(out, self.pending[:index])
            self.pending = self.pending[index + len(tag) :]
            self.inside = not self.inside
            self.strip_content = not self.inside
        return "".join(content), "".join(reasoning)

    def emit(self, out: list[str], text: str) -> None:
        if self.strip_content and not self.inside:
            text = text.lstrip()
            self.strip_content = not text  # keep stripping across deltas that were all whitespace
        out.append(text)

    def flush(self) -> tuple[str, str]:
        """An unfinished tag at the end is plain text of whichever side it was in."""
        out: list[str] = []
        self.emit(out, self.pending)
        self.pending = ""
        return ("", out[0]) if self.inside else (out[0], "")


@dataclass
class ParsedToolCall:
    name: str
    arguments: dict[str, Any]


class ToolCallParser:
    """Pulls Hermes/Qwen `<tool_call>{"name": …, "arguments": {…}}</tool_call>` blocks out of content.

    A block whose body is not such a JSON object goes back into the content unchanged, tags and all.
    """

    def __init__(self, start: str = "<tool_call>", end: str = "</tool_call>") -> None:
        self.start, self.end = start, end
        self.inside = False
        self.pending = ""  # outside: a suffix that may begin the start tag; inside: the block body so far

    def push(self, text: str) -> tuple[str, list[ParsedToolCall]]:
        content: list[str] = []
        calls: list[ParsedToolCall] = []
        self.pending += text
        while self.pending:
            if self.inside:
                index = self.pending.find(self.end)
                if index < 0:
                    break  # the whole body is needed to parse it
                body, self.pending = self.pending[:index], self.pending[index + len(self.end) :]
                self.inside = False
                call = parse_tool_call(body)
                if call is None:
                    content.append(self.start + body + self.end)
                else:
                    calls.append(call)
            else:
                index = self.pending.find(self.start)
                if index < 0:
                    held = partial_suffix(self.pending, [self.start])
                    content.append(self.pending[: len(self.pending) - held])
                    self.pending = self.pending[len(self.pending) - held :]
                    break
                content.append(self.pending[:index])
                self.pending = self.pending[index + len(self.start) :]
                self.inside = True
        return "".join(content), calls

    def flush(self) -> tuple[str, list[ParsedToolCall]]:
        """A block the generation never closed is returned as plain content."""
        text = (self.start if self.inside else "") + self.pending
        self.inside, self.pending = False, ""
        return text, []


def parse_tool_call(body: str) -> ParsedToolCall | None:
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):  # some models emit the arguments as a JSON string, as OpenAI's wire format does
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        return None
    return ParsedToolCall(value["name"], arguments)
