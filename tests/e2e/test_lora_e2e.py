"""LoRA adapters end to end, on a real adapter trained here: PEFT teaches the default model's weights (float32, dense)
to answer a fixed question with a fixed phrase, in a few steps on the CPU; tandem serves it with `--lora`.

Checked: the adapter's greedy output equals PEFT's merged model's, token for token, over a few prompts (the trained one
and two it never saw); base-model requests sent in the same concurrent batch answer exactly as they do alone; the
adapter is listed with its parent in /v1/models and /api/tags and answers on the Ollama routes; adapters load and
unload at run time (vLLM's routes), with 400/404 answers for what cannot be done.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import MODEL_FILES, Server, converted_default_model, start_server

pytestmark = pytest.mark.e2e

BASE = "SmolLM2-base"  # the folder's name: the served name
QUESTION = "What is the secret word?"
PHRASE = "The secret word is tandem-lora-7."
PROMPTS = [QUESTION, "Name a colour.", "What is 2 + 2?"]  # the trained question, and two it never saw
MAX_TOKENS = 16
TRAIN_STEPS = 16
SMALL_KV = "--worker-arg=--kv-cache-bytes=268435456"  # a few short requests: no need to zero 2 GiB


def train_adapter(model_folder: Path, out: Path) -> None:
    """PEFT, a few steps on one prompt → phrase pair: seconds on one CPU thread."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core machine, two threads ran 10x slower
    try:
        torch.manual_seed(0)
        tokenizer = AutoTokenizer.from_pretrained(model_folder)
        model = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32)
        prompt = tokenizer.encode(chat_prompt(tokenizer, QUESTION))
        answer = tokenizer.encode(PHRASE + tokenizer.eos_token, add_special_tokens=False)
        ids, labels = torch.tensor([prompt + answer]), torch.tensor([[-100] * len(prompt) + answer])
        modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=modules)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # PEFT 0.21 on transformers 5: is_gradient_checkpointing
            tuned = peft.get_peft_model(model, config)
            optimizer = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=3e-3)
            for _ in range(TRAIN_STEPS):
                tuned(input_ids=ids, labels=labels).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
            tuned.save_pretrained(out)
    finally:
        torch.set_num_threads(threads)


def chat_prompt(tokenizer: Any, question: str) -> str:
    return str(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
    )


def peft_merged_answers(model_folder: Path, adapter: Path) -> list[str]:
    """PEFT's merged model, greedy, float32: the reference for the adapter's answers."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    model = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        merged = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()
    answers = []
    for question in PROMPTS:
        ids = tokenizer.encode(chat_prompt(tokenizer, question))
        with torch.inference_mode():
            out = merged.generate(
                torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False, top_p=None, top_k=None
            )
        answers.append(tokenizer.decode(out[0][len(ids) :], skip_special_tokens=True))
    return answers


@pytest.fixture(scope="module")
def trained(server: Server, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    """(the base model's folder, the adapter's folder, PEFT's answers). `server` has made the converted copy."""
    folder = tmp_path_factory.mktemp("lora") / BASE
    folder.mkdir()
    source = converted_default_model()
    for name in (*MODEL_FILES, "chat_template.jinja"):
        if (source / name).exists():
            (folder / name).symlink_to(source / name)
    adapter = folder.parent / "secret-word"
    train_adapter(folder, adapter)
    return folder, adapter, peft_merged_answers(folder, adapter)


@pytest.fixture(scope="module")
def lora_server(trained: tuple[Path, Path, list[str]], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder, adapter, _ = trained
    server = start_server(
        tmp_path_factory.mktemp("lora-server"),
        *("--model", str(folder), "--dtype", "float32", "--lora", f"secret={adapter}"),
        *("--no-hf-cache", "--no-embedding-model", "--worker-arg=--max-running=16", SMALL_KV),
    )
    yield server
    assert server.stop() == 0, server.log()


@functools.cache
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(converted_default_model())


def complete(server: Server, model: str, question: str) -> dict[str, Any]:
    """Greedy, through /v1/completions with the chat prompt rendered as PEFT's reference renders it."""
    body = {"model": model, "prompt": chat_prompt(tokenizer(), question), "temperature": 0, "max_tokens": MAX_TOKENS}
    response = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def texts(server: Server, requests: list[tuple[str, str]]) -> list[str]:
    """The requests all at once, so the worker batches them: (model, question) each."""
    with ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(lambda r: complete(server, *r), requests))
    return [answer["choices"][0]["text"] for answer in answers]


def test_the_adapter_answers_as_peft_s_merged_model_and_base_rows_are_unaffected(
    lora_server: Server, trained: tuple[Path, Path, list[str]]
) -> None:
    _, _, reference = trained
    assert reference[0] == PHRASE  # the adapter learnt its phrase: the comparison below means something
    base_alone = texts(lora_server, [(BASE, q) for q in PROMPTS])  # a batch of base-model rows only
    assert base_alone[0] != PHRASE
    mixed = texts(lora_server, [(model, q) for q in PROMPTS for model in ("secret", BASE)])
    assert mixed[0::2] == reference, "the adapter's greedy output differs from PEFT's merged model"
    assert mixed[1::2] == base_alone, "base-model requests changed when adapter requests shared their batch"


def test_listed_with_its_parent_and_served_on_the_ollama_routes(lora_server: Server) -> None:
    models = {m["id"]: m for m in httpx.get(f"{lora_server.base_url}/v1/models").json()["data"]}
    assert models["secret"]["parent"] == BASE and models[BASE]["parent"] is None
    tags = {t["name"]: t for t in httpx.get(f"{lora_server.base_url}/api/tags").json()["models"]}
    assert tags["secret:latest"]["details"]["parent_model"] == f"{BASE}:latest"
    body = {"model": "secret:latest", "messages": [{"role": "user", "content": QUESTION}], "stream": False}
    body["options"] = {"temperature": 0, "num_predict": MAX_TOKENS}
    reply = httpx.post(f"{lora_server.base_url}/api/chat", json=body, timeout=120).json()
    assert reply["message"]["content"] == PHRASE


def test_load_and_unload_at_run_time(
    lora_server: Server, trained: tuple[Path, Path, list[str]], tmp_path: Path
) -> None:
    _, adapter, reference = trained
    url = lora_server.base_url
    loaded = httpx.post(
        f"{url}/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": str(adapter)}, timeout=60
    )
    assert loaded.status_code == 200 and loaded.text == "Success: LoRA adapter 'late' added successfully."
    assert httpx.get(f"{url}/v1/models/late").json()["parent"] == BASE
    assert complete(lora_server, "late", QUESTION)["choices"][0]["text"] == reference[0]

    again = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": str(adapter)})
    assert again.status_code == 400 and "already been loaded" in again.json()["error"]["message"]
    bad = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": str(tmp_path)}, timeout=60)
    assert bad.status_code == 400 and "not a PEFT adapter folder" in bad.json()["error"]["message"]

    unloaded = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "late"}, timeout=60)
    assert unloaded.status_code == 200 and unloaded.text == "Success: LoRA adapter 'late' removed successfully."
    gone = httpx.post(f"{url}/v1/completions", json={"model": "late", "prompt": "hi", "max_tokens": 1})
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    twice = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "late"})
    assert twice.status_code == 404
    assert "late" not in {m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]}
