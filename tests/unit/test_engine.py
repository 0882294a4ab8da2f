"""The real engine on a tiny model: every request ends exactly once (Done or Failed), whatever fails — a model step,
one request's intake or output, an abort at any stage, a gateway that vanishes — and nothing else is disturbed."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

import pytest
from tiny_model import tiny_engine

from common.protocol import ChatMessage, Delta, Done, Failed, Generate, SamplingParams
from worker.engine import MAX_FAILED_STEPS, Engine, EngineBroken
from worker.sequence import Prepared

PEER, OTHER = b"gateway-a", b"gateway-b"


@pytest.fixture
def engine(tokenizer: Any) -> Engine:
    return tiny_engine(tokenizer, max_model_len=128)


def chat(request_id: int, text: str = "hello", **params: Any) -> Generate:
    sampling = SamplingParams(**{"temperature": 0.0, "max_tokens": 8, "ignore_eos": True, **params})
    return Generate(id=request_id, model="tiny", messages=[ChatMessage("user", text)], params=sampling)


class Client:
    """Plays the worker server's part: intake results come back through a queue, events are collected."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.ready: queue.Queue[Prepared] = queue.Queue()
        self.events: dict[tuple[bytes, int], list[Any]] = {}

    def take(self, events: list[tuple[bytes, Any]]) -> None:
        for peer, event in events:
            self.events.setdefault((peer, event.id), []).append(event)

    def add(self, request: Generate, peer: bytes = PEER, admit: bool = True) -> None:
        self.events.setdefault((peer, request.id), [])
        self.take(self.engine.add(peer, request, ready=self.ready.put))
        if admit:
            self.take(self.engine.admit(self.ready.get(timeout=30)))

    def run(self, max_steps: int = 200) -> None:
        for _ in range(max_steps):
            if not self.engine.has_work():
                return
            self.take(self.engine.step())
        raise AssertionError("the engine did not finish")

    def ends(self) -> dict[tuple[bytes, int], list[Any]]:
        """Each request's terminal events (Done or Failed); exactly one each is the promise."""
        return {key: [e for e in events if isinstance(e, Done | Failed)] for key, events in self.events.items()}


def test_requests_end_exactly_once(engine: Engine) -> None:
    client = Client(engine)
    for i in range(4):
        client.add(chat(i, f"story {i}"))
    client.run()
    ends = client.ends()
    assert all(len(end) == 1 and isinstance(end[0], Done) for end in ends.values()), ends
    assert all(end[0].usage.completion_tokens == 8 for end in ends.values())
    assert not engine.has_work() and engine.blocks.num_used == 0


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = Client(engine)
    client.add(chat(1))
    client.add(chat(2))
    forward = engine.runner.forward
    calls = {"n": 0}

    def fails_once(chunks: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:  # a decode step of both
            raise RuntimeError("simulated kernel failure")
        return forward(chunks)

    monkeypatch.setattr(engine.runner, "forward", fails_once)
    client.run()
    for request_id in (1, 2):
        [end] = client.ends()[(PEER, request_id)]
        assert isinstance(end, Failed) and end.code == "internal" and "simulated kernel failure" in end.message
    assert engine.blocks.num_used == 0  # their KV went back
    client.add(chat(3))
    client.run()
    [end] = client.ends()[(PEER, 3)]
    assert isinstance(end, Done) and end.usage.completion_tokens == 8


def test_steps_failing_in_a_row_break_the_engine_and_everything_fails(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = Client(engine)
    monkeypatch.setattr(engine.runner, "forward", _raise)
    for i in range(MAX_FAILED_STEPS):
        client.add(chat(i))
        if i < MAX_FAILED_STEPS - 1:
            client.take(engine.step())
    client.add(chat(99), admit=False)  # still at intake when the engine breaks
    with pytest.raises(EngineBroken):
        engine.step()
    client.take(engine.fail_everything("restarting"))
    assert engine.admit(client.ready.get(timeout=30)) == []  # its Failed went out already
    ends = client.ends()
    assert all(len(end) == 1 and isinstance(end[0], Failed) for end in ends.values()), ends
    assert not engine.has_work() and not engine.preparing


def test_a_failing_intake_fails_that_request_only(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    client = Client(engine)
    prepare = engine.intake.prepare

    def fails_for_poison(key: Any, request: Generate) -> Any:
        if request.messages and request.messages[0].content == "poison":
            raise ValueError("tokenizer exploded")
        return prepare(key, request)

    monkeypatch.setattr(engine.intake, "prepare", fails_for_poison)
    client.add(chat(1, "poison"))
    client.add(chat(2))
    client.run()
    [bad], [good] = client.ends()[(PEER, 1)], client.ends()[(PEER, 2)]
    assert isinstance(bad, Failed) and bad.code == "internal" and "tokenizer exploded" in bad.message
    assert isinstance(good, Done)


def test_intake_runs_off_the_step_loop(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """A request stuck at intake (a slow template, tokenizer or grammar) holds up no stream already decoding."""
    client = Client(engine)
    client.add(chat(1))  # already queued: it runs while request 2 is taken in
    prepare = engine.intake.prepare
    entered, release = threading.Event(), threading.Event()

    def blocks_for_two(key: Any, request: Generate) -> Any:
        if request.id == 2:
            entered.set()
            assert release.wait(60), "the test never released the intake"
        return prepare(key, request)

    monkeypatch.setattr(engine.intake, "prepare", blocks_for_two)
    client.add(chat(2), admit=False)
    try:
        assert entered.wait(30), "request 2 never reached intake"
        for _ in range(8):  # request 1's whole answer, while request 2 is still inside intake
            client.take(engine.step())
        *deltas, done = client.events[(PEER, 1)]
        assert len(deltas) > 1 and all(isinstance(e, Delta) for e in deltas)
        assert isinstance(done, Done) and done.usage.completion_tokens == 8
        assert client.ready.empty() and (PEER, 2) in engine.preparing and client.events[(PEER, 2)] == []
    finally:
        release.set()
    client.take(engine.admit(client.ready.get(timeout=30)))
    client.run()
    [end] = client.ends()[(PEER, 2)]
    assert isinstance(end, Done) and end.usage.completion_tokens == 8


def test_a_failing_output_fails_that_request_only(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    client = Client(engine)
    append = engine.output.append

    def fails_for_one(seq: Any, token: int, choice: Any) -> Any:
        if seq.key[1] == 1:
            raise UnicodeError("bad bytes")
        return append(seq, token, choice)

    monkeypatch.setattr(engine.output, "append", fails_for_one)
    client.add(chat(1))
    client.add(chat(2))
    client.run()
    [bad], [good] = client.ends()[(PEER, 1)], client.ends()[(PEER, 2)]
    assert isinstance(bad, Failed) and "bad bytes" in bad.message
    assert isinstance(good, Done) and good.usage.completion_tokens == 8


@pytest.mark.parametrize("queued_first", [False, True], ids=["before-queueing", "after-queueing"])
def test_a_failing_admission_fails_that_request_only(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, queued_first: bool
) -> None:
    client = Client(engine)
    client.add(chat(1))  # a neighbour already queued
    add = engine.scheduler.add

    def fails_for_two(seq: Any) -> None:
        if seq.key[1] == 2:
            if queued_first:  # a bug half way: the request got into the queue before the error
                add(seq)
            raise KeyError("simulated scheduler bug")
        add(seq)

    monkeypatch.setattr(engine.scheduler, "add", fails_for_two)
    client.add(chat(2))
    client.add(chat(3))  # a neighbour after it
    client.run()
    ends = client.ends()
    [bad] = ends[(PEER, 2)]
    assert isinstance(bad, Failed) and bad.code == "internal" and "simulated scheduler bug" in bad.message
    assert [type(e) for e in client.events[(PEER, 2)]] == [Failed]  # it never ran
    for request_id in (1, 3):
        [good] = ends[(PEER, request_id)]
        assert isinstance(good, Done) and good.usage.completion_tokens == 8
    assert not engine.has_work() and not engine.preparing and engine.blocks.num_used == 0


def test_a_failing_add_fails_that_request_only(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    client = Client(engine)
    submit = engine._intake_thread.submit
    calls = {"n": 0}

    def fails_once(*args: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise TypeError("simulated intake queue bug")
        return submit(*args)

    monkeypatch.setattr(engine._intake_thread, "submit", fails_once)
    client.add(chat(1), admit=False)
    client.add(chat(2))
    client.run()
    [bad], [good] = client.ends()[(PEER, 1)], client.ends()[(PEER, 2)]
    assert isinstance(bad, Failed) and bad.code == "internal" and "simulated intake queue bug" in bad.message
    assert isinstance(good, Done) and good.usage.completion_tokens == 8
    assert not engine.preparing and engine.blocks.num_used == 0
    client.add(chat(1))  # the id is free again
    client.run()
    assert [type(e) for e in client.ends()[(PEER, 1)]] == [Failed, Done]


def test_abort_at_each_stage_ends_once(engine: Engine) -> None:
    client = Client(engine)
    client.add(chat(1), admit=False)
    client.take(engine.abort(PEER, 1))  # at intake
    client.take(engine.admit(client.ready.get(timeout=30)))  # comes back later: dropped
    client.add(chat(2))
    client.take(engine.abort(PEER, 2))  # queued
    client.add(chat(3))
    client.take(engine.step())
    client.take(engine.abort(PEER, 3))  # running
    client.take(engine.abort(PEER, 3))  # twice: nothing more
    client.run()
    for request_id in (1, 2, 3):
        [end] = client.ends()[(PEER, request_id)]
        assert isinstance(end, Done) and end.finish_reason == "abort"
    assert engine.blocks.num_used == 0


def test_a_vanished_gateway_fails_its_requests_only(engine: Engine) -> None:
    client = Client(engine)
    client.add(chat(1), peer=PEER)
    client.add(chat(1), peer=OTHER)  # the same id from another gateway is another request
    client.add(chat(2), peer=PEER, admit=False)
    client.take(engine.step())
    client.take(engine.abort_peer(PEER, "the gateway disconnected"))
    client.take(engine.admit(client.ready.get(timeout=30)))
    client.run()
    ends = client.ends()
    assert [type(e) for e in ends[(PEER, 1)]] == [Failed] and [type(e) for e in ends[(PEER, 2)]] == [Failed]
    assert ends[(PEER, 1)][0].code == "unavailable"
    [other] = ends[(OTHER, 1)]
    assert isinstance(other, Done) and other.usage.completion_tokens == 8


@pytest.mark.parametrize(
    "params, field",
    [({"logit_bias": {10**6: 1.0}}, "logit_bias"), ({"stop_token_ids": [-1]}, "stop_token_ids")],
)
def test_token_ids_outside_the_vocabulary_are_refused(engine: Engine, params: dict[str, Any], field: str) -> None:
    client = Client(engine)
    client.add(chat(1, **params))
    [end] = client.ends()[(PEER, 1)]
    assert isinstance(end, Failed) and end.code == "bad_request" and field in end.message


def test_a_duplicate_id_in_flight_is_refused_without_touching_the_first(engine: Engine) -> None:
    client = Client(engine)
    client.add(chat(1))
    client.add(chat(1), admit=False)  # refused at once: nothing goes to intake
    client.run()
    kinds = [type(e) for e in client.events[(PEER, 1)] if not isinstance(e, Delta)]
    assert kinds == [Failed, Done]


def _raise(*_: Any) -> Callable[..., Any]:
    raise RuntimeError("always fails")


def test_a_thinking_budget_closes_the_think_block_then_the_answer_follows(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine.card, "capabilities", ["completion", "thinking"])  # as a thinking template says
    [word] = engine.tokenizer.encode("Yes", add_special_tokens=False)  # the random model says it, and only it
    request = Generate(
        id=1,
        model="tiny",
        prompt="Question: why?<think>",  # the prompt opened the think block, as Qwen3's templates do
        think=True,
        params=SamplingParams(
            temperature=0.0, max_tokens=24, ignore_eos=True, thinking_budget=5, logit_bias={word: 100.0}
        ),
    )
    client = Client(engine)
    client.add(request)
    [seq] = engine.scheduler.running or engine.scheduler.waiting
    client.run()
    events = client.events[(PEER, 1)]
    reasoning = "".join(e.reasoning for e in events if isinstance(e, Delta))
    answer = "".join(e.text for e in events if isinstance(e, Delta))
    close = engine.tokenizer.encode("\n</think>\n\n", add_special_tokens=False)
    output = seq.output_ids
    assert output[5 : 5 + len(close)] == close  # five tokens of thinking, then the block closed for it
    assert reasoning == "Yes" * 5 + "\n" and answer == "Yes" * (24 - 5 - len(close))
    assert isinstance(events[-1], Done) and events[-1].usage.completion_tokens == 24
