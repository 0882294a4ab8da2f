"""`python launcher.py chat [--url URL] [--model NAME]`: chat with a running tandem in the terminal, as `ollama run`.

The answer streams as it is written (Ollama's /api/chat); thinking is shown apart, dimmed, and `/set hidethinking`
hides it. Input: one line, or several between lines of `\"\"\"`. Ctrl-C stops the answer being written (closing the
stream aborts the request in the worker) and keeps the program; Ctrl-D or /bye leaves. `-q PROMPT` answers once.
"""

from __future__ import annotations

import argparse
import json
import readline  # noqa: F401  (line editing and history for input())
import signal
import sys
from dataclasses import dataclass, field
from typing import Any, TextIO

import httpx

DIM, RESET = "\x1b[2m", "\x1b[0m"
HELP = """Commands:
  /set parameter NAME VALUE   e.g. temperature 0.2, num_predict 200, top_p 0.9, top_k 40, seed 1, stop "###"
  /set system TEXT            the system message
  /set think | nothink        ask for thinking, or not (thinking models)
  /set hidethinking | showthinking
  /show info                  the model's details
  /clear                      forget the conversation
  /bye                        leave
Use \"\"\" to begin and end a message of several lines."""
FLOATS = {"temperature", "top_p", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty"}
INTS = {"num_predict", "top_k", "seed", "num_ctx"}


@dataclass
class Session:
    client: httpx.Client
    model: str
    out: TextIO
    system: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    think: bool | None = None
    hide_thinking: bool = False
    history: list[dict[str, str]] = field(default_factory=list)

    def ask(self, text: str) -> None:
        """Stream one answer; on Ctrl-C leave the stream (the server aborts it) and forget this exchange."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        user = {"role": "user", "content": text}
        body: dict[str, Any] = {"model": self.model, "messages": [*system, *self.history, user], "stream": True}
        body |= {"options": self.options} if self.options else {}
        body |= {"think": self.think} if self.think is not None else {}
        try:
            reply = self._stream(body)
        except KeyboardInterrupt:
            self.out.write(f"{RESET}\n")
            return
        self.history += [user, {"role": "assistant", "content": reply}]

    def _stream(self, body: dict[str, Any]) -> str:
        parts: list[str] = []
        thinking = False
        with self.client.stream("POST", "/api/chat", json=body) as response:
            if response.status_code != 200:
                response.read()
                self.out.write(f"Error: {_error(response)}\n")
                return ""
            for line in response.iter_lines():
                chunk = json.loads(line) if line else {}
                if "error" in chunk:
                    self.out.write(f"{RESET}\nError: {chunk['error']}\n")
                    break
                message = chunk.get("message", {})
                if message.get("thinking") and not self.hide_thinking:
                    self.out.write(("" if thinking else f"{DIM}Thinking...\n") + message["thinking"])
                    thinking = True
                if message.get("content"):
                    self.out.write((f"\n...done thinking.{RESET}\n\n" if thinking else "") + message["content"])
                    thinking = False
                    parts.append(message["content"])
                self.out.flush()
        self.out.write(f"{RESET if thinking else ''}\n\n")
        return "".join(parts)

    def command(self, line: str) -> bool:
        """Run a /command; False when it is time to leave."""
        words = line.split(maxsplit=3)
        match words:
            case ["/bye" | "/exit"]:
                return False
            case ["/clear"]:
                self.history.clear()
                self.out.write("Cleared session context\n")
            case ["/set", "parameter", name, value]:
                self.out.write(self.set_parameter(name, value) + "\n")
            case ["/set", "system", *_]:
                self.system = line.split("system", 1)[1].strip().strip('"')
                self.out.write("Set system message.\n")
            case ["/set", "think" | "nothink" as mode]:
                self.think = mode == "think"
                self.out.write(f"Set '{mode}' mode.\n")
            case ["/set", "hidethinking" | "showthinking" as mode]:
                self.hide_thinking = mode == "hidethinking"
                self.out.write(f"Set '{mode}' mode.\n")
            case ["/show", "info"]:
                self.out.write(self.info() + "\n")
            case _:
                self.out.write(HELP + "\n")
        return True

    def set_parameter(self, name: str, value: str) -> str:
        try:
            parsed: Any = float(value) if name in FLOATS else int(value) if name in INTS else value.strip('"')
        except ValueError:
            return f"Couldn't set parameter: {value!r} is not a number"
        if name == "stop":
            parsed = [*self.options.get("stop", []), parsed]
        self.options[name] = parsed
        return f"Set parameter '{name}' to '{value}'"

    def info(self) -> str:
        shown = self.client.post("/api/show", json={"model": self.model})
        if shown.status_code != 200:
            return f"Error: {_error(shown)}"
        data = shown.json()
        details, model_info = data.get("details", {}), data.get("model_info", {})
        arch = model_info.get("general.architecture", "")
        rows = [
            ("architecture", arch),
            ("parameters", details.get("parameter_size", "")),
            ("context length", model_info.get(f"{arch}.context_length", "")),
            ("quantization", details.get("quantization_level", "")),
            ("capabilities", ", ".join(data.get("capabilities", []))),
        ]
        return "  Model\n" + "\n".join(f"    {name:<16}{value}" for name, value in rows)


def _error(response: httpx.Response) -> str:
    try:
        return str(response.json().get("error", response.text))
    except ValueError:
        return response.text


def read_message(prompt: str = ">>> ") -> str:
    """One line, or the lines between two `\"\"\"` (as Ollama reads them). EOFError on Ctrl-D."""
    line = input(prompt)
    if not line.startswith('"""'):
        return line
    lines = [line[3:]]
    while not lines[-1].endswith('"""') or len(lines) == 1 and lines[0] == "":
        lines.append(input("... "))
    lines[-1] = lines[-1].removesuffix('"""')
    return "\n".join(lines).strip("\n")


def repl(session: Session) -> None:
    session.out.write(">>> Send a message (/? for help)\n")
    while True:
        try:
            line = read_message()
        except KeyboardInterrupt:
            session.out.write("\nUse Ctrl + d or /bye to exit.\n")
            continue
        except EOFError:
            session.out.write("\n")
            return
        if line.startswith("/"):
            if not session.command(line.strip()):
                return
        elif line.strip():
            session.ask(line)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python launcher.py chat", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="a running tandem")
    parser.add_argument("--model", help="default: the first model the server lists")
    parser.add_argument("-q", "--query", help="answer this prompt once and exit")
    parser.add_argument("--hidethinking", action="store_true", help="do not show the model's thinking")
    parser.add_argument("--think", action=argparse.BooleanOptionalAction, default=None, help="ask for thinking, or not")
    parser.add_argument(
        "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"), help="as /set parameter"
    )
    args = parser.parse_args(argv)
    # Ctrl-C must reach us as KeyboardInterrupt even when we inherited SIGINT ignored: a shell script's background
    # job (`cmd &`) starts that way, Python then installs no handler, and Ctrl-C would neither stop an answer nor
    # say how to leave (the suite's chat test hung so when the suite itself ran as such a job).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with httpx.Client(base_url=args.url.rstrip("/"), timeout=httpx.Timeout(10, read=None)) as client:
        try:
            model = args.model or client.get("/api/tags").json()["models"][0]["name"]
        except (httpx.HTTPError, LookupError, ValueError) as exc:
            print(f"Error: no model to chat with at {args.url}: {exc!r}", file=sys.stderr)
            return 1
        hide = args.hidethinking or (args.query is not None and not sys.stdout.isatty())  # a script wants the answer
        session = Session(client, model, sys.stdout, think=args.think, hide_thinking=hide)
        for name, value in args.parameter:
            session.set_parameter(name, value)
        if args.query is not None:
            session.ask(args.query)
            return 0
        repl(session)
    return 0
