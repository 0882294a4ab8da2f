"""Constrained decoding with xgrammar: a request's JSON Schema or forced tool call, one matcher per sequence.

The engine asks `Grammars.matcher()` once per request, masks the rows of live matchers with `Grammars.mask()` before
sampling, and feeds each chosen token back to its matcher. The vocabulary is scanned once per engine, on the first
request that needs a grammar, so a worker that never sees one never pays for it; compiled grammars are cached by
their text.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import xgrammar

from common.protocol import Generate
from worker.detokenizer import ToolCallParser

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

COMPILED_CACHE_SIZE = 128  # distinct grammars kept compiled; one costs ~10-100 ms to compile
# JSON without free whitespace: a small model left free to emit whitespace can loop on newlines until max_tokens.
# The separators are json.dumps' defaults, the way models see JSON written in their training data.
_JSON_FORMAT: dict[str, Any] = {"any_whitespace": False, "separators": (", ", ": ")}
# xgrammar's C++ errors start with "[15:52:46] /project/cpp/json_schema_converter.cc:4944: " and sometimes a check.
_ERROR_NOISE = re.compile(r"^\[[\d:]+\] \S+:\d+: |Check failed: \([^)]*\) is false: ")


class GrammarError(Exception):
    """The request's schema cannot be turned into a grammar; the message is meant for the client."""


@dataclass(frozen=True)
class GrammarSpec:
    """What the output must match: JSON valid under a schema, or one Hermes tool call whose JSON matches it."""

    kind: Literal["json", "tool_call"]
    schema: str  # JSON Schema, as text


def grammar_spec(request: Generate) -> GrammarSpec | None:
    """The constraint a request asks for, if any. A forced tool call wins: its answer is the call, not content."""
    if request.force_tool_call is not None:
        return GrammarSpec("tool_call", json.dumps(tool_call_schema(request)))
    if request.params.json_schema is not None:
        return GrammarSpec("json", request.params.json_schema)
    return None


def tool_call_schema(request: Generate) -> dict[str, Any]:
    """The schema of `{"name": …, "arguments": {…}}` for the function(s) the request forces."""
    assert request.force_tool_call is not None
    wanted = request.force_tool_call.name
    functions = [tool.get("function", tool) for tool in request.tools or ()]  # {"type": "function", "function": …}
    chosen = [f for f in functions if isinstance(f, dict) and f.get("name") and wanted in (None, f["name"])]
    if not chosen:
        raise GrammarError(f"no tool named '{wanted}' in tools" if wanted else "a tool call is required but no tools")
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": f["name"]}, "arguments": f.get("parameters") or {"type": "object"}},
            "required": ["name", "arguments"],
        }
        for f in chosen
    ]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


class Matcher:
    """One sequence's place in its grammar."""

    def __init__(self, compiled: xgrammar.CompiledGrammar) -> None:
        self.matcher = xgrammar.GrammarMatcher(compiled)
        self.num_accepted = 0

    def accept(self, token_id: int) -> bool:
        accepted = bool(self.matcher.accept_token(token_id))
        self.num_accepted += accepted
        return accepted

    @property
    def is_completed(self) -> bool:
        """The output so far is a whole match: a stop token may come next (and may be all that can)."""
        return bool(self.matcher.is_completed())

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)


class Grammars:
    """Compiles grammars for one tokenizer and hands out matchers."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, stop_token_ids: set[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # the model's logits width, which may pad the tokenizer's vocabulary
        self.stop_token_ids = sorted(stop_token_ids)  # the only tokens a finished grammar allows
        self.compile = functools.lru_cache(maxsize=COMPILED_CACHE_SIZE)(self._compile)

    def matcher(self, request: Generate) -> Matcher | None:
        """A fresh matcher for the request's constraint, or None. Raises GrammarError for a schema it cannot use."""
        spec = grammar_spec(request)
        return None if spec is None else Matcher(self.compile(spec))

    @functools.cached_property
    def compiler(self) -> xgrammar.GrammarCompiler:
        info = xgrammar.TokenizerInfo.from_huggingface(
            self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids
        )
        return xgrammar.GrammarCompiler(info, max_threads=2, cache_enabled=False)  # self.compile caches

    def mask(self, logits: torch.Tensor, matchers: list[Matcher | None]) -> None:
        """Set every token that row i's matcher forbids to -inf, in place; rows without a matcher stay as they are."""
        rows = [i for i, matcher in enumerate(matchers) if matcher is not None]
        if not rows:
            return
        bitmask = xgrammar.allocate_token_bitmask(len(matchers), self.vocab_size)
        for i in rows:
            matchers[i].fill(bitmask, i)  # type: ignore[union-attr]
        xgrammar.apply_token_bitmask_inplace(
            logits, bitmask.to(logits.device), vocab_size=min(self.vocab_size, logits.shape[1]), indices=rows
        )

    def _compile(self, spec: GrammarSpec) -> xgrammar.CompiledGrammar:
        try:
            if spec.kind == "json":
                return self.compiler.compile_json_schema(spec.schema, **_JSON_FORMAT)
            tags = ToolCallParser()  # the tags the engine's parser reads the call back from
            grammar = xgrammar.Grammar.concat(
                _literal(f"{tags.start}\n"),
                xgrammar.Grammar.from_json_schema(spec.schema, **_JSON_FORMAT),
                _literal(f"\n{tags.end}"),
            )
            return self.compiler.compile_grammar(grammar)
        except (RuntimeError, ValueError) as exc:
            raise GrammarError(f"unsupported JSON schema: {_clean(exc)}") from None


def _literal(text: str) -> xgrammar.Grammar:
    return xgrammar.Grammar.from_ebnf(f"root ::= {json.dumps(text)}")


def _clean(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return _ERROR_NOISE.sub("", _ERROR_NOISE.sub("", lines[0])) if lines else type(exc).__name__
