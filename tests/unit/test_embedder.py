"""The embedding engine's step on a tiny random BERT: the inputs of concurrent requests are encoded together."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import BertConfig, BertModel

from common.protocol import Embed, Embeddings, ModelCard
from worker.embedder import Embedder, Encoder

CARD = ModelCard(name="tiny-bert", context_length=64, architecture="bert", vocab_size=100, embedding_length=16,
                 capabilities=["embedding"])  # fmt: skip


def tiny_embedder() -> Embedder:
    config = BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    model = BertModel(config).eval()
    tokenizer = SimpleNamespace(pad_token_id=0)  # the inputs are token ids: only the padding is asked for
    return Embedder(Encoder(model, tokenizer, CARD, torch.device("cpu"), "mean", load_seconds=0.0))


def test_one_step_encodes_the_inputs_of_concurrent_requests_in_one_call(monkeypatch: pytest.MonkeyPatch) -> None:
    embedder = tiny_embedder()
    calls: list[list[list[int]]] = []
    encode = embedder._encode

    def counted(batch: list[list[int]]) -> Any:
        calls.append(batch)
        return encode(batch)

    monkeypatch.setattr(embedder, "_encode", counted)
    assert embedder.embed(b"a", Embed(id=1, model=CARD.name, inputs=[[1, 5, 2], [1, 7, 8, 9, 2]])) == []
    assert embedder.embed(b"b", Embed(id=1, model=CARD.name, inputs=[[1, 6, 2]])) == []
    answers = embedder.step()
    assert len(calls) == 1 and sorted(map(len, calls[0])) == [3, 3, 5]  # both requests, shortest first
    assert not embedder.has_work() and not embedder.pending
    by_peer = {peer: event for peer, event in answers}
    assert set(by_peer) == {b"a", b"b"}
    first, second = by_peer[b"a"], by_peer[b"b"]
    assert isinstance(first, Embeddings) and isinstance(second, Embeddings)
    assert (len(first.vectors), len(second.vectors)) == (2, 1)
    assert (first.num_prompt_tokens, second.num_prompt_tokens) == (8, 3)
    alone = tiny_embedder()  # the same input encoded by itself: padding in the batch changed nothing
    alone.embed(b"c", Embed(id=2, model=CARD.name, inputs=[[1, 6, 2]]))
    [(_, single)] = alone.step()
    assert isinstance(single, Embeddings)
    batched = torch.frombuffer(bytearray(second.vectors[0]), dtype=torch.float32)
    assert torch.allclose(batched, torch.frombuffer(bytearray(single.vectors[0]), dtype=torch.float32), atol=1e-5)
