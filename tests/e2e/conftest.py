"""End-to-end fixtures: the real launcher, the real default model, on free loopback ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 300  # the very first start converts the GGUF file; later starts use the cache
# The seed services' routes mostly name no output limit (or 512 tokens): keep their answers short here.
SEED_MAX_TOKENS = "--gateway-arg=--seed-max-tokens=16"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def health(self) -> httpx.Response:
        return httpx.get(f"{self.base_url}/health", timeout=5)

    def wait_ready(self, timeout: float = START_TIMEOUT, gateways: int = 1) -> dict:
        """Until /health says ready from `gateways` distinct gateway processes (they share the port)."""
        deadline = time.monotonic() + timeout
        ready: set[int] = set()
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"launcher exited with {self.process.returncode}:\n{self.log()}")
            try:
                response = self.health()
                if response.status_code == 200:
                    ready.add(response.json()["gateway_pid"])
                    if len(ready) >= gateways:
                        return response.json()
            except httpx.HTTPError:
                pass
            time.sleep(0.05 if ready else 0.25)
        raise TimeoutError(f"tandem not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


# httpx's default timeout is 5 s, and most calls here take the default: under two suites at once on 2 cores, a short
# generation took longer (a 4-token /api/chat measured 5.0 s: the client gave up, the test failed). Waits are
# deadlines for hangs here, never timing assertions, so every default becomes 120 s. The default is one shared
# Timeout object that httpx's functions and clients take as their default argument, hence the change in place.
_HTTPX_DEFAULT = httpx._config.DEFAULT_TIMEOUT_CONFIG
_HTTPX_DEFAULT.connect = _HTTPX_DEFAULT.read = _HTTPX_DEFAULT.write = _HTTPX_DEFAULT.pool = 120.0

# The session's shared servers keep their model loaded: with the default keep_alive (5 min) a model unloads while
# other modules run, and the seed routes then rightly say `model_loaded: false` (their documented answer is true):
# a verdict that depended on how long the modules in between took.
KEEP_LOADED = "--keep-alive=-1"

# The KV cache a test server gets unless it names one: ~23,000 tokens, far more than any test here holds at once. The
# launcher refuses to load a model whose estimate (weights + KV + 1 GiB) exceeds MemAvailable, as Ollama does; the
# 2 GiB default made that estimate 3.3 GiB, which two suites running at once on this 24 GiB machine ran out of.
TEST_KV = "--worker-arg=--kv-cache-bytes=536870912"


def start_server(log_dir: Path, *extra: str) -> Server:
    if not any("--kv-cache-bytes" in arg for arg in extra):
        extra = (*extra, TEST_KV)
    port = free_port()
    log_path = log_dir / f"launcher-{port}.log"
    command = [sys.executable, "launcher.py", "--port", str(port), "--grace-period", "10", *extra]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    server = Server(process, port, log_path)
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One tandem shared by the tests that leave it as they found it."""
    server = start_server(
        tmp_path_factory.mktemp("tandem"), "--worker-arg=--max-running=16", SEED_MAX_TOKENS, KEEP_LOADED
    )
    yield server
    assert server.stop() == 0, server.log()


# -- a thinking model: the default model's weights behind a Qwen3-style chat template --------------------------

QWEN3_STYLE_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}{{- messages[0].content + '\n\n' }}{%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n" }}
    {{- "You are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}{{- "\n" + (tool | tojson) }}{%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within " }}
    {{- "<tool_call></tool_call> XML tags:\n<tool_call>\n" }}
    {{- '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n' }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == "user" or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>assistant\n' + (message.content or '') }}
        {%- for call in message.tool_calls or [] %}
            {%- if call.function %}{%- set call = call.function %}{%- endif %}
            {{- '\n<tool_call>\n{"name": "' + call.name + '", "arguments": ' }}
            {{- (call.arguments | tojson) + '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or messages[loop.index0 - 1].role != "tool" %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\n<tool_response>\n' + message.content + '\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != "tool" %}{{- '<|im_end|>\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}
    {%- else %}{{- '<think>\n' }}{%- endif %}
{%- endif %}
"""
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def converted_default_model() -> Path:
    """The default model's safetensors copy, which the session's `server` made on its first start."""
    cache = Path(os.environ.get("TANDEM_CACHE_DIR") or Path.home() / ".cache" / "tandem")
    copies = sorted(cache.glob("SmolLM2-135M-Instruct*/tandem.json"), key=lambda path: path.stat().st_mtime)
    assert copies, f"no converted copy of the default model in {cache}"
    return copies[-1].parent


@pytest.fixture(scope="session")
def thinking_server(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The default model's weights behind a Qwen3-style template: capabilities completion, tools, thinking.
    One for the session, started by the first module that needs it."""
    folder = tmp_path_factory.mktemp("models") / "SmolLM2-Qwen3-template"
    folder.mkdir()
    source = converted_default_model()
    for name in MODEL_FILES:
        (folder / name).symlink_to(source / name)
    (folder / "chat_template.jinja").write_text(QWEN3_STYLE_TEMPLATE)
    thinking = start_server(
        tmp_path_factory.mktemp("thinking"),
        "--model",
        str(folder),
        "--worker-arg=--max-running=8",
        "--worker-arg=--param=temperature=0",  # greedy where a request leaves it unset (the seed routes): one verdict
        "--gateway-arg=--reasoning-field",
        SEED_MAX_TOKENS,
        KEEP_LOADED,
    )
    yield thinking
    assert thinking.stop() == 0, thinking.log()
