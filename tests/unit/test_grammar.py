"""Constrained decoding on the real SmolLM2 tokenizer: masks, random walks through grammars, and their errors.

A random walk samples uniformly among the tokens a matcher allows until it allows only the stop token: whatever
path it takes, the text must parse and validate, which is the promise made to a client.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
import torch

from common.protocol import ForcedToolCall, Generate, SamplingParams
from worker.detokenizer import ReasoningSplitter, ToolCallParser
from worker.grammar import GrammarError, Grammars, GrammarSpec, Matcher, grammar_spec
from worker.output import RequestState

MAX_STEPS = 400

BOUNDED = {  # every string, number and array bounded, so that a random walk ends
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 8},
        "population": {"type": "integer", "minimum": 0, "maximum": 999},
        "capital": {"type": "boolean"},
        "kind": {"enum": ["town", "city", "village"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2},
        "mayor": {
            "anyOf": [
                {"type": "null"},
                {
                    "type": "object",
                    "properties": {"age": {"type": "integer", "minimum": 18, "maximum": 99}},
                    "required": ["age"],
                },
            ]
        },
    },
    "required": ["city", "population", "capital", "kind", "tags", "mayor"],
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 6}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture(scope="module")
def grammars(tokenizer: Any) -> Grammars:
    return Grammars(tokenizer, len(tokenizer), {tokenizer.eos_token_id})


def request(json_schema: Any = None, tools: list[Any] | None = None, forced: ForcedToolCall | None = None) -> Generate:
    text = None if json_schema is None else json.dumps(json_schema)
    return Generate(
        id=0, model="m", params=SamplingParams(json_schema=text), prompt="x", tools=tools, force_tool_call=forced
    )


def allowed(grammars: Grammars, matcher: Matcher) -> list[int]:
    logits = torch.zeros(1, grammars.vocab_size)
    grammars.mask(logits, [matcher])
    return logits[0].isfinite().nonzero()[:, 0].tolist()


def accept_text(tokenizer: Any, matcher: Matcher, text: str) -> None:
    for token in tokenizer.encode(text, add_special_tokens=False):
        assert matcher.accept(token), text


def random_walk(grammars: Grammars, tokenizer: Any, matcher: Matcher, seed: int) -> str:
    """Sample uniformly among allowed tokens until the stop token; returns the text."""
    generator = torch.Generator().manual_seed(seed)
    tokens: list[int] = []
    for _ in range(MAX_STEPS):
        choices = allowed(grammars, matcher)
        token = choices[int(torch.randint(len(choices), (1,), generator=generator))]
        if token == tokenizer.eos_token_id:
            assert matcher.is_completed
            return str(tokenizer.decode(tokens))
        assert matcher.accept(token)
        tokens.append(token)
    raise AssertionError(f"no stop within {MAX_STEPS} tokens: {tokenizer.decode(tokens)!r}")


def test_mask_allows_exactly_the_continuations(grammars: Grammars, tokenizer: Any) -> None:
    matcher = grammars.matcher(request(BOUNDED))
    assert matcher is not None
    first = {tokenizer.decode([t]) for t in allowed(grammars, matcher)}
    assert first and all(text.startswith("{") for text in first)  # no leading whitespace either
    accept_text(tokenizer, matcher, '{"city": "Paris", "population": 12')
    texts = {tokenizer.decode([t]) for t in allowed(grammars, matcher)}
    assert "," in texts and "3" in texts and "}" not in texts  # more required keys follow; 123 <= 999
    accept_text(tokenizer, matcher, '3, "capital": true, "kind": "city", "tags": [], "mayor": null}')
    assert matcher.is_completed
    assert allowed(grammars, matcher) == [tokenizer.eos_token_id]


def test_json_object_mode_takes_any_object(grammars: Grammars, tokenizer: Any) -> None:
    matcher = grammars.matcher(request({"type": "object"}))
    assert matcher is not None
    accept_text(tokenizer, matcher, '{"a": [1, {"b": null}], "c": "d"}')
    assert matcher.is_completed
    other = grammars.matcher(request({"type": "object"}))
    assert other is not None and not other.accept(tokenizer.encode("[", add_special_tokens=False)[0])


@pytest.mark.parametrize("seed", range(3))
def test_random_walks_parse_and_validate(grammars: Grammars, tokenizer: Any, seed: int) -> None:
    matcher = grammars.matcher(request(BOUNDED))
    assert matcher is not None
    value = json.loads(random_walk(grammars, tokenizer, matcher, seed))
    jsonschema.validate(value, BOUNDED)


@pytest.mark.parametrize(
    ("forced", "names"),
    [(ForcedToolCall(), {"get_weather", "get_time"}), (ForcedToolCall("get_weather"), {"get_weather"})],
)
def test_forced_tool_calls_parse_back_into_valid_calls(
    grammars: Grammars, tokenizer: Any, forced: ForcedToolCall, names: set[str]
) -> None:
    seen = set()
    for seed in range(3):
        matcher = grammars.matcher(request(tools=[WEATHER, TIME], forced=forced))
        assert matcher is not None
        parser = ToolCallParser()
        content, calls = parser.push(random_walk(grammars, tokenizer, matcher, seed))
        assert content == "" and len(calls) == 1 and calls[0].name in names
        schema = next(t["function"]["parameters"] for t in (WEATHER, TIME) if t["function"]["name"] == calls[0].name)
        jsonschema.validate(calls[0].arguments, schema)
        seen.add(calls[0].name)
    assert seen <= names


def test_spec_of_a_request() -> None:
    assert grammar_spec(request()) is None
    assert grammar_spec(request({"type": "object"})) == GrammarSpec("json", '{"type": "object"}')
    forced = grammar_spec(request({"type": "object"}, tools=[TIME], forced=ForcedToolCall()))
    assert forced is not None and forced.kind == "tool_call"  # the call is the answer: it wins over the format
    assert json.loads(forced.schema) == {
        "type": "object",
        "properties": {"name": {"const": "get_time"}, "arguments": {"type": "object", "properties": {}}},
        "required": ["name", "arguments"],
    }
    with pytest.raises(GrammarError, match="a tool call is required but no tools"):
        grammar_spec(request(forced=ForcedToolCall()))
    with pytest.raises(GrammarError, match="no tool named 'nope' in tools"):
        grammar_spec(request(tools=[TIME], forced=ForcedToolCall("nope")))


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ({"type": "foo"}, 'unsupported JSON schema: Unsupported type "foo"'),
        (
            {"type": "string", "pattern": "(?<=a)b"},
            "unsupported JSON schema: Regex parsing error at position 3: Lookbehind is not supported yet.",
        ),
        ({"$ref": "#/$defs/missing"}, "unsupported JSON schema: "),
    ],
)
def test_unsupported_schemas_say_why(grammars: Grammars, schema: Any, message: str) -> None:
    with pytest.raises(GrammarError) as caught:
        grammars.matcher(request(schema))
    assert str(caught.value).startswith(message) and "/project/" not in str(caught.value)


def test_compiled_grammars_are_cached_by_text(grammars: Grammars) -> None:
    schema = {"type": "object", "properties": {"cached": {"type": "boolean"}}}
    before = grammars.compile.cache_info()
    first, second = grammars.matcher(request(schema)), grammars.matcher(request(schema))
    after = grammars.compile.cache_info()
    assert (after.misses - before.misses, after.hits - before.hits) == (1, 1)
    assert first is not second  # one matcher per sequence, from one compiled grammar


def test_mask_touches_only_constrained_rows(grammars: Grammars) -> None:
    matcher = grammars.matcher(request({"type": "object"}))
    logits = torch.randn(3, grammars.vocab_size, generator=torch.Generator().manual_seed(0))
    before = logits.clone()
    grammars.mask(logits, [None, matcher, None])
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    assert int(logits[1].isfinite().sum()) < grammars.vocab_size // 10
    grammars.mask(logits, [None, None, None])  # nothing to do, nothing done


def test_grammar_waits_for_the_end_of_reasoning(grammars: Grammars, tokenizer: Any) -> None:
    """A prompt that opened <think> leaves the thinking free; the grammar governs the answer after it."""
    matcher = grammars.matcher(request({"type": "object"}))
    state = RequestState(
        generate=request(),
        sampling=None,
        detokenizer=None,
        stops=None,  # type: ignore[arg-type]
        reasoning=ReasoningSplitter(starts_inside=True),
        tools=None,
        stop_token_ids=frozenset(),
        grammar=matcher,
    )
    assert state.constraint() is None
    state.reasoning.push("Hmm, JSON.</think>")  # type: ignore[union-attr]
    assert state.constraint() is matcher
    accept_text(tokenizer, matcher, '{"a": "')  # type: ignore[arg-type]
    state.reasoning.push("<think>")  # type: ignore[union-attr]  # a tag inside a JSON string: still constrained
    assert state.constraint() is matcher
