"""The seed services' own request examples (tests/data/seed_examples.json, every curl example of
../shared/seeds/ as written there) and the answers their documents promise, as JSON Schemas.

Shared by the unit tests (scripted pool) and the end-to-end tests (the real model). The schemas hold the fields
and types each document shows; where two seeds share a route, the answer must hold both seeds' fields.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema

ROOT = Path(__file__).resolve().parents[1]
SEED_DOCS = ROOT.parent / "shared" / "seeds"  # where the project keeps them beside the repository, when it does


@dataclass(frozen=True)
class Example:
    seed: str
    method: str
    path: str
    body: dict[str, Any] | None

    @property
    def name(self) -> str:
        return f"{self.seed} {self.method} {self.path} {json.dumps(self.body, ensure_ascii=False)[:40]}"


EXAMPLES = [Example(**row) for row in json.loads((ROOT / "tests" / "data" / "seed_examples.json").read_text())]


def _object(**properties: Any) -> dict[str, Any]:
    return {"type": "object", "required": list(properties), "properties": properties}


STRING, BOOLEAN, INTEGER, NUMBER = ({"type": t} for t in ("string", "boolean", "integer", "number"))
USAGE = _object(prompt_tokens=INTEGER, completion_tokens=INTEGER, total_tokens=INTEGER)
HEALTHY = {"const": "healthy"}

# (method, path) → what the seed documents answer. /health: seeds 003 and 001 (000's "simple check" shows none).
DOCUMENTED: dict[tuple[str, str], dict[str, Any]] = {
    ("POST", "/api/v1/chat"): _object(response=STRING, success={"const": True}, error={"type": "null"}),
    ("GET", "/api/v1/health"): _object(status=HEALTHY, message=STRING),
    ("GET", "/api/v1/model/info"): _object(
        model_name=STRING, device=STRING, is_loaded={"const": True}, model_size=INTEGER
    ),
    ("POST", "/api/v1/model/load"): _object(status={"const": "loaded"}, message=STRING),
    ("GET", "/health"): _object(
        status=HEALTHY,
        model_loaded={"const": True},
        model_name=STRING,
        gpu_available=BOOLEAN,
        memory=_object(used_bytes=INTEGER, total_bytes=INTEGER),
    ),
    ("POST", "/generate"): _object(generated_text=STRING, usage=USAGE, model=STRING, generation_time=NUMBER),
    ("POST", "/thinking"): _object(
        answer=STRING, reasoning=STRING, confidence={"type": "number", "minimum": 0, "maximum": 1}
    ),
    ("POST", "/"): _object(
        response=STRING,
        history={"type": "array", "items": {"type": "array", "items": STRING, "minItems": 2, "maxItems": 2}},
        status={"const": 200},
        time={"type": "string", "pattern": r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d$"},
    ),
    ("GET", "/"): _object(message=STRING, version=STRING, docs={"const": "/docs"}, health={"const": "/health"}),
    ("GET", "/model/info"): _object(
        model_name=STRING, model_path=STRING, adapter_path={}, template=STRING, status={"const": "loaded"}
    ),
    ("POST", "/chat"): _object(response=STRING, usage=USAGE, model=STRING),
    ("POST", "/batch"): _object(results={"type": "array", "items": STRING}, usage=USAGE, model=STRING),
    ("POST", "/api/chat"): _object(
        model=STRING,
        created_at=STRING,
        done={"const": True},
        message=_object(role={"const": "assistant"}, content=STRING),
    ),
    ("POST", "/v1/chat/completions"): _object(
        id=STRING, object={"const": "chat.completion"}, model=STRING, choices={"type": "array", "minItems": 1}
    ),
}


def check_answer(example: Example, answer: Any) -> None:
    """The answer holds what the seed's document promises for this route (types and fixed values)."""
    jsonschema.validate(answer, DOCUMENTED[(example.method, example.path)])
    if example.path == "/batch" and example.body:
        assert len(answer["results"]) == len(example.body["prompts"])


# -- the seed documents themselves, where they are beside the repository ------------------------------------------

_CURL = re.compile(
    r"curl[^\n]*?(?:-X (\w+) )?\"?((?:http://|\$BASE_URL)[^\s\"\\]*)\"?(.*?)(?=\n\s*\n|\n```|\ncurl|\n#|\necho)", re.S
)


def examples_in_documents() -> list[tuple[str, str, str, str | None]]:
    """(seed, method, path, JSON body text) of every curl example in the documents, mojibake and all."""
    found = []
    for document in sorted(SEED_DOCS.glob("*.txt")):
        text = document.read_text(encoding="utf-8", errors="replace")
        for match in _CURL.finditer(text):
            data = re.search(r"-d '(.*?)'", match.group(0), re.S)
            path = re.sub(r"^(http://[^/]+|\$BASE_URL)", "", match.group(2)) or "/"
            method = match.group(1) or ("POST" if data else "GET")
            found.append((document.name[:3], method, path, data.group(1) if data else None))
    return found


def same_up_to_mojibake(documented: Any, ours: Any) -> bool:
    """Equal, where a run of U+FFFD in the document (bytes lost to a bad encoding) stands for up to 3 characters."""
    if isinstance(documented, str) and isinstance(ours, str):
        pattern = ".{0,3}".join(re.escape(piece) for piece in re.split("\ufffd+", documented))
        return re.fullmatch(pattern, ours, re.S) is not None
    if isinstance(documented, dict) and isinstance(ours, dict):
        return documented.keys() == ours.keys() and all(same_up_to_mojibake(documented[k], ours[k]) for k in ours)
    if isinstance(documented, list) and isinstance(ours, list):
        return len(documented) == len(ours) and all(map(same_up_to_mojibake, documented, ours))
    return bool(documented == ours)
