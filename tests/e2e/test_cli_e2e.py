"""The launcher's client commands on the real model: `batch` (an OpenAI Batch file, through a running server and
through a server of its own) and `chat` (the terminal chat, driven through a pseudo-terminal as a person types)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pexpect
import pytest

from tests.e2e.conftest import ROOT, Server

pytestmark = pytest.mark.e2e

# Greedy answers "The capital of France is Paris." on every path, 1.5 logits clear of the next first token. "What is
# the capital of France?" is a tie at the first token ("The" against "L'" within 0.04 in float32; llama.cpp on the
# same file answers "L'Étoile, la Marseillaise"), so which answer it got moved with any change of rounding.
QUESTION = "Name the capital of France."


def chat_line(custom_id: str, content: str = QUESTION) -> dict[str, object]:
    body = {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": content}], "temperature": 0}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": {**body, "max_tokens": 8}}


def run_batch(tmp_path: Path, lines: list[dict[str, object]], *args: str) -> dict[str, dict[str, object]]:
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    command = [sys.executable, "launcher.py", "batch", str(source), str(target), *args]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    answers = [json.loads(line) for line in target.read_text().splitlines()]
    return {str(answer["custom_id"]): answer for answer in answers}


def test_batch_through_a_running_server(server: Server, tmp_path: Path) -> None:
    completion = {"model": "SmolLM2-135M-Instruct", "prompt": "The capital of France is", "max_tokens": 4}
    lines = [
        chat_line("a"),
        chat_line("b"),
        {"custom_id": "text", "method": "POST", "url": "/v1/completions", "body": completion},
        {
            "custom_id": "embed",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "all-MiniLM-L6-v2", "input": "hello"},
        },
        {"custom_id": "empty", "method": "POST", "url": "/v1/embeddings", "body": {}},
        {"custom_id": "bad", "method": "POST", "url": "/v1/moderations", "body": {}},
    ]
    answers = run_batch(tmp_path, lines, "--url", server.base_url)
    a, b = (answers[key]["response"] for key in "ab")
    assert a["status_code"] == b["status_code"] == 200 and a["request_id"]  # type: ignore[index]
    assert a["body"]["choices"][0]["message"] == b["body"]["choices"][0]["message"]  # type: ignore[index]  # greedy
    assert answers["text"]["response"]["body"]["object"] == "text_completion"  # type: ignore[index]
    embedding = answers["embed"]["response"]["body"]["data"][0]["embedding"]  # type: ignore[index]
    assert len(embedding) == 384  # all-MiniLM-L6-v2, loaded on demand by the server's registry
    empty = answers["empty"]["response"]
    assert empty["status_code"] == 400 and empty["body"]["error"]["param"] == "model"  # type: ignore[index]
    assert answers["bad"]["response"] is None and answers["bad"]["error"]["code"] == "invalid_request"  # type: ignore[index]


def test_batch_with_a_server_of_its_own(server: Server, tmp_path: Path) -> None:
    """`server` only makes sure the default model's converted copy exists, so this start is quick."""
    answers = run_batch(tmp_path, [chat_line("only")], "--launcher-arg=--worker-arg=--max-running=4")
    assert answers["only"]["response"]["status_code"] == 200  # type: ignore[index]


# -- the terminal chat --------------------------------------------------------------------------


def ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def spawn_chat(url: str, *args: str) -> pexpect.spawn:
    """The chat starts with SIGINT ignored, as a background job of a script starts (and as this suite's children
    do when the suite runs as one): its Ctrl-C handling must not depend on what it inherits."""
    env = {**os.environ, "TERM": "dumb"}  # readline without terminal escapes
    command = ["launcher.py", "chat", "--url", url, *args]
    chat = pexpect.spawn(
        sys.executable, command, cwd=str(ROOT), env=env, encoding="utf-8", timeout=120, preexec_fn=ignore_sigint
    )
    chat.expect_exact(">>> Send a message (/? for help)")
    chat.expect_exact(">>> ")
    return chat


def say(chat: pexpect.spawn, line: str) -> str:
    """Type a line; what came back before the next prompt."""
    chat.sendline(line)
    chat.expect_exact(">>> ")
    return str(chat.before)


def aborted(server: Server) -> float:
    metrics = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    lines = [line for line in metrics.splitlines() if line.startswith("tandem:request_success_total{")]
    return sum(float(line.split()[-1]) for line in lines if 'finished_reason="abort"' in line)


def test_terminal_chat(server: Server) -> None:
    chat = spawn_chat(server.base_url)
    assert "Set parameter 'temperature' to '0'" in say(chat, "/set parameter temperature 0")
    say(chat, "/set parameter num_predict 12")
    assert "Paris" in say(chat, QUESTION)
    chat.sendline('"""')
    chat.sendline("Name the capital")
    chat.sendline('of France."""')
    chat.expect_exact(">>> ")
    assert "Paris" in str(chat.before)
    assert "context length" in say(chat, "/show info") and "Cleared session context" in say(chat, "/clear")
    assert "Set system message." in say(chat, "/set system You answer in one word.")

    before = aborted(server)
    say(chat, "/set parameter num_predict 4000")
    chat.sendline("Write a very long story about a dragon.")
    chat.expect_exact("about a dragon.\r\n")  # the line's echo
    chat.expect(r"[A-Za-z]{3}")  # the answer has started
    chat.sendintr()  # Ctrl-C: the answer stops, the program stays
    chat.expect_exact(">>> ")
    deadline = time.monotonic() + 30
    while aborted(server) == before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert aborted(server) == before + 1  # the request was aborted in the worker, not left to run 4000 tokens

    chat.sendintr()
    chat.expect_exact("Use Ctrl + d or /bye to exit.")
    chat.sendline("/bye")
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0


def test_terminal_chat_shows_thinking_dimmed_and_can_hide_it(thinking_server: Server) -> None:
    chat = spawn_chat(thinking_server.base_url)
    say(chat, "/set parameter num_predict 6")
    shown = say(chat, QUESTION)
    assert "\x1b[2mThinking..." in shown
    say(chat, "/set hidethinking")
    assert "Thinking..." not in say(chat, QUESTION)
    chat.sendeof()
    chat.expect(pexpect.EOF)


def test_one_question_for_scripts(server: Server) -> None:
    parameters = ["--parameter", "temperature", "0", "--parameter", "num_predict", "12"]
    command = [sys.executable, "launcher.py", "chat", "--url", server.base_url, *parameters, "-q", QUESTION]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "Paris" in done.stdout and "\x1b" not in done.stdout
